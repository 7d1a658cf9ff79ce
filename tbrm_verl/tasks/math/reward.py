"""Rule-based math reward for TBRM (verl custom reward function).

The score of a response is its correctness:

* the answer is the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in the response, found with a balanced-
  brace scan, as in the Qwen2.5-Math evaluation; no boxed answer means wrong;
* except that a response with an ``<answer>...</answer>`` block (the DeepSeek-R1 template, ``--template r1`` in
  ``tbrm_verl.data``) is scored on its LAST such block: the last box inside the block if it has one, else the whole
  block (stripped); boxes outside the block (e.g. inside ``<think>``) are then ignored. An unclosed ``<answer>``
  does not count as a block;
* it is compared with the ground truth by Math-Verify (``math_verify.parse`` / ``verify``), so equivalent forms agree
  (``1/2`` vs ``0.5``, ``2\\sqrt{2}`` vs ``\\sqrt{8}``, ``$12$`` vs ``12``);
* the common cases never leave the calling process: an exact match after light normalisation (spaces, ``$``, a
  trailing ``.``) is correct, and two plain integers are compared as integers;
* everything else runs Math-Verify in a process pool (``spawn`` start method; created lazily, one per process) with a
  per-answer timeout enforced by the caller. Math-Verify's own ``signal.alarm`` timeouts are switched off
  (``parsing_timeout=None``, ``timeout_seconds=None``): ``signal.alarm`` only works in a main thread, and verl calls
  reward functions from worker threads inside Ray actors, where it fails and silently scores everything 0. A worker
  that runs past the timeout is killed with its pool (a fresh pool is made on the next call) and the answer is scored
  wrong.

Conventions (``convention=``, from ``reward.custom_reward_function.reward_kwargs``):

* ``"zero_one"`` (default): correct 1.0, wrong 0.0 (verl's MATH scorer);
* ``"plus_minus_one"``: correct +1.0, wrong -1.0 (verl's DAPO scorer).

verl usage::

    reward.custom_reward_function.path=tbrm_verl/tasks/math/reward.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.convention=zero_one

verl loads the file under a private module name; the pool worker function is always taken from the importable module
``tbrm_verl.tasks.math.reward`` (the repository root is put on ``sys.path`` if needed) so that spawned workers can unpickle it.
The pool workers import ``tbrm_verl`` (its ``__init__``) and ``math_verify`` only.

Environment knobs: ``TBRM_REWARD_WORKERS`` (pool size, default ``min(4, cpu_count)``) and
``TBRM_REWARD_STARTUP_TIMEOUT`` (seconds allowed for a fresh pool to start and import Math-Verify, default 180).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import re
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Literal, get_args

__all__ = [
    "CONVENTIONS",
    "RewardConvention",
    "RewardPoolStartError",
    "MAX_ANSWER_CHARS",
    "MAX_RESPONSE_CHARS",
    "compute_score",
    "final_answer",
    "is_correct",
    "last_boxed_answer",
    "normalize_answer",
    "shutdown_pool",
]

logger = logging.getLogger(__name__)

#: The valid values of `tbrm.reward_convention` (tbrm_verl.config checks the config against this Literal).
RewardConvention = Literal["zero_one", "plus_minus_one"]
CONVENTIONS: dict[str, tuple[float, float]] = {
    # name: (score if wrong, score if correct)
    "zero_one": (0.0, 1.0),
    "plus_minus_one": (-1.0, 1.0),
}
assert tuple(CONVENTIONS) == get_args(RewardConvention)

#: Only the last this-many characters of a response are searched for the boxed answer.
MAX_RESPONSE_CHARS = 10_000
#: A boxed answer longer than this is refused (scored wrong) without being parsed.
MAX_ANSWER_CHARS = 1_000
#: Ground truths longer than this are not sent to Math-Verify (exact match still applies).
MAX_GROUND_TRUTH_CHARS = 1_000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_INT_RE = re.compile(r"[+-]?\d+")
_SPACING_MACROS_RE = re.compile(r"(?<!\\)\\[,;:! ]")
_WS_RE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------------------------
def _find_last_box_command(text: str) -> tuple[int, int] | None:
    """(start, end) of the last ``\\boxed`` / ``\\fbox`` command (not a longer macro name such as ``\\boxedfoo``)."""
    best: tuple[int, int] | None = None
    for cmd in _BOX_COMMANDS:
        pos = len(text)
        while True:
            pos = text.rfind(cmd, 0, pos)
            if pos < 0:
                break
            end = pos + len(cmd)
            if end < len(text) and text[end].isalpha():  # e.g. \boxedanswer: a different macro
                continue
            if best is None or pos > best[0]:
                best = (pos, end)
            break
    return best


def last_boxed_answer(text: Any) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or ``None``.

    Rules (Qwen2.5-Math evaluation, hardened):
      * only the last ``MAX_RESPONSE_CHARS`` characters are searched;
      * the LAST box command wins; its argument is found with a balanced-brace scan (``\\{`` and ``\\}`` are
        literal braces and do not open or close groups); whitespace between the command and ``{`` is allowed;
      * ``\\boxed 12`` (argument without braces) gives the text up to the next ``$`` or end of line;
      * if the last box is unbalanced, empty, or longer than ``MAX_ANSWER_CHARS``, the result is ``None`` (there is
        no fall-back to an earlier box);
      * the content is returned stripped of surrounding whitespace, otherwise verbatim.
    """
    if not isinstance(text, str) or not text:
        return None
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    found = _find_last_box_command(text)
    if found is None:
        return None
    i = found[1]
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        if i == found[1]:  # "\boxed12" or "\boxed\frac..." etc.: not a boxed argument we accept
            return None
        stop = n
        for ch in ("$", "\n"):
            j = text.find(ch, i)
            if j >= 0:
                stop = min(stop, j)
        ans = text[i:stop].strip()
        if not ans or len(ans) > MAX_ANSWER_CHARS:
            return None
        return ans
    depth = 0
    start = i + 1
    limit = min(n, start + MAX_ANSWER_CHARS + 1)
    j = i
    while j < n:
        ch = text[j]
        if ch == "\\":
            j += 2  # escaped character (\{, \}, \\ ...) never changes the depth
            if j > limit:
                return None
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                ans = text[start:j].strip()
                return ans or None
        j += 1
        if j > limit:
            return None  # too long (or unbalanced within the cap)
    return None  # unbalanced


