"""`python -m tbrm_verl.main [method=tbrm|ppo|grpo] [key=value ...]`: TBRM, PPO and GRPO through verl's trainer.

With no arguments it trains TBRM on the embedded default (a tiny model and task built locally on first use).
The hardware profile is settled here, before verl is imported: the one passed (`profile=cpu|gpu`) or named by the
recipe; else, for a local run, `profile=cpu` when no GPU is visible (verl then runs on tbrm_verl's CPU platform) and
`profile=gpu` otherwise. A run that joins a Ray cluster (`RAY_ADDRESS`) is never switched by the driver's own
hardware: it keeps the configured profile (gpu), checked against the cluster's GPUs once connected.
"""

from __future__ import annotations

import os
import sys

from tbrm_verl.config import (
    CONFIG_DIR,
    CONFIG_NAME,
    ConfigError,
    check_renamed_overrides,
    primary_config,
    profile_of,
    with_profile,
    with_searchpath,
)


def _select_platform(argv: list[str]) -> None:
    overrides = [a for a in argv if not a.startswith("-")]
    dirs, name = primary_config(argv)
    if profile_of(overrides, name, dirs) == "cpu":
        os.environ["VERL_PLATFORM"] = "cpu"  # read by tbrm_verl's plugin when verl is imported, in every process
        os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TransferQueue defaults to 8 threads and warns on every batch when a machine has fewer physical cores
    import psutil

    os.environ.setdefault("TQ_NUM_THREADS", str(min(8, psutil.cpu_count(logical=False) or 1)))


def _worker_env() -> dict[str, str]:
    keys = ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "VERL_FILE_LOGGER_PATH", "TOKENIZERS_PARALLELISM", "TBRM_VERL_CACHE",
            "TQ_NUM_THREADS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def run(cfg, overrides: list[str] = (), config_name: str = CONFIG_NAME) -> None:
    """Check, finish and train `cfg`; `overrides` and `config_name` are only shown (the config summary)."""
    from omegaconf import OmegaConf, open_dict

    from tbrm_verl import console, report
    from tbrm_verl.config import check_config, check_profile_locally, check_with_verl, finish_config
    from tbrm_verl.tasks.data_check import check_data

    if not (os.environ.get("RAY_ADDRESS") or cfg.ray_kwargs.ray_init.get("address")):
        check_profile_locally(cfg)  # a cluster's hardware is checked by the TaskRunner, once connected
    check_config(cfg)
    cfg = finish_config(cfg)
    OmegaConf.resolve(cfg)
    check_with_verl(cfg)
    check_data(cfg)
    os.environ["VERL_FILE_LOGGER_PATH"] = report.rotate_metrics(cfg.run.dir)
    with open_dict(cfg):  # workers started by an existing Ray cluster (SLURM) do not inherit this shell's env
        ray_init = cfg.ray_kwargs.ray_init
        if os.environ.get("RAY_ADDRESS") or ray_init.get("address"):
            # joining a running cluster: its nodes declared their resources at `ray start`; Ray refuses them here
            for key in ("num_cpus", "num_gpus", "include_dashboard"):
                ray_init.pop(key, None)
        # (DictConfig.setdefault returns a detached plain dict for a new key: assign the nodes instead)
        if ray_init.get("runtime_env") is None:
            ray_init.runtime_env = {}
        if ray_init.runtime_env.get("env_vars") is None:
            ray_init.runtime_env.env_vars = {}
        env_vars = ray_init.runtime_env.env_vars
        for k, v in _worker_env().items():
            if k not in env_vars:
                env_vars[k] = v

    import ray
    from verl.trainer.main_ppo import run_ppo

    from tbrm_verl.trainer import task_runner_class

    config_path = console.write_config(cfg, cfg.run.dir)  # verl's TaskRunner prints it only with print_config=full
    print(f"[tbrm_verl] method={cfg.run.method} task={cfg.run.task} run_dir={cfg.run.dir}", flush=True)
    print("\n".join(console.config_summary(list(overrides), config_name, config_path, cfg.run.print_config)),
          flush=True)
    try:
        run_ppo(cfg, task_runner_class=task_runner_class())
    except KeyboardInterrupt:
        print(
            f"\n[tbrm_verl] interrupted. Checkpoints in {cfg.trainer.default_local_dir} are kept; rerun the same "
            "command to resume from the latest one (trainer.resume_mode=auto).",
            file=sys.stderr,
        )
        raise SystemExit(130)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(report.summarise(cfg.run.dir, cfg.trainer.default_local_dir,
                           cfg.actor_rollout_ref.rollout.response_length), flush=True)


def _config_error(exc: ConfigError) -> SystemExit:
    print(f"tbrm_verl: config error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
    return SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_renamed_overrides(argv)  # before Hydra, which would refuse the key without naming its new spelling
    except ConfigError as exc:
        raise _config_error(exc)
    if not any(a in ("-h", "--help", "--hydra-help") for a in argv):
        dirs, name = primary_config(argv)
        argv = with_profile(argv, name, dirs)
    argv = with_searchpath(argv)
    _select_platform(argv)

    import hydra

    from tbrm_verl.config import register_resolvers

    register_resolvers()

    @hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)
    def _hydra_entry(cfg):
        from hydra.core.hydra_config import HydraConfig

        from tbrm_verl.tasks.reward_guard import user_facing_line

        hydra_cfg = HydraConfig.get()
        try:
            run(cfg, list(hydra_cfg.overrides.task), hydra_cfg.job.config_name)
        except ConfigError as exc:  # raised here, or in the TaskRunner (then wrapped by Ray: keep the cause's line)
            raise _config_error(exc)
        except Exception as exc:
            line = user_facing_line(exc)
            if line is None:
                raise
            print(line, file=sys.stderr)
            raise SystemExit(1)

    sys.argv = [sys.argv[0]] + argv
    _hydra_entry()


if __name__ == "__main__":
    main()
