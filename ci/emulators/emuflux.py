"""Flux emulator: flux submit / batch / jobs / cancel / job (schedulers.md 5, 7.3).

Job ids are 64-bit FLUIDs (ms timestamp << 24 | sequence) printed in F58
(prefix U+0192 in UTF-8 locales, 'f' otherwise or with FLUX_F58_FORCE_ASCII).
Every command accepts f58 (either prefix), decimal, 0x hex, dothex and kvs ids.
"""

import argparse
import fnmatch
import json
import os
import re
import signal
import string
import sys
import time

import emucore as core

SCHED = "flux"
HISTORY_DEFAULT = -1.0          #: inactive jobs are kept until purged (no limit)
WALLTIME_SIGNALS = (signal.SIGTERM, signal.SIGKILL)
CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGKILL)
F58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
UPREFIX = "\u0192"
FAULT = "Unable to connect to Flux: broker socket /run/flux/local was not found"
DEP_SCHEMES = {"after", "afterstart", "afterany", "afterok", "afternotok", "afterexcept",
               "singleton", "begin-time"}
STATES = {"depend": "DEPEND", "priority": "PRIORITY", "sched": "SCHED"}
STATE_SINGLE = {"NEW": "N", "DEPEND": "D", "PRIORITY": "P", "SCHED": "S", "RUN": "R",
                "CLEANUP": "C", "INACTIVE": "I"}
RESULT_ABBREV = {"COMPLETED": "CD", "FAILED": "F", "CANCELED": "CA", "TIMEOUT": "TO"}
#: flux jobs header names per field
HEADERS = {
    "id": "JOBID", "id.f58": "JOBID", "id.f58plain": "JOBID", "id.dec": "JOBID", "id.hex": "JOBID",
    "id.dothex": "JOBID", "id.kvs": "JOBID", "jobid": "JOBID", "userid": "UID", "username": "USER",
    "urgency": "URG", "priority": "PRI", "state": "STATE", "state_single": "S", "result": "RESULT",
    "result_abbrev": "RS", "status": "STATUS", "status_abbrev": "ST", "returncode": "RC",
    "waitstatus": "WSTATUS", "success": "SUCCESS", "name": "NAME", "queue": "QUEUE",
    "bank": "BANK", "project": "PROJECT", "ntasks": "NTASKS", "ncores": "NCORES",
    "nnodes": "NNODES", "ngpus": "NGPUS", "nodelist": "NODELIST", "duration": "DURATION",
    "runtime": "RUNTIME", "t_submit": "T_SUBMIT", "t_depend": "T_DEPEND", "t_run": "T_RUN",
    "t_cleanup": "T_CLEANUP", "t_inactive": "T_INACTIVE", "exception.occurred": "EXCEPTION-OCCURRED",
    "exception.type": "EXCEPTION-TYPE", "exception.note": "EXCEPTION-NOTE",
    "exception.severity": "EXCEPTION-SEVERITY", "cwd": "CWD", "dependencies": "DEPENDENCIES",
    "cc": "CC",
}
DEFAULT_FORMAT = ("{id.f58:>12} {username:<8.8} {name:<10.10} {status_abbrev:>2.2} "
                  "{ntasks:>6} {nnodes:>6} {runtime!F:>8} {nodelist}")


