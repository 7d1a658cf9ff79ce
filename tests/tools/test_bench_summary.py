"""The benchmark's arithmetic on hand-made metrics: mean over timed steps, `other` = step − parts, ratios, targets."""

import pytest

from tbrm_verl.tools.bench import check_targets, ratios, summarise_steps


def _step(step, gen, upd, ref=0.0, old=0.0, crit=0.0, values=0.0):
    return {"timing_s/step": step, "timing_s/gen": gen, "timing_s/update_actor": upd, "timing_s/ref": ref,
            "timing_s/old_log_prob": old, "timing_s/update_critic": crit, "timing_s/values": values,
            "critic/score/mean": 0.5}


def test_first_step_is_not_timed_and_other_is_the_rest():
    steps = {1: _step(30.0, 20.0, 5.0), 2: _step(4.0, 2.0, 1.0, ref=0.5), 3: _step(6.0, 3.0, 1.0, ref=0.5)}
    s = summarise_steps(steps)
    assert s["n_steps"] == 2
    assert s["step_time_s"] == pytest.approx(5.0)
    assert s["parts"]["gen"] == pytest.approx(2.5) and s["parts"]["ref"] == pytest.approx(0.5)
    assert s["parts"]["other"] == pytest.approx(5.0 - 2.5 - 1.0 - 0.5)


def test_ratios_and_targets():
    res = {"tbrm_n1": {"step_time_s": 3.0, "peak_mem_gb": 3.0}, "ppo_n1": {"step_time_s": 5.0, "peak_mem_gb": 4.0},
           "grpo_n4": {"step_time_s": 12.0, "peak_mem_gb": 4.0}}
    r = ratios(res)
    assert r["tbrm_n1"]["step_time"] == pytest.approx(0.6) and r["tbrm_n1"]["peak_mem"] == pytest.approx(0.75)
    t = check_targets(res)
    assert t["tbrm_n1 step time / ppo_n1"]["met"] is True
    assert t["tbrm_n1 peak memory / ppo_n1"]["met"] is False
    assert t["tbrm_n1 step time / grpo_n4"]["value"] == pytest.approx(0.25)


def test_no_timed_steps_is_an_error():
    with pytest.raises(ValueError, match="no measured steps"):
        summarise_steps({1: _step(30.0, 20.0, 5.0)})
