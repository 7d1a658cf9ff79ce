"""Helpers for tests/cpu/test_e2e_cpu.py: run `python -m tbrm_verl.main` as a subprocess, own every process it starts,
and read what it wrote (metrics, rollout dumps, checkpoints).

Process ownership. Other people's Ray clusters may run on the same machine, so "a Ray process that appeared during
the test" is not proof that the test started it. Each run is therefore started in a new session
(`start_new_session=True`, so its session id is the CLI's pid); Ray's gcs_server, raylet, dashboard and every worker
it forks or spawns inherit that session id (none of them calls setsid), and keep it after being re-parented when
the CLI exits. Every run also carries a unique `TBRM_E2E_RUN` environment marker, inherited by Ray's processes, as a
second identification (a process that rewrites its title can clobber its /proc environ, hence only second).
Anything found by either is killed by pid, SIGTERM then SIGKILL, never by name.

Imported with a sys.path insert of the tests directory: verl installs a top-level `tests` package of its own.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
MARKER = "TBRM_E2E_RUN"
SESSION_TAG = uuid.uuid4().hex[:8]  # one pytest process: every run's marker starts with it
RAY_NAMES = ("gcs_server", "raylet", "ray::", "ray/dashboard", "ray/_private", "ray/autoscaler", "ray-dashboard",
             "default_worker.py", "log_monitor", "runtime_env")
STARTED_SIDS: set[int] = set()  # session ids of every run started by this pytest process


# ----------------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    pid: int
    sid: int
    cmd: str
    marker: str | None

    def is_ray(self) -> bool:
        return any(n in self.cmd for n in RAY_NAMES)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def processes() -> list[Proc]:
    """Every process we can see: pid, session id, command line, TBRM_E2E_RUN marker (None if unreadable/absent)."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        stat = _read(f"/proc/{d}/stat")
        if not stat:
            continue
        try:  # "pid (comm) state ppid pgrp session ...": comm may contain spaces and parentheses
            fields = stat[stat.rindex(b")") + 2 :].split()
            sid = int(fields[3])
        except (ValueError, IndexError):
            continue
        cmd = (_read(f"/proc/{d}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace").strip()
        marker = None
        env = _read(f"/proc/{d}/environ")
        if env:
            for item in env.split(b"\0"):
                if item.startswith(MARKER.encode() + b"="):
                    marker = item.split(b"=", 1)[1].decode(errors="replace")
                    break
        out.append(Proc(int(d), sid, cmd, marker))
    return out


def owned(sids: set[int] = frozenset(), markers: set[str] = frozenset(), marker_prefix: str | None = None) -> list[Proc]:
    """Processes in one of `sids`, or carrying one of `markers` (or any marker starting with `marker_prefix`)."""
    res = []
    for p in processes():
        if p.sid in sids or (p.marker is not None and (p.marker in markers
                                                       or (marker_prefix and p.marker.startswith(marker_prefix)))):
            res.append(p)
    return res


def kill_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM each pid, wait up to grace_s, SIGKILL what is left. Pid by pid, nothing by name or group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or sig == signal.SIGKILL:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline:
            alive = [p for p in alive if _alive(p)]
            if not alive:
                return
            time.sleep(0.2)
        pids = alive


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return False
    try:
        return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"  # a zombie is dead, waiting for its parent
    except (ValueError, IndexError):
        return False


def ray_processes_of_this_session() -> list[Proc]:
    """Processes started by any run of this pytest process (by marker) that are still alive."""
    return [p for p in owned(marker_prefix=SESSION_TAG) if _alive(p.pid)]


# -------------------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    run_dir: str
    argv: list[str]
    rc: int | None
    wall_s: float
    log_path: str
    timed_out: bool = False
    leftovers: list[Proc] = field(default_factory=list)  # processes of the run alive after the CLI exited (+grace)

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-n:])

    def describe(self) -> str:
        return (f"run {self.run_dir}: rc={self.rc} timed_out={self.timed_out} wall={self.wall_s:.0f}s\n"
                f"argv: {' '.join(self.argv)}\nlog tail:\n{self.tail()}")


