"""Repository-wide checks: lint (ruff, as configured in ruff.toml), every file path the docs and code cite exists,
no citation of a spec the repository does not hold, and no module of the package over ~500 lines."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = [p for pat in ("*.md", "*.py", "*.yaml", "*.sbatch", "*.sh", "*.toml", "*.ini")
        for p in ROOT.rglob(pat) if not {".venv", "runs", "outputs", ".git"} & set(p.relative_to(ROOT).parts)]
# repository paths as the docs write them: a top-level folder of this repo, then a path ending in a file suffix
PATH_RE = re.compile(r"(?<![\w/.~$-])((?:tbrm_verl|tests|docs|recipes|hydra_configs|slurm|\.ci)/"
                     r"[\w./-]*\w\.(?:py|md|yaml|sh|sbatch|png|json|txt))")
# written in prose as examples of output locations, not files of the repo
GENERATED = ("docs/bench/work/", "docs/gpu_check.json")  # written by the commands that cite them


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    assert Path(ruff).exists(), "ruff is missing: it is in setup.py's test extra (pip install -e '.[test]')"
    proc = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_cited_repository_file_exists():
    missing = set()
    for p in TEXT:
        for m in PATH_RE.finditer(p.read_text(errors="replace")):
            ref = m.group(1).rstrip(".")
            if not (ROOT / ref).exists() and not ref.startswith(GENERATED) and "*" not in ref:
                missing.add(f"{p.relative_to(ROOT)}: {ref}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(sorted(missing))


def test_the_path_scan_sees_citations():
    # the scan above must find the citations it is meant to check (a broken regex would pass vacuously)
    text = (ROOT / "README.md").read_text()
    assert "tbrm_verl/loss.py" in {m.group(1) for m in PATH_RE.finditer(text)}


def test_no_citation_of_an_absent_spec():
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in TEXT if p.name != Path(__file__).name
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if re.search(r"\bspec §|cpu-path\.md|/shared/docs", line)]
    assert not bad, "cites a document outside the repository (use docs/paper.md): " + ", ".join(bad)


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "tbrm_verl").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 530}
    assert not big, f"modules over ~500 lines (split them by job): {big}"