class Fail(Exception):
    """A client error: message for stderr and the exit status."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.message, self.code = message, code


# ===========================================================================
# Job ids
# ===========================================================================

def f58_encode(number, ascii_only=False):
    """Encode a job id in F58 (most significant digit first)."""
    digits = ""
    while number:
        number, rem = divmod(number, 58)
        digits = F58[rem] + digits
    return ("f" if ascii_only else UPREFIX) + (digits or "1")


def ascii_env(env):
    """Tell whether ids must be printed with the ASCII 'f' prefix."""
    return bool(env.get("FLUX_F58_FORCE_ASCII")) or not core.env_is_utf8(env)


def f58(number, env=None):
    """Encode a job id with the prefix the (caller's) locale selects."""
    return f58_encode(number, ascii_env(core.clean_env() if env is None else env))


def parse_id(text):
    """Parse f58 (ƒ or f prefix), decimal, 0x hex, dothex or kvs ids."""
    text = text.strip()
    value = None
    if text[:1] in (UPREFIX, "f") and len(text) > 1 and all(c in F58 for c in text[1:]):
        value = 0
        for char in text[1:]:
            value = value * 58 + F58.index(char)
    elif re.match(r"^0x[0-9a-fA-F]+$", text):
        value = int(text, 16)
    elif re.match(r"^(job\.)?[0-9a-f]{4}(\.[0-9a-f]{4}){3}$", text):
        value = int(text.replace("job.", "").replace(".", ""), 16)
    elif text.isdigit():
        value = int(text)
    if value is None or value >= 2 ** 64:
        raise ValueError("invalid JobID value: '%s'" % text)
    return value


def id_forms(number, env=None):
    """Return every printable form of an id."""
    hexa = "%016x" % number
    dothex = ".".join(hexa[i:i + 4] for i in range(0, 16, 4))
    return {"dec": str(number), "f58": f58(number, env), "f58plain": f58_encode(number, True),
            "hex": "0x%x" % number, "dothex": dothex, "kvs": "job." + dothex}


class JobId(int):
    """An id that formats as f58 and has .dec/.f58/.hex attributes."""

    def __getattr__(self, name):
        forms = id_forms(int(self))
        if name in forms:
            return forms[name]
        raise AttributeError(name)

    def __format__(self, spec):
        return format(f58(int(self)), spec)

    def __str__(self):
        return f58(int(self))


def new_id(store):
    """Allocate a FLUID: milliseconds since instance start << 24, monotonic."""
    origin_path = store.sub("flux-origin")
    if not os.path.exists(origin_path):
        core.atomic_write(origin_path, repr(time.time() - 3600))
    with open(origin_path) as fh:
        origin = float(fh.read())
    stamp = int((time.time() - origin) * 1000) << 24
    return store.next_id(lambda last: max(last + 1, stamp))


def parse_idset(text):
    """Parse an RFC 22 idset ('1-10', '[0,2,5-7]') into a list."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    out = []
    for item in body.split(","):
        match = re.match(r"^(\d+)(?:-(\d+))?$", item.strip())
        if not match or int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise Fail("flux-submit: ERROR: invalid idset '%s'\n" % text)
        out += range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1)
    return sorted(set(out))


def id_arg(text):
    """argparse type for job ids."""
    try:
        return parse_id(core.fix_arg(text))
    except ValueError:
        raise argparse.ArgumentTypeError("invalid JobID value: '%s'" % text) from None


# ===========================================================================
# Records: state, result, dependencies, gate (runner hooks)
# ===========================================================================

def visible(store, rec, now):
    """Tell whether a record is still known (not purged)."""
    return store.visible(rec, HISTORY_DEFAULT, now)


def exception_of(rec):
    """Return the job exception dict or None."""
    if rec.get("exception"):
        return rec["exception"]
    reason = rec.get("reason")
    if reason == "timeout":
        return {"type": "timeout", "severity": 0, "note": "resource allocation expired"}
    if reason == "execfail":
        return {"type": "exec", "severity": 0, "note": "task 0: start failed"}
    if reason == "cancel":
        return {"type": "cancel", "severity": 0, "note": ""}
    return None


def state_of(rec):
    """Return the Flux state name of a record."""
    phase = rec["phase"]
    if phase == "pending":
        return STATES.get(rec.get("gate"), "SCHED")
    return {"running": "RUN", "exiting": "CLEANUP", "done": "INACTIVE"}[phase]


def result_of(rec):
    """Return COMPLETED / FAILED / CANCELED / TIMEOUT, None while active."""
    if rec["phase"] != "done":
        return None
    exc = exception_of(rec)
    if exc:
        return {"cancel": "CANCELED", "timeout": "TIMEOUT"}.get(exc["type"], "FAILED")
    ok = rec.get("ran") and rec.get("exit_code") == 0 and not rec.get("exit_signal")
    return "COMPLETED" if ok else "FAILED"


def returncode_of(rec):
    """Return the job returncode (-signo if killed, -128 if canceled unrun)."""
    if rec["phase"] != "done":
        return None
    if not rec.get("ran"):
        exc = exception_of(rec)
        return -128 if exc and exc["type"] == "cancel" else None
    if rec.get("exit_signal"):
        return -rec["exit_signal"]
    return rec.get("exit_code")


def waitstatus_of(rec):
    """Return the raw wait status of a job that ran."""
    if rec["phase"] != "done" or not rec.get("ran"):
        return None
    if rec.get("exit_signal"):
        return rec["exit_signal"]
    return (rec.get("exit_code") or 0) << 8


def dep_state(store, scheme, target, now, rec):
    """Evaluate one dependency: ('ok'|'wait'|'never', note)."""
    if scheme == "begin-time":
        return ("ok" if now >= float(target) else "wait"), None
    if scheme == "singleton":
        others = [r for r in store.all() if r["name"] == rec["name"] and r["id"] < rec["id"]
                  and r["phase"] != "done"]
        return ("wait" if others else "ok"), None
    other = store.load("flux-%d" % target)
    if other is None:
        return "never", "dependency: %s: job %s not found" % (scheme, f58(target))
    started = other.get("ran") or other["phase"] in ("running",)
    if scheme in ("after", "afterstart"):
        if started:
            return "ok", None
        return ("never" if other["phase"] in ("exiting", "done") else "wait"), None
    if other["phase"] != "done":
        return "wait", None
    result = result_of(other)
    good = {"afterany": True, "afterok": result == "COMPLETED",
            "afternotok": result != "COMPLETED", "afterexcept": exception_of(other) is not None}[scheme]
    if good:
        return "ok", None
    return "never", "dependency: %s: job %s %s" % (scheme, f58(target), result.lower())


def raise_exception(store, key, etype, note, now):
    """Raise a fatal exception on a pending job: CLEANUP then INACTIVE."""
    def apply(rec):
        if rec["phase"] != "pending":
            return False
        rec["exception"] = {"type": etype, "severity": 0, "note": note or ""}
        core.cancel_pending(rec, now, etype, final=False)
    store.update(key, apply)


def evaluate(store, rec, now):
    """Return ('ok'|'wait'|'never', note) for all dependencies of a job."""
    result = "ok", None
    for scheme, target in rec.get("deps") or []:
        state, note = dep_state(store, scheme, target, now, rec)
        if state == "never":
            return state, note
        if state == "wait":
            result = state, None
    if rec.get("begin") and rec["begin"] > now:
        result = "wait", None
    return result


def set_gate(store, rec, value, now):
    """Persist the display gate (DEPEND/PRIORITY/SCHED) when it changed."""
    if rec.get("gate") != value:
        def apply(r):
            r["gate"] = value
            r.setdefault("t_" + value, now)
        store.update(rec["key"], apply)
        rec["gate"] = value


def gate(store, rec, now):
    """Tell whether a job may start now (runner hook)."""
    if rec["phase"] != "pending":
        return False
    state, note = evaluate(store, rec, now)
    if state == "never":
        raise_exception(store, rec["key"], "dependency", note, now)
        return False
    if state == "wait":
        set_gate(store, rec, "depend", now)
        return False
    set_gate(store, rec, "sched", now)
    return int(rec.get("urgency", 16)) > 0


def stage_out(store, rec, head):
    """Write the job shell's OOM message (runner hook); output is direct."""
    if rec.get("reason") == "oom" and rec.get("stderr"):
        try:
            with open(rec["stderr"], "a") as fh:
                fh.write("flux-shell[0]: ERROR: oom: Memory cgroup out of memory: "
                         "killed 1 task on %s.\n" % core.HOST)
        except OSError:
            pass


# ===========================================================================
# flux submit / batch
# ===========================================================================

def submit_parser(prog, batch=False):
    """Build the argparse parser of flux submit / flux batch."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        usage="%s [OPTIONS...] %s" % (prog, "SCRIPT [ARGS...]" if batch else "COMMAND [ARGS...]"))
    add = parser.add_argument
    for short, long_, kind in (("-n", "--ntasks", int), ("-c", "--cores-per-task", int),
                               ("-g", "--gpus-per-task", int), ("-N", "--nodes", int)):
        add(short, long_, type=kind, metavar="N")
    for long_ in ("--tasks-per-node", "--tasks-per-core", "--gpus-per-node", "--cores"):
        add(long_, type=int, metavar="N")
    add("-x", "--exclusive", action="store_true")
    add("-t", "--time-limit", metavar="MIN|FSD")
    add("-q", "--queue", metavar="NAME")
    add("-B", "--bank", metavar="BANK")
    for long_ in ("--job-name", "--output", "--error", "--input", "--cwd", "--begin-time",
                  "--flags", "--signal", "--log", "--log-stderr", "--cc", "--bcc"):
        add(long_, metavar=long_.strip("-").upper().replace("-", "_"))
    add("--urgency", default="default", metavar="N")
    for long_ in ("--dependency", "--requires", "--env", "--env-remove", "--env-file",
                  "--rlimit", "--add-file"):
        add(long_, action="append", default=[], metavar="SPEC")
    add("-S", "--setattr", action="append", default=[], metavar="KEY=VAL")
    add("-o", "--setopt", action="append", default=[], metavar="KEY[=VAL]")
    add("--label-io", action="store_true")
    add("-u", "--unbuffered", action="store_true")
    add("--quiet", action="store_true")
    add("--wait", action="store_true")
    add("-v", "--verbose", action="count", default=0)
    add("command", nargs=argparse.REMAINDER)
    return parser


def parse_urgency(text):
    """Parse --urgency (0-16, hold, default)."""
    names = {"hold": 0, "default": 16, "expedite": 31}
    value = names.get(text)
    if value is None:
        if not text.lstrip("-").isdigit():
            raise Fail("flux-submit: ERROR: invalid urgency '%s'\n" % text)
        value = int(text)
    if not 0 <= value <= 16:
        raise Fail("flux-submit: ERROR: job-ingest: urgency range is [0:16] for guest users\n")
    return value


def parse_limit(text):
    """Parse -t: plain number = minutes, otherwise an FSD."""
    if re.match(r"^\d+(\.\d+)?$", text):
        return float(text) * 60
    value = core.parse_fsd(text)
    if value is None:
        raise Fail("flux-submit: ERROR: invalid Flux standard duration '%s'\n" % text)
    return value


def parse_begin(text, now):
    """Parse --begin-time (+FSD or an epoch)."""
    if text.startswith("+") and core.parse_fsd(text[1:]) is not None:
        return now + core.parse_fsd(text[1:])
    try:
        return float(text)
    except ValueError:
        raise Fail("flux-submit: ERROR: Invalid begin-time '%s'\n" % text) from None


def parse_deps(store, specs, now, prog):
    """Parse --dependency URIs; reject unknown schemes and targets."""
    deps, begin = [], None
    for spec in specs:
        scheme, sep, value = spec.partition(":")
        if scheme not in DEP_SCHEMES or (not sep and scheme != "singleton"):
            raise Fail('%s: ERROR: dependency scheme "%s" not supported\n' % (prog, scheme))
        if scheme == "singleton":
            deps.append([scheme, None])
            continue
        if scheme == "begin-time":
            begin = parse_begin(value, now)
            continue
        try:
            target = parse_id(value)
        except ValueError:
            raise Fail('%s: ERROR: %s: "%s" is not a valid jobid\n' % (prog, scheme, value)) from None
        other = store.load("flux-%d" % target)
        if other is None or not visible(store, other, now):
            raise Fail("%s: ERROR: dependency %s:%s: job not found\n" % (prog, scheme, value))
        deps.append([scheme, target])
    return deps, begin


def apply_env(base, args):
    """Apply --env-file, --env and --env-remove rules to the copied env."""
    env = dict(base)
    rules = []
    for path in args.env_file:
        try:
            with open(path) as fh:
                rules += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise Fail("flux-submit: ERROR: %s: %s\n" % (path, exc.strerror)) from None
    rules += args.env + ["-" + p for p in args.env_remove]
    for rule in rules:
        if rule.startswith("-"):
            for key in [k for k in env if fnmatch.fnmatchcase(k, rule[1:])]:
                del env[key]
        elif "=" in rule:
            key, _, val = rule.partition("=")
            env[key] = string.Template(val).safe_substitute(env)
        else:
            env.update({k: v for k, v in base.items() if fnmatch.fnmatchcase(k, rule)})
    return env


def queue_of(args):
    """Return the job's queue (default: first of $EMU_FLUX_QUEUES) or None."""
    configured = [q.strip() for q in os.environ.get("EMU_FLUX_QUEUES", "batch,debug").split(",") if q.strip()]
    if args.queue is None:
        return configured[0] if configured else None
    if not configured:
        raise Fail("flux-submit: ERROR: job-ingest: queue specified but no queues are configured\n")
    if args.queue not in configured:
        raise Fail("flux-submit: ERROR: Invalid queue '%s' specified\n" % args.queue)
    return args.queue


def render(template, number, name, nnodes, ntasks, env):
    """Expand the job-level mustache tags of an output template."""
    forms = id_forms(number, env)
    tags = {"id": forms["f58"], "jobid": forms["f58"], "name": name, "nnodes": str(nnodes),
            "size": str(ntasks), "node.name": core.HOST, "node.id": "0"}
    tags.update({"id." + k: v for k, v in forms.items()})
    tags.update({"jobid." + k: v for k, v in forms.items()})

    def sub(match):
        return tags.get(match.group(1), match.group(0))
    return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", sub, template)


def cc_sub(value, index):
    """Replace {cc} in a string (when --cc/--bcc is used)."""
    if index is None or value is None:
        return value
    return value.replace("{cc}", str(index))


def submit(store, argv, batch=False):
    """flux submit [OPTIONS] COMMAND [ARGS] (or flux batch SCRIPT)."""
    prog = "flux-batch" if batch else "flux-submit"
    args = submit_parser(prog, batch).parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0].startswith("-"):
        submit_parser(prog, batch).error("unrecognized arguments: %s" % command[0])
    if not command:
        raise Fail("%s: ERROR: %s\n" % (prog, "batch script is missing" if batch
                                        else "job command and arguments are missing"))
    script = None
    if batch:
        script, args = read_batch(prog, command[0], argv)
    if args.cc and args.bcc:
        raise Fail("%s: ERROR: specify only one of --cc or --bcc\n" % prog)
    now = time.time()
    urgency = parse_urgency(args.urgency)
    limit = parse_limit(args.time_limit) if args.time_limit else None
    queue = queue_of(args)
    deps, dep_begin = parse_deps(store, args.dependency, now, prog)
    begin = parse_begin(args.begin_time, now) if args.begin_time else dep_begin
    for opt in ("ntasks", "cores_per_task", "nodes", "gpus_per_task"):
        if getattr(args, opt) is not None and getattr(args, opt) < (0 if opt == "gpus_per_task" else 1):
            raise Fail("%s: ERROR: --%s must be >= 1\n" % (prog, opt.replace("_", "-")))
    nnodes = args.nodes or 1
    ntasks = args.ntasks or args.nodes or 1
    if nnodes > ntasks and not batch:
        raise Fail("%s: ERROR: node count must not be greater than task count\n" % prog)
    indices = parse_idset(args.cc or args.bcc) if (args.cc or args.bcc) else [None]
    active = sum(1 for r in store.all() if r["phase"] != "done")
    if core.policy_blocked(store.knobs(), active, len(indices)):
        raise Fail("%s: ERROR: user has max active jobs\n" % prog)
    base = core.clean_env()
    recs = []
    for index in indices:
        recs.append(make_job(store, args, command, script, index, base, urgency, limit, queue,
                             deps, begin, nnodes, ntasks, now, batch))
    for rec in recs:
        state, note = evaluate(store, rec, now)
        rec["gate"] = "depend" if state != "ok" else "priority"
        store.save(rec)
        if state == "never":
            raise_exception(store, rec["key"], "dependency", note, now)
    core.spawn_runner(store, [r["key"] for r in recs])
    if not args.quiet:
        core.out("".join(f58(r["id"]) + "\n" for r in recs))
    if args.wait:
        return wait_jobs(store, [r["id"] for r in recs], 1)
    return 0


