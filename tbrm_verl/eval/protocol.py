"""``python -m tbrm_verl.eval``: the paper's evaluation protocol (arXiv 2505.15311 §5, spec §2) and its Table 1.

Evaluate a model on the six evaluation parquets written by ``python -m tbrm_verl.data eval``::

    python -m tbrm_verl.eval run --model MODEL [--data-dir DIR] [--sets NAME ...] [--out results.json]
    python -m tbrm_verl.eval --model MODEL ...                      (same: ``run`` is the default command)
    python -m tbrm_verl.eval table results.json [more.json ...] [--model 1.5B|7B]

MODEL is any of
  * a Hugging Face model directory (``config.json`` plus weights) or a hub id;
  * a verl actor checkpoint ``.../global_step_N/actor``: its ``huggingface/`` subdirectory is used when it holds full
    weights (verl writes them only with ``actor.checkpoint.save_contents`` including ``hf_model``); otherwise the
    FSDP shards are merged once with ``python -m verl.model_merger merge --backend fsdp`` into ``--merged-dir``
    (default ``.../global_step_N/actor/merged_hf``) and that directory is evaluated;
  * ``.../global_step_N`` (its ``actor/``), or a checkpoint directory / run directory holding
    ``latest_checkpointed_iteration.txt`` (directly or under ``checkpoints/``): the latest step's actor.

Protocol (defaults; the paper's): AIME24, AIME25, AMC23: k = 32 samples per problem at temperature 1.0, reported as
``avg@32`` = the mean over problems of the fraction of the 32 samples that are correct (mean accuracy, NOT pass@k);
MATH500, Minerva, OlympiadBench: one greedy sample (temperature 0), ``avg@1``. ``--k`` and ``--temperature`` change
this for all sets (``--k 4``) or one set (``--k aime24=4``). ``pass@k`` (fraction of problems with at least one
correct sample among the k) is reported beside ``avg@k`` for k > 1, under that name. top-p is 1.0 (``--top-p``), no
top-k. Responses are scored with ``tbrm_verl.tasks.math.reward.compute_score`` (last ``\\boxed{}``, Math-Verify, 0/1).
Prompts are the parquet ``prompt`` messages rendered with the tokenizer's chat template (generation prompt added),
as verl renders them for training. Generation stops at the tokenizer's / generation config's EOS tokens and at
``<|im_end|>`` when the tokenizer has it (the end of the assistant turn; ``--no-im-end-stop`` to turn off), or after
``--max-new-tokens`` (default 2048, the training response length; the paper's evaluation length is not stated).

Backends: ``vllm`` (GPU; ``LLM.generate`` with ``SamplingParams(n=k, temperature, top_p, max_tokens, seed)``, one
request per problem, seeded with ``--seed`` + the problem's row) and ``hf`` (transformers ``generate``; meant for
tiny models on CPU and for tests). ``--backend auto`` (default) takes vllm when it is importable and a GPU is visible.

Output (``--out``, JSON): per set ``avg@k``, ``pass@k`` (k > 1), ``k``, ``temperature``, ``n_problems``,
``n_samples``, ``n_correct``, ``n_truncated`` and ``per_problem`` (row, ground truth, ``n_correct`` of ``k``); a flat
``metrics`` map (``aime24/avg@32``, ..., ``mean/avg@k`` = the mean of the sets' avg@k, as the paper's "mean"
column). ``--samples-out FILE.jsonl`` also dumps every sample (response text, score). All accuracies in the JSON are
fractions in [0, 1]; the table prints percentages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "tbrm_verl.eval/v1"
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
SET_TITLES = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH500", "minerva": "Minerva",
              "olympiadbench": "OlympiadBench"}
#: the paper's protocol: set -> (samples per problem k, temperature)
PROTOCOL: dict[str, tuple[int, float]] = {
    "aime24": (32, 1.0), "aime25": (32, 1.0), "amc23": (32, 1.0),
    "math500": (1, 0.0), "minerva": (1, 0.0), "olympiadbench": (1, 0.0),
}
DEFAULT_PROTOCOL = (1, 0.0)  # a set not in the paper: one greedy sample
DEFAULT_MAX_NEW_TOKENS = 2048
MERGED_MARKER = ".tbrm_merged"
IM_END = "<|im_end|>"

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


class EvalError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""


def _log(msg: str) -> None:
    print(f"[tbrm_verl.eval] {msg}", file=sys.stderr, flush=True)


# ================================================================================================ model resolution
def _has_weights(d: Path) -> bool:
    return d.is_dir() and (any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin"))
                           or (d / "model.safetensors.index.json").exists())


def _is_hf_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and _has_weights(d)


def _is_actor_ckpt(d: Path) -> bool:
    return d.is_dir() and any(d.glob("model_world_size_*_rank_0.pt"))


def _latest_step_dir(d: Path) -> Path | None:
    for base in (d, d / "checkpoints"):
        f = base / "latest_checkpointed_iteration.txt"
        if f.is_file():
            step = f.read_text().strip()
            if not step.isdigit():
                raise EvalError(f"{f}: expected a step number, found {step!r}")
            return base / f"global_step_{step}"
    return None


@dataclass
class ResolvedModel:
    path: str                      # what the backend loads
    source: str                    # what the user gave
    kind: str                      # hf_dir | hub_id | checkpoint_hf | checkpoint_merged
    checkpoint: str | None = None  # the actor checkpoint directory, if any
    merged_now: bool = False


def resolve_model(model: str, merged_dir: str | None = None, merge: bool = True) -> ResolvedModel:
    """Turn --model into a directory (or hub id) a backend can load; merges FSDP shards when needed."""
    p = Path(model).expanduser()
    if not p.exists():
        if model.startswith(("/", ".", "~")) or model.count("/") > 1:
            raise EvalError(f"--model {model}: no such directory")
        return ResolvedModel(model, model, "hub_id")
    if _is_hf_dir(p):
        return ResolvedModel(str(p.resolve()), model, "hf_dir")
    step = _latest_step_dir(p)
    if step is not None:
        if not step.is_dir():
            raise EvalError(f"{p}: latest_checkpointed_iteration.txt names {step.name}, which does not exist")
        p = step
    if (p / "actor").is_dir() and not _is_actor_ckpt(p):
        p = p / "actor"
    if not _is_actor_ckpt(p):
        raise EvalError(
            f"--model {model}: not a Hugging Face model directory (config.json + weights) nor a verl checkpoint "
            "(global_step_N/actor with model_world_size_*_rank_*.pt, or a directory with "
            "latest_checkpointed_iteration.txt)"
        )
    p = p.resolve()
    hf = p / "huggingface"
    if _is_hf_dir(hf):
        return ResolvedModel(str(hf), model, "checkpoint_hf", checkpoint=str(p))
    target = Path(merged_dir).expanduser().resolve() if merged_dir else p / "merged_hf"
    if (target / MERGED_MARKER).is_file() and _is_hf_dir(target):
        return ResolvedModel(str(target), model, "checkpoint_merged", checkpoint=str(p))
    if not merge:
        raise EvalError(f"{p}: holds FSDP shards only; merge them first (drop --no-merge)")
    merge_checkpoint(p, target)
    return ResolvedModel(str(target), model, "checkpoint_merged", checkpoint=str(p), merged_now=True)


def merge_checkpoint(actor_dir: Path, target: Path) -> None:
    """``python -m verl.model_merger merge --backend fsdp --local_dir ACTOR --target_dir TARGET`` (bf16 weights)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / MERGED_MARKER).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(actor_dir),
           "--target_dir", str(target)]
    _log("merging FSDP shards: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not _is_hf_dir(target):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EvalError(f"verl.model_merger failed on {actor_dir} (exit {proc.returncode}):\n{tail}")
    (target / MERGED_MARKER).write_text(json.dumps({"from": str(actor_dir), "at": time.time()}) + "\n")
    _log(f"merged model written to {target}")


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


# ================================================================================================ backends
@dataclass
class GenRequest:
    prompt_ids: list[int]
    k: int
    temperature: float
    seed: int


@dataclass
class Generation:
    texts: list[str]
    finish: list[str] = field(default_factory=list)  # "stop" | "length" per sample


def _stop_token_ids(tokenizer, model_path: str, im_end_stop: bool) -> list[int]:
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    try:
        from transformers import GenerationConfig

        g = GenerationConfig.from_pretrained(model_path).eos_token_id
        for e in g if isinstance(g, (list, tuple)) else [g]:
            if e is not None:
                ids.add(int(e))
    except Exception:  # no generation_config.json
        pass
    if im_end_stop and IM_END in tokenizer.get_vocab():
        ids.add(int(tokenizer.convert_tokens_to_ids(IM_END)))
    return sorted(ids)


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt token ids as verl renders them: chat template text (generation prompt added), then tokenized
    without extra special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a tokenizer without a template (not the case for Qwen2.5-Math): plain concatenation
        text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 2048,
                 top_p: float = 1.0, im_end_stop: bool = True, device: str | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.batch_size, self.max_new_tokens, self.top_p = batch_size, max_new_tokens, top_p
        self.stop_ids = _stop_token_ids(self.tokenizer, model_path, im_end_stop)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])

    def generate(self, requests: list[GenRequest], desc: str = "") -> list[Generation]:
        torch = self.torch
        out: list[Generation] = []
        try:
            from tqdm import tqdm
        except ImportError:  # progress is optional
            tqdm = None
        # requests of one set share k and temperature: one generate() call per batch of problems, in row order
        batches = [requests[i: i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        it = tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False) if tqdm else batches
        for batch in it:
            k, temp = batch[0].k, batch[0].temperature
            assert all(r.k == k and r.temperature == temp for r in batch)
            L = max(len(r.prompt_ids) for r in batch)
            ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, r in enumerate(batch):  # left padding
                ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                attn[i, L - len(r.prompt_ids):] = 1
            # explicit settings: a model's generation_config.json may carry its own top-k / repetition penalty
            kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, num_return_sequences=k,
                                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id, repetition_penalty=1.0)
            if temp > 0:
                kw.update(do_sample=True, temperature=temp, top_p=self.top_p, top_k=0)  # top_k=0: no top-k
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
                torch.manual_seed(batch[0].seed)
                with torch.no_grad():
                    seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                               **kw)
            gen = seqs[:, L:].tolist()
            for i in range(len(batch)):
                texts, finish = [], []
                for g in gen[i * k:(i + 1) * k]:
                    cut = next((j for j, t in enumerate(g) if t in self.stop_ids), None)
                    toks = g if cut is None else g[:cut]
                    texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
                    finish.append("length" if cut is None else "stop")
                out.append(Generation(texts, finish))
        return out


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "auto", max_new_tokens: int = 2048, top_p: float = 1.0,
                 im_end_stop: bool = True, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, seed: int = 0):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise EvalError(f"--backend vllm: vllm is not importable ({e}); install the gpu extra or use "
                            "--backend hf") from None
        from transformers import AutoTokenizer

        self.SamplingParams = SamplingParams
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_new_tokens, self.top_p = max_new_tokens, top_p
        self.stop_ids = _stop_token_ids(self.tokenizer, model_path, im_end_stop)
        kw: dict[str, Any] = dict(model=model_path, tokenizer=model_path, dtype=dtype,
                                  tensor_parallel_size=tensor_parallel_size,
                                  gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(**kw)

    def generate(self, requests: list[GenRequest], desc: str = "") -> list[Generation]:
        params = [
            self.SamplingParams(n=r.k, temperature=r.temperature, top_p=self.top_p if r.temperature > 0 else 1.0,
                                max_tokens=self.max_new_tokens, seed=r.seed, stop_token_ids=list(self.stop_ids),
                                skip_special_tokens=True)
            for r in requests
        ]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        _log(f"{desc}: vLLM generating {sum(r.k for r in requests)} samples for {len(requests)} problems")
        results = self.llm.generate(prompts, sampling_params=params, use_tqdm=True)
        out = []
        for r, res in zip(requests, results):
            if len(res.outputs) != r.k:
                raise EvalError(f"vLLM returned {len(res.outputs)} samples for a request of n={r.k}")
            out.append(Generation([o.text for o in res.outputs],
                                  ["length" if o.finish_reason == "length" else "stop" for o in res.outputs]))
        return out


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


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


def _make_backend(args, model_path: str):
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if _vllm_usable() else "hf"
    if backend == "vllm":
        return VLLMBackend(model_path, dtype=args.dtype, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                           im_end_stop=args.im_end_stop, tensor_parallel_size=args.tensor_parallel_size,
                           gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                           seed=args.seed)
    return HFBackend(model_path, dtype=args.dtype, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     top_p=args.top_p, im_end_stop=args.im_end_stop, threads=args.threads)


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


def cmd_run(args) -> int:
    sets = _set_files(args)
    k_def, k_per = _parse_per_set(args.k, int, "k")
    t_def, t_per = _parse_per_set(args.temperature, float, "temperature")
    for unknown in sorted((set(k_per) | set(t_per)) - {n for n, _ in sets}):
        raise EvalError(f"--k/--temperature name {unknown!r}, which is not among the evaluated sets")
    settings = {name: set_settings(name, k_def, k_per, t_def, t_per) for name, _ in sets}
    resolved = resolve_model(args.model, args.merged_dir, merge=not args.no_merge)
    _log(f"model: {resolved.path} ({resolved.kind})")
    t0 = time.time()
    backend = _make_backend(args, resolved.path)
    _log(f"backend: {backend.name}; stop token ids {backend.stop_ids}; max_new_tokens {args.max_new_tokens}")
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
            _log(f"{name}: {path}, k={k}, temperature={temp}")
            r = evaluate_set(backend, name, path, k, temp, args.seed, args.limit, samples_fh, args.score_workers)
            results["sets"][name] = r
            results["metrics"][f"{name}/avg@{k}"] = r[f"avg@{k}"]
            if k > 1:
                results["metrics"][f"{name}/pass@{k}"] = r[f"pass@{k}"]
            extra = f", pass@{k} {100 * r[f'pass@{k}']:.1f}%" if k > 1 else ""
            _log(f"{name}: avg@{k} {100 * r[f'avg@{k}']:.2f}%{extra} over {r['n_problems']} problems "
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
        _log(f"results written to {args.out}")
    else:
        print(text)
    if args.table:
        print(format_table([(args.label or Path(args.model).name, results)], args.table_model))
    return 0


# ================================================================================================ table
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


# ================================================================================================ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tbrm_verl.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate a model or checkpoint (the default command)")
    r.add_argument("--model", required=True, help="HF model dir or hub id, or a verl checkpoint (see module doc)")
    r.add_argument("--data-dir", default=None, help="directory of {set}.parquet (default $TBRM_DATA_DIR or ./data)")
    r.add_argument("--sets", nargs="*", default=None, metavar="NAME[=FILE]",
                   help=f"sets to evaluate (default: {' '.join(EVAL_SETS)})")
    r.add_argument("--k", action="append", default=None, metavar="K|NAME=K",
                   help="samples per problem, for all sets or one set (repeatable); default: the paper's protocol")
    r.add_argument("--temperature", action="append", default=None, metavar="T|NAME=T",
                   help="sampling temperature, for all sets or one set (repeatable); 0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    r.add_argument("--seed", type=int, default=0, help="request seed = seed + problem row")
    r.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto")
    r.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (hf auto: fp32 on CPU)")
    r.add_argument("--batch-size", type=int, default=16, help="hf backend: problems per generate() call")
    r.add_argument("--threads", type=int, default=None, help="hf backend: torch CPU threads")
    r.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend")
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm backend")
    r.add_argument("--max-model-len", type=int, default=None, help="vllm backend (default: the model's)")
    r.add_argument("--no-im-end-stop", dest="im_end_stop", action="store_false",
                   help="do not stop at <|im_end|> (only at the EOS tokens)")
    r.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each set")
    r.add_argument("--merged-dir", default=None, help="where to merge FSDP shards (default ACTOR_DIR/merged_hf)")
    r.add_argument("--no-merge", action="store_true", help="refuse to merge FSDP shards")
    r.add_argument("--score-workers", type=int, default=4, help="threads feeding the Math-Verify process pool")
    r.add_argument("--out", default=None, help="results JSON (default: printed)")
    r.add_argument("--samples-out", default=None, help="JSONL dump of every sample and its score")
    r.add_argument("--label", default=None, help="name of this run in the table (default: the model's name)")
    r.add_argument("--table", action="store_true", help="print the Table 1 comparison afterwards")
    r.add_argument("--table-model", choices=tuple(PAPER_TABLE1), default=None)
    t = sub.add_parser("table", help="print the paper's Table 1 beside one or more results files")
    t.add_argument("results", nargs="+", help="results JSON files written by `run --out`")
    t.add_argument("--model", choices=tuple(PAPER_TABLE1), default=None,
                   help="paper rows for this model size (default: guessed from the results, else both)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "table", "-h", "--help"):
        argv = ["run"] + argv
    args = _parser().parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_table(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