_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"


def final_answer(text: Any) -> str | None:
    """The answer a response gives: from its last ``<answer>...</answer>`` block if it has one, else its last box.

    Inside the block the last ``\\boxed{}`` wins (``last_boxed_answer``); a block without a box gives its stripped
    text. Only the last ``MAX_RESPONSE_CHARS`` characters are searched; an empty block, or one longer than
    ``MAX_ANSWER_CHARS``, gives ``None``.
    """
    if not isinstance(text, str) or not text:
        return None
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    close = text.rfind(_ANSWER_CLOSE)
    start = text.rfind(_ANSWER_OPEN, 0, close) if close >= 0 else -1
    if start < 0:
        return last_boxed_answer(text)
    block = text[start + len(_ANSWER_OPEN) : close]
    if "\\boxed" in block or "\\fbox" in block:
        return last_boxed_answer(block)
    block = block.strip()
    if not block or len(block) > MAX_ANSWER_CHARS:
        return None
    return block


# --------------------------------------------------------------------------------------------------------------------
# Fast comparison
# --------------------------------------------------------------------------------------------------------------------
def normalize_answer(ans: str) -> str:
    """Light normalisation used for the exact-match fast path.

    Removes whitespace, ``$`` and LaTeX spacing macros (``\\,`` ``\\;`` ``\\:`` ``\\!`` ``\\ ``), maps ``\\dfrac`` and
    ``\\tfrac`` to ``\\frac`` and strips trailing ``.``. Every change keeps the mathematical value.
    """
    s = _SPACING_MACROS_RE.sub("", ans)
    s = _WS_RE.sub("", s).replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


def _fast_verdict(pred_norm: str, gt_norm: str) -> bool | None:
    """True / False when decidable without Math-Verify, None otherwise."""
    if not pred_norm:
        return False
    if pred_norm == gt_norm:
        return True
    if _INT_RE.fullmatch(pred_norm) and _INT_RE.fullmatch(gt_norm):
        return int(pred_norm) == int(gt_norm)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Math-Verify in a process pool (functions below run in the pool workers)
# --------------------------------------------------------------------------------------------------------------------
def _worker_init() -> None:
    """Pool initializer: import Math-Verify once per worker and silence its "timeout disabled" warning."""
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import math_verify  # noqa: F401


def _worker_ping() -> int:
    """Warm-up task: proves that a worker started and can run Math-Verify."""
    if not _mv_equal_unsafe("\\frac{1}{2}", "0.5"):  # e.g. the ANTLR runtime is missing or the wrong version
        raise RuntimeError("Math-Verify self-check failed: \\frac{1}{2} != 0.5 (is math-verify[antlr4_9_3] installed?)")
    return os.getpid()


