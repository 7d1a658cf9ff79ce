"""Measurements: (c) the logits hook's time and memory overhead in one actor forward+backward against a plain
log-prob loss, with a dispatch-level scan for float32 [tokens, vocab] tensors; on a GPU, the peak memory of one
actor update plain / logits hook / lean V(s_1) at the 1.5B recipe's shapes (tbrm_verl/tools/update_memory.py)."""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from tbrm_verl.tools.bare_imports import prepare_imports
from tbrm_verl.tools.gpu_check.harness import (
    Forward,
    build_batch,
    cpu_threads,
    dist_session,
    make_sequences,
    qwen2,
    wrap_fsdp2,
)

OVERHEAD_TARGET = 0.03
BENCH_GPU = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                 num_attention_heads=12, num_key_value_heads=2, head_dim=128, n_seqs=4, seq_len=2048, prompt_len=256,
                 reps=5, warmup=2)
# More tokens than the loss's row chunk for the entropy metric (1024): only then is a chunked float32 temporary
# smaller than [tokens, vocab] and the scan able to tell it from a full copy (the GPU shape has 8192 tokens).
BENCH_CPU = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, n_seqs=4, seq_len=320, prompt_len=32, reps=3, warmup=1)


# (a) plain log-prob update, (b) logits hook, (c) lean V(s_1): one micro-batch at the 1.5B recipe's shapes on a GPU
# (Qwen2.5-Math-1.5B: vocab 151,936, hidden 1536, tied; actor micro-batch 4 of up to 1024 + 2048 tokens; two decoder
# layers suffice: the update's extra memory is at the output layer)
UPDATE_MEMORY_GPU = dict(tokens=8192, n_seqs=4, vocab=151936, hidden=1536, layers=2, tie=True)


def run_update_memory(device) -> dict:
    """Peak memory of one actor update, plain / logits hook / lean V(s_1) (GPU only: run_all calls it on cuda)."""
    from tbrm_verl.tools import update_memory

    return update_memory.measure(**UPDATE_MEMORY_GPU)


# ---------------------------------------------------------------------------------------------------- overhead
class _LargeTensorScan:
    """TorchDispatchMode that records every op output with >= `threshold` elements (forward and backward)."""

    def __init__(self, threshold: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        scan = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if getattr(func, "is_view", False):  # views allocate nothing
                    return out
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor) and t.numel() >= scan.threshold:
                        scan.found.append((str(func), str(t.dtype).split(".")[-1], tuple(t.shape)))
                return out

        self.threshold, self.found, self.mode = threshold, [], _Mode()

    def summary(self) -> dict:
        f32 = [f for f in self.found if f[1] == "float32"]
        low = [f for f in self.found if f[1] in ("bfloat16", "float16")]
        return {"float32_count": len(f32), "float32_ops": sorted({f[0] for f in f32}),
                "half_count": len(low), "half_ops": sorted({f[0] for f in low})}


def _plain_logprob_loss(model_output=None, data=None, dp_group=None, student_logits=None):
    """Baseline: sum of response log-probs (verl's actor forward/backward without the hook)."""
    from verl.workers.utils.padding import no_padding_2_padding

    lp = no_padding_2_padding(model_output["log_probs"], data).float()
    mask = data.select("response_mask").to_padded_tensor()["response_mask"].bool()
    lp = lp[:, : mask.shape[1]]
    return -torch.where(mask, lp, 0.0).sum() / data["global_batch_size"] * data["dp_size"], {}


def run_overhead(device="cpu", dtype="bf16", spec=None, seed=0) -> dict:
    """Check (c): time and peak memory of TBRM loss fwd+bwd vs a plain log-prob fwd+bwd, and a scan for float32
    [tokens, vocab] tensors created by either."""
    with cpu_threads(device), dist_session(device):
        return _run_overhead(device, dtype, spec, seed)


