"""`python -m tbrm_verl.compare`: methods × seeds on one task, under one budget rule, in one table and one figure.

    python -m tbrm_verl.compare --methods tbrm_n1,grpo_n4 --seeds 1,2 --steps 4 --out-dir D
    python -m tbrm_verl.compare --budget rollouts --rollouts 6400 --seeds 1,2,3 --out-dir D   # equal rollouts
    python -m tbrm_verl.compare --budget wall --wall-s 300 --out-dir D                         # equal wall time

Every run is a real `python -m tbrm_verl.main` job on the same task; a seed fixes the prompt order and the sampling
seed, so for one seed every method sees the same prompts in the same order. Budget rules: `steps` (the paper's rule:
the same number of optimizer steps for every method), `rollouts` (steps = rollouts / (prompts per step × n), so n=4
methods take a quarter of the steps), `wall` (each run is stopped with Ctrl-C after --wall-s seconds of training
launch; its last validation counts). Extra `key=value` arguments go to every run.

Resumable: a run that finished writes `summary.json` in its folder and is never rerun; an interrupted one resumes
from its latest checkpoint (verl's `trainer.resume_mode=auto`) when the same command is given again. Writes to
--out-dir: `comparison.json` (methods → name → seeds → seed → final_val_acc, train_reward_last_quarter, rollouts,
wall_s, time_per_step_s, staleness_mean (verl's trajectory staleness averaged over the steps: 0 in sync mode), plus
per-method mean ± standard error), `comparison.md` (the table) and `comparison.png`
(validation accuracy and smoothed training reward against steps and against rollouts, a band per method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

from tbrm_verl import report
from tbrm_verl.tools.bench import METHODS as BENCH_METHODS

_ASYNC = "trainer.v1.trainer_mode=colocate_async"
METHODS: dict[str, list[str]] = {
    **BENCH_METHODS,
    "brm_n4": ["method=tbrm", "actor_rollout_ref.rollout.n=4", "tbrm.loss_variant=brm"],  # the paper's Fig. 5
    # off-policy variants (docs/off_policy.md): verl's colocate_async trainer with 1 or 2 batches sampled ahead
    # (trajectories up to 1 or 2 weight versions old), GRPO there with and without verl's rollout correction, and
    # TBRM's trajectory reuse (each batch trained on again in up to k later steps)
    "tbrm_n1_async1": [*BENCH_METHODS["tbrm_n1"], _ASYNC, "trainer.v1.colocate_async.num_warmup_batches=1"],
    "tbrm_n1_async2": [*BENCH_METHODS["tbrm_n1"], _ASYNC, "trainer.v1.colocate_async.num_warmup_batches=2"],
    "tbrm_n1_reuse2": [*BENCH_METHODS["tbrm_n1"], "tbrm.reuse_window=2"],
    "tbrm_n1_reuse4": [*BENCH_METHODS["tbrm_n1"], "tbrm.reuse_window=4"],
    "grpo_n4_async1": [*BENCH_METHODS["grpo_n4"], _ASYNC, "trainer.v1.colocate_async.num_warmup_batches=1"],
    "grpo_n4_async1_is": [*BENCH_METHODS["grpo_n4"], _ASYNC, "trainer.v1.colocate_async.num_warmup_batches=1",
                          "algorithm.rollout_correction.rollout_is=token",
                          "algorithm.rollout_correction.rollout_is_threshold=2.0"],
}
BUDGETS = ("steps", "rollouts", "wall")
STALENESS_KEY = "training/off_policy/trajectory_staleness/mean"  # verl's: weight versions a trained trajectory lags


def seed_overrides(seed: int) -> list[str]:
    """The prompt order (data.seed) and the rollout's sampling seed: equal across methods for one seed."""
    return [f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}"]


def rollouts_per_step(method: str, extra: list[str]) -> int:
    from tbrm_verl.config import compose

    cfg = compose([*METHODS[method], *extra])
    return int(cfg.data.train_batch_size) * int(cfg.actor_rollout_ref.rollout.n)


def plan_steps(budget: str, per_step: int, steps: int, rollouts: int | None) -> int:
    if budget == "rollouts":
        if not rollouts or rollouts < per_step:
            raise SystemExit(f"compare: --rollouts {rollouts} is less than one step ({per_step} rollouts)")
        return rollouts // per_step
    return steps


def stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise_run(run_dir: str, per_step: int, wall_s: float) -> dict:
    steps = report.load_steps(run_dir)
    trained = {s: m for s, m in steps.items() if report.REWARD_KEY in m}
    rewards = [m[report.REWARD_KEY] for m in trained.values()]
    q = max(1, len(rewards) // 4)
    val = report.validation_curve(steps)
    step_times = [m["timing_s/step"] for s, m in trained.items() if "timing_s/step" in m and s > 1]
    staleness = [m[STALENESS_KEY] for m in trained.values() if STALENESS_KEY in m]
    return {
        "final_val_acc": val[1][-1][1] if val else float("nan"),
        "final_val_step": val[1][-1][0] if val else None,
        "train_reward_last_quarter": sum(rewards[-q:]) / q if rewards else float("nan"),
        "steps": len(trained),
        "rollouts": len(trained) * per_step,
        "wall_s": wall_s,
        "time_per_step_s": sum(step_times) / len(step_times) if step_times else float("nan"),
        "staleness_mean": sum(staleness) / len(staleness) if staleness else float("nan"),
        "curve": {"steps": sorted(trained), "reward": rewards, "val": val[1] if val else []},
    }


def hydra_value(text: str) -> str:
    """`text` as one value of a Hydra override: quoted when it holds characters the override grammar reads as syntax
    (`=`, `,`, spaces, brackets, ...), e.g. an output folder named `lr=1e-6`."""
    if re.fullmatch(r"[A-Za-z0-9_/.:+~@-]+", text):
        return text
    return "'" + text.replace("'", "\\'") + "'"  # Hydra's quoted string: only the quote itself is escaped


def run_one(method: str, seed: int, n_steps: int, args, extra: list[str], out_dir: str) -> dict:
    run_dir = os.path.join(out_dir, "runs", method, f"seed{seed}")
    done = os.path.join(run_dir, "summary.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    save_freq = max(1, n_steps // 4)  # an interrupted grid resumes within a quarter of a run
    cmd = [sys.executable, "-m", "tbrm_verl.main", *METHODS[method], *seed_overrides(seed),
           f"trainer.total_training_steps={n_steps}", f"trainer.save_freq={save_freq}", "trainer.resume_mode=auto",
           "trainer.max_actor_ckpt_to_keep=1", "trainer.max_critic_ckpt_to_keep=1",
           f"run.dir={hydra_value(run_dir)}", *extra]
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.log"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.wall_s if args.budget == "wall" else None)
        except subprocess.TimeoutExpired:  # equal wall time: stop like a user would; checkpoints and metrics stay
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait()
            rc = 0 if rc in (0, 130) else rc
        except BaseException:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C of the grid: let the run save and stop, then stop too
            proc.wait()
            raise
    if rc != 0:
        raise SystemExit(f"compare: {method} seed {seed} failed (exit {rc}); see {run_dir}/stdout.log")
    per_step = rollouts_per_step(method, extra)
    summary = summarise_run(run_dir, per_step, time.time() - t0)
    with open(done, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def first_quarter(run: dict) -> float:
    """Mean training reward over the first quarter of the steps (from the run's curve): where the run started."""
    rewards = run["curve"]["reward"]
    q = max(1, len(rewards) // 4)
    return sum(rewards[:q]) / q if rewards else float("nan")


def val_by_step(seeds: dict[int, dict]) -> dict[str, float]:
    """Mean greedy validation over seeds at each step every seed validated at (step 0 = before training)."""
    curves = [dict(r["curve"]["val"]) for r in seeds.values()]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {str(s): sum(c[s] for c in curves) / len(curves) for s in common}


def aggregate(results: dict[str, dict[int, dict]]) -> dict:
    out = {}
    for method, seeds in results.items():
        per_seed = {s: {**{k: v for k, v in r.items() if k != "curve"}, "train_reward_first_quarter": first_quarter(r)}
                    for s, r in seeds.items()}
        row = {"seeds": {str(s): r for s, r in per_seed.items()}}
        for key in ("final_val_acc", "train_reward_first_quarter", "train_reward_last_quarter", "rollouts", "wall_s",
                    "time_per_step_s", "staleness_mean"):
            xs = [r[key] for r in per_seed.values() if not math.isnan(r.get(key, math.nan))]  # older summaries lack some
            row[key] = {"mean": sum(xs) / len(xs) if xs else float("nan"), "stderr": stderr(xs), "n": len(xs)}
        row["val_by_step"] = val_by_step(seeds)
        out[method] = row
    return out


def table(agg: dict) -> str:
    lines = ["| method | seeds | final greedy validation | greedy validation by step (mean) | training reward, last "
             "quarter | training reward, first quarter | rollouts | wall s | s/step | staleness |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in agg.items():
        pm = lambda k, f: f"{r[k]['mean']:{f}} ± {r[k]['stderr']:{f}}"  # noqa: E731
        by_step = " → ".join(f"{v:.2f} ({s})" for s, v in r.get("val_by_step", {}).items()) or "–"
        first = pm("train_reward_first_quarter", ".3f") if "train_reward_first_quarter" in r else "–"
        stale = r.get("staleness_mean", {"n": 0})
        stale = f"{stale['mean']:.2f}" if stale["n"] else "–"  # mean over steps and seeds; – where verl logged none
        lines.append(f"| {m} | {r['final_val_acc']['n']} | {pm('final_val_acc', '.3f')} | {by_step} | "
                     f"{pm('train_reward_last_quarter', '.3f')} | {first} | {r['rollouts']['mean']:.0f} | "
                     f"{r['wall_s']['mean']:.0f} | {r['time_per_step_s']['mean']:.2f} | {stale} |")
    return "\n".join(lines)


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def _band(ax, xs_per_seed: list[list[float]], ys_per_seed: list[list[float]], label: str) -> None:
    n = min(len(y) for y in ys_per_seed)
    if n == 0:
        return
    x = xs_per_seed[0][:n]
    cols = list(zip(*(y[:n] for y in ys_per_seed)))
    mean = [sum(c) / len(c) for c in cols]
    lo, hi = [min(c) for c in cols], [max(c) for c in cols]
    (line,) = ax.plot(x, mean, label=label, marker="o" if n < 6 else None)
    ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())


def plot(results: dict[str, dict[int, dict]], per_step: dict[str, int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for method, seeds in results.items():
        runs = list(seeds.values())
        val_x = [[s for s, _ in r["curve"]["val"]] for r in runs]
        val_y = [[v for _, v in r["curve"]["val"]] for r in runs]
        rew_x = [r["curve"]["steps"] for r in runs]
        rew_y = [_smooth(r["curve"]["reward"]) for r in runs]
        k = per_step[method]
        _band(axes[0, 0], val_x, val_y, method)
        _band(axes[0, 1], [[s * k for s in xs] for xs in val_x], val_y, method)
        _band(axes[1, 0], rew_x, rew_y, method)
        _band(axes[1, 1], [[s * k for s in xs] for xs in rew_x], rew_y, method)
    for ax, (xl, yl) in zip(axes.flat, [("step", "greedy validation accuracy"), ("rollouts", "greedy validation accuracy"),
                                         ("step", "training reward (smoothed)"), ("rollouts", "training reward (smoothed)")]):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("mean over seeds; band: min–max across seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.compare", description=__doc__.split("\n\n")[0],
                                 epilog="Extra key=value arguments are passed to every run.")
    ap.add_argument("--methods", default="tbrm_n1,tbrm_n4,tbrm_n1_ref_free,grpo_n4,ppo_n1,brm_n4",
                    help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="1,2,3", help="comma list of integer seeds")
    ap.add_argument("--budget", choices=BUDGETS, default="steps", help="equal steps (the paper's rule), rollouts or wall time")
    ap.add_argument("--steps", type=int, default=100, help="training steps per run (budget=steps, and the cap for wall)")
    ap.add_argument("--rollouts", type=int, help="rollouts per run (budget=rollouts)")
    ap.add_argument("--wall-s", type=float, help="seconds per run, start-up included (budget=wall)")
    ap.add_argument("--out-dir", default="compare_out")
    args, extra = ap.parse_known_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    bad = [e for e in extra if "=" not in e]
    if bad:
        ap.error(f"unrecognized argument {bad[0]} (extra arguments must be key=value overrides)")
    if args.budget == "wall" and not args.wall_s:
        ap.error("--budget wall needs --wall-s")
    seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)

    per_step = {m: rollouts_per_step(m, extra) for m in methods}
    plan = [(m, s, plan_steps(args.budget, per_step[m], args.steps, args.rollouts)) for m in methods for s in seeds]
    results: dict[str, dict[int, dict]] = {m: {} for m in methods}
    t_start, n_run = time.time(), 0
    for i, (m, s, n_steps) in enumerate(plan, 1):
        fresh = not os.path.exists(os.path.join(out_dir, "runs", m, f"seed{s}", "summary.json"))
        print(f"[compare] {i}/{len(plan)} {m} seed {s}: {n_steps} steps ({n_steps * per_step[m]} rollouts)"
              + ("" if fresh else " — done before, kept"), flush=True)
        t0 = time.time()
        r = results[m][s] = run_one(m, s, n_steps, args, extra, out_dir)
        if fresh:
            n_run += 1
            left = sum(1 for mm, ss, _ in plan[i:]
                       if not os.path.exists(os.path.join(out_dir, "runs", mm, f"seed{ss}", "summary.json")))
            eta = (time.time() - t_start) / n_run * left
            print(f"[compare]   val {r['final_val_acc']:.3f}, reward (last quarter) {r['train_reward_last_quarter']:.3f}, "
                  f"{time.time() - t0:.0f} s; about {eta / 60:.0f} min left", flush=True)

    agg = aggregate(results)
    doc = {"budget": args.budget, "steps": args.steps, "rollouts": args.rollouts, "wall_s": args.wall_s,
           "seeds": seeds, "overrides": extra, "rollouts_per_step": per_step, "methods": agg}
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(doc, f, indent=2)
    md = table(agg)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(md + "\n")
    plot(results, per_step, os.path.join(out_dir, "comparison.png"))
    print(md)
    print(f"[compare] wrote {out_dir}/comparison.json, comparison.md, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