def _mv_equal(pred: str, gold: str) -> bool:
    """Math-Verify equivalence of two bare answers (runs in a pool worker; no signal-based timeouts)."""
    try:
        return _mv_equal_unsafe(pred, gold)
    except Exception:  # a parser / sympy error on odd input: not equal  # noqa: BLE001
        return False


def _mv_equal_unsafe(pred: str, gold: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse(
        "\\boxed{" + gold + "}",
        extraction_config=[LatexExtractionConfig()],
        parsing_timeout=None,
    )
    if not gold_parsed:
        return False
    pred_parsed = parse(
        "\\boxed{" + pred + "}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# --------------------------------------------------------------------------------------------------------------------
# Pool management (caller side)
# --------------------------------------------------------------------------------------------------------------------
_pool: ProcessPoolExecutor | None = None
_pool_pid: int | None = None  # the process that created _pool (a forked child must not reuse it)
_pool_lock = threading.Lock()
_stats = {"pool_starts": 0, "timeouts": 0, "errors": 0}


def _reset_after_fork() -> None:
    """A forked child must not use (or wait on the lock of) its parent's pool."""
    global _pool, _pool_pid, _pool_lock
    _pool, _pool_pid, _pool_lock = None, None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class _Timeout(Exception):
    pass


class RewardPoolStartError(RuntimeError):
    """The Math-Verify process pool could not start: a setup problem, raised instead of scoring answers wrong."""


def importable_module(name: str = "tbrm_verl.tasks.math.reward"):
    """The module ``name`` (a reward module of this package) under its importable name, whose functions pool
    workers can unpickle.

    verl loads a custom reward file under a private name (``custom_module_<hash>``) that a spawned process cannot
    import; in that case the repository root is added to ``sys.path`` (spawned children inherit it).
    """
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        root = str(Path(__file__).resolve().parents[3])  # the repository root
        if root not in sys.path:
            sys.path.append(root)
        return importlib.import_module(name)




def _num_workers() -> int:
    env = os.environ.get("TBRM_REWARD_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except Exception:  # already gone  # noqa: BLE001
            pass
    try:
        pool.shutdown(wait=False, cancel_futures=True)
    except Exception:  # noqa: BLE001
        pass
    for p in procs:
        try:
            p.join(timeout=5)
        except Exception:  # noqa: BLE001
            pass


def _discard_pool(pool: ProcessPoolExecutor) -> None:
    """Kill ``pool`` if it is still the current one (another thread may have replaced it already)."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    _kill_pool(pool)


def shutdown_pool() -> None:
    """Kill the Math-Verify pool of this process (a new one is made on the next call that needs it)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        _kill_pool(pool)


def _get_pool() -> ProcessPoolExecutor:
    """The process-wide pool, created (and warmed up: every worker started, Math-Verify imported) on first use."""
    global _pool, _pool_pid
    pool = _pool
    if pool is not None and _pool_pid == os.getpid():
        return pool
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid():
            return _pool
        mod = importable_module()
        n = _num_workers()
        pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=mod._worker_init,
        )
        startup = float(os.environ.get("TBRM_REWARD_STARTUP_TIMEOUT", "180"))
        try:
            # Submitting n tasks at once makes the executor start all n workers now, so that a worker's start-up
            # (spawn + imports) is never charged to an answer's timeout later.
            futs = [pool.submit(mod._worker_ping) for _ in range(n)]
            for f in futs:
                f.result(timeout=startup)
        except BaseException as e:
            _kill_pool(pool)
            raise RewardPoolStartError(
                "tbrm_verl.tasks.math.reward: could not start the Math-Verify process pool "
                f"({type(e).__name__}: {str(e).strip()[:300]}). Hint: spawned workers re-import the main script, so "
                "a script that scores answers at import time must do so under `if __name__ == '__main__':`."
            ) from e
        pool._tbrm_slots = threading.Semaphore(n)  # type: ignore[attr-defined]
        _pool, _pool_pid = pool, os.getpid()
        _stats["pool_starts"] += 1
        return pool


def _run_in_pool(fn_name: "str | Callable", args: tuple, timeout_s: float) -> Any:
    """Run ``tbrm_verl.tasks.math.reward.<fn_name>(*args)`` in the pool; raises ``_Timeout`` after ``timeout_s`` seconds.
    ``fn_name`` may also be a function of another importable module (``tbrm_verl.tasks.reasoning_gym.reward`` uses the pool).

    At most one call per worker is in flight (callers beyond that wait for a free slot first), so the timeout
    measures the answer's own run time, not time spent queued behind other threads' answers. On timeout the pool
    (with the stuck worker) is killed. If the pool breaks under a call for another reason (e.g. another thread's
    timeout killed it), the call is retried once on a fresh pool.
    """
    fn: Callable = fn_name if callable(fn_name) else getattr(importable_module(), fn_name)
    for attempt in range(2):
        pool = _get_pool()
        slots: threading.Semaphore = pool._tbrm_slots  # type: ignore[attr-defined]
        with slots:
            try:
                fut = pool.submit(fn, *args)
            except (BrokenProcessPool, RuntimeError):  # shut down / broken after _get_pool returned it
                _discard_pool(pool)
                if attempt == 0:
                    continue
                raise
            try:
                return fut.result(timeout=timeout_s)
            except FuturesTimeoutError:
                fut.cancel()
                _discard_pool(pool)
                _stats["timeouts"] += 1
                raise _Timeout() from None
            except BrokenProcessPool:
                _discard_pool(pool)
                if attempt == 0:
                    continue
                raise
    raise AssertionError("unreachable")


def _math_verify_equal(pred: str, gold: str, timeout_s: float) -> bool:
    try:
        return bool(_run_in_pool("_mv_equal", (pred, gold), timeout_s))
    except _Timeout:
        logger.warning(
            "Math-Verify timed out after %.1fs on answer %r (gold %r): scored wrong", timeout_s, pred[:80], gold[:80]
        )
        return False
    except BrokenProcessPool as e:
        _stats["errors"] += 1
        logger.warning("Math-Verify pool broke twice on answer %r: scored wrong (%s)", pred[:80], e)
        return False
    except RewardPoolStartError:
        raise  # pool cannot start: a setup problem, not a wrong answer; never hide it as a 0 score
    except Exception as e:  # an exception raised inside Math-Verify  # noqa: BLE001
        _stats["errors"] += 1
        logger.debug("Math-Verify raised on answer %r: %s", pred[:80], e)
        return False


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def _ground_truths(ground_truth: Any) -> list[str]:
    if ground_truth is None:
        return []
    if isinstance(ground_truth, str):
        items = [ground_truth]
    elif isinstance(ground_truth, (list, tuple)) or type(ground_truth).__name__ == "ndarray":
        items = [g for g in list(ground_truth) if g is not None]
    else:
        items = [ground_truth]
    out = []
    for g in items:
        g = str(g).strip()
        if "\\boxed" in g or "\\fbox" in g:  # a ground truth stored in boxed form
            g = last_boxed_answer(g) or ""
        if g:
            out.append(g)
    return out


def is_correct(solution_str: Any, ground_truth: Any, timeout_s: float = 5.0) -> bool:
    """Whether the final answer of ``solution_str`` (``final_answer``: last ``<answer>`` block, else last box) equals
    ``ground_truth`` (a string, or a list of accepted strings). Never raises on bad input; a Math-Verify call that
    runs past ``timeout_s`` counts as wrong."""
    pred = final_answer(solution_str)
    if pred is None:
        return False
    golds = _ground_truths(ground_truth)
    if not golds:
        return False
    pred_norm = normalize_answer(pred)
    pending = []
    for gold in golds:
        verdict = _fast_verdict(pred_norm, normalize_answer(gold))
        if verdict:
            return True
        if verdict is None and len(gold) <= MAX_GROUND_TRUTH_CHARS:
            pending.append(gold)
    for gold in pending:
        if _math_verify_equal(pred, gold, timeout_s):
            return True
    return False


def compute_score(
    data_source: Any = None,
    solution_str: Any = None,
    ground_truth: Any = None,
    extra_info: Any = None,
    convention: RewardConvention = "zero_one",
    timeout_s: float = 5.0,
    **kwargs: Any,
) -> float:
    """verl custom reward: correctness of the final answer (``final_answer``), as 0/1 (``zero_one``) or -1/+1
    (``plus_minus_one``).

    ``data_source`` and ``extra_info`` are accepted for verl's signature and not used; extra keyword arguments that
    verl's reward loop passes (e.g. ``reward_router_address``) are ignored.
    """
    try:
        wrong, right = CONVENTIONS[convention]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown reward convention {convention!r}; valid values: {', '.join(repr(c) for c in CONVENTIONS)}"
        ) from None
    try:
        timeout_s = float(timeout_s)
    except (TypeError, ValueError):
        timeout_s = float("nan")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return right if is_correct(solution_str, ground_truth, timeout_s=timeout_s) else wrong