def read_batch(prog, path, argv):
    """Read a flux batch script and merge its '#flux:' directives."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            script = fh.read()
    except OSError as exc:
        raise Fail("%s: ERROR: %s: %s\n" % (prog, path, exc.strerror)) from None
    if not script.startswith("#!"):
        raise Fail("%s: ERROR: %s: batch script does not start with '#!'\n" % (prog, path))
    words = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#flux:"):
            words += stripped[6:].split()
        elif stripped and not stripped.startswith("#"):
            break
    args = submit_parser(prog, True).parse_args(words + argv)   # command line wins
    return script, args


def make_job(store, args, command, script, index, base, urgency, limit, queue, deps, begin,
             nnodes, ntasks, now, batch):
    """Build one job record (one per --cc index)."""
    number = new_id(store)
    key = "flux-%d" % number
    command = [cc_sub(a, index) for a in command]
    env = apply_env(base, args)
    name = cc_sub(args.job_name, index) or os.path.basename(command[0])
    cwd = os.path.abspath(cc_sub(args.cwd, index) or os.getcwd())
    argv = command
    if batch:
        path = store.sub("scripts", key + ".sh")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(script)
        os.chmod(path, 0o700)
        argv = [path, *command[1:]]
    out_t = cc_sub(args.output, index) or ("flux-{{id}}.out" if batch else None)
    err_t = cc_sub(args.error, index)
    fid = f58(number, env)
    if out_t:
        stdout = os.path.join(cwd, render(out_t, number, name, nnodes, ntasks, env))
        stderr = os.path.join(cwd, render(err_t, number, name, nnodes, ntasks, env)) if err_t else stdout
        kvs = False
    else:
        stdout = store.sub("spool", key + ".out")
        stderr = store.sub("spool", key + ".err")
        kvs = True
    extra = {"FLUX_JOB_ID": fid, "FLUX_JOB_ID_PATH": "/" + fid, "FLUX_JOB_SIZE": str(ntasks),
             "FLUX_JOB_NNODES": str(nnodes), "FLUX_JOB_TMPDIR": store.sub("tmp", "jobtmp-0-" + fid),
             "FLUX_URI": "local://" + store.sub("local"), "FLUX_KVS_NAMESPACE": "job-%d" % number}
    if args.cc is not None:
        extra["FLUX_JOB_CC"] = str(index)
    env.update(extra)
    return {
        "key": key, "kind": "job", "id": number, "seq": number, "name": name, "queue": queue,
        "bank": cc_sub(args.bank, index), "urgency": urgency, "t_submit": now, "t_depend": now,
        "deps": deps, "begin": begin, "ntasks": ntasks, "cores": args.cores_per_task or 1,
        "nnodes": nnodes, "gpus": args.gpus_per_task or 0, "walltime": limit, "cc": index,
        "cwd": cwd, "env": env, "argv": argv, "stdout": stdout, "stderr": stderr, "kvs": kvs,
        "rank_vars": ["FLUX_TASK_RANK", "FLUX_TASK_LOCAL_ID"], "tmpdir": extra["FLUX_JOB_TMPDIR"],
        "phase": "pending", "exception": None, "batch": batch,
        "setattr": [cc_sub(s, index) for s in args.setattr],
        "setopt": [cc_sub(s, index) for s in args.setopt],
        "dependencies": list(args.dependency),
    }


# ===========================================================================
# flux jobs
# ===========================================================================

def to_dict(rec, now):
    """Return the 'flux jobs --json' object of a job (unset keys omitted)."""
    state = state_of(rec)
    result = result_of(rec)
    exc = exception_of(rec) if rec["phase"] in ("exiting", "done") else None
    d = {"id": rec["id"], "jobid": f58(rec["id"]), "userid": os.getuid(),
         "username": core.user_name(), "urgency": rec["urgency"],
         "priority": rec["urgency"] if state not in ("DEPEND", "PRIORITY") else None,
         "state": state, "status": result or state, "result": result,
         "success": None if result is None else result == "COMPLETED",
         "waitstatus": waitstatus_of(rec), "returncode": returncode_of(rec),
         "name": rec["name"], "cwd": rec["cwd"], "queue": rec.get("queue"),
         "bank": rec.get("bank"), "ntasks": rec["ntasks"],
         "ncores": rec["ntasks"] * rec["cores"], "nnodes": rec["nnodes"],
         "ngpus": rec["ntasks"] * rec["gpus"] or None,
         "nodelist": rec.get("host") if rec.get("ran") else None,
         "t_submit": rec["t_submit"], "t_depend": rec.get("t_depend"),
         "t_priority": rec.get("t_priority"), "t_sched": rec.get("t_sched"),
         "t_run": rec.get("t_start"), "t_cleanup": rec.get("t_exit"),
         "t_inactive": rec.get("t_end"), "duration": float(rec.get("walltime") or 0.0),
         "runtime": ((rec.get("t_exit") or now) - rec["t_start"]) if rec.get("t_start") else None,
         "exception": ({"occurred": True, "severity": exc["severity"], "type": exc["type"],
                        "note": exc["note"]} if exc else {"occurred": False}),
         "annotations": {},
         "dependencies": rec["dependencies"] if state == "DEPEND" and rec["dependencies"] else None}
    return {k: v for k, v in d.items() if v is not None}


class JobView:
    """Attribute view of a job for 'flux jobs -o' format strings."""

    def __init__(self, rec, now):
        self.d = to_dict(rec, now)
        self.rec = rec

    def get(self, name):
        """Return the value of a format field ('' when unset)."""
        if name == "id" or name == "jobid":
            return JobId(self.rec["id"])
        if name.startswith("id.") or name.startswith("jobid."):
            forms = id_forms(self.rec["id"])
            key = name.split(".", 1)[1]
            if key not in forms:
                raise KeyError(name)
            return forms[key]
        if name.startswith("exception."):
            return self.d["exception"].get(name.split(".", 1)[1], "")
        state = self.d["state"]
        extra = {"state_single": STATE_SINGLE[state],
                 "result_abbrev": RESULT_ABBREV.get(self.d.get("result"), ""),
                 "status_abbrev": RESULT_ABBREV.get(self.d.get("result")) or STATE_SINGLE[state],
                 "cc": "" if self.rec.get("cc") is None else self.rec["cc"]}
        if name in extra:
            return extra[name]
        if name not in HEADERS:
            raise KeyError(name)
        return self.d.get(name, "")


class JobFormatter(string.Formatter):
    """Python-format renderer with flux's field names and conversions."""

    def __init__(self, header=False):
        super().__init__()
        self.header = header

    def get_field(self, field_name, args, kwargs):
        """Look a field up in the job view (or return its header)."""
        if self.header:
            if field_name not in HEADERS and field_name not in ("state_single", "result_abbrev",
                                                                "status_abbrev"):
                raise KeyError(field_name)
            name = HEADERS.get(field_name) or {"state_single": "S", "result_abbrev": "RS",
                                               "status_abbrev": "ST"}[field_name]
            return name, field_name
        return kwargs["job"].get(field_name), field_name

    def convert_field(self, value, conversion):
        """Support flux conversions !d (date), !F (FSD), !H (hostlist), !P (percent)."""
        if self.header or value in ("", None):
            return value
        if conversion == "d":
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(value))
        if conversion == "D":
            return time.strftime("%Y-%m-%dT%H:%M", time.localtime(value))
        if conversion == "F":
            return core.fsd(float(value))
        if conversion in ("H", "h"):
            return str(value)
        if conversion == "P":
            return "%.1f%%" % (float(value) * 100)
        return super().convert_field(value, conversion)

    def format_field(self, value, spec):
        """Format a value; empty values and headers ignore the type character."""
        spec = re.sub(r"[h+]+$", "", spec)
        if self.header or value == "" or isinstance(value, str):
            spec = re.sub(r"[bcdeEfFgGnosxX%]$", "", spec)
            return format(str(value), spec)
        try:
            return format(value, spec)
        except (ValueError, TypeError):
            return format(str(value), re.sub(r"[a-zA-Z%]$", "", spec))


