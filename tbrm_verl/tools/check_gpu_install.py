"""`python -m tbrm_verl.check_gpu_install`: do the README's GPU install pins resolve? (Resolution only, no install.)

Runs `pip install --dry-run --ignore-installed --report` for `torch==<GPU_TORCH>` plus this project with its `gpu` extra
(the README's "GPU install" commands) against the configured index, and prints in one line what resolved (torch,
vllm, verl, transformers, the CUDA build of the torch wheel and the NVIDIA driver it needs) or why not. It also asks
the index whether flash-attn's pinned version exists and whether it has a wheel, without building it: flash-attn's
setup.py imports torch and compiles CUDA code even to produce its metadata, so pip cannot resolve it without building.
Works on any machine (no GPU needed); exits 0 when everything resolved, 1 otherwise. Takes 1-3 minutes: pip reads
the metadata of ~265 packages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tbrm_verl.attn import FLASH_ATTN_REQUIREMENT

GPU_TORCH = "torch==2.11.0"  # verl 0.9.1's vllm extra pins exactly this torch (tests/tools/test_check_gpu_install.py)
REPO = Path(__file__).resolve().parents[2]
SHOWN = ("torch", "vllm", "verl", "transformers")
# the oldest Linux driver each CUDA major release runs on (NVIDIA's CUDA release notes, minor-version compatibility)
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}


def project_requirements() -> list[str]:
    """The project with its gpu extra: the checkout itself when there is one, else the installed metadata's pins."""
    if (REPO / "setup.py").exists():
        return [f"{REPO}[gpu]"]
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    reqs = []
    for text in requires("tbrm-verl") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": "gpu"}):
            req.marker = None
            reqs.append(str(req))
    return reqs


def pip(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def pip_error_line(output: str) -> str:
    """pip's failure in one line: its ERROR lines plus the 'conflict is caused by' lines, if any."""
    lines = [ln.strip() for ln in output.splitlines()]
    errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
    causes = []
    if "The conflict is caused by:" in lines:
        for ln in lines[lines.index("The conflict is caused by:") + 1:]:
            if not ln or ln.startswith(("To fix", "Additionally", "ERROR")):
                break
            causes.append(ln)
    text = "; ".join(dict.fromkeys(errors + causes)) or (lines[-1] if lines else "pip failed without output")
    return text if len(text) <= 600 else text[:597] + "..."


def cuda_of_torch(requires_dist: list[str]) -> int | None:
    """The CUDA major version a torch wheel is built for, from its CUDA runtime dependency (none: a CPU build)."""
    for text in requires_dist:
        m = re.match(r"cuda-toolkit\b[^=]*==\s*(\d+)\.", text) or re.match(r"nvidia-cuda-runtime-cu(\d+)\b", text)
        if m:
            return int(m.group(1))
    return None


def summarise_report(report: dict) -> tuple[str, dict[str, str]]:
    """The resolved versions of SHOWN and the CUDA build of torch, as one line (plus the versions as a dict)."""
    installs = {i["metadata"]["name"].lower(): i["metadata"] for i in report.get("install", [])}
    versions = {name: installs[name]["version"] for name in SHOWN if name in installs}
    parts = [f"{name} {versions.get(name, '(not resolved)')}" for name in SHOWN]
    cuda = cuda_of_torch(installs.get("torch", {}).get("requires_dist") or [])
    if cuda is None:
        parts.append("torch wheel: no CUDA dependency (a CPU build?)")
    else:
        driver = MIN_DRIVER.get(cuda)
        parts.append(f"torch wheel built for CUDA {cuda}" + (f" (NVIDIA driver >= {driver})" if driver else ""))
    return ", ".join(parts) + f"; {len(installs)} packages", versions


def check_flash_attn(timeout: float) -> tuple[bool, str]:
    """Is flash-attn's pinned version on the index, and as what? (No build: see the module docstring.)"""
    name, version = FLASH_ATTN_REQUIREMENT.split("==")
    listed = pip(["index", "versions", name], timeout)
    available = re.search(r"Available versions:\s*(.*)", listed.stdout)
    if listed.returncode != 0 or not available:
        return False, f"{name}: cannot list versions: {pip_error_line(listed.stdout + listed.stderr)}"
    if version not in [v.strip() for v in available.group(1).split(",")]:
        return False, f"{FLASH_ATTN_REQUIREMENT} is not on the index (latest: {available.group(1).split(',')[0]})"
    with tempfile.TemporaryDirectory() as tmp:  # a wheel resolves from its metadata alone; an sdist only builds
        wheel = pip(["install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:", "--quiet",
                     "--report", os.path.join(tmp, "r.json"), FLASH_ATTN_REQUIREMENT], timeout)
    kind = "has a wheel" if wheel.returncode == 0 else "source distribution only: compiled at install time"
    return True, f"{FLASH_ATTN_REQUIREMENT} on the index ({kind}; install it last, with --no-build-isolation)"


def check(timeout: float = 600.0) -> tuple[bool, list[str]]:
    """Resolve the GPU install; return (all resolved, lines to print)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", report_path, GPU_TORCH,
                *project_requirements()]
        try:
            proc = pip(args, timeout)
        except subprocess.TimeoutExpired:
            return False, [f"gpu install: pip did not finish resolving within {timeout:.0f} s"]
        if proc.returncode != 0 or not os.path.exists(report_path):
            return False, [f"gpu install: does not resolve: {pip_error_line(proc.stdout + proc.stderr)}"]
        with open(report_path, encoding="utf-8") as f:
            summary, versions = summarise_report(json.load(f))
    ok = all(name in versions for name in SHOWN)
    lines = [f"gpu install: resolved in {time.monotonic() - start:.0f} s: {summary}"]
    try:
        fa_ok, fa_line = check_flash_attn(timeout=120)
    except subprocess.TimeoutExpired:
        fa_ok, fa_line = False, "flash-attn: the index did not answer within 120 s"
    return ok and fa_ok, lines + [fa_line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tbrm_verl.check_gpu_install", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds pip may take to resolve (default 600)")
    args = parser.parse_args(argv)
    print(f"resolving {GPU_TORCH} + {' '.join(project_requirements())} with pip (dry run; nothing is installed)...",
          flush=True)
    ok, lines = check(args.timeout)
    for line in lines:
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
