"""`python -m tbrm_verl.compare`: the grid, its budget rules, its summaries and its resumability, with the training
runs replaced by a stand-in that writes a metrics file the way verl's file logger does (the real pipeline is covered
by the e2e tests; a real grid is a command, not a test)."""

import json
import math
import random

import pytest

from tbrm_verl.tools import compare


class FakeRun:
    """Stands in for `subprocess.Popen([... tbrm_verl.main ...])`: writes metrics.jsonl with known rewards."""

    calls: list[list[str]] = []

    def __init__(self, cmd, stdout=None, stderr=None, cwd=None, start_new_session=False):
        FakeRun.calls.append(cmd)
        kv = dict(a.split("=", 1) for a in cmd if "=" in a)
        steps = int(kv["trainer.total_training_steps"])
        seed = int(kv["data.seed"])
        n = int(kv["actor_rollout_ref.rollout.n"])
        with open(f"{kv['run.dir']}/metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "data": {"val-core/t/acc/mean@1": 0.4}}) + "\n")
            for s in range(1, steps + 1):
                data = {"critic/score/mean": reward(seed, n, s), "timing_s/step": 1.0 + n}
                if "trainer.v1.trainer_mode=colocate_async" in cmd:  # verl logs staleness per step; here a known one
                    data[compare.STALENESS_KEY] = staleness(seed, s)
                if s == steps:
                    data["val-core/t/acc/mean@1"] = 0.4 + 0.01 * seed + 0.001 * n
                f.write(json.dumps({"step": s, "data": data}) + "\n")
        self.pid = 0

    def wait(self, timeout=None):
        return 0


def reward(seed, n, step):
    return random.Random(f"{seed}-{n}-{step}").random()


def staleness(seed, step):
    return ((seed + step) % 3) / 2


@pytest.fixture
def fake(monkeypatch):
    FakeRun.calls = []
    monkeypatch.setattr(compare.subprocess, "Popen", FakeRun)
    return FakeRun


def test_grid_table_json_and_resume(fake, tmp_path):
    argv = ["--methods", "tbrm_n1,grpo_n4", "--seeds", "1,2", "--steps", "8", "--out-dir", str(tmp_path)]
    assert compare.main(argv) == 0
    assert len(fake.calls) == 4
    doc = json.loads((tmp_path / "comparison.json").read_text())
    for method, n in (("tbrm_n1", 1), ("grpo_n4", 4)):
        for seed in (1, 2):
            r = doc["methods"][method]["seeds"][str(seed)]
            assert r["final_val_acc"] == pytest.approx(0.4 + 0.01 * seed + 0.001 * n)
            last_quarter = [reward(seed, n, s) for s in (7, 8)]  # 8 steps: the last 2
            assert r["train_reward_last_quarter"] == pytest.approx(sum(last_quarter) / 2)
            assert r["rollouts"] == 8 * 16 * n  # the embedded task: 16 prompts per step
            assert r["time_per_step_s"] == pytest.approx(1.0 + n)
            assert r["wall_s"] >= 0
            first_quarter = [reward(seed, n, s) for s in (1, 2)]
            assert r["train_reward_first_quarter"] == pytest.approx(sum(first_quarter) / 2)
        vals = [0.4 + 0.01 * s + 0.001 * n for s in (1, 2)]
        assert doc["methods"][method]["val_by_step"] == pytest.approx({"0": 0.4, "8": sum(vals) / 2})
        agg = doc["methods"][method]["final_val_acc"]
        assert agg["mean"] == pytest.approx(sum(vals) / 2)
        assert agg["stderr"] == pytest.approx(0.005)  # sd of {a, a+0.01} is 0.01/√2; / √2
    assert (tmp_path / "comparison.png").stat().st_size > 0
    md = (tmp_path / "comparison.md").read_text()
    assert "| tbrm_n1 | 2 | 0.416 ± 0.005 | 0.40 (0) → 0.42 (8) |" in md
    assert all(line.endswith("| – |") for line in md.splitlines()[2:])  # no staleness logged: a dash, not a 0

    # resumable: finished runs are kept; a run without its summary (interrupted) is run again
    (tmp_path / "runs" / "grpo_n4" / "seed2" / "summary.json").unlink()
    fake.calls = []
    assert compare.main(argv) == 0
    assert len(fake.calls) == 1 and "data.seed=2" in fake.calls[0] and "method=grpo" in fake.calls[0]
    assert "trainer.resume_mode=auto" in fake.calls[0]  # it continues from its checkpoint


def test_equal_rollouts_budget_gives_fewer_steps_to_more_rollouts_per_prompt(fake, tmp_path):
    assert compare.main(["--methods", "tbrm_n1,tbrm_n4", "--seeds", "3", "--budget", "rollouts", "--rollouts", "640",
                         "--out-dir", str(tmp_path)]) == 0
    steps = {c[c.index("method=tbrm") + 1]: int(dict(a.split("=", 1) for a in c if "=" in a)[
        "trainer.total_training_steps"]) for c in fake.calls}
    assert steps == {"actor_rollout_ref.rollout.n=1": 40, "actor_rollout_ref.rollout.n=4": 10}
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert {m: r["rollouts"]["mean"] for m, r in doc["methods"].items()} == {"tbrm_n1": 640, "tbrm_n4": 640}


def test_same_prompts_for_every_method_of_a_seed(fake, tmp_path):
    compare.main(["--methods", "tbrm_n1,ppo_n1,brm_n4", "--seeds", "5", "--steps", "4", "--out-dir", str(tmp_path)])
    seeds = {tuple(a for a in c if a.startswith(("data.seed=", "actor_rollout_ref.rollout.seed="))) for c in fake.calls}
    assert seeds == {("data.seed=5", "actor_rollout_ref.rollout.seed=5")}
    assert any("tbrm.loss_variant=brm" in c for c in fake.calls)


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--methods", "tbrm_n2", "--out-dir", str(tmp_path)])
    assert "unknown method tbrm_n2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--budget", "wall", "--out-dir", str(tmp_path)])


