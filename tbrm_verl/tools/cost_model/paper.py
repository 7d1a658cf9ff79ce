"""The paper's setting (7B, 4×H100) and its reported ratios, and the model's prediction beside them."""

from __future__ import annotations

import sys

from tbrm_verl.tools.cost_model.predict import Prediction, predict_all, ratios_vs
from tbrm_verl.tools.cost_model.report import _format_table, _setting_dict
from tbrm_verl.tools.cost_model.specs import H100, PRESETS, Hardware, ModelSpec, Offload, Workload

# ----------------------------------------------------------------------------------------------- paper compare
# Paper (arXiv 2505.15311), 7B, 4×H100, 128 prompts, response 2048, micro-batch 1, vLLM memory fraction 0.4.
PAPER_RATIOS = {
    "tbrm_n1_mem_saving_vs_ppo_n1": 0.333,  # 33.3% less peak GPU memory
    "ppo_n1_over_tbrm_n1_time": 1.3,  # TBRM n=1 1.3× faster per step than PPO n=1
    "grpo_n4_over_tbrm_n1_time": 3.1,  # TBRM n=1 3.1× faster than GRPO n=4
    "grpo_n4_over_tbrm_n4_time": 1.0,  # TBRM n=4 ≈ GRPO n=4
}


def paper_setting(prompt_len: int = 160, response_len: int = 2048, **kw) -> tuple[ModelSpec, Workload]:
    w = Workload(
        prompt_len=prompt_len, response_len=response_len, prompts_per_step=128, n_gpus=4, micro_batch_size=1,
        gpu_memory_utilization=0.4, **kw,
    )
    return PRESETS["qwen2.5-math-7b"], w


def _paper_metrics(preds: dict[str, Prediction]) -> dict[str, dict]:
    t = {k: p.step_time_s for k, p in preds.items()}
    out = {
        "tbrm_n1_mem_saving_vs_ppo_n1 (device peak)": (
            1 - preds["tbrm_n1"].memory["peak_device_gb"] / preds["ppo_n1"].memory["peak_device_gb"],
            PAPER_RATIOS["tbrm_n1_mem_saving_vs_ppo_n1"],
        ),
        "tbrm_n1_mem_saving_vs_ppo_n1 (training-engine peak)": (
            1 - preds["tbrm_n1"].memory["peak_train_gb"] / preds["ppo_n1"].memory["peak_train_gb"],
            PAPER_RATIOS["tbrm_n1_mem_saving_vs_ppo_n1"],
        ),
        "ppo_n1_over_tbrm_n1_time": (t["ppo_n1"] / t["tbrm_n1"], PAPER_RATIOS["ppo_n1_over_tbrm_n1_time"]),
        "grpo_n4_over_tbrm_n1_time": (t["grpo_n4"] / t["tbrm_n1"], PAPER_RATIOS["grpo_n4_over_tbrm_n1_time"]),
        "grpo_n4_over_tbrm_n4_time": (t["grpo_n4"] / t["tbrm_n4"], PAPER_RATIOS["grpo_n4_over_tbrm_n4_time"]),
    }
    return {k: {"predicted": p, "paper": q, "difference": p - q} for k, (p, q) in out.items()}


def compare_with_paper(
    hw: Hardware = H100, offload: Offload = Offload(), file=None, **workload_kw
) -> dict:
    file = file or sys.stdout
    model, w = paper_setting(**workload_kw)
    preds = predict_all(model, w, hw, offload)
    print(_format_table(model, w, hw, offload, preds), file=file)
    cmp = _paper_metrics(preds)
    print("\nPaper comparison (7B, 4×H100, 128 prompts, micro-batch 1, vLLM fraction 0.4):", file=file)
    print(f"  {'quantity':55s} {'predicted':>10s} {'paper':>8s} {'diff':>8s}", file=file)
    for k, v in cmp.items():
        print(f"  {k:55s} {v['predicted']:10.3f} {v['paper']:8.3f} {v['difference']:+8.3f}", file=file)
    return {"setting": _setting_dict(model, w, hw, offload), "predictions": {k: p.to_dict() for k, p in preds.items()},
            "ratios_vs_ppo_n1": ratios_vs(preds), "paper_comparison": cmp}
