"""Packing benchmark on real Slurm (issue 7): the 3-stage pipeline, packed vs unpacked vs a hand chain.

    python3 bench/pack_slurm.py                 N=40 and N=1000, 3 and 2 repetitions
    python3 bench/pack_slurm.py --n 40 --reps 3 --configs pilot,chain
    python3 bench/pack_slurm.py --write         also append the table to bench/PACKING.md

Configurations (bench/pack_flow.py, reflow.py from this checkout):
    unpacked  one Slurm array element per element (the default)
    packed    elements_per_job=50 (N=1000: a 20-element array)
    pilot     inline=True: the dispatch job runs the tiny tasks itself
    auto      elements_per_job="auto", inline="auto", after an unmeasured
              warm-up run at N=20 in the same store (its durations are the
              history the auto rules read); the measured run uses --force
    chain     bench/slurm_chain.sh N (hand-written sbatch --dependency chain)

Each measurement runs in a fresh directory and store, configurations
alternate, and the table shows medians.  Wall time runs from the submit
command until the store (or, for the chain, sacct) says the run ended;
``submit`` returns at once, so nothing of ours runs outside batch jobs.
Scheduler calls are counted by argv-logging wrappers on PATH, which the
jobs inherit.  The last column is how long after the run ended the queue
still held a job of ours (the final dispatch job exiting).  Needs sbatch/sacct (ci/slurm-up.sh).  Not part of the tests.
"""

import argparse
import datetime
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import Bench, count_calls  # noqa: E402  (bench/ is not a package)

CONFIGS = {"unpacked": {"BENCH_PACK": "1", "BENCH_INLINE": "0"},
           "packed": {"BENCH_PACK": "50", "BENCH_INLINE": "0"},
           "pilot": {"BENCH_PACK": "1", "BENCH_INLINE": "1"},
           "auto": {"BENCH_PACK": "auto", "BENCH_INLINE": "auto"}}
FINAL = ("SUCCESS", "FAILED", "CANCELLED")


LIB = HERE.parent  # replaced by a snapshot of reflow.py in main()


def env_for(home, wrappers, extra):
    """Return a clean environment: fresh HOME/XDG dirs, the reflow.py snapshot first, wrappers first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "REFLOW_", "XDG_", "BENCH_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               PYTHONPATH=str(LIB), PATH=f"{wrappers}:{os.environ['PATH']}", **extra)
    return env


def run_status(db):
    """Return the run's status from a read-only connection (None before the run exists)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT status FROM runs ORDER BY created_at DESC, rowid DESC").fetchone()
        return row[0] if row else None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def total_output(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT output FROM task_instances WHERE task_name = 'total' ORDER BY id DESC").fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def submit(home, env, n, run_dir, *extra):
    """Run ``pack_flow.py submit`` (it returns at once: the run goes on in batch jobs)."""
    argv = [sys.executable, str(HERE / "pack_flow.py"), "submit", "--executor", "slurm", "--run-dir",
            str(home / run_dir), "--n", str(n), *extra]
    subprocess.run(argv, env=env, cwd=home, check=True, stdout=subprocess.DEVNULL)


def wait_final(db, since, timeout=1800):
    """Poll the store every 0.1 s until the newest run ended; return its status."""
    status = None
    while time.perf_counter() - since < timeout:
        status = run_status(db)
        if status in FINAL:
            return status
        time.sleep(0.1)
    return status


def measure_reflow(config, n, home, wrappers):
    """Submit and poll the store every 0.1 s; return (wall seconds, ok)."""
    db = home / "store.db"
    env = env_for(home, wrappers, dict(CONFIGS[config], REFLOW_STORE_PATH=str(db)))
    extra = []
    if config == "auto":  # the warm-up run gives the auto rules their history; not measured
        began = time.perf_counter()
        submit(home, env, 20, "warmup")
        if wait_final(db, began) != "SUCCESS":
            return 0.0, False
        wait_idle()
        (home / "scheduler-calls.log").write_text("")  # count the measured run's calls only
        extra = ["--force"]
    start = time.perf_counter()
    submit(home, env, n, "run", *extra)
    status = wait_final(db, start)
    wall = time.perf_counter() - start
    want = (n - 1) * n * (2 * n - 1) // 6
    return wall, status == "SUCCESS" and str(total_output(db)) == str(want)


def measure_chain(n, home, wrappers):
    """Run bench/slurm_chain.sh N; return (wall seconds it reports, ok)."""
    proc = subprocess.run(["bash", str(HERE / "slurm_chain.sh"), str(n)], env=env_for(home, wrappers, {}),
                          cwd=home, capture_output=True, text=True)
    words = dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)
    return float(words.get("wall", "nan").rstrip("s")), proc.returncode == 0


