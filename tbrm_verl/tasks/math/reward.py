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
* everything else runs Math-Verify with a per-answer timeout in a process pool (``tbrm_verl.tasks.math.verify_pool``,
  which says how); an answer that runs past the timeout is scored wrong.

Conventions (``convention=``, from ``reward.custom_reward_function.reward_kwargs``):

* ``"zero_one"`` (default): correct 1.0, wrong 0.0 (verl's MATH scorer);
* ``"plus_minus_one"``: correct +1.0, wrong -1.0 (verl's DAPO scorer).

verl usage::

    reward.custom_reward_function.path=tbrm_verl/tasks/math/reward.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.convention=zero_one

verl loads the file under a private module name; the pool's worker functions live in the importable module
``tbrm_verl.tasks.math.verify_pool`` (the repository root is put on ``sys.path`` if needed) so that spawned workers can
unpickle them. Environment knobs: ``TBRM_REWARD_WORKERS`` and ``TBRM_REWARD_STARTUP_TIMEOUT`` (see ``verify_pool``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args

try:
    from tbrm_verl.tasks.math import verify_pool as _verify_pool
except ImportError:  # loaded by file path (verl's custom_reward_function.path) without the package on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[3]))  # the repository root (spawned workers inherit it)
    from tbrm_verl.tasks.math import verify_pool as _verify_pool

RewardPoolStartError = _verify_pool.RewardPoolStartError
shutdown_pool = _verify_pool.shutdown_pool

__all__ = [
    "CONVENTIONS",
    "RewardConvention",
    "RewardPoolStartError",
    "MAX_ANSWER_CHARS",
    "MAX_RESPONSE_CHARS",
    "compute_score",
    "final_answer",
    "reward_values",
    "is_correct",
    "last_boxed_answer",
    "normalize_answer",
    "shutdown_pool",
]

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
        if _verify_pool.math_verify_equal(pred, gold, timeout_s):
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
    wrong, right, timeout_s = reward_values(convention, timeout_s)
    return right if is_correct(solution_str, ground_truth, timeout_s=timeout_s) else wrong


def reward_values(convention: Any, timeout_s: Any) -> tuple[float, float, float]:
    """(score if wrong, score if correct, timeout in seconds) for a reward function's ``convention`` and ``timeout_s``
    keyword arguments; ``ValueError`` for an unknown convention or a timeout that is not a positive number."""
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
    return wrong, right, timeout_s
