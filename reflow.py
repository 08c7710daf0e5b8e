#!/usr/bin/env python3
"""reflow: a workflow engine for HPC batch clusters, in one file.

Decorate plain Python functions, wire them together with type hints, and run
the pipeline as real batch jobs on Slurm, PBS Pro/OpenPBS, LSF, Grid Engine
or Flux -- or locally -- with a result cache, resume, retry, cancel, status
and a report.  The file needs nothing but the Python standard library
(Python >= 3.9): copy it next to your workflow and go::

    cp reflow.py .
    python reflow.py --help

A workflow file::

    from reflow import Result, Workflow

    wf = Workflow("squares")

    @wf.job()
    def prepare(n: int) -> list[int]:
        return list(range(n))

    @wf.job(array=True, cpus=1, time="00:05:00", mem="1G")
    def square(x: int = Result(step="prepare")) -> int:
        return x * x

    @wf.job()
    def total(values: list[int] = Result(step="square")) -> int:
        return sum(values)

    if __name__ == "__main__":
        wf.cli()

``python flow.py run --run-dir /tmp/r1 --n 10`` runs it in-process;
``python flow.py submit --run-dir /scratch/r1 --n 10`` runs it as batch jobs;
``python reflow.py status <run_id>`` answers from the store alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Executor",
    "Flow",
    "FluxExecutor",
    "JobConfig",
    "JobResources",
    "LSFExecutor",
    "LocalExecutor",
    "ManifestCodec",
    "PBSExecutor",
    "Param",
    "Result",
    "Run",
    "RunDir",
    "RunState",
    "SGEExecutor",
    "SlurmExecutor",
    "TaskInterrupted",
    "TaskSpec",
    "TaskState",
    "Workflow",
    "WorkflowDescription",
    "__version__",
    "choose_elements_per_job",
    "config_path",
    "element_log_lines",
    "ensure_config_exists",
    "load_config",
    "pack_limits",
    "write_example_config",
]

import _thread  # threading's own locks, without importing threading (2 % of a worker element)
import abc
import atexit
import collections
import contextlib
import datetime as _dt
import enum
import errno
import functools
import gc
import importlib
import importlib.machinery
import itertools
import json
import math
import os
import re
import sqlite3
import sys
import time
import types

#: ``typing.TYPE_CHECKING`` without importing typing: mypy reads the imports below, Python skips them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import base64
    import dataclasses
    import difflib
    import html
    import inspect
    import multiprocessing
    import select
    import shlex
    import shutil
    import signal
    import subprocess
    import tempfile
    import threading
    import traceback
    import typing
    from dataclasses import dataclass as _dataclass
    from dataclasses import field as _field
    from pathlib import Path
    from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

try:
    import fcntl
except ImportError:  # Windows: locks become no-ops; clusters are POSIX.
    fcntl = None  # type: ignore[assignment]
try:  # CPython's core of ``signal``, loaded at interpreter start (see _on_stop_signals)
    import _signal
except ImportError:
    _signal = None


class _LoadOnUse:
    """A module (or a class of it) imported on first use, then bound in its place: ``import reflow`` stays cheap."""

    def __init__(self, module: str, attribute: str = "") -> None:
        self._module, self._attribute = module, attribute

    def _load(self) -> Any:
        target = importlib.import_module(self._module)
        if self._attribute:
            target = getattr(target, self._attribute)
        globals()[self._attribute or self._module] = target  # later uses skip this stand-in
        return target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._load(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)


#: Modules only some commands or paths need: bound to _LoadOnUse stand-ins below.
_LAZY_MODULES = ("argparse", "base64", "dataclasses", "difflib", "html", "inspect", "multiprocessing", "select",
                 "shlex", "shutil", "signal", "subprocess", "tempfile", "threading", "traceback", "typing")
if not TYPE_CHECKING:  # what mypy sees imported above loads when first used
    globals().update((name, _LoadOnUse(name)) for name in _LAZY_MODULES)
    Path = _LoadOnUse("pathlib", "Path")


class _Log:
    """The ``reflow`` logger, made on first use: importing logging costs a fifth of ``import reflow``."""

    def __getattr__(self, name: str) -> Any:
        import logging

        logger = logging.getLogger("reflow")
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        return getattr(logger, name)


log: Any = _Log()

#: Schema version of the sqlite store (``PRAGMA user_version``).
SCHEMA_VERSION = 4
#: Default resources of a task job.
DEFAULT_CPUS, DEFAULT_TIME, DEFAULT_MEM = 1, "00:30:00", "4G"
#: Seconds a finished job may stay without a result file before it is failed.
DEFAULT_LOST_JOB_GRACE = 60.0
#: Busy timeout of every sqlite connection, in milliseconds.
SQLITE_BUSY_TIMEOUT_MS = 60000
#: Environment variable set in every job reflow starts (worker or dispatcher).
JOB_ENV_MARKER = "REFLOW_JOB"
#: Packing (``elements_per_job="auto"``): elements whose measured median is
#: shorter than PACK_SHORT_SECONDS are packed so that each job runs about
#: PACK_TARGET_SECONDS; longer elements are never packed.
PACK_SHORT_SECONDS, PACK_TARGET_SECONDS = 60.0, 300.0
#: Default cap of a packed job's walltime (``executor.pack_max_time``).
DEFAULT_PACK_MAX_TIME = "24:00:00"
#: ``inline="auto"`` runs a batch inside the dispatch job when its measured
#: work (median x elements / slots) is at most this many seconds.
INLINE_AUTO_SECONDS = 30.0
#: Seconds of the dispatch job's walltime kept free after inline work.
INLINE_MARGIN_SECONDS = 60.0
#: Marker lines a packed worker writes around each element (see element_log_lines).
ELEMENT_MARK = "==> reflow element"


# =============================================================================
# Errors
# =============================================================================


class ReflowError(Exception):
    """Root of every error reflow raises on purpose."""


class ConfigError(ReflowError, ValueError):
    """A configuration file or value is malformed."""


class GraphError(ReflowError, ValueError):
    """The task graph is invalid (unknown step, cycle, duplicate name)."""


class WiringError(ReflowError, TypeError):
    """Two tasks are wired with incompatible types."""


class ParameterError(ReflowError, TypeError):
    """A run parameter is missing, unknown or of the wrong type."""


class ManifestError(ReflowError, TypeError):
    """A value cannot be encoded to or decoded from the JSON manifest."""


class StoreError(ReflowError):
    """The store cannot be opened, read or written."""


class RunNotFoundError(StoreError, KeyError):
    """No run with the given id exists in the store."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class ExecutorError(ReflowError):
    """A scheduler command failed; ``result`` holds the CommandResult."""

    def __init__(self, message: str, result: Optional[CommandResult] = None) -> None:
        super().__init__(message)
        self.result = result


class TransientSchedulerError(ExecutorError):
    """A scheduler command failed in a way that may clear when retried."""


class SubmitUncertain(TransientSchedulerError):
    """A submit command failed in a way after which the job may exist anyway (it timed out)."""


class TaskInterrupted(ReflowError):
    """A task was interrupted by a signal (SIGTERM before walltime, SIGINT)."""

    def __init__(self, signum: int) -> None:
        self.signal_number = int(signum)
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"Task interrupted by {self.signal_name} (signal {self.signal_number})")


# =============================================================================
# Utilities
# =============================================================================


def _suggest(name: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or ""."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class _LazyRegex:
    """A regular expression compiled on first use: compiling every pattern at import is a tenth of its cost."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._source = (pattern, flags)

    def __getattr__(self, name: str) -> Any:
        compiled = re.compile(*self._source)
        for method in ("match", "fullmatch", "search", "sub", "split", "findall", "finditer"):
            setattr(self, method, getattr(compiled, method))  # later calls skip __getattr__
        return getattr(compiled, name)


def _lazy_regex(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """Return a stand-in for ``re.compile(pattern, flags)`` that compiles when first used."""
    return _LazyRegex(pattern, flags)  # type: ignore[return-value]  # duck-typed stand-in


class _FieldSpec:
    """The arguments of a ``dataclasses.field()`` call, kept until its class becomes a dataclass."""

    def __init__(self, options: Dict[str, Any]) -> None:
        self.options = options


class _DataclassOnFirstUse(type):
    """Metaclass of reflow's dataclasses: each becomes a real dataclass when first instantiated or inspected.

    ``dataclasses`` imports ``inspect``, and building ten dataclasses costs as
    much again: together a third of ``import reflow``.  ``dataclasses.fields()``
    and ``is_dataclass()`` look up ``__dataclass_fields__``, which lands in
    ``__getattr__`` here while the class is pending, so they always see a
    dataclass.
    """

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__dataclass_") or name == "__match_args__":
            _finish_dataclass(cls)
        return type.__getattribute__(cls, name)


#: Classes declared with _lazy_dataclass and not finished yet: their frozen flag (None while being finished).
_PENDING_DATACLASSES: Dict[type, Optional[bool]] = {}
_DATACLASS_LOCK = _thread.RLock()  # type: ignore[attr-defined]  # missing from typeshed
#: Stand-ins a pending class carries: ``__new__`` finishes the class before the real ``__init__`` runs
#: (and stays, as a plain ``object.__new__``); the others serve an instance made before (DEFAULT_CODEC,
#: _made_without_init).  No class declared with _lazy_dataclass defines these methods itself.
_STAND_INS = ("__new__", "__getattr__", "__repr__", "__eq__", "__hash__")
_FROZEN_STAND_INS = ("__setattr__", "__delattr__")


def _lazy_dataclass(cls: Optional[type] = None, *, frozen: bool = False) -> Any:
    """Act as ``@dataclasses.dataclass`` for a class of metaclass _DataclassOnFirstUse, deferred to first use."""

    def declare(cls: type) -> type:
        for method in _STAND_INS + (_FROZEN_STAND_INS if frozen else ()):
            setattr(cls, method, _stand_in(cls, method))
        _PENDING_DATACLASSES[cls] = frozen
        return cls

    return declare if cls is None else declare(cls)


def _stand_in(cls: type, method: str) -> Any:
    """Return a method that finishes ``cls`` as a dataclass, then does what ``method`` was asked."""
    if method == "__new__":
        def new(klass: type, *args: Any, **kwargs: Any) -> Any:
            _finish_dataclass(cls)  # waits while another thread finishes it
            return object.__new__(klass)

        return staticmethod(new)

    def finish_then_call(self: Any, *args: Any) -> Any:
        _finish_dataclass(cls)
        if method == "__getattr__":  # the plain class lacked it: look again in the dataclass
            return object.__getattribute__(self, *args)
        if method == "__hash__":  # None in a dataclass that is not frozen: hash() says it is unhashable
            return hash(self)
        return getattr(cls, method)(self, *args)

    return finish_then_call


def _lazy_field(**options: Any) -> Any:
    """Act as ``dataclasses.field(**options)`` inside a class declared with :func:`_lazy_dataclass`."""
    return _FieldSpec(options)


def _finish_dataclass(cls: type) -> None:
    """Make a pending class a dataclass now (nothing when it is not pending)."""
    with _DATACLASS_LOCK:
        frozen = _PENDING_DATACLASSES.get(cls)
        if frozen is None:  # not pending, or being finished by this thread
            return
        _PENDING_DATACLASSES[cls] = None
        for method in _STAND_INS[1:] + (_FROZEN_STAND_INS if frozen else ()):
            delattr(cls, method)
        for name, value in list(vars(cls).items()):
            if isinstance(value, _FieldSpec):
                setattr(cls, name, dataclasses.field(**value.options))
        dataclasses.dataclass(frozen=frozen)(cls)
        # last: until here a new instance waits in the stand-in.  Deleting __new__ would leave CPython's
        # __new__ slot calling object.__new__ with the constructor's arguments, which it refuses.
        cls.__new__ = staticmethod(_plain_new)  # type: ignore[assignment]
        del _PENDING_DATACLASSES[cls]


def _plain_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``object.__new__`` for a class whose ``__new__`` must stay overridden (see _finish_dataclass)."""
    return object.__new__(cls)


#: Whether task specs are made lazily (see _made_without_init): only in a process started as
#: ``flow.py worker ...``, a job's element, which then needs neither inspect nor dataclasses.  Any other
#: process validates, describes or submits the workflow, which needs both: it makes its specs whole when
#: the workflow is defined, not in the middle of its first call.
_LAZY_SPECS = sys.argv[1:2] == ["worker"]


def _made_without_init(cls: type, **fields: Any) -> Any:
    """Return what ``cls(**fields)`` returns, without making a pending class a dataclass in a worker.

    For a class without ``__post_init__``, with every field given in the
    order of the fields (a spec's signature may be left to
    _SignatureOnFirstUse).  A worker makes its task specs this way:
    finishing them would import dataclasses, and with it inspect.
    """
    if not _LAZY_SPECS:
        return cls(**fields)
    instance: Any = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


if not TYPE_CHECKING:
    _dataclass, _field = _lazy_dataclass, _lazy_field


def _random_hex(digits: int) -> str:
    """Return ``digits`` random hex digits (for unique file and job names)."""
    return os.urandom((digits + 1) // 2).hex()[:digits]


def _utcnow() -> str:
    """Return the current UTC time as an ISO-8601 string with microseconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _load_sha256(data: bytes) -> Any:
    """Bind ``_sha256`` to a sha256 constructor on first use, then hash ``data``.

    CPython's own sha256 module (``_sha2`` since 3.12, ``_sha256`` before)
    loads in a tenth of the time of hashlib, which loads OpenSSL (2-3 ms, as
    much as a whole cached 1,000-element ``run_local`` otherwise takes);
    the digests are the same.  Builds without it fall back to hashlib.
    Later hashes (millions in a big run) call the constructor directly.
    The module is named by version: a failed import searches every
    ``sys.path`` entry first (0.1-0.5 ms).
    """
    global _sha256
    try:
        _sha256 = importlib.import_module("_sha2" if sys.version_info >= (3, 12) else "_sha256").sha256
    except (ImportError, AttributeError):
        import hashlib

        _sha256 = hashlib.sha256
    return _sha256(data)


#: A sha256 constructor once anything has been hashed.
_sha256: Callable[[bytes], Any] = _load_sha256


def _hash16(text: str) -> str:
    """Return the first 16 hex digits of the sha256 of ``text``."""
    return _sha256(text.encode("utf-8")).hexdigest()[:16]


def _compact_encoder(ensure_ascii: bool) -> Callable[[Any], str]:
    """Return a function dumping JSON data with sorted keys and no spaces (NaN refused).

    It calls the json module's C encoder, made once: ``JSONEncoder.encode``
    makes a new one at every call, which is two thirds of the cost of
    encoding a small value (hot path: two encodings per array element).
    There is no check for circular references; the codec's ``dump_value``
    runs first and fails on them.
    """
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python built without the _json accelerator
        return encoder.encode
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    chunks = make(None, encoder.default, quote, None, ":", ",", True, False, False)

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))
    return encode


#: Dump already-encoded JSON data with sorted keys and no spaces, as hashed (UTF-8, not escaped).
_canonical_json = _compact_encoder(ensure_ascii=False)


def _stored_json(canonical: str) -> Optional[str]:
    """Return canonical JSON text as the store writes it (``ensure_ascii``), or None when that differs.

    Both forms are the same text unless it holds a character the store
    escapes (non-ASCII or DEL), so an instance's input and output need
    not be encoded a second time.
    """
    return canonical if canonical.isascii() and "\x7f" not in canonical else None


def _private_dir(path: Union[str, Path]) -> Path:
    """Create ``path`` (and parents) if missing; new directories get mode 0700."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    return path


def _atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: int = 0o600, sync: bool = True) -> None:
    """Write ``data`` to ``path`` through a fresh temp file, fsync (unless not ``sync``) and rename.

    The temp file is created with ``O_EXCL`` and the rename replaces the
    directory entry, so a symlink planted at ``path`` is replaced, never
    followed.  Without ``sync`` a crash of the machine may leave the file
    empty, never partly written by another writer.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{_random_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _open_append(path: Union[str, Path], buffering: int = -1) -> Any:
    """Open a file (0600 if new) for appending, in binary."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab", buffering=buffering)


_TIME_RE = _lazy_regex(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(value: Union[str, int]) -> int:
    """Parse a walltime into seconds.

    Accepts Slurm's forms: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM`` and ``D-HH:MM:SS``, or an int of seconds.  Anything else
    (``1h30``, ``90 min``) raises ValueError naming the value.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"walltime must be positive, got {value!r}")
        return value
    match = _TIME_RE.match(str(value).strip())
    if not match:
        raise ValueError(f"invalid walltime {value!r}: use HH:MM:SS, MM, or D-HH:MM:SS")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(parts) == 1:
        total = parts[0] * 60
    elif len(parts) == 2:
        total = parts[0] * 60 + parts[1]
    else:
        total = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if total <= 0:
        raise ValueError(f"walltime must be positive, got {value!r}")
    return total


def format_hms(seconds: int) -> str:
    """Format seconds as ``HH:MM:SS`` (hours may exceed 24)."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_MEM_RE = _lazy_regex(r"^(\d+(?:\.\d+)?)([KMGTP]?)(?:i?B)?$", re.IGNORECASE)
_MEM_FACTORS = {"": 1, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3, "P": 1024**4}


def parse_mem(value: Union[str, int]) -> int:
    """Parse a memory size into KiB.

    ``4G``, ``512M``, ``1.5G``, ``4096`` (MiB, as Slurm reads a bare number)
    and ``4GB`` are accepted; ``4 GB`` or ``lots`` raise ValueError.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory must be positive, got {value!r}")
        return value * 1024
    match = _MEM_RE.match(str(value).strip()) if " " not in str(value) else None
    if not match:
        raise ValueError(f"invalid memory {value!r}: use a number with K, M, G or T (e.g. 4G)")
    number, unit = float(match.group(1)), match.group(2).upper()
    kib = int(number * (_MEM_FACTORS[unit] if unit else 1024) + 0.999999)
    if kib <= 0:
        raise ValueError(f"memory must be positive, got {value!r}")
    return kib


def _compress_indices(indices: Iterable[int]) -> str:
    """Render sorted ints as a compact range spec: ``[0,1,2,5]`` -> ``0-2,5``."""
    ordered = sorted(set(indices))
    pieces: List[str] = []
    start = prev = None
    for index in ordered:
        if start is None:
            start = prev = index
        elif index == prev + 1:
            prev = index
        else:
            pieces.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = index
    if start is not None:
        pieces.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(pieces)


def _expand_indices(spec: str) -> List[int]:
    """Expand a range spec (``0-2,5``) into a list of ints, in order."""
    out: List[int] = []
    for piece in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = piece.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def _shell_join(argv: Sequence[str]) -> str:
    """Join argv into one shell command line, every word quoted."""
    return " ".join(shlex.quote(str(word)) for word in argv)


# =============================================================================
# Config
# =============================================================================

_TOML_BARE_KEY_RE = _lazy_regex(r"[A-Za-z0-9_-]+")
_TOML_NUMBER_RE = _lazy_regex(
    r"0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|0o[0-7](?:_?[0-7])*|0b[01](?:_?[01])*"
    r"|[+-]?(?:inf|nan)"
    r"|[+-]?(?:0|[1-9](?:_?[0-9])*)(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?"
)
_TOML_DATE_RE = _lazy_regex(r"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d")
_TOML_BASIC_CHUNK_RE = _lazy_regex(r'[^"\\\n]*')
_TOML_MULTILINE_CHUNK_RE = _lazy_regex(r'[^"\\]*')
_TOML_CONTROL_RE = _lazy_regex(r"[\x00-\x08\x0b-\x1f\x7f]")
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_TOML_SNIPPET_RE = _lazy_regex(r"[^\s,\]}#]*")
_TOMLLIB_WHERE_RE = _lazy_regex(r"\s*\((?:at line (\d+), column \d+|at end of document)\)\s*$")


class _TomlReader:
    """Read the TOML 1.0 subset reflow's config uses (Python < 3.11 has no tomllib).

    Tables, dotted headers, arrays of tables, bare/quoted/dotted keys, all
    four string forms, ints (decimal, hex, octal, binary), floats, booleans,
    arrays and inline tables.  Dates and times are not supported.  The result
    and the redefinition rules match ``tomllib.loads``.
    """

    def __init__(self, text: str, source: str) -> None:
        self.text = text.replace("\r\n", "\n")  # as tomllib does
        self.source = source
        self.pos = 0
        self.prefix = ""
        # Tables are tracked by id(): every dict parsed stays alive in the result.
        self.explicit: set = set()  # declared by a header or dotted keys of an earlier section
        self.pending: set = set()  # made or extended by dotted keys in the current section
        self.frozen: set = set()  # inline tables and arrays: complete once written

    def error(self, message: str, pos: Optional[int] = None) -> ConfigError:
        """Return a ConfigError naming the file and the line of ``pos``."""
        line = self.text.count("\n", 0, self.pos if pos is None else pos) + 1
        return ConfigError(f"config {self.source} line {line}: {message}")

    def parse(self) -> Dict[str, Any]:
        """Parse the whole document and return it as a dict."""
        root: Dict[str, Any] = {}
        table = root
        while True:
            self.skip_blank_lines()
            if self.pos >= len(self.text):
                return root
            if self.text[self.pos] == "[":
                table = self.parse_header(root)
            else:
                self.parse_key_value(table)
            self.expect_line_end()

    # -- whitespace and comments -------------------------------------------------

    def skip_ws(self) -> None:
        """Skip spaces and tabs."""
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        self.pos = pos

    def skip_comment(self) -> None:
        """Skip a ``# ...`` comment up to (not including) the newline."""
        if self.text.startswith("#", self.pos):
            end = self.text.find("\n", self.pos)
            end = len(self.text) if end < 0 else end
            if _TOML_CONTROL_RE.search(self.text, self.pos, end):
                raise self.error("control character in comment")
            self.pos = end

    def skip_blank_lines(self) -> None:
        """Skip whitespace, comments and newlines (between statements and in arrays)."""
        while True:
            self.skip_ws()
            self.skip_comment()
            if not self.text.startswith("\n", self.pos):
                return
            self.pos += 1

    def expect_line_end(self) -> None:
        """Require the rest of the line to be blank or a comment."""
        self.skip_ws()
        self.skip_comment()
        if self.pos < len(self.text) and self.text[self.pos] != "\n":
            raise self.error(f"unexpected text {self.snippet()!r} after the value")

    def snippet(self) -> str:
        """Return the text at the cursor up to a delimiter (for error messages)."""
        match = _TOML_SNIPPET_RE.match(self.text, self.pos)
        found = match.group() if match else ""
        return found[:30] or self.text[self.pos:self.pos + 1]

    def scan(self, pattern: re.Pattern[str]) -> str:
        """Move past the (possibly empty) match of ``pattern`` at the cursor; return it."""
        match = pattern.match(self.text, self.pos)
        chunk = match.group() if match else ""
        self.pos += len(chunk)
        return chunk

    # -- keys, headers and tables ---------------------------------------------------

    def parse_key(self) -> List[str]:
        """Parse a possibly dotted key: ``a``, ``"a b"``, ``a.'b'.c``."""
        keys = [self.parse_key_part()]
        while True:
            save = self.pos
            self.skip_ws()
            if not self.text.startswith(".", self.pos):
                self.pos = save
                return keys
            self.pos += 1
            self.skip_ws()
            keys.append(self.parse_key_part())

    def parse_key_part(self) -> str:
        """Parse one bare or quoted key."""
        char = self.text[self.pos:self.pos + 1]
        if char == '"':
            return self.parse_basic_string()
        if char == "'":
            return self.parse_literal_string()
        match = _TOML_BARE_KEY_RE.match(self.text, self.pos)
        if not match:
            found = repr(char) if char.strip() else "end of line"
            raise self.error(f"expected a key, found {found}")
        self.pos = match.end()
        return match.group()

    def parse_header(self, root: Dict[str, Any]) -> Dict[str, Any]:
        """Parse ``[a.b]`` or ``[[a.b]]`` and return the table it opens."""
        start = self.pos
        is_array = self.text.startswith("[[", self.pos)
        self.pos += 2 if is_array else 1
        self.skip_ws()
        keys = self.parse_key()
        name = ".".join(keys)
        self.skip_ws()
        close = "]]" if is_array else "]"
        if not self.text.startswith(close, self.pos):
            raise self.error(f"expected {close!r} to close the header of table {name!r}")
        self.pos += len(close)
        self.explicit |= self.pending
        self.pending = set()
        self.prefix = name + "."
        parent = root
        for depth in range(len(keys) - 1):
            parent = self.child_table(parent, keys[depth], ".".join(keys[:depth + 1]), start)
        if is_array:
            return self.append_table(parent, keys[-1], name, start)
        table = self.child_table(parent, keys[-1], name, start)
        if id(table) in self.explicit:
            raise self.error(f"table [{name}] is defined twice", start)
        self.explicit.add(id(table))
        return table

    def child_table(self, parent: Dict[str, Any], key: str, name: str, pos: int,
                    dotted: bool = False) -> Dict[str, Any]:
        """Return (creating it if missing) the sub-table ``key`` of ``parent``.

        An array of tables continues in its last element.  Dotted keys may
        not reopen a table an earlier section defined.
        """
        node = parent.get(key)
        if node is None:
            node = parent[key] = {}
        elif isinstance(node, list) and id(node) not in self.frozen:
            node = node[-1]
        if not isinstance(node, dict):
            raise self.error(f"key {name!r} is already defined as a value", pos)
        if id(node) in self.frozen:
            raise self.error(f"cannot add to {name!r}: an inline table or array is complete", pos)
        if dotted:
            if id(node) in self.explicit:
                raise self.error(f"cannot add to table {name!r} with a dotted key: it is defined above", pos)
            self.pending.add(id(node))
        return node

    def append_table(self, parent: Dict[str, Any], key: str, name: str, pos: int) -> Dict[str, Any]:
        """Append a new table to the array of tables ``key`` (``[[name]]``)."""
        node = parent.setdefault(key, [])
        if not isinstance(node, list) or id(node) in self.frozen:
            raise self.error(f"cannot use [[{name}]]: {name!r} is already defined", pos)
        table: Dict[str, Any] = {}
        node.append(table)
        self.explicit.add(id(table))
        return table

    def parse_key_value(self, table: Dict[str, Any]) -> None:
        """Parse ``key = value`` and store it in ``table``."""
        start = self.pos
        keys = self.parse_key()
        name = self.prefix + ".".join(keys)
        self.skip_ws()
        if not self.text.startswith("=", self.pos):
            raise self.error(f"expected '=' after key {name!r}")
        self.pos += 1
        self.skip_ws()
        value = self.parse_value()
        for depth in range(len(keys) - 1):
            dotted_name = self.prefix + ".".join(keys[:depth + 1])
            table = self.child_table(table, keys[depth], dotted_name, start, dotted=True)
        if keys[-1] in table:
            raise self.error(f"duplicate key {name!r}", start)
        table[keys[-1]] = value
        self.freeze(value)

    def freeze(self, value: Any) -> None:
        """Mark arrays and inline tables (recursively) as complete."""
        if isinstance(value, dict):
            self.frozen.add(id(value))
            for item in value.values():
                self.freeze(item)
        elif isinstance(value, list):
            self.frozen.add(id(value))
            for item in value:
                self.freeze(item)

    # -- values -------------------------------------------------------------------

    def parse_value(self) -> Any:
        """Parse one value at the cursor."""
        text, pos = self.text, self.pos
        if text.startswith('"""', pos):
            return self.parse_multiline_basic()
        if text.startswith("'''", pos):
            return self.parse_multiline_literal()
        char = text[pos:pos + 1]
        parser = _TOML_VALUE_PARSERS.get(char)
        if parser is not None:
            return parser(self)
        for word, value in (("true", True), ("false", False)):
            if text.startswith(word, pos):
                self.pos += len(word)
                return value
        return self.parse_number()

    def parse_number(self) -> Union[int, float]:
        """Parse an int or a float (``+1_000``, ``0xff``, ``1e-3``, ``-inf``)."""
        if _TOML_DATE_RE.match(self.text, self.pos):
            raise self.error("dates and times are not supported here: quote the value")
        match = _TOML_NUMBER_RE.match(self.text, self.pos)
        if not match:
            found = self.snippet()
            if not found.strip() or found == "#":
                raise self.error("missing value")
            hint = " (strings must be quoted)" if found[:1].isalpha() else ""
            raise self.error(f"invalid value {found!r}{hint}")
        self.pos = match.end()
        literal = match.group().replace("_", "")
        if literal[:2] in ("0x", "0o", "0b"):
            return int(literal, 0)
        if literal.lstrip("+-") in ("inf", "nan") or any(c in literal for c in ".eE"):
            return float(literal)
        return int(literal)

    def parse_basic_string(self) -> str:
        """Parse ``"..."`` with escapes."""
        start = self.pos
        self.pos += 1
        pieces = []
        while True:
            chunk = self.scan(_TOML_BASIC_CHUNK_RE)
            self.check_control(chunk)
            pieces.append(chunk)
            char = self.text[self.pos:self.pos + 1]
            if char == '"':
                self.pos += 1
                return "".join(pieces)
            if char != "\\":
                raise self.error("unterminated string", start)
            pieces.append(self.parse_escape(multiline=False))

    def parse_multiline_basic(self) -> str:
        """Parse ``\"\"\"...\"\"\"`` (a newline right after the opening quotes is dropped)."""
        start = self.pos
        self.pos += 4 if self.text.startswith('"""\n', self.pos) else 3
        pieces = []
        while True:
            chunk = self.scan(_TOML_MULTILINE_CHUNK_RE)
            self.check_control(chunk)
            pieces.append(chunk)
            if self.pos >= len(self.text):
                raise self.error("unterminated multi-line string", start)
            if self.text.startswith('"""', self.pos):
                self.pos += 3
                return "".join(pieces) + self.closing_quotes('"')
            if self.text[self.pos] == '"':
                pieces.append('"')
                self.pos += 1
            else:
                pieces.append(self.parse_escape(multiline=True))

    def closing_quotes(self, quote: str) -> str:
        """Take up to two quotes right after a closing triple quote: they belong to the string."""
        count = 0
        while count < 2 and self.text.startswith(quote, self.pos):
            self.pos += 1
            count += 1
        return quote * count

    def parse_escape(self, multiline: bool) -> str:
        """Parse a backslash escape; in multi-line strings ``\\`` at a line end trims."""
        char = self.text[self.pos + 1:self.pos + 2]
        if multiline and char in (" ", "\t", "\n"):
            self.pos += 1
            self.skip_ws()
            if self.pos < len(self.text) and self.text[self.pos] != "\n":
                raise self.error("a backslash followed by spaces must end the line")
            while self.pos < len(self.text) and self.text[self.pos] in " \t\n":
                self.pos += 1
            return ""
        if char in ("u", "U"):
            return self.parse_unicode_escape(4 if char == "u" else 8)
        if char not in _TOML_ESCAPES:
            raise self.error(f"invalid escape '\\{char}' in string")
        self.pos += 2
        return _TOML_ESCAPES[char]

    def parse_unicode_escape(self, width: int) -> str:
        """Parse ``\\uXXXX`` or ``\\UXXXXXXXX``."""
        digits = self.text[self.pos + 2:self.pos + 2 + width]
        if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
            escape = self.text[self.pos:self.pos + 2] + digits
            raise self.error(f"invalid unicode escape {escape!r}")
        code = int(digits, 16)
        if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
            raise self.error(f"unicode escape {digits!r} is not a valid character")
        self.pos += 2 + width
        return chr(code)

    def parse_literal_string(self) -> str:
        """Parse ``'...'`` (no escapes)."""
        end = self.pos + 1
        while end < len(self.text) and self.text[end] not in "'\n":
            end += 1
        if not self.text.startswith("'", end):
            raise self.error("unterminated string")
        value = self.text[self.pos + 1:end]
        self.check_control(value)
        self.pos = end + 1
        return value

    def parse_multiline_literal(self) -> str:
        """Parse ``'''...'''`` (no escapes)."""
        start = self.pos
        self.pos += 4 if self.text.startswith("'''\n", self.pos) else 3
        end = self.text.find("'''", self.pos)
        if end < 0:
            raise self.error("unterminated multi-line string", start)
        value = self.text[self.pos:end]
        self.check_control(value)
        self.pos = end + 3
        return value + self.closing_quotes("'")

    def check_control(self, value: str) -> None:
        """Reject control characters other than tab and newline inside strings."""
        if _TOML_CONTROL_RE.search(value):
            raise self.error("control character in string")

    def parse_array(self) -> List[Any]:
        """Parse ``[v, v, ...]``: newlines, comments and a trailing comma allowed."""
        start = self.pos
        self.pos += 1
        items: List[Any] = []
        while True:
            self.skip_blank_lines()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return items
            if self.pos >= len(self.text):
                raise self.error("unterminated array", start)
            items.append(self.parse_value())
            self.skip_blank_lines()
            char = self.text[self.pos:self.pos + 1]
            if char == "]":
                self.pos += 1
                return items
            if not char:
                raise self.error("unterminated array", start)
            if char != ",":
                raise self.error(f"expected ',' or ']' in array, found {self.snippet()!r}")
            self.pos += 1

    def parse_inline_table(self) -> Dict[str, Any]:
        """Parse ``{k = v, ...}`` on one line (no trailing comma, as TOML 1.0)."""
        self.pos += 1
        prefix, self.prefix = self.prefix, ""
        table: Dict[str, Any] = {}
        self.skip_ws()
        if self.text.startswith("}", self.pos):
            self.pos += 1
        else:
            self._parse_inline_items(table)
        self.prefix = prefix
        return table

    def _parse_inline_items(self, table: Dict[str, Any]) -> None:
        while True:
            self.parse_key_value(table)
            self.skip_ws()
            char = self.text[self.pos:self.pos + 1]
            if char == "}":
                self.pos += 1
                return
            if char != ",":
                found = "end of line" if char in ("", "\n") else repr(char)
                raise self.error(f"expected ',' or '}}' in inline table, found {found}")
            self.pos += 1
            self.skip_ws()


#: First character of a value -> the reader method that parses it.
_TOML_VALUE_PARSERS: Dict[str, Callable[[_TomlReader], Any]] = {
    '"': _TomlReader.parse_basic_string,
    "'": _TomlReader.parse_literal_string,
    "[": _TomlReader.parse_array,
    "{": _TomlReader.parse_inline_table,
}


def _tomllib() -> Optional[types.ModuleType]:
    """Return the standard library's TOML parser (3.11+), imported on first use, or None."""
    if sys.version_info < (3, 11):
        return None
    import tomllib  # novermin

    return tomllib


def _parse_toml(text: str, source: str) -> Dict[str, Any]:
    """Parse TOML ``text``; errors are one-line ConfigErrors naming ``source`` and the line.

    Uses ``tomllib`` when it exists (3.11+), else :class:`_TomlReader`.
    """
    toml = _tomllib()
    if toml is None:
        return _TomlReader(text, source).parse()
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as exc:
        # tomllib: "Expected '=' after a key in a key/value pair (at line 3, column 6)"
        message = str(exc)
        match = _TOMLLIB_WHERE_RE.search(message)
        if match:
            line = match.group(1) or str(text.count("\n") + 1)
            message = message[:match.start()]
            raise ConfigError(f"config {source} line {line}: {message[:1].lower()}{message[1:]}") from None
        raise ConfigError(f"config {source}: {message}") from None


def _check_str(value: Any) -> Optional[str]:
    return None if isinstance(value, str) else "must be a string"


def _check_int(value: Any) -> Optional[str]:
    return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"


def _check_positive_int(value: Any) -> Optional[str]:
    return _check_int(value) or (None if value >= 1 else "must be at least 1")


def _check_seconds(value: Any) -> Optional[str]:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if number and 0 <= value < float("inf") else "must be a number of seconds >= 0"


def _check_table(value: Any) -> Optional[str]:
    return None if isinstance(value, dict) else "must be a table"


def _check_by(parser: Callable[[Any], Any]) -> Callable[[Any], Optional[str]]:
    """Return a check that runs ``parser`` (parse_time, parse_mem) on strings and ints."""
    def check(value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return "must be a string"
        try:
            parser(value)
        except ValueError as exc:
            return f"is invalid: {exc}"
        return None
    return check


def _check_journal(value: Any) -> Optional[str]:
    modes = ("DELETE", "TRUNCATE", "WAL")  # the store accepts these; the others lose data on a crash
    if isinstance(value, str) and value.upper() in modes:
        return None
    return "must be one of " + ", ".join(modes)


#: Scheduler commands a config may point elsewhere (``executor.<name>``, ``REFLOW_<NAME>``).
_EXECUTOR_BINARIES = ("sbatch", "scancel", "sacct", "squeue", "qsub", "qdel", "qstat", "qacct",
                      "bsub", "bkill", "bjobs", "flux")

#: Every table and key a config file may hold, with the check of its value.
_CONFIG_SCHEMA: Dict[str, Dict[str, Callable[[Any], Optional[str]]]] = {
    "executor": dict(
        {name: _check_str for name in _EXECUTOR_BINARIES},
        mode=_check_str, python=_check_str, max_submit_jobs=_check_int,
        lost_job_grace=_check_seconds, partition=_check_str, queue=_check_str,
        account=_check_str, submit_options=_check_table, max_array_size=_check_positive_int,
        pack_max_time=_check_by(parse_time),
    ),
    "dispatch": {
        "cpus": _check_positive_int, "time": _check_by(parse_time), "mem": _check_by(parse_mem),
        "partition": _check_str, "queue": _check_str, "account": _check_str,
        "submit_options": _check_table,
    },
    "notifications": {"mail_user": _check_str, "mail_type": _check_str},
    "defaults": {"store_path": _check_str, "run_dir": _check_str},
    "server": {"url": _check_str},
    "store": {"journal_mode": _check_journal},
    "local": {"max_cpus": _check_positive_int},
}


def _env(name: str) -> Optional[str]:
    """Return environment variable ``name``, or None when unset or empty."""
    return os.environ.get(name) or None


def _positive_int_or_none(value: Any) -> Optional[int]:
    """Return ``value`` as an int > 0, or None when it is not one."""
    if isinstance(value, bool):
        return None
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        return None
    return number if isinstance(number, int) and number > 0 else None


def _setting(envs: Sequence[str], keys: Sequence[str], default: Optional[str], doc: str) -> property:
    """Make a string property: the first set env var, else the first set key, else ``default``."""
    def getter(self: Config) -> Optional[str]:
        return self._first(envs, keys, default)
    getter.__doc__ = doc
    return property(getter)


def config_path() -> Path:
    """Return ``$XDG_CONFIG_HOME/reflow/config.toml``, else ``~/.config/reflow/config.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "reflow" / "config.toml"


def _default_config_file() -> Path:
    """Return ``$REFLOW_CONFIG`` when set, else :func:`config_path`."""
    override = _env("REFLOW_CONFIG")
    return Path(override).expanduser() if override else config_path()


class Config:
    """Settings from the config file, overridden by ``REFLOW_*`` environment variables.

    ``data`` is the parsed file (``{"executor": {"mode": "sbatch"}, ...}``);
    ``path`` only names the file in error messages.  Every property reads
    the environment when it is accessed.  Values are strings, except
    ``max_submit_jobs``, ``dispatch_cpus``, ``lost_job_grace`` and ``pack_max_time``; unset
    values without a default are None.
    """

    def __init__(self, data: Optional[Dict[str, Any]] = None, *,
                 path: Optional[Union[str, Path]] = None) -> None:
        self.data: Dict[str, Any] = dict(data) if data else {}
        self.path = path

    def __repr__(self) -> str:
        return f"Config(path={str(self.path) if self.path else None!r})"

    def get(self, dotted_key: str, default: Any = None) -> Any:
        """Return the file value at ``dotted_key`` (``"executor.mode"``), or ``default``."""
        node: Any = self.data
        for part in dotted_key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def _first(self, envs: Sequence[str], keys: Sequence[str], default: Any = None) -> Any:
        """Return the first set env var, else the first set file key (as str), else ``default``."""
        for name in envs:
            if _env(name):
                return os.environ[name]
        for key in keys:
            value = self.get(key)
            if value is not None and value != "":
                return value if isinstance(value, str) else str(value)
        return default

    def _error(self, message: str) -> ConfigError:
        where = f"config {self.path}" if self.path else "config"
        return ConfigError(f"{where}: {message}")

    # -- validation ----------------------------------------------------------------

    def validate(self) -> Config:
        """Check every table, key and value against the schema; return self.

        Raises ConfigError naming the first unknown key (with the closest
        valid one) or the first value of the wrong type.
        """
        for table, content in self.data.items():
            if table not in _CONFIG_SCHEMA:
                raise self._error(self._unknown_top_level(table))
            if not isinstance(content, dict):
                raise self._error(f"{table!r} must be a table ([{table}]), got {content!r}")
            for key, value in content.items():
                self._validate_key(table, key, value)
        return self

    def _validate_key(self, table: str, key: str, value: Any) -> None:
        check = _CONFIG_SCHEMA[table].get(key)
        name = f"{table}.{key}"
        if check is None:
            others = [f"{t}.{key}" for t, keys in _CONFIG_SCHEMA.items() if key in keys]
            hint = _suggest(key, _CONFIG_SCHEMA[table])
            if hint:
                hint = hint.replace("'", f"'{table}.", 1)
            elif others:
                hint = f" Did you mean {others[0]!r}?"
            raise self._error(f"unknown key {name!r}.{hint}")
        problem = check(value)
        if problem:
            raise self._error(f"{name!r} {problem}, got {value!r}")

    @staticmethod
    def _unknown_top_level(name: str) -> str:
        homes = [f"{table}.{name}" for table, keys in _CONFIG_SCHEMA.items() if name in keys]
        if homes:
            return f"unknown key {name!r}. Did you mean {homes[0]!r}?"
        return f"unknown table {name!r}.{_suggest(name, _CONFIG_SCHEMA)}"

    # -- executor -------------------------------------------------------------------

    executor_mode = _setting(("REFLOW_MODE",), ("executor.mode",), "sbatch",
                             "Scheduler mode: sbatch, qsub-pbs, bsub, qsub-sge, flux, local or dry-run.")
    executor_python = _setting(("REFLOW_PYTHON",), ("executor.python",), None,
                               "Interpreter for dispatch and worker jobs (None: the caller decides).")
    executor_partition = _setting(
        ("REFLOW_PARTITION", "REFLOW_QUEUE"),
        ("executor.submit_options.partition", "executor.submit_options.queue",
         "executor.partition", "executor.queue"),
        None, "Partition (Slurm) or queue of task jobs; the two names are synonyms.")
    executor_account = _setting(("REFLOW_ACCOUNT",),
                                ("executor.submit_options.account", "executor.account"), None,
                                "Account (project) charged for task jobs.")
    signal = _setting(("REFLOW_SIGNAL",), ("executor.submit_options.signal",), None,
                      "Early-warning signal for task jobs, e.g. ``B:INT@60``.")
    mail_user = _setting(("REFLOW_MAIL_USER",),
                         ("notifications.mail_user", "executor.submit_options.mail_user"), None,
                         "Address the scheduler mails about task jobs.")
    mail_type = _setting(("REFLOW_MAIL_TYPE",),
                         ("notifications.mail_type", "executor.submit_options.mail_type"), None,
                         "Events to mail about (scheduler syntax, e.g. ``END,FAIL``).")

    @property
    def max_submit_jobs(self) -> Optional[int]:
        """Most queued jobs per run (an int > 0), or None for no cap (also when invalid)."""
        return _positive_int_or_none(_env("REFLOW_MAX_SUBMIT_JOBS") or self.get("executor.max_submit_jobs"))

    @property
    def pack_max_time(self) -> int:
        """Longest walltime (seconds) packing may give a job (``executor.pack_max_time``, default 24 h)."""
        raw = _env("REFLOW_PACK_MAX_TIME")
        value = raw if raw is not None else self.get("executor.pack_max_time", DEFAULT_PACK_MAX_TIME)
        try:
            return parse_time(value)
        except ValueError as exc:
            source = "REFLOW_PACK_MAX_TIME" if raw is not None else "'executor.pack_max_time'"
            raise self._error(f"{source}: {exc}") from None

    @property
    def lost_job_grace(self) -> float:
        """Seconds a finished job may stay without a result before its task fails."""
        raw = _env("REFLOW_LOST_JOB_GRACE")
        value = raw if raw is not None else self.get("executor.lost_job_grace", DEFAULT_LOST_JOB_GRACE)
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = -1.0
        if isinstance(value, bool) or not 0 <= seconds < float("inf"):
            source = "REFLOW_LOST_JOB_GRACE" if raw is not None else "'executor.lost_job_grace'"
            raise self._error(f"{source} must be a number of seconds >= 0, got {value!r}")
        return seconds

    def executor_binary(self, name: str) -> str:
        """Return the command for scheduler binary ``name`` (``sbatch``, ``qstat``...).

        ``REFLOW_<NAME>`` wins over ``executor.<name>``, which wins over the
        plain name (looked up on PATH when run).
        """
        if name not in _EXECUTOR_BINARIES:
            raise ConfigError(f"unknown scheduler binary {name!r}.{_suggest(name, _EXECUTOR_BINARIES)}")
        return self._first((f"REFLOW_{name.upper()}",), (f"executor.{name}",), name)

    executor_sbatch = property(lambda self: self.executor_binary("sbatch"),
                               doc="Command used to submit Slurm jobs.")
    executor_scancel = property(lambda self: self.executor_binary("scancel"),
                                doc="Command used to cancel Slurm jobs.")
    executor_sacct = property(lambda self: self.executor_binary("sacct"),
                              doc="Command used to query Slurm accounting.")

    @property
    def executor_submit_options(self) -> Dict[str, Any]:
        """Options for every task job: ``[executor.submit_options]`` plus the settings above.

        Unknown keys pass through.  ``queue`` is folded into ``partition``
        and the environment overrides partition, account, signal and mail.
        """
        options = dict(self.get("executor.submit_options") or {})
        options.pop("queue", None)
        merged = {"partition": self.executor_partition, "account": self.executor_account,
                  "signal": self.signal, "mail_user": self.mail_user, "mail_type": self.mail_type}
        for key, value in merged.items():
            options.pop(key, None)
            if value is not None:
                options[key] = value
        return options

    submit_options = property(lambda self: self.executor_submit_options,
                              doc="Same as :attr:`executor_submit_options`.")

    # -- dispatch job ------------------------------------------------------------------

    @property
    def dispatch_cpus(self) -> int:
        """CPUs of the dispatch job (default 1)."""
        raw = _env("REFLOW_DISPATCH_CPUS")
        if raw is None:
            return int(self.get("dispatch.cpus", 1))
        cpus = _positive_int_or_none(raw)
        if cpus is None:
            raise self._error(f"REFLOW_DISPATCH_CPUS must be an integer >= 1, got {raw!r}")
        return cpus

    dispatch_time = _setting(("REFLOW_DISPATCH_TIME",), ("dispatch.time",), "00:10:00",
                             "Walltime of the dispatch job.")
    dispatch_mem = _setting(("REFLOW_DISPATCH_MEM",), ("dispatch.mem",), "1G",
                            "Memory of the dispatch job.")

    @property
    def dispatch_partition(self) -> Optional[str]:
        """Partition/queue of the dispatch job; falls back to :attr:`executor_partition`."""
        keys = ("dispatch.partition", "dispatch.queue",
                "dispatch.submit_options.partition", "dispatch.submit_options.queue")
        return self._first(("REFLOW_DISPATCH_PARTITION",), keys) or self.executor_partition

    @property
    def dispatch_account(self) -> Optional[str]:
        """Account of the dispatch job; falls back to :attr:`executor_account`."""
        keys = ("dispatch.account", "dispatch.submit_options.account")
        return self._first(("REFLOW_DISPATCH_ACCOUNT",), keys) or self.executor_account

    @property
    def dispatch_submit_options(self) -> Dict[str, Any]:
        """Options of the dispatch job: ``[dispatch.submit_options]`` plus partition and account."""
        options = dict(self.get("dispatch.submit_options") or {})
        for key in ("queue", "partition", "account"):
            options.pop(key, None)
        for key, value in (("partition", self.dispatch_partition), ("account", self.dispatch_account)):
            if value is not None:
                options[key] = value
        return options

    # -- paths and the rest -----------------------------------------------------------------

    default_store_path = _setting(("REFLOW_STORE_PATH",), ("defaults.store_path",), None,
                                  "Path of the shared sqlite store (None: the default cache path).")
    default_run_dir = _setting((), ("defaults.run_dir",), None, "Default for ``--run-dir``.")
    server_url = _setting(("REFLOW_SERVER_URL",), ("server.url",), None, "Reserved.")
    sqlite_journal = _setting(("REFLOW_SQLITE_JOURNAL",), ("store.journal_mode",), None,
                              "sqlite journal mode forced on the store (None: by filesystem).")


def load_config(path: Optional[Union[str, Path]] = None) -> Config:
    """Read and validate the config file; a missing file gives the defaults.

    ``path`` defaults to ``$REFLOW_CONFIG``, else :func:`config_path`.
    Nothing is ever created or written.  Raises ConfigError for a file that
    cannot be read or parsed, or that holds unknown keys or bad values.
    """
    target = Path(path).expanduser() if path else _default_config_file()
    try:
        raw = target.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return Config(path=target)
    except OSError as exc:
        raise ConfigError(f"config {target}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {target}: not UTF-8 text (bad byte at offset {exc.start})") from exc
    return Config(_parse_toml(text, str(target)), path=target).validate()


_EXAMPLE_CONFIG = '''\
# reflow configuration (TOML).
#
# Every setting is commented out and shows its default, or an example when
# it has none.  REFLOW_* environment variables override this file, and
# options given to @wf.job(...) override both.

[executor]
# Scheduler: sbatch, qsub-pbs, bsub, qsub-sge, flux, local or dry-run.  REFLOW_MODE
# mode = "sbatch"
# Interpreter of the dispatch and worker jobs (default: the one that submits).  REFLOW_PYTHON
# python = "/usr/bin/python3"
# Most jobs of one run queued at once; 0 means no cap.  REFLOW_MAX_SUBMIT_JOBS
# max_submit_jobs = 0
# Seconds a finished job may go without a result before its task fails.  REFLOW_LOST_JOB_GRACE
# lost_job_grace = 60.0
# Most elements of one native array; larger waves are split (default: the scheduler's).  REFLOW_MAX_ARRAY_SIZE
# max_array_size = 1000
# Longest walltime packing (elements_per_job) may ask for; packs shrink to fit.  REFLOW_PACK_MAX_TIME
# pack_max_time = "24:00:00"
# Partition or queue of task jobs (synonyms).  REFLOW_PARTITION, REFLOW_QUEUE
# partition = "normal"
# queue = "normal"
# Account (project) charged.  REFLOW_ACCOUNT
# account = "myproject"
# Scheduler commands, when they are not on PATH.  REFLOW_SBATCH, REFLOW_QSTAT...
# sbatch = "sbatch"
# scancel = "scancel"
# sacct = "sacct"
# squeue = "squeue"
# qsub = "qsub"
# qdel = "qdel"
# qstat = "qstat"
# qacct = "qacct"
# bsub = "bsub"
# bkill = "bkill"
# bjobs = "bjobs"
# flux = "flux"

# Options added to every task job; on Slurm and Flux a key such as
# "exclusive" or "constraint" becomes --exclusive, --constraint VALUE.
# [executor.submit_options]
# signal = "B:INT@60"
# qos = "normal"

[dispatch]
# Resources of the short dispatch job that submits tasks as they become ready.
# REFLOW_DISPATCH_CPUS, _TIME, _MEM, _PARTITION, _ACCOUNT
# cpus = 1
# time = "00:10:00"
# mem = "1G"
# Partition/queue and account (default: the executor's).
# partition = "short"
# queue = "short"
# account = "myproject"
# [dispatch.submit_options]
# qos = "short"

[notifications]
# Mail about task jobs.  REFLOW_MAIL_USER, REFLOW_MAIL_TYPE
# mail_user = "me@example.org"
# mail_type = "END,FAIL"

[defaults]
# Shared store (default: ~/.cache/reflow/manifest.db).  REFLOW_STORE_PATH
# store_path = "/home/me/.cache/reflow/manifest.db"
# Default for --run-dir.
# run_dir = "/scratch/me/runs"

[store]
# sqlite journal mode: truncate (default: a rollback journal, safe on NFS), delete, or wal (local disks only).
# REFLOW_SQLITE_JOURNAL
# journal_mode = "TRUNCATE"

[local]
# Most CPUs the local executor uses at once (default: all of this machine's).
# max_cpus = 4

[server]
# Reserved.  REFLOW_SERVER_URL
# url = "https://reflow.example.org"
'''


def write_example_config(path: Optional[Union[str, Path]] = None, *, overwrite: bool = False) -> Path:
    """Write a commented example config (mode 0600, new directories 0700); return its path.

    ``path`` defaults to ``$REFLOW_CONFIG``, else :func:`config_path`.
    Raises FileExistsError when the file exists and ``overwrite`` is false.
    """
    target = Path(path).expanduser() if path else _default_config_file()
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(errno.EEXIST, "config file exists (pass overwrite=True to replace it)", str(target))
    _private_dir(target.parent)
    _atomic_write(target, _EXAMPLE_CONFIG, 0o600)
    return target


def ensure_config_exists(path: Optional[Union[str, Path]] = None) -> Path:
    """Write the example config only when no file exists at ``path``; return the path."""
    target = Path(path).expanduser() if path else _default_config_file()
    if not os.path.lexists(target):
        with contextlib.suppress(FileExistsError):  # another process won the race
            write_example_config(target)
    return target


# =============================================================================
# Model: parameters, results, type inspection and wiring
# =============================================================================


class Param:
    """Describe a run parameter for the generated CLI.

    Use it in ``Annotated[int, Param(help="...")]``.  ``namespace="local"``
    makes the flag task-specific (``--<task>-<name>``); ``extra`` goes to
    argparse's ``add_argument`` (``choices``, ``metavar``...).
    """

    def __init__(self, help: str = "", short: Optional[str] = None, namespace: str = "global", **extra: Any) -> None:
        if namespace not in ("global", "local"):
            raise ValueError(f"Param namespace must be 'global' or 'local', got {namespace!r}")
        if short is not None and not re.match(r"^-[A-Za-z0-9]$", short):
            raise ValueError(f"Param short flag must look like '-x', got {short!r}")
        self.help, self.short, self.namespace, self.extra = help, short, namespace, extra

    def __repr__(self) -> str:
        parts = [f"help={self.help!r}"] if self.help else []
        if self.short:
            parts.append(f"short={self.short!r}")
        if self.namespace != "global":
            parts.append(f"namespace={self.namespace!r}")
        parts += [f"{key}={value!r}" for key, value in self.extra.items()]
        return f"Param({', '.join(parts)})"


class Result:
    """Mark a parameter as the output of upstream task(s).

    ``Result(step="a")`` or ``Result(steps=["a", "b"])`` (outputs
    concatenated in step order); ``broadcast=True`` hands the whole upstream
    output to every element of an array task.
    """

    def __init__(self, step: Optional[str] = None, steps: Optional[Sequence[str]] = None,
                 broadcast: bool = False) -> None:
        if (step is None) == (steps is None):
            raise ValueError("Result() needs exactly one of step= or steps=")
        if steps is not None and (isinstance(steps, str) or not steps):
            raise ValueError(f"Result(steps=...) needs a non-empty list of task names, got {steps!r}")
        self._single = step is not None
        self.steps: List[str] = [step] if step is not None else [str(name) for name in steps or ()]
        self.broadcast = bool(broadcast)

    @property
    def step(self) -> str:
        """Return the first (or only) upstream task name."""
        return self.steps[0]

    def renamed(self, mapping: Mapping[str, str]) -> Result:
        """Return a copy whose step names go through ``mapping``."""
        steps = [mapping.get(step, step) for step in self.steps]
        if self._single:
            return Result(step=steps[0], broadcast=self.broadcast)
        return Result(steps=steps, broadcast=self.broadcast)

    def __repr__(self) -> str:
        body = f"step={self.steps[0]!r}" if self._single else f"steps={self.steps!r}"
        return f"Result({body}{', broadcast=True' if self.broadcast else ''})"


class RunDir:
    """Mark a parameter that receives the run directory as a ``Path``."""

    def __repr__(self) -> str:
        return "RunDir()"


class WireMode(str, enum.Enum):
    """How an upstream output reaches a downstream parameter."""

    DIRECT = "direct"
    FAN_OUT = "fan_out"
    GATHER = "gather"
    GATHER_FLATTEN = "gather_flatten"
    CHAIN = "chain"
    CHAIN_FLATTEN = "chain_flatten"
    BROADCAST = "broadcast"


#: Modes in which an array task takes one element per instance.
PER_ELEMENT_MODES = frozenset({WireMode.FAN_OUT, WireMode.CHAIN, WireMode.CHAIN_FLATTEN})
#: ``X | Y`` objects (3.10+) besides ``typing.Union``.
_NEW_UNION_TYPES = (types.UnionType,) if hasattr(types, "UnionType") else ()  # novermin


def _is_union(tp: Any) -> bool:
    """Tell whether ``tp`` is ``Union[...]``/``Optional[...]`` or ``X | Y``."""
    origin = typing.get_origin(tp)
    return origin is typing.Union or origin in _NEW_UNION_TYPES


def _strip_annotated(tp: Any) -> Tuple[Any, List[Any]]:
    """Return ``(T, metadata)`` for ``Annotated[T, ...]``, else ``(tp, [])``."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return base, meta
    return tp, []


def _strip_optional(tp: Any) -> Any:
    """Return ``T`` for ``Optional[T]``; other types unchanged."""
    if _is_union(tp):
        members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _list_item(tp: Any) -> Tuple[bool, Any]:
    """Return ``(True, item_type)`` when ``tp`` is a list type, else ``(False, None)``."""
    tp = _strip_optional(_strip_annotated(tp)[0])
    if tp in (list, typing.List, typing.Sequence, tuple, typing.Tuple):
        return True, typing.Any
    origin = typing.get_origin(tp)
    if origin in (list, tuple, typing.get_origin(typing.Sequence)):
        args = typing.get_args(tp)
        return True, args[0] if args else typing.Any
    return False, None


def _is_class(tp: Any) -> bool:
    """Tell whether ``tp`` is a plain class (on 3.9 ``list[int]`` passes ``isinstance(tp, type)``)."""
    return isinstance(tp, type) and typing.get_origin(tp) is None


def _is_path_type(tp: Any) -> bool:
    """Tell whether ``tp`` is ``Path`` or another ``os.PathLike`` class."""
    return _is_class(tp) and issubclass(tp, os.PathLike)


def _type_name(tp: Any) -> str:
    """Name a type the way a user wrote it (``int``, ``list[str]``)."""
    return tp.__name__ if _is_class(tp) else str(tp).replace("typing.", "")


def _compatible(have: Any, want: Any) -> bool:
    """Tell whether a value of type ``have`` may be passed where ``want`` is declared."""
    have = _strip_optional(_strip_annotated(have)[0])
    want = _strip_optional(_strip_annotated(want)[0])
    unknown = (typing.Any, inspect.Parameter.empty)
    if have in unknown or want in unknown or have == want:
        return True
    if _is_union(want):
        return any(_compatible(have, member) for member in typing.get_args(want))
    if _is_union(have):
        return all(_compatible(member, want) for member in typing.get_args(have))
    have_list, have_item = _list_item(have)
    want_list, want_item = _list_item(want)
    if have_list or want_list:
        return have_list and want_list and _compatible(have_item, want_item)
    have_cls, want_cls = typing.get_origin(have) or have, typing.get_origin(want) or want
    if _is_class(have_cls) and _is_class(want_cls):
        return issubclass(have_cls, want_cls) or (have_cls is int and want_cls is float)
    return True


def infer_wire_mode(up_ret: Any, up_is_array: bool, down_type: Any, down_is_array: bool,
                    broadcast: bool = False) -> WireMode:
    """Infer how an upstream output feeds a downstream parameter (spec table).

    Raises TypeError when the two types cannot be wired.  Missing annotations
    (``inspect.Parameter.empty`` or None) give the natural default mode.
    """
    unknown = up_ret in (None, inspect.Parameter.empty) or down_type in (None, inspect.Parameter.empty)
    if unknown:
        return _default_mode(up_is_array, down_is_array, broadcast)
    up_list, up_item = _list_item(up_ret)
    down_list, down_item = _list_item(down_type)
    if not up_is_array and not down_is_array:
        return _checked(WireMode.DIRECT, _compatible(up_ret, down_type), up_ret, down_type)
    if not up_is_array:
        if broadcast or (up_list and down_list):
            return _checked(WireMode.BROADCAST, broadcast or _compatible(up_ret, down_type), up_ret, down_type)
        if not up_list:
            raise TypeError(f"an array task needs a list from its single upstream, got {_type_name(up_ret)}")
        return _checked(WireMode.FAN_OUT, _compatible(up_item, down_type), up_item, down_type)
    if not down_is_array:
        if not down_list:
            raise TypeError(f"gathering an array needs a list parameter, got {_type_name(down_type)}")
        if up_list and _compatible(up_item, down_item) and not _list_item(down_item)[0]:
            return WireMode.GATHER_FLATTEN
        return _checked(WireMode.GATHER, _compatible(up_ret, down_item), up_ret, down_item)
    if broadcast:
        return WireMode.BROADCAST
    if up_list and not down_list:
        return _checked(WireMode.CHAIN_FLATTEN, _compatible(up_item, down_type), up_item, down_type)
    return _checked(WireMode.CHAIN, _compatible(up_ret, down_type), up_ret, down_type)


def _default_mode(up_is_array: bool, down_is_array: bool, broadcast: bool) -> WireMode:
    """Return the mode used when a type annotation is missing."""
    if broadcast and down_is_array:
        return WireMode.BROADCAST
    return {(False, False): WireMode.DIRECT, (False, True): WireMode.FAN_OUT,
            (True, False): WireMode.GATHER, (True, True): WireMode.CHAIN}[(up_is_array, down_is_array)]


def _checked(mode: WireMode, ok: bool, have: Any, want: Any) -> WireMode:
    """Return ``mode`` or raise TypeError naming both types."""
    if not ok:
        raise TypeError(f"{_type_name(have)} does not fit {_type_name(want)} ({mode.value})")
    return mode


def _resolve_hints(func: Callable) -> Dict[str, Any]:
    """Return a function's evaluated annotations, Annotated extras kept.

    On Python 3.9, a string annotation ``"A | None"`` cannot be evaluated by
    ``typing``; it is read as ``Union[A, None]`` part by part instead.
    """
    try:
        return typing.get_type_hints(func, include_extras=True)
    except TypeError:
        pass
    hints = {}
    for name, raw in getattr(func, "__annotations__", {}).items():
        hints[name] = _resolve_union_string(func, raw) if isinstance(raw, str) else raw
    return hints


def _resolve_union_string(func: Callable, text: str) -> Any:
    """Evaluate ``"A | B"`` as ``Union[A, B]`` through ``typing.get_type_hints``."""
    pieces = [piece.strip() for piece in text.split("|")] if "[" not in text else [text]
    holder = types.SimpleNamespace(__annotations__={f"p{i}": piece for i, piece in enumerate(pieces)})
    try:
        resolved = typing.get_type_hints(holder, getattr(func, "__globals__", {}), include_extras=True)
    except Exception as exc:
        raise TypeError(f"cannot evaluate annotation {text!r} of {func.__qualname__}: {exc}") from None
    members = tuple(resolved[f"p{i}"] for i in range(len(pieces)))
    return members[0] if len(members) == 1 else typing.Union[members]


# =============================================================================
# Model: tasks, flows and graph validation
# =============================================================================


@_dataclass
class JobConfig(metaclass=_DataclassOnFirstUse):
    """Scheduler resources and cache settings of one task (from ``@job``)."""

    cpus: int = DEFAULT_CPUS
    time: str = DEFAULT_TIME
    mem: str = DEFAULT_MEM
    array: bool = False
    after: List[str] = _field(default_factory=list)
    array_parallelism: Optional[int] = None
    submit_options: Dict[str, Any] = _field(default_factory=dict)
    version: str = "1"
    cache: bool = True
    backend: Optional[str] = None
    retries: int = 0
    elements_per_job: Union[int, str] = 1
    inline: Union[bool, str] = False

    extra = property(lambda self: self.submit_options, doc="Scheduler options (alias of submit_options).")
    partition = property(lambda self: self.submit_options.get("partition") or self.submit_options.get("queue"))
    account = property(lambda self: self.submit_options.get("account") or self.submit_options.get("project"))
    mail_user = property(lambda self: self.submit_options.get("mail_user"))
    mail_type = property(lambda self: self.submit_options.get("mail_type"))
    signal = property(lambda self: self.submit_options.get("signal"))


class CliParam:
    """One generated command-line flag, as read from a task signature.

    A plain class rather than one of reflow's dataclasses: every run builds
    these to check its parameters, and making the dataclass would cost a
    run more than the check itself.
    """

    __slots__ = ("choices", "default", "extra", "flag", "help", "name", "namespace", "required", "short", "task",
                 "type")
    _FIELDS = ("name", "task", "flag", "type", "required", "default", "namespace", "help", "choices", "short",
               "extra")

    def __init__(self, name: str, task: str, flag: str, type: Any, required: bool, default: Any, namespace: str,
                 help: str, choices: Optional[List[Any]], short: Optional[str] = None,
                 extra: Optional[Dict[str, Any]] = None) -> None:
        self.name, self.task, self.flag, self.type, self.required = name, task, flag, type, required
        self.default, self.namespace, self.help, self.choices, self.short = default, namespace, help, choices, short
        self.extra: Dict[str, Any] = {} if extra is None else extra

    def __repr__(self) -> str:
        return f"CliParam({', '.join(f'{name}={getattr(self, name)!r}' for name in self._FIELDS)})"

    @property
    def dest(self) -> str:
        """Return the argparse destination of the flag."""
        return self.flag.lstrip("-").replace("-", "_")


@_dataclass
class TaskSpec(metaclass=_DataclassOnFirstUse):
    """Everything reflow knows about one task (see ``Flow.job``)."""

    name: str
    func: Callable
    config: JobConfig
    signature: inspect.Signature
    result_deps: Dict[str, Result]
    return_type: Any
    verify: Optional[Callable[[Any], bool]] = None
    hints: Dict[str, Any] = _field(default_factory=dict, repr=False)

    @property
    def is_array(self) -> bool:
        """Tell whether the task runs one instance per element."""
        return self.config.array

    @property
    def dependencies(self) -> List[str]:
        """Return the sorted union of ``after`` and the Result steps."""
        steps = {step for result in self.result_deps.values() for step in result.steps}
        return sorted(steps | set(self.config.after))

    @property
    def call_plan(self) -> Tuple[Tuple[str, bool], ...]:
        """Return ``(parameter name, receives the run dir)`` pairs, computed once."""
        plan = self.__dict__.get("_call_plan")
        if plan is None:
            plan = tuple((name, self._receives_run_dir(name, default)) for name, default in self._parameters())
            self.__dict__["_call_plan"] = plan
        return plan

    def _parameters(self) -> List[Tuple[str, Any]]:
        """Return ``(name, default)`` of each parameter, read off the function while the signature is unread."""
        plain = None if "signature" in vars(self) else _plain_parameters(self.func)
        return plain if plain is not None else _named_defaults(self.signature)

    def param_type(self, name: str) -> Any:
        """Return the declared type of a parameter, Annotated stripped."""
        return _strip_annotated(self.hints.get(name, inspect.Parameter.empty))[0]

    def is_rundir_param(self, param: inspect.Parameter) -> bool:
        """Tell whether a parameter receives the run directory."""
        return self._receives_run_dir(param.name, param.default)

    def _receives_run_dir(self, name: str, default: Any) -> bool:
        """Tell whether the parameter ``name`` (with ``default``) receives the run directory."""
        base, meta = _strip_annotated(self.hints.get(name))
        return (name == "run_dir" or base is RunDir or isinstance(default, RunDir)
                or any(m is RunDir or isinstance(m, RunDir) for m in meta))

    def renamed(self, name: str, mapping: Mapping[str, str]) -> TaskSpec:
        """Return a copy named ``name`` with references renamed through ``mapping``."""
        config = dataclasses.replace(self.config, after=[mapping.get(a, a) for a in self.config.after],
                                     submit_options=dict(self.config.submit_options))
        deps = {param: result.renamed(mapping) for param, result in self.result_deps.items()}
        return dataclasses.replace(self, name=name, config=config, result_deps=deps)


class _SignatureOnFirstUse:
    """``TaskSpec.signature`` of a spec made without one (see Flow._make_spec): its function's, when first read.

    A spec given its signature keeps it in its ``__dict__``, which this
    non-data descriptor leaves alone.  Read on the class it raises
    AttributeError, so that dataclasses sees no default for the field.
    """

    def __get__(self, spec: Any, owner: Any = None) -> Any:
        if spec is None:
            raise AttributeError("signature")
        signature = spec.__dict__["signature"] = inspect.signature(spec.func)
        return signature


# set after the class body, where dataclasses (and mypy) would take it for the field's default
TaskSpec.signature = _SignatureOnFirstUse()  # type: ignore[assignment]

#: ``co_flags`` bits of a function with ``*args`` / ``**kwargs`` (inspect.CO_VARARGS, inspect.CO_VARKEYWORDS).
_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08
#: The default of a parameter without one, in :func:`_plain_parameters` (inspect.Parameter.empty elsewhere).
_NO_DEFAULT = object()


def _plain_parameters(func: Callable) -> Optional[List[Tuple[str, Any]]]:
    """Return ``(name, default)`` of each parameter of a plain function, in ``inspect.signature``'s order.

    Read off its code object: importing inspect would cost a worker a fifth
    of its start-up.  None for anything else, also a function with
    attributes (``__wrapped__``, ``__signature__``: inspect follows them).
    """
    if type(func) is not types.FunctionType or vars(func):
        return None
    code, defaults, keyword_defaults = func.__code__, func.__defaults__ or (), func.__kwdefaults__ or {}
    count, keyword_count = code.co_argcount, code.co_kwonlyargcount
    names = code.co_varnames
    first_default = count - len(defaults)
    positional = [(name, defaults[i - first_default] if i >= first_default else _NO_DEFAULT)
                  for i, name in enumerate(names[:count])]
    keyword = [(name, keyword_defaults.get(name, _NO_DEFAULT)) for name in names[count:count + keyword_count]]
    rest = iter(names[count + keyword_count:])  # then the names of *args and **kwargs, when there are
    star = [(next(rest), _NO_DEFAULT)] if code.co_flags & _CO_VARARGS else []
    double_star = [(next(rest), _NO_DEFAULT)] if code.co_flags & _CO_VARKEYWORDS else []
    return positional + star + keyword + double_star


def _named_defaults(signature: inspect.Signature) -> List[Tuple[str, Any]]:
    """Return ``(name, default)`` of each parameter of ``signature``."""
    return [(param.name, param.default) for param in signature.parameters.values()]


def _find_result(default: Any, hint: Any) -> Optional[Result]:
    """Return the Result marker of a parameter (its default or Annotated), if any."""
    if isinstance(default, Result):
        return default
    return next((m for m in _strip_annotated(hint)[1] if isinstance(m, Result)), None)


def _check_packing(name: str, array: bool, elements_per_job: Any, inline: Any) -> None:
    """Validate ``elements_per_job`` and ``inline``; raise ValueError naming the task and value."""
    if elements_per_job != "auto" and (not isinstance(elements_per_job, int) or isinstance(elements_per_job, bool)
                                       or elements_per_job < 1):
        raise ValueError(f"task {name!r}: elements_per_job must be an integer >= 1 or 'auto', "
                         f"got {elements_per_job!r}")
    if elements_per_job != 1 and not array:
        raise ValueError(f"task {name!r}: elements_per_job needs array=True")
    if inline not in (True, False, "auto"):
        raise ValueError(f"task {name!r}: inline must be True, False or 'auto', got {inline!r}")


def _check_job_options(name: str, cpus: Any, time_: Any, mem: Any, retries: Any, parallelism: Any) -> None:
    """Validate decorator resources; raise ValueError naming the task and value."""
    for label, value, minimum in (("cpus", cpus, 1), ("retries", retries, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"task {name!r}: {label} must be an integer >= {minimum}, got {value!r}")
    if parallelism is not None and (not isinstance(parallelism, int) or parallelism < 1):
        raise ValueError(f"task {name!r}: array_parallelism must be a positive integer, got {parallelism!r}")
    for parse, value in ((parse_time, time_), (parse_mem, mem)):
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"task {name!r}: {exc}") from None


class Flow:
    """A reusable collection of tasks, without execution machinery.

    Register tasks with :meth:`job` / :meth:`array_job`; compose flows into a
    :class:`Workflow` with ``wf.include(flow, prefix=...)``.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"invalid workflow/flow name {name!r}: use letters, digits, '_', '-', '.'")
        self.name = name
        self.tasks: Dict[str, TaskSpec] = {}
        self._registration_order: List[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, tasks={self._registration_order})"

    def job(self, name: Optional[str] = None, *, array: bool = False, array_parallelism: Optional[int] = None,
            cpus: int = DEFAULT_CPUS, time: str = DEFAULT_TIME, mem: str = DEFAULT_MEM,
            after: Optional[Union[str, Sequence[str]]] = None, submit_options: Optional[Dict[str, Any]] = None,
            extra: Optional[Dict[str, Any]] = None, version: str = "1", cache: bool = True,
            verify: Optional[Callable[[Any], bool]] = None, backend: Optional[str] = None, retries: int = 0,
            elements_per_job: Union[int, str] = 1, inline: Union[bool, str] = False,
            **scheduler_options: Any) -> Callable[[Callable], Callable]:
        """Register the decorated function as a task and return it unchanged.

        ``array=True`` runs one instance per element of its fan-out input.
        ``cpus``/``time``/``mem`` are the job's resources; ``after`` adds
        ordering-only dependencies; ``submit_options``, ``extra`` and any other
        keyword (``partition=``, ``account=``...) become scheduler options;
        ``version`` invalidates the cache; ``verify(output) -> bool`` checks a
        cache hit; ``retries`` resubmits failed instances up to N times.

        ``elements_per_job=K`` (arrays) packs K elements into each scheduler
        array element: one worker process runs them, ``cpus`` at a time in a
        forked process pool when ``cpus > 1``, else one after another.  Each
        element keeps its own result, state, retry and log slice.  ``time``
        and ``mem`` stay per element: the job asks for ``time x ceil(K /
        slots)`` (slots = min(cpus, K)), at most ``executor.pack_max_time``
        (K shrinks to fit, never the walltime), and ``mem x slots``.
        ``"auto"`` packs only elements measured shorter than 60 s in earlier
        runs of the workflow (aiming at 5-minute jobs), or, without history,
        a width above ``max_submit_jobs`` (see :func:`choose_elements_per_job`).

        ``inline=True`` runs the task's ready instances inside the dispatch
        job (already a batch job) instead of submitting jobs, for tiny work,
        within the dispatch job's resources (``dispatch.cpus/mem/time``, not
        the task's); ``"auto"`` does so when earlier runs measured the batch
        at 30 s or less and the task needs no more cpus than the dispatch job.
        """
        options = dict(submit_options or {})
        options.update(extra or {})
        options.update(scheduler_options)
        after_list = [after] if isinstance(after, str) else list(after or [])

        def register(func: Callable) -> Callable:
            task_name = name or func.__name__
            _check_job_options(task_name, cpus, time, mem, retries, array_parallelism)
            _check_packing(task_name, bool(array), elements_per_job, inline)
            config = _made_without_init(
                JobConfig, cpus=cpus, time=str(time), mem=str(mem), array=bool(array), after=after_list,
                array_parallelism=array_parallelism, submit_options=options, version=str(version), cache=bool(cache),
                backend=backend, retries=retries, elements_per_job=elements_per_job, inline=inline)
            self._add(self._make_spec(task_name, func, config, verify))
            return func

        return register

    def array_job(self, name: Optional[str] = None, **options: Any) -> Callable[[Callable], Callable]:
        """Register an array task: the same as ``job(array=True, ...)``."""
        options["array"] = True
        return self.job(name, **options)

    @staticmethod
    def _make_spec(name: str, func: Callable, config: JobConfig, verify: Optional[Callable]) -> TaskSpec:
        """Build a TaskSpec from a function and its decorator options.

        In a worker, a plain function with a return annotation leaves its
        signature to first use (see _SignatureOnFirstUse), so that the
        worker imports neither inspect nor dataclasses.
        """
        if not callable(func):
            raise TypeError(f"task {name!r}: @job must decorate a function, got {type(func).__name__}")
        plain = _plain_parameters(func) if _LAZY_SPECS else None
        signature = None if plain is not None else inspect.signature(func)
        hints = _resolve_hints(func)
        if signature is None and "return" not in hints:  # its return type is inspect's "empty"
            signature = inspect.signature(func)
        parameters = (plain or []) if signature is None else _named_defaults(signature)
        found = {param: _find_result(default, hints.get(param)) for param, default in parameters}
        deps = {param: result for param, result in found.items() if result is not None}
        if config.array and not deps:
            raise ValueError(f"array task {name!r} needs at least one Result(...) parameter to fan out over")
        return_type = hints["return"] if signature is None else hints.get("return", signature.return_annotation)
        known = {} if signature is None else {"signature": signature}
        return _made_without_init(TaskSpec, name=name, func=func, config=config, **known, result_deps=deps,
                                  return_type=return_type, verify=verify, hints=hints)

    def _add(self, spec: TaskSpec) -> None:
        """Register a spec; an unsafe or duplicate name is a ValueError.

        Task names become file and job names, so they are words: letters
        (any script), digits, ``_``, ``-`` and ``.``, not starting with
        ``-`` or ``.``.
        """
        if not re.fullmatch(r"\w[\w.-]*", spec.name):
            raise ValueError(f"invalid task name {spec.name!r}: use letters, digits, '_', '-', '.' "
                             "(it names files and batch jobs)")
        if spec.name in self.tasks:
            raise ValueError(f"duplicate task name {spec.name!r} in {self.name!r}")
        self.tasks[spec.name] = spec
        self._registration_order.append(spec.name)

    def include(self, flow: Flow, prefix: Optional[str] = None) -> None:
        """Copy the tasks of ``flow`` into this one.

        With a prefix, task ``t`` becomes ``<prefix>_t`` and every reference
        inside the flow is renamed; a name clash raises ValueError.
        """
        if not isinstance(flow, Flow):
            raise TypeError(f"include() needs a Flow, got {type(flow).__name__}")
        mapping = {name: f"{prefix}_{name}" if prefix else name for name in flow._registration_order}
        clashes = sorted(new for new in mapping.values() if new in self.tasks)
        if clashes:
            raise ValueError(f"including {flow.name!r} would duplicate task(s) {', '.join(map(repr, clashes))}"
                             + ("" if prefix else "; pass prefix=..."))
        for old in flow._registration_order:
            self._add(flow.tasks[old].renamed(mapping[old], mapping))

    # ----------------------------------------------------------- validation

    def validate(self) -> None:
        """Check the graph: unknown steps, wiring types, cycles, CLI flags.

        Raises ValueError (GraphError) for unknown references, duplicate
        flags and cycles, TypeError (WiringError) for type mismatches.
        """
        self._check_references()
        self.wire_modes()
        self.topological_order()
        self.cli_params()

    def _check_references(self) -> None:
        """Raise GraphError for a Result step or ``after`` naming no task."""
        for spec in self.tasks.values():
            for dep in spec.dependencies:
                if dep not in self.tasks:
                    raise GraphError(f"task {spec.name!r} depends on unknown task {dep!r}."
                                     + _suggest(dep, self.tasks))
                if dep == spec.name:
                    raise GraphError(f"Task graph contains a cycle: {dep!r} depends on itself.")

    def wire_modes(self) -> Dict[Tuple[str, str], WireMode]:
        """Return ``{(task, param): mode}`` for every Result parameter."""
        modes = {}
        for spec in self.tasks.values():
            for param, result in spec.result_deps.items():
                modes[(spec.name, param)] = self._wire_one(spec, param, result)
        return modes

    def _wire_one(self, spec: TaskSpec, param: str, result: Result) -> WireMode:
        """Infer the mode of one parameter from its first step; check the others."""
        mode = None
        for step in result.steps:
            up = self.tasks[step]
            try:
                step_mode = infer_wire_mode(up.return_type, up.is_array, spec.param_type(param),
                                            spec.is_array, result.broadcast)
            except TypeError as exc:
                raise WiringError(f"Type mismatch wiring {step!r} -> {spec.name!r}.{param}: {exc}") from None
            mode = mode or step_mode
        return mode  # type: ignore[return-value]

    def topological_order(self) -> List[str]:
        """Return task names in dependency order (Kahn, ties by registration).

        Raises GraphError naming a cycle.
        """
        rank = {name: i for i, name in enumerate(self._registration_order)}
        waiting = {name: set(self.tasks[name].dependencies) for name in self._registration_order}
        order: List[str] = []
        ready = sorted((n for n, deps in waiting.items() if not deps), key=rank.__getitem__)
        while ready:
            name = ready.pop(0)
            order.append(name)
            for other, deps in waiting.items():
                if name in deps:
                    deps.discard(name)
                    if not deps and other not in order and other not in ready:
                        ready.append(other)
            ready.sort(key=rank.__getitem__)
        if len(order) != len(waiting):
            raise GraphError(f"Task graph contains a cycle: {' -> '.join(self._find_cycle(set(order)))}.")
        return order

    def _find_cycle(self, done: set) -> List[str]:
        """Return one cycle among the tasks not in ``done``, for the error message."""
        node = next(name for name in self._registration_order if name not in done)
        path: List[str] = []
        while node not in path:
            path.append(node)
            node = next(dep for dep in self.tasks[node].dependencies if dep not in done)
        return [*path[path.index(node):], node]

    def downstream_of(self, names: Iterable[str]) -> set:
        """Return ``names`` plus every task that depends on them, transitively."""
        found = set(names)
        changed = True
        while changed:
            changed = False
            for spec in self.tasks.values():
                if spec.name not in found and found.intersection(spec.dependencies):
                    found.add(spec.name)
                    changed = True
        return found

    # ------------------------------------------------------ CLI parameters

    def cli_params(self) -> List[CliParam]:
        """Return the generated flags in task order; reject clashing flags.

        A global name shared by several tasks is one flag (first definition
        wins, required if any use is required).
        """
        params: Dict[str, CliParam] = {}
        for task in self._registration_order:
            spec = self.tasks[task]
            for param in spec.signature.parameters.values():
                if param.name in spec.result_deps or param.name == "run_id" or spec.is_rundir_param(param):
                    continue
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                cli = _make_cli_param(spec, param)
                known = params.get(cli.flag)
                if known is None:
                    params[cli.flag] = cli
                elif known.namespace == "local" or cli.namespace == "local":
                    raise GraphError(f"flag {cli.flag} of task {task!r} clashes with {known.flag} of task "
                                     f"{known.task!r}")
                else:
                    known.required = known.required or cli.required
        _check_flag_clashes(list(params.values()))
        return list(params.values())


def _make_cli_param(spec: TaskSpec, param: inspect.Parameter) -> CliParam:
    """Build the CliParam of one function parameter."""
    hint = spec.hints.get(param.name, inspect.Parameter.empty)
    base, meta = _strip_annotated(hint)
    marker = next((m for m in meta if isinstance(m, Param)), Param())
    base = _strip_optional(base)
    dashed = param.name.replace("_", "-")
    flag = f"--{spec.name.replace('_', '-')}-{dashed}" if marker.namespace == "local" else f"--{dashed}"
    choices = list(typing.get_args(base)) if typing.get_origin(base) is typing.Literal else None
    choices = marker.extra.get("choices", choices)
    required = param.default is inspect.Parameter.empty
    default = None if required else param.default
    return CliParam(param.name, spec.name, flag, base, required, default, marker.namespace, marker.help,
                    list(choices) if choices is not None else None, marker.short,
                    {k: v for k, v in marker.extra.items() if k != "choices"})


#: Flags and destinations the CLI uses itself; generated flags must avoid them.
RESERVED_FLAGS = frozenset({
    "--run-dir", "--store-path", "--force", "--force-tasks", "--executor", "--verify", "--help", "--version",
    "--json", "--task", "--max-workers", "--on-error", "--run-id", "--index", "--debug", "--wait",
    "--positions", "--base", "--attempt",
})


def _check_flag_clashes(params: List[CliParam]) -> None:
    """Raise GraphError for a generated flag, short flag or dest already in use."""
    reserved_dests = {flag.lstrip("-").replace("-", "_") for flag in RESERVED_FLAGS}
    seen_dest: Dict[str, CliParam] = {}
    seen_short: Dict[str, CliParam] = {}
    for cli in params:
        if cli.flag in RESERVED_FLAGS or cli.dest in reserved_dests:
            raise GraphError(f"parameter {cli.name!r} of task {cli.task!r} maps to {cli.flag}, which reflow "
                             f"uses itself; rename the parameter")
        other = seen_dest.get(cli.dest)
        if other is not None:
            raise GraphError(f"parameters {other.task}.{other.name} ({other.flag}) and {cli.task}.{cli.name} "
                             f"({cli.flag}) map to the same option {cli.dest!r}")
        seen_dest[cli.dest] = cli
        if cli.short:
            if cli.short in ("-h", "-n", "-y", "-o"):
                raise GraphError(f"short flag {cli.short} of {cli.task}.{cli.name} is reserved by reflow")
            if cli.short in seen_short:
                first = seen_short[cli.short]
                raise GraphError(f"short flag {cli.short} is used by both {first.task}.{first.name} and "
                                 f"{cli.task}.{cli.name}")
            seen_short[cli.short] = cli


# =============================================================================
# Codec: typed JSON manifest
# =============================================================================

#: Types JSON holds as they are; the codec passes them through untouched.
_JSON_PLAIN_TYPES = frozenset({str, int, bool, type(None)})
_CODEC_SUPPORTED = ("str, int, float, bool, None, list, dict (str keys), tuple, set, frozenset, "
                    "bytes, bytearray, Path, datetime, date, time, timedelta, UUID, Decimal, Enum, "
                    "dataclass")
_FLOAT_SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _qualified_name(cls: type) -> str:
    """Return ``module.Qualname`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_qualified(name: str) -> Any:
    """Return the object named ``module.Qualname``, or None when it cannot be found.

    Tries the longest module prefix first, so ``pkg.mod.Outer.Inner``
    resolves whether ``pkg.mod`` or ``pkg`` is the module.
    """
    parts = str(name).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # any import failure means "fall back to the raw value"
                continue
        target: Any = module
        try:
            for attr in parts[cut:]:
                target = getattr(target, attr)
        except AttributeError:
            continue
        return target
    return None


@_dataclass(frozen=True)
class ManifestCodec(metaclass=_DataclassOnFirstUse):
    """Encode Python values as JSON and back, tagging the types JSON lacks.

    Strings, ints, bools, None, finite floats, lists and dicts with str keys
    pass through.  Every other supported type becomes a tagged dict::

        {"__reflow_manifest__": true, "type": "path", "value": "/data/x.csv"}
        {"__reflow_manifest__": true, "type": "tuple", "value": [1, 2]}
        {"__reflow_manifest__": true, "type": "enum", "class": "mod.Color", "value": 1}
        {"__reflow_manifest__": true, "type": "dataclass", "class": "mod.Pt", "fields": {"x": 1}}

    Tags: path, datetime, date, time, timedelta (seconds), uuid, tuple, set,
    frozenset (sorted), bytes and bytearray (base64), decimal, float (nan,
    inf, -inf: strict JSON has none), enum, dataclass and dict (a dict that
    holds the marker key itself, as ``[key, value]`` pairs).  Loading an enum
    or dataclass imports its class by name and falls back to the raw value
    (for a dataclass, the dict of fields).  Nothing is ever pickled or
    evaluated.  Unsupported types, non-str keys and unknown tags raise
    ManifestError (a TypeError).
    """

    marker_key: str = "__reflow_manifest__"
    schema_version: int = 1

    # -- public API ---------------------------------------------------------------

    def dump_value(self, value: Any) -> Any:
        """Return ``value`` as plain JSON data, with tags for non-JSON types."""
        kind = type(value)
        if kind in _JSON_PLAIN_TYPES:
            return value
        if kind is dict:
            return self._dump_dict(value)
        if kind is list:
            return self._dump_list(value)
        dumper = _CODEC_DUMPERS.get(kind) or _find_dumper(kind)
        if dumper is None:
            raise ManifestError(f"cannot encode value of type {kind.__name__!r} to JSON "
                                f"(supported: {_CODEC_SUPPORTED})")
        return dumper(self, value)

    def load_value(self, value: Any) -> Any:
        """Turn JSON data produced by :meth:`dump_value` back into Python values."""
        kind = type(value)
        if kind is list:
            load = self.load_value
            return [item if type(item) in _JSON_PLAIN_TYPES else load(item) for item in value]
        if kind is not dict:
            return value
        load = self.load_value
        decoded = {key: item if type(item) in _JSON_PLAIN_TYPES else load(item)
                   for key, item in value.items()}
        return self._hook(decoded)

    def dumps(self, value: Any, *, pretty: bool = False) -> str:
        """Encode ``value`` to a JSON string: sorted keys, compact, or ``indent=2`` if pretty."""
        data = self.dump_value(value)
        if pretty:
            return json.dumps(data, sort_keys=True, indent=2, allow_nan=False)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def loads(self, text: Union[str, bytes]) -> Any:
        """Decode a JSON string or UTF-8 bytes written by :meth:`dumps`.

        Malformed JSON raises ``json.JSONDecodeError`` (a ValueError).
        """
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        # No marker in the text means no tags: let the C parser do all the work.
        if self.marker_key.isascii() and self.marker_key not in text:
            return json.loads(text)
        return json.loads(text, object_hook=self._hook)

    def canonical_dumps(self, value: Any) -> str:
        """Encode ``value`` deterministically (sorted keys, compact, UTF-8) for hashing."""
        return _canonical_json(self.dump_value(value))

    # -- encoding ---------------------------------------------------------------------

    def _tag(self, kind: str, value: Any) -> Dict[str, Any]:
        return {self.marker_key: True, "type": kind, "value": value}

    def _dump_list(self, items: Iterable[Any]) -> List[Any]:
        dump = self.dump_value
        return [item if type(item) in _JSON_PLAIN_TYPES else dump(item) for item in items]

    def _dump_dict(self, mapping: Mapping[Any, Any]) -> Dict[str, Any]:
        if self.marker_key in mapping:
            return self._escape_dict(mapping)
        dump = self.dump_value
        out = {}
        for key, item in mapping.items():
            if type(key) is not str:
                key = _dump_key(key)
            out[key] = item if type(item) in _JSON_PLAIN_TYPES else dump(item)
        return out

    def _escape_dict(self, mapping: Mapping[Any, Any]) -> Dict[str, Any]:
        """Tag a dict holding the marker key as sorted ``[key, value]`` pairs."""
        return self._tag("dict", sorted([_dump_key(key), self.dump_value(item)] for key, item in mapping.items()))

    def _dump_float(self, value: float) -> Any:
        if value - value == 0.0:  # false only for nan and +-inf
            return value
        return self._tag("float", "nan" if value != value else ("inf" if value > 0 else "-inf"))

    def _dump_unordered(self, value: Iterable[Any]) -> Dict[str, Any]:
        items = sorted(self._dump_list(value), key=_canonical_json)
        return self._tag("frozenset" if isinstance(value, frozenset) else "set", items)

    def _dump_enum(self, value: enum.Enum) -> Dict[str, Any]:
        tag = self._tag("enum", self.dump_value(value.value))
        tag["class"] = _qualified_name(type(value))
        return tag

    def _dump_dataclass(self, value: Any) -> Dict[str, Any]:
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return {self.marker_key: True, "type": "dataclass", "class": _qualified_name(type(value)),
                "fields": self._dump_dict(fields)}

    # -- decoding ---------------------------------------------------------------------

    def _hook(self, data: Dict[str, Any]) -> Any:
        """Decode one dict whose values are already decoded (``json.loads`` object_hook)."""
        if data.get(self.marker_key) is not True:
            return data
        kind = data.get("type")
        loader = _CODEC_LOADERS.get(kind)  # type: ignore[arg-type]
        if loader is None:
            raise ManifestError(f"unknown manifest tag type {kind!r} (known: {', '.join(sorted(_CODEC_LOADERS))})")
        try:
            return loader(self, data)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise ManifestError(f"cannot decode {kind!r} value {data.get('value')!r}: {exc}") from exc

    def _load_enum(self, tag: Dict[str, Any]) -> Any:
        cls = _import_qualified(tag.get("class", ""))
        if isinstance(cls, type) and issubclass(cls, enum.Enum):
            with contextlib.suppress(ValueError, TypeError):
                return cls(tag["value"])
        log.debug("manifest: enum %s not importable; keeping the raw value", tag.get("class"))
        return tag["value"]

    def _load_dataclass(self, tag: Dict[str, Any]) -> Any:
        fields = tag["fields"]
        cls = _import_qualified(tag.get("class", ""))
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            log.debug("manifest: dataclass %s not importable; keeping the fields", tag.get("class"))
            return fields
        known = {field.name: field for field in dataclasses.fields(cls)}
        try:
            obj = cls(**{name: value for name, value in fields.items() if name in known and known[name].init})
        except (TypeError, ValueError):  # the class changed since the value was stored
            return fields
        for name, value in fields.items():
            if name in known and not known[name].init:
                object.__setattr__(obj, name, value)
        return obj


def _dump_key(key: Any) -> str:
    """Return a dict key as str; a str subclass (a str Enum) keeps its text."""
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str.__str__(key)
    raise ManifestError(f"cannot encode dict key {key!r} of type {type(key).__name__!r} to JSON: keys must be str")


def _dump_bytes(codec: ManifestCodec, value: Union[bytes, bytearray]) -> Dict[str, Any]:
    kind = "bytearray" if isinstance(value, bytearray) else "bytes"
    return codec._tag(kind, base64.b64encode(bytes(value)).decode("ascii"))


def _dump_decimal(codec: ManifestCodec, value: Any) -> Dict[str, Any]:
    return codec._tag("decimal", str(value))


#: Exact type -> encoder; _find_dumper adds subclasses the first time it meets them.
_CODEC_DUMPERS: Dict[type, Callable[[ManifestCodec, Any], Any]] = {
    float: ManifestCodec._dump_float,
    list: ManifestCodec._dump_list,
    dict: ManifestCodec._dump_dict,
    tuple: lambda codec, value: codec._tag("tuple", codec._dump_list(value)),
    set: ManifestCodec._dump_unordered,
    frozenset: ManifestCodec._dump_unordered,
    bytes: _dump_bytes,
    bytearray: _dump_bytes,
    _dt.datetime: lambda codec, value: codec._tag("datetime", value.isoformat()),
    _dt.date: lambda codec, value: codec._tag("date", value.isoformat()),
    _dt.time: lambda codec, value: codec._tag("time", value.isoformat()),
    _dt.timedelta: lambda codec, value: codec._tag("timedelta", value.total_seconds()),
}

#: Base class -> encoder, tried in order for types not in _CODEC_DUMPERS.
_CODEC_BASE_DUMPERS: Tuple[Tuple[type, Callable[[ManifestCodec, Any], Any]], ...] = (
    (os.PathLike, lambda codec, value: codec._tag("path", os.fspath(value))),
    (_dt.datetime, _CODEC_DUMPERS[_dt.datetime]),
    (_dt.date, _CODEC_DUMPERS[_dt.date]),
    (_dt.time, _CODEC_DUMPERS[_dt.time]),
    (_dt.timedelta, _CODEC_DUMPERS[_dt.timedelta]),
    (str, lambda codec, value: str.__str__(value)),
    (int, lambda codec, value: int(value)),
    (float, lambda codec, value: codec._dump_float(float(value))),
    (tuple, _CODEC_DUMPERS[tuple]),
    (frozenset, ManifestCodec._dump_unordered),
    (set, ManifestCodec._dump_unordered),
    (bytes, _dump_bytes),
    (bytearray, _dump_bytes),
    (dict, ManifestCodec._dump_dict),
    (list, ManifestCodec._dump_list),
)


#: (module, class, encoder) of types whose module reflow does not import itself.
_LAZY_DUMPERS: Tuple[Tuple[str, str, Callable[[ManifestCodec, Any], Any]], ...] = (
    ("decimal", "Decimal", _dump_decimal),
    ("uuid", "UUID", lambda codec, value: codec._tag("uuid", str(value))),
)


def _find_dumper(kind: type) -> Optional[Callable[[ManifestCodec, Any], Any]]:
    """Find (and cache) the encoder of a type that is not a plain JSON type."""
    dumper: Optional[Callable[[ManifestCodec, Any], Any]] = None
    if issubclass(kind, enum.Enum):  # before int/str: IntEnum and str enums are both
        dumper = ManifestCodec._dump_enum
    elif dataclasses.is_dataclass(kind):
        dumper = ManifestCodec._dump_dataclass
    else:
        dumper = next((found for base, found in _CODEC_BASE_DUMPERS if issubclass(kind, base)), None)
    for module, name, lazy_dumper in _LAZY_DUMPERS:  # a Decimal or UUID exists only if its module was imported
        loaded = sys.modules.get(module)
        if dumper is None and loaded is not None and issubclass(kind, getattr(loaded, name)):
            dumper = lazy_dumper
    if dumper is not None:
        _CODEC_DUMPERS[kind] = dumper
    return dumper


def _load_float(codec: ManifestCodec, tag: Dict[str, Any]) -> float:
    return _FLOAT_SPECIALS[tag["value"]]


def _load_dict(codec: ManifestCodec, tag: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in tag["value"]}


#: Tag type -> decoder; each receives the tag with its contents already decoded.
_CODEC_LOADERS: Dict[str, Callable[[ManifestCodec, Dict[str, Any]], Any]] = {
    "path": lambda codec, tag: Path(tag["value"]),
    "datetime": lambda codec, tag: _dt.datetime.fromisoformat(tag["value"]),
    "date": lambda codec, tag: _dt.date.fromisoformat(tag["value"]),
    "time": lambda codec, tag: _dt.time.fromisoformat(tag["value"]),
    "timedelta": lambda codec, tag: _dt.timedelta(seconds=tag["value"]),
    "uuid": lambda codec, tag: importlib.import_module("uuid").UUID(tag["value"]),
    "tuple": lambda codec, tag: tuple(tag["value"]),
    "set": lambda codec, tag: set(tag["value"]),
    "frozenset": lambda codec, tag: frozenset(tag["value"]),
    "bytes": lambda codec, tag: base64.b64decode(tag["value"], validate=True),
    "bytearray": lambda codec, tag: bytearray(base64.b64decode(tag["value"], validate=True)),
    "decimal": lambda codec, tag: importlib.import_module("decimal").Decimal(tag["value"]),
    "float": _load_float,
    "dict": _load_dict,
    "enum": ManifestCodec._load_enum,
    "dataclass": ManifestCodec._load_dataclass,
}

#: The codec every store, worker and manifest uses.  Made without calling __init__ (its fields are the
#: class defaults), so that ManifestCodec becomes a dataclass only on first use (_DataclassOnFirstUse).
DEFAULT_CODEC = object.__new__(ManifestCodec)


# =============================================================================
# Store
# =============================================================================


class TaskState(str, enum.Enum):
    """State of one task instance (value == name)."""

    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    RETRYING = "RETRYING"

    @classmethod
    def terminal(cls) -> frozenset:
        """Return the states an instance ends in: SUCCESS, FAILED, CANCELLED."""
        return frozenset({cls.SUCCESS, cls.FAILED, cls.CANCELLED})

    @classmethod
    def active(cls) -> frozenset:
        """Return the states that still lead somewhere: PENDING, SUBMITTED, RUNNING, RETRYING."""
        return frozenset({cls.PENDING, cls.SUBMITTED, cls.RUNNING, cls.RETRYING})

    @classmethod
    def cancellable(cls) -> frozenset:
        """Return the states ``cancel`` acts on: PENDING, SUBMITTED, RUNNING."""
        return frozenset({cls.PENDING, cls.SUBMITTED, cls.RUNNING})

    @classmethod
    def retriable(cls) -> frozenset:
        """Return the states ``retry`` acts on: FAILED, CANCELLED."""
        return frozenset({cls.FAILED, cls.CANCELLED})


class RunState(str, enum.Enum):
    """State of a whole run (value == name)."""

    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


#: A task instance without its JSON columns (the dispatcher's fast path).  A collections
#: namedtuple, not a typing.NamedTuple class: that would import typing with reflow.
InstanceRow = collections.namedtuple("InstanceRow", ("id", "task_name", "array_index", "state", "job_id", "attempt"))


class Store(abc.ABC):
    """Where runs, task specs and task instances live: the single source of truth.

    Write methods called inside :meth:`transaction` join it; outside one,
    each write is its own short transaction.  Instance and run rows are
    dicts (see :class:`SqliteStore` for the keys); JSON columns come back
    decoded.
    """

    #: Where the store lives (a file path, or a URL for other backends).
    path: Path

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- lifecycle ----------------------------------------------------------------

    @abc.abstractmethod
    def init(self) -> None:
        """Create or upgrade the schema; calling it again does nothing."""

    def open(self) -> None:
        """Check the store before anything is written (by default :meth:`init`).

        A store may leave a brand-new file's schema to its first write
        transaction, so that creating the store and the first run is one
        commit.
        """
        self.init()

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the store reopens on next use."""

    @abc.abstractmethod
    def transaction(self) -> typing.ContextManager[None]:
        """Return a context manager grouping writes into one atomic transaction."""

    # -- runs ---------------------------------------------------------------------

    @abc.abstractmethod
    def insert_run(self, run_id: str, name: str, user: str, params: Mapping[str, Any]) -> None:
        """Record a new run in state RUNNING with its parameters."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> Optional[Dict[str, Any]]:
        """Return the run's row dict, or None when there is no such run."""

    @abc.abstractmethod
    def get_run_parameters(self, run_id: str) -> Dict[str, Any]:
        """Return the run's parameters; raise RunNotFoundError (a KeyError) for an unknown id."""

    @abc.abstractmethod
    def update_run_status(self, run_id: str, status: Union[str, RunState]) -> None:
        """Set the run's status (a RunState value)."""

    @abc.abstractmethod
    def list_runs(self, graph_name: Optional[str] = None, user_id: Optional[str] = None, *,
                  limit: Optional[int] = None, since: Any = None, until: Any = None,
                  status: Any = None) -> List[Dict[str, Any]]:
        """Return run rows, newest first, filtered by workflow, user, creation time and status.

        ``since``/``until`` are ISO dates or datetimes (naive means UTC); a
        bare date as ``until`` includes that whole day.  ``status`` is one
        state or several.
        """

    @abc.abstractmethod
    def set_dispatch_job(self, run_id: str, job_id: str) -> None:
        """Remember the job id of the run's pending dispatch job (so cancel can kill it)."""

    # -- task specs ---------------------------------------------------------------

    @abc.abstractmethod
    def insert_task_spec(self, run_id: str, task: str, is_array: bool, config: Mapping[str, Any],
                         deps: Iterable[str]) -> None:
        """Record one task of a run with its job config and dependencies."""

    @abc.abstractmethod
    def insert_task_specs(self, run_id: str, specs: Iterable[Mapping[str, Any]]) -> None:
        """Record many tasks at once: dicts with task_name, is_array, config, position, dependencies."""

    @abc.abstractmethod
    def get_task_specs(self, run_id: str) -> List[Dict[str, Any]]:
        """Return the run's tasks in topological order.

        Each dict has task_name, is_array, config, position, width (None
        until expanded, 0 for an empty fan-out) and dependencies.
        """

    @abc.abstractmethod
    def set_task_width(self, run_id: str, task: str, width: int) -> None:
        """Persist how many instances a task was expanded into (0 = empty fan-out)."""

    @abc.abstractmethod
    def list_task_dependencies(self, run_id: str) -> Dict[str, List[str]]:
        """Return ``{task: [dependencies]}`` for every task of the run."""

    # -- instances: single --------------------------------------------------------

    @abc.abstractmethod
    def insert_task_instance(self, run_id: str, task: str, index: Optional[int], state: Union[str, TaskState],
                             input: Any, identity: str = "", input_hash: str = "") -> int:
        """Create one instance (``index`` None for a singleton); return its id."""

    @abc.abstractmethod
    def get_task_instance(self, run_id: str, task: str, index: Optional[int]) -> Optional[Dict[str, Any]]:
        """Return one instance row dict, or None."""

    @abc.abstractmethod
    def list_task_instances(self, run_id: str, task_name: Optional[str] = None,
                            states: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
        """Return instance row dicts of a run, optionally of one task and some states."""

    @abc.abstractmethod
    def count_task_instances(self, run_id: str, task_name: Optional[str] = None,
                             states: Optional[Iterable[str]] = None) -> int:
        """Count instances of a run, optionally of one task and some states."""

    @abc.abstractmethod
    def get_singleton_output(self, run_id: str, task: str) -> Any:
        """Return the decoded output of a singleton task (None if it has none)."""

    @abc.abstractmethod
    def get_array_outputs(self, run_id: str, task: str) -> List[Any]:
        """Return the decoded outputs of an array task, in index order."""

    @abc.abstractmethod
    def get_output_hash(self, run_id: str, task: str, index: Optional[int] = None) -> Optional[str]:
        """Return one instance's output hash, or None when there is no such instance."""

    @abc.abstractmethod
    def get_all_output_hashes(self, run_id: str, task: str) -> List[str]:
        """Return the output hashes of a task's instances, in index order."""

    def get_outputs_digest(self, run_id: str, task: str) -> Optional[str]:
        """Return a hash of a task's ``index:output hash`` pairs in index order; None while one has no hash.

        It stands for a whole upstream task in group keys (``_Planner.group_key``).
        """
        pairs = sorted((-1 if inst["array_index"] is None else inst["array_index"], inst["output_hash"])
                       for inst in self.list_task_instances(run_id, task))
        if not all(digest for _, digest in pairs):
            return None
        return _hash16(",".join(f"{index}:{digest}" for index, digest in pairs))

    @abc.abstractmethod
    def dependency_is_satisfied(self, run_id: str, task: str) -> bool:
        """Tell whether a task is done: at least one instance and all SUCCESS, or width 0."""

    @abc.abstractmethod
    def update_task_submitted(self, run_id: str, task: str, job_id: str,
                              indices: Optional[Iterable[int]] = None) -> int:
        """Mark a task's PENDING/RETRYING instances (or those ``indices``) SUBMITTED; return n."""

    @abc.abstractmethod
    def update_task_running(self, instance_id: int) -> None:
        """Mark one instance RUNNING."""

    @abc.abstractmethod
    def update_task_success(self, instance_id: int, output: Any, output_hash: str = "") -> None:
        """Mark one instance SUCCESS with its output."""

    @abc.abstractmethod
    def update_task_failed(self, instance_id: int, text: str) -> None:
        """Mark one instance FAILED with an error text."""

    @abc.abstractmethod
    def fail_pending_tasks(self, run_id: str, task: str, text: str, indices: Optional[Iterable[int]] = None) -> int:
        """Fail a task's PENDING/RETRYING instances (or those ``indices``); return n."""

    @abc.abstractmethod
    def update_task_cancelled(self, instance_id: int) -> None:
        """Mark one instance CANCELLED."""

    @abc.abstractmethod
    def mark_for_retry(self, instance_id: int) -> None:
        """Move one instance to RETRYING: next attempt, error/output/job id cleared."""

    @abc.abstractmethod
    def find_cached(self, task: str, identity: str) -> Optional[Dict[str, Any]]:
        """Return the newest SUCCESS instance of ``task`` with ``identity`` that ran (in any run), or None.

        Cache hits themselves (``cached``) are not returned: each is a copy
        of an instance that ran, and that one serves.
        """

    @abc.abstractmethod
    def task_state_summary(self, run_id: str) -> Dict[str, Dict[str, int]]:
        """Return ``{task: {state: n}}`` for the tasks that have instances."""

    # -- instances: bulk (the dispatcher's path) ----------------------------------

    @abc.abstractmethod
    def insert_task_instances(self, run_id: str, task: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Create many instances of one task at once.

        Rows are dicts with array_index, state, input, identity, input_hash
        and optionally output, output_hash, cached, error_text, exit_code,
        reason, job_id, started_at, finished_at.
        """

    @abc.abstractmethod
    def find_cached_many(self, task: str, identities: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        """Return ``{identity: newest SUCCESS row that ran}`` for the identities that have one (see find_cached)."""

    def copy_cached_task(self, run_id: str, task: str, key: str) -> Optional[int]:
        """Copy every instance of ``task`` from the run recorded under ``key`` as cache hits; return the width.

        One ``cached`` event for the task (its reason names the source run)
        records the copy, not one per instance: a re-run of a 100,000-element
        task adds no 100,000 event rows that say nothing its instances do not.
        None when no run is recorded or its instances are not all SUCCESS.
        Stores without this fast path return None and the caller looks up
        each instance instead.
        """
        return None

    def remember_task(self, run_id: str, task: str, key: str) -> None:
        """Record that ``run_id`` expanded ``task`` from inputs whose group key is ``key`` (optional)."""
        return None

    @abc.abstractmethod
    def instance_rows(self, run_id: str, states: Optional[Iterable[str]] = None,
                      task_name: Optional[str] = None) -> List[InstanceRow]:
        """Return light rows (id, task_name, array_index, state, job_id, attempt), JSON not decoded."""

    def task_durations(self, graph_name: str, task: str, exclude_run: str = "", runs: int = 20,
                       limit: int = 1000) -> List[float]:
        """Return run seconds of the newest SUCCESS, not cached instances of ``task`` in earlier runs.

        Looks at the last ``runs`` runs of workflow ``graph_name`` (without
        ``exclude_run``), at most ``limit`` instances.
        """
        seconds: List[float] = []
        for run in self.list_runs(graph_name, limit=runs + 1):
            if run["run_id"] == exclude_run:
                continue
            for inst in self.list_task_instances(run["run_id"], task, states=["SUCCESS"]):
                duration = _duration(inst.get("started_at"), inst.get("finished_at"))
                if duration is not None and not inst.get("cached"):
                    seconds.append(duration)
            if len(seconds) >= limit:
                break
        return seconds[:limit]

    @abc.abstractmethod
    def mark_submitted(self, rows: Iterable[Tuple[int, str]]) -> int:
        """Set (instance_id, job_id) pairs SUBMITTED if still PENDING/RETRYING; return n."""

    @abc.abstractmethod
    def mark_running(self, rows: Iterable[Tuple[int, int, Optional[str]]]) -> int:
        """Set (instance_id, attempt, started_at) RUNNING if still SUBMITTED on that attempt; return n."""

    @abc.abstractmethod
    def apply_results(self, results: Iterable[Mapping[str, Any]]) -> Tuple[int, List[Tuple[Any, str]]]:
        """Apply worker results; return (applied, [(instance_id, why_rejected)]).

        A result applies only while its instance is SUBMITTED or RUNNING on
        the same attempt, so a late result never overwrites a cancelled or
        retried instance.
        """

    @abc.abstractmethod
    def fail_instances(self, ids: Iterable[int], text: str, reason: str = "") -> int:
        """Fail the still-active instances among ``ids``; return n."""

    @abc.abstractmethod
    def set_reasons(self, pairs: Iterable[Tuple[int, str]]) -> None:
        """Replace the recorded reason of finished instances (``(id, reason)`` pairs)."""

    @abc.abstractmethod
    def cancel_instances(self, ids: Iterable[int], reason: str = "") -> int:
        """Cancel the cancellable instances among ``ids`` (``reason`` says why); return n."""

    @abc.abstractmethod
    def retry_instances(self, ids: Iterable[int]) -> int:
        """Move the retriable instances among ``ids`` to RETRYING (next attempt); return n."""

    @abc.abstractmethod
    def delete_instances(self, ids: Iterable[int]) -> int:
        """Delete instances (a failed expansion about to be redone); return n."""

    @abc.abstractmethod
    def list_events(self, run_id: str, since_id: int = 0) -> List[Dict[str, Any]]:
        """Return the run's state-change events with id > ``since_id``, oldest first."""


#: Every table of the current schema: its columns in order, those of the reference layout (schema
#: version 1) first, then its table constraints.  A new store creates each table whole; an older one
#: gets the missing tables, and its missing columns through ALTER TABLE (which is why every column
#: added after version 1 has a default or allows NULL).
_TABLES = {
    "runs": (("run_id TEXT PRIMARY KEY", "graph_name TEXT NOT NULL", "user_id TEXT NOT NULL DEFAULT ''",
              "created_at TEXT NOT NULL", "status TEXT NOT NULL", "parameters TEXT NOT NULL DEFAULT '{}'",
              "updated_at TEXT", "dispatch_job_id TEXT NOT NULL DEFAULT ''"), ()),
    "task_specs": (("run_id TEXT NOT NULL", "task_name TEXT NOT NULL", "is_array INTEGER NOT NULL DEFAULT 0",
                    "config TEXT NOT NULL DEFAULT '{}'", "position INTEGER NOT NULL DEFAULT 0", "width INTEGER"),
                   ("PRIMARY KEY (run_id, task_name)",)),
    "task_dependencies": (("run_id TEXT NOT NULL", "task_name TEXT NOT NULL", "depends_on TEXT NOT NULL"),
                          ("PRIMARY KEY (run_id, task_name, depends_on)",)),
    "task_instances": (("id INTEGER PRIMARY KEY AUTOINCREMENT", "run_id TEXT NOT NULL", "task_name TEXT NOT NULL",
                        "array_index INTEGER", "state TEXT NOT NULL", "job_id TEXT", "input TEXT NOT NULL DEFAULT '{}'",
                        "output TEXT", "error_text TEXT", "identity TEXT NOT NULL DEFAULT ''",
                        "input_hash TEXT NOT NULL DEFAULT ''", "output_hash TEXT NOT NULL DEFAULT ''",
                        "created_at TEXT NOT NULL", "updated_at TEXT NOT NULL", "attempt INTEGER NOT NULL DEFAULT 0",
                        "reason TEXT NOT NULL DEFAULT ''", "exit_code INTEGER", "started_at TEXT", "finished_at TEXT",
                        "cached INTEGER NOT NULL DEFAULT 0"), ()),
    "meta": (("key TEXT PRIMARY KEY", "value TEXT"), ()),
    "events": (("id INTEGER PRIMARY KEY AUTOINCREMENT", "run_id TEXT NOT NULL", "task_name TEXT",
                "array_index INTEGER", "instance_id INTEGER", "at TEXT NOT NULL", "event TEXT NOT NULL", "state TEXT",
                "job_id TEXT", "attempt INTEGER", "exit_code INTEGER", "reason TEXT"), ()),
}

#: Columns the reference layout must have for a file to count as a reflow store.
_V1_COLUMNS = {
    "runs": {"run_id", "graph_name", "user_id", "created_at", "status", "parameters"},
    "task_specs": {"run_id", "task_name", "is_array", "config"},
    "task_dependencies": {"run_id", "task_name", "depends_on"},
    "task_instances": {"id", "run_id", "task_name", "array_index", "state", "job_id", "input", "output",
                       "error_text", "identity", "input_hash", "output_hash", "created_at", "updated_at"},
}

_EVENT_COLUMNS = ("id", "run_id", "task_name", "array_index", "instance_id", "at", "event", "state", "job_id",
                  "attempt", "exit_code", "reason")

#: Indexes of the current schema.  ``idx_instances_unique`` also serves every lookup by run, or by run
#: and task (its leading columns).  ``idx_instances_source`` holds the cache's sources: the successful
#: instances that ran.  A cache copy (``cached = 1``) has its source's identity and output, so it needs
#: no entry of its own, and copying a 100,000-element task skips as many random-order index inserts
#: (two thirds of the copy's cost).
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS idx_instances_unique ON task_instances "
    "(run_id, task_name, IFNULL(array_index, -1))",
    "CREATE INDEX IF NOT EXISTS idx_instances_source ON task_instances (task_name, identity) "
    "WHERE state = 'SUCCESS' AND cached = 0",
    "CREATE INDEX IF NOT EXISTS idx_events_run ON events (run_id, id)",
)
#: Indexes of older versions that the current schema drops: version 2's cache index held every row, and
#: up to version 3 an index on (run_id, task_name) repeated the unique index's leading columns.
_OLD_INDEXES = ("idx_instances_cache", "idx_instances_run_task")


class _TaskNotWhole(Exception):
    """Raised inside a transaction to undo the copy of a task not all of whose instances succeeded."""


#: Prefix of the ``meta`` keys that map a task's group key (see ``_Planner.group_key``) to a run.
_GROUP_PREFIX = "group:"
#: The ``meta`` key memoising a task's output digest (see ``_digest_key``), built in SQL over an instance row ``t``.
_DIGEST_KEY_SQL = "'digest:' || t.run_id || char(31) || t.task_name"


def _digest_key(run_id: str, task: str) -> str:
    """Return the ``meta`` key memoising the output digest of a task all of whose instances succeeded.

    char(31), the unit separator, is in no run id or task name.
    """
    return f"digest:{run_id}\x1f{task}"


#: Per-connection scratch table holding the instance ids of one bulk write.
#: Each bulk write fills it, keeps the ids whose state allows the change,
#: updates them with one statement and logs them with one INSERT ... SELECT:
#: a per-row trigger or a per-row event insert costs twice as much.
_BATCH_TABLE = ("CREATE TEMP TABLE IF NOT EXISTS reflow_batch "
                "(id INTEGER PRIMARY KEY, attempt INTEGER, job_id TEXT, started_at TEXT)")
_EVENT_SELECT = ("INSERT INTO events (run_id, task_name, array_index, instance_id, at, event, state, job_id, "
                 "attempt, exit_code, reason) SELECT t.run_id, t.task_name, t.array_index, t.id, {at}, {event}, "
                 "t.state, t.job_id, t.attempt, t.exit_code, t.reason FROM {source}")
_FROM_BATCH = "temp.reflow_batch b JOIN task_instances t ON t.id = b.id ORDER BY t.id"
_RUN_EVENT = ("INSERT INTO events (run_id, at, event, state, job_id, reason) "
              "SELECT run_id, updated_at, ?, status, dispatch_job_id, '' FROM runs WHERE run_id = ?")

#: Index order of a task's instances, read off the unique index without a sort (NULL, the singleton, and
#: EXPANSION_FAILED never share a task, so this is the order of array_index).
_BY_INDEX = "ORDER BY IFNULL(array_index, -1)"
_INSTANCE_COLUMNS = ("id", "run_id", "task_name", "array_index", "state", "job_id", "input", "output",
                     "error_text", "identity", "input_hash", "output_hash", "created_at", "updated_at",
                     "attempt", "reason", "exit_code", "started_at", "finished_at", "cached")
_RUN_COLUMNS = ("run_id", "graph_name", "user_id", "created_at", "status", "parameters", "updated_at",
                "dispatch_job_id")
_INSTANCE_SELECT = "SELECT " + ", ".join(_INSTANCE_COLUMNS) + " FROM task_instances"
_RUN_SELECT = "SELECT " + ", ".join(_RUN_COLUMNS) + " FROM runs"

#: Journal modes a user may choose, and the ``synchronous`` level each is safe with.
_JOURNAL_SYNC = {"delete": "FULL", "truncate": "FULL", "wal": "NORMAL"}
#: Retries after a "database is locked"/"busy" error (each waits busy_timeout first).
_SQLITE_RETRIES = 5
#: Host parameters per ``IN (...)`` list; SQLite < 3.32 allows at most 999.
_SQL_CHUNK = 900
#: Columns of a bulk instance insert that rows give (``run_id``, ``task_name``, ``created_at`` and
#: ``updated_at`` are the same for all), and those of them that may be NULL.
_ROW_COLUMNS = ("array_index", "state", "input", "identity", "input_hash", "output", "output_hash", "cached",
                "error_text", "exit_code", "reason", "job_id", "started_at", "finished_at")
_NULLABLE_COLUMNS = frozenset({"array_index", "output", "error_text", "exit_code", "job_id", "started_at",
                               "finished_at"})
#: Rows per insert statement.  One execution per row would open the table and its indexes and update
#: the AUTOINCREMENT counter each time; much longer statements cost more to compile (a 1,000-row task
#: compiles two: the full one and the rest) than they save.  32 rows bind at most 4 + 32 x 14 values,
#: within the 999 host parameters of SQLite < 3.32.
_ROWS_PER_INSERT = 32

_TASK_STATE_NAMES = frozenset(TaskState.__members__)
_TERMINAL_NAMES = frozenset(state.value for state in TaskState.terminal())
#: Task states as plain strings, for per-instance loops (an enum's ``.value`` is a descriptor call).
_SUCCESS, _FAILED, _PENDING = TaskState.SUCCESS.value, TaskState.FAILED.value, TaskState.PENDING.value
_RETRY_FIELDS = ("state = 'RETRYING', attempt = attempt + 1, error_text = NULL, output = NULL, output_hash = '', "
                 "job_id = NULL, reason = '', exit_code = NULL, started_at = NULL, finished_at = NULL, cached = 0")


def _parse_utc(text: Optional[str]) -> Optional[_dt.datetime]:
    """Parse a stored ISO-8601 time (naive means UTC); None for an empty or malformed value."""
    if not text:
        return None
    try:
        moment = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


def _duration(started: Optional[str], finished: Optional[str]) -> Optional[float]:
    """Return the seconds between two stored times (to now when ``finished`` is empty); None without a start."""
    begin = _parse_utc(started)
    if begin is None:
        return None
    end = _parse_utc(finished) or _dt.datetime.now(_dt.timezone.utc)
    return max(0.0, (end - begin).total_seconds())


def _sqlite_busy(exc: BaseException) -> bool:
    """Tell whether a sqlite error is lock contention worth retrying."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


#: Values of ``REFLOW_SQLITE_LOCKING`` and the SQLite VFS each selects (None: the default fcntl locks).
_SQLITE_LOCKING = {"posix": None, "dotfile": "unix-dotfile"}


def _sqlite_vfs(path: Path) -> Optional[str]:
    """Return the SQLite VFS ``REFLOW_SQLITE_LOCKING`` asks for; StoreError for an unknown value.

    ``dotfile`` locks with a ``<store>.lock`` entry created atomically,
    which works on NFS mounts whose fcntl locks fail (no lock daemon).
    Every process using the store must then use it (see the README).
    """
    chosen = (os.environ.get("REFLOW_SQLITE_LOCKING") or "posix").strip().lower()
    if chosen not in _SQLITE_LOCKING:
        raise StoreError(f"store {path}: unknown REFLOW_SQLITE_LOCKING {chosen!r} (use posix or dotfile)."
                         + _suggest(chosen, _SQLITE_LOCKING))
    return _SQLITE_LOCKING[chosen]


def _lock_hint(exc: BaseException) -> str:
    """Return advice for sqlite errors that mean the filesystem's locks do not work, else ''."""
    text = str(exc).lower()
    if "locking protocol" in text or "disk i/o error" in text:
        return ("; if the store is on NFS without working locks, set REFLOW_SQLITE_LOCKING=dotfile "
                "or move it to a local disk (README: Stores on NFS)")
    return ""


#: Statements traced in this process by the ``statement:N`` fault-injection hook (all connections).
_STATEMENTS_SEEN = itertools.count(1)


def _statement_crasher() -> Callable[[str], None]:
    """Return a sqlite trace callback that dies at statement N for ``REFLOW_TEST_CRASH=statement:N[@FILE]``.

    A fault-injection hook (power loss between any two statements); it is
    installed only when that variable is set.
    """
    point = os.environ.get("REFLOW_TEST_CRASH", "").partition("@")[0]
    target = int(point.split(":", 1)[1])

    def trace(sql: str) -> None:
        if next(_STATEMENTS_SEEN) == target:
            _crash_point(point)
    return trace


def _sqlite_backoff(attempt: int) -> None:
    """Sleep before retry ``attempt`` (0-based): 50 ms doubling, with jitter so writers spread out."""
    base = 0.05 * (2 ** attempt)
    time.sleep(base * (1.0 + (time.time() * 1000003 % 1.0)))


def _in_list(values: Sequence[Any]) -> str:
    """Return ``(?, ?, ...)`` for ``values``."""
    return "(" + ", ".join("?" * len(values)) + ")"


def _state_value(state: Any, kind: Type[enum.Enum] = TaskState) -> str:
    """Return a state's string value; raise StoreError for a name that is not one."""
    value = state.value if isinstance(state, enum.Enum) else str(state)
    if value not in kind.__members__:
        raise StoreError(f"unknown {kind.__name__} {value!r}; expected one of {', '.join(kind.__members__)}")
    return value


def _state_values(states: Any, kind: Type[enum.Enum] = TaskState) -> List[str]:
    """Return a list of state values from one state or an iterable of them."""
    if isinstance(states, (str, enum.Enum)):
        states = [states]
    return [_state_value(state, kind) for state in states]


#: ``DEFAULT_CODEC.dumps`` through one encoder made once (see _compact_encoder): the store's JSON columns.
_JSON_ENCODE = _compact_encoder(ensure_ascii=True)


def _json_dumps(value: Any) -> str:
    """Encode a JSON column value exactly as ``DEFAULT_CODEC.dumps`` does."""
    return _JSON_ENCODE(DEFAULT_CODEC.dump_value(value))


def _json_loads(text: Optional[str]) -> Any:
    """Decode a JSON column value (NULL is None)."""
    return None if text is None else DEFAULT_CODEC.loads(text)


def _json_loads_many(texts: Sequence[Optional[str]]) -> List[Any]:
    """Decode many JSON column values with one parse of them as a JSON list (NULL is None)."""
    return DEFAULT_CODEC.loads("[" + ",".join("null" if text is None else text for text in texts) + "]")


def _instance_dict(row: Sequence[Any]) -> Dict[str, Any]:
    """Turn a ``_INSTANCE_SELECT`` row into a row dict with decoded JSON."""
    record = dict(zip(_INSTANCE_COLUMNS, row))
    record["input"] = _json_loads(record["input"])
    record["output"] = _json_loads(record["output"])
    record["cached"] = bool(record["cached"])
    return record


def _run_dict(row: Sequence[Any]) -> Dict[str, Any]:
    """Turn a ``_RUN_SELECT`` row into a run dict with decoded parameters."""
    record = dict(zip(_RUN_COLUMNS, row))
    record["parameters"] = _json_loads(record["parameters"]) or {}
    return record


def _time_bound(value: Any, what: str, end_of_day: bool) -> str:
    """Normalise a ``since``/``until`` bound to the ISO-UTC form ``created_at`` uses.

    A bare date as an upper bound means the end of that day (exclusive next day).
    """
    if isinstance(value, _dt.datetime):
        moment = value
    elif isinstance(value, _dt.date):
        moment = _dt.datetime(value.year, value.month, value.day)
        moment += _dt.timedelta(days=1) if end_of_day else _dt.timedelta(0)
    else:
        text = str(value).strip()
        try:
            moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise StoreError(f"{what} {value!r} is not an ISO date or datetime (e.g. 2024-05-01T12:00)") from None
        if end_of_day and len(text) == 10:
            moment += _dt.timedelta(days=1)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


def _where(run_id: str, task_name: Optional[str], states: Any) -> Tuple[str, List[Any]]:
    """Return a WHERE clause on run, task and states, with its parameters."""
    clause, params = "run_id = ?", [run_id]
    if task_name is not None:
        clause += " AND task_name = ?"
        params.append(task_name)
    if states is not None:
        values = _state_values(states)
        clause += " AND state IN " + _in_list(values) if values else " AND 0"
        params.extend(values)
    return clause, params


class SqliteStore(Store):
    """The sqlite store: one file, safe for several processes and for NFS.

    ``SqliteStore(path, readonly=False, *, journal_mode=None, config=None)``.
    The file is created 0600 (missing parent directories 0700) and uses a
    rollback journal in ``truncate`` mode: the journal is emptied after each
    commit instead of deleted, which spares a file creation, a deletion and
    a directory sync per transaction (costly on a busy disk or over NFS)
    and is just as safe.  WAL only when ``journal_mode``, ``config.sqlite_journal`` or
    ``REFLOW_SQLITE_JOURNAL`` says ``wal`` (``delete`` is the other
    choice); without a choice a WAL file stays WAL.  Read-only stores open
    the file as ``mode=ro`` and refuse writes.

    Instance rows: id, run_id, task_name, array_index, state, job_id, input,
    output, error_text, identity, input_hash, output_hash, created_at,
    updated_at, attempt, reason, exit_code, started_at, finished_at, cached.
    Run rows: run_id, graph_name, user_id, created_at, status, parameters,
    updated_at, dispatch_job_id.
    """

    def __init__(self, path: Union[str, Path], readonly: bool = False, *, journal_mode: Optional[str] = None,
                 config: Optional[Config] = None) -> None:
        self.path = Path(path).expanduser()
        self.readonly = bool(readonly)
        self._journal = self._choose_journal(journal_mode, config)
        self._vfs = _sqlite_vfs(self.path)
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._depth = 0
        self._schema_due = False  # a brand-new file: the next write transaction creates the schema

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    # -- construction -------------------------------------------------------------

    @classmethod
    def for_run_dir(cls, run_dir: Union[str, Path], readonly: bool = False) -> SqliteStore:
        """Return the store kept inside a run directory (``<run_dir>/manifest.db``)."""
        return cls(Path(run_dir) / "manifest.db", readonly=readonly)

    @classmethod
    def default_path(cls, config: Optional[Config] = None) -> Path:
        """Return the shared store path.

        In order: ``defaults.store_path`` (through ``config``, which also
        honours ``REFLOW_STORE_PATH``), ``REFLOW_STORE_PATH``,
        ``$XDG_CACHE_HOME/reflow/manifest.db``, ``~/.cache/reflow/manifest.db``.
        ``config`` defaults to :func:`load_config`.
        """
        config = config if config is not None else load_config()
        chosen = getattr(config, "default_store_path", None) or os.environ.get("REFLOW_STORE_PATH")
        if chosen:
            return Path(chosen).expanduser()
        cache = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
        return base / "reflow" / "manifest.db"

    @classmethod
    def default(cls, config: Optional[Config] = None, readonly: bool = False) -> SqliteStore:
        """Return the shared store of :meth:`default_path`, with the config's journal mode."""
        config = config if config is not None else load_config()
        return cls(cls.default_path(config), readonly=readonly, config=config)

    def _choose_journal(self, explicit: Optional[str], config: Optional[Config]) -> Optional[str]:
        """Return the journal mode asked for (lower case), or None to keep the file's own."""
        chosen = explicit or getattr(config, "sqlite_journal", None) or os.environ.get("REFLOW_SQLITE_JOURNAL")
        if not chosen:
            return None
        mode = str(chosen).strip().lower()
        if mode not in _JOURNAL_SYNC:
            raise StoreError(f"store {self.path}: unsupported journal mode {chosen!r} (use delete, truncate or wal)")
        return mode

    # -- connection ---------------------------------------------------------------

    def _error(self, problem: Any) -> StoreError:
        """Return a one-line StoreError naming this store's path."""
        text = " ".join(str(problem).split())
        return StoreError(f"store {self.path}: {text}")

    @property
    def _db(self) -> sqlite3.Connection:
        """Return the open connection, opening it (and checking the file) on first use.

        A connection inherited through ``fork`` is never reused: SQLite
        forbids carrying one across a fork.
        """
        if self._conn is None or self._pid != os.getpid():
            self._conn, self._depth, self._schema_due = None, 0, False
            self._conn = self._open()
            self._pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        """Open and check the database file, retrying while another process holds it locked."""
        self._prepare_file()
        for attempt in range(_SQLITE_RETRIES + 1):
            try:
                return self._open_once()
            except sqlite3.Error as exc:
                if not _sqlite_busy(exc) or attempt == _SQLITE_RETRIES:
                    raise self._error(f"cannot open: {exc}{_lock_hint(exc)}") from exc
                _sqlite_backoff(attempt)
        raise AssertionError("unreachable")

    def _open_once(self) -> sqlite3.Connection:
        """Connect, refuse a file that is not ours, create or upgrade the schema when writable."""
        conn = self._connect()
        try:
            self._check_and_upgrade(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare_file(self) -> None:
        """Check the path; create a missing file 0600 (and directories 0700) unless read-only."""
        if self.path.is_dir():
            raise self._error("is a directory, not a database file")
        if self.path.exists():
            if not self.readonly and not os.access(self.path, os.W_OK):
                raise self._error("is not writable (open it read-only to read it)")
            if not self.readonly and not os.access(self.path.parent, os.W_OK):
                raise self._error("is in a directory that is not writable (sqlite writes its journal there)")
            return
        if self.readonly:
            raise self._error("does not exist")
        try:
            _private_dir(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            return  # another process created it first
        except OSError as exc:
            raise self._error(f"cannot create: {exc.strerror or exc}") from exc
        try:
            os.fchmod(fd, 0o600)  # the umask may have removed bits we want; never added any
        finally:
            os.close(fd)

    def _connect(self) -> sqlite3.Connection:
        """Open the sqlite connection (autocommit; explicit BEGIN IMMEDIATE for writes).

        Read-only stores use a URI with ``mode=ro`` (never ``immutable=1``,
        which would ignore other writers); ``REFLOW_SQLITE_LOCKING=dotfile``
        adds ``vfs=unix-dotfile`` (see :func:`_sqlite_vfs`).
        """
        options = (["mode=ro"] if self.readonly else []) + ([f"vfs={self._vfs}"] if self._vfs else [])
        if options:
            target = Path(os.path.abspath(self.path)).as_uri() + "?" + "&".join(options)
            conn = sqlite3.connect(target, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_MS)}")
        conn.execute("PRAGMA temp_store = MEMORY")
        if not self.readonly and os.environ.get("REFLOW_TEST_CRASH", "").startswith("statement:"):
            conn.set_trace_callback(_statement_crasher())
        return conn

    def _check_and_upgrade(self, conn: sqlite3.Connection) -> None:
        """Refuse foreign, corrupt or newer files untouched; migrate ours, or leave a new one's schema due.

        A brand-new (empty) file gets its schema in its first write
        transaction, which then also holds the first run: one commit, and
        its several fsyncs, instead of two.
        """
        version, tables = self._inspect(conn)
        if version == SCHEMA_VERSION and tables:
            self._set_journal(conn)
            return
        if self.readonly:
            state = "is empty (not initialised)" if not tables else f"has schema version {version}"
            raise self._error(f"{state}; open it read-write once to set it up (submit or run a workflow with it, "
                              "or call SqliteStore(path).init()); file left untouched")
        if not tables and version == 0:
            self._schema_due = True
            self._set_journal(conn)
            return
        conn.execute("BEGIN IMMEDIATE")  # a busy error here is retried by _open
        try:
            self._create_or_migrate(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._set_journal(conn)

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION inside the caller's write transaction, unless another process did."""
        version, tables = self._inspect(conn)
        if version != SCHEMA_VERSION or not tables:
            self._migrate(conn, tables)

    def _inspect(self, conn: sqlite3.Connection) -> Tuple[int, Dict[str, set]]:
        """Return (user_version, {table: columns}) after checking this is a usable reflow store."""
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = self._table_columns(conn, version)
        except sqlite3.DatabaseError as exc:
            if _sqlite_busy(exc):
                raise  # locked by another process: the caller retries
            raise self._error(f"is not a readable sqlite database ({exc}); left untouched") from exc
        if version > SCHEMA_VERSION:
            raise self._error(f"has schema version {version}, newer than this reflow's {SCHEMA_VERSION}; "
                              f"use a newer reflow.py (file left untouched)")
        if not tables and version == 0:
            return version, tables
        for table, columns in _V1_COLUMNS.items():
            missing = sorted(columns - tables.get(table, set()))
            if missing:
                found = ", ".join(sorted(tables)) or "none"
                raise self._error(f"is not a reflow store (table {table} lacks {', '.join(missing)}; "
                                  f"tables: {found}); left untouched")
        return version, tables

    @staticmethod
    def _table_columns(conn: sqlite3.Connection, version: int) -> Dict[str, set]:
        """Return ``{table: columns}``; for a store of the current version, the table names suffice.

        All the current version's tables standing for the columns spares
        reading sixty column descriptions at every opening.
        """
        names = [name for name, in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                 if not name.startswith("sqlite_")]
        if version == SCHEMA_VERSION and set(_TABLES) <= set(names):
            return {name: {column.split()[0] for column in _TABLES[name][0]} if name in _TABLES else set()
                    for name in names}
        tables: Dict[str, set] = {name: set() for name in names}
        for table, column in conn.execute("SELECT m.name, c.name FROM sqlite_master AS m, "
                                          "pragma_table_info(m.name) AS c WHERE m.type = 'table'"):
            if table in tables:
                tables[table].add(column)
        return tables

    def _migrate(self, conn: sqlite3.Connection, tables: Dict[str, set]) -> None:
        """Bring an empty or older file to SCHEMA_VERSION (inside the caller's transaction)."""
        try:
            self._migrate_tables(conn, tables)
            for index in _OLD_INDEXES if tables else ():
                conn.execute(f"DROP INDEX IF EXISTS {index}")
            for statement in _INDEXES:
                conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            conn.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")
        except sqlite3.IntegrityError as exc:
            raise self._error(f"cannot upgrade: duplicate task instances ({exc}); file left unchanged") from exc
        except sqlite3.Error as exc:
            raise self._error(f"cannot upgrade the schema: {exc}; file left unchanged") from exc

    @staticmethod
    def _migrate_tables(conn: sqlite3.Connection, tables: Dict[str, set]) -> None:
        """Create the missing tables whole and add the missing columns of the others."""
        for table, (columns, constraints) in _TABLES.items():
            if table not in tables:
                conn.execute(f"CREATE TABLE {table} ({', '.join(columns + constraints)})")
                continue
            for column in columns:
                if column.split()[0] not in tables[table]:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        if "updated_at" not in tables.get("runs", {"updated_at"}):
            conn.execute("UPDATE runs SET updated_at = created_at")

    def _set_journal(self, conn: sqlite3.Connection) -> None:
        """Apply the chosen journal mode (``truncate`` for a rollback-journal file) and its ``synchronous`` level.

        Switching to or from WAL needs the file to itself; when another
        process has it open we keep the current mode (with a warning) rather
        than wait.  Rollback modes are per connection: processes in
        ``delete`` and ``truncate`` mode share a file safely.
        """
        if self.readonly:
            return
        mode = (conn.execute("PRAGMA journal_mode").fetchone()[0] or "delete").lower()
        wanted = self._journal or ("truncate" if mode == "delete" else mode)
        if wanted != mode:
            conn.execute("PRAGMA busy_timeout = 2000")
            try:
                mode = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0].lower()
            except sqlite3.OperationalError as exc:
                log.warning("store %s: cannot switch to journal mode %s (%s); staying in %s",
                            self.path, wanted, exc, mode)
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_MS)}")
        conn.execute(f"PRAGMA synchronous = {_JOURNAL_SYNC.get(mode, 'FULL')}")

    def _retrying(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Execute ``sql``, retrying with backoff while the database is locked or busy."""
        for attempt in range(_SQLITE_RETRIES + 1):
            try:
                return conn.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if not _sqlite_busy(exc) or attempt == _SQLITE_RETRIES:
                    raise
                log.debug("store %s busy (%s); retry %d", self.path, exc, attempt + 1)
                _sqlite_backoff(attempt)
        raise AssertionError("unreachable")

    # -- lifecycle ----------------------------------------------------------------

    def init(self) -> None:
        """Create or upgrade the schema (read-only: only check the file); idempotent."""
        self.open()
        if self._schema_due:
            self._create_due_schema()

    def open(self) -> None:
        """Open and check the file; migrate an older one (a new one gets its schema with the first write)."""
        self._db  # noqa: B018 - opening checks and migrates

    def _create_due_schema(self) -> None:
        """Commit a brand-new file's schema on its own (a read or :meth:`init` came before any write)."""
        with self.transaction():
            pass

    def close(self) -> None:
        """Close the connection (uncommitted work is rolled back); the store reopens on next use."""
        conn, self._conn, self._depth = self._conn, None, 0
        if conn is not None and self._pid == os.getpid():
            conn.close()

    @property
    def journal_mode(self) -> str:
        """Return the journal mode the file is in (``delete``, ``truncate``, ``wal``...)."""
        return str(self._read("PRAGMA journal_mode")[0][0]).lower()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one ``BEGIN IMMEDIATE ... COMMIT`` (ROLLBACK on error).

        Nested use becomes a savepoint: an exception inside rolls back only
        the inner block.  sqlite errors surface as StoreError.
        """
        if self.readonly:
            raise self._error("is open read-only; cannot start a write transaction")
        conn = self._db
        nested = self._depth > 0
        savepoint = f"reflow_sp{self._depth}"
        try:
            self._retrying(conn, f"SAVEPOINT {savepoint}" if nested else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(f"cannot start a transaction: {exc}{_lock_hint(exc)}") from exc
        self._depth += 1
        try:
            if self._schema_due and not nested:
                self._create_or_migrate(conn)
            yield
        except BaseException as exc:
            self._depth -= 1
            self._rollback(conn, savepoint if nested else None)
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from exc
            raise
        else:
            self._depth -= 1
            self._commit(conn, savepoint if nested else None)
            if not nested:
                self._schema_due = False

    def _rollback(self, conn: sqlite3.Connection, savepoint: Optional[str]) -> None:
        """Undo a transaction or a savepoint, ignoring a connection already gone."""
        with contextlib.suppress(sqlite3.Error):
            if savepoint:
                conn.execute(f"ROLLBACK TO {savepoint}")
                conn.execute(f"RELEASE {savepoint}")
            elif conn.in_transaction:
                conn.execute("ROLLBACK")

    def _commit(self, conn: sqlite3.Connection, savepoint: Optional[str]) -> None:
        """Commit a transaction (retrying while readers block it) or release a savepoint."""
        try:
            self._retrying(conn, f"RELEASE {savepoint}" if savepoint else "COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn, savepoint)
            raise self._error(f"commit failed: {exc}") from exc

    def _read(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple]:
        """Run a query and return all rows; sqlite errors become StoreError."""
        conn = self._db
        if self._schema_due and not self._depth:
            self._create_due_schema()
        try:
            return self._retrying(conn, sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _read_chunked(self, sql: str, values: Sequence[Any], params: Sequence[Any] = ()) -> List[Tuple]:
        """Run ``sql`` (whose ``{into}`` is an IN list) over ``values`` in chunks; return all rows."""
        rows: List[Tuple] = []
        for start in range(0, len(values), _SQL_CHUNK):
            chunk = list(values[start:start + _SQL_CHUNK])
            rows.extend(self._read(sql.format(into=_in_list(chunk)), [*params, *chunk]))
        return rows

    def _write(self, sql: str, params: Any = ()) -> int:
        """Run one write statement in the current transaction, or in a new one; return the rows changed.

        Inside a transaction it takes no savepoint: SQLite undoes a failed
        statement by itself, leaving the transaction as it was.
        """
        if not self._depth:
            with self.transaction():
                return self._db.execute(sql, params).rowcount
        try:
            return self._db.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    # -- bulk state changes (call inside a transaction) ---------------------------

    def _empty_batch(self) -> None:
        """Empty the scratch table, creating it first in a connection that has none yet.

        Made on first use rather than at open (a run that is all cache hits
        needs none); asked each time because a rolled-back savepoint undoes
        its creation.
        """
        self._db.execute(_BATCH_TABLE)
        self._db.execute("DELETE FROM temp.reflow_batch")

    def _batch(self, rows: Iterable[Sequence[Any]], columns: str = "id") -> None:
        """Fill the scratch table with instance ids (and per-row values); duplicates are dropped."""
        marks = ", ".join("?" * (columns.count(",") + 1))
        self._empty_batch()
        self._db.executemany(f"INSERT OR IGNORE INTO temp.reflow_batch ({columns}) VALUES ({marks})", rows)

    def _batch_select(self, where: str, params: Any, many: bool = False) -> None:
        """Fill the scratch table with the ids of the instances matching ``where``."""
        self._empty_batch()
        sql = f"INSERT OR IGNORE INTO temp.reflow_batch (id) SELECT id FROM task_instances WHERE {where}"
        if many:
            self._db.executemany(sql, params)
        else:
            self._db.execute(sql, params)

    def _batch_keep(self, guard: str) -> None:
        """Drop the ids whose instance does not satisfy ``guard`` (SQL on ``t`` and ``b``)."""
        self._db.execute("DELETE FROM temp.reflow_batch WHERE id NOT IN (SELECT t.id FROM temp.reflow_batch b "
                         f"JOIN task_instances t ON t.id = b.id WHERE {guard})")

    def _batch_update(self, assignments: str, params: Sequence[Any] = (), at: str = "t.updated_at") -> int:
        """Update the batched instances with one statement, log one event each (time ``at``); return n."""
        count = self._db.execute(f"UPDATE task_instances SET {assignments} "
                                 "WHERE id IN (SELECT id FROM temp.reflow_batch)", params).rowcount
        self._batch_log(at=at)
        return count

    def _batch_log(self, at: str = "t.updated_at", event: str = "lower(t.state)", params: Sequence[Any] = ()) -> None:
        """Append one event per batched instance, from its current row."""
        self._db.execute(_EVENT_SELECT.format(at=at, event=event, source=_FROM_BATCH), params)

    def _change(self, ids: Iterable[int], guard: Optional[str], assignments: str, params: Sequence[Any]) -> int:
        """Apply ``assignments`` to the instances among ``ids`` that satisfy ``guard``; return n.

        Every guard admits only unfinished or failed instances; a change
        without one (the per-instance API) may alter a SUCCESS instance, so
        it drops its task's memoised digest.
        """
        with self.transaction():
            self._batch((int(i),) for i in ids)
            if guard:
                self._batch_keep(guard)
            else:
                self._forget_digests()
            return self._batch_update(assignments, params)

    def _forget_digests(self) -> None:
        """Drop the memoised output digests of the batched instances' tasks (see :meth:`get_outputs_digest`)."""
        self._db.execute(f"DELETE FROM meta WHERE key IN (SELECT {_DIGEST_KEY_SQL} FROM temp.reflow_batch b "
                         "JOIN task_instances t ON t.id = b.id)")

    # -- runs ---------------------------------------------------------------------

    def insert_run(self, run_id: str, name: str, user: str, params: Mapping[str, Any]) -> None:
        """Record a new run in state RUNNING; a duplicate id is a StoreError."""
        now = _utcnow()
        with self.transaction():
            self._db.execute("INSERT INTO runs (run_id, graph_name, user_id, created_at, status, parameters, "
                             "updated_at) VALUES (?, ?, ?, ?, 'RUNNING', ?, ?)",
                             (run_id, name, user or "", now, _json_dumps(dict(params or {})), now))
            self._db.execute(_RUN_EVENT, ("run_created", run_id))

    def get_run(self, run_id: str) -> Optional[Dict[str, Any]]:
        """Return the run dict, or None."""
        rows = self._read(_RUN_SELECT + " WHERE run_id = ?", (run_id,))
        return _run_dict(rows[0]) if rows else None

    def get_run_parameters(self, run_id: str) -> Dict[str, Any]:
        """Return the run's parameters; RunNotFoundError for an unknown id."""
        rows = self._read("SELECT parameters FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise RunNotFoundError(f"no run {run_id!r} in store {self.path}")
        return _json_loads(rows[0][0]) or {}

    def update_run_status(self, run_id: str, status: Union[str, RunState]) -> None:
        """Set the run's status; RunNotFoundError for an unknown id."""
        value = _state_value(status, RunState)
        self._update_run(run_id, "status", value, "run_" + value.lower())

    def set_dispatch_job(self, run_id: str, job_id: str) -> None:
        """Remember the run's pending dispatch job id."""
        self._update_run(run_id, "dispatch_job_id", str(job_id or ""), "dispatch_job")

    def _update_run(self, run_id: str, column: str, value: str, event: str) -> None:
        """Set one column of a run and log the change; RunNotFoundError for an unknown id."""
        with self.transaction():
            changed = self._db.execute(f"UPDATE runs SET {column} = ?, updated_at = ? WHERE run_id = ?",
                                       (value, _utcnow(), run_id)).rowcount
            if not changed:
                raise RunNotFoundError(f"no run {run_id!r} in store {self.path}")
            self._db.execute(_RUN_EVENT, (event, run_id))

    def list_runs(self, graph_name: Optional[str] = None, user_id: Optional[str] = None, *,
                  limit: Optional[int] = None, since: Any = None, until: Any = None,
                  status: Any = None) -> List[Dict[str, Any]]:
        """Return run dicts, newest first (see :meth:`Store.list_runs`)."""
        clauses, params = ["1"], []
        for column, op, value in (("graph_name", "=", graph_name), ("user_id", "=", user_id),
                                  ("created_at", ">=", None if since is None else _time_bound(since, "since", False)),
                                  ("created_at", "<", None if until is None else _time_bound(until, "until", True))):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        if status is not None:
            values = _state_values(status, RunState)
            clauses.append("status IN " + _in_list(values) if values else "0")
            params.extend(values)
        sql = f"{_RUN_SELECT} WHERE {' AND '.join(clauses)} ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += f" LIMIT {max(0, int(limit))}"
        return [_run_dict(row) for row in self._read(sql, params)]

    # -- task specs ---------------------------------------------------------------

    def insert_task_spec(self, run_id: str, task: str, is_array: bool, config: Mapping[str, Any],
                         deps: Iterable[str]) -> None:
        """Record one task; its position is the number of tasks recorded before it."""
        with self.transaction():
            position = self._read("SELECT COUNT(*) FROM task_specs WHERE run_id = ?", (run_id,))[0][0]
            self.insert_task_specs(run_id, [{"task_name": task, "is_array": is_array, "config": config,
                                             "position": position, "dependencies": deps}])

    def insert_task_specs(self, run_id: str, specs: Iterable[Mapping[str, Any]]) -> None:
        """Record many tasks (and their dependencies) in one transaction."""
        specs = list(specs)
        rows = [(run_id, s["task_name"], int(bool(s.get("is_array"))), _json_dumps(dict(s.get("config") or {})),
                 int(s.get("position", i))) for i, s in enumerate(specs)]
        deps = [(run_id, s["task_name"], dep) for s in specs for dep in sorted(set(s.get("dependencies") or ()))]
        with self.transaction():
            self._db.executemany("INSERT INTO task_specs (run_id, task_name, is_array, config, position) "
                                 "VALUES (?, ?, ?, ?, ?)", rows)
            self._db.executemany("INSERT INTO task_dependencies (run_id, task_name, depends_on) VALUES (?, ?, ?)",
                                 deps)

    def get_task_specs(self, run_id: str) -> List[Dict[str, Any]]:
        """Return the run's task dicts ordered by position."""
        deps = self.list_task_dependencies(run_id)
        rows = self._read("SELECT task_name, is_array, config, position, width FROM task_specs WHERE run_id = ? "
                          "ORDER BY position, rowid", (run_id,))
        return [{"task_name": name, "is_array": bool(is_array), "config": _json_loads(config) or {},
                 "position": position, "width": width, "dependencies": deps.get(name, [])}
                for name, is_array, config, position, width in rows]

    def set_task_width(self, run_id: str, task: str, width: int) -> None:
        """Persist a task's expanded width; StoreError if the run has no such task."""
        if not self._write("UPDATE task_specs SET width = ? WHERE run_id = ? AND task_name = ?",
                           (int(width), run_id, task)):
            raise self._error(f"run {run_id!r} has no task {task!r}")

    def list_task_dependencies(self, run_id: str) -> Dict[str, List[str]]:
        """Return ``{task: sorted dependencies}`` for every task of the run."""
        rows = self._read("SELECT s.task_name, d.depends_on FROM task_specs s LEFT JOIN task_dependencies d "
                          "ON d.run_id = s.run_id AND d.task_name = s.task_name WHERE s.run_id = ? "
                          "ORDER BY s.position, s.rowid, d.depends_on", (run_id,))
        result: Dict[str, List[str]] = {}
        for task, dep in rows:
            result.setdefault(task, [])
            if dep is not None:
                result[task].append(dep)
        return result

    # -- instances: reads ---------------------------------------------------------

    def get_task_instance(self, run_id: str, task: str, index: Optional[int]) -> Optional[Dict[str, Any]]:
        """Return one instance dict (``index`` None: the singleton), or None."""
        rows = self._read(_INSTANCE_SELECT + " WHERE run_id = ? AND task_name = ? AND array_index IS ?",
                          (run_id, task, index))
        return _instance_dict(rows[0]) if rows else None

    def list_task_instances(self, run_id: str, task_name: Optional[str] = None,
                            states: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
        """Return instance dicts in creation order."""
        clause, params = _where(run_id, task_name, states)
        return [_instance_dict(row) for row in self._read(f"{_INSTANCE_SELECT} WHERE {clause} ORDER BY id", params)]

    def count_task_instances(self, run_id: str, task_name: Optional[str] = None,
                             states: Optional[Iterable[str]] = None) -> int:
        """Count instances."""
        clause, params = _where(run_id, task_name, states)
        return self._read(f"SELECT COUNT(*) FROM task_instances WHERE {clause}", params)[0][0]

    def get_singleton_output(self, run_id: str, task: str) -> Any:
        """Return a singleton's decoded output (None if none)."""
        rows = self._read("SELECT output FROM task_instances WHERE run_id = ? AND task_name = ? "
                          "AND array_index IS NULL", (run_id, task))
        return _json_loads(rows[0][0]) if rows else None

    def get_array_outputs(self, run_id: str, task: str) -> List[Any]:
        """Return an array task's decoded outputs in index order."""
        rows = self._read(f"SELECT output FROM task_instances WHERE run_id = ? AND task_name = ? {_BY_INDEX}",
                          (run_id, task))
        return _json_loads_many([text for text, in rows])

    def get_output_hash(self, run_id: str, task: str, index: Optional[int] = None) -> Optional[str]:
        """Return one instance's output hash, or None."""
        rows = self._read("SELECT output_hash FROM task_instances WHERE run_id = ? AND task_name = ? "
                          "AND array_index IS ?", (run_id, task, index))
        return rows[0][0] if rows else None

    def get_all_output_hashes(self, run_id: str, task: str) -> List[str]:
        """Return a task's output hashes in index order."""
        rows = self._read(f"SELECT output_hash FROM task_instances WHERE run_id = ? AND task_name = ? {_BY_INDEX}",
                          (run_id, task))
        return [value for value, in rows]

    def get_outputs_digest(self, run_id: str, task: str) -> Optional[str]:
        """Return the digest of :meth:`Store.get_outputs_digest`, its text joined in SQL (no row reaches Python).

        The digest of a task all of whose instances succeeded is memoised in
        ``meta`` when it is computed inside a write transaction.  SUCCESS is
        final for the engine, and every store method that could still
        change such a task's rows (the unguarded per-instance updates, a
        deletion, an insertion) drops the memo.  A whole-task cache copy
        copies it, so a cached re-run reads no output hash at all.
        """
        key = _digest_key(run_id, task)
        memo = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        if memo:
            return memo[0][0]
        text, missing, unfinished = self._read(  # the inner order is idx_instances_unique's own: no sort
            "SELECT group_concat(pair, ','), IFNULL(SUM(missing), 0), IFNULL(SUM(unfinished), 0) FROM (SELECT "
            "IFNULL(array_index, -1) || ':' || output_hash AS pair, output_hash = '' AS missing, "
            "state != 'SUCCESS' AS unfinished FROM task_instances WHERE run_id = ? AND task_name = ? "
            "ORDER BY IFNULL(array_index, -1))", (run_id, task))[0]
        if missing:
            return None
        digest = _hash16(text or "")
        if text is not None and not unfinished and self._depth:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, digest))
        return digest

    def dependency_is_satisfied(self, run_id: str, task: str) -> bool:
        """Tell whether a task is done (all of at least one instance SUCCESS, or width 0)."""
        width = self._read("SELECT width FROM task_specs WHERE run_id = ? AND task_name = ?", (run_id, task))
        if width and width[0][0] == 0:
            return True
        total, ok = self._read("SELECT COUNT(*), IFNULL(SUM(state = 'SUCCESS'), 0) FROM task_instances "
                               "WHERE run_id = ? AND task_name = ?", (run_id, task))[0]
        return total > 0 and ok == total

    def find_cached(self, task: str, identity: str) -> Optional[Dict[str, Any]]:
        """Return the newest SUCCESS instance of ``task`` with ``identity`` that ran (never for an empty identity)."""
        return self.find_cached_many(task, [identity]).get(identity)

    def find_cached_many(self, task: str, identities: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        """Return ``{identity: newest SUCCESS row dict that ran}``; only winners get their JSON decoded."""
        if not self._read("SELECT 1 FROM task_instances WHERE task_name = ? AND state = 'SUCCESS' AND cached = 0 "
                          "LIMIT 1", (task,)):
            return {}  # the task never ran here (a new workflow, or the first run of a new store)
        wanted = sorted({identity for identity in identities if identity})
        best: Dict[str, Tuple] = {}
        sql = (f"{_INSTANCE_SELECT} WHERE task_name = ? AND state = 'SUCCESS' AND cached = 0 "
               "AND identity IN {into} ORDER BY updated_at, id")  # served by idx_instances_source
        for row in self._read_chunked(sql, wanted, (task,)):
            best[row[9]] = row  # later rows are newer
        return {identity: _instance_dict(row) for identity, row in best.items()}

    def copy_cached_task(self, run_id: str, task: str, key: str) -> Optional[int]:
        """Copy a whole task from the run recorded under ``key``, in SQL (nothing is decoded)."""
        try:
            with self.transaction():
                return self._copy_task(run_id, task, key)
        except _TaskNotWhole:
            return None  # its copy was rolled back

    def _copy_task(self, run_id: str, task: str, key: str) -> Optional[int]:
        """Copy the successful instances of the recorded run's task; _TaskNotWhole if that is not all of them."""
        found = self._db.execute("SELECT value FROM meta WHERE key = ?", (_GROUP_PREFIX + key,)).fetchone()
        if found is None or found[0] == run_id:
            return None
        source = found[0]
        width, count = self._db.execute(  # the count reads only the index; the copy below counts the successes
            "SELECT s.width, (SELECT COUNT(*) FROM task_instances WHERE run_id = s.run_id AND task_name = s.task_name) "
            "FROM task_specs s WHERE s.run_id = ? AND s.task_name = ?", (source, task)).fetchone() or (None, 0)
        if width is None or width != count:
            return None
        now = _utcnow()
        copied = self._db.execute(
            "INSERT INTO task_instances (run_id, task_name, array_index, state, input, identity, input_hash, "
            "output, output_hash, cached, reason, finished_at, created_at, updated_at) "
            "SELECT ?, task_name, array_index, 'SUCCESS', input, identity, input_hash, output, output_hash, 1, "
            f"'', ?, ?, ? FROM task_instances WHERE run_id = ? AND task_name = ? AND state = 'SUCCESS' {_BY_INDEX}",
            (run_id, now, now, now, source, task)).rowcount
        if copied != width:
            raise _TaskNotWhole(f"{source}: {copied} of {width} instances of {task!r} succeeded")
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) SELECT ?, value FROM meta WHERE key = ?",
                         (_digest_key(run_id, task), _digest_key(source, task)))  # the rows are the same
        self._db.execute("INSERT INTO events (run_id, task_name, at, event, state, reason) "
                         "VALUES (?, ?, ?, 'cached', 'SUCCESS', ?)",
                         (run_id, task, now, f"{width} instances copied from run {source}"))
        self.set_task_width(run_id, task, width)
        return width

    def remember_task(self, run_id: str, task: str, key: str) -> None:
        """Point ``key`` at ``run_id`` (the newest expansion wins)."""
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_GROUP_PREFIX + key, run_id))

    def task_state_summary(self, run_id: str) -> Dict[str, Dict[str, int]]:
        """Return ``{task: {state: n}}``."""
        summary: Dict[str, Dict[str, int]] = {}
        for task, state, count in self._read("SELECT task_name, state, COUNT(*) FROM task_instances "
                                             "WHERE run_id = ? GROUP BY task_name, state", (run_id,)):
            summary.setdefault(task, {})[state] = count
        return summary

    def instance_rows(self, run_id: str, states: Optional[Iterable[str]] = None,
                      task_name: Optional[str] = None) -> List[InstanceRow]:
        """Return light InstanceRow tuples ordered by id, JSON untouched."""
        clause, params = _where(run_id, task_name, states)
        rows = self._read(f"SELECT id, task_name, array_index, state, job_id, attempt FROM task_instances "
                          f"WHERE {clause} ORDER BY id", params)
        return list(map(InstanceRow._make, rows))

    def task_durations(self, graph_name: str, task: str, exclude_run: str = "", runs: int = 20,
                       limit: int = 1000) -> List[float]:
        """Return run seconds of the newest SUCCESS, not cached instances of ``task`` in earlier runs."""
        run_ids = [r[0] for r in self._read("SELECT run_id FROM runs WHERE graph_name = ? AND run_id != ? "
                                            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                            (graph_name, exclude_run, int(runs)))]
        rows = self._read_chunked(
            "SELECT started_at, finished_at FROM task_instances WHERE task_name = ? AND state = 'SUCCESS' "
            "AND cached = 0 AND started_at IS NOT NULL AND run_id IN {into} ORDER BY id DESC LIMIT " + str(int(limit)),
            run_ids, (task,)) if run_ids else []
        durations = (_duration(start, end) for start, end in rows)
        return [d for d in durations if d is not None][:limit]

    def list_events(self, run_id: str, since_id: int = 0) -> List[Dict[str, Any]]:
        """Return event dicts (id, run_id, task_name, array_index, instance_id, at, event, state,
        job_id, attempt, exit_code, reason) with id > ``since_id``, oldest first."""
        rows = self._read(f"SELECT {', '.join(_EVENT_COLUMNS)} FROM events WHERE run_id = ? AND id > ? ORDER BY id",
                          (run_id, int(since_id)))
        return [dict(zip(_EVENT_COLUMNS, row)) for row in rows]

    # -- instances: creation ------------------------------------------------------

    def insert_task_instance(self, run_id: str, task: str, index: Optional[int], state: Union[str, TaskState],
                             input: Any, identity: str = "", input_hash: str = "") -> int:
        """Create one instance; return its id (StoreError if it already exists)."""
        row = {"array_index": index, "state": state, "input": input, "identity": identity, "input_hash": input_hash}
        with self.transaction():
            self.insert_task_instances(run_id, task, [row])
            return self._db.execute("SELECT id FROM task_instances WHERE run_id = ? AND task_name = ? "
                                    "AND array_index IS ?", (run_id, task, index)).fetchone()[0]

    def insert_task_instances(self, run_id: str, task: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Create many instances of one task, ``_ROWS_PER_INSERT`` rows a statement (StoreError on a duplicate)."""
        now = _utcnow()
        columns = list(zip(*[self._instance_values(row, now) for row in rows]))  # the row tuples die here
        with self.transaction():
            # AUTOINCREMENT ids only grow and we hold the write lock: ours are those above the old maximum.
            first = self._db.execute("SELECT IFNULL(MAX(id), 0) FROM task_instances").fetchone()[0]
            self._db.execute("DELETE FROM meta WHERE key = ?", (_digest_key(run_id, task),))
            if columns:
                self._insert_columns(run_id, task, now, columns)
            source = "task_instances t WHERE t.id > ? ORDER BY t.id"
            self._db.execute(_EVENT_SELECT.format(at="t.created_at", source=source,
                                                  event="CASE WHEN t.cached THEN 'cached' ELSE 'created' END"),
                             (first,))

    def _insert_columns(self, run_id: str, task: str, now: str, columns: List[Tuple]) -> None:
        """Insert rows given as ``_ROW_COLUMNS`` columns, many a statement; a column equal in all rows is bound once.

        Each bound text is copied by SQLite (an allocation under a mutex):
        a state, a reason, an empty error or the start time shared by a
        whole batch is a parameter of the SELECT list, bound once per
        statement, and only the varying columns come from the VALUES rows.
        (Numbered ``?NNN`` parameters in each row would do the same, but
        Python 3.12 deprecates binding them from a sequence and 3.14
        refuses it.)  sqlite3 binds None through its adapter look-up (a
        failed attribute search, six times the cost of binding an
        integer): rows carry '' instead, which NULLIF turns into NULL.
        """
        same = [i for i, column in enumerate(columns) if column.count(column[0]) == len(column)]
        varying = [i for i in range(len(columns)) if i not in same]
        names = [_ROW_COLUMNS[i] for i in same + varying]
        # VALUES names its columns column1, column2...
        sources = ["?"] * len(same) + [f"column{k + 1}" for k in range(len(varying))]
        picks = ", ".join(f"NULLIF({source}, '')" if name in _NULLABLE_COLUMNS else source
                          for name, source in zip(names, sources))
        row = "(" + ", ".join("?" * len(varying)) + ")" if varying else "(0)"
        insert = (f"INSERT INTO task_instances (run_id, task_name, created_at, updated_at, {', '.join(names)}) "
                  f"SELECT ?, ?, ?, ?, {picks} FROM (VALUES ")
        head = [run_id, task, now, now, *(columns[i][0] for i in same)]
        rows = len(columns[0])
        for start in range(0, rows, _ROWS_PER_INSERT):
            end = min(start + _ROWS_PER_INSERT, rows)
            values = itertools.chain.from_iterable(zip(*(columns[i][start:end] for i in varying)))
            self._db.execute(insert + ", ".join([row] * (end - start)) + ")", [*head, *values])

    @staticmethod
    def _instance_values(row: Mapping[str, Any], now: str) -> Tuple:
        """Return the ``_ROW_COLUMNS`` values of one bulk instance row ('' where the column gets NULL).

        ``input_text`` and ``output_text``, when a row has them, are the
        JSON the store would write for its input and output (see
        :func:`_stored_json`): they are not encoded again.
        """
        get = row.get
        state = row["state"]
        if state not in _TASK_STATE_NAMES:
            state = _state_value(state)
        encoded = get("output_text")
        if encoded is None:
            output = get("output")
            encoded = _json_dumps(output) if output is not None or state == "SUCCESS" else ""
        finished = get("finished_at") or (now if state in _TERMINAL_NAMES else "")
        index, exit_code = get("array_index"), get("exit_code")
        return ("" if index is None else index, state,
                get("input_text") or _json_dumps(get("input", {})), get("identity") or "", get("input_hash") or "",
                encoded, get("output_hash") or "", 1 if get("cached") else 0, get("error_text") or "",
                "" if exit_code is None else exit_code, get("reason") or "", get("job_id") or "",
                get("started_at") or "", finished)

    # -- instances: state changes -------------------------------------------------

    def update_task_submitted(self, run_id: str, task: str, job_id: str,
                              indices: Optional[Iterable[int]] = None) -> int:
        """Mark PENDING/RETRYING instances of a task SUBMITTED with ``job_id``; return n."""
        where = "run_id = ? AND task_name = ? AND state IN ('PENDING', 'RETRYING')"
        with self.transaction():
            if indices is None:
                self._batch_select(where, (run_id, task))
            else:
                self._batch_select(where + " AND array_index IS ?", [(run_id, task, i) for i in indices], many=True)
            return self._batch_update("state = 'SUBMITTED', job_id = ?, reason = '', updated_at = ?",
                                      (str(job_id), _utcnow()))

    def fail_pending_tasks(self, run_id: str, task: str, text: str, indices: Optional[Iterable[int]] = None) -> int:
        """Fail PENDING/RETRYING instances of a task (or those ``indices``); return n."""
        where = "run_id = ? AND task_name = ? AND state IN ('PENDING', 'RETRYING')"
        now = _utcnow()
        with self.transaction():
            if indices is None:
                self._batch_select(where, (run_id, task))
            else:
                self._batch_select(where + " AND array_index IS ?", [(run_id, task, i) for i in indices], many=True)
            return self._batch_update("state = 'FAILED', error_text = ?, finished_at = ?, updated_at = ?",
                                      (text, now, now))

    def update_task_running(self, instance_id: int) -> None:
        """Mark one instance RUNNING (no guard; the dispatcher uses :meth:`mark_running`)."""
        now = _utcnow()
        self._change([instance_id], None, "state = 'RUNNING', started_at = ?, updated_at = ?", (now, now))

    def update_task_success(self, instance_id: int, output: Any, output_hash: str = "") -> None:
        """Mark one instance SUCCESS with its output (no guard; see :meth:`apply_results`)."""
        now = _utcnow()
        self._change([instance_id], None, "state = 'SUCCESS', output = ?, output_hash = ?, error_text = NULL, "
                     "finished_at = ?, updated_at = ?", (_json_dumps(output), output_hash or "", now, now))

    def update_task_failed(self, instance_id: int, text: str) -> None:
        """Mark one instance FAILED with ``text`` (no guard; see :meth:`fail_instances`)."""
        now = _utcnow()
        self._change([instance_id], None, "state = 'FAILED', error_text = ?, finished_at = ?, updated_at = ?",
                     (text, now, now))

    def update_task_cancelled(self, instance_id: int) -> None:
        """Mark one instance CANCELLED (no guard; see :meth:`cancel_instances`)."""
        now = _utcnow()
        self._change([instance_id], None, "state = 'CANCELLED', finished_at = ?, updated_at = ?", (now, now))

    def mark_for_retry(self, instance_id: int) -> None:
        """Move one instance to RETRYING on its next attempt (no guard; see :meth:`retry_instances`)."""
        self._change([instance_id], None, f"{_RETRY_FIELDS}, updated_at = ?", (_utcnow(),))

    def fail_instances(self, ids: Iterable[int], text: str, reason: str = "") -> int:
        """Fail the still-active instances among ``ids``; return n."""
        now = _utcnow()
        return self._change(ids, "t.state IN ('PENDING', 'SUBMITTED', 'RUNNING', 'RETRYING')",
                            "state = 'FAILED', error_text = ?, reason = ?, finished_at = ?, updated_at = ?",
                            (text, reason or "", now, now))

    def set_reasons(self, pairs: Iterable[Tuple[int, str]]) -> None:
        """Replace the recorded reason of instances (``(id, reason)`` pairs); log a ``reason`` event each."""
        rows = [(reason, int(instance_id)) for instance_id, reason in pairs]
        with self.transaction():
            self._db.executemany("UPDATE task_instances SET reason = ? WHERE id = ?", rows)
            self._batch((instance_id,) for _, instance_id in rows)
            self._batch_log(at="?", event="'reason'", params=(_utcnow(),))

    def cancel_instances(self, ids: Iterable[int], reason: str = "") -> int:
        """Cancel the PENDING/SUBMITTED/RUNNING instances among ``ids`` (``reason`` says why); return n."""
        now = _utcnow()
        return self._change(ids, "t.state IN ('PENDING', 'SUBMITTED', 'RUNNING')",
                            "state = 'CANCELLED', reason = ?, finished_at = ?, updated_at = ?",
                            (reason or "CANCELLED", now, now))

    def retry_instances(self, ids: Iterable[int]) -> int:
        """Move the FAILED/CANCELLED instances among ``ids`` to RETRYING (attempt + 1); return n."""
        return self._change(ids, "t.state IN ('FAILED', 'CANCELLED')", f"{_RETRY_FIELDS}, updated_at = ?",
                            (_utcnow(),))

    def delete_instances(self, ids: Iterable[int]) -> int:
        """Delete instances by id (logged as ``deleted`` events); return n."""
        with self.transaction():
            self._batch((int(i),) for i in ids)
            self._forget_digests()
            self._batch_log(at="?", event="'deleted'", params=(_utcnow(),))
            return self._db.execute("DELETE FROM task_instances WHERE id IN (SELECT id FROM temp.reflow_batch)"
                                    ).rowcount

    def mark_submitted(self, rows: Iterable[Tuple[int, str]]) -> int:
        """Set (instance_id, job_id) pairs SUBMITTED if still PENDING/RETRYING; return n."""
        with self.transaction():
            self._batch(((int(i), str(job)) for i, job in rows), "id, job_id")
            self._batch_keep("t.state IN ('PENDING', 'RETRYING')")
            return self._batch_update("state = 'SUBMITTED', reason = '', updated_at = ?, job_id = "
                                      "(SELECT b.job_id FROM temp.reflow_batch b WHERE b.id = task_instances.id)",
                                      (_utcnow(),))

    def mark_running(self, rows: Iterable[Tuple[int, int, Optional[str]]]) -> int:
        """Set (instance_id, attempt, started_at) RUNNING if still SUBMITTED on that attempt; return n."""
        now = _utcnow()
        with self.transaction():
            self._batch(((int(i), int(a or 0), started or now) for i, a, started in rows), "id, attempt, started_at")
            self._batch_keep("t.state = 'SUBMITTED' AND t.attempt = b.attempt")
            return self._batch_update("state = 'RUNNING', updated_at = ?, started_at = "
                                      "(SELECT b.started_at FROM temp.reflow_batch b WHERE b.id = task_instances.id)",
                                      (now,), at="t.started_at")  # when the worker started, not when we saw it

    def apply_results(self, results: Iterable[Mapping[str, Any]]) -> Tuple[int, List[Tuple[Any, str]]]:
        """Apply worker results that are still current; return (applied, rejected with reasons)."""
        results = list(results)
        with self.transaction():
            self._batch((r["instance_id"],) for r in results if type(r.get("instance_id")) is int)
            current = {i: [state, attempt] for i, state, attempt in self._db.execute(
                "SELECT t.id, t.state, t.attempt FROM temp.reflow_batch b JOIN task_instances t ON t.id = b.id")}
            accepted, rejected = self._sort_results(results, current)
            now = _utcnow()
            self._db.executemany(
                "UPDATE task_instances SET state = ?, output = ?, output_hash = ?, error_text = ?, exit_code = ?, "
                "reason = ?, job_id = COALESCE(?, job_id), started_at = COALESCE(?, started_at), finished_at = ?, "
                "input = COALESCE(?, input), identity = COALESCE(?, identity), "
                "input_hash = COALESCE(?, input_hash), cached = COALESCE(?, cached), "
                "updated_at = ? WHERE id = ?", [self._result_values(result, now) for result in accepted])
            dropped = {i for i, _ in rejected if type(i) is int} - {result["instance_id"] for result in accepted}
            self._db.executemany("DELETE FROM temp.reflow_batch WHERE id = ?", [(i,) for i in dropped])
            self._batch_log(at="t.finished_at")  # when the worker finished, so timelines are true
        return len(accepted), rejected

    @staticmethod
    def _sort_results(results: List[Mapping[str, Any]],
                      current: Dict[int, List[Any]]) -> Tuple[List[Mapping[str, Any]], List[Tuple[Any, str]]]:
        """Split results into those to apply and (instance_id, why) for the stale or malformed."""
        accepted: List[Mapping[str, Any]] = []
        rejected: List[Tuple[Any, str]] = []
        for result in results:
            instance_id: Any = result.get("instance_id")
            state, attempt = result.get("state"), result.get("attempt")
            now_state, now_attempt = current.get(instance_id, (None, None)) if type(instance_id) is int else (
                None, None)
            if type(attempt) is not int:
                why = f"result attempt {attempt!r} is not an integer"
            elif state not in ("SUCCESS", "FAILED"):
                why = f"result state {state!r} is not SUCCESS or FAILED"
            elif now_state is None:
                why = "no such instance"
            elif now_attempt != attempt:
                why = f"stale attempt {attempt} (instance is on attempt {now_attempt})"
            elif now_state not in ("SUBMITTED", "RUNNING"):
                why = f"instance is {now_state}, not SUBMITTED or RUNNING"
            else:
                accepted.append(result)
                current[instance_id][0] = state  # a second result for it in this batch is then rejected
                continue
            rejected.append((instance_id, why))
        return accepted, rejected

    @staticmethod
    def _result_values(result: Mapping[str, Any], now: str) -> Tuple:
        """Return the UPDATE parameters of one accepted result."""
        ok = result["state"] == "SUCCESS"
        exit_code = result.get("exit_code")
        reason = "" if ok else (result.get("reason") or (f"exit {exit_code}" if exit_code else "ERROR"))
        resolved = "identity" in result  # a worker resolved deferred inputs itself (forward submission)
        return (result["state"], _json_dumps(result.get("output")) if ok else None,
                (result.get("output_hash") or "") if ok else "", None if ok else (result.get("error_text") or ""),
                exit_code, reason, result.get("job_id") or None, result.get("started_at"),
                result.get("finished_at") or now,
                _json_dumps(result.get("input") or {}) if resolved else None, result.get("identity") or None,
                result.get("input_hash") or None, (1 if result.get("cached") else 0) if resolved else None,
                now, result["instance_id"])


# =============================================================================
# Cache: Merkle identities of task instances
# =============================================================================


def compute_input_hash(task: str, version: str, inputs: Any, params: Optional[Mapping[str, Any]] = None) -> str:
    """Hash what a task instance receives: its name, version, inputs and run parameters."""
    return _InputHasher(task, version, params or {}).hash(inputs)


def compute_identity(input_hash: str, upstream_hashes: Iterable[str]) -> str:
    """Combine an input hash with the output hashes of ``after=`` dependencies."""
    return _hash16(input_hash + _identity_suffix(upstream_hashes))


def _identity_suffix(upstream_hashes: Iterable[str]) -> str:
    """Return what :func:`compute_identity` appends to an input hash before hashing it."""
    return "|" + "|".join(sorted(upstream_hashes))


def compute_output_hash(output: Any) -> str:
    """Hash a task output through its canonical JSON form."""
    return _hash16(DEFAULT_CODEC.canonical_dumps(output))


class _InputHasher:
    """Hash many instances of one task quickly: the constant parts are encoded once.

    The result equals ``_hash16(canonical_dumps({"inputs": ..., "params":
    ..., "task": ..., "version": ...}))`` (keys in sorted order).
    """

    def __init__(self, task: str, version: str, params: Mapping[str, Any]) -> None:
        dumps = DEFAULT_CODEC.canonical_dumps
        self._tail = f',"params":{dumps(dict(params))},"task":{dumps(task)},"version":{dumps(str(version))}}}'

    def hash(self, inputs: Any) -> str:
        """Return the input hash of one instance."""
        return self.hash_text(DEFAULT_CODEC.canonical_dumps(inputs))

    def hash_text(self, canonical: str) -> str:
        """Return the input hash of one instance from the ``canonical_dumps`` text of its inputs."""
        return _hash16('{"inputs":' + canonical + self._tail)


def verify_cached_output(output: Any, return_type: Any, verify: Optional[Callable[[Any], bool]] = None) -> bool:
    """Tell whether a cached output may be reused.

    The first rule that applies decides: the task's ``verify(output)``; a
    ``Path`` return type (the path exists); ``list[Path]`` (all exist);
    otherwise the hit is accepted.
    """
    if verify is not None:
        try:
            return bool(verify(output))
        except Exception as exc:  # a broken verify() means "recompute", not a crash
            log.warning("verify() raised %s; treating the cache hit as a miss", exc)
            return False
    base = _strip_optional(_strip_annotated(return_type)[0])
    if _is_path_type(base):
        return output is not None and Path(output).exists()
    is_list, item = _list_item(base)
    item = _strip_optional(item) if is_list else None
    if is_list and _is_path_type(item):
        return isinstance(output, (list, tuple)) and all(Path(p).exists() for p in output)
    return True


# =============================================================================
# Executors: the base class, command runner and job resources
# =============================================================================


@_dataclass
class CommandResult(metaclass=_DataclassOnFirstUse):
    """What a scheduler command printed and returned (streams stripped)."""

    cmd: List[str]
    stdout: str
    stderr: str
    returncode: int


#: Substrings of scheduler output that mean "try again later" (schedulers.md).
TRANSIENT_MARKERS = (
    "socket timed out",
    "unable to contact slurm controller",
    "backup controller in standby",
    "resource temporarily unavailable",
    "temporarily unable to accept job",
    "zero bytes were transmitted",
    "transport endpoint is not connected",
    "connection refused",
    "connection reset",
    "cannot connect to server",
    "invalid credential",
    "premature end of message",
    "pbs_iff: cannot connect",
    "all reserved ports in use",
    "try the request again later",
    "communication failure",
    "end of file",
    "lsf is down",
    "daemon not responding",
    "lim is down",
    "cannot connect to lsf",
    "batch system is busy",
    "slave lim configuration is not ready",
    "commlib error",
    "unable to contact qmaster",
    "unable to send message to qmaster",
    "syncron message receive timeout",
    "unable to connect to flux",
    "function not implemented",
    "try again",
    "timed out",
)


def _is_transient(result: CommandResult) -> bool:
    """Tell whether a failed command is worth retrying."""
    text = f"{result.stdout}\n{result.stderr}".lower()
    return any(marker in text for marker in TRANSIENT_MARKERS)


def _is_uncertain(result: CommandResult) -> bool:
    """Tell whether a failed submit may have gone through: it timed out, here or in the scheduler's client."""
    text = f"{result.stdout}\n{result.stderr}".lower()
    return result.returncode == 124 or "timed out" in text


def run_cmd(
    cmd: Sequence[str],
    *,
    timeout: float = 60.0,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[Union[str, Path]] = None,
    check: bool = True,
    input: Optional[str] = None,
    retries: int = 0,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    transient: Callable[[CommandResult], bool] = _is_transient,
) -> CommandResult:
    """Run a command (never through a shell) and capture its output.

    Transient failures (see ``TRANSIENT_MARKERS``, or the ``transient``
    predicate) and timeouts are retried ``retries`` times with capped
    exponential backoff.  With ``check``, a final failure raises
    :class:`ExecutorError` (or :class:`TransientSchedulerError`) carrying the
    argv, return code and the tail of stderr.  A missing binary raises
    ExecutorError with one line naming it.
    """
    argv = [str(word) for word in cmd]
    delay = backoff
    for attempt in range(retries + 1):
        result = _run_once(argv, timeout, env, cwd, input)
        if result.returncode == 0 or (not check and not transient(result)):
            return result
        if attempt < retries and transient(result):
            log.warning("%s failed (%s); retrying in %.1fs", argv[0], _tail(result.stderr), delay)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)
            continue
        break
    if not check:
        return result
    error = TransientSchedulerError if transient(result) else ExecutorError
    detail = _tail(result.stderr or result.stdout) or "no output"
    raise error(f"{_shell_join(argv[:3])}{' ...' if len(argv) > 3 else ''} exited "
                f"{result.returncode}: {detail}", result)


def _run_once(argv, timeout, env, cwd, input) -> CommandResult:
    """Run argv once; a timeout becomes returncode 124 with 'timed out'."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input,
            env=dict(env) if env is not None else None, cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ExecutorError(f"command not found: {argv[0]!r} (is the scheduler installed and on PATH?)") from None
    except subprocess.TimeoutExpired:
        return CommandResult(argv, "", f"{argv[0]}: timed out after {timeout:g}s", 124)
    return CommandResult(argv, proc.stdout.strip(), proc.stderr.strip(), proc.returncode)


def _tail(text: str, lines: int = 3) -> str:
    """Return the last few non-empty lines of ``text`` joined by ' | '."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


@_dataclass
class JobResources(metaclass=_DataclassOnFirstUse):
    """What one batch job (or array) asks the scheduler for.

    ``output_path``/``error_path`` may contain the tokens ``{job_id}`` and
    ``{array_index}``, which each executor turns into its own placeholders.
    ``array`` is a range spec ``FIRST-LAST`` with an optional ``%THROTTLE``.
    """

    job_name: str = ""
    cpus: int = DEFAULT_CPUS
    time_limit: str = DEFAULT_TIME
    mem: str = DEFAULT_MEM
    array: Optional[str] = None
    output_path: Optional[str] = None
    error_path: Optional[str] = None
    submit_options: Optional[Dict[str, Any]] = None
    backend: Optional[str] = None
    extra: Optional[Dict[str, Any]] = None
    gpus: int = 0
    workdir: Optional[str] = None
    env: Optional[Dict[str, str]] = None

    @property
    def options(self) -> Dict[str, Any]:
        """Merged scheduler options: ``submit_options`` then ``extra``."""
        merged = dict(self.submit_options or {})
        merged.update(self.extra or {})
        return merged

    partition = property(lambda self: self.options.get("partition") or self.options.get("queue"))
    account = property(lambda self: self.options.get("account") or self.options.get("project"))
    mail_user = property(lambda self: self.options.get("mail_user"))
    mail_type = property(lambda self: self.options.get("mail_type"))
    signal = property(lambda self: self.options.get("signal"))

    def array_bounds(self) -> Optional[Tuple[int, int, Optional[int]]]:
        """Return ``(first, last, throttle)`` of ``array``, or None."""
        if not self.array:
            return None
        spec, _, throttle = str(self.array).partition("%")
        first, _, last = spec.partition("-")
        return int(first), int(last or first), int(throttle) if throttle else None


@_dataclass(frozen=True)
class JobInfo(metaclass=_DataclassOnFirstUse):
    """One job's state as the scheduler reports it.

    ``state`` is one of ``JOB_STATES``; ``reason`` keeps the scheduler's own
    word (OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, PREEMPTED, ``exit 3``,
    ``signal 9``...) for status and logs.
    """

    state: str
    reason: str = ""
    exit_code: Optional[int] = None


#: Job states an executor reports (``job_states``); finished ones are final.
JOB_STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "SUSPENDED", "TIMEOUT", "OUT_OF_MEMORY")
FINAL_JOB_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"})


class Executor(abc.ABC):
    """Base of every executor: submit jobs, query their states, cancel them.

    Subclasses set the class attributes and implement :meth:`submit`,
    :meth:`cancel` and :meth:`job_state`; the batched :meth:`job_infos`,
    :meth:`cancel_many` and :meth:`submit_array` should be overridden so that
    a dispatch cycle costs one scheduler call per kind of operation.
    """

    #: Short name used by ``resolve_executor`` and stored with a run.
    name: str = ""
    #: Environment variable holding the array index inside a job.
    array_index_env_var: str = ""
    #: First index of a native array (Slurm/PBS/Flux 0, LSF/SGE 1).
    array_base: int = 0
    #: Most elements one native array may hold (larger waves are split).
    max_array_size: int = 1000
    #: Option aliases mapped to native option names (native wins).
    _KEY_ALIASES: Dict[str, str] = {}
    #: Option names reflow uses itself and never passes to the scheduler.
    _internal_keys: frozenset = frozenset({"backend", "elements_per_job"})
    #: Binary names this executor runs, with their config/env keys.
    _binaries: Tuple[str, ...] = ()

    def __init__(self, mode: str = "", python: str = "", config: Optional[Config] = None) -> None:
        self.mode = mode or self.name
        self.python = python or ""
        self.config = config
        configured = str(os.environ.get("REFLOW_MAX_ARRAY_SIZE") or (config and config.get("executor.max_array_size"))
                         or "").strip()
        if configured.isdigit() and int(configured) > 0:  # a site's MaxArraySize
            self.max_array_size = int(configured)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"

    @abc.abstractmethod
    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Submit one job (or one native array) running ``command``; return its id."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """Cancel one job; an id that already finished is not an error."""

    @abc.abstractmethod
    def job_state(self, job_id: str) -> Optional[str]:
        """Return one job's state (one of ``JOB_STATES``) or None if unknown."""

    def job_states(self, job_ids: Iterable[str]) -> Dict[str, Optional[str]]:
        """Return the states of many jobs; unknown ids map to None."""
        ids = list(dict.fromkeys(job_ids))
        infos = self.job_infos(ids)
        return {job_id: (infos[job_id].state if job_id in infos else None) for job_id in ids}

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Return the state and reason of many jobs, ideally in one query.

        Ids the scheduler does not know are left out.  The default asks
        :meth:`job_state` once per id; every scheduler overrides it.
        """
        infos = {}
        for job_id in dict.fromkeys(job_ids):
            state = self.job_state(job_id)
            if state is not None:
                infos[job_id] = JobInfo(state)
        return infos

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel many jobs, ideally in one scheduler call."""
        for job_id in dict.fromkeys(job_ids):
            self.cancel(job_id)

    def find_jobs(self, name_prefix: str) -> Dict[str, List[str]]:
        """Return ``{job name: [job ids]}`` of live jobs whose name starts with ``name_prefix``.

        A dispatcher that recovers from a crash adopts these instead of
        submitting twice.  The default knows no jobs: every scheduler and the
        local executor override it with one query.
        """
        return {}

    def array_id(self, job_id: str) -> str:
        """Return the id of the native array an element id belongs to (a plain job's own id)."""
        return job_id

    def element_id(self, array_id: str, position: int) -> str:
        """Return the id of element ``position`` (native numbering) of an array."""
        return f"{array_id}_{position}"

    def submit_array(self, resources: JobResources, command: Sequence[str], size: int,
                     throttle: Optional[int] = None) -> List[str]:
        """Submit a native array of ``size`` elements; return element ids in order.

        Elements are numbered from :attr:`array_base`; the worker maps its
        index back to a task instance with ``--positions``/``--base``.
        """
        first = self.array_base
        spec = f"{first}-{first + size - 1}" + (f"%{throttle}" if throttle else "")
        array_id = self.submit(dataclasses.replace(resources, array=spec), command)
        return [self.element_id(array_id, first + offset) for offset in range(size)]

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Return submit options making a job wait for ``job_ids`` (``kind`` is afterany or afterok).

        Contract for ``afterok``: a job whose dependency failed must end by
        itself (Slurm ``--kill-on-invalid-dep``, PBS and Flux do so), never
        stay queued; where a scheduler would keep it pending (LSF) or has no
        afterok (Grid Engine), an afterany-style wait is used instead and the
        worker finds the failed upstream itself.
        """
        return {"dependency": f"{kind}:" + ":".join(job_ids)} if job_ids else {}

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Return submit options making a job start no earlier than ``seconds`` from now."""
        return {}

    def _normalize_options(self, options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """Map aliases to native names and drop internal keys; native names win."""
        native: Dict[str, Any] = {}
        aliased: Dict[str, Any] = {}
        for key, value in (options or {}).items():
            if key in self._internal_keys:
                continue
            target = self._KEY_ALIASES.get(key)
            if target is None:
                native[key] = value
            else:
                aliased.setdefault(target, value)
        for key, value in aliased.items():
            native.setdefault(key, value)
        return native

    def describe(self) -> Dict[str, Any]:
        """Return what must be stored with a run to rebuild this executor."""
        binaries = {name: getattr(self, name) for name in self._binaries}
        return {"name": self.name, "mode": self.mode, "python": self.python, "binaries": binaries}


# =============================================================================
# Executors: machinery shared by the batch schedulers
# =============================================================================

#: Environment variables tuning how scheduler commands are retried, and how long one may take.
SCHED_RETRIES_ENV, SCHED_BACKOFF_ENV = "REFLOW_SCHED_RETRIES", "REFLOW_SCHED_BACKOFF"
SCHED_TIMEOUT_ENV = "REFLOW_SCHED_TIMEOUT"
#: Shell variable holding a newline inside job scripts (see ``_sh_word``).
_NL_VAR = "__reflow_nl"
_NL_SETUP = f'{_NL_VAR}="$(printf \'\\n_\')"; {_NL_VAR}="${{{_NL_VAR}%_}}"'
_ENV_NAME_RE = _lazy_regex(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN_RE = _lazy_regex(r"(\{job_id\}|\{array_index\})")
#: Slurm-style mail types and the letters of PBS (``-m``) and SGE (``-m``).
_PBS_MAIL = {"NONE": "n", "BEGIN": "b", "END": "e", "FAIL": "a", "ALL": "abe", "TIME_LIMIT": "a",
             "REQUEUE": "a", "INVALID_DEPEND": "a", "ARRAY_TASKS": ""}
_SGE_MAIL = {"NONE": "n", "BEGIN": "b", "END": "e", "FAIL": "a", "ALL": "beas", "SUSPEND": "s",
             "TIME_LIMIT": "a", "REQUEUE": "a", "INVALID_DEPEND": "a", "ARRAY_TASKS": ""}


def _sched_retries() -> int:
    """Return how often a transient scheduler failure is retried (``REFLOW_SCHED_RETRIES``, 5)."""
    text = os.environ.get(SCHED_RETRIES_ENV, "").strip()
    return int(text) if text.isdigit() else 5


def _sched_timeout() -> float:
    """Return how long one scheduler command may take before it counts as a (transient) timeout (60 s)."""
    try:
        return max(0.1, float(os.environ.get(SCHED_TIMEOUT_ENV, "") or 60.0))
    except ValueError:
        return 60.0


def _sched_backoff() -> float:
    """Return the first retry delay in seconds (``REFLOW_SCHED_BACKOFF``, 1.0)."""
    try:
        return max(0.0, float(os.environ.get(SCHED_BACKOFF_ENV, "") or 1.0))
    except ValueError:
        return 1.0


def _current_user() -> str:
    """Return the login name of this process: ``$LOGNAME`` or ``$USER`` (as getpass does), else the passwd entry.

    It owns the runs this process creates and names "my jobs" in scheduler
    queries.  The environment comes first because a passwd lookup reads
    NSS files (or asks LDAP) on every run.  Without a passwd entry: the
    numeric uid, which ``squeue -u`` and ``qstat -u`` accept.
    """
    named = os.environ.get("LOGNAME") or os.environ.get("USER")
    if named:
        return named
    try:
        import pwd  # POSIX only; imported here because Windows lacks it
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USERNAME") or (str(os.getuid()) if hasattr(os, "getuid") else "unknown")


def _mem_mib(value: Union[str, int]) -> int:
    """Return a memory size in MiB, rounded up (``4G`` -> 4096)."""
    return -(-parse_mem(value) // 1024)


def _as_list(value: Any) -> List[Any]:
    """Return ``value`` as a list (lists and tuples stay, scalars are wrapped)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _sh_word(value: Any) -> str:
    """Quote one word for a POSIX job script.

    A newline is never written literally: it would start a new script line,
    and a line beginning with ``#$`` or ``#PBS`` is a scheduler directive.
    The pieces are joined with ``"$__reflow_nl"``, set up by ``_NL_SETUP``.
    """
    text = str(value)
    if "\n" not in text:
        return shlex.quote(text)
    return f'"${_NL_VAR}"'.join(shlex.quote(piece) for piece in text.split("\n"))


def _sh_path(path: str, tokens: Mapping[str, str]) -> str:
    """Quote a path for a script, turning ``{job_id}``/``{array_index}`` into shell expansions."""
    words = []
    for piece in _TOKEN_RE.split(path):
        if piece in tokens:
            words.append(f'"{tokens[piece]}"' if tokens[piece].startswith("$") else _sh_word(tokens[piece]))
        elif piece:
            words.append(_sh_word(piece))
    return "".join(words) or "''"


def _native_path(path: str, tokens: Mapping[str, str], escape: Callable[[str], str] = lambda s: s) -> str:
    """Replace the ``{job_id}``/``{array_index}`` tokens by the scheduler's own placeholders."""
    return "".join(tokens[p] if p in tokens else escape(p) for p in _TOKEN_RE.split(path))


def _mail_letters(value: Any, table: Mapping[str, str], scheduler: str) -> str:
    """Translate Slurm-style mail types (``END,FAIL``) to ``-m`` letters; letters pass through."""
    text = ",".join(str(v) for v in _as_list(value))
    if re.fullmatch(r"[a-z]+", text):
        return text
    letters = ""
    for word in filter(None, (w.strip().upper() for w in text.split(","))):
        if word not in table:
            raise ExecutorError(f"{scheduler}: unknown mail_type {word!r}." + _suggest(word, table))
        letters += "".join(c for c in table[word] if c not in letters)
    return letters or "n"


def _long_flags(options: Mapping[str, Any]) -> List[str]:
    """Render options the Slurm/Flux way: ``snake_case`` -> ``--kebab-case=VALUE``.

    True is a bare flag, False/None are dropped, a list repeats the flag and
    a key starting with ``-`` is used verbatim.
    """
    argv: List[str] = []
    for key, value in options.items():
        flag = key if key.startswith("-") else "--" + key.replace("_", "-")
        for item in _as_list(value):
            if item is None or item is False:
                continue
            if item is True:
                argv.append(flag)
            elif flag.startswith("--"):
                argv.append(f"{flag}={item}")
            else:
                argv += [flag, str(item)]
    return argv


def _expand_task_spec(spec: str) -> List[int]:
    """Expand an array index spec: ``3-10%2``, ``1,3,5-7`` or SGE's ``2-10:2``."""
    out: List[int] = []
    for piece in filter(None, spec.split("%")[0].split(",")):
        bounds, _, step = piece.partition(":")
        low, _, high = bounds.partition("-")
        out.extend(range(int(low), int(high or low) + 1, int(step or 1)))
    return out


def _aggregate(infos: Sequence[JobInfo]) -> JobInfo:
    """Summarise the elements of an array as one JobInfo (active wins, then the first failure)."""
    active = [i for i in infos if i.state not in FINAL_JOB_STATES]
    if active:
        running = [i for i in active if i.state == "RUNNING"]
        return JobInfo("RUNNING" if running else active[0].state)
    failed = [i for i in infos if i.state != "COMPLETED"]
    return failed[0] if failed else JobInfo("COMPLETED", "", 0)


def _exit_info(code: int) -> JobInfo:
    """Map a shell-style exit status (128+N = signal N) to a JobInfo."""
    if code == 0:
        return JobInfo("COMPLETED", "", 0)
    if code > 128:
        return JobInfo("FAILED", f"signal {code - 128}", code)
    return JobInfo("FAILED", f"exit {code}", code)


def _leading_int(text: Any) -> Optional[int]:
    """Return the integer at the start of ``text`` (``137 (Killed)`` -> 137), or None."""
    match = re.match(r"\s*(-?\d+)", str(text))
    return int(match.group(1)) if match else None


class _BatchExecutor(Executor):
    """Common code of the batch-scheduler executors (not for direct use).

    Subclasses name their binaries in ``_binaries`` (also their constructor
    keywords), build argv lists, and parse each scheduler's documented output.
    """

    #: Exit codes of the scheduler's commands that mean "try again" (PBS).
    _transient_codes: Tuple[int, ...] = ()

    @classmethod
    def from_environment(cls, config: Optional[Config] = None) -> _BatchExecutor:
        """Build the executor with binaries from ``REFLOW_<CMD>``, then the config, then plain names."""
        binaries = {name: _binary_path(name, config) for name in cls._binaries}
        python = os.environ.get("REFLOW_PYTHON") or str(getattr(config, "executor_python", "") or "")
        return cls(python=python, config=config, **binaries)

    # ---------------------------------------------------------- commands

    def _transient(self, result: CommandResult) -> bool:
        """Tell whether a failed scheduler command is worth retrying."""
        return result.returncode in self._transient_codes or _is_transient(result)

    #: Whether a submit that may have gone through anyway (it timed out) is simply retried.  The
    #: dispatcher turns this off while it submits task jobs: their names are unique, so it looks
    #: them up instead of risking a second job (see ``_Dispatcher._submit_or_adopt``).
    retry_uncertain_submits = True

    def _run(self, argv: Sequence[str], *, check: bool = True, input: Optional[str] = None,
             env: Optional[Mapping[str, str]] = None, submit: bool = False) -> CommandResult:
        """Run a scheduler command with transient-error retries.

        A ``submit`` command that timed out raises SubmitUncertain instead of
        being retried when ``retry_uncertain_submits`` is off.
        """
        careful = submit and not self.retry_uncertain_submits
        transient = (lambda r: self._transient(r) and not _is_uncertain(r)) if careful else self._transient
        try:
            return run_cmd(argv, check=check, input=input, env=env, retries=_sched_retries(),
                           backoff=_sched_backoff(), transient=transient, timeout=_sched_timeout())
        except ExecutorError as exc:
            if careful and exc.result is not None and _is_uncertain(exc.result):
                raise SubmitUncertain(str(exc), exc.result) from None
            raise

    def _dry_run(self, argv: Sequence[str]) -> str:
        """Log what would be submitted and return ``DRYRUN``."""
        log.info("dry-run: %s", _shell_join(argv))
        return "DRYRUN"

    def _check_benign(self, result: CommandResult, benign: Sequence[str]) -> None:
        """Raise ExecutorError unless a failed cancel only reported ids that are already gone.

        The messages are read from stderr (stdout when stderr is empty);
        ``benign`` holds the lower-case phrases that are harmless.
        """
        if result.returncode == 0:
            return
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        bad = [line for line in lines if not any(phrase in line.lower() for phrase in benign)]
        if bad or not lines:
            detail = _tail("\n".join(bad)) or "no output"
            raise ExecutorError(f"{result.cmd[0]} exited {result.returncode}: {detail}", result)

    # ------------------------------------------------------ job scripts

    def _script_lines(self, resources: JobResources, command: Sequence[str],
                      setup: Sequence[str] = (), redirect: str = "") -> List[str]:
        """Return the body of a job script: env exports, setup lines, redirection, exec."""
        if not command:
            raise ExecutorError(f"{self.name}: empty command for job {resources.job_name!r}")
        lines = [_NL_SETUP, f"export {JOB_ENV_MARKER}=1"]
        for key, value in (resources.env or {}).items():
            if not _ENV_NAME_RE.match(str(key)):
                raise ExecutorError(f"job {resources.job_name!r}: invalid environment variable name {key!r}")
            lines.append(f"export {key}={_sh_word(value)}")
        lines += list(setup)
        if redirect:
            lines.append(f"exec {redirect}")
        lines.append("exec " + " ".join(_sh_word(word) for word in command))
        return lines

    def _write_script(self, resources: JobResources, lines: Sequence[str]) -> Path:
        """Write an executable job script under ``<workdir or cwd>/.reflow/jobs/``."""
        directory = _private_dir(Path(resources.workdir or os.getcwd()) / ".reflow" / "jobs")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", resources.job_name or "job")[:60]
        path = directory / f"{stem}-{_random_hex(10)}.sh"
        _atomic_write(path, "\n".join(["#!/bin/sh", f"# reflow {self.name} job script", *lines]) + "\n", 0o700)
        return path

    # ---------------------------------------------------------- options

    def _strict_flags(self, options: Mapping[str, Any], table: Mapping[str, Tuple[str, Optional[str]]]) -> List[str]:
        """Render options through a table of known keys; ``-x`` keys pass verbatim.

        ``table`` maps a key to ``(flag, template)``; a None template makes a
        bare flag.  An unknown key raises ExecutorError naming it.
        """
        argv: List[str] = []
        for key, value in options.items():
            if not key.startswith("-") and key not in table:
                raise ExecutorError(f"{self.name}: unknown submit option {key!r} (use a known key or a raw "
                                    f"'-flag').{_suggest(key, [*table, *self._KEY_ALIASES])}")
            flag, template = (key, "{}") if key.startswith("-") else table[key]
            for item in _as_list(value):
                if item is None or item is False:
                    continue
                if item is True or template is None:
                    argv.append(flag)
                else:
                    argv += [flag, template.format(item)]
        return argv

    def _unsupported(self, options: Mapping[str, Any], keys: Mapping[str, str]) -> None:
        """Raise ExecutorError for a configured option this scheduler cannot honour."""
        for key, hint in keys.items():
            if options.get(key) not in (None, False, ""):
                raise ExecutorError(f"{self.name}: submit option {key!r} is not supported ({hint})")

    # ------------------------------------------------ single-id helpers

    def job_state(self, job_id: str) -> Optional[str]:
        """Return one job's state (one of ``JOB_STATES``), or None when the scheduler does not know it."""
        info = self.job_infos([job_id]).get(job_id)
        return info.state if info else None

    def cancel(self, job_id: str) -> None:
        """Cancel one job; an id that already finished or is unknown is not an error."""
        self.cancel_many([job_id])

    def _master_id(self, job_id: str) -> str:
        """Return the id of the array an element id belongs to (the id itself otherwise)."""
        return job_id

    def array_id(self, job_id: str) -> str:
        """Return the id of the native array an element id belongs to."""
        return self._master_id(job_id)

    def _masters(self, job_ids: Iterable[str]) -> List[str]:
        """Return the distinct master ids of ``job_ids``, in first-seen order."""
        return list(dict.fromkeys(self._master_id(str(j)) for j in job_ids if j and j != "DRYRUN"))

    def _pick(self, job_ids: Iterable[str], rows: Mapping[str, JobInfo],
              elements: Mapping[str, List[JobInfo]]) -> Dict[str, JobInfo]:
        """Answer each asked id from per-id rows; an array asked by master id aggregates its elements."""
        infos: Dict[str, JobInfo] = {}
        for job_id in dict.fromkeys(job_ids):
            if elements.get(job_id):
                infos[job_id] = _aggregate(elements[job_id])
            elif job_id in rows:
                infos[job_id] = rows[job_id]
        return infos

    def _job_name(self, name: str) -> str:
        """Return ``name`` as the scheduler will store it (see SGE)."""
        return name

    def find_jobs(self, name_prefix: str) -> Dict[str, List[str]]:
        """Return ``{job name: [job ids]}`` of this user's live jobs whose name starts with a prefix.

        One scheduler query.  Arrays are reported once, by their master id.
        A restarted dispatcher uses this to adopt jobs it submitted before
        it died instead of submitting them twice.
        """
        found: Dict[str, List[str]] = {}
        prefix = self._job_name(name_prefix)
        for job_id, name in self._list_jobs():
            if name.startswith(prefix):
                ids = found.setdefault(name, [])
                master = self._master_id(job_id)
                if master not in ids:
                    ids.append(master)
        return found

    def _list_jobs(self) -> List[Tuple[str, str]]:
        """Return ``(job id, job name)`` of this user's live jobs."""
        raise NotImplementedError


def _binary_path(name: str, config: Optional[Config]) -> str:
    """Return the binary for ``name``: ``REFLOW_<NAME>``, else the config, else the plain name."""
    from_env = os.environ.get(f"REFLOW_{name.upper()}")
    if from_env:
        return from_env
    resolver = getattr(config, "executor_binary", None)
    return str(resolver(name) or name) if resolver is not None else name


def _check_base(resources: JobResources, executor: Executor) -> Optional[Tuple[int, int, Optional[int]]]:
    """Return the array bounds, refusing indices below the scheduler's first index (LSF/SGE: 1)."""
    bounds = resources.array_bounds()
    if bounds and bounds[0] < executor.array_base:
        raise ExecutorError(f"{executor.name}: array {resources.array!r} of job {resources.job_name!r} must "
                            f"start at {executor.array_base} or above")
    return bounds


def _clock_after(seconds: int) -> _dt.datetime:
    """Return the local wall-clock time ``seconds`` from now, rounded up to a whole second."""
    return (_dt.datetime.now() + _dt.timedelta(seconds=max(0, int(seconds)) + 1)).replace(microsecond=0)


# =============================================================================
# Executors: Slurm
# =============================================================================


class SlurmExecutor(_BatchExecutor):
    """Submit jobs with ``sbatch``, query ``sacct`` (``squeue`` as fallback), cancel with ``scancel``.

    The command runs through ``sbatch --wrap`` (every word quoted); options
    render as ``--kebab-case=value``.  Arrays are ``--array=F-L%T``, elements
    ``<master>_<index>``.
    """

    name = "slurm"
    array_index_env_var = "SLURM_ARRAY_TASK_ID"
    array_base = 0
    max_array_size = 1000
    _KEY_ALIASES = {"queue": "partition", "project": "account", "gpu": "gpus"}
    _binaries = ("sbatch", "scancel", "sacct", "squeue")

    #: Slurm job states (sacct/squeue long names) and what they mean here.
    _STATES = {
        "PENDING": "PENDING", "CONFIGURING": "RUNNING", "RUNNING": "RUNNING", "COMPLETING": "RUNNING",
        "STAGE_OUT": "RUNNING", "SIGNALING": "RUNNING", "RESIZING": "RUNNING", "SUSPENDED": "SUSPENDED",
        "STOPPED": "SUSPENDED", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
        "RESV_DEL_HOLD": "PENDING", "SPECIAL_EXIT": "FAILED", "REVOKED": "CANCELLED",
        "COMPLETED": "COMPLETED", "FAILED": "FAILED", "CANCELLED": "CANCELLED", "TIMEOUT": "TIMEOUT",
        "NODE_FAIL": "FAILED", "PREEMPTED": "FAILED", "BOOT_FAIL": "FAILED", "DEADLINE": "FAILED",
        "OUT_OF_MEMORY": "OUT_OF_MEMORY",
    }
    _CANCEL_BENIGN = ("invalid job id", "already completing or completed", "job/step already")

    def __init__(self, mode: str = "sbatch", sbatch: str = "sbatch", scancel: str = "scancel",
                 sacct: str = "sacct", python: str = "", config: Optional[Config] = None,
                 squeue: str = "squeue") -> None:
        super().__init__(mode=mode, python=python, config=config)
        self.sbatch, self.scancel, self.sacct, self.squeue = sbatch, scancel, sacct, squeue

    # ------------------------------------------------------------ submit

    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Submit one job or array with ``sbatch --parsable``; return its (master) id."""
        argv = [self.sbatch, "--parsable", *self._resource_flags(resources), *self._option_flags(resources),
                "--wrap", "\n".join(self._script_lines(resources, command))]
        if self.mode == "dry-run":
            return self._dry_run(argv)
        return self._parse_submit(self._run(argv, submit=True))

    def _resource_flags(self, resources: JobResources) -> List[str]:
        """Map the JobResources fields to sbatch flags."""
        seconds = parse_time(resources.time_limit)
        days, rest = divmod(seconds, 86400)
        argv = [f"--job-name={resources.job_name}"] if resources.job_name else []
        argv += [f"--cpus-per-task={int(resources.cpus)}", f"--mem={_mem_mib(resources.mem)}M",
                 f"--time={days}-{format_hms(rest)}" if days else f"--time={format_hms(seconds)}"]
        if resources.array:
            argv.append(f"--array={resources.array}")
        tokens = {"{job_id}": "%A" if resources.array else "%j", "{array_index}": "%a" if resources.array else ""}
        for flag, path in (("--output", resources.output_path), ("--error", resources.error_path)):
            if path:  # A literal % must be doubled, or Slurm reads it as a placeholder.
                argv.append(f"{flag}={_native_path(path, tokens, lambda s: s.replace('%', '%%'))}")
        if resources.workdir:
            argv.append(f"--chdir={resources.workdir}")
        return argv

    def _option_flags(self, resources: JobResources) -> List[str]:
        """Render gpus and the submit options (aliases mapped) as sbatch flags."""
        options = self._normalize_options(resources.options)
        gpus = options.pop("gpus", None) or resources.gpus
        if gpus:
            options["gpus"] = gpus
        if isinstance(options.get("mail_type"), (list, tuple)):
            options["mail_type"] = ",".join(str(v) for v in options["mail_type"])
        return _long_flags(options)

    @staticmethod
    def _parse_submit(result: CommandResult) -> str:
        """Return the job id ``sbatch --parsable`` printed.

        Samples: ``123``, ``123;cluster``, or plugin lines then ``123``
        (the last non-empty line counts); ``Submitted batch job 123``.
        """
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        match = re.match(r"^(?:Submitted batch job )?(\d+)(?:;\S*|\s+on cluster \S+)?$", lines[-1]) if lines else None
        if not match:
            raise ExecutorError(f"sbatch printed no job id: {result.stdout.strip()[:200]!r}", result)
        return match.group(1)

    # ------------------------------------------------ ids, dependencies

    def element_id(self, array_id: str, position: int) -> str:
        """Return ``<master>_<index>``."""
        return f"{array_id}_{position}"

    def _master_id(self, job_id: str) -> str:
        return job_id.split("_")[0]

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Return ``{"dependency": "afterany:a:b"}`` (elements depend on their array).

        ``afterok`` also sets ``kill_on_invalid_dep=yes`` so that a job whose
        upstream failed is removed instead of pending forever.
        """
        masters = self._masters(job_ids)
        if not masters:
            return {}
        options: Dict[str, Any] = {"dependency": f"{kind}:" + ":".join(masters)}
        if kind == "afterok":
            options["kill_on_invalid_dep"] = "yes"
        return options

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Return ``{"begin": "now+N"}`` (N seconds)."""
        return {"begin": f"now+{max(1, int(seconds))}"}

    # ------------------------------------------------------------ status

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Ask ``sacct`` once for every id, then ``squeue -t all`` once for what is not final there.

        slurmdbd lags the controller by seconds: right after a state change
        sacct may miss elements or show a stale ``123|PENDING`` master row,
        and accounting may be disabled altogether.  The controller's answer
        wins unless sacct already has a final row (which carries the exit code).
        """
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        masters = self._masters(ids)
        if not masters:
            return {}
        rows = self._sacct(masters)
        known = self._pick(ids, rows, self._group_elements(rows))
        unsettled = self._masters(j for j in ids if j not in known or not self._settled(known[j]))
        if unsettled:
            for key, info in self._squeue(unsettled).items():
                if key not in rows or not self._settled(rows[key]):
                    rows[key] = info
        return self._pick(ids, rows, self._group_elements(rows))

    @staticmethod
    def _settled(info: JobInfo) -> bool:
        """Tell whether an accounting row is final and complete.

        A plain ``CANCELLED`` (no "by UID") is the system's doing, and sacct
        first shows it with reason None: the controller then knows whether
        it was ``DependencyNeverSatisfied``.
        """
        return info.state in FINAL_JOB_STATES and info.reason != "CANCELLED"

    def _group_elements(self, rows: Mapping[str, JobInfo]) -> Dict[str, List[JobInfo]]:
        """Group element rows (``123_4``) by master id."""
        elements: Dict[str, List[JobInfo]] = {}
        for key, info in rows.items():
            if "_" in key:
                elements.setdefault(self._master_id(key), []).append(info)
        return elements

    def _sacct(self, masters: Sequence[str]) -> Dict[str, JobInfo]:
        """Query accounting; return {} when it is disabled or unreachable for good."""
        argv = [self.sacct, "-X", "-n", "-P", "-j", ",".join(masters), "-o", "JobID,State,ExitCode,Reason"]
        result = self._run(argv, check=False)
        if result.returncode != 0:
            log.info("sacct failed (%s); asking squeue", _tail(result.stderr) or result.returncode)
            return {}
        return self._parse_sacct(result.stdout)

    @classmethod
    def _parse_sacct(cls, text: str) -> Dict[str, JobInfo]:
        """Parse ``sacct -X -n -P -o JobID,State,ExitCode,Reason``.

        Sample::

            123|COMPLETED|0:0|None
            124_1|FAILED|1:0|NonZeroExitCode
            124_2|CANCELLED by 1000|0:15|None
            124_[3-10%2]|PENDING|0:0|JobArrayTaskLimit
        """
        rows: Dict[str, JobInfo] = {}
        for line in text.splitlines():
            fields = line.strip().split("|")
            if len(fields) < 3 or not fields[0]:
                continue
            info = cls._info(fields[1], fields[2], fields[3] if len(fields) > 3 else "")
            rows.update(dict.fromkeys(cls._expand_id(fields[0]), info))
        return rows

    def _squeue(self, masters: Sequence[str]) -> Dict[str, JobInfo]:
        """Query the controller (live jobs and those ended less than ``MinJobAge`` ago).

        ``-O ...exit_code`` gives the exit status too; a Slurm too old for
        that field gets the portable ``-o "%i|%T|%r"`` instead.
        """
        base = [self.squeue, "-h", "-t", "all", "-j", ",".join(masters)]
        result = self._run([*base, "-O", "JobArrayID:|,State:|,Reason:|,exit_code:|"], check=False)
        if result.returncode != 0 and "format" in result.stderr.lower():
            result = self._run([*base, "-o", "%i|%T|%r"], check=False)
        if result.returncode != 0 and "invalid job id" not in result.stderr.lower():
            raise ExecutorError(f"squeue exited {result.returncode}: {_tail(result.stderr) or 'no output'}", result)
        return self._parse_squeue(result.stdout)

    @classmethod
    def _parse_squeue(cls, text: str) -> Dict[str, JobInfo]:
        """Parse ``squeue -h -t all -O "JobArrayID:|,State:|,Reason:|,exit_code:|"`` (or ``-o "%i|%T|%r"``).

        ``exit_code`` is a raw wait status (768 = exit 3, 9 = signal 9).
        Sample::

            123|RUNNING|None|0|
            124_[2-10%2]|PENDING|JobArrayTaskLimit|0|
            124_1|FAILED|NonZeroExitCode|768|
            125|PENDING|DependencyNeverSatisfied|0|

        A FAILED row whose status is still 0 counts as RUNNING ("ending"):
        the controller sets the state before the exit status, and the next
        query (or sacct) tells the real one.
        """
        rows: Dict[str, JobInfo] = {}
        for line in text.splitlines():
            fields = [*line.strip().split("|"), "", ""]
            if not fields[0] or not fields[1]:
                continue
            status = fields[3].strip()
            exit_text = f"{int(status) >> 8}:{int(status) & 0x7F}" if status.isdigit() else ""
            info = cls._info(fields[1], exit_text, fields[2])
            if fields[1].strip() == "FAILED" and status == "0":  # marked failed before its exit status was recorded
                info = JobInfo("RUNNING", "ending")
            rows.update(dict.fromkeys(cls._expand_id(fields[0]), info))
        return rows

    @staticmethod
    def _expand_id(job_id: str) -> List[str]:
        """Expand ``124_[3-10%2]`` into element ids; other ids stay as they are."""
        match = re.match(r"^(\d+)_\[([^\]]*)\]$", job_id)
        if not match:
            return [job_id]
        return [f"{match.group(1)}_{index}" for index in _expand_task_spec(match.group(2))]

    @classmethod
    def _info(cls, state_text: str, exit_text: str, reason: str) -> JobInfo:
        """Turn a state (``CANCELLED by 0``), an ``exit:signal`` pair and a reason into a JobInfo."""
        word = state_text.strip().split(" ")[0].rstrip("+")
        reason = "" if reason.strip() in ("", "None") else reason.strip()
        # Pending forever, or cancelled by kill_on_invalid_dep: plain "CANCELLED" (no "by UID") + "Dependency".
        never = reason == "DependencyNeverSatisfied" or (state_text.strip() == "CANCELLED" and reason == "Dependency")
        if never and word in ("PENDING", "CANCELLED"):
            return JobInfo("FAILED", "DEPENDENCY_NEVER_SATISFIED")
        state = cls._STATES.get(word, "RUNNING")  # unknown words: still active
        code, _, sig = exit_text.partition(":")
        exit_code = 128 + int(sig) if sig.isdigit() and int(sig) else (int(code) if code.isdigit() else None)
        if state == "FAILED" and word == "FAILED":
            detail = f"signal {sig}" if sig.isdigit() and int(sig) else (f"exit {code}" if code else reason or word)
        elif state in ("PENDING", "RUNNING", "SUSPENDED"):
            detail = reason if word in cls._STATES else f"{word} {reason}".strip()
        elif state == "COMPLETED":
            detail = ""
        else:
            detail = state_text.strip()
        return JobInfo(state, detail, exit_code if state in FINAL_JOB_STATES else None)

    # ----------------------------------------------------- cancel, find

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs with one ``scancel a b c``; already finished or unknown ids are fine."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if ids:
            self._check_benign(self._run([self.scancel, *ids], check=False), self._CANCEL_BENIGN)

    def _list_jobs(self) -> List[Tuple[str, str]]:
        """List this user's live jobs: ``squeue -h -u USER -o "%i|%j"`` (``123|wf-task``)."""
        result = self._run([self.squeue, "-h", "-u", _current_user(), "-o", "%i|%j"])
        pairs = [line.strip().split("|", 1) for line in result.stdout.splitlines() if "|" in line]
        return [(job_id, name) for job_id, name in pairs]


# =============================================================================
# Executors: PBS Pro / OpenPBS (and Torque)
# =============================================================================


class PBSExecutor(_BatchExecutor):
    """Submit jobs to PBS Pro/OpenPBS (or Torque) with ``qsub``; query ``qstat``; cancel with ``qdel``.

    Each job is a script under ``.reflow/jobs/`` that ``cd``s to the working
    directory (PBS starts jobs in ``$HOME``) and redirects its own output,
    because PBS has no job-id placeholder for ``-o``.  Ids are kept whole
    (``123.server``, ``123[].server``).  ``array_flag`` is ``-J`` (PBS Pro)
    or ``-t`` (Torque); None detects it with ``qstat --version`` when first
    needed.  A one-element array is submitted as a plain job whose script
    sets ``PBS_ARRAY_INDEX`` itself (PBS Pro rejects ``-J 3-3``).
    """

    name = "pbs"
    array_index_env_var = "PBS_ARRAY_INDEX"
    array_base = 0
    max_array_size = 10000
    _KEY_ALIASES = {"partition": "queue", "dependency": "depend", "gpu": "gpus"}
    _binaries = ("qsub", "qdel", "qstat")
    _transient_codes = (162, 171, 183)

    #: Known submit options: key -> (flag, value template; None = bare flag).
    _FLAGS: Dict[str, Tuple[str, Optional[str]]] = {
        "queue": ("-q", "{}"), "account": ("-A", "{}"), "project": ("-P", "{}"), "mail_user": ("-M", "{}"),
        "mail_type": ("-m", "{}"), "depend": ("-W", "depend={}"), "begin": ("-a", "{}"), "hold": ("-h", None),
        "priority": ("-p", "{}"), "rerunnable": ("-r", "{}"), "place": ("-l", "place={}"),
        "resources": ("-l", "{}"), "attributes": ("-W", "{}"), "shell": ("-S", "{}"), "qos": ("-l", "qos={}"),
    }
    #: PBS job states and what they mean here (F/X/C: look at the exit status).
    _STATES = {"Q": "PENDING", "H": "PENDING", "W": "PENDING", "T": "PENDING", "M": "PENDING",
               "S": "SUSPENDED", "U": "SUSPENDED", "R": "RUNNING", "E": "RUNNING", "B": "RUNNING"}
    #: Negative ``Exit_status`` values PBS sets when it killed or could not run a job (job.h).
    _EXEC_CODES = {-29: ("TIMEOUT", "walltime exceeded"), -28: ("TIMEOUT", "cput exceeded"),
                   -27: ("OUT_OF_MEMORY", "mem exceeded"), -26: ("OUT_OF_MEMORY", "vmem exceeded")}
    _CANCEL_BENIGN = ("unknown job id", "job has finished", "already finished")

    def __init__(self, mode: str = "qsub", qsub: str = "qsub", qdel: str = "qdel", qstat: str = "qstat",
                 array_flag: Optional[str] = None, python: str = "", config: Optional[Config] = None) -> None:
        super().__init__(mode=mode, python=python, config=config)
        self.qsub, self.qdel, self.qstat = qsub, qdel, qstat
        if array_flag not in (None, "-J", "-t"):
            raise ValueError(f"array_flag must be '-J', '-t' or None, got {array_flag!r}")
        self.array_flag = array_flag

    def _transient(self, result: CommandResult) -> bool:
        # qdel's 168 ("Request invalid for state of job", job in transit) clears on retry.
        return super()._transient(result) or (result.returncode == 168 and result.cmd[0] == self.qdel)

    @property
    def torque(self) -> bool:
        """Tell whether the server is Torque (detected once, lazily, with ``qstat --version``)."""
        if self.array_flag is None and self.mode == "dry-run":
            return False
        if self.array_flag is None:
            result = run_cmd([self.qstat, "--version"], check=False, timeout=30)
            text = f"{result.stdout}\n{result.stderr}".lower()
            is_pro = "pbs_version" in text or "pbspro" in text or "openpbs" in text
            self.array_flag = "-t" if not is_pro and re.search(r"version:\s*\d", text) else "-J"
        return self.array_flag == "-t"

    # ------------------------------------------------------------ submit

    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Write the job script and submit it with ``qsub``; return the full id."""
        options = self._normalize_options(resources.options)
        argv = [self.qsub, *self._resource_flags(resources, options), *self._option_flags(options)]
        script = self._write_script(resources, self._script_body(resources, command))
        argv.append(str(script))
        if self.mode == "dry-run":
            return self._dry_run(argv)
        return self._parse_submit(self._run(argv, submit=True))

    def _resource_flags(self, resources: JobResources, options: Dict[str, Any]) -> List[str]:
        """Map the JobResources fields to qsub flags (``select`` chunk or Torque ``nodes``)."""
        cpus, mem = int(resources.cpus), _mem_mib(resources.mem)
        gpus = int(options.pop("gpus", None) or resources.gpus or 0)
        if self.torque:
            argv = ["-l", f"nodes=1:ppn={cpus}" + (f":gpus={gpus}" if gpus else ""), "-l", f"mem={mem}mb"]
        else:
            select = options.pop("select", None) or f"1:ncpus={cpus}:mem={mem}mb" + (f":ngpus={gpus}" if gpus else "")
            argv = ["-l", f"select={select}"]
        argv += ["-l", f"walltime={format_hms(parse_time(resources.time_limit))}", "-V"]
        if resources.job_name:
            argv += ["-N", resources.job_name]
        bounds = resources.array_bounds()
        if bounds and bounds[0] != bounds[1]:
            argv += [self.array_flag or "-J", str(resources.array)]
        if resources.output_path:
            argv += ["-o", "/dev/null"]  # the script redirects its own output
        if resources.output_path or resources.error_path:
            argv += ["-e", "/dev/null"]
        return argv

    def _option_flags(self, options: Dict[str, Any]) -> List[str]:
        """Render the known submit options as qsub flags."""
        self._unsupported(options, {"signal": "PBS has no pre-walltime signal; trap SIGTERM instead"})
        if options.get("qos") and not self.torque:
            raise ExecutorError("pbs: submit option 'qos' is not supported by PBS Pro (use a queue)")
        if options.get("mail_type") not in (None, False):
            options["mail_type"] = _mail_letters(options["mail_type"], _PBS_MAIL, self.name)
        return self._strict_flags(options, self._FLAGS)

    def _script_body(self, resources: JobResources, command: Sequence[str]) -> List[str]:
        """Return the script lines: index of a one-element array, cd, log redirection, exec."""
        bounds = resources.array_bounds()
        setup = []
        single = bounds is not None and bounds[0] == bounds[1]
        if bounds is not None and single:
            setup.append(f"export PBS_ARRAY_INDEX={bounds[0]}")
        workdir = _sh_word(resources.workdir) if resources.workdir else '"${PBS_O_WORKDIR:-.}"'
        setup.append(f"cd {workdir} || exit 1")
        is_array = bounds is not None and not single
        tokens = {"{job_id}": "${PBS_ARRAY_ID:-$PBS_JOBID}" if is_array else "$PBS_JOBID",
                  "{array_index}": "${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-}}" if bounds else ""}
        redirect = []
        if resources.output_path:
            redirect.append(">" + _sh_path(resources.output_path, tokens))
        if resources.error_path:
            redirect.append("2>" + _sh_path(resources.error_path, tokens))
        elif resources.output_path:
            redirect.append("2>&1")
        return self._script_lines(resources, command, setup, " ".join(redirect))

    @staticmethod
    def _parse_submit(result: CommandResult) -> str:
        """Return the id qsub printed, whole: ``123.pbsserver`` or ``123[].pbsserver``."""
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if not lines or not re.match(r"^\d+(\[\d*\])?(\.\S+)?$", lines[-1]):
            raise ExecutorError(f"qsub printed no job id: {result.stdout.strip()[:200]!r}", result)
        return lines[-1]

    # ------------------------------------------------ ids, dependencies

    def element_id(self, array_id: str, position: int) -> str:
        """Return ``123[4].srv`` for array ``123[].srv``; a plain job id stays itself."""
        return array_id.replace("[]", f"[{position}]", 1) if "[]" in array_id else array_id

    def _master_id(self, job_id: str) -> str:
        return re.sub(r"\[\d+\]", "[]", job_id, count=1)

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Return ``{"depend": "afterany:a:b"}`` (``-W depend=``); elements depend on the parent ``123[].srv``."""
        masters = self._masters(job_ids)
        if not masters:
            return {}
        plain = [m for m in masters if "[]" not in m]
        arrays = [m for m in masters if "[]" in m]
        if not self.torque or not arrays:
            return {"depend": f"{kind}:" + ":".join(masters)}
        groups = ([f"{kind}:" + ":".join(plain)] if plain else []) + [f"{kind}array:" + ":".join(arrays)]
        return {"depend": ",".join(groups)}  # Torque has separate *array dependency types

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Return ``{"begin": "CCYYMMDDhhmm.SS"}`` (``qsub -a``, local time)."""
        return {"begin": _clock_after(seconds).strftime("%Y%m%d%H%M.%S")}

    # ------------------------------------------------------------ status

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Ask ``qstat -f -F json -x -t`` once (Torque: ``qstat -f -t``) for all ids."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        masters = self._masters(ids)
        if not masters:
            return {}
        torque = self.torque
        argv = [self.qstat, "-f", "-t", *masters] if torque else [self.qstat, "-f", "-F", "json", "-x", "-t", *masters]
        result = self._run(argv, check=False)
        # 153 = unknown id among the asked ones: the known ones are still on stdout.
        if result.returncode not in (0, 153) and not result.stdout:
            detail = _tail(result.stderr) or "no output"
            raise ExecutorError(f"qstat exited {result.returncode}: {detail}", result)
        records = self._parse_qstat_text(result.stdout) if torque else self._parse_qstat_json(result.stdout)
        rows = {job_id.split(".")[0]: self._info(attrs) for job_id, attrs in records.items()}
        elements: Dict[str, List[JobInfo]] = {}
        for key, info in rows.items():
            if re.match(r"^\d+\[\d+\]$", key):
                elements.setdefault(self._master_id(key), []).append(info)
        infos: Dict[str, JobInfo] = {}
        for job_id in ids:
            short = job_id.split(".")[0]
            parent = rows.get(short)
            if elements.get(short) and (parent is None or parent.state in FINAL_JOB_STATES):
                infos[job_id] = _aggregate(elements[short])  # a finished parent: its subjobs tell why
            elif parent is not None:
                infos[job_id] = parent
        return infos

    @staticmethod
    def _parse_qstat_json(text: str) -> Dict[str, Dict[str, Any]]:
        """Parse ``qstat -f -F json -x``: ``{"Jobs": {"123.srv": {"job_state": "F", "Exit_status": 0, ...}}}``."""
        if not text.strip():
            return {}
        try:
            data = json.loads(text, strict=False)
        except ValueError as exc:
            raise ExecutorError(f"qstat printed invalid JSON ({exc}): {text[:200]!r}") from None
        return dict(data.get("Jobs") or {})

    @staticmethod
    def _parse_qstat_text(text: str) -> Dict[str, Dict[str, Any]]:
        """Parse ``qstat -f`` text (Torque, PBS Pro without JSON).

        Sample::

            Job Id: 123.srv
                Job_Name = step1
                job_state = C
                exit_status = 0
        """
        records: Dict[str, Dict[str, Any]] = {}
        current: Optional[Dict[str, Any]] = None
        key = ""
        for line in text.splitlines():
            head = re.match(r"^Job Id:\s*(\S+)", line)
            pair = re.match(r"^\s+([\w.]+) = (.*)$", line)
            if head:
                current = records.setdefault(head.group(1), {})
            elif pair and current is not None:
                key = pair.group(1)
                current[key] = pair.group(2)
            elif line.startswith("\t") and current is not None and key:
                current[key] += line.strip()  # long values wrap onto tab-indented lines
        return records

    @classmethod
    def _info(cls, attrs: Mapping[str, Any]) -> JobInfo:
        """Map one job's ``job_state`` and ``Exit_status`` to a JobInfo."""
        state = str(attrs.get("job_state", "")).strip()
        if state not in ("F", "X", "C"):
            return JobInfo(cls._STATES.get(state, "RUNNING"), "" if state in cls._STATES else f"state {state}")
        code = _leading_int(attrs.get("Exit_status", attrs.get("exit_status", "")))
        if code is None:  # deleted before it ran, or removed for an impossible dependency
            return JobInfo("CANCELLED", "deleted before running")
        if code > 256:  # 256 + signal: PBS killed the job (qdel sends SIGTERM then SIGKILL)
            signum = code - 256
            return JobInfo("CANCELLED" if signum in (2, 9, 15) else "FAILED", f"signal {signum}", 128 + signum)
        if code < 0:
            state_name, reason = cls._EXEC_CODES.get(code, ("FAILED", f"PBS exec error {code}"))
            return JobInfo(state_name, reason, code)
        return _exit_info(code)

    # ----------------------------------------------------- cancel, find

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs with one ``qdel a b``; finished or unknown ids are fine."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if ids:
            self._check_benign(self._run([self.qdel, *ids], check=False), self._CANCEL_BENIGN)

    def _list_jobs(self) -> List[Tuple[str, str]]:
        """List this user's live jobs from ``qstat -f -F json`` (Torque: ``qstat -f``)."""
        torque = self.torque
        result = self._run([self.qstat, "-f"] if torque else [self.qstat, "-f", "-F", "json"])
        records = self._parse_qstat_text(result.stdout) if torque else self._parse_qstat_json(result.stdout)
        user = _current_user()
        return [(job_id, str(attrs.get("Job_Name", ""))) for job_id, attrs in records.items()
                if str(attrs.get("Job_Owner", "")).split("@")[0] == user
                and str(attrs.get("job_state", "")) not in ("F", "X", "C")]


# =============================================================================
# Executors: IBM Spectrum LSF
# =============================================================================


class LSFExecutor(_BatchExecutor):
    """Submit jobs with ``bsub`` (the job script on stdin), query ``bjobs -json``, cancel with ``bkill``.

    Every option is on the command line; the script only exports the
    environment and ``exec``s the command.  Arrays are ``-J "name[1-N]%T"``
    (indices from 1), elements ``123[4]``.  Memory is ``-M <MiB>MB`` plus a
    ``rusage[mem=<MiB>MB]`` reservation, so ``LSF_UNIT_FOR_LIMITS`` does
    not matter.
    """

    name = "lsf"
    array_index_env_var = "LSB_JOBINDEX"
    array_base = 1
    max_array_size = 1000
    _KEY_ALIASES = {"partition": "queue", "account": "project", "gpu": "gpus"}
    _binaries = ("bsub", "bkill", "bjobs")

    _FLAGS: Dict[str, Tuple[str, Optional[str]]] = {
        "queue": ("-q", "{}"), "project": ("-P", "{}"), "group": ("-G", "{}"), "mail_user": ("-u", "{}"),
        "dependency": ("-w", "{}"), "begin": ("-b", "{}"), "resources": ("-R", "{}"), "hold": ("-H", None),
        "exclusive": ("-x", None), "rerunnable": ("-r", None), "sla": ("-sla", "{}"), "app": ("-app", "{}"),
        "priority": ("-sp", "{}"), "mail_begin": ("-B", None), "mail_end": ("-N", None),
        "warning_action": ("-wa", "{}"), "warning_time": ("-wt", "{}"),
    }
    #: bjobs STAT values and what they mean here (EXIT: look at the exit reason).
    _STATES = {"PEND": "PENDING", "WAIT": "PENDING", "PSUSP": "PENDING", "PROV": "PENDING", "RUN": "RUNNING",
               "USUSP": "SUSPENDED", "SSUSP": "SUSPENDED", "DONE": "COMPLETED", "PDONE": "COMPLETED",
               "UNKWN": "RUNNING", "ZOMBI": "FAILED", "PERR": "FAILED"}
    #: Exit reasons (TERM_* codes or their text) that name the cause of an EXIT.
    _EXIT_REASONS = ((r"MEMLIMIT|memory (usage )?limit", "OUT_OF_MEMORY"),
                     (r"RUNLIMIT|run ?time limit|CPULIMIT|cpu time limit", "TIMEOUT"),
                     (r"TERM_OWNER|TERM_ADMIN|TERM_FORCE|killed by owner|killed by root|administrator", "CANCELLED"))
    _CANCEL_BENIGN = ("already finished", "no matching job found", "is not found", "is being terminated",
                      "is being signaled")

    def __init__(self, mode: str = "bsub", bsub: str = "bsub", bkill: str = "bkill", bjobs: str = "bjobs",
                 python: str = "", config: Optional[Config] = None) -> None:
        super().__init__(mode=mode, python=python, config=config)
        self.bsub, self.bkill, self.bjobs = bsub, bkill, bjobs

    def _transient(self, result: CommandResult) -> bool:
        # An ssh-wrapped or flaky LSF client exits 255 without a word.
        empty = result.returncode == 255 and not result.stdout.strip() and not result.stderr.strip()
        return empty or super()._transient(result)

    # ------------------------------------------------------------ submit

    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Submit with ``bsub`` (script on stdin); return the job id."""
        options = self._normalize_options(resources.options)
        argv = [self.bsub, *self._resource_flags(resources, options), *self._option_flags(options)]
        script = "\n".join(["#!/bin/sh", "# reflow lsf job script", *self._script_lines(resources, command)]) + "\n"
        if self.mode == "dry-run":
            return self._dry_run(argv)
        result = self._run(argv, input=script, submit=True)
        for _ in range(_sched_retries()):
            if result.stdout.strip():
                break
            # A flaky client may exit 0 without a word: ERT retries that too.
            log.warning("bsub printed nothing; retrying")
            time.sleep(_sched_backoff())
            result = self._run(argv, input=script, submit=True)
        return self._parse_submit(result)

    def _resource_flags(self, resources: JobResources, options: Dict[str, Any]) -> List[str]:
        """Map the JobResources fields to bsub flags."""
        mem = _mem_mib(resources.mem)
        minutes = -(-parse_time(resources.time_limit) // 60)  # -W takes [H:]MM: round up
        name = resources.job_name or "reflow"
        bounds = _check_base(resources, self)
        if bounds:
            name += f"[{bounds[0]}-{bounds[1]}]" + (f"%{bounds[2]}" if bounds[2] else "")
        argv = ["-J", name, "-n", str(int(resources.cpus)), "-R", f"span[hosts=1] rusage[mem={mem}MB]",
                "-M", f"{mem}MB", "-W", f"{minutes // 60}:{minutes % 60:02d}"]
        gpus = int(options.pop("gpus", None) or resources.gpus or 0)
        if gpus:
            argv += ["-gpu", f"num={gpus}"]
        tokens = {"{job_id}": "%J", "{array_index}": "%I" if bounds else ""}
        if resources.output_path:
            argv += ["-o", _native_path(resources.output_path, tokens)]
        if resources.error_path:
            argv += ["-e", _native_path(resources.error_path, tokens)]
        if resources.workdir:
            argv += ["-cwd", resources.workdir]
        return argv

    def _option_flags(self, options: Dict[str, Any]) -> List[str]:
        """Render mail, signal and the known submit options as bsub flags."""
        self._unsupported(options, {"qos": "LSF has no QoS; use a queue, 'sla' or 'app'"})
        mail = options.pop("mail_type", None)
        if mail not in (None, False):
            words = {w.strip().upper() for v in _as_list(mail) for w in str(v).split(",") if w.strip()}
            unknown = words - set(_PBS_MAIL)
            if unknown:
                raise ExecutorError(f"lsf: unknown mail_type {sorted(unknown)[0]!r}")
            options["mail_begin"] = bool(words & {"BEGIN", "ALL"})
            options["mail_end"] = bool(words - {"BEGIN", "NONE"})
        signal_spec = options.pop("signal", None)
        if signal_spec:
            name, seconds = _parse_signal_spec(signal_spec)
            options["warning_action"] = name
            options["warning_time"] = str(-(-seconds // 60))  # -wt takes [H:]M
        return self._strict_flags(options, self._FLAGS)

    @staticmethod
    def _parse_submit(result: CommandResult) -> str:
        """Return the id in ``Job <123> is submitted to [default ]queue <normal>.``."""
        match = re.search(r"Job <(\d+)>", result.stdout)
        if not match:
            raise ExecutorError(f"bsub printed no job id: {result.stdout.strip()[:200]!r}", result)
        return match.group(1)

    # ------------------------------------------------ ids, dependencies

    def element_id(self, array_id: str, position: int) -> str:
        """Return ``123[4]``."""
        return f"{array_id}[{position}]"

    def _master_id(self, job_id: str) -> str:
        return job_id.split("[")[0]

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Return ``{"dependency": "ended(a) && ended(b)"}``, for afterok too.

        LSF keeps a job whose ``done()`` can never be met pending for ever,
        which would also hold the dispatcher waiting on it; so ``afterok``
        waits with ``ended()`` and the worker checks its upstream results.
        """
        masters = self._masters(job_ids)
        return {"dependency": " && ".join(f"ended({m})" for m in masters)} if masters else {}

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Return ``{"begin": "YYYY:MM:DD:hh:mm"}`` (``bsub -b``, rounded up to the minute)."""
        when = _clock_after(seconds + 59)
        return {"begin": when.strftime("%Y:%m:%d:%H:%M")}

    # ------------------------------------------------------------ status

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Ask ``bjobs -a -json`` once for all ids (arrays by their master id)."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        masters = self._masters(ids)
        if not masters:
            return {}
        fields = "jobid jobindex stat exit_code exit_reason pend_reason"
        result = self._run([self.bjobs, "-a", "-json", "-o", fields, *masters], check=False)
        # bjobs exits 255 when some ids are unknown; the known ones are still on stdout.
        if result.returncode != 0 and not result.stdout.strip():
            if "not found" in result.stderr.lower() or "no unfinished job" in result.stderr.lower():
                return {}
            raise ExecutorError(f"bjobs exited {result.returncode}: {_tail(result.stderr) or 'no output'}", result)
        rows = self._parse_bjobs(result.stdout)
        elements: Dict[str, List[JobInfo]] = {}
        for key, info in rows.items():
            if "[" in key:
                elements.setdefault(self._master_id(key), []).append(info)
        return self._pick(ids, rows, elements)

    @classmethod
    def _parse_bjobs(cls, text: str) -> Dict[str, JobInfo]:
        """Parse ``bjobs -a -json -o "jobid jobindex stat exit_code exit_reason pend_reason"``.

        Sample::

            {"COMMAND":"bjobs","JOBS":2,"RECORDS":[
              {"JOBID":"123","JOBINDEX":"0","STAT":"DONE","EXIT_CODE":"","EXIT_REASON":"","PEND_REASON":""},
              {"JOBID":"124","ERROR":"Job <124> is not found"}]}
        """
        if not text.strip():
            return {}
        try:
            records = json.loads(text[text.index("{"):], strict=False).get("RECORDS") or []
        except ValueError as exc:
            raise ExecutorError(f"bjobs printed invalid JSON ({exc}): {text[:200]!r}") from None
        rows: Dict[str, JobInfo] = {}
        for record in records:
            if "ERROR" in record or not record.get("JOBID"):
                continue  # an id bjobs does not know
            index = str(record.get("JOBINDEX") or "0")
            key = record["JOBID"] if index in ("", "0") else f"{record['JOBID']}[{index}]"
            rows[key] = cls._info(record)
        return rows

    @classmethod
    def _info(cls, record: Mapping[str, Any]) -> JobInfo:
        """Map one bjobs record (STAT, EXIT_CODE, EXIT_REASON, PEND_REASON) to a JobInfo."""
        stat = str(record.get("STAT", "")).strip()
        pend = str(record.get("PEND_REASON", "") or "").strip()
        if stat == "PEND" and re.search(r"never satisfied|dependency condition invalid", pend, re.I):
            return JobInfo("FAILED", "DEPENDENCY_NEVER_SATISFIED")
        if stat != "EXIT":
            state = cls._STATES.get(stat, "RUNNING")
            reason = pend if state == "PENDING" else ("" if stat in cls._STATES else f"state {stat}")
            return JobInfo(state, reason, 0 if state == "COMPLETED" else None)
        code = _leading_int(record.get("EXIT_CODE") or "")
        exit_reason = str(record.get("EXIT_REASON", "") or "").strip()
        for pattern, state in cls._EXIT_REASONS:
            if re.search(pattern, exit_reason, re.I):
                return JobInfo(state, exit_reason, code)
        reason = f"signal {code - 128}" if code and code > 128 else f"exit {code if code is not None else '?'}"
        return JobInfo("FAILED", exit_reason or reason, code)

    # ----------------------------------------------------- cancel, find

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs with one ``bkill a b "123[4]"``; finished or unknown ids are fine."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if ids:
            self._check_benign(self._run([self.bkill, *ids], check=False), self._CANCEL_BENIGN)

    def _list_jobs(self) -> List[Tuple[str, str]]:
        """List this user's unfinished jobs: ``bjobs -json -o "jobid job_name"`` (arrays: ``name[7]``)."""
        result = self._run([self.bjobs, "-json", "-o", "jobid job_name"], check=False)
        if "{" not in result.stdout:
            if result.returncode and "no unfinished job" not in result.stderr.lower():
                raise ExecutorError(f"bjobs exited {result.returncode}: {_tail(result.stderr)}", result)
            return []
        records = json.loads(result.stdout[result.stdout.index("{"):], strict=False).get("RECORDS") or []
        return [(str(r["JOBID"]), re.sub(r"\[\d+\]$", "", str(r.get("JOB_NAME", ""))))
                for r in records if r.get("JOBID") and "ERROR" not in r]


def _parse_signal_spec(spec: Any) -> Tuple[str, int]:
    """Split a Slurm ``--signal`` value (``B:USR1@60``, ``INT``) into (name, seconds before the end)."""
    text = str(spec).strip()
    text = re.sub(r"^[A-Z]{1,2}:", "", text)  # drop Slurm's B:/R: target prefixes
    name, _, seconds = text.partition("@")
    if not name or (seconds and not seconds.isdigit()):
        raise ExecutorError(f"invalid signal option {spec!r}: use SIG[@SECONDS], e.g. USR1@60")
    name = name.upper()
    return (name[3:] if name.startswith("SIG") else name), int(seconds or 60)


# =============================================================================
# Executors: Grid Engine (SGE, Son of Grid Engine, Univa/Altair GE)
# =============================================================================


class SGEExecutor(_BatchExecutor):
    """Submit job scripts with ``qsub -terse``; query ``qstat -xml`` then ``qacct``; cancel with ``qdel``.

    cpus use the parallel environment of the ``pe`` option (default
    ``smp``, omitted for one cpu); ``h_vmem`` is per slot, so the memory is
    divided by the cpus.  Arrays are ``-t 1-N -tc T`` (indices from 1),
    elements ``123.4``.  Grid Engine dependencies are afterany only.
    """

    name = "sge"
    array_index_env_var = "SGE_TASK_ID"
    array_base = 1
    max_array_size = 75000
    _KEY_ALIASES = {"partition": "queue", "dependency": "hold_jid", "gpu": "gpus"}
    _binaries = ("qsub", "qdel", "qstat", "qacct")

    _FLAGS: Dict[str, Tuple[str, Optional[str]]] = {
        "queue": ("-q", "{}"), "account": ("-A", "{}"), "project": ("-P", "{}"), "mail_user": ("-M", "{}"),
        "mail_type": ("-m", "{}"), "hold_jid": ("-hold_jid", "{}"), "begin": ("-a", "{}"), "hold": ("-h", None),
        "priority": ("-p", "{}"), "resources": ("-l", "{}"), "shell": ("-S", "{}"), "notify": ("-notify", None),
        "rerunnable": ("-r", "{}"),
    }
    #: State letters, checked in order (``Eqw`` is an error, ``dr`` being deleted, ``hqw`` held).
    _STATE_LETTERS = (("E", "FAILED"), ("d", "CANCELLED"), ("s", "SUSPENDED"), ("S", "SUSPENDED"),
                      ("T", "SUSPENDED"), ("r", "RUNNING"), ("t", "RUNNING"), ("h", "PENDING"),
                      ("w", "PENDING"), ("q", "PENDING"))
    _CANCEL_BENIGN = ("does not exist", "has already been deleted", "already completed", "has registered",
                      "has deleted")
    #: Above this many finished ids, one ``qacct -o USER -j`` replaces the per-id calls.
    _QACCT_BULK = 10

    def __init__(self, mode: str = "qsub", qsub: str = "qsub", qdel: str = "qdel", qstat: str = "qstat",
                 python: str = "", config: Optional[Config] = None, qacct: str = "qacct") -> None:
        super().__init__(mode=mode, python=python, config=config)
        self.qsub, self.qdel, self.qstat, self.qacct = qsub, qdel, qstat, qacct

    # ------------------------------------------------------------ submit

    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Write the job script and submit it with ``qsub -terse``; return the job id."""
        options = self._normalize_options(resources.options)
        argv = [self.qsub, "-terse", *self._resource_flags(resources, options), *self._option_flags(options)]
        argv.append(str(self._write_script(resources, self._script_lines(resources, command))))
        if self.mode == "dry-run":
            return self._dry_run(argv)
        return self._parse_submit(self._run(argv, submit=True))

    def _resource_flags(self, resources: JobResources, options: Dict[str, Any]) -> List[str]:
        """Map the JobResources fields to qsub flags."""
        cpus = int(resources.cpus)
        pe = options.pop("pe", None) or "smp"
        argv = ["-N", self._job_name(resources.job_name)] if resources.job_name else []
        argv += ["-pe", str(pe), str(cpus)] if cpus > 1 else []
        argv += ["-l", f"h_rt={format_hms(parse_time(resources.time_limit))}",
                 "-l", f"h_vmem={-(-_mem_mib(resources.mem) // cpus)}M", "-V"]
        argv += ["-wd", resources.workdir] if resources.workdir else ["-cwd"]
        if "shell" not in options:
            argv += ["-S", "/bin/sh"]  # otherwise the queue's shell runs the script (often csh)
        gpus = int(options.pop("gpus", None) or resources.gpus or 0)
        if gpus:
            argv += ["-l", f"gpu={gpus}"]
        bounds = _check_base(resources, self)
        if bounds:
            argv += ["-t", f"{bounds[0]}-{bounds[1]}"] + (["-tc", str(bounds[2])] if bounds[2] else [])
        return argv + self._log_flags(resources, bool(bounds))

    def _log_flags(self, resources: JobResources, is_array: bool) -> List[str]:
        """Return ``-o``/``-e``/``-j y`` with ``$JOB_ID``/``$TASK_ID`` placeholders."""
        tokens = {"{job_id}": "$JOB_ID", "{array_index}": "$TASK_ID" if is_array else ""}
        argv: List[str] = []
        for flag, path in (("-o", resources.output_path), ("-e", resources.error_path)):
            if not path:
                continue
            if re.search(r"[:,]", path):  # -o takes [[host]:]path[,...]
                raise ExecutorError(f"sge: log path {path!r} may not contain ':' or ','")
            argv += [flag, _native_path(path, tokens)]
        if resources.output_path and not resources.error_path:
            argv += ["-j", "y"]
        return argv

    def _option_flags(self, options: Dict[str, Any]) -> List[str]:
        """Render the known submit options as qsub flags."""
        self._unsupported(options, {"qos": "Grid Engine has no QoS; use a queue or project",
                                    "signal": "Grid Engine has no timed signal; use 'notify'"})
        if options.get("mail_type") not in (None, False):
            options["mail_type"] = _mail_letters(options["mail_type"], _SGE_MAIL, self.name)
        return self._strict_flags(options, self._FLAGS)

    @staticmethod
    def _parse_submit(result: CommandResult) -> str:
        """Return the job id from ``-terse`` output (``123``, ``123.1-10:1``) or the long message.

        Long form: ``Your job-array 123.1-10:1 ("name") has been submitted``.
        """
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        match = re.match(r"^(\d+)(?:\.\d+-\d+:\d+)?$", lines[-1]) if lines else None
        match = match or re.search(r"(?i)your job(?:-array)? (\d+)", result.stdout)
        if not match:
            raise ExecutorError(f"qsub printed no job id: {result.stdout.strip()[:200]!r}", result)
        return match.group(1)

    def _job_name(self, name: str) -> str:
        # qsub rejects names with / : @ \ * ? or white space, or starting with a digit.
        name = re.sub(r"[\s/:@\\*?]", "_", name)
        return f"j{name}" if name[:1].isdigit() else name

    # ------------------------------------------------ ids, dependencies

    def element_id(self, array_id: str, position: int) -> str:
        """Return ``123.4``."""
        return f"{array_id}.{position}"

    def _master_id(self, job_id: str) -> str:
        return job_id.split(".")[0]

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Return ``{"hold_jid": "a,b"}``.

        Grid Engine only knows "after the job left the system", so
        ``afterok`` maps to the same hold; the engine checks the results.
        """
        masters = self._masters(job_ids)
        return {"hold_jid": ",".join(masters)} if masters else {}

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Return ``{"begin": "CCYYMMDDhhmm.SS"}`` (``qsub -a``, local time)."""
        return {"begin": _clock_after(seconds).strftime("%Y%m%d%H%M.%S")}

    # ------------------------------------------------------------ status

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Ask ``qstat -xml`` once for live jobs, then ``qacct`` for the finished ones."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if not ids:
            return {}
        live = self._qstat_rows()
        missing = [self._master_id(j) for j in ids if not self._find(j, live)]
        done = self._qacct_rows(list(dict.fromkeys(missing))) if missing else {}
        infos: Dict[str, JobInfo] = {}
        for job_id in ids:
            info = self._find(job_id, live) or self._find(job_id, done)
            if info is not None:
                infos[job_id] = info
        return infos

    def _find(self, job_id: str, rows: Mapping[str, JobInfo]) -> Optional[JobInfo]:
        """Return the row of an id, or the aggregate of an array asked by master id."""
        if job_id in rows:
            return rows[job_id]
        elements = [info for key, info in rows.items() if key.startswith(job_id + ".")]
        return _aggregate(elements) if "." not in job_id and elements else None

    def _qstat_rows(self) -> Dict[str, JobInfo]:
        """Return the live jobs of this user from one ``qstat -xml -u USER``."""
        result = self._run([self.qstat, "-xml", "-u", _current_user()])
        rows: Dict[str, JobInfo] = {}
        for job in self._parse_qstat_xml(result.stdout):
            info = self._state_info(job["state"])
            if job["tasks"]:
                rows.update({f"{job['number']}.{i}": info for i in _expand_task_spec(job["tasks"])})
            else:
                rows[job["number"]] = info
        return rows

    @staticmethod
    def _parse_qstat_xml(text: str) -> List[Dict[str, str]]:
        """Parse ``qstat -xml`` into ``{"number", "name", "state", "tasks"}`` dicts.

        Sample (abridged)::

            <job_info><queue_info>
              <job_list state="running"><JB_job_number>123</JB_job_number><JB_name>step1</JB_name>
                <state>r</state><tasks>7</tasks></job_list>
            </queue_info><job_info>
              <job_list state="pending"><JB_job_number>124</JB_job_number><state>hqw</state>
                <tasks>1-10:1</tasks></job_list>
            </job_info></job_info>
        """
        jobs = []
        for block in re.findall(r"<job_list[^>]*>(.*?)</job_list>", text, re.S):
            fields = {tag: _xml_text(block, tag) for tag in ("JB_job_number", "JB_name", "state", "tasks")}
            if fields["JB_job_number"]:
                jobs.append({"number": fields["JB_job_number"], "name": fields["JB_name"],
                             "state": fields["state"], "tasks": fields["tasks"]})
        return jobs

    @classmethod
    def _state_info(cls, letters: str) -> JobInfo:
        """Map qstat state letters (``qw``, ``hqw``, ``r``, ``Eqw``, ``dr``...) to a JobInfo."""
        for letter, state in cls._STATE_LETTERS:
            if letter in letters:
                reason = "error state (qmod -cj or qdel)" if state == "FAILED" else letters
                return JobInfo(state, f"{letters}: {reason}" if state == "FAILED" else reason)
        return JobInfo("RUNNING", f"state {letters}")

    def _qacct_rows(self, masters: Sequence[str]) -> Dict[str, JobInfo]:
        """Return finished jobs from accounting: one ``qacct -j ID`` each, or one bulk call."""
        if len(masters) > self._QACCT_BULK:
            texts = [self._run([self.qacct, "-o", _current_user(), "-d", "7", "-j"], check=False).stdout]
        else:
            texts = [self._run([self.qacct, "-j", master], check=False).stdout for master in masters]
        rows: Dict[str, JobInfo] = {}
        for text in texts:
            for record in self._parse_qacct(text):
                task = record.get("taskid", "undefined")
                key = record.get("jobnumber", "")
                if key and str(key) in masters:
                    rows[key if not task.isdigit() else f"{key}.{task}"] = self._qacct_info(record)
        return rows

    @staticmethod
    def _parse_qacct(text: str) -> List[Dict[str, str]]:
        """Parse ``qacct -j`` output into one dict per record.

        Sample::

            ==============================================================
            qname        all.q
            jobnumber    123
            taskid       undefined
            failed       100 : assumedly after job
            exit_status  137                  (Killed)
        """
        records: List[Dict[str, str]] = []
        for line in text.splitlines():
            if line.startswith("====="):
                records.append({})
                continue
            match = re.match(r"^(\w+)\s+(.*?)\s*$", line)
            if match and records:
                records[-1][match.group(1)] = match.group(2)
        return [r for r in records if r]

    @staticmethod
    def _qacct_info(record: Mapping[str, str]) -> JobInfo:
        """Map a qacct record (``failed``, ``exit_status``) to a JobInfo."""
        failed = _leading_int(record.get("failed", "0")) or 0
        code = _leading_int(record.get("exit_status", "0")) or 0
        failed_text = record.get("failed", "").strip()
        if failed == 37:  # "qmaster enforced h_rt, h_cpu, or h_vmem limit": which one?
            return JobInfo(_sge_limit_state(record), failed_text, code)
        if failed == 100 and code > 128:  # killed after the job started: qdel or a limit
            return JobInfo("CANCELLED", f"signal {code - 128}", code)
        if failed:
            return JobInfo("FAILED", f"failed {failed_text}", code)
        return _exit_info(code)

    # ----------------------------------------------------- cancel, find

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs with one ``qdel a,b,123.4``; finished or unknown ids are fine."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if ids:
            self._check_benign(self._run([self.qdel, ",".join(ids)], check=False), self._CANCEL_BENIGN)

    def _list_jobs(self) -> List[Tuple[str, str]]:
        """List this user's live jobs from ``qstat -xml -u USER``."""
        result = self._run([self.qstat, "-xml", "-u", _current_user()])
        return [(job["number"], job["name"]) for job in self._parse_qstat_xml(result.stdout)]


def _sge_limit_state(record: Mapping[str, str]) -> str:
    """Tell TIMEOUT from OUT_OF_MEMORY for a job Grid Engine killed at a limit (failed 37).

    The job ran into its ``h_rt`` when its wall clock reached the value in
    ``category`` (``-l h_rt=5,h_vmem=768M``); otherwise it was the memory.
    """
    limit = re.search(r"h_rt=([\d:]+)", record.get("category", ""))
    wall = re.match(r"\s*([\d.]+)", record.get("ru_wallclock", ""))
    if not limit or not wall or "h_vmem" not in record.get("category", ""):
        return "TIMEOUT"
    seconds = 0
    for part in limit.group(1).split(":"):
        seconds = seconds * 60 + int(part or 0)
    return "TIMEOUT" if float(wall.group(1)) >= seconds - 1 else "OUT_OF_MEMORY"


def _xml_text(block: str, tag: str) -> str:
    """Return the unescaped text of ``<tag>`` in an XML fragment, or ""."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", block, re.S)
    if not match:
        return ""
    text = match.group(1).strip()
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
        text = text.replace(entity, char)
    return text


# =============================================================================
# Executors: Flux
# =============================================================================

#: Alphabet of Flux's F58 job ids, most significant digit first.
_F58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _flux_f58(number: int) -> str:
    """Encode a Flux job id as F58 with the ASCII prefix (``f...``)."""
    digits = ""
    while True:
        number, rest = divmod(number, 58)
        digits = _F58_ALPHABET[rest] + digits
        if not number:
            return "f" + digits


def _flux_decimal_id(text: str) -> str:
    """Return a Flux job id in decimal: from F58 (``ƒ``/``f`` prefix), decimal, hex or dothex."""
    word = text.strip()
    if word.isdigit():
        return str(int(word))
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", word):
        return str(int(word, 16))
    if re.fullmatch(r"[0-9a-fA-F]{4}(\.[0-9a-fA-F]{4}){3}", word):
        return str(int(word.replace(".", ""), 16))
    if word[:1] in ("ƒ", "f") and len(word) > 1 and all(c in _F58_ALPHABET for c in word[1:]):
        number = 0
        for char in word[1:]:
            number = number * 58 + _F58_ALPHABET.index(char)
        return str(number)
    raise ValueError(f"not a Flux job id: {text!r}")


class FluxExecutor(_BatchExecutor):
    """Submit with ``flux submit`` (``--cc`` for arrays), query ``flux jobs``, cancel with ``flux cancel``.

    Flux has no array jobs: ``--cc=F-L`` submits one job per index (each
    with ``FLUX_JOB_CC``), so :meth:`submit_array` returns every id and
    dependencies name each one.  Ids are stored in decimal.  Flux does not
    schedule memory (there is no option for it); ``mem`` is not passed.
    """

    name = "flux"
    array_index_env_var = "FLUX_JOB_CC"
    array_base = 0
    max_array_size = 100000
    _KEY_ALIASES = {"partition": "queue", "account": "bank", "project": "bank", "gpu": "gpus"}
    _binaries = ("flux",)

    #: Flux job states (long and single-letter) before a job is INACTIVE.
    _STATES = {"NEW": "PENDING", "DEPEND": "PENDING", "PRIORITY": "PENDING", "SCHED": "PENDING",
               "RUN": "RUNNING", "CLEANUP": "RUNNING", "D": "PENDING", "P": "PENDING", "S": "PENDING",
               "R": "RUNNING", "C": "RUNNING"}
    #: Results of inactive jobs (``CANCELED`` is Flux's spelling).
    _RESULTS = {"COMPLETED": "COMPLETED", "CD": "COMPLETED", "FAILED": "FAILED", "F": "FAILED",
                "CANCELED": "CANCELLED", "CA": "CANCELLED", "TIMEOUT": "TIMEOUT", "TO": "TIMEOUT"}
    _CANCEL_BENIGN = ("job is inactive", "unknown job", "not found")
    _FORMAT = "{id.dec}|{state}|{result}|{returncode}|{exception.type}"

    def __init__(self, mode: str = "flux", flux: str = "flux", python: str = "",
                 config: Optional[Config] = None) -> None:
        super().__init__(mode=mode, python=python, config=config)
        self.flux = flux

    def _run(self, argv: Sequence[str], *, check: bool = True, input: Optional[str] = None,
             env: Optional[Mapping[str, str]] = None, submit: bool = False) -> CommandResult:
        # Ask for "f" ids: "ƒ" may not survive a non-UTF-8 locale.
        return super()._run(argv, check=check, input=input, env=dict(os.environ, FLUX_F58_FORCE_ASCII="1"),
                            submit=submit)

    # ------------------------------------------------------------ submit

    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Submit one job with ``flux submit``; return its decimal id (an array: the first element's)."""
        return self._submit_ids(resources, command)[0]

    def submit_array(self, resources: JobResources, command: Sequence[str], size: int,
                     throttle: Optional[int] = None) -> List[str]:
        """Submit ``size`` jobs with one ``flux submit --cc=0-N``; return every id in index order.

        Flux has no throttle: the engine's wave cap limits concurrency.
        """
        spec = f"{self.array_base}-{self.array_base + size - 1}"
        ids = self._submit_ids(dataclasses.replace(resources, array=spec), command)
        if len(ids) != size and self.mode != "dry-run":
            raise ExecutorError(f"flux submit --cc={spec} printed {len(ids)} ids, expected {size}")
        return ids if self.mode != "dry-run" else ["DRYRUN"] * size

    def _submit_ids(self, resources: JobResources, command: Sequence[str]) -> List[str]:
        """Run ``flux submit`` and return the decimal ids it printed, one per line."""
        options = self._normalize_options(resources.options)
        argv = [self.flux, "submit", *self._resource_flags(resources, options), *self._option_flags(options)]
        argv.append(str(self._write_script(resources, self._script_lines(resources, command))))
        if self.mode == "dry-run":
            return [self._dry_run(argv)]
        return self._parse_submit(self._run(argv, submit=True))

    def _resource_flags(self, resources: JobResources, options: Dict[str, Any]) -> List[str]:
        """Map the JobResources fields to flux submit flags."""
        argv = [f"--job-name={resources.job_name}"] if resources.job_name else []
        argv += ["-n", "1", "-c", str(int(resources.cpus)), "-t", _flux_duration(parse_time(resources.time_limit))]
        gpus = int(options.pop("gpus", None) or resources.gpus or 0)
        if gpus:
            argv += ["-g", str(gpus)]
        bounds = resources.array_bounds()
        if bounds:
            argv.append(f"--cc={bounds[0]}-{bounds[1]}")
            if bounds[2]:
                log.debug("flux: array throttle %s not supported; the wave cap limits concurrency", bounds[2])
        tokens = {"{job_id}": "{{id.dec}}", "{array_index}": "{cc}" if bounds else ""}
        for flag, path in (("--output", resources.output_path), ("--error", resources.error_path)):
            if path:
                argv.append(f"{flag}={_native_path(path, tokens)}")
        if resources.workdir:
            argv.append(f"--cwd={resources.workdir}")
        return argv

    def _option_flags(self, options: Dict[str, Any]) -> List[str]:
        """Render queue/bank, signal and the other options (``--kebab-case=value``)."""
        self._unsupported(options, {"qos": "Flux has no QoS; use a queue", "mail_user": "Flux sends no mail",
                                    "mail_type": "Flux sends no mail"})
        argv: List[str] = []
        for key, flag in (("queue", "-q"), ("bank", "-B")):
            if options.get(key):
                argv += [flag, str(options.pop(key))]
        if options.get("signal"):
            name, seconds = _parse_signal_spec(options.pop("signal"))
            argv.append(f"--signal={name if name.isdigit() else 'SIG' + name}@{seconds}s")
        return argv + _long_flags(options)

    @staticmethod
    def _parse_submit(result: CommandResult) -> List[str]:
        """Return the decimal ids ``flux submit`` printed, one per line (``ƒ2yT8qZ5e`` or ``f2yT8qZ5e``)."""
        ids = []
        for line in filter(None, (line.strip() for line in result.stdout.splitlines())):
            try:
                ids.append(_flux_decimal_id(line))
            except ValueError:
                raise ExecutorError(f"flux submit printed no job id: {line[:200]!r}", result) from None
        if not ids:
            raise ExecutorError("flux submit printed no job id", result)
        return ids

    # ------------------------------------------------ ids, dependencies

    def element_id(self, array_id: str, position: int) -> str:
        """Flux elements are separate jobs; :meth:`submit_array` returns their ids."""
        return array_id

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Return ``{"dependency": ["afterany:ID", ...]}``: one ``--dependency`` per id."""
        ids = self._masters(job_ids)
        return {"dependency": [f"{kind}:{job_id}" for job_id in ids]} if ids else {}

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Return ``{"begin_time": "+Ns"}`` (``--begin-time=+Ns``)."""
        return {"begin_time": f"+{max(1, int(seconds))}s"}

    # ------------------------------------------------------------ status

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Ask ``flux jobs -a -n -o ...`` once for every id."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if not ids:
            return {}
        result = self._run([self.flux, "jobs", "-a", "-n", "-o", self._FORMAT, *ids], check=False)
        failed = result.returncode != 0 and not result.stdout.strip()
        if failed and not re.search(r"unknown|not found|invalid", result.stderr, re.I):
            raise ExecutorError(f"flux jobs exited {result.returncode}: {_tail(result.stderr)}", result)
        rows = self._parse_jobs(result.stdout)
        by_decimal = {}
        for job_id in ids:
            with contextlib.suppress(ValueError):
                by_decimal[job_id] = _flux_decimal_id(job_id)
        return {job_id: rows[dec] for job_id, dec in by_decimal.items() if dec in rows}

    @classmethod
    def _parse_jobs(cls, text: str) -> Dict[str, JobInfo]:
        """Parse ``flux jobs -n -o "{id.dec}|{state}|{result}|{returncode}|{exception.type}"``.

        Sample::

            1234567890123|INACTIVE|COMPLETED|0|
            1234567890124|RUN|||
            1234567890125|INACTIVE|FAILED|-128|dependency
        """
        rows: Dict[str, JobInfo] = {}
        for line in text.splitlines():
            fields = [f.strip() for f in line.split("|")] + [""] * 4
            if fields[0].isdigit():
                rows[fields[0]] = cls._info(*fields[1:5])
        return rows

    @classmethod
    def _info(cls, state: str, result: str, returncode: str, exception: str) -> JobInfo:
        """Map a Flux state, result, returncode and exception type to a JobInfo."""
        if state not in ("INACTIVE", "I"):
            return JobInfo(cls._STATES.get(state, "RUNNING"), "" if state in cls._STATES else f"state {state}")
        code = _leading_int(returncode)
        if exception == "dependency":
            return JobInfo("FAILED", "DEPENDENCY_NEVER_SATISFIED", code)
        mapped = cls._RESULTS.get(result, "FAILED")
        if mapped == "FAILED":
            reason = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
            return JobInfo("FAILED", f"{exception}: {reason}" if exception else reason, code)
        return JobInfo(mapped, "" if mapped == "COMPLETED" else mapped, code)  # TIMEOUT, CANCELLED

    # ----------------------------------------------------- cancel, find

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs with one ``flux cancel a b``; inactive or unknown ids are fine."""
        ids = [str(j) for j in dict.fromkeys(job_ids) if j and j != "DRYRUN"]
        if ids:
            self._check_benign(self._run([self.flux, "cancel", *ids], check=False), self._CANCEL_BENIGN)

    def _list_jobs(self) -> List[Tuple[str, str]]:
        """List this user's active jobs: ``flux jobs -n -o "{id.dec}|{name}"``."""
        result = self._run([self.flux, "jobs", "-n", "-o", "{id.dec}|{name}"])
        pairs = [line.strip().split("|", 1) for line in result.stdout.splitlines() if "|" in line]
        return [(job_id, name) for job_id, name in pairs]


def _flux_duration(seconds: int) -> str:
    """Format seconds as a Flux duration (FSD): ``90s``, ``30m``, ``2h``, ``1d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# =============================================================================
# Executors: local (background processes with a spool, like a tiny scheduler)
# =============================================================================


class LocalExecutor(Executor):
    """Run jobs as background processes on this machine.

    It behaves like a small batch scheduler, so ``submit(executor="local")``
    uses the same dispatcher-as-a-job protocol as a cluster: every job is a
    detached runner process (its own session) that waits for its
    dependencies, honours ``array_parallelism`` and the job's ``cpus`` against
    the machine's cores (slot locks shared by all local jobs of the user),
    enforces the walltime, and records its state in a spool directory
    (``<run_dir>/.reflow/local``).  ``cancel`` kills the runner's process
    group.

    When a job's command is ``<this python> SCRIPT.py ...`` (workers and
    dispatchers are), its runner imports what a worker needs once and forks
    each element from itself instead of starting a fresh interpreter: about
    20 ms less per element.  The child resets what a fresh interpreter
    would not have (session, signals, fds, cwd, environment, ``sys.argv``
    and ``sys.path``, ``__main__``); wherever a fork could differ (another
    interpreter, a variable the interpreter reads at start in the job's
    environment (``_STARTUP_ENV_PREFIXES``), a script that would import
    another reflow) the elements start fresh as before.
    ``REFLOW_LOCAL_FORK=0`` turns forking off; the job's state file says
    how its elements started (``element_start``).
    """

    name = "local"
    array_index_env_var = "REFLOW_ARRAY_INDEX"
    array_base = 0
    max_array_size = 1_000_000

    def __init__(self, capture_output: bool = False, mode: str = "local", python: str = "",
                 config: Optional[Config] = None, spool: Optional[Union[str, Path]] = None) -> None:
        super().__init__(mode=mode, python=python, config=config)
        self.capture_output = capture_output
        self.spool = Path(spool) if spool else None

    def bind_run(self, run_dir: Union[str, Path]) -> None:
        """Keep this executor's job records under the run directory."""
        self.spool = Path(run_dir) / ".reflow" / "local"

    def _spool(self) -> Path:
        return _private_dir(self.spool or Path.cwd() / ".reflow" / "local")

    def describe(self) -> Dict[str, Any]:
        """Return what must be stored with a run to rebuild this executor."""
        return dict(super().describe(), spool=str(self.spool) if self.spool else "")

    # ------------------------------------------------------------ submit

    def submit(self, resources: JobResources, command: Sequence[str]) -> str:
        """Start a detached runner for the job and return its id."""
        if self.mode == "dry-run":
            log.info("dry-run: would run %s", _shell_join(command))
            return "DRYRUN"
        spool = self._spool()
        job_id = f"{int(time.time() * 1000) % 10**10:010d}{_random_hex(6)}"
        bounds = resources.array_bounds()
        options = self._normalize_options(resources.options)
        record = {
            "id": job_id, "command": [str(word) for word in command], "name": resources.job_name,
            "array": list(bounds) if bounds else None, "cpus": int(resources.cpus),
            "time_limit": parse_time(resources.time_limit), "output": resources.output_path,
            "error": resources.error_path, "workdir": resources.workdir, "env": resources.env or {},
            "after": options.get("dependency", {}), "delay": float(options.get("delay", 0)),
            "capture": self.capture_output, "submitted_at": time.time(),
        }
        _atomic_write(spool / f"{job_id}.job", json.dumps(record))
        self._write_state(job_id, {"state": "PENDING"})
        self._start_runner(spool, job_id)
        return job_id

    def _start_runner(self, spool: Path, job_id: str) -> None:
        """Launch the runner of a job (``_local-job``) as a daemon (reparented to init, no zombie left here).

        The runner imports this file as a module, so its cached bytecode is
        used: run as a script it would be compiled anew for every job (a
        tenth of a second).  It starts as the job's elements would (the
        environment's PYTHON* variables and user site count, not ``-I``),
        so that elements forked from it see the ``sys.path`` of a fresh
        worker; its program drops the cwd entry of ``-c`` first.
        ``/bin/sh`` only backgrounds it: the scripts are constant and every
        value is passed as a positional argument, never interpolated.
        """
        module_file = os.path.abspath(sys.modules[__name__].__file__ or sys.argv[0])
        argv = [sys.executable, "-c", _RUNNER_PROGRAM, module_file, "_local-job", str(spool), job_id]
        with _open_append(spool / f"{job_id}.runner.log") as runner_log:
            subprocess.run(["/bin/sh", "-c", 'exec "$@" &', "sh", *argv], stdin=subprocess.DEVNULL,
                           stdout=runner_log, stderr=runner_log, close_fds=True, check=True)

    def array_id(self, job_id: str) -> str:
        """Return ``<id>`` of an element id ``<id>_<position>``."""
        return job_id.split("_")[0]

    def element_id(self, array_id: str, position: int) -> str:
        """Return ``<id>_<position>``, as Slurm does."""
        return f"{array_id}_{position}"

    def dependency_options(self, job_ids: Sequence[str], kind: str = "afterany") -> Dict[str, Any]:
        """Make the job wait for ``job_ids`` (array elements wait on their array)."""
        masters = sorted({job_id.split("_")[0] for job_id in job_ids})
        return {"dependency": {"kind": kind, "ids": masters}} if masters else {}

    def delay_options(self, seconds: int) -> Dict[str, Any]:
        """Make the job sleep ``seconds`` before it starts."""
        return {"delay": max(0, int(seconds))}

    def find_jobs(self, name_prefix: str) -> Dict[str, List[str]]:
        """Return ``{job name: [job ids]}`` of unfinished local jobs whose name starts with a prefix."""
        found: Dict[str, List[str]] = {}
        for path in sorted(self._spool().glob("*.job")):
            try:
                name = json.loads(path.read_text()).get("name") or ""
            except (OSError, ValueError):
                continue
            state = self._read_state(path.stem)
            if name.startswith(name_prefix) and state and state["state"] not in FINAL_JOB_STATES:
                found.setdefault(name, []).append(path.stem)
        return found

    # ------------------------------------------------------ state, cancel

    def _state_path(self, job_id: str) -> Path:
        return self._spool() / f"{job_id.split('_')[0]}.state"

    def _write_state(self, job_id: str, state: Dict[str, Any]) -> None:
        _atomic_write(self._state_path(job_id), json.dumps(state))

    def _elements_path(self, job_id: str) -> Path:
        return self._spool() / f"{job_id.split('_')[0]}.elements"

    def _read_state(self, job_id: str, elements: bool = False) -> Optional[Dict[str, Any]]:
        """Return a job's state record; with ``elements``, its ``elements`` map holds every element's exit too."""
        try:
            state = json.loads(self._state_path(job_id).read_text())
        except (OSError, ValueError):
            return None
        if elements:
            state.setdefault("elements", {}).update(self._read_elements(job_id))
        return state

    def _read_elements(self, job_id: str) -> Dict[str, Tuple[Optional[int], str]]:
        """Read a job's element log: ``{index: (exit code, reason)}`` (a torn last line is skipped)."""
        try:
            lines = self._elements_path(job_id).read_bytes().splitlines()
        except OSError:
            return {}
        found = {}
        for line in lines:
            try:
                key, code, reason = json.loads(line)
            except (ValueError, TypeError):
                continue
            found[str(key)] = (code, str(reason))
        return found

    def job_state(self, job_id: str) -> Optional[str]:
        """Return one job's state from the spool."""
        info = self.job_infos([job_id]).get(job_id)
        return info.state if info else None

    def job_infos(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        """Read each array's state file once and report every element asked for."""
        infos: Dict[str, JobInfo] = {}
        cache: Dict[str, Optional[Dict[str, Any]]] = {}
        for job_id in dict.fromkeys(job_ids):
            if job_id == "DRYRUN":
                continue
            master, _, element = job_id.partition("_")
            if master not in cache:
                cache[master] = self._read_state(master, elements=True)
            state = cache[master]
            if state is not None:
                infos[job_id] = _local_job_info(state, element)
        return infos

    def cancel(self, job_id: str) -> None:
        """Kill the job's process group and record it as CANCELLED."""
        self.cancel_many([job_id])

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Kill every listed job (arrays as a whole)."""
        for master in sorted({job_id.split("_")[0] for job_id in job_ids if job_id != "DRYRUN"}):
            state = self._read_state(master)
            if state is None or state["state"] in FINAL_JOB_STATES:
                continue
            if _is_runner(state.get("pid"), master):  # a dead runner's pid may belong to anyone now
                _kill_group(state.get("pid"))
            state = self._read_state(master) or state
            if state["state"] not in FINAL_JOB_STATES:
                state.update(state="CANCELLED", reason="CANCELLED", ended=time.time())
                self._write_state(master, state)


def _local_job_info(state: Mapping[str, Any], element: str) -> JobInfo:
    """Turn a local state record into the JobInfo of the job or one element."""
    if element and element in state.get("elements", {}):
        code, reason = state["elements"][element]
        return JobInfo(_exit_state(code, reason), reason, code)
    if element and state["state"] in FINAL_JOB_STATES and state["state"] != "CANCELLED":
        return JobInfo("FAILED", state.get("reason") or "element never ran", None)
    return JobInfo(state["state"], state.get("reason", ""), state.get("exit_code"))


def _exit_state(code: Optional[int], reason: str) -> str:
    """Map an element's exit code and reason to a job state."""
    if reason in ("TIMEOUT", "CANCELLED"):
        return reason
    return "COMPLETED" if code == 0 else "FAILED"


def _is_runner(pid: Optional[int], job_id: str) -> bool:
    """Tell whether ``pid`` is still the local runner of ``job_id`` (not a recycled pid)."""
    if not pid:
        return False
    if not Path("/proc/self/cmdline").exists():  # no /proc (not Linux): trust a pid that exists
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"_local-job" in argv and job_id.encode() in argv


def _kill_group(pid: Optional[int], grace: float = 3.0) -> None:
    """SIGTERM a process group, then SIGKILL it if it is still there after ``grace``."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _CpuSlots:
    """Per-user CPU slots shared by every local job (flock on numbered files).

    A process holding ``n`` slot locks may run an element needing ``n`` cpus;
    the kernel releases the locks if the process dies.
    """

    def __init__(self, total: int) -> None:
        base = Path(tempfile.gettempdir()) / f"reflow-slots-{os.getuid() if hasattr(os, 'getuid') else 0}"
        self.dir = _private_dir(base)
        if self.dir.stat().st_uid != os.getuid():
            raise ExecutorError(f"{self.dir} belongs to another user; refusing to use it")
        self.total = max(1, total)

    def try_acquire(self, cpus: int) -> Optional[List[int]]:
        """Take ``cpus`` free slots (capped at the total) and return their fds, or None if too few are free."""
        wanted = min(max(1, cpus), self.total)
        held: List[int] = []
        for slot in range(self.total):
            fd = os.open(self.dir / f"slot{slot}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            held.append(fd)
            if len(held) == wanted:
                return held
        self.release(held)
        return None

    @staticmethod
    def release(fds: List[int]) -> None:
        """Release slots taken by :meth:`try_acquire`."""
        for fd in fds:
            os.close(fd)


class _ExitWatch:
    """Sleep until a watched process ends: one pidfd each (Linux >= 5.3), else short fixed sleeps.

    Processes need not be children.  Without ``os.pidfd_open`` (or when the
    kernel refuses it) every wait is a sleep of at most ``fallback`` seconds
    and callers poll, as before pidfds existed.
    """

    def __init__(self, fallback: float) -> None:
        self.fallback = fallback
        self.poller = select.poll() if hasattr(os, "pidfd_open") and hasattr(select, "poll") else None
        self.pidfds: Dict[int, int] = {}

    def watch(self, pid: int) -> bool:
        """Start watching ``pid``; False when it cannot be watched (gone, or no pidfds here)."""
        if self.poller is None:
            return False
        if pid in self.pidfds:
            return True
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError:  # ENOSYS (kernel < 5.3) or a sandbox refusing the call: poll from now on
            self.close()
            self.poller = None
            return False
        self.pidfds[pid] = fd
        self.poller.register(fd, select.POLLIN)  # readable once the process has ended
        return True

    def forget(self, pid: int) -> None:
        """Stop watching ``pid``."""
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            if self.poller is not None:
                self.poller.unregister(fd)
            os.close(fd)

    def wait(self, timeout: float) -> None:
        """Return when a watched process ends or ``timeout`` passed (``fallback`` at most when nothing is watched)."""
        timeout = max(0.0, timeout)
        if self.poller is None or not self.pidfds:
            time.sleep(min(timeout, self.fallback))
        else:
            self.poller.poll(min(timeout, 60.0) * 1000)  # bounded: poll() takes an int of milliseconds

    def close(self) -> None:
        """Close every pidfd."""
        for pid in list(self.pidfds):
            self.forget(pid)


class _ForkedElement:
    """An element forked from its runner, with the part of ``subprocess.Popen`` the runner uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        """Return the exit code (minus the signal number if a signal ended it), or None while it runs."""
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self) -> int:
        """Wait for the element to end and return its exit code."""
        while self.returncode is None:
            self._reap(0)
        return self.returncode

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # SIGCHLD ignored (inherited): reaped unseen; Popen says 0 then too
            self.returncode = 0
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)


#: Variables of a job's environment that the interpreter reads when it starts (or, for TZ,
#: when ``time`` is imported): a forked element would keep the runner's values instead.
_STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "LC_", "LANG", "TZ", "HOME")
#: Standard modules a worker imports that a runner imports once before it forks elements.
#: None of them starts a thread, registers an atexit handler or draws a per-process secret
#: at import (multiprocessing and logging would).
_ELEMENT_MODULES = ("dataclasses", "inspect", "locale", "pathlib", "tempfile", "traceback", "typing")
#: Jobs of this many elements or more have reflow's own deferred work done in their runner (about
#: 6 ms, once) rather than in each element (about 2.5 ms each, measured on the bench's worker).
_DEFERRED_WORK_ELEMENTS = 3


class _ElementForker:
    """Start a job's elements as forks of its runner instead of fresh interpreters (about 20 ms less each).

    The runner never imports user code and runs no thread.  Once per job
    it imports what a worker needs from the standard library (``reflow``
    is loaded already); then each element is a fork whose child makes
    itself what ``python script.py ARGS`` would have been: its own session,
    the signal handlers and mask the runner had when it started (not its
    SIGTERM handler), stdin from /dev/null, stdout and stderr on the
    element's logs, no other open fd, the job's cwd and environment,
    ``sys.argv``, ``sys.orig_argv``, ``sys.path`` and the ``__main__``
    module as the interpreter sets them.  It then runs the script and ends
    as the interpreter does (_run_as_script).  The only atexit handlers it
    inherits are those registered while the runner's interpreter started
    (site's .pth files): a fresh interpreter registers them too; a runner
    that gained more does not fork.

    ``random`` reseeds itself in a forked child, and ``os.urandom``,
    ``uuid.uuid4`` and ``secrets`` draw from the kernel, so elements draw
    different values.  What a fork cannot redo: the elements of a job share
    the runner's ``str`` hash seed (as with a fixed ``PYTHONHASHSEED``),
    find ``reflow`` and some standard modules imported already, and ``ps``
    shows them with the runner's command line.

    :meth:`prepare` names what would make a fork differ from a fresh
    interpreter; the elements then start as fresh processes, as they do
    when ``REFLOW_LOCAL_FORK=0`` is set.
    """

    def __init__(self) -> None:
        # Taken before the runner changes anything: what a fresh interpreter started here would have.
        self.fresh_sigterm = signal.getsignal(signal.SIGTERM)
        self.fresh_mask = signal.pthread_sigmask(signal.SIG_BLOCK, []) if hasattr(signal, "pthread_sigmask") else None
        self.fresh_atexit = getattr(atexit, "_ncallbacks", lambda: -1)()  # site's (.pth) handlers: a fresh one has them

    def prepare(self, command: Sequence[str], job_env: Mapping[str, str], workdir: str, elements: int = 1) -> str:
        """Warm this runner to fork ``command`` for ``elements`` elements; return "" or why a fork would differ.

        Differ from a fresh interpreter, that is: the elements then start as
        fresh processes.
        """
        refusal = self._refusal(command, job_env, workdir)
        if not refusal:
            self.warm(deferred=elements >= _DEFERRED_WORK_ELEMENTS)
            if atexit._ncallbacks() != self.fresh_atexit:  # a handler of the runner's own would run in elements
                refusal = "the runner registered atexit handlers"
            elif _thread_count() > 1:  # a fork copies only the calling thread: locks others hold stay held
                refusal = "the runner runs threads"
        return refusal

    def _refusal(self, command: Sequence[str], job_env: Mapping[str, str], workdir: str) -> str:
        """Return why forking would not start ``command`` as a fresh interpreter would; "" when it would."""
        if job_env.get("REFLOW_LOCAL_FORK", os.environ.get("REFLOW_LOCAL_FORK", "1")) in ("0", "no", "false"):
            return "REFLOW_LOCAL_FORK is off"
        if not (hasattr(os, "fork") and self.fresh_mask is not None and self.fresh_atexit >= 0
                and hasattr(atexit, "_run_exitfuncs")):
            return "this platform cannot fork an interpreter"
        if len(command) < 2 or command[0] != sys.executable or not command[1].endswith(".py"):
            return f"not '{sys.executable} SCRIPT.py ...'"
        startup = sorted(name for name in job_env if name.startswith(_STARTUP_ENV_PREFIXES))
        if startup or "PYTHONINSPECT" in os.environ:
            return f"the job sets {(startup or ['PYTHONINSPECT'])[0]}"
        if workdir and not os.path.isdir(workdir):
            return f"no directory {workdir}"
        return self._module_refusal(command[1], workdir or os.getcwd())

    @staticmethod
    def _module_refusal(script: str, cwd: str) -> str:
        """Say why the script would not see this interpreter's ``sys.path`` and ``reflow`` module, or ""."""
        pythonpath = os.environ.get("PYTHONPATH", "")  # empty counts as unset
        relative = [entry for entry in pythonpath.split(os.pathsep) if pythonpath and not os.path.isabs(entry)]
        if relative and not os.path.samefile(cwd, os.getcwd()):  # the interpreter resolves them in its start cwd
            return "PYTHONPATH has relative entries and the job runs in another directory"
        script = os.path.join(cwd, script)
        loaded = getattr(sys.modules.get("reflow"), "__file__", None)
        if not os.path.isfile(script) or not loaded or os.path.samefile(script, loaded):
            return "the script is missing or is reflow itself"
        spec = importlib.machinery.PathFinder.find_spec("reflow", _script_sys_path(script))
        if spec is None or spec.origin != loaded:
            return f"the script would import reflow from {spec.origin if spec else 'nowhere'}, not {loaded}"
        return ""

    @staticmethod
    def warm(deferred: bool = False) -> None:
        """Import the standard modules a worker needs, so that no element imports them again.

        With ``deferred``, also do the work ``import reflow`` leaves to first
        use: finish its dataclasses, compile its regular expressions (into
        ``re``'s cache), bind the sha256 constructor.
        """
        for name in _ELEMENT_MODULES:
            stand_in = globals().get(name)
            if isinstance(stand_in, _LoadOnUse):
                stand_in._load()
            else:
                importlib.import_module(name)
        if deferred:
            for cls in list(_PENDING_DATACLASSES):
                _finish_dataclass(cls)
            for value in list(globals().values()):
                if isinstance(value, _LazyRegex):
                    re.compile(*value._source)
            _hash16("")
        gc.freeze()  # what the runner holds now stays out of the elements' collections (and their pages shared)

    def start(self, command: Sequence[str], env: Dict[str, str], workdir: str, out: int, err: int) -> _ForkedElement:
        """Fork one element; return once it leads its own session, so that a cancel from now on reaches it.

        The caller blocks SIGTERM around this call: the child must not run
        the runner's handler before it has reset it.
        """
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()  # or the child would write the runner's buffered output again
        ready, ready_writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._become_element(command, env, workdir, (out, err), ready_writer)
        os.close(ready_writer)
        os.read(ready, 1)  # end of file: the child closed its end after setsid(), or died
        os.close(ready)
        return _ForkedElement(pid)

    def _become_element(self, command: Sequence[str], env: Dict[str, str], workdir: str, logs: Tuple[int, int],
                        ready: int) -> None:
        """Child side of :meth:`start`: turn into the element and run it; never returns."""
        code = 1
        try:
            os.setsid()
            os.close(ready)
            signal.signal(signal.SIGTERM, self.fresh_sigterm)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.fresh_mask or ())
            _take_stdio(*logs)
            if workdir:
                os.chdir(workdir)
            os.environ.clear()
            os.environ.update(env)
            loaded_tempfile: Any = sys.modules.get("tempfile")
            if loaded_tempfile is not None:
                loaded_tempfile.tempdir = None  # found again from this environment's TMPDIR
            code = _run_as_script(command[1:])
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)


def _thread_count() -> int:
    """Count this process's threads (also those ``threading`` does not know of, where /proc tells)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _script_sys_path(script: str) -> List[str]:
    """Return the ``sys.path`` of ``python SCRIPT`` started like this runner (whose cwd entry was dropped)."""
    if getattr(sys.flags, "safe_path", False):  # -P or PYTHONSAFEPATH (3.11+): no script directory
        return list(sys.path)
    return [os.path.dirname(os.path.realpath(script)), *sys.path]


def _take_stdio(out: int, err: int) -> None:
    """Put /dev/null on stdin, ``out`` and ``err`` on stdout and stderr, and close every other fd."""
    null = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(source, target)
    listing = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    try:
        open_fds = [int(name) for name in os.listdir(listing)]
    except OSError:
        open_fds = list(range(3, 1024))
    for fd in open_fds:
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own fd is gone already
                os.close(fd)


def _run_as_script(argv: Sequence[str]) -> int:
    """Run ``python SCRIPT ARGS`` (``argv``) in this process and end it as the interpreter would.

    Return the exit status: 0, a SystemExit code (a message is printed
    and gives 1), 1 after an uncaught exception (printed by
    ``sys.excepthook``), 120 when flushing stdout fails.  As the interpreter
    does, it then waits for non-daemon threads, runs the atexit handlers,
    flushes stdio and finalizes ``__main__``; an uncaught KeyboardInterrupt
    ends the process by SIGINT.
    """
    sys.argv = list(argv)
    if sys.version_info >= (3, 10):
        sys.orig_argv = [sys.executable, *argv]  # novermin
    sys.path[:] = _script_sys_path(argv[0])
    importlib.invalidate_caches()  # directory listings cached by the runner may be stale
    interrupted = False
    script = os.path.abspath(argv[0])
    try:
        _exec_as_main(script)
        code = 0
    except SystemExit as exc:
        code = _system_exit_status(exc.code)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        exc = exc.with_traceback(_script_frames(exc.__traceback__, script))  # the hook may print exc.__traceback__
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    code = _shut_down_like_python(code)
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


def _script_frames(trace: Any, script: str) -> Any:
    """Drop the frames before the script's own (this file's, importlib's): the traceback starts in the script."""
    while trace is not None and trace.tb_frame.f_code.co_filename != script:
        trace = trace.tb_next
    return trace


class _ScriptLoader(importlib.machinery.SourceFileLoader):
    """Load a script as ``python script.py`` does: compiled from its source, no bytecode cache read or written."""

    def get_code(self, fullname: str) -> Any:
        """Compile the script (under its own ``from __future__`` imports only, not this file's)."""
        return self.source_to_code(self.get_data(self.path), self.path)


def _exec_as_main(path: str) -> None:
    """Execute the file at ``path`` as a new ``__main__`` module with the attributes ``python path`` gives it."""
    main = types.ModuleType("__main__")
    vars(main).update(__annotations__={}, __builtins__=sys.modules["builtins"], __file__=path, __cached__=None,
                      __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    _ScriptLoader("__main__", path).exec_module(main)


def _system_exit_status(code: Any) -> int:
    """Return the exit status of ``SystemExit(code)``, printing a message code to stderr as the interpreter does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _shut_down_like_python(code: int) -> int:
    """Wait for non-daemon threads, run atexit handlers, flush stdio and finalize ``__main__``; return the status."""
    with contextlib.suppress(BaseException):  # a KeyboardInterrupt ends the wait, as in the interpreter
        getattr(threading, "_shutdown", lambda: None)()
    with contextlib.suppress(BaseException):  # atexit prints its handlers' errors (and 3.9 raises the last again)
        atexit._run_exitfuncs()
    if not _flush_stdio():
        code = 120
    if threading.active_count() == 1:  # no daemon thread can see its globals vanish
        _finalize_main()
        _flush_stdio()
    return code


def _finalize_main() -> None:
    """Clear ``__main__`` and collect garbage, as interpreter shutdown does: files left open get flushed."""
    with contextlib.suppress(Exception):  # a __main__ replaced by something odd: skip, as os._exit would
        getattr(sys.modules.get("__main__"), "__dict__", {}).clear()
    gc.collect()


def _flush_stdio() -> bool:
    """Flush stdout and stderr; False if that failed."""
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except Exception:
            flushed = False
    return flushed


class _LocalJobRunner:
    """Body of a local job's runner (started by ``LocalExecutor._start_runner``): run one job to its end.

    The state file holds the job's own state; each element's exit is
    appended to the job's element log as it happens (one short line, not a
    rewrite of a file that grows with the array).
    """

    POLL = 0.05

    def __init__(self, spool: Path, job_id: str, forker: Optional[_ElementForker] = None) -> None:
        """Load the job; with a ``forker``, elements are forked from this process when that is equivalent."""
        self.spool, self.job_id = spool, job_id
        self.job = json.loads((spool / f"{job_id}.job").read_text())
        self.executor = LocalExecutor(spool=spool)
        self.state: Dict[str, Any] = {"state": "PENDING", "pid": os.getpid(), "elements": {}}
        self.running: Dict[Optional[int], Tuple[Any, List[int], float]] = {}
        self.watch = _ExitWatch(self.POLL)
        self.forker = forker

    def run(self) -> int:
        """Wait for dependencies, run every element, record the outcome."""
        self._save()
        if not self._wait_for_dependencies():
            return 1
        time.sleep(self.job.get("delay") or 0)
        indices: Sequence[Optional[int]] = [None]
        throttle = None
        if self.job["array"]:
            first, last, throttle = self.job["array"]
            indices = range(first, last + 1)
        self._choose_element_start(len(indices))
        self.state.update(state="RUNNING", started=time.time())
        self._save()
        self._run_elements(indices, throttle or len(indices))
        codes = [code for code, _ in self.state["elements"].values()]
        failed = any(code != 0 for code in codes)
        self.state.update(state="FAILED" if failed else "COMPLETED", ended=time.time(),
                          exit_code=max((c for c in codes if c is not None), default=0))
        if not self.job["array"]:
            code, reason = self.state["elements"].pop("", (0, ""))
            self.state.update(state=_exit_state(code, reason), exit_code=code, reason=reason)
        self._save()
        return 0

    def _choose_element_start(self, elements: int) -> None:
        """Fork elements from this runner if that is equivalent to fresh processes; record the choice and why."""
        refusal = "runner in a foreign process"
        if self.forker is not None:
            refusal = self.forker.prepare(self.job["command"], self.job["env"], self.job["workdir"], elements)
        if refusal:
            self.forker = None
        self.state["element_start"] = f"exec: {refusal}" if refusal else "fork"

    def _check_cancelled(self) -> None:
        current = self.executor._read_state(self.job_id)
        if current and current.get("state") == "CANCELLED":
            raise SystemExit(0)  # cancelled meanwhile: the canceller's record stands

    def _save(self) -> None:
        self._check_cancelled()
        self.executor._write_state(self.job_id, {k: v for k, v in self.state.items() if k != "elements"})

    def _wait_for_dependencies(self) -> bool:
        """Wait for the dependencies to end (woken by their runners' exits, else polling); False if afterok failed."""
        after = self.job.get("after") or {}
        pending = list(after.get("ids", []))
        try:
            while pending:
                states = {job_id: self.executor._read_state(job_id) for job_id in pending}
                ended = {job_id: state["state"] if state else None for job_id, state in states.items()
                         if not state or state["state"] in FINAL_JOB_STATES}  # an unknown (vanished) id has ended
                if after.get("kind") == "afterok" and any(state != "COMPLETED" for state in ended.values()):
                    self.state.update(state="FAILED", reason="DEPENDENCY_NEVER_SATISFIED", ended=time.time())
                    self._save()
                    return False
                pending = [job_id for job_id in pending if job_id not in ended]
                if pending:
                    self.watch.wait(self._dependency_timeout({job_id: states[job_id] for job_id in pending}))
            return True
        finally:
            self.watch.close()

    def _dependency_timeout(self, states: Mapping[str, Any]) -> float:
        """Watch the pending jobs' runners; wait long only if every one of them is watched.

        A runner writes its final state before it exits, so its end is the
        moment to look again; the long timeout only guards against a missed
        wake-up.  Runners that ended are forgotten (their pidfds would stay
        readable and turn the wait into a busy loop).
        """
        self.watch.close()
        watched = [_is_runner(state.get("pid"), job_id) and self.watch.watch(state["pid"])
                   for job_id, state in states.items()]
        return 10.0 if all(watched) else self.POLL * 2

    def kill_elements(self) -> None:
        """Kill every running element's process group (the job was cancelled)."""
        for proc, _, _ in list(self.running.values()):
            _kill_group(proc.pid, grace=1.0)

    def _run_elements(self, indices: Sequence[Optional[int]], parallel: int) -> None:
        """Run elements with at most ``parallel`` at once, each holding its cpu slots.

        The next element starts as soon as one ends: the wait wakes on an
        element's exit (pidfd), on the nearest walltime, or after ``POLL``
        while cpu slots are taken by other jobs or pidfds are missing.
        """
        slots = _CpuSlots(_local_cpu_count())
        running = self.running
        position = 0
        with _open_append(self.executor._elements_path(self.job_id), buffering=0) as log:
            while position < len(indices) or running:
                starved = False
                while position < len(indices) and len(running) < parallel:
                    fds = slots.try_acquire(self.job["cpus"])
                    if fds is None:
                        starved = True
                        break
                    with _sigterm_deferred(self.forker is not None):  # a cancel meanwhile kills this element too
                        proc = self._start(indices[position])
                        running[indices[position]] = (proc, fds, time.monotonic())
                    starved |= not self.watch.watch(proc.pid)
                    position += 1
                self.watch.wait(self.POLL if starved else self._until_next_deadline())
                for done in [i for i, (proc, _, started) in running.items()
                             if proc.poll() is not None or self._timed_out(started)]:
                    self._finish(done, slots, log)

    def _timed_out(self, started: float) -> bool:
        return time.monotonic() - started > self.job["time_limit"]

    def _until_next_deadline(self) -> float:
        """Seconds until the first running element passes its walltime (a little after, so it has)."""
        first = min(started for _, _, started in self.running.values())
        return first + self.job["time_limit"] - time.monotonic() + 0.01

    def _finish(self, index: Optional[int], slots: _CpuSlots, log: Any) -> None:
        """Reap an ended (or overdue: killed here) element, free its slots and log its exit."""
        proc, fds, started = self.running.pop(index)
        timed_out = proc.poll() is None and self._timed_out(started)
        if timed_out:
            _kill_group(proc.pid, grace=2.0)
        code = proc.wait()
        self.watch.forget(proc.pid)
        slots.release(fds)
        reason = "TIMEOUT" if timed_out else ("" if code == 0 else _exit_reason(code))
        key = "" if index is None else str(index)
        self.state["elements"][key] = (code, reason)
        self._check_cancelled()
        log.write(json.dumps([key, code, reason]).encode() + b"\n")  # one write: appends never interleave

    def _start(self, index: Optional[int]) -> Any:
        """Start one element (forked, else a ``subprocess.Popen``) with its environment and log files."""
        env = dict(os.environ, **self.job["env"])
        env[JOB_ENV_MARKER] = "1"
        env["REFLOW_JOB_ID"] = self.job_id if index is None else f"{self.job_id}_{index}"
        if index is not None:
            env[LocalExecutor.array_index_env_var] = str(index)
        out = self._open_log(self.job["output"], index)
        err = self._open_log(self.job["error"], index) if self.job["error"] else out  # no error log: stdout's
        try:
            if self.forker is not None:
                return self.forker.start(self.job["command"], env, self.job["workdir"], out, err)
            return subprocess.Popen(self.job["command"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    cwd=self.job["workdir"] or None, env=env, start_new_session=True)
        finally:
            for fd in {out, err}:
                os.close(fd)

    def _open_log(self, template: Optional[str], index: Optional[int]) -> int:
        """Open an element's log file for appending (/dev/null without a template); return the fd."""
        if not template:
            return os.open(os.devnull, os.O_WRONLY)
        path = template.replace("{job_id}", self.job_id).replace("{array_index}", "" if index is None else str(index))
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


@contextlib.contextmanager
def _sigterm_deferred(active: bool = True) -> Iterator[None]:
    """Hold SIGTERM back for the block; one that came meanwhile is handled after it.

    Not around ``subprocess.Popen``: its child would keep the blocked mask.
    """
    if not (active and hasattr(signal, "pthread_sigmask")):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_reason(code: int) -> str:
    """Describe a non-zero exit: ``exit 3`` or ``signal 9``."""
    return f"signal {-code}" if code < 0 else f"exit {code}"


def _local_cpu_count() -> int:
    """Return the number of cores local jobs may use (``REFLOW_LOCAL_CPUS`` overrides)."""
    configured = os.environ.get("REFLOW_LOCAL_CPUS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: What ``python -c`` runs to start a local job's runner: ``argv`` is
#: ``[-c, REFLOW_FILE, _local-job, SPOOL, JOB_ID]``, the ``_local-job`` word only marking the
#: process as a runner for :func:`_is_runner` (see LocalExecutor._start_runner).  The cwd
#: entry of ``sys.path`` goes first: a stray json.py in the cwd must not shadow the stdlib.
_RUNNER_PROGRAM = """\
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]
import importlib.util
spec = importlib.util.spec_from_file_location("reflow", sys.argv[1])
module = sys.modules["reflow"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module._run_local_job(sys.argv[3], sys.argv[4]))
"""


def _run_local_job(spool: str, job_id: str) -> int:
    """Entry point of a local job runner (``_RUNNER_PROGRAM``)."""
    with contextlib.suppress(OSError):
        os.setsid()  # own session: cancel kills the runner's whole process group
    runner = _LocalJobRunner(Path(spool), job_id, _ElementForker())

    def on_term(signum: int, frame: Any) -> None:
        runner.kill_elements()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return runner.run()


# =============================================================================
# Executors: choosing one
# =============================================================================

#: Executor classes by short name; ``resolve_executor`` accepts these names.
EXECUTORS: Dict[str, Callable[..., Executor]] = {}
#: Config/env modes (``executor.mode``, ``REFLOW_MODE``) and the executor each selects.
MODE_ALIASES = {
    "sbatch": "slurm", "slurm": "slurm", "qsub-pbs": "pbs", "qsub": "pbs", "pbs": "pbs", "bsub": "lsf",
    "lsf": "lsf", "qsub-sge": "sge", "sge": "sge", "flux": "flux", "local": "local", "dry-run": "local",
}


def _executor_classes() -> Dict[str, Any]:
    """Return the executor classes by name (filled lazily: they are defined above)."""
    if not EXECUTORS:
        EXECUTORS.update(slurm=SlurmExecutor, pbs=PBSExecutor, lsf=LSFExecutor, sge=SGEExecutor,
                         flux=FluxExecutor, local=LocalExecutor)
    return EXECUTORS


def _build_executor(name: str, config: Optional[Config], mode: str = "") -> Executor:
    """Instantiate the executor ``name`` with binaries from the environment/config."""
    cls = _executor_classes()[name]
    if name == "local":
        return LocalExecutor(mode="dry-run" if mode == "dry-run" else "local", config=config)
    return cls.from_environment(config)


def resolve_executor(executor: Union[str, Executor, None] = None, config: Optional[Config] = None) -> Executor:
    """Return an executor instance for an instance, a short name, or None (the default).

    Names: ``slurm``, ``pbs``, ``lsf``, ``sge``, ``flux``, ``local``.  Any
    other string raises ValueError naming it and the closest valid name.
    """
    if isinstance(executor, Executor):
        return executor
    if executor is None:
        return default_executor(config)
    name = str(executor).strip().lower()
    if name not in _executor_classes():
        raise ValueError(f"unknown executor {executor!r} (choose from {', '.join(sorted(EXECUTORS))})."
                         + _suggest(name, EXECUTORS))
    return _build_executor(name, config)


def default_executor(config: Optional[Config] = None) -> Executor:
    """Return the executor for the configured mode.

    ``REFLOW_MODE`` or ``executor.mode`` decide when set; otherwise the
    scheduler whose commands are on PATH (sbatch, bsub, flux, qsub with Grid
    Engine or PBS); otherwise the local executor.
    """
    config = config if config is not None else load_config()
    mode = (os.environ.get("REFLOW_MODE") or config.get("executor.mode") or "").strip().lower()
    if mode:
        if mode not in MODE_ALIASES:
            raise ConfigError(f"unknown executor mode {mode!r}." + _suggest(mode, MODE_ALIASES))
        return _build_executor(MODE_ALIASES[mode], config, mode)
    return _build_executor(_detect_scheduler(config), config)


def _detect_scheduler(config: Config) -> str:
    """Name the scheduler whose client commands are on PATH, else ``local``."""
    for name, binary in (("slurm", "sbatch"), ("lsf", "bsub"), ("flux", "flux")):
        if shutil.which(config.executor_binary(binary)):
            return name
    if shutil.which(config.executor_binary("qsub")):
        grid_engine = os.environ.get("SGE_ROOT") or shutil.which("qconf")
        return "sge" if grid_engine else "pbs"
    return "local"


def executor_from_record(record: Mapping[str, Any], config: Optional[Config] = None) -> Executor:
    """Rebuild the executor stored with a run (``Executor.describe()``)."""
    name = record.get("name", "")
    classes = _executor_classes()
    if name not in classes:
        raise StoreError(f"run was submitted with unknown executor {name!r}")
    if name == "local":
        executor: Executor = LocalExecutor(mode=record.get("mode") or "local", python=record.get("python", ""),
                                           config=config, spool=record.get("spool") or None)
    else:
        executor = classes[name](python=record.get("python", ""), config=config, **record.get("binaries", {}))
    return executor


# =============================================================================
# Runs: operations on a recorded run (the store alone, no workflow source)
# =============================================================================

#: Names of reserved keys in a run's stored parameters.
P_RUN_DIR, P_FORCE, P_FORCE_TASKS, P_TASK_PARAMS = "run_dir", "__force__", "__force_tasks__", "__task_params__"
P_EXECUTOR, P_ENTRYPOINT, P_PYTHON, P_STORE = "__executor__", "__entrypoint__", "__python__", "__store_path__"
INTERNAL_PARAMS = frozenset({P_RUN_DIR, P_FORCE, P_FORCE_TASKS, P_TASK_PARAMS, P_EXECUTOR, P_ENTRYPOINT,
                             P_PYTHON, P_STORE})


def _results_dir(run_dir: Union[str, Path], run_id: str) -> Path:
    """Return where workers of a run drop their result files."""
    return Path(run_dir) / ".reflow" / "results" / run_id


def _result_name(task: str, index: Optional[int], attempt: int) -> str:
    """Return ``<task>__<index|singleton>__<attempt>`` (the attempt keeps a late retry apart)."""
    return f"{task}__{'singleton' if index is None else index}__{attempt}"


def _read_result_file(path: Path) -> Optional[Dict[str, Any]]:
    """Parse a result or start-marker file; None when it is malformed."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    required = ("instance_id", "attempt") if path.suffix == ".started" else ("instance_id", "attempt", "state")
    if not isinstance(record, dict) or any(key not in record for key in required):
        return None
    if path.suffix == ".json" and record["state"] not in ("SUCCESS", "FAILED"):
        return None
    return record


def _record_matches(record: Mapping[str, Any], name: str, owners: Mapping[int, Tuple[str, Optional[int]]]) -> bool:
    """Tell whether a result record belongs where it lies: its file name and an instance of this run.

    ``owners`` maps the run's instance ids to (task, index); a record copied
    from another run or renamed would otherwise update the wrong instance.
    """
    task, index, attempt = _parse_result_name(name)
    instance_id = record["instance_id"]
    return (task is not None and type(instance_id) is int and owners.get(instance_id) == (task, index)
            and record["attempt"] == attempt and record.get("task_name", task) == task
            and record.get("array_index", index) == index)


_RESULT_NAME_RE = _lazy_regex(r"^(?P<task>.+)__(?P<index>singleton|\d+)__(?P<attempt>\d+)\.(?:json|started)$")


def _parse_result_name(name: str) -> Tuple[Optional[str], Optional[int], int]:
    """Split ``<task>__<index>__<attempt>.json`` into its parts (task None if foreign)."""
    match = _RESULT_NAME_RE.match(name)
    if not match:
        return None, None, 0
    index = None if match["index"] == "singleton" else int(match["index"])
    return match["task"], index, int(match["attempt"])


def _load_run(store: Store, run_id: str) -> Dict[str, Any]:
    """Return a run row or raise RunNotFoundError naming the id (and the closest one)."""
    run = store.get_run(run_id)
    if run is None:
        known = [r["run_id"] for r in store.list_runs(limit=200)]
        raise RunNotFoundError(f"no run {run_id!r} in store {store.path}." + _suggest(run_id, known))
    return run


def _run_executor(params: Mapping[str, Any], config: Optional[Config], executor: Any = None) -> Executor:
    """Return the executor given, or the one recorded with the run."""
    if executor is not None:
        resolved = resolve_executor(executor, config)
    else:
        resolved = executor_from_record(params.get(P_EXECUTOR) or {"name": "local"}, config)
    if hasattr(resolved, "bind_run"):
        resolved.bind_run(params[P_RUN_DIR])
    return resolved


def _job_command(params: Mapping[str, Any], role: str, run_id: str, *extra: str) -> List[str]:
    """Return the argv of a dispatcher or worker job of a recorded run."""
    python = os.environ.get("REFLOW_PYTHON") or params.get(P_PYTHON) or sys.executable
    return [python, params[P_ENTRYPOINT], role, "--run-id", run_id, "--run-dir", params[P_RUN_DIR],
            "--store-path", params[P_STORE], *extra]


def start_dispatch_job(store: Store, run_id: str, *, verify: bool = False, executor: Optional[Executor] = None,
                       config: Optional[Config] = None, after: Sequence[str] = (), delay: int = 0) -> str:
    """Submit one dispatch cycle of a run as a job; record and return its id."""
    run = _load_run(store, run_id)
    params = run["parameters"]
    config = config if config is not None else load_config()
    executor = executor or _run_executor(params, config)
    options = dict(config.dispatch_submit_options)
    options.update(executor.dependency_options(list(after), "afterany"))
    if delay:
        options.update(executor.delay_options(delay))
    logs = Path(params[P_RUN_DIR]) / "logs"
    resources = JobResources(
        job_name=f"{run['graph_name']}-dispatch", cpus=config.dispatch_cpus, time_limit=config.dispatch_time,
        mem=config.dispatch_mem, output_path=str(logs / "dispatch-{job_id}.out"),
        error_path=str(logs / "dispatch-{job_id}.err"), submit_options=options, workdir=params[P_RUN_DIR],
    )
    command = _job_command(params, "dispatch", run_id, *(["--verify"] if verify else []))
    job_id = executor.submit(resources, command)
    _crash_point("dispatch-submitted")
    store.set_dispatch_job(run_id, job_id)
    return job_id


def cancel_run(store: Store, run_id: str, task_name: Optional[str] = None, executor: Any = None,
               config: Optional[Config] = None) -> int:
    """Cancel the active instances of a run (or of one task); return how many.

    The scheduler is called once for all distinct job ids; without a task,
    the pending dispatch job is cancelled too and the run becomes CANCELLED.
    """
    run = _load_run(store, run_id)
    _check_task_name(store, run_id, task_name)
    rows = store.instance_rows(run_id, states=sorted(TaskState.cancellable()), task_name=task_name)
    executor_obj = _run_executor(run["parameters"], config, executor)
    job_ids = {executor_obj.array_id(row[4]) for row in rows if row[4]}  # whole arrays: one id each
    if task_name is None and run.get("dispatch_job_id"):
        job_ids.add(run["dispatch_job_id"])
    if job_ids:
        executor_obj.cancel_many(sorted(job_ids))
    cancelled = store.cancel_instances([row[0] for row in rows])
    if task_name is None:
        store.update_run_status(run_id, RunState.CANCELLED.value)
    return cancelled


def retry_run(store: Store, run_id: str, task_name: Optional[str] = None, executor: Any = None,
              verify: bool = True, config: Optional[Config] = None) -> int:
    """Move FAILED/CANCELLED instances back to RETRYING and start a dispatch job.

    Returns how many instances moved; nothing is submitted when none did.
    """
    run = _load_run(store, run_id)
    _check_task_name(store, run_id, task_name)
    rows = store.instance_rows(run_id, states=sorted(TaskState.retriable()), task_name=task_name)
    moved = store.retry_instances([row[0] for row in rows])
    blocked = task_name is None and run["status"] in (RunState.FAILED.value, RunState.CANCELLED.value)
    if moved or blocked:
        store.update_run_status(run_id, RunState.RUNNING.value)
        executor_obj = _run_executor(run["parameters"], config, executor)
        start_dispatch_job(store, run_id, verify=verify, executor=executor_obj, config=config)
    return moved


def _check_task_name(store: Store, run_id: str, task_name: Optional[str]) -> None:
    """Raise GraphError when ``task_name`` is not a task of the run."""
    if task_name is None:
        return
    tasks = [spec["task_name"] for spec in store.get_task_specs(run_id)]
    if task_name not in tasks:
        raise GraphError(f"run {run_id!r} has no task {task_name!r}." + _suggest(task_name, tasks))


#: Failed elements ``status`` lists one by one (``logs --failed`` lists all).
STATUS_FAILED_LINES = 50
#: Instance states counted as finished by progress figures.
_DONE_STATES = ("SUCCESS", "FAILED", "CANCELLED")
#: Instance states that are waiting for the scheduler.
_QUEUED_STATES = ("PENDING", "SUBMITTED", "RETRYING")


def format_duration(seconds: Optional[float]) -> str:
    """Render seconds as ``850ms``, ``42s``, ``3m05s`` or ``2h04m`` (``-`` for None)."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def run_duration(run: Mapping[str, Any]) -> Optional[float]:
    """Return how long a run has lasted: to its last update when it ended, to now while RUNNING."""
    running = run.get("status") == RunState.RUNNING.value
    return _duration(run.get("created_at"), None if running else (run.get("updated_at") or run.get("created_at")))


def run_progress(summary: Mapping[str, Mapping[str, int]]) -> Dict[str, Any]:
    """Return ``{"done", "total", "percent"}`` over all instances of a run."""
    total = sum(sum(counts.values()) for counts in summary.values())
    done = sum(counts.get(state, 0) for counts in summary.values() for state in _DONE_STATES)
    return {"done": done, "total": total, "percent": round(100.0 * done / total, 1) if total else 0.0}


def check_owner(run: Mapping[str, Any], force: bool = False) -> None:
    """Refuse (ReflowError) to change another user's run in a shared store unless ``force``."""
    owner, me = run.get("user_id") or "", _current_user()
    if owner and owner != me and not force:
        raise ReflowError(f"run {run['run_id']!r} belongs to user {owner!r}, not {me!r}; "
                          "add --force to act on it anyway (nothing was changed)")


def run_status(store: Store, run_id: str) -> Dict[str, Any]:
    """Return the status of a run as a dict with stable keys (``status --json`` prints it).

    * ``run``: the run row -- ``run_id``, ``graph_name``, ``user_id``, ``status``,
      ``created_at``, ``updated_at``, ``dispatch_job_id``, ``parameters``.
    * ``progress``: ``{"done", "total", "percent"}``; ``duration_seconds``: float.
    * ``tasks``: one dict per task in topological order -- ``name``, ``is_array``,
      ``dependencies``, ``width``, ``counts`` ({STATE: n}), ``total``, ``cached``
      (cache hits), ``running_seconds`` (summed run time of its instances) and
      ``failed``: [{``index``, ``job_id``, ``attempt``, ``exit_code``, ``reason``}].
    * ``summary``: {task: {STATE: n}} (the ``counts`` again, keyed by task).
    * ``instances`` and ``failed_instances``: the instance rows.

    Unknown ids raise RunNotFoundError (a KeyError).
    """
    run = dict(_load_run(store, run_id))
    specs = store.get_task_specs(run_id)
    instances = store.list_task_instances(run_id)
    summary = store.task_state_summary(run_id)
    by_task: Dict[str, List[Dict[str, Any]]] = {}
    for inst in instances:
        by_task.setdefault(inst["task_name"], []).append(inst)
    tasks = [_task_status(spec, summary.get(spec["task_name"], {}), by_task.get(spec["task_name"], []))
             for spec in specs]
    return {"run": run, "progress": run_progress(summary), "duration_seconds": run_duration(run),
            "summary": {t["name"]: t["counts"] for t in tasks}, "tasks": tasks, "instances": instances,
            "failed_instances": [inst for inst in instances if inst["state"] == TaskState.FAILED.value]}


def _task_status(spec: Mapping[str, Any], counts: Mapping[str, int],
                 instances: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Return one task's entry of :func:`run_status`."""
    ran = (_duration(i["started_at"], i["finished_at"]) for i in instances if not i["cached"])
    failed = [{"index": i["array_index"], "job_id": i["job_id"], "attempt": i["attempt"],
               "exit_code": i["exit_code"], "reason": i["reason"] or ""}
              for i in instances if i["state"] == TaskState.FAILED.value]
    return {"name": spec["task_name"], "is_array": bool(spec["is_array"]),
            "dependencies": list(spec.get("dependencies") or []), "width": spec.get("width"),
            "counts": dict(counts), "total": sum(counts.values()), "cached": sum(1 for i in instances if i["cached"]),
            "running_seconds": round(sum(s for s in ran if s is not None), 3), "failed": failed}


def format_status(status: Mapping[str, Any], task: Optional[str] = None, errors: bool = False,
                  colour: bool = False) -> str:
    """Render :func:`run_status` as the human table of ``status``.

    One row per task (instances per state, cache hits, run time), then every
    failed element with its job id and the scheduler's reason; ``task`` also
    lists all of that task's instances, ``errors`` adds each failure's tail.
    """
    run, progress = status["run"], status["progress"]
    lines = [f"Run       {run['run_id']}", f"Workflow  {run['graph_name']}  (user {run['user_id'] or '?'})",
             f"Status    {_paint(run['status'], run['status'], colour)}",
             f"Started   {run['created_at'][:19].replace('T', ' ')} UTC   "
             f"duration {format_duration(status['duration_seconds'])}",
             f"Progress  {progress['done']}/{progress['total']} ({progress['percent']:g}%)", ""]
    header = ("TASK", "TOTAL", "SUCCESS", "FAILED", "RUNNING", "QUEUED", "CANCELLED", "CACHED", "RUN TIME")
    rows = [header] + [_status_row(entry) for entry in status["tasks"]]
    width = max(len(row[0]) for row in rows)
    for row in rows:
        lines.append("  " + row[0].ljust(width) + "".join(cell.rjust(len(title) + 2)
                                                             for cell, title in zip(row[1:], header[1:])))
    listed = [inst for inst in status["instances"]
              if inst["state"] == TaskState.FAILED.value or inst["task_name"] == task]
    if listed:
        lines += ["", "Failed elements" if task is None else f"Instances of {task} (and failed elements)"]
    shown = listed if task is not None else listed[:STATUS_FAILED_LINES]
    for inst in shown:
        lines.extend(_format_instance(inst, errors and inst["state"] == TaskState.FAILED.value, colour))
    if len(shown) < len(listed):
        lines.append(f"  ... and {len(listed) - len(shown)} more: `logs {run['run_id']} --failed` lists them all")
    return "\n".join(lines)


def _status_row(entry: Mapping[str, Any]) -> Tuple[str, ...]:
    """Return the cells of one task row of the status table."""
    counts = entry["counts"]
    queued = sum(counts.get(state, 0) for state in _QUEUED_STATES)
    name = entry["name"] + (" []" if entry["is_array"] else "")
    return (name, str(entry["total"]), str(counts.get("SUCCESS", 0)), str(counts.get("FAILED", 0)),
            str(counts.get("RUNNING", 0)), str(queued), str(counts.get("CANCELLED", 0)), str(entry["cached"]),
            format_duration(entry["running_seconds"]) if entry["total"] else "-")


def _format_instance(inst: Mapping[str, Any], errors: bool, colour: bool = False) -> List[str]:
    """Render one instance line (and its error tail when asked)."""
    label = inst["task_name"] + ("" if inst["array_index"] is None else f"[{inst['array_index']}]")
    took = _duration(inst.get("started_at"), inst.get("finished_at"))  # per element, also when packed
    took_text = "" if took is None else f"  {format_duration(took)}"
    exit_code = "" if inst.get("exit_code") is None else f"  exit {inst['exit_code']}"
    reason = f"  {inst['reason']}" if inst.get("reason") else ""
    state = _paint(f"{inst['state']:<10}", inst["state"], colour)
    lines = [f"  {label:<24} {state} job={inst['job_id'] or '-'}{took_text}{exit_code}{reason}"]
    if errors and inst.get("error_text"):
        text_lines = inst["error_text"].rstrip().splitlines()
        lines += [f"      | {line}" for line in text_lines[-15:]]
        if len(text_lines) > 15:
            lines.append(f"      ... ({len(text_lines) - 15} more lines, see `logs` for the files)")
    return lines


#: ANSI colour of each state on a terminal.
_ANSI = {"SUCCESS": "32", "FAILED": "31", "RUNNING": "36", "SUBMITTED": "33", "PENDING": "33",
         "RETRYING": "35", "CANCELLED": "90", "WAITING": "90"}


def use_colour(stream: Any = None) -> bool:
    """Tell whether to colour output: a terminal, and ``NO_COLOR`` unset (https://no-color.org)."""
    stream = sys.stdout if stream is None else stream
    return not os.environ.get("NO_COLOR") and bool(getattr(stream, "isatty", lambda: False)())


def _paint(text: str, state: str, colour: bool) -> str:
    """Wrap ``text`` in the ANSI colour of ``state`` when ``colour`` is on."""
    code = _ANSI.get(state)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def log_entries(store: Store, run_id: str, task: Optional[str] = None, index: Optional[int] = None,
                failed: bool = False) -> List[Dict[str, Any]]:
    """Describe where instances' logs are and why they ended as they did.

    Without ``task`` (or with ``failed``) only FAILED instances are listed.
    Each entry has task, index, state, attempt, job_id, exit_code, signal,
    reason, stdout, stderr (paths or None), stderr_tail, error_tail and element_log
    (the element's own lines of a packed job's log).
    """
    run = _load_run(store, run_id)
    _check_task_name(store, run_id, task)
    instances = store.list_task_instances(run_id, task)
    if index is not None:
        instances = [inst for inst in instances if inst["array_index"] == index]
        if not instances:
            raise GraphError(f"task {task!r} of run {run_id!r} has no element [{index}]")
    if failed or task is None:
        instances = [inst for inst in instances if inst["state"] == TaskState.FAILED.value]
    run_dir = Path(run["parameters"].get(P_RUN_DIR) or ".")
    return [_log_entry(run_dir, inst) for inst in instances]


def _log_stem(run_dir: Path, task: str, job_id: str) -> Path:
    """Return ``<run_dir>/logs/<task>-<job id>``: the start of the names of a job's log files."""
    return run_dir / "logs" / (task + "-" + re.sub(r"[^\w.-]", "_", job_id))


def _log_entry(run_dir: Path, inst: Mapping[str, Any]) -> Dict[str, Any]:
    """Describe one instance's log files, exit status and reason."""
    stem = _log_stem(run_dir, inst["task_name"], inst["job_id"]) if inst["job_id"] else None
    found = sorted(stem.parent.glob(f"{stem.name}*")) if stem else []
    stdout = next((str(p) for p in found if p.suffix == ".out"), None)
    stderr = next((str(p) for p in found if p.suffix == ".err"), None)
    error = (inst.get("error_text") or "").rstrip().splitlines()
    packed = [line for path in (stdout, stderr) if path  # the element's slice of a packed job's logs
              for line in element_log_lines(path, inst["task_name"], inst["array_index"])]
    return {"task": inst["task_name"], "index": inst["array_index"], "state": inst["state"],
            "attempt": inst["attempt"], "job_id": inst["job_id"], "exit_code": inst.get("exit_code"),
            "signal": exit_signal(inst.get("exit_code"), inst.get("reason") or ""), "reason": inst.get("reason") or "",
            "stdout": stdout, "stderr": stderr, "logs": [str(p) for p in found],
            "stderr_tail": _file_tail(stderr, 10), "error_tail": error[-15:], "element_log": packed[-30:]}


def exit_signal(exit_code: Optional[int], reason: str = "") -> Optional[str]:
    """Return the name of the signal that ended a job (``SIGKILL``), or None."""
    match = re.search(r"signal (\d+)", reason)
    number = int(match.group(1)) if match else None
    if number is None and exit_code is not None:
        number = -exit_code if exit_code < 0 else (exit_code - 128 if 128 < exit_code < 160 else None)
    if not number:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _file_tail(path: Optional[str], lines: int) -> List[str]:
    """Return the last ``lines`` lines of a text file (reading at most its last 64 KiB)."""
    if not path:
        return []
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.rstrip().splitlines()[-lines:]


# =============================================================================
# Engine: inputs, identities and cache look-ups of task instances
# =============================================================================


def build_kwargs(spec: TaskSpec, run_parameters: Mapping[str, Any], task_input: Mapping[str, Any]) -> Dict[str, Any]:
    """Build the keyword arguments of one task call.

    Each parameter takes the first available of: the run directory (RunDir
    or ``run_dir``), its Result value in ``task_input``, the task-local
    value, the global run parameter.  Otherwise it is left out, so the
    function's default applies.
    """
    local = (run_parameters.get(P_TASK_PARAMS) or {}).get(spec.name, {})
    kwargs: Dict[str, Any] = {}
    for name, is_rundir in spec.call_plan:
        if is_rundir and P_RUN_DIR in run_parameters:
            kwargs[name] = Path(run_parameters[P_RUN_DIR])
        elif name in task_input:
            kwargs[name] = task_input[name]
        elif name in local:
            kwargs[name] = local[name]
        elif name in run_parameters and name not in INTERNAL_PARAMS and name not in spec.result_deps:
            kwargs[name] = run_parameters[name]
    return kwargs


def _received_params(spec: TaskSpec, run_parameters: Mapping[str, Any]) -> Dict[str, Any]:
    """Return the run parameters that reach a task (part of its cache identity)."""
    kwargs = build_kwargs(spec, run_parameters, {})
    for name, is_rundir in spec.call_plan:
        if is_rundir:
            kwargs.pop(name, None)
    return kwargs


def resolve_index(explicit: Optional[int] = None) -> Optional[int]:
    """Return the array index of this job: ``explicit``, else the scheduler's variable, else None."""
    if explicit is not None:
        return int(explicit)
    for var in ("REFLOW_ARRAY_INDEX", "SLURM_ARRAY_TASK_ID", "PBS_ARRAY_INDEX", "PBS_ARRAYID", "LSB_JOBINDEX",
                "SGE_TASK_ID", "FLUX_JOB_CC", "OAR_ARRAY_INDEX"):
        value = os.environ.get(var, "")
        if value.lstrip("-").isdigit():
            return int(value)
    return None


def _flatten(values: Iterable[Any], source: str) -> List[Any]:
    """Concatenate list outputs; a non-list raises GraphError naming ``source``."""
    out: List[Any] = []
    for value in values:
        if not isinstance(value, list):
            raise GraphError(f"{source} returned {type(value).__name__}, expected a list to flatten")
        out.extend(value)
    return out


class _StoreOutputs:
    """Upstream outputs as the store holds them (the dispatcher's view)."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id

    def singleton(self, task: str) -> Any:
        """Return the output of a singleton task."""
        return self.store.get_singleton_output(self.run_id, task)

    def array(self, task: str) -> List[Any]:
        """Return the outputs of an array task in index order."""
        return self.store.get_array_outputs(self.run_id, task)

    def hashes(self, task: str) -> List[str]:
        """Return the output hashes of a task's instances in index order."""
        return self.store.get_all_output_hashes(self.run_id, task)

    def digest(self, task: str) -> Optional[str]:
        """Return the digest of a task's outputs (see :meth:`Store.get_outputs_digest`)."""
        return self.store.get_outputs_digest(self.run_id, task)


class _ResultFileOutputs(_StoreOutputs):
    """Upstream outputs for a worker whose inputs were deferred (forward submission).

    Upstream results may not be ingested yet: each instance's output comes
    from the store when it is SUCCESS there, else from its result file.  The
    file is read before the store is re-read, because the dispatcher
    commits an ingested result before it deletes the file.
    """

    def __init__(self, store: Store, run_id: str, results: Path) -> None:
        super().__init__(store, run_id)
        self.results = results
        self._cache: Dict[str, List[Tuple[Any, str]]] = {}

    def _outputs(self, task: str) -> List[Tuple[Any, str]]:
        if task not in self._cache:
            self._cache[task] = [self._one(inst) for inst in self.store.list_task_instances(self.run_id, task)]
        return self._cache[task]

    def _one(self, inst: Mapping[str, Any]) -> Tuple[Any, str]:
        if inst["state"] == TaskState.SUCCESS.value:
            return inst["output"], inst["output_hash"]
        path = self.results / f"{_result_name(inst['task_name'], inst['array_index'], inst['attempt'])}.json"
        record = _read_result_file(path) if path.exists() else None
        if record is not None and record["state"] == TaskState.SUCCESS.value:
            return DEFAULT_CODEC.load_value(record.get("output")), record.get("output_hash", "")
        fresh = self.store.get_task_instance(self.run_id, inst["task_name"], inst["array_index"])
        if fresh is not None and fresh["state"] == TaskState.SUCCESS.value:
            return fresh["output"], fresh["output_hash"]
        where = inst["task_name"] + ("" if inst["array_index"] is None else f"[{inst['array_index']}]")
        raise _UpstreamFailed(f"upstream {where} did not succeed ({(record or fresh or inst)['state']})")

    def singleton(self, task: str) -> Any:
        """Return the output of a singleton task."""
        outputs = self._outputs(task)
        return outputs[0][0] if outputs else None

    def element(self, task: str, index: int) -> Any:
        """Return one element's output without reading the whole array."""
        inst = self.store.get_task_instance(self.run_id, task, index)
        if inst is None:
            raise _UpstreamFailed(f"upstream {task}[{index}] does not exist")
        return self._one(inst)[0]

    def array(self, task: str) -> List[Any]:
        """Return the outputs of an array task in index order."""
        return [output for output, _ in self._outputs(task)]

    def hashes(self, task: str) -> List[str]:
        """Return the output hashes of a task's instances in index order."""
        return [digest for _, digest in self._outputs(task)]


#: Reason of an instance that never ran because its upstream failed.
UPSTREAM_FAILED = "UPSTREAM_FAILED"
#: Reason a worker records when a signal stopped it; the dispatcher asks the scheduler why (TIMEOUT...).
INTERRUPTED = "INTERRUPTED"


class _UpstreamFailed(ReflowError):
    """A deferred instance's upstream did not succeed, so it must not run."""


class _Planner:
    """Work out the instances of a task: inputs, identities, cache hits.

    Shared by the dispatcher, :meth:`Workflow.run_local` and workers whose
    inputs were deferred (they read upstream outputs from result files).
    """

    def __init__(self, wf: Workflow, store: Store, run_id: str, params: Mapping[str, Any], verify: bool,
                 outputs: Optional[_StoreOutputs] = None) -> None:
        self.wf, self.store, self.run_id, self.params, self.verify = wf, store, run_id, params, verify
        self.outputs = outputs or _StoreOutputs(store, run_id)
        self.modes = wf.wire_modes()
        forced = params.get(P_FORCE_TASKS) or []
        self.forced = set(wf.tasks) if params.get(P_FORCE) else wf.downstream_of(forced)

    def payloads(self, spec: TaskSpec) -> List[Dict[str, Any]]:
        """Return one input payload per instance (a singleton has exactly one).

        Raises GraphError when an upstream output cannot be fanned out.
        """
        values = {param: self._param_value(spec, param, result) for param, result in spec.result_deps.items()}
        if not spec.is_array:
            return [values]
        return self._fan_out(spec, values)

    def _param_value(self, spec: TaskSpec, param: str, result: Result) -> Any:
        """Return what ``param`` receives, before any per-element split."""
        mode = self.modes[(spec.name, param)]
        pieces = [self._contribution(step, mode) for step in result.steps]
        if len(pieces) == 1:
            return pieces[0]
        return _flatten(pieces, f"Result(steps={result.steps})") if all(isinstance(p, list) for p in pieces) else pieces

    def _contribution(self, step: str, mode: WireMode) -> Any:
        """Return one upstream task's output shaped by the wiring mode."""
        upstream = self.wf.tasks[step]
        if not upstream.is_array:
            return self.outputs.singleton(step)
        outputs = self.outputs.array(step)
        if mode in (WireMode.GATHER_FLATTEN, WireMode.CHAIN_FLATTEN):
            return _flatten(outputs, f"task {step!r}")
        return outputs

    def _fan_out(self, spec: TaskSpec, values: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Split parameter values into per-element payloads of an array task."""
        modes = {param: self.modes[(spec.name, param)] for param in values}
        per_element = [p for p in values if modes[p] in (WireMode.FAN_OUT, WireMode.CHAIN_FLATTEN)]
        per_element = per_element or [p for p in values if modes[p] is not WireMode.BROADCAST]
        if not per_element:
            raise GraphError(f"array task {spec.name!r} has only broadcast inputs; nothing to fan out over")
        driver = per_element[0]
        sequence = values[driver]
        if not isinstance(sequence, (list, tuple)):
            raise GraphError(f"array task {spec.name!r} needs a list in {driver!r} to fan out over, "
                             f"got {type(sequence).__name__}")
        width = len(sequence)
        zipped = [p for p in values if p == driver or (modes[p] is not WireMode.BROADCAST
                                                      and isinstance(values[p], list) and len(values[p]) == width)]
        for param in values:
            if modes[param] is WireMode.CHAIN and param not in zipped:
                raise GraphError(f"array task {spec.name!r}: {param!r} has {len(values[param])} elements, "
                                 f"{driver!r} has {width}")
        whole = {p: v for p, v in values.items() if p not in zipped}
        payloads = [dict(whole) for _ in range(width)]
        for param in zipped:  # column by column: no per-element dict of the zipped values to merge
            for payload, value in zip(payloads, values[param]):
                payload[param] = value
        return payloads

    def instance_rows(self, spec: TaskSpec) -> List[Dict[str, Any]]:
        """Return instance rows for a task: cache hits as SUCCESS, the rest PENDING."""
        rows = self._rows(spec, list(enumerate(self.payloads(spec))))
        if spec.config.cache and spec.name not in self.forced:
            self._apply_cache(spec, rows)
        return rows

    def expand(self, spec: TaskSpec, run: Optional[Callable[[List[Dict[str, Any]]], None]] = None
               ) -> Tuple[int, List[Dict[str, Any]]]:
        """Insert a task's instances; return its width and the rows inserted.

        A task whose group key matches an earlier, fully successful
        expansion is copied from it in SQL (no rows are returned);
        otherwise each instance is looked up on its own, ``run`` (if given)
        executes the cache misses in place before the insert, and the
        expansion is remembered under the key.  An upstream output that
        cannot be fanned out becomes one FAILED instance carrying the
        reason, so the run ends instead of hanging.
        """
        key = self.group_key(spec)
        width = None if key is None else self.store.copy_cached_task(self.run_id, spec.name, key)
        if width is not None:
            return width, []
        try:
            rows = self.instance_rows(spec)
        except (GraphError, ManifestError, TypeError, ValueError) as exc:
            rows, key = [_failed_expansion_row(exc)], None
        if run is not None:
            run(rows)
        with self.store.transaction():
            self.store.insert_task_instances(self.run_id, spec.name, rows)
            self.store.set_task_width(self.run_id, spec.name, len(rows))
            if key is not None:
                self.store.remember_task(self.run_id, spec.name, key)
        return len(rows), rows

    def group_key(self, spec: TaskSpec) -> Optional[str]:
        """Hash everything that determines a task's instance payloads, without decoding any of them.

        Payloads are a pure function of the task, its version, the run
        parameters it receives, the wiring and the upstream outputs, which
        the digests of their output hashes stand for.  None when the cache
        does not apply.
        """
        if not spec.config.cache or spec.name in self.forced or self.verify:
            return None
        upstream = {param: [(step, self.modes[(spec.name, param)].value, self.outputs.digest(step))
                            for step in result.steps] for param, result in spec.result_deps.items()}
        after = {dep: self.outputs.digest(dep) for dep in spec.config.after}
        digests = [digest for deps in upstream.values() for _, _, digest in deps] + list(after.values())
        if None in digests:
            return None
        params = _received_params(spec, self.params)
        return _hash16(DEFAULT_CODEC.canonical_dumps([spec.name, str(spec.config.version), spec.is_array, params,
                                                      upstream, after]))

    def deferred_row(self, spec: TaskSpec, index: Optional[int]) -> Dict[str, Any]:
        """Resolve the inputs of one forward-submitted instance (in its worker).

        Forward-submitted arrays are chained element by element, so element
        ``i`` reads only element ``i`` of each upstream task.
        """
        if spec.is_array and index is not None:
            assert isinstance(self.outputs, _ResultFileOutputs)  # set up so for forward-submitted arrays
            element = self.outputs.element
            payload = {param: element(result.step, index) for param, result in spec.result_deps.items()}
            row = self._rows(spec, [(index, payload)])[0]
        else:
            row = self._rows(spec, list(enumerate(self.payloads(spec))))[0]
        if spec.config.cache and spec.name not in self.forced:
            self._apply_cache(spec, [row])
        return row

    def _rows(self, spec: TaskSpec, payloads: List[Tuple[int, Dict[str, Any]]]) -> List[Dict[str, Any]]:
        """Build PENDING rows with input hash, identity and stored input text for ``(position, payload)`` pairs."""
        hash_text = _InputHasher(spec.name, spec.config.version, _received_params(spec, self.params)).hash_text
        suffix = _identity_suffix(h for dep in spec.config.after for h in self.outputs.hashes(dep) if h)
        canonical, array = DEFAULT_CODEC.canonical_dumps, spec.is_array
        rows = []
        for position, payload in payloads:
            text = canonical(payload)
            input_hash = hash_text(text)
            rows.append({"array_index": position if array else None, "state": _PENDING, "input": payload,
                         "input_text": _stored_json(text), "input_hash": input_hash,
                         "identity": _hash16(input_hash + suffix)})  # compute_identity, the suffix made once
        return rows

    def _apply_cache(self, spec: TaskSpec, rows: List[Dict[str, Any]]) -> None:
        """Turn rows whose identity has a (verified) SUCCESS elsewhere into cache hits."""
        hits = self.store.find_cached_many(spec.name, [row["identity"] for row in rows])
        for row in rows:
            hit = hits.get(row["identity"])
            if hit is None:
                continue
            if self.verify and not verify_cached_output(hit["output"], spec.return_type, spec.verify):
                continue
            row.update(state=TaskState.SUCCESS.value, output=hit["output"], output_hash=hit["output_hash"], cached=1)


#: Array index of the one FAILED instance recording why a task could not be expanded.
EXPANSION_FAILED = -1


def _failed_expansion_row(error: Exception) -> Dict[str, Any]:
    """Return the single FAILED row recording why a task could not be expanded."""
    return {"array_index": EXPANSION_FAILED, "state": TaskState.FAILED.value, "input": {}, "identity": "",
            "input_hash": "", "error_text": str(error)}


# =============================================================================
# Engine: packing array elements into jobs (issue 7)
# =============================================================================


def choose_elements_per_job(width: int, cpus: int = 1, max_submit_jobs: Optional[int] = None,
                            median_seconds: Optional[float] = None) -> int:
    """Return how many elements ``elements_per_job="auto"`` packs into one job.

    The rule: nothing to pack for a width <= 1.  With a measured median
    element duration (earlier runs of the same workflow and task), elements
    of PACK_SHORT_SECONDS (60 s) or more are never packed; shorter ones are
    packed ``floor(PACK_TARGET_SECONDS * cpus / median)`` per job, so that a
    job runs about 5 minutes.  Without history, elements are packed only
    when the width exceeds ``max_submit_jobs``.  With a cap, a pack is at
    least ``ceil(width / max_submit_jobs)``, so the whole width fits in the
    cap.  The result is at most ``width``.
    """
    if width <= 1:
        return 1
    if median_seconds is not None:
        if median_seconds >= PACK_SHORT_SECONDS:
            return 1
        pack = int(PACK_TARGET_SECONDS * max(1, cpus) // max(median_seconds, 0.001))
    elif not max_submit_jobs or width <= max_submit_jobs:
        return 1
    else:
        pack = 1
    if max_submit_jobs:
        pack = max(pack, -(-width // max_submit_jobs))
    return max(1, min(pack, width))


def pack_limits(time_limit: str, mem: str, pack: int, cpus: int, max_time: int) -> Tuple[int, int, str, str]:
    """Return ``(pack, slots, walltime, memory)`` of a job running ``pack`` elements.

    ``slots = min(cpus, pack)`` elements run at once (a forked process pool
    when > 1).  Walltime = per-element ``time_limit`` x ``ceil(pack /
    slots)``; memory = per-element ``mem`` x ``slots``.  When that walltime
    would exceed ``max_time`` seconds, the pack shrinks until it fits (never
    below one element): a packed job never asks for less time than its
    elements need.  ``pack == 1`` leaves the resources unchanged.
    """
    per_element = parse_time(time_limit)
    slots = max(1, min(cpus, pack))
    fits = max(1, max_time // per_element) * slots
    if fits < pack:
        log.warning("packing %d elements of %s each exceeds the %s walltime cap; packing %d", pack,
                    time_limit, format_hms(max_time), fits)
        pack = fits
        slots = max(1, min(cpus, pack))
    if pack <= 1:
        return 1, 1, time_limit, mem
    return pack, slots, format_hms(per_element * -(-pack // slots)), mem if slots == 1 else f"{parse_mem(mem) * slots}K"


def element_log_lines(path: Union[str, Path], task: str, index: Optional[int]) -> List[str]:
    """Return the lines one element wrote into a packed job's log (between its marker lines).

    Packed and inline workers write ``==> reflow element TASK[INDEX] start``
    and ``... end STATE SECONDS`` around each element, on stdout and stderr;
    both markers are included.  An empty list when the log has no markers
    for that element.  Elements run in parallel slots may interleave lines.
    """
    name = f"{ELEMENT_MARK} {task}[{'' if index is None else index}] "
    out: List[str] = []
    inside = False
    try:
        with open(path, errors="replace") as handle:
            for line in handle:
                if line.startswith(name):
                    inside = line.startswith(name + "start")
                    out.append(line.rstrip("\n"))
                elif inside:
                    out.append(line.rstrip("\n"))
    except OSError:
        return []
    return out


def _median(values: Sequence[float]) -> Optional[float]:
    """Return the median of ``values``, or None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# =============================================================================
# Engine: the worker (runs one task instance inside a job)
# =============================================================================


@contextlib.contextmanager
def _on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Call ``handler`` on SIGTERM and SIGINT inside the block; restore the previous handlers after.

    The handlers are set through ``_signal``, which ``signal`` wraps: a
    worker needs no more, and importing ``signal`` (three enums) would
    cost each element 1.5 % of its instructions.  Handlers come back as
    plain numbers there, which either module takes back.
    """
    handlers = _signal or signal
    previous = {}
    for signum in (handlers.SIGTERM, handlers.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            previous[signum] = handlers.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            handlers.signal(signum, old)


@contextlib.contextmanager
def graceful_shutdown() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`TaskInterrupted` inside the block."""
    def interrupt(signum: int, frame: Any) -> None:
        raise TaskInterrupted(signum)

    with _on_stop_signals(interrupt):
        yield


def _position_index(positions: str, offset: int) -> int:
    """Return element ``offset`` of a positions spec (``@file`` reads it from a file)."""
    return _position_chunk(positions, offset, 1)[0]


def _current_job_id() -> str:
    """Return the scheduler's id of the running job, as far as the environment tells."""
    for var in ("REFLOW_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "FLUX_JOB_ID"):
        if os.environ.get(var):
            return os.environ[var]
    return ""


def _position_chunk(positions: str, offset: int, pack: int) -> List[int]:
    """Return the indices of packed array element ``offset``: positions ``[offset*pack, (offset+1)*pack)``."""
    spec = Path(positions[1:]).read_text() if positions.startswith("@") else positions
    indices = _expand_indices(spec)
    chunk = indices[offset * pack:(offset + 1) * pack] if offset >= 0 else []
    if not chunk:
        per_element = f" ({pack} per element)" if pack > 1 else ""
        raise ParameterError(f"array position {offset} is outside the {len(indices)} positions of this job"
                             + per_element)
    return chunk


def run_worker(wf: Workflow, run_id: str, store_path: Union[str, Path], run_dir: Union[str, Path], task: str,
               index: Optional[int] = None, positions: Optional[str] = None, base: int = 0,
               pack: Optional[int] = None, slots: int = 1) -> int:
    """Run one task instance (or, with ``pack``, a chunk of them) and drop result files; return the exit code.

    With ``pack`` K, array element ``e`` of the job runs the instances at
    positions ``[e*K, (e+1)*K)``, ``slots`` at a time (see
    :func:`_run_chunk`).  The store is opened read-only: workers never
    write the database.
    """
    store = SqliteStore(store_path, readonly=True)
    try:
        params = store.get_run_parameters(run_id)
        spec = wf._task(task)
        indices: List[Optional[int]] = [None]
        if positions:
            indices = list(_position_chunk(positions, (resolve_index(None) or 0) - base, pack or 1))
        elif spec.is_array:
            indices = [resolve_index(index)]
        insts = [store.get_task_instance(run_id, task, i) for i in indices]
    finally:
        store.close()
    missing = [i for i, inst in zip(indices, insts) if inst is None]
    if missing:
        raise StoreError(f"run {run_id!r} has no instance {task}[{missing[0]}]")
    found = [inst for inst in insts if inst is not None]
    results = _results_dir(run_dir, run_id)
    job = _ElementRunner(wf, spec, params, results, store_path)
    if pack is None:
        return 0 if job.run(found[0])["state"] == TaskState.SUCCESS.value else 1
    return _run_chunk(job, found, slots)


class _ElementRunner:
    """Runs one instance of a task in this process and writes its result file."""

    def __init__(self, wf: Workflow, spec: TaskSpec, params: Mapping[str, Any], results: Path,
                 store_path: Union[str, Path]) -> None:
        self.wf, self.spec, self.params, self.results, self.store_path = wf, spec, params, results, store_path

    def run(self, inst: Mapping[str, Any]) -> Dict[str, Any]:
        """Resolve (if forward-submitted) and run one instance; return its result record."""
        resolved = (_resolve_deferred(self.wf, self.spec, self.params, inst, self.store_path, self.results)
                    if _is_deferred(inst) else None)
        return _execute_instance(self.spec, self.params, inst, self.results, resolved)

    def run_marked(self, inst: Mapping[str, Any]) -> Dict[str, Any]:
        """Run one instance between marker lines on stdout and stderr (see :func:`element_log_lines`)."""
        name = f"{self.spec.name}[{'' if inst['array_index'] is None else inst['array_index']}]"
        _print_marks(f"{ELEMENT_MARK} {name} start")
        started = time.monotonic()
        record = self.run(inst)
        _print_marks(f"{ELEMENT_MARK} {name} end {record['state']} {time.monotonic() - started:.3f}s")
        return record

    def fail_dead(self, inst: Mapping[str, Any], why: str) -> None:
        """Write the FAILED result of an instance whose pool process died while running it."""
        stem = _result_name(self.spec.name, inst["array_index"], inst["attempt"])
        record = {"instance_id": inst["id"], "attempt": inst["attempt"], "task_name": self.spec.name,
                  "array_index": inst["array_index"], "job_id": _current_job_id(), "finished_at": _utcnow(),
                  "state": TaskState.FAILED.value, "output": None, "output_hash": "",
                  "error_text": f"the process running it died ({why})", "reason": why}
        _atomic_write(self.results / f"{stem}.json", json.dumps(record, separators=(",", ":")))


def _print_marks(line: str) -> None:
    """Write one marker line to stdout and stderr, flushed."""
    for stream in (sys.stdout, sys.stderr):
        print(line, file=stream, flush=True)


@contextlib.contextmanager
def _stop_request(forward_to: Sequence[int] = ()) -> Iterator[Dict[str, int]]:
    """Record SIGTERM/SIGINT in the yielded dict (``signum``) instead of dying; restore the handlers after.

    The signal is passed on to the processes ``forward_to`` (a pool's
    children, which a signal sent to this process alone would miss).
    """
    seen: Dict[str, int] = {}

    def note(signum: int, frame: Any) -> None:
        seen["signum"] = signum
        for pid in forward_to:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    with _on_stop_signals(note):
        yield seen


def _run_chunk(job: _ElementRunner, insts: List[Dict[str, Any]], slots: int) -> int:
    """Run a chunk of instances; return 1 if any failed.

    Each element writes its own result; a failing element does not stop
    the others.  A stop signal ends the chunk: the running element records
    INTERRUPTED, the ones not started keep no result (the dispatcher fails
    them with the job's reason once the job ended).  With ``slots > 1`` the
    elements run in that many forked processes.
    """
    if slots > 1 and len(insts) > 1 and hasattr(os, "fork"):
        return _run_chunk_forked(job, insts, min(slots, len(insts)))
    failed = False
    with _stop_request() as stop:
        for inst in insts:
            if stop:
                break
            record = job.run_marked(inst)
            failed |= record["state"] != TaskState.SUCCESS.value
            if record.get("reason") == INTERRUPTED:
                break
    return 1 if failed or stop else 0


def _run_chunk_forked(job: _ElementRunner, insts: List[Dict[str, Any]], slots: int) -> int:
    """Run a chunk in ``slots`` forked processes that take elements from a shared counter.

    Fork (not spawn) keeps the user's module and functions as they are in
    this process.  A shared byte per element says 0 waiting, 1 running,
    2 done, 3 failed; an element left running by a process that died
    (OOM, kill -9) gets a FAILED result naming the signal here.
    """
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", 0)
    states = ctx.RawArray("b", len(insts))
    children: List[int] = []
    with _stop_request(children) as stop:
        for _ in range(slots):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                os._exit(_pool_child(job, insts, counter, states))
            children.append(pid)
        codes = [os.waitpid(pid, 0)[1] for pid in children]
    dead = [_exit_reason(-os.WTERMSIG(code)) for code in codes if os.WIFSIGNALED(code)]
    for offset, inst in enumerate(insts):
        if states[offset] == 1:
            job.fail_dead(inst, dead[0] if dead else "exit without a result")
    return 1 if stop or any(states[i] != 2 for i in range(len(insts))) else 0


def _pool_child(job: _ElementRunner, insts: List[Dict[str, Any]], counter: Any, states: Any) -> int:
    """Body of one forked pool process: run elements until none is left or a stop signal came."""
    try:
        with _stop_request() as stop:
            while not stop:
                with counter.get_lock():
                    offset = counter.value
                    counter.value += 1
                if offset >= len(insts):
                    break
                states[offset] = 1
                record = job.run_marked(insts[offset])
                states[offset] = 2 if record["state"] == TaskState.SUCCESS.value else 3
                if record.get("reason") == INTERRUPTED:
                    break
        return 0
    except BaseException:  # never unwind into the parent's code from a forked child
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _is_deferred(inst: Mapping[str, Any]) -> bool:
    """Tell whether an instance was submitted before its inputs existed (forward submission)."""
    return not inst["identity"] and inst["array_index"] != EXPANSION_FAILED


def _resolve_deferred(wf: Workflow, spec: TaskSpec, params: Mapping[str, Any], inst: Mapping[str, Any],
                      store_path: Union[str, Path], results: Path) -> Dict[str, Any]:
    """Resolve a forward-submitted instance's inputs and cache hit; ``{"error": ...}`` if upstream failed."""
    store = SqliteStore(store_path, readonly=True)
    try:
        planner = _Planner(wf, store, inst["run_id"], params, verify=True,
                           outputs=_ResultFileOutputs(store, inst["run_id"], results))
        return planner.deferred_row(spec, inst["array_index"])
    except (_UpstreamFailed, GraphError, TypeError, ValueError) as exc:
        return {"error": str(exc)}
    finally:
        store.close()


def _execute_instance(spec: TaskSpec, params: Mapping[str, Any], inst: Mapping[str, Any], results: Path,
                      resolved: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Call the task function for one instance, write its result file and return the record.

    ``resolved`` carries the inputs, identity and possible cache hit of a
    forward-submitted instance; they go into the result for the dispatcher.
    """
    _private_dir(results)
    stem = _result_name(spec.name, inst["array_index"], inst["attempt"])
    base = {"instance_id": inst["id"], "attempt": inst["attempt"], "task_name": spec.name,
            "array_index": inst["array_index"], "job_id": _current_job_id(), "started_at": _utcnow()}
    _atomic_write(results / f"{stem}.started", json.dumps(base), sync=False)  # a hint: an empty one is skipped
    if resolved is None:
        outcome = _call_task(spec, build_kwargs(spec, params, inst["input"]))
    elif "error" in resolved:
        outcome = {"state": TaskState.FAILED.value, "output": None, "output_hash": "",
                   "error_text": resolved["error"], "reason": UPSTREAM_FAILED}
    else:
        outcome = _resolved_outcome(spec, params, resolved)
    record = _write_result(results / f"{stem}.json", dict(base, finished_at=_utcnow(), **outcome))
    if record["state"] != TaskState.SUCCESS.value:
        print(record["error_text"], file=sys.stderr)
    return record


def _write_result(path: Path, record: Dict[str, Any]) -> Dict[str, Any]:
    """Write a result file; return what was written.

    When the full record cannot be written (disk full, quota, file-size
    limit), a short FAILED record naming the error takes its place, so the
    instance fails with the reason instead of looking lost.
    """
    try:
        _atomic_write(path, json.dumps(record, separators=(",", ":")))
        return record
    except OSError as exc:
        kept = {key: record[key] for key in ("instance_id", "attempt", "task_name", "array_index", "job_id",
                                             "started_at", "finished_at")}
        failure = dict(kept, state=TaskState.FAILED.value, output=None, output_hash="", reason="RESULT_NOT_WRITTEN",
                       error_text=f"could not write the result file {path.name}: {exc.strerror or exc}")
        _atomic_write(path, json.dumps(failure))
        return failure


def _resolved_outcome(spec: TaskSpec, params: Mapping[str, Any], resolved: Dict[str, Any]) -> Dict[str, Any]:
    """Take the cache hit of a resolved instance, or run it; add what was resolved."""
    extra = {"input": DEFAULT_CODEC.dump_value(resolved["input"]), "identity": resolved["identity"],
             "input_hash": resolved["input_hash"], "cached": bool(resolved.get("cached"))}
    if resolved.get("cached"):
        output = DEFAULT_CODEC.dump_value(resolved["output"])
        return dict(extra, state=TaskState.SUCCESS.value, output=output, output_hash=resolved["output_hash"],
                    error_text="")
    return dict(extra, **_call_task(spec, build_kwargs(spec, params, resolved["input"])))


def _call_task(spec: TaskSpec, kwargs: Dict[str, Any], guard: bool = True, text: bool = False) -> Dict[str, Any]:
    """Call a task function; return the result fields (state, output, hash, error).

    ``guard`` installs :func:`graceful_shutdown` around the call; callers
    that run many calls in a row install it once around all of them.
    ``text`` adds ``output_text`` to a success, the output as the store
    writes it (:func:`_stored_json`), for callers that insert it themselves.
    """
    try:
        if guard:
            with graceful_shutdown():
                output = spec.func(**kwargs)
        else:
            output = spec.func(**kwargs)
    except BaseException as exc:  # the result file must be written whatever happened
        return _failure_outcome(exc)
    try:
        encoded = DEFAULT_CODEC.dump_value(output)
    except (TypeError, ValueError) as exc:
        return {"state": _FAILED, "output": None, "output_hash": "",
                "error_text": f"task {spec.name!r} returned a value JSON cannot hold: {exc}"}
    canonical = _canonical_json(encoded)
    outcome = {"state": _SUCCESS, "output": encoded, "output_hash": _hash16(canonical), "error_text": ""}
    if text:
        outcome["output_text"] = _stored_json(canonical)
    return outcome


def _failure_outcome(exc: BaseException) -> Dict[str, Any]:
    """Return the result fields of a task call that raised ``exc`` (a traceback, or the signal's reason)."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt)) and not isinstance(exc, TaskInterrupted):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    reason = INTERRUPTED if isinstance(exc, TaskInterrupted) else ""
    return {"state": _FAILED, "output": None, "output_hash": "", "error_text": text, "reason": reason}


# =============================================================================
# Engine: the dispatcher (one short cycle per job)
# =============================================================================


#: flock errors that mean "held by someone else"; any other error means the filesystem cannot lock.
_LOCK_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
#: Age after which a lock directory counts as left by a dead dispatcher (a cycle takes far less).
_STALE_LOCK_SECONDS = 900.0


@contextlib.contextmanager
def _run_lock(run_dir: Union[str, Path], run_id: str, timeout: float = 300.0) -> Iterator[bool]:
    """Hold the run's dispatcher lock; yield False if it stayed busy for ``timeout``.

    The lock is a ``flock``; on a filesystem without working locks (NFS
    without a lock daemon: ENOLCK) it falls back to a lock directory.
    """
    lock_dir = _private_dir(Path(run_dir) / ".reflow")
    fd = os.open(lock_dir / f"dispatch-{run_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        locked = _flock_until(fd, deadline)
        if locked is None:
            log.warning("cannot flock in %s; using a lock directory instead", lock_dir)
            with _dir_lock(lock_dir / f"dispatch-{run_id}.lockdir", deadline, _STALE_LOCK_SECONDS) as locked:
                yield locked
        else:
            yield locked
    finally:
        os.close(fd)


def _flock_until(fd: int, deadline: float) -> Optional[bool]:
    """Take an exclusive flock on ``fd``: True, False when still busy at ``deadline``, None if unsupported."""
    while fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in _LOCK_BUSY:
                log.debug("flock failed: %s", exc)
                return None
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def _dir_lock(path: Path, deadline: float, stale_after: float) -> Iterator[bool]:
    """Hold a lock made by creating directory ``path`` (atomic on NFS); yield False on timeout.

    A lock directory older than ``stale_after`` seconds was left by a
    dispatcher that died (a cycle is much shorter) and is taken over.
    """
    while True:
        try:
            os.mkdir(path, 0o700)
            break
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > stale_after:
                    log.warning("taking over the stale lock %s", path)
                    os.rmdir(path)
                    continue
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.1)
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(path)


class _Dispatcher:
    """One dispatch cycle: ingest, reconcile, plan, submit, finalise, re-arm."""

    def __init__(self, wf: Workflow, store: Store, run_id: str, run_dir: Union[str, Path],
                 executor: Optional[Executor], verify: bool, waiting_client: bool = False) -> None:
        self.wf, self.store, self.run_id, self.verify = wf, store, run_id, verify
        self.run = _load_run(store, run_id)
        self.params = self.run["parameters"]
        self.run_dir = Path(run_dir or self.params[P_RUN_DIR])
        self.results = _results_dir(self.run_dir, run_id)
        self.executor = executor if executor is not None else _run_executor(self.params, wf.config)
        if hasattr(self.executor, "bind_run"):
            self.executor.bind_run(self.run_dir)
        self.grace = wf.config.lost_job_grace
        if isinstance(self.executor, LocalExecutor):
            self.grace = min(self.grace, 2.0)  # no NFS attribute caching between local processes
        self.run_tag = run_id.rsplit("-", 1)[-1]
        self.found: Optional[Dict[str, List[str]]] = None  # live jobs by name, only when recovering
        self.live_jobs: List[str] = []
        self.submitted: List[str] = []
        self._waitable: set = set()
        self.interrupted: set = set()
        self._wire_modes: Optional[Dict[Tuple[str, str], WireMode]] = None
        self.waiting_for_grace = False
        self.started = time.monotonic()
        self.own_job = _current_job_id() if os.environ.get(JOB_ENV_MARKER) else ""
        # In a cycle run by a waiting client (_WaitingDispatcher) the dispatch job an earlier cycle queued is
        # a spare that _rearm keeps, replaces or cancels.  A dispatch job always queues its own successor.
        queued = (self.run.get("dispatch_job_id") or "") if waiting_client else ""
        self.queued_dispatch = "" if queued in (self.own_job, "DRYRUN") else queued
        self.queued_dispatch_alive: Optional[bool] = None  # None: not asked yet
        self.waiting_client = waiting_client
        self.deferred: set = set()  # result files left for a dispatch job (see _ingest)
        self.guard: Optional[str] = None  # dispatch job armed after this one while it runs work inline
        self.inline_deferred = False  # inline work left for a dispatch job (this one is not a batch job)
        self._packs: Dict[str, Tuple[int, int]] = {}
        self._medians: Dict[str, Optional[float]] = {}

    def cycle(self) -> Dict[str, int]:
        """Run one cycle; return counts of what it did.

        A marker file stands for the whole cycle: finding it at the start
        means the previous dispatcher died mid-cycle, and this one recovers
        (adopts jobs and results the dead one left unrecorded).
        """
        marker = self.run_dir / ".reflow" / f"cycle-{self.run_id}.inflight"
        if marker.exists():
            self._start_recovery()
        _atomic_write(marker, _utcnow())
        counts = self._cycle()
        marker.unlink()
        return counts

    def _start_recovery(self) -> None:
        """Ask the scheduler once for the run's live jobs, to adopt them by name."""
        log.warning("the previous dispatcher of %s died mid-cycle; recovering", self.run_id)
        try:
            self.found = self.executor.find_jobs(f"{self.wf.name}-")
        except ExecutorError as exc:
            raise ExecutorError(f"cannot list live jobs to recover run {self.run_id}: {exc}") from None

    def _cycle(self) -> Dict[str, int]:
        files = self._list_result_files()
        with self.store.transaction():
            ingested = self._ingest(files)
            lost = self._reconcile()
            self._auto_retry()
        _crash_point("after-ingest")
        if _load_run(self.store, self.run_id)["status"] != RunState.RUNNING.value:
            self._delete(files)
            return {"ingested": ingested, "lost": lost, "submitted": 0}
        if self.found is not None:
            self._adopt_pending()
        with self.store.transaction():
            batches = self._plan()
        batches = self._cap(self._run_inline_work(batches))
        submitted = self._submit(batches)
        _crash_point("after-submit")
        submitted += self._forward()
        _crash_point("after-forward")
        with self.store.transaction():
            self._finalise()
        self._delete(files)
        self._rearm()
        return {"ingested": ingested, "lost": lost, "submitted": submitted}

    # ----------------------------------------------------------- ingest

    def _list_result_files(self) -> List[Path]:
        """Return the run's result and start-marker files, in sorted order."""
        if not self.results.is_dir():
            return []
        return sorted(p for p in self.results.iterdir() if p.suffix in (".json", ".started"))

    def _ingest(self, files: List[Path]) -> int:
        """Apply start markers and results to the store; return how many results applied."""
        started, results, broken = [], [], []
        owners = {row[0]: (row[1], row[2]) for row in self.store.instance_rows(self.run_id)} if files else {}
        for path in files:
            record = _read_result_file(path)
            if record is None or not _record_matches(record, path.name, owners):
                broken.append(path)
            elif self.waiting_client and record.get("reason") == INTERRUPTED:
                # Only the scheduler's final word tells why a worker was stopped (TIMEOUT, PREEMPTED), and
                # the job may still be ending: a dispatch job, which runs after it, ingests this one.
                self.deferred.add(path)
            elif path.suffix == ".started":
                started.append((record["instance_id"], record["attempt"], record.get("started_at")))
            else:
                record.pop("job_id", None)  # keep the id the job was submitted under (element ids)
                record["output"] = DEFAULT_CODEC.load_value(record.get("output"))
                if "input" in record:
                    record["input"] = DEFAULT_CODEC.load_value(record["input"])
                results.append(record)
        if self.found is not None:
            self._adopt_orphans(started, results)
        if started:
            self.store.mark_running(started)
        blocked = [r["instance_id"] for r in results if r.get("reason") == UPSTREAM_FAILED]
        if blocked:  # a worker that found its upstream failed never ran: cancelled, not failed
            self.store.cancel_instances(blocked, UPSTREAM_FAILED)
            results = [r for r in results if r.get("reason") != UPSTREAM_FAILED]
        applied, rejected = self.store.apply_results(results) if results else (0, [])
        self.interrupted = {r["instance_id"] for r in results if r.get("reason") == INTERRUPTED} - {
            instance_id for instance_id, _ in rejected}
        for instance_id, why in rejected:
            log.info("result of instance %s ignored: %s", instance_id, why)
        self._quarantine(broken)
        return applied

    def _adopt_orphans(self, started: List[Tuple], results: List[Dict[str, Any]]) -> None:
        """Record as submitted the instances whose jobs ran although the dead dispatcher never said so."""
        job_of = {rec["instance_id"]: rec.get("job_id") or "ADOPTED" for rec in results}
        job_of.update({row[0]: job_of.get(row[0], "ADOPTED") for row in started})
        if job_of:
            self.store.mark_submitted(sorted(job_of.items()))

    def _quarantine(self, broken: List[Path]) -> None:
        """Move unreadable result files aside and fail their instances with the reason."""
        for path in broken:
            log.warning("malformed result file %s moved aside", path)
            target = _private_dir(self.results.parent / "rejected") / f"{self.run_id}-{path.name}"
            with contextlib.suppress(OSError):
                os.replace(path, target)
            task, index, attempt = _parse_result_name(path.name)
            if task is None:
                continue
            inst = self.store.get_task_instance(self.run_id, task, index)
            if inst and inst["attempt"] == attempt and inst["state"] in ("SUBMITTED", "RUNNING"):
                self.store.fail_instances([inst["id"]], f"result file {path.name} was malformed (kept at {target})",
                                          "BAD_RESULT")

    def _delete(self, files: List[Path]) -> None:
        """Remove ingested files (after the transaction committed)."""
        for path in files:
            if path in self.deferred:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -------------------------------------------------------- reconcile

    def _reconcile(self) -> int:
        """Ask the scheduler once about all active jobs; fail instances whose job is gone.

        A job that ended (or that the scheduler forgot) without a result
        file is failed after a grace period, with the scheduler's reason.
        """
        rows = self.store.instance_rows(self.run_id, states=["SUBMITTED", "RUNNING"])
        stopped = [row for row in self.store.instance_rows(self.run_id, states=["FAILED"])
                   if row[0] in self.interrupted and row[4]] if self.interrupted else []
        job_ids = sorted({row[4] for row in rows + stopped if row[4] and row[4] != "DRYRUN"})
        if not job_ids:
            return 0
        try:  # the queued dispatch job rides along: _rearm may need to know whether it is alive
            infos = self.executor.job_infos(job_ids + ([self.queued_dispatch] if self.queued_dispatch else []))
        except ExecutorError as exc:
            log.warning("could not query job states (%s); assuming they are still active", exc)
            self.live_jobs = job_ids
            return 0
        if self.queued_dispatch:
            self.queued_dispatch_alive = self._alive(infos.get(self.queued_dispatch))
        # A job whose afterok dependency failed may still sit in the queue (LSF keeps it
        # pending for ever); executors report it FAILED, and it is cancelled here.
        never = [j for j in job_ids if j in infos and infos[j].reason == "DEPENDENCY_NEVER_SATISFIED"]
        if never:
            self.executor.cancel_many(never)
        self.live_jobs = [j for j in job_ids if j in infos and infos[j].state not in FINAL_JOB_STATES
                          and j not in never]
        self._explain_interrupted(stopped, infos)
        ended = {j for j in job_ids if j not in self.live_jobs}
        return self._fail_lost([row for row in rows if row[4] in ended], infos)

    def _explain_interrupted(self, stopped: Sequence[Tuple], infos: Mapping[str, JobInfo]) -> None:
        """Replace INTERRUPTED with the scheduler's reason (TIMEOUT, PREEMPTED...) of a stopped worker."""
        reasons = [(row[0], infos[row[4]].reason or infos[row[4]].state) for row in stopped
                   if row[4] in infos and infos[row[4]].state in FINAL_JOB_STATES]
        if reasons:
            self.store.set_reasons(reasons)

    def _fail_lost(self, rows: List[Tuple], infos: Mapping[str, JobInfo]) -> int:
        """Fail instances whose job ended without a result once the grace period is over."""
        marks = self._load_lost_marks()
        now, failed = time.time(), 0
        keep = {}
        for row in rows:
            instance_id, task, index, _, job_id, attempt = row[:6]
            if (self.results / f"{_result_name(task, index, attempt)}.json").exists():
                continue  # the result arrived after we listed the directory
            first_seen = marks.get(str(instance_id), now)
            if now - first_seen < self.grace:
                keep[str(instance_id)] = first_seen
                self.waiting_for_grace = True
                continue
            info = infos.get(job_id)
            if info is not None and info.reason == "DEPENDENCY_NEVER_SATISFIED":
                self.store.cancel_instances([instance_id], UPSTREAM_FAILED)  # forward-submitted, upstream failed
                continue
            state = info.state if info else "UNKNOWN"
            reason = (info.reason if info else "") or state
            detail = f", {info.reason}" if info and info.reason and info.reason != state else ""
            self.store.fail_instances([instance_id], f"job {job_id} ended without a result (state {state}{detail})",
                                      reason)
            failed += 1
        self._save_lost_marks(keep)
        return failed

    def _lost_marks_path(self) -> Path:
        return self.run_dir / ".reflow" / f"lost-{self.run_id}.json"

    def _load_lost_marks(self) -> Dict[str, float]:
        try:
            return json.loads(self._lost_marks_path().read_text())
        except (OSError, ValueError):
            return {}

    def _save_lost_marks(self, marks: Dict[str, float]) -> None:
        path = self._lost_marks_path()
        if marks:
            _atomic_write(path, json.dumps(marks))
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _auto_retry(self) -> None:
        """Resubmit failed instances of tasks with ``retries`` left."""
        for spec in self.wf.tasks.values():
            if spec.config.retries <= 0:
                continue
            rows = self.store.instance_rows(self.run_id, states=["FAILED"], task_name=spec.name)
            again = [row[0] for row in rows if row[5] < spec.config.retries
                     and row[2] != EXPANSION_FAILED]
            if again:
                self.store.retry_instances(again)

    # ------------------------------------------------------------- plan

    def _plan(self) -> List[Tuple[TaskSpec, List[Tuple[int, Optional[int], int]]]]:
        """Create instances of ready tasks; return what to submit, per task."""
        planner = _Planner(self.wf, self.store, self.run_id, self.params, self.verify)
        specs = {spec["task_name"]: spec for spec in self.store.get_task_specs(self.run_id)}
        summary = self.store.task_state_summary(self.run_id)
        batches = []
        for name in self.wf.topological_order():
            spec = self.wf.tasks[name]
            if not all(_satisfied(specs[dep], summary.get(dep, {})) for dep in spec.dependencies):
                continue
            todo = self.store.instance_rows(self.run_id, states=["RETRYING", "PENDING"], task_name=name)
            expansion_retry = [row[0] for row in todo if row[2] == EXPANSION_FAILED]
            if expansion_retry:
                self.store.delete_instances(expansion_retry)
            if expansion_retry or (specs[name].get("width") is None and not summary.get(name)):
                specs[name]["width"] = planner.expand(spec)[0]
                summary[name] = self.store.task_state_summary(self.run_id).get(name, {})
                todo = self.store.instance_rows(self.run_id, states=["RETRYING", "PENDING"], task_name=name)
            if todo:
                ordered = sorted(todo, key=lambda row: (row[3] != "RETRYING", row[2] if row[2] is not None else -1))
                batches.append((spec, [(row[0], row[2], row[5]) for row in ordered]))
        return batches

    def _cap(self, batches):
        """Keep only what ``max_submit_jobs`` allows (lowest indices first).

        The cap counts batch jobs: a packed chunk of K elements is one job.
        """
        cap = self.wf.config.max_submit_jobs
        if not cap:
            return batches
        queued = len({row[4] or row[0] for row in self.store.instance_rows(self.run_id,
                                                                           states=["SUBMITTED", "RUNNING"])})
        room = max(0, cap - queued - 1)
        kept = []
        for spec, rows in batches:
            if room <= 0:
                break
            pack = self._packing(spec, len(rows))[0]
            kept.append((spec, rows[:room * pack]))
            room -= -(-len(kept[-1][1]) // pack)
        return kept

    # ---------------------------------------------------------- packing

    def _packing(self, spec: TaskSpec, width: int) -> Tuple[int, int]:
        """Return (elements per job, slots) of a task in this cycle (see ``elements_per_job``)."""
        if spec.name not in self._packs:
            setting = spec.config.elements_per_job
            if not spec.is_array or setting == 1:
                self._packs[spec.name] = (1, 1)
            else:
                pack = choose_elements_per_job(width, spec.config.cpus, self.wf.config.max_submit_jobs,
                                               self._median(spec)) if setting == "auto" else int(setting)
                pack, slots, _, _ = pack_limits(spec.config.time, spec.config.mem, pack, spec.config.cpus,
                                                self.wf.config.pack_max_time)
                self._packs[spec.name] = (pack, slots)
        return self._packs[spec.name]

    def _median(self, spec: TaskSpec) -> Optional[float]:
        """Return the median element duration of a task measured in earlier runs, or None."""
        if spec.name not in self._medians:
            durations = self.store.task_durations(self.run["graph_name"], spec.name, self.run_id)
            self._medians[spec.name] = _median(durations)
        return self._medians[spec.name]

    # ----------------------------------------------------------- inline

    def _inline_budget(self) -> float:
        """Return the seconds this dispatch job may still spend on inline work."""
        try:
            walltime = parse_time(self.wf.config.dispatch_time or "00:10:00")
        except ValueError:
            return 0.0
        return walltime - (time.monotonic() - self.started) - INLINE_MARGIN_SECONDS

    def _runs_inline(self, spec: TaskSpec, rows: Sequence[Tuple]) -> bool:
        """Tell whether a batch runs inside a dispatch job (``inline``) instead of as jobs."""
        setting = spec.config.inline
        if not setting or self._inline_budget() <= 0:
            return False
        if setting is True:
            return True
        if spec.config.cpus > self.wf.config.dispatch_cpus:
            return False
        median = self._median(spec)
        slots = max(1, min(self.wf.config.dispatch_cpus, len(rows)))
        return median is not None and median * len(rows) / slots <= min(INLINE_AUTO_SECONDS, self._inline_budget())

    def _run_inline_work(self, batches):
        """Run inline batches here, then ingest and plan again, until only job batches are left; return those.

        Only a dispatcher that is itself a reflow batch job runs work inline;
        one started from a login shell (``submit``) leaves it to the dispatch
        job it arms at once, so nothing of the user's runs outside batch jobs.
        """
        while True:
            inline = [(spec, rows) for spec, rows in batches if self._runs_inline(spec, rows)]
            if not inline:
                return batches
            if not self.own_job:
                self.inline_deferred = True
                return [(spec, rows) for spec, rows in batches if all(spec is not s for s, _ in inline)]
            timed_out: set = set()
            for spec, rows in inline:
                timed_out |= self._run_inline(spec, rows)
            files = self._list_result_files()
            with self.store.transaction():
                self._ingest(files)
                stopped = sorted(self.interrupted & timed_out)  # INTERRUPTED by our own timeout
                if stopped:
                    self.store.set_reasons([(instance_id, "TIMEOUT") for instance_id in stopped])
                self._auto_retry()
            self._delete(files)
            with self.store.transaction():
                batches = self._plan()

    def _run_inline(self, spec: TaskSpec, rows: List[Tuple[int, Optional[int], int]]) -> set:
        """Run one batch in a worker process of this dispatch job; fail the instances it left without a result.

        Returns the batch's instance ids when the worker had to be stopped
        at the end of the inline budget (an empty set otherwise).

        A follow-up dispatch job is armed first (afterany on this job), so a
        dispatcher killed mid-way (walltime, kill -9) is still followed by one
        that fails the unfinished instances with the scheduler's reason.
        """
        if self.guard is None:
            self.guard = start_dispatch_job(self.store, self.run_id, verify=self.verify, executor=self.executor,
                                            config=self.wf.config, after=[self.own_job])
        rows = sorted(rows, key=lambda row: -1 if row[1] is None else row[1])
        self.store.mark_submitted([(row[0], self.own_job) for row in rows])
        slots = max(1, min(self.wf.config.dispatch_cpus, len(rows)))
        extra = ["--pack", str(len(rows)), "--slots", str(slots)]
        env = dict(os.environ, REFLOW_JOB_ID=self.own_job)
        if spec.is_array and rows[0][1] is not None:
            indices = [row[1] for row in rows if row[1] is not None]
            extra += ["--positions", self._positions_arg(spec, indices), "--base", "0"]
            env["REFLOW_ARRAY_INDEX"] = "0"
        command = _job_command(self.params, "worker", self.run_id, "--task", spec.name, *extra)
        code = self._run_inline_process(spec, command, env)
        missing = [row[0] for row in rows
                   if not (self.results / f"{_result_name(spec.name, row[1], row[2])}.json").exists()]
        if missing:
            reason = "TIMEOUT" if code is None else _exit_reason(code) if code else "NO_RESULT"
            self.store.fail_instances(missing, f"inline worker in dispatch job {self.own_job} ended without a "
                                               f"result ({reason})", reason)
        return {row[0] for row in rows} if code is None else set()

    def _run_inline_process(self, spec: TaskSpec, command: List[str], env: Dict[str, str]) -> Optional[int]:
        """Run an inline worker with its output in the task's log files; return its exit code (None: timed out)."""
        _private_dir(self.run_dir / "logs")
        stem = _log_stem(self.run_dir, spec.name, self.own_job)  # where _log_entry looks
        with open(f"{stem}.out", "ab") as out, open(f"{stem}.err", "ab") as err:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.run_dir,
                                    env=env)
            try:
                return proc.wait(timeout=max(1.0, self._inline_budget()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return None

    # ----------------------------------------------------------- submit

    def _submit(self, batches) -> int:
        """Submit each batch (singletons one by one, arrays as native arrays)."""
        total = 0
        for spec, rows in batches:
            try:
                pairs = self._submit_task(spec, rows)
            except (ExecutorError, OSError, ValueError) as exc:
                self.store.fail_instances([r[0] for r in rows], f"Submission rejected for task {spec.name!r}: {exc}",
                                          "SUBMIT_FAILED")
                continue
            _crash_point("submitted-unrecorded")
            self.store.mark_submitted(pairs)
            self.submitted.extend(job_id for _, job_id in pairs)
            total += len(pairs)
        return total

    def _submit_task(self, spec: TaskSpec, rows: List[Tuple[int, Optional[int], int]],
                     after: Optional[Dict[str, Any]] = None) -> List[Tuple[int, str]]:
        """Submit the instances ``(id, index, attempt)`` of one task; return (instance id, job id) pairs."""
        if not spec.is_array or rows[0][1] is None:
            resources = self._resources(spec, rows[0], array=False, after=after)
            command = _job_command(self.params, "worker", self.run_id, "--task", spec.name)
            return [(rows[0][0], self._submit_or_adopt(resources, command, None, None)[0])]
        pairs: List[Tuple[int, str]] = []
        pack, slots = self._packing(spec, len(rows))
        packing = ["--pack", str(pack), "--slots", str(slots)] if pack > 1 else []
        size = max(1, self.executor.max_array_size) * pack
        for start in range(0, len(rows), size):
            chunk = sorted(rows[start:start + size], key=lambda row: row[1] if row[1] is not None else -1)
            positions = self._positions_arg(spec, [row[1] for row in chunk if row[1] is not None])
            command = _job_command(self.params, "worker", self.run_id, "--task", spec.name, "--positions",
                                   positions, "--base", str(self.executor.array_base), *packing)
            resources = self._resources(spec, chunk[0], array=True, after=after, pack=pack)
            ids = self._submit_or_adopt(resources, command, -(-len(chunk) // pack), spec.config.array_parallelism)
            pairs.extend((row[0], ids[offset // pack]) for offset, row in enumerate(chunk))
        return pairs

    def _submit_or_adopt(self, resources: JobResources, command: List[str], size: Optional[int],
                         throttle: Optional[int]) -> List[str]:
        """Submit a job (``size`` None) or an array; after a crash, adopt a live twin instead.

        Job names are deterministic (run, task, attempt, first index), and a
        recovering cycle plans the same waves again, so a job submitted just
        before the previous dispatcher died is found by name, not doubled.
        """
        twin = self._adoptable(resources.job_name, size, self.found)
        if twin is not None:
            log.warning("adopting job(s) %s of %s submitted before a dispatcher crash", twin[:3], resources.job_name)
            return twin
        try:
            return self._submit_once(resources, command, size, throttle)
        except SubmitUncertain as exc:  # it may have gone in: look before submitting again
            twin = self._adoptable(resources.job_name, size, self.executor.find_jobs(resources.job_name))
            if twin is not None:
                log.warning("%s; adopting job(s) %s found by name", exc, twin[:3])
                return twin
            log.warning("%s; no job of that name: submitting again", exc)
            return self._submit_once(resources, command, size, throttle)

    def _submit_once(self, resources: JobResources, command: List[str], size: Optional[int],
                     throttle: Optional[int]) -> List[str]:
        """Submit a job or an array; a submit that times out raises SubmitUncertain instead of resubmitting."""
        blind = getattr(self.executor, "retry_uncertain_submits", None)  # batch schedulers have the switch
        if blind is not None:
            self.executor.retry_uncertain_submits = False  # type: ignore[attr-defined]
        try:
            if size is None:
                return [self.executor.submit(resources, command)]
            return self.executor.submit_array(resources, command, size, throttle)
        finally:
            if blind is not None:
                self.executor.retry_uncertain_submits = blind  # type: ignore[attr-defined]

    def _adoptable(self, name: str, size: Optional[int],
                   found: Optional[Mapping[str, List[str]]]) -> Optional[List[str]]:
        """Return the ids of a live job named ``name`` (elements for an array) among ``found``, if any."""
        if found is None:
            return None
        native_name = getattr(self.executor, "_job_name", lambda text: text)(name)
        ids = found.get(native_name)
        if not ids:
            return None
        if size is None:
            return [ids[0]]
        if len(ids) == size:  # one job per element (Flux --cc)
            return list(ids)
        base = self.executor.array_base
        return [self.executor.element_id(ids[0], base + offset) for offset in range(size)]

    def _positions_arg(self, spec: TaskSpec, indices: List[int]) -> str:
        """Return the positions spec, or ``@file`` when it is too long for a command line."""
        text = _compress_indices(indices)
        if len(text) <= 512:
            return text
        path = _private_dir(self.run_dir / ".reflow" / "positions") / f"{spec.name}-{_random_hex(12)}.txt"
        _atomic_write(path, text)
        return f"@{path}"

    def _resources(self, spec: TaskSpec, first: Tuple[int, Optional[int], int], array: bool,
                   after: Optional[Dict[str, Any]] = None, pack: int = 1) -> JobResources:
        """Return the job resources of a task: decorator > config submit options (+ dependency).

        The job name carries the run, task, attempt and first index of the
        wave (``<wf>-<task>-<run>-a<attempt>-<index>``), so it can be adopted.
        A packed job's walltime and memory scale as :func:`pack_limits` says.
        """
        time_limit, mem = spec.config.time, spec.config.mem
        if pack > 1:
            _, _, time_limit, mem = pack_limits(time_limit, mem, pack, spec.config.cpus, self.wf.config.pack_max_time)
        options = dict(self.wf.config.submit_options)
        options.update(spec.config.submit_options)
        options.update(after or {})
        logs = self.run_dir / "logs"
        suffix = "{job_id}_{array_index}" if array else "{job_id}"
        return JobResources(
            job_name=self._job_name(spec, first[1], first[2]),
            cpus=spec.config.cpus, time_limit=time_limit,
            mem=mem, output_path=str(logs / f"{spec.name}-{suffix}.out"),
            error_path=str(logs / f"{spec.name}-{suffix}.err"), submit_options=options, workdir=str(self.run_dir),
            gpus=int(options.pop("gpus", 0) or 0),
        )

    def _job_name(self, spec: TaskSpec, index: Optional[int], attempt: int) -> str:
        """Return the name of the job whose wave starts at ``index`` (see :meth:`_resources`)."""
        return f"{self.wf.name}-{spec.name}-{self.run_tag}-a{attempt}-{'s' if index is None else index}"

    def _adopt_pending(self) -> None:
        """Record live jobs that a dead cycle submitted for PENDING instances but never recorded.

        The planner re-plans (and so adopts) only tasks that are ready; a
        task submitted ahead of its upstream (forward submission) is not, so
        its twin is looked up here, by the name of each wave.
        """
        pairs: List[Tuple[int, str]] = []
        for spec in self.wf.tasks.values():
            rows = sorted(self.store.instance_rows(self.run_id, states=["PENDING"], task_name=spec.name),
                          key=lambda row: -1 if row[2] is None else row[2])
            array = spec.is_array and bool(rows) and rows[0][2] is not None
            size = max(1, self.executor.max_array_size) if array else 1
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                ids = self._adoptable(self._job_name(spec, chunk[0][2], chunk[0][5]), len(chunk) if array else None,
                                      self.found)
                pairs.extend(zip([row[0] for row in chunk], ids or []))
        if pairs:
            log.warning("adopting %d instance(s) submitted before a dispatcher crash", len(pairs))
            self.store.mark_submitted(pairs)
            self.submitted.extend(job_id for _, job_id in pairs)

    # ---------------------------------------------- forward submission

    def _forward(self) -> int:
        """Submit tasks whose width is already known, each waiting (afterok) on its upstream jobs.

        A singleton has width 1; an array chained element by element from
        arrays of known width has their width.  Such tasks need no
        dispatcher cycle of their own: their workers resolve their inputs
        from the upstream result files.  A fan-out over an output that does
        not exist yet is a dynamic point and waits for the next cycle.
        """
        specs = {spec["task_name"]: spec for spec in self.store.get_task_specs(self.run_id)}
        summary = self.store.task_state_summary(self.run_id)
        jobs = self._jobs_by_task()
        self._waitable = set(self.live_jobs) | set(self.submitted)
        total = 0
        for name in self.wf.topological_order():
            spec = self.wf.tasks[name]
            if summary.get(name) or specs[name].get("width") is not None:
                continue
            upstream = self._inflight_upstream(spec, specs, summary, jobs)
            width = None if upstream is None else self._known_width(spec, specs)
            if width is None or not upstream:
                continue
            ids = self._forward_submit(spec, width, sorted(upstream))
            if ids:
                specs[name]["width"], summary[name] = width, {"SUBMITTED": width}
                jobs[name] = set(ids)
                self._waitable |= set(ids)
                total += width
        return total

    def _modes(self) -> Dict[Tuple[str, str], WireMode]:
        """Return the workflow's wiring modes, inferred once per cycle."""
        if self._wire_modes is None:
            self._wire_modes = self.wf.wire_modes()
        return self._wire_modes

    def _jobs_by_task(self) -> Dict[str, set]:
        """Return the job ids of each task's SUBMITTED/RUNNING instances.

        Only jobs the scheduler still holds may be waited on (Slurm refuses
        a dependency on a purged id), so a task whose upstream jobs already
        ended waits for the next cycle instead.
        """
        jobs: Dict[str, set] = {}
        for row in self.store.instance_rows(self.run_id, states=["SUBMITTED", "RUNNING"]):
            if row[4]:
                jobs.setdefault(row[1], set()).add(row[4])
        return jobs

    def _inflight_upstream(self, spec: TaskSpec, specs, summary, jobs) -> Optional[set]:
        """Return the job ids a task must wait for, or None if a dependency cannot be waited on."""
        waiting: set = set()
        for dep in spec.dependencies:
            counts = summary.get(dep, {})
            if _satisfied(specs[dep], counts):
                continue
            done_or_running = counts.get("SUCCESS", 0) + counts.get("SUBMITTED", 0) + counts.get("RUNNING", 0)
            if not counts or done_or_running != sum(counts.values()) or dep not in jobs:
                return None
            if not jobs[dep] <= self._waitable:
                return None
            waiting |= jobs[dep]
        return waiting

    def _known_width(self, spec: TaskSpec, specs) -> Optional[int]:
        """Return the task's width when it does not depend on outputs yet to come."""
        if not spec.is_array:
            return 1
        widths = []
        modes = self._modes()
        for param, result in spec.result_deps.items():
            if modes[(spec.name, param)] is not WireMode.CHAIN or len(result.steps) != 1:
                return None
            widths.append(specs[result.step].get("width"))
        return widths[0] if widths and None not in widths and len(set(widths)) == 1 else None

    def _forward_submit(self, spec: TaskSpec, width: int, upstream: List[str]) -> List[str]:
        """Insert deferred instances of a task and submit them after ``upstream``; return job ids."""
        deferred: List[Dict[str, Any]] = [
            {"array_index": i if spec.is_array else None, "state": TaskState.PENDING.value, "input": {},
             "identity": "", "input_hash": ""} for i in range(width)]
        with self.store.transaction():
            self.store.insert_task_instances(self.run_id, spec.name, deferred)
            self.store.set_task_width(self.run_id, spec.name, width)
        todo = self.store.instance_rows(self.run_id, states=["PENDING"], task_name=spec.name)
        after = self.executor.dependency_options(upstream, "afterok")
        try:
            pairs = self._submit_task(spec, [(row[0], row[2], row[5]) for row in sorted(todo, key=lambda r: r[2] or 0)],
                                      after)
        except (ExecutorError, OSError, ValueError) as exc:
            self.store.fail_instances([row[0] for row in todo], f"Submission rejected for task {spec.name!r}: {exc}",
                                      "SUBMIT_FAILED")
            return []
        _crash_point("forward-unrecorded")
        self.store.mark_submitted(pairs)
        self.submitted.extend(job_id for _, job_id in pairs)
        return [job_id for _, job_id in pairs]

    # ------------------------------------------------ finalise, re-arm

    def _finalise(self) -> None:
        """Set the run's final state once nothing is active and nothing can start."""
        status = _final_run_state(self.store.get_task_specs(self.run_id), self.store.task_state_summary(self.run_id))
        if status is not None:
            self.store.update_run_status(self.run_id, status)

    def _rearm(self) -> None:
        """Submit the follow-up dispatch job while anything is still active (first cancel the inline guard).

        In a waiting client's cycle the dispatch job an earlier cycle queued
        is a spare.  If this cycle submitted nothing and the spare is alive,
        the spare runs the next cycle and nothing is added.  Otherwise a new
        dispatch job, waiting on the jobs of now, replaces it; and once the
        run has ended, the spare is cancelled.
        """
        if self.guard is not None:
            with contextlib.suppress(ExecutorError):
                self.executor.cancel(self.guard)
            self.guard = None
        if _load_run(self.store, self.run_id)["status"] != RunState.RUNNING.value:
            self._cancel_spare()
            return
        active = self.store.count_task_instances(self.run_id, states=sorted(TaskState.active()))
        if not active or (not self.submitted and self._queued_dispatch_runs_next()):
            return
        after = sorted(set(self.live_jobs) | set(self.submitted))
        delay = 0 if after or self.inline_deferred else max(1, int(self.grace) if self.waiting_for_grace else 2)
        try:
            start_dispatch_job(self.store, self.run_id, verify=self.verify, executor=self.executor,
                               config=self.wf.config, after=after, delay=delay)
        except ExecutorError as exc:  # nothing would ever run the next cycle: fail loudly, never hang
            self.store.update_run_status(self.run_id, RunState.FAILED.value)
            raise ExecutorError(f"run {self.run_id} marked FAILED: cannot submit its next dispatch cycle ({exc}); "
                                f"'retry {self.run_id}' resumes it once the scheduler answers") from None
        self._cancel_spare()

    def _cancel_spare(self) -> None:
        """Cancel the dispatch job an earlier cycle queued (a waiting client's cycle replaced or ended it)."""
        if self.queued_dispatch and self.queued_dispatch_alive is not False:
            with contextlib.suppress(ExecutorError):  # one that already ended is a benign error
                self.executor.cancel(self.queued_dispatch)

    def _queued_dispatch_runs_next(self) -> bool:
        """Tell whether the dispatch job an earlier cycle queued is alive (asked now if reconcile did not)."""
        if not self.queued_dispatch:
            return False
        if self.queued_dispatch_alive is None:
            try:  # this cycle's only scheduler query: reconcile had no job to ask about
                self.queued_dispatch_alive = self._alive(self.executor.job_infos([self.queued_dispatch]).get(
                    self.queued_dispatch))
            except ExecutorError as exc:
                log.warning("could not ask about dispatch job %s (%s); queueing another", self.queued_dispatch, exc)
                self.queued_dispatch_alive = False
        return self.queued_dispatch_alive

    @staticmethod
    def _alive(info: Optional[JobInfo]) -> bool:
        return info is not None and info.state not in FINAL_JOB_STATES


def _satisfied(spec_row: Mapping[str, Any], counts: Mapping[str, int]) -> bool:
    """Tell whether a dependency is done: every instance SUCCESS, or an empty array."""
    if spec_row.get("width") == 0:
        return True
    total = sum(counts.values())
    return total > 0 and counts.get("SUCCESS", 0) == total


def _final_run_state(specs: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, int]]) -> Optional[str]:
    """Return the run's final state, or None while anything can still happen."""
    active = {state.value for state in TaskState.active()}
    if any(counts.get(state, 0) for counts in summary.values() for state in active):
        return None
    if all(_satisfied(spec, summary.get(spec["task_name"], {})) for spec in specs):
        return RunState.SUCCESS.value
    if any(counts.get("FAILED", 0) for counts in summary.values()):
        return RunState.FAILED.value
    if any(counts.get("CANCELLED", 0) for counts in summary.values()):
        return RunState.CANCELLED.value
    return None


def _crash_point(name: str) -> None:
    """Die here like ``kill -9`` when ``REFLOW_TEST_CRASH`` names this point (fault-injection tests).

    ``point@FILE`` dies only once: the first process to get there creates FILE.
    ``statement:N`` is a point too: the Nth SQL statement a process sends to
    a writable store (see :func:`_statement_crasher`).
    """
    point, _, once = os.environ.get("REFLOW_TEST_CRASH", "").partition("@")
    if point != name:
        return
    if once:
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
    os._exit(137)


class _WaitingDispatcher:
    """Run a dispatch cycle from a process that waits for a run, as soon as a stage's results are all in.

    On a cluster every dispatch job waits in the queue before it runs; a
    client blocked in ``Run.wait`` (``submit --wait``) has nothing better to
    do, so it watches the results directory and runs the cycle itself when
    ingesting would start new work or end the run.  One dispatch job stays
    queued as a spare, the run's engine should this process stop: a cycle
    run here replaces it when it submitted work (a spare waits on the jobs
    of its time) and cancels it when the run ends (``_Dispatcher._rearm``).
    """

    #: Shortest pause between two looks at the results directory (seconds).
    MIN_INTERVAL = 0.1

    def __init__(self, wf: Workflow, store: Store, run_id: str, run_dir: Path, executor: Optional[Executor],
                 verify: bool) -> None:
        self.wf, self.store, self.run_id, self.run_dir = wf, store, run_id, run_dir
        self.executor, self.verify = executor, verify
        self.results = _results_dir(run_dir, run_id)
        self.dependents = {name: [other for other, spec in wf.tasks.items() if name in spec.dependencies]
                           for name in wf.tasks}
        self.seen: frozenset = frozenset()
        self.interval = self.MIN_INTERVAL
        self.cycles = 0  # cycles run from here

    def poll(self) -> bool:
        """Look at the results once; run a cycle if one would make progress.  Return whether one ran."""
        started = time.monotonic()
        names = self._result_names()
        # a directory of 100,000 results takes a while to list: look less often, never more than 1/20 busy
        self.interval = max(self.MIN_INTERVAL, 20 * (time.monotonic() - started))
        if names == self.seen:
            return False
        self.seen = names
        if not self._cycle_would_progress(names):
            return False
        with _run_lock(self.run_dir, self.run_id, timeout=0) as locked:
            if not locked:  # a dispatch job is at it right now
                return False
            _Dispatcher(self.wf, self.store, self.run_id, self.run_dir, self.executor, self.verify,
                        waiting_client=True).cycle()
        self.cycles += 1
        return True

    def _result_names(self) -> frozenset:
        try:
            with os.scandir(self.results) as entries:
                return frozenset(entry.name for entry in entries if entry.name.endswith(".json"))
        except OSError:
            return frozenset()

    def _cycle_would_progress(self, names: frozenset) -> bool:
        """Tell whether some task has a result for every job in flight, and that result unblocks anything.

        It does when a task that depends on it has no instances yet (a
        dynamic fan-out waits for its input), or when nothing else is in
        flight (the run can end, or fail).
        """
        arrived: Dict[str, int] = {}
        for name in names:
            task = _parse_result_name(name)[0]
            if task is not None:
                arrived[task] = arrived.get(task, 0) + 1
        summary = self.store.task_state_summary(self.run_id)
        in_flight = {task: counts.get("SUBMITTED", 0) + counts.get("RUNNING", 0) for task, counts in summary.items()}
        complete = [task for task, count in in_flight.items() if count and arrived.get(task, 0) >= count]
        if not complete:
            return False
        if len(complete) == sum(1 for count in in_flight.values() if count):
            return True
        return any(not summary.get(other) for task in complete for other in self.dependents.get(task, ()))


# =============================================================================
# Engine: describing a workflow
# =============================================================================


@_dataclass(frozen=True)
class CliParamDescription(metaclass=_DataclassOnFirstUse):
    """One generated CLI flag, as written to the manifest."""

    name: str
    task: str
    flag: str
    type: str
    required: bool
    default: Any
    namespace: str
    help: str
    choices: Optional[Tuple[Any, ...]]

    def to_manifest_dict(self, codec: Optional[ManifestCodec] = None) -> Dict[str, Any]:
        """Return the manifest form (values through the codec)."""
        codec = codec or DEFAULT_CODEC
        data = dataclasses.asdict(self)
        data["default"] = codec.dump_value(self.default)
        data["choices"] = list(self.choices) if self.choices is not None else None
        return data


@_dataclass(frozen=True)
class TaskDescription(metaclass=_DataclassOnFirstUse):
    """One task, as written to the manifest."""

    name: str
    is_array: bool
    config: Dict[str, Any]
    dependencies: Tuple[str, ...]
    result_deps: Dict[str, Dict[str, Any]]
    return_type: Optional[str]
    has_verify: bool

    def to_manifest_dict(self, codec: Optional[ManifestCodec] = None) -> Dict[str, Any]:
        """Return the manifest form (values through the codec)."""
        codec = codec or DEFAULT_CODEC
        return {"name": self.name, "is_array": self.is_array, "config": codec.dump_value(self.config),
                "dependencies": list(self.dependencies), "result_deps": codec.dump_value(self.result_deps),
                "return_type": self.return_type, "has_verify": self.has_verify}


@_dataclass(frozen=True)
class WorkflowDescription(metaclass=_DataclassOnFirstUse):
    """A validated workflow: tasks in topological order and CLI flags."""

    name: str
    entrypoint: Optional[Path]
    python: Path
    working_dir: Path
    tasks: Tuple[TaskDescription, ...]
    cli_params: Tuple[CliParamDescription, ...]
    schema_version: int = 1

    def to_manifest_dict(self, codec: Optional[ManifestCodec] = None) -> Dict[str, Any]:
        """Return the JSON manifest (``describe()``)."""
        codec = codec or DEFAULT_CODEC
        return {"schema_version": self.schema_version, "name": self.name,
                "entrypoint": codec.dump_value(self.entrypoint), "python": codec.dump_value(self.python),
                "working_dir": codec.dump_value(self.working_dir),
                "tasks": [task.to_manifest_dict(codec) for task in self.tasks],
                "cli_params": [param.to_manifest_dict(codec) for param in self.cli_params]}


def _describe_task(spec: TaskSpec) -> TaskDescription:
    """Build the description of one task."""
    return_type = None if spec.return_type is inspect.Signature.empty else str(spec.return_type)
    return TaskDescription(spec.name, spec.is_array, dataclasses.asdict(spec.config), tuple(spec.dependencies),
                           {param: {"steps": list(result.steps)} for param, result in spec.result_deps.items()},
                           return_type, spec.verify is not None)


# =============================================================================
# Engine: serving job commands from a workflow file
# =============================================================================

#: Commands reflow puts into jobs; a workflow file run with one of them serves it.
JOB_COMMANDS = ("worker", "dispatch")
_job_served = False


def _job_argv() -> Optional[List[str]]:
    """Return this process's arguments if it was started as a reflow job, else None."""
    argv = sys.argv[1:]
    if argv and argv[0] in JOB_COMMANDS and "--run-id" in argv:
        return argv
    return None


def _serve_job_at_exit() -> None:
    """Serve the job command at exit when the workflow file never called ``cli()``.

    A workflow module imported by a test, a notebook or another script is
    recorded as the entry point; run as a job it defines the workflow but
    may not call ``wf.cli()``.  Then the job is served here.
    """
    argv = _job_argv()
    if _job_served or argv is None:
        return
    candidates = [wf for wf in list(Workflow._instances) if wf.tasks]
    if not candidates:
        return
    sys.stdout.flush()
    code = _serve_job(candidates, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve_job(candidates: List[Workflow], argv: List[str]) -> int:
    """Pick the workflow a job belongs to (by the run's name) and run the command."""
    wf = candidates[0]
    if len(candidates) > 1:
        store_path = argv[argv.index("--store-path") + 1] if "--store-path" in argv else None
        run_id = argv[argv.index("--run-id") + 1]
        store = SqliteStore(store_path, readonly=True) if store_path else SqliteStore.default(readonly=True)
        with store:
            name = _load_run(store, run_id)["graph_name"]
        wf = next((c for c in candidates if c.name == name), wf)
    return wf.cli(argv)


# =============================================================================
# Engine: Workflow and Run
# =============================================================================


class Workflow(Flow):
    """A runnable workflow: define tasks, then submit, run, inspect.

    ``Workflow("name", config=None)``; the config defaults to
    :func:`load_config`.  See the module docstring for an example.
    """

    _instances: List[Workflow] = []

    def __init__(self, name: str, config: Optional[Config] = None) -> None:
        super().__init__(name)
        self._config_error: Optional[ConfigError] = None
        if config is None:
            try:
                config = load_config()
            except ConfigError as exc:  # raised on first use, so wf.cli() reports it in one line
                self._config_error, config = exc, Config()
        self._config = config
        if _job_argv() is not None:
            if not Workflow._instances:
                atexit.register(_serve_job_at_exit)
            Workflow._instances.append(self)

    @property
    def config(self) -> Config:
        """Return the configuration (a malformed config file raises ConfigError here)."""
        if self._config_error is not None:
            raise self._config_error
        return self._config

    @config.setter
    def config(self, value: Config) -> None:
        """Replace the configuration."""
        self._config, self._config_error = value, None

    # ------------------------------------------------------------ checks

    def _task(self, name: str) -> TaskSpec:
        """Return a task by name or raise GraphError with the closest name."""
        if name not in self.tasks:
            raise GraphError(f"workflow {self.name!r} has no task {name!r}." + _suggest(name, self.tasks))
        return self.tasks[name]

    def validate(self) -> None:
        """Check the graph (see :meth:`Flow.validate`); an empty workflow is an error too."""
        if not self.tasks:
            raise GraphError(f"workflow {self.name!r} has no tasks; decorate functions with @wf.job()")
        super().validate()

    def describe_typed(self) -> WorkflowDescription:
        """Validate and return the typed description of this workflow."""
        self.validate()
        entry = self._entrypoint(strict=False)
        params = tuple(CliParamDescription(p.name, p.task, p.flag, str(p.type), p.required, p.default,
                                           p.namespace, p.help, tuple(p.choices) if p.choices else None)
                       for p in self.cli_params())
        tasks = tuple(_describe_task(self.tasks[name]) for name in self.topological_order())
        return WorkflowDescription(self.name, entry, Path(sys.executable), Path.cwd(), tasks, params)

    def describe(self) -> Dict[str, Any]:
        """Return the JSON manifest of this workflow."""
        return self.describe_typed().to_manifest_dict()

    def _entrypoint(self, strict: bool = True) -> Optional[Path]:
        """Return the source file that defines this workflow's tasks.

        Jobs re-run this file, so it must be a ``.py`` file; a notebook, the
        REPL or ``-c`` raise ParameterError when ``strict``.
        """
        modules = {getattr(spec.func, "__module__", None) for spec in self.tasks.values()}
        for module_name in sorted(m for m in modules if m):
            path = getattr(sys.modules.get(module_name), "__file__", None)
            if path and path.endswith(".py"):
                return Path(path).resolve()
        if strict:
            raise ParameterError(f"cannot find the .py file defining workflow {self.name!r} (defined in a notebook, "
                                 "the REPL or -c?); batch jobs must be able to re-run it")
        return None

    def _check_params(self, params: Mapping[str, Any]) -> Dict[str, Any]:
        """Check run parameters: unknown, missing and ill-typed ones raise ParameterError."""
        cli = self.cli_params()
        by_name = {p.name: p for p in cli if p.namespace == "global"}
        local = {p.dest: p for p in cli if p.namespace == "local"}
        values: Dict[str, Any] = {}
        task_params: Dict[str, Dict[str, Any]] = {}
        for key, value in params.items():
            if key in by_name:
                values[key] = _check_type(by_name[key], value)
            elif key in local:
                task_params.setdefault(local[key].task, {})[local[key].name] = _check_type(local[key], value)
            elif key == P_TASK_PARAMS and isinstance(value, dict):
                for task, entries in value.items():
                    task_params.setdefault(task, {}).update(entries)
            else:
                raise ParameterError(f"unknown parameter {key!r} for workflow {self.name!r}."
                                     + _suggest(key, list(by_name) + list(local)))
        missing = [p.flag for p in cli if p.required and (p.name not in values if p.namespace == "global"
                                                          else p.name not in task_params.get(p.task, {}))]
        if missing:
            raise ParameterError(f"submit() missing required parameter(s): {', '.join(missing)}")
        values[P_TASK_PARAMS] = task_params
        return values

    # ------------------------------------------------------------ submit

    def submit(self, run_dir: Optional[Union[str, Path]] = None, *, store: Optional[Store] = None,
               executor: Union[str, Executor, None] = None, force: bool = False,
               force_tasks: Optional[Sequence[str]] = None, verify: bool = False, **params: Any) -> Run:
        """Create a run, start its first dispatch cycle, and return a :class:`Run`.

        ``executor`` is an Executor or a name (slurm, pbs, lsf, sge, flux,
        local); the default comes from the config or what is on PATH.
        Everything is checked before anything is written.
        """
        if _job_argv() is not None and not _job_served:
            raise SystemExit(_serve_job([self], _job_argv() or []))
        run_id, run_dir_path, store, executor_obj = self._create_run(run_dir, store, executor, force, force_tasks,
                                                                     params, needs_entrypoint=True)
        self.dispatch(run_id, store, run_dir_path, executor=executor_obj, verify=verify)
        run = Run(self, run_id, run_dir_path, store)
        run._waiting_dispatcher = _WaitingDispatcher(self, store, run_id, run_dir_path, executor_obj, verify)
        return run

    def submit_run(self, run_dir: Union[str, Path], parameters: Mapping[str, Any], store: Optional[Store] = None,
                   executor: Union[str, Executor, None] = None, verify: bool = False) -> str:
        """Submit with a parameter dict (the CLI form); return the run id."""
        params = dict(parameters)
        force, force_tasks = bool(params.pop(P_FORCE, False)), params.pop(P_FORCE_TASKS, None)
        run = self.submit(run_dir, store=store, executor=executor, force=force, force_tasks=force_tasks,
                          verify=verify, **params)
        return run.run_id

    def _create_run(self, run_dir: Optional[Union[str, Path]], store: Optional[Store], executor: Any, force: bool,
                    force_tasks: Optional[Sequence[str]], params: Mapping[str, Any],
                    needs_entrypoint: bool = False) -> Tuple[str, Path, Store, Executor]:
        """Validate everything, then create the run directory and the run record."""
        values, run_dir_path, store, executor_obj = self._prepare_run(run_dir, store, executor, force, force_tasks,
                                                                      params, needs_entrypoint)
        return self._insert_run(store, values), run_dir_path, store, executor_obj

    def _prepare_run(self, run_dir: Optional[Union[str, Path]], store: Optional[Store], executor: Any, force: bool,
                     force_tasks: Optional[Sequence[str]], params: Mapping[str, Any],
                     needs_entrypoint: bool = False) -> Tuple[Dict[str, Any], Path, Store, Executor]:
        """Validate everything, then open the store and create the run directory; return the run's parameters."""
        self.validate()
        values = self._check_params(params)
        for name in force_tasks or []:
            self._task(name)
        run_dir_path = _resolve_run_dir(run_dir, self.config)
        executor_obj = resolve_executor(executor, self.config)
        entrypoint = self._entrypoint(strict=needs_entrypoint)
        if store is None:
            store = SqliteStore.default(self.config)
        store.open()  # before the run directory: a bad store path must leave no directory behind
        _make_run_dir(run_dir_path)
        if hasattr(executor_obj, "bind_run"):
            executor_obj.bind_run(run_dir_path)
        values.update({P_RUN_DIR: str(run_dir_path), P_FORCE: bool(force), P_FORCE_TASKS: list(force_tasks or []),
                       P_EXECUTOR: executor_obj.describe(), P_ENTRYPOINT: str(entrypoint),
                       P_PYTHON: self.config.executor_python or sys.executable, P_STORE: str(store.path)})
        return values, run_dir_path, store, executor_obj

    def _insert_run(self, store: Store, values: Dict[str, Any]) -> str:
        """Insert the run and its task specs in one transaction; return the run id."""
        order = self.topological_order()
        specs = [{"task_name": name, "is_array": self.tasks[name].is_array, "position": position,
                  "config": dataclasses.asdict(self.tasks[name].config), "dependencies": self.tasks[name].dependencies}
                 for position, name in enumerate(order)]
        with store.transaction():  # a brand-new store gets its schema here, in the same commit
            for _ in range(5):
                run_id = make_run_id(self.name)
                if store.get_run(run_id) is None:
                    break
            store.insert_run(run_id, self.name, _current_user(), values)
            store.insert_task_specs(run_id, specs)
        return run_id

    # ------------------------------------------------- cycle and worker

    def dispatch(self, run_id: str, store: Store, run_dir: Optional[Union[str, Path]] = None,
                 executor: Union[str, Executor, None] = None, verify: bool = False) -> Dict[str, int]:
        """Run one dispatch cycle of a run (under the run's lock); return its counts."""
        run_dir = run_dir or store.get_run_parameters(run_id)[P_RUN_DIR]
        executor_obj = resolve_executor(executor, self.config) if executor is not None else None
        with _run_lock(run_dir, run_id) as locked:
            if not locked:
                log.warning("another dispatcher of run %s holds the lock; leaving this cycle to it", run_id)
                return {"ingested": 0, "lost": 0, "submitted": 0}
            return _Dispatcher(self, store, run_id, run_dir, executor_obj, verify).cycle()

    def worker(self, run_id: str, store: Store, run_dir: Union[str, Path], task_name: str,
               index: Optional[int] = None, positions: Optional[str] = None, base: int = 0) -> int:
        """Execute one task instance inside a job; return 0 on success, 1 on failure."""
        return run_worker(self, run_id, store.path, run_dir, task_name, index, positions, base)  # one instance

    # ------------------------------------------------ recorded runs

    def cancel_run(self, run_id: str, store: Store, task_name: Optional[str] = None,
                   executor: Union[str, Executor, None] = None) -> int:
        """Cancel a run's active instances (or one task's); return how many."""
        return cancel_run(store, run_id, task_name, executor, self.config)

    def cancel_runs(self, run_ids: Iterable[str], store: Store, task_name: Optional[str] = None,
                    executor: Union[str, Executor, None] = None) -> int:
        """Cancel several runs; return the total number of instances cancelled."""
        return sum(self.cancel_run(run_id, store, task_name, executor) for run_id in run_ids)

    def retry_failed(self, run_id: str, store: Store, run_dir: Optional[Union[str, Path]] = None,
                     task_name: Optional[str] = None, executor: Union[str, Executor, None] = None,
                     verify: bool = True) -> int:
        """Mark failed/cancelled instances for retry and start a dispatch job; return how many."""
        return retry_run(store, run_id, task_name, executor, verify, self.config)

    def run_status(self, run_id: str, store: Store) -> Dict[str, Any]:
        """Return the state of a run (see :func:`run_status`)."""
        return run_status(store, run_id)

    # ---------------------------------------------------------- local

    def run_local(self, run_dir: Optional[Union[str, Path]] = None, *, store: Optional[Store] = None,
                  max_workers: int = 1, force: bool = False, force_tasks: Optional[Sequence[str]] = None,
                  verify: bool = False, on_error: str = "stop", **params: Any) -> Run:
        """Run the whole workflow in this process, in topological order.

        Arrays run sequentially or in a process pool of ``max_workers``.
        ``on_error="stop"`` raises RuntimeError at the first failed task;
        ``"continue"`` records it and skips its dependants.
        """
        if _job_argv() is not None and not _job_served:
            raise SystemExit(_serve_job([self], _job_argv() or []))
        if on_error not in ("stop", "continue"):
            raise ValueError(f"on_error must be 'stop' or 'continue', got {on_error!r}")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
        values, run_dir_path, store, _ = self._prepare_run(run_dir, store, LocalExecutor(), force, force_tasks,
                                                           params)
        run_id = _LocalRun(self, store, verify, max_workers, on_error).run(values)
        return Run(self, run_id, run_dir_path, store)

    def cli(self, argv: Optional[Sequence[str]] = None) -> int:
        """Run the generated command line (``submit``, ``run``, ``status``...); return the exit code."""
        global _job_served
        args = list(sys.argv[1:] if argv is None else argv)
        if args and args[0] in JOB_COMMANDS:
            _job_served = True
        return _cli_main(args, self)


#: Largest JSON size of one run parameter: it is stored, hashed and sent with every job (pass a Path instead).
_MAX_PARAMETER_BYTES = 1 << 20


def _check_storable(name: str, value: Any) -> None:
    """Raise ParameterError for text that is not UTF-8 (undecodable argv bytes) or a parameter over 1 MiB."""
    for text in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(text[exc.start]) & 0xFF
                raise ParameterError(f"parameter {name!r} is not valid UTF-8 text "
                                     f"(byte 0x{byte:02x} at position {exc.start})") from None
    size = 0
    with contextlib.suppress(TypeError, ValueError):  # types the codec rejects fail later, with their own message
        size = len(_json_dumps(value))
    if size > _MAX_PARAMETER_BYTES:
        raise ParameterError(f"parameter {name!r} is {size} bytes; the limit is {_MAX_PARAMETER_BYTES} "
                             "(put large data in a file and pass its path)")


def _check_type(param: CliParam, value: Any) -> Any:
    """Return ``value`` if it fits the parameter's declared type, else raise ParameterError."""
    _check_storable(param.name, value)
    expected = param.type
    if param.choices is not None and value not in param.choices:
        raise ParameterError(f"parameter {param.name!r}: {value!r} is not one of {param.choices}")
    if value is None or not _is_class(expected) or expected is typing.Any:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if issubclass(expected, os.PathLike) and isinstance(value, (str, os.PathLike)):
        return Path(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ParameterError(f"parameter {param.name!r} must be {expected.__name__}, got {type(value).__name__} "
                             f"{_short_repr(value)}")
    return value


def _short_repr(value: Any, limit: int = 40) -> str:
    """Return a repr cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _resolve_run_dir(run_dir: Optional[Union[str, Path]], config: Config) -> Path:
    """Return the absolute run directory; check it can be created, create nothing yet."""
    chosen = run_dir if run_dir is not None else config.default_run_dir
    if not chosen:
        raise ParameterError("no run directory: pass run_dir= (or --run-dir), or set defaults.run_dir in the config")
    path = Path(str(chosen)).expanduser().resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ParameterError(f"run directory {path} is inside {probe}, which is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ParameterError(f"run directory {path} cannot be created: {probe} is not writable")
    return path


def _make_run_dir(path: Path) -> None:
    """Create the run directory, its logs and its private state directory."""
    _private_dir(path)
    _private_dir(path / "logs")
    _private_dir(path / ".reflow")


#: The day and the number behind the hex digits of the last run id made in this process.
_LAST_RUN_ID = ("", -1)
_RUN_ID_LOCK = _thread.allocate_lock()


def make_run_id(workflow_name: str) -> str:
    """Return a new run id ``<name>-<YYYYMMDD UTC>-<8 hex>``, later than any made before in this process.

    The first six hex digits count 16,777,216ths of the day (about 5 ms)
    and the last two are random, so a workflow's runs sort in the order
    they were created: the rows of a new run are appended at the end of
    the store's run indexes, which costs a third less than inserting
    them among an earlier run's (a cached re-run copies a whole task).
    Ids made elsewhere in the same tick differ by chance (1 in 256); the
    store refuses a duplicate and run creation picks another id.
    """
    global _LAST_RUN_ID
    now = _dt.datetime.now(_dt.timezone.utc)
    of_day = now - now.replace(hour=0, minute=0, second=0, microsecond=0)
    number = (of_day * (1 << 24) // _dt.timedelta(days=1) << 8) + os.urandom(1)[0]
    day = now.strftime("%Y%m%d")
    with _RUN_ID_LOCK:
        last_day, last = _LAST_RUN_ID
        if day == last_day:
            number = min(max(number, last + 1), 0xFFFFFFFF)
        _LAST_RUN_ID = (day, number)
    return f"{workflow_name}-{day}-{number:08x}"


class _LocalRun:
    """Execute a run in this process (``run_local``), task by task.

    Store writes with no task function running between them share one
    transaction (a new store's schema and the run's creation, cache
    copies, a task's instances with the next task's expansion, the final
    state): every commit costs several fsyncs.  It is committed before any
    task function runs, so user code never holds the store's write lock,
    and what ran is durable before the next function starts.
    """

    def __init__(self, wf: Workflow, store: Store, verify: bool, max_workers: int, on_error: str):
        self.wf, self.store, self.verify = wf, store, verify
        self.max_workers, self.on_error = max_workers, on_error
        self.run_id = ""
        self.params: Dict[str, Any] = {}
        self.planner: _Planner
        self._held = contextlib.ExitStack()  # the open write transaction, when _holding
        self._holding = False

    def run(self, values: Dict[str, Any]) -> str:
        """Create the run from its parameters, run it, set its final state; return the run id."""
        with self._held:
            self._hold()
            self.run_id = self.wf._insert_run(self.store, values)
            self.params = self.store.get_run_parameters(self.run_id)
            self.planner = _Planner(self.wf, self.store, self.run_id, self.params, self.verify)
            failed = self._run_tasks()
            self.store.update_run_status(self.run_id, RunState.FAILED.value if failed else RunState.SUCCESS.value)
        return self.run_id

    def _run_tasks(self) -> bool:
        """Run every task whose dependencies succeeded; return whether any failed."""
        failed: set = set()
        for name in self.wf.topological_order():
            spec = self.wf.tasks[name]
            if failed.intersection(spec.dependencies):
                failed.add(name)
                continue
            if not self._run_task(spec):
                failed.add(name)
                if self.on_error == "stop":
                    self.store.update_run_status(self.run_id, RunState.FAILED.value)
                    self._commit()
                    raise RuntimeError(f"Task {name!r} failed.  Run {self.run_id} aborted.")
        return bool(failed)

    def _hold(self) -> None:
        """Open the shared write transaction unless it is open."""
        if not self._holding:
            self._held.enter_context(self.store.transaction())
            self._holding = True

    def _commit(self) -> None:
        """Commit the shared write transaction (a later write opens the next one)."""
        self._holding = False
        self._held.close()

    def _run_task(self, spec: TaskSpec) -> bool:
        """Expand, run the cache misses, store every instance; return False on any failure."""
        _, rows = self.planner.expand(spec, lambda rows: self._run_pending(spec, rows))
        return all(row["state"] == _SUCCESS for row in rows)

    def _run_pending(self, spec: TaskSpec, rows: List[Dict[str, Any]]) -> None:
        """Run the PENDING rows (the cache misses) outside any transaction and fill in their outcomes."""
        todo = [row for row in rows if row["state"] == _PENDING]
        if not todo:
            return
        self._commit()
        started = _utcnow()
        outcomes = self._execute(spec, [row["input"] for row in todo])
        finished = _utcnow()
        load = DEFAULT_CODEC.load_value
        for row, outcome in zip(todo, outcomes):
            row.update(outcome, started_at=started, finished_at=finished)
            row["output"] = load(row["output"]) if row["state"] == _SUCCESS else None
        self._hold()

    def _execute(self, spec: TaskSpec, payloads: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Call the function for each payload, in a process pool when allowed."""
        calls = [build_kwargs(spec, self.params, payload) for payload in payloads]
        workers = min(self.max_workers, len(calls), spec.config.array_parallelism or len(calls))
        if workers > 1:
            pooled = _run_in_pool(spec, calls, workers)
            if pooled is not None:
                return pooled
        with graceful_shutdown():
            return [_call_task(spec, kwargs, guard=False, text=True) for kwargs in calls]


def _pool_call(func: Callable, name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Run one task call in a pool process (module level, so it pickles)."""
    spec = TaskSpec(name, func, JobConfig(), inspect.Signature(), {}, None)
    return _call_task(spec, kwargs, text=True)


def _run_in_pool(spec: TaskSpec, calls: List[Dict[str, Any]], workers: int) -> Optional[List[Dict[str, Any]]]:
    """Run calls in a process pool; None when the function cannot be sent to one."""
    import concurrent.futures  # lazy: only run_local with max_workers > 1 needs it

    module = sys.modules.get(getattr(spec.func, "__module__", ""), None)
    if getattr(module, spec.func.__qualname__, None) is not spec.func:
        log.warning("task %r cannot run in a process pool (function not importable); running sequentially",
                    spec.name)
        return None
    chunk = max(1, len(calls) // (workers * 8))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = pool.map(_pool_call, [spec.func] * len(calls), [spec.name] * len(calls), calls, chunksize=chunk)
        return list(futures)


class Run:
    """A handle on a run: ``status()``, ``logs()``, ``cancel()``, ``retry()``, ``wait()``, ``dag()``, ``report()``."""

    def __init__(self, workflow: Optional[Workflow], run_id: str, run_dir: Union[str, Path], store: Store) -> None:
        self.workflow, self.run_id, self.run_dir, self.store = workflow, run_id, Path(run_dir), store
        self._waiting_dispatcher: Optional[_WaitingDispatcher] = None  # set by Workflow.submit

    def __repr__(self) -> str:
        name = self.workflow.name if self.workflow else "?"
        return f"Run(id={self.run_id!r}, workflow={name!r}, dir={str(self.run_dir)!r})"

    def status(self, task: Optional[str] = None, as_dict: bool = False, errors: bool = False) -> Any:
        """Print the status table (return the dict with ``as_dict=True``)."""
        status = run_status(self.store, self.run_id)
        if as_dict:
            return status
        print(format_status(status, task, errors))
        return None

    @property
    def state(self) -> str:
        """Return the run's current state (RUNNING, SUCCESS, FAILED, CANCELLED)."""
        return _load_run(self.store, self.run_id)["status"]

    def logs(self, task: Optional[str] = None, index: Optional[int] = None,
             failed: bool = False) -> List[Dict[str, Any]]:
        """Return log entries (paths, exit code, signal, reason, stderr tail); see :func:`log_entries`."""
        return log_entries(self.store, self.run_id, task, index, failed)

    def dag(self, fmt: str = "text") -> str:
        """Return the run's task graph with task states as text, ``mermaid`` or ``dot``."""
        nodes, states = _run_graph(self.store, self.run_id)
        return render_dag(nodes, fmt, states)

    def report(self, path: Union[str, Path, None] = None) -> Path:
        """Write the self-contained HTML report (default ``<run_id>.html``); return its path."""
        return write_report(self.store, self.run_id, path)

    def cancel(self, task: Optional[str] = None, executor: Union[str, Executor, None] = None,
               force: bool = False) -> int:
        """Cancel active instances (another user's run only with ``force``); print and return how many."""
        check_owner(_load_run(self.store, self.run_id), force)
        count = cancel_run(self.store, self.run_id, task, executor, self.workflow.config if self.workflow else None)
        print(f"Cancelled {count} task instance(s).")
        return count

    def retry(self, task: Optional[str] = None, executor: Union[str, Executor, None] = None,
              verify: bool = True, force: bool = False) -> int:
        """Mark failed/cancelled instances for retry (another user's run only with ``force``); return how many."""
        check_owner(_load_run(self.store, self.run_id), force)
        config = self.workflow.config if self.workflow else None
        count = retry_run(self.store, self.run_id, task, executor, verify, config)
        print(f"Marked {count} task instance(s) for retry.")
        return count

    def wait(self, timeout: Optional[float] = None, poll: float = 0.5, dispatch: bool = True) -> str:
        """Block until the run leaves RUNNING; return its final state.

        The store is read every ``poll`` seconds.  With ``dispatch`` (the
        default) and a run started by ``submit`` in this process, the wait
        also runs the next dispatch cycle here as soon as a stage's results
        are all in, instead of leaving it to a dispatch job that would first
        wait in the queue (see :class:`_WaitingDispatcher`).  Raises
        TimeoutError after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        next_read = time.monotonic()
        while True:
            helper = self._waiting_dispatcher if dispatch else None
            if (helper is not None and self._help(helper)) or time.monotonic() >= next_read:
                state = self.state
                if state != RunState.RUNNING.value:
                    return state
                next_read = time.monotonic() + poll
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} still RUNNING after {timeout:g}s")
            time.sleep(min(poll, helper.interval) if helper is not None else poll)

    def _help(self, helper: _WaitingDispatcher) -> bool:
        """Let the waiting dispatcher look once; on an unexpected error stop helping (the dispatch jobs go on)."""
        try:
            return helper.poll()
        except (ReflowError, OSError, sqlite3.Error) as exc:
            log.warning("run %s: waiting without dispatching from here any more (%s)", self.run_id, exc)
            self._waiting_dispatcher = None
            return False


# =============================================================================
# Report: one self-contained HTML file
# =============================================================================

#: Arrays longer than this are drawn as one aggregate row in the timeline.
REPORT_ELEMENT_ROWS = 40
#: Failed elements listed one by one in a report (the rest are counted).
REPORT_FAILURE_ROWS = 200
#: Fill colour of each state in the report (CACHED marks cache hits, QUEUE time spent queued).
_REPORT_COLOURS = {"SUCCESS": "#2e9e5b", "FAILED": "#d64545", "RUNNING": "#3a7bd5", "SUBMITTED": "#e0a526",
                   "PENDING": "#e0a526", "RETRYING": "#c77dd6", "CANCELLED": "#9aa0a6", "WAITING": "#c8ccd0",
                   "CACHED": "#7c6bd6", "QUEUE": "#d9dee4"}
_REPORT_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 16px;overflow-x:auto}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:8px 20px}
.facts div span{display:block;color:#656d76;font-size:12px}.facts div b{font-weight:600;word-break:break-all}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;vertical-align:top}
th{color:#656d76;font-weight:600;border-bottom:1px solid #d0d7de}th.n{text-align:right}
tr+tr td{border-top:1px solid #eaeef2}
td.n{text-align:right;font-variant-numeric:tabular-nums}code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}
pre{margin:4px 0 0;white-space:pre-wrap;color:#57606a}
.state{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:-1px}
svg text{font:12px system-ui,sans-serif;fill:#1f2328}svg .muted{fill:#656d76;font-size:11px}
.muted{color:#656d76}svg.dag{display:block;margin:0 auto}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:0 20px}
"""


def write_report(store: Store, run_id: str, path: Union[str, Path, None] = None) -> Path:
    """Write the HTML report of a run to ``path`` (default ``<run_id>.html``); return the path.

    The file is self-contained (inline CSS and SVG, no script, no external
    asset) so it opens offline: summary and parameters, the DAG coloured by
    state, a timeline of every task and element from the event history,
    duration statistics, failures with reasons and log paths, cache hits.
    """
    target = Path(path if path is not None else f"{run_id}.html")
    text = render_report(report_data(store, run_id))
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, target)
    return target


def report_data(store: Store, run_id: str) -> Dict[str, Any]:
    """Collect what a report shows: :func:`run_status`, instances by task, failures' log entries, spans."""
    status = run_status(store, run_id)
    run_dir = Path(status["run"]["parameters"].get(P_RUN_DIR) or ".")
    failures = [_log_entry(run_dir, inst) for inst in status["failed_instances"][:REPORT_FAILURE_ROWS]]
    by_task: Dict[str, List[Dict[str, Any]]] = {task["name"]: [] for task in status["tasks"]}
    for inst in status["instances"]:
        by_task.setdefault(inst["task_name"], []).append(inst)
    return {"status": status, "failures": failures, "by_task": by_task,
            "spans": _attempt_spans(store.list_events(run_id), status["instances"]),
            "generated": _utcnow()}


def _attempt_spans(events: Sequence[Mapping[str, Any]],
                   instances: Sequence[Mapping[str, Any]]) -> Dict[int, List[Dict[str, Any]]]:
    """Return ``{instance_id: [span per attempt]}`` with queued/started/ended times, state and cache flag.

    Events give every attempt; the instance row (written from the worker's
    own clock) refines the current one.
    """
    spans: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for event in events:
        if event["instance_id"] is None or event["event"] == "deleted":
            continue
        key = (event["instance_id"], event["attempt"] or 0)
        span = spans.setdefault(key, {"attempt": key[1], "queued": event["at"], "started": None, "ended": None,
                                      "state": event["state"], "cached": False, "job_id": event["job_id"]})
        span["state"], span["job_id"] = event["state"], event["job_id"] or span["job_id"]
        if event["event"] == "running":
            span["started"] = span["started"] or event["at"]
        span["cached"] = span["cached"] or event["event"] == "cached"
        if event["state"] in _DONE_STATES and span["ended"] is None:
            span["ended"] = event["at"]  # later events (a scheduler's reason) do not move the end
    for inst in instances:
        span = spans.setdefault((inst["id"], inst["attempt"]), {"attempt": inst["attempt"], "queued": None,
                                                                "started": None, "ended": None})
        span.update(state=inst["state"], cached=bool(inst["cached"]), job_id=inst["job_id"],
                    started=inst["started_at"] or span["started"], ended=inst["finished_at"] or span["ended"])
    result: Dict[int, List[Dict[str, Any]]] = {}
    for (instance_id, _), span in sorted(spans.items()):
        result.setdefault(instance_id, []).append(span)
    return result


def render_report(data: Mapping[str, Any]) -> str:
    """Return the report page of :func:`report_data` (every stored string is HTML-escaped)."""
    status = data["status"]
    run = status["run"]
    body = [_report_summary(status, data["generated"]), '<div class="cols"><section>',
            _report_parameters(run["parameters"]), "</section><section><h2>Task graph</h2>",
            _report_card(_dag_svg(status)), "</section></div><h2>Timeline</h2>",
            _report_card(_timeline_svg(status, data["by_task"], data["spans"]) + _legend()),
            "<h2>Durations per task</h2>", _report_card(_duration_table(status, data["by_task"], data["spans"])),
            "<h2>Failures</h2>", _report_card(_failure_table(status, data["failures"])),
            "<h2>Cache hits</h2>", _report_card(_cache_table(status, data["by_task"]))]
    title = _esc(f"reflow run {run['run_id']}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{title}</title><style>{_REPORT_CSS}</style></head>\n"
            f"<body><main>\n{''.join(body)}\n</main></body></html>\n")


def _esc(value: Any) -> str:
    """Return ``value`` as text safe inside HTML and SVG, attributes included."""
    return html.escape(str(value), quote=True)


def _report_card(content: str) -> str:
    return f'<div class="card">{content}</div>\n'


def _state_badge(state: str) -> str:
    colour = _REPORT_COLOURS.get(state, "#57606a")
    return f'<span class="state" style="background:{colour}">{_esc(state)}</span>'


def _report_summary(status: Mapping[str, Any], generated: str) -> str:
    """Return the heading and the run's key facts."""
    run, progress = status["run"], status["progress"]
    params = run["parameters"]
    executor = (params.get(P_EXECUTOR) or {}).get("name", "local (in process)")
    facts = [("Workflow", run["graph_name"]), ("User", run["user_id"] or "?"),
             ("Started (UTC)", run["created_at"][:19].replace("T", " ")),
             ("Duration", format_duration(status["duration_seconds"])),
             ("Progress", f"{progress['done']}/{progress['total']} ({progress['percent']:g}%)"),
             ("Cache hits", sum(task["cached"] for task in status["tasks"])),
             ("Failed", len(status["failed_instances"])),
             ("Retried", sum(1 for inst in status["instances"] if inst["attempt"])), ("Executor", executor),
             ("Run directory", params.get(P_RUN_DIR, "-"))]
    cells = "".join(f"<div><span>{_esc(name)}</span><b>{_esc(value)}</b></div>" for name, value in facts)
    when = generated[:19].replace("T", " ")
    return (f"<h1>Run <code>{_esc(run['run_id'])}</code> {_state_badge(run['status'])}</h1>\n"
            f'<p class="muted">reflow {__version__} report, generated {_esc(when)} UTC from the store alone.</p>'
            f'<div class="card facts">{cells}</div>\n')


def _report_parameters(params: Mapping[str, Any]) -> str:
    """Return the table of the run's parameters (internal keys left out)."""
    rows = [(key, value) for key, value in sorted(params.items()) if key not in INTERNAL_PARAMS]
    if not rows:
        return "<h2>Parameters</h2>" + _report_card('<span class="muted">No parameters.</span>')
    cells = "".join(f"<tr><td><code>{_esc(key)}</code></td><td><code>{_esc(_short_json(value))}</code></td></tr>"
                    for key, value in rows)
    return "<h2>Parameters</h2>" + _report_card(f"<table><tr><th>Name</th><th>Value</th></tr>{cells}</table>")


def _short_json(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "…"


def _legend() -> str:
    items = [("SUCCESS", "succeeded"), ("FAILED", "failed"), ("RUNNING", "running"), ("CANCELLED", "cancelled"),
             ("CACHED", "cache hit"), ("QUEUE", "queued")]
    spans = "".join(f'<span><i style="background:{_REPORT_COLOURS[key]}"></i>{label}</span>' for key, label in items)
    return f'<div class="legend">{spans}</div>'


# -- the task graph -------------------------------------------------------------

def _dag_layers(tasks: Sequence[Mapping[str, Any]]) -> List[List[Mapping[str, Any]]]:
    """Group tasks (topologically ordered) by their longest distance from a root."""
    depth: Dict[str, int] = {}
    for task in tasks:
        depth[task["name"]] = 1 + max((depth.get(d, -1) for d in task["dependencies"]), default=-1)
    layers: List[List[Mapping[str, Any]]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for task in tasks:
        layers[depth[task["name"]]].append(task)
    return layers


def _dag_svg(status: Mapping[str, Any]) -> str:
    """Draw the task graph top-down, each node filled with its task's state."""
    layers = _dag_layers(status["tasks"])
    box_w, box_h, gap_x, gap_y = 170, 44, 30, 46
    width = max((len(layer) for layer in layers), default=1) * (box_w + gap_x) + gap_x
    height = len(layers) * (box_h + gap_y) - gap_y + 24
    where: Dict[str, Tuple[float, float]] = {}
    for row, layer in enumerate(layers):
        offset = (width - len(layer) * (box_w + gap_x) + gap_x) / 2
        for column, task in enumerate(layer):
            where[task["name"]] = (offset + column * (box_w + gap_x), 12 + row * (box_h + gap_y))
    edges = "".join(_dag_edge(where[d], where[t["name"]], box_w, box_h) for t in status["tasks"]
                    for d in t["dependencies"] if d in where)
    nodes = "".join(_dag_node(task, where[task["name"]], box_w, box_h) for task in status["tasks"])
    return (f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="task graph">'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto"><path d="M0,0L10,5L0,10z" fill="#8c959f"/></marker></defs>'
            f"{edges}{nodes}</svg>")


def _dag_edge(source: Tuple[float, float], target: Tuple[float, float], box_w: int, box_h: int) -> str:
    x1, y1 = source[0] + box_w / 2, source[1] + box_h
    x2, y2 = target[0] + box_w / 2, target[1]
    middle = (y1 + y2) / 2
    return (f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{middle:.0f} {x2:.0f},{middle:.0f} {x2:.0f},{y2 - 2:.0f}" '
            'fill="none" stroke="#8c959f" stroke-width="1.5" marker-end="url(#arrow)"/>')


def _dag_node(task: Mapping[str, Any], where: Tuple[float, float], box_w: int, box_h: int) -> str:
    state = _task_state(task["counts"])
    x, y = where
    name = task["name"] if len(task["name"]) <= 22 else task["name"][:21] + "…"
    counts = task["counts"]
    detail = f"{counts.get('SUCCESS', 0)}/{task['total']} done" + (f", {task['cached']} cached" if task["cached"]
                                                                   else "")
    double = (f'<rect x="{x + 4:.0f}" y="{y + 4:.0f}" width="{box_w}" height="{box_h}" rx="6" fill="#fff" '
              f'stroke="{_REPORT_COLOURS.get(state)}"/>' if task["is_array"] else "")
    return (f'<g class="node" data-task="{_esc(task["name"])}" data-state="{state}">{double}'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{_REPORT_COLOURS.get(state)}"/>'
            f'<title>{_esc(task["name"])}: {state}, {_esc(json.dumps(counts, sort_keys=True))}</title>'
            f'<text x="{x + box_w / 2:.0f}" y="{y + 18:.0f}" text-anchor="middle" style="fill:#fff;font-weight:600">'
            f'{_esc(name)}{" []" if task["is_array"] else ""}</text>'
            f'<text x="{x + box_w / 2:.0f}" y="{y + 34:.0f}" text-anchor="middle" style="fill:#fff;font-size:11px">'
            f"{_esc(detail)}</text></g>")


# -- the timeline -----------------------------------------------------------------

class _Clock:
    """Map stored times to x pixels of the timeline (time 0 = the run's creation)."""

    def __init__(self, origin: str, spans: Iterable[Mapping[str, Any]], left: int, width: int,
                 duration: float = 0.0) -> None:
        self.origin = _parse_utc(origin) or _dt.datetime.now(_dt.timezone.utc)
        self.left, self.width = left, width
        latest = max((self.seconds(span.get(key)) or 0.0 for span in spans
                      for key in ("queued", "started", "ended")), default=0.0)
        self.length = max(latest, duration, 1e-3)  # a running run's open bars reach "now"

    def seconds(self, moment: Optional[str]) -> Optional[float]:
        """Return seconds since the origin (None for no time)."""
        parsed = _parse_utc(moment)
        return None if parsed is None else max(0.0, (parsed - self.origin).total_seconds())

    def x(self, seconds: float) -> float:
        return self.left + self.width * seconds / self.length


def _span_times(span: Mapping[str, Any], clock: _Clock, end_of_run: float) -> Tuple[float, float, float]:
    """Return (queued, started, ended) seconds of a span, filling gaps sensibly."""
    started = clock.seconds(span.get("started"))
    ended = clock.seconds(span.get("ended"))
    if ended is None:
        ended = end_of_run
    if started is None:
        started = ended if span.get("state") != "RUNNING" else (clock.seconds(span.get("queued")) or 0.0)
    queued = clock.seconds(span.get("queued"))
    queued = started if queued is None else min(queued, started)
    return queued, started, max(ended, started)


def _timeline_svg(status: Mapping[str, Any], by_task: Mapping[str, List[Mapping[str, Any]]],
                  spans: Mapping[int, List[Mapping[str, Any]]]) -> str:
    """Draw one row per element (or per long array) with a bar per attempt."""
    left, width, row_h = 210, 900, 18
    clock = _Clock(status["run"]["created_at"], (s for group in spans.values() for s in group), left, width,
                   status["duration_seconds"] or 0.0)
    end_of_run = clock.length
    rows: List[str] = []
    y = 26
    for task in status["tasks"]:
        members = by_task[task["name"]]
        if len(members) > REPORT_ELEMENT_ROWS:
            rows.append(_aggregate_row(task, members, spans, clock, y, end_of_run))
            y += 3 * row_h
            continue
        for inst in members:
            rows.append(_element_row(inst, spans.get(inst["id"], []), clock, y, row_h, end_of_run))
            y += row_h
    height = y + 8
    return (f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" '
            f'height="{height}" viewBox="0 0 {left + width + 20} {height}" role="img" aria-label="timeline">'
            f"{_time_axis(clock, height)}{''.join(rows)}</svg>")


def _time_axis(clock: _Clock, height: int) -> str:
    """Draw vertical grid lines with elapsed-time labels at round steps."""
    parts = []
    step = _round_step(clock.length / 8)
    for number in range(int(clock.length / step) + 1):
        seconds = number * step
        x = clock.x(seconds)
        parts.append(f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="{height - 4}" stroke="#eaeef2"/>'
                     f'<text class="muted" x="{x:.1f}" y="12" text-anchor="middle">+{format_duration(seconds)}</text>')
    return "".join(parts)


def _round_step(rough: float) -> float:
    """Return the 1, 2 or 5 times a power of ten nearest above ``rough`` (a grid step)."""
    power = 10 ** math.floor(math.log10(max(rough, 1e-3)))
    return next(power * factor for factor in (1, 2, 5, 10) if power * factor >= rough)


def _element_row(inst: Mapping[str, Any], spans: Sequence[Mapping[str, Any]], clock: _Clock, y: int,
                 row_h: int, end_of_run: float) -> str:
    """Draw one element: a queue segment and a run bar for each attempt (a thin mark for a cache hit)."""
    label = inst["task_name"] + ("" if inst["array_index"] is None else f"[{inst['array_index']}]")
    index = "" if inst["array_index"] is None else inst["array_index"]
    parts = [f'<text x="{clock.left - 8}" y="{y + 12}" text-anchor="end">{_esc(label)}</text>']
    for span in spans:
        queued, started, ended = _span_times(span, clock, end_of_run)
        state = "CACHED" if span.get("cached") else span.get("state") or "WAITING"
        x0, x1, x2 = clock.x(queued), clock.x(started), clock.x(ended)
        if x1 - x0 >= 0.5:
            parts.append(f'<rect class="queue" x="{x0:.1f}" y="{y + 6}" width="{x1 - x0:.1f}" height="4" '
                         f'fill="{_REPORT_COLOURS["QUEUE"]}"/>')
        tip = (f"{label} attempt {span.get('attempt', 0)}: {state.lower()}, ran {format_duration(ended - started)}"
               f", queued {format_duration(started - queued)}, job {span.get('job_id') or '-'}")
        parts.append(f'<rect class="bar s-{state.lower()}" data-task="{_esc(inst["task_name"])}" '
                     f'data-index="{index}" data-attempt="{span.get("attempt", 0)}" data-state="{state}" '
                     f'x="{x1:.1f}" y="{y + 2}" width="{max(x2 - x1, 2.0):.1f}" height="{row_h - 5}" rx="2" '
                     f'fill="{_REPORT_COLOURS.get(state, "#57606a")}"><title>{_esc(tip)}</title></rect>')
    return "".join(parts)


def _aggregate_row(task: Mapping[str, Any], members: Sequence[Mapping[str, Any]],
                   spans: Mapping[int, List[Mapping[str, Any]]], clock: _Clock, y: int, end_of_run: float) -> str:
    """Draw a long array as one band: its extent, and how many elements ran (and failed) at each moment."""
    bins, band_h = 180, 40
    member_spans = [span for inst in members for span in spans.get(inst["id"], [])]
    levels, failed, first, last = _running_levels(member_spans, clock, bins, end_of_run)
    peak = max(max(levels), 1)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(task["counts"].items()))
    tip = f"{task['name']}: {len(members)} elements ({counts}; {task['cached']} cached), up to {peak} at once"

    def area(values: Sequence[int], colour: str) -> str:
        points = " ".join(f"L{clock.x(clock.length * n / bins):.1f},{y + band_h - band_h * v / peak:.1f} "
                          f"L{clock.x(clock.length * (n + 1) / bins):.1f},{y + band_h - band_h * v / peak:.1f}"
                          for n, v in enumerate(values))
        return (f'<path d="M{clock.left},{y + band_h} {points} L{clock.x(clock.length):.1f},{y + band_h} Z" '
                f'fill="{colour}"/>')

    return (f'<text x="{clock.left - 8}" y="{y + 18}" text-anchor="end">{_esc(task["name"])}</text>'
            f'<text class="muted" x="{clock.left - 8}" y="{y + 32}" text-anchor="end">'
            f"{len(members)} elements</text>"
            f'<rect class="bar agg" data-task="{_esc(task["name"])}" data-elements="{len(members)}" '
            f'data-state="{_task_state(task["counts"])}" x="{clock.x(first):.1f}" y="{y}" '
            f'width="{max(clock.x(last) - clock.x(first), 2):.1f}" height="{band_h}" fill="#eef1f4" rx="2">'
            f"<title>{_esc(tip)}</title></rect>"
            f'{area(levels, _REPORT_COLOURS["SUCCESS"])}{area(failed, _REPORT_COLOURS["FAILED"])}')


def _running_levels(spans: Sequence[Mapping[str, Any]], clock: _Clock, bins: int,
                    end_of_run: float) -> Tuple[List[int], List[int], float, float]:
    """Return how many spans run in each time bin (all, and those that failed) and the first/last times."""
    steps, failed_steps = [0] * (bins + 1), [0] * (bins + 1)
    first, last = end_of_run, 0.0
    for span in spans:
        _, started, ended = _span_times(span, clock, end_of_run)
        first, last = min(first, started), max(last, ended)
        if span.get("cached"):
            continue
        start_bin = min(int(bins * started / clock.length), bins - 1)
        end_bin = min(max(int(bins * ended / clock.length), start_bin + 1), bins)
        for table in (steps, failed_steps) if span.get("state") == TaskState.FAILED.value else (steps,):
            table[start_bin] += 1
            table[end_bin] -= 1
    return _cumulative(steps[:bins]), _cumulative(failed_steps[:bins]), min(first, last), last


def _cumulative(steps: Sequence[int]) -> List[int]:
    """Return running sums of ``steps``."""
    total, levels = 0, []
    for step in steps:
        total += step
        levels.append(total)
    return levels


# -- tables -------------------------------------------------------------------------

def _duration_table(status: Mapping[str, Any], by_task: Mapping[str, List[Mapping[str, Any]]],
                    spans: Mapping[int, List[Mapping[str, Any]]]) -> str:
    """Return per-task min/median/max run time of the elements that ran (cache hits excluded)."""
    rows = []
    for task in status["tasks"]:
        members = by_task[task["name"]]
        times = sorted(d for inst in members if not inst["cached"] and inst["finished_at"]
                       for d in [_duration(inst["started_at"], inst["finished_at"])] if d is not None)
        attempts = sum(len(spans.get(inst["id"], [])) for inst in members)
        figures = ([format_duration(times[0]), format_duration(_median(times)), format_duration(times[-1]),
                    format_duration(sum(times))] if times else ["-"] * 4)
        cells = [str(task["total"]), str(len(times)), str(attempts), *figures, str(task["cached"]),
                 str(task["counts"].get("FAILED", 0))]
        rows.append(f"<tr><td><code>{_esc(task['name'])}</code></td>"
                    + "".join(f'<td class="n">{cell}</td>' for cell in cells) + "</tr>")
    header = "<th>Task</th>" + "".join(f'<th class="n">{title}</th>' for title in (
        "Elements", "Timed", "Attempts", "Min", "Median", "Max", "Total", "Cached", "Failed"))
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _failure_table(status: Mapping[str, Any], failures: Sequence[Mapping[str, Any]]) -> str:
    """Return failures grouped by reason, then one row per failed element (up to REPORT_FAILURE_ROWS)."""
    total = len(status["failed_instances"])
    if not total:
        return '<span class="muted">No failed elements.</span>'
    reasons: Dict[str, int] = {}
    for inst in status["failed_instances"]:
        reasons[inst["reason"] or "unknown"] = reasons.get(inst["reason"] or "unknown", 0) + 1
    summary = ", ".join(f"<b>{_esc(reason)}</b>: {count}" for reason, count in
                        sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
    rows = "".join(_failure_row(entry) for entry in failures)
    more = (f'<p class="muted">… and {total - len(failures)} more; '
            "<code>reflow.py logs RUN_ID --failed</code> lists them all.</p>" if total > len(failures) else "")
    header = "".join(f"<th>{title}</th>" for title in ("Element", "Job", "Exit", "Reason", "Logs and error"))
    return f"<p>{total} failed element(s) &mdash; {summary}</p><table><tr>{header}</tr>{rows}</table>{more}"


def _failure_row(entry: Mapping[str, Any]) -> str:
    label = entry["task"] + ("" if entry["index"] is None else f"[{entry['index']}]")
    exit_text = "-" if entry["exit_code"] is None else str(entry["exit_code"])
    if entry["signal"]:
        exit_text += f" ({entry['signal']})"
    files = "".join(f"<div>{name}: <code>{_esc(entry[name])}</code></div>" for name in ("stdout", "stderr")
                    if entry[name])
    tail = (entry["stderr_tail"] or entry["error_tail"])[-6:]
    error = f"<pre>{_esc(chr(10).join(tail))}</pre>" if tail else ""
    return (f"<tr><td><code>{_esc(label)}</code><div class=\"muted\">attempt {entry['attempt']}</div></td>"
            f"<td><code>{_esc(entry['job_id'] or '-')}</code></td><td>{_esc(exit_text)}</td>"
            f"<td>{_esc(entry['reason'] or '-')}</td><td>{files}{error}</td></tr>")


def _cache_table(status: Mapping[str, Any], by_task: Mapping[str, List[Mapping[str, Any]]]) -> str:
    """Return, per task, how many elements came from the cache and which."""
    rows = []
    for task in status["tasks"]:
        if not task["cached"]:
            continue
        indices = [inst["array_index"] for inst in by_task[task["name"]] if inst["cached"]]
        which = "singleton" if indices == [None] else _index_ranges([i for i in indices if i is not None])
        rows.append(f"<tr><td><code>{_esc(task['name'])}</code></td><td class=\"n\">{task['cached']}</td>"
                    f"<td class=\"n\">{task['total']}</td><td><code>{_esc(which)}</code></td></tr>")
    if not rows:
        return '<span class="muted">No cache hits: every element ran.</span>'
    return ('<table><tr><th>Task</th><th class="n">Cached</th><th class="n">Elements</th><th>Which</th></tr>'
            f"{''.join(rows)}</table>")


def _index_ranges(indices: Sequence[int], limit: int = 30) -> str:
    """Render sorted indices compactly: ``0-4, 7, 9-12`` (at most ``limit`` ranges)."""
    ranges: List[List[int]] = []
    for index in sorted(indices):
        if ranges and index == ranges[-1][1] + 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return text + (f", … ({len(ranges) - limit} more ranges)" if len(ranges) > limit else "")


# =============================================================================
# Command line
# =============================================================================

#: Exit codes of ``status --exit-code`` by run state.
STATUS_EXIT_CODES = {"SUCCESS": 0, "RUNNING": 3, "FAILED": 4, "CANCELLED": 5}
_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class _UsageError(ReflowError):
    """A command-line usage error (exit code 2)."""


@functools.cache
def _parser_class() -> Type[argparse.ArgumentParser]:
    """Return the ArgumentParser whose errors raise _UsageError, made when argparse is first needed.

    A job never needs it (see :func:`_parse_job_argv`), so argparse is not
    among the modules ``import reflow`` loads.
    """
    class UsageErrorParser(argparse.ArgumentParser):
        """argparse that raises instead of exiting, so ``cli()`` can return codes."""

        def error(self, message: str) -> None:  # type: ignore[override]
            """Raise a usage error instead of printing and exiting."""
            raise _UsageError(f"{self.prog}: {message}")

    return UsageErrorParser


def _convert_bool(text: str) -> bool:
    """Parse a boolean flag value (1/true/yes/on, 0/false/no/off)."""
    word = text.strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true/false, yes/no, on/off, 1/0)")


def _convert_datetime(text: str) -> _dt.datetime:
    """Parse an ISO-8601 date or date-time."""
    try:
        return _dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date/time {text!r} (use ISO 8601, e.g. 2026-01-31T12:00)") from None


def _converter(tp: Any) -> Callable[[str], Any]:
    """Return the argparse ``type=`` for a parameter type."""
    table: Dict[Any, Callable[[str], Any]] = {bool: _convert_bool, int: int, float: float, str: str,
                                              _dt.datetime: _convert_datetime, _dt.date: _dt.date.fromisoformat}
    if tp in table:
        return table[tp]
    if _is_path_type(tp):
        return Path
    return str


def _add_param_flag(parser: argparse.ArgumentParser, param: CliParam) -> None:
    """Add one generated parameter flag to a parser."""
    is_list, item = _list_item(param.type)
    base = item if is_list else param.type
    literal = typing.get_origin(base) is typing.Literal
    kwargs: Dict[str, Any] = {"dest": param.dest, "help": param.help or f"({_type_name(param.type)})",
                              "type": _converter(type(typing.get_args(base)[0]) if literal else base)}
    if is_list:
        kwargs["nargs"] = "+"
    if param.choices is not None:
        kwargs["choices"] = param.choices
    if param.required:
        kwargs["required"] = True
    else:
        kwargs["default"] = argparse.SUPPRESS
        kwargs["help"] += f" (default: {param.default!r})"
    kwargs.update(param.extra)
    flags = [param.flag] + ([param.short] if param.short else [])
    parser.add_argument(*flags, **kwargs)


def _collect_params(wf: Workflow, args: argparse.Namespace) -> Dict[str, Any]:
    """Return the run parameters given on the command line (globals and task-local ones)."""
    values: Dict[str, Any] = {}
    for param in wf.cli_params():
        if hasattr(args, param.dest):
            values[param.dest] = getattr(args, param.dest)
    return values


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store-path", help="sqlite store (default: the configured or per-user store)")


def _build_parser(wf: Optional[Workflow]) -> argparse.ArgumentParser:
    """Build the parser of ``wf.cli()`` or, without a workflow, of ``reflow.py``."""
    prog = wf.name if wf else "reflow"
    parser = _parser_class()(prog=prog, description=(wf and f"Workflow {wf.name!r} (reflow {__version__}).") or
                             "Operate reflow runs from the store alone.")
    parser.add_argument("--version", action="version", version=f"{prog} (reflow {__version__})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_class())
    sub.required = True
    if wf is not None:
        _add_submit_parsers(sub, wf)
    _add_run_parsers(sub, wf)
    return parser


def _add_submit_parsers(sub: Any, wf: Workflow) -> None:
    """Add ``submit``, ``run`` and ``describe`` (they need the workflow)."""
    flags = sorted(wf.cli_params(), key=lambda p: p.flag)
    submit = sub.add_parser("submit", help="submit a run as batch jobs")
    run = sub.add_parser("run", help="run the workflow in this process")
    for parser in (submit, run):
        parser.add_argument("--run-dir", required=not wf.config.default_run_dir, default=wf.config.default_run_dir,
                            help="directory for logs and results")
        _store_args(parser)
        parser.add_argument("--force", action="store_true", help="ignore the cache")
        parser.add_argument("--force-tasks", nargs="+", metavar="TASK", help="ignore the cache for these tasks "
                            "(and everything downstream)")
        parser.add_argument("--verify", action="store_true", help="check cached Path outputs still exist")
        parser.add_argument("--json", action="store_true", help="print the run id as JSON")
        for param in flags:
            _add_param_flag(parser, param)
    submit.add_argument("--executor", help="slurm, pbs, lsf, sge, flux or local (default: config / auto)")
    submit.add_argument("--wait", action="store_true", help="block until the run ends, then print its status")
    run.add_argument("--max-workers", type=int, default=1, help="processes for array tasks (default 1)")
    run.add_argument("--on-error", choices=("stop", "continue"), default="stop")
    sub.add_parser("describe", help="print the workflow manifest as JSON")


def _add_run_parsers(sub: Any, wf: Optional[Workflow]) -> None:
    """Add the commands that work on recorded runs."""
    status = sub.add_parser("status", help="show a run's state")
    status.add_argument("run_id")
    status.add_argument("--task", help="list every instance of this task")
    status.add_argument("--errors", action="store_true", help="show the tail of each failure")
    status.add_argument("--exit-code", action="store_true",
                        help="exit 0 SUCCESS, 3 RUNNING, 4 FAILED, 5 CANCELLED")
    status.add_argument("--watch", action="store_true", help="redraw until the run ends (then exit as --exit-code)")
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="--watch poll interval")
    cancel = sub.add_parser("cancel", help="cancel runs")
    cancel.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    cancel.add_argument("--task")
    cancel.add_argument("-y", "--yes", action="store_true", help="do not ask before cancelling several runs")
    retry = sub.add_parser("retry", help="resubmit failed and cancelled instances")
    retry.add_argument("run_id")
    retry.add_argument("--task")
    retry.add_argument("--no-verify", action="store_true", help="do not re-check cached Path outputs")
    for parser in (cancel, retry):
        parser.add_argument("--force", action="store_true", help="act on another user's run")
    runs = sub.add_parser("runs", help="list recent runs")
    runs.add_argument("-n", "--last", type=int, default=20)
    runs.add_argument("--all", action="store_true")
    runs.add_argument("--since")
    runs.add_argument("--until")
    runs.add_argument("--status", type=str.upper, choices=[s.value for s in RunState])
    runs.add_argument("--workflow", help="only runs of this workflow")
    runs.add_argument("--user", help="only runs of this user")
    logs = sub.add_parser("logs", help="show where a task's logs are and why it failed")
    logs.add_argument("run_id")
    logs.add_argument("target", nargs="?", metavar="TASK[INDEX]", help="a task, or one element: square[3]")
    logs.add_argument("--task")
    logs.add_argument("--index", type=int)
    logs.add_argument("--failed", action="store_true", help="every failed element, grouped by reason")
    report = sub.add_parser("report", help="write one self-contained HTML report of a run")
    report.add_argument("run_id")
    report.add_argument("-o", "--output", help="HTML file to write (default: RUN_ID.html here)")
    resume = sub.add_parser("resume", help="run one dispatch cycle of a run now")
    resume.add_argument("run_id")
    dag = sub.add_parser("dag", help="print the task graph")
    if wf is None:
        dag.add_argument("run_id")
    else:
        dag.add_argument("run_id", nargs="?")
    dag.add_argument("--format", choices=("text", "mermaid", "dot"), default="text")
    for name, parser in sub.choices.items():
        if name not in ("submit", "run", "describe", "dag"):
            _store_args(parser)
            parser.add_argument("--run-dir", help=argparse.SUPPRESS)
        if name in ("status", "runs", "logs", "dag"):
            parser.add_argument("--json", action="store_true", help="print JSON")
    _store_args(dag)


#: Stands for "no default" in :data:`_JOB_OPTIONS`.
_REQUIRED = object()
_COMMON_JOB_OPTIONS: Dict[str, Tuple[Any, Any]] = {"--run-id": (str, _REQUIRED), "--run-dir": (str, None),
                                                   "--store-path": (str, None), "--debug": (None, False)}
#: Options of the hidden job commands: flag -> (type of its value, None for a switch; default).  The
#: argparse parser (help, error messages) and the fast path every job takes are both made from it.
_JOB_OPTIONS: Dict[str, Dict[str, Tuple[Any, Any]]] = {
    "dispatch": {**_COMMON_JOB_OPTIONS, "--verify": (None, False)},
    "worker": {**_COMMON_JOB_OPTIONS, "--task": (str, _REQUIRED), "--index": (int, None), "--positions": (str, None),
               "--base": (int, 0), "--pack": (int, None), "--slots": (int, 1)},
}


def _parse_job_argv(argv: Sequence[str]) -> Optional[types.SimpleNamespace]:
    """Parse a job command written the way reflow writes it (``--flag value`` pairs), else return None.

    Every array element starts with this: building an argparse parser
    (argparse, gettext, a dozen regular expressions) would cost it a tenth
    of its start-up.  Anything else (``--flag=value``, a value like a flag,
    an unknown or missing option) returns None and goes through argparse,
    which parses it the same way or says what is wrong.
    """
    options = _JOB_OPTIONS[argv[0]]
    values = {flag: default for flag, (_, default) in options.items()}
    words = iter(argv[1:])
    for word in words:
        if word not in options:
            return None
        kind = options[word][0]
        if kind is None:
            values[word] = True
            continue
        text = next(words, "-")
        if text.startswith("-"):
            return None
        try:
            values[word] = kind(text)
        except ValueError:
            return None
    if any(value is _REQUIRED for value in values.values()):
        return None
    return types.SimpleNamespace(command=argv[0], **{flag[2:].replace("-", "_"): v for flag, v in values.items()})


def _build_job_parser(command: str) -> argparse.ArgumentParser:
    """Build the argparse parser of the hidden ``dispatch`` / ``worker`` commands.

    Its help has a fixed width: asking the terminal's would import shutil
    (and bz2, lzma).
    """
    parser = _parser_class()(prog=f"reflow {command}",
                             formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100))
    parser.add_argument("command")
    for flag, (kind, default) in _JOB_OPTIONS[command].items():
        if kind is None:
            parser.add_argument(flag, action="store_true")
        elif default is _REQUIRED:
            parser.add_argument(flag, type=kind, required=True)
        else:
            parser.add_argument(flag, type=kind, default=default)
    return parser


def _cli_main(argv: List[str], wf: Optional[Workflow]) -> int:
    """Parse and run one command; map errors to exit codes."""
    debug = "--debug" in argv or os.environ.get("REFLOW_DEBUG") == "1"
    prog = wf.name if wf else "reflow"
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if argv and argv[0] in JOB_COMMANDS:
            if wf is None:
                raise _UsageError(f"{prog}: '{argv[0]}' runs from the workflow file, not from reflow.py")
            args: Any = _parse_job_argv(argv) or _build_job_parser(argv[0]).parse_args(argv)
        else:
            args = _build_parser(wf).parse_args(argv)
        return _COMMANDS[args.command](args, wf)
    except _UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ReflowError, ValueError, TypeError, KeyError, OSError, sqlite3.Error, TimeoutError) as exc:
        if debug:
            traceback.print_exc()
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"{prog}: error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 1


def _open_store(args: argparse.Namespace, wf: Optional[Workflow], readonly: bool = False) -> Store:
    """Open the store named by ``--store-path`` or the default one (a missing one is an error)."""
    config = wf.config if wf else load_config()
    if getattr(args, "store_path", None):
        path = Path(args.store_path).expanduser()
        if not path.exists():
            raise StoreError(f"store {path} does not exist")
        return SqliteStore(path, readonly=readonly)
    return SqliteStore.default(config, readonly=readonly)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _cmd_submit(args: argparse.Namespace, wf: Workflow) -> int:
    store = SqliteStore(Path(args.store_path).expanduser()) if args.store_path else None
    params = _collect_params(wf, args)
    run = wf.submit(args.run_dir, store=store, executor=args.executor, force=args.force,
                    force_tasks=args.force_tasks, verify=args.verify, **params)
    if not args.wait:
        return _report_run(args, run)
    print(f"run_id   = {run.run_id}", file=sys.stderr)
    state = run.wait()
    if args.json:
        _print_json(run.status(as_dict=True))
    else:
        run.status(errors=True)
    return 0 if state == RunState.SUCCESS.value else 1


def _cmd_run(args: argparse.Namespace, wf: Workflow) -> int:
    store = SqliteStore(Path(args.store_path).expanduser()) if args.store_path else None
    params = _collect_params(wf, args)
    try:
        run = wf.run_local(args.run_dir, store=store, max_workers=args.max_workers, force=args.force,
                           force_tasks=args.force_tasks, verify=args.verify, on_error=args.on_error, **params)
    except RuntimeError as exc:
        print(f"{wf.name}: error: {exc}", file=sys.stderr)
        return 1
    code = _report_run(args, run)
    return code if run.state == RunState.SUCCESS.value else 1


def _report_run(args: argparse.Namespace, run: Run) -> int:
    if args.json:
        _print_json({"run_id": run.run_id, "run_dir": str(run.run_dir), "status": run.state})
    else:
        print(f"run_id   = {run.run_id}")
        print(f"run_dir  = {run.run_dir}")
    return 0


def _cmd_describe(args: argparse.Namespace, wf: Workflow) -> int:
    print(json.dumps(wf.describe(), indent=2))
    return 0


def _cmd_status(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    with _open_store(args, wf, readonly=True) as store:
        status = run_status(store, args.run_id)
        if args.task is not None and args.task not in status["summary"]:
            raise GraphError(f"run {args.run_id!r} has no task {args.task!r}."
                             + _suggest(args.task, status["summary"]))
        if args.watch:
            status = watch_status(store, args.run_id, args.interval, args.task, args.json)
            return STATUS_EXIT_CODES.get(status["run"]["status"], 1)
    if args.json:
        _print_json(status)
    else:
        print(format_status(status, args.task, args.errors, use_colour()))
    return STATUS_EXIT_CODES.get(status["run"]["status"], 1) if args.exit_code else 0


def watch_status(store: Store, run_id: str, interval: float = 2.0, task: Optional[str] = None,
                 as_json: bool = False, stream: Any = None) -> Dict[str, Any]:
    """Show a run's status until it leaves RUNNING; return the final status.

    On a terminal the table is redrawn with a progress bar and an ETA;
    otherwise (or with ``as_json``) one line is printed whenever it changes.
    """
    stream = sys.stdout if stream is None else stream
    tty = not as_json and bool(getattr(stream, "isatty", lambda: False)())
    last = ""
    while True:
        status = run_status(store, run_id)
        if tty:
            text = format_status(status, task, False, use_colour(stream)) + "\n\n" + _progress_line(status)
            stream.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            text = json.dumps(_watch_record(status), sort_keys=True) if as_json else _watch_line(status)
            if text != last:
                stream.write(text + "\n")
        stream.flush()
        last = text
        if status["run"]["status"] != RunState.RUNNING.value:
            return status
        time.sleep(max(0.1, interval))


def _watch_record(status: Mapping[str, Any]) -> Dict[str, Any]:
    """Return the compact dict ``status --watch --json`` prints per change."""
    return {"run_id": status["run"]["run_id"], "status": status["run"]["status"], "progress": status["progress"],
            "counts": status["summary"]}


def _watch_line(status: Mapping[str, Any]) -> str:
    """Return the plain line ``status --watch`` prints per change when not on a terminal."""
    counts: Dict[str, int] = {}
    for task_counts in status["summary"].values():
        for state, count in task_counts.items():
            counts[state] = counts.get(state, 0) + count
    progress = status["progress"]
    states = " ".join(f"{state.lower()}={counts[state]}" for state in sorted(counts))
    return f"{_utcnow()[11:19]} {status['run']['status']} {progress['done']}/{progress['total']} {states}".rstrip()


def _progress_line(status: Mapping[str, Any], width: int = 30) -> str:
    """Return ``[#####.....] 50% 5/10  elapsed 1m02s  ETA 1m02s``."""
    progress, elapsed = status["progress"], status["duration_seconds"] or 0.0
    done, total = progress["done"], progress["total"]
    filled = int(width * done / total) if total else 0
    eta = elapsed * (total - done) / done if done and total > done else None
    eta_text = f"  ETA {format_duration(eta)}" if eta is not None else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {progress['percent']:g}% {done}/{total}  "
            f"elapsed {format_duration(elapsed)}{eta_text}")


def _check_runs(args: argparse.Namespace, wf: Optional[Workflow], run_ids: Sequence[str]) -> None:
    """Check, read-only, that the runs exist and are the caller's (or ``--force``) before changing anything."""
    with _open_store(args, wf, readonly=True) as store:
        for run_id in run_ids:
            check_owner(_load_run(store, run_id), args.force)


def _cmd_cancel(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    _check_runs(args, wf, args.run_ids)
    if len(args.run_ids) > 1 and not args.yes:
        print("\n".join(f"  {run_id}" for run_id in args.run_ids))
        if input("Proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            print("Aborted.")
            return 1
    with _open_store(args, wf) as store:
        config = wf.config if wf else None
        total = sum(cancel_run(store, run_id, args.task, None, config) for run_id in args.run_ids)
    print(f"Cancelled {total} task instance(s) across {len(args.run_ids)} run(s).")
    return 0


def _cmd_retry(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    _check_runs(args, wf, [args.run_id])
    with _open_store(args, wf) as store:
        count = retry_run(store, args.run_id, args.task, None, not args.no_verify, wf.config if wf else None)
    print(f"Marked {count} task instance(s) for retry.")
    return 0


def _cmd_runs(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    limit = None if args.all else max(1, args.last)
    if not args.store_path and not SqliteStore.default_path(wf.config if wf else load_config()).exists():
        print("[]" if args.json else "No runs found.")
        return 0
    with _open_store(args, wf, readonly=True) as store:
        name = args.workflow or (wf.name if wf else None)
        runs = store.list_runs(name, args.user, limit=None if limit is None else limit + 1, since=args.since,
                               until=args.until, status=args.status)
        shown = runs[:limit] if limit else runs
        progress = {run["run_id"]: run_progress(store.task_state_summary(run["run_id"])) for run in shown}
    if args.json:
        _print_json([dict(run, progress=progress[run["run_id"]], duration_seconds=run_duration(run))
                     for run in shown])
        return 0
    if not shown:
        print("No runs found.")
        return 0
    _print_runs(shown, progress, use_colour())
    if limit and len(runs) > limit:
        print(f"\n  (showing last {limit} — use --all to see all runs)")
    return 0


def _print_runs(runs: Sequence[Mapping[str, Any]], progress: Mapping[str, Mapping[str, Any]], colour: bool) -> None:
    """Print the table of ``runs``: id, workflow, user, state, progress, start, duration."""
    rows = [("RUN", "WORKFLOW", "USER", "STATE", "PROGRESS", "STARTED (UTC)", "DURATION")]
    for run in runs:
        done = progress[run["run_id"]]
        rows.append((run["run_id"], run["graph_name"], run["user_id"] or "?", run["status"],
                     f"{done['done']}/{done['total']}", run["created_at"][:19].replace("T", " "),
                     format_duration(run_duration(run))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        if number:
            cells[3] = _paint(cells[3], row[3], colour)
        print("  " + "  ".join(cells).rstrip())


def _cmd_logs(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    task, index = _parse_target(args.target) if args.target else (args.task, args.index)
    if index is not None and task is None:
        raise _UsageError("logs: --index needs a task (or write TASK[INDEX])")
    with _open_store(args, wf, readonly=True) as store:
        entries = log_entries(store, args.run_id, task, index, args.failed)
    if args.json:
        _print_json(entries)
    elif args.failed:
        print(format_failures(entries))
    else:
        print("\n".join(line for entry in entries for line in _format_log_entry(entry)) or "No matching instances.")
    return 0


_TARGET_RE = _lazy_regex(r"^(?P<task>[^\[\]]+)(?:\[(?P<index>\d+)\])?$")


def _parse_target(text: str) -> Tuple[str, Optional[int]]:
    """Split ``task`` or ``task[3]`` into (task, index)."""
    match = _TARGET_RE.match(text.strip())
    if not match:
        raise _UsageError(f"logs: {text!r} is not TASK or TASK[INDEX] (e.g. square[3])")
    return match["task"], None if match["index"] is None else int(match["index"])


def format_failures(entries: Sequence[Mapping[str, Any]]) -> str:
    """Render failed log entries grouped by reason, the most frequent reason first."""
    groups: Dict[str, List[Mapping[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(entry["reason"] or "unknown reason", []).append(entry)
    lines: List[str] = []
    for reason, members in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append(f"{reason}: {len(members)} failed element(s)")
        for entry in members:
            lines.extend("  " + line for line in _format_log_entry(entry))
    return "\n".join(lines) or "No failed elements."


def _format_log_entry(entry: Mapping[str, Any]) -> List[str]:
    """Render one log entry: the element, its exit, its files and the tail of its stderr."""
    label = entry["task"] + ("" if entry["index"] is None else f"[{entry['index']}]")
    exit_text = "" if entry["exit_code"] is None else f"  exit {entry['exit_code']}"
    signal_text = f"  {entry['signal']}" if entry["signal"] else ""
    lines = [f"{label}  {entry['state']}  attempt {entry['attempt']}  job={entry['job_id'] or '-'}"
             f"{exit_text}{signal_text}  {entry['reason']}".rstrip()]
    lines += [f"    {name}: {entry[name]}" for name in ("stdout", "stderr") if entry[name]]
    tail = entry["element_log"] or entry["stderr_tail"] or entry["error_tail"]
    lines += [f"    | {line}" for line in tail]
    return lines


def _cmd_resume(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    with _open_store(args, wf) as store:
        run = _load_run(store, args.run_id)
        if wf is None:
            start_dispatch_job(store, args.run_id)
        else:
            wf.dispatch(args.run_id, store, run["parameters"][P_RUN_DIR])
    print(f"Resumed {args.run_id}.")
    return 0


def _cmd_dag(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    states: Dict[str, str] = {}
    if args.run_id:
        with _open_store(args, wf, readonly=True) as store:
            nodes, states = _run_graph(store, args.run_id)
    else:
        wf.validate()  # type: ignore[union-attr]
        nodes = [(n, wf.tasks[n].is_array, wf.tasks[n].dependencies) for n in wf.topological_order()]  # type: ignore
    if getattr(args, "json", False):
        _print_json([{"task": n, "is_array": a, "dependencies": d, "state": states.get(n)} for n, a, d in nodes])
    else:
        print(render_dag(nodes, args.format, states, colour=args.format == "text" and use_colour()))
    return 0


def _run_graph(store: Store, run_id: str) -> Tuple[List[Tuple[str, bool, List[str]]], Dict[str, str]]:
    """Return a recorded run's ``(task, is_array, dependencies)`` nodes and each task's state."""
    _load_run(store, run_id)
    nodes = [(s["task_name"], bool(s["is_array"]), list(s.get("dependencies") or []))
             for s in store.get_task_specs(run_id)]
    summary = store.task_state_summary(run_id)
    return nodes, {name: _task_state(summary.get(name, {})) for name, _, _ in nodes}


def _task_state(counts: Mapping[str, int]) -> str:
    """Summarise a task's instance states in one word."""
    for state in ("FAILED", "RUNNING", "SUBMITTED", "RETRYING", "PENDING", "CANCELLED"):
        if counts.get(state):
            return state
    return "SUCCESS" if counts else "WAITING"


def render_dag(nodes: Sequence[Tuple[str, bool, Sequence[str]]], fmt: str = "text",
               states: Optional[Mapping[str, str]] = None, colour: bool = False) -> str:
    """Render ``(task, is_array, dependencies)`` triples as a text tree, mermaid or dot.

    ``states`` maps tasks to a state shown next to them (ANSI-coloured in
    the text tree when ``colour``; a fill colour in dot; a class in mermaid).
    """
    states = states or {}
    if fmt == "mermaid":
        lines = ["flowchart TD"]
        lines += [f"    {n}[[{n}]]" if array else f"    {n}[{n}]" for n, array, _ in nodes]
        lines += [f"    {d} --> {n}" for n, _, deps in nodes for d in deps]
        lines += [f"    class {n} {states[n].lower()}" for n, _, _ in nodes if n in states]
        return "\n".join(lines)
    if fmt == "dot":
        colours = {"SUCCESS": "palegreen", "FAILED": "salmon", "RUNNING": "lightblue", "SUBMITTED": "lightyellow",
                   "CANCELLED": "grey"}
        lines = ["digraph reflow {", "    rankdir=TB;", "    node [shape=box];"]
        for n, array, _ in nodes:
            attrs = (["peripheries=2"] if array else []) + (
                [f'style=filled, fillcolor="{colours[states[n]]}"'] if states.get(n) in colours else [])
            lines.append(f'    "{n}" [{", ".join(attrs)}];' if attrs else f'    "{n}";')
        lines += [f'    "{d}" -> "{n}";' for n, _, deps in nodes for d in deps]
        return "\n".join([*lines, "}"])
    return _dag_tree(nodes, states, colour)


def _dag_tree(nodes: Sequence[Tuple[str, bool, Sequence[str]]], states: Mapping[str, str], colour: bool) -> str:
    """Draw the graph as a tree: each task under its latest dependency, the others named."""
    order = {name: position for position, (name, _, _) in enumerate(nodes)}
    children: Dict[Optional[str], List[Tuple[str, bool, Sequence[str]]]] = {}
    for node in nodes:
        deps = [d for d in node[2] if d in order]
        children.setdefault(max(deps, key=order.__getitem__) if deps else None, []).append(node)
    lines: List[str] = []

    def draw(parent: Optional[str], prefix: str) -> None:
        kids = children.get(parent, [])
        for number, (name, array, deps) in enumerate(kids):
            last = number == len(kids) - 1
            branch = "" if parent is None else ("└── " if last else "├── ")
            others = [d for d in deps if d != parent]
            state = f"  {_paint(states[name], states[name], colour)}" if name in states else ""
            lines.append(f"{prefix}{branch}{name}{' [array]' if array else ''}{state}"
                         f"{'  (also after ' + ', '.join(others) + ')' if others else ''}")
            draw(name, prefix + ("" if parent is None else ("    " if last else "│   ")))

    draw(None, "")
    return "\n".join(lines)


def _cmd_report(args: argparse.Namespace, wf: Optional[Workflow]) -> int:
    with _open_store(args, wf, readonly=True) as store:
        path = write_report(store, args.run_id, args.output)
    print(f"Wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def _cmd_dispatch(args: argparse.Namespace, wf: Workflow) -> int:
    store = _open_store(args, wf)
    with store:
        counts = wf.dispatch(args.run_id, store, args.run_dir, verify=args.verify)
    log.info("dispatch cycle of %s: %s", args.run_id, counts)
    return 0


def _cmd_worker(args: argparse.Namespace, wf: Workflow) -> int:
    store_path = args.store_path or SqliteStore.default_path(wf.config)
    run_dir = args.run_dir
    if run_dir is None:
        with SqliteStore(store_path, readonly=True) as store:
            run_dir = store.get_run_parameters(args.run_id)[P_RUN_DIR]
    return run_worker(wf, args.run_id, store_path, run_dir, args.task, args.index, args.positions, args.base,
                      args.pack, args.slots)


_COMMANDS: Dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "submit": _cmd_submit, "run": _cmd_run, "describe": _cmd_describe, "status": _cmd_status,
    "cancel": _cmd_cancel, "retry": _cmd_retry, "runs": _cmd_runs, "logs": _cmd_logs, "resume": _cmd_resume,
    "dag": _cmd_dag, "report": _cmd_report, "dispatch": _cmd_dispatch, "worker": _cmd_worker,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``python reflow.py COMMAND ...``: operate runs from the store alone."""
    return _cli_main(list(sys.argv[1:] if argv is None else argv), None)


# =============================================================================
# Submodule aliases: one file answers to every import path of the package
# =============================================================================

#: Submodule name -> public names it re-exports (the same objects, not copies).
SUBMODULES = {
    "workflow": ["Workflow", "make_run_id", "build_kwargs", "resolve_index", "default_executor", "resolve_executor"],
    "stores": ["Store", "SqliteStore"],
    "stores.sqlite": ["SqliteStore"],
    "executors": ["Executor", "JobResources", "JobInfo", "SlurmExecutor", "PBSExecutor", "LSFExecutor",
                  "SGEExecutor", "FluxExecutor", "LocalExecutor", "default_executor", "resolve_executor"],
    "executors.helpers": ["default_executor", "resolve_executor"],
    "executors.util": ["run_cmd", "CommandResult", "ExecutorError"],
    "executors.slurm": ["SlurmExecutor"],
    "executors.pbs": ["PBSExecutor"],
    "executors.lsf": ["LSFExecutor"],
    "executors.sge": ["SGEExecutor"],
    "executors.flux": ["FluxExecutor"],
    "executors.local": ["LocalExecutor"],
    "config": ["Config", "config_path", "load_config", "ensure_config_exists", "write_example_config"],
    "params": ["Param", "Result", "RunDir", "WireMode", "infer_wire_mode"],
    "flow": ["Flow", "TaskSpec", "JobConfig"],
    "cache": ["compute_input_hash", "compute_identity", "compute_output_hash", "verify_cached_output"],
    "manifest": ["ManifestCodec", "DEFAULT_CODEC", "WorkflowDescription", "TaskDescription", "CliParamDescription"],
    "results": ["TaskState", "RunState", "run_status", "format_status", "log_entries"],
    "report": ["write_report", "report_data", "render_report"],
    "signals": ["graceful_shutdown", "TaskInterrupted"],
    "run": ["Run", "cancel_run", "retry_run", "run_status"],
    "_types": ["TaskState", "RunState", "WireMode"],
    "cli": ["main"],
}


def _register_submodules(module: types.ModuleType, prefix: str) -> None:
    """Create ``<prefix>.<name>`` modules holding the listed objects of ``module``."""
    module.__path__ = []  # type: ignore[attr-defined]  # makes "import reflow.x" look for submodules
    for dotted in sorted(SUBMODULES, key=lambda name: name.count(".")):
        full = f"{prefix}.{dotted}"
        sub = sys.modules.get(full)
        if sub is None:
            sub = types.ModuleType(full, f"reflow.{dotted}: names re-exported from {module.__file__}")
            sub.__file__ = module.__file__
            sub.__spec__ = importlib.machinery.ModuleSpec(full, None, is_package=True)
            sub.__path__ = []  # type: ignore[attr-defined]
            sys.modules[full] = sub
        for name in SUBMODULES[dotted]:
            setattr(sub, name, getattr(module, name))
        parent_name, _, leaf = full.rpartition(".")
        setattr(sys.modules[parent_name], leaf, sub)


if __name__ == "__main__":
    sys.modules.setdefault("reflow", sys.modules[__name__])
    _register_submodules(sys.modules[__name__], "reflow")
    sys.exit(main())
else:
    _register_submodules(sys.modules[__name__], __name__)