def test_stderr_direct():
    xs = [1.0, 2.0, 4.0]
    m = sum(xs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / 2)
    assert compare.stderr(xs) == pytest.approx(sd / math.sqrt(3))
    assert math.isnan(compare.stderr([1.0]))


@pytest.mark.parametrize("path", ["/tmp/plain/run", "/tmp/lr=1e-6/runs/x", "/tmp/a,b/c d", "/tmp/it's [1]", "/tmp/back\\slash"])
def test_run_dir_reaches_hydra_unchanged(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (o,) = OverridesParser.create().parse_overrides([f"run.dir={compare.hydra_value(path)}"])
    assert o.key_or_group == "run.dir" and o.value() == path


def test_staleness_is_the_mean_of_verls_per_step_metric(fake, tmp_path):
    assert compare.main(["--methods", "tbrm_n1", "--seeds", "1,2", "--steps", "6", "--out-dir", str(tmp_path),
                         "trainer.v1.trainer_mode=colocate_async"]) == 0
    doc = json.loads((tmp_path / "comparison.json").read_text())
    per_seed = {seed: sum(staleness(seed, s) for s in range(1, 7)) / 6 for seed in (1, 2)}
    for seed, want in per_seed.items():
        assert doc["methods"]["tbrm_n1"]["seeds"][str(seed)]["staleness_mean"] == pytest.approx(want)
    assert doc["methods"]["tbrm_n1"]["staleness_mean"]["mean"] == pytest.approx(sum(per_seed.values()) / 2)
    md = (tmp_path / "comparison.md").read_text()
    assert md.splitlines()[2].endswith(f"| {sum(per_seed.values()) / 2:.2f} |")


@pytest.mark.parametrize("method", list(compare.METHODS))
def test_every_method_composes_and_passes_the_launchers_checks(method):
    """A grid must not die at its 40th run on a config error: each named method is a valid launch of the embedded task."""
    from tbrm_verl.config import check_config, check_with_verl, compose, finish_config

    cfg = compose(compare.METHODS[method])
    check_config(cfg)
    check_with_verl(finish_config(cfg))  # finish_config builds (or reuses) the embedded model, as main does
    assert compare.rollouts_per_step(method, []) == 16 * int(cfg.actor_rollout_ref.rollout.n)
