"""The paper's evaluation protocol (arXiv 2505.15311 §5, docs/paper.md §2): the evaluation sets, scoring, the ``run`` results.

AIME24, AIME25, AMC23: k = 32 samples per problem at temperature 1.0, reported as ``avg@32`` = the mean over problems
of the fraction of the 32 samples that are correct (mean accuracy, NOT pass@k); MATH500, Minerva, OlympiadBench: one
greedy sample (temperature 0), ``avg@1``. ``--k`` and ``--temperature`` change this for all sets (``--k 4``) or one
set (``--k aime24=4``). ``pass@k`` (fraction of problems with at least one correct sample among the k) is reported
beside ``avg@k`` for k > 1, under that name. top-p is 1.0 (``--top-p``), no top-k. Responses are scored with
``tbrm_verl.tasks.math.reward.compute_score`` (last ``\\boxed{}``, Math-Verify, 0/1). Prompts are the parquet
``prompt`` messages rendered with the tokenizer's chat template (generation prompt added), as verl renders them for
training. ``--max-new-tokens`` defaults to 2048, the training response length (the paper's evaluation length is not
stated).

Results (schema ``tbrm_verl.eval/v1``): per set ``avg@k``, ``pass@k`` (k > 1), ``k``, ``temperature``,
``n_problems``, ``n_samples``, ``n_correct``, ``n_truncated`` and ``per_problem`` (row, ground truth, ``n_correct`` of
``k``); a flat ``metrics`` map (``aime24/avg@32``, ..., ``mean/avg@k`` = the mean of the sets' avg@k, as the paper's
"mean" column). ``--samples-out FILE.jsonl`` also dumps every sample (response text, score). All accuracies are
fractions in [0, 1].
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbrm_verl.eval import EvalError, log
from tbrm_verl.eval.checkpoint import resolve_model
from tbrm_verl.eval.generate import GenRequest, make_backend, render_prompt

SCHEMA = "tbrm_verl.eval/v1"
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
#: the paper's protocol: set -> (samples per problem k, temperature)
PROTOCOL: dict[str, tuple[int, float]] = {
    "aime24": (32, 1.0), "aime25": (32, 1.0), "amc23": (32, 1.0),
    "math500": (1, 0.0), "minerva": (1, 0.0), "olympiadbench": (1, 0.0),
}
DEFAULT_PROTOCOL = (1, 0.0)  # a set not in the paper: one greedy sample
DEFAULT_MAX_NEW_TOKENS = 2048


# ================================================================================================ data
@dataclass
class Problem:
    row: int
    messages: list[dict[str, str]]
    ground_truth: Any
    data_source: str
    index: Any = None


def load_set(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise EvalError(f"{path}: no such file; build the evaluation sets with `python -m tbrm_verl.data eval "
                        "--out-dir DIR` and pass --data-dir DIR")
    rows = pq.read_table(path).to_pylist()
    out = []
    for i, r in enumerate(rows[: limit if limit else None]):
        prompt = r.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        rm = r.get("reward_model") or {}
        if not prompt or "ground_truth" not in rm:
            raise EvalError(f"{path} row {i}: needs `prompt` (chat messages) and `reward_model.ground_truth`")
        extra = r.get("extra_info") or {}
        out.append(Problem(i, [{"role": m["role"], "content": m["content"]} for m in prompt], rm["ground_truth"],
                           r.get("data_source") or "", extra.get("index") if isinstance(extra, dict) else None))
    if not out:
        raise EvalError(f"{path}: no rows")
    return out


# ================================================================================================ settings parsing
def _parse_per_set(values: list[str] | None, cast, what: str) -> tuple[Any, dict[str, Any]]:
    """``["4"]`` -> (4, {}); ``["aime24=4", "math500=1"]`` -> (None, {...}); both forms may be mixed."""
    default, per = None, {}
    for item in values or []:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, val = part.partition("=")
            try:
                if sep:
                    per[name.strip()] = cast(val)
                else:
                    default = cast(name)
            except ValueError:
                raise EvalError(f"--{what} {part!r}: expected a number or NAME=NUMBER") from None
    return default, per


def set_settings(name: str, k_default, k_per, t_default, t_per) -> tuple[int, float]:
    pk, pt = PROTOCOL.get(name, DEFAULT_PROTOCOL)
    k = k_per.get(name, k_default if k_default is not None else pk)
    t = t_per.get(name, t_default if t_default is not None else pt)
    if k < 1:
        raise EvalError(f"{name}: k={k}; need at least one sample per problem")
    if t < 0:
        raise EvalError(f"{name}: temperature={t} < 0")
    if t == 0 and k > 1:
        raise EvalError(f"{name}: k={k} at temperature 0 gives {k} identical greedy samples; use k=1 or a "
                        "temperature > 0")
    return int(k), float(t)


# ================================================================================================ scoring
def score_samples(items: list[tuple[str, Any, str]], workers: int = 4) -> list[float]:
    """compute_score(data_source, response, ground_truth, convention="zero_one") for each (response, gt, source)."""
    from concurrent.futures import ThreadPoolExecutor

    from tbrm_verl.tasks.math.reward import compute_score

    def one(it):
        text, gt, src = it
        return float(compute_score(data_source=src, solution_str=text, ground_truth=gt, convention="zero_one"))

    if len(items) < 64 or workers <= 1:
        return [one(it) for it in items]
    with ThreadPoolExecutor(max_workers=workers) as ex:  # the reward pool takes one answer per worker at a time
        return list(ex.map(one, items, chunksize=16))


# ================================================================================================ evaluation
def evaluate_set(backend, name: str, path: str, k: int, temperature: float, seed: int, limit: int | None,
                 samples_fh=None, score_workers: int = 4) -> dict[str, Any]:
    problems = load_set(path, limit)
    t0 = time.time()
    reqs = [GenRequest(render_prompt(backend.tokenizer, p.messages), k, temperature, seed + p.row) for p in problems]
    gens = backend.generate(reqs, desc=name)
    t_gen = time.time() - t0
    items = [(text, p.ground_truth, p.data_source or name) for p, g in zip(problems, gens) for text in g.texts]
    scores = score_samples(items, workers=score_workers)
    per_problem, pos = [], 0
    n_trunc = 0
    for p, g in zip(problems, gens):
        s = scores[pos: pos + k]
        c = int(sum(1 for x in s if x > 0))
        n_trunc += sum(1 for f in g.finish if f == "length")
        per_problem.append({"row": p.row, "index": p.index, "ground_truth": p.ground_truth, "n_correct": c, "k": k})
        if samples_fh is not None:
            for j, (text, sc, fin) in enumerate(zip(g.texts, s, g.finish)):
                samples_fh.write(json.dumps({"set": name, "row": p.row, "sample": j, "ground_truth": p.ground_truth,
                                             "score": sc, "finish_reason": fin, "response": text}) + "\n")
        pos += k
    n = len(problems)
    avg = sum(pp["n_correct"] / k for pp in per_problem) / n
    res: dict[str, Any] = {
        "file": str(path),
        "metric": f"avg@{k}",
        f"avg@{k}": avg,
        "k": k,
        "temperature": temperature,
        "top_p": backend.top_p if temperature > 0 else 1.0,
        "n_problems": n,
        "n_samples": n * k,
        "n_correct": int(sum(pp["n_correct"] for pp in per_problem)),
        "n_truncated": n_trunc,
        "generate_seconds": round(t_gen, 2),
        "per_problem": per_problem,
    }
    if k > 1:
        res[f"pass@{k}"] = sum(1 for pp in per_problem if pp["n_correct"] > 0) / n
    return res


# ================================================================================================ the run command
def _set_files(args) -> list[tuple[str, str]]:
    data_dir = Path(args.data_dir or os.environ.get("TBRM_DATA_DIR") or "data").expanduser()
    out = []
    for item in args.sets or list(EVAL_SETS):
        name, sep, path = item.partition("=")
        out.append((name, path if sep else str(data_dir / f"{name}.parquet")))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise EvalError(f"--sets names a set twice: {names}")
    for name, path in out:  # fail before loading a model
        if not Path(path).is_file():
            raise EvalError(f"{name}: {path}: no such file; build the evaluation sets with "
                            f"`python -m tbrm_verl.data eval --out-dir {data_dir}` or pass --data-dir")
    return out


def cmd_run(args) -> dict[str, Any]:
    """The ``run`` command: evaluate every set, write the results JSON to ``--out`` (else print it); returns it."""
    sets = _set_files(args)
    k_def, k_per = _parse_per_set(args.k, int, "k")
    t_def, t_per = _parse_per_set(args.temperature, float, "temperature")
    for unknown in sorted((set(k_per) | set(t_per)) - {n for n, _ in sets}):
        raise EvalError(f"--k/--temperature name {unknown!r}, which is not among the evaluated sets")
    settings = {name: set_settings(name, k_def, k_per, t_def, t_per) for name, _ in sets}
    resolved = resolve_model(args.model, args.merged_dir, merge=not args.no_merge)
    log(f"model: {resolved.path} ({resolved.kind})")
    t0 = time.time()
    backend = make_backend(args, resolved.path)
    log(f"backend: {backend.name}; stop token ids {backend.stop_ids}; max_new_tokens {args.max_new_tokens}")
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "label": args.label,
        "model": args.model,
        "model_path": resolved.path,
        "model_kind": resolved.kind,
        "checkpoint": resolved.checkpoint,
        "backend": backend.name,
        "max_new_tokens": args.max_new_tokens,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop_token_ids": backend.stop_ids,
        "scorer": "tbrm_verl.tasks.math.reward.compute_score(convention='zero_one')",
        "metric_definitions": {
            "avg@k": "mean over problems of (correct samples / k): mean accuracy of k samples per problem",
            "pass@k": "fraction of problems with at least one correct sample among k",
            "mean/avg@k": "unweighted mean over the evaluated sets of each set's avg@k (the paper's mean column)",
        },
        "sets": {},
        "metrics": {},
    }
    samples_fh = open(args.samples_out, "w") if args.samples_out else None
    try:
        for name, path in sets:
            k, temp = settings[name]
            log(f"{name}: {path}, k={k}, temperature={temp}")
            r = evaluate_set(backend, name, path, k, temp, args.seed, args.limit, samples_fh, args.score_workers)
            results["sets"][name] = r
            results["metrics"][f"{name}/avg@{k}"] = r[f"avg@{k}"]
            if k > 1:
                results["metrics"][f"{name}/pass@{k}"] = r[f"pass@{k}"]
            extra = f", pass@{k} {100 * r[f'pass@{k}']:.1f}%" if k > 1 else ""
            log(f"{name}: avg@{k} {100 * r[f'avg@{k}']:.2f}%{extra} over {r['n_problems']} problems "
                f"({r['n_correct']}/{r['n_samples']} samples correct, {r['n_truncated']} truncated)")
    finally:
        if samples_fh:
            samples_fh.close()
    avgs = [r[r["metric"]] for r in results["sets"].values()]
    results["metrics"]["mean/avg@k"] = sum(avgs) / len(avgs)
    results["elapsed_seconds"] = round(time.time() - t0, 2)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        log(f"results written to {args.out}")
    else:
        print(text)
    return results
