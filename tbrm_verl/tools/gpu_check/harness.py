"""What every device check runs on: a single-rank FSDP2 process group, a random Qwen2, verl actor-update batches, and
one micro-batch through verl's own FSDP engine methods (the model wrapped as verl's `apply_fsdp2` wraps it)."""

from __future__ import annotations

import contextlib

import torch

from tbrm_verl.tools.bare_imports import prepare_imports

# the correctness checks' model (the overhead measurement's shapes are in measure.py)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


# ------------------------------------------------------------------------------------------------ distributed
@contextlib.contextmanager
def dist_session(device):
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


def cpu_threads(device, n: int = 1):
    """Tiny CPU workloads: one intra-op thread (OpenMP spin-waiting on a busy machine makes 2-thread tiny matmuls
    ~100x slower). Restored afterwards: the process may be a test session."""
    from tbrm_verl.tasks.embedded import _torch_threads

    return _torch_threads(n) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def wrap_fsdp2(model, device: torch.device, dtype: torch.dtype) -> str:
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


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -------------------------------------------------------------------------------------------------- model/data
def qwen2(spec: dict, seed: int, device="cpu", init_range: float = 0.1):
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


def make_sequences(B, vocab, prompt_lens, resp_lens, seed, rewards=None):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (p,), generator=g) for p in prompt_lens]
    resps = [torch.randint(0, vocab, (r,), generator=g) for r in resp_lens]
    # reference log-probs: arbitrary data in (-6, -0.5); rewards 0/1 on the last response token
    refs = [-(0.5 + 5.5 * torch.rand(r, generator=g)) for r in resp_lens]
    rewards = list(rewards) if rewards is not None else [float(i % 2 == 0) for i in range(B)]
    return prompts, resps, refs, rewards


def build_batch(prompts, resps, refs, rewards, layout: str, max_response_len: int | None, device):
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
def engine_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}.prepare_model_inputs/prepare_model_outputs"


class Forward:
    """One micro-batch through verl's FSDP engine forward path, with verl's own methods:
    FSDPEngineWithLMHead.prepare_model_inputs -> model (autocast) -> prepare_model_outputs (logits hook) -> loss.
    The engine object is created without __init__ (no optimizer, no checkpoint manager): on this path (remove-padding,
    no Ulysses, no padding to a fixed length) the two methods read only the attributes set here."""

    def __init__(self, cls=None):
        cls = cls or prepare_imports()["engine_class"]
        self.path = engine_path(cls)
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
