"""Device checks of the TBRM loss that a CPU cannot make: bf16 numerics on the GPU and the logits hook's overhead.

    python -m tbrm_verl.gpu_check                                          # after the GPU install (<1 min, est.)
    python -m tbrm_verl.gpu_check bundle --out DIR --python-version 3.12   # here; then, on a bare GPU machine
    bash DIR/run.sh                                                        #   (torch, transformers, no network;
                                                                           #   1-1.5 min, estimated)
    python -m tbrm_verl.gpu_check --device cpu --out /tmp/gpu_check.json   # same checks, small shapes (<1 min)

Writes one JSON (default docs/gpu_check.json; DIR/gpu_check.json from the bundle) whose fields docs/gpu_check.md
explains: `passed` and `failed_checks` first, then every number. Exits 0 when every check passed, 1 when one failed,
2 when a required module is missing.

Always runs verl's own engine code: FSDPEngineWithLMHead.prepare_model_inputs/prepare_model_outputs build the packed
inputs, call the logits hook and the loss, as in training. Ray and vLLM are not needed: when `import ray` fails,
verl's package `__init__` (which imports ray through `verl.protocol`) is skipped, and verl's FSDP engine module
(which imports ray at import time: verl.utils.checkpoint -> verl.single_controller, only `ray.remote`/`ray.ObjectRef`
as names) is imported with a temporary stand-in `ray` module, removed again afterwards. Ray's wheel is too large for
the bundle (tbrm_verl/tools/gpu_bundle.py says what the bundle carries and why). The model is wrapped by this script in
torch FSDP2 (`fully_shard` per decoder layer + root, MixedPrecisionPolicy(param bf16, reduce fp32), like verl's
`apply_fsdp2`) on a single-rank process group and run under autocast, as verl's engine does.

Checks:
  (a)+(b) correctness: a tiny random Qwen2 (hidden 128, 2 layers, 4 heads, head_dim 32, vocab 512) runs the TBRM
      loss through verl's dual-call contract (logits hook -> per-token `tbrm_v`, then the loss call) on packed
      micro-batches built as verl builds them (nested input_ids/position_ids/prompts/responses; response-side
      fields padded [B, R] or nested as the v1 trainer stores them); V(s_1), the loss, the mean residual and the
      gradient of every parameter are compared with a float32 CPU reference computed per sequence (no packing)
      straight from the paper's formula. Variants: TBRM (padded and nested layouts), reference-free TBRM, and the
      classical-BRM ablation. Run in float32 (tight tolerances) and bf16 (bf16 tolerances).
  (c) overhead: forward+backward of the TBRM loss vs a plain log-prob loss (sum of response log-probs) on a
      larger shape (lm head 151936 x 1536, 2 layers, 4 x 2048 tokens on a GPU): CUDA-event time, peak
      `max_memory_allocated`, and a dispatch-level scan for float32 [tokens, vocab] tensors. Target: <= 3% time
      overhead, no float32 [tokens, vocab] copy. The time target is reported, not enforced (it depends on the
      machine); the float32-copy scan is a correctness check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from functools import partial

_T0 = time.time()  # wall time counts from here (before torch's import) when not run by the bundle's run.sh

import torch  # noqa: E402

__all__ = ["prepare_imports", "run_correctness", "run_overhead", "run_all", "main", "reference_losses"]

# Tolerances. fp32: the device path (packed, FSDP2, verl's slicing) must agree with the per-sequence reference up to
# float32 round-off. bf16: model weights/activations are rounded to bf16 (8 bits of mantissa, ~0.4% relative per
# op) while the reference runs in float32; the logsumexp is float32 in both.
TOLERANCES = {
    "fp32": {"v_abs": 1e-4, "loss_rel": 1e-5, "residual_abs": 1e-3, "grad_rel_global": 1e-4, "grad_rel_tensor": 1e-3,
             "v_grad_coef_abs": 1e-3},
    "bf16": {"v_abs": 5e-2, "loss_rel": 2e-3, "residual_abs": 0.5, "grad_rel_global": 5e-2, "grad_rel_tensor": 1e-1,
             "v_grad_coef_abs": 0.3},
}
OVERHEAD_TARGET = 0.03

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)
BENCH_GPU = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                 num_attention_heads=12, num_key_value_heads=2, head_dim=128, n_seqs=4, seq_len=2048, prompt_len=256,
                 reps=5, warmup=2)
# More tokens than the loss's row chunk for the entropy metric (1024): only then is a chunked float32 temporary
# smaller than [tokens, vocab] and the scan able to tell it from a full copy (the GPU shape has 8192 tokens).
BENCH_CPU = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, n_seqs=4, seq_len=320, prompt_len=32, reps=3, warmup=1)


# ------------------------------------------------------------------------------------------------------ imports
_ENV: dict = {}


def prepare_imports() -> dict:
    """Import verl's light modules and its FSDP engine class, without ray if ray is absent (verl's package
    `__init__` skipped, a stand-in `ray` during the engine import). Raises ImportError naming what is missing."""
    if _ENV:
        return _ENV
    info = {}
    try:
        import ray  # noqa: F401

        info["ray"] = "available"
    except Exception as e:  # noqa: BLE001
        info["ray"] = f"missing ({type(e).__name__})"
        if "verl" not in sys.modules:
            spec = importlib.util.find_spec("verl")
            if spec is None:
                raise ImportError("verl is not installed: pip install --no-deps verl==0.9.1") from None
            pkg = types.ModuleType("verl")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__file__ = spec.origin
            pkg.__spec__ = spec
            sys.modules["verl"] = pkg  # skip verl/__init__.py (it imports ray via verl.protocol)
            info["verl_init"] = "skipped (package __init__ imports ray)"
    for mod in ("tensordict", "verl.workers.utils.padding", "verl.utils.metric", "verl.utils.torch_functional",
                "verl.utils.tensordict_utils"):
        importlib.import_module(mod)
    from verl.utils import torch_functional as vF

    info["flash_attn_cross_entropy"] = bool(vF.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE)
    try:
        info["engine_class"] = _import_engine_class(info["ray"] == "available")
    except ImportError as e:
        raise ImportError(f"{e} (imported by verl's FSDP engine module)") from e
    info["engine_import"] = "ok" + ("" if info["ray"] == "available" else " (ray stand-in during import)")
    _ENV.update(info)
    return _ENV


def _import_engine_class(have_ray: bool):
    if have_ray:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        return FSDPEngineWithLMHead

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            sub = _Stub(f"{self.__name__}.{name}")
            sub.__spec__ = importlib.machinery.ModuleSpec(sub.__name__, None)
            sys.modules[sub.__name__] = sub
            return sub

        def __call__(self, *a, **k):
            return a[0] if len(a) == 1 and callable(a[0]) and not k else self

    before = set(sys.modules)
    stub = _Stub("ray")
    stub.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    stub.__path__ = []
    sys.modules["ray"] = stub
    try:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        return FSDPEngineWithLMHead
    finally:
        for name in [n for n in sys.modules if (n == "ray" or n.startswith("ray.")) and n not in before]:
            del sys.modules[name]


# ------------------------------------------------------------------------------------------------ distributed
@contextlib.contextmanager
def _dist_session(device):
    """A single-rank process group for FSDP2 (no network: an in-memory HashStore). Destroyed afterwards if this
    function created it, so that a test session can create its own later."""
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    created = False
    if not dist.is_initialized():
        backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
        for i, backend in enumerate(backends):
            try:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
                created = True
                break
            except Exception:  # noqa: BLE001
                if i == len(backends) - 1:
                    raise
    try:
        yield dist.get_backend()
    finally:
        if created:
            dist.destroy_process_group()


def _wrap_fsdp2(model, device: torch.device, dtype: torch.dtype) -> str:
    """FSDP2 like verl's apply_fsdp2: fully_shard each decoder layer, then the root; bf16 params, fp32 reduce."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    backend = dist.get_backend()
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return f"torch FSDP2 fully_shard (1 rank, {backend}), param_dtype={str(dtype).split('.')[-1]}, reduce fp32"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -------------------------------------------------------------------------------------------------- model/data
def _qwen2(spec: dict, seed: int, device="cpu", init_range: float = 0.1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
    cfg = Qwen2Config(**{k: spec[k] for k in keys}, max_position_embeddings=4096, tie_word_embeddings=False,
                      initializer_range=init_range, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.float()


def _make_sequences(B, vocab, prompt_lens, resp_lens, seed, rewards=None):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (p,), generator=g) for p in prompt_lens]
    resps = [torch.randint(0, vocab, (r,), generator=g) for r in resp_lens]
    # reference log-probs: arbitrary data in (-6, -0.5); rewards 0/1 on the last response token
    refs = [-(0.5 + 5.5 * torch.rand(r, generator=g)) for r in resp_lens]
    rewards = list(rewards) if rewards is not None else [float(i % 2 == 0) for i in range(B)]
    return prompts, resps, refs, rewards


