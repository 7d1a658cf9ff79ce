"""`python -m tbrm_verl.bench`: per-step time and peak memory of TBRM vs PPO vs GRPO, side by side.

Each method runs as a real `python -m tbrm_verl.main` job (the CPU platform here, GPUs where present) on the same
model, data, prompts per step and step count. Per method it reports the mean step time over the steps after the
first (the first includes one-off compilation and cache warm-up), split into verl's `timing_s/*` parts, and the peak
memory: on CPU the summed RSS of every process of the run (driver, Ray, workers, rollout servers), on GPU the
largest `max_memory_allocated` any worker reported. Ratios are against PPO n=1. Writes bench.json, a table and a bar
chart (bench.png) to --out-dir.

    python -m tbrm_verl.bench --steps 6 --out-dir bench_out [extra tbrm_verl.main overrides ...]
    python -m tbrm_verl.bench memory --out-dir bench_out    # peak memory of one actor update (tbrm_verl/tools/update_memory.py)

`--setting work` runs the same five methods on a model where training work dominates (tbrm_verl/tools/bench_work.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tbrm_verl import report

METHODS: dict[str, list[str]] = {
    "tbrm_n1": ["method=tbrm", "actor_rollout_ref.rollout.n=1"],
    "tbrm_n1_ref_free": ["method=tbrm", "actor_rollout_ref.rollout.n=1", "tbrm.reference_free=true"],
    "tbrm_n4": ["method=tbrm", "actor_rollout_ref.rollout.n=4"],
    "ppo_n1": ["method=ppo", "actor_rollout_ref.rollout.n=1"],
    "grpo_n4": ["method=grpo", "actor_rollout_ref.rollout.n=4"],
}
# verl's timing_s/* parts, in the order the paper's Figure 2 lists them
PARTS = ("gen", "ref", "old_log_prob", "values", "update_critic", "update_actor")
TARGETS = {  # (numerator, denominator, metric, bound) from the project's cost issue
    "tbrm_n1 step time / ppo_n1": ("tbrm_n1", "ppo_n1", "step_time_s", 0.70),
    "tbrm_n1 peak memory / ppo_n1": ("tbrm_n1", "ppo_n1", "peak_mem_gb", 0.60),
    "tbrm_n1 step time / grpo_n4": ("tbrm_n1", "grpo_n4", "step_time_s", 0.30),
}


def summarise_steps(steps: dict[int, dict], skip_first: int = 1) -> dict:
    """Mean step time and parts over steps after the first `skip_first`; `other` is the rest of the step."""
    measured = [m for s, m in sorted(steps.items()) if s > skip_first and "timing_s/step" in m]
    if not measured:
        raise ValueError("no measured steps: run more than --skip-first steps")
    mean = lambda key: sum(m.get(key, 0.0) for m in measured) / len(measured)  # noqa: E731
    parts = {p: mean(f"timing_s/{p}") for p in PARTS}
    step = mean("timing_s/step")
    parts["other"] = max(0.0, step - sum(parts.values()))
    gpu_mem = [v for m in measured for k, v in m.items() if k.endswith("perf/max_memory_allocated_gb")]
    return {"step_time_s": step, "parts": parts, "n_steps": len(measured),
            "gpu_max_allocated_gb": max(gpu_mem) if gpu_mem else 0.0,
            "mean_reward": mean("critic/score/mean")}


def ratios(results: dict, base: str = "ppo_n1") -> dict:
    if base not in results:
        return {}
    b = results[base]
    return {m: {"step_time": r["step_time_s"] / b["step_time_s"], "peak_mem": r["peak_mem_gb"] / b["peak_mem_gb"]}
            for m, r in results.items()}


def check_targets(results: dict, targets: dict = TARGETS) -> dict:
    """Each target (numerator, denominator, metric, bound) whose two methods ran (and whose denominator is non-zero):
    its ratio, bound and whether it is met."""
    out = {}
    for name, (num, den, metric, bound) in targets.items():
        if num in results and den in results and results[den].get(metric):
            value = results[num][metric] / results[den][metric]
            out[name] = {"value": value, "bound": bound, "met": value <= bound}
    return out


def table(results: dict) -> str:
    rat = ratios(results)
    head = f"{'method':18s} {'step s':>7s} " + " ".join(f"{p:>13s}" for p in (*PARTS, "other")) + \
        f" {'peak GB':>8s} {'time/PPO':>8s} {'mem/PPO':>8s}"
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        parts = " ".join(f"{r['parts'][p]:13.2f}" for p in (*PARTS, "other"))
        rr = rat.get(m, {})
        lines.append(f"{m:18s} {r['step_time_s']:7.2f} {parts} {r['peak_mem_gb']:8.2f} "
                     f"{rr.get('step_time', float('nan')):8.2f} {rr.get('peak_mem', float('nan')):8.2f}")
    return "\n".join(lines)


def _peak_memory_panel(ax, results: dict) -> None:
    names = list(results)
    ax.bar(names, [results[m]["peak_mem_gb"] for m in names], color="tab:gray")
    ax.set_ylabel("peak memory (GB)")


def plot(results: dict, path: str, memory_panel=_peak_memory_panel) -> None:
    """Bar chart: seconds per step split into PARTS (left) beside memory, drawn by ``memory_panel(ax, results)``
    (right; default: peak memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(names)
    for p in (*PARTS, "other"):
        vals = [results[m]["parts"][p] for m in names]
        ax1.bar(names, vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("seconds per step")
    ax1.legend(fontsize=7)
    ax1.tick_params(axis="x", rotation=30)
    memory_panel(ax2, results)
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def launch(name: str, overrides: list[str], out_dir: str, steps: int, common: list[str], sampler) -> tuple:
    """One method as a real `python -m tbrm_verl.main` run in `out_dir`/`name` (its output in stdout.log there),
    watched by `sampler(pid)` (a tbrm_verl.tools.procmem.PeriodicSampler); (run dir, wall seconds, the sampler).
    A run that fails raises RuntimeError."""
    from tbrm_verl.tools.procmem import run_sampled

    run_dir = os.path.join(out_dir, name)
    args = [sys.executable, "-m", "tbrm_verl.main", *overrides, f"trainer.total_training_steps={steps}",
            "trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.val_before_train=false",
            "trainer.resume_mode=disable", f"run.dir={run_dir}", *common]
    os.makedirs(run_dir, exist_ok=True)
    print(f"[bench] {name}: {' '.join(args[3:])}", flush=True)
    with open(os.path.join(run_dir, "stdout.log"), "w") as log:
        rc, wall, watched = run_sampled(args, sampler, stdout=log, stderr=log, cwd=out_dir)
    if rc != 0:
        raise RuntimeError(f"{name} failed (exit {rc}); see {run_dir}/stdout.log")
    return run_dir, wall, watched


def run_method(name: str, overrides: list[str], out_dir: str, steps: int, common: list[str]) -> dict:
    from tbrm_verl.tools.procmem import PeakTreeRSS

    run_dir, wall, mem = launch(name, overrides, out_dir, steps, common, PeakTreeRSS)
    peak_rss = mem.peak / 1e9
    summary = summarise_steps(report.load_steps(run_dir))
    gpu = summary.pop("gpu_max_allocated_gb")
    summary["peak_mem_gb"] = gpu if gpu > 0 else peak_rss
    summary["peak_mem_kind"] = "gpu_max_allocated" if gpu > 0 else "cpu_tree_rss"
    summary["wall_s"] = wall
    print(f"[bench] {name}: {summary['step_time_s']:.2f} s/step, peak {summary['peak_mem_gb']:.2f} GB, "
          f"wall {wall:.0f} s", flush=True)
    return summary


def model_setting(extra: list[str]) -> dict:
    """Model size fields of bench.json's `setting` (what tbrm_verl.tools.cost_model.compare_with_bench reads)."""
    path = next((o.split("=", 1)[1] for o in extra if o.startswith("actor_rollout_ref.model.path=")), None)
    if path is None:
        from tbrm_verl.tasks.embedded import ensure_embedded_assets

        path = ensure_embedded_assets(verbose=False)["model_path"]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    return {"model_path": path, "params": params, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["memory"]:  # `python -m tbrm_verl.bench memory ...`: one actor update's peak memory
        from tbrm_verl.tools.update_memory import main as memory_main

        return memory_main(argv[1:])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--setting", choices=("embedded", "work"), default="embedded")
    setting, rest = pre.parse_known_args(argv)
    if setting.setting == "work":  # a model where training work dominates: tbrm_verl/tools/bench_work.py
        from tbrm_verl.tools.bench_work import main as work_main

        sys.exit(work_main(rest))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=("embedded", "work"), default="embedded",
                    help="embedded: the 337k-parameter embedded model (default); work: a 61.5M-parameter model, "
                    "256-token answers, per-worker memory (see --setting work --help)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per method (the first is not timed)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (data.train_batch_size)")
    ap.add_argument("--out-dir", default="bench_out")
    args, extra = ap.parse_known_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    common = [f"data.train_batch_size={args.prompts}", *extra]
    results = {}
    for name in args.methods.split(","):
        results[name] = run_method(name, METHODS[name], out_dir, args.steps, common)
    first = next(iter(results))
    steps = report.load_steps(os.path.join(out_dir, first))
    mean_of = lambda key: sum(m[key] for m in steps.values() if key in m) / max(1, sum(key in m for m in steps.values()))  # noqa: E731
    setting = {"steps": args.steps, "prompts_per_step": args.prompts, "overrides": common, "n_gpus": 1,
               "prompt_len": mean_of("prompt_length/mean"), "response_len": mean_of("response_length/mean"),
               **model_setting(extra)}
    doc = {"methods": results, "ratios_vs_ppo_n1": ratios(results), "targets": check_targets(results),
           "setting": setting}
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(results, os.path.join(out_dir, "bench.png"))
    print(table(results))
    for name, t in doc["targets"].items():
        print(f"target {name}: {t['value']:.2f} (≤ {t['bound']}: {'met' if t['met'] else 'NOT met'})")
    print(f"[bench] wrote {out_dir}/bench.json and {out_dir}/bench.png")


if __name__ == "__main__":
    main()
