"""One benchmark measurement inside a fresh process (started by bench/bench.py).

    python bench/driver.py ACTION [ARGS...]

It runs under either implementation: ``reflow`` is whatever the interpreter
finds (reflow.py through PYTHONPATH, or reflow-hpc in the venv).  The last
line printed is one JSON object; ``t`` is the timed part in seconds (wall),
``cpu`` its CPU time in this process.  With
``$BENCH_PROFILE`` set, the timed part runs under cProfile and the top
entries are written to that file.

Actions:
    import                  time ``import reflow``
    stdimport               time ``import sqlite3, json, argparse, subprocess``
    run_local N RUN_DIR     time ``wf.run_local(RUN_DIR, n=N)``
    local_submit N RUN_DIR  time ``wf.submit(RUN_DIR, executor="local", n=N)`` until the run ends
                            ($BENCH_FLOW=pack_flow: bench/pack_flow.py, packed as $BENCH_PACK says)
    spawn N                 time N sequential ``python -c pass`` processes
    fake N RUN_DIR          (reflow.py) submit with a recording executor, then time one dispatch cycle
    slurm_cli N RUN_DIR     time ``flow.py submit --run-dir RUN_DIR --n N`` (default executor: Slurm) until the run ends

Any other first argument goes to the workflow's CLI: reflow-hpc re-runs the
``__main__`` script (this file) in the jobs it starts from ``wf.submit``.
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

FINAL = ("SUCCESS", "FAILED", "CANCELLED")


def _profiled(func, *args):
    """Call func(*args); under $BENCH_PROFILE, profile it and write the top entries."""
    target = os.environ.get("BENCH_PROFILE")
    if not target:
        return func(*args)
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    try:
        return prof.runcall(func, *args)
    finally:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(25)
        with open(target, "w") as fh:
            fh.write(out.getvalue())


_CPU = []


def _timed(func, *args):
    """Return (wall seconds, result) of func(*args); its CPU seconds go to _CPU."""
    start, cpu = time.perf_counter(), time.process_time()
    result = _profiled(func, *args)
    _CPU.append(time.process_time() - cpu)
    return time.perf_counter() - start, result


def _load_flow():
    """Import bench/flow.py, or the module $BENCH_FLOW names (this script's directory is sys.path[0])."""
    import importlib

    return importlib.import_module(os.environ.get("BENCH_FLOW") or "flow").wf


def _expected_total(n):
    return (n - 1) * n * (2 * n - 1) // 6


def _check(store, run_id, n):
    """Return the run's status and whether total is right."""
    status = store.get_run(run_id)["status"]
    status = getattr(status, "value", status)
    ok = False
    if status == "SUCCESS":
        ok = store.get_singleton_output(run_id, "total") == _expected_total(n)
    return {"status": str(status), "ok": ok}


def _wait(store, run_id, timeout=900.0, poll=0.05):
    """Poll the store until the run is final; return the status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.get_run(run_id)["status"]
        status = getattr(status, "value", status)
        if status in FINAL:
            return status
        time.sleep(poll)
    return "TIMEOUT"


def act_import():
    def load():
        import reflow

        return reflow.__file__

    seconds, path = _timed(load)
    return {"t": seconds, "file": path}


def act_stdimport():
    def load():
        import argparse  # noqa: F401
        import json  # noqa: F401
        import sqlite3  # noqa: F401
        import subprocess  # noqa: F401

    seconds, _ = _timed(load)
    return {"t": seconds}


def act_run_local(n, run_dir):
    wf = _load_flow()
    seconds, run = _timed(lambda: wf.run_local(run_dir, n=int(n)))
    return dict(_check(run.store, run.run_id, int(n)), t=seconds)


def act_local_submit(n, run_dir):
    wf = _load_flow()

    def go():
        run = wf.submit(run_dir, executor="local", n=int(n))
        _wait(run.store, run.run_id, timeout=600)
        return run

    seconds, run = _timed(go)
    return dict(_check(run.store, run.run_id, int(n)), t=seconds)


def act_spawn(n):
    import subprocess

    def go():
        for _ in range(int(n)):
            subprocess.run([sys.executable, "-c", "pass"], check=True)

    seconds, _ = _timed(go)
    return {"t": seconds, "per_spawn": seconds / int(n)}


def act_slurm_cli(n, run_dir):
    """Submit through the workflow's own CLI (default executor: Slurm) and poll the store until the run ends.

    The store is polled with a fresh read-only connection each time: a
    connection kept open would hold reflow-hpc's WAL uncheckpointed, and its
    workers open the database ``immutable`` and would not see the run.
    """
    import sqlite3
    import subprocess

    db = os.path.join(os.path.dirname(run_dir), "manifest.db")
    argv = [sys.executable, os.path.join(HERE, "flow.py"), "submit", "--run-dir", run_dir, "--store-path", db,
            "--n", str(n)]

    def status():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT status FROM runs").fetchone()[0]
        finally:
            conn.close()

    def go():
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            state = status()
            if state in FINAL:
                return state
            time.sleep(0.2)
        return "TIMEOUT"

    seconds, state = _timed(go)
    ok = False
    if state == "SUCCESS":
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT output FROM task_instances WHERE task_name = 'total'").fetchone()
            ok = row is not None and str(_expected_total(int(n))) in str(row[0])
        finally:
            conn.close()
    return {"t": seconds, "status": state, "ok": ok}


def _describe_call(call):
    """Return 'worker square 0-999' style text for a recorded submit."""
    array, argv = call
    words = [argv[2]] if len(argv) > 2 else []
    if "--task" in argv:
        words.append(argv[argv.index("--task") + 1])
    return " ".join(words + ([array] if array else []))


def act_fake(n, run_dir):
    """Plan + submit N array elements against a recording executor (reflow.py only)."""
    import hashlib
    import json
    import resource

    import reflow

    class Recorder(reflow.Executor):
        """Records every submit; every job stays PENDING."""

        name = "recorder"

        def __init__(self):
            super().__init__()
            self.calls = []

        def submit(self, resources, command):
            self.calls.append((resources.array, list(command)))
            return f"job{len(self.calls)}"

        def cancel(self, job_id):
            pass

        def job_state(self, job_id):
            return "PENDING"

        def job_infos(self, job_ids):
            return {job_id: reflow.executors.JobInfo("PENDING") for job_id in job_ids}

    wf = _load_flow()
    fake = Recorder()
    store = reflow.SqliteStore(os.path.join(run_dir, "bench.db"))
    t_submit, run = _timed(lambda: wf.submit(run_dir, store=store, executor=fake, n=int(n)))
    first_calls = len(fake.calls)
    # write prepare's result file the way a worker does
    inst = store.get_task_instance(run.run_id, "prepare", None)
    output = list(range(int(n)))
    text = json.dumps(output, separators=(",", ":"), sort_keys=True)
    record = {"instance_id": inst["id"], "attempt": inst["attempt"], "state": "SUCCESS", "output": output,
              "output_hash": hashlib.sha256(text.encode()).hexdigest()[:16], "error_text": "",
              "task_name": "prepare", "array_index": None}
    results = os.path.join(run_dir, ".reflow", "results", run.run_id)
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"prepare__singleton__{inst['attempt']}.json"), "w") as fh:
        json.dump(record, fh)
    t_cycle, counts = _timed(lambda: wf.dispatch(run.run_id, store, run_dir, executor=fake))
    cycle_calls = fake.calls[first_calls:]
    arrays = [c for c in cycle_calls if c[0] and "square" in c[1]]
    others = [c for c in cycle_calls if not (c[0] and "square" in c[1])]
    chunk = max(1, fake.max_array_size)
    return {"t": t_submit + t_cycle, "t_submit": t_submit, "t_cycle": t_cycle, "cpu_cycle": _CPU[-1],
            "counts": counts, "array_submits": len(arrays), "other_submits": [_describe_call(c) for c in others],
            "chunks": -(-int(n) // chunk),
            "elements": sum(int(c[0].split("-")[1].split("%")[0]) - int(c[0].split("-")[0]) + 1 for c in arrays),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


ACTIONS = {"import": act_import, "stdimport": act_stdimport, "run_local": act_run_local,
           "local_submit": act_local_submit, "spawn": act_spawn, "fake": act_fake, "slurm_cli": act_slurm_cli}


def main(argv):
    if argv[0] not in ACTIONS:
        # reflow-hpc re-runs the __main__ script (this file) in its dispatch and worker jobs
        return _load_flow().cli(argv)
    data = ACTIONS[argv[0]](*argv[1:])
    data["cpu"] = sum(_CPU)
    import json

    print(json.dumps(data, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
