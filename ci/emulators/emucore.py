"""Shared machinery of the reflow CI scheduler emulators (PBS, LSF, Flux).

The emulators are dev tooling, not part of reflow. They follow the command
line behaviour documented in /work/shared/schedulers.md (sections 2, 3, 5, 7)
and keep all state in one directory so that many concurrent invocations agree:

    $EMU_STATE_DIR (default /tmp/reflow-emu-<uid>/<scheduler>)
        jobs/<sched>-<id>[-<index>].json   one record per job / array element,
                                           written atomically (tmp + rename)
        counter.<sched>                    id counter, guarded by fcntl.flock
        lock                               global lock for read-modify-write
        knobs.json                         fault-injection knobs (see README)
        slots/slot.N                       emulated cluster slots (flock)
        spool/ scripts/ aux/ tmp/ mail/    job files
        runners/<pid>                      live runner processes

Every submission forks one detached runner (``python3 emucore.py run ...``)
that waits for holds / dependencies / begin time / throttle / a free slot,
runs the job's processes, enforces walltime, delivers kill requests written
by the cancel commands, passes through the exiting state and records the
outcome.  Scheduler modules (emupbs, emulsf, emuflux) provide ``gate``,
``stage_out`` and ``WALLTIME_SIGNALS``.
"""

import contextlib
import fcntl
import fnmatch
import importlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = os.path.join(HERE, "emucore.py")
POLL = 0.05          #: runner poll interval (seconds)
HOST = socket.gethostname().split(".")[0] or "localhost"
FQDN = socket.gethostname() or "localhost"

#: knob name -> default; env var is EMU_<NAME upper>, knobs.json wins over env
KNOB_DEFAULTS = {
    "slots": 16,
    "exiting": 0.3,
    "kill_delay": 2.0,
    "slow": 0.0,
    "history": None,        # per scheduler default, see each module
    "policy_limit": 0,      # 0 off, N max active jobs, true always reject
    "oom": "",              # glob on job names that get OOM-killed
    "oom_after": 0.0,
    "fail": False,          # every call fails (persistent outage)
    "fail_next": 0,         # knobs.json only: next N calls fail
    "fail_code": "",
    "fail_commands": "",    # comma list of command names, empty = all
    "max_array_size": 0,    # 0 = scheduler default
    "pbs_walltime_status": "exec",   # exec (-29) or signal (256+signo)
    "walltime_scale": 1.0,  # multiply every walltime limit (LSF -W is in minutes)
}


# ===========================================================================
# Small utilities
# ===========================================================================

def user_name():
    """Return the login name of the current user."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def user_shell():
    """Return the login shell of the current user (fallback /bin/sh)."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    return shell if shell and os.path.exists(shell) else "/bin/sh"


def fix_arg(text):
    """Undo surrogate escapes in argv (non-UTF-8 locales), keep real text."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError:
        return text


def clean_env(env=None):
    """Return the caller's environment without Python's C-locale coercion.

    Python sets LC_CTYPE=C.UTF-8 (PEP 538) and turns on UTF-8 mode when the
    locale is C/POSIX; the emulated scheduler must see the caller's locale.
    """
    env = dict(os.environ if env is None else env)
    auto = (sys.flags.utf8_mode and not env.get("PYTHONUTF8")
            and "utf8" not in getattr(sys, "_xoptions", {}))
    if auto and env.get("LC_CTYPE") == "C.UTF-8":
        del env["LC_CTYPE"]
    if auto and not any(env.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LANG"] = "C"
    return env


def env_is_utf8(env):
    """Tell whether a (clean) environment selects a UTF-8 locale."""
    for key in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(key)
        if value:
            return "utf-8" in value.lower() or "utf8" in value.lower()
    return False


def out(text):
    """Write text to stdout as UTF-8 bytes (independent of the locale)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()


def err(text):
    """Write text to stderr as UTF-8 bytes."""
    sys.stderr.flush()
    sys.stderr.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stderr.buffer.flush()


