"""`python -m tbrm_verl.startup`: phases read off a run's stamped log (synthetic lines, times chosen by hand)."""

import pytest

from tbrm_verl.tools.startup import phases


def test_phases_from_stamped_lines():
    lines = [
        (3.0, "INFO something before"),
        (10.0, "[tbrm_verl] method=tbrm task=embedded_arith run_dir=/x"),
        (22.0, "2026-12-02 INFO worker.py:2038 -- Started a local Ray instance."),
        (30.0, "(TBRMTaskRunner pid=1) {'actor_rollout_ref': ..."),
        (41.0, "INFO:...:create worker group dict_keys(['actor_rollout_ref'])"),
        (50.0, "INFO:...:actor and ref model engine initialized"),
        (60.0, "INFO:...:all initialize finished, ready to fit"),
        (65.0, "(\"Initial validation metrics: {...\""),
        (70.0, "step:1 - global_seqlen/min:1825.0"),
        (72.0, "step:2 - global_seqlen/min:1825.0"),
        (74.0, "step:3 - global_seqlen/min:1825.0"),
    ]
    res = phases(lines, exit_s=80.0)
    assert res["phases_s"] == pytest.approx({"driver": 10, "ray": 12, "taskrunner": 8, "setup": 11, "workers": 9,
                                             "rollout": 10, "val_0": 5, "steps": 9, "exit": 6})
    assert sum(res["phases_s"].values()) == pytest.approx(80.0)
    assert res["steps"] == 3 and res["mean_step_s"] == pytest.approx(2.0)
    assert res["outside_steps_s"] == pytest.approx(80.0 - 4.0)


def test_phases_from_the_compact_progress_lines():
    """The default console (run.progress=compact) prints `step:N/T reward=...` through the TaskRunner's Ray prefix;
    verl's config print is gone, so the TaskRunner is first seen by another of its lines."""
    lines = [
        (10.0, "[tbrm_verl] method=tbrm task=embedded_arith run_dir=/x"),
        (11.0, "[tbrm_verl] config tbrm_verl, overrides: profile=cpu"),
        (22.0, "2026-12-02 INFO worker.py:2038 -- Started a local Ray instance."),
        (30.0, "(TBRMTaskRunner pid=1) TransferQueue initialised"),
        (41.0, "(TBRMTaskRunner pid=1) INFO:...:create worker group dict_keys(['actor_rollout_ref'])"),
        (50.0, "(TBRMTaskRunner pid=1) INFO:...:actor and ref model engine initialized"),
        (60.0, "(TBRMTaskRunner pid=1) INFO:...:all initialize finished, ready to fit"),
        (66.0, "(TBRMTaskRunner pid=1) step:1/3 reward=0.250 residual=3.1 s/step=6.00 eta=12s"),
        (70.0, "(TBRMTaskRunner pid=1) step:2/3 reward=0.500 residual=2.9 s/step=4.00 eta=5s"),
        (73.0, "(TBRMTaskRunner pid=1) step:3/3 reward=0.750 residual=2.5 s/step=3.00 eta=0s"),
    ]
    res = phases(lines, exit_s=80.0)
    assert res["phases_s"] == pytest.approx({"driver": 10, "ray": 12, "taskrunner": 8, "setup": 11, "workers": 9,
                                             "rollout": 10, "val_0": 6, "steps": 7, "exit": 7})
    assert res["steps"] == 3 and res["mean_step_s"] == pytest.approx(3.5)
