"""`python -m tbrm_verl.eval`: the paper's evaluation protocol on a tiny local model (tbrm_verl.tasks.embedded).

Every number the CLI reports is checked against an independent recomputation: samples are re-scored here with a
plain regex (last \\boxed{...} compared as an integer with the ground truth), and Table 1 values are copied from the
spec by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tbrm_verl.eval import EvalError
from tbrm_verl.eval.checkpoint import resolve_model
from tbrm_verl.eval.cli import main
from tbrm_verl.eval.protocol import _parse_per_set, set_settings

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--backend", "hf", "--max-new-tokens", "12", "--threads", "1", "--batch-size", "32"]

# Table 1 (docs/paper.md §2), copied by hand: model -> method -> (six scores, mean)
PAPER = {
    "1.5B": {
        "base": ("5.0 1.9 24.9 63.4 16.5 30.8", "23.75"),
        "PPO n=1": ("11.4 4.5 46.6 72.2 26.8 36.0", "32.92"),
        "TBRM n=1": ("13.2 5.6 48.6 72.2 27.2 35.7", "33.75"),
        "GRPO n=4": ("13.0 7.1 49.9 71.2 28.7 37.5", "34.57"),
        "TBRM n=4": ("14.3 6.9 52.0 72.2 30.5 36.1", "35.33"),
    },
    "7B": {
        "base": ("10.6 2.8 31.6 67.4 13.2 29.3", "25.82"),
        "PPO n=1": ("25.4 13.2 63.4 76.4 33.8 39.3", "41.92"),
        "TBRM n=1": ("24.1 13.2 63.4 78.6 36.4 41.5", "42.87"),
        "GRPO n=4": ("28.9 10.7 66.8 79.8 36.0 42.5", "44.12"),
        "TBRM n=4": ("30.5 13.1 68.4 79.8 36.4 44.1", "45.38"),
    },
}


@pytest.fixture(scope="module")
def model_dir():
    from tbrm_verl.tasks.embedded import ensure_embedded_assets

    return ensure_embedded_assets(verbose=False)["model_path"]  # warm-started: ~25% right at temperature 1


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two evaluation sets in verl's parquet format: one-digit additions with integer answers (\\boxed{} task)."""
    import pandas as pd

    from tbrm_verl.tasks.embedded import make_rows

    d = tmp_path_factory.mktemp("evalsets")
    rows = make_rows("val")
    for name, picked in (("aime24", rows[3::9]), ("math500", rows[1::8])):
        picked = [dict(r, data_source=name) for r in picked]
        pd.DataFrame(picked).to_parquet(d / f"{name}.parquet")
    return d


def _boxed_int(text: str):
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if not found:
        return None
    try:
        return int(found[-1].strip())
    except ValueError:
        return None


def _run(argv):
    rc = main(argv)
    assert rc == 0


@pytest.fixture(scope="module")
def sampled_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _run(["--model", model_dir, "--data-dir", str(data_dir), "--sets", "aime24", "math500", "--k", "aime24=4",
          "--out", str(out / "results.json"), "--samples-out", str(out / "samples.jsonl"), *COMMON])
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return results, samples


def test_avg_at_k_equals_independent_rescoring(sampled_run, data_dir):
    import pandas as pd

    results, samples = sampled_run
    for name, k in (("aime24", 4), ("math500", 1)):
        truth = [int(r["ground_truth"]) for r in pd.read_parquet(data_dir / f"{name}.parquet")["reward_model"]]
        mine = [s for s in samples if s["set"] == name]
        assert len(mine) == len(truth) * k  # k samples per problem, every problem
        counts = [0] * len(truth)
        for s in mine:
            counts[s["row"]] += _boxed_int(s["response"]) == truth[s["row"]]
        avg = sum(c / k for c in counts) / len(truth)
        r = results["sets"][name]
        assert r[f"avg@{k}"] == pytest.approx(avg, abs=1e-12)
        assert results["metrics"][f"{name}/avg@{k}"] == pytest.approx(avg, abs=1e-12)
        assert [p["n_correct"] for p in r["per_problem"]] == counts
        assert r["n_correct"] == sum(counts) and r["n_samples"] == len(truth) * k
        if k > 1:
            assert r[f"pass@{k}"] == pytest.approx(sum(c > 0 for c in counts) / len(truth))
            assert results["metrics"][f"{name}/pass@{k}"] == r[f"pass@{k}"]
    a4 = results["sets"]["aime24"]["avg@4"]
    assert 0 < a4 < 1, "the warm-started tiny model should be right sometimes and wrong sometimes"
    # avg@k is a mean accuracy, not pass@k: with a ~25% model they differ
    assert results["sets"]["aime24"]["pass@4"] > a4
    assert results["metrics"]["mean/avg@k"] == pytest.approx((a4 + results["sets"]["math500"]["avg@1"]) / 2)