def _build_batch(prompts, resps, refs, rewards, layout: str, max_response_len: int | None, device):
    """A verl actor-update batch after `left_right_2_no_padding` (layout 'padded') or as the v1 trainer's
    TransferQueue holds it (layout 'nested': every per-sample field jagged)."""
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu

    B = len(prompts)
    nest = lambda xs: torch.nested.as_nested_tensor(list(xs), layout=torch.jagged)  # noqa: E731
    lens = [len(r) for r in resps]
    fields = {
        "input_ids": nest(torch.cat([p, r]) for p, r in zip(prompts, resps)),
        "position_ids": nest(torch.arange(len(p) + len(r)) for p, r in zip(prompts, resps)),
        "prompts": nest(prompts),
        "responses": nest(resps),
    }
    if layout == "padded":
        R = max_response_len or max(lens)
        mask = torch.zeros(B, R, dtype=torch.int64)
        scores = torch.zeros(B, R)
        ref = torch.full((B, R), float("nan"))  # padding holds garbage in verl's padded tensors: must be masked
        for i, L in enumerate(lens):
            mask[i, :L] = 1
            scores[i, L - 1] = rewards[i]
            ref[i, :L] = refs[i]
        fields.update(response_mask=mask, loss_mask=mask, rm_scores=scores, ref_log_prob=ref)
    else:
        fields["response_mask"] = nest(torch.ones(L, dtype=torch.int64) for L in lens)
        fields["loss_mask"] = fields["response_mask"]
        fields["rm_scores"] = nest(torch.cat([torch.zeros(L - 1), torch.tensor([rewards[i]])]) for i, L in
                                   enumerate(lens))
        fields["ref_log_prob"] = nest(refs)
    td = TensorDict(fields, batch_size=[B])
    nt = dict(dp_size=1, global_batch_size=B, temperature=1.0, use_remove_padding=True, use_fused_kernels=False,
              calculate_entropy=False, distillation_use_topk=True, batch_num_tokens=int(sum(lens)))
    if layout == "padded":
        nt["max_response_len"] = int(fields["response_mask"].shape[1])
    tu.assign_non_tensor(td, **nt)
    return td.to(device)


