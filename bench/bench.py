"""Benchmarks of reflow.py against reflow-hpc and Snakemake (issue 6); start it with ``bench/run``.

    bench/run                 all scenarios (about 6-9 minutes on 2 idle cores)
    bench/run --quick         fewer repetitions and smaller sizes (about 2 minutes)
    bench/run 3 6             only scenarios 3 and 6 (3 and 4 always run together)
    bench/run --reps 7        repetitions of the cheap scenarios (big ones scale down)
    bench/run --profile       also write cProfile top entries of our side to bench/out/

Every measurement is a fresh process (bench/driver.py or a CLI) with a fresh
HOME, XDG_CACHE_HOME, XDG_CONFIG_HOME and TMPDIR, so both stores and caches
start empty.  Ours and reflow-hpc alternate, and the table shows medians.
Both run on the venv's interpreter: ours through PYTHONPATH (a copy of
reflow.py compiled to .pyc, as after its first import), reflow-hpc from the
venv's site-packages with our file nowhere on sys.path.  Each figure is a
wall time with the CPU time beside it: on a shared machine the CPU time is
the steadier one, so targets are judged on both.  Peak RSS and the CPU time
of whole processes come from /usr/bin/time (the process and the children it
waited for).  Writes bench/RESULTS.md.  Not part of the test suite.
"""

import argparse
import datetime
import getpass
import hashlib
import json
import os
import platform
import py_compile
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
TIME = "/usr/bin/time"
LOGIN_NAME = getpass.getuser()
SCHEDULER_BINARIES = ("sbatch", "sacct", "squeue", "scancel", "scontrol", "sinfo", "srun")


class Sample:
    """One measured process: wall and CPU time, peak RSS, exit code, the driver's JSON (if any)."""

    def __init__(self, wall, cpu, rss_mb, rc, data, stdout, stderr):
        self.wall, self.cpu, self.rss_mb, self.rc = wall, cpu, rss_mb, rc
        self.data, self.stdout, self.stderr = data, stdout, stderr

    @property
    def t(self):
        """The driver's timed part (wall), else the process wall time."""
        return self.data["t"] if self.data and "t" in self.data else self.wall

    @property
    def c(self):
        """The driver's timed part (CPU), else the process CPU time."""
        return self.data["cpu"] if self.data and "cpu" in self.data else self.cpu


class Measure:
    """A median figure: wall seconds and CPU seconds (None when not meaningful)."""

    def __init__(self, wall, cpu=None):
        self.wall, self.cpu = wall, cpu

    @classmethod
    def of(cls, samples, process=False):
        """Median of samples: timed part (default) or whole process."""
        if not samples:
            return None
        walls = [s.wall if process else s.t for s in samples]
        cpus = [s.cpu if process else s.c for s in samples]
        return cls(statistics.median(walls), statistics.median(cpus) if None not in cpus else None)


