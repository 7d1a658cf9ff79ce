"""`python -m tbrm_verl.sweep`: the grid's points, the per-method choice and resumability, with the training runs
replaced by a stand-in whose reward peaks at a known learning rate per method (a real sweep is a command)."""

import json
import math

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tbrm_verl.tools import compare, sweep

BEST_LR = {"1": 1e-6, "4": 3e-6}  # by rollout.n: the stand-in's reward peaks here (tbrm_n1 vs grpo_n4)


def fake_reward(lr: float, n: str, seed: int) -> float:
    return 0.5 - (math.log10(lr) - math.log10(BEST_LR[n])) ** 2 + 0.001 * seed


class FakeRun:
    calls: list[list[str]] = []

    def __init__(self, cmd, stdout=None, stderr=None, cwd=None, start_new_session=False):
        FakeRun.calls.append(cmd)
        # what tbrm_verl.main would do first: Hydra parses every override (a folder name with `=` once broke this)
        overrides = OverridesParser.create().parse_overrides([a for a in cmd[3:] if "=" in a])
        kv = {o.key_or_group: str(o.value()) for o in overrides}
        r = fake_reward(float(kv["actor_rollout_ref.actor.optim.lr"]), kv["actor_rollout_ref.rollout.n"],
                        int(kv["data.seed"]))
        with open(f"{kv['run.dir']}/metrics.jsonl", "w") as f:
            for s in range(1, int(kv["trainer.total_training_steps"]) + 1):
                data = {"critic/score/mean": r, "timing_s/step": 1.0}
                if s == int(kv["trainer.total_training_steps"]):
                    data["val-core/t/acc/mean@1"] = 0.3  # the same for every point: the choice must not use it
                f.write(json.dumps({"step": s, "data": data}) + "\n")
        self.pid = 0

    def wait(self, timeout=None):
        return 0


@pytest.fixture
def fake(monkeypatch):
    FakeRun.calls = []
    monkeypatch.setattr(compare.subprocess, "Popen", FakeRun)
    return FakeRun


def test_every_method_at_every_point_and_the_choice_is_the_best_training_reward(fake, tmp_path):
    lrs = ["3e-7", "1e-6", "3e-6", "1e-5"]
    argv = ["--methods", "tbrm_n1,grpo_n4", "--grid", "actor_rollout_ref.actor.optim.lr=" + ",".join(lrs),
            "--seeds", "101,102", "--steps", "4", "--out-dir", str(tmp_path)]
    assert sweep.main(argv) == 0
    assert len(fake.calls) == 2 * len(lrs) * 2  # methods x points x seeds
    doc = json.loads((tmp_path / "sweep.json").read_text())
    for method, n in (("tbrm_n1", "1"), ("grpo_n4", "4")):
        rows = doc["methods"][method]["points"]
        assert sorted(rows) == sorted(f"lr-{lr}" for lr in lrs)
        for lr in lrs:
            want = sum(fake_reward(float(lr), n, s) for s in (101, 102)) / 2
            assert rows[f"lr-{lr}"]["train_reward_last_quarter"]["mean"] == pytest.approx(want)
        best = max(lrs, key=lambda lr: fake_reward(float(lr), n, 0))
        assert doc["methods"][method]["chosen"] == f"lr-{best}"
    assert doc["methods"]["tbrm_n1"]["chosen"] == "lr-1e-6" and doc["methods"]["grpo_n4"]["chosen"] == "lr-3e-6"
    assert "| tbrm_n1 | **lr-1e-6** | 2 |" in (tmp_path / "sweep.md").read_text()

    # resumable: a second invocation reruns nothing
    fake.calls = []
    assert sweep.main(argv) == 0
    assert fake.calls == []


def test_two_axes_make_a_product(fake, tmp_path):
    assert sweep.main(["--methods", "ppo_n1", "--grid", "actor_rollout_ref.actor.optim.lr=1e-6,3e-6",
                       "--grid", "critic.optim.lr=1e-5,1e-4", "--seeds", "1", "--steps", "2",
                       "--out-dir", str(tmp_path)]) == 0
    seen = {(dict(a.split("=", 1) for a in c if "=" in a)["actor_rollout_ref.actor.optim.lr"],
             dict(a.split("=", 1) for a in c if "=" in a)["critic.optim.lr"]) for c in fake.calls}
    assert seen == {("1e-6", "1e-5"), ("1e-6", "1e-4"), ("3e-6", "1e-5"), ("3e-6", "1e-4")}
    assert sorted(json.loads((tmp_path / "sweep.json").read_text())["methods"]["ppo_n1"]["points"]) == [
        "lr-1e-6__critic_lr-1e-4", "lr-1e-6__critic_lr-1e-5", "lr-3e-6__critic_lr-1e-4", "lr-3e-6__critic_lr-1e-5"]


def test_nan_never_wins():
    nan = {"train_reward_last_quarter": {"mean": float("nan")}}
    low = {"train_reward_last_quarter": {"mean": -1.0}}
    assert sweep.choose({"a": nan, "b": low}) == "b"


@pytest.mark.parametrize("grid, msg", [(["lr"], "write KEY=V1,V2"), (["a=1", "a=2"], "given twice"), (["a="], "write KEY")])
def test_bad_grid_is_one_line(grid, msg, tmp_path):
    argv = [x for g in grid for x in ("--grid", g)] + ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert msg in str(e.value)
