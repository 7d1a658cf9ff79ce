"""The GPU check's offline bundle (tbrm_verl/tools/gpu_bundle.py): which wheels run.sh installs, the refusals, and an
end-to-end run on a simulated bare GPU machine — a venv with only torch, transformers and the two packages the bundle
leaves to the machine (pandas, pyarrow), no network — that must pass every check through verl's own engine code."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pytest

from tbrm_verl.tools import gpu_bundle, gpu_check

ROOT = Path(__file__).resolve().parents[2]
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


# ------------------------------------------------------------------------------------------------- unit tests
def _fake_bundle(tmp_path, carried, python_version=PYVER):
    b = tmp_path / "bundle"
    (b / "wheels").mkdir(parents=True)
    (b / "bundle.json").write_text(json.dumps({"python_version": python_version, "carried": carried}))
    return b


def test_select_installs_only_what_the_interpreter_lacks(tmp_path):
    pytest_v, iniconfig_v = metadata.version("pytest"), metadata.version("iniconfig")
    carried = [
        {"distribution": "pytest", "version": "0.0.1", "wheel": "pytest-0.0.1-py3-none-any.whl", "exact": False},
        {"distribution": "tbrm-no-such-dist", "version": "1.0", "wheel": "tbrm_no_such_dist-1.0-py3-none-any.whl",
         "exact": False},
        {"distribution": "pluggy", "version": "0.0.1", "wheel": "pluggy-0.0.1-py3-none-any.whl", "exact": True},
        {"distribution": "iniconfig", "version": iniconfig_v, "wheel": f"iniconfig-{iniconfig_v}-py3-none-any.whl",
         "exact": True},
    ]
    b = _fake_bundle(tmp_path, carried)
    rec = tmp_path / "rec.json"
    got = gpu_bundle.select(str(b), str(rec))
    # missing -> installed; present (any version) -> reused; exact pin at another version -> installed
    assert got == [str(b / "wheels" / "tbrm_no_such_dist-1.0-py3-none-any.whl"),
                   str(b / "wheels" / "pluggy-0.0.1-py3-none-any.whl")]
    r = json.loads(rec.read_text())
    assert r["installed"] == {"tbrm-no-such-dist": "1.0", "pluggy": "0.0.1"}
    assert r["reused_from_machine"] == {"pytest": pytest_v, "iniconfig": iniconfig_v}


def test_select_refuses_a_bundle_for_another_python(tmp_path, capsys):
    b = _fake_bundle(tmp_path, [], python_version="3.99")
    assert gpu_bundle.main(["select", str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made for Python 3.99" in err[0] and f"--python-version {PYVER}" in err[0]


def test_bundle_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert gpu_check.main(["bundle", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"gpu_check bundle: refused: --out={tmp_path}: folder exists and is not empty; give a new or "
                   f"empty folder"]


def test_bundle_refused_over_the_size_limit_with_its_size(tmp_path, monkeypatch, capsys):
    """No network: a fake 2 MiB wheel and a 1 MiB limit. The refusal is one line and states the bundle's size."""

    def fake_fetch(dist, versions, pyver, dest, log):
        (dest / f"{dist}-1.0-py3-none-any.whl").write_bytes(b"\0" * (2 * 2**20))
        return "1.0", f"{dist}-1.0-py3-none-any.whl"

    monkeypatch.setattr(gpu_bundle, "CARRIED", (("fake", "1.0", "test"),))
    monkeypatch.setattr(gpu_bundle, "_fetch", fake_fetch)
    monkeypatch.setattr(gpu_bundle, "LIMIT_BYTES", 2**20)
    out = tmp_path / "b"
    assert gpu_check.main(["bundle", "--out", str(out)]) == 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())  # what was written: wheel + src + run.sh
    assert size > 2 * 2**20
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == (f"gpu_check bundle: refused: bundle {out} is {size / 2**20:.1f} MiB, over the 1 MiB "
                         f"limit; carry fewer wheels")
    assert (out / "src" / "tbrm_verl" / "gpu_check.py").is_file() and not list(out.rglob("__pycache__"))


