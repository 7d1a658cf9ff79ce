"""Composing, finishing and checking a tbrm_verl configuration (hydra_configs/tbrm_verl.yaml over verl's ppo_trainer).

`check_config` refuses bad configuration before anything starts, each problem as one line that names the key and
the fix (`ConfigError`). `tbrm_verl.main` prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "hydra_configs"
CONFIG_NAME = "tbrm_verl"
TBRM_KEYS = {"beta", "reference_free", "loss_variant", "loss_scale", "reward_convention", "reuse_window"}
RUN_KEYS = {"dir", "task", "method", "replay_poll_s", "print_config", "progress"}
METHODS = tuple(sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")))  # the method=... choices
# Old spellings (tbrm_verl <= the layout issue) -> the new key; None: removed (derived from run.method)
RENAMED = {"tbrm.run_dir": "run.dir", "tbrm.task": "run.task", "tbrm.method": "run.method",
           "tbrm.replay_poll_s": "run.replay_poll_s", "tbrm.enable": None}


class ConfigError(ValueError):
    """A configuration problem, stated in one line: the key, what is wrong, the fix."""


def renamed_message(key: str) -> str:
    new = RENAMED[key]
    if new is None:
        return (f"{key} was removed: the TBRM trainer runs iff run.method=tbrm, which method=tbrm|ppo|grpo sets; "
                f"drop {key}")
    section, name = new.split(".")
    return (f"{key} was renamed {new}: write {new}=... on the command line, or `{section}: {{{name}: ...}}` in a "
            "config file")


def check_renamed_overrides(overrides: list[str]) -> None:
    """Refuse an old spelling on the command line (Hydra would reject it as an unknown key, without the fix)."""
    for o in overrides:
        if not o.startswith("-") and _override_key(o) in RENAMED:
            raise ConfigError(renamed_message(_override_key(o)))


def is_tbrm(cfg: DictConfig) -> bool:
    """The TBRM trainer and loss are used iff the method is TBRM (PPO/GRPO: verl's own losses)."""
    return OmegaConf.select(cfg, "run.method") == "tbrm"


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value}: use one of {', '.join(map(str, allowed))}")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("tbrm_not"):
        OmegaConf.register_new_resolver("tbrm_not", lambda x: not _as_bool(x))
    if not OmegaConf.has_resolver("tbrm_cpu_slots"):  # logical Ray CPUs a CPU-profile node needs for n ranks
        OmegaConf.register_new_resolver("tbrm_cpu_slots", lambda n: 6 + 3 * int(n))


