"""Attention implementation on GPU runs when flash-attn is missing.

verl 0.9.1 loads the actor, reference and critic models with `attn_implementation=flash_attention_2` unless
`<section>.override_config.attn_implementation` says otherwise (verl/workers/config/model.py), and the flash-attn
package is not installed by `pip install -e ".[gpu]"` (PyPI has only its source distribution: README "GPU install").
Without it transformers fails deep inside the worker's model loader. `apply_attn_fallback` (called by
`tbrm_verl.config.finish_config`, before Ray starts) switches those models to PyTorch's `sdpa` instead and says so in
one line. vLLM's rollout does not read these keys and brings its own attention kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from omegaconf import DictConfig, OmegaConf, open_dict

FLASH_ATTN_REQUIREMENT = "flash-attn==2.8.3"
FLASH_ATTN_INSTALL = f"pip install {FLASH_ATTN_REQUIREMENT} --no-build-isolation"
FLASH = "flash_attention_2"
FALLBACK = "sdpa"
# model sections whose override_config verl reads (actor and reference share actor_rollout_ref.model)
MODEL_SECTIONS = ("actor_rollout_ref.model", "critic.model")
# verl's Ulysses sequence parallelism does its all-to-all inside the flash-attention forward only: with sdpa each rank
# would attend within its own shard of the sequence
SP_KEYS = {
    "actor_rollout_ref.model": ("actor_rollout_ref.actor.ulysses_sequence_parallel_size",
                                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
                                "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
                                "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size"),
    "critic.model": ("critic.ulysses_sequence_parallel_size", "critic.fsdp.ulysses_sequence_parallel_size"),
}


def flash_attn_problem() -> str | None:
    """None when `import flash_attn` works; else why not, in a few words."""
    if importlib.util.find_spec("flash_attn") is None:
        return "not installed"
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # a build for another torch/CUDA fails here: undefined symbol, missing libcudart, ...  # noqa: BLE001
        msg = " ".join(str(exc).split())
        msg = msg if len(msg) <= 160 else msg[:157] + "..."
        return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return None


def configured_attn(cfg: DictConfig, section: str) -> str:
    """The attention implementation verl will load `section`'s model with (verl's default: flash_attention_2)."""
    return OmegaConf.select(cfg, f"{section}.override_config.attn_implementation", default=None) or FLASH


def apply_attn_fallback(cfg: DictConfig) -> list[str]:
    """On CUDA runs without an importable flash-attn, set every model section that asks for flash_attention_2 to
    sdpa and print one line; return the sections changed. CPU runs (trainer.device=cpu) are left alone."""
    from tbrm_verl.config import ConfigError

    if OmegaConf.select(cfg, "trainer.device") != "cuda":
        return []
    sections = [s for s in MODEL_SECTIONS if configured_attn(cfg, s) == FLASH]
    if not sections:
        return []
    problem = flash_attn_problem()
    if problem is None:
        return []
    for section in sections:
        if section == "critic.model" and not _critic_used(cfg):
            continue
        for key in SP_KEYS[section]:
            sp = OmegaConf.select(cfg, key, default=None) or 1
            if sp > 1:
                raise ConfigError(
                    f"{key}={sp}: verl's Ulysses sequence parallelism needs flash-attn, which is not importable "
                    f"({problem}); install it ({FLASH_ATTN_INSTALL}) or set {key}=1"
                )
    with open_dict(cfg):
        for section in sections:
            OmegaConf.update(cfg, f"{section}.override_config.attn_implementation", FALLBACK, force_add=True)
    print(f"[tbrm_verl] flash-attn is not importable ({problem}): using attn_implementation={FALLBACK}; "
          f"install it with: {FLASH_ATTN_INSTALL}", file=sys.stderr, flush=True)
    return sections


def _critic_used(cfg: DictConfig) -> bool:
    from verl.trainer.ppo.utils import need_critic

    return bool(need_critic(cfg))


def install_valuehead_loader() -> None:
    """Make verl's critic loader honour the configured attention implementation (every process, via the plugin).

    verl 0.9.1's `load_valuehead_model` passes `attn_implementation="flash_attention_2"` whatever
    critic.model.override_config says. The replacement calls verl's own loader when the config asks for
    flash_attention_2 (unchanged behaviour) and loads the token-classification model with the configured
    implementation otherwise (sdpa after `apply_attn_fallback`). The CPU platform installs its own sdpa loader."""
    import verl.utils.model as verl_model

    original = verl_model.load_valuehead_model
    if getattr(original, "_tbrm_cpu", False) or getattr(original, "_tbrm_attn", False):
        return

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        attn = getattr(model_config, "_attn_implementation", None) or FLASH
        if attn == FLASH:
            return original(local_path, torch_dtype, model_config, trust_remote_code)
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path, torch_dtype=torch_dtype, config=model_config,
            attn_implementation=attn, trust_remote_code=trust_remote_code,
        )

    load_valuehead_model._tbrm_attn = True
    verl_model.load_valuehead_model = load_valuehead_model  # the engine imports it at call time
