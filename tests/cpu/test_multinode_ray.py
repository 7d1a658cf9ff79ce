"""Two Ray nodes on one machine, and `python -m tbrm_verl.main trainer.nnodes=2 trainer.n_gpus_per_node=1` joining them.

What a multi-node (SLURM) launch does, minus SLURM: `ray start --head` and `ray start --address=HEAD:PORT` each
declare 8 logical CPUs and 1 logical GPU (the CPU platform's stand-in for a GPU), then the trainer connects to the
running cluster through `RAY_ADDRESS` (tbrm_verl.main then drops `ray_kwargs.ray_init.num_cpus/num_gpus`, which Ray
refuses when joining a cluster). verl places one FSDP rank per node (one GPU bundle each).

Evidence that the two ranks ran on two different nodes: after the run, the GCS (which keeps dead actors) is asked
for every actor of the job; verl's FSDP workers are the actors that reserved a GPU, and their `node_id`s must be the
two node ids of the cluster. The nodes share 127.0.0.1, so IP addresses in the logs would prove nothing.

Each node is a `ray start --block` child of the test in its own process group: teardown sends SIGTERM (Ray stops
its own processes), then SIGKILLs anything still alive in those groups or below those PIDs. No `ray stop` (it would
kill other users' Ray runs on a shared machine). Ports are free ones picked at run time; the temp dir is private.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import e2e_helpers as H  # noqa: E402  (not `tests.e2e_helpers`: verl ships a top-level `tests` package)

pytestmark = pytest.mark.e2e

PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
JOIN_TIMEOUT_S = 240
TRAIN_TIMEOUT_S = 420
# The embedded task's micro-batch sizes (16) divide each rank's share for 1, 2 and 4 ranks: no overrides needed.
TWO_RANK_OVERRIDES: list[str] = []


def _descendants(pids: set[int]) -> set[int]:
    """pids and every live process below them, or in their process groups (from /proc)."""
    children: dict[int, list[int]] = {}
    pgid_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        pgid_of[pid] = int(fields[2])
    found, todo = set(), [p for p in pids]
    todo += [p for p, g in pgid_of.items() if g in pids]
    while todo:
        p = todo.pop()
        if p in found or p == os.getpid():
            continue
        found.add(p)
        todo += children.get(p, [])
    return found


def _kill_all(pids: set[int], grace_s: float = 10.0) -> None:
    procs = _descendants(pids)
    for p in procs:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in procs):
        time.sleep(0.5)
    for p in procs | _descendants(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


class LoopbackRayCluster:
    """`ray start --block` head and workers on 127.0.0.1, each with its own ports."""

    def __init__(self, root: Path, n_nodes: int, cpus: int = 8, gpus: int = 1, resources: dict | None = None):
        self.root = root
        self.temp_dir = root / "ray"
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # token auth on, with this cluster's own token (not ~/.ray/auth_token, which other runs may share)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(k, None)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        ports = H.free_ports(4 + 6 * n_nodes)
        self.port = ports.pop()
        self.address = f"127.0.0.1:{self.port}"
        for i in range(n_nodes):
            p = [ports.pop() for _ in range(6)]
            cmd = [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                   f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={self.temp_dir}",
                   "--object-store-memory=500000000", *([f"--resources={json.dumps(resources)}"] if resources else []),
                   f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
                   f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
                   f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}"]
            if i == 0:
                cmd += ["--head", f"--port={self.port}", f"--ray-client-server-port={ports.pop()}",
                        f"--dashboard-port={ports.pop()}", "--dashboard-host=127.0.0.1"]
            else:
                cmd += [f"--address={self.address}"]
            log = root / f"ray_node{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=root,
                                                   start_new_session=True))
            if i == 0:
                self.wait_for_nodes(1)  # workers need the head's GCS

    def query(self, code: str, timeout: float = 120) -> str:
        """Run `code` in a fresh Python connected to the cluster (never in the test process)."""
        prog = "import ray, json\nray.init(address=%r, logging_level='ERROR', log_to_driver=False)\n" % self.address
        env = {**self.env, "RAY_ADDRESS": self.address}  # for APIs that look the cluster up (ray.util.state)
        r = subprocess.run([PY, "-c", prog + textwrap.dedent(code)], env=env, cwd=self.root, text=True,
                           capture_output=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"query failed (rc={r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return r.stdout

    def wait_for_nodes(self, n: int, timeout: float = JOIN_TIMEOUT_S) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            dead = [(i, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited early {dead}:\n{self.log_tails()}")
            if not (self.temp_dir / "ray_current_cluster").exists():
                if time.time() > deadline:
                    raise TimeoutError(f"the Ray head did not start in {timeout:.0f} s:\n{self.log_tails()}")
                time.sleep(1)
                continue
            left = max(5.0, deadline - time.time())
            out = self.query(f"""
                import time
                deadline = time.time() + {left}
                while True:
                    alive = [n for n in ray.nodes() if n['Alive']]
                    if len(alive) >= {n} or time.time() > deadline:
                        break
                    time.sleep(1)
                print(json.dumps([{{'id': n['NodeID'], 'resources': n['Resources']}} for n in alive]))
            """, timeout=left + 90)
            nodes = json.loads(out.strip().splitlines()[-1])
            if len(nodes) >= n:
                return nodes
            raise TimeoutError(f"only {len(nodes)} of {n} Ray nodes joined after {timeout:.0f} s:\n{self.log_tails()}")

    def log_tails(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        pids = {p.pid for p in self.procs}
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _kill_all(pids)  # whatever `ray start --block` left: by process group and parentage, never by name


@contextlib.contextmanager
def _loopback_cluster(n_nodes: int, **kw):
    root = Path(tempfile.mkdtemp(prefix="tbrm_mn_", dir="/tmp"))  # short: Ray's unix socket paths are length-limited
    c = None
    try:
        c = LoopbackRayCluster(root, n_nodes=n_nodes, **kw)
        yield c
    finally:
        if c is not None:
            c.stop()
        if os.environ.get("TBRM_KEEP_TMP"):
            print(f"\nkept {root} (TBRM_KEEP_TMP)")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster():
    with _loopback_cluster(2) as c:
        yield c


def _steps(metrics: Path) -> dict[int, dict]:
    out = {}
    for line in metrics.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[int(rec["step"])] = rec["data"]
    return out


def test_two_ray_nodes_two_fsdp_ranks(cluster):
    t0 = time.time()
    nodes = cluster.wait_for_nodes(2)
    assert len(nodes) == 2
    assert all(n["resources"].get("GPU") == 1 and n["resources"].get("CPU") == 8 for n in nodes), nodes
    node_ids = {n["id"] for n in nodes}
    t_cluster = time.time() - t0

    run_dir = cluster.root / "run"
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}  # only the trainer's environment
    # On a cluster the driver never picks the profile from its own hardware: the CPU profile is stated (without
    # it the configured gpu profile is refused against these GPU-less nodes: test_profile_mismatch_on_a_cluster)
    cmd = [PY, "-m", "tbrm_verl.main", "profile=cpu", "trainer.nnodes=2", "trainer.n_gpus_per_node=1",
           "trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.test_freq=-1",
           "trainer.val_before_train=false",
           f"run.dir={run_dir}", *TWO_RANK_OVERRIDES]
    t1 = time.time()
    log = cluster.root / "train.log"
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cluster.root, timeout=TRAIN_TIMEOUT_S)
    out = log.read_text(errors="replace")
    assert r.returncode == 0, f"trainer failed (rc={r.returncode}):\n{out[-6000:]}"
    t_train = time.time() - t1
    # it joined the cluster instead of starting its own
    init_lines = [line for line in out.splitlines() if "ray init kwargs" in line]
    assert init_lines and not any("num_cpus" in line or "num_gpus" in line for line in init_lines), init_lines
    assert "Connecting to existing Ray cluster" in out or "Connected to Ray cluster" in out, out[-3000:]

    steps = {s: m for s, m in _steps(run_dir / "metrics.jsonl").items() if "actor/tbrm_loss" in m}
    assert sorted(steps) == [1, 2], steps.keys()
    for s, m in steps.items():
        assert math.isfinite(m["actor/tbrm_loss"]), (s, m["actor/tbrm_loss"])

    actors = json.loads(cluster.query("""
        from ray.util.state import list_actors
        acts = list_actors(address=%r, detail=True, limit=10000, raise_on_missing_output=False)
        print(json.dumps([{'cls': a.class_name, 'name': a.name, 'node': a.node_id, 'state': a.state,
                           'res': a.required_resources} for a in acts]))
    """ % cluster.address).strip().splitlines()[-1])
    # verl's FSDP workers reserve a GPU inside a placement group: resource names GPU_group_<pg id> (and _<bundle>)
    ranks = [a for a in actors if any(k == "GPU" or k.startswith("GPU_group_") for k in (a["res"] or {}))]
    summary = "\n".join(f"{a['cls']} {a['name']} node={a['node']} {a['res']} {a['state']}" for a in actors)
    assert len(ranks) == 2, f"expected 2 GPU-holding (FSDP rank) actors:\n{summary}"
    assert {a["node"] for a in ranks} == node_ids, f"FSDP ranks not on both nodes {node_ids}:\n{summary}"
    print(f"\ncluster up {t_cluster:.0f} s, training {t_train:.0f} s; FSDP rank actors:\n"
          + "\n".join(f"  {a['cls']} {a['name']} on {a['node'][:12]}" for a in ranks))


@pytest.mark.parametrize("accelerator, args, profile", [
    (None, [], "gpu"),  # nothing stated on a cluster: the configured gpu profile, and no GPU on the nodes
    ("H100", ["profile=cpu"], "cpu"),  # the CPU profile on a node where Ray detected GPUs
])
def test_profile_mismatch_on_a_cluster_is_one_line(accelerator, args, profile):
    """The TaskRunner, on the cluster, refuses a profile that does not match the nodes' GPUs; the driver prints the
    one line and exits 2. A detected GPU is faked with the resource Ray gives such a node (accelerator_type:<model>)."""
    resources = {f"accelerator_type:{accelerator}": 1} if accelerator else None
    with _loopback_cluster(1, resources=resources) as c:
        c.wait_for_nodes(1)
        env = {**c.env, "RAY_ADDRESS": c.address}
        r = subprocess.run([PY, "-m", "tbrm_verl.main", *args, f"run.dir={c.root / 'run'}"], env=env,
                           cwd=c.root, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    assert r.returncode == 2, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("tbrm_verl: config error:")]
    assert len(errors) == 1 and errors[0].startswith(f"tbrm_verl: config error: profile={profile}:"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
