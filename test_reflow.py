#!/usr/bin/env python3
"""Tests of reflow.py: run ``python test_reflow.py`` (or pytest) next to reflow.py.

Tests that need a real scheduler skip when its commands are missing, except
under ``CI=true``, where a missing scheduler is a failure.
"""

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
import uuid
from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
os.environ.pop("REFLOW_MODE", None)

import reflow  # noqa: E402
from reflow import Flow, Param, Result, RunDir, Workflow  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"


class TempDirTest(unittest.TestCase):
    """A test with a private temp dir, store and config home (never $HOME)."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="reflow-test-")
        self.tmp = Path(self._tmp.name)
        self.store_path = self.tmp / "store" / "manifest.db"
        self._env = mock_env(XDG_CONFIG_HOME=str(self.tmp / "config"), XDG_CACHE_HOME=str(self.tmp / "cache"),
                             REFLOW_STORE_PATH=str(self.store_path), HOME=str(self.tmp / "home"),
                             REFLOW_LOCAL_CPUS="4")
        self._env.__enter__()

    def tearDown(self) -> None:
        self._env.__exit__(None, None, None)
        self._tmp.cleanup()

    def store(self) -> "reflow.SqliteStore":
        store = reflow.SqliteStore(self.store_path)
        store.init()
        return store


@contextlib.contextmanager
def mock_env(**values: Optional[str]):
    """Set (or with None, unset) environment variables for the block."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_flow(directory: Path, source: str, name: Optional[str] = None):
    """Write a workflow module into ``directory``, import it, return the module."""
    name = name or f"flow_{uuid.uuid4().hex[:8]}"
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, cwd: Optional[Path] = None, timeout: float = 120, env: Optional[dict] = None):
    """Run a Python command line; return CompletedProcess with text output."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)


def run_isolated(directory: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` as a script in ``directory`` without environment or user site (``-E -s``).

    (``-I`` would also drop the script's own directory from ``sys.path``.)
    """
    script = directory / f"check_{uuid.uuid4().hex[:6]}.py"
    script.write_text(code)
    return subprocess.run([sys.executable, "-E", "-s", str(script)], cwd=directory, capture_output=True, text=True)


