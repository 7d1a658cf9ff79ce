"""What a run prints (tbrm_verl/console.py): the config summary instead of verl's ~900-line config print, and one
progress line per step through verl's own `Tracking`, with the file logger keeping every metric."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tbrm_verl import console
from tbrm_verl.config import compose


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (200, "3m20s"), (3600 + 125, "1h02m")])
def test_duration(seconds, text):
    assert console.duration(seconds) == text


def test_progress_line_against_a_hand_written_one():
    metrics = {"critic/score/mean": 0.25, "actor/tbrm_residual_abs_mean": 12.3456, "timing_s/step": 4.0,
               "actor/grad_norm": 3.0, "val-core/aime24/acc/mean@1": 0.1333, "val-core/aime24/reward/mean@1": 0.1}
    # eta: 7 steps left × 5 s mean; residual to 4 significant digits; only the accuracy of each validation source
    assert console.progress_line(3, 10, metrics, 5.0) == (
        "step:3/10 reward=0.250 residual=12.35 s/step=4.00 eta=35s val/aime24=0.133")
    # PPO/GRPO: no residual metric, so no field
    assert console.progress_line(10, 10, {"critic/score/mean": 1.0, "timing_s/step": 61.0}, 61.0) == (
        "step:10/10 reward=1.000 s/step=61.00 eta=0s")


def test_progress_logger_in_verls_tracking_prints_one_line_per_step_and_the_file_keeps_every_metric(
        tmp_path, monkeypatch, capsys):
    from verl.utils.tracking import Tracking

    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    tracking = Tracking("p", "e", default_backend=["console", "file"])
    console.install_progress(tracking, total_steps=100)
    console.install_progress(tracking, total_steps=100)  # idempotent: the trainer calls it from two hooks
    assert isinstance(tracking.logger["console"], console.ProgressLogger)
    capsys.readouterr()
    steps = [
        (0, {"val-core/t/acc/mean@1": 0.2}),  # validation before training: verl prints it itself
        (1, {"critic/score/mean": 0.5, "timing_s/step": 4.0, "actor/tbrm_residual_abs_mean": 2.0, "x/y": 7}),
        (2, {"critic/score/mean": 0.75, "timing_s/step": 8.0, "actor/tbrm_residual_abs_mean": 1.5, "x/y": 8}),
    ]
    for step, data in steps:
        tracking.log(data=data, step=step)
    tracking.finish()
    out = capsys.readouterr().out.splitlines()
    # step 2: mean of 4 s and 8 s = 6 s, × 98 steps left = 588 s = 9m48s
    assert out == ["step:1/100 reward=0.500 residual=2 s/step=4.00 eta=6m36s",
                   "step:2/100 reward=0.750 residual=1.5 s/step=8.00 eta=9m48s"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["data"]) for r in records] == steps


def test_verbose_keeps_verls_console_line(tmp_path, monkeypatch, capsys):
    """run.progress=verbose: the trainer leaves verl's backend, which prints every metric of the step."""
    from verl.utils.logger import LocalLogger
    from verl.utils.tracking import Tracking

    from tbrm_verl.trainer import SyncTrainer

    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "metrics.jsonl"))
    for progress, backend in (("verbose", LocalLogger), ("compact", console.ProgressLogger)):
        trainer = object.__new__(SyncTrainer)
        trainer.config = OmegaConf.create({"run": {"progress": progress}})
        trainer.total_training_steps = 5
        trainer.logger = Tracking("p", "e", default_backend=["console", "file"])
        trainer.on_train_begin()
        assert type(trainer.logger.logger["console"]) is backend
        capsys.readouterr()
        trainer.logger.log(data={"critic/score/mean": 0.5, "timing_s/step": 2.0}, step=1)
        line = capsys.readouterr().out.strip()
        assert line.startswith("step:1")
        if progress == "verbose":
            assert line == "step:1 - critic/score/mean:0.5 - timing_s/step:2.0"


def test_config_summary_is_the_overrides_not_the_config(tmp_path):
    overrides = ["profile=cpu", "data.train_batch_size=8", "trainer.experiment_name=a b"]
    cfg = compose(overrides)
    OmegaConf.resolve(cfg)
    path = console.write_config(cfg, str(tmp_path / "run"))
    lines = console.config_summary(overrides, "tbrm_verl", path, cfg.run.print_config)
    assert lines == [
        "[tbrm_verl] config tbrm_verl, overrides: profile=cpu data.train_batch_size=8 'trainer.experiment_name=a b'",
        f"[tbrm_verl] full resolved config: {tmp_path}/run/config.yaml (run.print_config=full prints it here too)"]
    assert console.config_summary([], "x", path, "full")[0] == "[tbrm_verl] config x, overrides: (none)"
    # what verl would have printed is in the file, whole
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert len(text.splitlines()) > 500
    assert OmegaConf.to_container(OmegaConf.load(path)) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize("print_config, printed", [("deltas", False), ("full", True)])
def test_task_runner_silences_verls_config_print_unless_full(print_config, printed, monkeypatch, capsys):
    from verl.trainer import main_ppo

    from tbrm_verl import trainer

    monkeypatch.setattr(main_ppo, "pprint", main_ppo.pprint)  # restored after the test
    monkeypatch.setattr(trainer, "check_profile_on_cluster", lambda *a: None)  # no Ray cluster here
    monkeypatch.setattr(trainer.ray, "nodes", lambda: [])
    base = trainer.TBRMTaskRunner.__mro__[1]

    def verl_run(self, config):  # what verl's TaskRunnerV1.run does first
        main_ppo.pprint(OmegaConf.to_container(config, resolve=True))
        return trainer.trainer_base.TRAINER_REGISTRY["sync"]

    monkeypatch.setattr(base, "run", verl_run)
    monkeypatch.setitem(trainer.trainer_base.TRAINER_REGISTRY, "sync", None)
    cfg = compose(["profile=cpu", f"run.print_config={print_config}"])
    runner = object.__new__(trainer.TBRMTaskRunner)
    assert runner.run(cfg) is trainer.TBRMTrainerSync
    out = capsys.readouterr().out
    assert ("'actor_rollout_ref'" in out) is printed
    if printed:
        assert len(out.splitlines()) > 500
