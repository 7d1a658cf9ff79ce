"""verl plugin entry point (`verl.plugins` in setup.py): imported by `import verl` in every process of a run.

Registers, without patching verl files (every verl seam the project uses is listed in tbrm_verl/seams.py):
* the CPU device platform (active only when VERL_PLATFORM=cpu),
* the `cpu_hf` rollout backend (lazily: its module loads only when a run selects it),
* a critic loader that honours the configured attention implementation (tbrm_verl/attn.py),
* the `tbrm` advantage estimator, which writes zeros: TBRM uses no advantage, but verl's metric code reads the
  `advantages`/`returns` fields, and any estimator other than `gae` keeps the critic off.
"""

import sys


def _register_rollout() -> None:
    from importlib import import_module

    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("cpu_hf", lambda: import_module("tbrm_verl.cpu.rollout").CPURolloutReplica)
    # verl 0.9.1 exposes no public registration for the in-worker rollout adapter: this is its registry dict.
    rollout_base._ROLLOUT_REGISTRY[("cpu_hf", "async")] = "tbrm_verl.cpu.rollout.CPUServerAdapter"


def _register_adv_estimator() -> None:
    import torch
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    if "tbrm" in ADV_ESTIMATOR_REGISTRY:
        return

    @register_adv_est("tbrm")
    def tbrm_no_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, **_):
        zeros = torch.zeros_like(token_level_rewards)
        return zeros, zeros


def install() -> None:
    from tbrm_verl.cpu import platform

    platform.install()
    from tbrm_verl.attn import install_valuehead_loader

    install_valuehead_loader()  # verl's critic loader ignores critic.model.override_config.attn_implementation
    _register_rollout()
    _register_adv_estimator()


try:
    install()
except Exception as exc:  # verl swallows plugin errors at debug level: say it loudly instead
    print(f"[tbrm_verl] plugin failed to load: {exc!r}", file=sys.stderr)
    raise
