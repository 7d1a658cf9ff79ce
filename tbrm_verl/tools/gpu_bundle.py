"""A folder that runs `python -m tbrm_verl.gpu_check` on a bare GPU machine: one with torch, transformers and
triton (and their usual companions) but no verl, no network, nothing installed by us.

    python -m tbrm_verl.gpu_check bundle --out DIR [--python-version 3.12]   # here, where PyPI is reachable
    bash DIR/run.sh [gpu_check options]        # there (PYTHON=/path/to/python3 to pick the interpreter)

DIR holds `wheels/` (verl==0.9.1 and the small wheels that the check's imports need, for the target Python on
manylinux x86_64), `src/tbrm_verl/` (a copy of this package), `bundle.json` (what was carried and why) and
`run.sh`. run.sh installs, offline (`pip install --no-index --no-deps --target`), into a temporary folder only the
carried wheels whose distribution the interpreter lacks (verl: unless it has exactly 0.9.1), runs the check with
that folder and `src/` first on sys.path, writes `DIR/gpu_check.json` (unless `--out` is given) and removes the
temporary folder. The bundle is refused above 64 MiB.

What is carried and why was found by importing verl's FSDP engine module and running the check in a venv with only
torch, transformers, pandas and pyarrow (tests/tools/test_gpu_bundle.py builds that venv and runs the bundle in it):
each import that failed there is a CARRIED entry. NOT_CARRIED lists what the import needs but the bundle leaves out:
Ray (its wheel alone is over the limit; verl's engine module is imported with a stand-in `ray`,
tbrm_verl/tools/bare_imports.py), and pyarrow and pandas (imported by `datasets`, which verl's engine module imports
through verl.utils.dataset): pyarrow's wheel is ~55 MB, and the lent GPU image has both. No verl file is copied:
verl's own wheel is carried.
This module uses the standard library only: run.sh runs `select` before anything else is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

__all__ = ["CARRIED", "NOT_CARRIED", "LIMIT_BYTES", "build", "select", "main"]

LIMIT_BYTES = 64 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# (distribution, version, the import that needs it). Versions are those of the project's CPU venv; when the
# building environment has a distribution installed, its version is tried first (the bundle then carries what the
# tests ran with). importlib_metadata and zipp (tensordict's requirements) are not needed on Python >= 3.10.
CARRIED = (
    ("verl", "0.9.1", "the engine and loss code under test"),
    ("peft", "0.21.2", "verl's FSDP engine module (from peft import LoraConfig, ...)"),
    ("accelerate", "1.16.0", "imported by peft"),
    ("tensordict", "0.10.0", "verl's batches (verl.utils.tensordict_utils)"),
    ("pyvers", "0.1.0", "imported by tensordict"),
    ("orjson", "3.13.0", "imported by tensordict"),
    ("cloudpickle", "3.1.3", "imported by tensordict"),
    ("omegaconf", "2.3.1", "verl.workers.config, verl.trainer.config"),
    ("antlr4-python3-runtime", "4.9.3", "imported by omegaconf"),
    ("codetiming", "1.4.0", "verl.utils.profiler (via verl.utils.debug, imported by the FSDP engine)"),
    ("datasets", "5.2.0", "verl.utils.dataset (imported by the FSDP engine module)"),
    ("dill", "0.4.1", "imported by datasets"),
    ("multiprocess", "0.70.19", "imported by datasets"),
    ("xxhash", "4.1.0", "imported by datasets"),
    ("pillow", "13.0.0", "verl.utils.dataset.rl_dataset (import PIL)"),
)
# Needed by the import, left out of the bundle (the reason is written to bundle.json).
NOT_CARRIED = {
    "ray": "wheel ~79 MB, over the limit; verl's engine module is imported with a stand-in ray "
           "(tbrm_verl/tools/bare_imports.py)",
    "pyarrow": "wheel ~55 MB, over the limit; must be on the machine (imported by datasets, which verl's engine "
               "module imports through verl.utils.dataset); the lent GPU image has it",
    "pandas": "wheel ~12 MB; must be on the machine, beside pyarrow (imported by datasets and verl.utils.dataset); "
              "the lent GPU image has it",
}
# Published as an sdist only: built here into a pure-Python wheel (py3-none-any), valid for any target.
SDIST_ONLY = {"antlr4-python3-runtime"}
# Must be exactly this version even if the machine has another one (the bundle's copy then shadows it).
EXACT = {"verl"}

RUN_SH = r"""#!/usr/bin/env bash
# TBRM GPU check from this bundle (made by `python -m tbrm_verl.gpu_check bundle`), offline:
#   bash run.sh [gpu_check options]          e.g. --device cuda:0, --out FILE (default: gpu_check.json here)
#   PYTHON=/opt/torch/.venv/bin/python3 bash run.sh     to choose the interpreter (default: python3)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
export TBRM_GPU_CHECK_T0="$(date +%s.%N)"  # the JSON's wall_time_s counts the wheel install too
TARGET="$(mktemp -d "${TMPDIR:-/tmp}/tbrm_gpu_check.XXXXXX")"
trap 'rm -rf "$TARGET"' EXIT
# the carried wheels this interpreter lacks (one path a line), and a record of the choice for the JSON
PYTHONPATH="$HERE/src" "$PY" -m tbrm_verl.tools.gpu_bundle select "$HERE" --record "$TARGET/bundle_install.json" \
  > "$TARGET/wheels.txt"
