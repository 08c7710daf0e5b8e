"""PBS Pro / OpenPBS emulator: qsub, qstat, qdel, qrls (schedulers.md 2, 7.1).

Ids are ``SEQ.SERVER`` / ``SEQ[].SERVER`` (subjobs ``SEQ[i].SERVER``), the
server name comes from $EMU_PBS_SERVER (default ``pbsserver``).  Exit codes
of the client commands are the PBS error number & 0xff.
"""

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time

import emucore as core

SCHED = "pbs"
VERSION = "23.06.06"
HISTORY_DEFAULT = 14 * 86400          #: job_history_duration (2 weeks)
MAX_ARRAY_SIZE = 10000
WALLTIME_SIGNALS = (signal.SIGTERM, signal.SIGKILL)
QDEL_SIGNALS = (signal.SIGTERM, signal.SIGKILL)

#: PBS error numbers (pbs_error.h); client exit status is the number & 0xff
PBSE = {
    "UNKJOBID": 15001, "SYSTEM": 15010, "BADATVAL": 15014, "BADSTATE": 15016,
    "UNKQUE": 15018, "BADCRED": 15019, "PROTOCOL": 15031, "UNKRESC": 15035,
    "MAXQUED": 15046, "HISTJOBID": 15139,
}
#: per-user limit rejection: the PBSE number is unconfirmed, we use MAXQUED
POLICY_EXIT = PBSE["MAXQUED"] & 0xff

#: fail_code knob -> (PBS error number, message)
FAULTS = {
    "162": (15010, "Connection refused"),
    "171": (15019, "Invalid credential"),
    "183": (15031, "Premature end of message"),
    "connect": (15010, "cannot connect to server {server} (errno=111)"),
}

#: Exit_status values for jobs PBS itself killed or could not run (job.h)
JOB_EXEC_FAIL1 = -1
JOB_EXEC_KILL_MEM = -27
JOB_EXEC_KILL_WALLTIME = -29

QSUB_OPTS = "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:q:r:R:S:u:v:VW:XzP:"
QSUB_USAGE = """usage: qsub [-a date_time] [-A account_string] [-c interval]
	[-C directive_prefix] [-e path] [-f ] [-h ] [-I [-X]] [-j oe|eo] [-J X-Y[:Z]]
	[-k keep] [-l resource_list] [-m mail_options] [-M user_list]
	[-N jobname] [-o path] [-p priority] [-P project] [-q queue] [-r y|n]
	[-R o|e|oe] [-S path] [-u user_list] [-W otherattributes=value...]
	[-v variable_list] [-V ] [-z] [script | -- command [arg1 ...]]
       qsub --version
"""
QSTAT_OPTS = "fF:xHtJEwu:"
QSTAT_USAGE = """usage:\x20
	qstat [-fp] [-J] [-t] [-x] [-E] [-F format] [-D delim] [ job_identifier... | destination... ]
	qstat [-a|-i|-r|-H|-T] [-J] [-t] [-u user] [-n] [-s] [-G|-M] [-1] [-w] [-x] [-E] \
[ job_identifier... | destination... ]
	qstat -Q [-f] [-F format] [-D delim] [ destination... ]
	qstat -q [-G|-M] [ destination... ]
	qstat -B [-f] [-F format] [-D delim] [ server_name... ]
	qstat --version
"""
QDEL_USAGE = "usage: qdel [-W force|suppress_email=X] [-x] job_identifier...\n       qdel --version\n"
QRLS_USAGE = "usage: qrls [-h hold_list] job_identifier...\n       qrls --version\n"

RES_INT = {"ncpus", "ngpus", "mpiprocs", "ompthreads", "nodect", "naccelerators"}
RES_SIZE = {"mem", "vmem", "pmem", "pvmem", "file"}
RES_TIME = {"walltime", "cput", "pcput", "soft_walltime", "min_walltime", "max_walltime"}
RES_STR = {"select", "place", "host", "vnode", "arch", "software", "nodes",
           "accelerator", "accelerator_model", "aoe", "preempt_targets"}
CHUNK_RES = {"ncpus", "mem", "vmem", "ngpus", "mpiprocs", "ompthreads", "host",
             "vnode", "arch", "accelerator", "accelerator_model", "naccelerators", "aoe"}
SIZE_RE = re.compile(r"^(\d+)(b|kb|mb|gb|tb|pb|w|kw|mw|gw|tw|pw)?$", re.I)
SIZE_KB = {"b": 1 / 1024, "kb": 1, "mb": 1024, "gb": 1024 ** 2, "tb": 1024 ** 3, "pb": 1024 ** 4}
DEP_TYPES = {"after", "afterok", "afternotok", "afterany"}
DEP_UNSUPPORTED = {"before", "beforeok", "beforenotok", "beforeany", "on"}
W_ATTRS = {"depend", "block", "group_list", "umask", "sandbox", "stagein", "stageout",
           "run_count", "release_nodes_on_stageout", "tolerate_node_failures",
           "create_resv_from_job", "pwd", "cred"}
#: substate numbers shown by qstat -f
SUBSTATE = {"Q": 10, "H": 20, "W": 30, "R": 42, "E": 51, "B": 42}
KNOBS = {}      #: knobs of the current command (set in main)