def _as_bool(x) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("1", "true", "yes")
    return bool(x)


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _override_key(override: str) -> str:
    """`+a.b=1` / `~a.b` / `a.b=1` -> `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def _override_value(overrides: list[str], key: str) -> str | None:
    for o in overrides:
        if "=" in o and _override_key(o) == key:
            return o.split("=", 1)[1]
    return None


def cluster_address(overrides: list[str]) -> str | None:
    """The Ray cluster a run joins (`RAY_ADDRESS` or `ray_kwargs.ray_init.address=...`), None for a local run."""
    addr = _override_value(overrides, "ray_kwargs.ray_init.address") or os.environ.get("RAY_ADDRESS")
    return addr if addr and addr not in ("null", "None", "local") else None


def primary_config(argv: list[str]) -> tuple[list[str], str]:
    """(config dirs, config name) that Hydra will load for `argv` (`--config-dir/-cd`, `--config-name/-cn`)."""
    dirs, name = [], CONFIG_NAME
    flags = {"--config-dir": "dir", "-cd": "dir", "--config-name": "name", "-cn": "name"}
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag not in flags:
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if flags[flag] == "dir":
            dirs.append(value)
        else:
            name = value
    return dirs, name


def _recipe_profile(config_name: str, config_dirs: list[str]) -> str | None:
    """The profile a recipe names in its defaults list (`- override profile: gpu`), if it names one."""
    import yaml

    for d in config_dirs:
        path = Path(d) / f"{config_name}.yaml"
        if path.exists():
            for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
                if isinstance(entry, dict):
                    for k, v in entry.items():
                        if k.split()[-1] == "profile":
                            return str(v)
    return None


def stated_profile(overrides: list[str], config_name: str = CONFIG_NAME, config_dirs: list[str] = ()) -> str | None:
    """`profile=...` on the command line, else the one the recipe names; None when nobody chose."""
    return _override_value(overrides, "profile") or _recipe_profile(config_name, list(config_dirs))


def with_profile(overrides: list[str], config_name: str = CONFIG_NAME, config_dirs: list[str] = ()) -> list[str]:
    """Add `profile=cpu|gpu` from this machine's GPUs, only for a local run whose profile nobody stated.

    A run that joins a Ray cluster keeps the configured profile (gpu unless stated): the driver may sit on a CPU-only
    login or head node, so its own hardware says nothing about the workers'. The check against the cluster's GPUs
    happens once connected (`check_profile_on_cluster`)."""
    if stated_profile(overrides, config_name, config_dirs) or cluster_address(overrides):
        return list(overrides)
    return list(overrides) + ["profile=" + ("gpu" if gpu_available() else "cpu")]


def profile_of(overrides: list[str], config_name: str = CONFIG_NAME, config_dirs: list[str] = ()) -> str:
    """The profile a run will use: stated, else chosen from local GPUs, else the config default (gpu)."""
    chosen = _override_value(with_profile(overrides, config_name, config_dirs), "profile")
    return chosen or stated_profile(overrides, config_name, config_dirs) or "gpu"


def cfg_profile(cfg: DictConfig) -> str:
    return "cpu" if cfg.trainer.device == "cpu" else "gpu"


_PROFILE_FIX = {
    "cpu": "use profile=gpu (or hide the GPUs with CUDA_VISIBLE_DEVICES= to test the CPU path)",
    "gpu": "use profile=cpu, or run where GPUs are (a GPU machine, or a GPU Ray cluster via RAY_ADDRESS)",
}


def check_profile_locally(cfg: DictConfig) -> None:
    """A local run: the driver's hardware is the workers' hardware."""
    profile, has_gpu = cfg_profile(cfg), gpu_available()
    if (profile == "gpu") != has_gpu:
        seen = "a GPU is visible (torch.cuda.is_available())" if has_gpu else "no GPU is visible on this machine"
        raise ConfigError(f"profile={profile}: {seen}; {_PROFILE_FIX[profile]}")


def check_profile_on_cluster(profile: str, nodes: list[dict]) -> None:
    """A run on a Ray cluster: GPUs are visible on it when Ray detected an accelerator on a live node.

    Ray gives a node the resource `accelerator_type:<model>` when it finds real GPUs there; logical GPUs declared
    with `ray start --num-gpus` on CPU nodes (tbrm_verl's CPU profile) have none."""
    live = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    detected = sorted({k.split(":", 1)[1] for n in live for k in (n.get("Resources") or {}) if k.startswith("accelerator_type:")})
    if profile == "gpu" and not detected:
        raise ConfigError(f"profile=gpu: no GPU is visible on the Ray cluster's {len(live)} node(s); {_PROFILE_FIX['gpu']}")
    if profile == "cpu" and detected:
        raise ConfigError(f"profile=cpu: the Ray cluster has GPUs ({', '.join(detected)}); {_PROFILE_FIX['cpu']}")


VERL_CONFIG_SEARCHPATH = "pkg://verl.trainer.config"


def with_searchpath(overrides: list[str], config_dirs: list[str] = ()) -> list[str]:
    """Add `hydra.searchpath=[<config_dirs>, hydra_configs, verl's configs]` unless the caller set one.

    Hydra reads hydra.searchpath from the primary config only and refuses the key in any other config, so it cannot
    live in hydra_configs/tbrm_verl.yaml, which recipes (recipes/*.yaml, primary configs) include by name."""
    if any(_override_key(o) == "hydra.searchpath" for o in overrides):
        return list(overrides)
    dirs = [f"file://{os.path.abspath(d)}" for d in config_dirs] + [f"file://{CONFIG_DIR}", VERL_CONFIG_SEARCHPATH]
    return list(overrides) + ["hydra.searchpath=[" + ",".join(f"'{d}'" for d in dirs) + "]"]  # quoted: any path


def compose(overrides: list[str] = (), config_name: str = CONFIG_NAME, config_dirs: list[str] = ()) -> DictConfig:
    """Compose a config as `python -m tbrm_verl.main` would (for tests, benchmarks and recipes' checks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    check_renamed_overrides(list(overrides))
    overrides = with_searchpath(with_profile(list(overrides), config_name, config_dirs), config_dirs)
    primary = str(CONFIG_DIR)
    for d in config_dirs:
        if (Path(d) / f"{config_name}.yaml").exists():
            primary = os.path.abspath(d)
    with initialize_config_dir(config_dir=primary, version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def is_local_path(p: str) -> bool:
    return "://" not in p or p.startswith("file://")


def as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for the first problem found; return None when the config is usable."""
    from tbrm_verl import console
    from tbrm_verl.loss import choices
    from tbrm_verl.tasks.math.reward import RewardConvention

    t, run = cfg.tbrm, cfg.run
    for section, keys in (("tbrm", TBRM_KEYS), ("run", RUN_KEYS)):
        present = set(cfg.get(section) or {})
        for key in sorted(present):  # an old spelling in a user's config file (the command line is checked earlier)
            if f"{section}.{key}" in RENAMED:
                raise ConfigError(renamed_message(f"{section}.{key}"))
        unknown = sorted(present - keys)
        if unknown:
            raise ConfigError(f"{section}.{unknown[0]}: unknown key in the {section} section; valid keys are "
                              f"{', '.join(sorted(keys))}")
    if OmegaConf.select(cfg, "run.method") not in METHODS:
        raise ConfigError(f"run.method={OmegaConf.select(cfg, 'run.method')}: use one of {', '.join(METHODS)}, "
                          f"selected with method=... (method/*.yaml sets run.method)")
    if (run.method == "tbrm") != (cfg.algorithm.adv_estimator == "tbrm"):  # e.g. run.method=grpo typed for method=
        raise ConfigError(f"run.method={run.method} with algorithm.adv_estimator={cfg.algorithm.adv_estimator}: "
                          f"select the method with method={run.method}, which sets both")
    _choice("run.print_config", run.print_config, console.PRINT_CONFIG_CHOICES)
    _choice("run.progress", run.progress, console.PROGRESS_CHOICES)
    actor = cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    _choice("tbrm.reward_convention", t.reward_convention, get_args(RewardConvention))
    if not OmegaConf.select(cfg, "actor_rollout_ref.model.path"):
        raise ConfigError(
            "actor_rollout_ref.model.path is not set (task=dapo_math has no default model): launch a recipe "
            "(python -m tbrm_verl.main --config-dir recipes --config-name ...) or set actor_rollout_ref.model.path=..."
        )

    reuse = t.get("reuse_window", 0)
    if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 0:
        raise ConfigError(f"tbrm.reuse_window={reuse}: the number of past batches to train on again must be an integer "
                          ">= 0 (0: no reuse)")
    if reuse and not is_tbrm(cfg):
        raise ConfigError(f"tbrm.reuse_window={reuse} with run.method={run.method}: reusing past trajectories is valid "
                          "for TBRM only (PPO and GRPO would need an importance correction); drop tbrm.reuse_window")

    if is_tbrm(cfg):
        if not isinstance(t.beta, (int, float)) or t.beta <= 0:
            raise ConfigError(f"tbrm.beta={t.beta}: β must be > 0 (the target is r/β); the paper uses tbrm.beta=0.002")
        for key in choices():  # the loss config's Literal fields: loss_variant, loss_scale
            _choice(f"tbrm.{key}", t[key], choices(key))
        if float(rollout.temperature) != 1.0:
            raise ConfigError(
                f"actor_rollout_ref.rollout.temperature={rollout.temperature}: TBRM reads the logits as soft "
                "Q-values, which holds at temperature 1 only; set actor_rollout_ref.rollout.temperature=1.0"
            )
        for key in ("actor_rollout_ref.model.use_fused_kernels", "actor_rollout_ref.actor.use_fused_kernels"):
            if t.loss_variant == "brm" and OmegaConf.select(cfg, key):  # tbrm takes V(s_1) from hidden rows
                raise ConfigError(f"{key}=true: fused kernels never build the logits the brm variant needs for V at "
                                  f"every position; set {key}=false or tbrm.loss_variant=tbrm")
        for key in ("actor_rollout_ref.actor.pad_to_length", "actor_rollout_ref.actor.fsdp_config.pad_to_length"):
            if OmegaConf.select(cfg, key):
                raise ConfigError(f"{key}=true: verl's logits hook does not support static padding; set {key}=false")
        if t.reference_free and (actor.use_kl_loss or cfg.algorithm.use_kl_in_reward):
            key = "actor_rollout_ref.actor.use_kl_loss" if actor.use_kl_loss else "algorithm.use_kl_in_reward"
            raise ConfigError(
                f"{key}=true with tbrm.reference_free=true: reference-free TBRM has no reference model for a KL term; "
                f"drop the {key} override or set tbrm.reference_free=false"
            )
        if not t.reference_free and not actor.use_kl_loss:
            raise ConfigError(
                "actor_rollout_ref.actor.use_kl_loss=false: verl builds TBRM's reference model only with this flag "
                "(no KL loss is added); remove the override, or set tbrm.reference_free=true"
            )
        for key in ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
                    "actor_rollout_ref.actor.ulysses_sequence_parallel_size"):  # the second is verl's deprecated spelling
            sp = OmegaConf.select(cfg, key) or 1
            if sp > 1:
                raise ConfigError(f"{key}={sp}: TBRM reads V(s_1) from unsharded logits (no Ulysses); set {key}=1")
        if actor.strategy not in ("fsdp", "fsdp2"):
            raise ConfigError(
                f"actor_rollout_ref.actor.strategy={actor.strategy}: TBRM's loss hooks into verl's FSDP engine only; "
                "set actor_rollout_ref.actor.strategy=fsdp2"
            )
        if cfg.algorithm.use_kl_in_reward:
            raise ConfigError(
                "algorithm.use_kl_in_reward=true: a KL-in-reward penalty needs the old log-probs TBRM never computes "
                "(and TBRM's KL term is already inside δ via π_ref); set algorithm.use_kl_in_reward=false"
            )
        if not OmegaConf.select(cfg, "algorithm.rollout_correction.bypass_mode"):
            raise ConfigError(
                "algorithm.rollout_correction.bypass_mode=false: TBRM has no π_old (no importance ratio), and verl "
                "recomputes old log-probs unless bypassed; set algorithm.rollout_correction.bypass_mode=true"
            )
        for key in ("rollout_is", "rollout_rs"):
            value = OmegaConf.select(cfg, f"algorithm.rollout_correction.{key}")
            if value is not None:
                raise ConfigError(f"algorithm.rollout_correction.{key}={value}: TBRM applies no importance correction "
                                  f"(δ has no ratio; such weights would be ignored); set algorithm.rollout_correction."
                                  f"{key}=null")
        if cfg.critic.enable:
            raise ConfigError("critic.enable=true: TBRM has no critic; set critic.enable=false")

    _check_trainer_mode(cfg)
    _check_micro_batches(cfg)
    for key in ("data.train_files", "data.val_files"):
        for path in as_list(OmegaConf.select(cfg, key)):
            if path != "embedded" and is_local_path(path) and not os.path.exists(os.path.expanduser(path.removeprefix("file://"))):
                raise ConfigError(f"{key}: file not found: {path}; prepare it (python -m tbrm_verl.data ...) or fix the path")
    model = cfg.actor_rollout_ref.model.path
    if model and os.path.sep in str(model) and str(model).startswith(("/", ".", "~")):
        if not os.path.exists(os.path.expanduser(model)):
            raise ConfigError(f"actor_rollout_ref.model.path: directory not found: {model}")