def test_run_sh_is_valid_bash():
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(gpu_bundle.RUN_SH)
        f.flush()
        r = subprocess.run(["bash", "-n", f.name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_carried_set_is_the_import_closure_without_ray():
    names = [d for d, _, _ in gpu_bundle.CARRIED]
    assert ("verl", "0.9.1") in [(d, v) for d, v, _ in gpu_bundle.CARRIED] and "ray" not in names
    assert len(names) == len(set(names))
    # verl's FSDP engine module imports peft (which imports accelerate): carried, not expected on the machine
    assert {"peft", "accelerate", "tensordict", "omegaconf", "datasets"} <= set(names)
    # what the import needs but the bundle leaves out, each with its reason; never both carried and left out
    assert set(gpu_bundle.NOT_CARRIED) == {"ray", "pyarrow", "pandas"} and not set(names) & set(gpu_bundle.NOT_CARRIED)
    assert all(why.strip() for why in gpu_bundle.NOT_CARRIED.values())


def test_run_sh_steps_run_the_modules_it_names(tmp_path):
    """run.sh starts `-m tbrm_verl.tools.gpu_bundle select` and runs the module `tbrm_verl.gpu_check`: both must exist
    at those names (the select step as run.sh runs it, with only the package sources on the path)."""
    import re

    assert re.findall(r'-m (tbrm_verl\S*) select', gpu_bundle.RUN_SH) == ["tbrm_verl.tools.gpu_bundle"]
    assert re.findall(r'run_module\("([^"]+)"', gpu_bundle.RUN_SH) == ["tbrm_verl.gpu_check"]
    assert (ROOT / "tbrm_verl" / "gpu_check.py").is_file()
    b = _fake_bundle(tmp_path, [{"distribution": "tbrm-no-such-dist", "version": "1.0",
                                 "wheel": "tbrm_no_such_dist-1.0-py3-none-any.whl", "exact": False}])
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.tools.gpu_bundle", "select", str(b)], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(b / "wheels" / "tbrm_no_such_dist-1.0-py3-none-any.whl")]


# ------------------------------------------------------------------------------ simulated bare GPU machine (e2e)
# beside torch and transformers (and what they install), exactly what the bundle leaves to the machine, Ray excepted
BARE_PACKAGES = sorted(d for d in gpu_bundle.NOT_CARRIED if d != "ray")
NOT_ON_BARE = ("verl", "ray", "tensordict", "omegaconf", "hydra", "codetiming", "datasets", "peft", "accelerate",
               "PIL")


def _pypi_reachable() -> str | None:
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                "-d", d, "codetiming==1.4.0"], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "pip download timed out after 120 s"
    return None if r.returncode == 0 else ((r.stderr or r.stdout).strip().splitlines() or ["?"])[-1]


def _bare_venv() -> Path:
    """A venv with torch==2.13.0 (CPU), this venv's transformers and BARE_PACKAGES; cached, keyed by versions."""
    import fcntl

    tf = metadata.version("transformers")
    root = Path(os.environ.get("TBRM_VERL_CACHE") or Path.home() / ".cache" / "tbrm_verl")
    venv = root / f"bare-gpu-sim-py{PYVER}-torch2.13.0-transformers{tf}-{'-'.join(BARE_PACKAGES)}-v2"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "DONE").exists():
            shutil.rmtree(venv, ignore_errors=True)  # an interrupted build
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "torch==2.13.0",
                                f"transformers=={tf}", *BARE_PACKAGES], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
            (venv / "DONE").write_text("")
    return venv / "bin" / "python"


