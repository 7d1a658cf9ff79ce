"""What a run prints: a short config summary (driver) and one progress line per step (trainer).

verl prints the whole resolved config (~900 lines) before the first step and one line with every metric per step.
By default (`run.print_config=deltas`, `run.progress=compact`) a run prints instead:

* the command's overrides in one line, and where the full resolved config was written (`<run.dir>/config.yaml`);
* per step `step:N/T reward=… residual=… s/step=… eta=…` (residual: TBRM's mean |δ|, TBRM runs only), through a
  console backend put in place of verl's in the trainer's `Tracking` (tbrm_verl/trainer.py). The file backend
  (`metrics.jsonl`) is untouched and keeps every metric.

`run.print_config=full` and `run.progress=verbose` give verl's output back.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Literal, get_args

from tbrm_verl.report import RESIDUAL_KEY, REWARD_KEY  # the keys the run report plots

PrintConfig = Literal["deltas", "full"]
Progress = Literal["compact", "verbose"]
PRINT_CONFIG_CHOICES = get_args(PrintConfig)
PROGRESS_CHOICES = get_args(Progress)

STEP_TIME_KEY = "timing_s/step"  # verl's wall time of a step (rollout to update, checkpoint included)
VAL_ACC = re.compile(r"^val-core/([^/]+)/acc/mean@\d+$")


# ------------------------------------------------------------------------------------------------ driver side


def write_config(cfg, run_dir: str) -> str:
    """The full resolved config of this launch, as `<run_dir>/config.yaml` (a relaunch overwrites it)."""
    from omegaconf import OmegaConf

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    OmegaConf.save(cfg, path, resolve=True)
    return path


def config_summary(overrides: list[str], config_name: str, config_path: str, print_config: str) -> list[str]:
    """Two lines: the primary config and the command's overrides; where the full config is."""
    given = " ".join(shlex.quote(o) for o in overrides) if overrides else "(none)"
    where = f"[tbrm_verl] full resolved config: {config_path}"
    if print_config != "full":
        where += " (run.print_config=full prints it here too)"
    return [f"[tbrm_verl] config {config_name}, overrides: {given}", where]


# ----------------------------------------------------------------------------------------------- trainer side


def duration(seconds: float) -> str:
    """45s, 3m20s, 2h05m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(step: int, total: int, metrics: dict, mean_step_s: float | None) -> str:
    """`step:N/T reward=… [residual=…] s/step=… eta=… [val/<source>=…]`; a field is left out when its metric is.

    eta = (T − N) × `mean_step_s`, the caller's mean step time (this launch's steps so far)."""
    parts = [f"step:{step}/{total}"]
    if REWARD_KEY in metrics:
        parts.append(f"reward={metrics[REWARD_KEY]:.3f}")
    if RESIDUAL_KEY in metrics:
        parts.append(f"residual={metrics[RESIDUAL_KEY]:.4g}")
    if STEP_TIME_KEY in metrics:
        parts.append(f"s/step={metrics[STEP_TIME_KEY]:.2f}")
    if mean_step_s is not None:
        parts.append(f"eta={duration(max(0, total - step) * mean_step_s)}")
    for key in sorted(metrics):
        m = VAL_ACC.match(key)
        if m:
            parts.append(f"val/{m.group(1)}={metrics[key]:.3f}")
    return " ".join(parts)


class ProgressLogger:
    """A console backend for verl's `Tracking`: one progress line per training step.

    A record without a step time is validation alone (step 0, before training); verl prints those itself
    ("Initial validation metrics: ...")."""

    def __init__(self, total_steps: int):
        self.total = int(total_steps)
        self.step_times: list[float] = []

    def log(self, data: dict, step: int) -> None:
        if STEP_TIME_KEY not in data:
            return
        self.step_times.append(float(data[STEP_TIME_KEY]))
        mean = sum(self.step_times) / len(self.step_times)
        print(progress_line(int(step), self.total, data, mean), flush=True)

    def flush(self) -> None:
        pass


def install_progress(tracking, total_steps: int) -> None:
    """Put a ProgressLogger in place of verl's console backend (`trainer.logger` lists `console`); idempotent."""
    backends = getattr(tracking, "logger", None)
    if not isinstance(backends, dict) or "console" not in backends:
        return
    if not isinstance(backends["console"], ProgressLogger):
        backends["console"] = ProgressLogger(total_steps)
