"""Ctrl-C during training: the run stops cleanly (no Ray process left), the last checkpoint stays loadable, and the
same command resumes from it (trainer.resume_mode=auto)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e


def _descendants(pid):
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ctrl_c_keeps_last_checkpoint_and_resume_picks_it_up(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    args = [sys.executable, "-m", "tbrm_verl.main", f"run.dir={run_dir}", "data.train_batch_size=8",
            "actor_rollout_ref.rollout.n=2", "trainer.save_freq=2"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args + ["trainer.total_training_steps=40"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    seen = set()
    try:
        deadline = time.time() + 480
        while time.time() < deadline and proc.poll() is None:
            seen |= _descendants(proc.pid)
            if tracker.exists() and int(tracker.read_text().strip() or 0) >= 2:
                break
            time.sleep(1)
        assert tracker.exists(), "no checkpoint was written in time"
        seen |= _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the driver
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "first.log").read_text()
    assert rc == 130, out[-3000:]
    assert "interrupted" in out and "resume" in out
    time.sleep(3)
    left = [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    _kill(left)
    assert not left, f"processes left behind after Ctrl-C: {left}"

    step = int(tracker.read_text().strip())
    actor_dir = ckpt / f"global_step_{step}" / "actor"
    assert actor_dir.is_dir() and any(actor_dir.iterdir()), "the checkpoint the tracker names is incomplete"

    # the same command (fewer total steps to keep the test short) resumes from that checkpoint
    total = step + 2
    proc2 = subprocess.run(args + [f"trainer.total_training_steps={total}"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    # training steps only: verl also logs the validation it runs before resuming, under the checkpoint's step
    steps = [r["step"] for r in records if "timing_s/step" in r["data"]]
    assert steps and steps[0] == step + 1 and steps[-1] == total, steps
    # the interrupted launch's metrics were kept beside the new ones
    assert (run_dir / "metrics.1.jsonl").exists()