def _offline(cmd: list[str]) -> tuple[list[str], str]:
    """Run `cmd` in a new network namespace (loopback only, up: gloo needs an interface) when this user may."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd], "network namespace"
    return cmd, "environment only (no unshare)"


@pytest.mark.e2e
def test_bundle_runs_the_check_offline_on_a_bare_machine(tmp_path):
    why = _pypi_reachable()
    if why:
        pytest.skip(f"PyPI unreachable ({why}): the bare venv and the bundle are downloaded")
    t0 = time.time()
    bare = _bare_venv()
    t_venv = time.time() - t0
    probe = subprocess.run([str(bare), "-c", "import importlib.util as u, sys; print([m for m in sys.argv[1:] if "
                            "u.find_spec(m)])", *NOT_ON_BARE], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", f"the simulated bare machine has {probe.stdout}"

    bundle = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.gpu_check", "bundle", "--out", str(bundle)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"bundle {bundle}: ") and f"wheels for CPython {PYVER}" in last
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size <= 64 * 2**20 and f"{size / 2**20:.1f} MiB" in last

    # the bare machine: no PYTHONPATH, no pip index or config, no network, started outside the repository
    tmpdir, cwd = tmp_path / "tmp", tmp_path / "elsewhere"
    tmpdir.mkdir()
    cwd.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path), "TMPDIR": str(tmpdir),
           "PYTHON": str(bare), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "HF_HUB_OFFLINE": "1",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    out = tmp_path / "gpu_check.json"
    cmd, isolation = _offline(["bash", str(bundle / "run.sh"), "--device", "cpu", "--out", str(out)])
    t1 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    t_run = time.time() - t1
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())

    # every correctness check passed, counted here from the per-variant results (not only the verdict)
    assert res["passed"] is True and res["failed_checks"] == []
    assert set(res["correctness"]) == {"fp32", "bf16"}
    for dt, c in res["correctness"].items():
        # the default lean V(s_1) path (TBRMEngine) and the logits-hook path, every variant the check defines
        assert set(c["variants"]) == {v[0] for v in gpu_check.VARIANTS}
        assert {"tbrm_lean_padded", "tbrm_lean_nested", "tbrm_lean_ref_free", "brm_padded"} <= set(c["variants"])
        assert c["lean_engine_path"] == "tbrm_verl.engine.TBRMEngine.prepare_model_inputs/prepare_model_outputs"
        for name, v in c["variants"].items():
            assert v["checks"] and all(v["checks"].values()), (dt, name, v["checks"])
    assert res["overhead"]["no_float32_tokens_x_vocab_copy"] is True
    # verl's real engine, imported from the wheel the bundle carried (with a stand-in ray), not a copy
    path = "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_inputs/prepare_model_outputs"
    assert res["engine_path"] == path
    assert all(c["engine_path"] == path for c in res["correctness"].values())
    assert res["engine_source"].startswith(str(tmpdir)) and res["engine_source"].endswith(
        "/site/verl/workers/engine/fsdp/transformer_impl.py")
    assert res["imports"]["ray"].startswith("missing") and res["imports"]["engine_import"].startswith("ok")
    assert res["versions"]["verl"] == "0.9.1" and res["versions"]["torch"].startswith("2.13.0")
    assert res["bundle"]["python"] == str(bare)
    # the bare machine lacks every carried distribution: run.sh installed them all, reused none
    assert set(res["bundle"]["installed"]) == {gpu_bundle._norm(d) for d, _, _ in gpu_bundle.CARRIED}
    assert res["bundle"]["reused_from_machine"] == {}
    assert json.loads((bundle / "bundle.json").read_text())["not_carried"] == gpu_bundle.NOT_CARRIED
    assert res["wall_time_s"] <= t_run
    assert not list(tmpdir.glob("tbrm_gpu_check.*"))  # run.sh removed its temporary install
    print(f"bare venv {t_venv:.0f} s, run.sh {t_run:.0f} s (wall_time_s {res['wall_time_s']:.0f}), "
          f"isolation: {isolation}")
