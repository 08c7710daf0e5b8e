"""IBM Spectrum LSF emulator: bsub, bjobs, bkill, bresume, bhist (schedulers.md 3, 7.2).

Job ids are plain integers, array elements ``N[i]`` (indices >= 1).  Finished
jobs stay visible in bjobs for CLEAN_PERIOD (knob ``history``, default 3600 s),
bhist knows them forever.
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

SCHED = "lsf"
VERSION = "IBM Spectrum LSF 10.1.0.13, Feb 14 2023"
HISTORY_DEFAULT = 3600          #: CLEAN_PERIOD in lsb.params
MAX_ARRAY_SIZE = 1000           #: MAX_JOB_ARRAY_SIZE
WALLTIME_SIGNALS = (signal.SIGUSR2, signal.SIGKILL)   # exit 140 = 128 + SIGUSR2
BKILL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
TERMINAL = {signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGHUP}

#: fail_code knob -> stderr text (exit status is always 255)
FAULTS = {
    "down": "LSF is down. Please wait ...\n",
    "daemon": "batch system daemon not responding ... still trying\n",
    "lim": "Failed in an LSF library call: Slave LIM configuration is not ready yet\n",
    "busy": "The batch system is busy. Please wait ...\n",
    "empty": "",
    "empty0": "",
}

BSUB_VALUED = {"-J", "-o", "-oo", "-e", "-eo", "-cwd", "-n", "-R", "-M", "-W", "-We", "-gpu",
               "-q", "-P", "-G", "-env", "-w", "-u", "-b", "-app", "-sla", "-m", "-g", "-sp"}
BSUB_FLAGS = {"-H", "-N", "-B", "-x", "-r", "-rn"}
BSUB_USAGE = """Usage: bsub [-h] [-V] [-H] [-x] [-r | -rn] [-N] [-B]
            [-q queue_name ...] [-m host_name ...] [-n min_processors[,max_processors]]
            [-R res_req] [-J job_name] [-w dependency_expression] [-b begin_time]
            [-o out_file | -oo out_file] [-e err_file | -eo err_file]
            [-cwd "current_working_directory"] [-W run_limit[/host_spec]] [-We run_time]
            [-M mem_limit] [-P project_name] [-G user_group] [-g job_group]
            [-u mail_user] [-gpu - | "gpu_req"] [-sp priority] [-app profile] [-sla sla]
            [-env "none" | "all [, ~var_name] [, var_name=var_value]" | "var_name[, ...]"]
            [command [argument ...]]
"""
BJOBS_VALUED = {"-o", "-u", "-J", "-q"}
BJOBS_FLAGS = {"-a", "-noheader", "-json", "-w", "-l", "-p", "-r", "-d", "-A"}
BJOBS_USAGE = """Usage: bjobs [-h] [-V] [-w | -l] [-a] [-d] [-p] [-r] [-A] [-noheader]
             [-o "field_name[:[-][output_width]] ... [delimiter='character']"] [-json]
             [-q queue_name] [-u user_name | -u all] [-J job_name] [jobId | "jobId[index_list]" ...]
"""
BKILL_USAGE = """Usage: bkill [-h] [-V] [-r] [-s signal_value | -s signal_name] [-J job_name]
             [-u user_name | -u all] [jobId | "jobId[index_list]" ...]
"""
RES_SECTIONS = {"select", "order", "rusage", "span", "same", "cu", "affinity"}
GPU_KEYS = {"num", "mode", "mps", "j_exclusive", "aff", "block", "gpack", "gvendor", "gmodel",
            "gtile", "gmem", "glink", "nvlink"}
MEM_UNIT_KB = {"": None, "K": 1, "KB": 1, "M": 1024, "MB": 1024, "G": 1024 ** 2, "GB": 1024 ** 2,
               "T": 1024 ** 3, "TB": 1024 ** 3}
DEP_FUNCS = {"done", "ended", "exit", "started", "post_done", "post_err", "numdone", "numended",
             "numexit", "numrun", "numpend", "numhold", "numstart"}
EXIT_REASONS = {
    "timeout": "TERM_RUNLIMIT: job killed after reaching LSF run time limit",
    "oom": "TERM_MEMLIMIT: job killed after reaching LSF memory usage limit",
    "cancel": "TERM_OWNER: job killed by owner",
}
PEND_REASONS = {
    "held": "The job was suspended by the user while pending",
    "dep": "Job dependency condition not satisfied",
    "never": "Dependency condition invalid or never satisfied",
    "begin": "The job has a specified start time",
}
NOT_SUBMITTED = "Job not submitted."


class Fail(Exception):
    """A client error: message for stderr and the exit status."""

    def __init__(self, message, code=255):
        super().__init__(message)
        self.message, self.code = message, code


def queues():
    """Return the queues that exist ('normal' plus $EMU_LSF_QUEUES)."""
    extra = os.environ.get("EMU_LSF_QUEUES", "")
    return ["normal"] + [q.strip() for q in extra.split(",") if q.strip()]


def cluster():
    """Return the emulated cluster name."""
    return os.environ.get("EMU_LSF_CLUSTER") or "emucluster"


def reject(text):
    """Raise a bsub rejection ending with 'Job not submitted.'."""
    raise Fail("%s %s\n" % (text, NOT_SUBMITTED))


# ===========================================================================
# bsub option parsing
# ===========================================================================

def parse_bsub_args(args, where="bsub"):
    """Split bsub args into ([(opt, value)], command words)."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            break
        if arg in BSUB_FLAGS:
            pairs.append((arg, True))
            i += 1
        elif arg in BSUB_VALUED:
            if i + 1 >= len(args):
                raise Fail("%s: option requires an argument -- %s\n%s" % (where, arg[1:], BSUB_USAGE))
            pairs.append((arg, args[i + 1]))
            i += 2
        else:
            raise Fail("%s: illegal option -- %s\n%s" % (where, arg[1:], BSUB_USAGE))
    return pairs, args[i:]


def bsub_directives(text):
    """Return the option words of #BSUB lines before the first command."""
    words = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#BSUB"):
            words += shlex.split(stripped[5:])
        elif stripped and not stripped.startswith("#"):
            break
    return words


def fold(pairs):
    """Merge options: -R accumulates, -o/-oo and -e/-eo share a slot."""
    opts = {"-R": []}
    for key, value in pairs:
        if key == "-R":
            opts["-R"].append(value)
        elif key in ("-o", "-oo"):
            opts["out"] = (value, "a" if key == "-o" else "w")
        elif key in ("-e", "-eo"):
            opts["err"] = (value, "a" if key == "-e" else "w")
        else:
            opts[key] = value
    return opts


