"""Tests of the embedded default assets (tbrm_verl/tasks/embedded.py): tokenizer, model, parquet data, warm start, cache.

One real build (~10 s on 2 idle cores) is shared by the module; the locking / atomic-rename / force logic is
tested with a fast fake build. Everything lives under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from tbrm_verl.tasks import embedded as E

PAIRS = [(a, b) for a in range(10) for b in range(10)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one thread is as fast as two on an idle 2-core machine and far faster on a busy one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "embedded-v1"
    c0 = time.process_time()
    paths = E.ensure_embedded_assets(str(cache), verbose=False)
    paths["_build_cpu_s"] = time.process_time() - c0
    return paths


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model_path"])


@pytest.fixture(scope="module")
def meta(assets):
    with open(os.path.join(assets["cache_dir"], "meta.json")) as f:
        return json.load(f)


def _ids(out):
    """apply_chat_template(tokenize=True) output as a flat list of ints, whatever the transformers version returns."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if len(out) and isinstance(out[0], list):
        assert len(out) == 1
        out = out[0]
    return [int(x) for x in out]


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_task_strings(tokenizer):
    assert 300 <= len(tokenizer) <= 400
    texts = []
    for a, b in PAIRS:
        texts += [f"What is {a}+{b}? Put the final answer in \\boxed{{}}.", f"\\boxed{{{a + b}}}"]
    texts += ["The answer is \\boxed{12}.", "unseen text: zebra 9876 ~!", "x\n\ny"]
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)
        assert tokenizer.decode(ids) == t
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tokenizer.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [special]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    # digits are single tokens: a two-digit sum is two digit tokens
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("\\boxed{17}", add_special_tokens=False))[-3:] == ["1", "7", "}"]


def test_chat_template_is_chatml(tokenizer):
    msgs = [{"role": "user", "content": "What is 3+4? Put the final answer in \\boxed{}."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 3+4? Put the final answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nWhat is 3+4? Put the final answer in \\boxed{}.<|im_end|>\n"
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "\\boxed{7}"}], tokenize=False)
    assert full == no_gen + "<|im_start|>assistant\n\\boxed{7}<|im_end|>\n"


def test_reloaded_tokenizer_encodes_parquet_prompts_consistently(assets, tokenizer):
    """The ids verl renders for every parquet prompt (its own apply_chat_template helper, with the tokenizer loaded from
    model_path) equal the ids the warm start trained on, and the plain text route gives the same ids."""
    import pandas as pd

    verl_ct = pytest.importorskip("verl.utils.tokenizer.chat_template")
    df = pd.read_parquet(assets["val_file"])
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lengths = set()
    for prompt, extra in zip(df["prompt"], df["extra_info"]):
        msgs = [dict(m) for m in prompt]
        verl_ids = _ids(verl_ct.apply_chat_template(tokenizer, msgs, tokenize=True, add_generation_prompt=True))
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == verl_ids
        assert tokenizer.decode(verl_ids) == text
        assert E.prompt_ids(tokenizer, int(extra["a"]), int(extra["b"])) == verl_ids
        lengths.add(len(verl_ids))
        assert E.response_ids(tokenizer, int(extra["a"]), int(extra["b"]))[-1] == eos
    assert max(lengths) <= 32


# ----------------------------------------------------------------------------------------------------- model


