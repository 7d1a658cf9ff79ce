"""Cost model: FLOPs vs hand-computed closed forms, structural facts, monotonicity. Nothing here runs a workload or
depends on the speed of the machine: every number is computed from the stated inputs."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tbrm_verl.tools import cost_model as cm

ROOT = Path(__file__).resolve().parents[2]

# small config: P = 1e6 params, 2 layers, d = 64, V = 100; 8 prompts of 10 tokens, 20-token responses, 2 GPUs
SMALL = cm.ModelSpec("small", params=1e6, layers=2, hidden=64, vocab=100)
W = cm.Workload(prompt_len=10, response_len=20, prompts_per_step=8, n_gpus=2, micro_batch_size=2,
                gpu_memory_utilization=0.0, prefix_caching=False)
# a machine with round numbers and no fixed costs, so that times are closed forms too
HW = cm.Hardware("test", peak_flops=1e12, mem_bw=1e11, mem_gb=1000.0, interconnect_bw=math.inf, host_bw=math.inf,
                 mfu_prefill=0.5, mfu_decode=1.0, decode_bw_eff=1.0, decode_step_overhead_s=0.0, mfu_forward=0.5,
                 mfu_train=0.25, phase_overhead_s=0.0, other_fixed_s=0.0, other_per_sample_s=0.0,
                 vllm_workspace_gb=0.0, runtime_overhead_gb=0.0)


def test_flops_closed_forms_n1_and_n4():
    P = 1e6
    # n = 1: 8 trajectories of 30 tokens = 240 tokens; 160 generated, 80 prompt tokens (no prefix caching)
    f = cm.phase_flops(SMALL, W, cm.METHODS["tbrm_n1"])
    assert f["gen"] == 2 * P * (8 * 10 + 8 * 20) == 4.8e8
    assert f["ref"] == 2 * P * 240 == 4.8e8
    assert f["update_actor"] == 6 * P * 240 == 1.44e9
    assert f["old_log_prob"] == f["values"] == f["update_critic"] == 0
    # PPO n = 1 adds π_old, values (2·P·T) and the critic update (6·P·T)
    f = cm.phase_flops(SMALL, W, cm.METHODS["ppo_n1"])
    assert (f["old_log_prob"], f["values"], f["update_critic"]) == (4.8e8, 4.8e8, 1.44e9)
    # GRPO n = 4: 32 trajectories, 960 tokens
    f = cm.phase_flops(SMALL, W, cm.METHODS["grpo_n4"])
    assert f["gen"] == 2 * P * 960 == 1.92e9
    assert f["ref"] == f["old_log_prob"] == 1.92e9
    assert f["update_actor"] == 5.76e9 and f["values"] == 0
    # prefix caching: the 4 samples of a prompt share its prefill
    f = cm.phase_flops(SMALL, replace(W, prefix_caching=True), cm.METHODS["grpo_n4"])
    assert f["gen"] == 2 * P * (8 * 10 + 32 * 20)
    # ppo_epochs multiplies the update passes only
    f2 = cm.phase_flops(SMALL, replace(W, ppo_epochs=2), cm.METHODS["ppo_n1"])
    assert f2["update_actor"] == f2["update_critic"] == 2 * 1.44e9 and f2["ref"] == 4.8e8


def test_time_closed_forms():
    P, G = 1e6, 2
    p = cm.predict(SMALL, W, "tbrm_n1", HW)
    # forward-only phases: FLOPs / (G · peak · mfu_forward); training: FLOPs / (G · peak · mfu_train) + optimizer step
    assert p.time_s["ref"] == pytest.approx(2 * P * 240 / (G * 1e12 * 0.5))
    opt = 32 * P / G / 1e11  # one AdamW step, 32 bytes per local parameter, at mem_bw
    assert p.time_s["update_actor"] == pytest.approx(6 * P * 240 / (G * 1e12 * 0.25) + opt)
    # decode, memory-bound (huge compute peak): each of the R steps reads the bf16 weights and the KV cache of the b
    # running sequences at context prompt + t + 1/2; gpu_memory_utilization 0 = one batch of all 4 per replica
    hw = replace(HW, peak_flops=1e30)
    p = cm.predict(SMALL, W, "tbrm_n1", hw)
    b, R, Lp = 4, 20, 10
    kv = 2 * 2 * 64 * 2  # K and V, 2 layers, width 64, bf16
    decode = sum((2 * P + b * (Lp + t + 0.5) * kv) / 1e11 for t in range(R))
    assert p.rollout["decode_s"] == pytest.approx(decode)
    assert decode == pytest.approx((R * 2 * P + b * kv * (R * Lp + R * R / 2)) / 1e11)
    assert p.time_s["other"] == 0.0


def test_memory_closed_forms():
    P, G = 1e6, 2
    p = cm.predict(SMALL, W, "ppo_n1", HW)
    st = p.memory["states_gb"]
    assert st["actor"] == pytest.approx(16 * P / G / 1e9)  # fp32 params + grads + Adam m, v, sharded
    assert st["critic"] == pytest.approx(16 * P / G / 1e9)
    assert st["ref"] == pytest.approx(2 * P / G / 1e9)  # bf16 reference, sharded
    T = 2 * (10 + 20)  # micro-batch 2 sequences
    act = 2 * T * 64 * 2 + T * (10 * 64 + 4 * 256) * 2 + T * 100 * 4
    assert p.memory["activations_train_gb"] == pytest.approx(act / 1e9)
    assert cm.predict(SMALL, W, "tbrm_n1", HW).memory["states_gb"]["critic"] == 0.0


def test_vllm_fraction_counts_only_while_awake():
    w = replace(W, gpu_memory_utilization=0.4)
    hw = replace(HW, mem_gb=1.0)
    p = cm.predict(SMALL, w, "tbrm_n1", hw)
    assert p.memory["per_phase_gb"]["gen"]["vllm"] == pytest.approx(0.4)
    assert p.memory["per_phase_gb"]["update_actor"]["vllm"] == 0.0  # free_cache_engine: vLLM sleeps
    p2 = cm.predict(SMALL, replace(w, free_cache_engine=False), "tbrm_n1", hw)
    assert p2.memory["per_phase_gb"]["update_actor"]["vllm"] == pytest.approx(0.4)


@pytest.mark.parametrize("model", list(cm.PRESETS.values()) + [SMALL])
def test_structural_facts(model):
    w = cm.Workload(prompt_len=160, response_len=1024, prompts_per_step=128, n_gpus=4, micro_batch_size=1)
    if model is SMALL:
        w = W
    p = cm.predict_all(model, w)
    for k in ("tbrm_n1", "tbrm_n1_ref_free", "tbrm_n4"):  # TBRM: no π_old pass, no critic
        for phase in ("old_log_prob", "values", "update_critic"):
            assert p[k].flops[phase] == 0 and p[k].time_s[phase] == 0
        assert "critic" not in p[k].memory["per_phase_gb"]["update_actor"]
    rf, t1 = p["tbrm_n1_ref_free"], p["tbrm_n1"]
    assert rf.flops["ref"] == 0 and rf.time_s["ref"] == 0 and t1.flops["ref"] > 0
    # verl 0.9.1 keeps the reference on the host (forward_only engine): it adds no GPU memory outside its own pass
    assert rf.memory["peak_train_gb"] <= t1.memory["peak_train_gb"]
    assert t1.memory["per_phase_gb"]["update_actor"]["ref_params"] == 0.0
    assert rf.step_time_s < t1.step_time_s
    # a resident reference (ref_param offload off) costs memory in every phase
    resident = cm.predict_all(model, w, offload=cm.Offload(ref_param=False), methods=["tbrm_n1", "tbrm_n1_ref_free"])
    assert resident["tbrm_n1_ref_free"].memory["peak_train_gb"] < resident["tbrm_n1"].memory["peak_train_gb"]
    assert resident["tbrm_n1_ref_free"].memory["peak_device_gb"] < resident["tbrm_n1"].memory["peak_device_gb"]
    # GRPO n=4 generates 4x the tokens of an n=1 method, and every training pass sees 4x the tokens
    assert p["grpo_n4"].counts["rollout_tokens"] == 4 * t1.counts["rollout_tokens"]
    assert p["grpo_n4"].counts["seq_tokens"] == 4 * t1.counts["seq_tokens"]
    assert p["grpo_n4"].flops["update_actor"] == pytest.approx(4 * t1.flops["update_actor"])
    # PPO runs every phase; TBRM n=4 is GRPO n=4 without the π_old pass
    assert all(p["ppo_n1"].time_s[q] > 0 for q in cm.PARTS)
    assert p["grpo_n4"].step_time_s - p["tbrm_n4"].step_time_s == pytest.approx(p["grpo_n4"].time_s["old_log_prob"])
    assert p["ppo_n1"].memory["peak_train_gb"] > t1.memory["peak_train_gb"]


def test_preset_parameter_counts():
    # published sizes: Qwen2.5-7B 7,615,616,512 and Qwen2.5-1.5B 1,543,714,304 parameters (Math variants share them)
    assert cm.PRESETS["qwen2.5-math-7b"].params == 7_615_616_512
    assert cm.PRESETS["qwen2.5-math-1.5b"].params == 1_543_714_304
    # 7B KV cache: 2 (K, V) x 28 layers x 4 KV heads x 128 x 2 bytes
    assert cm.PRESETS["qwen2.5-math-7b"].kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2


@pytest.mark.parametrize("method", list(cm.METHODS))
def test_monotone_in_response_length(method):
    model = cm.PRESETS["qwen2.5-math-1.5b"]
    prev = None
    for R in (128, 256, 512, 1024, 2048, 4096):
        w = cm.Workload(prompt_len=160, response_len=R, prompts_per_step=64, n_gpus=4, micro_batch_size=1)
        p = cm.predict(model, w, method)
        if prev is not None:
            assert p.step_time_s > prev.step_time_s
            assert all(p.flops[q] >= prev.flops[q] for q in cm.PARTS) and sum(p.flops.values()) > sum(
                prev.flops.values())
            assert p.memory["peak_train_gb"] >= prev.memory["peak_train_gb"]
            assert p.memory["peak_device_gb"] >= prev.memory["peak_device_gb"]
        prev = p


def test_paper_comparison_reports_both_sides(capsys):
    res = cm.compare_with_paper()
    out = capsys.readouterr().out
    assert "Paper comparison" in out
    cmp = res["paper_comparison"]
    assert cmp["ppo_n1_over_tbrm_n1_time"]["paper"] == 1.3
    assert cmp["grpo_n4_over_tbrm_n1_time"]["paper"] == 3.1
    for v in cmp.values():
        assert v["difference"] == pytest.approx(v["predicted"] - v["paper"])
    # the qualitative claims hold in the model: TBRM n=1 faster and lighter than PPO n=1, much faster than GRPO n=4
    assert cmp["ppo_n1_over_tbrm_n1_time"]["predicted"] > 1
    assert cmp["grpo_n4_over_tbrm_n1_time"]["predicted"] > 2
    assert cmp["tbrm_n1_mem_saving_vs_ppo_n1 (training-engine peak)"]["predicted"] > 0


def _bench(tmp_path):
    parts = lambda g, r, o, v, c, a: {"gen": g, "ref": r, "old_log_prob": o, "values": v,  # noqa: E731
                                      "update_critic": c, "update_actor": a, "other": 1.0}
    methods = {
        "tbrm_n1": {"step_time_s": 10.0, "peak_mem_gb": 2.0, "parts": parts(5, 1, 0, 0, 0, 3)},
        "tbrm_n1_ref_free": {"step_time_s": 9.0, "peak_mem_gb": 1.8, "parts": parts(5, 0, 0, 0, 0, 3)},
        "tbrm_n4": {"step_time_s": 25.0, "peak_mem_gb": 2.5, "parts": parts(12, 3, 0, 0, 0, 9)},
        "ppo_n1": {"step_time_s": 16.0, "peak_mem_gb": 3.2, "parts": parts(5, 1, 1, 1, 4, 3)},
        "grpo_n4": {"step_time_s": 28.0, "peak_mem_gb": 2.5, "parts": parts(12, 3, 3, 0, 0, 9)},
    }
    setting = {"params": 500_000, "layers": 2, "hidden": 64, "vocab": 512, "prompt_len": 32, "response_len": 64,
               "prompts_per_step": 8, "n_gpus": 1}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"methods": methods, "setting": setting}))
    return path, methods


def test_compare_with_bench(tmp_path, capsys):
    path, methods = _bench(tmp_path)
    hw = cm.cpu_hardware(peak_tflops=0.05, mem_bw_gbs=5.0, phase_overhead_s=0.5, other_fixed_s=1.0)
    res = cm.compare_with_bench(path, hw=hw)
    out = capsys.readouterr().out
    assert "ppo_n1" in out and "tbrm_n1" in out
    assert res["base"] == "ppo_n1"
    for k, m in methods.items():
        r = res["methods"][k]
        assert r["time_ratio"]["measured"] == pytest.approx(m["step_time_s"] / 16.0)
        assert r["mem_ratio"]["measured"] == pytest.approx(m["peak_mem_gb"] / 3.2)
        assert r["parts_s"]["measured"]["gen"] == m["parts"]["gen"]
        assert r["time_ratio"]["predicted"] > 0
    # on the CPU model the fixed start-up costs appear in every phase a method runs
    assert res["methods"]["ppo_n1"]["parts_s"]["predicted"]["values"] >= 0.5
    assert res["methods"]["tbrm_n1"]["parts_s"]["predicted"]["values"] == 0.0


def test_cli_runs(tmp_path):
    out = tmp_path / "cm.json"
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.cost_model", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paper comparison" in r.stdout
    assert set(json.loads(out.read_text())["predictions"]) == set(cm.METHODS)
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.cost_model", "--params", "1e8", "--layers", "12",
                        "--hidden", "768", "--vocab", "50000", "--prompt-len", "100", "--response-len", "500",
                        "--prompts", "16", "--gpus", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ratios vs PPO n=1" in r.stdout
    path, _ = _bench(tmp_path)
    r = subprocess.run([sys.executable, "-m", "tbrm_verl.cost_model", "--bench", str(path), "--hw", "cpu",
                        "--peak-tflops", "0.05", "--mem-bw-gbs", "5"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "time ratio meas" in r.stdout


def test_resident_states_per_phase_closed_forms():
    """verl 0.9.1: grads exist during an update only (train mode exits with zero_grad, set_to_none); an offloaded
    state is on the GPU in its own phases only; a sleeping vLLM keeps `vllm_resident_gb`, an awake one its fraction."""
    P, G = 1e6, 2
    hw = replace(HW, mem_gb=1.0, vllm_resident_gb=0.05, runtime_overhead_gb=0.0)
    w = replace(W, gpu_memory_utilization=0.4)
    ph = cm.predict(SMALL, w, "ppo_n1", hw).memory["per_phase_gb"]
    assert ph["gen"]["actor_states"] == ph["ref"]["actor_states"] == pytest.approx(12 * P / G / 1e9)
    assert ph["update_actor"]["actor_states"] == pytest.approx(16 * P / G / 1e9)
    assert ph["update_critic"]["critic_states"] == pytest.approx(16 * P / G / 1e9)
    assert ph["update_actor"]["critic_states"] == pytest.approx(12 * P / G / 1e9)
    assert ph["gen"]["vllm"] == pytest.approx(0.4) and ph["update_actor"]["vllm"] == 0.0
    assert ph["gen"]["vllm_resident"] == ph["update_actor"]["vllm_resident"] == pytest.approx(0.05)
    assert ph["gen"]["ref_params"] == 0.0 and ph["ref"]["ref_params"] == pytest.approx(2 * P / G / 1e9)
    off = cm.Offload(actor_param=True, actor_optimizer=True, critic_param=False, critic_optimizer=True)
    ph = cm.predict(SMALL, w, "ppo_n1", hw, off).memory["per_phase_gb"]
    assert ph["gen"]["actor_states"] == 0.0 and ph["values"]["actor_states"] == 0.0
    assert ph["old_log_prob"]["actor_states"] == pytest.approx(4 * P / G / 1e9)  # params only, Adam on the host
    assert ph["update_actor"]["actor_states"] == pytest.approx(16 * P / G / 1e9)
    assert ph["gen"]["critic_states"] == pytest.approx(4 * P / G / 1e9)
    # without vLLM (gpu_memory_utilization 0, e.g. the CPU rollout) nothing of it is counted
    ph = cm.predict(SMALL, W, "tbrm_n1", hw).memory["per_phase_gb"]
    assert ph["gen"]["vllm"] == ph["gen"]["vllm_resident"] == 0.0


def test_each_pass_uses_its_own_micro_batch():
    d, L, V, ffn = 64, 2, 100, 256
    w = replace(W, micro_batch_size=1, ref_micro_batch_size=4, log_prob_micro_batch_size=2, critic_micro_batch_size=3,
                critic_forward_micro_batch_size=5)
    ph = cm.predict(SMALL, w, "ppo_n1", HW).memory["per_phase_gb"]
    seq = 10 + 20
    layer = lambda T: T * (10 * d + 4 * ffn) * 2  # noqa: E731
    assert ph["ref"]["activations"] == pytest.approx((layer(4 * seq) + 4 * seq * V * 6) / 1e9)
    assert ph["old_log_prob"]["activations"] == pytest.approx((layer(2 * seq) + 2 * seq * V * 6) / 1e9)
    assert ph["values"]["activations"] == pytest.approx(layer(5 * seq) / 1e9)
    T = 3 * seq
    assert ph["update_critic"]["activations"] == pytest.approx((L * T * d * 2 + layer(T)) / 1e9)
    T = seq
    assert ph["update_actor"]["activations"] == pytest.approx((L * T * d * 2 + layer(T) + T * V * 4) / 1e9)


QWEN25_MATH_15B_CONFIG = {  # Qwen/Qwen2.5-Math-1.5B config.json (the fields the model reads)
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "tie_word_embeddings": True,
}


def test_model_spec_from_a_local_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_MATH_15B_CONFIG))
    spec = cm.model_spec_for(str(tmp_path))
    assert spec.params == 1_543_714_304  # published size
    assert (spec.layers, spec.hidden, spec.vocab, spec.num_kv_heads, spec.head_dim) == (28, 1536, 151936, 2, 128)
    assert cm.model_spec_for("Qwen/Qwen2.5-Math-7B") is cm.PRESETS["qwen2.5-math-7b"]  # hub name -> preset
    # Llama layout: the same minus the q/k/v biases
    (tmp_path / "config.json").write_text(json.dumps({**QWEN25_MATH_15B_CONFIG, "model_type": "llama"}))
    assert spec.params - cm.model_spec_for(str(tmp_path)).params == 28 * (12 * 128 + 2 * 2 * 128)
    with pytest.raises(ValueError, match="no preset"):
        cm.model_spec_for("org/unknown-model")


def test_stated_hardware(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("# cmd\n# Paper: ... 8x A100 40GB, one node\ndefaults: []\n# 4x H100 80GB (not the header)\n")
    assert cm.stated_hardware(f) == (8, "A100", 40.0)
    f.write_text("# cmd\ndefaults: []\n")
    assert cm.stated_hardware(f) is None
