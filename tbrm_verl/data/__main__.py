"""``python -m tbrm_verl.data {train,eval,reasoning_gym} ...``: build the TBRM parquet files (exit 0 ok, 2 on input
errors)."""

from __future__ import annotations

import argparse
import sys

from tbrm_verl.tasks.math.prep import (
    DEFAULT_TEMPLATE,
    DEFAULT_TRAIN_SOURCE,
    DEFAULT_TRAIN_SPLIT,
    EVAL_NAMES,
    EVAL_SOURCES,
    TEMPLATES,
    PrepError,
    build_eval,
    build_train,
)
from tbrm_verl.tasks.reasoning_gym import data as rg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tbrm_verl.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out-dir", required=True, help="output directory (created if missing)")
        sp.add_argument("--strict", action="store_true", help="refuse (exit 2) on the first malformed record")
        sp.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache directory")
        sp.add_argument(
            "--progress-every", type=int, default=100_000, metavar="N", help="a progress line every N records (0: none)"
        )
        sp.add_argument(
            "--template",
            choices=TEMPLATES,
            default=DEFAULT_TEMPLATE,
            help="prompt template: qwen_math (the paper's \\boxed{} system prompt, default) or r1 (DeepSeek-R1 "
            "<think>/<answer> template, Figure 1b; render it with actor_rollout_ref.model.custom_chat_template, see "
            "tbrm_verl/tasks/math/prep.py); file names do not change, so write r1 files to their own --out-dir",
        )

    t = sub.add_parser("train", help="DAPO math prompts -> OUT_DIR/dapo_math_train.parquet")
    t.add_argument(
        "--source",
        default=DEFAULT_TRAIN_SOURCE,
        help=f"hub id (ID or ID:SPLIT) or local parquet/json/jsonl file (default {DEFAULT_TRAIN_SOURCE})",
    )
    t.add_argument("--split", default=DEFAULT_TRAIN_SPLIT, help="hub split (default train)")
    common(t)

    defaults = "; ".join(f"{n}={s.hub_id} [{s.split}]" for n, s in EVAL_SOURCES.items())
    e = sub.add_parser(
        "eval", help="evaluation sets -> OUT_DIR/{name}.parquet", description=f"Default sources: {defaults}."
    )
    e.add_argument(
        "--sources",
        nargs="*",
        default=[],
        metavar="NAME=SOURCE",
        help="override a set's source with a hub id (ID or ID:SPLIT) or a local parquet/json/jsonl file",
    )
    e.add_argument(
        "--names",
        nargs="*",
        default=None,
        metavar="NAME",
        help=f"build only these sets (default all: {' '.join(EVAL_NAMES)})",
    )
    common(e)

    r = sub.add_parser(
        "reasoning_gym",
        help="the Table 4 reasoning-gym graph tasks -> OUT_DIR/reasoning_gym_{task}_{train,test}.parquet",
        description=(rg.__doc__ or "").split("\n\n")[0],
    )
    r.add_argument("--out-dir", required=True, help="output directory (created if missing)")
    r.add_argument("--train-size", type=int, default=rg.DEFAULT_TRAIN_SIZE, help="problems per task (default 2000)")
    r.add_argument("--test-size", type=int, default=rg.DEFAULT_TEST_SIZE, help="problems per task (default 100)")
    r.add_argument("--train-seed", type=int, default=rg.DEFAULT_TRAIN_SEED, help=f"default {rg.DEFAULT_TRAIN_SEED}")
    r.add_argument("--test-seed", type=int, default=rg.DEFAULT_TEST_SEED, help=f"default {rg.DEFAULT_TEST_SEED}")
    r.add_argument(
        "--tasks", nargs="*", default=None, metavar="TASK", help=f"only these tasks (default all: {' '.join(rg.TASKS)})"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            report = build_train(
                args.source,
                args.out_dir,
                split=args.split,
                strict=args.strict,
                cache_dir=args.cache_dir,
                progress_every=args.progress_every,
                template=args.template,
            )
            print(report.summary())
        elif args.command == "reasoning_gym":
            for report in rg.build_reasoning_gym(
                args.out_dir,
                train_size=args.train_size,
                test_size=args.test_size,
                train_seed=args.train_seed,
                test_seed=args.test_seed,
                tasks=args.tasks,
            ):
                print(report.summary())
        else:
            sources = {}
            for item in args.sources:
                name, sep, src = item.partition("=")
                if not sep or not name.strip() or not src.strip():
                    raise PrepError(f"--sources expects NAME=SOURCE, got {item!r}")
                sources[name.strip()] = src.strip()
            for report in build_eval(
                args.out_dir,
                sources,
                names=args.names,
                strict=args.strict,
                cache_dir=args.cache_dir,
                progress_every=args.progress_every,
                template=args.template,
            ):
                print(report.summary())
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
