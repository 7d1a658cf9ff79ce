"""tbrm_verl.report: the mean length of non-truncated responses per step (Figure 1b) from what verl logs.

verl 0.9.1's v1 trainer pads a step's responses to the longest one and logs mean, max and the fraction as long as
the padded width ("clip_ratio"). `verl_metrics` below does that from a list of lengths; the expected value is the
mean of the lengths below the maximum response length, computed directly from the list.
"""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from tbrm_verl import report

L = 64  # max response length


def verl_metrics(lengths: list[int]) -> dict:
    width = max(lengths)  # to_padded_tensor(): the batch's longest response
    kept = [x for x in lengths if x > 0]
    out = {}
    for prefix, xs in (("response_length/", lengths), ("response_length_non_aborted/", kept)):
        out[prefix + "mean"] = sum(xs) / len(xs)
        out[prefix + "max"] = float(max(xs))
        out[prefix + "clip_ratio"] = sum(x == width for x in xs) / len(xs)
    return out


def direct(lengths):
    xs = [x for x in lengths if 0 < x < L]
    return sum(xs) / len(xs)


@pytest.mark.parametrize("lengths", [
    [10, 20, 30, 30],          # nothing cut: verl's clip ratio is 0.5 (two at the batch's longest), yet none is cut
    [10, 20, L, L, 33],        # two cut at L
    [L, 1, L, L, 7, 2],
    [5, 0, 9, L],              # an aborted (length 0) response: not a response
])
def test_non_truncated_mean_matches_the_lengths(lengths):
    assert report.non_truncated_length(verl_metrics(lengths), L) == pytest.approx(direct(lengths))


def test_plain_metrics_are_used_without_the_non_aborted_ones():
    lengths = [3, 9, L, 12]
    m = {k: v for k, v in verl_metrics(lengths).items() if k.startswith("response_length/")}
    assert report.non_truncated_length(m, L) == pytest.approx(direct(lengths))


def test_undefined_when_every_response_is_cut_or_nothing_is_logged():
    assert report.non_truncated_length(verl_metrics([L, L, L]), L) is None
    assert report.non_truncated_length({"critic/score/mean": 0.5}, L) is None


def _write_run(run_dir, steps):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, data in steps.items():
            f.write(json.dumps({"step": step, "data": data}) + "\n")


def test_summary_and_plot_have_the_length_panel(tmp_path):
    batches = {1: [10, 12, L, 20], 2: [30, L, L, 25], 3: [40, 44, 48, 52]}
    steps = {s: {report.REWARD_KEY: 0.1 * s, report.RESIDUAL_KEY: 100.0 / s, **verl_metrics(b)}
             for s, b in batches.items()}
    _write_run(tmp_path / "run", steps)
    text = report.summarise(str(tmp_path / "run"), str(tmp_path / "ck"), max_response_length=L)
    line = [x for x in text.splitlines() if "non-truncated response length" in x]
    assert line == [f"  mean non-truncated response length: step 1 {direct(batches[1]):.1f} -> step 3 "
                    f"{direct(batches[3]):.1f} tokens"]
    png = tmp_path / "run" / "reward_residual.png"
    three_panels = imread(png).shape[0]
    # without the maximum length the panel is left out: a shorter figure, reward and residual only
    report.summarise(str(tmp_path / "run"), str(tmp_path / "ck"))
    two_panels = imread(png).shape[0]
    assert three_panels > two_panels
    assert report.length_curve(steps, L) == [(s, pytest.approx(direct(b))) for s, b in batches.items()]