FANOUT = """
from typing import Annotated
from reflow import Param, Result, Workflow

wf = Workflow("fan")

@wf.job()
def prepare(n: Annotated[int, Param(help="how many")] = 5) -> list[int]:
    return list(range(n))

@wf.job(array=True)
def square(x: int = Result(step="prepare")) -> int:
    if x == FAIL_AT:
        raise RuntimeError(f"boom at {x}")
    return x * x

@wf.job()
def total(values: list[int] = Result(step="square")) -> int:
    return sum(values)

FAIL_AT = -1

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""


# =============================================================================
# Import paths
# =============================================================================


class ImportPathTest(unittest.TestCase):
    """Every documented import path is served by the one file."""

    PATHS = {
        "reflow.stores.sqlite": ["SqliteStore"],
        "reflow.stores": ["Store"],
        "reflow.executors.helpers": ["default_executor", "resolve_executor"],
        "reflow.executors.util": ["run_cmd", "CommandResult", "ExecutorError"],
        "reflow.workflow": ["Workflow", "make_run_id", "build_kwargs", "resolve_index", "default_executor",
                            "resolve_executor"],
        "reflow.cache": ["compute_input_hash", "compute_identity", "compute_output_hash", "verify_cached_output"],
        "reflow.params": ["WireMode", "infer_wire_mode"],
        "reflow.manifest": ["DEFAULT_CODEC"],
        "reflow.signals": ["graceful_shutdown"],
        "reflow.executors.slurm": ["SlurmExecutor"],
        "reflow.executors.local": ["LocalExecutor"],
        "reflow.config": ["Config", "load_config"],
    }

    def test_public_names(self) -> None:
        for name in ["Flow", "Workflow", "Run", "Param", "Result", "RunDir", "Config", "config_path", "load_config",
                     "ensure_config_exists", "write_example_config", "TaskInterrupted", "JobConfig", "TaskSpec",
                     "RunState", "TaskState", "Executor", "JobResources", "SlurmExecutor", "PBSExecutor",
                     "LSFExecutor", "SGEExecutor", "FluxExecutor", "LocalExecutor", "ManifestCodec",
                     "WorkflowDescription", "__version__"]:
            with self.subTest(name=name):
                self.assertTrue(hasattr(reflow, name))
        self.assertEqual(sorted(reflow.__all__), reflow.__all__)

    def test_submodules_are_the_same_objects(self) -> None:
        for module_name, names in self.PATHS.items():
            module = importlib.import_module(module_name)
            for name in names:
                with self.subTest(path=f"{module_name}.{name}"):
                    self.assertIs(getattr(module, name), getattr(reflow, name))
        for sub in ("workflow", "stores", "stores.sqlite", "executors", "executors.helpers", "executors.util",
                    "executors.pbs", "executors.lsf", "executors.sge", "executors.flux", "config", "params", "flow",
                    "cache", "manifest", "results", "signals", "run", "_types", "cli"):
            with self.subTest(sub=sub):
                self.assertIsNotNone(importlib.import_module(f"reflow.{sub}"))

    def test_copied_alone_isolated_mode(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(HERE / "reflow.py", tmp)
            code = ("import reflow; from reflow.stores.sqlite import SqliteStore; "
                    "from reflow.executors.helpers import resolve_executor; "
                    "from reflow.workflow import make_run_id; print(SqliteStore is reflow.SqliteStore)")
            proc = run_isolated(Path(tmp), code)
            self.assertEqual(proc.stdout.strip(), "True", proc.stderr)
            proc = subprocess.run([sys.executable, "-I", "reflow.py", "--version"], cwd=tmp, capture_output=True,
                                  text=True)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn(reflow.__version__, proc.stdout)
            proc = subprocess.run([sys.executable, "-I", "reflow.py", "runs", "--store-path", "none.db"], cwd=tmp,
                                  capture_output=True, text=True)
            self.assertEqual((proc.returncode, proc.stderr.strip()), (1, "reflow: error: store none.db does not exist"))

    def test_vendored_under_another_name(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            vendor = Path(tmp) / "tool" / "_vendor"
            vendor.mkdir(parents=True)
            for package in (vendor.parent, vendor):
                (package / "__init__.py").write_text("")
            shutil.copy(HERE / "reflow.py", vendor / "reflow.py")
            code = ("import tool._vendor.reflow as r; from tool._vendor.reflow.stores.sqlite import SqliteStore; "
                    "import sys; print(SqliteStore is r.SqliteStore, 'reflow' in sys.modules)")
            proc = run_isolated(Path(tmp), code)
            self.assertEqual(proc.stdout.strip(), "True False", proc.stderr)

    def test_run_as_script_has_one_copy(self) -> None:
        code = textwrap.dedent(f"""
            import runpy, sys
            sys.argv = [{str(HERE / 'reflow.py')!r}, "--version"]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit:
                pass
            import reflow, reflow.workflow
            print(reflow.workflow.Workflow is reflow.Workflow, reflow.__name__)
        """)
        with tempfile.TemporaryDirectory() as tmp:
            proc = run_isolated(Path(tmp), code)
        self.assertEqual(proc.stdout.split()[-2:], ["True", "__main__"], proc.stderr)


# =============================================================================
# Model: tasks, wiring and validation
# =============================================================================


class DefinitionTest(unittest.TestCase):
    """The decorator, Result/Param markers and include()."""

    def test_job_returns_function_and_records_spec(self) -> None:
        wf = Workflow("w", config=reflow.Config())

        def f(x: int) -> int:
            return x

        self.assertIs(wf.job(cpus=2, partition="short")(f), f)
        spec = wf.tasks["f"]
        self.assertEqual((spec.config.cpus, spec.config.partition), (2, "short"))
        self.assertEqual(sorted(reflow.dataclasses.asdict(spec.config)), sorted(
            ["cpus", "time", "mem", "array", "after", "array_parallelism", "submit_options", "version", "cache",
             "backend", "retries"]))

    def test_reprs(self) -> None:
        self.assertEqual(repr(Result(step="a")), "Result(step='a')")
        self.assertEqual(repr(Result(steps=["a", "b"], broadcast=True)), "Result(steps=['a', 'b'], broadcast=True)")
        self.assertEqual(repr(Param(help="x", short="-s", namespace="local")),
                         "Param(help='x', short='-s', namespace='local')")

    def test_bad_definitions(self) -> None:
        wf = Workflow("w", config=reflow.Config())
        cases = [
            (lambda: Result(), ValueError, "exactly one"),
            (lambda: Result(step="a", steps=["b"]), ValueError, "exactly one"),
            (lambda: wf.job(array=True)(lambda: 1), ValueError, "Result"),
            (lambda: wf.job(cpus=0)(lambda: 1), ValueError, "cpus"),
            (lambda: wf.job(time="1h30")(lambda: 1), ValueError, "1h30"),
            (lambda: wf.job(mem="4 GB")(lambda: 1), ValueError, "4 GB"),
            (lambda: Param(namespace="weird"), ValueError, "namespace"),
            (lambda: Workflow("bad name!"), ValueError, "bad name"),
        ]
        for make, error, text in cases:
            with self.subTest(text=text), self.assertRaisesRegex(error, text):
                make()

    def test_duplicate_name(self) -> None:
        wf = Workflow("w", config=reflow.Config())
        wf.job(name="a")(lambda: 1)
        with self.assertRaisesRegex(ValueError, "duplicate task name 'a'"):
            wf.job(name="a")(lambda: 2)

    def test_include_with_prefix_renames_references(self) -> None:
        flow = Flow("f")

        @flow.job()
        def a() -> list[int]:
            return [1]

        @flow.job(array=True, after=["a"])
        def b(x: int = Result(step="a")) -> int:
            return x

        wf = Workflow("w", config=reflow.Config())
        wf.include(flow, prefix="p")
        wf.include(flow, prefix="q")
        self.assertEqual(list(wf.tasks), ["p_a", "p_b", "q_a", "q_b"])
        self.assertEqual(wf.tasks["q_b"].result_deps["x"].steps, ["q_a"])
        self.assertEqual(wf.tasks["q_b"].config.after, ["q_a"])
        self.assertEqual(flow.tasks["b"].result_deps["x"].steps, ["a"])  # the flow itself is untouched
        with self.assertRaisesRegex(ValueError, "duplicate"):
            wf.include(flow, prefix="p")
        wf.validate()


class WiringTest(unittest.TestCase):
    """infer_wire_mode follows the spec table."""

    def test_table(self) -> None:
        M = reflow.WireMode
        cases = [
            (int, False, int, False, False, M.DIRECT),
            (list[int], False, int, True, False, M.FAN_OUT),
            (list[int], False, list[int], True, False, M.BROADCAST),
            (int, False, int, True, True, M.BROADCAST),
            (int, True, list[int], False, False, M.GATHER),
            (list[int], True, list[int], False, False, M.GATHER_FLATTEN),
            (list[int], True, list[list[int]], False, False, M.GATHER),
            (int, True, int, True, False, M.CHAIN),
            (list[int], True, int, True, False, M.CHAIN_FLATTEN),
            (int, True, list[int], True, True, M.BROADCAST),
            (Optional[int], False, int, False, False, M.DIRECT),
        ]
        for up, up_array, down, down_array, broadcast, mode in cases:
            with self.subTest(up=up, down=down, mode=mode):
                self.assertIs(reflow.infer_wire_mode(up, up_array, down, down_array, broadcast), mode)

    def test_mismatches(self) -> None:
        for args in [(int, False, int, True), (int, True, int, False), (str, False, int, False),
                     (list[str], False, int, True)]:
            with self.subTest(args=args), self.assertRaises(TypeError):
                reflow.infer_wire_mode(*args)


class ValidationTest(unittest.TestCase):
    """validate() names the wrong thing."""

    def make(self, body: str) -> Workflow:
        namespace: dict = {"Workflow": Workflow, "Result": Result, "Param": Param, "Annotated": Annotated,
                           "reflow": reflow}
        exec(textwrap.dedent(body), namespace)  # test-only: builds small graphs inline
        return namespace["wf"]

    def test_unknown_step_suggests(self) -> None:
        wf = self.make("""
            wf = Workflow("w", config=reflow.Config())
            @wf.job()
            def prepare() -> int: return 1
            @wf.job()
            def use(x: int = Result(step="prepar")) -> int: return x
        """)
        with self.assertRaisesRegex(ValueError, "unknown task 'prepar'. Did you mean 'prepare'"):
            wf.validate()

    def test_cycle(self) -> None:
        wf = self.make("""
            wf = Workflow("w", config=reflow.Config())
            @wf.job(after=["b"])
            def a() -> int: return 1
            @wf.job(after=["a"])
            def b() -> int: return 1
        """)
        with self.assertRaisesRegex(ValueError, "Task graph contains a cycle"):
            wf.validate()

    def test_type_mismatch(self) -> None:
        wf = self.make("""
            wf = Workflow("w", config=reflow.Config())
            @wf.job()
            def a() -> str: return "x"
            @wf.job()
            def b(x: int = Result(step="a")) -> int: return x
        """)
        with self.assertRaisesRegex(TypeError, "Type mismatch wiring 'a' -> 'b'.x"):
            wf.validate()

    def test_flag_collisions(self) -> None:
        cases = {
            "reserved": """
                wf = Workflow("w", config=reflow.Config())
                @wf.job()
                def a(force: bool = False) -> int: return 1
            """,
            "two names one dest": """
                wf = Workflow("w", config=reflow.Config())
                @wf.job()
                def a_b(c: Annotated[int, Param(namespace="local")] = 1) -> int: return 1
                @wf.job()
                def a(b_c: Annotated[int, Param(namespace="local")] = 1) -> int: return 1
            """,
        }
        for label, body in cases.items():
            with self.subTest(label), self.assertRaises(ValueError):
                self.make(body).validate()

    def test_order_and_dependencies(self) -> None:
        wf = self.make("""
            wf = Workflow("w", config=reflow.Config())
            @wf.job()
            def c() -> int: return 1
            @wf.job()
            def a() -> int: return 1
            @wf.job(after=["c"])
            def b(x: int = Result(step="a")) -> int: return x
        """)
        self.assertEqual(wf.tasks["b"].dependencies, ["a", "c"])
        self.assertEqual(wf.topological_order(), ["c", "a", "b"])

    def test_union_string_annotation_on_every_python(self) -> None:
        wf = self.make("""
            from __future__ import annotations
            wf = Workflow("w", config=reflow.Config())
            @wf.job()
            def a(limit: int | None = None, name: str = "x") -> int: return 1
        """)
        params = {p.name: p for p in wf.cli_params()}
        self.assertIs(params["limit"].type, int)
        self.assertFalse(params["limit"].required)


# =============================================================================
# Cache
# =============================================================================


class CacheFunctionTest(unittest.TestCase):
    """Identity functions and verification."""

    def test_identity_depends_on_params_and_version(self) -> None:
        base = reflow.compute_input_hash("t", "1", {"x": 1}, {"n": 1})
        self.assertNotEqual(base, reflow.compute_input_hash("t", "1", {"x": 1}, {"n": 2}))
        self.assertNotEqual(base, reflow.compute_input_hash("t", "2", {"x": 1}, {"n": 1}))
        self.assertEqual(base, reflow.compute_input_hash("t", "1", {"x": 1}, {"n": 1}))
        self.assertEqual(len(base), 16)
        self.assertEqual(reflow.compute_identity(base, ["b", "a"]), reflow.compute_identity(base, ["a", "b"]))
        self.assertEqual(reflow.compute_output_hash({"b": 1, "a": [Path("/x")]}),
                         reflow.compute_output_hash({"a": [Path("/x")], "b": 1}))

    def test_verify_rules(self) -> None:
        with tempfile.NamedTemporaryFile() as handle:
            present = Path(handle.name)
            self.assertTrue(reflow.verify_cached_output(present, Path))
            self.assertFalse(reflow.verify_cached_output(Path("/no/such/file"), Path))
            self.assertFalse(reflow.verify_cached_output([present, Path("/no/such")], list[Path]))
            self.assertTrue(reflow.verify_cached_output([present], List[Path]))
            self.assertFalse(reflow.verify_cached_output(present, Path, verify=lambda out: False))
            self.assertTrue(reflow.verify_cached_output(5, int))


# =============================================================================
# Engine: run_local
# =============================================================================


class RunLocalTest(TempDirTest):
    """In-process runs: every wiring mode, cache, errors."""

    def flow(self, source: str = FANOUT):
        return load_flow(self.tmp, source)

    def test_fan_out_gather(self) -> None:
        mod = self.flow()
        run = mod.wf.run_local(self.tmp / "run", n=6)
        self.assertEqual(run.state, "SUCCESS")
        store = run.store
        self.assertEqual(store.get_singleton_output(run.run_id, "total"), sum(i * i for i in range(6)))
        self.assertEqual(store.task_state_summary(run.run_id)["square"], {"SUCCESS": 6})

    def test_every_wiring_mode(self) -> None:
        mod = self.flow("""
            from reflow import Result, Workflow
            wf = Workflow("modes")

            @wf.job()
            def seed() -> list[int]:
                return [1, 2, 3]

            @wf.job(array=True)
            def pairs(x: int = Result(step="seed")) -> list[int]:
                return [x, 10 * x]

            @wf.job(array=True)
            def chained(x: list[int] = Result(step="pairs")) -> int:
                return sum(x)

            @wf.job(array=True)
            def flat(v: int = Result(step="pairs")) -> int:
                return v + 1

            @wf.job()
            def gather(values: list[int] = Result(step="chained")) -> list[int]:
                return values

            @wf.job()
            def gather_flat(values: list[int] = Result(step="pairs")) -> list[int]:
                return values

            @wf.job(array=True)
            def with_broadcast(x: int = Result(step="seed"), everything: list[int] = Result(step="seed",
                               broadcast=True)) -> int:
                return x * 100 + len(everything)

            @wf.job()
            def both(values: list[int] = Result(steps=["gather", "gather_flat"])) -> int:
                return len(values)
        """)
        run = mod.wf.run_local(self.tmp / "run")
        out = lambda task: run.store.get_singleton_output(run.run_id, task)  # noqa: E731
        arr = lambda task: run.store.get_array_outputs(run.run_id, task)  # noqa: E731
        self.assertEqual(run.state, "SUCCESS")
        self.assertEqual(arr("chained"), [11, 22, 33])
        self.assertEqual(arr("flat"), [2, 11, 3, 21, 4, 31])
        self.assertEqual(out("gather"), [11, 22, 33])
        self.assertEqual(out("gather_flat"), [1, 10, 2, 20, 3, 30])
        self.assertEqual(arr("with_broadcast"), [103, 203, 303])
        self.assertEqual(out("both"), 9)

    def test_empty_fan_out_completes(self) -> None:
        mod = self.flow()
        run = mod.wf.run_local(self.tmp / "run", n=0)
        self.assertEqual(run.state, "SUCCESS")
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 0)

    def test_cache_hits_and_new_params(self) -> None:
        mod = self.flow()
        first = mod.wf.run_local(self.tmp / "run", n=4)
        second = mod.wf.run_local(self.tmp / "run", n=4)
        cached = [i["cached"] for i in second.store.list_task_instances(second.run_id)]
        self.assertTrue(all(cached), cached)
        third = mod.wf.run_local(self.tmp / "run", n=5)  # a new parameter must not reuse stale results
        self.assertEqual(third.store.get_singleton_output(third.run_id, "total"), 30)
        prepare = third.store.get_task_instance(third.run_id, "prepare", None)
        self.assertEqual(prepare["cached"], 0)
        self.assertEqual(first.store.get_singleton_output(first.run_id, "total"), 14)

    def test_force_tasks_reaches_downstream(self) -> None:
        mod = self.flow()
        mod.wf.run_local(self.tmp / "run", n=3)
        run = mod.wf.run_local(self.tmp / "run", n=3, force_tasks=["square"])
        cached = {(i["task_name"], i["array_index"]): i["cached"] for i in run.store.list_task_instances(run.run_id)}
        self.assertEqual(cached[("prepare", None)], 1)
        self.assertFalse(any(v for (task, _), v in cached.items() if task != "prepare"))
        forced = mod.wf.run_local(self.tmp / "run", n=3, force=True)
        self.assertFalse(any(i["cached"] for i in forced.store.list_task_instances(forced.run_id)))

    def test_verify_recomputes_missing_path(self) -> None:
        mod = load_flow(self.tmp, (HERE / "examples" / "files.py").read_text())
        run_dir = self.tmp / "files"
        mod.wf.run_local(run_dir, chunks=3)
        (run_dir / "chunk-1.txt").unlink()
        again = mod.wf.run_local(run_dir, chunks=3, verify=True)
        rows = {(i["task_name"], i["array_index"]): i["cached"] for i in again.store.list_task_instances(again.run_id)}
        self.assertEqual(rows[("write_chunk", 1)], 0)
        self.assertEqual(rows[("write_chunk", 0)], 1)
        self.assertTrue((run_dir / "chunk-1.txt").exists())
        self.assertEqual(again.state, "SUCCESS")

    def test_on_error_stop_and_continue(self) -> None:
        mod = self.flow()
        mod.FAIL_AT = 2
        with self.assertRaisesRegex(RuntimeError, "Task 'square' failed"):
            mod.wf.run_local(self.tmp / "run", n=4)
        run = mod.wf.run_local(self.tmp / "run", n=4, on_error="continue")
        self.assertEqual(run.state, "FAILED")
        summary = run.store.task_state_summary(run.run_id)
        self.assertEqual(summary["square"], {"SUCCESS": 3, "FAILED": 1})
        self.assertNotIn("total", summary)
        failed = run.store.get_task_instance(run.run_id, "square", 2)
        self.assertIn("boom at 2", failed["error_text"])

    def test_process_pool(self) -> None:
        mod = self.flow()
        run = mod.wf.run_local(self.tmp / "run", n=20, max_workers=2)
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), sum(i * i for i in range(20)))

    def test_unencodable_return_fails_clearly(self) -> None:
        mod = self.flow("""
            from reflow import Workflow
            wf = Workflow("bad")
            @wf.job()
            def make() -> object:
                return object()
        """)
        run = mod.wf.run_local(self.tmp / "run", on_error="continue")
        inst = run.store.get_task_instance(run.run_id, "make", None)
        self.assertEqual(inst["state"], "FAILED")
        self.assertIn("JSON cannot hold", inst["error_text"])

    def test_array_fed_a_dict_fails_clearly(self) -> None:
        mod = self.flow("""
            from reflow import Result, Workflow
            wf = Workflow("bad")
            @wf.job()
            def make():
                return {"a": 1}
            @wf.job(array=True)
            def each(x = Result(step="make")):
                return x
        """)
        run = mod.wf.run_local(self.tmp / "run", on_error="continue")
        self.assertEqual(run.state, "FAILED")
        (inst,) = run.store.list_task_instances(run.run_id, "each")
        self.assertIn("needs a list", inst["error_text"])

    def test_bad_parameters_change_nothing(self) -> None:
        mod = self.flow()
        cases = [({"m": 3}, "unknown parameter 'm'"), ({"n": "3"}, "must be int"), ({"n": 2.5}, "must be int")]
        for params, text in cases:
            with self.subTest(params=params), self.assertRaisesRegex(TypeError, text):
                mod.wf.run_local(self.tmp / "run", **params)
        self.assertFalse((self.tmp / "run").exists())
        self.assertFalse(self.store_path.exists())
        with self.assertRaisesRegex(ValueError, "unknown executor 'slurmm' .*Did you mean 'slurm'"):
            mod.wf.submit(self.tmp / "run", executor="slurmm", n=1)
        (self.tmp / "file").write_text("x")
        with self.assertRaisesRegex(TypeError, "which is a file"):
            mod.wf.run_local(self.tmp / "file" / "run", n=1)
        self.assertFalse(self.store_path.exists())


# =============================================================================
# Engine: submit with the local executor (dispatcher as a job)
# =============================================================================


class LocalSubmitTest(TempDirTest):
    """The full batch protocol with background processes."""

    def test_pipeline_to_success_then_cache(self) -> None:
        mod = load_flow(self.tmp, FANOUT)
        run = mod.wf.submit(self.tmp / "run", executor="local", n=5)
        self.assertEqual(run.wait(timeout=120), "SUCCESS", run.status(as_dict=True)["failed_instances"])
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 30)
        logs = list((self.tmp / "run" / "logs").iterdir())
        self.assertTrue(any(p.name.startswith("square-") for p in logs), logs)
        again = mod.wf.submit(self.tmp / "run", executor="local", n=5)
        self.assertEqual(again.wait(timeout=60), "SUCCESS")
        self.assertTrue(all(i["cached"] for i in again.store.list_task_instances(again.run_id)))

    def test_failure_then_retry(self) -> None:
        source = FANOUT.replace("FAIL_AT = -1", "FAIL_AT = -1 if __import__('os').path.exists("
                                "__import__('os').environ['FIXED']) else 3")
        fixed = self.tmp / "fixed"
        with mock_env(FIXED=str(fixed)):
            mod = load_flow(self.tmp, source)
            run = mod.wf.submit(self.tmp / "run", executor="local", n=5)
            self.assertEqual(run.wait(timeout=120), "FAILED")
            status = run.status(as_dict=True)
            self.assertEqual([(i["task_name"], i["array_index"]) for i in status["failed_instances"]], [("square", 3)])
            self.assertIn("boom at 3", status["failed_instances"][0]["error_text"])
            fixed.write_text("ok")
            self.assertEqual(run.retry(), 1)
            self.assertEqual(run.wait(timeout=120), "SUCCESS")
            self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 30)
            square = run.store.get_task_instance(run.run_id, "square", 3)
            self.assertEqual((square["state"], square["attempt"]), ("SUCCESS", 1))

    SLEEPY = """
        import os, time
        from pathlib import Path
        from reflow import Result, Workflow
        wf = Workflow("slow")

        @wf.job()
        def seed() -> list[int]:
            return [0, 1]

        @wf.job(array=True)
        def sleepy(x: int = Result(step="seed")) -> int:
            Path(os.environ["MARKS"], f"{x}.pid").write_text(str(os.getpid()))
            time.sleep(float(os.environ["NAP"]) * (x + 1))
            return x
    """

    def test_killed_worker_fails_with_reason(self) -> None:
        mod = load_flow(self.tmp, self.SLEEPY)
        marks = self.tmp / "marks"
        marks.mkdir()
        with mock_env(MARKS=str(marks), NAP="3", REFLOW_LOST_JOB_GRACE="0"):
            run = mod.wf.submit(self.tmp / "run", executor="local")
            self._wait_for_files(marks, 2)
            os.kill(int((marks / "0.pid").read_text()), signal.SIGKILL)
            self.assertEqual(run.wait(timeout=60), "FAILED")
        lost = run.store.get_task_instance(run.run_id, "sleepy", 0)
        self.assertEqual(lost["state"], "FAILED")
        self.assertIn("ended without a result", lost["error_text"])
        self.assertIn("signal 9", lost["error_text"])
        self.assertEqual(run.store.get_task_instance(run.run_id, "sleepy", 1)["state"], "SUCCESS")

    def test_cancel_kills_running_jobs(self) -> None:
        mod = load_flow(self.tmp, self.SLEEPY)
        marks = self.tmp / "marks"
        marks.mkdir()
        with mock_env(MARKS=str(marks), NAP="60"):
            run = mod.wf.submit(self.tmp / "run", executor="local")
            pids = self._wait_for_files(marks, 2)
            self.assertEqual(run.cancel(), 2)
        self.assertEqual(run.state, "CANCELLED")
        self.assertEqual(run.store.task_state_summary(run.run_id)["sleepy"], {"CANCELLED": 2})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        self.assertFalse([pid for pid in pids if _alive(pid)])

    def _wait_for_files(self, directory: Path, count: int) -> List[int]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = list(directory.glob("*.pid"))
            if len(files) == count and all(f.read_text() for f in files):
                return [int(f.read_text()) for f in files]
            time.sleep(0.1)
        self.fail(f"only {len(list(directory.glob('*.pid')))} of {count} workers started")


def _alive(pid: int) -> bool:
    """Tell whether a process exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


