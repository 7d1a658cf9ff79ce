"""tbrm_verl.tools.gpu_check on CPU: the same correctness checks the GPU run makes (float32 and bf16, small shapes),
plus proof that the checks catch the pitfalls they are there for, that verl's own engine methods do the forward, and
the no-ray import path the GPU machine uses (tbrm_verl/tools/bare_imports.py). Nothing here asserts a time. (The
offline bundle: tests/tools/test_gpu_bundle.py.)"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tbrm_verl.tools import gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]


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
    assert set(res["variants"]) == {"tbrm_lean_padded", "tbrm_lean_nested", "tbrm_lean_ref_free", "tbrm_padded",
                                    "tbrm_nested", "tbrm_ref_free", "brm_padded"}
    assert res["packed_vs_per_sequence_max_abs_logit_diff_fp32"] < 1e-4
    for name, r in res["variants"].items():
        assert r["grads"]["global_rel_err"] < 1e-4 and r["grads"]["n_tensors"] > 10 and not r["grads"]["missing"]
        assert r["hook_logits_dtype"] == ([] if "lean" in name else ["float32"])
    # V(s_1) sits around log(vocab) for a near-uniform random model: the hook really returned V, not 0 (log-softmax)
    assert all(5.0 < v < 9.0 for v in res["variants"]["tbrm_padded"]["v_s1"]["device"])


HOOK = [v for v in gc.VARIANTS if v[-1] == "hook"]  # verl's logits hook: the BRM ablation's path
LEAN = [v for v in gc.VARIANTS if v[-1] == "lean"]  # TBRMEngine, the default TBRM path


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lean_path_passes_against_the_float32_reference(dtype):
    """The default TBRM path (V(s_1) from B hidden rows in the forward, under FSDP2 mixed precision) agrees with the
    per-sequence float32 reference, including the gradient through V(s_1)."""
    res = gc.run_correctness("cpu", dtype, variants=LEAN)
    _assert_all_pass(res)
    for r in res["variants"].values():
        assert r["hook_logits_dtype"] == []  # the logits hook never ran
        if r["config"]["loss_variant"] == "tbrm":
            assert abs(r["grads"]["v_detached_discrimination"]["v_grad_coefficient"] - 1) < 0.3


def test_bf16_within_tolerance_and_hook_sees_bf16_logits():
    res = gc.run_correctness("cpu", "bf16", variants=HOOK[:2])
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
    det = gc.run_correctness("cpu", dtype, variants=HOOK[:1], loss_factory=_detached_v)
    r = det["variants"]["tbrm_padded"]
    assert not det["passed"] and not r["checks"]["grad_through_v_s1"]
    assert abs(r["grads"]["v_detached_discrimination"]["v_grad_coefficient"]) < 0.3
    # the JSON's verdict names the failed check
    assert f"correctness.{dtype}.tbrm_padded.grad_through_v_s1" in gc.failed_checks(
        {"correctness": {dtype: det}, "overhead": None})
    if dtype == "fp32":
        ls = gc.run_correctness("cpu", dtype, variants=HOOK[:1], loss_factory=_log_softmax_v)
        assert not ls["passed"] and not ls["variants"]["tbrm_padded"]["checks"]["v_s1"]


def test_forward_is_verls_own_engine_code(monkeypatch):
    """Every micro-batch goes through verl's FSDPEngineWithLMHead.prepare_model_inputs/prepare_model_outputs (the
    class verl's source defines, not a copy): count the calls by wrapping the class's own methods."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    cls = gc.prepare_imports()["engine_class"]
    assert cls is FSDPEngineWithLMHead
    calls = {"prepare_model_inputs": 0, "prepare_model_outputs": 0}
    for name in calls:
        orig = getattr(cls, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, name, counted)
    res = gc.run_correctness("cpu", "fp32", micro_batches=2, variants=[LEAN[0], HOOK[0]])
    assert res["passed"]
    assert res["engine_path"] == ("verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead."
                                  "prepare_model_inputs/prepare_model_outputs")
    # 2 variants x 2 micro-batches; TBRMEngine (the lean variant) runs verl's methods through super()
    assert calls == {"prepare_model_inputs": 4, "prepare_model_outputs": 4}


def test_cli_end_to_end_with_overhead_scan(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gc.main(["--device", "cpu", "--dtypes", "bf16", "--out", str(out), "--bench-reps", "1"])
    res = json.loads(out.read_text())
    assert rc == 0 and res["passed"] is True and res["failed_checks"] == [] and not res["ran_on_gpu"]
    assert list(res)[:4] == ["passed", "failed_checks", "notes", "wall_time_s"]  # the verdict comes first
    assert 0 < res["wall_time_s"] < 600 and res["bundle"] is None
    assert res["engine_path"].startswith("verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.")
    assert not torch.distributed.is_initialized()  # the single-rank group is torn down again
    o = res["overhead"]
    assert o["no_float32_tokens_x_vocab_copy"] and o["large_tensor_scan"]["tbrm"]["float32_count"] == 0
    assert o["tokens"] == o["shape"]["n_seqs"] * o["shape"]["seq_len"]
    for key in ("device", "versions", "imports", "correctness"):
        assert key in res
    # more tokens than the loss's 1024-row entropy chunk: a chunked float32 temporary is not mistaken for a copy
    assert o["tokens"] > 1024
    # docs/gpu_check.md explains every field of this JSON
    doc = (ROOT / "docs" / "gpu_check.md").read_text()
    undocumented = sorted({k for k in _keys(res) if not any(f in doc for f in (f"`{k}`", f".{k}`", f"`{k}."))})
    assert not undocumented, f"fields missing from docs/gpu_check.md: {undocumented}"


def _keys(d):
    if isinstance(d, dict):
        for k, v in d.items():
            yield k
            yield from _keys(v)


@pytest.mark.parametrize("blocked, from_bundle", [("tensordict", False), ("pyarrow", True)])
def test_missing_module_is_one_line_exit_2(blocked, from_bundle):
    """Without a module verl's engine needs the check stops at once and names it: run directly, with the install and
    the bundle as fixes; run by the bundle's run.sh (pyarrow: one it leaves to the machine), with installing it here."""
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] == {blocked!r}:
                    raise ImportError("No module named {blocked!r}")
        sys.meta_path.insert(0, Block())
        from tbrm_verl.tools.gpu_check import main
        sys.exit(main(['--device', 'cpu', '--out', '']))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TBRM_GPU_CHECK_BUNDLE"}
    if from_bundle:
        env["TBRM_GPU_CHECK_BUNDLE"] = "/nonexistent/bundle_install.json"
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr[-2000:]
    assert lines[0].startswith("gpu_check: missing module:") and blocked in lines[0]
    if from_bundle:
        assert lines[0].endswith("the bundle does not carry it (bundle.json: not_carried): install it on this machine")
    else:
        assert 'pip install -e ".[gpu]"' in lines[0] and "python -m tbrm_verl.gpu_check bundle --out DIR" in lines[0]


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
        from tbrm_verl.tools.gpu_check import main
        rc = main(['--device', 'cpu', '--dtypes', 'fp32', '--no-overhead', '--out', {str(out)!r}])
        assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray stand-in left behind'
        sys.exit(rc)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["imports"]["ray"].startswith("missing") and res["passed"]
    assert res["imports"]["engine_import"] == "ok (ray stand-in during import)"
    assert res["imports"]["verl_init"] == "skipped (package __init__ imports ray)"