def render_jobs(recs, fmt, header, now):
    """Render flux jobs rows with a format string."""
    fmt = re.sub(r"[?+]+:(?=\{)", "", fmt)
    lines = []
    try:
        if header:
            lines.append(JobFormatter(True).format(fmt).rstrip())
        for rec in recs:
            lines.append(JobFormatter().format(fmt, job=JobView(rec, now)).rstrip())
    except KeyError as exc:
        raise Fail("flux-jobs: ERROR: Unknown format field: %s\n" % exc.args[0]) from None
    except ValueError as exc:
        raise Fail("flux-jobs: ERROR: Invalid format: %s\n" % exc) from None
    return lines


def jobs_parser():
    """Build the flux jobs argument parser."""
    parser = argparse.ArgumentParser(prog="flux-jobs", allow_abbrev=False)
    add = parser.add_argument
    add("-a", action="store_true", dest="all")
    add("-A", action="store_true", dest="all_users")
    add("-n", "--no-header", action="store_true")
    add("-o", "--format", default=None)
    add("--json", action="store_true")
    add("-f", "--filter", default=None)
    add("-c", "--count", type=int, default=1000)
    add("-u", "--user", default=None)
    add("-q", "--queue", default=None)
    add("--name", default=None)
    add("ids", nargs="*", type=id_arg, metavar="JOBID")
    return parser


