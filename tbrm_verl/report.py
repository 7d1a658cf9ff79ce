"""Read a run's metrics (verl's file logger, JSON lines) and summarise them: reward rise, plot of reward and residual."""

from __future__ import annotations

import glob
import json
import os

REWARD_KEY = "critic/score/mean"  # verl's name for the mean training reward of a step
RESIDUAL_KEY = "actor/tbrm_residual_abs_mean"


def metrics_files(run_dir: str) -> list[str]:
    """Oldest first: earlier launches of a resumed run are kept as metrics.N.jsonl, the latest is metrics.jsonl."""
    rotated = sorted(glob.glob(os.path.join(run_dir, "metrics.*.jsonl")), key=lambda p: int(p.split(".")[-2]))
    latest = os.path.join(run_dir, "metrics.jsonl")
    return rotated + ([latest] if os.path.exists(latest) else [])


def rotate_metrics(run_dir: str) -> str:
    """Keep a previous launch's metrics (verl's file logger truncates its file); return the path for this launch."""
    os.makedirs(run_dir, exist_ok=True)
    latest = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(latest) and os.path.getsize(latest) > 0:
        n = len(glob.glob(os.path.join(run_dir, "metrics.*.jsonl"))) + 1
        os.rename(latest, os.path.join(run_dir, f"metrics.{n}.jsonl"))
    return latest


def load_steps(run_dir: str) -> dict[int, dict]:
    """step -> metrics, later launches overriding earlier ones for the same step."""
    steps: dict[int, dict] = {}
    for path in metrics_files(run_dir):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption
                steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return dict(sorted(steps.items()))


def reward_rise(steps: dict[int, dict], frac: float = 0.25) -> tuple[float, float, int] | None:
    """(mean reward of the first `frac` of steps, of the last `frac`, steps per part)."""
    rewards = [m[REWARD_KEY] for m in steps.values() if REWARD_KEY in m]
    if len(rewards) < 4:
        return None
    k = max(1, int(len(rewards) * frac))
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k, k


def validation_curve(steps: dict[int, dict]) -> tuple[str, list[tuple[int, float]]] | None:
    """verl's core validation accuracy (`val-core/<data_source>/acc/mean@N`) per step where it was measured."""
    for key in sorted({k for m in steps.values() for k in m}):
        if key.startswith("val-core/") and ("/acc/mean@" in key or "/reward/mean@" in key):
            return key, [(s, m[key]) for s, m in steps.items() if key in m]
    return None


def plot(steps: dict[int, dict], path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s for s, m in steps.items() if REWARD_KEY in m]
    if not xs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [steps[s][REWARD_KEY] for s in xs], color="tab:blue", label="mean training reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward", color="tab:blue")
    rs = [s for s in xs if RESIDUAL_KEY in steps[s]]
    if rs:
        ax2 = ax.twinx()
        ax2.plot(rs, [steps[s][RESIDUAL_KEY] for s in rs], color="tab:red", label="mean |δ| (TBRM residual)")
        ax2.set_ylabel("mean |δ|", color="tab:red")
    ax.set_title("reward and TBRM residual per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarise(run_dir: str, checkpoint_dir: str) -> str:
    steps = load_steps(run_dir)
    lines = [f"run directory: {run_dir}"]
    files = metrics_files(run_dir)
    lines.append(f"  metrics:     {', '.join(files) if files else '(none written)'}")
    lines.append(f"  checkpoints: {checkpoint_dir}")
    png = plot(steps, os.path.join(run_dir, "reward_residual.png")) if steps else None
    if png:
        lines.append(f"  plot:        {png}")
    rise = reward_rise(steps)
    if rise:
        first, last, k = rise
        lines.append(f"  mean training reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({last - first:+.3f})")
    val = validation_curve(steps)
    if val and len(val[1]) >= 2:
        (s0, v0), (s1, v1) = val[1][0], val[1][-1]
        lines.append(f"  validation ({val[0]}): step {s0} {v0:.3f} -> step {s1} {v1:.3f}")
    return "\n".join(lines)