def _check_micro_batches(cfg: DictConfig) -> None:
    """verl's engine splits each rank's share of a mini-batch into micro-batches of exactly this size."""
    actor = cfg.actor_rollout_ref.actor
    if actor.get("use_dynamic_bsz", False):
        return
    world = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
    n = cfg.actor_rollout_ref.rollout.n
    sections = [("actor_rollout_ref.actor", actor)]
    if cfg.critic.get("enable"):
        sections.append(("critic", cfg.critic))
    per_rank_batch = cfg.data.train_batch_size * n // world
    for name in ("actor_rollout_ref.ref", "actor_rollout_ref.rollout"):
        micro = OmegaConf.select(cfg, f"{name}.log_prob_micro_batch_size_per_gpu")
        if micro and per_rank_batch % micro != 0:
            raise ConfigError(
                f"{name}.log_prob_micro_batch_size_per_gpu={micro} must divide each rank's batch (train_batch_size "
                f"{cfg.data.train_batch_size} × rollout.n {n} / {world} ranks = {per_rank_batch}); set a divisor"
            )
    for name, sec in sections:
        micro = sec.get("ppo_micro_batch_size_per_gpu")
        mini = sec.get("ppo_mini_batch_size")
        if not micro or not mini:
            continue
        per_rank = mini * n // world
        if per_rank % micro != 0:
            raise ConfigError(
                f"{name}.ppo_micro_batch_size_per_gpu={micro} must divide each rank's mini-batch "
                f"(ppo_mini_batch_size {mini} × rollout.n {n} / {world} ranks = {per_rank}); set it to a divisor "
                f"of {per_rank}"
            )


