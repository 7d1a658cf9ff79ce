"""The command line of `python -m tbrm_verl.cost_model` (--help: every knob): the paper comparison (default), a
preset or custom model, a bench.json comparison, or one recipe's memory check (--recipe)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from tbrm_verl.tools.cost_model.bench_compare import compare_with_bench
from tbrm_verl.tools.cost_model.paper import compare_with_paper
from tbrm_verl.tools.cost_model.predict import predict_all, ratios_vs
from tbrm_verl.tools.cost_model.recipe import RECIPES_DIR, recipe_setting
from tbrm_verl.tools.cost_model.report import _format_recipe, _format_table, _setting_dict
from tbrm_verl.tools.cost_model.specs import H100, PRESETS, Hardware, ModelSpec, Offload, Workload, cpu_hardware


def _build_parser() -> argparse.ArgumentParser:
    import tbrm_verl.tools.cost_model as package  # its docstring's first line describes the tool

    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.cost_model",
                                 description=package.__doc__.split("\n")[0])
    ap.add_argument("--paper", action="store_true", help="7B/4xH100 paper setting vs the paper's ratios (default)")
    ap.add_argument("--bench", help="compare with a bench.json (see compare_with_bench)")
    ap.add_argument("--model", choices=sorted(PRESETS), help="preset model (custom: --params/--layers/--hidden/--vocab)")
    ap.add_argument("--params", type=float)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--response-len", type=int, default=None)
    ap.add_argument("--max-response-len", type=int)
    ap.add_argument("--prompts", type=int, default=128, help="prompts per step")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--gpu-mem-util", type=float, default=None, help="vLLM gpu_memory_utilization")
    ap.add_argument("--mini-batch", type=int, help="ppo_mini_batch_size in prompts (default: whole batch)")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--kv-cache-gb", type=float, help="override vLLM's KV-cache budget per GPU (GB)")
    for f in ("actor-param", "actor-optimizer", "critic-param", "critic-optimizer"):
        ap.add_argument(f"--offload-{f}", action="store_true")
    ap.add_argument("--offload-ref-param", action=argparse.BooleanOptionalAction, default=True,
                    help="reference on the host between its passes (verl 0.9.1's forward_only reference: default on)")
    ap.add_argument("--hw", choices=["h100", "cpu"], default="h100")
    ap.add_argument("--peak-tflops", type=float, help="override peak FLOP/s (cpu: achieved matmul rate)")
    ap.add_argument("--mem-bw-gbs", type=float, help="override memory bandwidth, GB/s")
    ap.add_argument("--mem-gb", type=float)
    ap.add_argument("--mfu-train", type=float)
    ap.add_argument("--mfu-forward", type=float)
    ap.add_argument("--mfu-prefill", type=float)
    ap.add_argument("--decode-bw-eff", type=float)
    ap.add_argument("--decode-step-overhead-s", type=float)
    ap.add_argument("--phase-overhead-s", type=float)
    ap.add_argument("--other-fixed-s", type=float)
    ap.add_argument("--other-per-sample-s", type=float)
    ap.add_argument("--runtime-overhead-gb", type=float)
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    ap.add_argument("--recipe", help="check a recipe: a config name in --config-dir or a path to a .yaml; prints "
                    "its per-GPU memory by phase and exits 1 when the predicted peak exceeds the GPU memory (the "
                    "recipe header's 'Nx GPU MGB', else 80 GB, or --mem-gb), 2 when it cannot be checked")
    ap.add_argument("--config-dir", default=str(RECIPES_DIR), help="where --recipe names are looked up")
    ap.add_argument("overrides", nargs="*", help="with --recipe: Hydra overrides (key=value), as for tbrm_verl.main")
    return ap


def _hardware_from_args(a) -> Hardware:
    if a.hw == "cpu":
        hw = cpu_hardware(peak_tflops=a.peak_tflops or 0.1, mem_bw_gbs=a.mem_bw_gbs or 10.0, mem_gb=a.mem_gb or 64.0)
    else:
        hw = H100
        if a.peak_tflops:
            hw = replace(hw, peak_flops=a.peak_tflops * 1e12)
        if a.mem_bw_gbs:
            hw = replace(hw, mem_bw=a.mem_bw_gbs * 1e9)
        if a.mem_gb:
            hw = replace(hw, mem_gb=a.mem_gb)
    over = {
        "mfu_train": a.mfu_train, "mfu_forward": a.mfu_forward, "mfu_prefill": a.mfu_prefill,
        "decode_bw_eff": a.decode_bw_eff, "decode_step_overhead_s": a.decode_step_overhead_s,
        "phase_overhead_s": a.phase_overhead_s, "other_fixed_s": a.other_fixed_s,
        "other_per_sample_s": a.other_per_sample_s, "runtime_overhead_gb": a.runtime_overhead_gb,
    }
    return replace(hw, **{k: v for k, v in over.items() if v is not None})


def _workload_kw(a) -> dict:
    kw = {"ppo_epochs": a.ppo_epochs, "rollout_tp": a.rollout_tp, "prefix_caching": not a.no_prefix_caching,
          "kv_cache_gb": a.kv_cache_gb}
    if a.max_response_len is not None:
        kw["max_response_len"] = a.max_response_len
    if a.mini_batch is not None:
        kw["ppo_mini_batch_size"] = a.mini_batch
    if a.micro_batch is not None:
        kw["micro_batch_size"] = a.micro_batch
    if a.gpu_mem_util is not None:
        kw["gpu_memory_utilization"] = a.gpu_mem_util
    return kw


def main(argv=None) -> int:
    a = _build_parser().parse_args(argv)
    hw = _hardware_from_args(a)
    off = Offload(a.offload_actor_param, a.offload_actor_optimizer, a.offload_critic_param,
                  a.offload_critic_optimizer, a.offload_ref_param)
    wkw = _workload_kw(a)
    if a.overrides and not a.recipe:
        raise SystemExit(f"unexpected arguments {a.overrides}: key=value overrides go with --recipe")
    if a.recipe:
        if a.mem_gb:
            hw = replace(hw, name=f"{a.mem_gb:g} GB per GPU from --mem-gb")
        try:
            name, st = recipe_setting(a.recipe, a.overrides, a.config_dir, hw=hw if a.mem_gb else None,
                                      response_len=a.response_len)
        except (FileNotFoundError, ValueError) as exc:  # no such recipe; a setting the model does not cover
            print(f"tbrm_verl.tools.cost_model: {exc}", file=sys.stderr)
            return 2  # 1 means "does not fit"
        p = st.predict()
        print(_format_recipe(name, st, p))
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump({"recipe": name, "setting": _setting_dict(st.model, st.workload, st.hardware, st.offload),
                           "method": asdict(st.method), "prediction": p.to_dict()}, f, indent=2, default=float)
        return 0 if p.fits else 1
    if a.bench:
        result = compare_with_bench(a.bench, hw=hw, offload=off, **wkw)
    elif a.model or a.params:
        if a.model:
            model = PRESETS[a.model]
        else:
            missing = [n for n in ("params", "layers", "hidden", "vocab") if getattr(a, n) is None]
            if missing:
                raise SystemExit(f"custom model needs --{' --'.join(missing)}")
            model = ModelSpec("custom", a.params, a.layers, a.hidden, a.vocab, a.kv_heads, a.head_dim, a.intermediate)
        wkw.setdefault("micro_batch_size", 1)
        w = Workload(prompt_len=a.prompt_len or 160, response_len=a.response_len or 2048,
                     prompts_per_step=a.prompts, n_gpus=a.gpus, **wkw)
        preds = predict_all(model, w, hw, off)
        print(_format_table(model, w, hw, off, preds))
        rat = ratios_vs(preds)
        print("\nratios vs PPO n=1 (step time, speed-up, device-peak memory, training-engine-peak memory):")
        for k, r in rat.items():
            print(f"  {k:18s} time x{r['time_ratio']:.3f}  speed-up {r['speedup']:.3f}  mem(dev) "
                  f"x{r['peak_device_ratio']:.3f}  mem(train) x{r['peak_train_ratio']:.3f}")
        result = {"setting": _setting_dict(model, w, hw, off), "predictions": {k: p.to_dict() for k, p in
                  preds.items()}, "ratios_vs_ppo_n1": rat}
    else:
        kw = dict(wkw)
        if a.prompt_len:
            kw["prompt_len"] = a.prompt_len
        if a.response_len:
            kw["response_len"] = a.response_len
        kw.pop("micro_batch_size", None)
        kw.pop("gpu_memory_utilization", None)
        result = compare_with_paper(hw=hw, offload=off, **kw)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=float)
    return 0
