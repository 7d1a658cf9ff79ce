"""Math-Verify equality of two answers, bounded in time: run in a process pool with a per-answer timeout.

* the pool uses the ``spawn`` start method and is created lazily, one per process; creating it starts every worker
  and has it import Math-Verify (bounded by ``TBRM_REWARD_STARTUP_TIMEOUT``, seconds, default 180), so that start-up
  is never charged to an answer's timeout; a pool that cannot start raises ``RewardPoolStartError``;
* Math-Verify's own ``signal.alarm`` timeouts are switched off (``parsing_timeout=None``, ``timeout_seconds=None``):
  ``signal.alarm`` only works in a main thread, and verl calls reward functions from worker threads inside Ray
  actors, where it fails and silently scores everything 0. The timeout is enforced by the caller instead: a worker
  that runs past it is killed with its pool (a fresh pool is made on the next call) and the answer is scored wrong.

The pool workers import ``tbrm_verl`` (its ``__init__``) and ``math_verify`` only. ``tbrm_verl.tasks.reasoning_gym.reward``
runs its verifiers in the same pool (``run_in_pool``). Environment knob: ``TBRM_REWARD_WORKERS`` (pool size, default
``min(4, cpu_count)``).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

__all__ = [
    "PoolTimeout",
    "RewardPoolStartError",
    "discard_pool",
    "get_pool",
    "importable_module",
    "math_verify_equal",
    "run_in_pool",
    "shutdown_pool",
    "startup_timeout",
    "stats",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# In the pool workers
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
stats = {"pool_starts": 0, "timeouts": 0, "errors": 0}


def _reset_after_fork() -> None:
    """A forked child must not use (or wait on the lock of) its parent's pool."""
    global _pool, _pool_pid, _pool_lock
    _pool, _pool_pid, _pool_lock = None, None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class PoolTimeout(Exception):
    """A call ran past its timeout (its worker was killed with the pool)."""


class RewardPoolStartError(RuntimeError):
    """The Math-Verify process pool could not start: a setup problem, raised instead of scoring answers wrong."""


def importable_module(name: str):
    """The module ``name`` (a reward module of this package) under its importable name, whose functions pool
    workers can unpickle.

    verl loads a custom reward file under a private name (``custom_module_<hash>``) that a spawned process cannot
    import. This module is itself imported as ``tbrm_verl.tasks.math.verify_pool`` (tasks/math/reward.py first puts
    the repository root on ``sys.path`` when verl loads it by file path), so the package is importable here.
    """
    return sys.modules.get(name) or importlib.import_module(name)


def startup_timeout() -> float:
    """Seconds a fresh pool's workers may take to start and import what they need (``TBRM_REWARD_STARTUP_TIMEOUT``)."""
    return float(os.environ.get("TBRM_REWARD_STARTUP_TIMEOUT", "180"))


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


def discard_pool(pool: ProcessPoolExecutor) -> None:
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


def get_pool() -> ProcessPoolExecutor:
    """The process-wide pool, created (and warmed up: every worker started, Math-Verify imported) on first use."""
    global _pool, _pool_pid
    pool = _pool
    if pool is not None and _pool_pid == os.getpid():
        return pool
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid():
            return _pool
        n = _num_workers()
        pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        )
        startup = startup_timeout()
        try:
            # Submitting n tasks at once makes the executor start all n workers now, so that a worker's start-up
            # (spawn + imports) is never charged to an answer's timeout later.
            futs = [pool.submit(_worker_ping) for _ in range(n)]
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
        stats["pool_starts"] += 1
        return pool


def run_in_pool(fn: Callable, args: tuple, timeout_s: float) -> Any:
    """Run ``fn(*args)`` in the pool (``fn`` a function of an importable module); raises ``PoolTimeout`` after
    ``timeout_s`` seconds.

    At most one call per worker is in flight (callers beyond that wait for a free slot first), so the timeout
    measures the answer's own run time, not time spent queued behind other threads' answers. On timeout the pool
    (with the stuck worker) is killed. If the pool breaks under a call for another reason (e.g. another thread's
    timeout killed it), the call is retried once on a fresh pool.
    """
    for attempt in range(2):
        pool = get_pool()
        slots: threading.Semaphore = pool._tbrm_slots  # type: ignore[attr-defined]
        with slots:
            try:
                fut = pool.submit(fn, *args)
            except (BrokenProcessPool, RuntimeError):  # shut down / broken after get_pool returned it
                discard_pool(pool)
                if attempt == 0:
                    continue
                raise
            try:
                return fut.result(timeout=timeout_s)
            except FuturesTimeoutError:
                fut.cancel()
                discard_pool(pool)
                stats["timeouts"] += 1
                raise PoolTimeout() from None
            except BrokenProcessPool:
                discard_pool(pool)
                if attempt == 0:
                    continue
                raise
    raise AssertionError("unreachable")


def math_verify_equal(pred: str, gold: str, timeout_s: float) -> bool:
    """Whether Math-Verify finds ``pred`` equal to ``gold``; a timeout or an error inside Math-Verify is ``False``."""
    try:
        return bool(run_in_pool(_mv_equal, (pred, gold), timeout_s))
    except PoolTimeout:
        logger.warning(
            "Math-Verify timed out after %.1fs on answer %r (gold %r): scored wrong", timeout_s, pred[:80], gold[:80]
        )
        return False
    except BrokenProcessPool as e:
        stats["errors"] += 1
        logger.warning("Math-Verify pool broke twice on answer %r: scored wrong (%s)", pred[:80], e)
        return False
    except RewardPoolStartError:
        raise  # pool cannot start: a setup problem, not a wrong answer; never hide it as a 0 score
    except Exception as e:  # an exception raised inside Math-Verify  # noqa: BLE001
        stats["errors"] += 1
        logger.debug("Math-Verify raised on answer %r: %s", pred[:80], e)
        return False