FILTERS = {
    "pending": {"DEPEND", "PRIORITY", "SCHED"}, "running": {"RUN", "CLEANUP"},
    "active": {"DEPEND", "PRIORITY", "SCHED", "RUN", "CLEANUP"}, "inactive": {"INACTIVE"},
    "depend": {"DEPEND"}, "priority": {"PRIORITY"}, "sched": {"SCHED"}, "run": {"RUN"},
    "cleanup": {"CLEANUP"},
}


def matches(rec, words):
    """Tell whether a job matches a --filter list of states/results."""
    state, result = state_of(rec), result_of(rec)
    return any(state in FILTERS.get(word, ()) or (result and result.lower() == word) for word in words)


def jobs(store, argv):
    """flux jobs [-a] [-n] [-o FORMAT] [--json] [ID...]."""
    args = jobs_parser().parse_args(argv)
    now = time.time()
    if args.ids:
        recs, code = [], 0
        for number in args.ids:
            rec = store.load("flux-%d" % number)
            if rec is None or not visible(store, rec, now):
                core.err("flux-jobs: ERROR: JobID %s unknown\n" % f58(number))
                code = 1
            else:
                recs.append(rec)
    else:
        code = 0
        words = (args.filter or ("pending,running,inactive" if args.all else "pending,running")).lower()
        recs = [r for r in store.all() if visible(store, r, now) and matches(r, words.split(","))]
        if args.queue:
            recs = [r for r in recs if r.get("queue") == args.queue]
        if args.name:
            recs = [r for r in recs if r["name"] == args.name]
        active = sorted((r for r in recs if r["phase"] != "done"), key=lambda r: -r["id"])
        inactive = sorted((r for r in recs if r["phase"] == "done"), key=lambda r: -r["t_end"])
        recs = (active + inactive)[:args.count]
    if args.json:
        if len(args.ids) == 1:
            if recs:
                core.out(json.dumps(to_dict(recs[0], now), ensure_ascii=False) + "\n")
        else:
            core.out(json.dumps({"jobs": [to_dict(r, now) for r in recs]}, ensure_ascii=False) + "\n")
        return code
    fmt = args.format or DEFAULT_FORMAT
    if fmt == "default":
        fmt = DEFAULT_FORMAT
    lines = render_jobs(recs, fmt, not args.no_header, now)
    core.out("".join(line + "\n" for line in lines))
    return code


