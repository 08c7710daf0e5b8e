"""Tests of the reflow CI scheduler emulators (PBS, LSF, Flux).

Written from the documented samples in /work/shared/schedulers.md (sections
2, 3, 5 and 7), not from any reflow code.  Each test gets its own state
directory, HOME and work directory and kills its runner processes in
tearDown.  Commands run as ``sys.executable bin/CMD`` so that the tests also
exercise the Python the suite runs under (3.9 floor); one test goes through
PATH and the shebang.

    python3 ci/emulators/test_emulators.py        (or: pytest ci/emulators)
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import emucore  # noqa: E402
import emuflux  # noqa: E402

TIMEOUT = 15.0


class EmuCase(unittest.TestCase):
    """Base: private state dir / HOME / work dir, helpers to run commands."""

    SCHED = ""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="emutest-")
        self.state = os.path.join(self.tmp, "state")
        self.home = os.path.join(self.tmp, "home")
        self.work = os.path.join(self.tmp, "work")
        for path in (self.home, self.work):
            os.makedirs(path)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EMU_", "LC_", "FLUX_"))}
        env.update(EMU_STATE_DIR=self.state, HOME=self.home, EMU_EXITING="0.2",
                   EMU_KILL_DELAY="0.5", LANG="C.UTF-8", PYTHONDONTWRITEBYTECODE="1")
        self.env = env
        self.store = emucore.Store(self.SCHED, self.state)

    def tearDown(self):
        emucore.kill_all(self.state)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_cmd(self, name, *args, stdin=None, env=None, cwd=None):
        """Run an emulator command; return CompletedProcess with text output."""
        binary = os.path.join(HERE, self.SCHED, "bin", name)
        full = dict(self.env, **(env or {}))
        proc = subprocess.run([sys.executable, binary, *args], cwd=cwd or self.work,
                              env=full, input=(stdin or "").encode(), capture_output=True,
                              timeout=60)
        proc.stdout = proc.stdout.decode("utf-8")
        proc.stderr = proc.stderr.decode("utf-8")
        return proc

    def ok(self, name, *args, **kw):
        """Run a command that must succeed; return its stdout."""
        proc = self.run_cmd(name, *args, **kw)
        self.assertEqual(proc.returncode, 0, "%s %s: %s" % (name, args, proc.stderr))
        return proc.stdout

    def knobs(self, **values):
        """Set knobs in the state directory's knobs.json."""
        emucore.set_knobs(self.store, **values)

    def wait_for(self, func, timeout=TIMEOUT, what="condition"):
        """Poll func() until it returns a truthy value."""
        end = time.time() + timeout
        while time.time() < end:
            value = func()
            if value:
                return value
            time.sleep(0.05)
        self.fail("timed out waiting for %s" % what)

    def write(self, name, text, mode=0o755):
        """Write a file in the work dir."""
        path = os.path.join(self.work, name)
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, mode)
        return path

    def read(self, name):
        """Read a file relative to the work dir."""
        with open(os.path.join(self.work, name)) as fh:
            return fh.read()


def max_overlap(intervals):
    """Return the largest number of simultaneously open intervals."""
    events = sorted([(s, 1) for s, e in intervals] + [(e, -1) for s, e in intervals])
    cur = best = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


def read_intervals(directory, prefix):
    """Read 'start end' files written by array elements."""
    out = []
    for name in os.listdir(directory):
        if name.startswith(prefix):
            with open(os.path.join(directory, name)) as fh:
                start, end = fh.read().split()
            out.append((float(start), float(end)))
    return out


TIMED_SCRIPT = '''#!/bin/sh
s=$(date +%%s.%%N)
sleep 0.4
e=$(date +%%s.%%N)
echo "$s $e" > "%s"
'''


# ===========================================================================
# PBS Pro / OpenPBS
# ===========================================================================