class Fail(Exception):
    """A client error: message for stderr and the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.message, self.code = message, code


def server():
    """Return the emulated server name."""
    return os.environ.get("EMU_PBS_SERVER") or "pbsserver"


def queues():
    """Return the queues that exist ('workq' plus $EMU_PBS_QUEUES)."""
    extra = os.environ.get("EMU_PBS_QUEUES", "")
    return ["workq"] + [q.strip() for q in extra.split(",") if q.strip()]


def pbse(name):
    """Return the client exit status for a PBS error name."""
    return PBSE[name] & 0xff


# ===========================================================================
# Option parsing
# ===========================================================================

def parse_opts(args, optstring, cmd, usage, permute=False):
    """getopt: return (opts, rest, dashdash).

    qsub stops at the first non-option (the script); qstat/qdel permute like
    glibc getopt, so ids and options may be mixed.
    """
    spec = {}
    for num, char in enumerate(optstring):
        if char != ":":
            spec[char] = optstring[num + 1:num + 2] == ":"
    opts, i, loose = [], 0, []
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return opts, loose + args[i + 1:], True
        if not arg.startswith("-") or arg == "-":
            if not permute:
                break
            loose.append(arg)
            i += 1
            continue
        j = 1
        while j < len(arg):
            char = arg[j]
            if char not in spec:
                raise Fail("%s: invalid option -- '%s'\n%s" % (cmd, char, usage), 2)
            if spec[char]:
                value = arg[j + 1:]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise Fail("%s: option requires an argument -- '%s'\n%s" % (cmd, char, usage), 2)
                    value = args[i]
                opts.append((char, value))
                break
            opts.append((char, ""))
            j += 1
        i += 1
    return opts, loose + args[i:], False


def directives(text, prefix):
    """Return the option words of the #PBS lines before the first command."""
    words = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(prefix):
            try:
                words += shlex.split(stripped[len(prefix):], comments=False)
            except ValueError:
                raise Fail("qsub: directive error: %s" % line, 2) from None
        elif stripped and not stripped.startswith("#"):
            break
    return words


def fold(pairs):
    """Merge option pairs: -l/-v/-W accumulate, everything else last wins."""
    merged = {"l": [], "v": [], "W": []}
    for key, value in pairs:
        if key in merged:
            merged[key].append(value)
        else:
            merged[key] = value
    return merged


def split_list(text):
    """Split a comma list, keeping quoted commas ('A=x,B="1,2"')."""
    items, cur, quote = [], "", None
    for char in text:
        if quote:
            if char == quote:
                quote = None
            else:
                cur += char
        elif char in "'\"":
            quote = char
        elif char == ",":
            items.append(cur)
            cur = ""
        else:
            cur += char
    items.append(cur)
    return [i for i in items if i != ""]


def size_kb(text):
    """Convert a PBS size ('8gb', '100mb', '5w') to kilobytes."""
    match = SIZE_RE.match(text)
    num, unit = int(match.group(1)), (match.group(2) or "b").lower()
    if unit.endswith("w"):          # words: 8 bytes
        return num * 8 * SIZE_KB[unit[:-1] + "b"]
    return num * SIZE_KB[unit]