# ===========================================================================
# flux cancel / flux job ...
# ===========================================================================

def cancel(store, argv, prog="flux-cancel"):
    """flux cancel [--all] [-m MSG] ID...: raise a cancel exception."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("-m", "--message", default="")
    parser.add_argument("-n", "--dry-run", action="store_true")
    parser.add_argument("-u", "--user", default=None)
    parser.add_argument("ids", nargs="*", type=id_arg, metavar="JOBID")
    args = parser.parse_args(argv)
    now = time.time()
    if args.all:
        targets = [r["id"] for r in store.all() if r["phase"] in ("pending", "running")]
        if not targets:
            core.err("%s: Command matched 0 jobs\n" % prog)
            return 0
        if not args.dry_run:
            for number in targets:
                cancel_one(store, number, args.message, now)
        core.err("%s: %s %d jobs (0 errors)\n" % (prog, "Would cancel" if args.dry_run else "Canceled",
                                                  len(targets)))
        return 0
    if not args.ids:
        raise Fail("%s: ERROR: one or more jobids or --all must be specified\n" % prog)
    code = 0
    for number in args.ids:
        problem = cancel_one(store, number, args.message, now)
        if problem:
            core.err("%s: ERROR: %s: %s\n" % (prog, f58(number), problem))
            code = 1
    return code


def cancel_one(store, number, message, now):
    """Cancel one job; return an error text or None."""
    key = "flux-%d" % number
    with store.lock():
        rec = store.load(key)
        if rec is None or not visible(store, rec, now):
            return "unknown job id"
        if rec["phase"] == "done":
            return "job is inactive"
        exc = {"type": "cancel", "severity": 0, "note": message}
        if rec["phase"] == "pending":
            raise_exception(store, key, "cancel", message, now)
        elif rec["phase"] == "running":
            def apply(r):
                r["exception"] = r.get("exception") or exc
                core.request_kill(r, CANCEL_SIGNALS, "cancel")
            store.update(key, apply)
    return None


def job_status_code(rec, exception_code):
    """Return the exit code 'flux job status' reports for a job."""
    exc = exception_of(rec)
    if exc and not rec.get("ran"):
        return exception_code
    if rec.get("exit_signal"):
        return 128 + rec["exit_signal"]
    if exc and exc["type"] != "cancel" and not rec.get("exit_code"):
        return exception_code
    return rec.get("exit_code") or 0


def wait_jobs(store, numbers, exception_code, verbose=False, prog="flux-job"):
    """Block until the jobs are inactive; return the highest exit code."""
    code = 0
    for number in numbers:
        while True:
            rec = store.load("flux-%d" % number)
            if rec is None:
                raise Fail("%s: ERROR: %s: unknown job id\n" % (prog, f58(number)))
            if rec["phase"] == "done":
                break
            time.sleep(core.POLL * 2)
        rc = job_status_code(rec, exception_code)
        if verbose:
            core.err("%s: exited with exit code %d\n" % (f58(number), rc))
        code = max(code, rc)
    return code


def job(store, argv):
    """flux job id|status|urgency|attach|cancel|kill ..."""
    if not argv:
        raise Fail("usage: flux-job [-h] {id,status,urgency,attach,cancel,kill} ...\n", 2)
    sub, rest = argv[0], argv[1:]
    handlers = {"id": job_id, "status": job_status, "urgency": job_urgency, "attach": job_attach,
                "cancel": lambda s, a: cancel(s, a, "flux-job"), "kill": job_kill}
    if sub not in handlers:
        raise Fail("usage: flux-job [-h] {id,status,urgency,attach,cancel,kill} ...\n"
                   "flux-job: error: argument subcommand: invalid choice: '%s'\n" % sub, 2)
    return handlers[sub](store, rest)


def job_id(store, argv):
    """flux job id [--from=...] [--to=dec|f58|f58plain|hex|dothex|kvs] [ID...]."""
    parser = argparse.ArgumentParser(prog="flux-job id", allow_abbrev=False)
    parser.add_argument("--from", dest="src", default="any",
                        choices=["any", "dec", "f58", "hex", "dothex", "kvs", "words"])
    parser.add_argument("--to", default="dec",
                        choices=["dec", "f58", "f58plain", "hex", "dothex", "kvs", "words", "emoji"])
    parser.add_argument("ids", nargs="*")
    args = parser.parse_args(argv)
    if args.to in ("words", "emoji") or args.src == "words":
        raise Fail("flux-job: ERROR: emulator: '%s' encoding is not emulated\n" % args.to)
    items = args.ids or [word.strip() for word in sys.stdin.read().split() if word.strip()]
    lines = []
    for text in items:
        text = core.fix_arg(text)
        try:
            number = parse_id(text)
        except ValueError:
            raise Fail("flux-job: ERROR: %s: malformed input\n" % text) from None
        lines.append(id_forms(number)[args.to])
    core.out("".join(line + "\n" for line in lines))
    return 0


def job_status(store, argv):
    """flux job status [-v] [-e CODE] ID...: wait, exit with the highest code."""
    parser = argparse.ArgumentParser(prog="flux-job status", allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-e", "--exception-exit-code", type=int, default=1)
    parser.add_argument("ids", nargs="+", type=id_arg)
    args = parser.parse_args(argv)
    now = time.time()
    for number in args.ids:
        rec = store.load("flux-%d" % number)
        if rec is None or not visible(store, rec, now):
            raise Fail("flux-job: ERROR: %s: unknown job id\n" % f58(number))
    return wait_jobs(store, args.ids, args.exception_exit_code, args.verbose)


def job_urgency(store, argv):
    """flux job urgency ID N|hold|default|expedite."""
    parser = argparse.ArgumentParser(prog="flux-job urgency", allow_abbrev=False)
    parser.add_argument("id", type=id_arg)
    parser.add_argument("urgency")
    args = parser.parse_args(argv)
    value = {"hold": 0, "default": 16, "expedite": 31}.get(args.urgency)
    if value is None:
        if not args.urgency.isdigit() or int(args.urgency) > 16:
            raise Fail("flux-job: ERROR: urgency: invalid value '%s'\n" % args.urgency)
        value = int(args.urgency)
    rec = store.load("flux-%d" % args.id)
    if rec is None or not visible(store, rec, time.time()):
        raise Fail("flux-job: ERROR: %s: unknown job id\n" % f58(args.id))
    if rec["phase"] == "done":
        raise Fail("flux-job: ERROR: urgency: job is inactive\n")
    store.update(rec["key"], lambda r: r.update(urgency=value))
    return 0


def job_attach(store, argv):
    """flux job attach ID: wait and print the job's KVS output."""
    parser = argparse.ArgumentParser(prog="flux-job attach", allow_abbrev=False)
    parser.add_argument("id", type=id_arg)
    args = parser.parse_args(argv)
    rec = store.load("flux-%d" % args.id)
    if rec is None:
        raise Fail("flux-job: ERROR: %s: unknown job id\n" % f58(args.id))
    code = wait_jobs(store, [args.id], 1)
    rec = store.load(rec["key"])
    if rec.get("kvs"):
        for path, write in ((rec["stdout"], core.out), (rec["stderr"], core.err)):
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    write(fh.read())
            except OSError:
                pass
    return code


