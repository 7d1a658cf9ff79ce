"""From a composed tbrm_verl config or a recipe to the cost model's inputs (from_config, recipe_setting), the GPU a
recipe's header states, and the one-line memory-fit verdict."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace

from tbrm_verl.tools.cost_model.predict import Prediction, predict
from tbrm_verl.tools.cost_model.specs import (
    H100,
    PRESETS,
    Hardware,
    MethodSpec,
    ModelSpec,
    Offload,
    Workload,
    qwen2_param_count,
)

# ------------------------------------------------------------------------------------------------ from a config
HF_ARCHITECTURES = ("qwen2", "llama", "mistral")  # decoder layouts qwen2_param_count counts exactly


@dataclass(frozen=True)
class Setting:
    """Everything predict() needs, as read from one composed tbrm_verl config (see from_config)."""

    model: ModelSpec
    workload: Workload
    method: MethodSpec
    hardware: Hardware
    offload: Offload

    def predict(self) -> Prediction:
        return predict(self.model, self.workload, self.method, self.hardware, self.offload)


def model_spec_for(path: str) -> ModelSpec:
    """The ModelSpec of a model path: a local directory's config.json if there is one, else a preset named like the
    path's last component (`Qwen/Qwen2.5-Math-7B` -> qwen2.5-math-7b)."""
    local = os.path.join(os.path.expanduser(str(path)), "config.json")
    if os.path.isfile(local):
        with open(local, encoding="utf-8") as f:
            return model_spec_from_hf_config(json.load(f), name=str(path))
    key = os.path.basename(os.path.normpath(str(path))).lower()
    if key in PRESETS:
        return PRESETS[key]
    raise ValueError(f"model {path}: no config.json there and no preset named {key!r} (presets: "
                     f"{', '.join(sorted(PRESETS))}); point actor_rollout_ref.model.path at a local model directory")


def model_spec_from_hf_config(c: dict, name: str = "hf") -> ModelSpec:
    mt = c.get("model_type")
    if mt not in HF_ARCHITECTURES:
        raise ValueError(f"model {name}: model_type {mt!r} is not modelled (only {', '.join(HF_ARCHITECTURES)})")
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    tied = bool(c.get("tie_word_embeddings", False))
    params = qwen2_param_count(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], heads,
                               kv_heads, head_dim, tied, qkv_bias=mt == "qwen2")
    return ModelSpec(name, params=params, layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                     vocab=c["vocab_size"], num_kv_heads=kv_heads, head_dim=head_dim,
                     intermediate=c["intermediate_size"], tied_embeddings=tied)


def _get(cfg, key: str, default=None):
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key, default=default)
    return default if v is None else v


def _refuse(key: str, value, why: str) -> ValueError:
    return ValueError(f"{key}={value}: {why}")