def run_main(run_dir: str, overrides: list[str], timeout_s: float = 600.0, leftover_grace_s: float = 20.0,
             interrupt_at_checkpoint: int | None = None) -> RunResult:
    """Run `python -m tbrm_verl.main run.dir=run_dir *overrides` to completion, one process session of its own.

    On return no process of the run is alive: anything found after the CLI exited (plus `leftover_grace_s` for
    processes already shutting down) is recorded in `leftovers`, then killed. On timeout everything is killed.
    With `interrupt_at_checkpoint=N` the CLI gets SIGINT (what Ctrl-C sends it) as soon as the checkpoint tracker
    under run_dir/checkpoints names step N or later, and the run is then waited for like any other; the run pauses at
    the start of the step after each checkpoint (TBRM_TEST_PAUSE_AFTER_CHECKPOINT_S), so the signal lands in that step
    even on a machine where a step takes half a second.
    """
    os.makedirs(run_dir, exist_ok=True)
    run_id = f"{SESSION_TAG}-{uuid.uuid4().hex[:8]}"
    ray_tmp = tempfile.mkdtemp(prefix="tbe2e_", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = dict(os.environ)
    env.update({
        MARKER: run_id,
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "VERL_LOGGING_LEVEL": "INFO",  # the tests read verl's INFO lines (worker groups built, resume)
    })
    env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    if interrupt_at_checkpoint is not None:  # a window for the signal after each checkpoint (tbrm_verl/trainer.py)
        env["TBRM_TEST_PAUSE_AFTER_CHECKPOINT_S"] = "60"
    argv = [PYTHON, "-m", "tbrm_verl.main", f"run.dir={run_dir}", *overrides]
    log_path = os.path.join(run_dir, f"stdout.{len(glob.glob(os.path.join(run_dir, 'stdout.*.log')))}.log")
    t0 = time.time()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sids = {proc.pid}
        STARTED_SIDS.add(proc.pid)
        try:
            if interrupt_at_checkpoint is not None:
                tracker = os.path.join(run_dir, "checkpoints", "latest_checkpointed_iteration.txt")
                while proc.poll() is None and time.time() - t0 < timeout_s:
                    if os.path.exists(tracker):
                        with open(tracker) as f:
                            saved = int(f.read().strip() or 0)  # empty while verl writes it
                        if saved >= interrupt_at_checkpoint:
                            proc.send_signal(signal.SIGINT)
                            break
                    time.sleep(0.25)
            rc = proc.wait(timeout=max(1.0, timeout_s - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_pids([proc.pid] + [p.pid for p in owned(sids, {run_id}) if p.pid != proc.pid], grace_s=10)
            rc = proc.wait(timeout=60)
        except BaseException:  # KeyboardInterrupt, pytest timeout: leave nothing behind
            kill_pids([proc.pid] + [p.pid for p in owned(sids, {run_id}) if p.pid != proc.pid], grace_s=5)
            proc.wait(timeout=60)
            raise
    wall = time.time() - t0
    leftovers: list[Proc] = []
    deadline = time.time() + leftover_grace_s
    while True:
        leftovers = [p for p in owned(sids, {run_id}) if _alive(p.pid)]
        if not leftovers or time.time() >= deadline:
            break
        time.sleep(0.5)
    if leftovers:
        kill_pids([p.pid for p in leftovers])
    if not [p for p in owned(sids, {run_id}) if _alive(p.pid)]:
        STARTED_SIDS.discard(proc.pid)  # all gone: the id may now be reused by an unrelated session
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return RunResult(run_dir, argv[1:], rc, wall, log_path, timed_out, leftovers)


# ------------------------------------------------------------------------------------------------ run contents


def load_metrics(path: str) -> dict[int, dict]:
    """verl's file logger output: one `{"step": N, "data": {...}}` per line -> {N: data}."""
    steps: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return dict(sorted(steps.items()))


def load_rollouts(rollout_dir: str, step: int) -> list[dict]:
    """verl's `trainer.rollout_data_dir` dump of one step (`{step}.jsonl`: input, output, gts, score, step, uid)."""
    with open(os.path.join(rollout_dir, f"{step}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoint_state(actor_dir: str) -> dict:
    """Full actor state dict from verl's FSDP2 checkpoint (`model_world_size_W_rank_R.pt`, DTensor shards).

    Each rank's file holds DTensors sharded on one mesh dimension; the local shards are concatenated along their
    Shard(dim) in rank order (a Replicate placement is taken from rank 0).
    """
    import torch
    from torch.distributed.tensor import DTensor

    files = glob.glob(os.path.join(actor_dir, "model_world_size_*_rank_*.pt"))
    assert files, f"no FSDP model shards in {actor_dir}: {os.listdir(actor_dir)}"
    world = {int(os.path.basename(f).split("_")[3]) for f in files}
    assert len(world) == 1, f"mixed world sizes in {actor_dir}: {files}"
    (ws,) = world
    shards = []
    for r in range(ws):
        path = os.path.join(actor_dir, f"model_world_size_{ws}_rank_{r}.pt")
        assert os.path.exists(path), f"missing shard {path}"
        shards.append(torch.load(path, map_location="cpu", weights_only=False))
    full = {}
    for name, t0 in shards[0].items():
        if not isinstance(t0, DTensor):
            full[name] = t0
            continue
        placements = t0.placements
        assert len(placements) == 1, f"{name}: unexpected placements {placements}"
        if placements[0].is_shard():
            full[name] = torch.cat([s[name].to_local() for s in shards], dim=placements[0].dim)
        else:
            full[name] = t0.to_local()
    return full


def initial_state(model_dir: str) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        state.update(load_file(f))
    assert state, f"no safetensors in {model_dir}"
    return state


def max_abs_diff(a: dict, b: dict, keys) -> dict[str, float]:
    return {k: float((a[k].float() - b[k].float()).abs().max()) for k in keys}


def l2_distance(a: dict, b: dict, keys) -> float:
    """||a - b|| over the named tensors, all flattened into one vector."""
    return float(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys) ** 0.5)


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on loopback right now (held open together so they differ)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