def hms(seconds):
    """Format seconds as HH:MM:SS (hours may exceed 24)."""
    seconds = int(max(0, seconds))
    return "%02d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def parse_hms(text):
    """Parse [[HH:]MM:]SS[.frac] into seconds; None when malformed."""
    if not re.match(r"^\d+(:\d+){0,2}(\.\d+)?$", text or ""):
        return None
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return total


def parse_fsd(text):
    """Parse a Flux standard duration (30s, 10m, 2h, 1.5d, 100ms); None if bad."""
    match = re.match(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)?$", text or "")
    if not match:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
    return float(match.group(1)) * scale[match.group(2)]


def fsd(seconds):
    """Format seconds as a Flux standard duration (1.5s, 2m, 1.2h, 3d)."""
    for unit, scale, limit in (("ms", 0.001, 1), ("s", 1, 60), ("m", 60, 3600), ("h", 3600, 86400)):
        if seconds < limit:
            return "%g%s" % (round(seconds / scale, 1), unit)
    return "%gd" % round(seconds / 86400, 1)


def ranges(indices):
    """Format sorted integers as '1-3,5,7-9' (PBS/LSF index lists)."""
    parts, run = [], []
    for idx in sorted(indices):
        if run and idx == run[-1] + 1:
            run.append(idx)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else "%d-%d" % (run[0], run[-1]))
        run = [idx]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else "%d-%d" % (run[0], run[-1]))
    return ",".join(parts)


def sig_number(name):
    """Map 'TERM', 'SIGTERM' or '15' to a signal number; None if unknown."""
    name = (name or "").strip().upper()
    if name.isdigit():
        return int(name) if 0 < int(name) < 65 else None
    if not name.startswith("SIG"):
        name = "SIG" + name
    sig = getattr(signal, name, None)
    return int(sig) if isinstance(sig, signal.Signals) else None


# ===========================================================================
# State store
# ===========================================================================

def default_state_dir(sched):
    """Return $EMU_STATE_DIR or /tmp/reflow-emu-<uid>/<sched>."""
    return os.environ.get("EMU_STATE_DIR") or "/tmp/reflow-emu-%d/%s" % (os.getuid(), sched)