def format_kb(kb):
    """Format kilobytes with the largest exact PBS unit."""
    kb = round(kb)
    for unit, scale in (("tb", 1024 ** 3), ("gb", 1024 ** 2), ("mb", 1024)):
        if kb and kb % scale == 0:
            return "%d%s" % (kb // scale, unit)
    return "%dkb" % kb


def check_value(key, value):
    """Validate one resource value; raise the PBS error when bad."""
    good = True
    if key in RES_INT:
        good = value.isdigit()
    elif key in RES_SIZE:
        good = bool(SIZE_RE.match(value))
    elif key in RES_TIME:
        good = core.parse_hms(value) is not None
    if not good:
        raise Fail("qsub: Illegal attribute or resource value Resource_List.%s" % key, pbse("BADATVAL"))


def parse_select(text):
    """Parse 'N:ncpus=4:mem=8gb+M:...' into [(count, {res: value})]."""
    chunks = []
    for chunk in text.split("+"):
        parts = chunk.split(":")
        count = 1
        if parts and parts[0].isdigit():
            count = int(parts.pop(0))
        res = {}
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq or not value:
                raise Fail("qsub: Illegal attribute or resource value Resource_List.select", pbse("BADATVAL"))
            if key not in CHUNK_RES:
                raise Fail("qsub: Unknown resource Resource_List.%s" % key, pbse("UNKRESC"))
            check_value(key, value)
            res[key] = value
        chunks.append((count, res))
    return chunks


def parse_resources(values):
    """Parse -l values into (Resource_List dict, chunks, walltime seconds)."""
    given = {}
    for value in values:
        for item in split_list(value):
            key, eq, val = item.partition("=")
            if not eq:
                raise Fail("qsub: illegal -l value", 2)
            if key not in RES_INT | RES_SIZE | RES_TIME | RES_STR:
                raise Fail("qsub: Unknown resource Resource_List.%s" % key, pbse("UNKRESC"))
            check_value(key, val)
            given[key] = val
    jobwide = [k for k in ("ncpus", "mem", "ngpus", "vmem", "mpiprocs", "ompthreads") if k in given]
    if "select" in given:
        if jobwide:
            raise Fail('qsub: "-lresource=" cannot be used with "select" or "place", resource is: %s'
                       % jobwide[0], 2)
        chunks = parse_select(given["select"])
    else:
        res = {k: given[k] for k in jobwide}
        res.setdefault("ncpus", "1")
        chunks = [(1, res)]
    rlist = {k: v for k, v in given.items() if k not in jobwide}
    rlist["ncpus"] = sum(n * int(r.get("ncpus", 1)) for n, r in chunks)
    rlist["nodect"] = sum(n for n, _ in chunks)
    for key in ("mem", "vmem"):
        if any(key in r for _, r in chunks):
            rlist[key] = format_kb(sum(n * size_kb(r[key]) for n, r in chunks if key in r))
    if any("ngpus" in r for _, r in chunks):
        rlist["ngpus"] = sum(n * int(r.get("ngpus", 0)) for n, r in chunks)
    rlist["select"] = given.get("select") or "+".join(
        ":".join(["%d" % n] + ["%s=%s" % kv for kv in r.items()]) for n, r in chunks)
    rlist.setdefault("place", "pack")
    walltime = None
    if "walltime" in given:
        walltime = core.parse_hms(given["walltime"])
        rlist["walltime"] = core.hms(walltime)
    return dict(sorted(rlist.items())), chunks, walltime


def parse_depend(value):
    """Parse 'afterok:1.srv:2.srv,afterany:3.srv' into [[type, [ids]]]."""
    deps = []
    for piece in value.split(","):
        parts = piece.split(":")
        dtype, ids = parts[0], parts[1:]
        if dtype in DEP_UNSUPPORTED:
            raise Fail("qsub: emulator: dependency type %s is not emulated" % dtype, 2)
        if dtype not in DEP_TYPES or not ids or not all(ids):
            raise Fail("qsub: illegal -W value", 2)
        deps.append([dtype, [full_id(i) for i in ids]])
    return deps


def parse_w(values):
    """Parse -W values ('depend=...', 'block=true') into a dict."""
    attrs = {}
    for value in values:
        pieces = []
        for piece in value.split(","):
            if "=" not in piece and pieces:
                pieces[-1] += "," + piece     # depend=afterok:1,afterany:2
            else:
                pieces.append(piece)
        for piece in pieces:
            key, eq, val = piece.partition("=")
            if not eq or key not in W_ATTRS:
                raise Fail("qsub: illegal -W value", 2)
            attrs[key] = val
    return attrs


def parse_a(text, now):
    """Parse -a [[[[CC]YY]MM]DD]hhmm[.SS] into an epoch time."""
    match = re.match(r"^(\d{4}|\d{6}|\d{8}|\d{10}|\d{12})(?:\.(\d\d))?$", text)
    if not match:
        raise Fail("qsub: illegal -a value", 2)
    digits, sec = match.group(1), int(match.group(2) or 0)
    lt = list(time.localtime(now))
    fields = [int(digits[i:i + 2]) for i in range(0, len(digits), 2)]
    names = ["min", "hour", "mday", "mon", "year", "cent"]
    vals = dict(zip(names, reversed(fields)))
    year = lt[0]
    if "year" in vals:
        year = vals.get("cent", year // 100) * 100 + vals["year"]
    tm = (year, vals.get("mon", lt[1]), vals.get("mday", lt[2]), vals["hour"], vals["min"], sec, 0, 0, -1)
    try:
        when = time.mktime(tm)
    except (OverflowError, ValueError):
        raise Fail("qsub: illegal -a value", 2) from None
    if len(fields) == 2 and when < now:
        when += 86400
    return when


def parse_j(text):
    """Validate -J X-Y[:Z][%N]; return (spec, indices, throttle)."""
    match = re.match(r"^(\d+)-(\d+)(?::(\d+))?(?:%(\d+))?$", text)
    if not match:
        raise Fail("qsub: illegal -J value", 2)
    first, last, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
    if last < first or step < 1 or (match.group(4) is not None and int(match.group(4)) < 1):
        raise Fail("qsub: illegal -J value", 2)
    spec = text.split("%")[0]
    return spec, list(range(first, last + 1, step)), int(match.group(4)) if match.group(4) else None


def parse_v(values, env):
    """Parse -v lists into a dict (VAR alone copies the submit value)."""
    out = {}
    for value in values:
        for item in split_list(value):
            key, eq, val = item.partition("=")
            if eq:
                out[key] = val
            elif key in env:
                out[key] = env[key]
    return out


def resolve_path(value, base):
    """Turn '[host:]path' into an absolute path relative to base."""
    match = re.match(r"^([^/:]+):(.*)$", value)
    path = match.group(2) if match else value
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


# ===========================================================================
# Ids and lookup
# ===========================================================================

ID_RE = re.compile(r"^(\d+)(?:\[(\d*|\d+-\d+)\])?(?:\.(.+))?$")


def full_id(text):
    """Normalise a job id to SEQ[..].SERVER form for messages and deps."""
    match = ID_RE.match(text)
    if not match or match.group(3):
        return text
    bracket = "[%s]" % match.group(2) if match.group(2) is not None else ""
    return "%s%s.%s" % (match.group(1), bracket, server())


def lookup(store, text):
    """Resolve an id to ('job'|'array'|'element', records) or None."""
    match = ID_RE.match(text)
    if not match:
        return None
    seq, bracket, srv = match.group(1), match.group(2), match.group(3)
    if srv and srv != server() and not srv.startswith(server() + "."):
        return None
    head = store.load("pbs-" + seq)
    if head is None:
        return None
    if bracket is None:
        return ("job", [head]) if head["kind"] == "job" else None
    if head["kind"] != "array":
        return None
    if bracket == "":
        return "array", [head]
    if "-" in bracket:
        lo, hi = (int(x) for x in bracket.split("-"))
        elems = [store.load("pbs-%s-%d" % (seq, i)) for i in range(lo, hi + 1)]
        elems = [e for e in elems if e is not None]
        return ("range", elems) if elems else None
    elem = store.load("pbs-%s-%s" % (seq, int(bracket)))
    return ("element", [elem]) if elem else None


def elements(store, head):
    """Return the element records of an array head."""
    recs = (store.load("pbs-%d-%d" % (head["seq"], i)) for i in head["array"]["indices"])
    return [r for r in recs if r is not None]


def finished(store, rec):
    """Tell whether a job / array (all elements) / element is done."""
    if rec["kind"] == "array":
        return all(e["phase"] == "done" for e in elements(store, rec))
    return rec["phase"] == "done"


def end_time(store, rec):
    """Return the time a finished job or array ended."""
    if rec["kind"] == "array":
        return max((e.get("t_end") or 0) for e in elements(store, rec))
    return rec.get("t_end")


def visible(store, rec, now):
    """Tell whether a record is still known (history not expired)."""
    if not finished(store, rec):
        return True
    keep = store.history(HISTORY_DEFAULT)
    return keep < 0 or now - (end_time(store, rec) or now) < keep


# ===========================================================================
# Dependencies and gate (called by the runner)
# ===========================================================================

def summary(store, text, now):
    """Summarise a dependency target: dict(done, ran, ok, started) or None."""
    found = lookup(store, text)
    if not found or found[0] == "range" or not visible(store, found[1][0], now):
        return None
    kind, recs = found
    units = elements(store, recs[0]) if kind == "array" else recs
    oks = [u["phase"] == "done" and u.get("ran") and exit_status(u) == 0 for u in units]
    return {
        "done": all(u["phase"] == "done" for u in units),
        "ran": any(u.get("ran") for u in units),
        "ok": all(oks),
        "notok": any(u.get("ran") and u["phase"] == "done" and not ok for u, ok in zip(units, oks)),
        "started": any(u.get("ran") for u in units),
    }


def dep_one(dtype, info):
    """Evaluate one dependency on a target summary: ok / wait / never."""
    if info is None:
        return "never"
    if dtype == "after":
        return "ok" if info["started"] else ("never" if info["done"] else "wait")
    if not info["done"]:
        return "wait"
    if dtype == "afterok":
        return "ok" if info["ok"] and info["ran"] else "never"
    if dtype == "afternotok":
        return "ok" if info["notok"] else "never"
    return "ok" if info["ran"] else "never"     # afterany


def eval_deps(store, head, now):
    """Return ('ok'|'wait'|'never', blocking target id)."""
    result = "ok", None
    for dtype, ids in head.get("deps") or []:
        for target in ids:
            state = dep_one(dtype, summary(store, target, now))
            if state == "never":
                return "never", target
            if state == "wait":
                result = "wait", target
    return result


def set_gate(store, head, value):
    """Persist the display gate of a head record when it changed."""
    if head.get("gate") != value:
        store.update(head["key"], lambda r: r.update(gate=value))
        head["gate"] = value


def delete_for_dependency(store, head, target, now):
    """Delete a job whose dependency can never be satisfied (server does)."""
    keys = [head["key"]] if head["kind"] == "job" else [
        "pbs-%d-%d" % (head["seq"], i) for i in head["array"]["indices"]]
    with store.lock():
        for key in keys:
            store.update(key, lambda r: r["phase"] == "pending" and core.cancel_pending(r, now, "dependency"))
        store.update(head["key"], lambda r: r.update(
            gate="deleted", comment="Job deleted as result of dependency on job %s" % target))


def gate(store, head, now):
    """Tell whether units of this head may start now (runner hook)."""
    if head.get("gate") == "deleted":
        return False
    if head.get("hold"):
        set_gate(store, head, "held")
        return False
    state, target = eval_deps(store, head, now)
    if state == "never":
        delete_for_dependency(store, head, target, now)
        return False
    if state == "wait":
        set_gate(store, head, "dep")
        return False
    if head.get("begin") and head["begin"] > now:
        set_gate(store, head, "begin")
        return False
    set_gate(store, head, "ready")
    return True


def stage_out(store, rec, head):
    """Copy the spooled output files to their destinations (runner hook)."""
    if not rec.get("ran"):
        return
    spool_o, spool_e = rec["stdout"], rec["stderr"]
    note = None
    if rec.get("reason") == "timeout":
        limit = int(rec.get("walltime") or 0)
        note = "=>> PBS: job killed: walltime %d exceeded limit %d\n" % (limit + 1, limit)
    elif rec.get("reason") == "oom":
        mem = head["resources"].get("mem", "0kb")
        note = "=>> PBS: job killed: mem %dkb exceeded limit %s\n" % (int(size_kb(mem) * 1.5) + 1024, mem)
    if note:
        with open(spool_e, "a") as fh:
            fh.write(note)
    join = head.get("join") or "n"
    index = str(rec.get("index", ""))
    plan = []
    if join == "oe":
        plan.append((spool_o, head["out_path"], "OU"))
    elif join == "eo":
        plan.append((spool_e, head["err_path"], "ER"))
    else:
        plan += [(spool_o, head["out_path"], "OU"), (spool_e, head["err_path"], "ER")]
    for spool, dest, suffix in plan:
        dest = dest.replace("^array_index^", index)
        if os.path.isdir(dest):
            dest = os.path.join(dest, "%s.%s" % (rec["id"], suffix))
        try:
            with open(spool, "rb") as src, open(dest, "wb") as dst:
                dst.write(src.read())
        except OSError:
            undelivered = store.sub("mail", os.path.basename(dest))
            with open(spool, "rb") as src, open(undelivered, "wb") as dst:
                dst.write(src.read())
    for spool in {spool_o, spool_e}:
        with contextlib.suppress(OSError):
            os.unlink(spool)


# ===========================================================================
# qsub
# ===========================================================================

def read_script(rest, dashdash):
    """Return (script text or None, default job name)."""
    if dashdash:
        if not rest:
            raise Fail(QSUB_USAGE, 2)
        return None, os.path.basename(rest[0])
    if len(rest) > 1:
        raise Fail(QSUB_USAGE, 2)
    if rest:
        try:
            with open(rest[0], encoding="utf-8", errors="surrogateescape") as fh:
                return fh.read(), os.path.basename(rest[0])
        except OSError as exc:
            raise Fail("qsub: script file:: %s" % exc.strerror, 2) from None
    data = sys.stdin.buffer.read() if sys.stdin else b""
    return data.decode("utf-8", "surrogateescape"), "STDIN"


def check_simple(opts):
    """Validate the single-valued qsub options."""
    checks = [
        ("j", r"^(oe|eo|n)$"), ("r", r"^[yn]$"), ("m", r"^([abej]+|n)$"),
        ("k", r"^([oed]+|n)$"), ("p", r"^-?\d+$"), ("R", r"^(o|e|oe|eo)$"),
    ]
    for key, pattern in checks:
        if key in opts and not re.match(pattern, opts[key]):
            raise Fail("qsub: illegal -%s value" % key, 2)
    if "p" in opts and not -1024 <= int(opts["p"]) <= 1023:
        raise Fail("qsub: illegal -p value", 2)
    name = opts.get("N")
    if name is not None and (not name or len(name) > 236 or re.search(r"[\s/:@]", name)):
        raise Fail("qsub: illegal -N value", 2)
    if "I" in opts or "X" in opts:
        raise Fail("qsub: emulator: interactive jobs (-I/-X) are not emulated", 2)


def qsub(store, args):
    """qsub [opts] [script | -- exe args]; print the job id."""
    if args == ["--version"]:
        core.out("pbs_version = %s\n" % VERSION)
        return 0
    cmd_opts, rest, dashdash = parse_opts(args, QSUB_OPTS, "qsub", QSUB_USAGE)
    text, default_name = read_script(rest, dashdash)
    prefix = dict(cmd_opts).get("C") or os.environ.get("PBS_DPREFIX") or "#PBS"
    pairs = []
    if text is not None:
        try:
            pairs, _, _ = parse_opts(directives(text, prefix), QSUB_OPTS, "qsub", QSUB_USAGE)
        except Fail as exc:
            raise Fail("qsub: directive error: %s" % exc.message.splitlines()[0], 2) from None
    opts = fold(pairs + cmd_opts)
    check_simple(opts)
    now = time.time()
    env = core.clean_env()
    queue = (opts.get("q") or "workq").split("@")[0] or "workq"
    if queue not in queues():
        raise Fail("qsub: Unknown queue", pbse("UNKQUE"))
    resources, chunks, walltime = parse_resources(opts["l"])
    wattrs = parse_w(opts["W"])
    deps = parse_depend(wattrs["depend"]) if "depend" in wattrs else []
    array = parse_j(opts["J"]) if "J" in opts else None
    limit = store.knobs()["max_array_size"] or MAX_ARRAY_SIZE
    if array and len(array[1]) > limit:
        raise Fail("qsub: Array job exceeds server or queue size limit", pbse("BADATVAL"))
    begin = parse_a(opts["a"], now) if "a" in opts else None
    units = len(array[1]) if array else 1
    active = sum(1 for r in store.all() if r["kind"] != "array" and r["phase"] != "done")
    if core.policy_blocked(store.knobs(), active, units):
        raise Fail("qsub: would exceed queue %s's per-user limit" % queue, POLICY_EXIT)
    seq = store.next_id()
    head = build_head(store, seq, opts, args, text, rest, dashdash, default_name, env, queue,
                      resources, chunks, walltime, deps, array, begin, now)
    units = make_units(store, head, chunks)
    head["gate"] = "new"
    with store.lock():
        for unit in units:
            if unit is not head:
                store.save(unit)
        store.save(head)
    gate(store, head, now)
    core.spawn_runner(store, [u["key"] for u in units])
    if "z" not in opts:
        core.out(head["id"] + "\n")
    if wattrs.get("block", "").lower() == "true":
        return block(store, head)
    return 0


def build_head(store, seq, opts, args, text, rest, dashdash, default_name, env, queue,
               resources, chunks, walltime, deps, array, begin, now):
    """Build the head record (plain job or array parent)."""
    srv, user = server(), core.user_name()
    home = env.get("HOME") or os.path.expanduser("~")
    submit_dir = os.getcwd()
    name = opts.get("N") or default_name
    jid = "%d%s.%s" % (seq, "[]" if array else "", srv)
    o_vars = {"PBS_O_HOME": home, "PBS_O_LANG": env.get("LANG"),
              "PBS_O_LOGNAME": env.get("LOGNAME") or user, "PBS_O_PATH": env.get("PATH"),
              "PBS_O_MAIL": env.get("MAIL"), "PBS_O_SHELL": env.get("SHELL") or core.user_shell(),
              "PBS_O_WORKDIR": submit_dir, "PBS_O_SYSTEM": os.uname().sysname,
              "PBS_O_QUEUE": queue, "PBS_O_HOST": core.FQDN}
    varlist = {k: v for k, v in o_vars.items() if v is not None}
    extra = dict(env) if "V" in opts else {}
    extra.update(parse_v(opts["v"], env))
    varlist.update({k: v for k, v in extra.items() if not k.startswith("PBS_O_")})
    first = chunks[0][1]
    ncpus_first = first.get("ncpus", "1")
    jobenv = {"HOME": home, "LOGNAME": user, "USER": user, "SHELL": core.user_shell(),
              "PATH": env.get("PATH") or "/usr/bin:/bin"}
    jobenv.update(varlist)
    jobenv.update({"PBS_JOBNAME": name, "PBS_QUEUE": queue, "PBS_ENVIRONMENT": "PBS_BATCH",
                   "ENVIRONMENT": "BATCH", "PBS_JOBDIR": home, "PBS_TASKNUM": "1",
                   "PBS_NODENUM": "0", "PBS_MOMPORT": "15003", "NCPUS": ncpus_first,
                   "OMP_NUM_THREADS": first.get("ompthreads", ncpus_first)})
    key = "pbs-%d" % seq
    if dashdash:
        argv = list(rest)
    else:
        script = store.sub("scripts", key + ".sh")
        with open(script, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
        os.chmod(script, 0o700)
        if opts.get("S"):
            argv = [opts["S"].split("@")[0], script]
        elif text.startswith("#!"):
            argv = [script]
        else:
            argv = [core.user_shell(), script]
    suffix = ".^array_index^" if array else ""
    out_path = resolve_path(opts["o"], submit_dir) if opts.get("o") else \
        os.path.join(submit_dir, "%s.o%d%s" % (name, seq, suffix))
    err_path = resolve_path(opts["e"], submit_dir) if opts.get("e") else \
        os.path.join(submit_dir, "%s.e%d%s" % (name, seq, suffix))
    head = {
        "key": key, "kind": "array" if array else "job", "seq": seq, "id": jid, "name": name,
        "owner": "%s@%s" % (user, core.FQDN), "queue": queue, "server": srv,
        "phase": "array" if array else "pending", "hold": "h" in opts, "deps": deps,
        "begin": begin, "t_submit": now, "t_mod": now, "account": opts.get("A"),
        "project": opts.get("P"), "resources": resources, "walltime": walltime,
        "submit_args": " ".join(shlex.quote(a) for a in args), "variable_list": varlist,
        "join": opts.get("j", "n"), "keep": opts.get("k", "n"), "out_path": out_path,
        "err_path": err_path, "rerun": opts.get("r", "y") == "y",
        "mail_points": opts.get("m", "a"), "mail_users": opts.get("M"),
        "priority": int(opts.get("p", 0)), "env": jobenv, "argv": argv, "cwd": home,
        "ncpus": resources["ncpus"], "mpiprocs": sum(n * int(r.get("mpiprocs", 1)) for n, r in chunks),
    }
    if array:
        head["array"] = {"spec": array[0], "indices": array[1]}
        head["throttle"] = array[2]
    return head


def make_units(store, head, chunks):
    """Create the runnable records: the job itself or one per subjob."""
    if head["kind"] == "job":
        fill_unit(store, head, head, None)
        return [head]
    units = []
    for index in head["array"]["indices"]:
        unit = {"key": "pbs-%d-%d" % (head["seq"], index), "kind": "element", "head": head["key"],
                "index": index, "id": "%d[%d].%s" % (head["seq"], index, head["server"]),
                "phase": "pending", "name": head["name"], "walltime": head["walltime"]}
        fill_unit(store, unit, head, index)
        units.append(unit)
    return units


def fill_unit(store, unit, head, index):
    """Set the spool files and per-unit environment of a runnable record."""
    base = store.sub("spool", unit["key"])
    unit["stdout"] = base + ".OU"
    unit["stderr"] = base + ".ER"
    if head["join"] == "oe":
        unit["stderr"] = unit["stdout"]
    elif head["join"] == "eo":
        unit["stdout"] = unit["stderr"]
    unit["tmpdir"] = store.sub("tmp", "pbs." + unit["id"])
    unit["nodefile"] = store.sub("aux", unit["id"])
    unit["nodefile_lines"] = [core.HOST] * head["mpiprocs"]
    extra = {"PBS_JOBID": unit["id"], "TMPDIR": unit["tmpdir"], "PBS_NODEFILE": unit["nodefile"],
             "PBS_JOBCOOKIE": "%032X" % (hash(unit["id"]) & (2 ** 128 - 1))}
    if index is not None:
        extra.update({"PBS_ARRAY_INDEX": str(index), "PBS_ARRAY_ID": head["id"]})
    unit["env_extra"] = extra


def block(store, head):
    """Wait for the job (qsub -W block=true) and return its exit status."""
    while True:
        rec = store.load(head["key"])
        if rec is None:
            return 1
        if finished(store, rec):
            status = exit_status(rec) if rec["kind"] == "job" else array_exit(store, rec)
            return 1 if status is None else status & 0xff
        time.sleep(core.POLL * 2)


# ===========================================================================
# Status
# ===========================================================================

def exit_status(rec):
    """Return Exit_status of a job/subjob record, None when it has none."""
    if not rec.get("ran") or rec["phase"] not in ("exiting", "done"):
        return None
    reason = rec.get("reason")
    if reason == "timeout":
        if KNOBS.get("pbs_walltime_status") == "signal":
            return 256 + (rec.get("exit_signal") or signal.SIGTERM)
        return JOB_EXEC_KILL_WALLTIME
    if reason == "oom":
        return JOB_EXEC_KILL_MEM
    if reason == "execfail":
        return JOB_EXEC_FAIL1
    if rec.get("exit_signal"):
        return 256 + rec["exit_signal"]
    return rec.get("exit_code")


def array_exit(store, head):
    """Exit_status of a finished array: 0 all ok, 1 some failed, 2 PBS error."""
    statuses = [exit_status(e) for e in elements(store, head) if e.get("ran")]
    if not statuses or any(s is None for s in statuses):
        return None
    if any(s < 0 for s in statuses):
        return 2
    return 1 if any(statuses) else 0


def state_of(store, rec, head):
    """Return the PBS state letter of a job, array parent or subjob."""
    if rec["kind"] == "array":
        elems = elements(store, rec)
        if all(e["phase"] == "done" for e in elems):
            return "F"
        if any(e.get("ran") for e in elems):
            return "B"
        return pending_state(rec)
    phase = rec["phase"]
    if phase == "running":
        return "R"
    if phase == "exiting":
        return "E"
    if phase == "done":
        return "X" if rec["kind"] == "element" else "F"
    return pending_state(head)


def pending_state(head):
    """State letter of a pending job: H (user or dependency hold), W or Q."""
    if head.get("hold") or head.get("gate") == "dep":
        return "H"
    if head.get("gate") == "begin":
        return "W"
    return "Q"


def attrs(store, rec, head, now):
    """Build the qstat -f attribute dict of one record (PBS key order)."""
    ctime = time.ctime
    state = state_of(store, rec, head)
    elems = elements(store, rec) if rec["kind"] == "array" else []
    ran = rec.get("ran") or any(e.get("ran") for e in elems)
    a = {"Job_Name": head["name"], "Job_Owner": head["owner"]}
    if rec.get("ran") and rec["kind"] != "array":
        end = rec.get("t_exit") or now
        a["resources_used"] = {
            "cpupercent": 0, "cput": core.hms(rec.get("cput") or 0),
            "mem": "%dkb" % (rec.get("maxrss_kb") or 0), "ncpus": head["ncpus"],
            "vmem": "%dkb" % (rec.get("maxrss_kb") or 0),
            "walltime": core.hms(end - rec["t_start"])}
    a["job_state"] = state
    a["queue"] = head["queue"]
    a["server"] = head["server"]
    if head.get("account"):
        a["Account_Name"] = head["account"]
    a["Checkpoint"] = "u"
    a["ctime"] = ctime(head["t_submit"])
    a["Error_Path"] = "%s:%s" % (core.FQDN, head["err_path"])
    if rec.get("ran") and rec["kind"] != "array":
        a["exec_host"] = "%s/0*%d" % (rec.get("host", core.HOST), head["ncpus"])
        a["exec_vnode"] = "(%s:ncpus=%d)" % (rec.get("host", core.HOST), head["ncpus"])
    a["Hold_Types"] = "u" if head.get("hold") else ("s" if head.get("gate") == "dep" else "n")
    a["Join_Path"] = head["join"]
    a["Keep_Files"] = head["keep"]
    a["Mail_Points"] = head["mail_points"]
    if head.get("mail_users"):
        a["Mail_Users"] = head["mail_users"]
    a["mtime"] = ctime(max(rec.get("t_end") or 0, rec.get("t_exit") or 0,
                           rec.get("t_start") or 0, head["t_submit"]))
    a["Output_Path"] = "%s:%s" % (core.FQDN, head["out_path"])
    a["Priority"] = head["priority"]
    a["qtime"] = ctime(head["t_submit"])
    a["Rerunable"] = "True" if head["rerun"] else "False"
    a["Resource_List"] = dict(head["resources"])
    if head.get("begin"):
        a["Execution_Time"] = ctime(head["begin"])
    if rec.get("ran") and rec["kind"] != "array":
        a["stime"] = ctime(rec["t_start"])
        if rec.get("pids"):
            a["session_id"] = rec["pids"][0]
        a["jobdir"] = head["cwd"]
    if rec.get("t_exit") and rec.get("ran"):
        a["obittime"] = ctime(rec["t_exit"])
    a["substate"] = SUBSTATE.get(state, 92 if ran else 91)
    a["Variable_List"] = dict(head["variable_list"])
    comment = comment_of(rec, head, state, elems)
    if comment:
        a["comment"] = comment
    a["etime"] = ctime(head["t_submit"])
    a["run_count"] = 1 if ran else 0
    status = array_exit(store, rec) if rec["kind"] == "array" and state == "F" else \
        (exit_status(rec) if rec["kind"] != "array" else None)
    if status is not None:
        a["Exit_status"] = status
    a["Submit_arguments"] = head["submit_args"]
    if state in ("F", "X"):
        a["history_timestamp"] = int(end_time(store, rec) or now)
    a["project"] = head.get("project") or "_pbs_project_default"
    a["Submit_Host"] = core.FQDN
    if rec["kind"] == "array":
        counts = {"Queued": 0, "Running": 0, "Exiting": 0, "Expired": 0}
        names = {"pending": "Queued", "running": "Running", "exiting": "Exiting", "done": "Expired"}
        for e in elems:
            counts[names[e["phase"]]] += 1
        remaining = [e["index"] for e in elems if e["phase"] == "pending"]
        a["array"] = "True"
        a["array_indices_submitted"] = head["array"]["spec"]
        a["array_indices_remaining"] = core.ranges(remaining) or "-"
        a["array_state_count"] = "".join("%s:%d " % kv for kv in counts.items())
        if head.get("throttle"):
            a["max_run_subjobs"] = head["throttle"]
    elif rec["kind"] == "element":
        a["array_id"] = head["id"]
        a["array_index"] = rec["index"]
    return a


def comment_of(rec, head, state, elems):
    """Return the qstat comment attribute for a record."""
    if head.get("comment") and not rec.get("ran"):
        return head["comment"]
    if rec["kind"] == "array":
        started = [e["t_start"] for e in elems if e.get("t_start")]
        if not started:
            return None
        when = time.strftime("%a %b %d at %H:%M", time.localtime(min(started)))
        return "Job Array Began at %s%s" % (when, " and finished" if state == "F" else "")
    if not rec.get("ran"):
        return None
    when = time.strftime("%a %b %d at %H:%M", time.localtime(rec["t_start"]))
    text = "Job run at %s on (%s:ncpus=%d)" % (when, rec.get("host", core.HOST), head["ncpus"])
    return text + (" and finished" if state in ("F", "X") else "")


def flatten(a):
    """Flatten nested attribute dicts into ('key.sub', value) pairs."""
    for key, value in a.items():
        if key == "Variable_List":
            yield key, ",".join("%s=%s" % kv for kv in value.items())
        elif isinstance(value, dict):
            for sub, val in value.items():
                yield "%s.%s" % (key, sub), val
        else:
            yield key, value


def format_full(jid, a):
    """Render one job as 'qstat -f' text (long values wrapped with a tab)."""
    lines = ["Job Id: %s" % jid]
    for key, value in flatten(a):
        line = "    %s = %s" % (key, value)
        first, rest = line[:79], line[79:]
        lines.append(first)
        while rest:
            lines.append("\t" + rest[:71])
            rest = rest[71:]
    return "\n".join(lines) + "\n\n"


def format_dsv(jid, a):
    """Render one job as 'qstat -f -F dsv' text."""
    return "|".join(["Job Id: %s" % jid] + ["%s=%s" % kv for kv in flatten(a)]) + "\n"


def format_table(rows, wide):
    """Render the default two-header-line qstat table."""
    if wide:
        head = "Job id                         Name            User            Time Use S Queue\n" \
               "------------------------------ --------------- --------------- -------- - ---------------\n"
        fmt, widths = "%-30s %-15s %-15s %8s %s %s\n", None
    else:
        head = "Job id            Name             User              Time Use S Queue\n" \
               "----------------  ---------------- ----------------  -------- - -----\n"
        fmt, widths = "%-17s %-16s %-17s %8s %s %s\n", (17, 16, 17, 8, 1, 8)
    text = head
    for row in rows:
        if widths:
            row = [v if len(v) <= w else v[:w - 1] + "*" for v, w in zip(row, widths)]
        text += fmt % tuple(row)
    return text


def table_row(rec, head, a):
    """Return the columns of one job for the qstat table."""
    used = a.get("resources_used", {}).get("cput", "0")
    return [rec["id"], head["name"], head["owner"].split("@")[0], used, a["job_state"], head["queue"]]


def qstat_select(store, ids, opts, now):
    """Return ([(rec, head)], [error lines], exit code) for qstat."""
    shown, errors, code = [], [], 0
    if not ids:
        for rec in sorted(store.all(), key=lambda r: r.get("seq", 0)):
            if rec["kind"] == "element" or not visible(store, rec, now):
                continue
            done = finished(store, rec)
            if (done and "x" not in opts and "H" not in opts) or ("H" in opts and not done):
                continue
            if "J" in opts and rec["kind"] != "array":
                continue
            shown += expand(store, rec, opts)
        return shown, errors, code
    for text in ids:
        found = lookup(store, text)
        if found and found[0] == "range":
            found = None
        if not found or not visible(store, found[1][0] if found[0] != "element"
                                    else store.load(found[1][0]["head"]), now):
            errors.append("qstat: Unknown Job Id %s\n" % full_id(text))
            code = pbse("UNKJOBID")
            continue
        rec = found[1][0]
        head = store.load(rec["head"]) if rec["kind"] == "element" else rec
        if finished(store, head) and "x" not in opts and "H" not in opts:
            errors.append("qstat: %s Job has finished, use -x or -H to obtain historical job information\n"
                          % rec["id"])
            code = pbse("HISTJOBID")
            continue
        shown += expand(store, rec, opts) if rec["kind"] != "element" else [(rec, head)]
    return shown, errors, code


def expand(store, rec, opts):
    """Return [(rec, head)] for a job, plus subjobs with -t for arrays."""
    rows = [(rec, rec)]
    if rec["kind"] == "array" and "t" in opts:
        rows += [(e, rec) for e in elements(store, rec)]
    return rows


def qstat(store, args):
    """qstat [-f [-F json|dsv]] [-x] [-t] [-E] [-w] [ID...]."""
    if args == ["--version"]:
        core.out("pbs_version = %s\n" % VERSION)
        return 0
    pairs, ids, _ = parse_opts(args, QSTAT_OPTS, "qstat", QSTAT_USAGE, permute=True)
    opts = dict(pairs)
    if ("F" in opts and ("f" not in opts or opts["F"] not in ("json", "dsv"))) or \
            any(i.startswith("-") for i in ids):
        raise Fail(QSTAT_USAGE, 2)
    now = time.time()
    shown, errors, code = qstat_select(store, ids, opts, now)
    full = [(rec, head, attrs(store, rec, head, now)) for rec, head in shown]
    for line in errors:
        core.err(line)
    if opts.get("F") == "json":
        doc = {"timestamp": int(now), "pbs_version": VERSION, "pbs_server": server()}
        if full:
            doc["Jobs"] = {rec["id"]: a for rec, head, a in full}
        core.out(json.dumps(doc, indent=4, separators=(",", ":"), ensure_ascii=False) + "\n")
    elif "F" in opts:
        core.out("".join(format_dsv(rec["id"], a) for rec, head, a in full))
    elif "f" in opts:
        core.out("".join(format_full(rec["id"], a) for rec, head, a in full))
    elif full:
        core.out(format_table([table_row(r, h, a) for r, h, a in full], "w" in opts))
    return code


# ===========================================================================
# qdel / qrls
# ===========================================================================

def qdel(store, args):
    """qdel [-W force] [-x] ID...: delete jobs, subjobs, ranges or arrays."""
    if args == ["--version"]:
        core.out("pbs_version = %s\n" % VERSION)
        return 0
    pairs, ids, _ = parse_opts(args, "W:x", "qdel", QDEL_USAGE, permute=True)
    opts = dict(pairs)
    if not ids or ("W" in opts and not re.match(r"^(force|suppress_email=\d+)$", opts["W"])):
        raise Fail(QDEL_USAGE, 2)
    sigs = (signal.SIGKILL,) if opts.get("W") == "force" else QDEL_SIGNALS
    code, now = 0, time.time()
    for text in ids:
        result = delete_one(store, text, sigs, "x" in opts, now)
        if result:
            core.err(result[0])
            code = result[1]
    return code


def delete_one(store, text, sigs, purge, now):
    """Delete one id; return (error line, code) or None."""
    with store.lock():
        found = lookup(store, text)
        head = None
        if found:
            head = found[1][0] if found[0] in ("job", "array") else store.load(found[1][0]["head"])
        if not found or not visible(store, head, now):
            return "qdel: Unknown Job Id %s\n" % full_id(text), pbse("UNKJOBID")
        kind, recs = found
        units = elements(store, recs[0]) if kind == "array" else recs
        if all(u["phase"] == "done" for u in units):
            if purge:
                for rec in units + ([recs[0]] if kind == "array" else []):
                    store.delete(rec["key"])
                return None
            return "qdel: Job has finished %s\n" % (recs[0]["id"] if kind != "range" else full_id(text)), \
                pbse("HISTJOBID")
        if kind in ("job", "element") and units[0]["phase"] == "exiting":
            return "qdel: Request invalid for state of job %s\n" % units[0]["id"], pbse("BADSTATE")
        for unit in units:
            if unit["phase"] == "pending":
                store.update(unit["key"], lambda r: core.cancel_pending(r, now))
            elif unit["phase"] == "running":
                store.update(unit["key"], lambda r: core.request_kill(r, sigs, "cancel"))
    return None


def qrls(store, args):
    """qrls [-h u] ID...: release a user hold."""
    _, ids, _ = parse_opts(args, "h:", "qrls", QRLS_USAGE, permute=True)
    if not ids:
        raise Fail(QRLS_USAGE, 2)
    code, now = 0, time.time()
    for text in ids:
        found = lookup(store, text)
        if not found or found[0] not in ("job", "array") or not visible(store, found[1][0], now):
            core.err("qrls: Unknown Job Id %s\n" % full_id(text))
            code = pbse("UNKJOBID")
            continue
        store.update(found[1][0]["key"], lambda r: r.update(hold=False))
    return code


# ===========================================================================
# Entry point
# ===========================================================================

COMMANDS = {"qsub": qsub, "qstat": qstat, "qdel": qdel, "qrls": qrls}


def main(cmd, argv):
    """Run one PBS client command; return its exit status."""
    argv = [core.fix_arg(a) for a in argv]
    store = core.Store(SCHED)
    KNOBS.update(store.knobs())
    if core.enter(store, cmd):
        mode = str(store.knobs()["fail_code"] or "162")
        number, message = FAULTS.get(mode, FAULTS["162"])
        core.err("%s: %s\n" % (cmd, message.format(server=server())))
        return number & 0xff
    try:
        return COMMANDS[cmd](store, argv)
    except Fail as exc:
        core.err(exc.message if exc.message.endswith("\n") else exc.message + "\n")
        return exc.code
