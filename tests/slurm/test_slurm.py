"""slurm/tbrm.sbatch on a real single-host SLURM cluster (munged, slurmctld, slurmd started by this module).

Install the daemons first (CI does): `sudo slurm/install_slurm_for_tests.sh`. Everything else is private to the test:
a munge key and socket, a slurm.conf on free ports (SLURM_CONF, never /etc/slurm), state and spool directories, all
under one temporary directory; the node offers its real CPUs and one fake GPU (gres `gpu`, File=/dev/null) so that
`--gpus-per-node` requests work like on a GPU cluster while training runs on tbrm_verl's CPU platform.

* test_sbatch_trains_checkpoints_and_requeue_resumes: `sbatch --nodes=1 --gpus-per-node=1 slurm/tbrm.sbatch
  profile=cpu` (ranks from SLURM_GPUS_ON_NODE; the script states profile=gpu on a GPU allocation, and
  tbrm_verl.main never picks a profile from the driver's hardware on a cluster, so this fake-GPU cluster states the
  CPU profile itself), 4 steps with a checkpoint every 2. Once global_step_2 is saved the test sends the job's batch
  shell SIGUSR1 (what `--signal=B:USR1@...` delivers before the time limit): the script stops the trainer, stops Ray
  and requeues the job; the second run must resume at step 3 (metrics.1.jsonl = first launch, metrics.jsonl starts
  at step 3) and the job end COMPLETED with 4 steps and a checkpoint at global_step_4. To make the signal land
  deterministically between the step-2 checkpoint and the end of step 4, the first launch's reward function waits
  while a hold file exists and global_step_2 is on disk (the test removes the file after signalling). One job covers
  what two did before (a plain 2-step job was a prefix of this one); the CPU-cluster spelling (`TBRM_SLURM_CPU=1
  --gpus-per-node=0`) is checked without SLURM daemons in test_slurm_env.py.

Teardown cancels every job, stops the daemons by their pid files and kills leftover processes of the test's Ray
clusters by PID (never by name), pass or fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import e2e_helpers as H  # noqa: E402  (not `tests.e2e_helpers`: verl ships a top-level `tests` package)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "slurm" / "tbrm.sbatch"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")
_missing = [c for c in COMMANDS if not shutil.which(c, path=SBIN_PATH)]
if _missing:
    pytest.skip(f"SLURM is not installed ({', '.join(_missing)} not found): run slurm/install_slurm_for_tests.sh as root",
                allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("a private slurmd must run as root (it starts jobs as their user)", allow_module_level=True)

JOB_TIMEOUT_S = 420


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (ppid, cmd)
    return out


def _procs_under(marker: str) -> set[int]:
    """Processes whose command line mentions `marker` (a private temp dir), and everything below them."""
    ps = _procs()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in ps.items():
        children.setdefault(ppid, []).append(pid)
    todo = [pid for pid, (_, cmd) in ps.items() if marker in cmd and pid != os.getpid()]
    found: set[int] = set()
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


def _kill(pids: set[int], grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.2)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
        self.env["PATH"] = SBIN_PATH
        self.env["SLURM_CONF"] = str(root / "slurm.conf")
        self.pidfiles: list[Path] = []

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}\n{self.daemon_logs()}")
        return r.stdout

    def daemon_logs(self) -> str:
        logs = [self.root / "log" / n for n in ("slurmctld.log", "slurmd.log")] + [self.root / "munge" / "munged.log"]
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(mode=0o755)
        (r / "munge").chmod(0o711)  # munge wants its socket directory not writable by others
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_sock = r / "munge" / "munge.sock"
        self._daemon(["munged", "--force", f"--socket={munge_sock}", f"--key-file={key}",
                      f"--log-file={r / 'munge' / 'munged.log'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                      f"--seed-file={r / 'munge' / 'munged.seed'}"], r / "munge" / "munged.pid")

        hw = dict(kv.split("=", 1) for kv in self.cmd("slurmd", "-C").split() if "=" in kv)
        cpus, mem = int(hw["CPUs"]), int(int(hw["RealMemory"]) * 0.9)
        ctld_port, slurmd_port = H.free_ports(2)
        # cred_expire: SLURM holds a requeued job for cred_expire + 1 s (default 120) before it may start again;
        # starting it earlier (scontrol update StartTime=now) fails with "Job credential revoked"
        (r / "slurm.conf").write_text(textwrap.dedent(f"""\
            ClusterName=tbrmtest
            SlurmctldHost={self.host}(127.0.0.1)
            SlurmctldPort={ctld_port}
            SlurmdPort={slurmd_port}
            AuthType=auth/munge
            AuthInfo=socket={munge_sock},cred_expire=10
            CredType=cred/munge
            SlurmUser=root
            SlurmdUser=root
            StateSaveLocation={r / 'state'}
            SlurmdSpoolDir={r / 'spool'}
            SlurmctldPidFile={r / 'slurmctld.pid'}
            SlurmdPidFile={r / 'slurmd.pid'}
            SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
            SlurmdLogFile={r / 'log' / 'slurmd.log'}
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            SwitchType=switch/none
            MpiDefault=none
            SchedulerType=sched/backfill
            SchedulerParameters=sched_interval=5,bf_interval=5
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            ReturnToService=2
            JobRequeue=1
            KillWait=30
            MinJobAge=600
            GresTypes=gpu
            NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} Gres=gpu:1 State=UNKNOWN
            PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
        """))
        # one fake GPU: lets jobs ask --gpus-per-node=1 as on a GPU cluster (no device behind it)
        (r / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File=/dev/null\n")
        self._daemon(["slurmctld", "-c"], r / "slurmctld.pid")
        self._daemon(["slurmd"], r / "slurmd.pid")
        deadline = time.time() + 90
        state = ""
        while time.time() < deadline:
            state = self.cmd("sinfo", "-h", "-o", "%T", check=False).strip()
            if state == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"the test node did not become idle in 90 s (state {state!r})\n{self.daemon_logs()}")

    def _daemon(self, args: list[str], pidfile: Path) -> None:
        self.pidfiles.append(pidfile)
        self.cmd(*args)
        deadline = time.time() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if time.time() > deadline:
                raise RuntimeError(f"{args[0]} wrote no pid file\n{self.daemon_logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if (self.root / "slurm.conf").exists():
            self.cmd("scancel", "--user", "root", check=False)  # this cluster's jobs only (its own SLURM_CONF)
            deadline = time.time() + 60
            while time.time() < deadline and self.cmd("squeue", "-h", check=False).strip():
                time.sleep(1)
        for pidfile in reversed(self.pidfiles):  # slurmd, slurmctld, munged
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            _kill({pid}, grace_s=10)
        _kill(_procs_under(str(self.root)))  # e.g. a Ray node of a job that SLURM could not stop

    # ------------------------------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> dict[str, str]:
        out = self.cmd("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


@pytest.fixture(scope="module")
def slurm():
    root = Path(tempfile.mkdtemp(prefix="tbrm_slurm_", dir="/tmp"))  # short: unix socket paths are length-limited
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("TBRM_KEEP_TMP"):
            print(f"\nkept {root} (TBRM_KEEP_TMP)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _submit(slurm: SlurmCluster, name: str, sbatch_args: list[str], overrides: list[str], extra_env: dict) -> tuple:
    """sbatch slurm/tbrm.sbatch for the embedded task on the CPU platform; returns (job id, run dir, output file)."""
    work = slurm.root / name
    work.mkdir()
    ports = H.free_ports(10)
    env = {
        **slurm.env,
        "TBRM_HOME": str(REPO),
        "TBRM_PYTHON": sys.executable,
        "TBRM_RUN_DIR": str(work / "run"),
        "TBRM_RAY_TMPDIR": str(work / "ray"),
        "TBRM_NODE_JOIN_TIMEOUT": "180",
        # the machine may run other Ray clusters: every port of this one is a free one
        "TBRM_RAY_PORT": str(ports[0]),
        "TBRM_RAY_DASHBOARD_PORT": str(ports[1]),
        "TBRM_RAY_CLIENT_PORT": str(ports[2]),
        "TBRM_RAY_START_ARGS": (f"--node-manager-port={ports[3]} --object-manager-port={ports[4]} "
                                f"--dashboard-agent-listen-port={ports[5]} --dashboard-agent-grpc-port={ports[6]} "
                                f"--metrics-export-port={ports[7]} --runtime-env-agent-port={ports[8]} "
                                "--object-store-memory=500000000"),
        **extra_env,
    }
    out_file = work / "job-%j.out"
    args = ["sbatch", "--parsable", "--nodes=1", f"--output={out_file}", f"--chdir={work}", "--time=30",
            f"--job-name=tbrm-{name}", *sbatch_args, str(SBATCH_SCRIPT),
            "trainer.save_freq=2", "trainer.test_freq=-1", "trainer.val_before_train=false", *overrides]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stdout}{r.stderr}"
    job_id = r.stdout.strip().split(";")[0]
    return job_id, work / "run", Path(str(out_file).replace("%j", job_id)), work


def _wait_job(slurm: SlurmCluster, job_id: str, out: Path, timeout: float = JOB_TIMEOUT_S, until=None) -> dict:
    """Poll until the job is finished (or `until(job)` is true)."""
    deadline = time.time() + timeout
    job: dict = {}
    while time.time() < deadline:
        job = slurm.job(job_id)
        state = job.get("JobState", "")
        if until is not None and until(job):
            return job
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                     "DEADLINE", "PREEMPTED"):
            return job
        time.sleep(1)
    text = out.read_text(errors="replace")[-6000:] if out.exists() else "(no output file)"
    raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s (state {job.get('JobState')}):\n{text}")


def _steps(path: Path) -> dict[int, dict]:
    steps = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "actor/tbrm_loss" in rec["data"]:
                steps[int(rec["step"])] = rec["data"]
    return steps


def _assert_no_ray_left(work: Path) -> None:
    left = _procs_under(str(work / "ray"))
    if left:
        ps = _procs()
        desc = "\n".join(f"  {p}: {ps.get(p, (0, '?'))[1][:160]}" for p in sorted(left))
        _kill(left)
        raise AssertionError(f"Ray processes of the job survived it:\n{desc}")


HOLD_REWARD = '''
"""Test-only reward: the project's, but the first launch waits once global_step_2 is saved (see test_slurm.py)."""
import os
import time