def test_model_config(assets, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(assets["model_path"])
    assert cfg.model_type == "qwen2"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim >= 32 and head_dim * cfg.num_attention_heads == cfg.hidden_size
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 4, 2)
    assert cfg.tie_word_embeddings is True
    assert cfg.vocab_size >= len(tokenizer) and cfg.vocab_size % 64 == 0
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cfg.eos_token_id == im_end
    assert cfg.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gen = GenerationConfig.from_pretrained(assets["model_path"])
    assert gen.eos_token_id == im_end or gen.eos_token_id == [im_end]
    model = AutoModelForCausalLM.from_pretrained(assets["model_path"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float32"
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 400_000
    assert os.path.isfile(os.path.join(assets["model_path"], "model.safetensors"))


def test_build_tiny_qwen2_is_seeded(tokenizer):
    import torch

    state = torch.random.get_rng_state()
    m1, m2, m3 = (E.build_tiny_qwen2(tokenizer, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    w = lambda m: m.model.embed_tokens.weight  # noqa: E731
    assert torch.equal(w(m1), w(m2)) and not torch.equal(w(m1), w(m3))
    assert m1.config.vocab_size >= len(tokenizer)


# ------------------------------------------------------------------------------------------------------ data


def test_parquet_schema_and_contents(assets):
    import pandas as pd

    frames = {s: pd.read_parquet(assets[f"{s}_file"]) for s in ("train", "val")}
    for split, df in frames.items():
        assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert (df["data_source"] == "embedded_arith").all() and (df["ability"] == "math").all()
        assert list(df["extra_info"].map(lambda e: int(e["index"]))) == list(range(len(df)))
        for prompt, rm, extra in zip(df["prompt"], df["reward_model"], df["extra_info"]):
            assert len(prompt) == 1 and prompt[0]["role"] == "user"
            a, b = int(extra["a"]), int(extra["b"])
            assert 0 <= a <= 9 and 0 <= b <= 9 and extra["split"] == split
            content = prompt[0]["content"]
            assert f"{a}+{b}" in content and "\\boxed{}" in content and len(content) < 80
            assert rm["style"] == "rule"
            assert isinstance(rm["ground_truth"], str) and int(rm["ground_truth"]) == a + b
    from collections import Counter

    val_pairs = [(int(e["a"]), int(e["b"])) for e in frames["val"]["extra_info"]]
    assert sorted(val_pairs) == PAIRS  # every pair exactly once
    train_counts = Counter((int(e["a"]), int(e["b"])) for e in frames["train"]["extra_info"])
    assert set(train_counts) == set(PAIRS) and len(set(train_counts.values())) == 1  # every pair equally often
    assert 200 <= len(frames["train"]) <= 1000
    train_pairs = [(int(e["a"]), int(e["b"])) for e in frames["train"]["extra_info"]]
    assert train_pairs[:100] != PAIRS  # shuffled
    assert frames["train"]["reward_model"].map(lambda r: r["ground_truth"]).nunique() == 19  # sums 0..18


def test_score():
    assert E.score("so \\boxed{3} no \\boxed{ 12 }", "12") == 1.0 and E.score("no answer", "7") == 0.0  # last box
    assert E.score("\\boxed{7}", "7") == 1.0 and E.score("\\boxed{8}", "7") == 0.0 and E.score("7", "7") == 0.0


# ------------------------------------------------------------------------------------------------ warm start


def test_warm_start_reached_threshold(assets, tokenizer, meta):
    """p(correct) measured independently: one unpadded forward per pair over the reloaded model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model_path"]).eval()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    probs = []
    with torch.no_grad():
        for a, b in PAIRS:
            msgs = [{"role": "user", "content": f"What is {a}+{b}? Put the final answer in \\boxed{{}}."}]
            p_ids = tokenizer(
                tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
            r_ids = tokenizer(f"\\boxed{{{a + b}}}", add_special_tokens=False)["input_ids"] + [eos]
            ids = torch.tensor([p_ids + r_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, len(p_ids) :]
            probs.append(float(logp[len(p_ids) - 1 :].gather(-1, targets[:, None]).sum().exp()))
    p = sum(probs) / len(probs)
    assert 0.2 <= p <= 0.9, p
    assert abs(p - meta["p_correct"]) < 2e-3, (p, meta["p_correct"])
    assert meta["p_correct"] >= E.WARM_TARGET and meta["warm_start_steps"] > 0
    # sampled accuracy was measured by sampling and recorded; the model knows the format
    assert 0.05 <= meta["sampled_accuracy"] <= 0.9 and meta["sampled_n"] >= 100
    assert meta["sampled_well_formed"] >= 0.8


def test_sampled_accuracy_is_deterministic_and_close(assets, tokenizer, meta):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model_path"])
    r1 = E.sampled_accuracy(model, tokenizer, samples_per_pair=1, seed=3)
    r2 = E.sampled_accuracy(model, tokenizer, samples_per_pair=1, seed=3)
    assert r1 == r2 and r1["samples"] == 100
    assert abs(r1["accuracy"] - meta["p_correct"]) < 0.15  # one sample per pair: loose


# ----------------------------------------------------------------------------------------------------- cache


def _mtimes(paths):
    return {
        k: os.stat(p).st_mtime_ns
        for k, p in (
            ("done", os.path.join(paths["cache_dir"], "DONE")),
            ("weights", os.path.join(paths["model_path"], "model.safetensors")),
            ("train", paths["train_file"]),
        )
    }


def test_build_was_fast_enough(assets):
    # CPU time, not wall time: wall time depends on what else runs on the machine. ~8-10 s measured (1 thread).
    assert assets["_build_cpu_s"] < 45


def test_cache_hit_returns_without_rebuilding(assets):
    before = _mtimes(assets)
    t0 = time.time()
    again = E.ensure_embedded_assets(assets["cache_dir"], verbose=False)
    assert time.time() - t0 < 1.0
    assert {k: again[k] for k in ("model_path", "train_file", "val_file", "cache_dir")} == {
        k: assets[k] for k in ("model_path", "train_file", "val_file", "cache_dir")
    }
    assert _mtimes(again) == before


def test_leftover_temp_dir_is_ignored(assets):
    parent, name = os.path.split(assets["cache_dir"])
    leftover = os.path.join(parent, f".{name}.tmp-deadbeef")  # a build killed half-way: no DONE
    os.makedirs(os.path.join(leftover, "model"))
    before = _mtimes(assets)
    # the complete cache is used as is, the leftover is never taken as a cache
    assert E.ensure_embedded_assets(assets["cache_dir"], verbose=False)["model_path"] == assets["model_path"]
    assert _mtimes(assets) == before


# -------------------------------------------------------------- cache logic with a fast fake build (no training)


@pytest.fixture
def fake_build(monkeypatch):
    calls = {"n": 0, "fail": False, "sleep": 0.0}

    def _build(out_dir, seed, verbose):
        calls["n"] += 1
        p = E._paths(out_dir)
        os.makedirs(p["model_path"])
        os.makedirs(os.path.dirname(p["train_file"]))
        time.sleep(calls["sleep"])
        for f in (p["train_file"], p["val_file"], os.path.join(p["model_path"], "model.safetensors")):
            open(f, "w").write("x")
        if calls["fail"]:
            raise KeyboardInterrupt("interrupted mid-build")
        meta = {"recipe": "fake", "warm_start_steps": 1, "p_correct": 0.3, "sampled_accuracy": 0.3}
        json.dump(meta, open(os.path.join(out_dir, "meta.json"), "w"))
        return meta

    monkeypatch.setattr(E, "_build", _build)
    return calls


def test_half_built_cache_dir_is_rebuilt(tmp_path, fake_build):
    cache = tmp_path / "embedded-v1"
    (cache / "model").mkdir(parents=True)  # looks like a cache, but has no DONE
    (cache / "data").mkdir()
    (cache / "data" / "train.parquet").write_text("stale")
    paths = E.ensure_embedded_assets(str(cache), verbose=False)
    assert fake_build["n"] == 1
    assert (cache / "DONE").is_file() and (cache / "data" / "train.parquet").read_text() == "x"
    E.ensure_embedded_assets(str(cache), verbose=False)
    assert fake_build["n"] == 1 and paths["cache_dir"] == str(cache)


def test_interrupted_build_leaves_nothing(tmp_path, fake_build):
    fake_build["fail"] = True
    cache = tmp_path / "embedded-v1"
    with pytest.raises(KeyboardInterrupt):
        E.ensure_embedded_assets(str(cache), verbose=False)
    assert not cache.exists()
    assert sorted(os.listdir(tmp_path)) == [".embedded-v1.lock"]
    fake_build["fail"] = False
    E.ensure_embedded_assets(str(cache), verbose=False)
    assert (cache / "DONE").is_file() and fake_build["n"] == 2


def test_force_rebuilds_and_cleans_leftovers(tmp_path, fake_build):
    cache = tmp_path / "embedded-v1"
    paths = E.ensure_embedded_assets(str(cache), verbose=False)
    leftover = tmp_path / ".embedded-v1.tmp-deadbeef"  # a build killed half-way: no DONE
    (leftover / "model").mkdir(parents=True)
    before = _mtimes(paths)
    E.ensure_embedded_assets(str(cache), verbose=False)
    assert fake_build["n"] == 1 and _mtimes(paths) == before and leftover.exists()
    time.sleep(0.01)
    E.ensure_embedded_assets(str(cache), force=True, verbose=False)
    assert fake_build["n"] == 2
    after = _mtimes(paths)
    assert all(after[k] != before[k] for k in before)
    assert sorted(os.listdir(tmp_path)) == [".embedded-v1.lock", "embedded-v1"]  # leftover and old copy removed


def test_concurrent_builders_build_once(tmp_path, fake_build):
    fake_build["sleep"] = 0.3
    cache = str(tmp_path / "embedded-v1")
    results, errors = [], []

    def worker():
        try:
            results.append(E.ensure_embedded_assets(cache, verbose=False))
        except BaseException as e:  # pragma: no cover  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 3
    assert fake_build["n"] == 1  # the fcntl lock serialised them; the others found DONE
    assert all(r == results[0] for r in results)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TBRM_VERL_CACHE", str(tmp_path))
    assert E.default_cache_dir() == os.path.join(str(tmp_path), f"embedded-{E.RECIPE_VERSION}")
    monkeypatch.delenv("TBRM_VERL_CACHE")
    assert E.default_cache_dir().endswith(os.path.join(".cache", "tbrm_verl", "embedded-v1"))