class PbsTests(EmuCase):
    """qsub / qstat / qdel against schedulers.md 2 and 7.1."""

    SCHED = "pbs"

    def jobs(self, *ids):
        """Return qstat -f -F json -x as a dict (Jobs part)."""
        proc = self.run_cmd("qstat", "-f", "-F", "json", "-x", *ids)
        return json.loads(proc.stdout).get("Jobs", {})

    def wait_state(self, jid, states="F"):
        """Wait until a job is in one of the given states; return its attrs."""
        return self.wait_for(lambda: (self.jobs(jid).get(jid) or {}).get("job_state") in states
                             and self.jobs(jid)[jid], what="%s in %s" % (jid, states))

    def test_submit_script_lifecycle(self):
        script = self.write("job.sh", "#!/bin/sh\n#PBS -N step1\n"
                            "#PBS -l select=1:ncpus=2:mem=1gb\n#PBS -l walltime=00:10:00\n"
                            'echo "pwd=$(pwd) wd=$PBS_O_WORKDIR id=$PBS_JOBID n=$NCPUS '
                            'env=$PBS_ENVIRONMENT name=$PBS_JOBNAME"\nsleep 0.3\nexit 3\n')
        jid = self.ok("qsub", "-v", "FOO=bar", script).strip()
        self.assertRegex(jid, r"^\d+\.pbsserver$")
        seen = []

        def finished():
            attrs = self.jobs(jid)[jid]
            seen.append((attrs["job_state"], "Exit_status" in attrs))
            return attrs if attrs["job_state"] == "F" else None
        attrs = self.wait_for(finished)
        states = [s for s, _ in seen]
        self.assertIn("E", states, "exiting state must be visible")
        self.assertNotIn(("R", True), seen, "no Exit_status while running")
        self.assertEqual(attrs["Exit_status"], 3)
        self.assertIsInstance(attrs["Exit_status"], int)
        self.assertEqual(attrs["Job_Name"], "step1")
        self.assertEqual(attrs["Resource_List"]["ncpus"], 2)
        self.assertEqual(attrs["Resource_List"]["mem"], "1gb")
        self.assertEqual(attrs["Resource_List"]["walltime"], "00:10:00")
        self.assertEqual(attrs["Variable_List"]["PBS_O_WORKDIR"], self.work)
        self.assertEqual(attrs["Variable_List"]["FOO"], "bar")
        seq = jid.split(".")[0]
        out = self.read("step1.o" + seq)
        self.assertIn("pwd=%s wd=%s id=%s n=2 env=PBS_BATCH name=step1" % (self.home, self.work, jid), out)
        self.assertTrue(os.path.exists(os.path.join(self.work, "step1.e" + seq)))
        proc = self.run_cmd("qstat", "-f", "-F", "json", jid)
        self.assertEqual(proc.returncode, 35)
        self.assertEqual(proc.stderr, "qstat: %s Job has finished, use -x or -H to obtain "
                                      "historical job information\n" % jid)
        self.assertEqual(self.run_cmd("qstat", "-x", seq).returncode, 0, "short id works")

    def test_stdin_exe_forms_and_join(self):
        jid = self.ok("qsub", "-N", "fromstdin", "-j", "oe", stdin="echo out; echo err >&2\n").strip()
        plain = self.ok("qsub", stdin="#PBS -N named\nexit 0\n").strip()
        exe = self.ok("qsub", "-N", "exe", "--", "/bin/sh", "-c", "echo $0 direct").strip()
        self.assertEqual(self.ok("qsub", "-z", "--", "/bin/true"), "")
        for j in (jid, plain, exe):
            self.wait_state(j)
        self.assertEqual(self.jobs(plain)[plain]["Job_Name"], "named")
        seq = jid.split(".")[0]
        self.assertEqual(sorted(self.read("fromstdin.o" + seq).split()), ["err", "out"])
        self.assertFalse(os.path.exists(os.path.join(self.work, "fromstdin.e" + seq)))
        self.assertIn("/bin/sh direct", self.read("exe.o" + exe.split(".")[0]))
        default = self.ok("qsub", stdin="true\n").strip()
        self.assertEqual(self.jobs(default)[default]["Job_Name"], "STDIN")

    def test_errors_and_exit_codes(self):
        proc = self.run_cmd("qsub", "-Y", "x.sh")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("invalid option -- 'Y'", proc.stderr)
        self.assertIn("usage: qsub", proc.stderr)
        proc = self.run_cmd("qsub", "-J", "1,3,5", stdin="true\n")
        self.assertEqual((proc.returncode, proc.stderr), (2, "qsub: illegal -J value\n"))
        proc = self.run_cmd("qsub", "-q", "nosuch", stdin="true\n")
        self.assertEqual((proc.returncode, proc.stderr), (170, "qsub: Unknown queue\n"))
        proc = self.run_cmd("qsub", "-l", "mem=8 gigs", stdin="true\n")
        self.assertEqual(proc.returncode, 166)
        self.assertIn("Illegal attribute or resource value", proc.stderr)
        proc = self.run_cmd("qsub", "-l", "frobs=3", stdin="true\n")
        self.assertEqual(proc.returncode, 187)
        proc = self.run_cmd("qstat", "-f", "-F", "json", "-x", "999.pbsserver")
        self.assertEqual((proc.returncode, proc.stderr), (153, "qstat: Unknown Job Id 999.pbsserver\n"))
        jid = self.ok("qsub", "-h", stdin="true\n").strip()
        proc = self.run_cmd("qstat", "-f", "-F", "json", "-x", jid, "999")
        self.assertEqual(proc.returncode, 153)
        self.assertEqual(list(json.loads(proc.stdout)["Jobs"]), [jid])
        self.assertEqual(json.loads(proc.stdout)["Jobs"][jid]["job_state"], "H")
        proc = self.run_cmd("qdel", "999.pbsserver")
        self.assertEqual((proc.returncode, proc.stderr), (153, "qdel: Unknown Job Id 999.pbsserver\n"))
        proc = self.run_cmd("qstat", "-Z")
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(self.ok("qstat", "--version"), "pbs_version = 23.06.06\n")

    def test_array_throttle_and_subjobs(self):
        self.knobs(exiting=0.1)
        script = self.write("arr.sh", TIMED_SCRIPT % "$PBS_O_WORKDIR/t.$PBS_ARRAY_INDEX"
                            + 'echo "idx=$PBS_ARRAY_INDEX parent=$PBS_ARRAY_ID id=$PBS_JOBID"\n')
        jid = self.ok("qsub", "-N", "arr", "-J", "1-5%2", "-o", "o.^array_index^", script).strip()
        self.assertRegex(jid, r"^\d+\[\]\.pbsserver$")
        seq = jid.split("[")[0]
        self.wait_for(lambda: self.jobs(jid)[jid]["job_state"] == "B", what="array B")
        parent = self.wait_state(jid)
        self.assertEqual(parent["array"], "True")
        self.assertEqual(parent["array_indices_submitted"], "1-5")
        self.assertEqual(parent["array_state_count"], "Queued:0 Running:0 Exiting:0 Expired:5 ")
        self.assertEqual(parent["Exit_status"], 0)
        self.assertLessEqual(max_overlap(read_intervals(self.work, "t.")), 2)
        self.assertEqual(len(read_intervals(self.work, "t.")), 5)
        self.assertIn("idx=3 parent=%s id=%s[3].pbsserver" % (jid, seq), self.read("o.3"))
        proc = self.run_cmd("qstat", "-t", "-f", "-F", "json", "-x", jid)
        names = list(json.loads(proc.stdout)["Jobs"])
        self.assertEqual(names, [jid] + ["%s[%d].pbsserver" % (seq, i) for i in range(1, 6)])
        sub = json.loads(proc.stdout)["Jobs"]["%s[2].pbsserver" % seq]
        self.assertEqual((sub["job_state"], sub["Exit_status"]), ("X", 0))
        plain = self.ok("qsub", "-N", "arr2", "-J", "0-4:2", "--", "/bin/true").strip()
        self.wait_state(plain)
        pseq = plain.split("[")[0]
        self.assertTrue(all(os.path.exists(os.path.join(self.work, "arr2.o%s.%d" % (pseq, i)))
                            for i in (0, 2, 4)))
        self.assertEqual(self.run_cmd("qstat", "%s.pbsserver" % seq).returncode, 153,
                         "an array needs its [] suffix")

    def test_dependencies(self):
        good = self.ok("qsub", stdin="sleep 1; exit 0\n").strip()
        bad = self.ok("qsub", stdin="exit 1\n").strip()
        arr = self.ok("qsub", "-J", "1-2", "--", "/bin/true").strip()
        after_ok = self.ok("qsub", "-W", "depend=afterok:%s" % good, stdin="true\n").strip()
        attrs = self.jobs(after_ok)[after_ok]
        self.assertEqual((attrs["job_state"], attrs["Hold_Types"]), ("H", "s"))
        doomed = self.ok("qsub", "-W", "depend=afterok:%s" % bad, stdin="true\n").strip()
        not_ok = self.ok("qsub", "-W", "depend=afternotok:%s,afterany:%s" % (bad, good),
                         stdin="true\n").strip()
        on_array = self.ok("qsub", "-W", "depend=afterok:%s" % arr, stdin="true\n").strip()
        unknown = self.ok("qsub", "-W", "depend=afterany:4242.pbsserver", stdin="true\n").strip()
        for jid in (after_ok, not_ok, on_array):
            self.assertEqual(self.wait_state(jid)["Exit_status"], 0)
        for jid in (doomed, unknown):
            attrs = self.wait_state(jid)
            self.assertNotIn("Exit_status", attrs)
        proc = self.run_cmd("qsub", "-W", "depend=afterok", stdin="true\n")
        self.assertEqual(proc.returncode, 2)

    def test_qdel_qrls(self):
        running = self.ok("qsub", stdin="sleep 30\n").strip()
        held = self.ok("qsub", "-h", stdin="true\n").strip()
        self.wait_state(running, "R")
        self.assertEqual(self.run_cmd("qdel", running).returncode, 0)
        self.assertEqual(self.wait_state(running)["Exit_status"], 256 + signal.SIGTERM)
        self.ok("qdel", held)
        attrs = self.wait_state(held)
        self.assertNotIn("Exit_status", attrs)
        proc = self.run_cmd("qdel", held)
        self.assertEqual((proc.returncode, proc.stderr), (35, "qdel: Job has finished %s\n" % held))
        arr = self.ok("qsub", "-h", "-J", "1-3", "--", "/bin/true").strip()
        seq = arr.split("[")[0]
        self.ok("qdel", "%s[2]" % seq)
        self.ok("qrls", arr)
        jobs = self.wait_for(lambda: self.jobs(arr)[arr]["job_state"] == "F" and
                             json.loads(self.run_cmd("qstat", "-t", "-f", "-F", "json", "-x", arr).stdout)["Jobs"])
        self.assertNotIn("Exit_status", jobs["%s[2].pbsserver" % seq])
        self.assertEqual(jobs["%s[3].pbsserver" % seq]["Exit_status"], 0)
        self.ok("qdel", "-x", held)
        self.assertEqual(self.run_cmd("qstat", "-x", held).returncode, 153, "qdel -x purges history")

    def test_walltime_and_oom(self):
        slow = self.ok("qsub", "-l", "walltime=1", stdin="sleep 30\n").strip()
        self.knobs(oom="big*")
        big = self.ok("qsub", "-N", "bigjob", "-l", "mem=1gb", stdin="sleep 30\n").strip()
        self.assertEqual(self.wait_state(big)["Exit_status"], -27)
        attrs = self.wait_state(slow)
        self.assertEqual(attrs["Exit_status"], -29)
        self.assertIn("walltime", self.read("STDIN.e" + slow.split(".")[0]))

    def test_faults_history_policy(self):
        self.knobs(fail_next=2, fail_code=171)
        for _ in range(2):
            proc = self.run_cmd("qstat")
            self.assertEqual((proc.returncode, proc.stderr), (171, "qstat: Invalid credential\n"))
        self.assertEqual(self.run_cmd("qstat").returncode, 0)
        self.knobs(fail_next=1, fail_code=183)
        proc = self.run_cmd("qsub", stdin="true\n")
        self.assertEqual((proc.returncode, proc.stderr), (183, "qsub: Premature end of message\n"))
        self.knobs(fail_next=1, fail_code=162, fail_commands="qdel")
        self.assertEqual(self.run_cmd("qstat").returncode, 0, "only qdel fails")
        proc = self.run_cmd("qdel", "1")
        self.assertEqual((proc.returncode, proc.stderr), (162, "qdel: Connection refused\n"))
        self.knobs(fail_commands=None)
        self.knobs(slow=0.3)
        start = time.time()
        self.run_cmd("qstat")
        self.assertGreaterEqual(time.time() - start, 0.3)
        self.knobs(slow=0, history=0.5)
        jid = self.ok("qsub", stdin="true\n").strip()
        self.wait_state(jid)
        time.sleep(0.6)
        proc = self.run_cmd("qstat", "-x", jid)
        self.assertEqual((proc.returncode, proc.stderr), (153, "qstat: Unknown Job Id %s\n" % jid))
        self.knobs(policy_limit=True)
        proc = self.run_cmd("qsub", stdin="true\n")
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(proc.stderr, "qsub: would exceed queue workq's per-user limit\n")

    def test_text_forms_and_block(self):
        proc = self.run_cmd("qsub", "-N", "txt", "-W", "block=true", stdin="exit 5\n")
        self.assertEqual(proc.returncode, 5)
        jid = proc.stdout.strip()
        lines = self.ok("qstat", "-Ex", "-w", jid).splitlines()
        self.assertTrue(lines[0].startswith("Job id"))
        self.assertTrue(set(lines[1]) <= {"-", " "})
        self.assertEqual(lines[2].split()[0], jid)
        self.assertEqual(lines[2].split()[4], "F")
        text = self.ok("qstat", "-f", "-x", jid)
        self.assertTrue(text.startswith("Job Id: %s\n" % jid))
        self.assertIn("\n    job_state = F\n", text)
        self.assertIn("\n    Exit_status = 5\n", text)
        self.assertRegex(text, r"\n\t")    # long Variable_List wraps with a tab

    def test_path_and_shebang(self):
        env = {"PATH": os.path.join(HERE, "pbs", "bin") + os.pathsep + os.environ["PATH"]}
        proc = subprocess.run(["qsub", "--version"], env=dict(self.env, **env), capture_output=True)
        self.assertEqual(proc.stdout, b"pbs_version = 23.06.06\n")


