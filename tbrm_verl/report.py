"""Read a run's metrics (verl's file logger, JSON lines) and summarise them: reward rise; a plot of reward, residual and
the mean length of non-truncated responses per step (``reward_residual.png``).

Non-truncated length. verl logs, per step, the mean, max and "clip ratio" of the response lengths
(``response_length/*`` over all responses, ``response_length_non_aborted/*`` over those of length > 0). No metric
gives the mean over the responses that were NOT cut at the maximum response length L, and verl 0.9.1's v1 trainer
computes the clip ratio c as the fraction of responses as long as the batch's padded width, which is the longest
response of the step, not L. The mean follows exactly from the logged metrics and L (the run's
``actor_rollout_ref.rollout.response_length``):

* logged max < L: no response was cut; the mean is the logged mean;
* logged max = L: the padded width is L, so c is the fraction cut at L, and
  mean = (1 − c)·mean_kept + c·L gives mean_kept = (mean − c·L) / (1 − c); undefined (not plotted) when c = 1.

The ``_non_aborted`` metrics are used when logged (an aborted response has length 0 and is no response at all), else
the plain ones. A response that ends with its EOS exactly at L counts as cut (the metrics cannot tell them apart).
"""

from __future__ import annotations

import glob
import json
import os

REWARD_KEY = "critic/score/mean"  # verl's name for the mean training reward of a step
RESIDUAL_KEY = "actor/tbrm_residual_abs_mean"
LENGTH_PREFIXES = ("response_length_non_aborted/", "response_length/")  # first present wins (module docstring)


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


def non_truncated_length(metrics: dict, max_response_length: int) -> float | None:
    """Mean length of the responses of one step that were not cut at ``max_response_length`` (module docstring)."""
    import math

    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for prefix in LENGTH_PREFIXES:
        mean, clip, longest = (metrics.get(prefix + k) for k in ("mean", "clip_ratio", "max"))
        if not (finite(mean) and finite(clip) and finite(longest)):
            continue
        if longest < max_response_length:
            return float(mean)
        if clip >= 1:
            return None
        return (mean - clip * max_response_length) / (1 - clip)
    return None


def length_curve(steps: dict[int, dict], max_response_length: int) -> list[tuple[int, float]]:
    """(step, mean non-truncated response length) wherever it is defined."""
    out = []
    for s, m in steps.items():
        v = non_truncated_length(m, max_response_length)
        if v is not None:
            out.append((s, v))
    return out


def plot(steps: dict[int, dict], path: str, max_response_length: int | None = None) -> str | None:
    """Up to three panels over the step: mean training reward; mean |δ| (TBRM runs); mean non-truncated response
    length (when ``max_response_length`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s for s, m in steps.items() if REWARD_KEY in m]
    if not xs:
        return None
    panels = [("mean training reward", "reward", "tab:blue", [(s, steps[s][REWARD_KEY]) for s in xs])]
    rs = [(s, steps[s][RESIDUAL_KEY]) for s in xs if RESIDUAL_KEY in steps[s]]
    if rs:
        panels.append(("mean |δ| (TBRM residual)", "mean |δ|", "tab:red", rs))
    lengths = length_curve(steps, max_response_length) if max_response_length else []
    if lengths:
        panels.append(("mean length of non-truncated responses", "tokens", "tab:green", lengths))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, (title, ylabel, color, pts) in zip(axes[:, 0], panels):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarise(run_dir: str, checkpoint_dir: str, max_response_length: int | None = None) -> str:
    """The run's summary lines; writes the plot. ``max_response_length`` (the rollout's) enables the length panel."""
    steps = load_steps(run_dir)
    lines = [f"run directory: {run_dir}"]
    files = metrics_files(run_dir)
    lines.append(f"  metrics:     {', '.join(files) if files else '(none written)'}")
    lines.append(f"  checkpoints: {checkpoint_dir}")
    png = plot(steps, os.path.join(run_dir, "reward_residual.png"), max_response_length) if steps else None
    if png:
        lines.append(f"  plot:        {png}")
    rise = reward_rise(steps)
    if rise:
        first, last, k = rise
        lines.append(f"  mean training reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({last - first:+.3f})")
    lengths = length_curve(steps, max_response_length) if max_response_length else []
    if len(lengths) >= 2:
        (s0, l0), (s1, l1) = lengths[0], lengths[-1]
        lines.append(f"  mean non-truncated response length: step {s0} {l0:.1f} -> step {s1} {l1:.1f} tokens")
    val = validation_curve(steps)
    if val and len(val[1]) >= 2:
        (s0, v0), (s1, v1) = val[1][0], val[1][-1]
        lines.append(f"  validation ({val[0]}): step {s0} {v0:.3f} -> step {s1} {v1:.3f}")
    return "\n".join(lines)
