"""Checks (a)+(b): the TBRM loss through verl's engine on a tiny Qwen2 under FSDP2, against a float32 reference.

V(s_1), the loss, the mean residual and every parameter's gradient from verl's dual-call contract (logits hook ->
per-token `tbrm_v`, then the loss call) or TBRMEngine's lean path, on packed micro-batches as verl builds them, are
compared with a float32 CPU reference computed one sequence at a time straight from the paper's formula."""

from __future__ import annotations

import copy
import math
from functools import partial

import torch

from tbrm_verl.tools.bare_imports import prepare_imports
from tbrm_verl.tools.gpu_check.harness import (
    TINY,
    Forward,
    build_batch,
    cpu_threads,
    dist_session,
    full,
    make_sequences,
    qwen2,
    wrap_fsdp2,
)

# Tolerances. fp32: the device path (packed, FSDP2, verl's slicing) must agree with the per-sequence reference up to
# float32 round-off. bf16: model weights/activations are rounded to bf16 (8 bits of mantissa, ~0.4% relative per
# op) while the reference runs in float32; the logsumexp is float32 in both.
TOLERANCES = {
    "fp32": {"v_abs": 1e-4, "loss_rel": 1e-5, "residual_abs": 1e-3, "grad_rel_global": 1e-4, "grad_rel_tensor": 1e-3,
             "v_grad_coef_abs": 1e-3},
    "bf16": {"v_abs": 5e-2, "loss_rel": 2e-3, "residual_abs": 0.5, "grad_rel_global": 5e-2, "grad_rel_tensor": 1e-1,
             "v_grad_coef_abs": 0.3},
}


# --------------------------------------------------------------------------------------------------- reference
def reference_losses(seq_logits, prompt_lens, responses, refs, rewards, beta, variant="tbrm", reference_free=False,
                     detach_v=False):
    """The paper's objective computed directly, float32, one sequence at a time.

    seq_logits[i]: raw logits [prompt_len_i + resp_len_i, V] of sequence i (row t predicts token t+1).
    TBRM:  δ_i = logsumexp(logits[P_i - 1]) + Σ_h (log_softmax(logits[P_i - 2 + h])[y_h] − log π_ref(y_h)) − r_i/β,
           L = mean_i δ_i².
    BRM:   ε_h = logits[s_h, a_h] − r_h/β − log π_ref(a_h|s_h) − V(s_{h+1}), V(s_{H+1}) = 0, r on the last token;
           L = mean_i Σ_h ε_h².
    `detach_v=True` stops the gradient through V(s_1) (the variant the paper warns against): the check uses it only
    to show that the device gradient is distinguishably the undetached one.
    Returns (loss, v_s1 [B], residual δ [B])."""
    vs, deltas, per = [], [], []
    for i, logits in enumerate(seq_logits):
        P, R = int(prompt_lens[i]), len(responses[i])
        logits = logits.float()
        rows = logits[P - 1: P - 1 + R]  # rows emitting response tokens 1..R (states s_1..s_R)
        y = responses[i].to(logits.device)
        ref = torch.zeros(R) if reference_free else refs[i].float()
        ref = ref.to(logits.device)
        v_all = torch.logsumexp(rows, dim=-1)  # V(s_h)
        logp = torch.log_softmax(rows, dim=-1).gather(-1, y[:, None]).squeeze(-1)
        r_over_beta = rewards[i] / beta
        v1 = v_all[0].detach() if detach_v else v_all[0]
        delta = v1 + (logp - ref).sum() - r_over_beta
        vs.append(v_all[0])
        deltas.append(delta)
        if variant == "tbrm":
            per.append(delta.square())
        else:
            q = rows.gather(-1, y[:, None]).squeeze(-1)
            v_next = torch.cat([v_all[1:], v_all.new_zeros(1)])
            r_tok = torch.zeros(R, device=logits.device)
            r_tok[-1] = r_over_beta
            per.append((q - r_tok - ref - v_next).square().sum())
    return torch.stack(per).mean(), torch.stack(vs), torch.stack(deltas)


