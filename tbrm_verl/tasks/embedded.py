"""The "embedded default" assets that `python -m tbrm_verl.main` trains on when given no arguments.

Everything is built locally in seconds, with no download: a one-digit addition task ("What is a+b? ..." with
a, b in 0..9, answer ``\\boxed{a+b}``) in verl's parquet format, a byte-level BPE tokenizer trained on the task's
strings (ChatML chat template, like Qwen's), a tiny Qwen2 model (hidden 128, 2 layers, 4 heads of 32, 2 KV heads,
tied embeddings, ~337k parameters), and a short supervised warm start on correct answers only that stops as soon
as the model's mean probability of the full correct answer (temperature 1, all 100 pairs) reaches ~0.25. A random
model never answers right (every reward 0, nothing for RL to learn); the warm-started one knows the format and is
right about a quarter of the time, which is what RL then improves.

    ensure_embedded_assets(cache_dir=None, force=False) -> {"model_path", "train_file", "val_file", "cache_dir"}

builds once and caches. Default cache dir: ``$TBRM_VERL_CACHE/embedded-v1`` if ``TBRM_VERL_CACHE`` is set, else
``~/.cache/tbrm_verl/embedded-v1`` (bump ``RECIPE_VERSION`` whenever the recipe changes). The build happens in a
temporary directory next to the cache dir, under an fcntl lock, and is renamed into place with a ``DONE`` marker
written last: a concurrent or interrupted build never leaves a half-built cache that is later taken as complete.

CLI: ``python -m tbrm_verl.tasks.embedded [--cache-dir DIR] [--force]`` builds (if needed) and prints the paths as
JSON.

The small pieces are public for tests and other modules: `build_tokenizer`, `build_tiny_qwen2` (alias
`build_model`), `make_rows`, `warm_start`, `answer_probability`, `sampled_accuracy`, `score`. Answers are extracted
with the math reward's `last_boxed_answer` and sampled with the evaluation's `hf_sample`, as everywhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from typing import Any, Callable

from tbrm_verl.tasks import asset_cache
from tbrm_verl.tasks.math.reward import last_boxed_answer

__all__ = [
    "RECIPE_VERSION", "DATA_SOURCE", "SEED", "CHAT_TEMPLATE", "question", "answer_text", "score", "all_pairs",
    "make_rows", "write_parquets", "build_tokenizer", "build_tiny_qwen2", "build_model", "prompt_ids", "response_ids",
    "answer_probability", "warm_start", "sampled_accuracy", "default_cache_dir", "ensure_embedded_assets", "main",
]

RECIPE_VERSION = "v1"
DATA_SOURCE = "embedded_arith"
SEED = 0

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
VOCAB_SIZE = 320  # 256 byte tokens + 3 specials + 61 merges

# Qwen2.5-style ChatML template, without Qwen's default system prompt (keeps prompts short).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split: every digit is its own pre-token, so "17" is always "1", "7".
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Warm-start recipe (measured: ~71 steps, ~10 s to p(correct) ~0.25 on 2 CPU cores).
WARM_LR = 3e-3
WARM_TARGET = 0.25
WARM_MAX_STEPS = 400

TRAIN_REPEATS = 4  # train parquet: the 100 pairs 4 times, shuffled (400 rows); val: the 100 pairs once, in order


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[tbrm_verl.tasks.embedded] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------- the task


def question(a: int, b: int) -> str:
    return f"What is {a}+{b}? Put the final answer in \\boxed{{}}."


def answer_text(a: int, b: int) -> str:
    return f"\\boxed{{{a + b}}}"


def score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the last boxed answer (the math reward's `last_boxed_answer`) is exactly the ground truth, else 0.0."""
    return 1.0 if last_boxed_answer(solution_str) == str(ground_truth).strip() else 0.0


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10) for b in range(10)]