class Store:
    """Job records of one scheduler in a state directory."""

    SUBDIRS = ("jobs", "spool", "scripts", "aux", "tmp", "mail", "slots", "runners")

    def __init__(self, sched, root=None):
        self.sched = sched
        self.root = os.path.abspath(root or default_state_dir(sched))
        for sub in self.SUBDIRS:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.jobs = os.path.join(self.root, "jobs")
        self._cache = {}
        self._knobs = (None, {})
        self._locked = 0

    def path(self, key):
        """Return the record file of a key."""
        return os.path.join(self.jobs, key + ".json")

    def sub(self, *parts):
        """Return a path inside the state directory."""
        return os.path.join(self.root, *parts)

    def load(self, key):
        """Return the record for key or None (cached by inode/mtime/size)."""
        path = self.path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(key, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._cache.get(key)
        if hit and hit[0] == stamp:
            return json.loads(hit[1])
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            return None
        self._cache[key] = (stamp, text)
        return json.loads(text)

    def save(self, rec):
        """Write a record atomically (tmp file + rename)."""
        atomic_write(self.path(rec["key"]), json.dumps(rec, sort_keys=True))

    def delete(self, key):
        """Remove a record (history purge)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def keys(self):
        """Return all record keys of this scheduler."""
        prefix = self.sched + "-"
        return [n[:-5] for n in os.listdir(self.jobs)
                if n.startswith(prefix) and n.endswith(".json")]

    def all(self):
        """Return all records of this scheduler."""
        recs = (self.load(k) for k in self.keys())
        return [r for r in recs if r is not None]

    @contextlib.contextmanager
    def lock(self):
        """Hold the global state lock (re-entrant within one process)."""
        if self._locked:
            self._locked += 1
            try:
                yield
            finally:
                self._locked -= 1
            return
        fd = os.open(self.sub("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked = 1
            yield
        finally:
            self._locked = 0
            os.close(fd)

    def update(self, key, func):
        """Apply func(rec) to a record under the lock; return the record."""
        with self.lock():
            rec = self.load(key)
            if rec is None:
                return None
            if func(rec) is not False:
                self.save(rec)
            return rec

    def next_id(self, func=None):
        """Return the next job id from the flock-guarded counter file."""
        path = self.sub("counter." + self.sched)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 64).decode().strip()
            last = int(raw) if raw else 0
            new = func(last) if func else last + 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(new).encode())
            return new
        finally:
            os.close(fd)

    def knobs(self):
        """Return the effective knobs: knobs.json > EMU_* env > defaults."""
        path = self.sub("knobs.json")
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._knobs[0]:
            self._knobs = (stamp, read_json(path) if stamp else {})
        return merge_knobs(self._knobs[1], os.environ)

    def history(self, default):
        """Return the history retention in seconds (<0: forever)."""
        value = self.knobs()["history"]
        return default if value is None else float(value)

    def visible(self, rec, default_history, now=None):
        """Tell whether a finished record is still within history."""
        if rec.get("phase") != "done" or rec.get("t_end") is None:
            return True
        keep = self.history(default_history)
        return keep < 0 or (now or time.time()) - rec["t_end"] < keep


def atomic_write(path, text):
    """Write text to path via a temporary file and rename."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_json(path):
    """Read a JSON file, {} when missing or broken."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def convert_knob(name, value):
    """Convert a knob value (string from env or JSON value) to its type."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    default = KNOB_DEFAULTS.get(name)
    if name == "history":
        return float(low) if low else None
    if name == "policy_limit" and low in ("true", "yes", "on", "always"):
        return True
    if isinstance(default, bool):
        return low not in ("", "0", "false", "no", "off")
    try:
        if isinstance(default, int):
            return int(low) if low else 0
        if isinstance(default, float):
            return float(low) if low else 0.0
    except ValueError:
        return default
    return value


def merge_knobs(filed, env):
    """Combine knob defaults, EMU_* environment variables and knobs.json."""
    knobs = dict(KNOB_DEFAULTS)
    for name in KNOB_DEFAULTS:
        raw = env.get("EMU_" + name.upper())
        if raw is not None and name != "fail_next":
            knobs[name] = convert_knob(name, raw)
    for name, value in filed.items():
        knobs[name] = convert_knob(name, value)
    return knobs


def set_knobs(store, **values):
    """Update knobs.json in a state directory (used by emuctl and tests)."""
    with store.lock():
        path = store.sub("knobs.json")
        data = read_json(path)
        for name, value in values.items():
            if value is None:
                data.pop(name, None)
            else:
                data[name] = value
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def enter(store, command):
    """Apply the slow / fail knobs to one command call; True = must fail.

    fail_commands lists command names (qsub, bjobs, flux-submit; plain
    'flux' matches every flux subcommand).
    """
    knobs = store.knobs()
    if knobs["slow"]:
        time.sleep(float(knobs["slow"]))
    wanted = knobs["fail_commands"] or []
    if isinstance(wanted, str):
        wanted = wanted.split(",")
    wanted = [str(c).strip() for c in wanted if str(c).strip()]
    if wanted and command not in wanted and command.split("-")[0] not in wanted:
        return False
    if knobs["fail"]:
        return True
    if not knobs["fail_next"]:
        return False
    with store.lock():
        path = store.sub("knobs.json")
        data = read_json(path)
        left = int(data.get("fail_next") or 0)
        if left <= 0:
            return False
        data["fail_next"] = left - 1
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    return True


def policy_blocked(knobs, active, adding):
    """Tell whether the policy-limit knob rejects adding jobs."""
    limit = knobs["policy_limit"]
    if limit is True:
        return True
    if not limit or limit is False:
        return False
    return active + adding > int(limit)


# ===========================================================================
# Runner: runs the processes of one submission
# ===========================================================================

def spawn_runner(store, keys):
    """Fork the detached runner for the given runnable record keys."""
    # The child gets its own copy of the descriptor, so ours can close at once.
    with open(store.sub("runner.log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, CORE, "run", store.sched, store.root, *keys],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
            start_new_session=True, cwd=store.root)


def acquire_slot(store, count):
    """Take one of the emulated cluster slots (flock); return fd or None."""
    for num in range(max(1, int(count))):
        fd = os.open(store.sub("slots", "slot.%d" % num), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
    return None


def wait_status(status):
    """Split an os.wait status into (exit_code, signal)."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None


class _Job:
    """In-memory state of one running unit."""

    def __init__(self, t0):
        self.t0 = t0
        self.tasks = []        # [pid, status or None, rusage]
        self.fds = []
        self.slot = None
        self.nkills = 0
        self.signals = []      # [(due time, signo)]
        self.reason = None
        self.timed = False
        self.oom = False
        self.cleanup = []


class Runner:
    """Run the units of one submission until all of them are done."""

    def __init__(self, store, mod, keys):
        self.store, self.mod, self.keys = store, mod, keys
        self.procs = {}
        self.knobs = store.knobs()
        self.gates = {}

    def main(self):
        """Loop until every unit is done; always kill leftovers on exit."""
        pidfile = self.store.sub("runners", str(os.getpid()))
        atomic_write(pidfile, " ".join(self.keys))
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        try:
            while self.step():
                time.sleep(POLL)
        finally:
            for job in self.procs.values():
                self._killall(job, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.unlink(pidfile)

    def step(self):
        """Run one poll round; False when nothing is left to do."""
        if not os.path.isdir(self.store.jobs):
            return False
        self.knobs = self.store.knobs()
        self.gates = {}
        now = time.time()
        recs = [(key, self.store.load(key)) for key in self.keys]
        recs = [(key, rec) for key, rec in recs if rec is not None]
        self.busy = sum(1 for key, rec in recs if key in self.procs or rec["phase"] == "exiting")
        self.full = False
        alive = False
        for key, rec in recs:
            phase = rec["phase"]
            if key in self.procs:
                self.watch(key, rec, now)
                alive = True
            elif phase == "pending":
                alive = True
                if not self.full:
                    self.try_start(key, rec, now)
            elif phase == "exiting":
                alive = True
                if now >= rec.get("t_exit", now) + float(self.knobs["exiting"]):
                    self.store.update(key, lambda r: _finish(r, now))
            elif phase == "running":
                # running without a process here: the runner was restarted
                self.store.update(key, lambda r: _lost(r, now))
                alive = True
        return alive

    # -- starting -----------------------------------------------------------

    def head_of(self, rec):
        """Return the head record (array parent or the job itself)."""
        return self.store.load(rec["head"]) if rec.get("head") else rec

    def try_start(self, key, rec, now):
        """Start a pending unit when its gate, throttle and a slot allow."""
        head = self.head_of(rec)
        if head is None:
            return
        hkey = head["key"]
        if hkey not in self.gates:
            self.gates[hkey] = bool(self.mod.gate(self.store, head, now))
        if not self.gates[hkey] or rec.get("held"):
            return
        throttle = head.get("throttle")
        if throttle and self.busy >= int(throttle):
            self.full = True
            return
        slot = acquire_slot(self.store, self.knobs["slots"])
        if slot is None:
            self.full = True      # no free slot: try again next round
            return
        self.busy += 1
        self.start(key, head, slot, now)

    def start(self, key, head, slot, now):
        """Mark a unit running and spawn its task processes."""
        started = []

        def mark(rec):
            if rec["phase"] != "pending" or rec.get("held"):
                return False
            rec.update(phase="running", t_start=now, host=HOST, ran=True)
            started.append(True)
        rec = self.store.update(key, mark)
        if not started:
            os.close(slot)
            return
        job = _Job(now)
        job.slot = slot
        pattern = self.knobs["oom"]
        if pattern and fnmatch.fnmatchcase(rec.get("name") or head.get("name") or "", pattern):
            job.oom, job.reason = True, "oom"
        self.procs[key] = job
        try:
            self.spawn(job, rec, head)
        except OSError as exc:
            self._exec_failed(job, rec, head, exc)
        pids = [t[0] for t in job.tasks]
        self.store.update(key, lambda r: r.update(pids=pids))

    def spawn(self, job, rec, head):
        """Start every task of a unit (stdout/err to the unit's files)."""
        env = dict(head.get("env") or {})
        env.update(rec.get("env_extra") or {})
        for path in (rec.get("tmpdir"),):
            if path:
                os.makedirs(path, exist_ok=True)
                job.cleanup.append(path)
        if rec.get("nodefile"):
            with open(rec["nodefile"], "w") as fh:
                fh.write("".join(line + "\n" for line in rec.get("nodefile_lines", [])))
            job.cleanup.append(rec["nodefile"])
        argv = rec.get("argv") or head["argv"]
        cwd = rec.get("cwd") or head.get("cwd") or "/"
        ntasks = int(rec.get("ntasks") or head.get("ntasks") or 1)
        for rank in range(ntasks):
            tenv = dict(env)
            for name in rec.get("rank_vars") or head.get("rank_vars") or ():
                tenv[name] = str(rank)
            stdout, stderr = self._open_outputs(job, rec, rank)
            proc = subprocess.Popen(
                argv, cwd=cwd, env=tenv, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, close_fds=True,
                preexec_fn=os.setpgrp)
            proc.returncode = 0     # we reap with os.wait4 ourselves
            job.tasks.append([proc.pid, None, None])

    def _open_outputs(self, job, rec, rank):
        """Open the stdout/stderr files of one task."""
        files = []
        for which in ("stdout", "stderr"):
            path = rec.get(which)
            if path:
                path = path.replace("{{taskid}}", str(rank)).replace("{{task.id}}", str(rank))
                path = path.replace("{{task.rank}}", str(rank))
            files.append(path)
        mode = rec.get("output_mode", "w")
        fds = []
        for num, path in enumerate(files):
            if num == 1 and path == files[0]:
                fds.append(fds[0])
                continue
            if not path:
                fd = os.open(os.devnull, os.O_WRONLY)
            else:
                # Every rank appends (rank 0 truncates first): a rank writing at its own offset would
                # overwrite the lines of ranks that wrote before it.
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if mode != "a" and not rank else 0)
                fd = os.open(path, flags, 0o644)
            job.fds.append(fd)
            fds.append(fd)
        return fds[0], fds[1]

    def _exec_failed(self, job, rec, head, exc):
        """Record a unit whose processes could not be started."""
        name = exc.filename or (rec.get("argv") or head["argv"])[0]
        msg = "%s: %s\n" % (name, exc.strerror or exc)
        path = rec.get("stderr") or rec.get("stdout")
        if path:
            with contextlib.suppress(OSError), open(path, "a") as fh:
                fh.write(msg)
        job.reason = "execfail"
        job.tasks.append([-1, 127 << 8, None])

    # -- watching -----------------------------------------------------------

    def watch(self, key, rec, now):
        """Deliver signals, enforce limits and reap a running unit."""
        job = self.procs[key]
        kills = rec.get("kills") or []
        delay = float(self.knobs["kill_delay"])
        for req in kills[job.nkills:]:
            job.signals += [(now + n * delay, s) for n, s in enumerate(req["signals"])]
            if req.get("reason") and job.reason in (None, "oom") and not job.timed:
                job.reason = req["reason"]
        job.nkills = len(kills)
        limit = rec.get("walltime")
        if limit and not job.timed and now - job.t0 > float(limit) * float(self.knobs["walltime_scale"]):
            job.timed = True
            job.reason = "timeout"
            job.signals += [(now + n * delay, s) for n, s in enumerate(self.mod.WALLTIME_SIGNALS)]
        if job.oom and now - job.t0 >= float(self.knobs["oom_after"]) and not job.timed:
            job.oom = False
            job.signals.append((now, signal.SIGKILL))
        due = [s for t, s in job.signals if t <= now]
        job.signals = [(t, s) for t, s in job.signals if t > now]
        for sig in due:
            self._killall(job, sig)
        self._reap(job)
        if all(t[1] is not None for t in job.tasks):
            self.child_done(key, job, time.time())

    def _killall(self, job, sig):
        """Send a signal to the process group of every live task."""
        for task in job.tasks:
            if task[1] is None and task[0] > 0:
                with contextlib.suppress(OSError):
                    os.killpg(task[0], sig)

    def _reap(self, job):
        """Collect exited tasks with their resource usage."""
        for task in job.tasks:
            if task[1] is not None or task[0] <= 0:
                continue
            try:
                pid, status, usage = os.wait4(task[0], os.WNOHANG)
            except ChildProcessError:
                task[1] = 0
                continue
            if pid:
                task[1], task[2] = status, usage

    def child_done(self, key, job, now):
        """Record the outcome of a unit whose tasks all ended."""
        for task in job.tasks:
            if task[0] > 0:
                with contextlib.suppress(OSError):
                    os.killpg(task[0], signal.SIGKILL)   # leftovers, like a MoM
        if job.slot is not None:
            os.close(job.slot)
        for fd in set(job.fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        for path in job.cleanup:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        codes, sigs, cpu, rss = [], [], 0.0, 0
        for _pid, status, usage in job.tasks:
            code, sig = wait_status(status)
            (sigs if sig else codes).append(sig or code)
            if usage:
                cpu += usage.ru_utime + usage.ru_stime
                rss = max(rss, usage.ru_maxrss)
        exit_code = max(codes) if codes else None
        exit_signal = sigs[0] if sigs and not (exit_code or 0) else None
        if exit_signal:
            exit_code = None

        def mark(rec):
            rec.update(phase="exiting", t_exit=now, exit_code=exit_code,
                       exit_signal=exit_signal, cput=cpu, maxrss_kb=rss)
            rec["reason"] = job.reason or rec.get("reason")
        rec = self.store.update(key, mark)
        del self.procs[key]
        if rec is not None:
            with contextlib.suppress(Exception):
                self.mod.stage_out(self.store, rec, self.head_of(rec) or rec)


def _finish(rec, now):
    """Move an exiting record to done."""
    if rec["phase"] != "exiting":
        return False
    rec.update(phase="done", t_end=now)


def _lost(rec, now):
    """Finish a record whose runner vanished while it was running."""
    rec.update(phase="exiting", t_exit=now, exit_code=None, exit_signal=9, reason="lost")


def cancel_pending(rec, now, reason="cancel", final=True):
    """Finish a pending record without running it."""
    rec.update(reason=reason, ran=False, t_exit=now)
    if final:
        rec.update(phase="done", t_end=now)
    else:
        rec["phase"] = "exiting"


def request_kill(rec, signals, reason):
    """Append a kill request that the runner of a running record delivers."""
    rec.setdefault("kills", []).append({"signals": list(signals), "reason": reason})


def runner_main(argv):
    """Entry of the detached runner process: run SCHED ROOT KEY..."""
    sched, root, keys = argv[0], argv[1], argv[2:]
    sys.path.insert(0, HERE)
    mod = importlib.import_module("emu" + sched)
    Runner(Store(sched, root), mod, keys).main()
    return 0


# ===========================================================================
# Cleanup (tests, emuctl)
# ===========================================================================

def _session_members(sid):
    """Return pids whose session id is sid (Linux /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                pids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def kill_all(root):
    """Kill every runner of a state directory and all of its job processes."""
    rdir = os.path.join(root, "runners")
    try:
        names = os.listdir(rdir)
    except OSError:
        return 0
    killed = 0
    for name in names:
        if not name.isdigit():
            continue
        sid = int(name)
        try:
            with open("/proc/%d/cmdline" % sid, "rb") as fh:
                if b"emucore.py" not in fh.read():
                    continue
        except OSError:
            continue
        for pid in [sid] + [p for p in _session_members(sid) if p != sid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.path.insert(0, HERE)
        import emucore
        sys.exit(emucore.runner_main(sys.argv[2:]))
    sys.stderr.write("emucore.py: internal module of the reflow scheduler emulators\n")
    sys.exit(2)
