"""`python -m tbrm_verl.bench memory`: the CPU tensor-byte counter on known allocations, and a smoke run of the CLI
on small shapes (the measured numbers themselves are in docs/bench/update_memory.json)."""

import json
import subprocess
import sys

import torch

from tbrm_verl.tools.update_memory import PeakBytes


def test_cpu_counter_sees_live_tensor_bytes_and_their_peak():
    keep = torch.ones(10)  # live before: not counted
    with PeakBytes("cpu") as pk:
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB -> 6 MB live
        del a
        c = torch.empty(250, 1000)  # 1 MB -> 3 MB live
        del keep  # allocated before: its free is not counted (the peak is never under-estimated)
    assert pk.peak == 6_000_000
    assert pk.final == 3_000_000
    assert pk.allocated == 7_000_000
    del b, c


def test_memory_command_smoke(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "tbrm_verl.bench", "memory", "--out-dir", str(out), "--tokens", "96",
                           "--sequences", "4", "--vocab", "2048", "--hidden", "32", "--layers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "update_memory.json").read_text())
    for key in ("plain_peak_bytes", "hook_peak_bytes", "lean_peak_bytes"):
        assert isinstance(res[key], int)
        # every update holds at least the float32 logits of the micro-batch at once
        assert res[key] >= res["tokens"] * res["vocab"] * 4
    # the logits hook's backward allocates a dense [tokens, vocab] gradient the other two never make
    assert res["runs"]["hook"]["allocated_bytes"] - res["runs"]["plain"]["allocated_bytes"] >= res["float32_logits_bytes"]
    assert "lean / plain" in proc.stdout
