"""`python -m tbrm_verl.bench --setting work`: the cost benchmark on a model where training work dominates a step.

The embedded bench (337k parameters, 6-token answers) measures Ray and Python overhead. This setting uses a model
and lengths at which each forward/backward pass is seconds of matrix work on 2 CPU cores: a random-init Qwen2 model
(full size 61.5M parameters, vocabulary 32,000), prompts and answers of fixed token lengths (``ignore_eos``) and a
synthetic reward, all built and cached by `tbrm_verl.tools.work_assets` (its docstring defines them).

Per method it reports verl's ``timing_s/*`` parts and per-worker memory (see `tbrm_verl.tools.work_memory`): for
each process of the run, its peak RSS above its own baseline, the RSS when its title first names its Ray actor class
(Ray has then imported the class and its modules: torch, transformers, verl) and before the actor has built a model.
``train_state_mem_gb`` is the sum of that over the FSDP worker process(es) (``ray::WorkerDict``: actor, critic and
reference, colocated) and the rollout server(s) (``ray::CPURolloutServer``). docs/bench/README.md defines it.

Sizes: ``full`` (the benchmark) and ``tiny`` (tests and the smoke run), see work_assets.SIZES.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from tbrm_verl.tools.procmem import PeriodicSampler, ProcessTreeSampler
from tbrm_verl.tools.work_assets import SIZES, WorkSize, ensure_work_assets
from tbrm_verl.tools.work_memory import TRAIN_STATE_ROLES, worker_memory

# ---------------------------------------------------------------------------------------------------- the bench

# from the project's cost issue, for this setting: step time vs PPO n=1 and GRPO n=4, training-state memory vs PPO
TARGETS = {
    "tbrm_n1 step time / ppo_n1": ("tbrm_n1", "ppo_n1", "step_time_s", 0.70),
    "tbrm_n1 step time / grpo_n4": ("tbrm_n1", "grpo_n4", "step_time_s", 0.35),
    "tbrm_n1 training-state memory / ppo_n1": ("tbrm_n1", "ppo_n1", "train_state_mem_gb", 0.65),
}


def work_overrides(paths: dict, size: WorkSize, micro_batch: int = 1) -> list[str]:
    """tbrm_verl.main overrides of the work setting (on top of the embedded task's per-method tuning, which only sets
    learning rates, β and n): its model and data, fixed lengths, one micro-batch size for every pass."""
    return [
        f"actor_rollout_ref.model.path={paths['model_path']}",
        f"data.train_files={paths['train_file']}",
        f"data.val_files={paths['val_file']}",
        f"data.max_prompt_length={size.prompt_tokens}",
        f"data.max_response_length={size.response_tokens}",
        "actor_rollout_ref.rollout.ignore_eos=true",  # every answer is max_response_length tokens
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro_batch}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={micro_batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro_batch}",
        f"critic.ppo_micro_batch_size_per_gpu={micro_batch}",
        f"critic.forward_micro_batch_size_per_gpu={micro_batch}",
        "reward.custom_reward_function.path=pkg://tbrm_verl.tools.work_assets",
        "reward.custom_reward_function.name=compute_score",
        "run.task=bench_work",
    ]


def run_method(name: str, overrides: list[str], out_dir: str, steps: int, common: list[str],
               interval_s: float = 0.1) -> dict:
    """One method as a real `python -m tbrm_verl.main` run, every process of it sampled (ProcessTreeSampler)."""
    from tbrm_verl import report
    from tbrm_verl.tools import bench

    run_dir, wall, sampler = bench.launch(name, overrides, out_dir, steps, common,
                                          lambda pid: ProcessTreeSampler(pid, interval_s=interval_s))
    steps = report.load_steps(run_dir)
    summary = bench.summarise_steps(steps)
    summary.pop("gpu_max_allocated_gb")
    # each timed step: on a shared machine one slow step moves the mean, so the spread is worth seeing
    summary["step_times_s"] = [m["timing_s/step"] for s, m in sorted(steps.items()) if s > 1 and "timing_s/step" in m]
    mem = worker_memory(sampler.stats())
    missed = [p["pid"] for p in mem["processes"] if p["role"] in TRAIN_STATE_ROLES and p["baseline_kind"] is None]
    if missed:
        print(f"[bench] WARNING {name}: no post-import baseline for pid(s) {missed}; lower --sample-interval",
              flush=True)
    with open(os.path.join(run_dir, "processes.json"), "w") as f:
        json.dump([s.to_dict() for s in sampler.stats()], f, indent=1)
    summary.update({"peak_mem_gb": sampler.tree_peak / 1e9, "peak_mem_kind": "cpu_tree_rss",
                    "train_state_mem_gb": mem["train_state_mem_gb"], "train_engine_mem_gb": mem["train_engine_mem_gb"],
                    "rollout_server_mem_gb": mem["rollout_server_mem_gb"], "workers": mem["roles"],
                    "processes": [p for p in mem["processes"] if p["role"] in TRAIN_STATE_ROLES], "wall_s": wall})
    print(f"[bench] {name}: {summary['step_time_s']:.2f} s/step, training state {summary['train_state_mem_gb']:.2f} "
          f"GB, tree peak {summary['peak_mem_gb']:.2f} GB, wall {wall:.0f} s", flush=True)
    return summary


def _cpu_rate(fn, work: float, seconds: float) -> float:
    """work / CPU-second of `fn` (process CPU time, not wall time), over at least `seconds` of CPU time."""
    fn()
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < seconds or n < 2:
        fn()
        n += 1
    return work * n / (time.process_time() - c0)


def measure_cpu(model_path: str | None = None, seconds: float = 1.0) -> dict:
    """The cost model's CPU 'device', measured per CPU-second of one thread (process CPU time, not wall time) and
    scaled by the machine's CPUs: on a shared machine a wall-clock rate measures the other users' load at that
    moment, a per-CPU-second rate measures the cores. So the prediction is for this machine idle; a run on a loaded
    machine is slower by the share of the cores it did not get (bench.json records the load).

    cpu_gflops: fp32 matmul, a model-shaped product ([320, 512] @ [512, 1408]); mem_bw_gbs: copy of 64 MiB (read +
    write, one thread). With `model_path`: model_fwd_gflops, the model's own forward over one 320-token sequence
    (2·P·T FLOPs per pass, i.e. the rate verl's forward-only passes could reach), and model_train_gflops, forward +
    backward with gradient checkpointing as verl trains it (6·P·T model FLOPs per pass, the cost model's count)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    cpus = os.cpu_count() or 1
    try:
        a, b = torch.randn(320, 512), torch.randn(512, 1408)
        out = {"cpu_gflops": _cpu_rate(lambda: a @ b, 2 * 320 * 512 * 1408, seconds) / 1e9 * cpus}
        x = torch.empty(64 * 2**20 // 4)
        y = torch.empty_like(x)
        out["mem_bw_gbs"] = _cpu_rate(lambda: y.copy_(x), 2 * x.numel() * 4, seconds) / 1e9
        if model_path:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
            P = sum(p.numel() for p in model.parameters())
            ids = torch.randint(0, model.config.vocab_size, (1, 320))
            model.eval()
            with torch.no_grad():
                out["model_fwd_gflops"] = _cpu_rate(lambda: model(input_ids=ids), 2 * P * 320, seconds) / 1e9 * cpus
            model.train()
            model.gradient_checkpointing_enable()

            def train_pass():
                model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()

            out["model_train_gflops"] = _cpu_rate(train_pass, 6 * P * 320, seconds) / 1e9 * cpus
    finally:
        torch.set_num_threads(old)
    out["cpus"] = cpus
    return out


class LoadSampler(PeriodicSampler):
    """os.getloadavg()[0] every `interval_s` (the machine may be shared: the bench reports its load)."""

    def __init__(self, interval_s: float = 15.0):
        super().__init__(interval_s)
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"load1_mean": sum(s) / len(s), "load1_max": max(s), "n_samples": len(s)}


def check_targets(results: dict) -> dict:
    from tbrm_verl.tools import bench

    return bench.check_targets(results, TARGETS)


def ratios(results: dict, base: str = "ppo_n1") -> dict:
    if base not in results:
        return {}
    b = results[base]
    return {m: {"step_time": r["step_time_s"] / b["step_time_s"], "peak_mem": r["peak_mem_gb"] / b["peak_mem_gb"],
                "train_state_mem": r["train_state_mem_gb"] / b["train_state_mem_gb"]} for m, r in results.items()}


def _rows(results: dict):
    """(method, [step s, *parts, train-state, FSDP worker, rollout server, tree peak GB, time/PPO, train-state/PPO])
    per method: the columns of both tables, in order."""
    from tbrm_verl.tools.bench import PARTS

    rat = ratios(results)
    for m, r in results.items():
        rr = rat.get(m, {})
        yield m, [r["step_time_s"], *(r["parts"][p] for p in (*PARTS, "other")), r["train_state_mem_gb"],
                  r["train_engine_mem_gb"], r["rollout_server_mem_gb"], r["peak_mem_gb"],
                  rr.get("step_time", float("nan")), rr.get("train_state_mem", float("nan"))]


def table(results: dict) -> str:
    from tbrm_verl.tools.bench import PARTS

    cols = (*PARTS, "other")
    head = (f"{'method':17s} {'step s':>7s} " + " ".join(f"{p[:12]:>12s}" for p in cols)
            + f" {'train GB':>8s} {'engine':>7s} {'rollout':>7s} {'tree GB':>7s} {'time/PPO':>8s} {'mem/PPO':>7s}")
    fmts = ["7.2f", *["12.2f"] * len(cols), "8.2f", "7.2f", "7.2f", "7.2f", "8.2f", "7.2f"]
    lines = [head, "-" * len(head)]
    for m, vals in _rows(results):
        lines.append(f"{m:17s} " + " ".join(format(v, f) for v, f in zip(vals, fmts)))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    from tbrm_verl.tools.bench import PARTS

    cols = (*PARTS, "other")
    lines = ["| method | step s | " + " | ".join(cols) + " | train-state GB | FSDP worker | rollout server | tree peak "
             "GB | time/PPO | train-state/PPO |", "|---" * (len(cols) + 8) + "|"]
    fmts = [".1f", *[".1f"] * len(cols), ".2f", ".2f", ".2f", ".1f", ".2f", ".2f"]
    for m, vals in _rows(results):
        lines.append("| " + " | ".join([m, *(format(v, f) for v, f in zip(vals, fmts))]) + " |")
    return "\n".join(lines)


def _train_state_panel(ax, results: dict) -> None:
    names = list(results)
    eng = [results[m]["train_engine_mem_gb"] for m in names]
    ax.bar(names, eng, label="FSDP worker (actor, critic, reference)", color="tab:blue")
    ax.bar(names, [results[m]["rollout_server_mem_gb"] for m in names], bottom=eng, label="rollout server",
           color="tab:orange")
    ax.set_ylabel("training-state memory (GB above post-import RSS)")
    ax.legend(fontsize=7)


def plot(results: dict, path: str) -> None:
    from tbrm_verl.tools import bench

    bench.plot(results, path, memory_panel=_train_state_panel)


# constants of the CPU 'device' the cost model is given (stated, not fitted): per-call overhead of a worker-group
# phase and per-step fixed cost, as measured on the embedded bench (docs/bench/README.md), and the CPU rollout's
# per-decode-step overhead (Python, per-request sampling)
PHASE_OVERHEAD_S = 0.1
OTHER_FIXED_S = 0.1
DECODE_STEP_OVERHEAD_S = 0.01
GAP = 0.20  # relative gaps above this are flagged (and explained in docs/bench/README.md)


def cost_model_comparison(doc: dict, bench_path: str) -> tuple[dict, str]:
    """The cost model's prediction for this setting (tbrm_verl.tools.cost_model.compare_with_bench on bench.json, plus the
    training-state memory, which compare_with_bench does not read) beside the measurement; gaps > GAP flagged."""
    import io
    from dataclasses import replace

    from tbrm_verl.tools import cost_model as cm

    s = doc["setting"]
    # the model's own measured forward rate is the achieved rate cpu_hardware asks for (the matmul rate without it);
    # the training passes run at the measured forward+backward rate relative to it
    peak = s.get("model_fwd_gflops") or s["cpu_gflops"]
    hw = cm.cpu_hardware(peak_tflops=peak / 1e3, mem_bw_gbs=s["mem_bw_gbs"],
                         phase_overhead_s=PHASE_OVERHEAD_S, other_fixed_s=OTHER_FIXED_S,
                         decode_step_overhead_s=DECODE_STEP_OVERHEAD_S)
    if s.get("model_train_gflops") and s.get("model_fwd_gflops"):
        hw = replace(hw, mfu_train=s["model_train_gflops"] / s["model_fwd_gflops"])
    # CPU: the host is the device, so the "offloaded" reference stays resident like everything else
    off = cm.Offload(ref_param=False)
    wkw = {"micro_batch_size": s["micro_batch"], "gpu_memory_utilization": 0.0,
           "ppo_mini_batch_size": s["prompts_per_step"]}
    buf = io.StringIO()
    cmp = cm.compare_with_bench(bench_path, hw=hw, offload=off, file=buf, **wkw)
    model = cm.ModelSpec("bench-work", params=float(s["params"]), layers=s["layers"], hidden=s["hidden"],
                         vocab=s["vocab"], num_kv_heads=s["num_kv_heads"], head_dim=s["head_dim"],
                         intermediate=s["intermediate"], tied_embeddings=True)
    w = cm.Workload(prompt_len=int(s["prompt_len"]), response_len=int(s["response_len"]),
                    prompts_per_step=s["prompts_per_step"], n_gpus=1, **wkw)
    methods = doc["methods"]
    preds = cm.predict_all(model, w, hw, off, methods=[k for k in cm.METHODS if k in methods])
    rollout_weights_gb = 4 * s["params"] / 1e9  # the fp32 copy the CPU rollout server holds (no vLLM modelled)
    rows, gaps = {}, []
    lines = [buf.getvalue(), "training-state memory (GB): measured FSDP worker vs predicted training-engine peak "
             f"(peak_train_gb); rollout server vs its fp32 weights ({rollout_weights_gb:.2f} GB)",
             f"  {'method':18s} {'engine meas':>11s} {'pred':>6s} {'gap':>6s} | {'rollout meas':>12s} {'pred':>6s} "
             f"| {'train-state meas':>16s} {'pred':>6s} {'gap':>6s}"]
    for k, p in preds.items():
        me = methods[k]
        eng_p = p.memory["peak_train_gb"]
        ts_p = eng_p + rollout_weights_gb
        r = {"step_time_s": (me["step_time_s"], p.step_time_s),
             "train_engine_mem_gb": (me["train_engine_mem_gb"], eng_p),
             "rollout_server_mem_gb": (me["rollout_server_mem_gb"], rollout_weights_gb),
             "train_state_mem_gb": (me["train_state_mem_gb"], ts_p)}
        for q in (*cm.PARTS,):
            r[f"parts/{q}"] = (me["parts"].get(q, 0.0), p.time_s[q])
        rows[k] = {name: {"measured": a, "predicted": b, "gap": (b - a) / a if a else None}
                   for name, (a, b) in r.items()}
        lines.append(f"  {k:18s} {me['train_engine_mem_gb']:11.2f} {eng_p:6.2f} "
                     f"{rows[k]['train_engine_mem_gb']['gap']:+6.0%} | {me['rollout_server_mem_gb']:12.2f} "
                     f"{rollout_weights_gb:6.2f} | {me['train_state_mem_gb']:16.2f} {ts_p:6.2f} "
                     f"{rows[k]['train_state_mem_gb']['gap']:+6.0%}")
        for name, v in rows[k].items():
            if v["gap"] is None or abs(v["gap"]) <= GAP:
                continue
            if name.startswith("parts/") and max(v["measured"], v["predicted"]) < 0.05 * me["step_time_s"]:
                continue  # a part under 5% of the step either way is noise-level
            gaps.append(f"{k} {name}: measured {v['measured']:.2f}, predicted {v['predicted']:.2f} "
                        f"({v['gap']:+.0%})")
    lines += ["", f"gaps over {GAP:.0%}:"] + [f"  {g}" for g in gaps]
    return {"hardware": {"peak_gflops": peak, "mfu_train": hw.mfu_train, "mem_bw_gbs": s["mem_bw_gbs"],
                         "phase_overhead_s": PHASE_OVERHEAD_S, "other_fixed_s": OTHER_FIXED_S,
                         "decode_step_overhead_s": DECODE_STEP_OVERHEAD_S},
            "compare_with_bench": cmp, "methods": rows, "gaps": gaps}, "\n".join(lines)


def _hardware(args, model_path: str | None) -> dict:
    hw = measure_cpu(model_path) if args.cpu_gflops is None or args.mem_bw_gbs is None else {}
    if args.cpu_gflops is not None:
        hw.update(cpu_gflops=args.cpu_gflops, cpu_gflops_stated=True)
    if args.mem_bw_gbs is not None:
        hw.update(mem_bw_gbs=args.mem_bw_gbs, mem_bw_stated=True)
    return hw


def _write_comparison(doc: dict, bench_path: str) -> str:
    cmp, text = cost_model_comparison(doc, bench_path)
    doc["cost_model"] = cmp
    with open(bench_path, "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.join(os.path.dirname(os.path.abspath(bench_path)), "cost_model_vs_bench.txt"), "w") as f:
        f.write(text + "\n")
    return text


def compare_only(bench_path: str, hw: dict) -> int:
    with open(bench_path) as f:
        doc = json.load(f)
    doc["setting"].update(hw)
    print(_write_comparison(doc, bench_path))
    return 0


def main(argv=None) -> int:
    from tbrm_verl import report
    from tbrm_verl.tools import bench

    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.bench --setting work",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per method (the first is not timed)")
    ap.add_argument("--methods", default=",".join(bench.METHODS), help=f"comma list of {', '.join(bench.METHODS)}")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (data.train_batch_size)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch, every pass and method")
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="model/lengths (tiny: tests, smoke run)")
    ap.add_argument("--cache-dir", default=None, help="assets cache (default: next to the embedded assets)")
    ap.add_argument("--sample-interval", type=float, default=0.1, help="seconds between per-process RSS samples")
    ap.add_argument("--out-dir", default="bench_work_out")
    ap.add_argument("--cpu-gflops", type=float, help="state the CPU's fp32 rate for the cost model (default: measure)")
    ap.add_argument("--mem-bw-gbs", type=float, help="state its memory bandwidth (default: measure)")
    ap.add_argument("--compare-only", metavar="BENCH_JSON", help="only redo the cost-model comparison of an existing "
                    "bench.json (hardware re-measured or stated) and write it beside that file")
    args, extra = ap.parse_known_args(argv)
    if args.compare_only:
        with open(args.compare_only) as f:
            model_path = json.load(f)["setting"]["model_path"]
        return compare_only(args.compare_only, _hardware(args, model_path))
    names = args.methods.split(",")
    unknown = [m for m in names if m not in bench.METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]}; choose from {', '.join(bench.METHODS)}")
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    size = SIZES[args.size]
    paths = ensure_work_assets(args.size, cache_dir=args.cache_dir)
    hw = _hardware(args, paths["model_path"])
    print(f"[bench] CPU ({hw.get('cpus', '?')} CPUs, per CPU-second x CPUs): fp32 matmul {hw['cpu_gflops']:.0f} "
          f"GFLOP/s, model forward {hw.get('model_fwd_gflops', float('nan')):.0f}, forward+backward "
          f"{hw.get('model_train_gflops', float('nan')):.0f}; copy {hw['mem_bw_gbs']:.1f} GB/s; load now "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    common = [f"data.train_batch_size={args.prompts}", *work_overrides(paths, size, args.micro_batch), *extra]
    results, load = {}, {}
    t0 = time.time()
    for name in names:
        with LoadSampler() as ls:
            results[name] = run_method(name, bench.METHODS[name], out_dir, args.steps, common, args.sample_interval)
        load[name] = results[name]["load"] = ls.summary()
    steps = report.load_steps(os.path.join(out_dir, names[0]))
    mean_of = lambda key: sum(m[key] for m in steps.values() if key in m) / max(1, sum(key in m for m in steps.values()))  # noqa: E731
    setting = {"name": "work", "size": args.size, **asdict(size), "steps": args.steps, "prompts_per_step": args.prompts,
               "micro_batch": args.micro_batch, "overrides": common, "n_gpus": 1,
               "prompt_len": mean_of("prompt_length/mean"), "response_len": mean_of("response_length/mean"),
               **bench.model_setting(common), "num_kv_heads": size.kv_heads, "head_dim": size.head_dim,
               "intermediate": size.intermediate, "tied_embeddings": True, **hw,
               "load1_mean": sum(v["load1_mean"] for v in load.values()) / len(load),
               "load1_max": max(v["load1_max"] for v in load.values()), "wall_s": time.time() - t0,
               "cpu_count": os.cpu_count()}
    doc = {"methods": results, "ratios_vs_ppo_n1": ratios(results), "targets": check_targets(results),
           "setting": setting}
    bench_path = os.path.join(out_dir, "bench.json")
    with open(bench_path, "w") as f:
        json.dump(doc, f, indent=2)
    _write_comparison(doc, bench_path)
    plot(results, os.path.join(out_dir, "bench.png"))
    out = [table(results), ""]
    for name, t in doc["targets"].items():
        out.append(f"target {name}: {t['value']:.2f} (≤ {t['bound']}: {'met' if t['met'] else 'NOT met'})")
    out.append(f"machine: {setting['cpu_count']} CPUs, {hw['cpu_gflops']:.0f} GFLOP/s, load (1 min) mean "
               f"{setting['load1_mean']:.2f} max {setting['load1_max']:.2f}; wall {setting['wall_s'] / 60:.1f} min")
    text = "\n".join(out)
    with open(os.path.join(out_dir, "bench_output.txt"), "w") as f:
        f.write(text + "\n\n" + markdown_table(results) + "\n")
    print(text)
    print(f"[bench] wrote {out_dir}/bench.json, bench.png, bench_output.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
