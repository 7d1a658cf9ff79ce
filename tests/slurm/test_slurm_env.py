"""slurm/tbrm.sbatch without SLURM: the whole script, run by bash with stand-ins for `scontrol`, `srun`, `ip`, `ray`
and the trainer's Python, on a fake 2-node allocation. Each stand-in records the environment it was started with, so
the tests see what reaches the Ray node of every node (started through srun) and the driver (tbrm_verl.main).

What is checked: GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME follow the one interface setting (TBRM_NET_IFNAME, or its
older name TBRM_RAY_IFACE), a value the caller exported is kept, nothing is set without an interface, the Ray nodes
use that interface's address, and every Ray step is started with --export=ALL. tests/slurm/test_slurm.py runs the script
on a real single-host SLURM cluster when one is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "tbrm.sbatch"
FAKE_IP = "10.77.0.5"

STUBS = {
    # the allocation's node list; no job record to requeue
    "bin/scontrol": """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_NODES; fi
""",
    # srun [options] command...: record the options, run the command "on" the node named by -w
    "bin/srun": """#!/bin/bash
opts=(); node=""
while [ $# -gt 0 ]; do
  case "$1" in
    -w) node=$2; opts+=("$1" "$2"); shift 2 ;;
    -*) opts+=("$1"); shift ;;
    *) break ;;
  esac
done
printf '%s\\n' "${opts[@]}" > "$FAKE_OUT/srun-$node.opts"
export FAKE_NODE=$node
exec "$@"
""",
    "bin/ip": f"""#!/bin/bash
# ip -o -4 addr show dev IFACE
echo "2: ${{@: -1}}    inet {FAKE_IP}/16 brd 10.77.255.255 scope global ${{@: -1}}"
""",
    # `ray start ...` on a node: record, then stay up like `ray start --block` until the script stops it
    "py/ray": """#!/bin/bash
env > "$FAKE_OUT/ray-$FAKE_NODE.env"
printf '%s\\n' "$@" > "$FAKE_OUT/ray-$FAKE_NODE.args"
exec sleep 120
""",
    # the Python the script runs: `-c` (token) is the real one; `-` is the wait for N Ray nodes (here: for N stand-ins
    # to have started); `-m tbrm_verl.main ...` is the driver: record and exit 0
    "py/python": f"""#!/bin/bash
case "$1" in
  -c) exec {sys.executable} "$@" ;;
  -) want=$3
     for _ in $(seq 100); do
       [ "$(ls "$FAKE_OUT"/ray-*.args 2>/dev/null | wc -l)" -ge "$want" ] && break
       sleep 0.1
     done
     echo "$want of $want Ray node(s) alive (stand-in)"; exit 0 ;;
  -m) env > "$FAKE_OUT/driver.env"; printf '%s\\n' "$@" > "$FAKE_OUT/driver.args"; exit 0 ;;
esac
exit 9
""",
}


def _run(tmp_path: Path, env_extra: dict, nodes=("n1", "n2")) -> tuple[subprocess.CompletedProcess, Path]:
    for rel, text in STUBS.items():
        f = tmp_path / rel
        f.parent.mkdir(exist_ok=True)
        f.write_text(text)
        f.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin:/usr/sbin:/sbin",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": ",".join(nodes), "SLURMD_NODENAME": nodes[0],
        "FAKE_NODES": " ".join(nodes), "FAKE_OUT": str(out),
        "TBRM_HOME": str(REPO), "TBRM_PYTHON": str(tmp_path / "py" / "python"), "TBRM_SLURM_CPU": "1",
        "TBRM_RAY_TMPDIR": str(tmp_path / "ray"),
        **env_extra,
    })
    r = subprocess.run(["bash", str(SCRIPT), "trainer.total_training_steps=1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, out


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _reached(out: Path, nodes=("n1", "n2")) -> list[dict[str, str]]:
    """The environments of the Ray node on every node and of the driver."""
    return [_env(out / f"ray-{n}.env") for n in nodes] + [_env(out / "driver.env")]


def test_interface_setting_reaches_every_ray_node_and_the_driver(tmp_path):
    r, out = _run(tmp_path, {"TBRM_NET_IFNAME": "ib7"})
    for env in _reached(out):
        assert env["GLOO_SOCKET_IFNAME"] == "ib7" and env["NCCL_SOCKET_IFNAME"] == "ib7"
    for node in ("n1", "n2"):
        assert f"--node-ip-address={FAKE_IP}" in (out / f"ray-{node}.args").read_text().split()
        opts = (out / f"srun-{node}.opts").read_text().split()
        assert "--export=ALL" in opts and opts[opts.index("-w") + 1] == node
    assert _env(out / "driver.env")["RAY_ADDRESS"].startswith(f"{FAKE_IP}:")
    assert "GLOO_SOCKET_IFNAME=ib7 NCCL_SOCKET_IFNAME=ib7" in r.stdout


def test_values_the_caller_exported_are_kept(tmp_path):
    _, out = _run(tmp_path, {"TBRM_NET_IFNAME": "ib7", "NCCL_SOCKET_IFNAME": "=mlx5_0"})
    for env in _reached(out):
        assert env["GLOO_SOCKET_IFNAME"] == "ib7" and env["NCCL_SOCKET_IFNAME"] == "=mlx5_0"


def test_older_name_of_the_setting(tmp_path):
    _, out = _run(tmp_path, {"TBRM_RAY_IFACE": "eth3"})
    for env in _reached(out):
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == env["TBRM_NET_IFNAME"] == "eth3"


def test_no_interface_sets_nothing(tmp_path):
    _, out = _run(tmp_path, {"TBRM_RAY_HEAD_IP": "127.0.0.1"}, nodes=("n1",))
    for env in _reached(out, nodes=("n1",)):
        assert "GLOO_SOCKET_IFNAME" not in env and "NCCL_SOCKET_IFNAME" not in env


def test_exports_are_visible_in_the_script():
    text = SCRIPT.read_text()
    assert re.search(r"^\s*export GLOO_SOCKET_IFNAME=", text, re.M)
    assert re.search(r"^\s*export NCCL_SOCKET_IFNAME=", text, re.M)


def _environment_variables(script: str) -> set[str]:
    """Names the script takes from its environment or exports: read but never assigned, assigned from their own
    value (`X=${X:-default}`), or exported."""
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script))
    assigned = set(re.findall(r"^\s*(?:export\s+|local\s+)?([A-Z][A-Z0-9_]*)\+?=", script, re.M))
    assigned |= set(re.findall(r"(?:mapfile -t|read -r -a)\s+([A-Z][A-Z0-9_]*)", script))
    exported = set(re.findall(r"export\s+([A-Z][A-Z0-9_]*)", script))
    own_default = {n for n in assigned if re.search(rf"\b{n}=\$\{{{n}:-", script)}
    return ((read - assigned) | exported | own_default) - {"PWD"}


def test_readme_documents_every_environment_variable():
    script = SCRIPT.read_text()
    names = _environment_variables(script) | {"TBRM_DATA_DIR"}  # read by the recipes, made absolute before start
    assert {"TBRM_NET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SLURM_JOB_ID", "RAY_ADDRESS"} <= names
    readme = (REPO / "slurm" / "README.md").read_text()
    rows = "\n".join(line for line in readme.splitlines() if line.startswith("|"))
    missing = sorted(n for n in names if f"`{n}`" not in rows)
    assert not missing, f"not in slurm/README.md's tables: {missing}"
