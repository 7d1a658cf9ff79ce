"""End-to-end: one TBRM step of the real pipeline (`python -m tbrm_verl.main`: Ray, verl's v1 trainer, cpu_hf
rollout, the reward loop) on reasoning-gym problems written by `python -m tbrm_verl.data reasoning_gym`, scored by
tbrm_verl.tasks.reasoning_gym.reward, with a greedy validation before training (Table 4's evaluation path).

The embedded model has 512 positions (max_position_embeddings) and a 320-token byte-level tokenizer, so a prompt
costs about one token per character: with reasoning-gym's system prompt, the graph tasks' prompts are 425-1000
tokens. The run therefore uses the task with the shortest prompts, family_relationships, and keeps the prompts that
fit 480 tokens (data.filter_overlong_prompts), with 32 response tokens: 512 positions in all. The tiny model scores
0; the test asks for exit 0, a finite loss and the verifier's metrics, not for learning.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import e2e_helpers as H  # noqa: E402

pytestmark = pytest.mark.e2e

TASK = "family_relationships"
MAX_PROMPT, MAX_RESPONSE, BATCH = 480, 32, 8


def test_one_tbrm_step_on_reasoning_gym(tmp_path):
    from transformers import AutoTokenizer

    from tbrm_verl.data.__main__ import main as data_main
    from tbrm_verl.tasks.embedded import ensure_embedded_assets

    data = tmp_path / "data"
    assert data_main(["reasoning_gym", "--out-dir", str(data), "--train-size", "40", "--test-size", "8",
                      "--tasks", TASK]) == 0
    train, test = (str(data / f"reasoning_gym_{TASK}_{s}.parquet") for s in ("train", "test"))

    # what the filter will keep, counted here with the model's own tokenizer
    model = ensure_embedded_assets(verbose=False)["model_path"]
    with open(os.path.join(model, "config.json")) as f:
        assert MAX_PROMPT + MAX_RESPONSE <= json.load(f)["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(model)

    def fitting(path):
        n = 0
        for row in pq.read_table(path).to_pylist():
            ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
            n += len(ids["input_ids"] if hasattr(ids, "keys") else ids) <= MAX_PROMPT
        return n

    assert fitting(train) >= BATCH and fitting(test) >= 1

    res = H.run_main(str(tmp_path / "run"), [
        f"data.train_files=[{train}]",
        f"data.val_files=[{test}]",
        f"data.max_prompt_length={MAX_PROMPT}",
        f"data.max_response_length={MAX_RESPONSE}",
        "data.filter_overlong_prompts=true",
        f"data.train_batch_size={BATCH}",
        "reward.custom_reward_function.path=pkg://tbrm_verl.tasks.reasoning_gym.reward",
        "trainer.total_training_steps=1",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.val_before_train=true",
    ], timeout_s=600)
    assert res.rc == 0 and not res.timed_out, res.describe()
    assert not res.leftovers, res.describe()

    steps = H.load_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    m = steps[1]
    assert math.isfinite(m["actor/tbrm_loss"]) and m["actor/tbrm_loss"] >= 0
    assert 0.0 <= m["critic/score/mean"] <= 1.0
    assert m["prompt_length/max"] <= MAX_PROMPT and m["response_length/max"] <= MAX_RESPONSE
    acc = steps[0][f"val-core/reasoning_gym/{TASK}/acc/mean@1"]  # greedy, scored by the task's verifier
    assert 0.0 <= acc <= 1.0
    assert os.path.exists(tmp_path / "run" / "reward_residual.png")
