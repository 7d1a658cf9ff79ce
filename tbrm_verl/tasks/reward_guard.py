"""Runs the configured reward function and stops the run with one clear line if it raises or returns a non-number.

verl calls `reward.custom_reward_function` inside its reward-loop workers; an exception there, or a NaN score that
would silently poison r/β and every residual, surfaces as a deep Ray traceback or not at all. tbrm_verl.main points
verl at `guarded_score` and passes the user's function through `reward_kwargs`, so the usual verl keys
(`reward.custom_reward_function.path/name`) keep working. The run's checkpoints so far are kept.
"""

from __future__ import annotations

import math
from functools import lru_cache

MARKER = "tbrm_verl: reward error:"
GUARD_PATH = "pkg://tbrm_verl.tasks.reward_guard"
GUARD_NAME = "guarded_score"


class RewardFunctionError(RuntimeError):
    pass


@lru_cache(maxsize=8)
def _load(path: str, name: str):
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=path, object_name=name)


def guarded_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, *, tbrm_fn_path: str,
                  tbrm_fn_name: str, **kwargs):
    fn = _load(tbrm_fn_path, tbrm_fn_name)
    where = f"{tbrm_fn_name} ({tbrm_fn_path})"
    try:
        out = fn(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                 extra_info=extra_info, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise RewardFunctionError(
            f"{MARKER} {where} raised {type(exc).__name__}: {exc} (data_source={data_source}); fix the reward "
            "function and rerun to resume from the last checkpoint"
        ) from None
    score = out.get("score") if isinstance(out, dict) else out
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RewardFunctionError(
            f"{MARKER} {where} returned {score!r} (data_source={data_source}); a reward must be a finite number "
            "(or a dict with a finite 'score')"
        )
    return out


def guard_config(cfg) -> None:
    """Point verl at `guarded_score`, moving the configured function into its reward_kwargs (idempotent)."""
    from omegaconf import open_dict

    crf = cfg.reward.custom_reward_function
    if not crf.get("path") or crf.path == GUARD_PATH:
        return
    with open_dict(crf):
        kwargs = crf.get("reward_kwargs") or {}
        crf.reward_kwargs = {**kwargs, "tbrm_fn_path": crf.path, "tbrm_fn_name": crf.name}
        crf.path, crf.name = GUARD_PATH, GUARD_NAME


def user_facing_line(exc: BaseException) -> str | None:
    """The one-line reward error inside an exception raised through Ray, if there is one."""
    for line in str(exc).splitlines():
        if MARKER in line:
            return line[line.index(MARKER):]
    return None
