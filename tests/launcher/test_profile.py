"""The hardware profile: chosen from this machine's GPUs only for a local run nobody chose for; stated by recipes;
never switched by the driver's hardware on a cluster; refused in one line when it does not match the hardware."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tbrm_verl import config as C

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("has_gpu, expected", [(False, "cpu"), (True, "gpu")])
def test_local_run_without_a_stated_profile_follows_the_gpus(monkeypatch, no_cluster, has_gpu, expected):
    monkeypatch.setattr(C, "gpu_available", lambda: has_gpu)
    assert C.with_profile(["tbrm.beta=0.1"]) == ["tbrm.beta=0.1", f"profile={expected}"]
    assert C.profile_of([]) == expected


def test_a_stated_profile_is_kept(monkeypatch, no_cluster):
    monkeypatch.setattr(C, "gpu_available", lambda: False)
    assert C.with_profile(["profile=gpu"]) == ["profile=gpu"]
    assert C.profile_of(["+x=1", "profile=gpu"]) == "gpu"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_states_gpu_and_keeps_it_on_a_cpu_driver(monkeypatch, no_cluster, name):
    monkeypatch.setattr(C, "gpu_available", lambda: False)
    assert C.stated_profile([], name, [str(RECIPES)]) == "gpu"
    assert C.with_profile([], name, [str(RECIPES)]) == []  # nothing appended: the recipe's gpu stands
    assert C.profile_of([], name, [str(RECIPES)]) == "gpu"
    cfg = C.compose([], config_name=name, config_dirs=[str(RECIPES)])
    assert cfg.actor_rollout_ref.rollout.name == "vllm" and cfg.trainer.device == "cuda"


@pytest.mark.parametrize("how", ["env", "override"])
def test_a_cluster_run_is_not_switched_by_the_drivers_hardware(monkeypatch, how):
    monkeypatch.setattr(C, "gpu_available", lambda: False)
    overrides = []
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        overrides = ["ray_kwargs.ray_init.address=10.0.0.1:6379"]
    assert C.with_profile(overrides) == overrides
    assert C.profile_of(overrides) == "gpu"  # the configured default, checked against the cluster later


@pytest.mark.parametrize(
    "argv, dirs, name",
    [
        ([], [], C.CONFIG_NAME),
        (["--config-dir", "recipes", "--config-name", "r1", "a=1"], ["recipes"], "r1"),
        (["--config-dir=recipes", "--config-name=r2"], ["recipes"], "r2"),
        (["-cd", "d", "-cn", "r3"], ["d"], "r3"),
    ],
)
def test_primary_config_from_argv(argv, dirs, name):
    assert C.primary_config(argv) == (dirs, name)


@pytest.mark.parametrize("profile, has_gpu, ok", [("cpu", False, True), ("gpu", True, True), ("cpu", True, False),
                                                  ("gpu", False, False)])
def test_local_mismatch_is_one_line(monkeypatch, profile, has_gpu, ok):
    monkeypatch.setattr(C, "gpu_available", lambda: has_gpu)
    cfg = C.compose([f"profile={profile}"])
    if ok:
        C.check_profile_locally(cfg)
        return
    with pytest.raises(C.ConfigError) as err:
        C.check_profile_locally(cfg)
    msg = str(err.value)
    assert msg.startswith(f"profile={profile}:") and "\n" not in msg
    assert ("use profile=gpu" if profile == "cpu" else "use profile=cpu") in msg


def _node(alive=True, **resources):
    return {"Alive": alive, "Resources": {"CPU": 8.0, **resources}}


@pytest.mark.parametrize(
    "profile, nodes, refused",
    [
        ("gpu", [_node(GPU=8.0, **{"accelerator_type:H100": 1.0}), _node(CPU=4.0)], False),  # CPU head, GPU worker
        ("gpu", [_node(GPU=1.0)], True),  # logical GPUs only (a CPU-profile cluster)
        ("gpu", [_node(), _node(alive=False, GPU=8.0, **{"accelerator_type:H100": 1.0})], True),  # GPU node is dead
        ("cpu", [_node(GPU=1.0)], False),
        ("cpu", [_node(), _node(GPU=4.0, **{"accelerator_type:A100": 1.0})], True),
    ],
)
def test_cluster_mismatch(profile, nodes, refused):
    if not refused:
        C.check_profile_on_cluster(profile, nodes)
        return
    with pytest.raises(C.ConfigError) as err:
        C.check_profile_on_cluster(profile, nodes)
    assert str(err.value).startswith(f"profile={profile}:") and "\n" not in str(err.value)


def test_cli_with_a_cluster_address_prints_a_gpu_config_on_a_cpu_machine(tmp_path):
    """Checked from outside: `RAY_ADDRESS=... python -m tbrm_verl.main --config-dir recipes --config-name R --cfg job`
    on a machine without a GPU prints the recipe's GPU config (vLLM, FSDP2), not the CPU profile."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:6379", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tbrm_verl.main", "--config-dir", str(RECIPES), "--config-name",
         "qwen2.5-math-7b_ppo_n1", "--cfg", "job"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(proc.stdout)  # Hydra's --cfg job prints the composed config as YAML
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    assert cfg.trainer.device == "cuda"
    for key in ("actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy", "critic.strategy",
                "actor_rollout_ref.actor.fsdp_config.strategy", "critic.fsdp.strategy"):
        assert OmegaConf.select(cfg, key) == "fsdp2", key
