"""Reward for the reasoning-gym tasks (Table 4): each task's own verifier, in a process pool with a timeout.

    reward.custom_reward_function.path=pkg://tbrm_verl.tasks.reasoning_gym.reward
    reward.custom_reward_function.name=compute_score

(``hydra_configs/task/reasoning_gym.yaml`` sets both.) For a response to a row written by
``python -m tbrm_verl.data reasoning_gym`` (see ``tbrm_verl.tasks.reasoning_gym.data``):

* the task is the one ``data_source`` names (``reasoning_gym/<task>``);
* the answer is the content of the response's last ``<answer>...</answer>`` block, extracted by reasoning-gym's own
  ``extract_answer`` (stripped); no block means wrong;
* the verdict is the task's own verifier, ``score_answer(answer, entry)``, on the dataset entry rebuilt from
  ``extra_info["entry"]`` (JSON of question, answer and metadata: the verifiers of e.g. shortest_path and
  quantum_lock accept any equally short valid path / button sequence, which they check against the metadata);
* the answer is correct when the verifier gives its full score, 1.0. Partial credit (0.5 for a valid but longer
  path, the substring credit of the default verifier) counts as wrong: Table 4 reports accuracy, and TBRM's target
  r/β assumes the two reward values of ``tbrm.reward_convention``.

Bounded time: extraction and verification run in the process pool of ``tbrm_verl.tasks.math.verify_pool`` (the Math-Verify pool:
same workers, same per-answer timeout and kill-on-timeout, same start-up handling), on the last
``MAX_RESPONSE_CHARS`` characters of the response only; an extracted answer longer than ``MAX_ANSWER_CHARS`` is
wrong without being verified. Importing reasoning-gym takes seconds, so once per pool every worker imports it
before the first answer is timed (bounded by ``TBRM_REWARD_STARTUP_TIMEOUT``, as the pool's own start-up).

Conventions as in ``tbrm_verl.tasks.math.reward``: ``convention="zero_one"`` (1 / 0) or ``"plus_minus_one"`` (+1 / -1).
A row without a usable ``extra_info["entry"]`` or with an unknown task raises ``ValueError`` (a data problem, never
scored as a wrong answer); ``tbrm_verl.tasks.reward_guard`` turns it into one line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tbrm_verl.tasks.math import verify_pool as _pool
from tbrm_verl.tasks.math.reward import reward_values
from tbrm_verl.tasks.math.verify_pool import RewardPoolStartError
from tbrm_verl.tasks.reasoning_gym.data import DATA_SOURCE_PREFIX

__all__ = ["MAX_ANSWER_CHARS", "MAX_RESPONSE_CHARS", "compute_score", "score_response"]

logger = logging.getLogger(__name__)

#: Only the last this-many characters of a response are sent to the verifier's worker.
MAX_RESPONSE_CHARS = 10_000
#: An extracted answer longer than this is wrong without being verified.
MAX_ANSWER_CHARS = 2_000


# --------------------------------------------------------------------------------------------------------------------
# In the pool workers
# --------------------------------------------------------------------------------------------------------------------
def _worker_warm() -> int:
    import reasoning_gym  # noqa: F401  (seconds: done once per worker, untimed)

    return os.getpid()


def _worker_score(task: str, text: str, entry_json: str) -> float:
    """reasoning-gym's score for ``text`` (a response tail) on the entry ``entry_json``; 0.0 without an answer."""
    from reasoning_gym import get_score_answer_fn
    from reasoning_gym.utils import extract_answer

    answer = extract_answer(text, tag_name="answer")
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return float(get_score_answer_fn(task)(answer, json.loads(entry_json)))


# --------------------------------------------------------------------------------------------------------------------
# Caller side
# --------------------------------------------------------------------------------------------------------------------
_warm_lock = threading.Lock()


def _canonical():
    """This module under its importable name, so that pool workers can unpickle its functions (verl may load a
    reward file under a private module name)."""
    return _pool.importable_module("tbrm_verl.tasks.reasoning_gym.reward")