def _ref_seq_logits(model, prompts, resps):
    return [model(input_ids=torch.cat([p, r])[None], use_cache=False).logits[0] for p, r in zip(prompts, resps)]


# ------------------------------------------------------------------------------------------------- correctness
# (name, loss config, batch layout, V(s_1) path): "lean" is the default TBRM path (TBRMEngine: V(s_1) from B hidden
# rows inside the forward, tbrm_verl/lean_v.py), "hook" verl's logits hook (the BRM ablation's path; TBRM's before).
VARIANTS = (
    ("tbrm_lean_padded", dict(loss_variant="tbrm", reference_free=False), "padded", "lean"),
    ("tbrm_lean_nested", dict(loss_variant="tbrm", reference_free=False), "nested", "lean"),
    ("tbrm_lean_ref_free", dict(loss_variant="tbrm", reference_free=True), "nested", "lean"),
    ("tbrm_padded", dict(loss_variant="tbrm", reference_free=False), "padded", "hook"),
    ("tbrm_nested", dict(loss_variant="tbrm", reference_free=False), "nested", "hook"),
    ("tbrm_ref_free", dict(loss_variant="tbrm", reference_free=True), "nested", "hook"),
    ("brm_padded", dict(loss_variant="brm", reference_free=False), "padded", "hook"),
)


def run_correctness(device="cpu", dtype="bf16", seed=0, micro_batches=2, variants=VARIANTS,
                    loss_factory=None) -> dict:
    """Checks (a)+(b) on the tiny model. `loss_factory(cfg)` may replace `partial(tbrm_loss, cfg)` (tests use it to
    show that a broken loss is caught)."""
    with cpu_threads(device), dist_session(device):
        return _run_correctness(device, dtype, seed, micro_batches, variants, loss_factory)