def from_config(cfg, hw: Hardware = H100, response_len: int | None = None) -> Setting:
    """Translate a composed tbrm_verl config (tbrm_verl.config.compose, or what tbrm_verl.main runs) into the cost
    model's inputs. Every workload number and offload flag is read from the config:

      method, n            run.method (tbrm: TBRM trainer), actor_rollout_ref.rollout.n; reference and critic as verl
                           decides them (verl.trainer.ppo.utils.need_reference_policy / need_critic); π_old pass for
                           PPO/GRPO only (the TBRM trainer skips it)
      lengths, batch       data.max_prompt_length, data.max_response_length (every response at the cap unless
                           `response_len` is given: a memory check must assume the longest), data.train_batch_size,
                           actor.ppo_mini_batch_size, actor.ppo_epochs
      micro-batches        actor.ppo_micro_batch_size_per_gpu, rollout.log_prob_micro_batch_size_per_gpu,
                           ref.log_prob_micro_batch_size_per_gpu, critic.ppo_micro_batch_size_per_gpu,
                           critic.forward_micro_batch_size_per_gpu
      GPUs                 trainer.n_gpus_per_node × trainer.nnodes (FSDP shards over all of them)
      rollout              rollout.name (vllm: gpu_memory_utilization; otherwise no vLLM), tensor_model_parallel_size,
                           max_num_seqs, enable_prefix_caching, free_cache_engine
      offload              actor.fsdp_config.{param,optimizer}_offload, critic.fsdp.{param,optimizer}_offload,
                           ref.fsdp_config.{forward_only,param_offload} (forward_only = FSDP CPU offload in verl
                           0.9.1); fsdp2 `offload_policy` counts as both
      model                actor_rollout_ref.model.path (model_spec_for); enable_gradient_checkpointing

    `hw` is the GPU (memory, throughputs): configs do not name it. Raises ValueError for what the model does not
    cover (dynamic batch sizes, Megatron, FSDP sub-groups)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    ar = "actor_rollout_ref"
    if _get(cfg, f"{ar}.actor.use_dynamic_bsz", False):
        raise _refuse(f"{ar}.actor.use_dynamic_bsz", True, "token-budgeted micro-batches are not modelled; "
                      "estimate with fixed *_micro_batch_size_per_gpu")
    strategy = _get(cfg, f"{ar}.actor.strategy", "fsdp")
    if strategy not in ("fsdp", "fsdp2"):
        raise _refuse(f"{ar}.actor.strategy", strategy, "only FSDP engines are modelled")
    world = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    fsdp_size = int(_get(cfg, f"{ar}.actor.fsdp_config.fsdp_size", -1))
    if fsdp_size not in (-1, world):
        raise _refuse(f"{ar}.actor.fsdp_config.fsdp_size", fsdp_size, f"sharding over fewer than all {world} GPUs "
                      "is not modelled")

    tbrm = _get(cfg, "run.method", None) == "tbrm"
    n = int(_get(cfg, f"{ar}.rollout.n", 1))
    reference, critic = bool(need_reference_policy(cfg)), bool(need_critic(cfg))
    method_name = str(_get(cfg, "run.method", "tbrm" if tbrm else "ppo"))
    key = f"{method_name}_n{n}" + ("_ref_free" if tbrm and not reference else "")
    method = MethodSpec(key, f"{method_name.upper()} n={n}" + (" ref-free" if tbrm and not reference else ""), n,
                        reference=reference, old_log_prob=not tbrm, critic=critic)

    def offload(section: str, engine_key: str, forward_only_counts: bool = False) -> tuple[bool, bool]:
        policy = bool(_get(cfg, f"{section}.{engine_key}.offload_policy", False))
        param = bool(_get(cfg, f"{section}.{engine_key}.param_offload", False)) or policy
        if forward_only_counts:
            param = param or bool(_get(cfg, f"{section}.{engine_key}.forward_only", False))
        opt = bool(_get(cfg, f"{section}.{engine_key}.optimizer_offload", False)) or policy
        return param, opt

    a_par, a_opt = offload(f"{ar}.actor", "fsdp_config")
    c_par, c_opt = offload("critic", "fsdp") if critic else (False, False)
    r_par, _ = offload(f"{ar}.ref", "fsdp_config", forward_only_counts=True)

    rollout = cfg[ar].rollout
    vllm = rollout.name == "vllm"
    max_resp = int(cfg.data.max_response_length)
    sleep = bool(_get(cfg, f"{ar}.rollout.free_cache_engine", True)) and \
        _get(cfg, f"{ar}.rollout.enable_sleep_mode", True) is not False
    w = Workload(
        prompt_len=int(cfg.data.max_prompt_length),
        response_len=int(response_len or max_resp),
        max_response_len=max_resp,
        prompts_per_step=int(cfg.data.train_batch_size),
        n_gpus=world,
        micro_batch_size=int(cfg[ar].actor.ppo_micro_batch_size_per_gpu),
        log_prob_micro_batch_size=_get(cfg, f"{ar}.rollout.log_prob_micro_batch_size_per_gpu"),
        ref_micro_batch_size=_get(cfg, f"{ar}.ref.log_prob_micro_batch_size_per_gpu"),
        critic_micro_batch_size=_get(cfg, "critic.ppo_micro_batch_size_per_gpu") if critic else None,
        critic_forward_micro_batch_size=_get(cfg, "critic.forward_micro_batch_size_per_gpu") if critic else None,
        gpu_memory_utilization=float(rollout.gpu_memory_utilization) if vllm else 0.0,
        ppo_mini_batch_size=int(_get(cfg, f"{ar}.actor.ppo_mini_batch_size", cfg.data.train_batch_size)),
        ppo_epochs=int(_get(cfg, f"{ar}.actor.ppo_epochs", 1)),
        rollout_tp=int(_get(cfg, f"{ar}.rollout.tensor_model_parallel_size", 1)),
        prefix_caching=bool(_get(cfg, f"{ar}.rollout.enable_prefix_caching", True)),
        max_num_seqs=int(_get(cfg, f"{ar}.rollout.max_num_seqs", 256)),
        free_cache_engine=sleep,
        gradient_checkpointing=bool(_get(cfg, f"{ar}.model.enable_gradient_checkpointing", True)),
    )
    return Setting(model=model_spec_for(cfg[ar].model.path), workload=w, method=method, hardware=hw,
                   offload=Offload(a_par, a_opt, c_par, c_opt, r_par))


_STATED_HW = re.compile(r"(\d+)\s*[x×]\s*([A-Za-z][\w-]*)\s+(\d+(?:\.\d+)?)\s*GB")


def stated_hardware(recipe_path) -> tuple[int, str, float] | None:
    """(GPUs per node, GPU name, GB per GPU) from a recipe's header comment, e.g. `# ... 4x H100 80GB, one node`."""
    with open(recipe_path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            hit = _STATED_HW.search(line)
            if hit:
                return int(hit.group(1)), hit.group(2), float(hit.group(3))
    return None


def fit_line(name: str, pred: Prediction, hw: Hardware) -> str:
    """One line: the predicted per-GPU peak of `name` against the GPU's memory."""
    m = pred.memory
    verdict = "fits" if pred.fits else ("EXCEEDS the GPU memory" if not m["fits"] else "vLLM has no room for one "
                                                                                      "sequence's KV cache")
    return (f"{name}: predicted peak {m['peak_device_gb']:.1f} GB per GPU (in {m['peak_device_phase']}) of "
            f"{hw.mem_gb:g} GB ({hw.name}): {verdict}")


# the repository's recipes/ (this file is tbrm_verl/tools/cost_model/recipe.py)
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "recipes")


def recipe_setting(recipe: str, overrides=(), config_dir: str = RECIPES_DIR, hw: Hardware | None = None,
                   response_len: int | None = None) -> tuple[str, Setting]:
    """Compose a recipe as a GPU launch would (profile=gpu unless overridden) and translate it (from_config); the GPU
    memory is the one the recipe's header states unless `hw` is given. Returns (recipe name, Setting)."""
    from tbrm_verl.config import compose

    path = recipe if recipe.endswith(".yaml") else os.path.join(config_dir, recipe + ".yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path}")
    name = os.path.basename(path)[: -len(".yaml")]
    overrides = list(overrides)
    if not any(o.split("=", 1)[0].lstrip("+~") == "profile" for o in overrides):
        overrides.append("profile=gpu")  # what the recipe is for; compose() would pick cpu on a machine without GPU
    cfg = compose(overrides, config_name=name, config_dirs=[os.path.dirname(os.path.abspath(path))])
    if hw is None:
        stated = stated_hardware(path)
        hw = H100 if stated is None else replace(H100, name=f"{stated[1]} {stated[2]:g}GB", mem_gb=stated[2])
    return name, from_config(cfg, hw=hw, response_len=response_len)
