"""GPU install: the pins agree with verl 0.9.1's own metadata, the README gives the commands, and
`python -m tbrm_verl.check_gpu_install` reads pip's answers right (a fake pip) and resolves on PyPI (when reachable)."""

import ast
import json
import re
import subprocess
import urllib.request
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tbrm_verl.attn import FLASH_ATTN_INSTALL, FLASH_ATTN_REQUIREMENT
from tbrm_verl.tools import check_gpu_install as cgi

ROOT = Path(__file__).resolve().parents[2]


def _verl_extra(extra: str) -> dict[str, str]:
    """verl's own pins for one of its extras, from its installed metadata: {name: 'name==version'}."""
    out = {}
    for text in requires("verl"):
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": extra}):
            out[req.name] = f"{req.name}{req.specifier}"
    return out


def _setup_extras() -> dict[str, list[str]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def test_pins_match_verls_own_metadata():
    vllm_extra = _verl_extra("vllm")
    assert cgi.GPU_TORCH == vllm_extra["torch"]
    gpu = _setup_extras()["gpu"]
    assert vllm_extra["vllm"] in gpu and "verl[vllm]==0.9.1" in gpu
    assert not any(Requirement(r).name == "flash-attn" for r in gpu)  # its build needs torch first: own command
    # verl's fsdp extra pulls flash-attn through `flash-attn-cu130torch211`: the same version as ours
    assert _verl_extra("flash-attn-cu130torch211")["flash-attn"] == FLASH_ATTN_REQUIREMENT


def test_readme_gives_the_gpu_commands_in_order_and_quick_start_keeps_two():
    readme = (ROOT / "README.md").read_text()
    gpu = readme.split("## GPU install", 1)[1].split("\n## ", 1)[0]
    commands = [f"pip install {cgi.GPU_TORCH}", 'pip install -e ".[gpu]"', FLASH_ATTN_INSTALL]
    positions = [gpu.find(c) for c in commands]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "python -m tbrm_verl.check_gpu_install" in gpu
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert quick.count("```bash") == 2


def _torch_metadata(cuda_runtime: str | None) -> dict:
    deps = ["filelock", "sympy>=1.13.3"]
    if cuda_runtime:
        deps.append(cuda_runtime)
    return {"name": "torch", "version": "2.11.0", "requires_dist": deps}


class FakePip:
    """Stands in for `python -m pip`: the resolution writes `report` (or fails with `resolve_output`)."""

    def __init__(self, report=None, resolve_output="", flash_versions="2.8.3.post2, 2.8.3, 2.8.2", wheel=False):
        self.report, self.resolve_output = report, resolve_output
        self.flash_versions, self.wheel = flash_versions, wheel
        self.calls = []

    def __call__(self, args, timeout):
        self.calls.append(args)
        if args[0] == "index":
            return subprocess.CompletedProcess(args, 0, f"flash-attn (2.8.3.post2)\nAvailable versions: "
                                                        f"{self.flash_versions}\n", "")
        if "--only-binary=:all:" in args:
            return subprocess.CompletedProcess(args, 0 if self.wheel else 1, "", "" if self.wheel else
                                               "ERROR: No matching distribution found for flash-attn==2.8.3\n")
        if self.report is None:
            return subprocess.CompletedProcess(args, 1, "", self.resolve_output)
        Path(args[args.index("--report") + 1]).write_text(json.dumps(self.report))
        return subprocess.CompletedProcess(args, 0, "", "")


def _report(packages: dict[str, str], torch_cuda: str | None) -> dict:
    install = [{"metadata": {"name": n, "version": v}} for n, v in packages.items()]
    install.append({"metadata": _torch_metadata(torch_cuda)})
    return {"version": "1", "install": install}


def test_resolved_versions_cuda_build_and_flash_attn_are_reported(monkeypatch, capsys):
    pkgs = {"vllm": "0.24.0", "verl": "0.9.1", "Transformers": "5.9.0", "ray": "2.60.0"}
    fake = FakePip(_report(pkgs, 'cuda-toolkit[cublas,cudart]==13.0.2; platform_system == "Linux"'))
    monkeypatch.setattr(cgi, "pip", fake)
    assert cgi.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    resolved, flash = out[1], out[2]
    for name, version in [("torch", "2.11.0"), ("vllm", "0.24.0"), ("verl", "0.9.1"), ("transformers", "5.9.0")]:
        assert f"{name} {version}" in resolved
    assert "CUDA 13" in resolved and "driver >= 580" in resolved and f"{len(pkgs) + 1} packages" in resolved
    assert "2.8.3" in flash and "source distribution only" in flash
    resolve_args = fake.calls[0]
    assert resolve_args[:3] == ["install", "--dry-run", "--ignore-installed"] and cgi.GPU_TORCH in resolve_args
    assert not any("flash" in a for a in resolve_args)  # never resolved (= built) with the rest


def test_cuda12_wheel_and_cpu_wheel_are_told_apart(monkeypatch):
    line, _ = cgi.summarise_report(_report({}, "nvidia-cuda-runtime-cu12==12.8.90; platform_system == 'Linux'"))
    assert "CUDA 12" in line and "driver >= 525" in line
    line, _ = cgi.summarise_report(_report({}, None))
    assert "no CUDA dependency" in line


def test_a_conflict_is_one_line_and_exit_1(monkeypatch, capsys):
    pip_output = (
        "Collecting torch==2.10.0\n"
        "INFO: pip is looking at multiple versions of verl[vllm] to determine which version is compatible.\n"
        "ERROR: Cannot install torch==2.10.0 and verl[vllm]==0.9.1 because these package versions have conflicting "
        "dependencies.\n\nThe conflict is caused by:\n    The user requested torch==2.10.0\n"
        "    verl[vllm] 0.9.1 depends on torch==2.11.0\n\nAdditionally, some packages in these conflicts have no "
        "matching distributions available for your environment:\n    torch\n\nTo fix this you could try to:\n"
        "1. loosen the range of package versions you've specified\n\n"
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/\n"
    )
    monkeypatch.setattr(cgi, "pip", FakePip(None, pip_output))
    assert cgi.main([]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("gpu install: does not resolve: Cannot install torch==2.10.0")
    assert "The user requested torch==2.10.0; verl[vllm] 0.9.1 depends on torch==2.11.0" in out[1]
    assert "ResolutionImpossible" in out[1] and "loosen" not in out[1]


def test_missing_flash_attn_version_fails(monkeypatch, capsys):
    fake = FakePip(_report({"vllm": "0.24.0", "verl": "0.9.1", "transformers": "5.9.0"}, "cuda-toolkit==13.0.2"),
                   flash_versions="2.8.2, 2.8.1")
    monkeypatch.setattr(cgi, "pip", fake)
    assert cgi.main([]) == 1
    assert f"{FLASH_ATTN_REQUIREMENT} is not on the index" in capsys.readouterr().out


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=3) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is not reachable")
def test_gpu_install_resolves_on_pypi(capsys):
    """The real resolution (1-3 min: ~265 packages' metadata). Nothing is installed or built."""
    rc = cgi.main(["--timeout", "300"])
    out = capsys.readouterr().out
    if "did not finish resolving" in out:
        pytest.skip(f"PyPI too slow: {out.strip()}")
    assert rc == 0, out
    torch_version = cgi.GPU_TORCH.split("==")[1]
    assert re.search(rf"torch {re.escape(torch_version)}\b", out) and "verl 0.9.1" in out and "CUDA 13" in out, out