# ------------------------------------------------------------------------------------------- verl forward path
def _engine_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}.prepare_model_inputs/prepare_model_outputs"


class _Forward:
    """One micro-batch through verl's FSDP engine forward path, with verl's own methods:
    FSDPEngineWithLMHead.prepare_model_inputs -> model (autocast) -> prepare_model_outputs (logits hook) -> loss.
    The engine object is created without __init__ (no optimizer, no checkpoint manager): on this path (remove-padding,
    no Ulysses, no padding to a fixed length) the two methods read only the attributes set here."""

    def __init__(self, cls=None):
        cls = cls or prepare_imports()["engine_class"]
        self.path = _engine_path(cls)
        eng = object.__new__(cls)
        eng.pad_to_length = False
        eng.use_ulysses_sp = False
        eng.ulysses_sequence_parallel_size = 1
        self.engine_obj = eng

    def __call__(self, model, mb, loss_fn, device: torch.device, dtype: torch.dtype):
        ctx = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
               else contextlib.nullcontext())
        self.engine_obj.module = model  # TBRMEngine puts its V(s_1) hooks on the module the engine runs
        inputs, out_args = self.engine_obj.prepare_model_inputs(micro_batch=mb)
        with ctx:
            raw = model(**inputs, use_cache=False)
            model_output = self.engine_obj.prepare_model_outputs(
                output=raw, output_args=out_args, micro_batch=mb, logits_processor_func=loss_fn)
            return loss_fn(model_output=model_output, data=mb, dp_group=None)


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