mapfile -t WHEELS < "$TARGET/wheels.txt"
if [ "${#WHEELS[@]}" -gt 0 ]; then
  # --no-compile: byte-compiling every file of every wheel takes longer than the imports that need a few
  PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --no-deps --no-compile --no-warn-conflicts \
    --disable-pip-version-check --target "$TARGET/site" "${WHEELS[@]}"
fi
export TBRM_GPU_CHECK_BUNDLE="$TARGET/bundle_install.json"
# src/ and the installed wheels go first on sys.path (ahead of the current directory, which `-m` would put first)
set +e
"$PY" -c 'import runpy, sys
sys.path[:0] = sys.argv[1:3]
sys.argv = ["python -m tbrm_verl.gpu_check"] + sys.argv[3:]
runpy.run_module("tbrm_verl.gpu_check", run_name="__main__", alter_sys=True)' \
  "$HERE/src" "$TARGET/site" --out "$HERE/gpu_check.json" "$@"
rc=$?
exit $rc
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _wheel_name_version(path: str) -> tuple[str, str]:
    name, version = os.path.basename(path).split("-")[:2]
    return _norm(name), version


def _pip(*args: str, log) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  ({' '.join(cmd[2:])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]})")
    return r


def _fetch(dist: str, versions: list[str], pyver: str, dest: Path, log) -> tuple[str, str]:
    """Download (or, for SDIST_ONLY, build) one wheel for the target; returns (version, file name)."""
    for ver in versions:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            if dist in SDIST_ONLY:
                r = _pip("wheel", "-q", "--no-deps", "--no-binary", dist, "-w", tmp, f"{dist}=={ver}", log=log)
            else:
                plat = [a for p in PLATFORMS for a in ("--platform", p)]
                r = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", pyver,
                         "--implementation", "cp", *plat, "-d", tmp, f"{dist}=={ver}", log=log)
            files = sorted(os.listdir(tmp)) if r.returncode == 0 else []
            if len(files) == 1 and files[0].endswith(".whl"):
                if dist in SDIST_ONLY and not files[0].endswith("-py3-none-any.whl"):
                    raise RuntimeError(f"{dist}: built wheel {files[0]} is not pure Python")
                shutil.move(os.path.join(tmp, files[0]), dest / files[0])
                return ver, files[0]
    raise RuntimeError(f"no wheel of {dist} (tried {', '.join(versions)}) for CPython {pyver} manylinux x86_64")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(out: str, python_version: str | None = None, log=print) -> dict:
    """Make the bundle in `out` (must not exist or be empty). Returns the manifest (also written to bundle.json).
    Raises ValueError with a one-line reason when refused (non-empty folder, over LIMIT_BYTES)."""
    t0 = time.time()
    pyver = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    if not re.fullmatch(r"3\.\d+", pyver):
        raise ValueError(f"--python-version={pyver}: expected MAJOR.MINOR such as 3.12")
    out_p = Path(out).resolve()
    if out_p.exists() and any(out_p.iterdir()):
        raise ValueError(f"--out={out}: folder exists and is not empty; give a new or empty folder")
    wheels = out_p / "wheels"
    wheels.mkdir(parents=True)
    carried = []
    for dist, pinned, why in CARRIED:
        installed = None if dist in EXACT else _installed_version(dist)
        versions = list(dict.fromkeys(v for v in (installed, pinned) if v))
        ver, fname = _fetch(dist, versions, pyver, wheels, log)
        carried.append({"distribution": dist, "version": ver, "wheel": fname, "needed_by": why,
                        "exact": dist in EXACT})
        log(f"  {fname}  ({(wheels / fname).stat().st_size / 2**20:.2f} MiB)")
    # the project itself: a copy of the package sources (pure Python; nothing to build)
    pkg = Path(__file__).resolve().parents[1]
    shutil.copytree(pkg, out_p / "src" / "tbrm_verl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out_p / "run.sh").write_text(RUN_SH)
    (out_p / "run.sh").chmod(0o755)
    manifest = {"python_version": pyver, "platforms": list(PLATFORMS), "carried": carried,
                "not_carried": dict(NOT_CARRIED),
                "limit_bytes": LIMIT_BYTES, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out_p / "bundle.json").write_text(json.dumps(manifest, indent=2))
    size = manifest["size_bytes"] = _dir_bytes(out_p)
    if size > LIMIT_BYTES:
        raise ValueError(f"bundle {out} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES // 2**20} MiB limit; "
                         f"carry fewer wheels")
    manifest["build_s"] = time.time() - t0
    return manifest


def select(bundle: str, record: str | None = None) -> list[str]:
    """The bundle's wheels that this interpreter must install: those whose distribution it lacks, plus EXACT ones
    installed at another version. Refuses a bundle made for another Python version."""
    b = Path(bundle).resolve()
    manifest = json.loads((b / "bundle.json").read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != here:
        raise ValueError(f"bundle {bundle} was made for Python {manifest['python_version']}, this is {here} "
                         f"({sys.executable}); rebuild it with --python-version {here}")
    install, reused = [], {}
    for c in manifest["carried"]:
        have = _installed_version(c["distribution"])
        if have is not None and (not c["exact"] or have == c["version"]):
            reused[c["distribution"]] = have
        else:
            install.append(str(b / "wheels" / c["wheel"]))
    if record:
        Path(record).write_text(json.dumps({
            "bundle": str(b), "python": sys.executable,
            "installed": {_wheel_name_version(w)[0]: _wheel_name_version(w)[1] for w in install},
            "reused_from_machine": reused}, indent=2))
    return install


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["select"]:  # run.sh's step (not for people)
        ap = argparse.ArgumentParser(prog="python -m tbrm_verl.tools.gpu_bundle select")
        ap.add_argument("bundle")
        ap.add_argument("--record")
        a = ap.parse_args(argv[1:])
        try:
            print("\n".join(select(a.bundle, a.record)))
        except ValueError as e:
            print(f"gpu_check bundle: refused: {e}", file=sys.stderr)
            return 2
        return 0
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.gpu_check bundle",
                                 description="Make a folder that runs the GPU check offline on a bare GPU machine.")
    ap.add_argument("--out", required=True, help="new (or empty) folder for the bundle")
    ap.add_argument("--python-version", help="MAJOR.MINOR of the GPU machine's Python (default: this one's)")
    a = ap.parse_args(argv)
    try:
        m = build(a.out, a.python_version)
    except ValueError as e:
        print(f"gpu_check bundle: refused: {e}")
        return 2
    except RuntimeError as e:  # a download failed (no network, or no wheel for that Python)
        print(f"gpu_check bundle: failed: {e}")
        return 1
    print(f"bundle {a.out}: {m['size_bytes'] / 2**20:.1f} MiB, {len(m['carried'])} wheels for CPython "
          f"{m['python_version']}; on the GPU machine: bash {os.path.join(a.out, 'run.sh')}  "
          f"(PYTHON=... to choose the interpreter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