def _run_correctness(device, dtype, seed, micro_batches, variants, loss_factory) -> dict:
    prepare_imports()
    from verl.utils import tensordict_utils as tu  # after prepare_imports: verl without ray

    from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

    device = torch.device(device)
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tol = TOLERANCES[dtype]
    if device.type == "cuda":  # no TF32 in the float32 check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    fwd = Forward()
    from tbrm_verl.engine import TBRMEngine  # after prepare_imports: verl's engine module is loaded (ray stand-in)
    from tbrm_verl.lean_v import LEAN_V_FLAG

    fwd_lean = Forward(TBRMEngine)
    base = qwen2(TINY, seed)
    ref_model = copy.deepcopy(base)  # float32 CPU reference, never wrapped
    if tdtype != torch.float32:
        # FSDP2 computes with the parameters rounded to bf16 (gradients flow to the fp32 master copy unchanged):
        # the reference evaluates that same function, in float32.
        with torch.no_grad():
            for p in ref_model.parameters():
                p.copy_(p.to(tdtype).float())
    model = base.to(device)
    fsdp = wrap_fsdp2(model, device, tdtype)

    B, V = 4, TINY["vocab_size"]
    # EOS at different places (padded width 20 > longest response); short responses give V(s_1) a visible share of
    # the gradient, so that a detached V cannot hide inside the bf16 tolerance
    # (rewarded trajectories, |δ| ≈ r/β = 500, dominate the gradient: reward the short ones).
    prompt_lens, resp_lens = [7, 12, 5, 9], [16, 2, 11, 1]
    prompts, resps, refs, rewards = make_sequences(B, V, prompt_lens, resp_lens, seed + 1, [0.0, 1.0, 0.0, 1.0])

    # packing sanity: transformers must honour packed position_ids with attention_mask=None (block-diagonal mask)
    with torch.no_grad():
        ids = torch.cat([torch.cat([p, r]) for p, r in zip(prompts, resps)])[None]
        pos = torch.cat([torch.arange(len(p) + len(r)) for p, r in zip(prompts, resps)])[None]
        packed = ref_model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0]
        per_seq = torch.cat(_ref_seq_logits(ref_model, prompts, resps))
        packing_err = (packed - per_seq).abs().max().item()

    results = {}
    for name, kw, layout, *path in variants:
        lean = path == ["lean"]
        cfg = TBRMLossConfig(beta=0.002, loss_scale="delta", **kw)
        # reference
        ref_model.zero_grad(set_to_none=True)
        loss_ref, v_ref, d_ref = reference_losses(_ref_seq_logits(ref_model, prompts, resps), prompt_lens, resps,
                                                  refs, rewards, cfg.beta, kw["loss_variant"], kw["reference_free"])
        loss_ref.backward()
        g_ref = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}
        g_detached = None
        if kw["loss_variant"] == "tbrm":
            ref_model.zero_grad(set_to_none=True)
            reference_losses(_ref_seq_logits(ref_model, prompts, resps), prompt_lens, resps, refs, rewards, cfg.beta,
                             "tbrm", kw["reference_free"], detach_v=True)[0].backward()
            g_detached = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}

        # device path: verl batch, split in micro-batches, loss summed (each scaled by dp_size/global_batch_size)
        batch = build_batch(prompts, resps, refs, rewards, layout, 20 if layout == "padded" else None, device)
        if lean:
            tu.assign_non_tensor(batch, distillation_use_topk=False, **{LEAN_V_FLAG: True})
        base_fn = loss_factory(cfg) if loss_factory else partial(tbrm_loss, cfg)
        hook_outputs, logits_dtypes = [], set()

        def loss_fn(model_output=None, data=None, dp_group=None, student_logits=None, _f=base_fn):
            if student_logits is not None:
                logits_dtypes.add(str(student_logits.dtype).split(".")[-1])
                out = _f(student_logits=student_logits, data=data)
                hook_outputs.append({k: v.detach().float().cpu() for k, v in out.items()})
                return out
            if lean:  # V(s_1) as TBRMEngine computed it in the forward, per token like the hook's output
                hook_outputs.append({"tbrm_v": model_output["tbrm_v"].values().detach().float().cpu()[None]})
            return _f(model_output=model_output, data=data, dp_group=dp_group)

        model.zero_grad(set_to_none=True)
        loss_dev, resid_sum, vs_dev = 0.0, 0.0, []
        for mb in tu.chunk_tensordict(batch, micro_batches):
            loss, metrics = (fwd_lean if lean else fwd)(model, mb, loss_fn, device, tdtype)
            loss.backward()
            loss_dev += float(loss.detach())
            resid_sum += float(_metric_value(metrics.get("actor/tbrm_residual_mean")))
            # V(s_1) as the hook returned it, at each sequence's last prompt position (independent index math)
            lens = (mb["prompts"].offsets().diff() + mb["responses"].offsets().diff()).cpu()
            idx = lens.cumsum(0) - mb["responses"].offsets().diff().cpu() - 1
            vs_dev.append(hook_outputs[-1]["tbrm_v"].squeeze(0)[idx])
        vs_dev = torch.cat(vs_dev)
        g_dev = {n: full(p.grad).detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = _compare(name, layout, kw, loss_dev, loss_ref.item(), vs_dev, v_ref.detach(), resid_sum,
                                 d_ref.mean().item(), g_dev, g_ref, tol, sorted(logits_dtypes), g_detached)
        results[name]["v_s1_path"] = ("TBRMEngine: B hidden rows in the forward" if lean
                                      else "verl's logits hook (distillation_use_topk)")
    passed = all(r["passed"] for r in results.values())
    return {
        "dtype": dtype, "device": str(device), "engine_path": fwd.path, "lean_engine_path": fwd_lean.path,
        "fsdp": fsdp, "micro_batches": micro_batches, "model": dict(TINY), "prompt_lens": prompt_lens,
        "response_lens": resp_lens, "rewards": rewards, "beta": 0.002, "tolerances": tol,
        "reference": "float32 on CPU, one sequence at a time, paper formula; "
        + ("parameters rounded to bf16 as FSDP2 computes with them" if dtype == "bf16" else "same parameters"),
        "packed_vs_per_sequence_max_abs_logit_diff_fp32": packing_err,
        "variants": results, "passed": passed,
    }


def _metric_value(m):
    if m is None:
        return float("nan")
    if hasattr(m, "values"):
        return sum(float(x) for x in m.values)
    return float(m)


def _global_rel(g, g_ref) -> float:
    num = sum((g[n].reshape(r.shape).double() - r.double()).square().sum().item() for n, r in g_ref.items() if n in g)
    den = sum(r.double().square().sum().item() for r in g_ref.values())
    return math.sqrt(num / max(den, 1e-300))


def _compare(name, layout, kw, loss_dev, loss_ref, v_dev, v_ref, resid_dev, resid_ref, g_dev, g_ref, tol, dtypes,
             g_detached=None):
    missing = sorted(set(g_ref) - set(g_dev))
    num = den = 0.0
    worst_tensor, worst_rel, max_abs, max_abs_rel = None, 0.0, 0.0, 0.0
    cos_num = nd = nr = 0.0
    for n, gr in g_ref.items():
        if n not in g_dev:
            continue
        gd = g_dev[n].reshape(gr.shape)
        diff = (gd - gr).double()
        num += diff.square().sum().item()
        den += gr.double().square().sum().item()
        cos_num += (gd.double() * gr.double()).sum().item()
        nd += gd.double().square().sum().item()
        nr += gr.double().square().sum().item()
        rel = diff.norm().item() / max(gr.double().norm().item(), 1e-30)
        if rel > worst_rel:
            worst_rel, worst_tensor = rel, n
        a = diff.abs().max().item()
        max_abs = max(max_abs, a)
        max_abs_rel = max(max_abs_rel, a / max(gr.abs().max().item(), 1e-30))
    grad_rel = math.sqrt(num / max(den, 1e-300))
    v_abs = (v_dev - v_ref).abs().max().item()
    v_rel = ((v_dev - v_ref).abs() / v_ref.abs().clamp(min=1e-6)).max().item()
    loss_rel = abs(loss_dev - loss_ref) / max(abs(loss_ref), 1e-30)
    checks = {
        "v_s1": v_abs <= tol["v_abs"],
        "loss": loss_rel <= tol["loss_rel"],
        "residual_mean": (abs(resid_dev - resid_ref) <= tol["residual_abs"]) if kw["loss_variant"] == "tbrm" else True,
        "grad_global": grad_rel <= tol["grad_rel_global"],
        "grad_per_tensor": worst_rel <= tol["grad_rel_tensor"],
        "all_params_have_grads": not missing,
    }
    detached = None
    if g_detached is not None:
        # u = g_ref − g_detached is the gradient that flows through V(s_1) (2/B Σ δ_i ∇V_i(s_1)). The coefficient
        # c = <g_dev − g_detached, u> / <u, u> is 1 when the device gradient contains it, 0 when V is detached. bf16
        # noise is nearly orthogonal to u, so c is a sharper test than the global error for this one pitfall.
        dot = uu = 0.0
        for n, gr in g_ref.items():
            if n in g_dev:
                u = (gr - g_detached[n]).double()
                dot += ((g_dev[n].reshape(gr.shape).double() - g_detached[n].double()) * u).sum().item()
                uu += u.square().sum().item()
        coef = dot / max(uu, 1e-300)
        detached = {"v_grad_share_rel": _global_rel(g_detached, g_ref), "v_grad_coefficient": coef}
        checks["grad_through_v_s1"] = abs(coef - 1) <= tol["v_grad_coef_abs"]
    return {
        "layout": layout, "config": kw, "hook_logits_dtype": dtypes,
        "loss": {"device": loss_dev, "reference": loss_ref, "rel_err": loss_rel},
        "v_s1": {"device": v_dev.tolist(), "reference": v_ref.tolist(), "max_abs_err": v_abs, "max_rel_err": v_rel},
        "residual_mean": {"device": resid_dev, "reference": resid_ref, "abs_err": abs(resid_dev - resid_ref)},
        "grads": {"global_rel_err": grad_rel, "worst_tensor": worst_tensor, "worst_tensor_rel_err": worst_rel,
                  "max_abs_err": max_abs, "max_abs_err_over_max_abs_ref": max_abs_rel,
                  "cosine": cos_num / max(math.sqrt(nd * nr), 1e-300), "n_tensors": len(g_ref),
                  "missing": missing, "v_detached_discrimination": detached},
        "checks": checks, "passed": all(checks.values()),
    }

