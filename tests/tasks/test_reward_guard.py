"""A reward function that raises or returns a non-finite number stops the run with one line naming it."""



import pytest

from tbrm_verl.config import compose, finish_config
from tbrm_verl.tasks.reward_guard import MARKER, RewardFunctionError, guarded_score, user_facing_line


def _fn_file(tmp_path, body, name="my_reward"):
    p = tmp_path / f"{name}.py"  # one file per function: loaded functions are cached by path
    p.write_text(f"def score(data_source, solution_str, ground_truth, extra_info=None, **kw):\n    {body}\n")
    return str(p)


def test_passes_through_good_scores(tmp_path):
    path = _fn_file(tmp_path, "return 1.0 if ground_truth in solution_str else 0.0")
    assert guarded_score("d", "x=\\boxed{3}", "3", tbrm_fn_path=path, tbrm_fn_name="score") == 1.0
    path = _fn_file(tmp_path, "return {'score': 0.5, 'acc': True}", name="dict_reward")
    assert guarded_score("d", "s", "g", tbrm_fn_path=path, tbrm_fn_name="score") == {"score": 0.5, "acc": True}


@pytest.mark.parametrize("body, words", [
    ("raise ValueError('bad input')", "raised ValueError: bad input"),
    ("return float('nan')", "returned nan"),
    ("return {'score': float('inf')}", "returned inf"),
    ("return None", "returned None"),
])
def test_errors_are_one_line(tmp_path, body, words):
    path = _fn_file(tmp_path, body)
    with pytest.raises(RewardFunctionError) as err:
        guarded_score("gsm8k", "s", "g", tbrm_fn_path=path, tbrm_fn_name="score")
    msg = str(err.value)
    assert msg.startswith(MARKER) and words in msg and "score (" in msg and "\n" not in msg
    # as it arrives through Ray: buried in a multi-line traceback text
    wrapped = RuntimeError("ray::RewardLoopWorker.run()\nTraceback ...\n  File x\n" + msg + "\n more")
    assert user_facing_line(wrapped) == msg


def test_config_routes_any_reward_function_through_the_guard(tmp_path):
    cfg = compose(["profile=cpu", f"reward.custom_reward_function.path={tmp_path}/r.py",
                   "reward.custom_reward_function.name=fn"])
    cfg = finish_config(cfg)
    crf = cfg.reward.custom_reward_function
    assert crf.path == "pkg://tbrm_verl.tasks.reward_guard" and crf.name == "guarded_score"
    assert crf.reward_kwargs.tbrm_fn_path == f"{tmp_path}/r.py" and crf.reward_kwargs.tbrm_fn_name == "fn"
    assert crf.reward_kwargs.convention == "zero_one"  # existing reward_kwargs kept
    finish_config(cfg)  # idempotent
    assert cfg.reward.custom_reward_function.reward_kwargs.tbrm_fn_name == "fn"