def test_json_schema_and_metric_names(sampled_run, data_dir):
    import pandas as pd

    results, _ = sampled_run
    assert results["schema"] == "tbrm_verl.eval/v1"
    assert set(results["metrics"]) == {"aime24/avg@4", "aime24/pass@4", "math500/avg@1", "mean/avg@k"}
    a, m = results["sets"]["aime24"], results["sets"]["math500"]
    assert (a["k"], a["temperature"], a["metric"]) == (4, 1.0, "avg@4")
    assert (m["k"], m["temperature"], m["metric"]) == (1, 0.0, "avg@1")
    assert "pass@1" not in m and "pass@4" in a
    for r, name in ((a, "aime24"), (m, "math500")):
        assert r["n_problems"] == len(r["per_problem"]) == len(pd.read_parquet(data_dir / f"{name}.parquet"))
        for p in r["per_problem"]:
            assert set(p) >= {"row", "ground_truth", "n_correct", "k"} and 0 <= p["n_correct"] <= p["k"] == r["k"]
    assert results["backend"] == "hf" and results["model_kind"] == "hf_dir"
    assert "pass@k" in results["metric_definitions"] and "avg@k" in results["metric_definitions"]


def test_default_protocol_is_the_papers():
    kd, kp = _parse_per_set(None, int, "k")
    td, tp = _parse_per_set(None, float, "temperature")
    want = {"aime24": (32, 1.0), "aime25": (32, 1.0), "amc23": (32, 1.0), "math500": (1, 0.0), "minerva": (1, 0.0),
            "olympiadbench": (1, 0.0)}
    assert {s: set_settings(s, kd, kp, td, tp) for s in want} == want
    kd, kp = _parse_per_set(["aime24=4", "amc23=8"], int, "k")
    assert set_settings("aime24", kd, kp, td, tp) == (4, 1.0)
    assert set_settings("amc23", kd, kp, td, tp) == (8, 1.0)
    assert set_settings("aime25", kd, kp, td, tp) == (32, 1.0)
    with pytest.raises(EvalError):  # k identical greedy samples
        set_settings("math500", 4, {}, None, {})


