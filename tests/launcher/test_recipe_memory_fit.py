"""Every recipe in recipes/*.yaml fits the GPUs its header states, as predicted by tbrm_verl.tools.cost_model from the
composed config (cost_model.from_config), and the check can fail.

The GPU memory limit is read here from each recipe's header (`4x H100 80GB`; 80 GB when a header names none); the
translation config -> cost-model inputs is checked key by key against the composed config; the 7B PPO peak is checked
against a hand-written sum of what verl 0.9.1 keeps on a GPU during rollout.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tbrm_verl.config import compose
from tbrm_verl.tools import cost_model as cm

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
DEFAULT_GB = 80.0  # H100 80GB unless the recipe says otherwise
PPO_7B = "qwen2.5-math-7b_ppo_n1"
QWEN25_7B_PARAMS = 7_615_616_512  # published parameter count of Qwen2.5-7B (the Math variant shares it)


def _compose(name: str, overrides=()):
    return compose([*overrides, "profile=gpu"], config_name=name, config_dirs=[str(RECIPES)])


def _stated(name: str) -> tuple[int | None, float]:
    """(GPUs per node, GB per GPU) written in the recipe's header comment."""
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    header = " ".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    hit = re.search(r"(\d+)x \w+ (\d+)GB", header)
    return (int(hit.group(1)), float(hit.group(2))) if hit else (None, DEFAULT_GB)


def _predict(name: str, overrides=()):
    cfg = _compose(name, overrides)
    _, gb = _stated(name)
    st = cm.from_config(cfg, hw=replace(cm.H100, mem_gb=gb))
    return cfg, st, st.predict(), gb


def test_every_recipe_is_covered():
    assert len(NAMES) >= 10 and PPO_7B in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_recipe_fits_its_gpus(name):
    cfg, st, p, gb = _predict(name)
    gpus, _ = _stated(name)
    if gpus is not None:
        assert cfg.trainer.n_gpus_per_node == gpus, f"{name}: header says {gpus} GPUs per node"
    _check_translation(cfg, st)
    peak = p.memory["peak_device_gb"]
    assert p.fits and peak <= gb, (
        f"{name}: predicted peak {peak:.1f} GB per GPU (in {p.memory['peak_device_phase']}) exceeds the {gb:g} GB of "
        f"its GPUs; per phase: {p.memory['device_gb']} (python -m tbrm_verl.cost_model --recipe {name})"
    )


def _check_translation(cfg, st: cm.Setting) -> None:
    """from_config read every input from the composed config (keys spelled out here, values read from cfg)."""
    sel = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    w, m, off = st.workload, st.method, st.offload
    assert w.prompts_per_step == sel("data.train_batch_size")
    assert w.prompt_len == sel("data.max_prompt_length") and w.max_resp == sel("data.max_response_length")
    assert w.n_gpus == sel("trainer.n_gpus_per_node") * sel("trainer.nnodes")
    assert w.mb("update_actor") == sel("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu")
    assert w.mb("old_log_prob") == sel("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu")
    assert w.mb("ref") == sel("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu")
    assert w.ppo_mini_batch_size == sel("actor_rollout_ref.actor.ppo_mini_batch_size")
    assert w.ppo_epochs == sel("actor_rollout_ref.actor.ppo_epochs")
    assert sel("actor_rollout_ref.rollout.name") == "vllm"
    assert w.gpu_memory_utilization == sel("actor_rollout_ref.rollout.gpu_memory_utilization")
    assert w.rollout_tp == sel("actor_rollout_ref.rollout.tensor_model_parallel_size")
    assert w.free_cache_engine == sel("actor_rollout_ref.rollout.free_cache_engine")
    assert m.n == sel("actor_rollout_ref.rollout.n")
    is_tbrm = sel("run.method") == "tbrm"
    assert m.old_log_prob is (not is_tbrm)
    assert m.reference is bool(sel("actor_rollout_ref.actor.use_kl_loss") or sel("algorithm.use_kl_in_reward"))
    assert m.critic is bool(sel("critic.enable"))
    if m.critic:
        assert w.mb("update_critic") == sel("critic.ppo_micro_batch_size_per_gpu")
        assert w.mb("values") == sel("critic.forward_micro_batch_size_per_gpu")
        assert off.critic_param is bool(sel("critic.fsdp.param_offload"))
        assert off.critic_optimizer is bool(sel("critic.fsdp.optimizer_offload"))
    assert off.actor_param is bool(sel("actor_rollout_ref.actor.fsdp_config.param_offload"))
    assert off.actor_optimizer is bool(sel("actor_rollout_ref.actor.fsdp_config.optimizer_offload"))
    assert off.ref_param is bool(sel("actor_rollout_ref.ref.fsdp_config.forward_only"))
    model_path = sel("actor_rollout_ref.model.path")
    assert st.model is cm.PRESETS[model_path.split("/")[-1].lower()]


