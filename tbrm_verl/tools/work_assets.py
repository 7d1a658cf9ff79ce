"""The work setting's assets (`python -m tbrm_verl.bench --setting work`), built locally like the embedded assets (no
download), cached under the same root (``$TBRM_VERL_CACHE`` or ``~/.cache/tbrm_verl``):

* a byte-level BPE tokenizer trained on the spot (``tokenizers``) on generated text of a made-up language of ~50k
  words, to exactly ``vocab`` tokens (32,000 for the full size; ChatML template as the embedded one);
* a random-init Qwen2-architecture model (full size: hidden 512, 16 layers, 8 heads of 64, 2 KV heads, MLP 1408,
  tied embeddings, vocabulary 32,000: 61.5M parameters, 27% of them the embedding as in Qwen2.5-0.5B; with a larger
  share the LM head dominates the actor's passes and PPO's critic, which has no LM head, looks cheap), float32;
* prompts of exactly ``prompt_tokens`` tokens as verl renders them ("Continue the story: ..."), answers of exactly
  ``response_tokens`` tokens: the rollout runs with ``rollout.ignore_eos=true``, so every method generates the same
  number of tokens; the reward is a synthetic rule (`compute_score`), ~half the answers score 1: the point is cost.

Sizes: ``full`` (the benchmark) and ``tiny`` (tests and the smoke run: vocabulary 512, hidden 64, 2 layers,
32 + 32 tokens). The runs' reward function is `compute_score` here
(``reward.custom_reward_function.path=pkg://tbrm_verl.tools.work_assets``).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from tbrm_verl.tasks import asset_cache

RECIPE_VERSION = "v1"
DATA_SOURCE = "bench_work"
SEED = 0
PROMPT_PREFIX = "Continue the story: "


@dataclass(frozen=True)
class WorkSize:
    vocab: int  # tokenizer size = model vocabulary (a multiple of 64)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    prompt_tokens: int  # every prompt is exactly this long as verl renders it (chat template, generation prompt)
    response_tokens: int  # every answer (ignore_eos): data.max_response_length
    lexicon: int  # distinct words of the generated language
    corpus_words: int  # words of generated text the tokenizer is trained on
    train_rows: int = 256
    val_rows: int = 8


SIZES: dict[str, WorkSize] = {
    # 61.5M parameters; 2·P·(64+256) ≈ 39 GFLOP per sequence forward, ~1 s at 40 GFLOP/s (2 cores, fp32)
    "full": WorkSize(vocab=32000, hidden=512, layers=16, heads=8, kv_heads=2, head_dim=64, intermediate=1408,
                     prompt_tokens=64, response_tokens=256, lexicon=50000, corpus_words=400000),
    "tiny": WorkSize(vocab=512, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128,
                     prompt_tokens=32, response_tokens=32, lexicon=2000, corpus_words=20000, train_rows=64),
}


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[tbrm_verl.tools.work_assets] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- generated language

_ONSETS = ["", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "l", "k"]


def make_lexicon(n: int, seed: int = SEED) -> list[str]:
    """`n` distinct made-up words of 1-4 syllables; their order is their frequency rank (Zipf, see make_text)."""
    rng = random.Random(seed)
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def make_text(lexicon: list[str], n_words: int, rng: random.Random) -> str:
    """Sentences of 4-14 Zipf-distributed words (rank r drawn with weight 1/r), capitalised, with commas and
    numbers now and then."""
    weights = [1.0 / (r + 1) for r in range(len(lexicon))]
    picks = rng.choices(lexicon, weights=weights, k=n_words)
    out, i = [], 0
    while i < len(picks):
        k = rng.randint(4, 14)
        sent = picks[i : i + k]
        i += k
        if rng.random() < 0.2:
            sent.insert(rng.randrange(len(sent) + 1), str(rng.randint(0, 999)))
        if len(sent) > 3 and rng.random() < 0.3:
            sent[rng.randrange(1, len(sent) - 1)] += ","
        sent[0] = sent[0].capitalize()
        out.append(" ".join(sent) + ".")
    return " ".join(out)


def corpus(size: WorkSize, seed: int = SEED) -> list[str]:
    """The tokenizer's training text: lines of ~100 words, plus the chat roles and the prompt prefix."""
    lex = make_lexicon(size.lexicon, seed)
    rng = random.Random(seed + 1)
    lines = [make_text(lex, 100, rng) for _ in range(max(1, size.corpus_words // 100))]
    return lines + ["user\n" + PROMPT_PREFIX, "assistant\n", "system\nYou are a helpful assistant."]


# ------------------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(texts: list[str], vocab_size: int, save_dir: str):
    """Byte-level BPE with Qwen2's pre-tokenizer split, trained on `texts` to `vocab_size` tokens (3 specials
    included), ChatML template; saved to `save_dir` and returned reloaded with AutoTokenizer (as verl loads it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tbrm_verl.tasks.embedded import _QWEN2_SPLIT, CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        additional_special_tokens=[IM_START, IM_END], model_max_length=4096, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(save_dir, exist_ok=True)
    fast.save_pretrained(save_dir)
    return AutoTokenizer.from_pretrained(save_dir)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a user prompt exactly as verl renders it (apply_chat_template, add_generation_prompt=True)."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if len(out) and isinstance(out[0], list):
        out = out[0]
    return list(out)


# ---------------------------------------------------------------------------------------------------------- model


def build_model(tokenizer, size: WorkSize, seed: int = SEED):
    """Random-init Qwen2ForCausalLM (float32, tied embeddings) of `size`; the global torch RNG is left untouched."""
    from tbrm_verl.tasks.embedded import random_qwen2

    if len(tokenizer) != size.vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary is {size.vocab}")
    return random_qwen2(
        tokenizer, seed, vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim, max_position_embeddings=size.prompt_tokens + size.response_tokens,
    )


# ----------------------------------------------------------------------------------------------- task and reward

LETTERS = "aeiou"


def compute_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, convention="zero_one",
                  **_):
    """Synthetic reward: 1 when the answer contains the ground-truth letter an even number of times, else 0 (-1
    under the plus_minus_one convention). About half of random answers score 1; it exists so that every method has
    a non-degenerate reward, not to be learned."""
    hit = str(solution_str or "").count(str(ground_truth)) % 2 == 0
    return 1.0 if hit else (-1.0 if convention == "plus_minus_one" else 0.0)


def make_prompt(tokenizer, lexicon: list[str], n_tokens: int, rng: random.Random) -> str:
    """A prompt text whose rendering is exactly `n_tokens` tokens: words are added while they fit, then the gap is
    filled with single digits (one token each under Qwen2's split; a space before a digit is its own token)."""
    words = make_text(lexicon, 4 * n_tokens, rng).split(" ")
    text = PROMPT_PREFIX.rstrip()
    for w in words:
        if len(prompt_ids(tokenizer, text + " " + w)) > n_tokens:
            break
        text += " " + w
    while len(prompt_ids(tokenizer, text)) < n_tokens:
        text += str(rng.randint(0, 9))
    if len(prompt_ids(tokenizer, text)) != n_tokens:
        raise ValueError(f"could not make a prompt of exactly {n_tokens} tokens (got "
                         f"{len(prompt_ids(tokenizer, text))}); raise prompt_tokens")
    return text


def make_rows(tokenizer, size: WorkSize, split: str, n: int, seed: int = SEED) -> list[dict[str, Any]]:
    lex = make_lexicon(size.lexicon, seed)
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(n):
        letter = LETTERS[i % len(LETTERS)]
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": make_prompt(tokenizer, lex, size.prompt_tokens, rng)}],
            "ability": "synthetic",
            "reward_model": {"style": "rule", "ground_truth": letter},
            "extra_info": {"index": i, "split": split},
        })
    return rows


# ------------------------------------------------------------------------------------------------- build + cache


def default_cache_dir(size_name: str = "full") -> str:
    from tbrm_verl.tasks.embedded import default_cache_dir as embedded_dir

    return os.path.join(os.path.dirname(embedded_dir()), f"bench-work-{RECIPE_VERSION}-{size_name}")


_paths = asset_cache.asset_paths


def _is_complete(cache_dir: str, size: WorkSize) -> bool:
    """Built (DONE written last) and built for this size (a cache made before a size change is rebuilt)."""
    if not asset_cache.is_built(cache_dir):
        return False
    try:
        with open(os.path.join(cache_dir, "meta.json")) as f:
            return json.load(f).get("size") == asdict(size)
    except (OSError, ValueError):
        return False


def build_assets(out_dir: str, size: WorkSize, seed: int = SEED, verbose: bool = True) -> dict[str, Any]:
    """Build tokenizer, model and parquet files into `out_dir`; returns (and writes) meta.json."""
    import pandas as pd
    import torch

    t0 = time.time()
    p = _paths(out_dir)
    _log(verbose, f"training a {size.vocab}-token BPE on {size.corpus_words} words of generated text…")
    tokenizer = build_tokenizer(corpus(size, seed), size.vocab, p["model_path"])
    if len(tokenizer) != size.vocab:
        raise RuntimeError(f"the BPE reached {len(tokenizer)} tokens, not {size.vocab}: generate more text "
                           "(corpus_words, lexicon)")
    _log(verbose, "writing prompts…")
    os.makedirs(os.path.dirname(p["train_file"]), exist_ok=True)
    for split, n, key in (("train", size.train_rows, "train_file"), ("val", size.val_rows, "val_file")):
        pd.DataFrame(make_rows(tokenizer, size, split, n, seed)).to_parquet(p[key], index=False)
    model = build_model(tokenizer, size, seed)
    n_params = sum(x.numel() for x in model.parameters())
    _log(verbose, f"model: Qwen2, {n_params / 1e6:.1f}M parameters (random init)")
    model.save_pretrained(p["model_path"], safe_serialization=True)
    meta = {"recipe": f"bench-work-{RECIPE_VERSION}", "seed": seed, "size": asdict(size),
            "tokenizer_size": len(tokenizer), "n_params": n_params, "build_seconds": round(time.time() - t0, 2),
            "torch": torch.__version__}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def ensure_work_assets(size_name: str = "full", cache_dir: str | None = None, force: bool = False,
                       verbose: bool = True, seed: int = SEED) -> dict[str, str]:
    """Paths of the work setting's assets, built once under a lock and renamed into place with a DONE marker (as
    tbrm_verl.tasks.embedded does): {"model_path", "train_file", "val_file", "cache_dir"}."""
    size = SIZES[size_name]
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir(size_name)))

    def build(tmp: str) -> dict:
        _log(verbose, f"building the work-setting assets ({size_name}) in {cache_dir}")
        return build_assets(tmp, size, seed, verbose)

    meta = asset_cache.build_once(cache_dir, lambda d: _is_complete(d, size), build, force)
    if meta is not None:
        _log(verbose, f"done in {meta['build_seconds']:.1f} s")
    return _paths(cache_dir)
