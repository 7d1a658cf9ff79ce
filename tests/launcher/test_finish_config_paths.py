"""finish_config makes every local path absolute before Ray starts: verl's TaskRunner and workers may run on another
node (slurm/tbrm.sbatch), in Ray's working directory and with another environment, so a relative path, or one built
from $TBRM_DATA_DIR at resolution time, would point elsewhere there."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from tbrm_verl.config import compose, finish_config

EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")


def test_relative_data_dir_model_and_reward_become_absolute(tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    (launch / "models" / "tiny").mkdir(parents=True)
    (launch / "my_reward.py").write_text("def compute_score(*a, **k):\n    return 0.0\n")
    monkeypatch.chdir(launch)
    monkeypatch.setenv("TBRM_DATA_DIR", "mydata")  # relative, as `export TBRM_DATA_DIR=data` would be
    cfg = compose(["profile=cpu", "task=dapo_math", "method=ppo", "actor_rollout_ref.model.path=models/tiny",
                   "reward.custom_reward_function.path=my_reward.py", "run.dir=runs/x"])
    cfg = finish_config(cfg)

    # elsewhere (another node): another directory, another environment; the paths must not move
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TBRM_DATA_DIR", "/somewhere/else")
    OmegaConf.resolve(cfg)
    data = launch / "mydata"
    assert cfg.data.train_files == str(data / "dapo_math_train.parquet")
    assert list(cfg.data.val_files) == [str(data / f"{s}.parquet") for s in EVAL_SETS]
    assert cfg.actor_rollout_ref.model.path == str(launch / "models" / "tiny")
    assert cfg.critic.model.path == str(launch / "models" / "tiny")  # PPO's critic starts from the actor
    assert cfg.reward.custom_reward_function.reward_kwargs.tbrm_fn_path == str(launch / "my_reward.py")
    assert cfg.run.dir == str(launch / "runs" / "x")
    assert cfg.trainer.default_local_dir == str(launch / "runs" / "x" / "checkpoints")


def test_overrides_hub_names_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["profile=cpu", "task=dapo_math", "actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-1.5B",
                   "data.train_files=[a/train.parquet,hdfs://nn/b.parquet,/abs/c.parquet]",
                   "data.val_files='~/val.parquet'"])
    cfg = finish_config(cfg)
    assert list(cfg.data.train_files) == [str(tmp_path / "a" / "train.parquet"), "hdfs://nn/b.parquet",
                                          "/abs/c.parquet"]
    assert cfg.data.val_files == os.path.join(os.path.expanduser("~"), "val.parquet")
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-Math-1.5B"  # no such directory here: a hub name
    assert cfg.reward.custom_reward_function.reward_kwargs.tbrm_fn_path == "pkg://tbrm_verl.tasks.math.reward"
    again = finish_config(cfg)  # idempotent
    assert list(again.data.train_files)[0] == str(tmp_path / "a" / "train.parquet")