from tbrm_verl.tasks.math.reward import compute_score as _score


def compute_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, hold_file="",
                  ckpt_dir="", **kw):
    deadline = time.time() + 300
    while hold_file and os.path.exists(hold_file) and os.path.isdir(os.path.join(ckpt_dir, "global_step_2")) \\
            and time.time() < deadline:
        time.sleep(0.5)
    return _score(data_source, solution_str, ground_truth, extra_info, **kw)
'''


def test_sbatch_trains_checkpoints_and_requeue_resumes(slurm):
    t0 = time.time()
    reward = slurm.root / "hold_reward.py"
    reward.write_text(HOLD_REWARD)
    hold = slurm.root / "HOLD"
    hold.write_text("first launch waits after the step-2 checkpoint\n")
    name = "requeue"
    ckpt = slurm.root / name / "run" / "checkpoints"
    job_id, run, out, work = _submit(
        slurm, name, ["--gpus-per-node=1"],
        ["trainer.total_training_steps=4", "profile=cpu", f"reward.custom_reward_function.path={reward}",
         f"+reward.custom_reward_function.reward_kwargs.hold_file={hold}",
         f"+reward.custom_reward_function.reward_kwargs.ckpt_dir={ckpt}"], {})

    def saved_step_2(job):
        latest = ckpt / "latest_checkpointed_iteration.txt"
        return latest.exists() and latest.read_text().strip() == "2"

    job = _wait_job(slurm, job_id, out, until=saved_step_2)
    assert job["JobState"] == "RUNNING" and saved_step_2(job), \
        f"job {job_id} {job['JobState']} before the step-2 checkpoint:\n{out.read_text(errors='replace')[-6000:]}"
    t_signal = time.time() - t0
    # what --signal=B:USR1@T delivers to the batch shell before the time limit
    slurm.cmd("scancel", "--batch", "--signal=USR1", job_id)
    hold.unlink()

    job = _wait_job(slurm, job_id, out, until=lambda j: int(j.get("Restarts", 0)) >= 1)
    job = _wait_job(slurm, job_id, out)
    text = out.read_text(errors="replace")
    assert job["JobState"] == "COMPLETED", f"job {job_id} ended {job['JobState']} ({job.get('ExitCode')}):\n{text[-6000:]}"
    assert job["Restarts"] == "1", job
    assert "received SIGUSR1" in text and f"requeued job {job_id}" in text, text[-6000:]
    assert re.search(r"job \d+ run 1: nodes", text), text[-6000:]
    assert "1 of 1 Ray node(s) alive" in text, text[-3000:]
    # the rank count comes from the allocation's GPUs (SLURM_GPUS_ON_NODE), on both launches
    assert text.count("trainer.nnodes=1 trainer.n_gpus_per_node=1 trainer.resume_mode=auto") >= 2, text[-3000:]

    first, second = _steps(run / "metrics.1.jsonl"), _steps(run / "metrics.jsonl")
    # the first launch may have finished step 3 (its rollouts can start before step 2's checkpoint), never step 4
    assert sorted(first)[:2] == [1, 2] and 4 not in first, f"first launch logged steps {sorted(first)}"
    assert sorted(second) == [3, 4], f"second launch logged steps {sorted(second)} (expected to resume at 3)"
    assert all(math.isfinite(m["actor/tbrm_loss"]) for m in second.values())
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert any((ckpt / "global_step_4" / "actor").iterdir()), "empty actor checkpoint"
    _assert_no_ray_left(work)
    print(f"\nsbatch requeue: signalled at {t_signal:.0f} s, done at {time.time() - t0:.0f} s")
