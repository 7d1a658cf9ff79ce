"""The paper's Table 1 (arXiv 2505.15311, accuracy %, as published) printed beside one or more results files.

``python -m tbrm_verl.eval table results.json [more.json ...] [--model 1.5B|7B]``: the paper's rows for the model size
(given, else guessed from the results' model / label, else both sizes), one row per run in percent, and notes where a
run's protocol differs from the paper's or a set is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tbrm_verl.eval import EvalError
from tbrm_verl.eval.protocol import EVAL_SETS, PROTOCOL

SET_TITLES = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH500", "minerva": "Minerva",
              "olympiadbench": "OlympiadBench"}

# Table 1 of the paper (accuracy %; AIME24 / AIME25 / AMC23 / MATH500 / Minerva / OlympiadBench; mean), as published.
PAPER_TABLE1: dict[str, list[tuple[str, tuple[float, ...], float]]] = {
    "1.5B": [
        ("base", (5.0, 1.9, 24.9, 63.4, 16.5, 30.8), 23.75),
        ("PPO n=1", (11.4, 4.5, 46.6, 72.2, 26.8, 36.0), 32.92),
        ("TBRM n=1", (13.2, 5.6, 48.6, 72.2, 27.2, 35.7), 33.75),
        ("GRPO n=4", (13.0, 7.1, 49.9, 71.2, 28.7, 37.5), 34.57),
        ("TBRM n=4", (14.3, 6.9, 52.0, 72.2, 30.5, 36.1), 35.33),
    ],
    "7B": [
        ("base", (10.6, 2.8, 31.6, 67.4, 13.2, 29.3), 25.82),
        ("PPO n=1", (25.4, 13.2, 63.4, 76.4, 33.8, 39.3), 41.92),
        ("TBRM n=1", (24.1, 13.2, 63.4, 78.6, 36.4, 41.5), 42.87),
        ("GRPO n=4", (28.9, 10.7, 66.8, 79.8, 36.0, 42.5), 44.12),
        ("TBRM n=4", (30.5, 13.1, 68.4, 79.8, 36.4, 44.1), 45.38),
    ],
}


def _guess_model(results: dict[str, Any]) -> str | None:
    s = " ".join(str(results.get(k) or "") for k in ("model", "model_path", "checkpoint", "label")).lower()
    if "1.5b" in s or "1_5b" in s:
        return "1.5B"
    if "7b" in s:
        return "7B"
    return None


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_table(runs: list[tuple[str, dict[str, Any]]], model: str | None = None) -> str:
    """The paper's Table 1 rows ("paper") for `model` (or both sizes) and one row per run ("run"), in percent."""
    if model is None:
        guesses = {_guess_model(r) for _, r in runs}
        model = guesses.pop() if len(guesses) == 1 else None
    models = [model] if model else list(PAPER_TABLE1)
    head = ["model", "source", "method"] + [SET_TITLES[s] for s in EVAL_SETS] + ["mean"]
    rows: list[list[str]] = []
    for m in models:
        for method, scores, mean in PAPER_TABLE1[m]:
            rows.append([m, "paper", method] + [_fmt(v) for v in scores] + [f"{mean:.2f}"])
    notes: list[str] = []
    for label, res in runs:
        sets = res.get("sets", {})
        vals: list[float | None] = []
        for s in EVAL_SETS:
            r = sets.get(s)
            if r is None:
                vals.append(None)
                continue
            vals.append(100.0 * r[r["metric"]])
            pk, pt = PROTOCOL[s]
            if (r["k"], float(r["temperature"])) != (pk, pt):
                notes.append(f"{label}: {s} is avg@{r['k']} at temperature {r['temperature']:g} "
                             f"(paper: avg@{pk} at temperature {pt:g})")
        present = [v for v in vals if v is not None]
        mean = sum(present) / len(present) if present else None
        mean_s = _fmt(mean, 2)
        if present and len(present) < len(vals):
            mean_s += "*"
            notes.append(f"{label}: mean over {len(present)} of {len(vals)} sets (*)")
        extra = [s for s in sets if s not in EVAL_SETS]
        if extra:
            notes.append(f"{label}: sets outside Table 1 not shown: {', '.join(extra)}")
        rows.append([_guess_model(res) or "?", "run", label] + [_fmt(v) for v in vals] + [mean_s])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    title = ("Table 1, accuracy % (paper: arXiv 2505.15311 Table 1, as published; AIME24/AIME25/AMC23 avg@32 at "
             "temperature 1.0, MATH500/Minerva/OlympiadBench avg@1 at temperature 0)")
    out = [title, line(head), "  ".join("-" * w for w in widths)]
    prev = None
    for r in rows:
        if prev is not None and r[1] != prev:
            out.append("")
        out.append(line(r))
        prev = r[1]
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def cmd_table(args) -> int:
    """The ``table`` command: read the results files, print the table."""
    runs = []
    for f in args.results:
        try:
            res = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"{f}: cannot read results JSON ({e})") from None
        if "sets" not in res:
            raise EvalError(f"{f}: not a tbrm_verl.eval results file (no 'sets')")
        runs.append((res.get("label") or Path(f).stem, res))
    print(format_table(runs, args.model))
    return 0