def _cpu_threads(device, n: int = 1):
    """Tiny CPU workloads: one intra-op thread (OpenMP spin-waiting on a busy machine makes 2-thread tiny matmuls
    ~100x slower). Restored afterwards: the process may be a test session."""
    from tbrm_verl.tasks.embedded import _torch_threads

    return _torch_threads(n) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def run_correctness(device="cpu", dtype="bf16", seed=0, micro_batches=2, variants=VARIANTS,
                    loss_factory=None) -> dict:
    """Checks (a)+(b) on the tiny model. `loss_factory(cfg)` may replace `partial(tbrm_loss, cfg)` (tests use it to
    show that a broken loss is caught)."""
    with _cpu_threads(device), _dist_session(device):
        return _run_correctness(device, dtype, seed, micro_batches, variants, loss_factory)


def _run_correctness(device, dtype, seed, micro_batches, variants, loss_factory) -> dict:
    from verl.utils import tensordict_utils as tu

    from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

    prepare_imports()
    device = torch.device(device)
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tol = TOLERANCES[dtype]
    if device.type == "cuda":  # no TF32 in the float32 check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    fwd = _Forward()
    from tbrm_verl.engine import TBRMEngine  # after prepare_imports: verl's engine module is loaded (ray stand-in)
    from tbrm_verl.lean_v import LEAN_V_FLAG

    fwd_lean = _Forward(TBRMEngine)
    base = _qwen2(TINY, seed)
    ref_model = copy.deepcopy(base)  # float32 CPU reference, never wrapped
    if tdtype != torch.float32:
        # FSDP2 computes with the parameters rounded to bf16 (gradients flow to the fp32 master copy unchanged):
        # the reference evaluates that same function, in float32.
        with torch.no_grad():
            for p in ref_model.parameters():
                p.copy_(p.to(tdtype).float())
    model = base.to(device)
    fsdp = _wrap_fsdp2(model, device, tdtype)

    B, V = 4, TINY["vocab_size"]
    # EOS at different places (padded width 20 > longest response); short responses give V(s_1) a visible share of
    # the gradient, so that a detached V cannot hide inside the bf16 tolerance
    # (rewarded trajectories, |δ| ≈ r/β = 500, dominate the gradient: reward the short ones).
    prompt_lens, resp_lens = [7, 12, 5, 9], [16, 2, 11, 1]
    prompts, resps, refs, rewards = _make_sequences(B, V, prompt_lens, resp_lens, seed + 1, [0.0, 1.0, 0.0, 1.0])

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
        batch = _build_batch(prompts, resps, refs, rewards, layout, 20 if layout == "padded" else None, device)
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
        g_dev = {n: _full(p.grad).detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = _compare(name, layout, kw, loss_dev, loss_ref.item(), vs_dev, v_ref.detach(), resid_sum,
                                 d_ref.mean().item(), g_dev, g_ref, tol, sorted(logits_dtypes), g_detached)
        results[name]["v_s1_path"] = ("TBRMEngine: B hidden rows in the forward" if lean
                                      else "verl's logits hook (distillation_use_topk)")
    passed = all(r["passed"] for r in results.values())
    return {
        "dtype": dtype, "device": str(device), "engine_path": fwd.path, "lean_engine_path": fwd_lean.path, "fsdp": fsdp, "micro_batches": micro_batches,
        "model": dict(TINY), "prompt_lens": prompt_lens, "response_lens": resp_lens, "rewards": rewards,
        "beta": 0.002, "tolerances": tol, "reference": "float32 on CPU, one sequence at a time, paper formula; "
        + ("parameters rounded to bf16 as FSDP2 computes with them" if dtype == "bf16" else "same parameters"), "packed_vs_per_sequence_max_abs_logit_diff_fp32": packing_err,
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
    with _cpu_threads(device), _dist_session(device):
        return _run_overhead(device, dtype, spec, seed)


def _run_overhead(device, dtype, spec, seed) -> dict:
    from verl.utils import tensordict_utils as tu

    from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

    prepare_imports()
    device = torch.device(device)
    spec = dict(spec or (BENCH_GPU if device.type == "cuda" else BENCH_CPU))
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    fwd = _Forward()
    model = _qwen2(spec, seed, device=device, init_range=0.02)
    fsdp = _wrap_fsdp2(model, device, tdtype)
    n, S, P = spec["n_seqs"], spec["seq_len"], spec["prompt_len"]
    prompts, resps, refs, rewards = _make_sequences(n, spec["vocab_size"], [P] * n, [S - P] * n, seed + 7)
    batch = _build_batch(prompts, resps, refs, rewards, "nested", None, device)
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
        "logprob_kernel": "flash-attn triton cross-entropy" if _ENV.get("flash_attn_cross_entropy")
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


# -------------------------------------------------------------------------------------------------------- main
def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib import metadata

    for pkg in ("transformers", "tensordict", "verl", "triton", "flash-attn"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _bundle_record():
    """What run.sh installed from the bundle and what it reused from the machine (None when not run by run.sh)."""
    path = os.environ.get("TBRM_GPU_CHECK_BUNDLE")
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def failed_checks(res: dict) -> list[str]:
    """Dotted names of the correctness checks that failed (the overhead *time* target is reported, not a check)."""
    bad = [f"correctness.{dt}.{name}.{k}" for dt, c in res["correctness"].items()
           for name, r in c["variants"].items() for k, ok in r["checks"].items() if not ok]
    o = res.get("overhead")
    if o is not None and not o["no_float32_tokens_x_vocab_copy"]:
        bad.append("overhead.no_float32_tokens_x_vocab_copy")
    m = res.get("update_memory")
    if m is not None and not m["target_met"]:
        bad.append("update_memory.lean_peak_within_2pct_of_plain")
    return bad


# (a) plain log-prob update, (b) logits hook, (c) lean V(s_1): one micro-batch at the 1.5B recipe's shapes on a GPU
# (Qwen2.5-Math-1.5B: vocab 151,936, hidden 1536, tied; actor micro-batch 4 of up to 1024 + 2048 tokens; two decoder
# layers suffice: the update's extra memory is at the output layer)
UPDATE_MEMORY_GPU = dict(tokens=8192, n_seqs=4, vocab=151936, hidden=1536, layers=2, tie=True)


def run_update_memory(device) -> dict:
    from tbrm_verl.tools import update_memory

    return update_memory.measure(**UPDATE_MEMORY_GPU)


def run_all(device="auto", dtypes=("fp32", "bf16"), overhead=True, bench_spec=None) -> dict:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    env = prepare_imports()
    cls = env["engine_class"]
    # verdict first: the JSON is read by a person
    out = {
        "passed": None, "failed_checks": None, "notes": [], "wall_time_s": None,
        "device": _device_name(dev), "device_type": dev.type, "ran_on_gpu": dev.type == "cuda",
        "cuda": torch.version.cuda, "versions": _versions(),
        "engine_path": _engine_path(cls),
        "engine_source": inspect.getsourcefile(cls),
        "imports": {k: v for k, v in env.items() if k != "engine_class"}, "bundle": _bundle_record(),
        "correctness": {}, "overhead": None, "update_memory": None,
    }
    for dt in dtypes:
        out["correctness"][dt] = run_correctness(dev, dt)
    if overhead:
        out["overhead"] = run_overhead(dev, "bf16", spec=bench_spec)
        if dev.type == "cuda":  # on the CPU: `python -m tbrm_verl.bench memory` (verl's engine moves data to its device)
            out["update_memory"] = run_update_memory(dev)
    out["failed_checks"] = failed_checks(out)
    out["passed"] = not out["failed_checks"]
    if dev.type != "cuda":
        out["notes"].append("ran on the CPU with small shapes: run on a GPU for the bf16 device numerics and timing")
    if out["overhead"] is not None and not out["overhead"]["overhead_target_met"]:
        out["notes"].append(f"hook time overhead {out['overhead']['overhead_frac']:+.1%} is above the "
                            f"{OVERHEAD_TARGET:.0%} target (reported, not a pass/fail check)")
    out["wall_time_s"] = time.time() - _start_time()
    return out


def _start_time() -> float:
    """run.sh exports its start (wheel install included); otherwise this module's import (before torch's) in a
    `python -m tbrm_verl.gpu_check` process, or the latest `main()` call when imported by another program."""
    try:
        return float(os.environ["TBRM_GPU_CHECK_T0"])
    except (KeyError, ValueError):
        return _T0 if __name__ == "__main__" else _MAIN_T0


def _summary(res: dict) -> str:
    L = [f"TBRM device check on {res['device']} (torch {res['versions']['torch']}, transformers "
         f"{res['versions']['transformers']}, verl {res['versions']['verl']}; ray {res['imports'].get('ray')}; "
         f"verl engine import: {res['imports'].get('engine_import')})", f"engine: {res['engine_path']} from "
         f"{res['engine_source']}"]
    for dt, c in res["correctness"].items():
        L.append(f"[{'PASS' if c['passed'] else 'FAIL'}] correctness {dt}: {c['engine_path']}; {c['fsdp']}; "
                 f"packed-vs-per-seq logits diff {c['packed_vs_per_sequence_max_abs_logit_diff_fp32']:.1e}")
        for name, r in c["variants"].items():
            bad = [k for k, ok in r["checks"].items() if not ok]
            L.append(f"    {'ok  ' if r['passed'] else 'FAIL'} {name:14s} V(s1) max|err| {r['v_s1']['max_abs_err']:.2e}"
                     f"  loss rel {r['loss']['rel_err']:.2e}  mean δ err {r['residual_mean']['abs_err']:.2e}  grad "
                     f"rel {r['grads']['global_rel_err']:.2e} (worst tensor {r['grads']['worst_tensor_rel_err']:.2e},"
                     f" max|err| {r['grads']['max_abs_err']:.2e}, cos {r['grads']['cosine']:.6f})  hook logits "
                     f"{','.join(r['hook_logits_dtype'])}" + (f"  failed: {bad}" if bad else ""))
    o = res.get("overhead")
    if o:
        mem = (f"peak {o['peak_alloc_gib']['plain']:.2f} -> {o['peak_alloc_gib']['tbrm']:.2f} GiB (delta "
               f"{o['peak_delta_gib']:+.3f} = {o['peak_delta_in_bf16_tokens_x_vocab']:+.2f} x bf16 [tokens,vocab])"
               if o["peak_delta_gib"] is not None else "peak memory: n/a on CPU")
        L.append(f"[{'met' if o['overhead_target_met'] else 'MISSED'}] hook overhead {o['overhead_frac'] * 100:+.2f}% "
                 f"({o['median_s']['plain'] * 1e3:.1f} -> {o['median_s']['tbrm'] * 1e3:.1f} ms, {o['tokens']} tokens, "
                 f"vocab {o['shape']['vocab_size']}, {o['logprob_kernel']}; target <= {o['overhead_target']:.0%})")
        L.append(f"[{'PASS' if o['no_float32_tokens_x_vocab_copy'] else 'FAIL'}] no float32 [tokens, vocab] copy: "
                 f"scan fp32 full-size tensors plain {o['large_tensor_scan']['plain']['float32_count']} / tbrm "
                 f"{o['large_tensor_scan']['tbrm']['float32_count']}; half-precision full-size tensors plain "
                 f"{o['large_tensor_scan']['plain']['half_count']} / tbrm {o['large_tensor_scan']['tbrm']['half_count']}"
                 f"; {mem}")
    m = res.get("update_memory")
    if m:
        gb = 2 ** 30
        L.append(f"[{'PASS' if m['target_met'] else 'FAIL'}] one actor update, {m['tokens']} tokens x vocab {m['vocab']}"
                 f" ({m['method'].split(':')[0]}): peak plain {m['plain_peak_bytes'] / gb:.2f} GiB, logits hook "
                 f"{m['hook_peak_bytes'] / gb:.2f} GiB, lean V(s_1) {m['lean_peak_bytes'] / gb:.2f} GiB "
                 f"(lean/plain {m['lean_over_plain']:.4f}, target <= 1.02)")
    L.extend(f"note: {n}" for n in res["notes"])
    L.append(f"overall: {'PASS' if res['passed'] else 'FAIL'}" + (f" (failed: {', '.join(res['failed_checks'])})"
             if res["failed_checks"] else "") + f"  ({res['wall_time_s']:.1f} s)")
    return "\n".join(L)


_MAIN_T0 = _T0


def main(argv=None) -> int:
    global _MAIN_T0
    _MAIN_T0 = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bundle"]:
        from tbrm_verl.tools import gpu_bundle

        return gpu_bundle.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.gpu_check", description=__doc__.split("\n")[0],
                                 epilog="python -m tbrm_verl.gpu_check bundle --out DIR [--python-version 3.12]: "
                                 "a folder that runs this check offline on a GPU machine without verl "
                                 "(docs/gpu_check.md)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--out", default="docs/gpu_check.json")
    ap.add_argument("--dtypes", default="fp32,bf16", help="correctness dtypes, comma-separated (fp32, bf16)")
    ap.add_argument("--no-overhead", action="store_true", help="skip check (c) and the update-memory measurement")
    ap.add_argument("--bench-seqs", type=int)
    ap.add_argument("--bench-seq-len", type=int)
    ap.add_argument("--bench-vocab", type=int)
    ap.add_argument("--bench-reps", type=int)
    a = ap.parse_args(argv)
    try:
        prepare_imports()
    except ImportError as e:
        print(f"gpu_check: missing module: {e}; install the project (pip install -e \".[gpu]\") or, on a machine "
              f"without network, run the bundle: python -m tbrm_verl.gpu_check bundle --out DIR (docs/gpu_check.md)")
        return 2
    dev = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    spec = dict(BENCH_GPU if torch.device(dev).type == "cuda" else BENCH_CPU)
    for k, v in (("n_seqs", a.bench_seqs), ("seq_len", a.bench_seq_len), ("vocab_size", a.bench_vocab),
                 ("reps", a.bench_reps)):
        if v:
            spec[k] = v
    res = run_all(dev, tuple(x for x in a.dtypes.split(",") if x), not a.no_overhead, spec)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, default=str)
    print(_summary(res))
    if a.out:
        print(f"wrote {a.out}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