def _run_overhead(device, dtype, spec, seed) -> dict:
    env = prepare_imports()
    from verl.utils import tensordict_utils as tu  # after prepare_imports: verl without ray

    from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

    device = torch.device(device)
    spec = dict(spec or (BENCH_GPU if device.type == "cuda" else BENCH_CPU))
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    fwd = Forward()
    model = qwen2(spec, seed, device=device, init_range=0.02)
    fsdp = wrap_fsdp2(model, device, tdtype)
    n, S, P = spec["n_seqs"], spec["seq_len"], spec["prompt_len"]
    prompts, resps, refs, rewards = make_sequences(n, spec["vocab_size"], [P] * n, [S - P] * n, seed + 7)
    batch = build_batch(prompts, resps, refs, rewards, "nested", None, device)
    plain_batch = batch.clone()
    tu.assign_non_tensor(plain_batch, distillation_use_topk=False)
    tbrm_fn = partial(tbrm_loss, TBRMLossConfig(beta=0.002))
    nnz, V = n * S, spec["vocab_size"]
    cuda = device.type == "cuda"

    def step(which):
        mb, fn = (batch, tbrm_fn) if which == "tbrm" else (plain_batch, _plain_logprob_loss)
        loss, _ = fwd(model, mb, fn, device, tdtype)
        loss.backward()

    def timed(which):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(which)
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e) / 1e3, (torch.cuda.max_memory_allocated() - base_mem) / 2**30
        t0 = time.perf_counter()
        step(which)
        return time.perf_counter() - t0, None

    for _ in range(spec["warmup"]):
        timed("plain"), timed("tbrm")
    times = {"plain": [], "tbrm": []}
    peaks = {"plain": [], "tbrm": []}
    for _ in range(spec["reps"]):
        for which in ("plain", "tbrm") if _ % 2 == 0 else ("tbrm", "plain"):  # alternate order against drift
            t, m = timed(which)
            times[which].append(t)
            peaks[which].append(m)
    scans = {}
    for which in ("plain", "tbrm"):
        model.zero_grad(set_to_none=True)
        scan = _LargeTensorScan(nnz * V)
        with scan.mode:
            step(which)
        scans[which] = scan.summary()
    model.zero_grad(set_to_none=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["tbrm"] / med["plain"] - 1
    peak = {k: (max(v) if cuda else None) for k, v in peaks.items()}
    f32_copy_gib = nnz * V * 4 / 2**30
    mem_delta = (peak["tbrm"] - peak["plain"]) if cuda else None
    extra_f32 = scans["tbrm"]["float32_count"] - scans["plain"]["float32_count"]
    # the scan is the check (it sees every op output, forward and backward); the memory delta is reported
    no_f32_copy = scans["tbrm"]["float32_count"] == 0
    return {
        "device": str(device), "dtype": dtype, "engine_path": fwd.path, "fsdp": fsdp,
        "shape": {k: spec[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "n_seqs", "seq_len", "prompt_len")},
        "tokens": nnz, "timer": "torch.cuda.Event" if cuda else "time.perf_counter",
        "logprob_kernel": "flash-attn triton cross-entropy" if env["flash_attn_cross_entropy"]
        else "verl logprobs_from_logits_v2 (row loop)",
        "times_s": times, "median_s": med, "overhead_frac": overhead, "overhead_ms": (med["tbrm"] - med["plain"]) * 1e3,
        "peak_alloc_gib": peak, "peak_delta_gib": mem_delta, "float32_tokens_x_vocab_gib": f32_copy_gib,
        "bf16_tokens_x_vocab_gib": nnz * V * 2 / 2**30,
        "peak_delta_in_bf16_tokens_x_vocab": (mem_delta / (nnz * V * 2 / 2**30)) if cuda else None,
        "large_tensor_scan": scans, "extra_float32_full_size_tensors": extra_f32,
        "extra_half_full_size_tensors": scans["tbrm"]["half_count"] - scans["plain"]["half_count"],
        "overhead_target": OVERHEAD_TARGET, "overhead_target_met": overhead <= OVERHEAD_TARGET,
        "no_float32_tokens_x_vocab_copy": no_f32_copy,
    }