# =============================================================================
# Command line
# =============================================================================


class CliTest(TempDirTest):
    """The generated CLI and the store-only entry point."""

    def setUp(self) -> None:
        super().setUp()
        self.flow_file = self.tmp / "flow.py"
        self.flow_file.write_text(textwrap.dedent(FANOUT))

    def test_run_status_json_and_dag(self) -> None:
        proc = run_cli(self.flow_file, "run", "--run-dir", self.tmp / "run", "--n", "4", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        run_id = json.loads(proc.stdout)["run_id"]
        proc = run_cli(HERE / "reflow.py", "status", run_id, "--json", "--store-path", self.store_path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        status = json.loads(proc.stdout)
        self.assertEqual(status["run"]["status"], "SUCCESS")
        self.assertEqual(status["summary"]["square"], {"SUCCESS": 4})
        proc = run_cli(HERE / "reflow.py", "runs", "--json")
        self.assertEqual([r["run_id"] for r in json.loads(proc.stdout)], [run_id])
        proc = run_cli(HERE / "reflow.py", "status", run_id, "--exit-code")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("square", proc.stdout)
        proc = run_cli(self.flow_file, "dag", "--format", "mermaid")
        self.assertIn("prepare --> square", proc.stdout)
        self.assertIn("square[[square]]", proc.stdout)
        proc = run_cli(HERE / "reflow.py", "dag", run_id, "--format", "dot")
        self.assertIn('"square" -> "total";', proc.stdout)
        proc = run_cli(self.flow_file, "describe")
        manifest = json.loads(proc.stdout)
        self.assertEqual([t["name"] for t in manifest["tasks"]], ["prepare", "square", "total"])

    def test_submit_local_wait(self) -> None:
        proc = run_cli(self.flow_file, "submit", "--executor", "local", "--run-dir", self.tmp / "run", "--n", "3",
                       "--wait")
        self.assertEqual(proc.returncode, 0, proc.stderr + proc.stdout)
        self.assertIn("SUCCESS", proc.stdout)

    def test_usage_errors(self) -> None:
        self.store().close()
        cases = [
            ((self.flow_file, "run", "--run-dir", self.tmp / "r", "--n", "x"), 2, "invalid int value"),
            ((self.flow_file, "run", "--run-dir", self.tmp / "r", "--nn", "3"), 2, "--nn"),
            ((self.flow_file, "frobnicate"), 2, "frobnicate"),
            ((HERE / "reflow.py", "status", "nope-20260101-abc"), 1, "no run 'nope-20260101-abc'"),
            ((self.flow_file, "submit", "--run-dir", self.tmp / "r", "--executor", "pbss"), 1, "unknown executor"),
        ]
        for argv, code, text in cases:
            with self.subTest(argv=argv[1:]):
                proc = run_cli(*argv)
                self.assertEqual(proc.returncode, code, proc.stderr)
                self.assertIn(text, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertFalse((self.tmp / "r").exists())

    def test_generated_flags(self) -> None:
        flow = self.tmp / "flags.py"
        flow.write_text(textwrap.dedent("""
            import datetime
            from pathlib import Path
            from typing import Annotated, Literal, Optional
            from reflow import Param, Workflow
            wf = Workflow("flags")

            @wf.job()
            def show(when: datetime.datetime, paths: list[Path], mode: Literal["fast", "slow"] = "fast",
                     dry: bool = False, level: Annotated[int, Param(help="lvl", short="-l", namespace="local")] = 1,
                     note: Optional[str] = None) -> str:
                return f"{when.isoformat()}|{[p.name for p in paths]}|{mode}|{dry}|{level}|{note}"

            if __name__ == "__main__":
                raise SystemExit(wf.cli())
        """))
        proc = run_cli(flow, "run", "--help")
        for flag in ("--when", "--paths", "--mode", "--dry", "--show-level", "-l", "lvl"):
            self.assertIn(flag, proc.stdout)
        proc = run_cli(flow, "run", "--run-dir", self.tmp / "r", "--when", "2026-01-02T03:04", "--paths", "a", "b",
                       "--mode", "slow", "--dry", "yes", "-l", "7", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        run_id = json.loads(proc.stdout)["run_id"]
        with reflow.SqliteStore(self.store_path) as store:
            self.assertEqual(store.get_singleton_output(run_id, "show"), "2026-01-02T03:04:00|['a', 'b']|slow|True|7|None")
        proc = run_cli(flow, "run", "--run-dir", self.tmp / "r", "--when", "x", "--paths", "a", "--mode", "medium")
        self.assertEqual(proc.returncode, 2)


if __name__ == "__main__":
    unittest.main()