def _ensure_warm() -> None:
    """Once per pool: every worker imports reasoning-gym before any answer's timeout starts counting."""
    pool = _pool.get_pool()
    if getattr(pool, "_tbrm_rg_warm", False):
        return
    with _warm_lock:
        pool = _pool.get_pool()
        if getattr(pool, "_tbrm_rg_warm", False):
            return
        n = pool._max_workers
        slots = pool._tbrm_slots  # all of them: no scoring call waits behind a warm-up task
        for _ in range(n):
            slots.acquire()
        try:
            fn = _canonical()._worker_warm
            futs = [pool.submit(fn) for _ in range(n)]  # n idle workers take one each
            startup = _pool.startup_timeout()
            for f in futs:
                f.result(timeout=startup)
        except BaseException as e:
            _pool.discard_pool(pool)
            raise RewardPoolStartError(
                f"tbrm_verl.tasks.reasoning_gym.reward: the reward pool could not import reasoning-gym "
                f"({type(e).__name__}: {str(e).strip()[:300]}); pip install -e \".[reasoning_gym]\""
            ) from e
        finally:
            for _ in range(n):
                slots.release()
        pool._tbrm_rg_warm = True


def _entry_json(extra_info: Any) -> str:
    entry = extra_info.get("entry") if isinstance(extra_info, dict) else None
    if isinstance(entry, dict):
        entry = json.dumps(entry)
    if not isinstance(entry, str) or not entry:
        raise ValueError(
            "extra_info['entry'] is missing: reasoning-gym verifiers need the dataset entry; build the data with "
            "python -m tbrm_verl.data reasoning_gym"
        )
    try:
        parsed = json.loads(entry)
    except ValueError as e:
        raise ValueError(f"extra_info['entry'] is not JSON ({e})") from None
    if not isinstance(parsed, dict) or "answer" not in parsed or "metadata" not in parsed:
        raise ValueError("extra_info['entry'] must be a JSON object with 'answer' and 'metadata'")
    return entry


def _task(data_source: Any) -> str:
    s = str(data_source)
    task = s[len(DATA_SOURCE_PREFIX):] if s.startswith(DATA_SOURCE_PREFIX) else ""
    if not task:
        raise ValueError(f"data_source {data_source!r} is not a reasoning-gym task (expected reasoning_gym/<task>)")
    return task


def score_response(data_source: Any, solution_str: Any, extra_info: Any, timeout_s: float = 5.0) -> float:
    """The task verifier's score in [0, 1] of ``solution_str`` (0.0 for no answer, a timeout or a verifier error)."""
    task = _task(data_source)
    entry = _entry_json(extra_info)
    if not isinstance(solution_str, str) or not solution_str:
        return 0.0
    text = solution_str[-MAX_RESPONSE_CHARS:]
    _ensure_warm()
    try:
        return float(_pool.run_in_pool(_canonical()._worker_score, (task, text, entry), timeout_s))
    except _pool.PoolTimeout:
        logger.warning("reasoning-gym %s verifier timed out after %.1fs: scored wrong", task, timeout_s)
        return 0.0
    except BrokenProcessPool as e:
        logger.warning("reasoning-gym %s: reward pool broke twice: scored wrong (%s)", task, e)
        return 0.0
    except RewardPoolStartError:
        raise
    except ValueError as e:
        if "not registered" in str(e):  # reasoning_gym.get_score_answer_fn: an unknown task is a data problem
            raise ValueError(f"data_source {data_source!r}: reasoning-gym has no task {task!r}") from None
        logger.debug("reasoning-gym %s verifier raised: %s", task, e)
        return 0.0
    except Exception as e:  # the verifier raised on an odd answer: wrong  # noqa: BLE001
        logger.debug("reasoning-gym %s verifier raised: %s", task, e)
        return 0.0


def compute_score(
    data_source: Any = None,
    solution_str: Any = None,
    ground_truth: Any = None,
    extra_info: Any = None,
    convention: str = "zero_one",
    timeout_s: float = 5.0,
    **kwargs: Any,
) -> float:
    """verl custom reward: right (the verifier's full score) or wrong, as 0/1 or -1/+1 (``convention``).

    ``ground_truth`` is not used (the verifier reads the entry's own answer from ``extra_info``); extra keyword
    arguments that verl's reward loop passes are ignored.
    """
    wrong, right, timeout_s = reward_values(convention, timeout_s)
    return right if score_response(data_source, solution_str, extra_info, timeout_s) >= 1.0 else wrong