def _check_trainer_mode(cfg: DictConfig) -> None:
    """verl's trainer modes; separate_async's requirements, which verl asserts only once the cluster is up."""
    mode = cfg.trainer.v1.trainer_mode
    _choice("trainer.v1.trainer_mode", mode, ("sync", "colocate_async", "separate_async"))
    if mode != "separate_async":
        return
    key = "trainer.v1.trainer_mode=separate_async"
    if cfg_profile(cfg) == "cpu":
        raise ConfigError(f"{key}: it needs standalone rollout GPUs and a non-naive weight-sync backend (nccl, nixl, "
                          "mooncake: none runs on CPU); on profile=cpu use trainer.v1.trainer_mode=colocate_async or sync")
    rollout = cfg.actor_rollout_ref.rollout
    if rollout.checkpoint_engine.backend == "naive":
        raise ConfigError(f"actor_rollout_ref.rollout.checkpoint_engine.backend=naive with {key}: weights go to "
                          "standalone rollout GPUs; set actor_rollout_ref.rollout.checkpoint_engine.backend=nccl")
    for sub in ("nnodes", "n_gpus_per_node"):
        if not rollout[sub] or rollout[sub] <= 0:
            raise ConfigError(f"actor_rollout_ref.rollout.{sub}={rollout[sub]} with {key}: the standalone rollout "
                              f"needs its own GPUs; set actor_rollout_ref.rollout.{sub} >= 1")
    sync_step = cfg.trainer.v1.separate_async.parameter_sync_step
    mini, batch = cfg.actor_rollout_ref.actor.ppo_mini_batch_size, cfg.data.train_batch_size
    if batch != sync_step * mini:
        fix = batch // sync_step if batch % sync_step == 0 else "data.train_batch_size / parameter_sync_step"
        raise ConfigError(f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} with {key}: data.train_batch_size "
                          f"({batch}) must equal trainer.v1.separate_async.parameter_sync_step ({sync_step}) × "
                          f"ppo_mini_batch_size; set ppo_mini_batch_size={fix}")
    reuse = cfg.tbrm.get("reuse_window", 0)
    if reuse and sync_step != 1:
        raise ConfigError(f"tbrm.reuse_window={reuse} with trainer.v1.separate_async.parameter_sync_step={sync_step}: "
                          "reuse mixes whole batches into one update; set parameter_sync_step=1 or drop the reuse")