class Bench:
    """Runs the scenarios and collects table rows."""

    def __init__(self, venv, reps, quick, profile):
        self.venv, self.reps, self.quick, self.profile = Path(venv), reps, quick, profile
        self.python = str(self.venv / "bin" / "python")
        self.work = Path(tempfile.mkdtemp(prefix="reflow-bench-"))
        self.ours_lib = self.work / "ours"
        self.ours_lib.mkdir()
        shutil.copy2(ROOT / "reflow.py", self.ours_lib / "reflow.py")
        py_compile.compile(str(self.ours_lib / "reflow.py"), doraise=True)
        self.nopyc_lib = self.work / "ours-nopyc"
        self.nopyc_lib.mkdir()
        shutil.copy2(ROOT / "reflow.py", self.nopyc_lib / "reflow.py")
        self.rows, self.notes, self.calls = [], [], []
        self.homes = 0

    # ------------------------------------------------------------ processes

    def home(self):
        """Return a fresh HOME with its cache, config and temp directories."""
        self.homes += 1
        home = self.work / f"h{self.homes:04d}"
        for sub in (".cache", ".config", "tmp"):
            (home / sub).mkdir(parents=True)
        return home

    def env(self, impl, home, path_prefix=None, extra=None):
        """Return the environment of a child: ours, ours-nopyc, theirs (reflow-hpc) or plain."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "REFLOW_", "XDG_", "VIRTUAL_ENV", "BENCH_"))}
        env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
                   TMPDIR=str(home / "tmp"))
        for name in ("LOGNAME", "USER"):  # as a login shell (and every batch job) has them; a container may not
            env.setdefault(name, LOGIN_NAME)
        if impl == "ours":
            env["PYTHONPATH"] = str(self.ours_lib)
        elif impl == "ours-nopyc":
            env.update(PYTHONPATH=str(self.nopyc_lib), PYTHONDONTWRITEBYTECODE="1")
        if path_prefix:
            env["PATH"] = f"{path_prefix}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra or {})
        return env

    def run(self, argv, env, cwd=None, timeout=900):
        """Run one process to the end under /usr/bin/time; return a Sample.

        /usr/bin/time forks the process itself, so its peak RSS is not
        polluted by this (bigger) parent process.
        """
        out_path, err_path, usage_path = (self.work / name for name in ("stdout.txt", "stderr.txt", "usage.txt"))
        usage_path.write_text("")
        prefix = [TIME, "-f", "%M %U %S", "-o", str(usage_path)] if os.access(TIME, os.X_OK) else []
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(prefix + [str(a) for a in argv], env=env, cwd=str(cwd or self.work), stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            wall = time.perf_counter() - start
        stdout, stderr = out_path.read_text(), err_path.read_text()
        rss_mb = cpu = None
        words = usage_path.read_text().split()
        if len(words) >= 3 and words[-3].isdigit():
            rss_mb, cpu = int(words[-3]) / 1024.0, float(words[-2]) + float(words[-1])
        lines = stdout.strip().splitlines()
        data = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        return Sample(wall, cpu, rss_mb, proc.returncode, data, stdout, stderr)

    def driver(self, impl, *args, home=None, timeout=900, profile_name=None, env=None):
        """Run bench/driver.py ACTION ARGS for ``impl`` in a fresh (or the given) HOME, ``env`` added.

        The argument RUN_DIR becomes ``<HOME>/run``.
        """
        home = home or self.home()
        args = [home / "run" if a == "RUN_DIR" else a for a in args]
        extra = dict(env or {})
        if profile_name:
            OUT.mkdir(exist_ok=True)
            extra["BENCH_PROFILE"] = str(OUT / f"profile-{profile_name}.txt")
        sample = self.run([self.python, HERE / "driver.py", *args], self.env(impl, home, extra=extra), cwd=home,
                          timeout=timeout)
        self.check(sample, f"{impl} driver {' '.join(map(str, args))}")
        return sample

    @staticmethod
    def check(sample, what):
        """Fail loudly when a measured process did not do its job."""
        if sample.rc != 0 or (sample.data is not None and sample.data.get("ok") is False):
            tail = "\n".join(sample.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"{what}: exit {sample.rc}, {sample.data}\n{tail}")

    def maybe_profile(self, *args, name):
        """With --profile, run our side once more under cProfile."""
        if self.profile:
            self.driver("ours", *args, profile_name=name)

    def alternate(self, reps, measure, theirs_reps=None):
        """Call measure(impl) for ours ``reps`` times and theirs ``theirs_reps`` times, alternating the order."""
        samples = {"ours": [], "theirs": []}
        theirs_reps = reps if theirs_reps is None else theirs_reps
        for rep in range(reps):
            impls = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
            for impl in impls if rep < theirs_reps else ("ours",):
                samples[impl].append(measure(impl))
        return samples

    # ----------------------------------------------------------------- rows

    def row(self, scenario, what, ours, other_name="-", other=None, ratio=None, target="-", test=None,
            fmt=None, ours_rss=None, other_rss=None):
        """Add a table row.

        ``ours``/``other`` are Measures (or display strings); ``ratio`` is
        (label, function of ours and other); ``test`` is a predicate on
        (ours, other) judged on wall and on CPU time.
        """
        fmt = fmt or sec
        cells = {"scenario": scenario, "what": what, "other_name": other_name, "target": target,
                 "ours_rss": ours_rss or "-", "other_rss": other_rss or "-"}
        cells["ours"], cells["other"] = show(ours, fmt), show(other, fmt)
        cells["ratio"], cells["met"] = "-", "-"
        if isinstance(ours, Measure):
            kinds = [("wall", ours.wall, getattr(other, "wall", None))]
            if ours.cpu is not None and (other is None or getattr(other, "cpu", None) is not None):
                kinds.append(("cpu", ours.cpu, getattr(other, "cpu", None)))
            if ratio:
                label, func = ratio
                cells["ratio"] = f"{label} " + " / ".join(f"{func(o, t):.2f}" for _, o, t in kinds)
            if test:
                cells["met"] = " / ".join(met_text(test(o, t)) for _, o, t in kinds)
                cells["passed"] = test(ours.wall, getattr(other, "wall", None))
        elif isinstance(test, tuple):  # (judged on wall, judged on cpu)
            cells["met"] = " / ".join(met_text(ok) for ok in test)
            cells["passed"] = test[0]
        elif test is not None:
            cells["met"] = met_text(test)
            cells["passed"] = test
        self.rows.append(cells)
        print(format_row(cells), flush=True)

    # ------------------------------------------------------------ scenarios

    def s1_import(self):
        """1. import reflow: ours vs reflow-hpc and vs four stdlib modules."""
        reps = self.reps + 2
        samples = self.alternate(reps, lambda impl: self.driver(impl, "import"))
        for sample in samples["theirs"]:
            assert "site-packages" in sample.data["file"], sample.data
        for sample in samples["ours"]:
            assert sample.data["file"].startswith(str(self.ours_lib)), sample.data
        std = [self.driver("plain", "stdimport") for _ in range(reps)]
        cold = [self.driver("ours-nopyc", "import") for _ in range(reps)]
        ours, theirs, base = (Measure.of(s) for s in (samples["ours"], samples["theirs"], std))
        self.row(1, "import reflow", ours, "reflow-hpc", theirs, ("ours/hpc", lambda o, t: o / t), "<= 0.40",
                 lambda o, t: o <= 0.4 * t, ms, rss(samples["ours"]), rss(samples["theirs"]))
        self.row(1, "import reflow", ours, "import sqlite3+json+argparse+subprocess", base,
                 ("ours/std", lambda o, t: o / t), "<= 1.50", lambda o, t: o <= 1.5 * t, ms, rss(samples["ours"]),
                 rss(std))
        self.notes.append(f"1: without a .pyc (this machine sets PYTHONDONTWRITEBYTECODE=1, so a checkout's "
                          f"reflow.py is compiled at every import) ours imports in {ms(Measure.of(cold).wall)}.")
        self.maybe_profile("import", name="1-import")

    def s2_help(self):
        """2. python flow.py --help, as a whole process."""
        flow = HERE / "flow.py"

        def measure(impl):
            sample = self.run([self.python, flow, "--help"], self.env(impl, self.home()))
            self.check(sample, f"{impl} flow.py --help")
            return sample

        samples = self.alternate(self.reps + 2, measure)
        ours, theirs = Measure.of(samples["ours"], True), Measure.of(samples["theirs"], True)
        self.row(2, "flow.py --help (process)", ours, "reflow-hpc", theirs, ("hpc/ours", lambda o, t: t / o),
                 "<= 150 ms, > 1", lambda o, t: o <= 0.15 and o < t, ms, rss(samples["ours"]),
                 rss(samples["theirs"]))
        if self.profile:
            OUT.mkdir(exist_ok=True)
            self.run([self.python, "-m", "cProfile", "-o", OUT / "profile-2-help.prof", flow, "--help"],
                     self.env("ours", self.home()))
            write_pstats(OUT / "profile-2-help.prof", OUT / "profile-2-help.txt")

    def s3_run_local(self):
        """3 and 4. run_local fan-out at several N; first run, then a cached re-run in the same store."""
        sizes = [1000, 10000] if self.quick else [1000, 10000, 100000]
        firsts = {}
        for n in sizes:
            # reflow-hpc takes ~7 s at 1,000 and ~40 s at 10,000 here: fewer repetitions, re-run only at 1,000
            # ours at 1,000 takes 10-30 ms, of which a commit's fsyncs vary by 1 ms: three times the repetitions
            reps = max(1, 3 * self.reps if n <= 1000 else self.reps - 2 if n <= 10000 else 1)
            theirs_reps = max(1, self.reps - 2) if n <= 1000 else 1 if n <= 10000 or self.reps >= 7 else 0

            def measure(impl, n=n):
                home = self.home()
                first = self.driver(impl, "run_local", n, "RUN_DIR", home=home)
                if impl == "theirs" and n > 1000:
                    return first, None
                return first, self.driver(impl, "run_local", n, "RUN_DIR", home=home)

            pairs = self.alternate(reps, measure, theirs_reps)
            first = {impl: [p[0] for p in v] for impl, v in pairs.items()}
            again = {impl: [p[1] for p in v if p[1] is not None] for impl, v in pairs.items()}
            firsts[n] = first["ours"]
            ours, theirs = Measure.of(first["ours"]), Measure.of(first["theirs"])
            self.row(3, f"run_local N={n:,}", ours, "reflow-hpc", theirs if theirs else "not run",
                     ("hpc/ours", lambda o, t: t / o) if theirs else None, ">= 20" if n <= 10000 else "-",
                     (lambda o, t: t >= 20 * o) if theirs and n <= 10000 else None, sec, rss(first["ours"]),
                     rss(first["theirs"]))
            self.row(4, f"cached re-run N={n:,}", Measure.of(again["ours"]), "our first run", ours,
                     ("ours/first", lambda o, t: o / t), "<= 0.30", lambda o, t: o <= 0.3 * t, sec,
                     rss(again["ours"]), rss(first["ours"]))
            if again["theirs"]:
                self.notes.append(f"4: reflow-hpc's cached re-run at N={n:,} takes "
                                  f"{sec(Measure.of(again['theirs']).wall)} (its first run {sec(theirs.wall)}).")
            if self.profile:
                home = self.home()
                self.driver("ours", "run_local", n, "RUN_DIR", home=home, profile_name=f"3-run_local-{n}")
                self.driver("ours", "run_local", n, "RUN_DIR", home=home, profile_name=f"4-rerun-{n}")
        if len(sizes) >= 3:
            self.linearity(sizes, firsts)

    def linearity(self, sizes, firsts):
        """Report the time and memory slopes of run_local and whether they stay linear."""
        ts = [Measure.of(firsts[n]) for n in sizes]
        mems = [statistics.median(s.rss_mb for s in firsts[n]) for n in sizes]

        def bend(values):
            # marginal cost over the upper decade / over the lower one: 1.0 = perfectly linear
            low = (values[1] - values[0]) / (sizes[1] - sizes[0])
            high = (values[2] - values[1]) / (sizes[2] - sizes[1])
            return high / low if low > 0 else float("inf")

        walls, cpus = [m.wall for m in ts], [m.cpu for m in ts]
        self.row(3, "run_local time slope (upper/lower decade)",
                 f"{fit_slope(sizes, walls) * 1e6:.1f} us/elem (cpu {fit_slope(sizes, cpus) * 1e6:.1f})",
                 "bend wall / cpu", f"{bend(walls):.2f} / {bend(cpus):.2f}", None, "bend 0.5..1.5",
                 (0.5 <= bend(walls) <= 1.5, 0.5 <= bend(cpus) <= 1.5))
        self.row(3, "run_local peak RSS slope (upper/lower decade)",
                 f"{fit_slope(sizes, mems) * 1024 * 1000:.0f} KB/1k elem", "bend", f"{bend(mems):.2f}", None,
                 "bend <= 1.5", bend(mems) <= 1.5)

    def s5_local_submit(self):
        """5. submit(executor="local"): marginal wall time per array element vs a bare python spawn."""
        small, big = (4, 20) if self.quick else (8, 40)
        reps = max(1, self.reps - 2)
        spawn = [self.driver("plain", "spawn", 20) for _ in range(reps)]
        lo = [self.driver("ours", "local_submit", small, "RUN_DIR") for _ in range(reps)]
        hi = [self.driver("ours", "local_submit", big, "RUN_DIR") for _ in range(reps)]
        per = (Measure.of(hi).wall - Measure.of(lo).wall) / (big - small)
        base = statistics.median(s.data["per_spawn"] for s in spawn)
        self.row(5, f"local submit, wall per element (N={small}->{big})", Measure(per), "python -c pass (wall)",
                 Measure(base), ("ours/spawn", lambda o, t: o / t), "<= 1.5", lambda o, t: o <= 1.5 * t, ms)
        packed = {"BENCH_FLOW": "pack_flow", "BENCH_PACK": str(small)}
        lo_packed = [self.driver("ours", "local_submit", small, "RUN_DIR", env=packed) for _ in range(reps)]
        hi_packed = [self.driver("ours", "local_submit", big, "RUN_DIR", env=packed) for _ in range(reps)]
        per_packed = (Measure.of(hi_packed).wall - Measure.of(lo_packed).wall) / (big - small)
        self.row(5, f"local submit, elements_per_job={small}, wall per element", Measure(per_packed),
                 "python -c pass (wall)", Measure(base), ("ours/spawn", lambda o, t: o / t), "<= 1.5",
                 lambda o, t: o <= 1.5 * t, ms)
        self.notes.append(f"5: whole local runs of ours take {sec(Measure.of(lo).wall)} (N={small}) and "
                          f"{sec(Measure.of(hi).wall)} (N={big}); the bare spawns run one after another. "
                          "reflow-hpc is not measured: its submit(executor='local') runs only the first dispatch "
                          "locally; that dispatch builds the default (Slurm) executor, and its workers open the "
                          "still-open WAL store immutable and fail with 'no such table: task_instances'.")
        self.maybe_profile("local_submit", big, "RUN_DIR", name="5-local_submit")

    def s6_fake_dispatch(self):
        """6. one dispatch cycle over 100,000 elements with a recording executor (ours only)."""
        n = 100000
        reps = 1 if self.quick else max(1, self.reps - 2)
        samples = [self.driver("ours", "fake", n, "RUN_DIR") for _ in range(reps)]
        cycle = Measure(statistics.median(s.data["t_cycle"] for s in samples),
                        statistics.median(s.data["cpu_cycle"] for s in samples))
        peak = statistics.median(s.data["rss_mb"] for s in samples)
        last = samples[-1].data
        self.row(6, f"dispatch cycle, N={n:,} (fake executor)", cycle, target="< 5 s",
                 test=lambda o, t: o < 5.0, ours_rss=f"{peak:.0f} MB")
        self.row(6, "peak RSS of that process", f"{peak:.0f} MB", target="< 200 MB", test=peak < 200)
        self.row(6, "array submit calls / chunks of 1,000", f"{last['array_submits']} / {last['chunks']}",
                 target="equal", test=last["array_submits"] == last["chunks"] and last["elements"] == n)
        others = ", ".join(last["other_submits"]) or "none"
        self.notes.append(f"6: {last['elements']:,} elements in {last['array_submits']} array submits, plus "
                          f"other submits in that cycle: {others}; the submit() before the "
                          f"cycle took {sec(statistics.median(s.data['t_submit'] for s in samples))}.")
        self.maybe_profile("fake", n, "RUN_DIR", name="6-fake")

    def s7_snakemake(self):
        """7. plan + submit N jobs (fresh process, fake executor) vs ``snakemake -n`` of the same DAG."""
        snakemake = self.venv / "bin" / "snakemake"
        sizes = [20000] if self.quick else [20000, 60000]
        for n in sizes:
            reps = 1 if (self.quick or n > 20000) else max(1, self.reps - 3)
            ours, theirs = [], []
            for _ in range(reps):
                ours.append(self.driver("ours", "fake", n, "RUN_DIR"))
                home = self.home()
                snakefile = home / "Snakefile"
                snakefile.write_text(SNAKEFILE.replace("@N@", str(n)))
                sample = self.run([snakemake, "-n", "--cores", "1", "-s", snakefile, "-d", home / "w", "--quiet"],
                                  self.env("plain", home), cwd=home)
                self.check(sample, "snakemake -n")
                theirs.append(sample)
            self.row(7, f"plan+submit N={n:,} (process)", Measure.of(ours, True), "snakemake -n",
                     Measure.of(theirs, True), ("smk/ours", lambda o, t: t / o), ">= 10", lambda o, t: t >= 10 * o,
                     sec, rss(ours), rss(theirs))

    def s8_slurm(self):
        """8. a 3-stage pipeline with a 200-element array on real Slurm: ours, the sbatch chain, reflow-hpc."""
        if not shutil.which("sbatch") or not shutil.which("sacct"):
            self.notes.append("8: skipped (no sbatch/sacct on PATH).")
            print("8: skipped (no sbatch/sacct on PATH)", flush=True)
            return
        # a stage of 200 elements takes 6-15 s here from run to run: the three compared with the 1.15 target
        # run every repetition, reflow-hpc (17 s a run) every other one
        n, reps = 200, 1 if self.quick else max(3, self.reps)
        order = ["ours", "inline", "chain", "theirs"]
        samples = {impl: [] for impl in order}
        calls = {impl: [] for impl in order}
        for rep in range(reps):
            for impl in order[rep % len(order):] + order[:rep % len(order)]:
                if impl == "theirs" and rep % 2:
                    continue
                home = self.home()
                wrappers, log = self.scheduler_wrappers(home)
                sample = self.run(*self.slurm_command(impl, home, n, wrappers), cwd=home, timeout=900)
                self.check(sample, f"slurm {impl}")
                if impl in ("ours", "inline") and "SUCCESS" not in sample.stdout:
                    raise RuntimeError(f"slurm ours: the run did not end in SUCCESS:\n{sample.stdout[-500:]}")
                samples[impl].append(sample)
                calls[impl].append(count_calls(log))
        ours, inline, chain, theirs = (Measure(statistics.median(s.wall for s in samples[k])) for k in order)
        self.notes.append(f"8: the chain's elements run `python3` from PATH ({shutil.which('python3')}); the "
                          f"elements of ours and reflow-hpc run the venv's interpreter ({self.python}).")
        self.row(8, f"Slurm 3 stages, N={n} (wall)", ours, "sbatch --dependency chain", chain,
                 ("ours/chain", lambda o, t: o / t), "<= 1.15", lambda o, t: o <= 1.15 * t)
        self.row(8, f"Slurm 3 stages, N={n}, inline=True (wall)", inline, "sbatch --dependency chain", chain,
                 ("ours/chain", lambda o, t: o / t), "<= 1.15", lambda o, t: o <= 1.15 * t)
        self.row(8, f"Slurm 3 stages, N={n} (wall)", ours, "reflow-hpc", theirs, ("hpc/ours", lambda o, t: t / o))
        for impl in order:
            names = sorted({name for counts in calls[impl] for name in counts})
            self.calls.append((impl, {name: statistics.median(c.get(name, 0) for c in calls[impl])
                                      for name in names}))

    def slurm_command(self, impl, home, n, wrappers):
        """Return (argv, env) of one scenario-8 measurement."""
        if impl == "ours":
            argv = [self.python, HERE / "flow.py", "submit", "--executor", "slurm", "--run-dir", home / "run", "--n",
                    n, "--wait"]
            return argv, self.env("ours", home, path_prefix=wrappers)
        if impl == "inline":  # the same pipeline run inside its dispatch job (issue 7's pilot mode)
            argv = [self.python, HERE / "pack_flow.py", "submit", "--executor", "slurm", "--run-dir", home / "run",
                    "--n", n, "--wait"]
            return argv, dict(self.env("ours", home, path_prefix=wrappers), BENCH_INLINE="1")
        if impl == "chain":
            return ["bash", HERE / "slurm_chain.sh", n], self.env("plain", home, path_prefix=wrappers)
        argv = [self.python, HERE / "driver.py", "slurm_cli", n, home / "run"]
        return argv, self.env("theirs", home, path_prefix=wrappers)

    @staticmethod
    def scheduler_wrappers(home):
        """Write argv-logging wrappers of the scheduler binaries; return (dir, log file)."""
        wrappers, log = home / "bin", home / "scheduler-calls.log"
        wrappers.mkdir()
        for name in SCHEDULER_BINARIES:
            real = shutil.which(name)
            if real:
                script = wrappers / name
                # one line per call (a job script passed as an argument may hold newlines)
                script.write_text(f'#!/bin/sh\nprintf "%s %s\\n" {name} "$(printf "%s " "$@" | tr "\\n" " ")" '
                                  f'>> "{log}"\nexec "{real}" "$@"\n')
                script.chmod(0o755)
        return wrappers, log


def count_calls(log):
    """Count logged scheduler calls per binary."""
    counts = {}
    if log.exists():
        for line in log.read_text().splitlines():
            name = line.split(" ", 1)[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


SNAKEFILE = """\
# prepare -> square[N] -> total, the DAG of bench/flow.py
N = @N@

