"""Text and JSON renderings of predictions: the per-method table, a recipe's per-phase memory, the setting as a dict."""

from __future__ import annotations

from dataclasses import asdict

from tbrm_verl.tools.cost_model.predict import Prediction
from tbrm_verl.tools.cost_model.recipe import Setting, fit_line
from tbrm_verl.tools.cost_model.specs import PARTS, Hardware, ModelSpec, Offload, Workload


# ------------------------------------------------------------------------------------------------------ output
def _setting_dict(model, w, hw, offload) -> dict:
    return {"model": asdict(model), "workload": asdict(w), "hardware": asdict(hw), "offload": asdict(offload)}


def _format_table(model: ModelSpec, w: Workload, hw: Hardware, offload: Offload, preds: dict[str, Prediction]) -> str:
    lines = [
        f"model {model.name}: P={model.params / 1e9:.3f}B L={model.layers} d={model.hidden} V={model.vocab} "
        f"kv/token={model.kv_bytes_per_token() / 1024:.0f} KiB",
        f"workload: prompts/step={w.prompts_per_step} prompt={w.prompt_len} response={w.response_len} "
        f"(max {w.max_resp}) GPUs={w.n_gpus} micro-batch={w.micro_batch_size} vLLM fraction="
        f"{w.gpu_memory_utilization} rollout TP={w.rollout_tp} ppo_epochs={w.ppo_epochs} "
        f"mini-batch={w.ppo_mini_batch_size or w.prompts_per_step}",
        f"hardware {hw.name}: peak {hw.peak_flops / 1e12:.0f} TFLOP/s, {hw.mem_bw / 1e12:.2f} TB/s, {hw.mem_gb:.0f} GB;"
        f" MFU prefill {hw.mfu_prefill} forward {hw.mfu_forward} train {hw.mfu_train}; decode {hw.decode_bw_eff}"
        f"·BW + {hw.decode_step_overhead_s * 1e3:.1f} ms/step; phase overhead {hw.phase_overhead_s} s; other "
        f"{hw.other_fixed_s} s + {hw.other_per_sample_s * 1e3:.1f} ms/trajectory",
        f"offload: {asdict(offload)}",
        "",
        f"{'method':18s} {'PFLOP':>8s} " + "".join(f"{p:>14s}" for p in PARTS)
        + f" {'step s':>8s} {'x PPO':>6s} {'peak dev GB':>11s} {'peak train GB':>13s} {'fits':>5s}",
    ]
    base = preds.get("ppo_n1")
    for k, p in preds.items():
        ratio = p.step_time_s / base.step_time_s if base else float("nan")
        lines.append(
            f"{k:18s} {sum(p.flops.values()) / 1e15:8.1f} " + "".join(f"{p.time_s[q]:14.2f}" for q in PARTS)
            + f" {p.step_time_s:8.2f} {ratio:6.3f} {p.memory['peak_device_gb']:11.1f} "
            f"{p.memory['peak_train_gb']:13.1f} {str(p.fits):>5s}"
        )
    lines.append("")
    first = next(iter(preds.values()))
    lines.append(f"vLLM KV-cache budget per replica: {first.rollout['kv_budget_gb']:.1f} GB "
                 f"({model.kv_bytes_per_token() / 1024:.0f} KiB/token, {w.prompt_len + w.max_resp} tokens/sequence)")
    lines.append("rollout: " + "; ".join(
        f"{k}: {p.rollout['concurrency']} seqs/replica x {p.rollout['waves']:.2f} waves, prefill "
        f"{p.rollout['prefill_s']:.2f}s decode {p.rollout['decode_s']:.2f}s" for k, p in preds.items()))
    lines.append("memory (GB/GPU): " + "; ".join(
        f"{k}: states {', '.join(f'{a}={b:.1f}' for a, b in p.memory['states_gb'].items() if b)}, act(train) "
        f"{p.memory['activations_train_gb']:.1f}, FSDP unsharded(train) "
        f"{p.memory['per_phase_gb']['update_actor']['fsdp_unsharded']:.1f}, vLLM {p.memory['vllm_reserved_gb']:.1f}, "
        f"device peak in {p.memory['peak_device_phase']}, training peak in {p.memory['peak_train_phase']}"
        for k, p in preds.items()))
    return "\n".join(lines)


def _format_recipe(name: str, st: Setting, p: Prediction) -> str:
    w, off = st.workload, st.offload
    lines = [
        f"recipe {name}: {st.method.label} on {st.model.name} (P={st.model.params / 1e9:.3f}B), {w.n_gpus} GPUs, "
        f"{w.prompts_per_step} prompts x n={st.method.n}, prompt <= {w.prompt_len}, response <= {w.max_resp} tokens",
        f"  micro-batches per GPU: actor {w.mb('update_actor')}, pi_old {w.mb('old_log_prob')}, ref {w.mb('ref')}"
        + (f", critic {w.mb('update_critic')} / values {w.mb('values')}" if st.method.critic else "")
        + f"; vLLM fraction {w.gpu_memory_utilization}, TP {w.rollout_tp}, sleeps outside rollout: "
        f"{w.free_cache_engine}",
        "  offload: " + ", ".join(f"{k}={v}" for k, v in asdict(off).items()),
        "",
        f"  {'phase':14s} {'device GB':>9s}  resident (GB per GPU)",
    ]
    for phase, parts in p.memory["per_phase_gb"].items():
        desc = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v)
        lines.append(f"  {phase:14s} {p.memory['device_gb'][phase]:9.1f}  {desc}, runtime "
                     f"{st.hardware.runtime_overhead_gb:.1f}")
    lines += ["", f"  step time (every response at the cap): {p.step_time_s:.1f} s ("
              + ", ".join(f"{q} {p.time_s[q]:.1f}" for q in PARTS if p.time_s[q]) + ")",
              fit_line(name, p, st.hardware)]
    return "\n".join(lines)