def leftover_jobs():
    """Return how many of our benchmark jobs the scheduler still holds."""
    out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    return sum(1 for name in out if name.startswith(("benchpk-", "chain")))


def wait_idle(timeout=60):
    """Wait until no benchmark job is left; return the seconds that took (the next measurement starts clean)."""
    start = time.monotonic()
    while leftover_jobs() and time.monotonic() < start + timeout:
        time.sleep(0.1)
    return time.monotonic() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="widths (default 40 and 1000)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3 at N<=200, else 2)")
    parser.add_argument("--configs", default="pilot,auto,packed,unpacked,chain")
    parser.add_argument("--write", action="store_true", help="append the table to bench/PACKING.md")
    args = parser.parse_args(argv)
    if not shutil.which("sbatch") or not shutil.which("sacct"):
        print("pack_slurm: no sbatch/sacct on PATH", file=sys.stderr)
        return 2
    configs = args.configs.split(",")
    global LIB
    work = Path(tempfile.mkdtemp(prefix="reflow-pack-bench-"))
    os.chmod(work, 0o755)
    LIB = work / "lib"  # a snapshot: edits to the checkout do not reach jobs of a running benchmark
    LIB.mkdir()
    shutil.copy2(HERE.parent / "reflow.py", LIB / "reflow.py")
    rows = []
    for n in args.n or [40, 1000]:
        reps = args.reps or (3 if n <= 200 else 2)
        walls, calls, left = {c: [] for c in configs}, {c: [] for c in configs}, {c: [] for c in configs}
        for rep in range(reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for config in order:
                wait_idle()
                home = work / f"{config}-{n}-{rep}"
                for sub in (".cache", ".config"):
                    (home / sub).mkdir(parents=True)
                wrappers, log = Bench.scheduler_wrappers(home)
                if config == "chain":
                    wall, ok = measure_chain(n, home, wrappers)
                else:
                    wall, ok = measure_reflow(config, n, home, wrappers)
                left[config].append(wait_idle())
                if not ok:
                    raise RuntimeError(f"{config} N={n} rep {rep}: the run did not succeed (see {home})")
                walls[config].append(wall)
                calls[config].append(count_calls(log))
                print(f"N={n} {config:9s} rep {rep}: {wall:6.2f} s  {calls[config][-1]}", flush=True)
        for config in configs:
            names = sorted({name for c in calls[config] for name in c})
            median_calls = {name: statistics.median(c.get(name, 0) for c in calls[config]) for name in names}
            rows.append((n, config, statistics.median(walls[config]), walls[config], median_calls,
                         max(left[config])))
    table = render(rows)
    print(table)
    if args.write:
        with open(HERE / "PACKING.md", "a") as out:
            out.write("\n" + table)
    return 0


def render(rows):
    """Return the markdown section of the results."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"## Packing on real Slurm (issue 7, `python3 bench/pack_slurm.py`), "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {load}", "",
             "| N | config | wall (median) | runs | scheduler calls (median per run) | queue empty after (max) |",
             "|---|---|---|---|---|---|"]
    for n, config, median, walls, calls, left in rows:
        call_text = ", ".join(f"{k} {v:g}" for k, v in calls.items()) or "-"
        lines.append(f"| {n:,} | {config} | {median:.2f} s | {', '.join(f'{w:.2f}' for w in walls)} | "
                     f"{call_text} | +{left:.1f} s |")
    by = {(n, c): m for n, c, m, *_ in rows}
    lines.append("")
    for n in sorted({n for n, *_ in rows}):
        for fast in ("packed", "pilot"):
            if (n, fast) in by and (n, "unpacked") in by:
                lines.append(f"- N={n:,}: unpacked/{fast} = {by[(n, 'unpacked')] / by[(n, fast)]:.2f}x")
        if (n, "pilot") in by and (n, "chain") in by:
            lines.append(f"- N={n:,}: pilot/chain = {by[(n, 'pilot')] / by[(n, 'chain')]:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
