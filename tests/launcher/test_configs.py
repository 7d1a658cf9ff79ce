"""Every shipped configuration composes and instantiates verl's config dataclasses; every bad one is refused with
one line that names the key."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass

from tbrm_verl.config import RENAMED, ConfigError, check_config, check_with_verl, compose, finish_config


def _compose(*overrides):
    return compose(["profile=cpu", *overrides])


@pytest.mark.parametrize(
    "overrides, ref, critic, n, estimator",
    [
        ([], True, False, 4, "tbrm"),  # embedded task tuning: n=4
        (["tbrm.reference_free=true"], False, False, 4, "tbrm"),
        (["method=ppo"], True, True, 1, "gae"),
        (["method=grpo"], True, False, 4, "grpo"),
        (["task=embedded", "actor_rollout_ref.rollout.n=1"], True, False, 1, "tbrm"),
    ],
)
def test_configs_compose_and_instantiate(overrides, ref, critic, n, estimator):
    cfg = _compose(*overrides)
    check_config(cfg)
    cfg = finish_config(cfg)  # builds (or reuses) the embedded model: the critic's config loads it
    OmegaConf.resolve(cfg)
    assert need_reference_policy(cfg) is ref
    assert need_critic(cfg) is critic
    assert cfg.actor_rollout_ref.rollout.n == n
    assert cfg.algorithm.adv_estimator == estimator
    for key in ("actor_rollout_ref.actor", "actor_rollout_ref.rollout", "algorithm"):
        omega_conf_to_dataclass(OmegaConf.select(cfg, key))
    if critic:
        omega_conf_to_dataclass(cfg.critic)
    check_with_verl(cfg)  # verl's own batch-size rules (mini/micro-batch divisibility) for the embedded task


def test_paper_hyperparameters_on_gpu_profile():
    """Without the embedded task's tuning (task_method), the methods carry the paper's values (docs/paper.md §2)."""
    from hydra import compose as hc
    from hydra import initialize_config_dir

    from tbrm_verl.config import CONFIG_DIR, register_resolvers, with_searchpath

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        # task_method is optional: a task without tuning files gets the method's own (paper) values
        cfgs = {m: hc("tbrm_verl", overrides=with_searchpath([f"method={m}", "profile=gpu", "task=embedded",
                                                              "~task_method"]))
                for m in ("tbrm", "ppo", "grpo")}
    t, p, g = cfgs["tbrm"], cfgs["ppo"], cfgs["grpo"]
    assert t.tbrm.beta == 0.002 and t.actor_rollout_ref.actor.optim.lr == 2.5e-6 and t.actor_rollout_ref.rollout.n == 1
    assert t.actor_rollout_ref.actor.ppo_epochs == 1
    assert t.actor_rollout_ref.actor.ppo_mini_batch_size == t.data.train_batch_size
    assert p.actor_rollout_ref.actor.optim.lr == 1e-6 and p.critic.optim.lr == 1e-5
    assert p.actor_rollout_ref.actor.kl_loss_coef == 0.001 and p.actor_rollout_ref.actor.entropy_coeff == 0.001
    assert p.actor_rollout_ref.actor.clip_ratio == 0.2 and p.actor_rollout_ref.rollout.n == 1
    assert g.actor_rollout_ref.rollout.n == 4 and g.actor_rollout_ref.actor.kl_loss_coef == 0.001
    assert g.actor_rollout_ref.actor.optim.lr == 1e-6 and g.actor_rollout_ref.actor.clip_ratio == 0.2
    assert t.actor_rollout_ref.rollout.name == "vllm"


BAD = [
    (["tbrm.beta=0"], "tbrm.beta"),
    (["tbrm.beta=-0.1"], "tbrm.beta"),
    (["actor_rollout_ref.rollout.temperature=0.7"], "actor_rollout_ref.rollout.temperature"),
    (["tbrm.loss_variant=brm", "actor_rollout_ref.model.use_fused_kernels=true"], "use_fused_kernels"),
    (["actor_rollout_ref.actor.pad_to_length=true"], "pad_to_length"),
    (["tbrm.reference_free=true", "actor_rollout_ref.actor.use_kl_loss=true"], "use_kl_loss"),
    (["tbrm.reference_free=true", "algorithm.use_kl_in_reward=true"], "use_kl_in_reward"),
    (["+tbrm.betta=0.1"], "tbrm.betta"),
    (["data.train_files=/no/such/train.parquet"], "data.train_files"),
    (["data.val_files=/no/such/val.parquet"], "data.val_files"),
    (["tbrm.loss_variant=pairwise"], "tbrm.loss_variant"),
    (["tbrm.reward_convention=percent"], "tbrm.reward_convention"),
    (["method=ppo", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64"], "ppo_micro_batch_size_per_gpu=64"),
    # would otherwise fail late: in the loss, in a device-mesh assertion, or after a whole rollout
    (["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"],
     "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"),
    (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"], "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"),
    (["algorithm.use_kl_in_reward=true"], "algorithm.use_kl_in_reward=true"),
    (["algorithm.rollout_correction.bypass_mode=false"], "algorithm.rollout_correction.bypass_mode=false"),
    (["actor_rollout_ref.actor.strategy=megatron"], "actor_rollout_ref.actor.strategy=megatron"),
    (["tbrm.loss_scale=beta"], "tbrm.loss_scale=beta"),
    (["run.progress=fancy"], "run.progress=fancy"),
    (["run.print_config=all"], "run.print_config=all"),
    (["+run.verbose=true"], "run.verbose"),
    (["run.method=grpo"], "run.method=grpo"),  # the name alone, without method=grpo's settings
    (["trainer.v1.trainer_mode=separate_async"], "trainer.v1.trainer_mode=separate_async"),
    (["tbrm.reuse_window=-1"], "tbrm.reuse_window=-1"),
    (["tbrm.reuse_window=1.5"], "tbrm.reuse_window=1.5"),
    (["method=grpo", "tbrm.reuse_window=2"], "tbrm.reuse_window=2 with run.method=grpo"),
    (["method=ppo", "tbrm.reuse_window=1", "algorithm.use_kl_in_reward=true"], "tbrm.reuse_window=1 with run.method=ppo"),
]


@pytest.mark.parametrize("extra", [[], ["tbrm.reference_free=true"], ["trainer.v1.trainer_mode=colocate_async"]])
def test_reuse_is_accepted_for_tbrm(extra):
    cfg = _compose("tbrm.reuse_window=2", *extra)
    check_config(cfg)  # raises ConfigError if refused
    assert cfg.tbrm.reuse_window == 2


@pytest.mark.parametrize("method", ["tbrm", "ppo", "grpo"])
def test_colocate_async_is_accepted_for_every_method(method):
    cfg = _compose(f"method={method}", "trainer.v1.trainer_mode=colocate_async")
    check_config(cfg)  # raises ConfigError if refused
    assert cfg.trainer.v1.trainer_mode == "colocate_async"


@pytest.mark.parametrize("overrides, key", BAD)
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert key in msg


@pytest.mark.parametrize("overrides, key", [BAD[0], BAD[8], BAD[13]])
def test_cli_prints_one_line_and_exits_2(overrides, key, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tbrm_verl.main", *overrides, f"run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tbrm_verl: config error:")]
    assert len(errors) == 1 and key in errors[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------- old spellings (before the run: section)

OLD = [("tbrm.run_dir", "/tmp/x", "run.dir"), ("tbrm.task", "mine", "run.task"),
       ("tbrm.method", "grpo", "run.method"), ("tbrm.replay_poll_s", "0.5", "run.replay_poll_s"),
       ("tbrm.enable", "false", None)]


def test_old_spellings_are_all_listed():
    assert {old: new for old, _, new in OLD} == RENAMED


@pytest.mark.parametrize("old, value, new", OLD)
@pytest.mark.parametrize("prefix", ["", "+"])
def test_old_spelling_on_the_command_line_names_the_new_one(old, value, new, prefix):
    with pytest.raises(ConfigError) as err:
        _compose(f"{prefix}{old}={value}")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{old} was ")
    assert f"renamed {new}:" in msg if new else "removed" in msg and "run.method=tbrm" in msg


@pytest.mark.parametrize("old, value, new", OLD)
def test_old_spelling_in_a_users_config_file_names_the_new_one(old, value, new, tmp_path):
    section, key = old.split(".")
    (tmp_path / "mine.yaml").write_text(f"defaults:\n  - tbrm_verl\n  - _self_\n{section}:\n  {key}: {value}\n")
    cfg = compose(["profile=cpu"], config_name="mine", config_dirs=[str(tmp_path)])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value).startswith(f"{old} was ") and (new is None or f"renamed {new}:" in str(err.value))


def test_cli_old_spelling_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tbrm_verl.main", f"tbrm.run_dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "tbrm_verl: config error: tbrm.run_dir was renamed run.dir: write run.dir=... on the command line, or "
        "`run: {dir: ...}` in a config file"]
    assert not (tmp_path / "run").exists()


def test_beta_is_set_once_and_derived_keys_follow_the_method():
    """β comes from the base file (the embedded task's tuning overrides it); run.method alone selects the trainer."""
    import yaml

    from tbrm_verl.config import CONFIG_DIR, is_tbrm

    def sets_beta(path):
        return "beta" in ((yaml.safe_load(path.read_text()) or {}).get("tbrm") or {})

    assert [p.relative_to(CONFIG_DIR).as_posix() for p in sorted(CONFIG_DIR.rglob("*.yaml")) if sets_beta(p)] == [
        "task_method/embedded_tbrm.yaml", "tbrm_verl.yaml"]
    for method in ("tbrm", "ppo", "grpo"):
        cfg = _compose(f"method={method}")
        assert cfg.run.method == method and is_tbrm(cfg) is (method == "tbrm") and "enable" not in cfg.tbrm
        assert cfg.trainer.experiment_name == f"embedded_arith_{method}"