def parse_array(text):
    """Parse -J 'name[1-10:2,15]%3'; return (name, indices or None, throttle)."""
    match = re.match(r"^([^\[\]%\s]*)(?:\[([^\]]*)\])?(?:%(\d+))?$", text)
    if not match or (match.group(3) and match.group(2) is None):
        reject("%s: Bad job name." % text)
    name, spec, throttle = match.group(1), match.group(2), match.group(3)
    if spec is None:
        return name, None, None
    indices = []
    for item in spec.split(","):
        part = re.match(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$", item.strip())
        if not part:
            reject("%s: Bad job array index list." % text)
        lo = int(part.group(1))
        hi = int(part.group(2) or lo)
        step = int(part.group(3) or 1)
        if lo < 1 or hi < lo or step < 1:
            reject("%s: Bad job array index list." % text)
        indices += range(lo, hi + 1, step)
    if len(set(indices)) != len(indices):
        reject("%s: Bad job array index list." % text)
    if throttle is not None and int(throttle) < 1:
        reject("%s: Bad job name." % text)
    return name, sorted(indices), int(throttle) if throttle else None


def parse_runlimit(text):
    """Parse -W [HH:]MM[/host] into seconds."""
    match = re.match(r"^(?:(\d+):)?(\d+)(?:/\S+)?$", text)
    if not match:
        reject("%s: Bad RUNLIMIT specification." % text)
    return (int(match.group(1) or 0) * 60 + int(match.group(2))) * 60


def parse_mem(text):
    """Parse -M LIMIT[unit] into kilobytes (bare numbers in LSF_UNIT_FOR_LIMITS)."""
    match = re.match(r"^(\d+(?:\.\d+)?)([KMGT]B?)?$", text, re.I)
    if not match:
        reject("%s: Bad memory limit specification." % text)
    unit = (match.group(2) or "").upper()
    scale = MEM_UNIT_KB[unit] or MEM_UNIT_KB.get(os.environ.get("EMU_LSF_UNIT_FOR_LIMITS", "KB").upper(), 1)
    return int(float(match.group(1)) * scale)


def check_res(text):
    """Validate an -R resource requirement string."""
    if "[" not in text:
        return
    seen = set()
    rest = text.strip()
    while rest:
        match = re.match(r"^(\w+)\[([^\[\]]*)\]\s*", rest)
        if not match or match.group(1) not in RES_SECTIONS:
            reject("Bad resource requirement syntax.")
        if match.group(1) in seen and match.group(1) not in ("select", "rusage", "span"):
            reject("Bad resource requirement syntax.")
        seen.add(match.group(1))
        rest = rest[match.end():]


def check_gpu(text):
    """Validate a -gpu requirement ('-' or 'num=1:mode=shared')."""
    if text == "-":
        return
    for item in text.split(":"):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in GPU_KEYS or not value:
            reject("Bad GPU requirement syntax.")


def parse_begin(text, now):
    """Parse -b [[[YYYY:][MM:]DD:]hh:mm into an epoch time."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 5 or not all(p.isdigit() for p in parts):
        reject("%s: Bad begin time specification." % text)
    lt = time.localtime(now)
    vals = [int(p) for p in parts]
    hour, minute = vals[-2], vals[-1]
    day = vals[-3] if len(vals) >= 3 else lt.tm_mday
    month = vals[-4] if len(vals) >= 4 else lt.tm_mon
    year = vals[-5] if len(vals) >= 5 else lt.tm_year
    when = time.mktime((year, month, day, hour, minute, 0, 0, 0, -1))
    if len(vals) == 2 and when < now:
        when += 86400
    return when


def job_env(spec, base):
    """Apply an -env spec ('none', 'all, ~V, V=x', 'V1, V2=x') to the submit env."""
    if spec is None:
        return dict(base)
    items = [i.strip() for i in spec.split(",") if i.strip()]
    env = {}
    if items and items[0].lower() == "all":
        env, items = dict(base), items[1:]
    elif items and items[0].lower() == "none":
        items = items[1:]
    for item in items:
        if item.startswith("~"):
            env.pop(item[1:], None)
        elif "=" in item:
            key, _, val = item.partition("=")
            env[key.strip()] = val
        elif item in base:
            env[item] = base[item]
    return env


# ===========================================================================
# Dependency expressions: done() ended() exit() started() num*() && || !
# ===========================================================================

def tokenize(text):
    """Split a -w expression into tokens."""
    tokens, i = [], 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif text[i:i + 2] in ("&&", "||", ">=", "<=", "==", "!="):
            tokens.append(text[i:i + 2])
            i += 2
        elif char in "!()<>,*":
            tokens.append(char)
            i += 1
        elif char in "\"'":
            end = text.find(char, i + 1)
            if end < 0:
                raise ValueError("quote")
            tokens.append(("str", text[i + 1:end]))
            i = end + 1
        else:
            match = re.match(r"[\w.\-]+(?:\[[\d,\-:]+\])?", text[i:])
            if not match:
                raise ValueError(char)
            tokens.append(("word", match.group(0)))
            i += match.end()
    return tokens


class DepParser:
    """Recursive-descent parser for LSF dependency expressions."""

    def __init__(self, text):
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self):
        """Return the next token or None."""
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, want=None):
        """Consume one token (optionally a specific one)."""
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise ValueError(want)
        self.pos += 1
        return tok

    def parse(self):
        """Parse the whole expression into a tree."""
        tree = self.parse_or()
        if self.peek() is not None:
            raise ValueError("trailing")
        return tree

    def parse_or(self):
        """or := and ('||' and)*"""
        items = [self.parse_and()]
        while self.peek() == "||":
            self.take()
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else ["or", *items]

    def parse_and(self):
        """and := unary ('&&' unary)*"""
        items = [self.parse_unary()]
        while self.peek() == "&&":
            self.take()
            items.append(self.parse_unary())
        return items[0] if len(items) == 1 else ["and", *items]

    def parse_unary(self):
        """unary := '!' unary | '(' or ')' | term"""
        tok = self.peek()
        if tok == "!":
            self.take()
            return ["not", self.parse_unary()]
        if tok == "(":
            self.take()
            tree = self.parse_or()
            self.take(")")
            return tree
        return self.parse_term()

    def parse_term(self):
        """term := FUNC '(' ref [',' [op] number | '*'] ')' | ref"""
        tok = self.take()
        if not isinstance(tok, tuple):
            raise ValueError(tok)
        if tok[0] == "word" and self.peek() == "(":
            func = tok[1].lower()
            if func not in DEP_FUNCS:
                raise ValueError(func)
            self.take("(")
            ref = self.take()
            if not isinstance(ref, tuple):
                raise ValueError(ref)
            op, num = None, None
            if self.peek() == ",":
                self.take()
                op, num = self.parse_cmp()
            self.take(")")
            return ["fn", func, ref[1], op, num]
        return ["fn", "done", tok[1], None, None]

    def parse_cmp(self):
        """Parse '[op] number' or '*' after a comma."""
        tok = self.take()
        if tok == "*":
            return "*", None
        op = "=="
        if tok in (">", "<", ">=", "<=", "==", "!="):
            op, tok = tok, self.take()
        if not isinstance(tok, tuple) or not tok[1].lstrip("-").isdigit():
            raise ValueError(tok)
        return op, int(tok[1])


def dep_refs(tree):
    """Yield every job reference of a parsed expression."""
    if tree[0] == "fn":
        yield tree[2]
    else:
        for sub in tree[1:]:
            if isinstance(sub, list):
                yield from dep_refs(sub)


def resolve_ref(store, ref, now):
    """Resolve '123', '123[4]' or a job name to a list of unit records."""
    match = re.match(r"^(\d+)(?:\[(\d+)\])?$", ref)
    if match:
        head = store.load("lsf-" + match.group(1))
        if head is None or not visible(store, head, now):
            return None
        if match.group(2):
            elem = store.load("lsf-%s-%s" % (match.group(1), int(match.group(2))))
            return [elem] if elem else None
        return units_of(store, head)
    heads = [r for r in store.all() if r["kind"] != "element" and r["name"] == ref]
    heads = [h for h in heads if visible(store, h, now)]
    if not heads:
        return None
    return units_of(store, max(heads, key=lambda h: h["seq"]))


def category(unit):
    """Return pend / run / done / exit for a unit."""
    phase = unit["phase"]
    if phase == "pending":
        return "pend"
    if phase in ("running", "exiting"):
        return "run"
    return "done" if stat_of(unit, unit) == "DONE" else "exit"


def compare(value, op, num):
    """Apply an LSF comparison operator."""
    return {">": value > num, "<": value < num, ">=": value >= num, "<=": value <= num,
            "==": value == num, "!=": value != num}[op]


def eval_fn(func, units, op, num):
    """Evaluate one dependency function: 'T' true, 'F' not yet, 'N' never."""
    cats = [category(u) for u in units]
    final = [c in ("done", "exit") for c in cats]
    if func in ("done", "post_done"):
        return "N" if "exit" in cats else ("T" if all(c == "done" for c in cats) else "F")
    if func in ("exit", "post_err"):
        if "done" in cats:
            return "N"
        if op is not None and op != "*":
            codes = [exit_code_of(u) for u in units if category(u) == "exit"]
            if any(not compare(c, op, num) for c in codes):
                return "N"
        return "T" if all(final) else "F"
    if func == "ended":
        return "T" if all(final) else "F"
    if func == "started":
        return "T" if all(c != "pend" for c in cats) else "F"
    want = {"numdone": ("done",), "numexit": ("exit",), "numended": ("done", "exit"),
            "numrun": ("run",), "numpend": ("pend",), "numhold": ("pend",),
            "numstart": ("run", "done", "exit")}[func]
    count = sum(1 for c in cats if c in want)
    if op == "*":
        op, num = "==", len(units)
    if compare(count, op, num):
        return "T"
    if func in ("numdone", "numexit", "numended") and op in (">=", "==", ">"):
        most = count + sum(1 for f in final if not f)
        if most < num + (1 if op == ">" else 0):
            return "N"
    return "F"


def eval_tree(store, tree, now):
    """Evaluate a dependency tree to 'T', 'F' or 'N'."""
    kind = tree[0]
    if kind == "fn":
        units = resolve_ref(store, tree[2], now)
        return "N" if units is None else eval_fn(tree[1], units, tree[3], tree[4])
    vals = [eval_tree(store, sub, now) for sub in tree[1:]]
    if kind == "not":
        return "N" if vals[0] == "T" else "T"
    if kind == "and":
        return "N" if "N" in vals else ("T" if all(v == "T" for v in vals) else "F")
    return "T" if "T" in vals else ("N" if all(v == "N" for v in vals) else "F")


# ===========================================================================
# Records, gate and stage-out (runner hooks)
# ===========================================================================

def units_of(store, head):
    """Return the runnable records of a head (itself or its elements)."""
    if head["kind"] == "job":
        return [head]
    recs = (store.load("lsf-%d-%d" % (head["seq"], i)) for i in head["array"]["indices"])
    return [r for r in recs if r is not None]


def finished(store, head):
    """Tell whether every unit of a head is done."""
    return all(u["phase"] == "done" for u in units_of(store, head))


def visible(store, head, now):
    """Tell whether a job is still within CLEAN_PERIOD."""
    units = units_of(store, head)
    if not all(u["phase"] == "done" for u in units):
        return True
    keep = store.history(HISTORY_DEFAULT)
    return keep < 0 or now - max(u.get("t_end") or now for u in units) < keep


def set_gate(store, head, value):
    """Persist the display gate of a head when it changed."""
    if head.get("gate") != value:
        store.update(head["key"], lambda r: r.update(gate=value))
        head["gate"] = value


def gate(store, head, now):
    """Tell whether units of this head may start (runner hook)."""
    if head.get("hold"):
        set_gate(store, head, "held")
        return False
    if head.get("depend"):
        state = eval_tree(store, DepParser(head["depend"]).parse(), now)
        if state != "T":
            set_gate(store, head, "dep" if state == "F" else "never")
            return False
    if head.get("begin") and head["begin"] > now:
        set_gate(store, head, "begin")
        return False
    set_gate(store, head, "ready")
    return True


def exit_code_of(unit):
    """Return the numeric exit code of a finished unit (128+sig if killed)."""
    if unit.get("exit_signal"):
        return 128 + unit["exit_signal"]
    return unit.get("exit_code") or 0


def succeeded(unit):
    """Tell whether a unit ran and exited 0 without being killed."""
    return bool(unit.get("ran") and not unit.get("reason") and exit_code_of(unit) == 0)


def stat_of(unit, head):
    """Return the LSF STAT of a unit (exiting still shows RUN)."""
    phase = unit["phase"]
    if phase == "pending":
        return "PSUSP" if head.get("hold") else "PEND"
    if phase in ("running", "exiting"):
        return "RUN"
    return "DONE" if succeeded(unit) else "EXIT"


def report(unit, head, output, now):
    """Build the LSF job report that heads the -o file."""
    ctime = time.ctime
    code = exit_code_of(unit)
    done = succeeded(unit)
    reason = EXIT_REASONS.get(unit.get("reason") or "")
    status = "Successfully completed." if done else (
        (reason + ".\n" if reason else "") + "Exited with exit code %d." % code)
    user = core.user_name()
    run = (unit.get("t_exit") or now) - unit["t_start"]
    mem = head.get("memlimit")
    lines = [
        "Sender: LSF System <lsfadmin@%s>" % unit.get("host", core.HOST),
        "Subject: Job %s: <%s> in cluster <%s> %s" % (unit["id"], unit["name"], cluster(),
                                                        "Done" if done else "Exited"),
        "",
        "Job <%s> was submitted from host <%s> by user <%s> in cluster <%s> at %s"
        % (unit["name"], core.HOST, user, cluster(), ctime(head["t_submit"])),
        "Job was executed on host(s) <%s>, in queue <%s>, as user <%s> in cluster <%s> at %s"
        % (unit.get("host", core.HOST), head["queue"], user, cluster(), ctime(unit["t_start"])),
        "<%s> was used as the home directory." % head["env"].get("HOME", os.path.expanduser("~")),
        "<%s> was used as the working directory." % unit["cwd"],
        "Started at %s" % ctime(unit["t_start"]),
        "Terminated at %s" % ctime(unit.get("t_exit") or now),
        "Results reported at %s" % ctime(now),
        "", "Your job looked like:", "",
        "-" * 60, "# LSBATCH: User input", head["command"], "-" * 60, "",
        status, "", "Resource usage summary:", "",
        "    CPU time :                                   %.2f sec." % (unit.get("cput") or 0),
        "    Max Memory :                                 %d MB" % ((unit.get("maxrss_kb") or 0) // 1024),
        "    Total Requested Memory :                     %s" % ("%d MB" % (mem // 1024) if mem else "-"),
        "    Max Processes :                              %d" % head["slots"],
        "    Run time :                                   %d sec." % run,
        "    Turnaround time :                            %d sec." % ((unit.get("t_exit") or now) - head["t_submit"]),
        "", "The output (if any) follows:", "",
    ]
    text = "\n".join(lines) + "\n" + output
    if unit.get("errfile"):
        text += "\n\nPS:\n\nRead file <%s> for stderr output of this job.\n\n" % unit["errfile"]
    return text


def stage_out(store, rec, head):
    """Write the job report + output to the -o file (or the mail spool)."""
    if not rec.get("ran"):
        return
    now = time.time()
    direct = rec.get("direct")
    if direct:
        with open(rec["outfile"], "a") as fh:
            fh.write("\n" + report(rec, head, "", now))
        return
    with open(rec["stdout"], encoding="utf-8", errors="replace") as fh:
        output = fh.read()
    dest = rec.get("outfile") or store.sub("mail", rec["key"])
    if os.path.isdir(dest):
        dest = os.path.join(dest, "%s.out" % rec["id"].replace("[", "_").rstrip("]"))
    try:
        with open(dest, head.get("out_mode", "a")) as fh:
            fh.write(report(rec, head, output, now))
    except OSError:
        pass
    if rec.get("errfile") and rec["stderr"] != rec["stdout"]:
        dest = rec["errfile"]
        if os.path.isdir(dest):
            dest = os.path.join(dest, "%s.err" % rec["id"].replace("[", "_").rstrip("]"))
        try:
            with open(rec["stderr"], "rb") as src, open(dest, head.get("err_mode", "a") + "b") as dst:
                dst.write(src.read())
        except OSError:
            pass
    for path in {rec["stdout"], rec["stderr"]}:
        with contextlib.suppress(OSError):
            os.unlink(path)


# ===========================================================================
# bsub
# ===========================================================================

def bsub(store, args):
    """bsub [opts] command [args] | bsub [opts] < script."""
    if args in (["-V"], ["-h"]):
        core.err(VERSION + "\n" if args == ["-V"] else BSUB_USAGE)
        return 0
    cmd_pairs, command = parse_bsub_args(args)
    script = None
    dir_pairs = []
    if not command:
        data = sys.stdin.buffer.read() if sys.stdin and not sys.stdin.isatty() else b""
        script = data.decode("utf-8", "surrogateescape")
        if not script.strip():
            reject("No command is specified.")
        try:
            dir_pairs, extra = parse_bsub_args(bsub_directives(script), "bsub")
        except ValueError:
            reject("Bad #BSUB directive.")
        if extra:
            raise Fail("bsub: illegal option -- %s\n%s" % (extra[0], BSUB_USAGE))
    opts = fold(dir_pairs + cmd_pairs)
    now = time.time()
    spec = validate(store, opts, now)
    units = (spec["indices"] and len(spec["indices"])) or 1
    active = sum(1 for r in store.all() if r["kind"] != "array" and r["phase"] != "done")
    if core.policy_blocked(store.knobs(), active, units):
        reject("Pending job threshold reached.")
    seq = store.next_id()
    head = build_head(store, seq, opts, spec, command, script, now)
    recs = make_units(store, head)
    head["gate"] = "new"
    with store.lock():
        for rec in recs:
            if rec is not head:
                store.save(rec)
        store.save(head)
    gate(store, head, now)
    core.spawn_runner(store, [r["key"] for r in recs])
    where = "queue <%s>" % head["queue"] if "-q" in opts else "default queue <%s>" % head["queue"]
    core.out("Job <%d> is submitted to %s.\n" % (seq, where))
    return 0


def validate(store, opts, now):
    """Check every bsub option value; return the parsed pieces."""
    spec = {"indices": None, "throttle": None, "name": None}
    if "-J" in opts:
        spec["name"], spec["indices"], spec["throttle"] = parse_array(opts["-J"])
        limit = store.knobs()["max_array_size"] or MAX_ARRAY_SIZE
        if spec["indices"] and len(spec["indices"]) > limit:
            reject("%s: Job array size is greater than MAX_JOB_ARRAY_SIZE." % opts["-J"])
    queue = opts.get("-q", "normal")
    if queue not in queues():
        reject("%s: No such queue." % queue)
    if "-n" in opts and not re.match(r"^[1-9]\d*(,[1-9]\d*)?$", opts["-n"]):
        reject("%s: Bad argument for option -n." % opts["-n"])
    spec["walltime"] = parse_runlimit(opts["-W"]) if "-W" in opts else None
    if "-We" in opts:
        parse_runlimit(opts["-We"])
    spec["memlimit"] = parse_mem(opts["-M"]) if "-M" in opts else None
    for res in opts["-R"]:
        check_res(res)
    if "-gpu" in opts:
        check_gpu(opts["-gpu"])
    spec["begin"] = parse_begin(opts["-b"], now) if "-b" in opts else None
    if "-sp" in opts and not opts["-sp"].isdigit():
        reject("%s: Bad job priority." % opts["-sp"])
    if "-w" in opts:
        try:
            tree = DepParser(opts["-w"]).parse()
        except (ValueError, IndexError):
            reject("Dependency condition syntax error.")
        for ref in dep_refs(tree):
            if resolve_ref(store, ref, now) is None:
                reject("Job <%s>: No matching job found." % ref)
    return spec


def expand(path, seq, index):
    """Expand %J and %I in an LSF path."""
    return path.replace("%J", str(seq)).replace("%I", str(index))


def build_head(store, seq, opts, spec, command, script, now):
    """Build the head record (plain job or array)."""
    base_env = core.clean_env()
    submit_dir = os.getcwd()
    key = "lsf-%d" % seq
    slots = int(opts.get("-n", "1").split(",")[0])
    if command:
        line = " ".join(command)
        argv = ["/bin/sh", "-c", line]
        default_name = line
    else:
        path = store.sub("scripts", key + ".sh")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(script)
        os.chmod(path, 0o700)
        argv = [path] if script.startswith("#!") else ["/bin/sh", path]
        line = script.rstrip("\n").replace("\n", ";")
        default_name = next((s for s in script.splitlines() if s.strip() and not s.startswith("#")), "sh")
    env = job_env(opts.get("-env"), base_env)
    env.update({"LSB_QUEUE": opts.get("-q", "normal"), "LSB_SUBCWD": submit_dir,
                "LS_SUBCWD": submit_dir, "LSFUSER": core.user_name(),
                "LSB_EXEC_CLUSTER": cluster(), "LSB_DJOB_NUMPROC": str(slots),
                "LSB_MAX_NUM_PROCESSORS": str(slots), "LSB_HOSTS": " ".join([core.HOST] * slots),
                "LSB_MCPU_HOSTS": "%s %d " % (core.HOST, slots)})
    head = {
        "key": key, "kind": "array" if spec["indices"] else "job", "seq": seq, "id": str(seq),
        "name": spec["name"] or default_name, "queue": opts.get("-q", "normal"),
        "phase": "array" if spec["indices"] else "pending", "hold": "-H" in opts,
        "depend": opts.get("-w"), "begin": spec["begin"], "t_submit": now,
        "project": opts.get("-P", "default"), "group": opts.get("-G"), "slots": slots,
        "walltime": spec["walltime"], "memlimit": spec["memlimit"], "command": line,
        "env": env, "argv": argv, "submit_dir": submit_dir, "out_opt": opts.get("out"),
        "err_opt": opts.get("err"), "cwd_opt": opts.get("-cwd"), "res": opts["-R"],
        "gpu": opts.get("-gpu"), "out_mode": (opts.get("out") or ("", "a"))[1],
        "err_mode": (opts.get("err") or ("", "a"))[1], "mail_user": opts.get("-u"),
    }
    if spec["indices"]:
        head["array"] = {"indices": spec["indices"]}
        head["throttle"] = spec["throttle"]
    return head


def make_units(store, head):
    """Create the runnable records: the job itself or one per element."""
    if head["kind"] == "job":
        fill_unit(store, head, head, 0)
        return [head]
    units = []
    indices = head["array"]["indices"]
    for index in indices:
        unit = {"key": "lsf-%d-%d" % (head["seq"], index), "kind": "element", "head": head["key"],
                "index": index, "id": "%d[%d]" % (head["seq"], index), "phase": "pending",
                "name": "%s[%d]" % (head["name"], index), "walltime": head["walltime"]}
        fill_unit(store, unit, head, index)
        unit["env_extra"].update({"LSB_JOBINDEX_END": str(max(indices)),
                                  "LSB_JOBINDEX_STEP": str(indices[1] - indices[0]) if len(indices) > 1 else "1"})
        units.append(unit)
    return units


def fill_unit(store, unit, head, index):
    """Set cwd, files and per-unit environment of a runnable record."""
    seq = head["seq"]
    cwd = os.path.join(head["submit_dir"], expand(head["cwd_opt"], seq, index)) \
        if head.get("cwd_opt") else head["submit_dir"]
    unit["cwd"] = os.path.normpath(cwd)
    unit.setdefault("name", head["name"])
    outfile = os.path.join(unit["cwd"], expand(head["out_opt"][0], seq, index)) if head.get("out_opt") else None
    errfile = os.path.join(unit["cwd"], expand(head["err_opt"][0], seq, index)) if head.get("err_opt") else None
    unit["outfile"], unit["errfile"] = outfile, errfile
    spool = store.sub("spool", unit["key"])
    if os.environ.get("EMU_LSF_STDOUT_DIRECT", "").lower() in ("y", "yes", "1") and outfile:
        unit["direct"] = True
        unit["stdout"] = outfile
        unit["stderr"] = errfile or outfile
        unit["output_mode"] = head["out_mode"]
    else:
        unit["stdout"] = spool + ".out"
        unit["stderr"] = spool + ".err" if errfile else unit["stdout"]
    unit["tmpdir"] = store.sub("tmp", "%s.tmpdir" % unit["id"])
    unit["nodefile"] = store.sub("aux", "hostfile.%s" % unit["id"])
    unit["nodefile_lines"] = [core.HOST] * head["slots"]
    extra = {"LSB_JOBID": str(seq), "LSB_JOBINDEX": str(index), "LSB_JOBNAME": unit["name"],
             "LSB_BATCH_JID": unit["id"], "LSB_DJOB_HOSTFILE": unit["nodefile"],
             "TMPDIR": unit["tmpdir"], "LSB_JOBFILENAME": store.sub("scripts", head["key"] + ".sh")}
    if outfile:
        extra["LSB_OUTPUTFILE"] = outfile
    if errfile:
        extra["LSB_ERRORFILE"] = errfile
    unit["env_extra"] = extra


# ===========================================================================
# bjobs
# ===========================================================================

def fmt_time(t):
    """Format a time like bjobs ('Jan  1 10:00')."""
    return time.strftime("%b %e %H:%M", time.localtime(t)) if t else ""


def pend_reason(unit, head):
    """Return the pending reason of a unit ('' when not pending)."""
    if unit["phase"] != "pending":
        return ""
    if head.get("hold"):
        return PEND_REASONS["held"]
    return PEND_REASONS.get(head.get("gate"), "New job is waiting for scheduling")


#: bjobs -o field -> (header, default width, value function(unit, head))
FIELDS = {
    "jobid": ("JOBID", 7, lambda u, h: str(h["seq"])),
    "jobindex": ("JOBINDEX", 8, lambda u, h: str(u.get("index") or 0)),
    "stat": ("STAT", 5, lambda u, h: stat_of(u, h)),
    "user": ("USER", 7, lambda u, h: core.user_name()),
    "queue": ("QUEUE", 10, lambda u, h: h["queue"]),
    "job_name": ("JOB_NAME", 10, lambda u, h: u["name"]),
    "exit_code": ("EXIT_CODE", 9, lambda u, h: str(exit_code_of(u))
                  if stat_of(u, h) == "EXIT" and (u.get("ran") or exit_code_of(u)) else ""),
    "exit_reason": ("EXIT_REASON", 11, lambda u, h: EXIT_REASONS.get(u.get("reason") or "", "")
                    if u["phase"] == "done" else ""),
    "pend_reason": ("PEND_REASON", 11, pend_reason),
    "kill_reason": ("KILL_REASON", 11, lambda u, h: ""),
    "suspend_reason": ("SUSPEND_REASON", 14, lambda u, h: ""),
    "from_host": ("FROM_HOST", 11, lambda u, h: core.HOST),
    "exec_host": ("EXEC_HOST", 11, lambda u, h: u.get("host", "") if u.get("ran") else ""),
    "first_host": ("FIRST_HOST", 11, lambda u, h: u.get("host", "") if u.get("ran") else ""),
    "submit_time": ("SUBMIT_TIME", 15, lambda u, h: fmt_time(h["t_submit"])),
    "start_time": ("START_TIME", 15, lambda u, h: fmt_time(u.get("t_start"))),
    "finish_time": ("FINISH_TIME", 15, lambda u, h: fmt_time(u.get("t_end"))),
    "proj_name": ("PROJ_NAME", 11, lambda u, h: h["project"]),
    "ugroup": ("UGROUP", 7, lambda u, h: h.get("group") or ""),
    "command": ("COMMAND", 15, lambda u, h: h["command"]),
    "cwd": ("CWD", 15, lambda u, h: u["cwd"]),
    "output_file": ("OUTPUT_FILE", 15, lambda u, h: u.get("outfile") or ""),
    "error_file": ("ERROR_FILE", 15, lambda u, h: u.get("errfile") or ""),
    "dependency": ("DEPENDENCY", 15, lambda u, h: h.get("depend") or ""),
    "slots": ("SLOTS", 5, lambda u, h: str(h["slots"])),
    "nreq_slot": ("NREQ_SLOT", 9, lambda u, h: str(h["slots"])),
    "nalloc_slot": ("NALLOC_SLOT", 11, lambda u, h: str(h["slots"]) if u.get("ran") else "0"),
    "cpu_used": ("CPU_USED", 10, lambda u, h: "%.1f second(s)" % (u.get("cput") or 0)),
    "run_time": ("RUN_TIME", 15, lambda u, h: "%d second(s)" % (
        ((u.get("t_exit") or time.time()) - u["t_start"]) if u.get("t_start") else 0)),
    "max_mem": ("MAX_MEM", 10, lambda u, h: "%d Mbytes" % ((u.get("maxrss_kb") or 0) // 1024)
                if u.get("ran") else ""),
    "runtimelimit": ("RUNTIMELIMIT", 12, lambda u, h: "%.1f/%s" % (h["walltime"] / 60.0, core.HOST)
                     if h.get("walltime") else ""),
    "memlimit": ("MEMLIMIT", 8, lambda u, h: "%d K" % h["memlimit"] if h.get("memlimit") else ""),
    "nthreads": ("NTHREADS", 8, lambda u, h: "1" if u["phase"] == "running" else ""),
}
ALIASES = {"id": "jobid", "name": "job_name", "state": "stat", "project": "proj_name",
           "exec_host_list": "exec_host"}


def parse_format(text):
    """Parse -o 'field[:width] ... delimiter='c'' into (fields, delimiter)."""
    delim = None
    match = re.search(r"delimiter=(['\"])(.*?)\1", text)
    if match:
        delim = match.group(2)
        text = text[:match.start()] + text[match.end():]
    fields = []
    for word in text.split():
        name = word.split(":")[0].lower()
        name = ALIASES.get(name, name)
        if name not in FIELDS:
            raise Fail("%s: Illegal field name.\n" % word.split(":")[0])
        fields.append(name)
    if not fields:
        raise Fail("bjobs: -o: no fields specified\n" + BJOBS_USAGE)
    return fields, delim


def select_rows(store, ids, opts, now):
    """Return ([(unit, head)], [missing id texts], any found)."""
    rows, missing = [], []
    if not ids:
        for head in sorted(store.all(), key=lambda r: (r.get("seq", 0), r.get("index", 0))):
            if head["kind"] == "element" or not visible(store, head, now):
                continue
            if "-J" in opts and head["name"] != opts["-J"]:
                continue
            if "-q" in opts and head["queue"] != opts["-q"]:
                continue
            rows += [(u, head) for u in units_of(store, head)]
        return [r for r in rows if state_filter(r, opts)], missing
    for text in ids:
        match = re.match(r"^(\d+)(?:\[(\d+)(?:-(\d+))?\])?$", text)
        head = store.load("lsf-" + match.group(1)) if match else None
        if head is None or not visible(store, head, now):
            missing.append(text)
            continue
        units = units_of(store, head)
        if match.group(2):
            lo, hi = int(match.group(2)), int(match.group(3) or match.group(2))
            units = [u for u in units if head["kind"] == "array" and lo <= u["index"] <= hi]
        if not units:
            missing.append(text)
            continue
        rows += [(u, head) for u in units]
    return rows, missing


def state_filter(row, opts):
    """Apply -a/-p/-r/-d filters to a (unit, head) row."""
    stat = stat_of(*row)
    if "-p" in opts:
        return stat in ("PEND", "PSUSP")
    if "-r" in opts:
        return stat == "RUN"
    if "-d" in opts:
        return stat in ("DONE", "EXIT")
    return "-a" in opts or stat not in ("DONE", "EXIT")


def default_lines(rows, wide, header):
    """Render the default bjobs table."""
    fmt = "%-7s %-7s %-5s %-10s %-11s %-11s %-10s %s"
    lines = [fmt % ("JOBID", "USER", "STAT", "QUEUE", "FROM_HOST", "EXEC_HOST", "JOB_NAME",
                    "SUBMIT_TIME")] if header else []
    for unit, head in rows:
        name = unit["name"]
        if not wide and len(name) > 10:
            name = "*" + name[-9:]
        lines.append(fmt % (head["seq"], core.user_name()[:7], stat_of(unit, head), head["queue"],
                            core.HOST, unit.get("host", "") if unit.get("ran") else "", name,
                            fmt_time(head["t_submit"])))
    return lines


def long_lines(rows):
    """Render bjobs -l (simplified long format)."""
    out = []
    for unit, head in rows:
        stat = stat_of(unit, head)
        out.append("Job <%s>, Job Name <%s>, User <%s>, Project <%s>, Status <%s>, Queue <%s>, "
                   "Command <%s>" % (unit["id"], unit["name"], core.user_name(), head["project"],
                                     stat, head["queue"], head["command"]))
        out.append("%s: Submitted from host <%s>, CWD <%s>;" % (time.ctime(head["t_submit"]), core.HOST, unit["cwd"]))
        if unit.get("ran"):
            out.append("%s: Started 1 Task(s) on Host(s) <%s>;" % (time.ctime(unit["t_start"]), unit.get("host")))
        if stat == "DONE":
            out.append("%s: Done successfully." % time.ctime(unit["t_end"]))
        elif stat == "EXIT":
            reason = EXIT_REASONS.get(unit.get("reason") or "")
            out.append("%s: %sExited with exit code %d." % (
                time.ctime(unit["t_end"]), (reason + ". ") if reason else "", exit_code_of(unit)))
        if stat in ("PEND", "PSUSP"):
            out += ["", " PENDING REASONS:", " %s;" % pend_reason(unit, head)]
        out.append("-" * 78)
    return out


def bjobs(store, args):
    """bjobs [-a] [-noheader] [-o fmt] [-json] [-w|-l] [ID...]."""
    if args == ["-V"]:
        core.err(VERSION + "\n")
        return 0
    opts, ids, i = {}, [], 0
    while i < len(args):
        arg = args[i]
        if arg in BJOBS_FLAGS:
            opts[arg] = True
        elif arg in BJOBS_VALUED:
            if i + 1 >= len(args):
                raise Fail("bjobs: option requires an argument -- %s\n%s" % (arg[1:], BJOBS_USAGE))
            opts[arg] = args[i + 1]
            i += 1
        elif arg.startswith("-"):
            raise Fail("bjobs: illegal option -- %s\n%s" % (arg[1:], BJOBS_USAGE))
        else:
            ids.append(arg)
        i += 1
    if "-json" in opts and "-o" not in opts:
        raise Fail("The -json option must be used together with the -o option.\n")
    fields, delim = parse_format(opts["-o"]) if "-o" in opts else (None, None)
    now = time.time()
    rows, missing = select_rows(store, ids, opts, now)
    code = (255 if rows else 0) if missing else 0
    if "-json" in opts:
        records = [{FIELDS[f][0]: FIELDS[f][2](u, h) for f in fields} for u, h in rows]
        records += [{"JOBID": m, "ERROR": "Job <%s> is not found" % m} for m in missing]
        doc = {"COMMAND": "bjobs", "JOBS": len(records), "RECORDS": records}
        core.out(json.dumps(doc, indent=2) + "\n")
        return code
    for text in missing:
        core.err("Job <%s> is not found\n" % text)
    if not rows:
        if not ids:
            core.err(empty_message(opts))
        return code
    header = "-noheader" not in opts
    if fields:
        lines = format_rows(rows, fields, delim, header)
    elif "-l" in opts:
        lines = long_lines(rows)
    else:
        lines = default_lines(rows, "-w" in opts, header)
    core.out("".join(line + "\n" for line in lines))
    return code


def empty_message(opts):
    """Return bjobs' message when the user has no matching jobs."""
    for flag, word in (("-p", "pending"), ("-r", "running"), ("-d", "done")):
        if flag in opts:
            return "No %s job found\n" % word
    return "No job found\n" if "-a" in opts else "No unfinished job found\n"


def format_rows(rows, fields, delim, header):
    """Render -o rows: delimiter-joined, or padded columns ('-' for empty)."""
    table = [[FIELDS[f][2](u, h) or "-" for f in fields] for u, h in rows]
    heads = [FIELDS[f][0] for f in fields]
    if delim is not None:
        return ([delim.join(heads)] if header else []) + [delim.join(r) for r in table]
    widths = [max([FIELDS[f][1], len(FIELDS[f][0])] + [len(r[n]) for r in table])
              for n, f in enumerate(fields)]
    lines = [heads] if header else []
    lines += table
    return [" ".join(v.ljust(w) for v, w in zip(line[:-1], widths)) + " " + line[-1]
            if len(line) > 1 else line[0] for line in lines]


# ===========================================================================
# bkill / bresume / bhist
# ===========================================================================

def bkill(store, args):
    """bkill [-s SIG] [-r] ID | "ID[i]" | 0."""
    sig, force, ids, i = None, False, [], 0
    while i < len(args):
        arg = args[i]
        if arg == "-s":
            if i + 1 >= len(args):
                raise Fail("bkill: option requires an argument -- s\n" + BKILL_USAGE)
            sig = core.sig_number(args[i + 1])
            if sig is None:
                raise Fail("%s: Illegal signal value\n" % args[i + 1])
            i += 1
        elif arg == "-r":
            force = True
        elif arg in ("-u", "-J"):
            i += 1
        elif arg.startswith("-"):
            raise Fail("bkill: illegal option -- %s\n%s" % (arg[1:], BKILL_USAGE))
        else:
            ids.append(arg)
        i += 1
    if not ids:
        raise Fail(BKILL_USAGE)
    now = time.time()
    if ids == ["0"]:
        heads = [h for h in store.all() if h["kind"] != "element" and not finished(store, h)]
        if not heads:
            raise Fail("No unfinished job found\n")
        ids = [h["id"] for h in sorted(heads, key=lambda h: h["seq"])]
    code = 0
    for text in ids:
        line, ok = kill_one(store, text, sig, force, now)
        (core.out if ok else core.err)(line)
        code = code if ok else 255
    return code


def kill_one(store, text, sig, force, now):
    """Kill or signal one id; return (message line, success)."""
    match = re.match(r"^(\d+)(?:\[(\d+)(?:-(\d+))?\])?$", text)
    with store.lock():
        head = store.load("lsf-" + match.group(1)) if match else None
        if head is None or not visible(store, head, now):
            return "Job <%s>: No matching job found\n" % text, False
        units = units_of(store, head)
        if match.group(2):
            lo, hi = int(match.group(2)), int(match.group(3) or match.group(2))
            units = [u for u in units if head["kind"] == "array" and lo <= u["index"] <= hi]
            if not units:
                return "Job <%s>: No matching job found\n" % text, False
        if all(u["phase"] == "done" for u in units):
            return "Job <%s>: Job has already finished\n" % text, False
        terminal = sig is None or sig in TERMINAL
        signals = (signal.SIGKILL,) if force else ((sig,) if sig else BKILL_SIGNALS)
        for unit in units:
            if unit["phase"] == "pending" and terminal:
                store.update(unit["key"], lambda r: core.cancel_pending(r, now))
            elif unit["phase"] == "running":
                store.update(unit["key"], lambda r: core.request_kill(
                    r, signals, "cancel" if terminal else None))
    verb = "signaled" if sig else "terminated"
    return "Job <%s> is being %s\n" % (text, verb), True


def bresume(store, args):
    """bresume ID...: release jobs held with bsub -H (PSUSP)."""
    if not args or any(a.startswith("-") for a in args):
        raise Fail("Usage: bresume [-h] [-V] [jobId | \"jobId[index_list]\" ...]\n")
    code, now = 0, time.time()
    for text in args:
        head = store.load("lsf-" + text) if text.isdigit() else None
        if head is None or not visible(store, head, now):
            core.err("Job <%s>: No matching job found\n" % text)
            code = 255
        elif not head.get("hold"):
            core.err("Job <%s>: The job was not suspended\n" % text)
            code = 255
        else:
            store.update(head["key"], lambda r: r.update(hold=False))
            core.out("Job <%s> is being resumed\n" % text)
    return code


def bhist(store, args):
    """bhist [-a] [-d] [-l] [ID...]: job history (all jobs, any age)."""
    flags = {a for a in args if a.startswith("-")}
    ids = [a for a in args if not a.startswith("-")]
    if flags - {"-a", "-d", "-l", "-w"}:
        raise Fail("bhist: illegal option -- %s\nUsage: bhist [-a] [-d] [-l] [-w] [jobId ...]\n"
                   % sorted(flags - {"-a", "-d", "-l", "-w"})[0][1:])
    now = time.time()
    rows = []
    heads = [store.load("lsf-" + i.split("[")[0]) for i in ids] if ids else \
        sorted((h for h in store.all() if h["kind"] != "element"), key=lambda h: h["seq"])
    for text, head in zip(ids or [None] * len(heads), heads):
        if head is None:
            continue
        for unit in units_of(store, head):
            if text and "[" in text and unit["id"] != text:
                continue
            done = unit["phase"] == "done"
            if (not ids and "-a" not in flags and done and "-d" not in flags) or ("-d" in flags and not done):
                continue
            rows.append((unit, head))
    if not rows:
        core.err("No matching job found\n" if ids else "No unfinished job found\n")
        return 255 if ids else 0
    lines = []
    if "-l" in flags:
        for unit, head in rows:
            lines += bhist_long(unit, head, now)
    else:
        lines.append("Summary of time in seconds spent in various states:")
        lines.append("%-8s%-8s%-10s%-8s%-8s%-8s%-8s%-8s%-8s%s" % (
            "JOBID", "USER", "JOB_NAME", "PEND", "PSUSP", "RUN", "USUSP", "SSUSP", "UNKWN", "TOTAL"))
        for unit, head in rows:
            pend, run = times(unit, head, now)
            name = unit["name"] if len(unit["name"]) <= 9 or "-w" in flags else "*" + unit["name"][-8:]
            lines.append("%-8s%-8s%-10s%-8d%-8d%-8d%-8d%-8d%-8d%d" % (
                unit["id"], core.user_name()[:7], name, pend, 0, run, 0, 0, 0, pend + run))
    core.out("".join(line + "\n" for line in lines))
    return 0


def times(unit, head, now):
    """Return (pending seconds, running seconds) of a unit."""
    start = unit.get("t_start")
    end = unit.get("t_end") or now
    pend = (start or (end if unit["phase"] == "done" else now)) - head["t_submit"]
    run = (end - start) if start else 0
    return int(pend), int(run)


def bhist_long(unit, head, now):
    """Render bhist -l for one unit."""
    ctime = time.ctime
    lines = ["Job <%s>, Job Name <%s>, User <%s>, Project <%s>, Command <%s>" % (
        unit["id"], unit["name"], core.user_name(), head["project"], head["command"]),
        "%s: Submitted from host <%s>, to Queue <%s>, CWD <%s>;" % (
            ctime(head["t_submit"]), core.HOST, head["queue"], unit["cwd"])]
    if unit.get("ran"):
        lines.append("%s: Dispatched 1 Task(s) on Host(s) <%s>;" % (ctime(unit["t_start"]), unit.get("host")))
        lines.append("%s: Starting (Pid %s);" % (ctime(unit["t_start"]), (unit.get("pids") or ["0"])[0]))
    stat = stat_of(unit, head)
    if stat == "DONE":
        lines.append("%s: Done successfully. The CPU time used is %.1f seconds;" % (
            ctime(unit["t_end"]), unit.get("cput") or 0))
    elif stat == "EXIT":
        reason = (EXIT_REASONS.get(unit.get("reason") or "") or "")
        if reason:
            lines.append("%s: %s;" % (ctime(unit["t_end"]), reason))
        lines.append("%s: Exited with exit code %d. The CPU time used is %.1f seconds;" % (
            ctime(unit["t_end"]), exit_code_of(unit), unit.get("cput") or 0))
    pend, run = times(unit, head, now)
    lines += ["", "Summary of time in seconds spent in various states by  %s" % ctime(now),
              "  PEND     PSUSP    RUN      USUSP    SSUSP    UNKWN    TOTAL",
              "  %-9d%-9d%-9d%-9d%-9d%-9d%d" % (pend, 0, run, 0, 0, 0, pend + run), ""]
    return lines


# ===========================================================================
# Entry point
# ===========================================================================

COMMANDS = {"bsub": bsub, "bjobs": bjobs, "bkill": bkill, "bresume": bresume, "bhist": bhist}


def main(cmd, argv):
    """Run one LSF client command; return its exit status."""
    argv = [core.fix_arg(a) for a in argv]
    store = core.Store(SCHED)
    if core.enter(store, cmd):
        mode = str(store.knobs()["fail_code"] or "down")
        core.err(FAULTS.get(mode, FAULTS["down"]))
        return 0 if mode == "empty0" else 255
    try:
        return COMMANDS[cmd](store, argv)
    except Fail as exc:
        core.err(exc.message)
        return exc.code