def check_with_verl(cfg: DictConfig) -> None:
    """verl's own checks and dataclass instantiation, with their errors turned into one line."""
    from hydra.errors import InstantiationException
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    try:
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        for key in ("actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.model",
                    "algorithm"):
            omega_conf_to_dataclass(OmegaConf.select(cfg, key))
        if need_critic(cfg):
            omega_conf_to_dataclass(cfg.critic)
    except (AssertionError, ValueError, TypeError, InstantiationException) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"verl rejected the config: {msg}") from exc


def finish_config(cfg: DictConfig) -> DictConfig:
    """Fill in what composing cannot: the embedded default's built paths; local paths made absolute."""

    def absolute(p):  # against this process's directory: the TaskRunner and workers may run elsewhere (SLURM)
        if not isinstance(p, str) or p in ("", "embedded") or not is_local_path(p) or p.startswith("file://"):
            return p
        return os.path.abspath(os.path.expanduser(p))

    with open_dict(cfg):
        if "embedded" in (cfg.actor_rollout_ref.model.path, cfg.data.train_files, cfg.data.val_files):
            from tbrm_verl.tasks.embedded import ensure_embedded_assets

            assets = ensure_embedded_assets()
            if cfg.actor_rollout_ref.model.path == "embedded":
                cfg.actor_rollout_ref.model.path = assets["model_path"]
            if cfg.data.train_files == "embedded":
                cfg.data.train_files = assets["train_file"]
            if cfg.data.val_files == "embedded":
                cfg.data.val_files = assets["val_file"]
        # relative data files (overrides, a relative $TBRM_DATA_DIR), local models, a reward file: fixed here, once
        for key in ("data.train_files", "data.val_files"):
            v = OmegaConf.select(cfg, key)
            if v is not None:
                OmegaConf.update(cfg, key, absolute(v) if isinstance(v, str) else [absolute(x) for x in v], merge=False)
        for key in ("actor_rollout_ref.model.path", "actor_rollout_ref.model.tokenizer_path", "critic.model.path",
                    "critic.model.tokenizer_path"):
            v = OmegaConf.select(cfg, key)
            if isinstance(v, str) and os.path.exists(os.path.expanduser(v)):  # else a hub name: left as it is
                OmegaConf.update(cfg, key, absolute(v), merge=False)
        if OmegaConf.select(cfg, "reward.custom_reward_function.path"):
            cfg.reward.custom_reward_function.path = absolute(cfg.reward.custom_reward_function.path)
        from tbrm_verl.tasks.reward_guard import guard_config

        guard_config(cfg)
        from tbrm_verl.attn import apply_attn_fallback

        apply_attn_fallback(cfg)  # GPU without flash-attn: sdpa, said in one line
        cfg.run.dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
        cfg.trainer.default_local_dir = os.path.abspath(os.path.expanduser(cfg.trainer.default_local_dir))
    return cfg