def make_rows(split: str, seed: int = SEED, repeats: int | None = None) -> list[dict[str, Any]]:
    """verl RL-dataset rows. "train": all 100 pairs `repeats` times (default 4), shuffled with `seed`;
    "val"/"test": all 100 pairs once, in (a, b) order."""
    pairs = all_pairs()
    if split == "train":
        pairs = pairs * (TRAIN_REPEATS if repeats is None else repeats)
        random.Random(seed).shuffle(pairs)
    elif repeats is not None:
        pairs = pairs * repeats
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": question(a, b)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"index": i, "split": split, "a": a, "b": b},
        }
        for i, (a, b) in enumerate(pairs)
    ]


def write_parquets(data_dir: str, seed: int = SEED) -> tuple[str, str]:
    import pandas as pd

    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.parquet")
        pd.DataFrame(make_rows(split, seed)).to_parquet(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


# -------------------------------------------------------------------------------------------------- tokenizer


def _training_texts() -> list[str]:
    """The text the BPE is trained on: every prompt and answer as ChatML renders them (specials removed)."""
    texts = []
    for a, b in all_pairs():
        texts += ["user\n" + question(a, b), "\n", "assistant\n" + answer_text(a, b), "\n"]
    # A little generic text so the vocabulary fills up to ~320 and is not only the task's exact strings.
    texts += ["system\nYou are a helpful assistant.", "The answer is", "Let me think step by step."]
    return texts


def build_tokenizer(save_dir: str | None = None, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on the task's strings, as a `PreTrainedTokenizerFast` with a ChatML template.

    With `save_dir` the tokenizer is saved there and the one returned is reloaded with `AutoTokenizer`: a tokenizer
    built in memory can split text differently from the same one reloaded (measured with transformers 5.10.4), and
    everything downstream (verl included) uses the reloaded one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        additional_special_tokens=[IM_START, IM_END], model_max_length=512, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if save_dir is None:
        return fast
    os.makedirs(save_dir, exist_ok=True)
    fast.save_pretrained(save_dir)
    return AutoTokenizer.from_pretrained(save_dir)


def prompt_ids(tokenizer, a: int, b: int) -> list[int]:
    """Prompt token ids exactly as verl renders them: apply_chat_template(..., add_generation_prompt=True)."""
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": question(a, b)}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if len(out) and isinstance(out[0], list):
        out = out[0]
    return list(out)


def response_ids(tokenizer, a: int, b: int) -> list[int]:
    """The correct response as the model must generate it: ``\\boxed{a+b}`` then ``<|im_end|>``."""
    return list(tokenizer.encode(answer_text(a, b), add_special_tokens=False)) + [tokenizer.convert_tokens_to_ids(IM_END)]


# ------------------------------------------------------------------------------------------------------ model


def build_tiny_qwen2(tokenizer, seed: int = SEED, pad_vocab_to: int = 64):
    """A random-weight Qwen2ForCausalLM (float32): hidden 128, 2 layers, 4 heads (head_dim 32), 2 KV heads,
    intermediate 256, tied embeddings, vocab = tokenizer size rounded up to a multiple of `pad_vocab_to`.
    The global torch RNG is left untouched."""
    n = len(tokenizer)
    vocab = -(-n // pad_vocab_to) * pad_vocab_to
    return random_qwen2(
        tokenizer, seed, vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    )


def random_qwen2(tokenizer, seed: int, **shape):
    """A random-init float32 Qwen2ForCausalLM with tied embeddings of the given shape (Qwen2Config keywords), the
    same for the same `seed` (the global torch RNG is left untouched); eos is the tokenizer's IM_END, pad and bos its
    ENDOFTEXT."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        **shape, tie_word_embeddings=True, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
        use_cache=True,
    )
    config.dtype = torch.float32  # saved as "dtype": "float32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(torch.float32)
    # Token ids only: sampling settings are the trainer's (vLLM would otherwise take them as defaults).
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model


build_model = build_tiny_qwen2


# ------------------------------------------------------------------------------------------------- warm start


def _batch(tokenizer, pairs):
    """Right-padded prompt+response batch with a mask selecting the response-token targets."""
    import torch

    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    seqs, starts = [], []
    for a, b in pairs:
        p, r = prompt_ids(tokenizer, a, b), response_ids(tokenizer, a, b)
        seqs.append(p + r)
        starts.append(len(p))
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), T - 1), dtype=torch.bool)  # target position t+1 predicted at t
    for i, (s, p0) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        target_mask[i, p0 - 1 : len(s) - 1] = True
    return input_ids, attn, target_mask


def _answer_logprobs(model, input_ids, attn, target_mask):
    """Per-sequence sum of log p(response tokens | prompt) at temperature 1, plus the token count."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logp = logp * target_mask
    return logp.sum(-1), target_mask.sum()


def answer_probability(model, tokenizer, pairs=None) -> float:
    """Mean over `pairs` (default: all 100) of p(full correct response incl. <|im_end|> | prompt), temperature 1."""
    import torch

    pairs = all_pairs() if pairs is None else pairs
    with torch.no_grad():
        seq_logp, _ = _answer_logprobs(model, *_batch(tokenizer, pairs))
    return float(seq_logp.exp().mean())


def warm_start(
    model,
    tokenizer,
    target: float = WARM_TARGET,
    lr: float = WARM_LR,
    max_steps: int = WARM_MAX_STEPS,
    log: Callable[[str], None] | None = None,
    log_every: int = 10,
) -> dict[str, Any]:
    """Supervised warm start on correct answers only: full batch of the 100 pairs, AdamW(lr), mean NLL of the
    response tokens. Each step first measures the mean p(correct) at the current weights (same forward pass) and
    stops, without updating, once it reaches `target`; so the returned p_correct is that of the returned model.
    Deterministic given the model's initial weights."""
    import torch

    input_ids, attn, target_mask = _batch(tokenizer, all_pairs())
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    step, p = 0, 0.0
    t0 = time.time()
    while True:
        seq_logp, n_tok = _answer_logprobs(model, input_ids, attn, target_mask)
        p = float(seq_logp.detach().exp().mean())
        if log and (step % log_every == 0 or p >= target or step >= max_steps):
            log(f"warm start step {step}/≤{max_steps}, p(correct)={p:.3f}")
        if p >= target or step >= max_steps:
            break
        loss = -seq_logp.sum() / n_tok
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    model.eval()
    return {"steps": step, "p_correct": p, "reached_target": p >= target, "seconds": round(time.time() - t0, 2)}


def sampled_accuracy(
    model, tokenizer, samples_per_pair: int = 4, max_new_tokens: int = 16, seed: int = SEED, temperature: float = 1.0
) -> dict[str, float]:
    """Actually sample responses (temperature 1, no top-k/top-p) for every pair and score them.

    Returns accuracy (last boxed answer exact), well_formed (a boxed answer present and <|im_end|> emitted) and
    the number of samples. Sampled with the evaluation's `hf_sample`, all pairs in one batch, seeded with `seed`
    in a forked RNG: the global torch RNG is left untouched."""
    from tbrm_verl.eval.generate import hf_sample

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pairs = all_pairs()
    model.eval()
    samples = hf_sample(model, [prompt_ids(tokenizer, a, b) for a, b in pairs], k=samples_per_pair,
                        temperature=temperature, max_new_tokens=max_new_tokens, stop_ids=[eos_id],
                        pad_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), seed=seed)
    correct = well_formed = 0
    for i, (toks, ended) in enumerate(samples):  # prompt-major: samples_per_pair samples of each pair in turn
        a, b = pairs[i // samples_per_pair]
        text = tokenizer.decode(toks, skip_special_tokens=True)
        correct += score(text, str(a + b)) == 1.0
        well_formed += ended and last_boxed_answer(text) is not None
    n = len(samples)
    return {"accuracy": correct / n, "well_formed": well_formed / n, "samples": n}


# ------------------------------------------------------------------------------------------------ build + cache


def default_cache_dir() -> str:
    root = os.environ.get("TBRM_VERL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tbrm_verl")
    return os.path.join(root, f"embedded-{RECIPE_VERSION}")


_paths = asset_cache.asset_paths
_is_complete = asset_cache.is_built


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with `n` torch intra-op threads. Measured on a shared 2-core machine: for this tiny model one thread is
    barely slower than two when the machine is idle, and 4x faster when another process keeps a core busy (two
    threads then wait on each other); results are identical either way."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build(out_dir: str, seed: int, verbose: bool) -> dict[str, Any]:
    """Build every asset into `out_dir` (which must exist); returns the meta dict (also written to meta.json)."""
    with _torch_threads(1):
        return _build_assets(out_dir, seed, verbose)


def _build_assets(out_dir: str, seed: int, verbose: bool) -> dict[str, Any]:
    import torch

    t0, c0 = time.time(), time.process_time()
    log = lambda m: _log(verbose, m)  # noqa: E731
    p = _paths(out_dir)
    log("building tokenizer…")
    tokenizer = build_tokenizer(save_dir=p["model_path"])  # reloaded from disk: used for everything below
    log(f"tokenizer: {len(tokenizer)} tokens; writing parquet files…")
    write_parquets(os.path.dirname(p["train_file"]), seed=seed)
    log("building model…")
    model = build_tiny_qwen2(tokenizer, seed=seed)
    n_params = sum(x.numel() for x in model.parameters())
    log(f"model: Qwen2, {n_params / 1e3:.0f}k parameters; warm start to p(correct) ≥ {WARM_TARGET}…")
    ws = warm_start(model, tokenizer, log=log)
    if not ws["reached_target"]:
        raise RuntimeError(f"embedded warm start did not reach p(correct)={WARM_TARGET}: {ws}")
    log("sampling to measure accuracy at temperature 1…")
    acc = sampled_accuracy(model, tokenizer, seed=seed)
    log(f"sampled accuracy {acc['accuracy']:.3f} (well-formed {acc['well_formed']:.3f}, {acc['samples']} samples)")
    model.save_pretrained(p["model_path"], safe_serialization=True)
    meta = {
        "recipe": f"embedded-{RECIPE_VERSION}",
        "seed": seed,
        "data_source": DATA_SOURCE,
        "tokenizer_size": len(tokenizer),
        "vocab_size": model.config.vocab_size,
        "n_params": n_params,
        "warm_start": {"lr": WARM_LR, "target": WARM_TARGET, **ws},
        "p_correct": ws["p_correct"],
        "warm_start_steps": ws["steps"],
        "sampled_accuracy": acc["accuracy"],
        "sampled_well_formed": acc["well_formed"],
        "sampled_n": acc["samples"],
        "build_seconds": round(time.time() - t0, 2),
        "build_cpu_seconds": round(time.process_time() - c0, 2),
        "torch": torch.__version__,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def ensure_embedded_assets(
    cache_dir: str | None = None, force: bool = False, verbose: bool = True, seed: int = SEED
) -> dict[str, str]:
    """Return the embedded assets' paths, building them once (under a lock, atomically) if not cached yet.

    {"model_path": HF model dir (warm-started model + tokenizer), "train_file": parquet, "val_file": parquet,
     "cache_dir": the cache dir}. `force=True` rebuilds even if a complete cache exists."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    t0 = time.time()

    def build(tmp: str) -> dict:
        nonlocal t0
        t0 = time.time()  # after any wait for the lock
        _log(verbose, f"building embedded assets in {cache_dir}")
        return _build(tmp, seed, verbose)

    meta = asset_cache.build_once(cache_dir, _is_complete, build, force)
    if meta is not None:
        _log(
            verbose,
            f"done in {time.time() - t0:.1f} s: warm start {meta['warm_start_steps']} steps, "
            f"p(correct)={meta['p_correct']:.3f}, sampled accuracy={meta['sampled_accuracy']:.3f}",
        )
    return _paths(cache_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.tasks.embedded", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    paths = ensure_embedded_assets(args.cache_dir, force=args.force, verbose=not args.quiet)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
