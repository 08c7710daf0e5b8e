#!/usr/bin/env python3
"""Tests of reflow.py: run ``python test_reflow.py`` (or pytest) next to reflow.py.

Tests that need a real scheduler skip when its commands are missing, except
under ``CI=true``, where a missing scheduler is a failure.
"""

import collections
import contextlib
import dataclasses
import datetime
import decimal
import enum
import errno
import functools
import glob
import html
import html.parser
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import unittest
import uuid
import warnings
from pathlib import Path
from typing import Annotated, Any, Dict, Iterable, List, Optional, Tuple
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
os.environ.pop("REFLOW_MODE", None)

import reflow  # noqa: E402
from reflow import (  # noqa: E402
    ExecutorError,
    Flow,
    FluxExecutor,
    JobInfo,
    JobResources,
    LSFExecutor,
    PBSExecutor,
    Param,
    Result,
    SGEExecutor,
    SlurmExecutor,
    Workflow,
)

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
        _stop_local_jobs(self.tmp)
        self._tmp.cleanup()

    def store(self) -> "reflow.SqliteStore":
        store = reflow.SqliteStore(self.store_path)
        store.init()
        return store


def _stop_local_jobs(directory: Path, grace: float = 10.0) -> None:
    """Let local job runners under ``directory`` finish (they write their final state), then kill stragglers."""
    def runners() -> List[int]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"_local-job" in argv and any(str(directory).encode() in arg for arg in argv):
                    found.append(int(proc.name))
        return found

    deadline = time.monotonic() + grace
    while runners() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in runners():
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


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
        self.assertEqual(sorted(dataclasses.asdict(spec.config)), sorted(
            ["cpus", "time", "mem", "array", "after", "array_parallelism", "submit_options", "version", "cache",
             "backend", "retries", "elements_per_job", "inline"]))

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

    def test_identities_stay_those_of_earlier_stores(self) -> None:
        """Hashes recorded by earlier versions must still match (values pinned from reflow.py 9bd6d4f)."""
        base = reflow.compute_input_hash("square", "1", {"x": 3, "name": "é"}, {"n": 10})
        self.assertEqual((base, reflow.compute_identity(base, []), reflow.compute_identity(base, ["b2", "a1"])),
                         ("68b1debd7e7a7a81", "67aca273ebd75f19", "29fd1630b97c8c47"))
        self.assertEqual(reflow.compute_output_hash({"b": [1.5, None], "a": Path("/x")}), "1fcdaa1bcc3ea013")

    def test_compact_json_is_json_dumps(self) -> None:
        values = [{"x": 5, "a": [1, 2.5, None, True]}, "é\x7f\"\\", 1e300, -0.0, {"z": {"y": [{}], "x": "ü"}}, []]
        for value in values:
            with self.subTest(value=value):
                self.assertEqual(reflow._canonical_json(value),
                                 json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
                self.assertEqual(reflow._JSON_ENCODE(value), json.dumps(value, sort_keys=True, separators=(",", ":")))
        with self.assertRaises(ValueError):
            reflow._canonical_json([float("nan")])
        with self.assertRaises(TypeError):
            reflow._JSON_ENCODE({"x": object()})

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

    def test_whole_task_copy_matches_per_instance_lookup(self) -> None:
        mod = self.flow()
        mod.FAIL_AT = 2
        failed = mod.wf.run_local(self.tmp / "run", n=4, on_error="continue")
        mod.FAIL_AT = -1
        # The failed run's square cannot be copied whole: elements are looked up one by one.
        mended = mod.wf.run_local(self.tmp / "run", n=4)
        cached = {i["array_index"]: i["cached"] for i in mended.store.list_task_instances(mended.run_id, "square")}
        self.assertEqual(cached, {0: 1, 1: 1, 2: 0, 3: 1})
        with mock.patch.object(reflow.SqliteStore, "find_cached_many", side_effect=AssertionError("one by one")):
            again = mod.wf.run_local(self.tmp / "run", n=4)  # every task is copied whole from the mended run
        store = again.store
        columns = ("array_index", "state", "input", "identity", "input_hash", "output", "output_hash")
        for task in ("prepare", "square", "total"):
            expected = [tuple(i[c] for c in columns) for i in store.list_task_instances(mended.run_id, task)]
            copied = store.list_task_instances(again.run_id, task)
            self.assertEqual([tuple(i[c] for c in columns) for i in copied], expected)
            self.assertTrue(all(i["cached"] for i in copied), task)
        events = [(e["event"], e["array_index"], e["instance_id"], e["reason"])
                  for e in store.list_events(again.run_id) if e["task_name"] == "square"]
        self.assertEqual(events, [("cached", None, None, f"4 instances copied from run {mended.run_id}")])
        self.assertEqual(store.get_task_specs(again.run_id)[1]["width"], 4)
        self.assertEqual(failed.state, "FAILED")

    def test_a_run_and_its_cached_re_run_use_nothing_deprecated(self) -> None:
        # Python 3.12 deprecated binding numbered parameters (?1) from a sequence; 3.14 refuses it
        mod = self.flow()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            first = mod.wf.run_local(self.tmp / "run", n=40)
            again = mod.wf.run_local(self.tmp / "run", n=40)
        self.assertEqual([run.store.get_singleton_output(run.run_id, "total") for run in (first, again)],
                         [20540, 20540])

    def test_a_result_changed_through_the_store_api_reaches_the_next_run(self) -> None:
        mod = self.flow()
        first = mod.wf.run_local(self.tmp / "run", n=4)
        element = first.store.get_task_instance(first.run_id, "square", 2)
        first.store.update_task_success(element["id"], 100, reflow.compute_output_hash(100))
        again = mod.wf.run_local(self.tmp / "run", n=4)  # square is copied as it is now; total sees the change
        self.assertEqual(again.store.get_array_outputs(again.run_id, "square"), [0, 1, 100, 9])
        self.assertEqual(again.store.get_singleton_output(again.run_id, "total"), 110)

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
            total = run.store.get_task_instance(run.run_id, "total", None)  # submitted ahead, never ran
            self.assertEqual((total["state"], total["reason"]), ("CANCELLED", "UPSTREAM_FAILED"))
            fixed.write_text("ok")
            self.assertEqual(run.retry(), 2)
            self.assertEqual(run.wait(timeout=120), "SUCCESS")
            self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 30)
            square = run.store.get_task_instance(run.run_id, "square", 3)
            self.assertEqual((square["state"], square["attempt"]), ("SUCCESS", 1))

    def test_wide_array_is_split_into_native_arrays(self) -> None:
        mod = load_flow(self.tmp, FANOUT)
        with mock_env(REFLOW_MAX_ARRAY_SIZE="3"):
            run = mod.wf.submit(self.tmp / "run", executor="local", n=8)
            self.assertEqual(run.wait(timeout=120), "SUCCESS", run.status(as_dict=True)["failed_instances"])
        self.assertEqual(run.store.get_array_outputs(run.run_id, "square"), [i * i for i in range(8)])
        arrays = {inst["job_id"].rsplit("_", 1)[0] for inst in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual(len(arrays), 3)  # 3 + 3 + 2 elements, each worker mapped back to its own index

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


class CrashRecoveryTest(TempDirTest):
    """A dispatcher killed mid-cycle: the next cycle adopts, nothing runs twice."""

    def test_killed_dispatcher_is_recovered_without_double_submission(self) -> None:
        for point in ("after-ingest", "after-submit", "after-forward"):
            with self.subTest(point=point):
                flow = self.tmp / f"flow_{point.replace('-', '_')}.py"
                flow.write_text(textwrap.dedent(FANOUT))
                run_dir = self.tmp / point
                proc = run_cli(flow, "submit", "--executor", "local", "--run-dir", run_dir, "--n", "4", "--force",
                               env={"REFLOW_TEST_CRASH": f"{point}@{self.tmp / point}.crashed"})
                self.assertEqual(proc.returncode, 137, proc.stderr)
                with reflow.SqliteStore(self.store_path) as store:
                    run_id = next(r["run_id"] for r in store.list_runs() if r["parameters"]["run_dir"] == str(run_dir))
                    run = reflow.Run(None, run_id, run_dir, store)
                    proc = run_cli(HERE / "reflow.py", "resume", run_id)
                    self.assertEqual(proc.returncode, 0, proc.stderr)
                    self.assertEqual(run.wait(timeout=120), "SUCCESS", run.status(as_dict=True)["failed_instances"])
                    self.assertEqual(store.get_singleton_output(run_id, "total"), 14)
                names = [json.loads(p.read_text())["name"] for p in (run_dir / ".reflow" / "local").glob("*.job")]
                prepare_jobs = [n for n in names if n.startswith("fan-prepare-")]
                self.assertEqual(len(prepare_jobs), 1, names)


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

    def test_bad_environment_is_one_line(self) -> None:
        config_dir = self.tmp / "config" / "reflow"
        config_dir.mkdir(parents=True)
        garbage = self.tmp / "garbage.db"
        garbage.write_bytes(b"this is not sqlite" * 100)
        (self.tmp / "afile").write_text("x")
        cases = [
            ('[executor]\nmdoe = "sbatch"\n', (self.flow_file, "run", "--run-dir", self.tmp / "r", "--n", "1"), 1,
             "unknown key 'executor.mdoe'. Did you mean 'executor.mode'?"),
            ("[executor\n", (HERE / "reflow.py", "runs"), 1, "line 1"),
            ("", (HERE / "reflow.py", "status", "x-1", "--store-path", garbage), 1, str(garbage)),
            ("", (self.flow_file, "run", "--run-dir", self.tmp / "afile" / "r", "--n", "1"), 1, "is a file"),
            ("", (self.flow_file, "run", "--run-dir", self.tmp / "r", "--n", "1", "--store-path",
                  self.tmp / "afile" / "s.db"), 1, "afile"),
        ]
        for config, argv, code, text in cases:
            (config_dir / "config.toml").write_text(config)
            with self.subTest(argv=argv[1:]):
                before = garbage.read_bytes()
                proc = run_cli(*argv)
                self.assertEqual(proc.returncode, code, proc.stderr)
                self.assertIn(text, proc.stderr)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertEqual(garbage.read_bytes(), before)
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
            self.assertEqual(store.get_singleton_output(run_id, "show"),
                             "2026-01-02T03:04:00|['a', 'b']|slow|True|7|None")
        proc = run_cli(flow, "run", "--run-dir", self.tmp / "r", "--when", "x", "--paths", "a", "--mode", "medium")
        self.assertEqual(proc.returncode, 2)


try:
    import tomllib  # novermin
except ImportError:  # Python < 3.11
    tomllib = None

@contextlib.contextmanager
def _clean_env(**values):
    """Run with every REFLOW_* / XDG_CONFIG_HOME variable removed, then ``values`` set."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("REFLOW_") or name == "XDG_CONFIG_HOME":
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# =============================================================================
# Config: TOML reader
# =============================================================================

_TOML_VALID = {
    "comments and tables": """
# leading comment
title = "reflow"   # trailing comment
[executor]
mode = "sbatch"
max_submit_jobs = 100
[executor.submit_options]
qos = 'normal'
exclusive = true
off = false
"quoted key" = "v"
'literal key' = 1
"" = "empty key"
""",
    "dotted keys and headers": """
[dispatch]
a.b.c = 1
a.b.d = 2
a . "x y" . 'z' = 3
[ fruit . apple ]
color = "red"
[fruit]
banana.color = "yellow"
[fruit.banana.texture]
smooth = true
[deep.x.y]
k = 1
[deep]
j = 2
""",
    "integers": """
ints = [+1, -2, 0, -0, +0, 1_000, 99, 5_349_221, 0xff, 0xDEAD_beef, 0o17, 0o7_7, 0b101, 0b1_0]
big = 9223372036854775808
""",
    "floats": """
floats = [1.5, -0.5, +3.25, 1e3, 1E-3, 6.02e+23, 1_0.0_1, 0.0, -0.0, 5e2_2, 3.0e0]
specials = [inf, +inf, -inf, nan, +nan, -nan]
""",
    "basic strings": r"""
esc = "tab\there\nnl \"q\" back\\slash \u00e9 \U0001F600 \b\f\r"
tabbed = "a	b"
unicode = "naïve ☃"
""",
    "literal strings": r"""
path = 'C:\Users\nobody\x'
quote = '"quoted"'
""",
    "multi-line strings": '''
a = """
first
second"""
b = """one \\
    two \\

    three"""
c = """quote at end""""
d = """two at end"""""
e = \'\'\'
raw \\n
kept\'\'\'
f = \'\'\'x\'\'\'\'\'
g = """a "b" ""c"" d"""
h = """\\
  trimmed"""
i = """tab\\tescape"""
''',
    "arrays": """
empty = []
nested = [[1, 2], ["a", 'b'], [], [[true]]]
multi = [
  1,   # one
  2,
  # a comment line
  3,
]
mixed = [1, "two", 3.0, {x = 1}, [false]]
spaced = [ 1 , 2 ]
tables = [{name = "a"}, {name = "b", n.m = 1}]
""",
    "inline tables": """
empty = {}
point = { x = 1, y = 2 }
nested = {a = {b = {c = "d"}}, list = [1, {e = 2}]}
dotted = {a.b = 1, a.c = 2}
quoted = {"k k" = 1, 'l' = 2}
""",
    "arrays of tables": """
[[job]]
name = "a"
[job.opts]
x = 1
[[job]]
name = "b"
sub.k = 2
[[job.steps]]
s = 1
[[job.steps]]
s = 2
""",
    "whitespace": "\ta\t=\t1\t\n  [  t  ]  \n  b  =  'x'  \n\n\n",
    "crlf": "a = 1\r\n[t]\r\nb = \"\"\"x\r\ny\"\"\"\r\n",
    "no trailing newline": "a = 1",
    "empty": "",
    "only comments": "# nothing\n   # here\n",
    "keywords as keys": "true = 1\nfalse = 2\ninf = 3\nnan = 4\n1234 = 5\n-_- = 6\n",
    "comment right after value": 'a = "x"#c\nb = [1]#c\nc = {d = 1}#c\n',
}

# (document, line the error is reported on)
_TOML_INVALID = {
    "missing equals": ("a = 1\nb\n", 2),
    "missing equals after spaces": ("mode  \"x\"\n", 1),
    "duplicate key": ("a = 1\na = 2\n", 2),
    "duplicate key in table": ("[t]\na = 1\n[u]\n[t.x]\n[t]\n", 5),
    "duplicate table": ("[t]\n[t]\n", 2),
    "extend inline table by dotted key": ("a = {x = 1}\na.y = 2\n", 2),
    "extend inline table by header": ("a = {x = 1}\n[a.y]\n", 2),
    "redefine dotted table by header": ("[a]\nb.c = 1\n[a.b]\n", 3),
    "dotted key into earlier header table": ("[a.b]\nc = 1\n[a]\nb.d = 1\n", 4),
    "static array then array of tables": ("a = [1]\n[[a]]\n", 2),
    "table then array of tables": ("[a]\n[[a]]\n", 2),
    "array of tables then table": ("[[a]]\n[a]\n", 2),
    "value then table": ("a = 1\n[a]\n", 2),
    "value then sub-table": ("[a]\nb = 1\n[a.b.c]\n", 3),
    "dotted then value": ("a.b = 1\na = 2\n", 2),
    "unterminated string": ('a = "abc\nb = 1\n', 1),
    "unterminated literal": ("a = 'abc\n", 1),
    "unterminated multi-line": ('x = 1\na = """abc\n\n', 2),
    "unterminated multi-line literal": ("a = '''abc\n", 1),
    "bad escape": ('a = "\\q"\n', 1),
    "bad unicode escape": ('a = "\\u12"\n', 1),
    "surrogate escape": ('a = "\\uD800"\n', 1),
    "escape with trailing text": ('a = """x\\  y\n"""\n', 1),
    "control char in string": ('a = "x\x07"\n', 1),
    "control char in comment": ("a = 1 # \x01\n", 1),
    "leading zero": ("a = 01\n", 1),
    "double underscore": ("a = 1__0\n", 1),
    "trailing underscore": ("a = 10_\n", 1),
    "signed hex": ("a = +0x10\n", 1),
    "bare dot float": ("a = .5\n", 1),
    "trailing dot float": ("a = 5.\n", 1),
    "empty exponent": ("a = 1e\n", 1),
    "bare word": ("mode = sbatch\n", 1),
    "truncated bool": ("a = tru\n", 1),
    "missing value": ("a =\n", 1),
    "missing value at end": ("a = ", 1),
    "missing key": ("= 1\n", 1),
    "two values on a line": ("a = 1 b = 2\n", 1),
    "array missing comma": ("a = [1 2]\n", 1),
    "array double comma": ("a = [1,,2]\n", 1),
    "unterminated array": ("x = 1\na = [1,\n2\n", 2),
    "inline trailing comma": ("a = {x = 1,}\n", 1),
    "inline newline": ("a = {x = 1\n}\n", 1),
    "inline duplicate": ("a = {x = 1, x = 2}\n", 1),
    "unclosed header": ("[a\nb = 1\n", 1),
    "text after header": ("[a] x\n", 1),
    "empty header": ("[]\n", 1),
    "lone carriage return": ("a = 1\rb = 2\n", 1),
}


@unittest.skipIf(tomllib is None, "tomllib needs Python 3.11")
class TestTomlParity(unittest.TestCase):
    """The built-in reader gives exactly what tomllib gives, and rejects what it rejects."""

    def test_valid_documents_match_tomllib(self):
        for name, document in _TOML_VALID.items():
            with self.subTest(name):
                ours = reflow._TomlReader(document, "t.toml").parse()
                self.assertEqual(repr(ours), repr(tomllib.loads(document)))

    def test_invalid_documents_rejected_by_both(self):
        for name, (document, _line) in _TOML_INVALID.items():
            with self.subTest(name):
                with self.assertRaises(tomllib.TOMLDecodeError):
                    tomllib.loads(document)
                with self.assertRaises(reflow.ConfigError):
                    reflow._TomlReader(document, "t.toml").parse()

    def test_tomllib_errors_become_one_line_config_errors(self):
        for name, (document, _line) in _TOML_INVALID.items():
            with self.subTest(name):
                with self.assertRaises(reflow.ConfigError) as caught:
                    reflow._parse_toml(document, "/x/config.toml")
                message = str(caught.exception)
                self.assertRegex(message, r"^config /x/config\.toml line \d+: \S")
                self.assertNotIn("\n", message)


class TestTomlReader(unittest.TestCase):
    """The built-in TOML reader on its own (it runs on 3.9/3.10)."""

    def parse(self, document):
        return reflow._TomlReader(document, "/x/config.toml").parse()

    def test_values(self):
        data = self.parse(_TOML_VALID["integers"] + _TOML_VALID["floats"])
        self.assertEqual(data["ints"], [1, -2, 0, 0, 0, 1000, 99, 5349221, 255, 0xDEADBEEF, 15, 63, 5, 2])
        self.assertEqual(data["big"], 2**63)
        self.assertEqual(data["floats"][:4], [1.5, -0.5, 3.25, 1000.0])
        self.assertEqual(math.copysign(1, data["floats"][8]), -1.0)
        self.assertEqual(data["specials"][:3], [math.inf, math.inf, -math.inf])
        self.assertTrue(all(math.isnan(x) for x in data["specials"][3:]))
        self.assertTrue(all(type(x) is int for x in data["ints"]))

    def test_strings(self):
        data = self.parse(_TOML_VALID["basic strings"] + _TOML_VALID["multi-line strings"])
        self.assertEqual(data["esc"], 'tab\there\nnl "q" back\\slash \u00e9 \U0001F600 \b\f\r')
        self.assertEqual(data["a"], "first\nsecond")
        self.assertEqual(data["b"], "one two three")
        self.assertEqual(data["c"], 'quote at end"')
        self.assertEqual(data["d"], 'two at end""')
        self.assertEqual(data["e"], "raw \\n\nkept")
        self.assertEqual(data["f"], "x''")
        self.assertEqual(data["g"], 'a "b" ""c"" d')
        self.assertEqual(data["h"], "trimmed")

    def test_tables_and_dotted_keys(self):
        data = self.parse(_TOML_VALID["dotted keys and headers"])
        self.assertEqual(data["dispatch"]["a"], {"b": {"c": 1, "d": 2}, "x y": {"z": 3}})
        self.assertEqual(data["fruit"]["banana"], {"color": "yellow", "texture": {"smooth": True}})
        self.assertEqual(data["deep"], {"x": {"y": {"k": 1}}, "j": 2})

    def test_arrays_and_inline_tables(self):
        data = self.parse(_TOML_VALID["arrays"] + _TOML_VALID["arrays of tables"])
        self.assertEqual(data["multi"], [1, 2, 3])
        self.assertEqual(data["tables"], [{"name": "a"}, {"name": "b", "n": {"m": 1}}])
        self.assertEqual(data["job"][1], {"name": "b", "sub": {"k": 2}, "steps": [{"s": 1}, {"s": 2}]})
        self.assertEqual(self.parse("a = {x.y = 1, z = [1]}")["a"], {"x": {"y": 1}, "z": [1]})

    def test_errors_name_file_and_line(self):
        for name, (document, line) in _TOML_INVALID.items():
            with self.subTest(name):
                with self.assertRaises(reflow.ConfigError) as caught:
                    self.parse(document)
                message = str(caught.exception)
                self.assertTrue(message.startswith(f"config /x/config.toml line {line}: "), message)
                self.assertNotIn("\n", message)

    def test_error_messages(self):
        cases = {
            "[executor]\n\nmode \"x\"\n": "config /x/config.toml line 3: expected '=' after key 'executor.mode'",
            "a = 1\na = 2\n": "line 2: duplicate key 'a'",
            "[t]\n[t]\n": "line 2: table [t] is defined twice",
            "mode = sbatch\n": "invalid value 'sbatch' (strings must be quoted)",
            'a = "\\q"': "invalid escape '\\q'",
            "a = 1979-05-27\n": "dates and times are not supported",
            "a = [1 2]\n": "expected ',' or ']' in array, found '2'",
            "a = 1 b = 2\n": "unexpected text 'b' after the value",
        }
        for document, expected in cases.items():
            with self.subTest(document):
                with self.assertRaises(reflow.ConfigError) as caught:
                    self.parse(document)
                self.assertIn(expected, str(caught.exception))

    def test_parse_toml_uses_reader_without_tomllib(self):
        with mock.patch.object(reflow, "_tomllib", lambda: None):
            self.assertEqual(reflow._parse_toml("[a]\nb = 1\n", "f"), {"a": {"b": 1}})
            with self.assertRaisesRegex(reflow.ConfigError, r"^config f line 2: "):
                reflow._parse_toml("a = 1\nb\n", "f")


# =============================================================================
# Config: settings, validation, files
# =============================================================================

_FULL_CONFIG = {
    "executor": {
        "mode": "qsub-sge", "python": "/opt/py/bin/python3", "max_submit_jobs": 50,
        "lost_job_grace": 30, "sbatch": "/opt/slurm/bin/sbatch", "qstat": "/opt/sge/qstat",
        "submit_options": {"partition": "gpu", "account": "proj", "signal": "B:INT@60",
                           "qos": "high", "exclusive": True, "gres": ["gpu:1"]},
    },
    "dispatch": {"cpus": 2, "time": "00:20:00", "mem": "2G", "partition": "short",
                 "submit_options": {"qos": "low"}},
    "notifications": {"mail_user": "me@example.org", "mail_type": "END,FAIL"},
    "defaults": {"store_path": "/data/reflow.db", "run_dir": "/scratch/runs"},
    "server": {"url": "http://localhost:8000"},
    "store": {"journal_mode": "WAL"},
    "local": {"max_cpus": 4},
}


class TestConfigSettings(unittest.TestCase):
    """Config properties: defaults, file values, environment overrides."""

    def test_defaults(self):
        with _clean_env():
            config = reflow.Config()
            expected = {
                "executor_mode": "sbatch", "executor_python": None, "executor_partition": None,
                "executor_account": None, "max_submit_jobs": None, "executor_sbatch": "sbatch",
                "executor_scancel": "scancel", "executor_sacct": "sacct", "mail_user": None,
                "mail_type": None, "signal": None, "executor_submit_options": {}, "submit_options": {},
                "dispatch_cpus": 1, "dispatch_time": "00:10:00", "dispatch_mem": "1G",
                "dispatch_partition": None, "dispatch_account": None, "dispatch_submit_options": {},
                "default_run_dir": None, "default_store_path": None, "server_url": None,
                "lost_job_grace": reflow.DEFAULT_LOST_JOB_GRACE, "sqlite_journal": None,
            }
            for name, value in expected.items():
                with self.subTest(name):
                    self.assertEqual(getattr(config, name), value)
            self.assertEqual(config.data, {})

    def test_file_values(self):
        with _clean_env():
            config = reflow.Config(_FULL_CONFIG).validate()
            self.assertEqual(config.executor_mode, "qsub-sge")
            self.assertEqual(config.executor_python, "/opt/py/bin/python3")
            self.assertEqual(config.executor_partition, "gpu")
            self.assertEqual(config.executor_account, "proj")
            self.assertEqual(config.max_submit_jobs, 50)
            self.assertEqual(config.executor_sbatch, "/opt/slurm/bin/sbatch")
            self.assertEqual(config.executor_binary("qstat"), "/opt/sge/qstat")
            self.assertEqual(config.executor_binary("bjobs"), "bjobs")
            self.assertEqual(config.signal, "B:INT@60")
            self.assertEqual(config.mail_user, "me@example.org")
            self.assertEqual(config.mail_type, "END,FAIL")
            self.assertEqual(config.dispatch_cpus, 2)
            self.assertEqual(config.dispatch_time, "00:20:00")
            self.assertEqual(config.dispatch_mem, "2G")
            self.assertEqual(config.dispatch_partition, "short")
            self.assertEqual(config.dispatch_account, "proj")  # falls back to the executor's
            self.assertEqual(config.dispatch_submit_options, {"qos": "low", "partition": "short", "account": "proj"})
            self.assertEqual(config.default_store_path, "/data/reflow.db")
            self.assertEqual(config.default_run_dir, "/scratch/runs")
            self.assertEqual(config.server_url, "http://localhost:8000")
            self.assertEqual(config.lost_job_grace, 30.0)
            self.assertEqual(config.sqlite_journal, "WAL")
            self.assertEqual(config.get("local.max_cpus"), 4)
            self.assertEqual(config.get("executor.nope", "d"), "d")
            self.assertEqual(config.get("executor.mode.deeper"), None)

    def test_submit_options_merge_and_pass_unknown_keys(self):
        with _clean_env():
            options = reflow.Config(_FULL_CONFIG).executor_submit_options
            self.assertEqual(options, {"partition": "gpu", "account": "proj", "signal": "B:INT@60",
                                       "qos": "high", "exclusive": True, "gres": ["gpu:1"],
                                       "mail_user": "me@example.org", "mail_type": "END,FAIL"})
            self.assertEqual(reflow.Config(_FULL_CONFIG).submit_options, options)

    def test_queue_is_a_synonym_of_partition(self):
        with _clean_env():
            for data in ({"executor": {"queue": "q1"}}, {"executor": {"submit_options": {"queue": "q1"}}}):
                with self.subTest(data):
                    config = reflow.Config(data)
                    self.assertEqual(config.executor_partition, "q1")
                    self.assertEqual(config.submit_options, {"partition": "q1"})
        with _clean_env(REFLOW_QUEUE="q2"):
            config = reflow.Config({"executor": {"submit_options": {"queue": "q1"}}})
            self.assertEqual(config.submit_options, {"partition": "q2"})

    def test_environment_beats_file(self):
        env = {
            "REFLOW_MODE": "flux", "REFLOW_PYTHON": "/env/python", "REFLOW_MAX_SUBMIT_JOBS": "7",
            "REFLOW_SBATCH": "/env/sbatch", "REFLOW_SCANCEL": "/env/scancel", "REFLOW_SACCT": "/env/sacct",
            "REFLOW_QSTAT": "/env/qstat", "REFLOW_PARTITION": "envpart", "REFLOW_ACCOUNT": "envacct",
            "REFLOW_SIGNAL": "USR1@30", "REFLOW_MAIL_USER": "env@x", "REFLOW_MAIL_TYPE": "ALL",
            "REFLOW_DISPATCH_CPUS": "3", "REFLOW_DISPATCH_TIME": "01:00:00", "REFLOW_DISPATCH_MEM": "3G",
            "REFLOW_DISPATCH_PARTITION": "envdp", "REFLOW_DISPATCH_ACCOUNT": "envda",
            "REFLOW_STORE_PATH": "/env/db", "REFLOW_SERVER_URL": "http://env", "REFLOW_LOST_JOB_GRACE": "5",
            "REFLOW_SQLITE_JOURNAL": "DELETE",
        }
        with _clean_env(**env):
            config = reflow.Config(_FULL_CONFIG)
            self.assertEqual(config.executor_mode, "flux")
            self.assertEqual(config.executor_python, "/env/python")
            self.assertEqual(config.max_submit_jobs, 7)
            self.assertEqual(config.executor_sbatch, "/env/sbatch")
            self.assertEqual(config.executor_scancel, "/env/scancel")
            self.assertEqual(config.executor_sacct, "/env/sacct")
            self.assertEqual(config.executor_binary("qstat"), "/env/qstat")
            self.assertEqual(config.executor_partition, "envpart")
            self.assertEqual(config.executor_account, "envacct")
            self.assertEqual(config.signal, "USR1@30")
            self.assertEqual(config.mail_user, "env@x")
            self.assertEqual(config.mail_type, "ALL")
            self.assertEqual(config.dispatch_cpus, 3)
            self.assertEqual(config.dispatch_time, "01:00:00")
            self.assertEqual(config.dispatch_mem, "3G")
            self.assertEqual(config.dispatch_partition, "envdp")
            self.assertEqual(config.dispatch_account, "envda")
            self.assertEqual(config.default_store_path, "/env/db")
            self.assertEqual(config.server_url, "http://env")
            self.assertEqual(config.lost_job_grace, 5.0)
            self.assertEqual(config.sqlite_journal, "DELETE")
            self.assertEqual(config.submit_options["partition"], "envpart")
            self.assertEqual(config.submit_options["qos"], "high")
            self.assertEqual(config.dispatch_submit_options["partition"], "envdp")

    def test_empty_environment_value_is_unset(self):
        with _clean_env(REFLOW_MODE="", REFLOW_PARTITION=""):
            config = reflow.Config({"executor": {"mode": "bsub", "partition": "p"}})
            self.assertEqual((config.executor_mode, config.executor_partition), ("bsub", "p"))

    def test_max_submit_jobs_invalid_means_no_cap(self):
        for raw in ("0", "-3", "ten", "1.5"):
            with self.subTest(raw), _clean_env(REFLOW_MAX_SUBMIT_JOBS=raw):
                self.assertIsNone(reflow.Config({"executor": {"max_submit_jobs": 9}}).max_submit_jobs)
        with _clean_env():
            self.assertIsNone(reflow.Config({"executor": {"max_submit_jobs": 0}}).max_submit_jobs)
            self.assertEqual(reflow.Config({"executor": {"max_submit_jobs": 9}}).max_submit_jobs, 9)

    def test_bad_environment_numbers_raise(self):
        with _clean_env(REFLOW_DISPATCH_CPUS="two"), self.assertRaisesRegex(reflow.ConfigError, "REFLOW_DISPATCH_CPUS"):
            _ = reflow.Config().dispatch_cpus
        with _clean_env(REFLOW_LOST_JOB_GRACE="-1"), self.assertRaisesRegex(reflow.ConfigError, "LOST_JOB_GRACE"):
            _ = reflow.Config().lost_job_grace

    def test_executor_binary_names(self):
        with _clean_env(REFLOW_FLUX="/env/flux"):
            config = reflow.Config({"executor": {"qacct": "/x/qacct"}})
            for name in ("sbatch", "scancel", "sacct", "squeue", "qsub", "qdel", "qstat",
                         "bsub", "bkill", "bjobs"):
                self.assertEqual(config.executor_binary(name), name)
            self.assertEqual(config.executor_binary("flux"), "/env/flux")
            self.assertEqual(config.executor_binary("qacct"), "/x/qacct")
            with self.assertRaisesRegex(reflow.ConfigError, "unknown scheduler binary 'sbach'. Did you mean 'sbatch'"):
                config.executor_binary("sbach")


class TestConfigValidation(unittest.TestCase):
    """Config.validate: unknown keys with suggestions, wrong types."""

    def check(self, data, expected):
        config = reflow.Config(data, path="/x/config.toml")
        with self.assertRaises(reflow.ConfigError) as caught:
            config.validate()
        self.assertEqual(str(caught.exception), expected)

    def test_full_config_is_valid(self):
        self.assertIsInstance(reflow.Config(_FULL_CONFIG).validate(), reflow.Config)

    def test_unknown_keys_suggest_the_closest(self):
        cases = [
            ({"executor": {"mdoe": "x"}},
             "config /x/config.toml: unknown key 'executor.mdoe'. Did you mean 'executor.mode'?"),
            ({"exectuor": {}}, "config /x/config.toml: unknown table 'exectuor'. Did you mean 'executor'?"),
            ({"mode": "sbatch"}, "config /x/config.toml: unknown key 'mode'. Did you mean 'executor.mode'?"),
            ({"dispatch": {"python": "x"}},
             "config /x/config.toml: unknown key 'dispatch.python'. Did you mean 'executor.python'?"),
            ({"dispatch": {"cpu": 1}},
             "config /x/config.toml: unknown key 'dispatch.cpu'. Did you mean 'dispatch.cpus'?"),
            ({"notifications": {"zzz": 1}}, "config /x/config.toml: unknown key 'notifications.zzz'."),
        ]
        for data, expected in cases:
            with self.subTest(data):
                self.check(data, expected)

    def test_wrong_types(self):
        cases = [
            ({"executor": {"mode": 3}}, "'executor.mode' must be a string, got 3"),
            ({"executor": {"max_submit_jobs": "10"}}, "'executor.max_submit_jobs' must be an integer, got '10'"),
            ({"executor": {"max_submit_jobs": True}}, "'executor.max_submit_jobs' must be an integer"),
            ({"executor": {"lost_job_grace": -1}}, "'executor.lost_job_grace' must be a number of seconds"),
            ({"executor": {"submit_options": "x"}}, "'executor.submit_options' must be a table"),
            ({"dispatch": {"cpus": 0}}, "'dispatch.cpus' must be at least 1, got 0"),
            ({"dispatch": {"time": "1h30"}}, "'dispatch.time' is invalid: invalid walltime '1h30'"),
            ({"dispatch": {"mem": "lots"}}, "'dispatch.mem' is invalid: invalid memory 'lots'"),
            ({"dispatch": {"mem": 1.5}}, "'dispatch.mem' must be a string"),
            ({"store": {"journal_mode": "fast"}}, "'store.journal_mode' must be one of DELETE"),
            ({"local": {"max_cpus": "4"}}, "'local.max_cpus' must be an integer"),
            ({"executor": 3}, "'executor' must be a table"),
        ]
        for data, expected in cases:
            with self.subTest(data):
                with self.assertRaises(reflow.ConfigError) as caught:
                    reflow.Config(data, path="/x/config.toml").validate()
                self.assertIn(expected, str(caught.exception))
                self.assertTrue(str(caught.exception).startswith("config /x/config.toml: "))

    def test_valid_odd_values(self):
        reflow.Config({"dispatch": {"time": 600, "mem": 2048}, "store": {"journal_mode": "wal"},
                       "executor": {"lost_job_grace": 0.5, "max_submit_jobs": 0}}).validate()


class TestConfigFiles(unittest.TestCase):
    """load_config, write_example_config, ensure_config_exists and config_path."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.home = pathlib.Path(self.tmp.name) / "home"
        self.home.mkdir()
        self.env = _clean_env(HOME=str(self.home))
        self.env.__enter__()

    def tearDown(self):
        self.env.__exit__(None, None, None)
        self.tmp.cleanup()

    def test_config_path(self):
        self.assertEqual(reflow.config_path(), self.home / ".config" / "reflow" / "config.toml")
        os.environ["XDG_CONFIG_HOME"] = "/xdg"
        self.assertEqual(reflow.config_path(), pathlib.Path("/xdg/reflow/config.toml"))
        os.environ["XDG_CONFIG_HOME"] = "relative/ignored"
        self.assertEqual(reflow.config_path(), self.home / ".config" / "reflow" / "config.toml")

    def test_load_config_without_file_writes_nothing(self):
        config = reflow.load_config()
        self.assertEqual(config.data, {})
        self.assertEqual(config.executor_mode, "sbatch")
        self.assertEqual(list(self.home.iterdir()), [])
        reflow.load_config(self.home / "missing" / "config.toml")
        self.assertEqual(list(self.home.iterdir()), [])

    def test_load_config_reads_and_validates(self):
        path = self.home / "c.toml"
        path.write_text('[executor]\nmode = "bsub"\n[executor.submit_options]\nqos = "x"\n')
        config = reflow.load_config(path)
        self.assertEqual((config.executor_mode, config.submit_options), ("bsub", {"qos": "x"}))
        self.assertEqual(config.path, path)
        path.write_text('[executor]\nmdoe = "bsub"\n')
        with self.assertRaisesRegex(reflow.ConfigError, "unknown key 'executor.mdoe'. Did you mean 'executor.mode'"):
            reflow.load_config(str(path))

    def test_load_config_default_locations(self):
        xdg = self.home / "xdg"
        (xdg / "reflow").mkdir(parents=True)
        (xdg / "reflow" / "config.toml").write_text('[executor]\nmode = "flux"\n')
        os.environ["XDG_CONFIG_HOME"] = str(xdg)
        self.assertEqual(reflow.load_config().executor_mode, "flux")
        other = self.home / "other.toml"
        other.write_text('[executor]\nmode = "local"\n')
        os.environ["REFLOW_CONFIG"] = str(other)
        self.assertEqual(reflow.load_config().executor_mode, "local")

    def test_load_config_errors_name_the_file(self):
        path = self.home / "bad.toml"
        path.write_text('[executor]\nmode = "sbatch"\nmode = "bsub"\n')
        with self.assertRaisesRegex(reflow.ConfigError, rf"^config {re.escape(str(path))} line 3: "):
            reflow.load_config(path)
        path.write_bytes(b'a = "\xff"\n')
        with self.assertRaisesRegex(reflow.ConfigError, "not UTF-8"):
            reflow.load_config(path)
        with self.assertRaisesRegex(reflow.ConfigError, "cannot read"):
            reflow.load_config(self.home)

    def test_load_config_accepts_bom(self):
        path = self.home / "bom.toml"
        path.write_bytes(b'\xef\xbb\xbf[executor]\nmode = "bsub"\n')
        self.assertEqual(reflow.load_config(path).executor_mode, "bsub")

    def test_write_example_config_permissions(self):
        path = reflow.write_example_config()
        self.assertEqual(path, self.home / ".config" / "reflow" / "config.toml")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        with self.assertRaises(FileExistsError):
            reflow.write_example_config()
        path.write_text("# mine\n")
        self.assertEqual(reflow.write_example_config(overwrite=True), path)
        self.assertIn("[executor]", path.read_text())

    def test_ensure_config_exists(self):
        path = self.home / "sub" / "config.toml"
        self.assertEqual(reflow.ensure_config_exists(path), path)
        self.assertTrue(path.is_file())
        path.write_text("# mine\n")
        reflow.ensure_config_exists(path)
        self.assertEqual(path.read_text(), "# mine\n")

    def test_example_config_parses_and_validates(self):
        path = reflow.write_example_config(self.home / "example.toml")
        config = reflow.load_config(path)
        self.assertEqual(config.executor_mode, "sbatch")
        self.assertTrue(all(value == {} for value in config.data.values()))

    def test_example_config_uncommented_is_valid_and_complete(self):
        text = reflow._EXAMPLE_CONFIG
        live = re.sub(r"(?m)^# (\[[\w.]+\]|\w+ = .*)$", r"\1", text)
        data = reflow._parse_toml(live, "example")
        reflow.Config(data).validate()
        for table, keys in reflow._CONFIG_SCHEMA.items():
            for key in keys:
                with self.subTest(f"{table}.{key}"):
                    self.assertIn(key, data[table])
        with _clean_env():
            defaults = reflow.Config()
            config = reflow.Config(data)
            for name in ("executor_mode", "dispatch_cpus", "dispatch_time", "dispatch_mem", "lost_job_grace"):
                self.assertEqual(getattr(config, name), getattr(defaults, name), name)


# =============================================================================
# Codec: typed JSON manifest
# =============================================================================


class _CodecColor(enum.Enum):
    RED = 1
    GREEN = "green"
    PAIR = (1, 2)


class _CodecLevel(enum.IntEnum):
    LOW = 1


class _CodecState(str, enum.Enum):
    DONE = "DONE"


@dataclasses.dataclass
class _CodecPoint:
    x: int
    y: float = 0.0
    tags: tuple = ()


@dataclasses.dataclass(frozen=True)
class _CodecBox:
    corner: _CodecPoint
    path: pathlib.Path
    computed: int = dataclasses.field(init=False, default=0)


class _CodecOuter:
    @dataclasses.dataclass
    class Inner:
        value: int


_CodecPair = collections.namedtuple("_CodecPair", "a b")


class TestManifestCodec(unittest.TestCase):
    """ManifestCodec: round trips, tags, errors, determinism, speed-critical paths."""

    codec = reflow.DEFAULT_CODEC

    def roundtrip(self, value):
        text = self.codec.dumps(value)
        json.loads(text, parse_constant=self.fail)  # strict JSON: no NaN/Infinity
        via_text = self.codec.loads(text)
        via_data = self.codec.load_value(json.loads(json.dumps(self.codec.dump_value(value))))
        self.assertEqual(self.codec.canonical_dumps(via_text), self.codec.canonical_dumps(via_data))
        return via_text

    def test_plain_json_passes_through(self):
        values = [None, True, False, 0, -5, 2**70, 1.5, "", "héllo", [], {}, [1, [2, [3]]],
                  {"a": {"b": [None, {"c": 1.25}]}}]
        for value in values:
            with self.subTest(value=value):
                self.assertEqual(self.codec.dump_value(value), value)
                self.assertEqual(self.roundtrip(value), value)
                self.assertEqual(self.codec.dumps(value), json.dumps(value, sort_keys=True, separators=(",", ":")))

    def test_tagged_types_round_trip(self):
        aware = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
        values = [
            ("path", pathlib.Path("/data/x.csv")),
            ("relative path", pathlib.Path("rel/x")),
            ("datetime", datetime.datetime(2024, 5, 6, 7, 8, 9)),
            ("aware datetime", aware),
            ("date", datetime.date(2024, 2, 29)),
            ("time", datetime.time(23, 59, 58, 5)),
            ("timedelta", datetime.timedelta(days=-1, seconds=5, microseconds=250000)),
            ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
            ("tuple", (1, "a", (2.5, None))),
            ("empty tuple", ()),
            ("set", {3, 1, 2}),
            ("frozenset", frozenset({"b", "a"})),
            ("set of tuples", {(1, 2), (0, 5)}),
            ("bytes", b"\x00\xffbinary"),
            ("bytearray", bytearray(b"abc")),
            ("decimal", decimal.Decimal("3.14159265358979323846")),
            ("enum", _CodecColor.RED),
            ("enum with str value", _CodecColor.GREEN),
            ("enum with tuple value", _CodecColor.PAIR),
            ("int enum", _CodecLevel.LOW),
            ("str enum", _CodecState.DONE),
            ("dataclass", _CodecPoint(1, 2.5, (1, 2))),
            ("nested frozen dataclass", _CodecBox(_CodecPoint(0), pathlib.Path("/p"))),
            ("nested class", _CodecOuter.Inner(3)),
        ]
        for name, value in values:
            with self.subTest(name):
                back = self.roundtrip(value)
                self.assertEqual(back, value)
                self.assertIs(type(back), type(value))

    def test_tag_shapes(self):
        marker = "__reflow_manifest__"
        self.assertEqual(self.codec.dump_value(pathlib.Path("/x")), {marker: True, "type": "path", "value": "/x"})
        self.assertEqual(self.codec.dump_value((1, 2)), {marker: True, "type": "tuple", "value": [1, 2]})
        self.assertEqual(self.codec.dump_value(_CodecColor.RED),
                         {marker: True, "type": "enum", "class": f"{__name__}._CodecColor", "value": 1})
        self.assertEqual(self.codec.dump_value(_CodecPoint(1)),
                         {marker: True, "type": "dataclass", "class": f"{__name__}._CodecPoint",
                          "fields": {"x": 1, "y": 0.0, "tags": {marker: True, "type": "tuple", "value": []}}})
        self.assertEqual(self.codec.dump_value(datetime.timedelta(minutes=1, milliseconds=500))["value"], 60.5)

    def test_nested_containers(self):
        value = {"runs": [{"out": pathlib.Path("/a"), "pair": (1, {2, 3}), "when": datetime.date(2020, 1, 1)}],
                 "meta": {"deep": [[(), [frozenset()]]], "n": float("inf")}}
        self.assertEqual(self.roundtrip(value), value)

    def test_subclasses_of_plain_types(self):
        self.assertEqual(self.roundtrip(collections.OrderedDict(a=1)), {"a": 1})
        self.assertEqual(self.roundtrip(_CodecPair(1, 2)), (1, 2))
        self.assertEqual(self.roundtrip(pathlib.PurePosixPath("/pure")), pathlib.Path("/pure"))
        self.assertEqual(self.roundtrip({_CodecState.DONE: 1}), {"DONE": 1})
        self.assertIs(type(next(iter(self.roundtrip({_CodecState.DONE: 1})))), str)

    def test_nan_and_infinity_are_tagged(self):
        text = self.codec.dumps([float("nan"), float("inf"), float("-inf"), 1.0])
        self.assertNotIn("NaN", text)
        self.assertNotIn("Infinity", text)
        back = self.codec.loads(text)
        self.assertTrue(math.isnan(back[0]))
        self.assertEqual(back[1:], [math.inf, -math.inf, 1.0])
        self.assertNotIn("NaN", self.codec.canonical_dumps({"x": float("nan")}))

    def test_non_str_keys_raise(self):
        for key in (1, 1.5, None, (1, 2), True):
            with self.subTest(key=key):
                with self.assertRaises(reflow.ManifestError) as caught:
                    self.codec.dumps({"ok": {key: 1}})
                self.assertIsInstance(caught.exception, TypeError)
                self.assertIn(repr(type(key).__name__), str(caught.exception))

    def test_unknown_type_raises(self):
        class Foo:
            pass
        with self.assertRaises(reflow.ManifestError) as caught:
            self.codec.dumps([Foo()])
        self.assertIsInstance(caught.exception, TypeError)
        self.assertIn("cannot encode value of type 'Foo' to JSON (supported: ", str(caught.exception))
        with self.assertRaises(TypeError):
            self.codec.dump_value(object())

    def test_unknown_tag_raises(self):
        bad = '{"__reflow_manifest__": true, "type": "pickle", "value": "x"}'
        with self.assertRaisesRegex(reflow.ManifestError, "unknown manifest tag type 'pickle'"):
            self.codec.loads(bad)
        with self.assertRaises(TypeError):
            self.codec.load_value(json.loads(bad))
        with self.assertRaisesRegex(reflow.ManifestError, "cannot decode 'datetime'"):
            self.codec.loads('{"__reflow_manifest__": true, "type": "datetime", "value": "yesterday"}')

    def test_marker_key_in_user_dicts_round_trips(self):
        values = [
            {"__reflow_manifest__": True, "type": "path", "value": "/x"},
            {"__reflow_manifest__": 5},
            {"outer": [{"__reflow_manifest__": {"__reflow_manifest__": True, "type": "tuple"}}]},
        ]
        for value in values:
            with self.subTest(value=value):
                back = self.roundtrip(value)
                self.assertEqual(back, value)
                self.assertIs(type(back), dict)
        self.assertEqual(self.codec.dumps({"b": 1, "__reflow_manifest__": 2, "a": 3}),
                         self.codec.dumps({"a": 3, "__reflow_manifest__": 2, "b": 1}))

    def test_foreign_marker_values_are_plain_dicts(self):
        self.assertEqual(self.codec.loads('{"__reflow_manifest__": 1, "x": 2}'), {"__reflow_manifest__": 1, "x": 2})

    def test_class_fallbacks(self):
        def tag(kind, cls, **extra):
            return dict({"__reflow_manifest__": True, "type": kind, "class": cls}, **extra)
        self.assertEqual(self.codec.load_value(tag("enum", "no_such_module_xyz.Color", value=3)), 3)
        self.assertEqual(self.codec.load_value(tag("enum", f"{__name__}._CodecColor", value=99)), 99)
        self.assertEqual(self.codec.load_value(tag("enum", f"{__name__}._CodecPoint", value=1)), 1)
        self.assertEqual(self.codec.load_value(tag("dataclass", "no_such_module_xyz.P", fields={"x": 1})), {"x": 1})
        self.assertEqual(self.codec.load_value(tag("dataclass", f"{__name__}._CodecPoint", fields={"q": 1})),
                         {"q": 1})
        self.assertEqual(self.codec.load_value(tag("dataclass", "os.path.join", fields={"x": 1})), {"x": 1})

        @dataclasses.dataclass
        class Local:
            x: int
        self.assertEqual(self.roundtrip(Local(1)), {"x": 1})

    def test_non_init_dataclass_field_is_restored(self):
        box = _CodecBox(_CodecPoint(1), pathlib.Path("/b"))
        object.__setattr__(box, "computed", 42)
        self.assertEqual(self.roundtrip(box).computed, 42)

    def test_canonical_dumps_is_deterministic(self):
        first = {"b": 1, "a": {"z": {3, 1, 2}, "y": frozenset({"q", "p"})}}
        second = {"a": {"y": frozenset({"p", "q"}), "z": {2, 3, 1}}, "b": 1}
        self.assertEqual(self.codec.canonical_dumps(first), self.codec.canonical_dumps(second))
        self.assertEqual(self.codec.canonical_dumps({"é": "ü"}), '{"é":"ü"}')
        self.assertEqual(self.codec.dumps(first), self.codec.dumps(second))

    def test_canonical_dumps_of_sets_ignores_hash_seed(self):
        script = ("import reflow; print(reflow.DEFAULT_CODEC.canonical_dumps("
                  "{'s': set('abcdefghij'), 't': {(1, 'x'), (0, 'y')}}))")
        outputs = set()
        for seed in ("1", "2", "3"):
            env = dict(os.environ, PYTHONHASHSEED=seed)
            result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    env=env, cwd=os.path.dirname(os.path.abspath(reflow.__file__)), check=True)
            outputs.add(result.stdout)
        self.assertEqual(len(outputs), 1)

    def test_pretty_and_bytes_input(self):
        value = {"b": [1], "a": pathlib.Path("/x")}
        pretty = self.codec.dumps(value, pretty=True)
        self.assertIn('\n  "a": {\n', pretty)
        self.assertEqual(self.codec.loads(pretty), value)
        self.assertEqual(self.codec.loads(self.codec.dumps(value).encode("utf-8")), value)
        self.assertEqual(self.codec.dumps({"b": 1, "a": 2}), '{"a":2,"b":1}')

    def test_custom_marker_key(self):
        for marker in ("$t", "__rëflow__"):
            with self.subTest(marker):
                codec = reflow.ManifestCodec(marker_key=marker)
                value = {"p": pathlib.Path("/x"), marker: 1, "__reflow_manifest__": 2}
                self.assertEqual(codec.loads(codec.dumps(value)), value)
                self.assertIn(marker, codec.dump_value(pathlib.Path("/x")))

    def test_codec_is_a_frozen_dataclass(self):
        self.assertEqual(reflow.DEFAULT_CODEC, reflow.ManifestCodec("__reflow_manifest__", 1))
        self.assertEqual(reflow.DEFAULT_CODEC.schema_version, 1)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            reflow.DEFAULT_CODEC.marker_key = "x"

    def test_large_array_round_trip(self):
        value = [{"i": i, "name": f"s{i}", "score": i / 3, "path": pathlib.Path(f"/d/{i}")} for i in range(20000)]
        self.assertEqual(self.codec.loads(self.codec.dumps(value)), value)
        plain = [{"i": i, "name": f"s{i}", "ok": True} for i in range(20000)]
        self.assertEqual(self.codec.loads(self.codec.dumps(plain)), plain)


# =============================================================================
# Store
# =============================================================================

#: The reference layout (schema version 1) as an older reflow wrote it.
_REFERENCE_V1_DDL = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, graph_name TEXT, user_id TEXT, created_at TEXT, status TEXT,
                   parameters TEXT);
CREATE TABLE task_specs (run_id TEXT, task_name TEXT, is_array INTEGER, config TEXT,
                         PRIMARY KEY (run_id, task_name));
CREATE TABLE task_dependencies (run_id TEXT, task_name TEXT, depends_on TEXT,
                                PRIMARY KEY (run_id, task_name, depends_on));
CREATE TABLE task_instances (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, task_name TEXT,
    array_index INTEGER, state TEXT, job_id TEXT, input TEXT DEFAULT '{}', output TEXT, error_text TEXT,
    identity TEXT DEFAULT '', input_hash TEXT DEFAULT '', output_hash TEXT DEFAULT '', created_at TEXT,
    updated_at TEXT);
CREATE INDEX idx_ti_run_task ON task_instances (run_id, task_name);
CREATE INDEX idx_ti_cache ON task_instances (task_name, identity, state);
INSERT INTO runs VALUES ('old-1', 'wf', 'ann', '2024-01-02T03:04:05.000000+00:00', 'SUCCESS', '{"n": 3}');
INSERT INTO task_specs VALUES ('old-1', 'prep', 0, '{"cpus": 1}');
INSERT INTO task_specs VALUES ('old-1', 'sq', 1, '{"cpus": 2}');
INSERT INTO task_dependencies VALUES ('old-1', 'sq', 'prep');
INSERT INTO task_instances (run_id, task_name, array_index, state, job_id, input, output, identity,
    input_hash, output_hash, created_at, updated_at)
    VALUES ('old-1', 'prep', NULL, 'SUCCESS', '11', '{}', '[1, 2]', 'idprep', 'ih', 'oh',
            '2024-01-02T03:04:05.000000+00:00', '2024-01-02T03:04:06.000000+00:00');
INSERT INTO task_instances (run_id, task_name, array_index, state, job_id, input, output, identity,
    input_hash, output_hash, created_at, updated_at)
    VALUES ('old-1', 'sq', 0, 'FAILED', '12', '{"x": 1}', NULL, 'idsq0', 'ih0', '',
            '2024-01-02T03:04:05.000000+00:00', '2024-01-02T03:04:07.000000+00:00');
"""


@contextlib.contextmanager
def _store_env(**values):
    """Set (None: unset) environment variables for the block."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _snapshot(directory):
    """Return {name: bytes} of every file in a directory (to prove nothing was touched)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


@contextlib.contextmanager
def _traced_connections():
    """Yield a list that collects the SQL of every store connection opened inside the block."""
    statements: List[str] = []
    connect = reflow.SqliteStore._connect

    def traced(store: reflow.SqliteStore) -> sqlite3.Connection:
        conn = connect(store)
        conn.set_trace_callback(statements.append)
        return conn

    with mock.patch.object(reflow.SqliteStore, "_connect", traced):
        yield statements


class _StoreTest(unittest.TestCase):
    """A private temp dir and a fresh store in it; no $HOME, no user config."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="reflow-store-")
        self.tmp = Path(self._tmp.name)
        self._env = _store_env(REFLOW_SQLITE_JOURNAL=None, REFLOW_STORE_PATH=None, HOME=str(self.tmp / "home"),
                               XDG_CACHE_HOME=str(self.tmp / "cache"), XDG_CONFIG_HOME=str(self.tmp / "config"),
                               REFLOW_CONFIG=None)
        self._env.__enter__()
        self.path = self.tmp / "db" / "manifest.db"
        self.store = reflow.SqliteStore(self.path)
        self.store.init()

    def tearDown(self):
        self.store.close()
        self._env.__exit__(None, None, None)
        self._tmp.cleanup()

    def make_run(self, run_id="r1", tasks=(("a", False, []), ("b", True, ["a"]))):
        self.store.insert_run(run_id, "wf", "ann", {"n": 3, "path": Path("/x")})
        self.store.insert_task_specs(run_id, [
            {"task_name": name, "is_array": is_array, "config": {"cpus": 1}, "position": pos, "dependencies": deps}
            for pos, (name, is_array, deps) in enumerate(tasks)])
        return run_id

    def add_array(self, run_id, task, n, state="PENDING", **extra):
        rows = [dict({"array_index": i, "state": state, "input": {"x": i}, "identity": f"{task}-{i}",
                      "input_hash": f"h{i}"}, **extra) for i in range(n)]
        self.store.insert_task_instances(run_id, task, rows)
        return [row.id for row in self.store.instance_rows(run_id, task_name=task)]


class TestStoreStates(unittest.TestCase):
    def test_task_state_values_and_sets(self):
        self.assertEqual([s.value for s in reflow.TaskState],
                         ["PENDING", "SUBMITTED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED", "RETRYING"])
        self.assertTrue(all(s.value == s.name and isinstance(s, str) for s in reflow.TaskState))
        T = reflow.TaskState
        self.assertEqual(T.terminal(), frozenset({T.SUCCESS, T.FAILED, T.CANCELLED}))
        self.assertEqual(T.active(), frozenset({T.PENDING, T.SUBMITTED, T.RUNNING, T.RETRYING}))
        self.assertEqual(T.cancellable(), frozenset({T.PENDING, T.SUBMITTED, T.RUNNING}))
        self.assertEqual(T.retriable(), frozenset({T.FAILED, T.CANCELLED}))
        self.assertIsInstance(T.terminal(), frozenset)
        self.assertIn("SUCCESS", T.terminal())

    def test_run_state(self):
        self.assertEqual([s.value for s in reflow.RunState], ["RUNNING", "SUCCESS", "FAILED", "CANCELLED"])
        self.assertEqual(reflow.RunState("FAILED"), "FAILED")

    def test_abc_lists_every_method_with_docs(self):
        names = {"init", "close", "insert_run", "get_run", "get_run_parameters", "update_run_status", "list_runs",
                 "insert_task_spec", "list_task_dependencies", "insert_task_instance", "get_task_instance",
                 "list_task_instances", "count_task_instances", "get_singleton_output", "get_array_outputs",
                 "get_output_hash", "get_all_output_hashes", "dependency_is_satisfied", "update_task_submitted",
                 "update_task_running", "update_task_success", "update_task_failed", "fail_pending_tasks",
                 "update_task_cancelled", "mark_for_retry", "find_cached", "task_state_summary",
                 "insert_task_instances", "set_task_width", "get_task_specs", "insert_task_specs", "instance_rows",
                 "mark_submitted", "mark_running", "apply_results", "fail_instances", "cancel_instances",
                 "retry_instances", "set_dispatch_job", "list_events", "transaction", "find_cached_many",
                 "delete_instances"}
        self.assertLessEqual(names, reflow.Store.__abstractmethods__)
        with self.assertRaises(TypeError):
            reflow.Store()
        for name in names:
            self.assertTrue(inspect.getdoc(getattr(reflow.Store, name)), name)
            self.assertTrue(inspect.getdoc(getattr(reflow.SqliteStore, name)), name)
        self.assertFalse(reflow.SqliteStore.__abstractmethods__)
        sig = inspect.signature(reflow.SqliteStore.insert_task_instance)
        self.assertEqual(list(sig.parameters), ["self", "run_id", "task", "index", "state", "input", "identity",
                                                "input_hash"])
        sig = inspect.signature(reflow.SqliteStore.list_runs)
        self.assertEqual([p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY],
                         ["limit", "since", "until", "status"])


class TestStoreFiles(_StoreTest):
    def test_permissions_regardless_of_umask(self):
        for mask in (0, 0o277):
            with self.subTest(umask=oct(mask)), _umask(mask):
                path = self.tmp / f"u{mask}" / "deep" / "er" / "m.db"
                with reflow.SqliteStore(path) as store:
                    store.init()
                    store.insert_run("r", "wf", "u", {})
                self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
                for directory in (path.parent, path.parent.parent, path.parent.parent.parent):
                    self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700, directory)

    def test_init_idempotent_and_schema(self):
        self.store.init()
        self.store.close()
        self.store.init()
        conn = sqlite3.connect(self.path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], reflow.SCHEMA_VERSION)
        self.assertEqual(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0],
                         str(reflow.SCHEMA_VERSION))
        columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")}
                   for t in ("runs", "task_specs", "task_dependencies", "task_instances", "events", "meta")}
        self.assertLessEqual({"attempt", "reason", "exit_code", "started_at", "finished_at", "cached", "identity",
                              "input_hash", "output_hash", "error_text"}, columns["task_instances"])
        self.assertLessEqual({"updated_at", "dispatch_job_id", "parameters"}, columns["runs"])
        self.assertLessEqual({"position", "width", "config", "is_array"}, columns["task_specs"])
        self.assertLessEqual({"at", "event", "state", "job_id", "attempt", "exit_code", "reason"}, columns["events"])
        unique = [r for r in conn.execute("PRAGMA index_list(task_instances)") if r[2]]
        self.assertTrue(any("IFNULL" in conn.execute("SELECT sql FROM sqlite_master WHERE name = ?",
                                                     (r[1],)).fetchone()[0] for r in unique if r[3] == "c"))
        conn.close()

    def test_context_manager_and_for_run_dir(self):
        with reflow.SqliteStore.for_run_dir(self.tmp / "rd") as store:
            self.assertEqual(store.path, self.tmp / "rd" / "manifest.db")
            store.insert_run("r", "wf", "u", {})
        self.assertIsNone(store._conn)
        self.assertEqual(store.get_run("r")["graph_name"], "wf")  # reopens on use
        store.close()

    def test_default_path_order(self):
        home = self.tmp / "home"
        with _store_env(XDG_CACHE_HOME=None, REFLOW_STORE_PATH=None):
            self.assertEqual(reflow.SqliteStore.default_path(reflow.Config()),
                             home / ".cache" / "reflow" / "manifest.db")
        with _store_env(XDG_CACHE_HOME="relative/ignored", REFLOW_STORE_PATH=None):
            self.assertEqual(reflow.SqliteStore.default_path(reflow.Config()),
                             home / ".cache" / "reflow" / "manifest.db")
        with _store_env(XDG_CACHE_HOME=str(self.tmp / "xdg"), REFLOW_STORE_PATH=None):
            self.assertEqual(reflow.SqliteStore.default_path(reflow.Config()),
                             self.tmp / "xdg" / "reflow" / "manifest.db")
            config = reflow.Config({"defaults": {"store_path": "~/from-config.db"}})
            self.assertEqual(reflow.SqliteStore.default_path(config), home / "from-config.db")
            with _store_env(REFLOW_STORE_PATH=str(self.tmp / "env.db")):
                self.assertEqual(reflow.SqliteStore.default_path(reflow.Config()), self.tmp / "env.db")
                self.assertEqual(reflow.SqliteStore.default_path(), self.tmp / "env.db")  # load_config()
                store = reflow.SqliteStore.default(readonly=False)
                self.assertEqual(store.path, self.tmp / "env.db")
                store.close()

    def _assert_refused(self, path, pattern, readonly=False):
        before = _snapshot(path.parent)
        with self.assertRaises(reflow.StoreError) as caught:
            reflow.SqliteStore(path, readonly=readonly).init()
        message = str(caught.exception)
        self.assertRegex(message, pattern)
        self.assertIn(str(path), message)
        self.assertNotIn("\n", message)
        self.assertEqual(_snapshot(path.parent), before)  # same bytes, no journal left behind
        return caught.exception

    def test_refuses_newer_schema(self):
        path = self.tmp / "newer" / "m.db"
        with reflow.SqliteStore(path) as store:
            store.insert_run("r", "wf", "u", {})
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {reflow.SCHEMA_VERSION + 1}")
        conn.close()
        for readonly in (False, True):
            self._assert_refused(path, f"schema version {reflow.SCHEMA_VERSION + 1}, newer than this reflow's "
                                       f"{reflow.SCHEMA_VERSION}", readonly)

    def test_refuses_foreign_sqlite(self):
        path = self.tmp / "foreign.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
        conn.commit()
        conn.close()
        for readonly in (False, True):
            self._assert_refused(path, r"is not a reflow store \(table runs lacks .*tables: photos\)", readonly)

    def test_refuses_corrupt_files(self):
        cases = {"text.db": b"hello, I am not a database\n" * 50,
                 "garbled.db": b"SQLite format 3\x00" + bytes(range(256)) * 20}
        for name, data in cases.items():
            with self.subTest(name=name):
                path = self.tmp / "corrupt" / name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
                error = self._assert_refused(path, r"not a readable sqlite database|cannot open")
                self.assertIsInstance(error.__cause__, sqlite3.DatabaseError)

    def test_refuses_directory_and_unwritable_paths(self):
        (self.tmp / "adir").mkdir()
        with self.assertRaisesRegex(reflow.StoreError, r"adir: is a directory"):
            reflow.SqliteStore(self.tmp / "adir").init()
        (self.tmp / "afile").write_text("x")
        with self.assertRaisesRegex(reflow.StoreError, r"afile/m.db: cannot create"):
            reflow.SqliteStore(self.tmp / "afile" / "m.db").init()
        if os.geteuid() != 0:
            locked = self.tmp / "locked"
            locked.mkdir(mode=0o500)
            with self.assertRaisesRegex(reflow.StoreError, r"locked/m.db: cannot create"):
                reflow.SqliteStore(locked / "m.db").init()

    def test_journal_modes(self):
        self.assertEqual(self.store.journal_mode, "truncate")
        with reflow.SqliteStore(self.tmp / "d" / "m.db", journal_mode="delete") as store:
            store.insert_run("r", "wf", "u", {})
            self.assertEqual(store.journal_mode, "delete")
            self.assertFalse((self.tmp / "d" / "m.db-journal").exists())  # deleted after each commit
        with reflow.SqliteStore(self.tmp / "d" / "m.db") as store:  # no choice: a rollback file truncates
            store.insert_run("r2", "wf", "u", {})
            self.assertEqual((store.journal_mode, (self.tmp / "d" / "m.db-journal").stat().st_size), ("truncate", 0))
        with _store_env(REFLOW_SQLITE_JOURNAL="WAL"), reflow.SqliteStore(self.tmp / "w" / "m.db") as store:
            store.insert_run("r", "wf", "u", {})
            self.assertEqual(store.journal_mode, "wal")
        with reflow.SqliteStore(self.tmp / "w" / "m.db") as store:  # no choice: the file keeps its mode
            self.assertEqual(store.journal_mode, "wal")
        with reflow.SqliteStore(self.tmp / "w" / "m.db", journal_mode="truncate") as store:
            self.assertEqual(store.journal_mode, "truncate")
        config = reflow.Config({"store": {"journal_mode": "WAL"}})
        with reflow.SqliteStore.default(config) as store:
            store.init()
            self.assertEqual(store.journal_mode, "wal")
        for bad in ("memory", "off", "fast"):
            with self.subTest(bad=bad), _store_env(REFLOW_SQLITE_JOURNAL=bad), \
                    self.assertRaisesRegex(reflow.StoreError, f"unsupported journal mode '{bad}'"):
                reflow.SqliteStore(self.tmp / "j.db")

    def test_migrates_reference_layout(self):
        for version in (0, 1):
            with self.subTest(user_version=version):
                path = self.tmp / f"v{version}" / "m.db"
                path.parent.mkdir()
                conn = sqlite3.connect(path)
                conn.executescript(_REFERENCE_V1_DDL)
                conn.execute(f"PRAGMA user_version = {version}")
                conn.close()
                with self.assertRaisesRegex(reflow.StoreError, "has schema version .*read-write once"):
                    reflow.SqliteStore(path, readonly=True).init()
                with reflow.SqliteStore(path) as store:
                    run = store.get_run("old-1")
                    self.assertEqual(run["parameters"], {"n": 3})
                    self.assertEqual(run["updated_at"], run["created_at"])
                    self.assertEqual(run["dispatch_job_id"], "")
                    inst = store.get_task_instance("old-1", "prep", None)
                    self.assertEqual((inst["attempt"], inst["reason"], inst["cached"], inst["output"]),
                                     (0, "", False, [1, 2]))
                    self.assertEqual(store.find_cached("prep", "idprep")["id"], inst["id"])
                    self.assertEqual(store.list_task_dependencies("old-1"), {"prep": [], "sq": ["prep"]})
                    self.assertEqual([s["width"] for s in store.get_task_specs("old-1")], [None, None])
                    failed = store.get_task_instance("old-1", "sq", 0)
                    self.assertEqual(store.retry_instances([failed["id"]]), 1)
                    self.assertEqual([e["event"] for e in store.list_events("old-1")], ["retrying"])
                    with self.assertRaisesRegex(reflow.StoreError, "UNIQUE"):
                        store.insert_task_instance("old-1", "sq", 0, "PENDING", {})
                conn = sqlite3.connect(path)
                self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], reflow.SCHEMA_VERSION)
                conn.close()
                with reflow.SqliteStore(path, readonly=True) as store:
                    self.assertEqual(store.get_run("old-1")["status"], "SUCCESS")

    def test_new_file_gets_its_schema_with_the_first_write(self):
        path = self.tmp / "new" / "m.db"
        store = reflow.SqliteStore(path)
        store.open()
        self.assertEqual((path.stat().st_size, stat.S_IMODE(path.stat().st_mode)), (0, 0o600))
        with self.assertRaisesRegex(reflow.StoreError, "is empty"):
            reflow.SqliteStore(path, readonly=True).init()
        statements: List[str] = []
        store._db.set_trace_callback(statements.append)
        store.insert_run("r", "wf", "u", {})
        store.close()
        first_commit = statements.index("COMMIT")
        self.assertEqual(statements.count("COMMIT"), 1)  # the schema and the run: one transaction
        self.assertTrue(any(s.startswith("CREATE TABLE runs") for s in statements[:first_commit]))
        with reflow.SqliteStore(path, readonly=True) as store:
            self.assertEqual(store.get_run("r")["graph_name"], "wf")

    def test_schema_of_a_new_file_after_a_rollback_or_for_a_read(self):
        path = self.tmp / "new" / "m.db"
        store = reflow.SqliteStore(path)
        with self.assertRaisesRegex(RuntimeError, "changed my mind"), store.transaction():
            store.insert_run("r", "wf", "u", {})
            raise RuntimeError("changed my mind")
        self.assertEqual(path.stat().st_size, 0)
        with store.transaction():  # the next write creates the schema again
            store.insert_run("r", "wf", "u", {})
        store.close()
        other = reflow.SqliteStore(self.tmp / "other" / "m.db")
        self.assertEqual(other.list_runs(), [])  # a read first: the schema is committed on its own
        self.assertEqual(other.journal_mode, "truncate")
        other.close()
        for done in (path, other.path):
            conn = sqlite3.connect(str(done))
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], reflow.SCHEMA_VERSION)
            conn.close()

    def test_opening_a_current_store_reads_no_column_lists(self):
        self.store.close()
        with _traced_connections() as statements, reflow.SqliteStore(self.path) as store:
            store.init()
        self.assertIn("PRAGMA user_version", statements)
        self.assertEqual([s for s in statements if "table_info" in s], [])

    def test_migration_drops_the_indexes_older_versions_had(self):
        self.store.insert_run("r1", "wf", "u", {})
        self.store.insert_run("r2", "wf", "u", {})
        row = {"array_index": 0, "state": "SUCCESS", "input": {}, "identity": "id0", "input_hash": "h",
               "output": 5, "output_hash": "o5"}
        self.store.insert_task_instances("r1", "b", [row])
        self.store.insert_task_instances("r2", "b", [dict(row, cached=True)])
        self.store.close()
        conn = sqlite3.connect(str(self.path))
        conn.executescript("DROP INDEX idx_instances_source; "  # what version 2 had: every row in the index
                           "CREATE INDEX idx_instances_cache ON task_instances (task_name, identity, state); "
                           "CREATE INDEX idx_instances_run_task ON task_instances (run_id, task_name); "  # up to v3
                           "UPDATE meta SET value = '2' WHERE key = 'schema_version'; PRAGMA user_version = 2;")
        conn.close()
        with reflow.SqliteStore(self.path) as store:
            self.assertEqual(store.find_cached("b", "id0")["run_id"], "r1")
            self.assertEqual(store.get_singleton_output("r2", "b"), None)
            self.assertEqual(store.get_array_outputs("r2", "b"), [5])
        conn = sqlite3.connect(str(self.path))
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        versions = (conn.execute("PRAGMA user_version").fetchone()[0],
                    conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        conn.close()
        self.assertIn("idx_instances_source", indexes)
        self.assertNotIn("idx_instances_cache", indexes)
        self.assertNotIn("idx_instances_run_task", indexes)
        self.assertEqual(versions, (reflow.SCHEMA_VERSION, str(reflow.SCHEMA_VERSION)))

    def test_failed_migration_leaves_file_unchanged(self):
        path = self.tmp / "dup" / "m.db"
        path.parent.mkdir()
        conn = sqlite3.connect(path)
        conn.executescript(_REFERENCE_V1_DDL)
        conn.execute("INSERT INTO task_instances (run_id, task_name, array_index, state, created_at, updated_at) "
                     "VALUES ('old-1', 'sq', 0, 'PENDING', 'x', 'x')")
        conn.commit()
        conn.close()
        self._assert_refused(path, r"cannot upgrade: duplicate task instances")

    def test_readonly(self):
        run_id = self.make_run()
        ids = self.add_array(run_id, "b", 3)
        self.store.close()
        before = _snapshot(self.path.parent)
        weird = self.tmp / "we ird?#%25" / "m.db"
        with reflow.SqliteStore(weird) as store:
            store.insert_run("w", "wf", "u", {})
        for path in (self.path, weird):
            with reflow.SqliteStore(path, readonly=True) as store:
                self.assertTrue(store.readonly)
                self.assertIsNotNone(store.get_run(run_id if path == self.path else "w"))
        ro = reflow.SqliteStore(self.path, readonly=True)
        self.assertEqual(ro.count_task_instances(run_id), 3)
        self.assertEqual(ro.get_run_parameters(run_id)["path"], Path("/x"))
        writes = [lambda: ro.insert_run("x", "wf", "u", {}), lambda: ro.update_run_status(run_id, "FAILED"),
                  lambda: ro.cancel_instances(ids), lambda: ro.mark_submitted([(ids[0], "1")]),
                  lambda: ro.insert_task_instances(run_id, "a", []), lambda: ro.set_task_width(run_id, "b", 3),
                  lambda: ro.apply_results([]), lambda: ro.mark_for_retry(ids[0]),
                  lambda: ro.transaction().__enter__()]
        for write in writes:
            with self.assertRaisesRegex(reflow.StoreError, "read-only"):
                write()
        ro.close()
        self.assertEqual(_snapshot(self.path.parent), before)
        missing = self.tmp / "nope" / "m.db"
        with self.assertRaisesRegex(reflow.StoreError, "does not exist"):
            reflow.SqliteStore(missing, readonly=True).init()
        self.assertFalse(missing.parent.exists())

    def test_readonly_sees_wal_writer(self):
        path = self.tmp / "wal" / "m.db"
        writer = reflow.SqliteStore(path, journal_mode="wal")
        writer.insert_run("r", "wf", "u", {})
        with writer.transaction():
            writer.update_run_status("r", "FAILED")
            with reflow.SqliteStore(path, readonly=True) as reader:
                self.assertEqual(reader.get_run("r")["status"], "RUNNING")  # not committed yet
        with reflow.SqliteStore(path, readonly=True) as reader:
            self.assertEqual(reader.get_run("r")["status"], "FAILED")
        writer.close()
        with reflow.SqliteStore(path, readonly=True) as reader:  # last writer gone: -wal/-shm removed
            self.assertEqual(reader.get_run("r")["status"], "FAILED")


class TestStoreRuns(_StoreTest):
    def test_run_round_trip(self):
        self.make_run()
        run = self.store.get_run("r1")
        self.assertEqual({k: run[k] for k in ("run_id", "graph_name", "user_id", "status", "dispatch_job_id")},
                         {"run_id": "r1", "graph_name": "wf", "user_id": "ann", "status": "RUNNING",
                          "dispatch_job_id": ""})
        self.assertEqual(run["parameters"], {"n": 3, "path": Path("/x")})
        self.assertRegex(run["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
        self.assertIsNone(self.store.get_run("nope"))
        with self.assertRaises(KeyError) as caught:
            self.store.get_run_parameters("nope")
        self.assertIsInstance(caught.exception, reflow.RunNotFoundError)
        self.assertIn("nope", str(caught.exception))
        with self.assertRaisesRegex(reflow.StoreError, "UNIQUE"):
            self.store.insert_run("r1", "wf", "ann", {})

    def test_status_and_dispatch_job(self):
        self.make_run()
        self.store.update_run_status("r1", reflow.RunState.FAILED)
        self.store.update_run_status("r1", "CANCELLED")
        self.store.set_dispatch_job("r1", "4242")
        run = self.store.get_run("r1")
        self.assertEqual((run["status"], run["dispatch_job_id"]), ("CANCELLED", "4242"))
        self.assertGreaterEqual(run["updated_at"], run["created_at"])
        with self.assertRaisesRegex(reflow.StoreError, "unknown RunState 'DONE'"):
            self.store.update_run_status("r1", "DONE")
        with self.assertRaises(reflow.RunNotFoundError):
            self.store.update_run_status("ghost", "FAILED")
        events = [(e["event"], e["state"], e["job_id"]) for e in self.store.list_events("r1")]
        self.assertEqual(events, [("run_created", "RUNNING", ""), ("run_failed", "FAILED", ""),
                                  ("run_cancelled", "CANCELLED", ""), ("dispatch_job", "CANCELLED", "4242")])

    def test_list_runs_filters(self):
        for i, (graph, user) in enumerate([("wf", "ann"), ("wf", "bob"), ("other", "ann")]):
            self.store.insert_run(f"r{i}", graph, user, {})
        conn = sqlite3.connect(self.path)
        for i, day in enumerate(("2024-01-01", "2024-02-01", "2024-03-01")):
            conn.execute("UPDATE runs SET created_at = ? WHERE run_id = ?", (f"{day}T10:00:00.000000+00:00", f"r{i}"))
        conn.commit()
        conn.close()
        self.store.update_run_status("r1", "FAILED")
        ids = lambda *a, **k: [r["run_id"] for r in self.store.list_runs(*a, **k)]  # noqa: E731
        self.assertEqual(ids(), ["r2", "r1", "r0"])
        self.assertEqual(ids("wf"), ["r1", "r0"])
        self.assertEqual(ids(None, "ann"), ["r2", "r0"])
        self.assertEqual(ids(limit=1), ["r2"])
        self.assertEqual(ids(since="2024-02-01"), ["r2", "r1"])
        self.assertEqual(ids(until="2024-02-01"), ["r1", "r0"])  # a bare date includes that day
        self.assertEqual(ids(until="2024-02-01T09:00"), ["r0"])
        self.assertEqual(ids(since="2024-01-15T00:00:00+00:00", until="2024-02-15"), ["r1"])
        self.assertEqual(ids(status="FAILED"), ["r1"])
        self.assertEqual(ids(status=[reflow.RunState.RUNNING]), ["r2", "r0"])
        with self.assertRaisesRegex(reflow.StoreError, "since 'last week' is not an ISO date"):
            ids(since="last week")


class TestStoreSpecs(_StoreTest):
    def test_specs_and_dependencies(self):
        self.make_run(tasks=(("a", False, []), ("b", True, ["a"]), ("c", False, ["b", "a"])))
        self.store.insert_task_spec("r1", "d", False, {"mem": "1G"}, ["c"])
        specs = self.store.get_task_specs("r1")
        self.assertEqual([(s["task_name"], s["position"], s["is_array"], s["width"]) for s in specs],
                         [("a", 0, False, None), ("b", 1, True, None), ("c", 2, False, None), ("d", 3, False, None)])
        self.assertEqual(specs[3]["config"], {"mem": "1G"})
        self.assertEqual(specs[2]["dependencies"], ["a", "b"])
        self.assertEqual(self.store.list_task_dependencies("r1"), {"a": [], "b": ["a"], "c": ["a", "b"], "d": ["c"]})
        self.store.set_task_width("r1", "b", 0)
        self.assertEqual(self.store.get_task_specs("r1")[1]["width"], 0)
        with self.assertRaisesRegex(reflow.StoreError, "run 'r1' has no task 'zz'"):
            self.store.set_task_width("r1", "zz", 1)
        with self.assertRaisesRegex(reflow.StoreError, "UNIQUE"):
            self.store.insert_task_spec("r1", "a", False, {}, [])


class TestStoreInstances(_StoreTest):
    def test_single_instance_lifecycle(self):
        self.make_run()
        iid = self.store.insert_task_instance("r1", "a", None, reflow.TaskState.PENDING, {"p": Path("/in")},
                                              identity="ida", input_hash="iha")
        inst = self.store.get_task_instance("r1", "a", None)
        self.assertEqual(set(inst), {"id", "run_id", "task_name", "array_index", "state", "job_id", "input",
                                     "output", "error_text", "identity", "input_hash", "output_hash", "created_at",
                                     "updated_at", "attempt", "reason", "exit_code", "started_at", "finished_at",
                                     "cached"})
        self.assertEqual((inst["id"], inst["input"], inst["state"], inst["identity"]),
                         (iid, {"p": Path("/in")}, "PENDING", "ida"))
        self.assertEqual(self.store.update_task_submitted("r1", "a", "77"), 1)
        self.assertEqual(self.store.get_task_instance("r1", "a", None)["job_id"], "77")
        self.store.update_task_running(iid)
        self.assertIsNotNone(self.store.get_task_instance("r1", "a", None)["started_at"])
        self.store.update_task_success(iid, {"out": (1, 2)}, "oh")
        self.assertEqual(self.store.get_singleton_output("r1", "a"), {"out": (1, 2)})
        self.assertEqual(self.store.get_output_hash("r1", "a"), "oh")
        self.store.update_task_failed(iid, "boom")
        self.assertEqual(self.store.get_task_instance("r1", "a", None)["error_text"], "boom")
        self.store.mark_for_retry(iid)
        inst = self.store.get_task_instance("r1", "a", None)
        self.assertEqual((inst["state"], inst["attempt"], inst["error_text"], inst["output"], inst["output_hash"],
                          inst["job_id"]), ("RETRYING", 1, None, None, "", None))
        self.store.update_task_cancelled(iid)
        self.assertEqual(self.store.get_task_instance("r1", "a", None)["state"], "CANCELLED")
        self.assertIsNone(self.store.get_task_instance("r1", "a", 0))
        self.assertIsNone(self.store.get_output_hash("r1", "zz"))
        self.assertIsNone(self.store.get_singleton_output("r1", "zz"))
        with self.assertRaisesRegex(reflow.StoreError, "unknown TaskState 'DONE'"):
            self.store.insert_task_instance("r1", "a", 5, "DONE", {})
        events = [(e["event"], e["attempt"]) for e in self.store.list_events("r1") if e["instance_id"] == iid]
        self.assertEqual(events, [("created", 0), ("submitted", 0), ("running", 0), ("success", 0), ("failed", 0),
                                  ("retrying", 1), ("cancelled", 1)])

    def test_array_queries(self):
        self.make_run()
        ids = self.add_array("r1", "b", 4)
        self.assertEqual(self.store.count_task_instances("r1"), 4)
        self.assertEqual(self.store.count_task_instances("r1", "b", ["PENDING"]), 4)
        self.assertEqual(self.store.count_task_instances("r1", "b", []), 0)
        self.assertEqual(self.store.update_task_submitted("r1", "b", "9", indices=[1, 2]), 2)
        self.assertEqual(self.store.fail_pending_tasks("r1", "b", "rejected", indices=[0]), 1)
        self.assertEqual(self.store.fail_pending_tasks("r1", "b", "rejected"), 1)  # only index 3 was left
        self.assertEqual(self.store.task_state_summary("r1"), {"b": {"SUBMITTED": 2, "FAILED": 2}})
        rows = self.store.instance_rows("r1", states=["SUBMITTED"])
        self.assertEqual([(r.id, r.task_name, r.array_index, r.state, r.job_id, r.attempt) for r in rows],
                         [(ids[1], "b", 1, "SUBMITTED", "9", 0), (ids[2], "b", 2, "SUBMITTED", "9", 0)])
        self.assertEqual(rows[0][4], "9")  # plain tuple access works too
        listed = self.store.list_task_instances("r1", "b", states=[reflow.TaskState.FAILED])
        self.assertEqual([(i["array_index"], i["error_text"]) for i in listed], [(0, "rejected"), (3, "rejected")])
        self.assertEqual(len(self.store.list_task_instances("r1")), 4)

    def test_bulk_insert_keeps_nulls_zeros_and_order(self):
        self.make_run()
        rows = [{"array_index": None, "state": "FAILED", "input": {}, "exit_code": 0, "error_text": "",
                 "job_id": "", "started_at": None},
                {"array_index": 0, "state": "SUCCESS", "input": {"x": 0}, "output": None, "exit_code": None,
                 "job_id": "7", "started_at": "2024-01-02T03:04:05+00:00", "reason": "r"},
                {"array_index": 1, "state": "PENDING", "input": {"x": 1}}]
        self.store.insert_task_instances("r1", "a", rows)
        db = sqlite3.connect(str(self.path))
        try:
            got = db.execute("SELECT array_index, exit_code, error_text, job_id, output, started_at, finished_at, "
                             "reason FROM task_instances ORDER BY id").fetchall()
        finally:
            db.close()
        self.assertEqual([g[:6] for g in got], [(None, 0, None, None, None, None),
                                                (0, None, None, "7", "null", "2024-01-02T03:04:05+00:00"),
                                                (1, None, None, None, None, None)])
        self.assertEqual([(g[6] is None, g[7]) for g in got], [(False, ""), (False, "r"), (True, "")])
        many = [{"array_index": i, "state": "PENDING", "input": {"x": i}} for i in range(200)]  # several statements
        self.store.insert_task_instances("r1", "b", many)
        listed = self.store.list_task_instances("r1", "b")
        self.assertEqual([(i["array_index"], i["input"]) for i in listed], [(i, {"x": i}) for i in range(200)])
        created = [e["array_index"] for e in self.store.list_events("r1") if e["task_name"] == "b"]
        self.assertEqual(created, list(range(200)))
        done = [{"array_index": i, "state": "SUCCESS", "input": {}, "output": i, "output_hash": "o", "exit_code": 0,
                 "started_at": "2024-01-02T03:04:05+00:00"} for i in range(70)]
        done[40] = dict(done[40], state="FAILED", output=None, output_hash="", exit_code=3, error_text="boom")
        self.store.insert_task_instances("r1", "c", done)  # columns equal in all rows but one
        got = {i["array_index"]: i for i in self.store.list_task_instances("r1", "c")}
        self.assertEqual([(got[k]["state"], got[k]["output"], got[k]["exit_code"], got[k]["error_text"])
                          for k in (39, 40, 41)],
                         [("SUCCESS", 39, 0, None), ("FAILED", None, 3, "boom"), ("SUCCESS", 41, 0, None)])
        self.assertEqual({i["started_at"] for i in got.values()}, {"2024-01-02T03:04:05+00:00"})

    def test_cache_hits_are_not_cache_sources(self):
        for run_id in ("r1", "r2"):
            self.make_run(run_id)
        ran = {"array_index": 0, "state": "SUCCESS", "input": {}, "identity": "id0", "input_hash": "h",
               "output": 5, "output_hash": "o5"}
        self.store.insert_task_instances("r1", "b", [ran])
        self.store.insert_task_instances("r2", "b", [dict(ran, cached=True)])  # newer, a copy of r1's
        source = self.store.get_task_instance("r1", "b", 0)
        statements: List[str] = []
        self.store._db.set_trace_callback(statements.append)
        self.assertEqual(self.store.find_cached("b", "id0")["id"], source["id"])
        self.store._db.set_trace_callback(None)
        lookup = next(s for s in statements if s.startswith("SELECT"))
        plan = " ".join(str(r[-1]) for r in self.store._read("EXPLAIN QUERY PLAN " + lookup))
        self.assertIn("idx_instances_source", plan)
        self.store.delete_instances([source["id"]])
        self.assertIsNone(self.store.find_cached("b", "id0"))  # a copy alone serves no one
        copy = self.store.get_task_instance("r2", "b", 0)
        self.store.update_task_failed(copy["id"], "output file gone")
        self.assertEqual(self.store.retry_instances([copy["id"]]), 1)
        self.store.mark_submitted([(copy["id"], "j1")])
        self.store.mark_running([(copy["id"], 1, None)])
        self.assertEqual(self.store.apply_results([{"instance_id": copy["id"], "attempt": 1, "state": "SUCCESS",
                                                    "output": 6, "output_hash": "o6"}])[0], 1)
        self.assertEqual(self.store.find_cached("b", "id0")["output"], 6)  # it ran: now a source

    def test_cache_look_up_of_a_task_that_never_ran_is_one_probe(self):
        self.make_run()
        statements: List[str] = []
        self.store._db.set_trace_callback(statements.append)
        self.assertEqual(self.store.find_cached_many("b", [f"id{i}" for i in range(2000)]), {})
        self.store._db.set_trace_callback(None)
        self.assertEqual(len(statements), 1)
        self.assertNotIn(" IN (", statements[0])
        self.add_array("r1", "b", 3, state="SUCCESS", output=1, output_hash="o")
        found = self.store.find_cached_many("b", ["b-2", "b-9"] + [f"id{i}" for i in range(2000)])
        self.assertEqual(list(found), ["b-2"])

    def test_outputs_digest_follows_index_order_and_waits_for_every_hash(self):
        self.make_run()
        rows = [{"array_index": i, "state": "SUCCESS", "input": {}, "output": i, "output_hash": f"o{i}"}
                for i in (2, 0, 1)]
        self.store.insert_task_instances("r1", "b", rows)
        self.store.insert_task_instances("r1", "a", [{"array_index": None, "state": "SUCCESS", "input": {},
                                                      "output": 1, "output_hash": "s"}])
        for task, text in (("b", "0:o0,1:o1,2:o2"), ("a", "-1:s"), ("none", "")):
            with self.subTest(task=task):
                digest = self.store.get_outputs_digest("r1", task)
                self.assertEqual(digest, reflow._hash16(text))
                self.assertEqual(reflow.Store.get_outputs_digest(self.store, "r1", task), digest)  # the generic one
        self.make_run("r2")
        swapped = [dict(row, output_hash=f"o{(row['array_index'] + 1) % 3}") for row in rows]  # same hashes, moved
        self.store.insert_task_instances("r2", "b", swapped)
        self.assertNotEqual(self.store.get_outputs_digest("r2", "b"), self.store.get_outputs_digest("r1", "b"))
        self.add_array("r2", "c", 2)  # PENDING: no output hashes yet
        self.assertIsNone(self.store.get_outputs_digest("r2", "c"))
        self.assertIsNone(reflow.Store.get_outputs_digest(self.store, "r2", "c"))

    def memo(self, run_id):
        """Return the meta rows memoising the digest of task b in ``run_id``."""
        return self.store._read("SELECT value FROM meta WHERE key = ?", (reflow._digest_key(run_id, "b"),))

    def memoise(self, run_id):
        """Compute the digest of task b inside a write transaction; check it was memoised and return it."""
        with self.store.transaction():
            digest = self.store.get_outputs_digest(run_id, "b")
        self.assertEqual(self.memo(run_id), [(digest,)])
        return digest

    def test_outputs_digest_is_memoised_in_a_write_transaction_and_copied_with_the_task(self):
        self.make_run("r1")
        self.add_array("r1", "b", 3, state="SUCCESS", output=7, output_hash="o7")
        digest = self.store.get_outputs_digest("r1", "b")
        self.assertEqual(self.memo("r1"), [])  # outside a write transaction nothing is written
        self.assertEqual(self.memoise("r1"), digest)
        statements: List[str] = []
        self.store._db.set_trace_callback(statements.append)
        self.assertEqual(self.store.get_outputs_digest("r1", "b"), digest)
        self.store._db.set_trace_callback(None)
        self.assertFalse([s for s in statements if "task_instances" in s], statements)
        self.store.set_task_width("r1", "b", 3)
        self.store.remember_task("r1", "b", "key")
        self.make_run("r2")
        self.store.copy_cached_task("r2", "b", "key")
        self.assertEqual(self.memo("r2"), [(digest,)])

    def test_outputs_digest_memo_is_dropped_by_every_change_that_reaches_a_successful_row(self):
        self.make_run("r1")
        ids = self.add_array("r1", "b", 3, state="SUCCESS", output=7, output_hash="o7")
        new_row = {"array_index": 7, "state": "SUCCESS", "input": {}, "output": 1, "output_hash": "o1"}
        changes = {"update_task_success": lambda: self.store.update_task_success(ids[0], 9, "o9"),
                   "mark_for_retry": lambda: self.store.mark_for_retry(ids[0]),
                   "delete_instances": lambda: self.store.delete_instances([ids[1]]),
                   "insert_task_instances": lambda: self.store.insert_task_instances("r1", "b", [new_row])}
        for name, change in changes.items():
            with self.subTest(change=name):
                self.memoise("r1")
                change()
                self.assertEqual(self.memo("r1"), [])
                self.assertEqual(self.store.get_outputs_digest("r1", "b"),
                                 reflow.Store.get_outputs_digest(self.store, "r1", "b"))  # the generic one
                self.store.update_task_success(ids[0], 9, "o9")  # whole again for the next change
        self.store.update_task_failed(ids[2], "lost")  # keeps its output hash: a digest, but no memo
        with self.store.transaction():
            self.assertIsNotNone(self.store.get_outputs_digest("r1", "b"))
        self.assertEqual(self.memo("r1"), [])

    def test_copy_cached_task_copies_only_whole_successful_tasks(self):
        self.make_run("r1")
        ids = self.add_array("r1", "b", 3, state="SUCCESS", output=7, output_hash="o7")
        self.store.set_task_width("r1", "b", 3)
        self.store.remember_task("r1", "b", "key")
        self.make_run("r2")
        self.assertEqual(self.store.copy_cached_task("r2", "b", "key"), 3)
        copies = self.store.list_task_instances("r2", "b")
        self.assertEqual([(i["array_index"], i["state"], i["cached"], i["output"]) for i in copies],
                         [(k, "SUCCESS", True, 7) for k in range(3)])
        events = [(e["event"], e["task_name"], e["state"], e["reason"]) for e in self.store.list_events("r2")]
        self.assertEqual(events, [("run_created", None, "RUNNING", ""),
                                  ("cached", "b", "SUCCESS", "3 instances copied from run r1")])
        self.assertIsNone(self.store.copy_cached_task("r1", "b", "key"))  # not from the run itself
        self.assertIsNone(self.store.copy_cached_task("r2", "b", "other"))  # no run recorded
        self.store.update_task_failed(ids[1], "lost")
        self.make_run("r3")
        with self.store.transaction():  # a refused copy undoes itself, not the enclosing transaction
            self.store.set_dispatch_job("r3", "j9")
            self.assertIsNone(self.store.copy_cached_task("r3", "b", "key"))
        self.assertEqual((self.store.count_task_instances("r3"), self.store.get_run("r3")["dispatch_job_id"]),
                         (0, "j9"))
        self.assertEqual([e["event"] for e in self.store.list_events("r3")], ["run_created", "dispatch_job"])
        self.store.update_task_success(ids[1], 7, "o7")
        self.store.set_task_width("r1", "b", 4)  # the recorded width no longer matches the instances
        self.assertIsNone(self.store.copy_cached_task("r3", "b", "key"))
        self.assertEqual(self.store.count_task_instances("r3"), 0)

    def test_outputs_in_index_order_and_satisfaction(self):
        self.make_run()
        self.assertFalse(self.store.dependency_is_satisfied("r1", "b"))  # no instances yet
        rows = [{"array_index": i, "state": "SUCCESS", "input": {}, "identity": f"i{i}", "input_hash": "",
                 "output": i * 10, "output_hash": f"o{i}", "cached": True} for i in (2, 0, 1)]
        self.store.insert_task_instances("r1", "b", rows)
        self.assertEqual(self.store.get_array_outputs("r1", "b"), [0, 10, 20])
        self.assertEqual(self.store.get_all_output_hashes("r1", "b"), ["o0", "o1", "o2"])
        self.assertTrue(self.store.dependency_is_satisfied("r1", "b"))
        self.assertTrue(all(i["cached"] for i in self.store.list_task_instances("r1", "b")))
        self.assertEqual({e["event"] for e in self.store.list_events("r1") if e["task_name"] == "b"}, {"cached"})
        self.store.insert_task_instance("r1", "a", None, "FAILED", {})
        self.assertFalse(self.store.dependency_is_satisfied("r1", "a"))
        self.store.insert_run("r2", "wf", "u", {})
        self.store.insert_task_spec("r2", "b", True, {}, [])
        self.store.set_task_width("r2", "b", 0)
        self.assertTrue(self.store.dependency_is_satisfied("r2", "b"))  # empty fan-out

    def test_find_cached(self):
        self.make_run()
        self.make_run("r2")
        old = self.store.insert_task_instance("r1", "a", None, "PENDING", {}, identity="same")
        self.assertIsNone(self.store.find_cached("a", "same"))  # not SUCCESS yet
        self.store.update_task_success(old, "old")
        new = self.store.insert_task_instance("r2", "a", None, "PENDING", {}, identity="same")
        self.store.update_task_success(new, "new", "hn")
        hit = self.store.find_cached("a", "same")
        self.assertEqual((hit["id"], hit["run_id"], hit["output"], hit["output_hash"]), (new, "r2", "new", "hn"))
        self.assertIsNone(self.store.find_cached("b", "same"))
        self.assertIsNone(self.store.find_cached("a", "other"))
        self.store.insert_task_instance("r1", "b", 0, "SUCCESS", {})  # identity "": never a cache key
        self.assertIsNone(self.store.find_cached("b", ""))
        ids = self.add_array("r2", "b", 2000, state="SUCCESS")
        hits = self.store.find_cached_many("b", [f"b-{i}" for i in range(0, 2100, 3)] + [""])
        self.assertEqual(sorted(hits), sorted(f"b-{i}" for i in range(0, 2000, 3)))
        self.assertEqual(hits["b-3"]["id"], ids[3])

    def test_duplicate_instances_rejected(self):
        self.make_run()
        self.store.insert_task_instance("r1", "a", None, "PENDING", {})
        with self.assertRaisesRegex(reflow.StoreError, "UNIQUE constraint failed"):
            self.store.insert_task_instance("r1", "a", None, "PENDING", {})
        self.add_array("r1", "b", 3)
        with self.assertRaisesRegex(reflow.StoreError, "UNIQUE"):
            self.add_array("r1", "b", 5)
        self.assertEqual(self.store.count_task_instances("r1", "b"), 3)  # the whole batch rolled back

    def test_guarded_bulk_transitions(self):
        self.make_run()
        ids = self.add_array("r1", "b", 6)
        self.assertEqual(self.store.mark_submitted([(ids[0], "j0"), (ids[1], "j1"), (ids[2], "j2")]), 3)
        self.assertEqual(self.store.mark_submitted([(ids[0], "again")]), 0)  # already SUBMITTED
        self.assertEqual(self.store.mark_running([(ids[0], 0, "2024-01-01T00:00:00+00:00"), (ids[1], 5, None),
                                                  (ids[3], 0, None)]), 1)  # wrong attempt, not submitted
        first = self.store.get_task_instance("r1", "b", 0)
        self.assertEqual((first["state"], first["job_id"], first["started_at"]),
                         ("RUNNING", "j0", "2024-01-01T00:00:00+00:00"))
        self.assertEqual(self.store.cancel_instances([ids[0], ids[3], ids[3]]), 2)
        self.assertEqual(self.store.fail_instances([ids[0], ids[1], ids[4]], "lost", "OUT_OF_MEMORY"), 2)
        failed = self.store.get_task_instance("r1", "b", 1)
        self.assertEqual((failed["state"], failed["error_text"], failed["reason"]), ("FAILED", "lost", "OUT_OF_MEMORY"))
        self.assertEqual(self.store.retry_instances(ids), 4)  # 0 and 3 cancelled, 1 and 4 failed
        retried = self.store.get_task_instance("r1", "b", 1)
        self.assertEqual((retried["state"], retried["attempt"], retried["error_text"], retried["reason"],
                          retried["job_id"]), ("RETRYING", 1, None, "", None))
        self.assertEqual(self.store.retry_instances(ids), 0)
        self.assertEqual(self.store.mark_submitted([(ids[1], "j9")]), 1)  # RETRYING -> SUBMITTED
        self.assertEqual(self.store.delete_instances([ids[5], 999999]), 1)
        self.assertEqual(self.store.count_task_instances("r1", "b"), 5)
        self.assertEqual([e["event"] for e in self.store.list_events("r1") if e["instance_id"] == ids[5]],
                         ["created", "deleted"])
        for call in (self.store.mark_submitted, self.store.mark_running, self.store.cancel_instances,
                     self.store.fail_instances, self.store.retry_instances, self.store.delete_instances):
            args = ([], "x") if call == self.store.fail_instances else ([],)
            self.assertEqual(call(*args), 0)

    def test_apply_results_rejects_stale(self):
        self.make_run()
        ids = self.add_array("r1", "b", 5)
        self.store.mark_submitted([(i, "j") for i in ids])
        self.store.cancel_instances([ids[1]])
        self.store.fail_instances([ids[2]], "lost")
        self.store.retry_instances([ids[2]])
        self.store.mark_submitted([(ids[2], "j2")])
        ok = {"state": "SUCCESS", "output": {"v": Path("/o")}, "output_hash": "h", "error_text": "",
              "exit_code": 0, "started_at": "2024-01-01T00:00:00+00:00", "finished_at": "2024-01-01T00:01:00+00:00",
              "job_id": "j_0"}
        results = [dict(ok, instance_id=ids[0], attempt=0),
                   dict(ok, instance_id=ids[1], attempt=0),                     # cancelled meanwhile
                   dict(ok, instance_id=ids[2], attempt=0),                     # from before the retry
                   dict(ok, instance_id=ids[3], attempt=0, state="FAILED", output=None, error_text="Traceback",
                        exit_code=3),
                   dict(ok, instance_id=ids[0], attempt=0),                     # duplicate in the batch
                   dict(ok, instance_id=424242, attempt=0),
                   dict(ok, instance_id=ids[4], attempt=0, state="WEIRD"),
                   dict(ok, instance_id=ids[4], attempt="0")]
        applied, rejected = self.store.apply_results(results)
        self.assertEqual(applied, 2)
        self.assertEqual([(i, why.split(" ")[0]) for i, why in rejected],
                         [(ids[1], "instance"), (ids[2], "stale"), (ids[0], "instance"), (424242, "no"),
                          (ids[4], "result"), (ids[4], "result")])
        self.assertIn("CANCELLED", rejected[0][1])
        self.assertEqual(rejected[1][1], "stale attempt 0 (instance is on attempt 1)")
        done = self.store.get_task_instance("r1", "b", 0)
        self.assertEqual((done["state"], done["output"], done["output_hash"], done["job_id"], done["finished_at"]),
                         ("SUCCESS", {"v": Path("/o")}, "h", "j_0", "2024-01-01T00:01:00+00:00"))
        bad = self.store.get_task_instance("r1", "b", 3)
        self.assertEqual((bad["state"], bad["error_text"], bad["exit_code"], bad["reason"], bad["output"]),
                         ("FAILED", "Traceback", 3, "exit 3", None))
        self.assertEqual(self.store.get_task_instance("r1", "b", 1)["state"], "CANCELLED")
        self.assertEqual(self.store.get_task_instance("r1", "b", 2)["state"], "SUBMITTED")
        self.assertEqual(self.store.apply_results([]), (0, []))


class TestStoreTransactions(_StoreTest):
    def test_rollback_on_error(self):
        self.make_run()
        with self.assertRaisesRegex(RuntimeError, "boom"), self.store.transaction():
            self.add_array("r1", "b", 3)
            self.store.update_run_status("r1", "FAILED")
            raise RuntimeError("boom")
        self.assertEqual(self.store.count_task_instances("r1"), 0)
        self.assertEqual(self.store.get_run("r1")["status"], "RUNNING")
        self.assertEqual([e["event"] for e in self.store.list_events("r1")], ["run_created"])

    def test_nested_block_rolls_back_alone(self):
        self.make_run()
        with self.store.transaction():
            self.add_array("r1", "b", 2)
            with self.assertRaises(reflow.StoreError), self.store.transaction():
                self.store.update_run_status("r1", "FAILED")
                self.store.insert_task_instance("r1", "b", 0, "PENDING", {})  # duplicate
            self.store.set_dispatch_job("r1", "5")
        run = self.store.get_run("r1")
        self.assertEqual((run["status"], run["dispatch_job_id"]), ("RUNNING", "5"))
        self.assertEqual(self.store.count_task_instances("r1"), 2)

    def test_single_statement_writes_take_no_savepoint(self):
        self.make_run()
        with _traced_connections() as statements, reflow.SqliteStore(self.path) as store:
            with store.transaction():
                store.set_task_width("r1", "b", 4)
                store.remember_task("r1", "b", "k")
                with self.assertRaisesRegex(reflow.StoreError, "NOT NULL"):
                    store._write("INSERT INTO runs (run_id) VALUES ('broken')")
                store.set_dispatch_job("r1", "7")
            self.assertEqual([s for s in statements if "SAVEPOINT" in s or "RELEASE" in s],
                             ["SAVEPOINT reflow_sp1", "RELEASE reflow_sp1"])  # set_dispatch_job writes two rows
            self.assertEqual(([s["width"] for s in store.get_task_specs("r1")], store.get_run("r1")["dispatch_job_id"]),
                             ([None, 4], "7"))
            store.set_task_width("r1", "a", 1)  # outside a transaction: its own
            self.assertEqual(statements[-3:], ["BEGIN IMMEDIATE", statements[-2], "COMMIT"])

    def test_writes_join_one_transaction(self):
        self.make_run()
        other = reflow.SqliteStore(self.path, readonly=True)
        with self.store.transaction():
            ids = self.add_array("r1", "b", 3)
            self.store.mark_submitted([(i, "1") for i in ids])
            self.assertEqual(self.store.count_task_instances("r1", states=["SUBMITTED"]), 3)  # own writes seen
            self.assertEqual(other.count_task_instances("r1"), 0)  # nothing committed yet
        self.assertEqual(other.count_task_instances("r1", states=["SUBMITTED"]), 3)
        other.close()

    def test_busy_database_is_retried(self):
        self.make_run()
        holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        threading.Timer(0.4, lambda: holder.execute("COMMIT")).start()
        saved = reflow.SQLITE_BUSY_TIMEOUT_MS
        reflow.SQLITE_BUSY_TIMEOUT_MS = 20
        try:
            store = reflow.SqliteStore(self.path)
            store.update_run_status("r1", "FAILED")  # busy for 0.4 s, > 20 ms: only the retries get it through
            self.assertEqual(store.get_run("r1")["status"], "FAILED")
            store.close()
            holder.execute("BEGIN EXCLUSIVE")
            saved_retries, reflow._SQLITE_RETRIES = reflow._SQLITE_RETRIES, 1
            try:
                store = reflow.SqliteStore(self.path)
                with self.assertRaisesRegex(reflow.StoreError, r"manifest.db: .*database is locked"):
                    store.update_run_status("r1", "SUCCESS")
                store.close()
            finally:
                reflow._SQLITE_RETRIES = saved_retries
                holder.execute("COMMIT")
        finally:
            reflow.SQLITE_BUSY_TIMEOUT_MS = saved
            holder.close()

    _HAMMER = textwrap.dedent("""
        import sys, reflow
        path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        store = reflow.SqliteStore(path)
        for i in range(n):
            iid = store.insert_task_instance("r1", who, i, "PENDING", {"i": i})
            with store.transaction():
                store.mark_submitted([(iid, str(i))])
                store.mark_running([(iid, 0, None)])
            store.apply_results([{"instance_id": iid, "attempt": 0, "state": "SUCCESS", "output": i,
                                  "output_hash": "h"}])
            store.set_dispatch_job("r1", who + str(i))
        store.close()
    """)
    _READER = textwrap.dedent("""
        import sys, time, reflow
        store = reflow.SqliteStore(sys.argv[1], readonly=True)
        deadline = time.time() + float(sys.argv[2])
        while time.time() < deadline:
            store.task_state_summary("r1"); store.list_events("r1", 0); store.instance_rows("r1")
        store.close()
    """)

    def test_concurrent_writers(self):
        for journal in ("delete", "wal"):
            with self.subTest(journal=journal):
                path = self.tmp / journal / "m.db"
                with reflow.SqliteStore(path, journal_mode=journal) as store:
                    store.insert_run("r1", "wf", "u", {})
                env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(reflow.__file__)))
                n = 150
                procs = [subprocess.Popen([sys.executable, "-c", self._HAMMER, str(path), f"w{k}", str(n)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
                procs.append(subprocess.Popen([sys.executable, "-c", self._READER, str(path), "3"], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                for proc in procs:
                    _, err = proc.communicate(timeout=300)
                    self.assertEqual(proc.returncode, 0, err.decode())
                    self.assertNotIn(b"locked", err)
                with reflow.SqliteStore(path, readonly=True) as store:
                    self.assertEqual(store.task_state_summary("r1"), {"w0": {"SUCCESS": n}, "w1": {"SUCCESS": n}})
                    self.assertEqual(len(store.list_events("r1")), 1 + 2 * n * 5)


class TestStoreBulkScale(_StoreTest):
    """A wide array through every bulk call: each is one statement or one executemany (speed: bench/)."""

    N = 20_000

    def test_wide_array(self):
        self.make_run()
        rows = [{"array_index": i, "state": "PENDING", "input": {"x": i, "name": f"f{i}.txt"},
                 "identity": f"id{i:012d}", "input_hash": f"h{i}"} for i in range(self.N)]
        self.store.insert_task_instances("r1", "b", rows)
        ids = [row.id for row in self.store.instance_rows("r1")]
        self.assertEqual(len(ids), self.N)
        self.assertEqual(self.store.mark_submitted([(i, "77") for i in ids]), self.N)
        self.assertEqual(self.store.mark_running([(i, 0, None) for i in ids]), self.N)
        results = [{"instance_id": i, "attempt": 0, "state": "SUCCESS", "output": {"y": i}, "output_hash": "o"}
                   for i in ids]
        self.assertEqual(self.store.apply_results(results), (self.N, []))
        self.assertEqual(len(self.store.find_cached_many("b", [r["identity"] for r in rows])), self.N)
        self.assertEqual(len(self.store.get_array_outputs("r1", "b")), self.N)
        self.assertEqual(len(self.store.list_task_instances("r1")), self.N)
        self.make_run("r2")
        self.store.insert_task_instances("r2", "b", rows)
        ids = [row.id for row in self.store.instance_rows("r2")]
        self.assertEqual(self.store.cancel_instances(ids), self.N)
        self.assertEqual(self.store.retry_instances(ids), self.N)
        self.assertEqual(self.store.fail_instances(ids, "lost"), self.N)
        self.assertEqual(self.store.delete_instances(ids), self.N)


HOSTILE = ["$(touch pwned)", "; rm -rf /tmp/nothing-here", "it's \"quoted\"", "two\nlines\n#$ -q evil\n#PBS -q x",
           "-leading-dash", "ünïcödé ✓", "`touch pwned2`", "back\\slash", "*", ""]
EMULATORS = Path(os.environ.get("REFLOW_EMULATORS", str(Path(__file__).resolve().parent / "ci" / "emulators")))


# =============================================================================
# (a) Parsers, table-driven over documented outputs
# =============================================================================


class TestSlurmParsers(unittest.TestCase):
    """sbatch, sacct and squeue outputs of schedulers.md section 1."""

    def test_submit_output(self):
        for stdout, expected in [("123", "123"), ("123;cluster", "123"), ("info: plugin says hi\n124\n", "124"),
                                 ("Submitted batch job 125", "125"), ("Submitted batch job 126 on cluster ci", "126")]:
            with self.subTest(stdout=stdout):
                result = reflow.CommandResult(["sbatch"], stdout, "", 0)
                self.assertEqual(SlurmExecutor._parse_submit(result), expected)
        for stdout in ["", "sbatch: error: nope", "abc"]:
            with self.subTest(stdout=stdout), self.assertRaises(ExecutorError):
                SlurmExecutor._parse_submit(reflow.CommandResult(["sbatch"], stdout, "", 0))

    def test_sacct_rows(self):
        text = "\n".join([
            "123|COMPLETED|0:0|None", "124_1|FAILED|1:0|NonZeroExitCode", "124_2|CANCELLED by 1000|0:15|None",
            "124_[3-5%2]|PENDING|0:0|JobArrayTaskLimit", "125|TIMEOUT|0:0|TimeLimit", "126|OUT_OF_MEMORY|0:125|None",
            "127|NODE_FAIL|0:0|None", "128|PREEMPTED|0:0|None", "129|BOOT_FAIL|0:0|None", "130|DEADLINE|0:0|None",
            "131|PENDING|0:0|DependencyNeverSatisfied", "132|CANCELLED|0:0|Dependency",
            "133|CANCELLED by 0|0:0|Dependency", "134|SOMETHING_NEW|0:0|None", "135|SUSPENDED|0:0|None",
            "136|RUNNING|0:0|None", "137|COMPLETING|0:0|None", "138|FAILED|0:9|None", "139|REQUEUED|0:0|None",
        ])
        rows = SlurmExecutor._parse_sacct(text)
        expected = {
            "123": ("COMPLETED", "", 0), "124_1": ("FAILED", "exit 1", 1),
            "124_2": ("CANCELLED", "CANCELLED by 1000", 143), "124_3": ("PENDING", "JobArrayTaskLimit", None),
            "124_5": ("PENDING", "JobArrayTaskLimit", None), "125": ("TIMEOUT", "TIMEOUT", 0),
            "126": ("OUT_OF_MEMORY", "OUT_OF_MEMORY", 253), "127": ("FAILED", "NODE_FAIL", 0),
            "128": ("FAILED", "PREEMPTED", 0), "129": ("FAILED", "BOOT_FAIL", 0), "130": ("FAILED", "DEADLINE", 0),
            "131": ("FAILED", "DEPENDENCY_NEVER_SATISFIED", None),
            "132": ("FAILED", "DEPENDENCY_NEVER_SATISFIED", None),
            "133": ("CANCELLED", "CANCELLED by 0", 0), "134": ("RUNNING", "SOMETHING_NEW", None),
            "135": ("SUSPENDED", "", None), "136": ("RUNNING", "", None), "137": ("RUNNING", "", None),
            "138": ("FAILED", "signal 9", 137), "139": ("PENDING", "", None),
        }
        for job_id, (state, reason, code) in expected.items():
            with self.subTest(job_id=job_id):
                self.assertEqual(rows[job_id], JobInfo(state, reason, code))
        self.assertNotIn("124_[3-5%2]", rows)
        self.assertIn("124_4", rows)

    def test_squeue_rows(self):
        rows = SlurmExecutor._parse_squeue("123|RUNNING|None\n124_[2-4%2]|PENDING|JobArrayTaskLimit\n"
                                           "124_1|RUNNING|None\n125|PENDING|DependencyNeverSatisfied\n"
                                           "126|FAILED|NonZeroExitCode\n127|FAILED|NonZeroExitCode|768|\n"
                                           "128|FAILED|JobLaunchFailure|9|\n129|COMPLETED|None|0|\n"
                                           "130|FAILED|NonZeroExitCode|0|\n")
        self.assertEqual(rows["127"], JobInfo("FAILED", "exit 3", 3))
        self.assertEqual(rows["128"], JobInfo("FAILED", "signal 9", 137))
        self.assertEqual(rows["129"], JobInfo("COMPLETED", "", 0))
        self.assertEqual(rows["130"], JobInfo("RUNNING", "ending"))  # exit status not recorded yet
        self.assertEqual(rows["123"].state, "RUNNING")
        self.assertEqual([rows[f"124_{i}"].state for i in (1, 2, 3, 4)], ["RUNNING"] + ["PENDING"] * 3)
        self.assertEqual(rows["125"], JobInfo("FAILED", "DEPENDENCY_NEVER_SATISFIED"))
        self.assertEqual(rows["126"].state, "FAILED")
        self.assertEqual(rows["126"].reason, "NonZeroExitCode")

    def test_element_and_master_ids(self):
        ex = SlurmExecutor()
        self.assertEqual(ex.element_id("123", 4), "123_4")
        self.assertEqual(ex.dependency_options(["5_1", "5_2", "6", "6"]), {"dependency": "afterany:5:6"})
        self.assertEqual(ex.dependency_options(["7"], "afterok"),
                         {"dependency": "afterok:7", "kill_on_invalid_dep": "yes"})
        self.assertEqual(ex.dependency_options([]), {})
        self.assertEqual(ex.delay_options(30), {"begin": "now+30"})


class TestPBSParsers(unittest.TestCase):
    """qsub ids and qstat JSON/text of schedulers.md section 2."""

    def test_submit_output(self):
        for stdout in ["123.pbsserver", "123[].pbsserver", "124.srv.example.org", "125", "126[]"]:
            with self.subTest(stdout=stdout):
                self.assertEqual(PBSExecutor._parse_submit(reflow.CommandResult(["qsub"], stdout + "\n", "", 0)),
                                 stdout)
        for stdout in ["", "qsub: Unknown queue", "Job <1> is submitted"]:
            with self.subTest(stdout=stdout), self.assertRaises(ExecutorError):
                PBSExecutor._parse_submit(reflow.CommandResult(["qsub"], stdout, "", 0))

    def test_exit_status_table(self):
        cases = [
            ({"job_state": "F", "Exit_status": 0}, ("COMPLETED", "", 0)),
            ({"job_state": "F", "Exit_status": 3}, ("FAILED", "exit 3", 3)),
            ({"job_state": "X", "Exit_status": 265}, ("CANCELLED", "signal 9", 137)),
            ({"job_state": "F", "Exit_status": 271}, ("CANCELLED", "signal 15", 143)),
            ({"job_state": "F", "Exit_status": 267}, ("FAILED", "signal 11", 139)),
            ({"job_state": "F", "Exit_status": -29}, ("TIMEOUT", "walltime exceeded", -29)),
            ({"job_state": "F", "Exit_status": -27}, ("OUT_OF_MEMORY", "mem exceeded", -27)),
            ({"job_state": "F", "Exit_status": -1}, ("FAILED", "PBS exec error -1", -1)),
            ({"job_state": "F"}, ("CANCELLED", "deleted before running", None)),
            ({"job_state": "C", "exit_status": "2"}, ("FAILED", "exit 2", 2)),
            ({"job_state": "Q"}, ("PENDING", "", None)), ({"job_state": "H"}, ("PENDING", "", None)),
            ({"job_state": "W"}, ("PENDING", "", None)), ({"job_state": "R"}, ("RUNNING", "", None)),
            ({"job_state": "E"}, ("RUNNING", "", None)), ({"job_state": "B"}, ("RUNNING", "", None)),
            ({"job_state": "S"}, ("SUSPENDED", "", None)), ({"job_state": "Z"}, ("RUNNING", "state Z", None)),
        ]
        for attrs, expected in cases:
            with self.subTest(attrs=attrs):
                self.assertEqual(PBSExecutor._info(attrs), JobInfo(*expected))

    def test_qstat_json_and_text(self):
        text = json.dumps({"timestamp": 1, "pbs_version": "19.1.3", "pbs_server": "srv", "Jobs": {
            "123.srv": {"Job_Name": "step1", "job_state": "F", "Exit_status": 0},
            "124[].srv": {"job_state": "B", "array": "True"},
            "124[0].srv": {"job_state": "X", "Exit_status": 0}, "124[1].srv": {"job_state": "R"}}})
        records = PBSExecutor._parse_qstat_json(text)
        self.assertEqual(set(records), {"123.srv", "124[].srv", "124[0].srv", "124[1].srv"})
        self.assertEqual(PBSExecutor._parse_qstat_json(""), {})
        with self.assertRaises(ExecutorError):
            PBSExecutor._parse_qstat_json("{not json")
        sample = ("Job Id: 123.srv\n    Job_Name = step1\n    job_state = C\n    exit_status = 0\n"
                  "    Variable_List = PBS_O_HOME=/root,PBS_O_LANG=C,\n\tPBS_O_PATH=/bin\n\nJob Id: 124.srv\n"
                  "    job_state = R\n")
        records = PBSExecutor._parse_qstat_text(sample)
        self.assertEqual(records["123.srv"]["exit_status"], "0")
        self.assertTrue(records["123.srv"]["Variable_List"].endswith("PBS_O_PATH=/bin"))
        self.assertEqual(records["124.srv"]["job_state"], "R")

    def test_ids(self):
        ex = PBSExecutor(array_flag="-J")
        self.assertEqual(ex.element_id("123[].srv", 4), "123[4].srv")
        self.assertEqual(ex.element_id("123.srv", 0), "123.srv")  # one-element "array" = plain job
        self.assertEqual(ex.dependency_options(["1.srv", "2[3].srv", "2[4].srv"]),
                         {"depend": "afterany:1.srv:2[].srv"})
        torque = PBSExecutor(array_flag="-t")
        self.assertEqual(torque.dependency_options(["1.srv", "2[3].srv"], "afterok"),
                         {"depend": "afterok:1.srv,afterokarray:2[].srv"})
        self.assertRegex(ex.delay_options(90)["begin"], r"^\d{12}\.\d\d$")


class TestLSFParsers(unittest.TestCase):
    """bsub and bjobs outputs of schedulers.md section 3."""

    def test_submit_output(self):
        for stdout, expected in [("Job <123> is submitted to queue <normal>.", "123"),
                                 ("Job <124> is submitted to default queue <normal>.\n", "124")]:
            with self.subTest(stdout=stdout):
                self.assertEqual(LSFExecutor._parse_submit(reflow.CommandResult(["bsub"], stdout, "", 0)), expected)
        with self.assertRaises(ExecutorError):
            LSFExecutor._parse_submit(reflow.CommandResult(["bsub"], "Queue does not exist. Job not submitted.", "", 0))

    def test_bjobs_json(self):
        def rec(jobid, stat, index="0", code="", reason="", pend=""):
            return {"JOBID": jobid, "JOBINDEX": index, "STAT": stat, "EXIT_CODE": code, "EXIT_REASON": reason,
                    "PEND_REASON": pend}
        records = [rec("1", "DONE"), rec("2", "EXIT", code="3"), rec("3", "EXIT", code="130",
                   reason="TERM_OWNER: job killed by owner"), rec("4", "EXIT", code="137", reason="TERM_MEMLIMIT"),
                   rec("5", "EXIT", code="140", reason="Job killed after reaching LSF run time limit"),
                   rec("6", "PEND", pend="Dependency condition invalid or never satisfied"),
                   rec("7", "PEND", pend="New job is waiting for scheduling"), rec("8", "RUN"), rec("9", "PSUSP"),
                   rec("10", "USUSP"), rec("11", "PDONE"), rec("12", "ZOMBI"), rec("13", "WEIRD"),
                   rec("14", "DONE", index="2"), rec("14", "RUN", index="3"),
                   {"JOBID": "15", "ERROR": "Job <15> is not found"},
                   rec("16", "EXIT", code="139")]
        rows = LSFExecutor._parse_bjobs("prefix noise " + json.dumps({"COMMAND": "bjobs", "JOBS": len(records),
                                                                      "RECORDS": records}))
        expected = {
            "1": ("COMPLETED", "", 0), "2": ("FAILED", "exit 3", 3),
            "3": ("CANCELLED", "TERM_OWNER: job killed by owner", 130), "4": ("OUT_OF_MEMORY", "TERM_MEMLIMIT", 137),
            "5": ("TIMEOUT", "Job killed after reaching LSF run time limit", 140),
            "6": ("FAILED", "DEPENDENCY_NEVER_SATISFIED", None),
            "7": ("PENDING", "New job is waiting for scheduling", None), "8": ("RUNNING", "", None),
            "9": ("PENDING", "", None), "10": ("SUSPENDED", "", None), "11": ("COMPLETED", "", 0),
            "12": ("FAILED", "", None), "13": ("RUNNING", "state WEIRD", None), "14[2]": ("COMPLETED", "", 0),
            "14[3]": ("RUNNING", "", None), "16": ("FAILED", "signal 11", 139),
        }
        for job_id, info in expected.items():
            with self.subTest(job_id=job_id):
                self.assertEqual(rows[job_id], JobInfo(*info))
        self.assertNotIn("15", rows)
        self.assertEqual(LSFExecutor._parse_bjobs(""), {})

    def test_ids_and_options(self):
        ex = LSFExecutor()
        self.assertEqual(ex.element_id("123", 4), "123[4]")
        self.assertEqual(ex.dependency_options(["1", "2[3]", "2[4]"]), {"dependency": "ended(1) && ended(2)"})
        self.assertEqual(ex.dependency_options(["1"], "afterok"), {"dependency": "ended(1)"})  # never stuck pending
        self.assertRegex(ex.delay_options(60)["begin"], r"^\d{4}:\d\d:\d\d:\d\d:\d\d$")


class TestSGEParsers(unittest.TestCase):
    """qsub, qstat -xml and qacct outputs of schedulers.md section 4."""

    QSTAT_XML = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>123</JB_job_number>
      <JAT_prio>0.55500</JAT_prio>
      <JB_name>wf-a&amp;b</JB_name>
      <JB_owner>alice</JB_owner>
      <state>r</state>
      <queue_name>all.q@node01</queue_name>
      <slots>4</slots>
      <tasks>7</tasks>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>123</JB_job_number>
      <JB_name>wf-a&amp;b</JB_name>
      <state>qw</state>
      <tasks>8-10:1</tasks>
    </job_list>
    <job_list state="pending">
      <JB_job_number>124</JB_job_number>
      <JB_name>step2</JB_name>
      <state>hqw</state>
    </job_list>
    <job_list state="pending">
      <JB_job_number>125</JB_job_number>
      <JB_name>broken</JB_name>
      <state>Eqw</state>
    </job_list>
  </job_info>
</job_info>
"""

    def test_submit_output(self):
        for stdout, expected in [("123", "123"), ("123.1-10:1", "123"),
                                 ('Your job 124 ("name") has been submitted', "124"),
                                 ('Your job-array 125.1-10:1 ("name") has been submitted', "125")]:
            with self.subTest(stdout=stdout):
                self.assertEqual(SGEExecutor._parse_submit(reflow.CommandResult(["qsub"], stdout, "", 0)), expected)
        with self.assertRaises(ExecutorError):
            SGEExecutor._parse_submit(reflow.CommandResult(["qsub"], "Unable to run job: error", "", 0))

    def test_qstat_xml(self):
        jobs = SGEExecutor._parse_qstat_xml(self.QSTAT_XML)
        self.assertEqual([(j["number"], j["state"], j["tasks"]) for j in jobs],
                         [("123", "r", "7"), ("123", "qw", "8-10:1"), ("124", "hqw", ""), ("125", "Eqw", "")])
        self.assertEqual(jobs[0]["name"], "wf-a&b")

    def test_state_letters(self):
        for letters, state in [("qw", "PENDING"), ("hqw", "PENDING"), ("hRwq", "PENDING"), ("r", "RUNNING"),
                               ("t", "RUNNING"), ("Rr", "RUNNING"), ("s", "SUSPENDED"), ("S", "SUSPENDED"),
                               ("T", "SUSPENDED"), ("Eqw", "FAILED"), ("dr", "CANCELLED"), ("z?", "RUNNING")]:
            with self.subTest(letters=letters):
                self.assertEqual(SGEExecutor._state_info(letters).state, state)

    def test_qacct(self):
        text = ("==============================================================\nqname        all.q\n"
                "jobnumber    123\ntaskid       undefined\nfailed       0    \nexit_status  0\n"
                "==============================================================\njobnumber    124\n"
                "taskid       2\nfailed       100 : assumedly after job\nexit_status  137                  (Killed)\n")
        records = SGEExecutor._parse_qacct(text)
        self.assertEqual([r["jobnumber"] for r in records], ["123", "124"])
        cases = [({"failed": "0", "exit_status": "0"}, ("COMPLETED", "", 0)),
                 ({"failed": "0", "exit_status": "3"}, ("FAILED", "exit 3", 3)),
                 ({"failed": "100 : assumedly after job", "exit_status": "137 (Killed)"},
                  ("CANCELLED", "signal 9", 137)),
                 ({"failed": "37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", "exit_status": "137"},
                  ("TIMEOUT", "37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", 137)),
                 ({"failed": "26  : opening input/output file", "exit_status": "0"},
                  ("FAILED", "failed 26  : opening input/output file", 0)),
                 ({"failed": "37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", "exit_status": "137",
                   "category": "-l h_rt=00:10:00,h_vmem=768M", "ru_wallclock": "12s"},
                  ("OUT_OF_MEMORY", "37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", 137)),
                 ({"failed": "0", "exit_status": "139"}, ("FAILED", "signal 11", 139))]
        for record, expected in cases:
            with self.subTest(record=record):
                self.assertEqual(SGEExecutor._qacct_info(record), JobInfo(*expected))

    def test_ids(self):
        ex = SGEExecutor()
        self.assertEqual(ex.element_id("123", 4), "123.4")
        self.assertEqual(ex.dependency_options(["1", "2.3", "2.4"], "afterok"), {"hold_jid": "1,2"})
        self.assertRegex(ex.delay_options(5)["begin"], r"^\d{12}\.\d\d$")


class TestFluxParsers(unittest.TestCase):
    """F58 ids and flux jobs output of schedulers.md section 5."""

    def test_ids(self):
        for text, expected in [("f1", "0"), ("f2", "1"), ("fz", "57"), ("f21", "58"), ("ƒ21", "58"), ("42", "42"),
                               ("0x2a", "42"), ("0000.0000.0000.002a", "42")]:
            with self.subTest(text=text):
                self.assertEqual(reflow._flux_decimal_id(text), expected)
        for number in (0, 1, 57, 58, 1234567890123, 2**63 - 1):
            self.assertEqual(reflow._flux_decimal_id(reflow._flux_f58(number)), str(number))
        for text in ("", "f", "f0", "ƒI", "xyz"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                reflow._flux_decimal_id(text)

    def test_submit_output(self):
        stdout = "\n".join(reflow._flux_f58(n).replace("f", "ƒ", 1) for n in (1000, 1001)) + "\n"
        self.assertEqual(FluxExecutor._parse_submit(reflow.CommandResult(["flux"], stdout, "", 0)), ["1000", "1001"])
        with self.assertRaises(ExecutorError):
            FluxExecutor._parse_submit(reflow.CommandResult(["flux"], "flux-submit: ERROR: x", "", 0))

    def test_jobs_rows(self):
        text = "\n".join(["1|INACTIVE|COMPLETED|0|", "2|RUN|||", "3|INACTIVE|FAILED|3|",
                          "4|INACTIVE|CANCELED|-128|cancel",
                          "5|INACTIVE|TIMEOUT|-9|timeout", "6|INACTIVE|FAILED|-128|dependency", "7|SCHED|||",
                          "8|DEPEND|||", "9|CLEANUP|||", "10|PRIORITY|||", "11|S|||", "12|INACTIVE|FAILED|-11|",
                          "13|WEIRD|||"])
        rows = FluxExecutor._parse_jobs(text)
        expected = {"1": ("COMPLETED", "", 0), "2": ("RUNNING", "", None), "3": ("FAILED", "exit 3", 3),
                    "4": ("CANCELLED", "CANCELLED", -128), "5": ("TIMEOUT", "TIMEOUT", -9),
                    "6": ("FAILED", "DEPENDENCY_NEVER_SATISFIED", -128), "7": ("PENDING", "", None),
                    "8": ("PENDING", "", None), "9": ("RUNNING", "", None), "10": ("PENDING", "", None),
                    "11": ("PENDING", "", None), "12": ("FAILED", "signal 11", -11),
                    "13": ("RUNNING", "state WEIRD", None)}
        for job_id, info in expected.items():
            with self.subTest(job_id=job_id):
                self.assertEqual(rows[job_id], JobInfo(*info))

    def test_options(self):
        ex = FluxExecutor()
        self.assertEqual(ex.dependency_options(["1", "2", "1"]), {"dependency": ["afterany:1", "afterany:2"]})
        self.assertEqual(ex.delay_options(30), {"begin_time": "+30s"})
        self.assertEqual(ex.element_id("77", 3), "77")


class TestFormats(unittest.TestCase):
    """Walltime and memory formats per scheduler."""

    def test_time_formats(self):
        self.assertEqual(reflow._flux_duration(90), "90s")
        self.assertEqual(reflow._flux_duration(1800), "30m")
        self.assertEqual(reflow._flux_duration(7200), "2h")
        self.assertEqual(reflow._flux_duration(86400), "1d")
        self.assertEqual(reflow._mem_mib("4G"), 4096)
        self.assertEqual(reflow._mem_mib("1.5G"), 1536)
        self.assertEqual(reflow._mem_mib("100"), 100)

    def test_mail_letters(self):
        self.assertEqual(reflow._mail_letters("END,FAIL", reflow._PBS_MAIL, "pbs"), "ea")
        self.assertEqual(reflow._mail_letters(["BEGIN", "END"], reflow._SGE_MAIL, "sge"), "be")
        self.assertEqual(reflow._mail_letters("abe", reflow._PBS_MAIL, "pbs"), "abe")
        with self.assertRaisesRegex(ExecutorError, "'SOMETIMES'"):
            reflow._mail_letters("SOMETIMES", reflow._PBS_MAIL, "pbs")

    def test_signal_spec(self):
        self.assertEqual(reflow._parse_signal_spec("B:USR1@60"), ("USR1", 60))
        self.assertEqual(reflow._parse_signal_spec("SIGINT@90"), ("INT", 90))
        self.assertEqual(reflow._parse_signal_spec("TERM"), ("TERM", 60))
        with self.assertRaises(ExecutorError):
            reflow._parse_signal_spec("USR1@soon")


# =============================================================================
# (b) Command building against fake scheduler commands
# =============================================================================

_FAKE = r'''#!{python}
import json, os, sys, time
d = os.environ["REFLOW_FAKE_DIR"]
name = os.path.basename(sys.argv[0])
sub = sys.argv[1] if len(sys.argv) > 1 else ""
stdin = sys.stdin.read()
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"name": name, "argv": sys.argv[1:], "stdin": stdin}}) + "\n")
for stem in (name + "-" + sub, name):
    path = os.path.join(d, stem + ".json")
    if os.path.exists(path):
        answers = json.load(open(path))
        counter = os.path.join(d, stem + ".count")
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(n + 1))
        answer = answers[min(n, len(answers) - 1)]
        time.sleep(answer.get("sleep", 0))
        sys.stdout.write(answer.get("stdout", ""))
        sys.stderr.write(answer.get("stderr", ""))
        sys.exit(answer.get("rc", 0))
'''


class FakeSchedulerCase(unittest.TestCase):
    """Put fake scheduler commands first on PATH; each records its argv and stdin."""

    COMMANDS = ("sbatch", "scancel", "sacct", "squeue", "qsub", "qdel", "qstat", "qacct", "bsub", "bkill", "bjobs",
                "flux")

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="reflow-fake-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        for name in self.COMMANDS:
            path = self.bin / name
            path.write_text(_FAKE.format(python=sys.executable))
            path.chmod(0o755)
        self.work = self.tmp / "work dir"
        self.work.mkdir()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.work)  # job scripts of resources without a workdir land in the cwd
        patch = {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", "REFLOW_FAKE_DIR": str(self.tmp),
                 "REFLOW_SCHED_RETRIES": "2", "REFLOW_SCHED_BACKOFF": "0", "USER": "alice"}
        saved = {key: os.environ.get(key) for key in patch}
        os.environ.update(patch)
        self.addCleanup(_restore_env, saved)

    def answer(self, stem, *answers):
        """Make the fake ``stem`` (``qstat`` or ``flux-jobs``) print these answers in turn."""
        (self.tmp / f"{stem}.json").write_text(json.dumps(list(answers)))

    def calls(self, name=None):
        path = self.tmp / "calls.jsonl"
        calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [c for c in calls if name is None or c["name"] == name]

    def resources(self, **changes):
        values = dict(job_name="wf-task", cpus=4, time_limit="1-02:03:04", mem="3G",
                      output_path=str(self.work / "logs" / "t-{job_id}_{array_index}.out"),
                      error_path=str(self.work / "logs" / "t-{job_id}_{array_index}.err"),
                      workdir=str(self.work), env={"REFLOW_X": "1"}, gpus=0,
                      submit_options={"partition": "short", "account": "proj"})
        values.update(changes)
        return JobResources(**values)

    def assertFlags(self, argv, *pairs):
        """Assert each (flag, value) appears as adjacent words (or ``flag=value``) in argv."""
        for flag, value in pairs:
            adjacent = any(argv[i] == flag and argv[i + 1] == value for i in range(len(argv) - 1))
            self.assertTrue(adjacent or f"{flag}={value}" in argv, f"{flag} {value!r} not in {argv}")

    def run_script(self, text, env=None):
        """Run a generated script in a sandbox; fail if a hostile value executed."""
        sandbox = self.tmp / "sandbox"
        sandbox.mkdir(exist_ok=True)
        script = sandbox / "job.sh"
        script.write_text(text)
        proc = subprocess.run(["sh", str(script)], cwd=sandbox, capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PBS_O_WORKDIR=str(sandbox), **(env or {})))
        self.assertFalse(list(sandbox.glob("pwned*")) + list(self.work.glob("pwned*")), "a hostile value ran")
        return proc


def _restore_env(saved):
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _printf_command():
    return ["printf", "<%s>\n", *HOSTILE]


def _expected_printf():
    return "".join(f"<{word}>\n" for word in HOSTILE)


class TestSlurmCommands(FakeSchedulerCase):
    def test_submit_maps_every_resource(self):
        self.answer("sbatch", {"stdout": "Info: ok\n4242;ci\n"})
        ex = SlurmExecutor.from_environment()
        options = {"partition": "short", "account": "proj", "qos": "high", "mail_user": "a@b.c",
                   "mail_type": ["END", "FAIL"], "signal": "B:USR1@60", "exclusive": True, "requeue": False,
                   "constraint": None, "gres": ["tmp:10", "foo:1"], "-x": "node1"}
        job = ex.submit(self.resources(array="0-9%3", gpus=2, submit_options=options), ["python3", "flow.py"])
        self.assertEqual(job, "4242")
        argv = self.calls("sbatch")[0]["argv"]
        self.assertEqual(argv[0], "--parsable")
        self.assertFlags(argv, ("--job-name", "wf-task"), ("--cpus-per-task", "4"), ("--mem", "3072M"),
                         ("--time", "1-02:03:04"), ("--array", "0-9%3"), ("--gpus", "2"),
                         ("--output", str(self.work / "logs" / "t-%A_%a.out")),
                         ("--error", str(self.work / "logs" / "t-%A_%a.err")), ("--chdir", str(self.work)),
                         ("--partition", "short"), ("--account", "proj"), ("--qos", "high"),
                         ("--mail-user", "a@b.c"), ("--mail-type", "END,FAIL"), ("--signal", "B:USR1@60"),
                         ("--gres", "tmp:10"), ("--gres", "foo:1"), ("-x", "node1"))
        self.assertIn("--exclusive", argv)
        self.assertFalse([a for a in argv if a.startswith(("--requeue", "--constraint"))])
        self.assertEqual(argv[-2], "--wrap")

    def test_singleton_tokens_time_and_percent(self):
        self.answer("sbatch", {"stdout": "7\n"})
        ex = SlurmExecutor()
        ex.submit(self.resources(time_limit="90", output_path="/l/100%-{job_id}{array_index}.out", error_path=None,
                                 submit_options={"queue": "q", "project": "p"}), ["true"])
        argv = self.calls("sbatch")[0]["argv"]
        self.assertFlags(argv, ("--time", "01:30:00"), ("--output", "/l/100%%-%j.out"), ("--partition", "q"),
                         ("--account", "p"))
        self.assertFalse([a for a in argv if a.startswith("--error")])

    def test_wrap_quotes_hostile_values(self):
        self.answer("sbatch", {"stdout": "8\n"})
        env = {f"V{i}": word for i, word in enumerate(HOSTILE)}
        SlurmExecutor().submit(self.resources(env=env), _printf_command())
        wrap = self.calls("sbatch")[0]["argv"][-1]
        self.assertFalse([line for line in wrap.splitlines() if line.startswith("#")])
        probe = "\n".join(f'printf "<%s>\\n" "$V{i}"' for i in range(len(HOSTILE)))
        proc = self.run_script(wrap.replace("exec printf", probe + "\nprintf", 1))
        self.assertEqual(proc.stdout, _expected_printf() * 2)

    def test_errors_and_retries(self):
        self.answer("sbatch", {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: Socket timed out on "
                                                  "send/recv operation\n"}, {"stdout": "9\n"})
        self.assertEqual(SlurmExecutor().submit(self.resources(), ["true"]), "9")
        self.assertEqual(len(self.calls("sbatch")), 2)
        self.answer("sbatch", {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: Invalid account or "
                                                  "account/partition combination specified\n"})
        (self.tmp / "sbatch.count").unlink()
        with self.assertRaisesRegex(ExecutorError, "Invalid account"):
            SlurmExecutor().submit(self.resources(), ["true"])
        self.answer("sbatch", {"stdout": "garbage\n"})
        (self.tmp / "sbatch.count").unlink()
        with self.assertRaisesRegex(ExecutorError, "garbage"):
            SlurmExecutor().submit(self.resources(), ["true"])

    def test_job_infos_one_sacct_then_squeue(self):
        self.answer("sacct", {"stdout": "10|COMPLETED|0:0|None\n11_0|FAILED|3:0|None\n11_[1-2]|PENDING|0:0|None\n"})
        self.answer("squeue", {"stdout": "11_1|RUNNING|None\n11_2|PENDING|Priority\n"
                                         "12|PENDING|DependencyNeverSatisfied\n"})
        infos = SlurmExecutor().job_infos(["10", "11_0", "11_1", "11_2", "11", "12", "13", "DRYRUN", "10"])
        self.assertEqual(self.calls("sacct")[0]["argv"],
                         ["-X", "-n", "-P", "-j", "10,11,12,13", "-o", "JobID,State,ExitCode,Reason"])
        self.assertEqual(self.calls("squeue")[0]["argv"], ["-h", "-t", "all", "-j", "11,12,13", "-O",
                                                           "JobArrayID:|,State:|,Reason:|,exit_code:|"])
        self.assertEqual(infos["10"].state, "COMPLETED")
        self.assertEqual(infos["11_0"], JobInfo("FAILED", "exit 3", 3))
        self.assertEqual(infos["11_1"].state, "RUNNING")
        self.assertEqual(infos["11_2"], JobInfo("PENDING", "Priority"))
        self.assertEqual(infos["11"].state, "RUNNING")
        self.assertEqual(infos["12"].reason, "DEPENDENCY_NEVER_SATISFIED")
        self.assertNotIn("13", infos)
        self.assertEqual(SlurmExecutor().job_state("10"), "COMPLETED")

    def test_old_squeue_without_exit_code_field(self):
        self.answer("sacct", {"stdout": ""})
        self.answer("squeue", {"rc": 1, "stderr": "squeue: error: Invalid job format specification: exit_code\n"},
                    {"stdout": "5|RUNNING|None\n"})
        self.assertEqual(SlurmExecutor().job_infos(["5"]), {"5": JobInfo("RUNNING")})
        self.assertEqual(self.calls("squeue")[1]["argv"][-2:], ["-o", "%i|%T|%r"])

    def test_job_infos_without_accounting(self):
        self.answer("sacct", {"rc": 1, "stderr": "sacct: error: Slurm accounting storage is disabled\n"})
        self.answer("squeue", {"rc": 1, "stderr": "slurm_load_jobs error: Invalid job id specified\n"})
        self.assertEqual(SlurmExecutor().job_infos(["5"]), {})
        self.assertEqual(len(self.calls("sacct")), 1)  # permanent: no retry

    def test_cancel_find_dry_run(self):
        self.answer("scancel", {"rc": 1, "stderr": "scancel: error: Kill job error on job id 5: Invalid job id "
                                                   "specified\nscancel: error: Kill job error on job id 6_1: "
                                                   "Job/step already completing or completed\n"})
        SlurmExecutor().cancel_many(["5", "6_1", "5", "DRYRUN"])
        self.assertEqual(self.calls("scancel")[0]["argv"], ["5", "6_1"])
        self.answer("scancel", {"rc": 1, "stderr": "scancel: error: Access/permission denied\n"})
        (self.tmp / "scancel.count").unlink()
        with self.assertRaisesRegex(ExecutorError, "permission denied"):
            SlurmExecutor().cancel("7")
        self.answer("squeue", {"stdout": "20|wf-a\n21_[3-4]|wf-arr\n21_1|wf-arr\n22|other\n"})
        self.assertEqual(SlurmExecutor().find_jobs("wf-"), {"wf-a": ["20"], "wf-arr": ["21"]})
        self.assertEqual(self.calls("squeue")[-1]["argv"], ["-h", "-u", "alice", "-o", "%i|%j"])
        self.assertEqual(SlurmExecutor(mode="dry-run").submit(self.resources(), ["true"]), "DRYRUN")
        self.assertEqual(len(self.calls("sbatch")), 0)

    def test_from_environment_and_describe(self):
        with _env(REFLOW_SBATCH="/opt/sbatch", REFLOW_MAX_ARRAY_SIZE="5000"):
            ex = SlurmExecutor.from_environment()
        self.assertEqual(ex.sbatch, "/opt/sbatch")
        self.assertEqual(ex.max_array_size, 5000)
        self.assertEqual(ex.describe()["binaries"],
                         {"sbatch": "/opt/sbatch", "scancel": "scancel", "sacct": "sacct", "squeue": "squeue"})

        class FakeConfig:
            def executor_binary(self, name):
                return {"scancel": "/cfg/scancel"}.get(name, name)

            def get(self, key, default=None):
                return {"executor.max_array_size": 77}.get(key, default)

        ex = SlurmExecutor.from_environment(FakeConfig())
        self.assertEqual((ex.scancel, ex.max_array_size), ("/cfg/scancel", 77))


class TestPBSCommands(FakeSchedulerCase):
    def test_submit_pbs_pro(self):
        self.answer("qstat-" + "--version", {"stdout": "pbs_version = 2022.1.1\n"})
        self.answer("qsub", {"stdout": "123[].srv\n"})
        ex = PBSExecutor.from_environment()
        options = {"queue": "workq", "account": "acct", "project": "P1", "mail_user": "a@b.c",
                   "mail_type": "END,FAIL", "place": "scatter", "resources": ["software=x"], "-r": "n",
                   "priority": 5}
        ids = ex.submit_array(self.resources(gpus=1, submit_options=options), ["python3", "flow.py"], 4, 2)
        self.assertEqual(ids, ["123[0].srv", "123[1].srv", "123[2].srv", "123[3].srv"])
        argv = self.calls("qsub")[0]["argv"]
        self.assertFlags(argv, ("-l", "select=1:ncpus=4:mem=3072mb:ngpus=1"), ("-l", "walltime=26:03:04"),
                         ("-N", "wf-task"), ("-J", "0-3%2"), ("-o", "/dev/null"), ("-e", "/dev/null"),
                         ("-q", "workq"), ("-A", "acct"), ("-P", "P1"), ("-M", "a@b.c"), ("-m", "ea"),
                         ("-l", "place=scatter"), ("-l", "software=x"), ("-r", "n"), ("-p", "5"))
        self.assertIn("-V", argv)
        script = Path(argv[-1])
        self.assertEqual(script.parent, self.work / ".reflow" / "jobs")
        self.assertEqual(script.stat().st_mode & 0o777, 0o700)
        text = script.read_text()
        self.assertIn(f"cd '{self.work}' || exit 1", text)
        self.assertIn('"${PBS_ARRAY_ID:-$PBS_JOBID}"', text)
        self.assertIn('"${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-}}"', text)
        self.assertEqual(len(self.calls("qstat")), 1)  # flavour detected once
        ex.submit(self.resources(), ["true"])
        self.assertEqual(len(self.calls("qstat")), 1)

    def test_one_element_array_is_a_plain_job(self):
        self.answer("qsub", {"stdout": "77.srv\n"})
        ex = PBSExecutor(array_flag="-J")
        self.assertEqual(ex.submit_array(self.resources(), ["true"], 1), ["77.srv"])
        argv = self.calls("qsub")[0]["argv"]
        self.assertNotIn("-J", argv)
        self.assertIn("export PBS_ARRAY_INDEX=0", Path(argv[-1]).read_text())

    def test_torque_flags(self):
        self.answer("qstat-" + "--version", {"stdout": "Version: 6.1.3\n"})
        self.answer("qsub", {"stdout": "5[].torque\n"})
        ex = PBSExecutor()
        ex.submit(self.resources(array="0-4", gpus=2, submit_options={"qos": "hi"}), ["true"])
        argv = self.calls("qsub")[0]["argv"]
        self.assertFlags(argv, ("-l", "nodes=1:ppn=4:gpus=2"), ("-l", "mem=3072mb"), ("-t", "0-4"), ("-l", "qos=hi"))

    def test_script_quotes_hostile_values(self):
        self.answer("qsub", {"stdout": "1.srv\n"})
        env = {f"V{i}": word for i, word in enumerate(HOSTILE)}
        PBSExecutor(array_flag="-J").submit(self.resources(env=env, workdir=None, output_path=None, error_path=None),
                                            _printf_command())
        text = Path(self.calls("qsub")[0]["argv"][-1]).read_text()
        self.assertEqual([line for line in text.splitlines() if line.startswith("#")],
                         ["#!/bin/sh", "# reflow pbs job script"])
        probe = "\n".join(f'printf "<%s>\\n" "$V{i}"' for i in range(len(HOSTILE)))
        proc = self.run_script(text.replace("exec printf", probe + "\nprintf", 1))
        self.assertEqual(proc.stdout, _expected_printf() * 2)

    def test_redirection_runs(self):
        self.answer("qsub", {"stdout": "1.srv\n"})
        logs = self.tmp / "sandbox" / "l o g s"
        logs.mkdir(parents=True)
        PBSExecutor(array_flag="-J").submit(self.resources(
            array="3-5", workdir=None, output_path=str(logs / "x-{job_id}_{array_index}.out"), error_path=None),
            ["sh", "-c", "echo out; echo err >&2"])
        text = Path(self.calls("qsub")[0]["argv"][-1]).read_text()
        self.run_script(text, {"PBS_ARRAY_ID": "9[].srv", "PBS_ARRAY_INDEX": "4"})
        self.assertEqual((logs / "x-9[].srv_4.out").read_text(), "out\nerr\n")

    def test_strict_options(self):
        ex = PBSExecutor(array_flag="-J")
        for options, pattern in [({"partitoin": "x"}, "'partitoin'.*Did you mean 'partition'"),
                                 ({"signal": "USR1@60"}, "'signal'"), ({"qos": "hi"}, "'qos'"),
                                 ({"mail_type": "SOMETIMES"}, "'SOMETIMES'")]:
            with self.subTest(options=options), self.assertRaisesRegex(ExecutorError, pattern):
                ex.submit(self.resources(submit_options=options), ["true"])
        self.assertEqual(self.calls("qsub"), [])

    def test_job_infos_and_cancel(self):
        data = {"Jobs": {"1.srv": {"job_state": "F", "Exit_status": 0},
                         "2[].srv": {"job_state": "F"}, "2[0].srv": {"job_state": "X", "Exit_status": 0},
                         "2[1].srv": {"job_state": "X", "Exit_status": 3}, "3.srv": {"job_state": "R"}}}
        self.answer("qstat", {"rc": 153, "stdout": json.dumps(data), "stderr": "qstat: Unknown Job Id 4.srv\n"})
        infos = PBSExecutor(array_flag="-J").job_infos(["1.srv", "2[0].srv", "2[1].srv", "2[].srv", "3.srv", "4.srv"])
        self.assertEqual(self.calls("qstat")[0]["argv"], ["-f", "-F", "json", "-x", "-t", "1.srv", "2[].srv",
                                                          "3.srv", "4.srv"])
        self.assertEqual(infos["1.srv"].state, "COMPLETED")
        self.assertEqual(infos["2[1].srv"], JobInfo("FAILED", "exit 3", 3))
        self.assertEqual(infos["2[].srv"], JobInfo("FAILED", "exit 3", 3))
        self.assertEqual(infos["3.srv"].state, "RUNNING")
        self.assertNotIn("4.srv", infos)
        self.answer("qdel", {"rc": 35, "stderr": "qdel: Job has finished 1.srv\nqdel: Unknown Job Id 4.srv\n"})
        PBSExecutor(array_flag="-J").cancel_many(["1.srv", "4.srv"])
        self.assertEqual(self.calls("qdel")[0]["argv"], ["1.srv", "4.srv"])

    def test_transient_exit_codes(self):
        self.answer("qsub", {"rc": 162, "stderr": "qsub: system error\n"}, {"rc": 183, "stderr": "x\n"},
                    {"stdout": "9.srv\n"})
        self.assertEqual(PBSExecutor(array_flag="-J").submit(self.resources(), ["true"]), "9.srv")
        self.assertEqual(len(self.calls("qsub")), 3)
        self.answer("qstat", {"rc": 1, "stderr": "qstat: Unauthorized Request\n"})
        with self.assertRaisesRegex(ExecutorError, "Unauthorized"):
            PBSExecutor(array_flag="-J").job_infos(["1.srv"])

    def test_find_jobs(self):
        data = {"Jobs": {"1.srv": {"Job_Name": "wf-a", "Job_Owner": "alice@login", "job_state": "R"},
                         "2[].srv": {"Job_Name": "wf-b", "Job_Owner": "alice@login", "job_state": "B"},
                         "3.srv": {"Job_Name": "wf-c", "Job_Owner": "bob@login", "job_state": "Q"}}}
        self.answer("qstat", {"stdout": json.dumps(data)})
        self.assertEqual(PBSExecutor(array_flag="-J").find_jobs("wf-"), {"wf-a": ["1.srv"], "wf-b": ["2[].srv"]})


class TestLSFCommands(FakeSchedulerCase):
    def test_submit_maps_every_resource(self):
        self.answer("bsub", {"stdout": "Job <314> is submitted to queue <normal>.\n"})
        options = {"queue": "normal", "account": "proj", "group": "grp", "mail_user": "a@b.c",
                   "mail_type": "BEGIN,END", "signal": "B:USR1@90", "resources": "select[type==X86_64]",
                   "-app": "big"}
        ids = LSFExecutor.from_environment().submit_array(
            self.resources(gpus=1, time_limit="00:30:01", submit_options=options), ["python3", "flow.py"], 3, 2)
        self.assertEqual(ids, ["314[1]", "314[2]", "314[3]"])
        call = self.calls("bsub")[0]
        argv = call["argv"]
        self.assertFlags(argv, ("-J", "wf-task[1-3]%2"), ("-n", "4"), ("-R", "span[hosts=1] rusage[mem=3072MB]"),
                         ("-M", "3072MB"), ("-W", "0:31"), ("-gpu", "num=1"),
                         ("-o", str(self.work / "logs" / "t-%J_%I.out")),
                         ("-e", str(self.work / "logs" / "t-%J_%I.err")),
                         ("-cwd", str(self.work)), ("-q", "normal"), ("-P", "proj"), ("-G", "grp"), ("-u", "a@b.c"),
                         ("-wa", "USR1"), ("-wt", "2"), ("-R", "select[type==X86_64]"), ("-app", "big"))
        self.assertIn("-B", argv)
        self.assertIn("-N", argv)
        self.assertTrue(call["stdin"].startswith("#!/bin/sh\n"))
        self.assertIn("exec python3 flow.py", call["stdin"])

    def test_array_must_start_at_one(self):
        with self.assertRaisesRegex(ExecutorError, "must start at 1"):
            LSFExecutor().submit(self.resources(array="0-3"), ["true"])
        with self.assertRaisesRegex(ExecutorError, "must start at 1"):
            SGEExecutor().submit(self.resources(array="0-3"), ["true"])

    def test_walltime_rounds_up_to_hours_and_minutes(self):
        self.answer("bsub", {"stdout": "Job <1> is submitted to default queue <normal>.\n"})
        LSFExecutor().submit(self.resources(time_limit="1-00:00:30", output_path="/l/{job_id}{array_index}.o",
                                            error_path=None, submit_options=None), ["true"])
        argv = self.calls("bsub")[0]["argv"]
        self.assertFlags(argv, ("-W", "24:01"), ("-o", "/l/%J.o"), ("-J", "wf-task"))
        self.assertNotIn("-e", argv)

    def test_strict_and_stdin_quoting(self):
        with self.assertRaisesRegex(ExecutorError, "'qos'"):
            LSFExecutor().submit(self.resources(submit_options={"qos": "x"}), ["true"])
        with self.assertRaisesRegex(ExecutorError, "'walltime'"):
            LSFExecutor().submit(self.resources(submit_options={"walltime": "x"}), ["true"])
        self.answer("bsub", {"stdout": "Job <2> is submitted to queue <q>.\n"})
        env = {f"V{i}": word for i, word in enumerate(HOSTILE)}
        LSFExecutor().submit(self.resources(env=env), _printf_command())
        text = self.calls("bsub")[0]["stdin"]
        probe = "\n".join(f'printf "<%s>\\n" "$V{i}"' for i in range(len(HOSTILE)))
        proc = self.run_script(text.replace("exec printf", probe + "\nprintf", 1))
        self.assertEqual(proc.stdout, _expected_printf() * 2)

    def test_job_infos_cancel_find(self):
        records = [{"JOBID": "5", "JOBINDEX": "0", "STAT": "DONE", "EXIT_CODE": "", "EXIT_REASON": "",
                    "PEND_REASON": ""},
                   {"JOBID": "6", "JOBINDEX": "1", "STAT": "EXIT", "EXIT_CODE": "2", "EXIT_REASON": "",
                    "PEND_REASON": ""},
                   {"JOBID": "6", "JOBINDEX": "2", "STAT": "RUN", "EXIT_CODE": "", "EXIT_REASON": "",
                    "PEND_REASON": ""}, {"JOBID": "7", "ERROR": "Job <7> is not found"}]
        self.answer("bjobs", {"rc": 255, "stdout": json.dumps({"COMMAND": "bjobs", "JOBS": 4, "RECORDS": records})})
        infos = LSFExecutor().job_infos(["5", "6[1]", "6[2]", "6", "7"])
        self.assertEqual(self.calls("bjobs")[0]["argv"],
                         ["-a", "-json", "-o", "jobid jobindex stat exit_code exit_reason pend_reason", "5", "6", "7"])
        self.assertEqual(infos["5"].state, "COMPLETED")
        self.assertEqual(infos["6[1]"], JobInfo("FAILED", "exit 2", 2))
        self.assertEqual(infos["6"].state, "RUNNING")
        self.assertNotIn("7", infos)
        self.answer("bkill", {"rc": 255, "stdout": "Job <5> is being terminated\n",
                              "stderr": "Job <6>: Job has already finished\nJob <9>: No matching job found\n"})
        LSFExecutor().cancel_many(["5", "6[1]", "9"])
        self.assertEqual(self.calls("bkill")[0]["argv"], ["5", "6[1]", "9"])
        self.answer("bjobs", {"stdout": json.dumps({"RECORDS": [{"JOBID": "8", "JOB_NAME": "wf-x[3]"},
                                                                {"JOBID": "8", "JOB_NAME": "wf-x[4]"},
                                                                {"JOBID": "9", "JOB_NAME": "other"}]})})
        (self.tmp / "bjobs.count").unlink()
        self.assertEqual(LSFExecutor().find_jobs("wf-"), {"wf-x": ["8"]})

    def test_empty_255_is_transient(self):
        self.answer("bsub", {"rc": 255}, {"stdout": "Job <3> is submitted to queue <q>.\n"})
        self.assertEqual(LSFExecutor().submit(self.resources(), ["true"]), "3")
        self.assertEqual(len(self.calls("bsub")), 2)


class TestSGECommands(FakeSchedulerCase):
    def test_submit_maps_every_resource(self):
        self.answer("qsub", {"stdout": "55.1-3:1\n"})
        options = {"queue": "all.q", "account": "acct", "project": "P", "mail_user": "a@b.c", "mail_type": "END",
                   "pe": "threads", "resources": ["scratch=1G"], "-notify": True}
        ids = SGEExecutor.from_environment().submit_array(self.resources(gpus=1, submit_options=options),
                                                          ["python3", "flow.py"], 3, 2)
        self.assertEqual(ids, ["55.1", "55.2", "55.3"])
        argv = self.calls("qsub")[0]["argv"]
        self.assertEqual(argv[0], "-terse")
        self.assertFlags(argv, ("-N", "wf-task"), ("-l", "h_rt=26:03:04"), ("-l", "h_vmem=768M"),
                         ("-wd", str(self.work)), ("-S", "/bin/sh"), ("-l", "gpu=1"), ("-t", "1-3"), ("-tc", "2"),
                         ("-o", str(self.work / "logs" / "t-$JOB_ID_$TASK_ID.out")),
                         ("-e", str(self.work / "logs" / "t-$JOB_ID_$TASK_ID.err")), ("-q", "all.q"), ("-A", "acct"),
                         ("-P", "P"), ("-M", "a@b.c"), ("-m", "e"), ("-l", "scratch=1G"))
        self.assertEqual(argv[argv.index("-pe") + 1:argv.index("-pe") + 3], ["threads", "4"])
        self.assertIn("-V", argv)
        self.assertIn("-notify", argv)

    def test_single_cpu_singleton(self):
        self.answer("qsub", {"stdout": "56\n"})
        SGEExecutor().submit(self.resources(cpus=1, workdir=None, error_path=None,
                                            output_path="o-{job_id}{array_index}.txt", submit_options=None), ["true"])
        argv = self.calls("qsub")[0]["argv"]
        self.assertNotIn("-pe", argv)
        self.assertIn("-cwd", argv)
        self.assertFlags(argv, ("-o", "o-$JOB_ID.txt"), ("-j", "y"), ("-l", "h_vmem=3072M"))

    def test_strict_options_and_paths(self):
        for options, pattern in [({"qos": "x"}, "'qos'"), ({"signal": "USR1"}, "'signal'"),
                                 ({"hold_jd": "1"}, "Did you mean 'hold_jid'")]:
            with self.subTest(options=options), self.assertRaisesRegex(ExecutorError, pattern):
                SGEExecutor().submit(self.resources(submit_options=options), ["true"])
        with self.assertRaisesRegex(ExecutorError, "may not contain"):
            SGEExecutor().submit(self.resources(output_path="/a:b/x"), ["true"])

    def test_script_quotes_hostile_values(self):
        self.answer("qsub", {"stdout": "1\n"})
        env = {f"V{i}": word for i, word in enumerate(HOSTILE)}
        SGEExecutor().submit(self.resources(env=env), _printf_command())
        text = Path(self.calls("qsub")[0]["argv"][-1]).read_text()
        self.assertFalse([line for line in text.splitlines()[2:] if line.startswith("#")])
        probe = "\n".join(f'printf "<%s>\\n" "$V{i}"' for i in range(len(HOSTILE)))
        proc = self.run_script(text.replace("exec printf", probe + "\nprintf", 1))
        self.assertEqual(proc.stdout, _expected_printf() * 2)

    def test_job_infos_qstat_then_qacct(self):
        self.answer("qstat", {"stdout": TestSGEParsers.QSTAT_XML})
        self.answer("qacct", {"stdout": "==============================================================\n"
                                        "jobnumber    130\ntaskid       undefined\nfailed       0\nexit_status  3\n"})
        infos = SGEExecutor().job_infos(["123.7", "123.9", "123", "124", "125", "130", "123.2"])
        self.assertEqual(self.calls("qstat")[0]["argv"], ["-xml", "-u", "alice"])
        self.assertEqual([c["argv"] for c in self.calls("qacct")], [["-j", "130"], ["-j", "123"]])
        self.assertEqual(infos["123.7"].state, "RUNNING")
        self.assertEqual(infos["123.9"].state, "PENDING")
        self.assertEqual(infos["123"].state, "RUNNING")
        self.assertEqual(infos["124"].state, "PENDING")
        self.assertEqual(infos["125"].state, "FAILED")
        self.assertEqual(infos["130"], JobInfo("FAILED", "exit 3", 3))
        self.assertNotIn("123.2", infos)

    def test_cancel_and_find(self):
        self.answer("qdel", {"rc": 1, "stdout": 'alice has registered the job 5 for deletion\n'
                                                'denied: job "6" does not exist\n'})
        SGEExecutor().cancel_many(["5", "6", "7.2"])
        self.assertEqual(self.calls("qdel")[0]["argv"], ["5,6,7.2"])
        self.answer("qstat", {"stdout": TestSGEParsers.QSTAT_XML})
        self.assertEqual(SGEExecutor().find_jobs("wf-"), {"wf-a&b": ["123"]})


class TestFluxCommands(FakeSchedulerCase):
    def test_submit_array_maps_every_resource(self):
        ids = [1000, 1001, 1002]
        self.answer("flux-submit", {"stdout": "".join(reflow._flux_f58(n).replace("f", "ƒ", 1) + "\n" for n in ids)})
        options = {"queue": "batch", "account": "bank1", "signal": "B:USR1@60", "setattr": ["a=1", "b=2"],
                   "exclusive": True, "urgency": None}
        got = FluxExecutor.from_environment().submit_array(
            self.resources(gpus=1, time_limit="00:30:00", submit_options=options), ["python3", "flow.py"], 3, 2)
        self.assertEqual(got, ["1000", "1001", "1002"])
        argv = self.calls("flux")[0]["argv"]
        self.assertEqual(argv[0], "submit")
        self.assertFlags(argv, ("--job-name", "wf-task"), ("-n", "1"), ("-c", "4"), ("-t", "30m"), ("-g", "1"),
                         ("--cc", "0-2"), ("--output", str(self.work / "logs" / "t-{{id.dec}}_{cc}.out")),
                         ("--error", str(self.work / "logs" / "t-{{id.dec}}_{cc}.err")), ("--cwd", str(self.work)),
                         ("-q", "batch"), ("-B", "bank1"), ("--signal", "SIGUSR1@60s"), ("--setattr", "a=1"),
                         ("--setattr", "b=2"))
        self.assertIn("--exclusive", argv)
        self.assertTrue(os.access(argv[-1], os.X_OK))

    def test_singleton_dependency_and_errors(self):
        self.answer("flux-submit", {"stdout": "f2\n"})
        ex = FluxExecutor()
        self.assertEqual(ex.submit(self.resources(submit_options=ex.dependency_options(["5", "6"], "afterok")),
                                   ["true"]), "1")
        argv = self.calls("flux")[0]["argv"]
        self.assertIn("--dependency=afterok:5", argv)
        self.assertIn("--dependency=afterok:6", argv)
        for options, pattern in [({"qos": "x"}, "'qos'"), ({"mail_user": "x@y"}, "'mail_user'")]:
            with self.subTest(options=options), self.assertRaisesRegex(ExecutorError, pattern):
                ex.submit(self.resources(submit_options=options), ["true"])
        self.answer("flux-submit", {"stdout": "f2\n"})
        with self.assertRaisesRegex(ExecutorError, "printed 1 ids, expected 2"):
            ex.submit_array(self.resources(), ["true"], 2)

    def test_job_infos_cancel_find(self):
        self.answer("flux-jobs", {"rc": 1, "stdout": "1000|INACTIVE|COMPLETED|0|\n1001|RUN|||\n",
                                  "stderr": "flux-jobs: ERROR: 999: unknown job id\n"})
        infos = FluxExecutor().job_infos(["1000", reflow._flux_f58(1001), "999"])
        argv = self.calls("flux")[0]["argv"]
        self.assertEqual(argv[:4], ["jobs", "-a", "-n", "-o"])
        self.assertEqual(argv[5:], ["1000", reflow._flux_f58(1001), "999"])
        self.assertEqual(infos["1000"].state, "COMPLETED")
        self.assertEqual(infos[reflow._flux_f58(1001)].state, "RUNNING")
        self.assertNotIn("999", infos)
        self.answer("flux-cancel", {"rc": 1, "stderr": "flux-cancel: ERROR: f2: job is inactive\n"})
        FluxExecutor().cancel_many(["1", "2"])
        self.assertEqual(self.calls("flux")[-1]["argv"], ["cancel", "1", "2"])
        (self.tmp / "flux-jobs.count").unlink()
        self.answer("flux-jobs", {"stdout": "1000|wf-a\n1001|wf-a\n1002|zzz\n"})
        self.assertEqual(FluxExecutor().find_jobs("wf-"), {"wf-a": ["1000", "1001"]})

    def test_script_quotes_hostile_values(self):
        self.answer("flux-submit", {"stdout": "f2\n"})
        env = {f"V{i}": word for i, word in enumerate(HOSTILE)}
        FluxExecutor().submit(self.resources(env=env), _printf_command())
        text = Path(self.calls("flux")[0]["argv"][-1]).read_text()
        probe = "\n".join(f'printf "<%s>\\n" "$V{i}"' for i in range(len(HOSTILE)))
        proc = self.run_script(text.replace("exec printf", probe + "\nprintf", 1))
        self.assertEqual(proc.stdout, _expected_printf() * 2)


# =============================================================================
# (c, d) Live runs: real Slurm and Grid Engine, PBS/LSF/Flux emulators
# =============================================================================


def _works(argv, env=None):
    """Tell whether a probe command runs and exits 0 within 15 s."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=15, env=env).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LiveSchedulerMixin:
    """The same short scenarios against every live scheduler (each test < 30 s)."""

    #: argv that exits 0 when the scheduler answers.
    PROBE = ()
    #: Extra environment for the scheduler commands (emulator state dir, SGE cell).
    ENV = {}
    #: Walltime for the walltime-kill test in seconds; None skips it (Slurm's minimum is a minute).
    WALLTIME = None
    #: How long to wait for jobs to finish.
    TIMEOUT = 120  # generous: a busy queue delays starts; a healthy one answers in seconds
    #: JobInfo of a job whose afterok dependency failed; None skips the test.
    NEVER = JobInfo("FAILED", "DEPENDENCY_NEVER_SATISFIED")
    #: Emulator ``fail_code`` knobs whose transient failures submit must survive.
    FAULTS = ()
    #: Whether a begin time a few seconds ahead is honoured quickly.
    DELAY = True

    @classmethod
    def setUpClass(cls):
        cls._saved_env = {key: os.environ.get(key) for key in cls.ENV}
        os.environ.update(cls.live_env())
        if not cls.PROBE or not _works(cls.PROBE):
            _restore_env(cls._saved_env)
            message = f"{cls.__name__}: scheduler not available ({' '.join(cls.PROBE) or 'no probe'})"
            if os.environ.get("CI") == "true":
                raise AssertionError(message)
            raise unittest.SkipTest(message)

    @classmethod
    def tearDownClass(cls):
        _restore_env(cls._saved_env)

    @classmethod
    def live_env(cls):
        return dict(cls.ENV)

    def setUp(self):
        self.work = Path(tempfile.mkdtemp(prefix=f"reflow-live-{self.executor().name}-", dir="/tmp"))
        os.chmod(self.work, 0o755)
        self.addCleanup(shutil.rmtree, self.work, True)
        self.tag = f"rfl{os.getpid() % 10000}{int(time.time() * 1000) % 100000}"
        self.submitted = []
        self.addCleanup(self._cancel_leftovers)

    def _cancel_leftovers(self):
        with contextlib.suppress(Exception):
            self.executor().cancel_many(self.submitted)

    def executor(self):
        raise NotImplementedError

    def res(self, name, **changes):
        values = dict(job_name=f"{self.tag}-{name}", cpus=1, time_limit="00:02:00", mem="200M",
                      output_path=str(self.work / "logs" / f"{name}-{{job_id}}_{{array_index}}.out"),
                      error_path=str(self.work / "logs" / f"{name}-{{job_id}}_{{array_index}}.err"),
                      workdir=str(self.work), env={"RFL_VALUE": "a b $(touch pwned) 'q' \"d\"\n#$ -N x"})
        (self.work / "logs").mkdir(exist_ok=True)
        values.update(changes)
        return JobResources(**values)

    def submit(self, resources, script):
        job_id = self.executor().submit(resources, ["sh", "-c", script])
        self.submitted.append(job_id)
        return job_id

    def wait(self, job_ids, timeout=None, until=reflow.FINAL_JOB_STATES):
        """Poll job_infos (one call per round) until every id reaches ``until``."""
        deadline = time.time() + (timeout or self.TIMEOUT)
        infos = {}
        while time.time() < deadline:
            infos = self.executor().job_infos(job_ids)
            if all(j in infos and infos[j].state in until for j in job_ids):
                return infos
            time.sleep(0.5)
        self.fail(f"jobs did not reach {sorted(until)} in time: {infos}")

    def test_singleton_completes_with_env_workdir_and_logs(self):
        job = self.submit(self.res("one"), 'printf "%s" "$RFL_VALUE" > value.txt; pwd > pwd.txt; echo hello; '
                                           'echo oops >&2; test "$REFLOW_JOB" = 1')
        info = self.wait([job])[job]
        self.assertEqual(info.state, "COMPLETED", info)
        self.assertEqual((self.work / "value.txt").read_text(), "a b $(touch pwned) 'q' \"d\"\n#$ -N x")
        self.assertEqual(Path((self.work / "pwd.txt").read_text().strip()).resolve(), self.work.resolve())
        self.assertFalse(list(self.work.glob("pwned")))
        outs = self._logs("one", ".out")
        self.assertEqual([p.name for p in outs], [f"one-{job}_.out"])
        self.assertIn("hello", outs[0].read_text())
        self.assertIn("oops", self._logs("one", ".err")[0].read_text())
        self.assertEqual(self.executor().job_state(job), "COMPLETED")

    def _logs(self, name, suffix):
        """Return the log files of a job, waiting a moment for schedulers that copy them at the end."""
        for _ in range(20):
            found = sorted((self.work / "logs").glob(f"{name}-*{suffix}"))
            if found:
                return found
            time.sleep(0.25)
        return []

    def test_array_with_throttle(self):
        ex = self.executor()
        var = ex.array_index_env_var
        ids = ex.submit_array(self.res("arr"), ["sh", "-c", f'echo "$RFL_VALUE" > "idx_${{{var}}}"; sleep 1'], 5, 2)
        self.submitted += ids
        self.assertEqual(len(ids), 5)
        infos = self.wait(ids)
        self.assertEqual([infos[j].state for j in ids], ["COMPLETED"] * 5, infos)
        base = ex.array_base
        self.assertEqual(sorted(p.name for p in self.work.glob("idx_*")), sorted(f"idx_{base + i}" for i in range(5)))
        expected = sorted(f"arr-{ex._master_id(j)}_{base + k}.out" for k, j in enumerate(ids))
        for _ in range(20):  # PBS copies logs at the end, others may lag
            if [p.name for p in self._logs("arr", ".out")] == expected:
                break
            time.sleep(0.25)
        self.assertEqual([p.name for p in self._logs("arr", ".out")], expected)

    def test_dependency_chain_and_failure(self):
        ex = self.executor()
        first = self.submit(self.res("a"), "sleep 2; touch a.done")
        second = self.submit(self.res("b", submit_options=ex.dependency_options([first], "afterany")),
                             "test -e a.done && touch b.done")
        bad = self.submit(self.res("bad", submit_options=ex.dependency_options([second], "afterok")), "exit 3")
        infos = self.wait([first, second, bad])
        self.assertEqual(infos[first].state, "COMPLETED")
        self.assertEqual(infos[second].state, "COMPLETED")
        self.assertEqual(infos[bad], JobInfo("FAILED", "exit 3", 3))

    def test_cancel_running_and_pending(self):
        ex = self.executor()
        running = self.submit(self.res("long"), "sleep 120")
        pending = self.submit(self.res("later", submit_options=ex.dependency_options([running])), "true")
        self.wait([running], until={"RUNNING"})
        found = ex.find_jobs(f"{self.tag}-")
        self.assertIn(ex._master_id(running), found.get(ex._job_name(f"{self.tag}-long"), []), found)
        ex.cancel_many([running, pending])
        ex.cancel(running)  # again: already gone is fine
        infos = self.executor().job_infos([running, pending])
        deadline = time.time() + self.TIMEOUT
        while time.time() < deadline and infos.get(running, JobInfo("RUNNING")).state not in reflow.FINAL_JOB_STATES:
            time.sleep(0.5)
            infos = self.executor().job_infos([running, pending])
        self.assertEqual(infos[running].state, "CANCELLED", infos)
        self.assertNotIn(infos.get(pending, JobInfo("CANCELLED")).state, {"PENDING", "RUNNING", "COMPLETED"})

    def test_walltime_kill(self):
        if self.WALLTIME is None:
            self.skipTest("the shortest walltime of this scheduler takes too long")
        job = self.submit(self.res("slow", time_limit=self.WALLTIME), "sleep 120")
        info = self.wait([job], timeout=reflow.parse_time(self.WALLTIME) + 25)[job]
        self.assertEqual(info.state, "TIMEOUT", info)

    def test_afterok_on_failed_job_never_satisfied(self):
        if self.NEVER is None:
            self.skipTest("this scheduler has no afterok")
        ex = self.executor()
        bad = self.submit(self.res("bad"), "exit 1")
        child = self.submit(self.res("child", submit_options=ex.dependency_options([bad], "afterok")), "true")
        infos = self.wait([bad, child])
        self.assertEqual(infos[bad], JobInfo("FAILED", "exit 1", 1))
        self.assertEqual(infos[child], self.NEVER)

    def test_transient_failures_are_retried(self):
        if not self.FAULTS:
            self.skipTest("no fault injection for a real scheduler")
        for code in self.FAULTS:
            with self.subTest(code=code):
                (Path(self._state) / "knobs.json").write_text(json.dumps({"fail_next": 2, "fail_code": code}))
                job = self.submit(self.res("retry"), "true")
                self.assertEqual(self.wait([job])[job].state, "COMPLETED")

    def test_delay_options(self):
        if not self.DELAY:
            self.skipTest("begin times have minute resolution here")
        start = time.time()
        job = self.submit(self.res("delayed", submit_options=self.executor().delay_options(4)), "date +%s > began")
        self.assertEqual(self.wait([job])[job].state, "COMPLETED")
        self.assertGreaterEqual(int((self.work / "began").read_text()), int(start) + 3)

    def test_unknown_id_and_cancel_of_unknown(self):
        ex = self.executor()
        self.assertEqual(ex.job_infos([self.unknown_id()]), {})
        ex.cancel_many([self.unknown_id()])

    def unknown_id(self):
        return "9999999"


class LiveSlurm(LiveSchedulerMixin, unittest.TestCase):
    PROBE = ("sinfo", "-h")

    def executor(self):
        return SlurmExecutor()


class LiveSGE(LiveSchedulerMixin, unittest.TestCase):
    PROBE = ("qstat",)
    ENV = {"SGE_ROOT": os.environ.get("SGE_ROOT", "/var/lib/gridengine"),
           "SGE_CELL": os.environ.get("SGE_CELL", "default")}
    WALLTIME = "00:00:05"
    NEVER = None  # hold_jid is afterany only

    def executor(self):
        return SGEExecutor()

    def test_job_name_starting_with_digit(self):
        job = self.submit(self.res("x", job_name="2024-run"), "true")
        self.assertEqual(self.wait([job])[job].state, "COMPLETED")


class _EmulatorMixin(LiveSchedulerMixin):
    """Run the emulator of ci/emulators/<NAME>/bin with a private state directory."""

    NAME = ""
    WALLTIME = "00:00:05"
    EXTRA_ENV = {}

    @classmethod
    def live_env(cls):
        cls._state = tempfile.mkdtemp(prefix=f"reflow-emu-{cls.NAME}-")
        return dict(cls.ENV, EMU_STATE_DIR=cls._state)

    @classmethod
    def setUpClass(cls):
        cls.ENV = dict(cls.EXTRA_ENV, EMU_STATE_DIR="", REFLOW_SCHED_BACKOFF="0.1")
        cls.bin = EMULATORS / cls.NAME / "bin"
        cls.PROBE = (str(cls.bin / cls.PROBE_COMMAND), *cls.PROBE_ARGS)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._state, True)


class LivePBSEmulator(_EmulatorMixin, unittest.TestCase):
    NAME, PROBE_COMMAND, PROBE_ARGS = "pbs", "qstat", ()
    NEVER = JobInfo("CANCELLED", "deleted before running")  # the server deletes the dependant
    FAULTS = ("162", "171", "183", "connect")

    def executor(self):
        return PBSExecutor(qsub=str(self.bin / "qsub"), qdel=str(self.bin / "qdel"), qstat=str(self.bin / "qstat"))

    def unknown_id(self):
        return "9999999.emu"


class LiveLSFEmulator(_EmulatorMixin, unittest.TestCase):
    NAME, PROBE_COMMAND, PROBE_ARGS = "lsf", "bjobs", ("-a",)
    WALLTIME = "00:01:00"  # -W takes whole minutes: the emulator scales them
    EXTRA_ENV = {"EMU_WALLTIME_SCALE": "0.1"}
    DELAY = False  # -b takes whole minutes
    NEVER = None  # afterok waits with ended(): LSF would keep a done() dependant pending for ever
    FAULTS = ("down", "daemon", "lim", "busy", "empty", "empty0")

    def executor(self):
        return LSFExecutor(bsub=str(self.bin / "bsub"), bkill=str(self.bin / "bkill"), bjobs=str(self.bin / "bjobs"))


class LiveFluxEmulator(_EmulatorMixin, unittest.TestCase):
    NAME, PROBE_COMMAND, PROBE_ARGS = "flux", "flux", ("jobs", "-a")
    FAULTS = ("",)

    def executor(self):
        return FluxExecutor(flux=str(self.bin / "flux"))


@contextlib.contextmanager
def _env(**values):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        _restore_env(saved)


# =============================================================================
# Backends: one end-to-end suite on six executors
# =============================================================================

_BK_EMULATORS = Path(os.environ.get("REFLOW_EMULATORS") or Path(reflow.__file__).resolve().parent / "ci" / "emulators")
_BK_SLOW = os.environ.get("REFLOW_TEST_SLOW") == "1"
#: REFLOW_TEST_TIMINGS=1 prints how long the pipeline and the wide array took on each backend.
_BK_TIMINGS = os.environ.get("REFLOW_TEST_TIMINGS") == "1"
#: Separators of the wrapper log: fields (argv words) and records.
_BK_FS, _BK_RS = "\x1f", "\x1e\n"

#: A pipeline using every wiring mode, plus a Flow included with a prefix (3 levels deep).
_BK_PIPELINE = """
from typing import Annotated
from reflow import Flow, Param, Result, Workflow

sub = Flow("sub")


@sub.job(mem="200M")
def make(k: Annotated[int, Param(help="size of the included flow")] = 2) -> list[int]:
    return list(range(1, k + 1))


@sub.array_job(mem="200M")
def inc(x: int = Result(step="make")) -> int:
    return x + 100


wf = Workflow("WFNAME")
wf.include(sub, prefix="sub")


@wf.job(mem="200M")
def seed(n: Annotated[int, Param(help="fan-out width")] = 3) -> list[int]:
    return list(range(1, n + 1))


@wf.job(array=True, mem="200M")
def pairs(x: int = Result(step="seed")) -> list[int]:  # fan-out
    return [x, 10 * x]


@wf.job(array=True, mem="200M")
def scaled(x: int = Result(step="seed"),
           everything: list[int] = Result(step="seed", broadcast=True)) -> int:  # fan-out + broadcast
    return x * 100 + len(everything)


@wf.job(array=True, mem="200M")
def chained(pair: list[int] = Result(step="pairs")) -> int:  # chain
    return sum(pair)


@wf.job(array=True, mem="200M")
def flat(v: int = Result(step="pairs")) -> int:  # chain-flatten
    return v + 1


@wf.job(mem="200M")
def summary(scaled_all: list[int] = Result(step="scaled"),  # gather
            flat_pairs: list[int] = Result(step="pairs"),  # gather-flatten
            sub_all: list[int] = Result(step="sub_inc")) -> dict:  # gather from the included flow
    return {"scaled": scaled_all, "pairs": flat_pairs, "sub": sub_all}


if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: Element 1 fails until the file FIXED exists.
_BK_FLAKY = """
import os
from reflow import Result, Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M")
def seed() -> list[int]:
    return [0, 1, 2]


@wf.job(array=True, mem="200M")
def square(x: int = Result(step="seed")) -> int:
    if x == 1 and not os.path.exists(FIXED):
        raise RuntimeError(f"boom at {x}")
    return x * x


FIXED = "FIXEDPATH"

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: Seven elements packed three per job; element 4 fails until FIXED exists.
_BK_PACKED = """
import os
from reflow import Result, Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M")
def seed() -> list[int]:
    return list(range(7))


@wf.job(array=True, mem="200M", time="00:02:00", elements_per_job=3)
def square(x: int = Result(step="seed")) -> int:
    print(f"squaring {x}")
    if x == 4 and not os.path.exists(FIXED):
        raise RuntimeError(f"boom at {x}")
    return x * x


FIXED = "FIXEDPATH"

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: A tiny pipeline run entirely inside the dispatch job (inline=True).
_BK_INLINE = """
from reflow import Result, Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M", inline=True)
def seed() -> list[int]:
    return list(range(5))


@wf.job(array=True, mem="200M", inline=True)
def square(x: int = Result(step="seed")) -> int:
    return x * x


@wf.job(mem="200M", inline=True)
def total(values: list[int] = Result(step="square")) -> int:
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: Two elements that note their pid in MARKS, then sleep for a long time.
_BK_SLEEPY = """
import os, time
from reflow import Result, Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M")
def seed() -> list[int]:
    return [0, 1]


@wf.job(array=True, mem="200M", time="00:10:00")
def sleepy(x: int = Result(step="seed")) -> int:
    with open(os.path.join(MARKS, f"{x}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(300)
    return x


MARKS = "MARKSPATH"

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: One task that outlives its walltime (or is killed for memory by the emulators' oom knob).
_BK_HOG = """
import time
from reflow import Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M", time="WALLTIME")
def hog() -> int:
    time.sleep(SLEEP)
    return 1


SLEEP = 150

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: A 1,000-element array of tiny elements.
_BK_WIDE = """
from reflow import Result, Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M")
def seed(n: int = 1000) -> list[int]:
    return list(range(n))


@wf.job(array=True, mem="200M", time="00:05:00")
def tiny(x: int = Result(step="seed")) -> int:
    return x + 1


if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""


def _bk_probe(argv: List[str], timeout: float = 30) -> Tuple[bool, str]:
    """Run a command; return (whether it exited 0, its stdout, with stderr after it when it failed)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return proc.returncode == 0, proc.stdout + ("" if proc.returncode == 0 else proc.stderr)


def _bk_emucore():
    """Import ci/emulators/emucore.py once (it kills an emulator's runners and jobs)."""
    module = sys.modules.get("_bk_emucore")
    if module is None:
        spec = importlib.util.spec_from_file_location("_bk_emucore", _BK_EMULATORS / "emucore.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_bk_emucore"] = module
        spec.loader.exec_module(module)
    return module


def _bk_rows(text: str) -> List[Tuple[str, str, str]]:
    """Split ``id|name|state`` lines of a job listing."""
    return [tuple(line.strip().split("|", 2)) for line in text.splitlines() if line.count("|") >= 2]


def _bk_tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a text file (or why it could not be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<{exc}>"


class _BackendScenarios:
    """The end-to-end scenarios (a mixin: each backend's TestCase sets the class attributes and probes)."""

    #: Executor name passed to ``wf.submit(executor=...)``.
    BACKEND = ""
    #: Scheduler commands to wrap (logged, then the real one runs): kind of each command.
    COMMANDS: Dict[str, str] = {}
    #: Regex of an element id of a native array (a per-element call); None when elements are jobs (Flux).
    ELEMENT_ID: Optional[str] = r"^\d+_\d+$"
    #: Seconds the pipeline may take.
    PIPELINE_TIMEOUT = 150
    #: Whether the walltime scenario is slow (needs REFLOW_TEST_SLOW=1) and the walltime it uses.
    SLOW_WALLTIME, WALLTIME = False, "00:01:00"
    #: Whether the 1,000-element array needs REFLOW_TEST_SLOW=1.
    SLOW_WIDE = True

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        problem = cls.unavailable()
        if problem:
            message = f"{cls.__name__}: {problem}"
            if os.environ.get("CI") == "true":
                raise AssertionError(message + " (CI=true: a missing scheduler is a failure)")
            raise unittest.SkipTest(message)

    @classmethod
    def unavailable(cls) -> str:
        """Return why the backend cannot run here ("" when it can)."""
        return ""

    # ------------------------------------------------------------ set-up

    def setUp(self) -> None:
        super().setUp()
        self._stack = contextlib.ExitStack()
        try:
            self._set_up_backend()
        except BaseException:
            self._stack.close()
            super().tearDown()
            raise

    def _set_up_backend(self) -> None:
        """Set the backend's environment and put the logging wrappers first on PATH."""
        (self.tmp / "home").mkdir()
        self.tag = "t" + uuid.uuid4().hex[:6]
        self.runs: List[Any] = []
        self.call_log = self.tmp / "calls.log"
        self.call_log.touch()
        self.real: Dict[str, str] = {}
        env = dict(self.backend_env(), REFLOW_LOST_JOB_GRACE="0", REFLOW_SCHED_BACKOFF="0.2",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(Path(reflow.__file__).resolve().parent),
                                                            os.environ.get("PYTHONPATH")])))
        self._stack.enter_context(mock_env(**env))
        if not self.COMMANDS:
            return
        wrappers = self.tmp / "wrap"
        wrappers.mkdir()
        search = os.environ["PATH"]
        for name in sorted({command.split()[0] for command in self.COMMANDS}):
            real = shutil.which(name, path=search)
            if real is None:
                raise AssertionError(f"{name} is not on PATH")
            self.real[name] = real
            self._write_wrapper(wrappers / name, name, real)
        self._stack.enter_context(mock_env(PATH=f"{wrappers}{os.pathsep}{search}"))

    def _write_wrapper(self, path: Path, name: str, real: str) -> None:
        """Write a wrapper that appends its caller's pid and its argv to the call log, then execs the real command."""
        path.write_text("#!/bin/sh\n"
                        f"record=$(printf '%s\\037' \"$PPID\" {shlex.quote(name)} \"$@\")\n"
                        f"printf '%s\\036\\n' \"$record\" >> {shlex.quote(str(self.call_log))}\n"
                        f"exec {shlex.quote(real)} \"$@\"\n")
        path.chmod(0o755)

    def backend_env(self) -> Dict[str, Optional[str]]:
        """Return environment variables the backend needs during a test."""
        return {}

    def tearDown(self) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                for run in self.runs:
                    with contextlib.suppress(Exception):
                        if run.state == "RUNNING":
                            run.cancel()
                    run.store.close()
            with contextlib.suppress(Exception):
                self.kill_leftovers()
        finally:
            self._stack.close()
            super().tearDown()

    def kill_leftovers(self) -> None:
        """Cancel every job of this test the scheduler still lists (by job name)."""

    # ----------------------------------------------------------- helpers

    def flow(self, template: str, scenario: str, **values: str):
        """Load a workflow module named ``<scenario><tag>`` from a template."""
        source = template.replace("WFNAME", f"{scenario}{self.tag}")
        for key, value in values.items():
            source = source.replace(key, value)
        return load_flow(self.tmp, source)

    def submit(self, module, run_dir: str = "run", **params: Any):
        """Submit a run on this backend and remember it for cleanup."""
        run = module.wf.submit(self.tmp / run_dir, executor=self.BACKEND, **params)
        self.runs.append(run)
        return run

    def wait(self, run, timeout: float, expected: Optional[str] = None) -> str:
        """Wait for a run to end; fail with diagnostics on a timeout or an unexpected state."""
        try:
            state = run.wait(timeout=timeout, poll=0.25)
        except TimeoutError as exc:
            self.fail(f"{exc}\n{self.diagnose(run)}")
        if expected is not None and state != expected:
            self.fail(f"run ended {state}, expected {expected}\n{self.diagnose(run)}")
        return state

    def diagnose(self, run) -> str:
        """Describe a run for a failure message: state, instances, log tails, scheduler calls."""
        lines = []
        try:
            status = run.status(as_dict=True)
            lines.append(f"run {run.run_id}: {status['run']['status']}; summary {json.dumps(status['summary'])}")
            for inst in status["instances"]:
                if inst["state"] != "SUCCESS" or inst["task_name"] in ("summary",):
                    text = (inst.get("error_text") or "").strip().splitlines()[-3:]
                    lines.append(f"  {inst['task_name']}[{inst['array_index']}] {inst['state']} job={inst['job_id']} "
                                 f"attempt={inst['attempt']} reason={inst.get('reason')!r} error={' | '.join(text)}")
        except Exception as exc:  # diagnostics must not hide the real failure
            lines.append(f"<status failed: {exc}>")
        logs = sorted((Path(run.run_dir) / "logs").glob("*"), key=lambda p: p.stat().st_mtime)[-8:]
        for path in logs:
            lines.append(f"--- {path.name}\n{_bk_tail(path)}")
        lines.extend(self.extra_diagnostics())
        calls = self.calls()
        if calls:
            lines.append(f"--- last scheduler calls ({len(calls)} in all)")
            lines.extend(" ".join(argv)[:300] for argv in calls[-15:])
        return "\n".join(lines)

    def extra_diagnostics(self) -> List[str]:
        """Return backend-specific diagnostic lines (queue state, emulator runner log)."""
        return []

    def calls(self) -> List[List[str]]:
        """Return the logged scheduler calls, oldest first, each as its argv (command name first)."""
        return [argv for _, argv in self.calls_with_callers()]

    def calls_with_callers(self) -> List[Tuple[str, List[str]]]:
        """Return the logged calls as (pid of the calling process, argv); a dispatch cycle is one process."""
        text = self.call_log.read_text(errors="replace")
        records = [record.split(_BK_FS)[:-1] for record in text.split(_BK_RS) if record]
        return [(record[0], record[1:]) for record in records]

    def kind(self, argv: List[str]) -> str:
        """Classify a logged call: submit, status (fallback: the second half of a state query), cancel, probe."""
        for command, kind in self.COMMANDS.items():
            words = command.split()
            if argv[:len(words)] == words:
                return kind
        return "other"

    def count_calls(self, calls: List[List[str]], wf_name: str) -> Dict[str, Any]:
        """Count calls by kind; split submissions into dispatch jobs and task jobs (by job name)."""
        counts: Dict[str, Any] = {"submit": 0, "status": 0, "fallback": 0, "cancel": 0, "probe": 0, "other": 0,
                                  "dispatch": 0, "tasks": []}
        name = re.compile(rf"^(?:--job-name=)?{re.escape(wf_name)}-(\w+)")
        for argv in calls:
            kind = self.kind(argv)
            counts[kind] += 1
            if kind != "submit":
                continue
            names = [m.group(1) for m in map(name.match, argv[1:]) if m]
            if names and names[0] == "dispatch":
                counts["dispatch"] += 1
            else:
                counts["tasks"].append(names[0] if names else "?")
        return counts

    def element_calls(self, calls: List[List[str]]) -> List[str]:
        """Return the calls that name a single element of a native array."""
        if not self.ELEMENT_ID:
            return []
        pattern = re.compile(self.ELEMENT_ID)
        bad = []
        for argv in calls:
            words = [w for arg in argv[1:] for w in re.split(r"[\s,:=()&|\"']+", arg)]
            if any(pattern.match(word) for word in words):
                bad.append(" ".join(argv)[:300])
        return bad

    def expected_task_submits(self, run) -> Dict[str, int]:
        """Return {task: submissions} a run needs: one per array (per max_array_size chunk), one per singleton."""
        size = reflow.resolve_executor(self.BACKEND).max_array_size
        fresh: Dict[str, int] = {}
        specs = {spec["task_name"]: spec for spec in run.store.get_task_specs(run.run_id)}
        for inst in run.store.list_task_instances(run.run_id):
            if not inst["cached"]:
                fresh[inst["task_name"]] = fresh.get(inst["task_name"], 0) + 1
        return {task: (-(-count // size) if specs[task]["is_array"] else count) for task, count in fresh.items()}

    @staticmethod
    def dispatch_logs(run, at_least: int, pattern: str = "*") -> int:
        """Return how many dispatch jobs (ids matching ``pattern``) left a log, waiting a moment for late copies."""
        deadline = time.monotonic() + 15
        while True:
            found = len(list((Path(run.run_dir) / "logs").glob(f"dispatch-{pattern}.out")))
            if found >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.25)

    def check_calls(self, run, calls: List[List[str]], wf_name: str) -> Dict[str, Any]:
        """Assert the scheduler-call budget of a finished run; return the counts.

        Submits = one per array + one per singleton + the dispatch jobs; status
        queries <= dispatch cycles (the in-process one, each dispatch job and
        each cycle the waiting client ran), and no cycle queries twice (a
        dispatch job is one process, the client one process for all of its
        cycles); no call names a single array element.  Where a state query
        takes two commands (Slurm's sacct then squeue, Grid Engine's qstat then
        qacct), each is held to this.  The cancels allowed are the client's, of
        spare dispatch jobs (at most one per client cycle); a spare may start
        before its cancel reaches it.
        """
        counts = self.count_calls(calls, wf_name)
        expected = self.expected_task_submits(run)
        client_cycles = getattr(run._waiting_dispatcher, "cycles", 0)
        info = (f"{json.dumps(counts)}\nexpected task submits {expected}\nclient cycles {client_cycles}\n"
                f"{self.diagnose(run)}")
        got: Dict[str, int] = {}
        for task in counts["tasks"]:
            got[task] = got.get(task, 0) + 1
        self.assertEqual(got, expected, f"task submissions differ\n{info}")
        self.assertEqual(counts["submit"], sum(expected.values()) + counts["dispatch"], info)
        cancels = [" ".join(argv) for argv in calls if self.kind(argv) == "cancel"]
        self.assertLessEqual(len(cancels), client_cycles, info)  # each of a spare dispatch job
        last = run.store.get_run(run.run_id)["dispatch_job_id"]
        if cancels and run.state != "RUNNING" and last not in cancels[-1]:
            # the client cancels the last spare when it ends the run, unless that spare started first and
            # ran the final cycle itself
            self.assertEqual(self.dispatch_logs(run, 1, glob.escape(last)), 1, f"spare {last} neither ran nor "
                             f"was cancelled\n{info}")
        dispatch_jobs = self.dispatch_logs(run, counts["dispatch"] - len(cancels))
        self.assertTrue(counts["dispatch"] - len(cancels) <= dispatch_jobs <= counts["dispatch"],
                        f"{dispatch_jobs} dispatch jobs ran\n{info}")
        cycles = counts["dispatch"] + 1 + client_cycles
        self.assertLessEqual(counts["status"], cycles, f"more status queries than dispatch cycles\n{info}")
        self.assertLessEqual(counts["fallback"], cycles, f"more status queries than dispatch cycles\n{info}")
        per_cycle: Dict[Tuple[str, str], int] = {}
        for caller, argv in self.calls_with_callers():
            if self.kind(argv) in ("status", "fallback", "probe"):
                key = (caller, self.kind(argv))
                per_cycle[key] = per_cycle.get(key, 0) + 1
        allowed = {str(os.getpid()): max(1, client_cycles)}
        busy = {f"{kind} by pid {caller}": n for (caller, kind), n in per_cycle.items() if n > allowed.get(caller, 1)}
        self.assertEqual(busy, {}, f"a dispatch cycle queried the scheduler more than once\n{info}")
        self.assertEqual(self.element_calls(calls), [], f"per-element scheduler calls\n{info}")
        return counts

    def live_jobs(self) -> List[Tuple[str, str, str]]:
        """Return (id, name, state) of this user's unfinished jobs, asking the real scheduler."""
        return []

    def our_live_jobs(self, prefix: str) -> List[Tuple[str, str, str]]:
        """Return the unfinished jobs whose name starts with ``prefix``."""
        return [job for job in self.live_jobs() if job[1].startswith(prefix)]

    def running_state(self, state: str) -> bool:
        """Tell whether a state word of :meth:`live_jobs` means running."""
        return state in ("RUNNING", "R", "RUN", "r")

    def until(self, predicate, timeout: float, what: str, run=None):
        """Poll ``predicate`` until it returns something true; fail with ``what`` on a timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:g}s waiting for {what}\n" + (self.diagnose(run) if run else ""))
            time.sleep(0.25)

    # --------------------------------------------------------- scenarios

    def test_a_pipeline_cache_and_scheduler_calls(self) -> None:
        """Fan-out, gather, chain, chain/gather-flatten, broadcast and an included Flow in one run; resubmit hits."""
        module = self.flow(_BK_PIPELINE, "pipe")
        wf_name = module.wf.name
        started = time.monotonic()
        run = self.submit(module, n=3, k=2)
        self.wait(run, self.PIPELINE_TIMEOUT, "SUCCESS")
        elapsed = time.monotonic() - started
        store, rid = run.store, run.run_id
        self.assertEqual(store.get_array_outputs(rid, "pairs"), [[1, 10], [2, 20], [3, 30]])
        self.assertEqual(store.get_array_outputs(rid, "scaled"), [103, 203, 303])
        self.assertEqual(store.get_array_outputs(rid, "chained"), [11, 22, 33])
        self.assertEqual(store.get_array_outputs(rid, "flat"), [2, 11, 3, 21, 4, 31])
        self.assertEqual(store.get_array_outputs(rid, "sub_inc"), [101, 102])
        self.assertEqual(store.get_singleton_output(rid, "summary"),
                         {"scaled": [103, 203, 303], "pairs": [1, 10, 2, 20, 3, 30], "sub": [101, 102]})
        self.assertEqual(len(store.list_task_instances(rid)), 20)
        first_calls = self.calls()
        if self.COMMANDS:
            counts = self.check_calls(run, first_calls, wf_name)
            if _BK_TIMINGS:
                sys.stderr.write(f"\n[{self.BACKEND}] pipeline {elapsed:.1f}s, {counts['dispatch']} dispatch jobs, "
                                 f"{counts['status']}+{counts['fallback']} status queries, "
                                 f"{counts['submit']} submits\n")
        else:
            self.check_local_submits(run, wf_name)
        spooled = self.local_submits(run)
        again = self.submit(module, n=3, k=2)
        self.wait(again, 60, "SUCCESS")
        instances = again.store.list_task_instances(again.run_id)
        cached = {(i["task_name"], i["array_index"]): i["cached"] for i in instances}
        self.assertEqual(len(cached), 20)
        self.assertTrue(all(cached.values()), [key for key, hit in cached.items() if not hit])
        self.assertEqual(again.store.get_singleton_output(again.run_id, "summary")["sub"], [101, 102])
        later = self.calls()[len(first_calls):]
        self.assertEqual([argv for argv in later if self.kind(argv) == "submit"], [],
                         "a resubmit of cached work submitted jobs")
        self.assertEqual(self.local_submits(again), spooled, "a resubmit of cached work started local jobs")

    def local_submits(self, run) -> List[str]:
        """Return the names of the jobs the local executor started for a run dir (its spool)."""
        spool = Path(run.run_dir) / ".reflow" / "local"
        return sorted(json.loads(p.read_text())["name"] for p in spool.glob("*.job"))

    def check_local_submits(self, run, wf_name: str) -> None:
        """The local executor's spool holds one job per array or singleton, plus the dispatch jobs."""
        names = self.local_submits(run)
        expected = self.expected_task_submits(run)
        tasks = [n[len(wf_name) + 1:].split("-")[0] for n in names if n != f"{wf_name}-dispatch"]
        self.assertEqual(sorted(tasks), sorted(t for t, c in expected.items() for _ in range(c)), names)
        dispatch = names.count(f"{wf_name}-dispatch")
        spool = Path(run.run_dir) / ".reflow" / "local"
        states = [reflow.LocalExecutor(spool=spool).job_state(p.stem) for p in spool.glob("*.job")
                  if json.loads(p.read_text())["name"] == f"{wf_name}-dispatch"]
        cancelled = states.count("CANCELLED")  # spares of the waiting client; one may have started first
        ran = self.dispatch_logs(run, dispatch - cancelled)
        self.assertTrue(dispatch - cancelled <= ran <= dispatch, (ran, states, names))

    def test_b_failing_element_then_retry(self) -> None:
        """One element fails on the first attempt; retry resubmits only it and the run succeeds."""
        fixed = self.tmp / "fixed"
        module = self.flow(_BK_FLAKY, "flaky", FIXEDPATH=str(fixed))
        run = self.submit(module)
        self.wait(run, 120, "FAILED")
        status = run.status(as_dict=True)
        failed = [(i["task_name"], i["array_index"], i["state"]) for i in status["failed_instances"]]
        self.assertEqual(failed, [("square", 1, "FAILED")], self.diagnose(run))
        self.assertIn("boom at 1", status["failed_instances"][0]["error_text"])
        self.assertEqual(run.store.task_state_summary(run.run_id)["square"], {"SUCCESS": 2, "FAILED": 1})
        check_operating_commands(self, run, "boom at 1")
        fixed.write_text("ok")
        before = len(self.calls())
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(run.retry(), 1)
        self.wait(run, 120, "SUCCESS")
        square = run.store.get_task_instance(run.run_id, "square", 1)
        self.assertEqual((square["state"], square["attempt"]), ("SUCCESS", 1))
        self.assertEqual(run.store.get_array_outputs(run.run_id, "square"), [0, 1, 4])
        if self.COMMANDS:
            counts = self.count_calls(self.calls()[before:], module.wf.name)
            self.assertEqual(counts["tasks"], ["square"], f"{counts}\n{self.diagnose(run)}")
            self.assertEqual(self.element_calls(self.calls()), [])

    def test_g_packed_elements_fail_alone_then_retry(self) -> None:
        """Seven elements in three packed jobs: one fails alone, its log slice shows it, retry re-runs only it."""
        fixed = self.tmp / "fixed"
        module = self.flow(_BK_PACKED, "packed", FIXEDPATH=str(fixed))
        run = self.submit(module)
        self.wait(run, self.PIPELINE_TIMEOUT, "FAILED")
        store, rid = run.store, run.run_id
        self.assertEqual(store.task_state_summary(rid)["square"], {"SUCCESS": 6, "FAILED": 1}, self.diagnose(run))
        failed = store.get_task_instance(rid, "square", 4)
        self.assertIn("boom at 4", failed["error_text"])
        jobs = {inst["array_index"]: inst["job_id"] for inst in store.list_task_instances(rid, "square")}
        self.assertEqual([len({jobs[i] for i in chunk}) for chunk in ((0, 1, 2), (3, 4, 5), (6,))], [1, 1, 1], jobs)
        self.assertEqual(len(set(jobs.values())), 3, jobs)

        def failed_slice():  # whichever packed job's log holds element 4 (log names differ per scheduler)
            logs = sorted((Path(run.run_dir) / "logs").glob("square-*"))
            lines = [line for path in logs for line in reflow.element_log_lines(path, "square", 4)]
            return lines if any("boom at 4" in line for line in lines) else None

        text = "\n".join(self.until(failed_slice, 30, "the failed element's log slice", run))
        self.assertIn("squaring 4", text)
        self.assertNotIn("squaring 3", text)
        if self.COMMANDS:
            counts = self.count_calls(self.calls(), module.wf.name)
            self.assertEqual(sorted(counts["tasks"]), ["seed", "square"], counts)
            self.assertEqual(self.element_calls(self.calls()), [])
        fixed.write_text("ok")
        before = len(self.calls())
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(run.retry(), 1)
        self.wait(run, self.PIPELINE_TIMEOUT, "SUCCESS")
        attempts = {inst["array_index"]: inst["attempt"] for inst in store.list_task_instances(rid, "square")}
        self.assertEqual(attempts, {**{i: 0 for i in range(7)}, 4: 1})
        self.assertEqual(store.get_array_outputs(rid, "square"), [i * i for i in range(7)])
        if self.COMMANDS:
            self.assertEqual(self.count_calls(self.calls()[before:], module.wf.name)["tasks"], ["square"])

    def test_h_inline_pipeline_runs_in_the_dispatch_job(self) -> None:
        """inline=True: the first dispatch job runs all three tasks itself; no task job is submitted."""
        module = self.flow(_BK_INLINE, "inline")
        run = self.submit(module)
        self.wait(run, self.PIPELINE_TIMEOUT, "SUCCESS")
        store, rid = run.store, run.run_id
        self.assertEqual(store.get_singleton_output(rid, "total"), 30)
        jobs = {inst["job_id"] for inst in store.list_task_instances(rid)}
        self.assertEqual(len(jobs), 1, f"every instance ran in one dispatch job\n{self.diagnose(run)}")
        if self.COMMANDS:  # the guard armed before the inline work is cancelled just after the run ended
            self.until(lambda: self.count_calls(self.calls(), module.wf.name)["cancel"], 30, "the guard's cancel", run)
            counts = self.count_calls(self.calls(), module.wf.name)
            self.assertEqual(counts["tasks"], [], counts)
            self.assertEqual(counts["cancel"], 1, counts)
            self.assertEqual(counts["dispatch"], 2, counts)
        else:
            names = self.local_submits(run)
            self.assertEqual(set(names), {f"{module.wf.name}-dispatch"}, names)

    def test_c_cancel_mid_run(self) -> None:
        """Cancel while the elements run: the run and its instances end CANCELLED and the queue is clean."""
        marks = self.tmp / "marks"
        marks.mkdir()
        module = self.flow(_BK_SLEEPY, "cancel", MARKSPATH=str(marks))
        prefix = f"{module.wf.name}-"
        run = self.submit(module)

        def both_running():
            pids = [p.read_text() for p in marks.glob("*.pid")]
            if len(pids) < 2 or not all(pids):
                return None
            states = {inst["state"] for inst in run.store.list_task_instances(run.run_id, "sleepy")}
            if not states <= {"SUBMITTED", "RUNNING"}:
                return None
            if self.COMMANDS and not any(self.running_state(job[2]) for job in self.our_live_jobs(prefix)):
                return None
            return [int(p) for p in pids]

        pids = self.until(both_running, 120, "both elements to run", run)
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(run.cancel(), 2)
        self.assertEqual(run.state, "CANCELLED")
        self.assertEqual(run.store.task_state_summary(run.run_id)["sleepy"], {"CANCELLED": 2})
        self.assertEqual(run.store.task_state_summary(run.run_id)["seed"], {"SUCCESS": 1})
        if self.COMMANDS:
            self.until(lambda: not self.our_live_jobs(prefix), 60, "the scheduler to forget the run's jobs", run)
        self.until(lambda: not [pid for pid in pids if _alive(pid)], 30, "the element processes to end", run)
        self.assertEqual(run.state, "CANCELLED")
        if self.COMMANDS:
            cancels = [argv for argv in self.calls() if self.kind(argv) == "cancel"]
            self.assertEqual(len(cancels), 1, cancels)
            self.assertEqual(self.element_calls(self.calls()), [], "cancel named each array element, not the array")

    def test_e_timeout_reason_in_status(self) -> None:
        """A task that outlives its walltime fails with the scheduler's TIMEOUT reason."""
        if self.SLOW_WALLTIME and not _BK_SLOW:
            self.skipTest(f"{self.BACKEND}'s shortest walltime is {self.WALLTIME}: set REFLOW_TEST_SLOW=1")
        module = self.flow(_BK_HOG, "late", WALLTIME=self.WALLTIME)
        run = self.submit(module)
        self.wait(run, reflow.parse_time(self.WALLTIME) * self.walltime_factor() + 90, "FAILED")
        hog = run.store.get_task_instance(run.run_id, "hog", None)
        self.assertEqual(hog["state"], "FAILED")
        if self.COMMANDS:
            self.check_calls(run, self.calls(), module.wf.name)
        text = f"{hog.get('reason')} {hog.get('error_text')}"
        self.assertRegex(text, r"TIMEOUT|walltime|RUNLIMIT|run ?time limit|h_rt",
                         f"no walltime reason in status\n{self.diagnose(run)}")
        check_operating_commands(self, run)

    def walltime_factor(self) -> float:
        """Return how much of its walltime a job really gets (the emulators scale it)."""
        return 1.0

    def test_f_thousand_element_array(self) -> None:
        """A 1,000-element array of tiny elements succeeds with one submission."""
        if self.SLOW_WIDE and not _BK_SLOW:
            self.skipTest("the 1,000-element array is slow here: set REFLOW_TEST_SLOW=1")
        module = self.flow(_BK_WIDE, "wide")
        started = time.monotonic()
        run = self.submit(module)
        self.wait(run, 900, "SUCCESS")
        elapsed = time.monotonic() - started
        outputs = run.store.get_array_outputs(run.run_id, "tiny")
        self.assertEqual(outputs, list(range(1, 1001)))
        if self.COMMANDS:
            counts = self.check_calls(run, self.calls(), module.wf.name)
            self.assertEqual(sorted(counts["tasks"]), ["seed", "tiny"])
        if _BK_TIMINGS:
            sys.stderr.write(f"\n[{self.BACKEND}] 1,000-element array {elapsed:.1f}s\n")


# ----------------------------------------------------------- real schedulers


class SlurmBackendTest(_BackendScenarios, TempDirTest):
    """The scenarios on the real Slurm of this machine (ci/slurm-up.sh)."""

    BACKEND = "slurm"
    # squeue completes sacct (the controller's view while slurmdbd lags), as spec.md's state-query row says.
    COMMANDS = {"sbatch": "submit", "sacct": "status", "squeue": "fallback", "scancel": "cancel"}
    ELEMENT_ID = r"^\d+_\d+$"
    SLOW_WALLTIME, WALLTIME = True, "00:01:00"

    @classmethod
    def unavailable(cls) -> str:
        if not shutil.which("sbatch"):
            return "Slurm is not installed (no sbatch on PATH)"
        ok, text = _bk_probe(["sinfo", "-h", "-o", "%T"])
        if not ok:
            return f"sinfo failed: {text.strip()[:200]}"
        if not re.search(r"idle|mix|alloc|completing", text):  # completing: another suite's jobs are ending
            return f"no usable Slurm node (sinfo: {text.strip()[:100]})"
        return ""

    def live_jobs(self) -> List[Tuple[str, str, str]]:
        return _bk_rows(_bk_probe([self.real["squeue"], "-h", "-o", "%i|%j|%T"])[1])

    def kill_leftovers(self) -> None:
        ids = [job[0] for job in self.live_jobs() if self.tag in job[1]]
        if ids:
            subprocess.run([self.real["scancel"], *ids], capture_output=True, timeout=30)

    def extra_diagnostics(self) -> List[str]:
        text = _bk_probe([self.real["squeue"], "-o", "%i %j %T %r"])[1]
        return ["--- squeue", text.strip()[-1500:]]


class SGEBackendTest(_BackendScenarios, TempDirTest):
    """The scenarios on the real Grid Engine of this machine (ci/sge-up.sh)."""

    BACKEND = "sge"
    # qacct completes qstat (which forgets finished jobs), as spec.md's state-query row says.
    COMMANDS = {"qsub": "submit", "qstat": "status", "qacct": "fallback", "qdel": "cancel"}
    ELEMENT_ID = r"^\d+\.\d+$"
    SLOW_WALLTIME, WALLTIME = False, "00:00:05"

    @classmethod
    def unavailable(cls) -> str:
        env = dict(os.environ, SGE_ROOT=os.environ.get("SGE_ROOT") or "/var/lib/gridengine",
                   SGE_CELL=os.environ.get("SGE_CELL") or "default")
        if not shutil.which("qsub") or not Path(env["SGE_ROOT"], env["SGE_CELL"]).is_dir():
            return f"Grid Engine is not installed (qsub on PATH, {env['SGE_ROOT']}/{env['SGE_CELL']})"
        try:
            proc = subprocess.run(["qstat", "-f"], capture_output=True, text=True, timeout=20, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"qstat -f failed: {exc}"
        if proc.returncode != 0:
            return f"qstat -f failed: {(proc.stdout + proc.stderr).strip()[:200]}"
        queues = re.findall(r"^(\S+@\S+)\s+\S+\s+\S+\s+\S+\s+\S+[ \t]*(\S*)$", proc.stdout, re.M)
        if not any(not re.search(r"[uEdDsSaAC]", states) for _, states in queues):
            return f"no usable queue instance (execd down?):\n{proc.stdout[:500]}"
        return ""

    def backend_env(self) -> Dict[str, Optional[str]]:
        return {"SGE_ROOT": os.environ.get("SGE_ROOT") or "/var/lib/gridengine",
                "SGE_CELL": os.environ.get("SGE_CELL") or "default"}

    def _set_up_backend(self) -> None:
        super()._set_up_backend()
        # Grid Engine may start jobs through a login shell (login_shells), whose profile resets PATH
        # even with qsub -V: name the wrappers in REFLOW_<CMD> too, so the dispatch jobs use them.
        wrappers = {f"REFLOW_{name.upper()}": str(self.tmp / "wrap" / name) for name in self.real}
        self._stack.enter_context(mock_env(**wrappers))

    def live_jobs(self) -> List[Tuple[str, str, str]]:
        jobs = []
        for block in re.findall(r"<job_list[^>]*>(.*?)</job_list>", _bk_probe([self.real["qstat"], "-xml"])[1], re.S):
            fields = [re.search(rf"<{tag}>(.*?)</{tag}>", block, re.S) for tag in ("JB_job_number", "JB_name",
                                                                                  "state")]
            if all(fields):
                jobs.append(tuple(f.group(1).strip() for f in fields))
        return jobs

    def kill_leftovers(self) -> None:
        ids = sorted({job[0] for job in self.live_jobs() if self.tag in job[1]})
        if ids:
            subprocess.run([self.real["qdel"], "-f", ",".join(ids)], capture_output=True, timeout=30)

    def extra_diagnostics(self) -> List[str]:
        text = _bk_probe([self.real["qstat"], "-f"])[1]
        return ["--- qstat -f", text.strip()[-1500:]]

    def walltime_factor(self) -> float:
        return 6.0  # execd notices h_rt on its load report cycle


# ------------------------------------------------------------------ emulators


class _EmulatedBackend(_BackendScenarios):
    """A backend played by an emulator of ci/emulators with a private state directory."""

    EMULATOR = ""
    SLOW_WALLTIME, WALLTIME = False, "00:01:00"
    #: Emulator knobs of every test; the walltime test scales walltimes down.
    KNOBS = {"exiting": 0.05, "kill_delay": 0.5}
    #: What status must say about a job the emulator killed for memory.
    OOM_REASON = r"OUT_OF_MEMORY|mem(ory)? (limit|exceeded)|MEMLIMIT"
    WALLTIME_SCALE = 0.05

    @classmethod
    def unavailable(cls) -> str:
        bin_dir = _BK_EMULATORS / cls.EMULATOR / "bin"
        if not bin_dir.is_dir():
            return f"no emulator at {bin_dir} (set REFLOW_EMULATORS)"
        return ""

    def backend_env(self) -> Dict[str, Optional[str]]:
        self.state_dir = self.tmp / "emu"
        self.state_dir.mkdir()
        (self.state_dir / "knobs.json").write_text(json.dumps(self.KNOBS))
        bin_dir = _BK_EMULATORS / self.EMULATOR / "bin"
        return {"EMU_STATE_DIR": str(self.state_dir), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def set_knobs(self, **values: Any) -> None:
        """Change emulator knobs of this test (read on every scheduler call)."""
        path = self.state_dir / "knobs.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **values)))

    def kill_leftovers(self) -> None:
        _bk_emucore().kill_all(str(self.state_dir))

    def extra_diagnostics(self) -> List[str]:
        runner_log = self.state_dir / "runner.log"
        return [f"--- emulator runner.log\n{_bk_tail(runner_log)}"] if runner_log.exists() else []

    def walltime_factor(self) -> float:
        return self.WALLTIME_SCALE * 4

    def test_e_timeout_reason_in_status(self) -> None:
        self.set_knobs(walltime_scale=self.WALLTIME_SCALE)
        super().test_e_timeout_reason_in_status()

    def test_e_oom_reason_in_status(self) -> None:
        """A job the emulator kills for memory fails with an out-of-memory reason in status."""
        module = self.flow(_BK_HOG, "oom", WALLTIME="00:10:00")
        self.set_knobs(oom=f"{module.wf.name}-hog*", oom_after=0.5)
        run = self.submit(module)
        self.wait(run, 90, "FAILED")
        hog = run.store.get_task_instance(run.run_id, "hog", None)
        self.check_calls(run, self.calls(), module.wf.name)
        text = f"{hog.get('reason')} {hog.get('error_text')}"
        self.assertRegex(text, self.OOM_REASON, f"no memory reason in status\n{self.diagnose(run)}")
        check_operating_commands(self, run)


class PBSEmulatedTest(_EmulatedBackend, TempDirTest):
    """The scenarios on the PBS Pro emulator."""

    BACKEND, EMULATOR = "pbs", "pbs"
    COMMANDS = {"qsub": "submit", "qstat --version": "probe", "qstat": "status", "qdel": "cancel"}
    ELEMENT_ID = r"^\d+\[\d+\](?:\.\S+)?$"

    def live_jobs(self) -> List[Tuple[str, str, str]]:
        jobs = json.loads(_bk_probe([self.real["qstat"], "-f", "-F", "json", "-t"])[1] or "{}").get("Jobs") or {}
        return [(job_id, str(attrs.get("Job_Name", "")), str(attrs.get("job_state", "")))
                for job_id, attrs in jobs.items() if attrs.get("job_state") not in ("F", "X")]


class LSFEmulatedTest(_EmulatedBackend, TempDirTest):
    """The scenarios on the IBM LSF emulator (its -W counts whole minutes)."""

    BACKEND, EMULATOR = "lsf", "lsf"
    COMMANDS = {"bsub": "submit", "bjobs": "status", "bkill": "cancel"}
    ELEMENT_ID = r"^\d+\[\d+\]$"

    def live_jobs(self) -> List[Tuple[str, str, str]]:
        return _bk_rows(_bk_probe([self.real["bjobs"], "-noheader", "-o", "jobid job_name stat delimiter='|'"])[1])


class FluxEmulatedTest(_EmulatedBackend, TempDirTest):
    """The scenarios on the Flux emulator (no native arrays: ``--cc`` makes one job per element)."""

    BACKEND, EMULATOR = "flux", "flux"
    COMMANDS = {"flux submit": "submit", "flux batch": "submit", "flux jobs": "status", "flux cancel": "cancel",
                "flux": "other"}
    ELEMENT_ID = None  # every element is a job of its own; the submit count is what matters
    # flux jobs shows an OOM kill as result FAILED, returncode -9; only the job shell's stderr says "oom".
    OOM_REASON = r"signal 9"

    def test_e_oom_reason_in_status(self) -> None:
        super().test_e_oom_reason_in_status()
        (err,) = (Path(self.runs[-1].run_dir) / "logs").glob("hog-*.err")
        self.assertIn("out of memory", err.read_text())

    def live_jobs(self) -> List[Tuple[str, str, str]]:
        return _bk_rows(_bk_probe([self.real["flux"], "jobs", "-n", "-o", "{id.dec}|{name}|{state}"])[1])

    def running_state(self, state: str) -> bool:
        return state in ("RUN", "R")


# ---------------------------------------------------------------------- local


class LocalBackendTest(_BackendScenarios, TempDirTest):
    """The scenarios on the local executor (no scheduler commands: its spool is counted instead)."""

    BACKEND = "local"
    COMMANDS = {}
    ELEMENT_ID = None
    SLOW_WALLTIME, WALLTIME = False, "00:00:02"

    def backend_env(self) -> Dict[str, Optional[str]]:
        # Local jobs share cpu-slot locks under $TMPDIR with every local job of the user; a private
        # TMPDIR keeps other suites' sleeping elements from starving this test.
        (self.tmp / "tmp").mkdir()
        return {"TMPDIR": str(self.tmp / "tmp")}

    def kill_leftovers(self) -> None:
        """Let the local runners of the test's runs finish (they still write their spool), then kill the rest."""
        for spool in self.tmp.glob("*/.reflow/local"):
            executor = reflow.LocalExecutor(spool=spool)
            ids = [path.stem for path in spool.glob("*.job")]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(state not in reflow.FINAL_JOB_STATES
                                                      for state in executor.job_states(ids).values()):
                time.sleep(0.1)
            executor.cancel_many(ids)
            time.sleep(0.3)  # a runner writes its final state after its last element

    def walltime_factor(self) -> float:
        return 5.0


# =============================================================================
# Operating runs from the store (issue 4)
# =============================================================================

#: A fan-out whose element N fails while the file named by $FAIL_AT holds N, and whose
#: elements sleep while the file named by $HOLD exists (so a run can be cancelled mid-way),
#: leaving a mark in $MARKS to say they started.
_OPS_FLOW = """
import os, sys, time
from typing import Annotated
from reflow import Param, Result, Workflow

wf = Workflow("ops")

@wf.job()
def prepare(n: Annotated[int, Param(help="how many")] = 5, first: int = 0, label: str = "plain") -> list[int]:
    return list(range(first, first + n))

@wf.job(array=True)
def square(x: int = Result(step="prepare")) -> int:
    while os.path.exists(os.environ["HOLD"]):
        open(os.path.join(os.environ["MARKS"], str(x)), "w").close()
        time.sleep(0.1)
    if os.path.exists(os.environ["FAIL_AT"]) and x == int(open(os.environ["FAIL_AT"]).read()):
        print(f"element {x} about to fail", file=sys.stderr)
        raise RuntimeError(f"boom at {x}")
    return x * x

@wf.job()
def total(values: list[int] = Result(step="square")) -> int:
    return sum(values)

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: Keys ``status --json`` documents as stable (run_status's docstring, README).
_STATUS_KEYS = {"run", "progress", "duration_seconds", "summary", "tasks", "instances", "failed_instances"}
_TASK_KEYS = {"name", "is_array", "dependencies", "width", "counts", "total", "cached", "running_seconds", "failed"}


class OperateFromStoreTest(unittest.TestCase):
    """Every operating command on stores made by real local runs, through reflow.py and wf.cli().

    The runs are made once for the class: ``retried`` failed at square[3] and was retried
    to success with ``reflow.py retry``; ``cached`` reuses square[0-4] from it and fails at
    square[5]; ``cancelled`` was cancelled with ``reflow.py cancel`` mid-run.
    """

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.TemporaryDirectory(prefix="reflow-ops-")
        cls.tmp = Path(cls._tmp.name)
        cls.store_path = cls.tmp / "store" / "manifest.db"
        cls.fail_at, cls.hold = cls.tmp / "fail_at", cls.tmp / "hold"
        cls.marks = cls.tmp / "marks"
        for directory in (cls.marks, cls.tmp / "tmp"):
            directory.mkdir()
        # A private TMPDIR: local jobs share cpu-slot locks under it with every local job of the user.
        cls._env = mock_env(XDG_CONFIG_HOME=str(cls.tmp / "config"), XDG_CACHE_HOME=str(cls.tmp / "cache"),
                            REFLOW_STORE_PATH=str(cls.store_path), HOME=str(cls.tmp / "home"),
                            REFLOW_LOCAL_CPUS="4", TMPDIR=str(cls.tmp / "tmp"), FAIL_AT=str(cls.fail_at),
                            HOLD=str(cls.hold), MARKS=str(cls.marks), NO_COLOR=None)
        cls._env.__enter__()
        try:
            cls.module = load_flow(cls.tmp, _OPS_FLOW)
            cls._make_runs()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.hold.unlink(missing_ok=True)
        cls._env.__exit__(None, None, None)
        _stop_local_jobs(cls.tmp)
        cls._tmp.cleanup()

    @classmethod
    def _make_runs(cls) -> None:
        wf = cls.module.wf
        cls.fail_at.write_text("3")
        retried = wf.submit(cls.tmp / "retried", executor="local", n=5, label="<b>x</b> & 'y'")
        assert retried.wait(timeout=120) == "FAILED", retried.status(as_dict=True)
        cls.fail_at.unlink()
        proc = run_cli(HERE / "reflow.py", "retry", retried.run_id, "--store-path", cls.store_path)
        assert proc.returncode == 0 and "Marked 2" in proc.stdout, proc.stderr + proc.stdout
        assert retried.wait(timeout=120) == "SUCCESS", retried.status(as_dict=True)
        cls.fail_at.write_text("5")
        cached = wf.submit(cls.tmp / "cached", executor="local", n=6)  # elements 0-4 come from the cache
        assert cached.wait(timeout=120) == "FAILED", cached.status(as_dict=True)
        cls.fail_at.unlink()
        cls.hold.write_text("")
        cancelled = wf.submit(cls.tmp / "cancelled", executor="local", n=2, first=100)  # not cached
        _wait_for_marks(cls.marks, ["100", "101"])
        proc = run_cli(HERE / "reflow.py", "cancel", cancelled.run_id, "--store-path", cls.store_path)
        assert proc.returncode == 0 and "Cancelled 3" in proc.stdout, proc.stderr + proc.stdout
        cls.hold.unlink()
        cls.runs = {"retried": retried.run_id, "cached": cached.run_id, "cancelled": cancelled.run_id}

    # -- helpers -------------------------------------------------------------------

    def cli(self, *argv: Any) -> subprocess.CompletedProcess:
        """Run ``python reflow.py ARGV --store-path STORE`` (the store-only entry point)."""
        return run_cli(HERE / "reflow.py", *argv, "--store-path", self.store_path)

    def wf_cli(self, *argv: Any) -> Tuple[int, str]:
        """Run ``wf.cli(ARGV)`` in this process; return (exit code, stdout)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = self.module.wf.cli([str(a) for a in argv])
        return code, out.getvalue()

    def report(self, name: str) -> Tuple[str, Path]:
        """Write the report of one of the class's runs with ``reflow.py report``; return (text, path)."""
        path = self.tmp / f"{name}.html"
        proc = self.cli("report", self.runs[name], "-o", path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(str(path), proc.stdout)
        return path.read_text(encoding="utf-8"), path

    # -- runs and status ----------------------------------------------------------------

    def test_runs_table_filters_and_json(self) -> None:
        proc = self.cli("runs")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        header, *rows = proc.stdout.strip().splitlines()
        self.assertEqual(header.split(), ["RUN", "WORKFLOW", "USER", "STATE", "PROGRESS", "STARTED", "(UTC)",
                                          "DURATION"])
        self.assertEqual([row.split()[0] for row in rows], [self.runs[k] for k in ("cancelled", "cached", "retried")])
        self.assertIn("FAILED", rows[1])
        self.assertIn("8/8", rows[1])  # prepare, 6 squares (one failed), total (cancelled: upstream failed)
        proc = self.cli("runs", "--status", "failed", "--json")
        listed = json.loads(proc.stdout)
        self.assertEqual([r["run_id"] for r in listed], [self.runs["cached"]])
        self.assertEqual(listed[0]["progress"], {"done": 8, "total": 8, "percent": 100.0})
        self.assertGreater(listed[0]["duration_seconds"], 0)
        self.assertEqual(json.loads(self.cli("runs", "--user", "nobody-else", "--json").stdout), [])
        self.assertEqual(json.loads(self.cli("runs", "--workflow", "ops", "--json").stdout)[2]["run_id"],
                         self.runs["retried"])

    def test_status_table_names_cache_hits_failures_and_reasons(self) -> None:
        proc = self.cli("status", self.runs["cached"], "--exit-code")
        self.assertEqual(proc.returncode, reflow.STATUS_EXIT_CODES["FAILED"], proc.stderr)
        lines = proc.stdout.splitlines()
        square = next(line.split() for line in lines if line.strip().startswith("square"))
        # TASK [] TOTAL DONE FAILED RUNNING QUEUED CANCELLED CACHED RUN-TIME
        self.assertEqual(square[2:9], ["6", "5", "1", "0", "0", "0", "5"])
        failed = next(line for line in lines if line.strip().startswith("square[5]"))
        with reflow.SqliteStore(self.store_path, readonly=True) as store:
            row = store.get_task_instance(self.runs["cached"], "square", 5)
        self.assertIn(f"job={row['job_id']}", failed)
        self.assertIn(row["reason"], failed)
        self.assertNotIn("\x1b[", proc.stdout)  # not a terminal: no colour
        proc = self.cli("status", self.runs["cached"], "--errors")
        self.assertIn("RuntimeError: boom at 5", proc.stdout)

    def test_status_json_keys_are_the_documented_ones(self) -> None:
        status = json.loads(self.cli("status", self.runs["cached"], "--json").stdout)
        self.assertEqual(set(status), _STATUS_KEYS)
        for key in _STATUS_KEYS | _TASK_KEYS:
            self.assertIn(f"``{key}``", reflow.run_status.__doc__)
            self.assertIn(f"`{key}`", (HERE / "README.md").read_text())
        tasks = {task["name"]: task for task in status["tasks"]}
        self.assertEqual(set(tasks["square"]), _TASK_KEYS)
        self.assertEqual((tasks["square"]["cached"], tasks["square"]["total"]), (5, 6))
        self.assertEqual([(f["index"], f["attempt"]) for f in tasks["square"]["failed"]], [(5, 0)])
        self.assertTrue(tasks["square"]["failed"][0]["job_id"])
        self.assertEqual(status["progress"], {"done": 8, "total": 8, "percent": 100.0})
        self.assertEqual(status["summary"]["total"], {"CANCELLED": 1})

    def test_watch_prints_plain_lines_and_exits_with_the_run(self) -> None:
        proc = self.cli("status", self.runs["retried"], "--watch", "--interval", "0.1")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stdout.strip(), r"^\d\d:\d\d:\d\d SUCCESS 7/7 success=7$")
        proc = self.cli("status", self.runs["cancelled"], "--watch", "--json")
        self.assertEqual(proc.returncode, reflow.STATUS_EXIT_CODES["CANCELLED"])
        self.assertEqual(json.loads(proc.stdout)["status"], "CANCELLED")

    def test_watch_follows_a_live_run_until_it_ends(self) -> None:
        self.hold.write_text("")
        run = self.module.wf.submit(self.tmp / "watched", executor="local", n=2, first=200)
        watcher = subprocess.Popen([sys.executable, str(HERE / "reflow.py"), "status", run.run_id, "--watch",
                                    "--interval", "0.2", "--store-path", str(self.store_path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_marks(self.marks, ["200", "201"])
        finally:
            self.hold.unlink()
        out, err = watcher.communicate(timeout=120)
        self.assertEqual(watcher.returncode, 0, err)
        lines = out.strip().splitlines()
        self.assertGreaterEqual(len(lines), 2, out)
        self.assertIn(" RUNNING ", lines[0])
        self.assertRegex(lines[-1], r" SUCCESS 4/4 success=4$")
        self.assertEqual(len(lines), len(set(lines)), "a line is printed only when something changed")

    def test_watch_on_a_terminal_redraws_with_progress_and_colour(self) -> None:
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        with reflow.SqliteStore(self.store_path, readonly=True) as store:
            for no_color, coloured in ((None, True), ("1", False)):
                with self.subTest(NO_COLOR=no_color), mock_env(NO_COLOR=no_color):
                    screen = Terminal()
                    final = reflow.watch_status(store, self.runs["cached"], 0.1, stream=screen)
                    self.assertEqual(final["run"]["status"], "FAILED")
                    text = screen.getvalue()
                    self.assertTrue(text.startswith("\x1b[H\x1b[2J"), text[:20])
                    self.assertRegex(text, r"\n\n\[#{30}\] 100% 8/8  elapsed \d")
                    self.assertEqual("\x1b[31m" in text, coloured)

    # -- logs ----------------------------------------------------------------------

    def test_logs_of_one_element(self) -> None:
        proc = self.cli("logs", self.runs["cached"], "square[5]", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        (entry,) = json.loads(proc.stdout)
        self.assertEqual((entry["task"], entry["index"], entry["state"]), ("square", 5, "FAILED"))
        self.assertTrue(Path(entry["stdout"]).is_file() and Path(entry["stderr"]).is_file(), entry)
        self.assertIn("element 5 about to fail", entry["stderr_tail"])
        self.assertIn("RuntimeError: boom at 5", entry["error_tail"])
        self.assertIn(entry["job_id"].split("_")[0], Path(entry["stderr"]).name)
        proc = self.cli("logs", self.runs["cached"], "square[5]")
        self.assertIn(f"stderr: {entry['stderr']}", proc.stdout)
        self.assertIn("| element 5 about to fail", proc.stdout)
        proc = self.cli("logs", self.runs["cached"], "square[1]", "--json")  # a cache hit ran nowhere
        self.assertEqual(json.loads(proc.stdout)[0]["state"], "SUCCESS")

    def test_logs_failed_groups_by_reason(self) -> None:
        proc = self.cli("logs", self.runs["cached"], "--failed")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with reflow.SqliteStore(self.store_path, readonly=True) as store:
            reason = store.get_task_instance(self.runs["cached"], "square", 5)["reason"]
        self.assertTrue(proc.stdout.startswith(f"{reason}: 1 failed element(s)\n  square[5]  FAILED  attempt 0"),
                        proc.stdout)
        self.assertEqual(self.cli("logs", self.runs["retried"], "--failed").stdout.strip(), "No failed elements.")
        entries = reflow.Run(None, self.runs["cached"], self.tmp / "cached", reflow.SqliteStore(
            self.store_path, readonly=True)).logs(failed=True)
        self.assertEqual([(e["task"], e["index"]) for e in entries], [("square", 5)])

    def test_exit_signal_names(self) -> None:
        self.assertEqual(reflow.exit_signal(137), "SIGKILL")
        self.assertEqual(reflow.exit_signal(-15), "SIGTERM")
        self.assertEqual(reflow.exit_signal(None, "signal 9"), "SIGKILL")
        self.assertIsNone(reflow.exit_signal(1, "exit 1"))

    # -- cancel and retry ---------------------------------------------------------------

    def test_cancel_recorded_in_store_and_events(self) -> None:
        with reflow.SqliteStore(self.store_path, readonly=True) as store:
            run_id = self.runs["cancelled"]
            self.assertEqual(store.get_run(run_id)["status"], "CANCELLED")
            self.assertEqual(store.task_state_summary(run_id)["square"], {"CANCELLED": 2})
            kinds = [e["event"] for e in store.list_events(run_id) if e["task_name"] == "square"]
        self.assertEqual(kinds[-2:], ["cancelled", "cancelled"])
        self.assertIn("submitted", kinds)

    def test_cancel_and_retry_refuse_another_users_run(self) -> None:
        shared = self.tmp / "shared.db"
        shutil.copyfile(self.store_path, shared)
        with contextlib.closing(sqlite3.connect(shared)) as conn, conn:
            conn.execute("UPDATE runs SET user_id = 'someone-else'")
        before = shared.read_bytes()
        for command in ("cancel", "retry"):
            with self.subTest(command=command):
                proc = run_cli(HERE / "reflow.py", command, self.runs["cached"], "--store-path", shared)
                self.assertEqual(proc.returncode, 1)
                self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
                self.assertIn("belongs to user 'someone-else'", proc.stderr)
                self.assertIn("--force", proc.stderr)
                self.assertEqual(shared.read_bytes(), before)
        proc = run_cli(HERE / "reflow.py", "cancel", self.runs["cached"], "--force", "--store-path", shared)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with reflow.SqliteStore(shared, readonly=True) as store:
            self.assertEqual(store.get_run(self.runs["cached"])["status"], "CANCELLED")

    # -- dag -----------------------------------------------------------------------

    def test_dag_tree_dot_mermaid_with_states(self) -> None:
        run_id = self.runs["cached"]
        proc = self.cli("dag", run_id)
        self.assertEqual(proc.stdout.splitlines(), ["prepare  SUCCESS", "└── square [array]  FAILED",
                                                    "    └── total  CANCELLED"])
        self.assertIn('"square" [peripheries=2, style=filled, fillcolor="salmon"];',
                      self.cli("dag", run_id, "--format", "dot").stdout)
        self.assertIn("class square failed", self.cli("dag", run_id, "--format", "mermaid").stdout)
        code, out = self.wf_cli("dag")
        self.assertEqual((code, out.splitlines()[1]), (0, "└── square [array]"))
        code, out = self.wf_cli("dag", run_id, "--store-path", self.store_path, "--format", "dot")
        self.assertIn('fillcolor="salmon"', out)
        nodes = [("a", False, []), ("b", True, ["a"]), ("c", False, ["a"]), ("d", False, ["b", "c"])]
        self.assertEqual(reflow.render_dag(nodes, states={"a": "SUCCESS"}, colour=True).splitlines(),
                         ["a  \x1b[32mSUCCESS\x1b[0m", "├── b [array]", "└── c", "    └── d  (also after b)"])

    # -- report ----------------------------------------------------------------------

    def test_report_of_a_retried_run_shows_both_attempts(self) -> None:
        text, _ = self.report("retried")
        bars = _report_bars(text)
        self.assertEqual(sorted({b["data-task"] for b in bars}), ["prepare", "square", "total"])
        attempts = [(b["data-attempt"], b["data-state"]) for b in bars if b["data-task"] == "square"
                    and b["data-index"] == "3"]
        self.assertEqual(attempts, [("0", "FAILED"), ("1", "SUCCESS")])
        self.assertEqual([b["data-state"] for b in bars if b["data-task"] == "total"], ["CANCELLED", "SUCCESS"])
        self.assertIn("&lt;b&gt;x&lt;/b&gt; &amp; &#x27;y&#x27;", text)  # the label parameter, escaped
        self.assertNotIn("<b>x</b>", text)
        self.assertIn("No failed elements.", text)

    def test_report_of_a_failed_run_with_cache_hits(self) -> None:
        text, _ = self.report("cached")
        bars = _report_bars(text)
        cached = sorted(int(b["data-index"]) for b in bars if b["data-state"] == "CACHED")
        self.assertEqual(cached, [0, 1, 2, 3, 4])
        with reflow.SqliteStore(self.store_path, readonly=True) as store:
            row = store.get_task_instance(self.runs["cached"], "square", 5)
        stderr = f"{self.tmp}/cached/logs/square-{row['job_id']}.err"
        self.assertIn(f"<code>{stderr}</code>", text)
        self.assertIn("RuntimeError: boom at 5", text)
        self.assertIn(f"<b>{row['reason']}</b>: 1", text)
        self.assertRegex(text, r"<code>square</code></td><td class=\"n\">5</td><td class=\"n\">6</td>"
                               r"<td><code>0-4</code>")
        self.assertNotRegex(text, r"(?i)<script|https?://(?!www\.w3\.org/2000/svg)|@import|url\((?!#)")

    def test_report_under_wf_cli_and_on_the_run_handle(self) -> None:
        path = self.tmp / "wf-cli.html"
        code, out = self.wf_cli("report", self.runs["cancelled"], "-o", path, "--store-path", self.store_path)
        self.assertEqual((code, out.split()[:2]), (0, ["Wrote", str(path)]))
        states = {b["data-state"] for b in _report_bars(path.read_text())}
        self.assertEqual(states, {"SUCCESS", "CANCELLED"})
        with reflow.SqliteStore(self.store_path, readonly=True) as store:
            run = reflow.Run(None, self.runs["cancelled"], self.tmp / "cancelled", store)
            self.assertEqual(run.report(self.tmp / "handle.html").read_text()[:15], "<!DOCTYPE html>")
            self.assertIn("└── square [array]  CANCELLED", run.dag())
        cwd_report = run_cli(HERE / "reflow.py", "report", self.runs["cancelled"], "--store-path",
                             self.store_path, cwd=self.tmp)
        self.assertEqual(cwd_report.returncode, 0, cwd_report.stderr)
        self.assertTrue((self.tmp / f"{self.runs['cancelled']}.html").is_file())

    def test_report_in_headless_chromium(self) -> None:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if not browser:
            if IN_CI:
                self.fail("chromium is not installed (CI installs the Debian package)")
            self.skipTest("chromium is not installed")
        _, path = self.report("cached")
        artifacts = Path(os.environ.get("REFLOW_ARTIFACTS") or self.tmp)
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / f"report-{sys.version_info[0]}.{sys.version_info[1]}.png"
        dom, log = _chromium(browser, self.tmp / "profile-dom", path, "--dump-dom")
        bars = _report_bars(dom)
        self.assertEqual({b["data-task"] for b in bars}, {"prepare", "square", "total"})
        self.assertEqual(len([b for b in bars if b["data-task"] == "square"]), 6)
        self.assertIn('class="node" data-task="square" data-state="FAILED"', dom)
        errors = [line for line in log.splitlines() if "Uncaught" in line or
                  ("CONSOLE" in line and re.search(r"ERROR|error", line))]
        self.assertEqual(errors, [])
        _chromium(browser, self.tmp / "profile-shot", path, f"--screenshot={shot}", "--window-size=1400,1000")
        self.assertEqual(shot.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
        print(f"\n  report screenshot: {shot}", file=sys.stderr)

    def test_report_of_ten_thousand_elements_stays_small(self) -> None:
        path = self.tmp / "wide.db"
        with reflow.SqliteStore(path) as store:
            _wide_run(store, "wide-1", 10000)
            report = reflow.write_report(store, "wide-1", self.tmp / "wide.html")
        size = report.stat().st_size
        self.assertLess(size, 3 * 1024 * 1024)
        text = report.read_text()
        (band,) = [b for b in _report_bars(text) if b["data-task"] == "work"]
        self.assertEqual((band["class"], band["data-elements"]), ("bar agg", "10000"))
        self.assertIn("<b>OUT_OF_MEMORY</b>: 250", text)
        self.assertIn("… and 50 more", text)
        print(f"\n  10,000-element report: {size / 1024:.0f} KiB", file=sys.stderr)

    def test_report_escapes_hostile_names(self) -> None:
        path = self.tmp / "hostile.db"
        evil = "<script>alert(1)</script>"
        with reflow.SqliteStore(path) as store:
            store.insert_run("evil-1", evil, evil, {"run_dir": str(self.tmp), evil: evil})
            store.insert_task_specs("evil-1", [{"task_name": evil, "is_array": True, "config": {}, "position": 0}])
            store.insert_task_instances("evil-1", evil, [{"array_index": 0, "state": "FAILED", "input": {},
                                                          "error_text": evil, "reason": evil, "job_id": evil}])
            text = reflow.write_report(store, "evil-1", self.tmp / "evil.html").read_text()
        self.assertNotIn("<script", text)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", text)

    def test_event_history_records_what_the_report_needs(self) -> None:
        with reflow.SqliteStore(self.tmp / "events.db") as store:
            store.insert_run("e-1", "wf", "ann", {"run_dir": str(self.tmp)})
            store.insert_task_specs("e-1", [{"task_name": "t", "is_array": True, "position": 0}])
            store.insert_task_instances("e-1", "t", [{"array_index": i, "state": "PENDING", "input": {}}
                                                     for i in range(2)])
            first, second = [row.id for row in store.instance_rows("e-1")]
            store.mark_submitted([(first, "9_0"), (second, "9_1")])
            store.mark_running([(first, 0, "2026-01-01T00:00:01+00:00")])
            store.apply_results([{"instance_id": first, "attempt": 0, "state": "FAILED", "exit_code": 137,
                                  "finished_at": "2026-01-01T00:00:05+00:00", "error_text": "killed"}])
            store.set_reasons([(first, "OUT_OF_MEMORY")])
            store.retry_instances([first])
            store.cancel_instances([second])
            events = [(e["instance_id"], e["event"], e["state"], e["attempt"], e["job_id"], e["exit_code"],
                       e["reason"]) for e in store.list_events("e-1") if e["instance_id"]]
            times = {e["event"]: e["at"] for e in store.list_events("e-1") if e["instance_id"] == first}
        self.assertEqual(events, [
            (first, "created", "PENDING", 0, None, None, ""), (second, "created", "PENDING", 0, None, None, ""),
            (first, "submitted", "SUBMITTED", 0, "9_0", None, ""),
            (second, "submitted", "SUBMITTED", 0, "9_1", None, ""),
            (first, "running", "RUNNING", 0, "9_0", None, ""), (first, "failed", "FAILED", 0, "9_0", 137, "exit 137"),
            (first, "reason", "FAILED", 0, "9_0", 137, "OUT_OF_MEMORY"),
            (first, "retrying", "RETRYING", 1, None, None, ""), (second, "cancelled", "CANCELLED", 0, "9_1", None,
                                                                 "CANCELLED")])
        self.assertEqual((times["running"], times["failed"]), ("2026-01-01T00:00:01+00:00",
                                                               "2026-01-01T00:00:05+00:00"))

    # -- bad input -------------------------------------------------------------------

    def test_bad_run_or_store_is_one_line_and_leaves_the_store_alone(self) -> None:
        old = self.tmp / "old.db"
        with contextlib.closing(sqlite3.connect(old)) as conn:
            conn.executescript(_REFERENCE_V1_DDL)
            conn.execute("PRAGMA user_version = 1")
        corrupt = self.tmp / "corrupt.db"
        corrupt.write_bytes(bytes(random_bytes(4096)))
        near = self.runs["cached"][:-1] + ("x" if self.runs["cached"][-1] != "x" else "y")
        stores = {"unknown run": (self.store_path, f"no run '{near}'.*Did you mean '{self.runs['cached']}'"),
                  "missing store": (self.tmp / "absent.db", "does not exist"),
                  "corrupt store": (corrupt, "not a readable sqlite database"),
                  "old schema": (old, "schema version 1")}
        commands = [("status", near), ("status", near, "--watch"), ("logs", near, "--failed"), ("dag", near),
                    ("report", near, "-o", self.tmp / "never.html"), ("cancel", near), ("retry", near), ("runs",)]
        for case, (store, message) in stores.items():
            before = store.read_bytes() if store.exists() else None
            for argv in commands:
                if argv == ("runs",) and case == "unknown run":
                    continue
                with self.subTest(case=case, command=argv[0]):
                    proc = run_cli(HERE / "reflow.py", *argv, "--store-path", store)
                    self.assertNotEqual(proc.returncode, 0)
                    self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)
                    self.assertRegex(proc.stderr, message)
                    self.assertEqual(store.read_bytes() if store.exists() else None, before)
        self.assertFalse((self.tmp / "never.html").exists())
        proc = self.cli("logs", self.runs["cached"], "sqare[3]")
        self.assertEqual(proc.returncode, 1)
        self.assertTrue(proc.stderr.strip().endswith("has no task 'sqare'. Did you mean 'square'?"), proc.stderr)
        proc = self.cli("logs", self.runs["cached"], "square[x]")
        self.assertEqual(proc.returncode, 2)


def check_operating_commands(test: unittest.TestCase, run: "reflow.Run", error: str = "") -> None:
    """Check ``logs --failed`` and ``report`` of a failed run against its store (any backend).

    Every failed element appears under its recorded reason with its job id, and the
    report names the same reasons and draws a bar for every element; ``error`` must
    show in the element's stderr or error tail.
    """
    store = ["--store-path", run.store.path]
    failed = run.store.list_task_instances(run.run_id, states=["FAILED"])
    test.assertTrue(failed)
    proc = run_cli(HERE / "reflow.py", "logs", run.run_id, "--failed", "--json", *store)
    test.assertEqual(proc.returncode, 0, proc.stderr)
    entries = json.loads(proc.stdout)
    test.assertEqual([(e["task"], e["index"], e["job_id"], e["reason"]) for e in entries],
                     [(i["task_name"], i["array_index"], i["job_id"], i["reason"]) for i in failed])
    if error:
        test.assertIn(error, "\n".join(entries[0]["stderr_tail"] + entries[0]["error_tail"]))
    text = run_cli(HERE / "reflow.py", "logs", run.run_id, "--failed", *store).stdout
    for inst in failed:
        test.assertIn(f"{inst['reason'] or 'unknown reason'}: ", text)
    page = Path(run.run_dir) / "report.html"
    proc = run_cli(HERE / "reflow.py", "report", run.run_id, "-o", page, *store)
    test.assertEqual(proc.returncode, 0, proc.stderr)
    html_text = page.read_text()
    for inst in failed:
        test.assertIn(html.escape(inst["reason"] or "unknown"), html_text)
    bars = {(b["data-task"], b.get("data-index", "")) for b in _report_bars(html_text)}
    test.assertEqual(bars, {(i["task_name"], "" if i["array_index"] is None else str(i["array_index"]))
                            for i in run.store.list_task_instances(run.run_id)})


def _wait_for_marks(directory: Path, names: List[str], timeout: float = 60) -> None:
    """Wait until every element named has left its mark (it is running)."""
    deadline = time.monotonic() + timeout
    while not all((directory / name).exists() for name in names):
        if time.monotonic() > deadline:
            raise AssertionError(f"elements {names} never started; marks: {sorted(os.listdir(directory))}")
        time.sleep(0.1)


def random_bytes(count: int) -> bytes:
    """Return ``count`` bytes that are not an sqlite header."""
    return b"not a database " + os.urandom(count)


def _report_bars(text: str) -> List[Dict[str, str]]:
    """Return the attributes of the timeline bars (``class="bar ..."``) of a report or DOM dump."""
    class Bars(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: List[Dict[str, str]] = []

        def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
            values = {key: value or "" for key, value in attrs}
            if tag == "rect" and values.get("class", "").split()[:1] == ["bar"]:
                self.found.append(values)

    parser = Bars()
    parser.feed(text)
    return parser.found


def _chromium(browser: str, profile: Path, page: Path, *options: str) -> Tuple[str, str]:
    """Load ``page`` in headless chromium without network; return (stdout, stderr)."""
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *options, page.as_uri()]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout, proc.stderr


def _wide_run(store: "reflow.SqliteStore", run_id: str, width: int) -> None:
    """Record a run with a ``width``-element array through the dispatcher's bulk calls (every 40th OOM)."""
    store.insert_run(run_id, "wide", "ann", {"run_dir": "/nonexistent", "n": width})
    store.insert_task_specs(run_id, [{"task_name": "seed", "position": 0},
                                     {"task_name": "work", "is_array": True, "position": 1, "dependencies": ["seed"]}])
    store.insert_task_instances(run_id, "seed", [{"array_index": None, "state": "SUCCESS", "input": {}, "output": 1}])
    store.insert_task_instances(run_id, "work", [{"array_index": i, "state": "PENDING", "input": {"x": i}}
                                                 for i in range(width)])
    rows = store.instance_rows(run_id, task_name="work")
    store.mark_submitted([(row.id, f"77_{row.array_index}") for row in rows])
    store.mark_running([(row.id, 0, None) for row in rows])
    store.apply_results([{"instance_id": row.id, "attempt": 0, "output": row.array_index,
                          "state": "FAILED" if row.array_index % 40 == 0 else "SUCCESS",
                          "exit_code": 137 if row.array_index % 40 == 0 else 0,
                          "reason": "OUT_OF_MEMORY" if row.array_index % 40 == 0 else ""} for row in rows])
    store.update_run_status(run_id, "FAILED")


# =============================================================================
# Reliability and security (issue 5)
# =============================================================================
#
# Fault injection: each test injects one fault and proves nothing is lost,
# nothing is done twice and nothing is injected.  Most drive whole runs
# through _SpoolScheduler, a scheduler whose queue is a directory of job files
# (shared by every process, so a killed process loses nothing the scheduler
# knew); its jobs are run by calling the worker and dispatcher entry points
# directly: fast, deterministic, no sleeps.  _FaultFigures counts faults,
# recoveries, lost elements, double submissions and bad inputs; main() prints them.


class _SpoolScheduler(reflow.Executor):
    """A scheduler whose queue is a directory: ``<n>.job`` (JSON) and ``<n>.done`` (final state)."""

    name = "spool"

    def __init__(self, spool: Path) -> None:
        super().__init__()
        self.spool = spool
        spool.mkdir(parents=True, exist_ok=True)

    def submit(self, resources: JobResources, command) -> str:
        record = json.dumps({"name": resources.job_name, "command": list(command), "array": resources.array})
        number = len(list(self.spool.glob("*.job")))
        while True:
            number += 1
            try:
                fd = os.open(self.spool / f"{number}.job", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            os.write(fd, record.encode())
            os.close(fd)
            return str(number)

    def jobs(self) -> Dict[str, dict]:
        """Return every job ever submitted, oldest first."""
        paths = sorted(self.spool.glob("*.job"), key=lambda p: int(p.stem))
        return {p.stem: json.loads(p.read_text()) for p in paths}

    def finish(self, job_id: str, state: str = "COMPLETED") -> None:
        (self.spool / f"{self.array_id(job_id)}.done").write_text(state)

    def job_state(self, job_id: str) -> Optional[str]:
        array = self.array_id(job_id)
        if not (self.spool / f"{array}.job").exists():
            return None
        done = self.spool / f"{array}.done"
        return done.read_text() if done.exists() else "PENDING"

    def cancel(self, job_id: str) -> None:
        if self.job_state(job_id) == "PENDING":
            self.finish(job_id, "CANCELLED")

    def array_id(self, job_id: str) -> str:
        return job_id.split("_", 1)[0]

    def find_jobs(self, name_prefix: str) -> Dict[str, List[str]]:
        found: Dict[str, List[str]] = {}
        for job_id, record in self.jobs().items():
            if record["name"].startswith(name_prefix) and self.job_state(job_id) == "PENDING":
                found.setdefault(record["name"], []).append(job_id)
        return found

    def dependency_options(self, job_ids, kind: str = "afterany") -> Dict[str, Any]:
        return {}  # jobs run in submission order, which honours every dependency the dispatcher asks for

    def pending(self) -> List[Tuple[str, dict]]:
        return [(job_id, rec) for job_id, rec in self.jobs().items() if self.job_state(job_id) == "PENDING"]

    def task_job_names(self) -> List[str]:
        """Return the names of every task job submitted (dispatch jobs left out)."""
        return [rec["name"] for rec in self.jobs().values() if not rec["name"].endswith("-dispatch")]


def _job_args(command: List[str]) -> Dict[str, Any]:
    """Parse ``python entry ROLE --opt value ... [--verify]`` into a dict (``role`` included)."""
    args: Dict[str, Any] = {"role": command[2]}
    rest = command[3:]
    while rest:
        if rest[0] == "--verify":
            args["--verify"], rest = True, rest[1:]
        else:
            args[rest[0]], rest = rest[1], rest[2:]
    return args


def _job_indices(record: dict, args: Dict[str, Any]) -> List[Optional[int]]:
    """Return the instance index each element of a worker job runs (None: a singleton)."""
    if not args.get("--positions"):
        return [None]
    first, last = map(int, record["array"].split("%")[0].split("-"))
    return [reflow._position_index(args["--positions"], offset) for offset in range(last - first + 1)]


def _run_job(wf, sched: _SpoolScheduler, record: dict) -> int:
    """Run one spooled job in this process (a dispatch cycle, or every element of a worker job); return its code."""
    args = _job_args(record["command"])
    if args["role"] == "dispatch":
        with reflow.SqliteStore(args["--store-path"]) as store:
            wf.dispatch(args["--run-id"], store, args["--run-dir"], executor=sched, verify=bool(args.get("--verify")))
        return 0
    return max(reflow.run_worker(wf, args["--run-id"], args["--store-path"], args["--run-dir"], args["--task"],
                                 index=index) for index in _job_indices(record, args))


def _drive(wf, sched: _SpoolScheduler, limit: int = 500) -> None:
    """Run pending jobs, oldest first, until none is left."""
    for _ in range(limit):
        pending = sched.pending()
        if not pending:
            return
        job_id, record = pending[0]
        with contextlib.redirect_stderr(io.StringIO()):
            _run_job(wf, sched, record)
        sched.finish(job_id)
    raise AssertionError(f"still {len(sched.pending())} pending jobs after {limit}")


def _in_child(function, **env: str) -> int:
    """Run ``function`` in a forked child with ``env`` set; return its exit code (137: a crash point hit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into unittest
        code = 1
        try:
            os.environ.update(env)
            with contextlib.redirect_stderr(io.StringIO()):
                code = function() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _success_events(path: Path, run_id: str) -> Dict[int, int]:
    """Return {instance id: number of 'success' events} of a run (exactly-once evidence)."""
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute("SELECT instance_id, COUNT(*) FROM events WHERE run_id = ? AND event = 'success' "
                            "GROUP BY instance_id", (run_id,)).fetchall()
    finally:
        conn.close()
    return dict(rows)


class _FaultFigures:
    """Counts behind the issue-5 closing figures (printed by main())."""

    faults = recovered = lost = doubled = bad_inputs = 0


class _LogCapture(logging.Handler):
    """Collect every record of the reflow logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.getMessage()}")


class _SpoolRunTest(TempDirTest):
    """Runs of FANOUT (prepare -> square[] -> total) on a _SpoolScheduler."""

    def setUp(self) -> None:
        super().setUp()
        self.mod = load_flow(self.tmp, FANOUT)
        self.wf = self.mod.wf

    def submit(self, base: Path, n: int, store_path: Optional[Path] = None) -> Tuple[str, _SpoolScheduler, Path]:
        store_path = store_path or base / "store" / "manifest.db"
        sched = _SpoolScheduler(base / "spool")
        with reflow.SqliteStore(store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            run = self.wf.submit(base / "run", store=store, executor=sched, n=n)
        return run.run_id, sched, store_path

    def whole_run(self, base: Path, n: int, store_path: Path, sched: _SpoolScheduler) -> None:
        """Submit a run and work its queue to the end (in a child that a crash point may kill)."""
        self.submit(base, n, store_path)
        _drive(self.wf, sched)

    def resume(self, sched: _SpoolScheduler, store_path: Path, run_id: str) -> None:
        """What a user does after a crash: ``resume`` (one cycle now), then the queue runs."""
        with reflow.SqliteStore(store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            if store.get_run(run_id)["status"] == "RUNNING":
                self.wf.dispatch(run_id, store, executor=sched)
        _drive(self.wf, sched)

    def assertCompleted(self, store_path: Path, run_id: str, sched: _SpoolScheduler, n: int) -> None:
        """The run succeeded, every element once, no task job submitted twice."""
        self.assertEqual(_integrity(store_path), "ok")
        with reflow.SqliteStore(store_path) as store:
            status = reflow.run_status(store, run_id)
            self.assertEqual(status["run"]["status"], "SUCCESS", status["failed_instances"])
            self.assertEqual(store.get_array_outputs(run_id, "square"), [i * i for i in range(n)])
            self.assertEqual(store.get_singleton_output(run_id, "total"), sum(i * i for i in range(n)))
            instances = store.list_task_instances(run_id)
        events = _success_events(store_path, run_id)
        lost = n + 2 - len(instances)
        doubled = sum(1 for count in events.values() if count > 1)
        names = sched.task_job_names()
        doubled += len(names) - len(set(names))
        _FaultFigures.lost += max(0, lost)
        _FaultFigures.doubled += doubled
        self.assertEqual(lost, 0)
        self.assertEqual(sorted(events), sorted(i["id"] for i in instances if not i["cached"]))  # cache hits: no run
        self.assertEqual(doubled, 0, (events, names))


class FaultInjectionTest(_SpoolRunTest):
    """Faults 1-4 and 6: simultaneous completion, killed workers and dispatchers, racing processes, bad results."""

    def _until_square_submitted(self, sched: _SpoolScheduler) -> Tuple[str, dict]:
        """Run the queue until the square array is queued; return its job."""
        for _ in range(10):
            squares = [(j, r) for j, r in sched.pending() if "-square-" in r["name"]]
            if squares:
                return squares[0]
            job_id, record = sched.pending()[0]
            with contextlib.redirect_stderr(io.StringIO()):
                _run_job(self.wf, sched, record)
            sched.finish(job_id)
        self.fail(f"square never submitted: {sched.jobs()}")

    def test_simultaneous_completion_ingested_exactly_once(self) -> None:
        """64 then 1,000 elements finish at once while two dispatchers ingest: each result applied once."""
        for width in (64, 1000):
            with self.subTest(width=width):
                run_id, sched, store_path = self.submit(self.tmp / f"w{width}", width)
                job_id, record = self._until_square_submitted(sched)
                indices = _job_indices(record, _job_args(record["command"]))
                self.assertEqual(sorted(indices), list(range(width)))
                capture = _LogCapture()
                reflow.log.addHandler(capture)
                reflow.log.setLevel(logging.DEBUG)
                try:
                    errors = self._race(run_id, record, indices, store_path, sched)
                finally:
                    reflow.log.removeHandler(capture)
                    reflow.log.setLevel(logging.NOTSET)
                _FaultFigures.faults += 1
                self.assertEqual(errors, [])
                self.assertEqual([m for m in capture.messages if "locked" in m.lower() or "busy" in m.lower()], [])
                sched.finish(job_id)
                _drive(self.wf, sched)
                self.assertCompleted(store_path, run_id, sched, width)
                with reflow.SqliteStore(store_path) as store:
                    attempts = {i["attempt"] for i in store.list_task_instances(run_id)}
                self.assertEqual(attempts, {0})
                results = reflow._results_dir(self.tmp / f"w{width}" / "run", run_id)
                self.assertEqual(list(results.iterdir()), [])  # every file ingested, none quarantined
                self.assertFalse((results.parent / "rejected").exists())
                _FaultFigures.recovered += 1

    def _race(self, run_id: str, record: dict, indices: List[Optional[int]], store_path: Path,
              sched: _SpoolScheduler) -> List[str]:
        """Run every element in 8 threads while 2 dispatchers cycle; return the errors raised."""
        args = _job_args(record["command"])
        errors: List[str] = []
        done = threading.Event()

        def guarded(function, *values):
            try:
                function(*values)
            except BaseException as exc:  # any error fails the test through ``errors``
                errors.append(f"{type(exc).__name__}: {exc}")

        def dispatcher() -> None:
            with reflow.SqliteStore(store_path) as store:
                while not done.is_set():
                    self.wf.dispatch(run_id, store, args["--run-dir"], executor=sched)
                    time.sleep(0.05)

        def worker(chunk: List[Optional[int]]) -> None:
            for index in chunk:
                reflow.run_worker(self.wf, run_id, store_path, args["--run-dir"], "square", index=index)

        dispatchers = [threading.Thread(target=guarded, args=(dispatcher,)) for _ in range(2)]
        workers = [threading.Thread(target=guarded, args=(worker, indices[k::8])) for k in range(8)]
        with contextlib.redirect_stderr(io.StringIO()):
            for thread in dispatchers + workers:
                thread.start()
            for thread in workers:
                thread.join()
            done.set()
            for thread in dispatchers:
                thread.join()
        return errors

    def test_dispatcher_killed_at_each_step(self) -> None:
        """kill -9 after ingest, between submit and record (tasks, forward, follow-up dispatcher), after submit."""
        points = ("after-ingest", "submitted-unrecorded", "after-submit", "forward-unrecorded", "after-forward",
                  "dispatch-submitted")
        for point in points:
            with self.subTest(point=point):
                base = self.tmp / point
                once = self.tmp / f"{point}.crashed"
                store_path = base / "store" / "manifest.db"
                sched = _SpoolScheduler(base / "spool")
                whole_run = functools.partial(self.whole_run, base, 4, store_path, sched)
                self.assertEqual(_in_child(whole_run, REFLOW_TEST_CRASH=f"{point}@{once}"), 137)
                self.assertTrue(once.exists())
                _FaultFigures.faults += 1
                self.assertEqual(_integrity(store_path), "ok")
                with reflow.SqliteStore(store_path) as store:
                    run_id = store.list_runs()[0]["run_id"]
                self.resume(sched, store_path, run_id)
                self.assertCompleted(store_path, run_id, sched, 4)
                _FaultFigures.recovered += 1

    def test_racing_dispatchers_and_submits(self) -> None:
        """Two dispatcher processes of one run at once, and two submits into one store at once."""
        run_id, sched, store_path = self.submit(self.tmp / "one", 3)
        gate = self.tmp / "go"

        def dispatch_at_gate() -> None:
            while not gate.exists():
                time.sleep(0.005)
            with reflow.SqliteStore(store_path) as store:
                self.wf.dispatch(run_id, store, executor=sched)

        job_id, record = sched.pending()[0]
        _run_job(self.wf, sched, record)  # prepare's result waits; both dispatchers race to ingest it
        sched.finish(job_id)
        pids = [self._spawn(dispatch_at_gate) for _ in range(2)]
        gate.write_text("go")
        self.assertEqual([self._reap(pid) for pid in pids], [0, 0])
        _FaultFigures.faults += 1
        _drive(self.wf, sched)
        self.assertCompleted(store_path, run_id, sched, 3)
        _FaultFigures.recovered += 1

        shared = self.tmp / "shared.db"
        with reflow.SqliteStore(shared) as store:
            store.init()
        gate.unlink()

        def submit_at_gate(name: str, n: int) -> None:
            while not gate.exists():
                time.sleep(0.005)
            _, spool, _ = self.submit(self.tmp / name, n, shared)
            _drive(self.wf, spool)

        widths = {"a": 3, "b": 4}  # different inputs: no cache hit between them
        pids = [self._spawn(submit_at_gate, name, n) for name, n in widths.items()]
        gate.write_text("go")
        self.assertEqual([self._reap(pid) for pid in pids], [0, 0])
        _FaultFigures.faults += 1
        with reflow.SqliteStore(shared) as store:
            runs = store.list_runs()
        self.assertEqual(len({r["run_id"] for r in runs}), 2)
        for name, n in widths.items():
            run = next(r for r in runs if r["parameters"]["run_dir"] == str(self.tmp / name / "run"))
            self.assertCompleted(shared, run["run_id"], _SpoolScheduler(self.tmp / name / "spool"), n)
            _FaultFigures.recovered += 1

    @staticmethod
    def _spawn(function, *values) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns into unittest
            code = 1
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    function(*values)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        return pid

    @staticmethod
    def _reap(pid: int) -> int:
        _, status = os.waitpid(pid, 0)
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)

    def test_bad_result_files_never_become_success(self) -> None:
        """Truncated, corrupt, foreign and renamed results, and one for a cancelled instance: reasons recorded."""
        base = self.tmp / "bad"
        run_id, sched, store_path = self.submit(base, 6)
        self._until_square_submitted(sched)
        other_id, _, _ = self.submit(self.tmp / "other", 7, store_path)  # its prepare is queued, not cached
        results = reflow._results_dir(base / "run", run_id)
        with reflow.SqliteStore(store_path) as store:
            ids = {i["array_index"]: i["id"] for i in store.list_task_instances(run_id, "square")}
            foreign_id = store.list_task_instances(other_id, "prepare")[0]["id"]
            store.cancel_instances([ids[5]], "USER")

        def good(index: int, **changes: Any) -> dict:
            record = {"instance_id": ids[index], "attempt": 0, "task_name": "square", "array_index": index,
                      "state": "SUCCESS", "output": 999, "output_hash": "x", "error_text": ""}
            record.update(changes)
            return record

        results.mkdir(parents=True, exist_ok=True)
        (results / "square__0__0.json").write_text(json.dumps(good(0))[:25])                  # truncated
        (results / "square__1__0.json").write_bytes(b"\xff\xfe\x00garbage")                  # not UTF-8
        (results / "square__2__0.json").write_text(json.dumps(good(2, instance_id=foreign_id)))  # another run's
        (results / "square__3__0.json").write_text(json.dumps(good(4)))                      # renamed: says 4
        (results / "square__5__0.json").write_text(json.dumps(good(5)))                      # cancelled meanwhile
        (results / "notes.json").write_text("{}")                                            # not ours at all
        _FaultFigures.faults += 6
        with reflow.SqliteStore(store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            self.wf.dispatch(run_id, store, executor=sched)
            square = {i["array_index"]: i for i in store.list_task_instances(run_id, "square")}
            other = store.list_task_instances(other_id, "prepare")[0]
        self.assertNotIn("SUCCESS", {square[i]["state"] for i in (0, 1, 2, 3, 4, 5)})
        for index in (0, 1, 2, 3):
            self.assertEqual((square[index]["state"], square[index]["reason"]), ("FAILED", "BAD_RESULT"))
            self.assertIn("malformed", square[index]["error_text"])
        self.assertEqual(square[5]["state"], "CANCELLED")
        self.assertEqual(other["state"], "SUBMITTED")  # the foreign record did not leak into the other run
        rejected = sorted(p.name[len(run_id) + 1:] for p in (results.parent / "rejected").iterdir())
        self.assertEqual(rejected, ["notes.json", "square__0__0.json", "square__1__0.json", "square__2__0.json",
                                    "square__3__0.json"])
        with contextlib.redirect_stdout(io.StringIO()), reflow.SqliteStore(store_path) as store:
            reflow.retry_run(store, run_id, executor=sched)
        _drive(self.wf, sched)
        self.assertCompleted(store_path, run_id, sched, 6)
        _FaultFigures.recovered += 1


class PowerLossTest(_SpoolRunTest):
    """Fault 9: the machine dies between any two store statements; the store stays sound and the run resumes."""

    STEP = 7  # every 7th statement of a whole run (submit, every cycle, every worker's read)

    def test_killed_between_any_two_statements(self) -> None:
        crashes = 0
        for statement in itertools.count(1, self.STEP):
            base = self.tmp / f"s{statement}"
            store_path = base / "store" / "manifest.db"
            sched = _SpoolScheduler(base / "spool")
            whole_run = functools.partial(self.whole_run, base, 3, store_path, sched)
            code = _in_child(whole_run, REFLOW_TEST_CRASH=f"statement:{statement}")
            if code == 0:
                break  # the run needs fewer statements: every point before this one was tried
            self.assertEqual(code, 137, f"statement {statement}")
            crashes += 1
            _FaultFigures.faults += 1
            with self.subTest(statement=statement):
                self.assertEqual(_integrity(store_path), "ok")
                with reflow.SqliteStore(store_path) as store:
                    runs = store.list_runs()
                if runs:
                    run_id = runs[0]["run_id"]
                else:  # died before the run was committed: nothing to resume, submit again
                    run_id, sched, _ = self.submit(base, 3, store_path)
                self.resume(sched, store_path, run_id)
                self.assertCompleted(store_path, run_id, sched, 3)
                _FaultFigures.recovered += 1
        self.assertGreater(crashes, 10)

    def test_killed_during_schema_migration(self) -> None:
        """Fault 8 meets 9: a version-1 store whose upgrade dies at any statement is upgraded whole, or not at all."""
        original = self.tmp / "v1.db"
        conn = sqlite3.connect(str(original))
        conn.executescript(_REFERENCE_V1_DDL)
        conn.execute("PRAGMA user_version = 1")
        conn.close()
        for statement in itertools.count(1):
            path = self.tmp / f"m{statement}" / "manifest.db"
            path.parent.mkdir()
            shutil.copyfile(original, path)
            code = _in_child(lambda path=path: reflow.SqliteStore(path).init(),
                             REFLOW_TEST_CRASH=f"statement:{statement}")
            if code == 0:
                break
            self.assertEqual(code, 137)
            _FaultFigures.faults += 1
            self.assertEqual(_integrity(path), "ok")
            conn = sqlite3.connect(str(path))
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            columns = {row[1] for row in conn.execute("PRAGMA table_info(task_instances)")}
            conn.close()
            self.assertIn((version, "attempt" in columns), [(1, False), (reflow.SCHEMA_VERSION, True)])
            with reflow.SqliteStore(path) as store:
                self.assertEqual(store.get_run("old-1")["parameters"], {"n": 3})
                self.assertEqual(store.get_task_instance("old-1", "prep", None)["output"], [1, 2])
            _FaultFigures.recovered += 1
        self.assertGreater(statement, 5)


class DiskFullTest(_SpoolRunTest):
    """Fault 7: the file-size limit (RLIMIT_FSIZE, as a full disk or quota) while writing a result or the store."""

    BIG = """
        import os, resource
        from reflow import Workflow
        wf = Workflow("big")

        @wf.job()
        def big() -> str:
            if os.path.exists(os.environ["LIMIT_FLAG"]):
                resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
            return "x" * 100000
    """

    def test_result_too_big_for_the_disk_then_retry(self) -> None:
        flag = self.tmp / "limit"
        flag.write_text("on")
        mod = load_flow(self.tmp, self.BIG)
        sched = _SpoolScheduler(self.tmp / "spool")
        with mock_env(LIMIT_FLAG=str(flag)), reflow.SqliteStore(self.store_path) as store:
            with contextlib.redirect_stderr(io.StringIO()):
                run = mod.wf.submit(self.tmp / "run", store=store, executor=sched)
            job_id, record = sched.pending()[0]
            self.assertEqual(_in_child(lambda: _run_job(mod.wf, sched, record)), 1)  # the worker reports failure
            _FaultFigures.faults += 1
            sched.finish(job_id)
            _drive(mod.wf, sched)
            inst = store.get_task_instance(run.run_id, "big", None)
            self.assertEqual((store.get_run(run.run_id)["status"], inst["state"], inst["reason"]),
                             ("FAILED", "FAILED", "RESULT_NOT_WRITTEN"))
            self.assertIn("File too large", inst["error_text"])
            flag.unlink()  # space is back
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(reflow.retry_run(store, run.run_id, executor=sched), 1)
            _drive(mod.wf, sched)
            self.assertEqual(store.get_singleton_output(run.run_id, "big"), "x" * 100000)
        _FaultFigures.recovered += 1

    def test_store_write_past_the_limit_fails_cleanly(self) -> None:
        run_id, sched, store_path = self.submit(self.tmp / "r", 3)
        before = _snapshot(store_path.parent)
        limit = store_path.stat().st_size + 8192

        def huge_write() -> None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            with reflow.SqliteStore(store_path) as store:
                try:
                    store.insert_run("huge-run", "big", "me", {"blob": "y" * 400000})
                except reflow.StoreError as exc:
                    message = str(exc)
                    assert "\n" not in message and str(store_path) in message, message
                    assert "full" in message or "large" in message or "I/O" in message, message
                    os._exit(3)

        self.assertEqual(_in_child(huge_write), 3)
        _FaultFigures.faults += 1
        self.assertEqual(_integrity(store_path), "ok")
        self.assertEqual(_snapshot(store_path.parent), before)  # the rolled-back write left nothing behind
        _drive(self.wf, sched)  # space is back: the run goes on
        self.assertCompleted(store_path, run_id, sched, 3)
        _FaultFigures.recovered += 1


class LockFallbackTest(TempDirTest):
    """Fault 8: filesystems without working locks (NFS without lockd), and stores of other schema versions."""

    def test_run_lock_falls_back_to_a_lock_directory(self) -> None:
        def no_locks(fd, operation):
            raise OSError(errno.ENOLCK, "No locks available")

        run_dir = self.tmp / "run"
        with mock.patch.object(reflow.fcntl, "flock", no_locks):
            with reflow._run_lock(run_dir, "r1", timeout=0.5) as first:
                self.assertTrue(first)
                self.assertTrue((run_dir / ".reflow" / "dispatch-r1.lockdir").is_dir())
                with reflow._run_lock(run_dir, "r1", timeout=0.3) as second:
                    self.assertFalse(second)  # held: a second dispatcher leaves the cycle to the first
            self.assertFalse((run_dir / ".reflow" / "dispatch-r1.lockdir").exists())
            stale = run_dir / ".reflow" / "dispatch-r1.lockdir"
            stale.mkdir()
            os.utime(stale, (time.time() - 3600, time.time() - 3600))  # left by a dispatcher that died
            with reflow._run_lock(run_dir, "r1", timeout=60) as taken:
                self.assertTrue(taken)
        _FaultFigures.faults += 1
        _FaultFigures.recovered += 1

    def test_dotfile_locking_for_nfs(self) -> None:
        with mock_env(REFLOW_SQLITE_LOCKING="dotfile"):
            store = reflow.SqliteStore(self.store_path)
            store.init()
            with store.transaction():
                store.insert_run("r1", "wf", "me", {})
                self.assertTrue(Path(f"{self.store_path}.lock").exists())  # the lock is a file, not fcntl
            self.assertFalse(Path(f"{self.store_path}.lock").exists())
            other = reflow.SqliteStore(self.store_path, readonly=True)
            self.assertEqual(other.get_run("r1")["graph_name"], "wf")
            other.close()
            store.close()
        with mock_env(REFLOW_SQLITE_LOCKING="flock-ish"), \
                self.assertRaisesRegex(reflow.StoreError, "unknown REFLOW_SQLITE_LOCKING 'flock-ish'"):
            reflow.SqliteStore(self.store_path)

    def test_lock_failures_point_to_the_nfs_guidance(self) -> None:
        self.assertIn("REFLOW_SQLITE_LOCKING=dotfile", reflow._lock_hint(sqlite3.OperationalError("locking protocol")))
        self.assertIn("README", reflow._lock_hint(sqlite3.OperationalError("disk I/O error")))
        self.assertEqual(reflow._lock_hint(sqlite3.OperationalError("database is locked")), "")
        self.assertIn("Stores on NFS", (HERE / "README.md").read_text())


class _TimeoutOnceScheduler(_SpoolScheduler):
    """Says the first task-job submit timed out (like sbatch when the controller is slow), whether or not it got in.

    The dispatcher turns ``retry_uncertain_submits`` off for task jobs, as it
    does on the real batch executors; this scheduler checks that it did.
    """

    retry_uncertain_submits = True

    def __init__(self, spool: Path, went_through: bool) -> None:
        super().__init__(spool)
        self.went_through, self.timed_out = went_through, False

    def submit(self, resources: JobResources, command) -> str:
        if self.timed_out or resources.job_name.endswith("-dispatch") or self.retry_uncertain_submits:
            return super().submit(resources, command)
        self.timed_out = True
        if self.went_through:
            super().submit(resources, command)
        raise reflow.SubmitUncertain("sbatch exited 124: sbatch: timed out after 60s",
                                     reflow.CommandResult(["sbatch"], "", "sbatch: timed out after 60s", 124))


class SubmitTimeoutTest(_SpoolRunTest):
    """Fault 5: a task-job submit times out; whether it got in or not, the job is neither lost nor doubled."""

    def test_a_timed_out_submit_is_looked_up_before_it_is_repeated(self) -> None:
        for went_through in (True, False):
            with self.subTest(went_through=went_through):
                base = self.tmp / str(went_through)
                sched = _TimeoutOnceScheduler(base / "spool", went_through)
                store_path = base / "store" / "manifest.db"
                with reflow.SqliteStore(store_path) as store, contextlib.redirect_stderr(io.StringIO()):
                    run_id = self.wf.submit(base / "run", store=store, executor=sched, n=4).run_id
                _drive(self.wf, sched)
                self.assertTrue(sched.timed_out)
                _FaultFigures.faults += 1
                self.assertCompleted(store_path, run_id, sched, 4)  # no task job name submitted twice
                _FaultFigures.recovered += 1


class WaitingDispatcherTest(_SpoolRunTest):
    """Run.wait runs the dispatch cycle itself once a stage's results are in; the queued dispatch job is a spare."""

    def setUp(self) -> None:
        super().setUp()
        self.base = self.tmp / "w"
        self.store_path = self.base / "store" / "manifest.db"
        self.sched = _SpoolScheduler(self.base / "spool")
        self.store = reflow.SqliteStore(self.store_path)
        self.addCleanup(self.store.close)
        with contextlib.redirect_stderr(io.StringIO()):
            self.run = self.wf.submit(self.base / "run", store=self.store, executor=self.sched, n=3)

    def run_task_jobs(self) -> None:
        """Run every pending worker job (the dispatch jobs stay queued, like jobs stuck behind others)."""
        for job_id, record in self.sched.pending():
            if not record["name"].endswith("-dispatch"):
                with contextlib.redirect_stderr(io.StringIO()):
                    _run_job(self.wf, self.sched, record)
                self.sched.finish(job_id)

    def dispatch_jobs(self) -> Dict[str, str]:
        return {job_id: self.sched.job_state(job_id) for job_id, record in self.sched.jobs().items()
                if record["name"].endswith("-dispatch")}

    def poll(self) -> bool:
        with contextlib.redirect_stderr(io.StringIO()):
            return self.run._waiting_dispatcher.poll()

    def test_the_waiting_client_runs_each_cycle_and_cancels_the_spare_dispatch_job(self) -> None:
        self.assertFalse(self.poll())  # prepare has not run: nothing to do
        self.run_task_jobs()
        self.assertTrue(self.poll())
        self.assertEqual(sorted(name.split("-")[1] for name in self.sched.task_job_names()),
                         ["prepare", "square", "total"])  # total forward-submitted after square
        # the spare dispatch job is replaced by one that waits on square and total
        self.assertEqual(list(self.dispatch_jobs().values()), ["CANCELLED", "PENDING"])
        self.assertEqual(self.store.get_run(self.run.run_id)["dispatch_job_id"], list(self.dispatch_jobs())[1])
        self.assertFalse(self.poll())  # nothing new
        self.run_task_jobs()
        self.assertTrue(self.poll())
        self.assertEqual(self.run.state, "SUCCESS")
        self.assertEqual(self.store.get_singleton_output(self.run.run_id, "total"), 5)
        self.assertEqual(list(self.dispatch_jobs().values()), ["CANCELLED", "CANCELLED"])
        self.assertCompleted(self.store_path, self.run.run_id, self.sched, 3)

    def start_square_and_run(self, indices: Iterable[int]) -> None:
        """Run prepare's jobs, let the client submit square, then run square's elements ``indices`` in process."""
        self.run_task_jobs()
        self.assertTrue(self.poll())
        square = next(rec for _, rec in self.sched.pending() if "-square-" in rec["name"])
        args = _job_args(square["command"])
        with contextlib.redirect_stderr(io.StringIO()):
            for index in indices:
                reflow.run_worker(self.wf, self.run.run_id, str(self.store_path), args["--run-dir"], "square",
                                  index=index)

    def test_a_cycle_that_submits_nothing_leaves_the_spare_alone(self) -> None:
        self.start_square_and_run(range(3))
        spare = self.store.get_run(self.run.run_id)["dispatch_job_id"]
        self.assertFalse(self.poll())  # total was forward-submitted: square's results start nothing new
        self.assertEqual(self.dispatch_jobs()[spare], "PENDING")
        self.assertEqual(len(self.dispatch_jobs()), 2)

    def test_no_cycle_while_a_stage_still_has_jobs_in_flight(self) -> None:
        self.start_square_and_run([0])
        self.assertFalse(self.poll())  # one of three square results: ingesting it would start nothing
        self.assertEqual(self.store.task_state_summary(self.run.run_id)["square"], {"SUBMITTED": 3})

    def test_a_dispatch_job_that_runs_after_the_client_doubles_nothing(self) -> None:
        self.run_task_jobs()
        self.assertTrue(self.poll())
        _drive(self.wf, self.sched)  # the queued dispatch job runs too, then everything else
        self.assertEqual(self.run.state, "SUCCESS")
        self.assertCompleted(self.store_path, self.run.run_id, self.sched, 3)

    def test_a_busy_lock_leaves_the_cycle_to_its_holder(self) -> None:
        self.run_task_jobs()
        with reflow._run_lock(self.base / "run", self.run.run_id) as locked:
            self.assertTrue(locked)
            self.assertFalse(self.poll())
        self.assertEqual(self.sched.task_job_names(), [self.sched.task_job_names()[0]])  # only prepare

    def test_an_interrupted_worker_is_left_to_the_dispatch_job(self) -> None:
        inst = self.store.get_task_instance(self.run.run_id, "prepare", None)
        results = reflow._results_dir(self.base / "run", self.run.run_id)
        results.mkdir(parents=True, exist_ok=True)
        record = {"instance_id": inst["id"], "attempt": inst["attempt"], "state": "FAILED", "output": None,
                  "output_hash": "", "error_text": "Task interrupted by SIGTERM (signal 15)", "task_name": "prepare",
                  "array_index": None, "reason": reflow.INTERRUPTED}
        path = results / "prepare__singleton__0.json"
        path.write_text(json.dumps(record))
        self.assertTrue(self.poll())  # the cycle runs, but leaves the result where it is
        self.assertTrue(path.exists())
        self.assertEqual(self.store.task_state_summary(self.run.run_id)["prepare"], {"SUBMITTED": 1})
        self.assertEqual(list(self.dispatch_jobs().values()), ["PENDING"])  # nothing submitted: the spare stays
        job_id = next(j for j, rec in self.sched.pending() if "-prepare-" in rec["name"])
        self.sched.finish(job_id, "TIMEOUT")  # the scheduler's final word
        _drive(self.wf, self.sched)
        failed = self.store.get_task_instance(self.run.run_id, "prepare", None)
        self.assertEqual((failed["state"], failed["reason"]), ("FAILED", "TIMEOUT"))
        self.assertEqual(self.run.state, "FAILED")

    def test_wait_ends_a_run_whose_dispatch_jobs_never_start(self) -> None:
        stop = threading.Event()

        def scheduler() -> None:
            while not stop.is_set():
                self.run_task_jobs()
                time.sleep(0.02)

        thread = threading.Thread(target=scheduler)
        thread.start()
        try:
            with self.assertRaises(TimeoutError):
                self.run.wait(timeout=1.0, poll=0.05, dispatch=False)
            self.assertEqual(self.run.wait(timeout=60, poll=0.05), "SUCCESS")
        finally:
            stop.set()
            thread.join()
        self.assertEqual(set(self.dispatch_jobs().values()), {"CANCELLED"})  # no dispatch job ever ran
        self.assertCompleted(self.store_path, self.run.run_id, self.sched, 3)


class SchedulerOutageTest(FakeSchedulerCase):
    """Fault 5: transient scheduler failures from a fake sbatch on PATH, at the level of whole runs."""

    def setUp(self) -> None:
        super().setUp()
        env = mock_env(XDG_CONFIG_HOME=str(self.tmp / "config"), XDG_CACHE_HOME=str(self.tmp / "cache"),
                       HOME=str(self.tmp / "home"), REFLOW_STORE_PATH=str(self.tmp / "store.db"),
                       REFLOW_SCHED_TIMEOUT="1")
        env.__enter__()
        self.addCleanup(env.__exit__, None, None, None)
        self.wf = load_flow(self.tmp, FANOUT).wf

    def submit(self):
        """Submit n=2 on Slurm; return (run id or None, the error raised or None)."""
        store = reflow.SqliteStore(self.tmp / "store.db")
        self.addCleanup(store.close)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return self.wf.submit(self.work / "run", store=store, executor="slurm", n=2).run_id, None
        except reflow.ExecutorError as exc:
            runs = store.list_runs()
            return (runs[0]["run_id"] if runs else None), exc

    def prepare(self, run_id: str) -> dict:
        with reflow.SqliteStore(self.tmp / "store.db") as store:
            return store.get_task_instance(run_id, "prepare", None)

    def test_transient_failures_are_retried_and_recovered(self) -> None:
        faults = [{"rc": 1, "stderr": "sbatch: error: Socket timed out on send/recv operation"},
                  {"rc": 1, "stderr": "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying"},
                  {"sleep": 5, "stdout": "1\n"},                 # hangs past REFLOW_SCHED_TIMEOUT
                  {"rc": 1, "stderr": "sbatch: error: slurm_receive_msg: Zero Bytes were transmitted or received"}]
        for fault in faults:
            with self.subTest(fault=fault):
                for stale in self.tmp.glob("sbatch.*"):
                    stale.unlink()
                shutil.rmtree(self.work / "run", ignore_errors=True)
                self.answer("sbatch", fault, {"stdout": "4242\n"})
                run_id, error = self.submit()
                self.assertIsNone(error)
                self.assertEqual((self.prepare(run_id)["state"], self.prepare(run_id)["job_id"]), ("SUBMITTED", "4242"))
                _FaultFigures.faults += 1
                _FaultFigures.recovered += 1

    def test_permanent_errors_fail_fast_with_the_message(self) -> None:
        for answer, text in (({"rc": 1, "stderr": "sbatch: error: Batch job submission failed: Invalid account or "
                                                  "account/partition combination specified"}, "Invalid account"),
                             ({"stdout": ""}, "sbatch"),              # exit 0 but no job id
                             ({"stdout": "Submitted nothing today\n"}, "Submitted nothing today")):  # garbage
            with self.subTest(answer=answer):
                for stale in self.tmp.glob("sbatch.*"):
                    stale.unlink()
                (self.tmp / "calls.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.work / "run", ignore_errors=True)
                self.answer("sbatch", answer)
                run_id, error = self.submit()
                self.assertIsNone(error)
                self.assertEqual(len(self.calls("sbatch")), 1)  # no retry of a permanent error
                prepare = self.prepare(run_id)
                self.assertEqual((prepare["state"], prepare["reason"]), ("FAILED", "SUBMIT_FAILED"))
                self.assertIn(text, prepare["error_text"])
                with reflow.SqliteStore(self.tmp / "store.db") as store:
                    self.assertEqual(store.get_run(run_id)["status"], "FAILED")
                _FaultFigures.faults += 1

    def test_scheduler_down_for_good_fails_the_run_instead_of_hanging(self) -> None:
        down = {"rc": 1, "stderr": "sbatch: error: Socket timed out on send/recv operation"}
        self.answer("sbatch", {"stdout": "4242\n"}, down)  # the task job goes in, then the controller dies
        run_id, error = self.submit()
        self.assertIsNotNone(error)
        self.assertIn("cannot submit its next dispatch cycle", str(error))
        self.assertIn("Socket timed out", str(error))
        self.assertEqual(len(self.calls("sbatch")), 1 + 3)  # REFLOW_SCHED_RETRIES=2: three tries, then give up
        with reflow.SqliteStore(self.tmp / "store.db") as store:
            self.assertEqual(store.get_run(run_id)["status"], "FAILED")
            _FaultFigures.faults += 1
            self.answer("sbatch", {"stdout": "4343\n"})  # the scheduler is back: retry resumes the run
            (self.tmp / "sbatch.count").unlink()
            with contextlib.redirect_stdout(io.StringIO()):
                reflow.retry_run(store, run_id, executor=SlurmExecutor())
            self.assertEqual((store.get_run(run_id)["status"], store.get_run(run_id)["dispatch_job_id"]),
                             ("RUNNING", "4343"))
            self.assertEqual(self.prepare(run_id)["job_id"], "4242")  # the job already queued is kept, not doubled
        _FaultFigures.recovered += 1


class KilledWorkerTest(TempDirTest):
    """Fault 2: ``kill -9`` of a worker mid-task; the element fails with the reason, ``retry`` completes the run."""

    def test_killed_worker_then_retry(self) -> None:
        mod = load_flow(self.tmp, LocalSubmitTest.SLEEPY)
        marks = self.tmp / "marks"
        marks.mkdir()
        with mock_env(MARKS=str(marks), NAP="2", REFLOW_LOST_JOB_GRACE="0"):
            run = mod.wf.submit(self.tmp / "run", executor="local")
            deadline = time.monotonic() + 60
            while not (marks / "0.pid").exists() or not (marks / "0.pid").read_text():
                self.assertLess(time.monotonic(), deadline, "worker 0 never started")
                time.sleep(0.05)
            os.kill(int((marks / "0.pid").read_text()), signal.SIGKILL)
            _FaultFigures.faults += 1
            self.assertEqual(run.wait(timeout=60), "FAILED")
        lost = run.store.get_task_instance(run.run_id, "sleepy", 0)
        self.assertEqual((lost["state"], lost["reason"]), ("FAILED", "signal 9"))
        with mock_env(MARKS=str(marks), NAP="0"), contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(run.retry(), 1)
            self.assertEqual(run.wait(timeout=60), "SUCCESS")
        _FaultFigures.recovered += 1
        self.assertEqual(run.store.get_array_outputs(run.run_id, "sleepy"), [0, 1])
        self.assertEqual(run.store.get_task_instance(run.run_id, "sleepy", 0)["attempt"], 1)
        events = _success_events(self.store_path, run.run_id)
        self.assertEqual(sorted(events.values()), [1, 1, 1])  # seed, sleepy[0], sleepy[1]: each SUCCESS once


_SLURM_HELD = """
import os, time
from reflow import Result, Workflow

wf = Workflow("WFNAME")


@wf.job(mem="200M")
def seed() -> list[int]:
    return [0, 1, 2]


@wf.job(array=True, mem="200M", time="00:05:00")
def held(x: int = Result(step="seed")) -> int:
    open(os.path.join(MARKS, str(x)), "w").close()
    deadline = time.time() + 120
    while os.path.exists(HOLD) and time.time() < deadline:
        time.sleep(0.2)
    return x


MARKS, HOLD = "MARKSPATH", "HOLDPATH"
"""


class SlurmFaultTest(TempDirTest):
    """On the real Slurm: ``scancel`` of one array element (fault 2), and a run directory of shell syntax."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        problem = SlurmBackendTest.unavailable()
        if problem:
            if IN_CI:
                raise AssertionError(f"{cls.__name__}: {problem} (CI=true: a missing scheduler is a failure)")
            raise unittest.SkipTest(f"{cls.__name__}: {problem}")

    def setUp(self) -> None:
        super().setUp()
        env = mock_env(REFLOW_LOST_JOB_GRACE="0", REFLOW_SCHED_BACKOFF="0.2",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
        env.__enter__()
        self.addCleanup(env.__exit__, None, None, None)

    def test_hostile_run_dir_on_slurm(self) -> None:
        """Job scripts, --chdir, log paths and dependency lists of a real run in a directory of shell syntax."""
        mod = load_flow(self.tmp, FANOUT.replace('Workflow("fan")', f'Workflow("fan{uuid.uuid4().hex[:6]}")'))
        run = mod.wf.submit(self.tmp / HOSTILE_DIR, executor="slurm", n=3)
        try:
            self.assertEqual(run.wait(timeout=120), "SUCCESS", run.status(as_dict=True))
        finally:
            with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                if run.state == "RUNNING":
                    run.cancel()
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 5)
        self.assertEqual(sorted(str(p) for p in self.tmp.rglob("pwned*")), [])

    def test_scancel_one_element_then_retry(self) -> None:
        marks, hold = self.tmp / "marks", self.tmp / "hold"
        marks.mkdir()
        hold.write_text("hold")
        name = "held" + uuid.uuid4().hex[:6]
        source = _SLURM_HELD.replace("WFNAME", name).replace("MARKSPATH", str(marks)).replace("HOLDPATH", str(hold))
        mod = load_flow(self.tmp, source)
        run = mod.wf.submit(self.tmp / "run", executor="slurm")
        try:
            self._cancel_one_element(run, marks, hold)
        finally:
            hold.unlink(missing_ok=True)
            with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                if run.state == "RUNNING":
                    run.cancel()

    def _cancel_one_element(self, run, marks: Path, hold: Path) -> None:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 3:
            self.assertLess(time.monotonic(), deadline, f"elements never all started: {run.status(as_dict=True)}")
            time.sleep(0.25)
        victim = run.store.get_task_instance(run.run_id, "held", 1)
        subprocess.run(["scancel", victim["job_id"]], check=True, capture_output=True, timeout=30)
        _FaultFigures.faults += 1
        hold.unlink()  # the other elements finish; the next cycle sees the cancelled one
        self.assertEqual(run.wait(timeout=120), "FAILED", run.status(as_dict=True))
        victim = run.store.get_task_instance(run.run_id, "held", 1)
        self.assertEqual(victim["state"], "FAILED", victim["error_text"])
        self.assertRegex(victim["reason"], r"^CANCELLED")  # sacct may add "by <uid>"
        self.assertIn("interrupted by SIGTERM", victim["error_text"])  # scancel's signal, caught by the worker
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(run.retry(), 1)
        self.assertEqual(run.wait(timeout=120), "SUCCESS", run.status(as_dict=True))
        _FaultFigures.recovered += 1
        self.assertEqual(run.store.get_array_outputs(run.run_id, "held"), [0, 1, 2])
        self.assertEqual(sorted(_success_events(self.store_path, run.run_id).values()), [1, 1, 1, 1])


_ECHO_FLOW = """
from reflow import Workflow

wf = Workflow("echo")


@wf.job()
def echo(text: str) -> str:
    return text


if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""

#: Hostile values as one parameter (HOSTILE minus the empty word, which argparse cannot tell from none).
_HOSTILE_TEXT = "|".join(word for word in HOSTILE if word) + "|-x |with space|'|\"|;|$(touch pwned3)"


#: A directory name made of shell syntax (no newline: Slurm and the local executor would take it, but it is cruel).
HOSTILE_DIR = "run $(touch pwned) `touch pwned2`; 'q' \"d\" -x ü"


class SecurityTest(TempDirTest):
    """Nothing injected: hostile values run nothing, files are private, no unsafe calls in reflow.py."""

    def test_hostile_parameters_reach_the_function_verbatim(self) -> None:
        """Through the CLI, the job command lines and the local executor's jobs, on the spool and local executors."""
        flow = self.tmp / "echo_flow.py"
        flow.write_text(textwrap.dedent(_ECHO_FLOW))
        proc = run_cli(flow, "submit", "--executor", "local", "--run-dir", self.tmp / "run", "--text",
                       _HOSTILE_TEXT, "--wait", cwd=self.tmp)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with reflow.SqliteStore(self.store_path) as store:
            run_id = store.list_runs()[0]["run_id"]
            self.assertEqual(store.get_singleton_output(run_id, "echo"), _HOSTILE_TEXT)
        mod = load_flow(self.tmp, _ECHO_FLOW)
        sched = _SpoolScheduler(self.tmp / "spool")
        with reflow.SqliteStore(self.store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            run = mod.wf.submit(self.tmp / "run2", store=store, executor=sched, text=_HOSTILE_TEXT)
            _drive(mod.wf, sched)
            self.assertEqual(store.get_singleton_output(run.run_id, "echo"), _HOSTILE_TEXT)
        for record in sched.jobs().values():  # argv words, never a shell string
            self.assertIsInstance(record["command"], list)
        self.assertEqual(sorted(str(p) for p in self.tmp.rglob("pwned*")), [])

    def test_hostile_run_dir_runs_nothing(self) -> None:
        """A run directory full of shell syntax ends up in job commands, log paths and workdirs, quoted."""
        run_dir = self.tmp / HOSTILE_DIR
        (self.tmp / "fan.py").write_text(textwrap.dedent(FANOUT))
        proc = run_cli(self.tmp / "fan.py", "submit", "--executor", "local", "--run-dir", run_dir, "--n", "3",
                       "--wait", cwd=self.tmp)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with reflow.SqliteStore(self.store_path) as store:
            run_id = store.list_runs()[0]["run_id"]
            self.assertEqual(store.get_singleton_output(run_id, "total"), 5)
        self.assertTrue(list((run_dir / "logs").iterdir()))
        self.assertEqual(sorted(str(p) for p in self.tmp.rglob("pwned*")), [])

    def test_hostile_task_and_flow_names_are_refused(self) -> None:
        for name in ("$(touch pwned)", "`touch pwned`", "a;b", "it's", "two\nlines", "-leading", "with space",
                     "../escape", "a/b", ".hidden", ""):
            with self.subTest(name=name):
                wf = Workflow("names")
                with self.assertRaisesRegex(ValueError, "invalid task name"):
                    wf.job(name=name)(lambda: 1)
                with self.assertRaisesRegex(ValueError, "invalid workflow/flow name"):
                    Workflow(name or "\n")
        wf = Workflow("names")
        wf.job(name="ünïcödé-ok.v2")(lambda: 1)  # letters of any script are fine
        self.assertIn("ünïcödé-ok.v2", wf.tasks)

    def test_private_files_regardless_of_umask(self) -> None:
        for mask in (0o000, 0o077, 0o022):
            with self.subTest(umask=oct(mask)), _umask(mask):
                base = self.tmp / f"u{mask:o}"
                mod = load_flow(self.tmp, FANOUT)
                sched = _SpoolScheduler(base / "spool")
                store_path = base / "store" / "manifest.db"
                with reflow.SqliteStore(store_path) as store, contextlib.redirect_stderr(io.StringIO()):
                    run = mod.wf.submit(base / "run", store=store, executor=sched, n=2)
                    _run_job(mod.wf, sched, sched.pending()[0][1])  # leaves its result and start marker in place
                self.assertEqual(stat.S_IMODE(store_path.stat().st_mode), 0o600)
                self.assertEqual(stat.S_IMODE(store_path.parent.stat().st_mode), 0o700)
                results = reflow._results_dir(base / "run", run.run_id)
                for directory in (base / "run", base / "run" / "logs", base / "run" / ".reflow", results.parent,
                                  results):
                    self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700, directory)
                files = list(results.iterdir())
                self.assertEqual(len(files), 2)
                for path in files:
                    self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)

    def test_planted_symlink_cannot_redirect_a_result(self) -> None:
        mod = load_flow(self.tmp, FANOUT)
        sched = _SpoolScheduler(self.tmp / "spool")
        with reflow.SqliteStore(self.store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            run = mod.wf.submit(self.tmp / "run", store=store, executor=sched, n=2)
        results = reflow._results_dir(self.tmp / "run", run.run_id)
        target = self.tmp / "victim.txt"
        target.write_text("precious")
        results.mkdir(parents=True, exist_ok=True)
        for suffix in ("json", "started"):
            (results / f"prepare__singleton__0.{suffix}").symlink_to(target)
        _FaultFigures.faults += 1
        _drive(mod.wf, sched)
        self.assertEqual(target.read_text(), "precious")
        with reflow.SqliteStore(self.store_path) as store:
            self.assertEqual(store.get_run(run.run_id)["status"], "SUCCESS")
        self.assertFalse([p for p in results.iterdir() if p.is_symlink()])

    def test_no_pickle_eval_exec_or_shell_in_reflow(self) -> None:
        import ast
        tree = ast.parse((HERE / "reflow.py").read_text(encoding="utf-8"))
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                found += [f"import {n} (line {node.lineno})" for n in names
                          if n.split(".")[0] in ("pickle", "cPickle", "marshal", "shelve", "dill")]
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__"):
                    found.append(f"{func.id}() (line {node.lineno})")
                if isinstance(func, ast.Attribute) and func.attr in ("system", "popen", "getoutput", "getstatusoutput"):
                    found.append(f"{func.attr}() (line {node.lineno})")
                for keyword in node.keywords:
                    if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                                       and keyword.value.value is False):
                        found.append(f"shell= (line {node.lineno})")
        self.assertEqual(found, [])


def _flow_with(*decorate) -> Workflow:
    """Build a workflow from (decorator kwargs, function) pairs (bad-input rows)."""
    wf = Workflow("bad")
    for options, func in decorate:
        wf.job(**options)(func)
    return wf


def _prepare(n: int = 2) -> List[int]:
    return list(range(n))


def _square(x: int = Result(step="prepare")) -> int:
    return x * x


def _bad_step(x: int = Result(step="prepar")) -> int:
    return x


def _needs_text(text: str) -> str:
    return text


def _ping(a: int = Result(step="pong")) -> int:
    return a


def _pong(b: int = Result(step="ping")) -> int:
    return b


def _twice_included() -> Workflow:
    inner = Flow("inner")
    inner.job(name="prepare")(_prepare)
    outer = _flow_with(({"name": "prepare"}, _prepare))
    outer.include(inner)
    return outer


class BadInputTest(TempDirTest):
    """Bad input, table-driven: one line naming the thing, a non-zero exit (2 for usage), nothing changed."""

    def setUp(self) -> None:
        super().setUp()
        self.flow_file = self.tmp / "flow.py"
        self.flow_file.write_text(textwrap.dedent(FANOUT))
        self.mod = load_flow(self.tmp, FANOUT)
        sched = _SpoolScheduler(self.tmp / "spool")
        with reflow.SqliteStore(self.store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            self.run_id = self.mod.wf.submit(self.tmp / "run", store=store, executor=sched, n=2).run_id
            _drive(self.mod.wf, sched)
        (self.tmp / "afile").write_text("x")
        (self.tmp / "garbage.db").write_bytes(b"not sqlite at all " * 50)
        (self.tmp / "echo_flow.py").write_text(textwrap.dedent(_ECHO_FLOW))
        (self.tmp / "config" / "reflow").mkdir(parents=True)

    def snapshot(self) -> Tuple[bytes, List[str]]:
        tree = sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*")
                      if "__pycache__" not in p.parts and p.name != "config.toml")
        return self.store_path.read_bytes(), tree

    def on_store(self, function, *args):
        """Call ``function(store, *args)`` on the test's store, closing it afterwards."""
        with reflow.SqliteStore(self.store_path) as store:
            return function(store, *args)

    def api_rows(self):
        submit = self.mod.wf.submit
        run_dir = self.tmp / "new-run"
        return [
            ("unknown Result step", lambda: _flow_with(({"name": "prepare"}, _prepare), ({}, _bad_step)).validate(),
             "Did you mean 'prepare'?"),
            ("cycle", lambda: _flow_with(({"name": "ping"}, _ping), ({"name": "pong"}, _pong)).validate(), "cycle"),
            ("duplicate task after include", _twice_included, "'prepare'"),
            ("missing parameter", lambda: _flow_with(({}, _needs_text)).submit(run_dir, executor="local"), "--text"),
            ("extra parameter", lambda: submit(run_dir, executor="local", n=2, m=3), "unknown parameter 'm'"),
            ("ill-typed parameter", lambda: submit(run_dir, executor="local", n="two"), "must be int"),
            ("cpus 0", lambda: _flow_with(({"cpus": 0}, _prepare)), "cpus must be an integer >= 1, got 0"),
            ("walltime 1h30", lambda: _flow_with(({"time": "1h30"}, _prepare)), "1h30"),
            ("memory '4 GB'", lambda: _flow_with(({"mem": "4 GB"}, _prepare)), "4 GB"),
            ("retries -1", lambda: _flow_with(({"retries": -1}, _prepare)), "retries"),
            ("array without input", lambda: _flow_with(({"array": True}, _prepare)), "Result"),
            ("unknown executor name", lambda: submit(run_dir, executor="slrum", n=2), "Did you mean 'slurm'?"),
            ("non-UTF-8 parameter", lambda: _flow_with(({}, _needs_text)).submit(run_dir, executor="local",
                                                                                  text="ab\udcff"), "byte 0xff"),
            ("10 MB parameter", lambda: _flow_with(({}, _needs_text)).submit(run_dir, executor="local",
                                                                              text="x" * 10_000_000), "the limit is"),
            ("run dir inside a file", lambda: submit(self.tmp / "afile" / "r", executor="local", n=2), "afile"),
            ("unwritable store path", lambda: submit(run_dir, executor="local", n=2,
                                                     store=reflow.SqliteStore(self.tmp / "afile" / "s.db")),
             "cannot create"),
            ("store is a directory", lambda: submit(run_dir, executor="local", n=2,
                                                    store=reflow.SqliteStore(self.tmp / "spool")), "is a directory"),
            ("unknown task to force", lambda: submit(run_dir, executor="local", n=2, force_tasks=["squar"]),
             "squar"),
            ("unknown run id", lambda: self.on_store(reflow.retry_run, "fan-nope"), "no run 'fan-nope'"),
            ("unknown task of a run", lambda: self.on_store(reflow.cancel_run, self.run_id, "squar"),
             "Did you mean 'square'?"),
            ("unknown sqlite locking", lambda: _with_env(REFLOW_SQLITE_LOCKING="nfs")(
                lambda: reflow.SqliteStore(self.store_path)), "REFLOW_SQLITE_LOCKING"),
            ("unknown journal mode", lambda: reflow.SqliteStore(self.store_path, journal_mode="wall"), "'wall'"),
        ]

    def cli_rows(self):
        flow, tool, run = self.flow_file, HERE / "reflow.py", self.tmp / "new-run"
        return [
            ("ill-typed flag", (flow, "submit", "--run-dir", run, "--n", "two"), "invalid int value: 'two'", 2),
            ("unknown flag", (flow, "submit", "--run-dir", run, "--m", "3"), "--m", 2),
            ("unknown command", (tool, "stauts", "x"), "stauts", 2),
            ("missing run id", (tool, "status"), "run_id", 2),
            ("bad dag format", (tool, "dag", self.run_id, "--format", "png"), "png", 2),
            ("bad --status", (tool, "runs", "--status", "DONE"), "DONE", 2),
            ("bad --last", (tool, "runs", "--last", "many"), "many", 2),
            ("worker from reflow.py", (tool, "worker", "--run-id", self.run_id), "runs from the workflow file", 2),
            ("unknown run id", (tool, "status", "fan-nope"), "no run 'fan-nope'", 1),
            ("unknown run to retry", (tool, "retry", "fan-nope"), "no run 'fan-nope'", 1),
            ("unknown run to cancel", (tool, "cancel", "fan-nope"), "fan-nope", 1),
            ("unknown task in status", (tool, "status", self.run_id, "--task", "squar"), "squar", 1),
            ("unknown task to retry", (tool, "retry", self.run_id, "--task", "squar"), "Did you mean 'square'?", 1),
            ("bad --since", (tool, "runs", "--since", "yesterday"), "yesterday", 1),
            ("store path missing", (tool, "status", self.run_id, "--store-path", self.tmp / "none.db"),
             "does not exist", 1),
            ("store is garbage", (tool, "status", self.run_id, "--store-path", self.tmp / "garbage.db"),
             "garbage.db", 1),
            ("unknown executor", (flow, "submit", "--run-dir", run, "--executor", "slrum"), "Did you mean 'slurm'?", 1),
            ("run dir inside a file", (flow, "submit", "--run-dir", self.tmp / "afile" / "r"), "afile", 1),
            ("non-UTF-8 bytes", (self.tmp / "echo_flow.py", "run", "--run-dir", run, "--text", b"ab\xffcd"),
             "parameter 'text' is not valid UTF-8 text (byte 0xff at position 2)", 1),
            ("missing required flag", (self.tmp / "echo_flow.py", "run", "--run-dir", run), "--text", 2),
            ("malformed config", ("[executor\n", flow, "submit", "--run-dir", run), "line 1", 1),
            ("unknown config key", ('[executor]\nmdoe = "sbatch"\n', flow, "submit", "--run-dir", run),
             "Did you mean 'executor.mode'?", 1),
            ("ill-typed config value", ("[executor]\nmax_submit_jobs = \"lots\"\n", flow, "submit", "--run-dir", run),
             "max_submit_jobs", 1),
        ]

    def test_api_rows(self) -> None:
        for name, action, text in self.api_rows():
            with self.subTest(name=name):
                before = self.snapshot()
                with self.assertRaises((reflow.ReflowError, ValueError, TypeError, KeyError)) as caught, \
                        contextlib.redirect_stderr(io.StringIO()):
                    action()
                message = str(caught.exception.args[0]) if isinstance(caught.exception, KeyError) \
                    else str(caught.exception)
                self.assertIn(text, message)
                self.assertEqual(len(message.splitlines()), 1, message)
                self.assertEqual(self.snapshot(), before)
                _FaultFigures.bad_inputs += 1

    def test_cli_rows(self) -> None:
        for name, argv, text, code in self.cli_rows():
            with self.subTest(name=name):
                config = argv[0] if isinstance(argv[0], str) else ""
                (self.tmp / "config" / "reflow" / "config.toml").write_text(config)
                argv = argv[1:] if isinstance(argv[0], str) else argv
                before = self.snapshot()
                proc = subprocess.run([sys.executable, *(a if isinstance(a, bytes) else str(a) for a in argv)],
                                      capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
                stderr = proc.stderr.decode("utf-8", "replace")
                self.assertEqual(proc.returncode, code, stderr)
                self.assertIn(text, stderr)
                self.assertNotIn("Traceback", stderr)
                self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
                self.assertEqual(self.snapshot(), before)
                _FaultFigures.bad_inputs += 1


def _with_env(**values: str):
    """Return a runner calling a function with environment variables set."""
    def runner(function):
        with mock_env(**values):
            return function()
    return runner


# =============================================================================
# Packing array elements (issue 7)
# =============================================================================

#: A 3-stage pipeline whose array packs PACK elements per job (CPUS at once);
#: element FAIL_AT fails until FIXED exists; NAP seconds of sleep in element SLOW_AT.
_PACKED_FLOW = """
import os, time
from pathlib import Path
from reflow import Result, Workflow

wf = Workflow("packed")

@wf.job(inline=INLINE)
def prepare(n: int = 7) -> list[int]:
    return list(range(n))

@wf.job(array=True, elements_per_job=PACK, cpus=CPUS, time=WALLTIME, mem="100M", inline=INLINE)
def square(x: int = Result(step="prepare")) -> int:
    print(f"squaring {x} in {os.getpid()}")
    if os.environ.get("MARKS"):
        Path(os.environ["MARKS"], f"{x}.pid").write_text(str(os.getpid()))
    if x == int(os.environ.get("SLOW_AT", "-1")):
        time.sleep(float(os.environ.get("NAP", "0")))
    if x == int(os.environ.get("FAIL_AT", "-1")) and not os.path.exists(os.environ.get("FIXED", "/nonexistent")):
        raise RuntimeError(f"boom at {x}")
    return x * x

@wf.job(inline=INLINE)
def total(values: list[int] = Result(step="square")) -> int:
    return sum(values)

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""


def _packed_flow(directory: Path, pack: Any = 3, cpus: int = 1, inline: Any = False, walltime: str = "00:01:00"):
    """Load _PACKED_FLOW with the given packing options."""
    source = (_PACKED_FLOW.replace("PACK", repr(pack)).replace("CPUS", str(cpus))
              .replace("INLINE", repr(inline)).replace("WALLTIME", repr(walltime)))
    return load_flow(directory, source)


class _RecordingExecutor(reflow.Executor):
    """Records every submission; nothing runs and every job stays PENDING."""

    name = "recorder"
    max_array_size = 1000

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[Any, List[str], str]] = []

    def submit(self, resources, command):
        self.calls.append((resources, [str(word) for word in command], f"job{len(self.calls)}"))
        return self.calls[-1][2]

    def cancel(self, job_id):
        pass

    def job_state(self, job_id):
        return "PENDING"

    def job_infos(self, job_ids):
        return {job_id: reflow.executors.JobInfo("PENDING") for job_id in job_ids}

    def task_calls(self, task: str) -> List[Tuple[Any, List[str], str]]:
        """Return the recorded submissions of one task's worker."""
        return [call for call in self.calls if "worker" in call[1] and call[1][call[1].index("--task") + 1] == task]


class PackRuleTest(unittest.TestCase):
    """The documented rules: auto packing, walltime and memory scaling, option checks."""

    def test_auto_packing_rule_with_synthetic_durations(self) -> None:
        choose = reflow.choose_elements_per_job
        self.assertEqual(choose(1000, median_seconds=120.0), 1)  # long elements: never packed
        self.assertEqual(choose(1000, median_seconds=60.0), 1)
        self.assertEqual(choose(1000, median_seconds=2.0), 150)  # 300 s target / 2 s
        self.assertEqual(choose(1000, cpus=4, median_seconds=2.0), 600)  # four at once
        self.assertEqual(choose(40, median_seconds=0.01), 40)  # at most the width
        self.assertEqual(choose(1, median_seconds=0.01), 1)
        self.assertEqual(choose(1000), 1)  # no history, no cap: as before
        self.assertEqual(choose(50, max_submit_jobs=100), 1)  # fits the cap
        self.assertEqual(choose(1000, max_submit_jobs=100), 10)  # the whole width fits the cap
        self.assertEqual(choose(1000, max_submit_jobs=10, median_seconds=2.0), 150)
        self.assertEqual(choose(100_000, max_submit_jobs=10, median_seconds=2.0), 10_000)
        self.assertEqual(choose(1000, max_submit_jobs=10, median_seconds=90.0), 1)

    def test_walltime_and_memory_scale_with_the_pack(self) -> None:
        limits = reflow.pack_limits
        day = reflow.parse_time("24:00:00")
        self.assertEqual(limits("00:10:00", "1G", 1, 4, day), (1, 1, "00:10:00", "1G"))
        self.assertEqual(limits("00:10:00", "1G", 6, 1, day), (6, 1, "01:00:00", "1G"))
        self.assertEqual(limits("00:10:00", "1G", 6, 3, day), (6, 3, "00:20:00", f"{3 * 1024 ** 2}K"))
        self.assertEqual(limits("00:10:00", "1G", 7, 3, day), (7, 3, "00:30:00", f"{3 * 1024 ** 2}K"))
        self.assertEqual(limits("00:10:00", "1G", 2, 8, day), (2, 2, "00:10:00", f"{2 * 1024 ** 2}K"))
        hour = reflow.parse_time("01:00:00")
        self.assertEqual(limits("00:10:00", "1G", 20, 1, hour)[:3], (6, 1, "01:00:00"))  # shrinks, never too short
        self.assertEqual(limits("00:10:00", "1G", 20, 2, hour)[:3], (12, 2, "01:00:00"))
        self.assertEqual(limits("02:00:00", "1G", 5, 1, hour)[:3], (1, 1, "02:00:00"))

    def test_option_checks_and_description(self) -> None:
        wf = reflow.Workflow("opts")

        @wf.job()
        def seed() -> list:
            return [1]

        for bad, text in ((0, "elements_per_job"), ("fast", "elements_per_job"), (True, "elements_per_job")):
            with self.subTest(bad=bad), self.assertRaisesRegex(ValueError, text):
                wf.job(array=True, elements_per_job=bad)(lambda x=reflow.Result(step="seed"): x)
        with self.assertRaisesRegex(ValueError, "needs array=True"):
            wf.job(elements_per_job=4)(lambda: 1)
        with self.assertRaisesRegex(ValueError, "inline must be"):
            wf.job(inline="sometimes")(lambda: 1)

        @wf.array_job(elements_per_job="auto", inline="auto")
        def one(x: int = reflow.Result(step="seed")) -> int:
            return x

        config = next(t["config"] for t in wf.describe()["tasks"] if t["name"] == "one")
        self.assertEqual((config["elements_per_job"], config["inline"]), ("auto", "auto"))
        self.assertEqual((wf.tasks["seed"].config.elements_per_job, wf.tasks["seed"].config.inline), (1, False))

    def test_pack_max_time_setting(self) -> None:
        self.assertEqual(reflow.Config().pack_max_time, 86400)
        self.assertEqual(reflow.Config({"executor": {"pack_max_time": "02:00:00"}}).validate().pack_max_time, 7200)
        with mock_env(REFLOW_PACK_MAX_TIME="bad"), self.assertRaisesRegex(reflow.ConfigError, "REFLOW_PACK_MAX_TIME"):
            print(reflow.Config().pack_max_time)

    def test_element_log_lines_slices_one_element(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "square-1_0.out"
            log.write_text("==> reflow element square[3] start\nthree\n==> reflow element square[3] end SUCCESS 0.1s\n"
                           "==> reflow element square[13] start\nthirteen\n"
                           "==> reflow element square[13] end FAILED 0.2s\n")
            self.assertEqual(reflow.element_log_lines(log, "square", 3),
                             ["==> reflow element square[3] start", "three",
                              "==> reflow element square[3] end SUCCESS 0.1s"])
            self.assertEqual(reflow.element_log_lines(log, "square", 13)[1], "thirteen")
            self.assertEqual(reflow.element_log_lines(log, "square", 4), [])
            self.assertEqual(reflow.element_log_lines(Path(tmp) / "missing", "square", 3), [])


class PackDispatchTest(TempDirTest):
    """The dispatcher's side against a recording executor: chunk mapping, caps, cache, history."""

    def _to_square(self, module, executor: _RecordingExecutor, n: int, store=None):
        """Submit, finish prepare through its result file, run one cycle; return the run."""
        store = store or self.store()
        run = module.wf.submit(self.tmp / f"run{len(executor.calls)}", store=store, executor=executor, n=n)
        inst = store.get_task_instance(run.run_id, "prepare", None)
        if inst["state"] != "SUCCESS":
            output = list(range(n))
            record = {"instance_id": inst["id"], "attempt": inst["attempt"], "state": "SUCCESS", "output": output,
                      "output_hash": reflow._hash16(reflow._canonical_json(output)), "error_text": "",
                      "task_name": "prepare", "array_index": None}
            results = reflow._results_dir(run.run_dir, run.run_id)
            results.mkdir(parents=True, exist_ok=True)
            (results / f"prepare__singleton__{inst['attempt']}.json").write_text(json.dumps(record))
            module.wf.dispatch(run.run_id, store, run.run_dir, executor=executor)
        return run

    def test_chunk_mapping_and_scaled_resources(self) -> None:
        module = _packed_flow(self.tmp, pack=3)
        fake = _RecordingExecutor()
        run = self._to_square(module, fake, 7)
        (resources, argv, array_id), = fake.task_calls("square")
        self.assertEqual(resources.array, "0-2")  # ceil(7 / 3) scheduler elements
        self.assertEqual(argv[argv.index("--pack") + 1], "3")
        self.assertEqual(argv[argv.index("--positions") + 1], "0-6")
        self.assertEqual((resources.time_limit, resources.mem), ("00:03:00", "100M"))
        jobs = {inst["array_index"]: inst["job_id"] for inst in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual(jobs, {i: f"{array_id}_{i // 3}" for i in range(7)})

    def test_process_pool_slots_scale_memory(self) -> None:
        module = _packed_flow(self.tmp, pack=4, cpus=2)
        fake = _RecordingExecutor()
        self._to_square(module, fake, 8)
        (resources, argv, _), = fake.task_calls("square")
        self.assertEqual((resources.array, argv[argv.index("--slots") + 1]), ("0-1", "2"))
        self.assertEqual((resources.time_limit, resources.mem), ("00:02:00", f"{200 * 1024}K"))

    def test_unpacked_default_is_unchanged(self) -> None:
        module = _packed_flow(self.tmp, pack=1)
        fake = _RecordingExecutor()
        run = self._to_square(module, fake, 5)
        (resources, argv, array_id), = fake.task_calls("square")
        self.assertEqual((resources.array, resources.time_limit, resources.mem), ("0-4", "00:01:00", "100M"))
        self.assertNotIn("--pack", argv)
        jobs = [inst["job_id"] for inst in run.store.list_task_instances(run.run_id, "square")]
        self.assertEqual(jobs, [f"{array_id}_{i}" for i in range(5)])

    def test_max_submit_jobs_counts_packed_jobs(self) -> None:
        module = _packed_flow(self.tmp, pack=3)
        fake = _RecordingExecutor()
        with mock_env(REFLOW_MAX_SUBMIT_JOBS="4"):  # the dispatch job counts: room for 3 jobs
            run = self._to_square(module, fake, 20)
            (resources, argv, _), = fake.task_calls("square")
            self.assertEqual(resources.array, "0-2")
            self.assertEqual(argv[argv.index("--positions") + 1], "0-8")  # 3 jobs of 3 elements
            self.assertEqual(run.store.task_state_summary(run.run_id)["square"], {"SUBMITTED": 9, "PENDING": 11})
            module.wf.dispatch(run.run_id, run.store, run.run_dir, executor=fake)
            self.assertEqual(len(fake.task_calls("square")), 1, "the cap is full: nothing more is submitted")

    def test_auto_packs_from_the_cap_without_history(self) -> None:
        module = _packed_flow(self.tmp, pack="auto")
        fake = _RecordingExecutor()
        with mock_env(REFLOW_MAX_SUBMIT_JOBS="5"):
            self._to_square(module, fake, 40)
        (resources, argv, _), = fake.task_calls("square")
        self.assertEqual((resources.array, argv[argv.index("--pack") + 1]), ("0-3", "8"))  # 40 / 5 -> 8 per job

    def test_auto_packs_from_measured_durations(self) -> None:
        module = _packed_flow(self.tmp, pack="auto")
        store = self.store()
        earlier = module.wf.run_local(self.tmp / "earlier", store=store, n=5)  # a run with durations
        rows = store.instance_rows(earlier.run_id, task_name="square")
        with store.transaction():
            store._db.executemany("UPDATE task_instances SET started_at = ?, finished_at = ? WHERE id = ?",
                                  [("2026-01-01T00:00:00+00:00", f"2026-01-01T00:00:0{1 + r[2] % 2}+00:00", r[0])
                                   for r in rows])
        self.assertEqual(sorted(store.task_durations("packed", "square")), [1.0, 1.0, 1.0, 2.0, 2.0])
        fake = _RecordingExecutor()
        module.wf.tasks["square"].config.version = "2"  # no cache hits: every element runs
        run = self._to_square(module, fake, 700, store=store)
        (resources, argv, _), = fake.task_calls("square")
        self.assertEqual((argv[argv.index("--pack") + 1], resources.array), ("300", "0-2"))  # 300 s / 1 s
        self.assertEqual(store.task_durations("packed", "square", exclude_run=earlier.run_id), [])
        self.assertEqual(run.store.get_run(run.run_id)["status"], "RUNNING")

    def test_inline_auto_follows_measured_durations_and_stays_off_the_login_node(self) -> None:
        module = _packed_flow(self.tmp, pack=1, inline="auto")
        store = self.store()

        def submitted_tasks(n: int) -> List[str]:
            fake = _RecordingExecutor()
            module.wf.submit(self.tmp / f"run{n}", store=store, executor=fake, n=n)
            return [call[1][call[1].index("--task") + 1] if "--task" in call[1] else call[1][2]
                    for call in fake.calls]

        self.assertEqual(submitted_tasks(3), ["prepare", "dispatch"])  # no history: a job as before
        earlier = module.wf.run_local(self.tmp / "earlier", store=store, n=2)

        def set_durations(seconds: str) -> None:
            with store.transaction():
                store._db.execute("UPDATE task_instances SET started_at = ?, finished_at = ? WHERE run_id = ?",
                                  ("2026-01-01T00:00:00+00:00", f"2026-01-01T00:{seconds}+00:00", earlier.run_id))

        set_durations("00:00.001000")
        self.assertEqual(submitted_tasks(4), ["dispatch"])  # tiny: left to the dispatch job, not run here
        set_durations("01:40")
        self.assertEqual(submitted_tasks(5), ["prepare", "dispatch"])  # 100 s: a job of its own

    def test_cached_elements_are_not_packed(self) -> None:
        module = _packed_flow(self.tmp, pack=3)
        store = self.store()
        module.wf.run_local(self.tmp / "earlier", store=store, n=5)
        fake = _RecordingExecutor()
        run = self._to_square(module, fake, 9, store=store)
        (resources, argv, _), = fake.task_calls("square")
        self.assertEqual(argv[argv.index("--positions") + 1], "5-8")  # the four misses only
        self.assertEqual(resources.array, "0-1")
        states = {i["array_index"]: (i["state"], i["cached"]) for i in store.list_task_instances(run.run_id, "square")}
        self.assertEqual(states, {**{i: ("SUCCESS", 1) for i in range(5)},
                                  **{i: ("SUBMITTED", 0) for i in range(5, 9)}})


class PackLocalTest(TempDirTest):
    """Packed chunks on the local executor: partial failure, kill -9 mid-chunk, process pool, logs, inline."""

    def test_failing_element_fails_alone_then_retry(self) -> None:
        fixed = self.tmp / "fixed"
        module = _packed_flow(self.tmp, pack=3)
        with mock_env(FAIL_AT="4", FIXED=str(fixed)):
            run = module.wf.submit(self.tmp / "run", executor="local", n=7)
            self.assertEqual(run.wait(timeout=120), "FAILED")
            states = {i["array_index"]: i["state"] for i in run.store.list_task_instances(run.run_id, "square")}
            self.assertEqual(states, {**{i: "SUCCESS" for i in range(7)}, 4: "FAILED"})
            failed = run.store.get_task_instance(run.run_id, "square", 4)
            self.assertIn("boom at 4", failed["error_text"])
            table = reflow.format_status(run.status(as_dict=True), task="square")
            per_element = re.findall(r"job=\S+_\d  (?:\d+ms|[\d.]+s|\d+m\d\ds)", table)  # each element's duration
            self.assertEqual(len(per_element), 7, table)
            entry = reflow._log_entry(run.run_dir, failed)
            text = "\n".join(entry["element_log"])
            self.assertIn("squaring 4", text)
            self.assertIn("boom at 4", text)
            self.assertNotIn("squaring 3", text)
            self.assertNotIn("squaring 5", text)
            fixed.write_text("ok")
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(run.retry(), 2)  # square[4] and the cancelled total
            self.assertEqual(run.wait(timeout=120), "SUCCESS")
        attempts = {i["array_index"]: i["attempt"] for i in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual(attempts, {**{i: 0 for i in range(7)}, 4: 1})
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), sum(i * i for i in range(7)))

    def test_kill_9_mid_chunk_keeps_finished_elements(self) -> None:
        marks = self.tmp / "marks"
        marks.mkdir()
        module = _packed_flow(self.tmp, pack=3)
        with mock_env(MARKS=str(marks), SLOW_AT="1", NAP="60", REFLOW_LOST_JOB_GRACE="0"):
            run = module.wf.submit(self.tmp / "run", executor="local", n=3)
            pid = self._wait_for(marks / "1.pid")
            os.kill(pid, signal.SIGKILL)  # the worker itself: element 1 runs, element 2 never started
            self.assertEqual(run.wait(timeout=60), "FAILED")
            states = {i["array_index"]: i for i in run.store.list_task_instances(run.run_id, "square")}
            self.assertEqual(states[0]["state"], "SUCCESS")
            for index in (1, 2):
                self.assertEqual(states[index]["state"], "FAILED")
                self.assertIn("signal 9", states[index]["error_text"])
            with mock_env(NAP="0"), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(run.retry(), 3)  # square[1], square[2] and the cancelled total
                self.assertEqual(run.wait(timeout=120), "SUCCESS")
        attempts = {i["array_index"]: i["attempt"] for i in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual(attempts, {0: 0, 1: 1, 2: 1})
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 5)

    def test_walltime_of_a_packed_job_scales_and_its_kill_fails_only_the_rest(self) -> None:
        marks = self.tmp / "marks"
        marks.mkdir()
        module = _packed_flow(self.tmp, pack=3, walltime="00:00:02")  # the job gets 3 x 2 s
        with mock_env(MARKS=str(marks), SLOW_AT="1", NAP="60", REFLOW_LOST_JOB_GRACE="0"):
            run = module.wf.submit(self.tmp / "run", executor="local", n=3)
            self.assertEqual(run.wait(timeout=90), "FAILED")
        states = {i["array_index"]: i for i in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual([states[i]["state"] for i in range(3)], ["SUCCESS", "FAILED", "FAILED"])
        self.assertEqual([states[i]["reason"] for i in (1, 2)], ["TIMEOUT", "TIMEOUT"], states)
        spool = self.tmp / "run" / ".reflow" / "local"
        limits = [json.loads(p.read_text())["time_limit"] for p in spool.glob("*.job")
                  if "-square-" in json.loads(p.read_text())["name"]]
        self.assertEqual(limits, [6])

    def test_process_pool_runs_elements_in_parallel_and_survives_a_dead_slot(self) -> None:
        marks = self.tmp / "marks"
        marks.mkdir()
        module = _packed_flow(self.tmp, pack=4, cpus=2)
        with mock_env(MARKS=str(marks), SLOW_AT="0", NAP="60", REFLOW_LOST_JOB_GRACE="0"):
            run = module.wf.submit(self.tmp / "run", executor="local", n=4)
            victim = self._wait_for(marks / "0.pid")
            for index in (1, 2, 3):
                self._wait_for(marks / f"{index}.pid")
            os.kill(victim, signal.SIGKILL)  # one pool process dies mid-element
            self.assertEqual(run.wait(timeout=60), "FAILED")
        pids = {int((marks / f"{i}.pid").read_text()) for i in range(4)}
        self.assertEqual(len(pids), 2, "two slots ran the four elements")
        states = {i["array_index"]: i for i in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual([states[i]["state"] for i in range(4)], ["FAILED", "SUCCESS", "SUCCESS", "SUCCESS"])
        self.assertIn("signal 9", states[0]["error_text"])

    def test_inline_tasks_run_inside_the_dispatch_job(self) -> None:
        module = _packed_flow(self.tmp, pack=1, inline=True)
        run = module.wf.submit(self.tmp / "run", executor="local", n=6)
        self.assertEqual(run.wait(timeout=120), "SUCCESS", run.status(as_dict=True)["failed_instances"])
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 55)
        spool = self.tmp / "run" / ".reflow" / "local"
        names = {path.stem: json.loads(path.read_text())["name"] for path in spool.glob("*.job")}
        self.assertEqual({n for n in names.values() if not n.endswith("-dispatch")}, set(), names)
        jobs = {inst["job_id"] for inst in run.store.list_task_instances(run.run_id)}
        self.assertEqual(len(jobs), 1)
        self.assertEqual(names[jobs.pop()], "packed-dispatch")
        logs = reflow._log_entry(run.run_dir, run.store.get_task_instance(run.run_id, "square", 2))["element_log"]
        self.assertIn("squaring 2", "\n".join(logs))

    def test_inline_failure_fails_alone_and_retry_completes(self) -> None:
        fixed = self.tmp / "fixed"
        module = _packed_flow(self.tmp, pack=1, inline=True)
        with mock_env(FAIL_AT="2", FIXED=str(fixed)):
            run = module.wf.submit(self.tmp / "run", executor="local", n=4)
            self.assertEqual(run.wait(timeout=120), "FAILED")
            self.assertEqual(run.store.task_state_summary(run.run_id)["square"], {"SUCCESS": 3, "FAILED": 1})
            fixed.write_text("ok")
            with contextlib.redirect_stdout(io.StringIO()):
                run.retry()
            self.assertEqual(run.wait(timeout=120), "SUCCESS")
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 14)

    def test_killed_inline_dispatch_job_is_followed_by_its_guard(self) -> None:
        marks = self.tmp / "marks"
        marks.mkdir()
        module = _packed_flow(self.tmp, pack=1, inline=True)
        with mock_env(MARKS=str(marks), SLOW_AT="1", NAP="60", REFLOW_LOST_JOB_GRACE="0"):
            run = module.wf.submit(self.tmp / "run", executor="local", n=3)
            worker = self._wait_for(marks / "1.pid")
            os.killpg(os.getpgid(worker), signal.SIGKILL)  # the dispatch job and its inline worker, like a scheduler
            self.assertEqual(run.wait(timeout=60), "FAILED")
            states = {i["array_index"]: i for i in run.store.list_task_instances(run.run_id, "square")}
            self.assertEqual(states[0]["state"], "SUCCESS")
            for index in (1, 2):
                self.assertEqual(states[index]["state"], "FAILED")
                self.assertIn("signal 9", states[index]["error_text"])
            with mock_env(NAP="0"), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(run.retry(), 2)
                self.assertEqual(run.wait(timeout=120), "SUCCESS")
        self.assertEqual(run.store.get_singleton_output(run.run_id, "total"), 5)

    def test_inline_work_stops_before_the_dispatch_walltime(self) -> None:
        module = _packed_flow(self.tmp, pack=1, inline=True)
        # 65 s of dispatch walltime leave ~5 s of inline budget (60 s stay free)
        with mock_env(SLOW_AT="1", NAP="60", REFLOW_DISPATCH_TIME="00:01:05", REFLOW_LOST_JOB_GRACE="0"):
            run = module.wf.submit(self.tmp / "run", executor="local", n=3)
            self.assertEqual(run.wait(timeout=90), "FAILED")
        states = {i["array_index"]: i for i in run.store.list_task_instances(run.run_id, "square")}
        self.assertEqual([states[i]["state"] for i in range(3)], ["SUCCESS", "FAILED", "FAILED"])
        self.assertEqual([states[i]["reason"] for i in (1, 2)], ["TIMEOUT", "TIMEOUT"], states)

    def _wait_for(self, path: Path) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_text():
                return int(path.read_text())
            time.sleep(0.05)
        self.fail(f"{path.name} never appeared")


# =============================================================================
# Import cost and lazy dataclasses (issue 6)
# =============================================================================

#: Modules only some commands need; ``import reflow`` must not load them.
_HEAVY_MODULES = ("argparse", "dataclasses", "inspect", "typing", "pathlib", "base64", "shlex", "hashlib", "logging",
                  "tomllib",
                  "difflib", "uuid", "tempfile", "shutil", "html", "traceback", "subprocess", "select",
                  "multiprocessing", "threading")


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter without site (whose .pth files may import modules); return stdout."""
    here = os.path.dirname(os.path.abspath(reflow.__file__))
    program = f"import sys\nsys.path.insert(0, {here!r})\n" + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-S", "-c", program], capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise AssertionError(done.stderr)
    return done.stdout.strip()


class LazyImportTest(unittest.TestCase):
    """``import reflow`` loads no heavy module; its dataclasses behave as dataclasses before and after first use."""

    def test_import_leaves_heavy_modules_unloaded(self) -> None:
        probe = "import sys\n{imports}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
        baseline = _fresh_python(probe.format(imports="import sqlite3, json", heavy=_HEAVY_MODULES))
        loaded = _fresh_python(probe.format(imports="import reflow", heavy=_HEAVY_MODULES))
        self.assertEqual(loaded, baseline)

    def test_import_leaves_argparse_to_the_commands_that_parse(self) -> None:
        out = _fresh_python("""
            import sys, reflow
            print("argparse" in sys.modules)
            reflow._build_parser(None)
            print("argparse" in sys.modules)
        """)
        self.assertEqual(out.split(), ["False", "True"])

    def test_job_commands_parse_as_argparse_does_without_it(self) -> None:
        worker = ["worker", "--run-id", "fan-20261207-0a1b2c3d", "--run-dir", "/scratch/r 1", "--store-path", "/s.db",
                  "--task", "square"]
        same = [worker, [*worker, "--positions", "0-199", "--base", "1"], [*worker, "--index", "7", "--debug"],
                [*worker, "--positions", "@/r/p.txt", "--base", "0", "--pack", "4", "--slots", "2"],
                [*worker, "--index", "3", "--index", "4"],
                ["dispatch", "--run-id", "r", "--run-dir", "/d", "--store-path", "/s.db", "--verify"],
                ["dispatch", "--run-id", "r"], ["worker", "--task", "t", "--run-id", "r"]]
        for argv in same:
            with self.subTest(argv=argv):
                expected = reflow._build_job_parser(argv[0]).parse_args(argv)
                self.assertEqual(vars(reflow._parse_job_argv(argv)), vars(expected))
        unusual = [["worker", "--run-id=r", "--task", "t"], ["worker", "--run-id", "r"], [*worker, "--index", "x"],
                   [*worker, "--index", "-1"], [*worker, "--bogus", "1"], ["dispatch", "--run-id", "r", "--task", "t"],
                   [*worker, "--index"], [*worker, "--run"]]
        for argv in unusual:
            with self.subTest(argv=argv):
                self.assertIsNone(reflow._parse_job_argv(argv))
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(reflow.Workflow("p").cli(["worker", "--run-id", "r", "--task", "t", "--index", "x"]), 2)
        self.assertIn("--index: invalid int value: 'x'", err.getvalue())

    def test_task_calls_catch_stop_signals_without_the_signal_module(self) -> None:
        out = _fresh_python("""
            import _signal, os, sys, reflow
            before = _signal.getsignal(15)
            try:
                with reflow.graceful_shutdown():
                    untouched = "signal" not in sys.modules
                    os.kill(os.getpid(), 15)
            except reflow.TaskInterrupted as exc:
                print(untouched, exc.signal_name, _signal.getsignal(15) == before)
        """)
        self.assertEqual(out, "True SIGTERM True")

    def test_dataclass_functions_see_dataclasses_before_first_use(self) -> None:
        out = _fresh_python("""
            import dataclasses, json, reflow
            print(json.dumps([dataclasses.is_dataclass(reflow.JobResources),
                              [f.name for f in dataclasses.fields(reflow.JobInfo)],
                              [f.name for f in dataclasses.fields(reflow.DEFAULT_CODEC)]]))
        """)
        self.assertEqual(json.loads(out), [True, ["state", "reason", "exit_code"], ["marker_key", "schema_version"]])

    def test_default_codec_is_frozen_before_first_use(self) -> None:
        out = _fresh_python("""
            import dataclasses, reflow
            try:
                reflow.DEFAULT_CODEC.marker_key = "x"
            except dataclasses.FrozenInstanceError:
                print(reflow.DEFAULT_CODEC == reflow.ManifestCodec(), repr(reflow.DEFAULT_CODEC))
        """)
        self.assertEqual(out, "True ManifestCodec(marker_key='__reflow_manifest__', schema_version=1)")

    def test_first_use_from_many_threads_and_subclasses(self) -> None:
        out = _fresh_python("""
            import threading, reflow

            class Mine(reflow.JobInfo):
                pass

            made = []
            threads = [threading.Thread(target=lambda i=i: made.append(reflow.JobResources(cpus=i + 1).cpus))
                       for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(sorted(made), Mine("RUNNING", "why"), hash(Mine("X")) == hash(Mine("X")))
        """)
        self.assertEqual(out, "[1, 2, 3, 4, 5, 6, 7, 8] Mine(state='RUNNING', reason='why', exit_code=None) True")

    def test_fields_with_factories_are_fresh_per_instance(self) -> None:
        first, second = reflow.JobConfig(), reflow.JobConfig()
        first.after.append("a")
        self.assertEqual((second.after, first.submit_options is second.submit_options), ([], False))
        self.assertEqual(dataclasses.replace(first, cpus=3).after, ["a"])

    def test_task_specs_made_before_dataclasses_behave_as_dataclasses(self) -> None:
        out = _fresh_python("""
            import sys
            sys.argv = ["flow.py", "worker"]  # only a job's element makes its specs lazily
            import reflow
            wf = reflow.Workflow("w")

            @wf.job(cpus=2)
            def step(a: int, run_dir: str = "", *, b: str = "x") -> int:
                return a

            spec = wf.tasks["step"]
            print([m in sys.modules for m in ("dataclasses", "inspect")], spec.call_plan)
            print(repr(spec.config))
            print(spec.config == reflow.JobConfig(cpus=2), spec.signature)
            import dataclasses
            print([f.name for f in dataclasses.fields(spec)], dataclasses.replace(spec, name="t").signature)
            try:
                hash(spec)
            except TypeError as exc:
                print(exc)
        """)
        self.assertEqual(out.splitlines(), [
            "[False, False] (('a', False), ('run_dir', True), ('b', False))",
            "JobConfig(cpus=2, time='00:30:00', mem='4G', array=False, after=[], array_parallelism=None, "
            "submit_options={}, version='1', cache=True, backend=None, retries=0, elements_per_job=1, inline=False)",
            "True (a: int, run_dir: str = '', *, b: str = 'x') -> int",
            "['name', 'func', 'config', 'signature', 'result_deps', 'return_type', 'verify', 'hints'] "
            "(a: int, run_dir: str = '', *, b: str = 'x') -> int",
            "unhashable type: 'TaskSpec'"])

    def test_parameters_read_without_inspect_are_the_signatures(self) -> None:
        def mixed(a, b=1, *args, c, d=2, **kwargs):
            local = a
            return local

        def positional_only(a, /, b, *, c=3):
            pass

        def none():
            pass

        for func in (mixed, positional_only, none, lambda *rest: rest, lambda **named: named):
            with self.subTest(func=func.__name__):
                expected = [(p.name, p.default) for p in inspect.signature(func).parameters.values()]
                read = [(name, inspect.Parameter.empty if default is reflow._NO_DEFAULT else default)
                        for name, default in reflow._plain_parameters(func)]
                self.assertEqual(read, expected)
        for other in (functools.wraps(mixed)(lambda *a, **k: None), functools.partial(mixed, 1), len, str):
            self.assertIsNone(reflow._plain_parameters(other))


WORKER_PROBE = """
import sys
from typing import Annotated
from reflow import Result, Workflow

wf = Workflow("probe")

@wf.job()
def prepare() -> list[int]:
    return [0]

@wf.job(array=True)
def element(x: Annotated[int, Result(step="prepare")]) -> list[str]:
    return sorted(set(WATCHED) & set(sys.modules))

WATCHED = ("dataclasses", "inspect", "signal", "threading")

if __name__ == "__main__":
    raise SystemExit(wf.cli())
"""


class WorkerImportTest(TempDirTest):
    """A worker element, started afresh as a scheduler starts it, loads only what running its task needs."""

    def test_a_worker_element_leaves_dataclasses_inspect_signal_and_threading_unloaded(self) -> None:
        mod = load_flow(self.tmp, WORKER_PROBE)
        sched = _SpoolScheduler(self.tmp / "spool")
        with reflow.SqliteStore(self.store_path) as store, contextlib.redirect_stderr(io.StringIO()):
            run = mod.wf.submit(self.tmp / "run", store=store, executor=sched)
        for _ in range(10):
            job_id, record = sched.pending()[0]
            if "element" in record["command"]:
                break
            with contextlib.redirect_stderr(io.StringIO()):
                _run_job(mod.wf, sched, record)
            sched.finish(job_id)
        first = record["array"].split("-")[0]
        here = os.path.dirname(os.path.abspath(reflow.__file__))
        done = subprocess.run([sys.executable, "-S", *record["command"][1:]], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=here, REFLOW_ARRAY_INDEX=first), timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        sched.finish(job_id)
        _drive(mod.wf, sched)
        self.assertEqual(run.store.get_array_outputs(run.run_id, "element"), [[]])


# =============================================================================
# run_local: transactions and stored JSON (issue 6)
# =============================================================================

LOCK_PROBE_FLOW = """
import os
import sqlite3
from reflow import Result, Workflow

wf = Workflow("probe")

def _probe() -> list:
    db = sqlite3.connect(os.environ["REFLOW_STORE_PATH"], timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # fails at once while another connection holds the write lock
        db.execute("ROLLBACK")
        seen = [f"run:{status}" for status, in db.execute("SELECT status FROM runs")]
        return seen + [f"{task}:{state}" for task, state in db.execute("SELECT task_name, state FROM task_instances")]
    finally:
        db.close()

@wf.job()
def first() -> list:
    return _probe()

@wf.job(array=True)
def each(x: str = Result(step="first")) -> list:
    return _probe()
"""

TEXTS_FLOW = r"""
from reflow import Result, Workflow

wf = Workflow("texts")

@wf.job()
def prepare() -> list:
    return ["plain", "caf\u00e9", "tab\tnew\nline", "del\x7f", 'quote" back\\', "\U0001f600"]

@wf.job(array=True)
def echo(x: str = Result(step="prepare")) -> tuple:
    return (x, len(x))
"""


class RunLocalTransactionTest(TempDirTest):
    """run_local: user code runs outside any store transaction; store steps between share one."""

    def test_task_functions_run_without_the_write_lock(self) -> None:
        run = load_flow(self.tmp, LOCK_PROBE_FLOW).wf.run_local(self.tmp / "run")
        self.assertEqual(run.state, "SUCCESS")
        self.assertEqual(run.store.get_singleton_output(run.run_id, "first"), ["run:RUNNING"])
        self.assertEqual(run.store.get_array_outputs(run.run_id, "each"), [["run:RUNNING", "first:SUCCESS"]])

    def test_cached_rerun_commits_once(self) -> None:
        mod = load_flow(self.tmp, FANOUT)
        store = reflow.SqliteStore(self.store_path)
        mod.wf.run_local(self.tmp / "run", store=store, n=5)
        statements: List[str] = []
        store._db.set_trace_callback(statements.append)
        again = mod.wf.run_local(self.tmp / "run", store=store, n=5)
        store._db.set_trace_callback(None)
        self.assertEqual([s for s in statements if s.strip().upper() == "COMMIT"], ["COMMIT"])
        self.assertEqual(again.state, "SUCCESS")
        self.assertEqual(store.get_singleton_output(again.run_id, "total"), 30)
        self.assertTrue(all(i["cached"] for i in store.list_task_instances(again.run_id)))
        events = [(e["event"], e["task_name"]) for e in store.list_events(again.run_id)]
        self.assertEqual(events, [("run_created", None), ("cached", "prepare"), ("cached", "square"),
                                  ("cached", "total"), ("run_success", None)])  # one event per task copied

    def test_failure_inside_the_shared_transaction_leaves_no_run(self) -> None:
        mod = load_flow(self.tmp, FANOUT)
        store = reflow.SqliteStore(self.store_path)
        mod.wf.run_local(self.tmp / "run", store=store, n=3)
        runs = len(store.list_runs())
        failing = mock.patch.object(reflow.SqliteStore, "update_run_status", side_effect=reflow.StoreError("disk gone"))
        with failing, self.assertRaisesRegex(reflow.StoreError, "disk gone"):
            mod.wf.run_local(self.tmp / "run", store=store, n=3)
        self.assertEqual(len(store.list_runs()), runs)
        again = mod.wf.run_local(self.tmp / "run", store=store, n=3)
        self.assertEqual((again.state, len(store.list_runs())), ("SUCCESS", runs + 1))

    def test_new_store_and_the_run_share_the_first_commit(self) -> None:
        mod = load_flow(self.tmp, FANOUT)
        with _traced_connections() as statements:
            run = mod.wf.run_local(self.tmp / "run", store=reflow.SqliteStore(self.store_path), n=3)
        self.assertEqual(run.state, "SUCCESS")
        commits = [i for i, s in enumerate(statements) if s == "COMMIT"]
        self.assertEqual(len(commits), 4)  # before prepare, before square, before total, at the end
        before_prepare = statements[:commits[0]]
        self.assertTrue(any(s.startswith("CREATE TABLE task_instances") for s in before_prepare))
        self.assertTrue(any(s.startswith("INSERT INTO task_specs") for s in before_prepare))

    def test_run_ids_sort_in_creation_order(self) -> None:
        ids = [reflow.make_run_id("wf") for _ in range(300)]
        time.sleep(0.02)
        ids.append(reflow.make_run_id("wf"))
        self.assertTrue(all(re.fullmatch(r"wf-\d{8}-[0-9a-f]{8}", run_id) for run_id in ids), ids[:3])
        self.assertEqual(ids, sorted(set(ids)))  # unique and growing, even within one tick
        mod = load_flow(self.tmp, FANOUT)
        store = reflow.SqliteStore(self.store_path)
        first = mod.wf.run_local(self.tmp / "run", store=store, n=2)
        with mock.patch.object(reflow, "make_run_id", side_effect=[first.run_id, "fan-20240101-00000001"]):
            again = mod.wf.run_local(self.tmp / "run", store=store, n=2)
        self.assertEqual(again.run_id, "fan-20240101-00000001")  # an id another run has is not reused
        store.close()

    def test_inputs_and_outputs_are_stored_as_the_store_encodes_them(self) -> None:
        run = load_flow(self.tmp, TEXTS_FLOW).wf.run_local(self.tmp / "run")
        values = run.store.get_singleton_output(run.run_id, "prepare")
        self.assertEqual(run.store.get_array_outputs(run.run_id, "echo"), [(x, len(x)) for x in values])
        db = sqlite3.connect(str(self.store_path))
        try:
            rows = db.execute("SELECT input, output, output_hash FROM task_instances WHERE run_id = ? "
                              "AND task_name = 'echo' ORDER BY array_index", (run.run_id,)).fetchall()
        finally:
            db.close()
        expected = [(reflow._json_dumps({"x": x}), reflow._json_dumps((x, len(x))),
                     reflow.compute_output_hash((x, len(x)))) for x in values]
        self.assertEqual(rows, expected)
        self.assertIn("\\u007f", rows[3][0])  # the store escapes DEL, which the hashed form keeps


# =============================================================================
# Local executor: a runner woken by events (issue 6)
# =============================================================================


def _pidfds_work() -> bool:
    """Tell whether this machine gives pidfds (Linux >= 5.3 with Python >= 3.9)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


@contextlib.contextmanager
def _pidfd_mode(mode: str):
    """Keep pidfds ("native"), make the kernel refuse them ("refused") or remove os.pidfd_open ("absent")."""
    if mode == "refused":
        with mock.patch.object(os, "pidfd_open", create=True, side_effect=OSError(errno.ENOSYS, "not here")):
            yield
    elif mode == "absent":
        saved = os.__dict__.pop("pidfd_open", None)
        try:
            yield
        finally:
            if saved is not None:
                os.pidfd_open = saved
    else:
        yield


class LocalRunnerWaitTest(TempDirTest):
    """The local job runner, run in this process: element exits, walltimes and dependencies wake it,
    with pidfds and with the polling fallback (no os.pidfd_open, or a kernel that refuses it)."""

    MODES = ("native", "refused", "absent")

    def setUp(self) -> None:
        super().setUp()
        (self.tmp / "tmp").mkdir()
        slots = mock.patch.object(tempfile, "tempdir", str(self.tmp / "tmp"))  # private cpu-slot locks
        slots.start()
        self.addCleanup(slots.stop)
        self.executor = reflow.LocalExecutor(spool=self.tmp / "spool")

    def queue(self, script: str, array: Optional[str] = None, time_limit: str = "00:02:00",
              after: Tuple[str, ...] = (), start: bool = False) -> str:
        """Submit ``sh -c script``; its runner starts only with ``start`` (else the test runs it)."""
        options = self.executor.dependency_options(list(after), "afterok")
        resources = JobResources(job_name="wake", time_limit=time_limit, array=array, submit_options=options,
                                 output_path=str(self.tmp / "out-{job_id}_{array_index}"), workdir=str(self.tmp))
        if start:
            return self.executor.submit(resources, ["sh", "-c", script])
        with mock.patch.object(reflow.LocalExecutor, "_start_runner"):
            return self.executor.submit(resources, ["sh", "-c", script])

    def run_here(self, job_id: str, mode: str) -> "reflow._LocalJobRunner":
        with _pidfd_mode(mode):
            runner = reflow._LocalJobRunner(self.executor._spool(), job_id)
            runner.run()
        expect_pidfds = mode == "native" and _pidfds_work()
        self.assertEqual(runner.watch.poller is not None, expect_pidfds, mode)
        self.assertEqual(runner.watch.pidfds, {})  # every pidfd closed
        return runner

    def test_array_elements_run_and_each_exit_is_logged(self) -> None:
        for mode in self.MODES:
            with self.subTest(mode=mode):
                job = self.queue('touch "idx_$REFLOW_ARRAY_INDEX"; test "$REFLOW_ARRAY_INDEX" != 3 || exit 4',
                                 array="0-5%2")
                self.run_here(job, mode)
                infos = self.executor.job_infos([job] + [f"{job}_{i}" for i in range(6)])
                self.assertEqual(infos[job].state, "FAILED")
                self.assertEqual(infos[f"{job}_3"], JobInfo("FAILED", "exit 4", 4))
                self.assertEqual([infos[f"{job}_{i}"].state for i in (0, 1, 2, 4, 5)], ["COMPLETED"] * 5)
                self.assertEqual(sorted(p.name for p in self.tmp.glob("idx_*")), [f"idx_{i}" for i in range(6)])
                state = json.loads((self.tmp / "spool" / f"{job}.state").read_text())
                self.assertNotIn("elements", state)  # element exits live in the element log only
                lines = (self.tmp / "spool" / f"{job}.elements").read_text().splitlines()
                self.assertEqual(sorted(json.loads(line)[0] for line in lines), [str(i) for i in range(6)])
                for path in self.tmp.glob("idx_*"):
                    path.unlink()

    def test_walltime_kills_an_overdue_element_only(self) -> None:
        for mode in self.MODES:
            with self.subTest(mode=mode):
                job = self.queue('test "$REFLOW_ARRAY_INDEX" = 0 || exec sleep 60', array="0-1",
                                 time_limit="00:00:01")
                self.run_here(job, mode)
                infos = self.executor.job_infos([f"{job}_0", f"{job}_1"])
                self.assertEqual(infos[f"{job}_0"].state, "COMPLETED")
                self.assertEqual(infos[f"{job}_1"].state, "TIMEOUT", infos)

    def test_singleton_exit_code_is_the_job_state(self) -> None:
        for mode in self.MODES:
            with self.subTest(mode=mode):
                job = self.queue("exit 3")
                self.run_here(job, mode)
                self.assertEqual(self.executor.job_infos([job])[job], JobInfo("FAILED", "exit 3", 3))

    def test_dependency_wait_ends_when_the_runner_ends(self) -> None:
        for mode in self.MODES:
            with self.subTest(mode=mode):
                marker = self.tmp / f"first-{mode}"
                first = self.queue(f"sleep 1; touch {shlex.quote(str(marker))}", start=True)
                second = self.queue(f"test -e {shlex.quote(str(marker))}", after=(first,))
                self.run_here(second, mode)
                infos = self.executor.job_infos([first, second])
                self.assertEqual((infos[first].state, infos[second].state), ("COMPLETED", "COMPLETED"), infos)

    def test_afterok_on_a_failed_dependency_never_runs(self) -> None:
        for mode in self.MODES:
            with self.subTest(mode=mode):
                marker = self.tmp / f"ran-{mode}"
                bad = self.queue("sleep 1; exit 1", start=True)
                child = self.queue(f"touch {shlex.quote(str(marker))}", after=(bad,))
                self.run_here(child, mode)
                self.assertEqual(self.executor.job_infos([child])[child],
                                 JobInfo("FAILED", "DEPENDENCY_NEVER_SATISFIED", None))
                self.assertFalse(marker.exists())

    def test_torn_or_foreign_element_log_lines_are_skipped(self) -> None:
        spool = self.executor._spool()
        (spool / "77.state").write_text(json.dumps({"state": "RUNNING", "pid": 1}))
        (spool / "77.elements").write_text('["0", 0, ""]\n5\n["1", 2, "exit 2"]\n["2", 0, "')
        infos = self.executor.job_infos(["77_0", "77_1", "77_2"])
        self.assertEqual(infos["77_0"].state, "COMPLETED")
        self.assertEqual(infos["77_1"], JobInfo("FAILED", "exit 2", 2))
        self.assertEqual(infos["77_2"].state, "RUNNING")  # its line was torn: not recorded yet


# =============================================================================
# Local executor: elements forked from a warm runner (issue 6, scenario 5)
# =============================================================================

#: What an element sees of its process, printed as JSON: the same whether forked or started fresh.
PROCESS_PROBE = """
import atexit, json, os, signal, sys, tempfile, threading

def typed(x: int) -> None:
    pass

null = os.stat(os.devnull)
print(json.dumps({
    "argv": sys.argv, "orig_argv": getattr(sys, "orig_argv", None), "path": sys.path, "file": __file__,
    "main": {key: type(value).__name__ for key, value in vars(sys.modules["__main__"]).items()},
    "main_is_this": vars(sys.modules["__main__"]) is globals(), "cwd": os.getcwd(),
    "env": {key: os.environ.get(key) for key in ("REFLOW_JOB", "REFLOW_ARRAY_INDEX", "PROBE_MARK")},
    "signals": {name: str(signal.getsignal(getattr(signal, name)))
                for name in ("SIGTERM", "SIGINT", "SIGPIPE", "SIGXFSZ", "SIGHUP", "SIGCHLD")},
    "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "stdin_is_null": os.fstat(0).st_rdev == null.st_rdev,
    "fds": sorted(int(name) for name in os.listdir("/proc/self/fd")),
    "session_leader": os.getsid(0) == os.getpid(), "atexit": atexit._ncallbacks(),
    "tempdir": tempfile.gettempdir(), "annotation": repr(typed.__annotations__["x"]),
    "threads": threading.active_count(), "flags": repr(sys.flags),
    "stdio": [(s.encoding, s.errors, s.line_buffering) for s in (sys.stdout, sys.stderr)],
    "reflow": __import__("reflow").__file__,
}, sort_keys=True))
"""


class LocalForkTest(TempDirTest):
    """A job's elements forked from its warm runner act as fresh ``python script.py`` processes, and the
    runner falls back to fresh processes whenever a fork would differ."""

    def setUp(self) -> None:
        super().setUp()
        self.executor = reflow.LocalExecutor(spool=self.tmp / "spool")

    def run_job(self, source: str, fork: bool = True, array: Optional[str] = "0-1", time_limit: str = "00:02:00",
                env: Optional[Dict[str, str]] = None, python: str = sys.executable, script_dir: Optional[Path] = None,
                wait: bool = True) -> str:
        """Run ``python SCRIPT 'first arg'`` as a local job (forking elements unless ``fork`` is False)."""
        script = (script_dir or self.tmp) / "element.py"
        script.write_text(textwrap.dedent(source))
        resources = JobResources(job_name="fork", time_limit=time_limit, array=array, env=env, workdir=str(self.tmp),
                                 output_path=str(self.tmp / "{job_id}_{array_index}.out"),
                                 error_path=str(self.tmp / "{job_id}_{array_index}.err"))
        with mock_env(REFLOW_LOCAL_FORK=None if fork else "0"):
            job = self.executor.submit(resources, [python, str(script), "first arg"])
        if wait:
            self.wait_for(job)
        return job

    def wait_for(self, job: str) -> None:
        """Wait until the job ended; its runner must have written nothing (no warning, no traceback)."""
        deadline = time.monotonic() + 60
        while self.executor.job_state(job) not in reflow.FINAL_JOB_STATES:
            self.assertLess(time.monotonic(), deadline, f"job {job} did not end")
            time.sleep(0.05)
        self.assertEqual((self.tmp / "spool" / f"{job}.runner.log").read_text(), "")

    def start_mode(self, job: str) -> str:
        return json.loads((self.tmp / "spool" / f"{job}.state").read_text())["element_start"]

    def logs(self, job: str, index: object) -> Tuple[str, str]:
        """Return the element's stdout and stderr, with the job id replaced by JOB."""
        return tuple((self.tmp / f"{job}_{index}.{kind}").read_text().replace(job, "JOB") for kind in ("out", "err"))

    def test_a_forked_element_sees_what_a_fresh_interpreter_sees(self) -> None:
        seen = {}
        for fork in (True, False):
            with mock_env(PYTHONDONTWRITEBYTECODE=None):
                job = self.run_job(PROCESS_PROBE, fork=fork, env={"PROBE_MARK": "set", "TMPDIR": str(self.tmp)})
            self.assertEqual(self.start_mode(job), "fork" if fork else "exec: REFLOW_LOCAL_FORK is off")
            seen[fork] = [json.loads(self.logs(job, index)[0]) for index in (0, 1)]
            self.assertEqual([self.logs(job, index)[1] for index in (0, 1)], ["", ""])
        self.assertEqual(seen[True], seen[False])
        self.assertFalse((self.tmp / "__pycache__").exists())  # a script's bytecode is never cached
        probe = seen[True][1]
        self.assertEqual(probe["argv"][1:], ["first arg"])
        self.assertEqual(probe["path"][0], str(self.tmp.resolve()))
        self.assertEqual(probe["env"], {"REFLOW_JOB": "1", "REFLOW_ARRAY_INDEX": "1", "PROBE_MARK": "set"})
        self.assertEqual(probe["tempdir"], str(self.tmp))
        self.assertEqual((probe["annotation"], probe["reflow"]), ("<class 'int'>", reflow.__file__))
        self.assertTrue(probe["session_leader"] and probe["stdin_is_null"] and probe["main_is_this"])
        self.assertEqual(probe["fds"][:3], [0, 1, 2])
        self.assertLessEqual(len(probe["fds"]), 4)  # and the listing's own

    EXITS = """
        import os, sys
        index = int(os.environ["REFLOW_ARRAY_INDEX"])
        print("element", index, "says hello")
        if index == 1:
            sys.exit(3)
        if index == 2:
            raise ValueError(f"boom {index}")
        if index == 3:
            sys.exit("bad input")
        if index == 4:
            raise KeyboardInterrupt
    """

    def test_exit_codes_and_logs_match_a_fresh_interpreter(self) -> None:
        outcomes = {}
        for fork in (True, False):
            job = self.run_job(self.EXITS, fork=fork, array="0-4")
            infos = self.executor.job_infos([f"{job}_{i}" for i in range(5)])
            outcomes[fork] = [(infos[f"{job}_{i}"].exit_code, *self.logs(job, i)) for i in range(5)]
        self.assertEqual(outcomes[True], outcomes[False])
        self.assertEqual([code for code, _, _ in outcomes[True]], [0, 3, 1, 1, -signal.SIGINT])
        self.assertEqual([out for _, out, _ in outcomes[True]], [f"element {i} says hello\n" for i in range(5)])
        traceback_text = outcomes[True][2][2]
        self.assertTrue(traceback_text.startswith('Traceback (most recent call last):\n  File "'), traceback_text)
        self.assertTrue(traceback_text.endswith("ValueError: boom 2\n"), traceback_text)
        self.assertNotIn("reflow.py", traceback_text)
        self.assertEqual(outcomes[True][3][2], "bad input\n")
        self.assertIn("KeyboardInterrupt", outcomes[True][4][2])

    LINGERING = """
        import atexit, os, threading, time
        from pathlib import Path
        name = os.environ["REFLOW_JOB_ID"]

        def late() -> None:
            time.sleep(0.5)
            Path(f"thread-{name}").write_text("done")

        threading.Thread(target=late).start()
        atexit.register(lambda: Path(f"atexit-{name}").write_text("ran"))
        left_open = open(f"buffered-{name}", "w")
        left_open.write("kept")
        print("no newline at the end", end="")
    """

    def test_threads_atexit_handlers_and_open_files_finish_before_the_exit(self) -> None:
        for fork in (True, False):
            with self.subTest(fork=fork):
                job = self.run_job(self.LINGERING, fork=fork, array=None)
                self.assertEqual(self.executor.job_infos([job])[job].exit_code, 0)
                for prefix, text in (("thread", "done"), ("atexit", "ran"), ("buffered", "kept")):
                    self.assertEqual((self.tmp / f"{prefix}-{job}").read_text(), text)
                self.assertEqual(self.logs(job, ""), ("no newline at the end", ""))

    def test_forked_elements_draw_different_random_values(self) -> None:
        source = """
            import json, os, random, secrets, tempfile, uuid
            with tempfile.NamedTemporaryFile(dir=".") as handle:
                temp_name = os.path.basename(handle.name)
            print(json.dumps([random.random(), os.urandom(16).hex(), uuid.uuid4().hex, secrets.token_hex(16),
                              temp_name]))
        """
        job = self.run_job(source, array="0-3")
        self.assertEqual(self.start_mode(job), "fork")
        draws = [json.loads(self.logs(job, index)[0]) for index in range(4)]
        for kind, values in zip(("random", "urandom", "uuid4", "secrets", "tempfile"), zip(*draws)):
            self.assertEqual(len(set(values)), 4, (kind, values))

    def test_walltime_and_cancel_kill_forked_elements(self) -> None:
        job = self.run_job('import os, time\nif os.environ["REFLOW_ARRAY_INDEX"] == "1":\n    time.sleep(60)\n',
                           time_limit="00:00:01")
        infos = self.executor.job_infos([f"{job}_0", f"{job}_1"])
        self.assertEqual((infos[f"{job}_0"].state, infos[f"{job}_1"].state), ("COMPLETED", "TIMEOUT"), infos)
        self.assertEqual(self.start_mode(job), "fork")
        job = self.run_job('import os, time\nopen(f"pid-{os.environ[\'REFLOW_ARRAY_INDEX\']}", "w").write('
                           'str(os.getpid()))\ntime.sleep(60)\n', wait=False)
        pids = self._wait_for_pids(2)
        self.executor.cancel(job)
        self.assertEqual(self.executor.job_state(job), "CANCELLED")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        self.assertFalse([pid for pid in pids if _alive(pid)])
        self.assertEqual(self.start_mode(job), "fork")

    def _wait_for_pids(self, count: int) -> List[int]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = list(self.tmp.glob("pid-*"))
            if len(files) == count and all(f.read_text() for f in files):
                return [int(f.read_text()) for f in files]
            time.sleep(0.05)
        self.fail("the elements did not start")

    def test_elements_start_fresh_when_a_fork_would_differ(self) -> None:
        python = self.tmp / "python"
        python.symlink_to(sys.executable)  # the same interpreter under another name: sys.executable would differ
        other = self.tmp / "other"
        other.mkdir()
        (other / "reflow.py").write_text("print('the script directory has its own reflow')\n")
        relative_path = os.pathsep.join(["not-absolute", os.environ["PYTHONPATH"]])  # resolved in the start cwd
        cases = [("another python", {"python": str(python)}, {}, "not '"),
                 ("job sets PYTHONHASHSEED", {"env": {"PYTHONHASHSEED": "7"}}, {}, "the job sets PYTHONHASHSEED"),
                 ("opted out", {"fork": False}, {}, "REFLOW_LOCAL_FORK is off"),
                 ("another reflow", {"script_dir": other}, {}, f"would import reflow from {other / 'reflow.py'}"),
                 ("relative PYTHONPATH", {}, {"PYTHONPATH": relative_path}, "PYTHONPATH has relative entries")]
        for name, options, environ, reason in cases:
            with self.subTest(name), mock_env(**environ):
                job = self.run_job("import reflow, sys\nprint(sys.executable, reflow.__file__)\n", array=None,
                                   **options)
                self.assertIn(reason, self.start_mode(job))
                self.assertTrue(self.start_mode(job).startswith("exec: "))
                self.assertEqual(self.executor.job_state(job), "COMPLETED")
                out = self.logs(job, "")[0].splitlines()
                self.assertEqual(out[-1], f"{options.get('python', sys.executable)} "
                                          f"{other / 'reflow.py' if 'script_dir' in options else reflow.__file__}")

    SITECUSTOMIZE = """
import atexit, os, threading, time
atexit.register(lambda: open(os.environ["EXITS"], "a").write(f"{os.getpid()}\\n"))
if os.environ.get("START_THREAD"):
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
"""

    def test_interpreter_start_up_hooks_are_kept_and_runner_threads_prevent_forking(self) -> None:
        site = self.tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(self.SITECUSTOMIZE)
        exits = self.tmp / "exits"
        pythonpath = os.pathsep.join([str(site), os.environ["PYTHONPATH"]])
        for threads in (False, True):
            with self.subTest(threads=threads), mock_env(PYTHONPATH=pythonpath, EXITS=str(exits),
                                                         START_THREAD="1" if threads else None):
                job = self.run_job("import os\nprint(os.getpid())\n")
                expected = "exec: the runner runs threads" if threads else "fork"
                self.assertEqual((self.executor.job_state(job), self.start_mode(job)), ("COMPLETED", expected))
                pids = {self.logs(job, index)[0].strip() for index in (0, 1)}
                self.assertLessEqual(pids, set(exits.read_text().split()))  # each element ran its atexit hook
                exits.unlink()

    def test_the_runner_ignores_modules_in_its_cwd(self) -> None:
        stray = self.tmp / "stray"
        stray.mkdir()
        (stray / "json.py").write_text("raise ImportError('a stray json.py shadowed the standard library')\n")
        saved = os.getcwd()
        os.chdir(stray)
        try:
            job = self.run_job("print('fine')\n", array=None)
        finally:
            os.chdir(saved)
        self.assertEqual((self.executor.job_state(job), self.start_mode(job)), ("COMPLETED", "fork"))
        self.assertEqual(self.logs(job, ""), ("fine\n", ""))

    def test_a_pipeline_runs_the_same_forked_and_fresh(self) -> None:
        source = FANOUT.replace("FAIL_AT = -1", "FAIL_AT = 3")
        for fork in (True, False):
            with self.subTest(fork=fork), mock_env(REFLOW_LOCAL_FORK=None if fork else "0",
                                                   REFLOW_STORE_PATH=str(self.tmp / f"store-{fork}.db")):
                mod = load_flow(self.tmp, source)
                run_dir = self.tmp / f"run-{fork}"
                run = mod.wf.submit(run_dir, executor="local", n=5)
                self.assertEqual(run.wait(timeout=120), "FAILED")
                self.assertEqual(run.store.get_array_outputs(run.run_id, "square")[:3], [0, 1, 4])
                states = [json.loads(p.read_text()) for p in (run_dir / ".reflow" / "local").glob("*.state")]
                modes = {state["element_start"].split(":")[0] for state in states if "element_start" in state}
                self.assertEqual(modes, {"fork" if fork else "exec"})
                failing = next((run_dir / "logs").glob("square-*_3.err")).read_text()
                self.assertIn("RuntimeError: boom at 3", failing)


def main() -> int:
    """Run every test (or those named on the command line) and print one closing line."""
    program = unittest.main(exit=False, verbosity=int(os.environ.get("VERBOSE", "1")))
    result = program.result
    broken = [getattr(test, "test_case", test).id() for test, _ in result.failures + result.errors]
    failed = len(set(broken)) + len(getattr(result, "unexpectedSuccesses", []))
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    figures = _FaultFigures
    if figures.faults or figures.bad_inputs:
        print(f"\nissue 5 figures: {figures.faults} faults injected, {figures.recovered} runs recovered, "
              f"{figures.lost} elements lost, {figures.doubled} double submissions, {figures.bad_inputs} bad inputs "
              "tried")
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped")
    return 0 if result.wasSuccessful() and result.testsRun else 1


if __name__ == "__main__":
    sys.exit(main())