def job_kill(store, argv):
    """flux job kill [-s SIG] ID...: signal running jobs."""
    parser = argparse.ArgumentParser(prog="flux-job kill", allow_abbrev=False)
    parser.add_argument("-s", "--signal", default="SIGTERM")
    parser.add_argument("ids", nargs="+", type=id_arg)
    args = parser.parse_args(argv)
    sig = core.sig_number(args.signal)
    if sig is None:
        raise Fail("flux-job: ERROR: kill: Invalid signal %s\n" % args.signal)
    code = 0
    for number in args.ids:
        rec = store.load("flux-%d" % number)
        if rec is None or rec["phase"] != "running":
            core.err("flux-job: ERROR: kill %s: %s\n" % (
                f58(number), "unknown job id" if rec is None else "job is not running"))
            code = 1
            continue
        store.update(rec["key"], lambda r: core.request_kill(r, (sig,), None))
    return code


# ===========================================================================
# Entry point
# ===========================================================================

COMMANDS = {"submit": submit, "batch": lambda s, a: submit(s, a, batch=True), "jobs": jobs,
            "cancel": cancel, "job": job}


def main(argv):
    """Run 'flux CMD ...'; return its exit status."""
    argv = [core.fix_arg(a) for a in argv]
    if not argv or argv[0] in ("-h", "--help"):
        core.err("usage: flux [OPTIONS] COMMAND ARGS\nemulated commands: %s\n" % ", ".join(COMMANDS))
        return 0 if argv else 1
    if argv[0] == "--version" or argv[0] == "version":
        core.out("commands:    \t\t0.60.0 (emulated)\n")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        core.err("flux: '%s' is not a flux command.  See 'flux --help'.\n" % cmd)
        return 1
    store = core.Store(SCHED)
    offline = cmd == "job" and rest[:1] == ["id"]
    prog = "flux-" + cmd
    if not offline and core.enter(store, prog):
        core.err("%s: ERROR: %s\n" % (prog, FAULT))
        return 1
    try:
        return COMMANDS[cmd](store, rest)
    except Fail as exc:
        core.err(exc.message)
        return exc.code