def test_greedy_is_deterministic(model_dir, data_dir, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        _run(["--model", model_dir, "--data-dir", str(data_dir), "--sets", "math500", "--out", str(out),
              "--samples-out", str(tmp_path / f"s{i}.jsonl"), *COMMON])
        outs.append(json.loads(out.read_text()))
    a, b = (o["sets"]["math500"] for o in outs)
    assert a["temperature"] == 0.0 and a["k"] == 1
    assert a["avg@1"] == b["avg@1"]
    assert [p["n_correct"] for p in a["per_problem"]] == [p["n_correct"] for p in b["per_problem"]]
    assert (tmp_path / "s0.jsonl").read_text() == (tmp_path / "s1.jsonl").read_text()


def _synthetic_results(values: dict[str, float], label: str, k_aime: int = 32) -> dict:
    sets = {}
    for s, v in values.items():
        k, t = (k_aime, 1.0) if s in ("aime24", "aime25", "amc23") else (1, 0.0)
        sets[s] = {"metric": f"avg@{k}", f"avg@{k}": v, "k": k, "temperature": t, "n_problems": 10,
                   "per_problem": []}
    return {"schema": "tbrm_verl.eval/v1", "label": label, "model": "runs/qwen2.5-math-1.5b_tbrm_n4", "sets": sets}


def test_table_prints_paper_rows_and_run_values(tmp_path):
    vals = {"aime24": 0.141, "aime25": 0.0725, "amc23": 0.5, "math500": 0.724, "minerva": 0.3, "olympiadbench": 0.36}
    f = tmp_path / "res.json"
    f.write_text(json.dumps(_synthetic_results(vals, "my-tbrm-n4")))
    proc = subprocess.run([sys.executable, "-m", "tbrm_verl.eval", "table", str(f), "--model", "1.5B"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for method, (scores, mean) in PAPER["1.5B"].items():
        row = [ln for ln in lines if " paper " in f" {ln} " and f" {method} " in f" {ln} "]
        assert len(row) == 1, (method, proc.stdout)
        assert row[0].split()[-7:] == scores.split() + [mean]
    assert not any(ln.startswith("7B") for ln in lines)  # --model 1.5B: only its rows
    run = [ln for ln in lines if "my-tbrm-n4" in ln and " run " in ln]
    assert len(run) == 1
    want = [f"{100 * vals[s]:.1f}" for s in ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")]
    mean = sum(100 * v for v in vals.values()) / 6
    assert run[0].split()[-7:] == want + [f"{mean:.2f}"]


def test_table_flags_protocol_differences_and_missing_sets(tmp_path):
    f = tmp_path / "res.json"
    f.write_text(json.dumps(_synthetic_results({"aime24": 0.25, "math500": 0.5}, "small", k_aime=4)))
    proc = subprocess.run([sys.executable, "-m", "tbrm_verl.eval", "table", str(f)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "avg@4" in proc.stdout and "paper: avg@32" in proc.stdout
    run = next(ln for ln in proc.stdout.splitlines() if " small " in f" {ln} ")
    assert run.split()[-7:] == ["25.0", "-", "-", "50.0", "-", "-", "37.50*"]
    assert "TBRM n=4" in proc.stdout  # the paper's rows are printed (model guessed from the path: 1.5B)


# ---------------------------------------------------------------------------------------------- vLLM backend
class _FakeOutput:
    def __init__(self, text, finish_reason="stop"):
        self.text, self.finish_reason, self.token_ids = text, finish_reason, []


class _FakeRequestOutput:
    def __init__(self, outputs):
        self.outputs = outputs


def _fake_vllm(calls):
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            calls.setdefault("params", []).append(kw)

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            calls.setdefault("prompts", []).extend(prompts)
            outs = []
            for p, sp in zip(prompts, sampling_params):
                n = sp.kw["n"]
                # sample j is right iff j < (number of prompt tokens) % (n + 1): a known, varied pattern
                right = len(p["prompt_token_ids"]) % (n + 1)
                outs.append(_FakeRequestOutput([_FakeOutput("\\boxed{7}" if j < right else "\\boxed{8}",
                                                            "length" if j == 0 else "stop") for j in range(n)]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_backend_calls_and_results(model_dir, data_dir, tmp_path, monkeypatch):
    import pandas as pd
    from transformers import AutoTokenizer

    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    # the fake answers \boxed{7} (right) or \boxed{8} (wrong): make 7 the ground truth of every problem
    df = pd.read_parquet(data_dir / "aime24.parquet")
    df["reward_model"] = [{"style": "rule", "ground_truth": "7"} for _ in range(len(df))]
    df.to_parquet(tmp_path / "aime24.parquet")
    out = tmp_path / "r.json"
    _run(["--model", model_dir, "--data-dir", str(tmp_path), "--sets", "aime24", "--backend", "vllm",
          "--k", "3", "--max-new-tokens", "77", "--seed", "5", "--tensor-parallel-size", "2", "--out", str(out)])
    res = json.loads(out.read_text())["sets"]["aime24"]
    assert calls["llm"]["model"] == model_dir and calls["llm"]["tensor_parallel_size"] == 2
    params = calls["params"]
    assert len(params) == len(df)
    for row, kw in enumerate(params):
        assert kw["n"] == 3 and kw["temperature"] == 1.0 and kw["max_tokens"] == 77 and kw["seed"] == 5 + row
        assert kw["top_p"] == 1.0 and 2 in kw["stop_token_ids"]  # <|im_end|> of the tiny tokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    want_ids = [tok.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False) for m in df["prompt"]]
    want_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in want_ids]
    assert [p["prompt_token_ids"] for p in calls["prompts"]] == want_ids
    rights = [len(ids) % 4 for ids in want_ids]
    assert [p["n_correct"] for p in res["per_problem"]] == rights
    assert res["avg@3"] == pytest.approx(sum(r / 3 for r in rights) / len(rights))
    assert res["n_truncated"] == len(df)  # sample 0 of each request ended by length


# ---------------------------------------------------------------------------------------------- verl checkpoints
def _fake_actor_checkpoint(model_dir: str, root: Path, step: int = 7) -> Path:
    """verl's layout (checkpoints/global_step_N/actor: model_world_size_1_rank_0.pt, fsdp_config.json,
    huggingface/ with config + tokenizer only; latest_checkpointed_iteration.txt), from the tiny model's weights."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    actor = root / "checkpoints" / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, actor / "huggingface" / f.name)
    (root / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(step))
    return actor


def test_checkpoint_is_merged_and_matches_the_hf_model(model_dir, data_dir, tmp_path):
    actor = _fake_actor_checkpoint(model_dir, tmp_path / "run")
    r = resolve_model(str(tmp_path / "run"))  # the run directory: latest step's actor, merged by verl
    assert r.kind == "checkpoint_merged" and r.merged_now and r.checkpoint == str(actor.resolve())
    assert Path(r.path) == actor.resolve() / "merged_hf" and (Path(r.path) / "config.json").is_file()
    again = resolve_model(str(actor.parent))  # global_step_N: reuses the merge
    assert again.path == r.path and not again.merged_now

    # verl's merger writes bf16 weights; the same model loaded in bf16 must give the same greedy answers
    res = []
    for m in (str(actor), model_dir):
        out = tmp_path / f"{len(res)}.json"
        _run(["--model", m, "--data-dir", str(data_dir), "--sets", "math500", "--dtype", "bfloat16",
              "--samples-out", str(tmp_path / f"{len(res)}.jsonl"), "--out", str(out), *COMMON])
        res.append(json.loads(out.read_text()))
    assert res[0]["model_kind"] == "checkpoint_merged" and res[0]["checkpoint"] == str(actor.resolve())
    assert (tmp_path / "0.jsonl").read_text() == (tmp_path / "1.jsonl").read_text()


def test_checkpoint_with_full_hf_weights_is_used_directly(model_dir, tmp_path):
    import shutil

    actor = _fake_actor_checkpoint(model_dir, tmp_path)
    for f in Path(model_dir).glob("*.safetensors"):
        shutil.copy(f, actor / "huggingface" / f.name)
    r = resolve_model(str(actor))
    assert r.kind == "checkpoint_hf" and Path(r.path) == actor.resolve() / "huggingface"


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