def test_7b_ppo_rollout_peak_is_the_sum_of_what_stays_on_the_gpu():
    """verl 0.9.1 during rollout, per GPU: the actor's fp32 params + Adam m, v (12 bytes/param; grads are freed after
    each update), the critic's fp32 params (its Adam state is on the host), vLLM's fraction of the device, vLLM's and
    the trainer's fixed overheads; the reference lives on the host (forward_only)."""
    _, st, p, gb = _predict(PPO_7B)
    hw, G, P = st.hardware, 4, QWEN25_7B_PARAMS
    gen = 12 * P / G + 4 * P / G + 0.4 * gb * 1e9 + (hw.vllm_resident_gb + hw.runtime_overhead_gb) * 1e9
    assert p.memory["device_gb"]["gen"] == pytest.approx(gen / 1e9)
    _, _, p_no_offload, _ = _predict(PPO_7B, ["critic.fsdp.optimizer_offload=false"])
    assert p_no_offload.memory["device_gb"]["gen"] == pytest.approx((gen + 8 * P / G) / 1e9)


@pytest.mark.parametrize("name, overrides", [
    (PPO_7B, ["critic.fsdp.optimizer_offload=false"]),  # the recipe without its offload
    ("qwen2.5-math-7b_tbrm_n1", ["actor_rollout_ref.rollout.gpu_memory_utilization=0.9"]),
])
def test_the_check_fails_when_a_recipe_does_not_fit(name, overrides):
    _, st, p, gb = _predict(name, overrides)
    assert not p.fits and p.memory["peak_device_gb"] > gb
    line = cm.fit_line(name, p, st.hardware)
    assert name in line and f"{p.memory['peak_device_gb']:.1f} GB" in line and f"of {gb:g} GB" in line
    assert "EXCEEDS" in line


def test_cli_checks_a_recipe(capsys):
    assert cm.main(["--recipe", PPO_7B]) == 0  # in process: composing is the slow part
    out = capsys.readouterr().out
    assert f"{PPO_7B}: predicted peak" in out and out.splitlines()[-1].endswith(": fits")
    assert "critic_optimizer=True" in out
    # the command a user runs, with the exit status a script can test
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.cost_model", "--recipe", PPO_7B,
                        "critic.fsdp.optimizer_offload=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "EXCEEDS" in r.stdout and "of 80 GB" in r.stdout


def test_the_critic_offload_key_is_verls():
    """verl 0.9.1 keeps the critic's FSDP settings under critic.fsdp; critic.model has no fsdp_config."""
    cfg = _compose(PPO_7B)
    assert cfg.critic.fsdp.optimizer_offload is True
    with pytest.raises(Exception, match="fsdp_config"):
        _compose(PPO_7B, ["critic.model.fsdp_config.optimizer_offload=true"])
    assert "critic.model.fsdp_config" not in (RECIPES / "README.md").read_text()
