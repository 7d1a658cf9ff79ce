"""Analytic per-step cost model for TBRM vs PPO vs GRPO in verl (FLOPs, time split like `timing_s/*`, peak memory).

What a step costs, per method (N = prompts_per_step · n trajectories, T = prompt_len + response_len tokens each):

    phase            FLOPs (model FLOPs)                  who runs it
    gen              2·P·(prefill tokens + N·response)    all (vLLM; decode is modelled as memory-bound)
    ref              2·P·N·T                              all but reference-free TBRM
    old_log_prob     2·P·N·T                              PPO, GRPO (TBRM has no π_old)
    values           2·P·N·T                              PPO (critic = same size as the actor)
    update_critic    6·P·N·T·ppo_epochs                   PPO
    update_actor     6·P·N·T·ppo_epochs                   all
    other            fixed + per-sample + weight sync     all (reward, advantage, vLLM wake/sleep, resharding)

FLOPs are converted to time with a stated MFU per phase and the hardware peak; decode time is computed step by
step from the bytes a decode step moves (weights + KV cache of the running batch) at a stated fraction of the
memory bandwidth. Peak memory per GPU is the maximum over phases of what is resident in that phase (FSDP-sharded
fp32 actor/critic states, bf16 reference, activations of one micro-batch, FSDP unsharded buffers, vLLM's reserved
fraction while it is awake). Every constant is a field of `Hardware` / `Workload` / `Offload`; see
docs/cost_model.md for the equations, the assumptions and the comparison with the paper.

CLI: `python -m tbrm_verl.cost_model --help` (default action: the paper's 7B / 4×H100 setting vs the paper's ratios).

Modules: specs (inputs, presets), formulas (FLOPs, time, memory per phase), predict (per method), recipe (from a
composed config or a recipe file, memory-fit verdict), paper and bench_compare (predictions beside the paper's and a
benchmark's numbers), report (tables), cli. This package's namespace is their public API.
"""

from tbrm_verl.tools.cost_model.bench_compare import compare_with_bench
from tbrm_verl.tools.cost_model.cli import main
from tbrm_verl.tools.cost_model.formulas import phase_flops
from tbrm_verl.tools.cost_model.paper import PAPER_RATIOS, compare_with_paper, paper_setting
from tbrm_verl.tools.cost_model.predict import Prediction, predict, predict_all, ratios_vs
from tbrm_verl.tools.cost_model.recipe import (
    HF_ARCHITECTURES,
    RECIPES_DIR,
    Setting,
    fit_line,
    from_config,
    model_spec_for,
    model_spec_from_hf_config,
    recipe_setting,
    stated_hardware,
)
from tbrm_verl.tools.cost_model.specs import (
    GB,
    H100,
    METHODS,
    PARTS,
    PRESETS,
    TRAIN_PHASES,
    Hardware,
    MethodSpec,
    ModelSpec,
    Offload,
    Workload,
    cpu_hardware,
    qwen2_param_count,
)

__all__ = [
    "ModelSpec",
    "Workload",
    "Hardware",
    "Offload",
    "MethodSpec",
    "Prediction",
    "PRESETS",
    "METHODS",
    "H100",
    "PAPER_RATIOS",
    "PARTS",
    "qwen2_param_count",
    "cpu_hardware",
    "phase_flops",
    "predict",
    "predict_all",
    "ratios_vs",
    "paper_setting",
    "Setting",
    "model_spec_for",
    "from_config",
    "stated_hardware",
    "fit_line",
    "compare_with_paper",
    "compare_with_bench",
    "main",
    "GB",
    "TRAIN_PHASES",
    "HF_ARCHITECTURES",
    "RECIPES_DIR",
    "model_spec_from_hf_config",
    "recipe_setting",
]