rule all:
    input: "total.txt"

rule prepare:
    output: "input.json"
    shell: "python3 -c 'import json; json.dump(list(range({N})), open(\\"input.json\\", \\"w\\"))'"

rule square:
    input: "input.json"
    output: "sq/{i}.txt"
    shell: "python3 -c 'import json; x = json.load(open(\\"{input}\\"))[{wildcards.i}]; "
           "open(\\"{output}\\", \\"w\\").write(str(x * x))'"

rule total:
    input: expand("sq/{i}.txt", i=range(N))
    output: "total.txt"
    shell: "cat {input} > /dev/null; echo done > {output}"
"""


# ----------------------------------------------------------------- helpers


def rss(samples):
    """Median peak RSS of samples, as text."""
    values = [s.rss_mb for s in samples if s.rss_mb is not None]
    return f"{statistics.median(values):.0f} MB" if values else None


def ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def sec(seconds):
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def show(value, fmt):
    """Format a Measure as 'wall (cpu X)', or pass text through."""
    if value is None:
        return "-"
    if not isinstance(value, Measure):
        return str(value)
    return fmt(value.wall) + (f" (cpu {fmt(value.cpu)})" if value.cpu is not None else "")


def fit_slope(xs, ys):
    """Least-squares slope of ys over xs."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def write_pstats(prof, target):
    """Write the top entries of a cProfile dump as text."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(prof), stream=out)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)
    Path(target).write_text(out.getvalue())


def met_text(met):
    return {True: "yes", False: "NO", None: "-"}[met]


COLUMNS = ("#", "scenario", "ours", "compared with", "other", "ratio (wall / cpu)", "target", "met (wall / cpu)",
           "ours RSS", "other RSS")
KEYS = ("scenario", "what", "ours", "other_name", "other", "ratio", "target", "met", "ours_rss", "other_rss")


def format_row(row):
    """One row as a console line."""
    c = [str(row[k]) for k in KEYS]
    return f"{c[0]} {c[1]:<44} {c[2]:>26} | {c[3]:<24} {c[4]:>26} | {c[5]:<24} {c[6]:<15} {c[7]:<10} rss {c[8]}/{c[9]}"


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[k]) for k in KEYS) + " |" for row in rows]
    return "\n".join(lines)


def command_version(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "n/a"


def machine(venv):
    """Describe the machine and the software measured."""
    info = {}
    with open("/proc/meminfo") as fh:
        total = next(line for line in fh if line.startswith("MemTotal:"))
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    py = str(Path(venv) / "bin" / "python")
    script = "import importlib.metadata as m; print(m.version('reflow-hpc'), m.version('snakemake'))"
    versions = [*command_version([py, "-c", script]).split(), "?", "?"]
    info["date"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    info["cpus (nproc)"] = f"{os.cpu_count()} ({cpu})"
    info["memory"] = f"{int(total.split()[1]) / 1024 / 1024:.1f} GiB"
    info["os"] = platform.platform()
    info["python"] = command_version([py, "--version"])
    info["sqlite"] = sqlite3.sqlite_version
    info["reflow.py"] = f"sha256 {hashlib.sha256((ROOT / 'reflow.py').read_bytes()).hexdigest()[:12]}"
    info["reflow-hpc"], info["snakemake"] = versions[0], versions[1]
    info["slurm"] = command_version(["sbatch", "--version"]) if shutil.which("sbatch") else "absent"
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def write_results(info, bench, elapsed, argv):
    """Write bench/RESULTS.md."""
    lines = ["# Benchmarks: reflow.py vs reflow-hpc and Snakemake", "",
             f"Written by `bench/run {' '.join(argv)}` in {elapsed:.0f} s: medians of fresh processes, each "
             "figure a wall time with the CPU time of the same work beside it (hpc = reflow-hpc). The machine "
             "is shared with other developers' tests, so wall times are noisy; see the load averages.", "",
             "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "## Results", "", markdown_table(bench.rows), ""]
    if bench.calls:
        lines += ["## Scheduler calls (scenario 8, median per run)", "", "| side | calls |", "|---|---|"]
        lines += [f"| {impl} | {', '.join(f'{k} {v:g}' for k, v in counts.items()) or '-'} |"
                  for impl, counts in bench.calls]
        lines += [""]
    lines += ["## Notes", ""] + [f"- {note}" for note in bench.notes] + [f"- {note}" for note in METHOD] + [""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))


METHOD = [
    "Method: each measurement is a fresh process with an empty HOME/XDG cache and store; ours and reflow-hpc "
    "alternate. Both use the venv's interpreter. Ours is a copy of reflow.py with its .pyc, as after a first "
    "import; reflow-hpc has the .pyc files pip wrote. Rows marked (process) time whole processes (CPU time from "
    "/usr/bin/time, children included); the others time the call inside the process (bench/driver.py). "
    "Children get LOGNAME and USER when this shell has none, as a login shell or a batch job has them.",
    "Scenarios 3 and 4 at N=1,000: ours runs three times the repetitions, since one commit's fsyncs vary by "
    "about 1 ms on this disk and the run takes 10-30 ms.",
    "Scenario 3: reflow-hpc runs fewer repetitions (one at N=10,000, its cached re-run only at N=1,000) and at "
    "N=100,000 only with --reps 7 or more: here it takes 0.6-7 s at 1,000 and 8-40 s at 10,000, depending on "
    "the disk traffic of other tests. Its time goes "
    "mostly to waiting on disk (a commit per instance), which the CPU column does not show: judge 3 on wall time.",
    "Scenario 6 and the ours side of 7 use a recording Executor subclass (bench/driver.py `fake`): nothing runs. "
    "7 times a whole fresh process (import, submit, one dispatch cycle planning and submitting all N elements) "
    "against `snakemake -n --cores 1 --quiet` building the same DAG from a generated Snakefile.",
    "Packing (issue 7) is measured on its own by bench/pack_slurm.py: see bench/PACKING.md.",
    "Scenario 8: ours is `flow.py submit --executor slurm --wait` (the waiting client looks at the results "
    "every 0.1 s and runs a dispatch cycle itself when a stage is complete; the store is read every 0.5 s); "
    "`inline=True` "
    "is the same pipeline from bench/pack_flow.py with every task run inside the dispatch job; the chain is "
    "bench/slurm_chain.sh (polls sacct every 0.1 s); reflow-hpc is its own `flow.py submit` with its default "
    "Slurm executor, the store polled every 0.2 s. Scheduler calls are counted by argv-logging wrappers on PATH, "
    "which the jobs inherit. Ours, inline and the chain run --reps times (at least 3), reflow-hpc every other "
    "time. The chain knows N when it submits, so its array waits in the queue behind stage 1; ours learns the "
    "width from prepare's output and submits square once prepare is done.",
]

SCENARIOS = {1: "s1_import", 2: "s2_help", 3: "s3_run_local", 4: "s3_run_local", 5: "s5_local_submit",
             6: "s6_fake_dispatch", 7: "s7_snakemake", 8: "s8_slurm"}


def main(argv=None):
    """Run the chosen scenarios, print the table, write RESULTS.md; exit 1 if a target was missed."""
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", type=int, metavar="SCENARIO",
                        help="scenario numbers 1-8 (default: all; 3 and 4 run together)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes")
    parser.add_argument("--reps", type=int, help="repetitions of the cheap scenarios (default 5, quick 2)")
    parser.add_argument("--profile", action="store_true", help="write cProfile top entries of ours to bench/out/")
    parser.add_argument("--venv", default=str(HERE / ".venv"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]} (choose from 1-8)")
    bench = Bench(args.venv, args.reps or (2 if args.quick else 5), args.quick, args.profile)
    info = machine(args.venv)
    chosen = list(dict.fromkeys(SCENARIOS[n] for n in (args.scenarios or sorted(SCENARIOS))))
    start = time.monotonic()
    try:
        for name in chosen:
            getattr(bench, name)()
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    elapsed = time.monotonic() - start
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("\n" + markdown_table(bench.rows))
    for impl, counts in bench.calls:
        print(f"scheduler calls, {impl}: {', '.join(f'{k} {v:g}' for k, v in counts.items())}")
    for note in bench.notes:
        print(f"note {note}")
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--venv" in shown:  # bench/run passes it
        del shown[shown.index("--venv"):shown.index("--venv") + 2]
    write_results(info, bench, elapsed, shown)
    print(f"\nwrote {HERE / 'RESULTS.md'} ({elapsed:.0f} s)")
    return 0 if all(row.get("passed") is not False for row in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
