"""``python -m tbrm_verl.eval``: the paper's evaluation protocol (arXiv 2505.15311 §5, docs/paper.md §2) and its Table 1.

Evaluate a model on the six evaluation parquets written by ``python -m tbrm_verl.data eval``::

    python -m tbrm_verl.eval run --model MODEL [--data-dir DIR] [--sets NAME ...] [--out results.json]
    python -m tbrm_verl.eval --model MODEL ...                      (same: ``run`` is the default command)
    python -m tbrm_verl.eval table results.json [more.json ...] [--model 1.5B|7B]

This module is the argument parser and the dispatch to the commands. MODEL is a Hugging Face model directory or hub
id, or a verl checkpoint / run directory (``tbrm_verl.eval.checkpoint``); the protocol (k, temperature, avg@k,
pass@k, scoring) and the results JSON are ``tbrm_verl.eval.protocol``'s; the backends (``--backend auto|vllm|hf``)
``tbrm_verl.eval.generate``'s; the table ``tbrm_verl.eval.table``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tbrm_verl.eval import EvalError
from tbrm_verl.eval.protocol import DEFAULT_MAX_NEW_TOKENS, EVAL_SETS, cmd_run
from tbrm_verl.eval.table import PAPER_TABLE1, cmd_table, format_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tbrm_verl.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate a model or checkpoint (the default command)")
    r.add_argument("--model", required=True,
                   help="HF model dir or hub id, or a verl checkpoint (see tbrm_verl.eval.checkpoint)")
    r.add_argument("--data-dir", default=None, help="directory of {set}.parquet (default $TBRM_DATA_DIR or ./data)")
    r.add_argument("--sets", nargs="*", default=None, metavar="NAME[=FILE]",
                   help=f"sets to evaluate (default: {' '.join(EVAL_SETS)})")
    r.add_argument("--k", action="append", default=None, metavar="K|NAME=K",
                   help="samples per problem, for all sets or one set (repeatable); default: the paper's protocol")
    r.add_argument("--temperature", action="append", default=None, metavar="T|NAME=T",
                   help="sampling temperature, for all sets or one set (repeatable); 0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    r.add_argument("--seed", type=int, default=0, help="request seed = seed + problem row")
    r.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto")
    r.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (hf auto: fp32 on CPU)")
    r.add_argument("--batch-size", type=int, default=16, help="hf backend: problems per generate() call")
    r.add_argument("--threads", type=int, default=None, help="hf backend: torch CPU threads")
    r.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend")
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm backend")
    r.add_argument("--max-model-len", type=int, default=None, help="vllm backend (default: the model's)")
    r.add_argument("--no-im-end-stop", dest="im_end_stop", action="store_false",
                   help="do not stop at <|im_end|> (only at the EOS tokens)")
    r.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each set")
    r.add_argument("--merged-dir", default=None, help="where to merge FSDP shards (default ACTOR_DIR/merged_hf)")
    r.add_argument("--no-merge", action="store_true", help="refuse to merge FSDP shards")
    r.add_argument("--score-workers", type=int, default=4, help="threads feeding the Math-Verify process pool")
    r.add_argument("--out", default=None, help="results JSON (default: printed)")
    r.add_argument("--samples-out", default=None, help="JSONL dump of every sample and its score")
    r.add_argument("--label", default=None, help="name of this run in the table (default: the model's name)")
    r.add_argument("--table", action="store_true", help="print the Table 1 comparison afterwards")
    r.add_argument("--table-model", choices=tuple(PAPER_TABLE1), default=None)
    t = sub.add_parser("table", help="print the paper's Table 1 beside one or more results files")
    t.add_argument("results", nargs="+", help="results JSON files written by `run --out`")
    t.add_argument("--model", choices=tuple(PAPER_TABLE1), default=None,
                   help="paper rows for this model size (default: guessed from the results, else both)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "table", "-h", "--help"):
        argv = ["run"] + argv
    args = _parser().parse_args(argv)
    try:
        if args.command == "table":
            return cmd_table(args)
        results = cmd_run(args)
        if args.table:
            print(format_table([(args.label or Path(args.model).name, results)], args.table_model))
        return 0
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
