"""Figure 1b's DeepSeek-R1 template: `python -m tbrm_verl.data train|eval --template r1`, its verbatim rendering
through verl's `custom_chat_template`, and the math reward's `<answer>...</answer>` extraction. The template text is
written here by hand from the paper, not read from the code."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from tbrm_verl.data.__main__ import main as data_main
from tbrm_verl.tasks.math.reward import MAX_ANSWER_CHARS, compute_score, final_answer

FIX = Path(__file__).resolve().parents[1] / "fixtures"
R1 = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
      "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
      "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
      "<think> reasoning process here </think> <answer> answer here </answer>. User: {}. Assistant:")
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# the override the docs give for rendering r1 rows verbatim (shell quotes removed)
RAW_OVERRIDE = 'actor_rollout_ref.model.custom_chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"'


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for template in ("qwen_math", "r1"):
        d = tmp_path_factory.mktemp(template)
        common = ["--out-dir", str(d), "--cache-dir", str(d / "hf"), "--progress-every", "0"]
        extra = [] if template == "qwen_math" else ["--template", "r1"]
        assert data_main(["train", "--source", str(FIX / "dapo_small.jsonl"), *common, *extra]) == 0
        assert data_main(["eval", "--names", "aime24", "--sources", f"aime24={FIX / 'aime24_small.jsonl'}",
                          *common, *extra]) == 0
        out[template] = d
    return out


@pytest.mark.parametrize("name", ["dapo_math_train", "aime24"])
def test_r1_rows_are_one_user_message_with_the_whole_template(built, name):
    default = pq.read_table(built["qwen_math"] / f"{name}.parquet").to_pylist()
    r1 = pq.read_table(built["r1"] / f"{name}.parquet").to_pylist()
    assert len(r1) == len(default) > 0
    for a, b in zip(default, r1):
        assert a["prompt"][0] == {"role": "system", "content": SYSTEM}  # the default is unchanged
        question = a["prompt"][1]["content"]
        assert b["prompt"] == [{"role": "user", "content": R1.format(question)}]
        assert {k: v for k, v in a.items() if k != "prompt"} == {k: v for k, v in b.items() if k != "prompt"}


def test_unknown_template_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["train", "--source", str(FIX / "dapo_small.jsonl"), "--out-dir", str(tmp_path), "--template", "x"])
    assert e.value.code == 2 and "invalid choice: 'x'" in capsys.readouterr().err


def test_custom_chat_template_renders_the_r1_prompt_verbatim(built):
    """The documented override composes, and verl's model config applies it: the tokenizer then renders an r1 row as
    exactly the template text (no ChatML, no default system prompt)."""
    from verl.utils.config import omega_conf_to_dataclass

    from tbrm_verl.config import compose
    from tbrm_verl.tasks.embedded import ensure_embedded_assets

    model = ensure_embedded_assets(verbose=False)["model_path"]
    cfg = compose(["profile=cpu", f"actor_rollout_ref.model.path={model}", RAW_OVERRIDE])
    row = pq.read_table(built["r1"] / "aime24.parquet").to_pylist()[0]
    model_cfg = omega_conf_to_dataclass(OmegaConf.create(OmegaConf.to_container(cfg.actor_rollout_ref.model,
                                                                                 resolve=True)))
    text = model_cfg.tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert text == row["prompt"][0]["content"] and text.endswith(". Assistant:")
    # without the override the ChatML template wraps it
    plain = omega_conf_to_dataclass(OmegaConf.create(OmegaConf.to_container(
        compose(["profile=cpu", f"actor_rollout_ref.model.path={model}"]).actor_rollout_ref.model, resolve=True)))
    assert plain.tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) != text


# ------------------------------------------------------------------------------------------- <answer> in the reward
@pytest.mark.parametrize("text, expected", [
    ("<think> 2+3 </think> <answer> 5 </answer>", "5"),
    ("<think> maybe \\boxed{3} </think> <answer>5</answer>", "5"),            # a box in <think> does not count
    ("<answer> so \\boxed{\\frac{1}{2}} </answer>", "\\frac{1}{2}"),           # a box inside the block wins
    ("<answer>4</answer> no wait <answer>6</answer>", "6"),                    # the last block
    ("<answer>4</answer> and later \\boxed{9}", "4"),                           # a block beats a box outside it
    ("\\boxed{12} then <answer> 7", "12"),                                      # unclosed: no block, the box counts
    ("the answer is \\boxed{12}", "12"),                                        # the qwen_math format, as before
    ("<answer>" + "x" * (MAX_ANSWER_CHARS + 1) + "</answer>", None),
    ("<answer>   </answer>", None),
    ("no answer at all", None),
    ("<answer>1</answer>" + "y" * 20_000, None),                                # beyond the searched tail
])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("text, gt, right", [
    ("<think>3 + 4 = 7</think> <answer> 7 </answer>", "7", True),
    ("<think>\\boxed{6}?</think> <answer>7</answer>", "6", False),
    ("<answer>$\\frac{1}{2}$</answer>", "\\frac{1}{2}", True),
    ("<answer>0.5</answer>", "\\frac{1}{2}", True),                              # Math-Verify, as for boxes
    ("<answer>8</answer>", "7", False),
    ("\\boxed{7}", "7", True),
])
def test_math_reward_scores_answer_blocks(text, gt, right):
    assert compute_score("dapo_math", text, gt, {}) == (1.0 if right else 0.0)
    assert compute_score("dapo_math", text, gt, {}, convention="plus_minus_one") == (1.0 if right else -1.0)