# ===========================================================================
# IBM LSF
# ===========================================================================

class LsfTests(EmuCase):
    """bsub / bjobs / bkill against schedulers.md 3 and 7.2."""

    SCHED = "lsf"

    def submit(self, *args, **kw):
        """bsub and return the job id."""
        out = self.ok("bsub", *args, **kw)
        match = re.match(r"^Job <(\d+)> is submitted to (default )?queue <normal>\.\n$", out)
        self.assertTrue(match, out)
        return match.group(1)

    def fields(self, jid, fields="jobid stat exit_code exit_reason"):
        """Return bjobs -json records for one id."""
        proc = self.run_cmd("bjobs", "-a", "-json", "-o", fields, jid)
        return json.loads(proc.stdout)["RECORDS"]

    def wait_stat(self, jid, stats=("DONE", "EXIT")):
        """Wait until every record of a job is in stats; return the records."""
        return self.wait_for(lambda: all(r.get("STAT") in stats for r in self.fields(jid)) and
                             self.fields(jid), what="%s in %s" % (jid, stats))

    def test_submit_status_and_output(self):
        out = self.ok("bsub", "-J", "ok", "-o", "out.%J", "echo hello $LSB_JOBID $LSB_JOBINDEX")
        jid = re.match(r"^Job <(\d+)> is submitted to default queue <normal>\.$", out.strip()).group(1)
        bad = self.submit("-q", "normal", "-o", "bad.%J", "-e", "bad.err", "exit 2")
        recs = self.wait_stat(jid)
        self.assertEqual(recs, [{"JOBID": jid, "STAT": "DONE", "EXIT_CODE": "", "EXIT_REASON": ""}])
        self.wait_stat(bad)
        line = self.ok("bjobs", "-a", "-noheader", "-o", "jobid stat exit_code delimiter='|'", bad)
        self.assertEqual(line, "%s|EXIT|2\n" % bad)
        line = self.ok("bjobs", "-a", "-noheader", "-o", "jobid stat exit_code delimiter='^'", jid)
        self.assertEqual(line, "%s^DONE^-\n" % jid)
        text = self.read("out." + jid)
        self.assertIn("Successfully completed.", text)
        self.assertIn("hello %s 0" % jid, text)
        self.assertIn("Exited with exit code 2.", self.read("bad." + bad))
        table = self.ok("bjobs", "-a", jid).splitlines()
        self.assertEqual(table[0].split()[:3], ["JOBID", "USER", "STAT"])
        self.assertEqual(table[1].split()[2], "DONE")

    def test_stdin_script_cwd_env(self):
        os.makedirs(os.path.join(self.work, "sub"))
        script = ("#!/bin/sh\n#BSUB -J fromstdin\n#BSUB -cwd sub\n#BSUB -oo o.%J\n"
                  'echo "pwd=$(pwd) sub=$LSB_SUBCWD name=$LSB_JOBNAME n=$LSB_DJOB_NUMPROC '
                  'hosts=$LSB_HOSTS x=$XVAR"\n')
        jid = self.submit("-n", "2", "-env", "all, XVAR=7", stdin=script)
        self.wait_stat(jid)
        text = self.read("sub/o." + jid)
        host = emucore.HOST
        self.assertIn("pwd=%s/sub sub=%s name=fromstdin n=2 hosts=%s %s x=7"
                      % (self.work, self.work, host, host), text)
        rec = self.fields(jid, "job_name cwd")[0]
        self.assertEqual(rec["JOB_NAME"], "fromstdin")

    def test_array_throttle_and_elements(self):
        script = self.write("arr.sh", TIMED_SCRIPT % "t.$LSB_JOBINDEX")
        jid = self.submit("-J", "arr[1-5]%2", "-o", "o.%J.%I", script)
        recs = self.wait_stat(jid)
        self.assertEqual(len(recs), 5)
        self.assertLessEqual(max_overlap(read_intervals(self.work, "t.")), 2)
        rows = self.ok("bjobs", "-a", "-noheader", "-o", "jobid jobindex job_name stat delimiter=','", jid)
        self.assertEqual(rows.splitlines()[2], "%s,3,arr[3],DONE" % jid)
        self.assertTrue(os.path.exists(os.path.join(self.work, "o.%s.4" % jid)))
        one = self.ok("bjobs", "-a", "-noheader", "-o", "jobid jobindex stat", "%s[4]" % jid)
        self.assertEqual(one.split(), [jid, "4", "DONE"])
        slow = self.submit("-J", "slow[1-3]%1", "sleep 0.5")
        out = self.run_cmd("bkill", "%s[3]" % slow)
        self.assertEqual((out.returncode, out.stdout), (0, "Job <%s[3]> is being terminated\n" % slow))
        recs = self.wait_stat(slow)
        self.assertEqual([r["STAT"] for r in recs], ["DONE", "DONE", "EXIT"])
        proc = self.run_cmd("bsub", "-J", "bad[0-3]", "true")
        self.assertEqual(proc.returncode, 255)
        self.assertTrue(proc.stderr.strip().endswith("Job not submitted."))

    def test_dependencies(self):
        good = self.submit("-J", "good", "sleep 0.3")
        bad = self.submit("exit 3")
        after = self.submit("-w", "done(%s)" % good, "true")
        pend = self.fields(after, "stat pend_reason")[0]
        self.assertEqual(pend, {"STAT": "PEND", "PEND_REASON": "Job dependency condition not satisfied"})
        never = self.submit("-w", "done(%s)" % bad, "true")
        combo = self.submit("-w", "exit(%s, 3) && ended(good) || started(%s)" % (bad, after), "true")
        bare = self.submit("-w", good, "true")
        neg = self.submit("-w", "!done(%s) && ended(%s)" % (bad, bad), "true")
        for jid in (after, combo, bare, neg):
            self.assertEqual(self.wait_stat(jid)[0]["STAT"], "DONE")
        rec = self.wait_for(lambda: self.fields(never, "stat pend_reason")[0]["PEND_REASON"].startswith("Dep")
                            and self.fields(never, "stat pend_reason")[0])
        self.assertEqual(rec, {"STAT": "PEND", "PEND_REASON": "Dependency condition invalid or never satisfied"})
        self.ok("bkill", never)
        self.assertEqual(self.wait_stat(never)[0]["STAT"], "EXIT")
        proc = self.run_cmd("bsub", "-w", "done(424242)", "true")
        self.assertEqual((proc.returncode, proc.stderr),
                         (255, "Job <424242>: No matching job found. Job not submitted.\n"))
        proc = self.run_cmd("bsub", "-w", "done(%s" % good, "true")
        self.assertEqual(proc.returncode, 255)
        self.assertIn("syntax", proc.stderr)

    def test_bkill_outputs_and_codes(self):
        jid = self.submit("sleep 30")
        self.wait_stat(jid, ("RUN",))
        proc = self.run_cmd("bkill", jid)
        self.assertEqual((proc.returncode, proc.stdout), (0, "Job <%s> is being terminated\n" % jid))
        rec = self.wait_stat(jid)[0]
        self.assertEqual((rec["STAT"], rec["EXIT_REASON"].split(":")[0]), ("EXIT", "TERM_OWNER"))
        self.assertIn(rec["EXIT_CODE"], ("130", "143", "137"))
        proc = self.run_cmd("bkill", jid)
        self.assertEqual((proc.returncode, proc.stderr), (255, "Job <%s>: Job has already finished\n" % jid))
        other = self.submit("sleep 30")
        proc = self.run_cmd("bkill", "-s", "SIGKILL", other, "999")
        self.assertEqual(proc.returncode, 255)
        self.assertEqual(proc.stdout, "Job <%s> is being signaled\n" % other)
        self.assertEqual(proc.stderr, "Job <999>: No matching job found\n")
        self.wait_stat(other)

    def test_bjobs_unknown_ids_and_empty(self):
        proc = self.run_cmd("bjobs")
        self.assertEqual((proc.returncode, proc.stdout, proc.stderr), (0, "", "No unfinished job found\n"))
        proc = self.run_cmd("bjobs", "-o", "jobid stat", "77")
        self.assertEqual((proc.returncode, proc.stderr), (0, "Job <77> is not found\n"))
        jid = self.submit("true")
        proc = self.run_cmd("bjobs", "-a", "-noheader", "-o", "jobid stat", jid, "77")
        self.assertEqual(proc.returncode, 255)
        self.assertEqual(proc.stdout.split()[0], jid)
        recs = json.loads(self.run_cmd("bjobs", "-a", "-json", "-o", "jobid stat", jid, "77").stdout)
        self.assertEqual(recs["COMMAND"], "bjobs")
        self.assertEqual(recs["RECORDS"][1], {"JOBID": "77", "ERROR": "Job <77> is not found"})
        self.assertTrue(all(isinstance(v, str) for r in recs["RECORDS"] for v in r.values()))
        self.assertEqual(self.run_cmd("bjobs", "-frob").returncode, 255)

    def test_limits_faults_history_hold(self):
        self.knobs(walltime_scale=0.01, oom="fat")
        slow = self.submit("-W", "1", "sleep 30")
        fat = self.submit("-J", "fat", "-M", "1GB", "sleep 30")
        rec = self.wait_stat(slow)[0]
        self.assertEqual((rec["STAT"], rec["EXIT_REASON"].split(":")[0]), ("EXIT", "TERM_RUNLIMIT"))
        self.assertEqual(rec["EXIT_CODE"], str(128 + signal.SIGUSR2))
        rec = self.wait_stat(fat)[0]
        self.assertEqual((rec["STAT"], rec["EXIT_REASON"].split(":")[0]), ("EXIT", "TERM_MEMLIMIT"))
        proc = self.run_cmd("bsub", "-W", "1:00:00", "true")
        self.assertEqual(proc.returncode, 255)
        self.assertIn("Job not submitted.", proc.stderr)
        self.knobs(fail_next=2, fail_code="down")
        proc = self.run_cmd("bjobs", "-a")
        self.assertEqual((proc.returncode, proc.stderr), (255, "LSF is down. Please wait ...\n"))
        self.knobs(fail_next=1, fail_code="empty")
        proc = self.run_cmd("bkill", slow)
        self.assertEqual((proc.returncode, proc.stdout, proc.stderr), (255, "", ""))
        self.knobs(history=0.5)
        time.sleep(0.6)
        proc = self.run_cmd("bjobs", "-a", "-o", "jobid stat", slow)
        self.assertEqual(proc.stderr, "Job <%s> is not found\n" % slow)
        self.assertIn("TERM_RUNLIMIT", self.ok("bhist", "-l", slow))
        self.knobs(history=None)
        held = self.submit("-H", "true")
        self.assertEqual(self.fields(held, "stat")[0]["STAT"], "PSUSP")
        self.assertEqual(self.ok("bresume", held), "Job <%s> is being resumed\n" % held)
        self.assertEqual(self.wait_stat(held)[0]["STAT"], "DONE")
        self.knobs(policy_limit=True)
        proc = self.run_cmd("bsub", "true")
        self.assertEqual(proc.returncode, 255)
        self.assertTrue(proc.stderr.strip().endswith("Job not submitted."))
        proc = self.run_cmd("bsub", "-Z", "true")
        self.assertEqual(proc.returncode, 255)
        self.assertIn("illegal option", proc.stderr)


