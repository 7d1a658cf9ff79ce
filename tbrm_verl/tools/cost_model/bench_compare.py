"""The model's predicted ratios beside those a benchmark measured (a bench.json of tbrm_verl.tools.bench)."""

from __future__ import annotations

import json
import sys

from tbrm_verl.tools.cost_model.predict import predict_all
from tbrm_verl.tools.cost_model.report import _setting_dict
from tbrm_verl.tools.cost_model.specs import H100, METHODS, PARTS, Hardware, ModelSpec, Offload, Workload


# ----------------------------------------------------------------------------------------------- bench compare
def compare_with_bench(bench_json_path, hw: Hardware | None = None, offload: Offload = Offload(), file=None,
                       **workload_kw) -> dict:
    """Print the model's predicted ratios (vs PPO n=1) beside those measured in a benchmark's bench.json.

    `hw` should describe the machine the benchmark ran on (on CPU: `cpu_hardware(...)` with measured throughputs and
    fixed start-up costs). `workload_kw` overrides Workload fields the bench file does not carry (micro_batch_size,
    gpu_memory_utilization (use 0 for a non-vLLM CPU rollout), ppo_mini_batch_size, ...)."""
    file = file or sys.stdout
    with open(bench_json_path, encoding="utf-8") as f:
        bench = json.load(f)
    s = bench["setting"]
    model = ModelSpec(
        "bench", params=float(s["params"]), layers=int(s["layers"]), hidden=int(s["hidden"]), vocab=int(s["vocab"]),
        num_kv_heads=s.get("num_kv_heads"), head_dim=s.get("head_dim"), intermediate=s.get("intermediate"),
    )
    wkw = {"micro_batch_size": 1, "gpu_memory_utilization": 0.0 if hw is not None and hw.name == "cpu" else 0.4}
    wkw.update(workload_kw)
    w = Workload(prompt_len=int(s["prompt_len"]), response_len=int(s["response_len"]),
                 prompts_per_step=int(s["prompts_per_step"]), n_gpus=int(s["n_gpus"]), **wkw)
    hw = hw or H100
    measured = bench["methods"]
    keys = [k for k in METHODS if k in measured]
    preds = predict_all(model, w, hw, offload, methods=keys)
    base = "ppo_n1" if "ppo_n1" in measured else keys[0]
    mb = measured[base]
    rows = {}
    print(f"bench: {bench_json_path}  (ratios vs {base}; hardware model: {hw.name})", file=file)
    print(f"  {'method':18s} {'time ratio meas':>15s} {'pred':>7s} {'diff':>7s} | {'mem ratio meas':>14s} "
          f"{'pred':>7s} {'diff':>7s} | {'step s meas':>11s} {'pred':>8s}", file=file)
    for k in keys:
        me, p = measured[k], preds[k]
        tr_m = me["step_time_s"] / mb["step_time_s"]
        tr_p = p.step_time_s / preds[base].step_time_s
        mr_m = me["peak_mem_gb"] / mb["peak_mem_gb"] if mb.get("peak_mem_gb") else float("nan")
        mr_p = p.peak_mem_gb / preds[base].peak_mem_gb
        parts_m = {q: float(me.get("parts", {}).get(q, 0.0)) for q in PARTS}
        rows[k] = {"time_ratio": {"measured": tr_m, "predicted": tr_p}, "mem_ratio": {"measured": mr_m,
                   "predicted": mr_p}, "step_time_s": {"measured": me["step_time_s"], "predicted": p.step_time_s},
                   "peak_mem_gb": {"measured": me.get("peak_mem_gb"), "predicted": p.peak_mem_gb},
                   "parts_s": {"measured": parts_m, "predicted": dict(p.time_s)}}
        print(f"  {k:18s} {tr_m:15.3f} {tr_p:7.3f} {tr_p - tr_m:+7.3f} | {mr_m:14.3f} {mr_p:7.3f} "
              f"{mr_p - mr_m:+7.3f} | {me['step_time_s']:11.2f} {p.step_time_s:8.2f}", file=file)
    print("  parts (s), measured / predicted:", file=file)
    print("  " + f"{'method':18s}" + "".join(f"{q:>18s}" for q in PARTS), file=file)
    for k in keys:
        r = rows[k]["parts_s"]
        print("  " + f"{k:18s}" + "".join(f"{r['measured'][q]:8.2f}/{r['predicted'][q]:<8.2f} " for q in PARTS),
              file=file)
    return {"setting": _setting_dict(model, w, hw, offload), "base": base, "methods": rows}
