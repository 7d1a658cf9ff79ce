"""tbrm_verl.gpu_check on CPU: the same correctness checks the GPU run makes (float32 and bf16, small shapes), plus
proof that the checks catch the pitfalls they are there for, and the no-ray import path the GPU machine uses.
Nothing here asserts a time."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tbrm_verl import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def test_reference_formula_by_hand():
    """The check's reference is the paper's formula: verify it on logits small enough to do by hand."""
    beta = 0.5
    # one sequence: prompt of 2 tokens, response (1, 0); vocab 2. Row t holds the logits emitting token t+1.
    logits = torch.tensor([[9.0, 9.0], [0.0, math.log(3.0)], [math.log(2.0), 0.0], [5.0, 5.0]])
    resp = torch.tensor([1, 0])
    ref = torch.tensor([-0.25, -0.5])
    loss, v, d = gc.reference_losses([logits], [2], [resp], [ref], [1.0], beta)
    v_s1 = math.log(1 + 3)  # logsumexp of row P-1 = 1
    logp = math.log(3 / 4) + math.log(2 / 3)  # π(1|s1) = 3/4, π(0|s2) = 2/3
    delta = v_s1 + logp - (-0.25 - 0.5) - 1.0 / beta
    assert v.item() == pytest.approx(v_s1, abs=1e-6)
    assert d.item() == pytest.approx(delta, abs=1e-5)
    assert loss.item() == pytest.approx(delta**2, rel=1e-6)
    # reference-free: drop the π_ref terms
    _, _, d0 = gc.reference_losses([logits], [2], [resp], [ref], [1.0], beta, reference_free=True)
    assert d0.item() == pytest.approx(v_s1 + logp - 2.0, abs=1e-5)
    # classical BRM: ε_1 = logit(s1,a1) − ref_1 − V(s2), ε_2 = logit(s2,a2) − r/β − ref_2 (V(s3) = 0)
    lb, _, _ = gc.reference_losses([logits], [2], [resp], [ref], [1.0], beta, variant="brm")
    e1 = math.log(3.0) + 0.25 - math.log(1 + 2)
    e2 = math.log(2.0) - 2.0 + 0.5
    assert lb.item() == pytest.approx(e1**2 + e2**2, rel=1e-5)
    assert e1 + e2 == pytest.approx(delta, abs=1e-5)  # the per-token residuals telescope to δ


def _assert_all_pass(res):
    for name, r in res["variants"].items():
        assert r["passed"], (name, {k: v for k, v in r["checks"].items() if not v}, r["grads"], r["v_s1"])


def test_float32_exact_agreement():
    res = gc.run_correctness("cpu", "fp32")
    assert res["passed"]
    _assert_all_pass(res)
    assert set(res["variants"]) == {"tbrm_padded", "tbrm_nested", "tbrm_ref_free", "brm_padded"}
    assert res["packed_vs_per_sequence_max_abs_logit_diff_fp32"] < 1e-4
    for r in res["variants"].values():
        assert r["grads"]["global_rel_err"] < 1e-4 and r["grads"]["n_tensors"] > 10 and not r["grads"]["missing"]
        assert r["hook_logits_dtype"] == ["float32"]
    # V(s_1) sits around log(vocab) for a near-uniform random model: the hook really returned V, not 0 (log-softmax)
    assert all(5.0 < v < 9.0 for v in res["variants"]["tbrm_padded"]["v_s1"]["device"])


def test_bf16_within_tolerance_and_hook_sees_bf16_logits():
    res = gc.run_correctness("cpu", "bf16", variants=gc.VARIANTS[:2])
    _assert_all_pass(res)
    for r in res["variants"].values():
        assert r["hook_logits_dtype"] == ["bfloat16"]  # FSDP2 mixed precision: the hook gets bf16 logits
        assert abs(r["grads"]["v_detached_discrimination"]["v_grad_coefficient"] - 1) < 0.3


def _detached_v(cfg):
    from tbrm_verl.loss import tbrm_loss

    def fn(model_output=None, data=None, dp_group=None, student_logits=None):
        if student_logits is not None:
            return {k: v.detach() for k, v in tbrm_loss(cfg, student_logits=student_logits, data=data).items()}
        return tbrm_loss(cfg, model_output=model_output, data=data, dp_group=dp_group)

    return fn


def _log_softmax_v(cfg):
    from tbrm_verl.loss import tbrm_loss

    def fn(model_output=None, data=None, dp_group=None, student_logits=None):
        if student_logits is not None:
            ls = torch.log_softmax(student_logits.float(), dim=-1)
            return tbrm_loss(cfg, student_logits=ls, data=data)
        return tbrm_loss(cfg, model_output=model_output, data=data, dp_group=dp_group)

    return fn


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checks_catch_the_known_pitfalls(dtype):
    """A loss with V(s_1) detached, or computed from log-softmax outputs (identically 0), must fail the check."""
    det = gc.run_correctness("cpu", dtype, engine="manual", variants=gc.VARIANTS[:1], loss_factory=_detached_v)
    r = det["variants"]["tbrm_padded"]
    assert not det["passed"] and not r["checks"]["grad_through_v_s1"]
    assert abs(r["grads"]["v_detached_discrimination"]["v_grad_coefficient"]) < 0.3
    if dtype == "fp32":
        ls = gc.run_correctness("cpu", dtype, engine="manual", variants=gc.VARIANTS[:1], loss_factory=_log_softmax_v)
        assert not ls["passed"] and not ls["variants"]["tbrm_padded"]["checks"]["v_s1"]


def test_manual_path_matches_verl_engine_path():
    env = gc.prepare_imports()
    if env.get("engine_class") is None:
        pytest.skip(f"verl engine not importable here: {env.get('engine_import')}")
    a = gc.run_correctness("cpu", "fp32", engine="verl", variants=gc.VARIANTS[:2])
    b = gc.run_correctness("cpu", "fp32", engine="manual", variants=gc.VARIANTS[:2])
    assert a["engine_path"].startswith("verl ") and b["engine_path"].startswith("replication")
    for k in a["variants"]:
        assert a["variants"][k]["loss"]["device"] == pytest.approx(b["variants"][k]["loss"]["device"], rel=1e-6)
        assert a["variants"][k]["v_s1"]["device"] == pytest.approx(b["variants"][k]["v_s1"]["device"], abs=1e-6)


def test_cli_end_to_end_with_overhead_scan(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gc.main(["--device", "cpu", "--dtypes", "bf16", "--out", str(out), "--bench-reps", "1"])
    res = json.loads(out.read_text())
    assert rc == 0 and res["passed"] and not res["ran_on_gpu"]
    assert not torch.distributed.is_initialized()  # the single-rank group is torn down again
    o = res["overhead"]
    assert o["no_float32_tokens_x_vocab_copy"] and o["large_tensor_scan"]["tbrm"]["float32_count"] == 0
    assert o["tokens"] == o["shape"]["n_seqs"] * o["shape"]["seq_len"]
    for key in ("device", "versions", "imports", "correctness"):
        assert key in res


def test_runs_without_ray(tmp_path):
    """The GPU machine has no ray: verl's package __init__ (which imports ray) must be bypassed."""
    out = tmp_path / "noray.json"
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('ray', 'vllm'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from tbrm_verl.gpu_check import main
        rc = main(['--device', 'cpu', '--dtypes', 'fp32', '--no-overhead', '--out', {str(out)!r}])
        assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray stand-in left behind'
        sys.exit(rc)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["imports"]["ray"].startswith("missing") and res["passed"]
