"""The paper's evaluation protocol and its Table 1 (``python -m tbrm_verl.eval``; see ``cli``).

Modules, one job each: ``checkpoint`` (a run or checkpoint -> a loadable Hugging Face model dir), ``generate`` (the
hf and vllm generation backends and the seeded HF sampling they share with the embedded task), ``protocol`` (the
evaluation sets, scoring and the ``run`` command's results), ``table`` (the paper's Table 1 beside results files),
``cli`` (the argument parser). The user-facing error type and the log line live here, shared by all of them.
"""

from __future__ import annotations

import sys


class EvalError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""


def log(msg: str) -> None:
    print(f"[tbrm_verl.eval] {msg}", file=sys.stderr, flush=True)