# ===========================================================================
# Flux
# ===========================================================================

class FluxTests(EmuCase):
    """flux submit / jobs / cancel / job id against schedulers.md 5 and 7.3."""

    SCHED = "flux"

    def flux(self, *args, **kw):
        """Run flux and return stdout (must succeed)."""
        return self.ok("flux", *args, **kw)

    def info(self, jid):
        """Return flux jobs --json for one id."""
        return json.loads(self.flux("jobs", "--json", jid))

    def wait_inactive(self, jid):
        """Wait until a job is INACTIVE; return its JSON."""
        return self.wait_for(lambda: self.info(jid)["state"] == "INACTIVE" and self.info(jid),
                             what="%s inactive" % jid)

    def test_f58_ids(self):
        for number in (0, 1, 57, 58, 3364, 2 ** 40 + 12345, 2 ** 64 - 1):
            text = emuflux.f58_encode(number)
            self.assertEqual(emuflux.parse_id(text), number)
            self.assertEqual(emuflux.parse_id("f" + text[1:]), number)
        self.assertEqual(emuflux.f58_encode(0), "\u01921")
        self.assertEqual(emuflux.f58_encode(58), "\u019221")
        jid = self.flux("submit", "true").strip()
        self.assertRegex(jid, "^\u0192[%s]+$" % emuflux.F58)
        dec = self.flux("job", "id", jid).strip()
        self.assertEqual(self.flux("job", "id", "--to=f58", dec).strip(), jid)
        self.assertEqual(self.flux("job", "id", "--to=dec", "f" + jid[1:]).strip(), dec)
        hexa = self.flux("job", "id", "--to=hex", jid).strip()
        self.assertEqual(self.flux("job", "id", hexa).strip(), dec)
        plain = self.flux("job", "id", "--to=f58", dec, env={"LANG": "C"}).strip()
        self.assertEqual(plain, "f" + jid[1:])
        forced = self.flux("submit", "true", env={"FLUX_F58_FORCE_ASCII": "1"}).strip()
        self.assertTrue(forced.startswith("f"))
        self.assertEqual(self.flux("submit", "true", env={"LANG": "C"}).strip()[0], "f")
        for form in (jid, "f" + jid[1:], dec, hexa):
            self.assertEqual(self.info(form)["id"], int(dec))

    def test_submit_jobs_and_json(self):
        jid = self.flux("submit", "--job-name=step1", "--output=out.{{id}}.{{name}}", "-n", "2",
                        "sh", "-c", 'echo "rank=$FLUX_TASK_RANK size=$FLUX_JOB_SIZE id=$FLUX_JOB_ID"').strip()
        bad = self.flux("submit", "--output=bad.{{id.dec}}", "sh", "-c", "exit 7").strip()
        states = set()

        def done():
            info = self.info(jid)
            states.add(info["state"])
            return info if info["state"] == "INACTIVE" else None
        info = self.wait_for(done)
        self.assertIn("CLEANUP", states)
        self.assertEqual((info["result"], info["returncode"], info["name"]), ("COMPLETED", 0, "step1"))
        out = self.read("out.%s.step1" % jid)
        self.assertEqual(sorted(out.splitlines()),
                         ["rank=0 size=2 id=%s" % jid, "rank=1 size=2 id=%s" % jid])
        self.wait_inactive(bad)
        self.assertTrue(os.path.exists(os.path.join(self.work, "bad." + self.flux("job", "id", bad).strip())))
        dec = self.flux("job", "id", jid).strip()
        line = self.flux("jobs", "-a", "-n", "-o", "{id.dec} {state} {result} {returncode}", jid)
        self.assertEqual(line, "%s INACTIVE COMPLETED 0\n" % dec)
        line = self.flux("jobs", "-n", "-o", "{status} {status_abbrev} {result_abbrev} {returncode}", bad)
        self.assertEqual(line, "FAILED F F 7\n")
        both = json.loads(self.flux("jobs", "--json", jid, bad))
        self.assertEqual([j["id"] for j in both["jobs"]], [int(dec), int(self.flux("job", "id", bad))])
        held = self.flux("submit", "--urgency=hold", "true").strip()
        self.assertIn(self.info(held)["state"], ("PRIORITY", "SCHED"))
        pending = self.wait_for(lambda: self.info(held)["state"] == "SCHED" and self.info(held))
        for key in ("result", "returncode", "waitstatus", "runtime"):
            self.assertNotIn(key, pending)
        self.assertEqual(self.flux("jobs", "-n", "-o", "{state_single}", held), "S\n")
        self.flux("job", "urgency", held, "default")
        self.assertEqual(self.wait_inactive(held)["result"], "COMPLETED")
        listing = self.flux("jobs", "-a", "-n", "-o", "{name}")
        self.assertEqual(len(listing.splitlines()), 3)

    def test_cc_and_bcc(self):
        out = self.flux("submit", "--cc=1-3", "--output=cc.{cc}.out", "sh", "-c", "echo $FLUX_JOB_CC {cc}")
        ids = out.split()
        self.assertEqual(len(ids), 3)
        for jid in ids:
            self.wait_inactive(jid)
        self.assertEqual([self.read("cc.%d.out" % i).strip() for i in (1, 2, 3)], ["1 1", "2 2", "3 3"])
        ids = self.flux("submit", "--bcc=4-5", "--output=bcc.{cc}.out", "sh", "-c",
                        "echo x${FLUX_JOB_CC}x").split()
        for jid in ids:
            self.wait_inactive(jid)
        self.assertEqual(self.read("bcc.4.out").strip(), "xx")

    def test_dependencies(self):
        bad = self.flux("submit", "sh", "-c", "sleep 0.2; exit 1").strip()
        good = self.flux("submit", "true").strip()
        doomed = self.flux("submit", "--dependency=afterok:" + bad, "true").strip()
        self.assertEqual(self.info(doomed)["state"], "DEPEND")
        anyway = self.flux("submit", "--dependency=afterany:" + bad, "--dependency=afterok:" + good,
                           "true").strip()
        notok = self.flux("submit", "--dependency=afternotok:" + bad, "true").strip()
        started = self.flux("submit", "--dependency=afterstart:" + good, "true").strip()
        info = self.wait_inactive(doomed)
        self.assertEqual((info["result"], info["exception"]["type"]), ("FAILED", "dependency"))
        for jid in (anyway, notok, started):
            self.assertEqual(self.wait_inactive(jid)["result"], "COMPLETED")
        proc = self.run_cmd("flux", "submit", "--dependency=afterok:fZZ9", "true")
        self.assertEqual(proc.returncode, 1)
        self.assertTrue(proc.stderr.startswith("flux-submit: ERROR: "))
        self.assertIn("job not found", proc.stderr)
        proc = self.run_cmd("flux", "submit", "--dependency=sometime:1", "true")
        self.assertEqual(proc.returncode, 1)

    def test_cancel(self):
        held = self.flux("submit", "--urgency=hold", "true").strip()
        running = self.flux("submit", "sleep", "30").strip()
        self.wait_for(lambda: self.info(running)["state"] == "RUN")
        self.assertEqual(self.run_cmd("flux", "cancel", held, running).stdout, "")
        info = self.wait_inactive(held)
        self.assertEqual((info["result"], info["returncode"]), ("CANCELED", -128))
        self.assertEqual(self.wait_inactive(running)["result"], "CANCELED")
        proc = self.run_cmd("flux", "cancel", held)
        self.assertEqual((proc.returncode, proc.stderr), (1, "flux-cancel: ERROR: %s: job is inactive\n" % held))
        proc = self.run_cmd("flux", "cancel", "fZZ9")
        self.assertEqual((proc.returncode, proc.stderr), (1, "flux-cancel: ERROR: \u0192ZZ9: unknown job id\n"))
        self.flux("submit", "--urgency=hold", "true")
        proc = self.run_cmd("flux", "cancel", "--all")
        self.assertEqual(proc.stderr, "flux-cancel: Canceled 1 jobs (0 errors)\n")

    def test_timeout_oom_faults_purge(self):
        slow = self.flux("submit", "-t", "0.5s", "sleep", "30").strip()
        self.knobs(oom="fat")
        fat = self.flux("submit", "--job-name=fat", "sleep", "30").strip()
        info = self.wait_inactive(slow)
        self.assertEqual((info["result"], info["exception"]["type"]), ("TIMEOUT", "timeout"))
        info = self.wait_inactive(fat)
        self.assertEqual(info["result"], "FAILED")
        self.knobs(fail_next=1)
        proc = self.run_cmd("flux", "jobs", "-a")
        self.assertEqual(proc.returncode, 1)
        self.assertTrue(proc.stderr.startswith("flux-jobs: ERROR: Unable to connect to Flux"))
        self.knobs(history=0.3)
        time.sleep(0.4)
        proc = self.run_cmd("flux", "jobs", "--json", slow)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("unknown", proc.stderr)
        proc = self.run_cmd("flux", "submit", "--frobnicate", "true")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("unrecognized arguments", proc.stderr)
        proc = self.run_cmd("flux", "submit", "--job", "x", "true")
        self.assertEqual(proc.returncode, 2, "long options may not be abbreviated")
        self.knobs(policy_limit=True)
        proc = self.run_cmd("flux", "submit", "true")
        self.assertEqual(proc.returncode, 1)
        self.assertTrue(proc.stderr.startswith("flux-submit: ERROR: "))


if __name__ == "__main__":
    unittest.main()
