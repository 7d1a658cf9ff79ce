"""`python -m tbrm_verl.sweep`: the same hyperparameter grid for every method, each point a `compare` grid.

    python -m tbrm_verl.sweep --methods tbrm_n1,ppo_n1 --grid actor_rollout_ref.actor.optim.lr=3e-7,1e-6,3e-6 \\
        --seeds 101,102 --steps 100 --out-dir D

Each `--grid KEY=V1,V2,...` adds one axis; the points are their cartesian product, and every method runs at every
point (a key a method does not have, e.g. `critic.optim.lr` for TBRM, is composed but unused: verl builds no critic
for it). Every point is `python -m tbrm_verl.compare` in `D/<point>/` with the same methods, seeds and steps, so a
point that finished is never rerun and an interrupted sweep continues where it stopped.

Choice: per method, the point with the highest mean training reward over the last quarter of the run. Training
reward, not validation accuracy: the comparison later reports greedy validation on the same 100 problems, and a
value picked on them would be tuned on the test set. Use seeds the comparison does not use (the default, 101 and
102). Writes `D/sweep.json` (methods -> point -> compare's mean ± standard error per metric, and `chosen`) and
`D/sweep.md` (one table, the chosen point per method in bold); points are named like `lr-1e-6__critic_lr-1e-4`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys

from tbrm_verl.tools import compare

METRICS = ("train_reward_last_quarter", "final_val_acc", "time_per_step_s")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not key or not vals:
            raise SystemExit(f"sweep: --grid {spec!r}: write KEY=V1,V2,... (e.g. actor_rollout_ref.actor.optim.lr=1e-6,3e-6)")
        if key in {k for k, _ in axes}:
            raise SystemExit(f"sweep: --grid {key} is given twice; list all its values in one --grid")
        axes.append((key, vals))
    return axes


def points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_name(point: dict[str, str]) -> str:
    """A folder name per point: the last part of each key and its value, `lr-1e-6__critic_lr-1e-4`. No `=` or `,`:
    the folder ends up in a `run.dir=...` override, where Hydra's grammar reads them as syntax."""
    parts = []
    for key, value in point.items():
        short = key.split(".")[-1] if key.startswith("actor_rollout_ref.") else key.replace(".optim", "").replace(".", "_")
        parts.append(f"{short}-{re.sub(r'[^A-Za-z0-9.+-]', '_', value)}")
    return "__".join(parts)


def choose(rows: dict[str, dict]) -> str:
    """The point with the highest mean training reward (last quarter); NaN never wins."""
    def score(name):
        v = rows[name]["train_reward_last_quarter"]["mean"]
        return -math.inf if math.isnan(v) else v

    return max(rows, key=score)


def table(doc: dict) -> str:
    lines = ["| method | point | seeds | training reward, last quarter | final greedy validation | s/step |",
             "|---|---|---|---|---|---|"]
    for method, rows in doc["methods"].items():
        for name, r in rows["points"].items():
            pm = lambda k: f"{r[k]['mean']:.3f} ± {r[k]['stderr']:.3f}"  # noqa: E731
            label = f"**{name}**" if name == rows["chosen"] else name
            lines.append(f"| {method} | {label} | {r['train_reward_last_quarter']['n']} | "
                         f"{pm('train_reward_last_quarter')} | {pm('final_val_acc')} | {r['time_per_step_s']['mean']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.sweep", description=__doc__.split("\n\n")[0],
                                 epilog="Extra key=value arguments are passed to every run.")
    ap.add_argument("--methods", default="tbrm_n1,tbrm_n4,tbrm_n1_ref_free,grpo_n4,ppo_n1,brm_n4",
                    help=f"comma list of {', '.join(compare.METHODS)}")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="one axis of the grid (repeatable)")
    ap.add_argument("--seeds", default="101,102", help="comma list of integer seeds (keep them apart from the comparison's)")
    ap.add_argument("--steps", type=int, default=100, help="training steps per run")
    ap.add_argument("--out-dir", default="sweep_out")
    args, extra = ap.parse_known_args(argv)
    if not args.grid:
        ap.error("give at least one --grid KEY=V1,V2,...")
    axes = parse_grid(args.grid)
    out_dir = os.path.abspath(args.out_dir)
    grid = points(axes)
    doc: dict = {"grid": dict(axes), "seeds": args.seeds, "steps": args.steps, "overrides": extra, "methods": {}}
    for i, point in enumerate(grid, 1):
        name = point_name(point)
        print(f"[sweep] point {i}/{len(grid)}: {name}", flush=True)
        sub = os.path.join(out_dir, name)
        rc = compare.main(["--methods", args.methods, "--seeds", args.seeds, "--steps", str(args.steps),
                           "--out-dir", sub, *extra, *[f"{k}={v}" for k, v in point.items()]])
        if rc:
            return rc
        with open(os.path.join(sub, "comparison.json")) as f:
            agg = json.load(f)["methods"]
        for method, row in agg.items():
            entry = doc["methods"].setdefault(method, {"points": {}})
            entry["points"][name] = {"overrides": point, **{k: row[k] for k in METRICS}}
    for rows in doc["methods"].values():
        rows["chosen"] = choose(rows["points"])
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(doc, f, indent=2)
    md = table(doc)
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    for method, rows in doc["methods"].items():
        print(f"[sweep] {method}: chosen {rows['chosen']}")
    print(f"[sweep] wrote {out_dir}/sweep.json, sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
