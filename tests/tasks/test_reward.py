"""Tests for tbrm_verl.tasks.math.reward (math correctness reward). Expected values are written by hand."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tbrm_verl.tasks.math import verify_pool  # noqa: E402
from tbrm_verl.tasks.math.reward import compute_score, last_boxed_answer  # noqa: E402

QUICK_S = 30.0  # generous bound: "returns quickly, never hangs"


def score(solution, gt, **kw):
    return compute_score(data_source="dapo_math", solution_str=solution, ground_truth=gt, extra_info={}, **kw)


# ------------------------------------------------------------------------------------------------ last_boxed_answer
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{12}.", "12"),
        ("\\boxed{1} then \\boxed{2} and finally \\boxed{3}", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("x \\boxed{ \\sqrt{ {8} } } y", "\\sqrt{ {8} }"),
        ("first \\boxed{5}, final \\fbox{7}", "7"),
        ("first \\fbox{7}, final \\boxed{5}", "5"),
        ("set \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("open brace \\boxed{\\{ x}", "\\{ x"),
        ("spaced \\boxed {42}", "42"),
        ("$\\boxed 42$ done", "42"),
        ("\\boxed{$12$}", "$12$"),
    ],
)
def test_last_boxed_answer_found(text, expected):
    assert last_boxed_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        12,
        "no box here, the answer is 12",
        "\\boxed{}",
        "\\boxed{   }",
        "unbalanced \\boxed{\\frac{1}{2}",
        "\\boxed{12} but the last one is broken \\boxed{1",
        "\\boxed",
        "\\boxedfoo{3}",
        "\\boxed{" + "1" * 1500 + "}",  # longer than the 1k cap
    ],
)
def test_last_boxed_answer_none(text):
    assert last_boxed_answer(text) is None


def test_last_boxed_only_looks_at_the_tail():
    # A box followed by more than 10k characters is out of the searched window.
    assert last_boxed_answer("\\boxed{3}" + "x" * 20_000) is None
    assert last_boxed_answer("x" * 20_000 + "\\boxed{3}") == "3"


# ------------------------------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize(
    "pred, gt",
    [
        ("12", "12"),
        ("$12$", "12"),
        ("12", "$12$"),
        (" 12 .", "12"),
        ("1/2", "0.5"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("12.0", "12"),
        ("\\frac{3}{4}", "0.75"),
        ("0012", "12"),
    ],
)
def test_equivalent_answers_are_correct(pred, gt):
    assert score(f"Reasoning... so the answer is \\boxed{{{pred}}}", gt) == 1.0


@pytest.mark.parametrize(
    "pred, gt",
    [
        ("13", "12"),
        ("-12", "12"),
        ("1/3", "0.5"),
        ("\\sqrt{3}", "\\sqrt{8}"),
        ("0.51", "\\frac{1}{2}"),
        ("2\\pi", "6"),
    ],
)
def test_wrong_answers_score_zero(pred, gt):
    assert score(f"so \\boxed{{{pred}}}", gt) == 0.0


def test_no_boxed_answer_is_wrong():
    assert score("The answer is 12.", "12") == 0.0
    assert score("Answer: 12", "12", convention="plus_minus_one") == -1.0


def test_last_boxed_rule():
    text = "Maybe \\boxed{12}? No, recompute: \\boxed{13}"
    assert score(text, "13") == 1.0
    assert score(text, "12") == 0.0


def test_ground_truth_list_and_boxed_ground_truth():
    assert score("\\boxed{0.5}", ["7", "\\frac{1}{2}"]) == 1.0
    assert score("\\boxed{0.5}", ["7", "8"]) == 0.0
    assert score("\\boxed{12}", "\\boxed{12}") == 1.0


# ------------------------------------------------------------------------------------------------ conventions
def test_conventions():
    assert score("\\boxed{12}", "12", convention="zero_one") == 1.0
    assert score("\\boxed{11}", "12", convention="zero_one") == 0.0
    assert score("\\boxed{12}", "12", convention="plus_minus_one") == 1.0
    assert score("\\boxed{11}", "12", convention="plus_minus_one") == -1.0
    assert score("", "12", convention="plus_minus_one") == -1.0
    assert isinstance(score("\\boxed{12}", "12"), float)


def test_bad_convention_raises_naming_valid_values():
    with pytest.raises(ValueError) as err:
        score("\\boxed{12}", "12", convention="binary")
    msg = str(err.value)
    assert "binary" in msg and "zero_one" in msg and "plus_minus_one" in msg


def test_verl_style_call_with_extra_kwargs():
    # verl's reward loop passes keyword arguments only, sometimes with extra ones.
    assert compute_score(
        data_source="aime24", solution_str="\\boxed{204}", ground_truth="204", extra_info=None, reward_router_address=None
    ) == 1.0


# ------------------------------------------------------------------------------------------------ fast path
def test_common_cases_do_not_use_the_process_pool(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("process pool used on a fast-path answer")

    monkeypatch.setattr(verify_pool, "run_in_pool", boom)
    assert score("so \\boxed{12}", "12") == 1.0
    assert score("so \\boxed{ 12 }.", "12") == 1.0
    assert score("so \\boxed{$12$}", "12") == 1.0
    assert score("so \\boxed{13}", "12") == 0.0
    assert score("so \\boxed{-7}", "7") == 0.0
    assert score("no box", "12") == 0.0


# ------------------------------------------------------------------------------------------------ adversarial inputs
@pytest.mark.parametrize(
    "solution",
    [
        "",
        None,
        "x" * 1_000_000,
        "\\boxed{12" + "{" * 10_000,
        "\\boxed{" + "{" * 10_000 + "12" + "}" * 10_000 + "}",
        "\\boxed{" * 10_000,
        "\\boxed{\\frac{1}{2} \\left( \\right" + "}" * 5,  # unbalanced LaTeX inside a box (extra closers)
        "\\boxed{\\left(\\frac{1}{2}}",  # unbalanced \left inside a balanced box
        ("\\boxed{" + "x" * 500 + "}") * 2000,  # 1 MB of boxes
        "\\boxed{\\}",  # escaped closer only: unbalanced
    ],
)
def test_adversarial_outputs_score_wrong_quickly(solution):
    t0 = time.monotonic()
    assert score(solution, "12", timeout_s=5.0) == 0.0
    assert time.monotonic() - t0 < QUICK_S


def test_hanging_verifier_is_killed_and_scored_wrong():
    # 10^(10^10) makes sympy try to build a 10-billion-digit integer: Math-Verify never returns on its own.
    assert score("\\boxed{\\frac{1}{2}}", "0.5") == 1.0  # pool up before timing
    timeouts = verify_pool.stats["timeouts"]
    t0 = time.monotonic()
    assert score("\\boxed{10^{10^{10}}}", "1", timeout_s=1.0) == 0.0
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < QUICK_S
    assert verify_pool.stats["timeouts"] == timeouts + 1
    # The stuck pool was killed; the next answer gets a fresh one and is scored normally.
    assert score("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0


def test_scoring_inside_a_thread():
    # verl calls the reward from executor threads inside Ray actors, where signal.alarm cannot be used.
    results = []

    def work():
        results.append(score("\\boxed{\\frac{1}{2}}", "0.5"))
        results.append(score("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", convention="plus_minus_one"))
        results.append(score("\\boxed{\\frac{1}{3}}", "0.5", convention="plus_minus_one"))

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive()
    assert results == [1.0, 1.0, -1.0]


def test_concurrent_threads():
    cases = [("\\boxed{0.5}", "\\frac{1}{2}", 1.0), ("\\boxed{0.25}", "\\frac{1}{2}", 0.0)] * 4
    out = [None] * len(cases)

    def work(i):
        sol, gt, _ = cases[i]
        out[i] = score(sol, gt)

    timeouts = verify_pool.stats["timeouts"]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert out == [c[2] for c in cases]
    assert verify_pool.stats["timeouts"] == timeouts  # queueing behind other threads is not charged to an answer's timeout


def test_loaded_from_file_path_like_verl():
    # verl's `reward.custom_reward_function.path=...` loads the file under a private module name (not importable by
    # spawned workers); the non-fast path must still work.
    path = REPO / "tbrm_verl" / "tasks" / "math" / "reward.py"
    spec = importlib.util.spec_from_file_location("custom_module_test_reward", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        assert mod.compute_score(data_source="x", solution_str="\\boxed{1/2}", ground_truth="0.5") == 1.0
        assert mod.compute_score(data_source="x", solution_str="\\boxed{1/4}", ground_truth="0.5") == 0.0
    finally:
        mod.shutdown_pool()
