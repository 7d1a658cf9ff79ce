"""`python -m tbrm_verl.bench memory --out-dir D`: peak memory of one actor update, plain vs logits hook vs lean V.

One micro-batch of several thousand tokens through a tiny Qwen2 with a Qwen-sized vocabulary (152,064), in one
process, three times on the same model and data, each a forward and backward through verl's engine code
(`forward_step`: prepare_model_inputs -> model -> prepare_model_outputs -> loss, then `loss.backward()`):

* plain — verl's FSDPEngineWithLMHead and a log-prob loss of the same shape (what GRPO's update does: the loss
  reads only the response tokens' log-probs);
* hook  — today's TBRM path before tbrm_verl/lean_v.py: verl's logits hook (`distillation_use_topk`), V(s_1) from
  the full logits;
* lean  — TBRMEngine with `tbrm_lean_v`: V(s_1) from B hidden rows inside the forward (the default TBRM path).

Peak memory of each update is measured on the tensors themselves, relative to what is live before it starts
(model, parameters and the micro-batch, built beforehand): on CUDA `torch.cuda.max_memory_allocated`; on CPU the
allocator's own allocation and free events (torch.profiler with profile_memory), summed in order, whose running
maximum is the peak of live tensor bytes (frees of blocks allocated before are not reported, so it never
under-estimates). Writes D/update_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

QWEN_VOCAB = 152064


def _select_platform() -> None:
    import torch

    if not torch.cuda.is_available():  # before verl is imported: its plugin reads these
        os.environ.setdefault("VERL_PLATFORM", "cpu")
        os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")


def build_model(vocab: int, hidden: int, layers: int, tie: bool, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                      max_position_embeddings=8192, tie_word_embeddings=tie)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).to(device).train()


def micro_batch(n_seqs: int, prompt_len: int, response_len: int, vocab: int, flags: dict, seed: int = 0):
    """verl's NO_PADDING micro-batch (nested input_ids etc.) with the fields the three losses read."""
    import torch
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode

    g = torch.Generator().manual_seed(seed)
    # lengths vary a little, as in a real batch
    p_lens = [max(1, prompt_len - i % 3) for i in range(n_seqs)]
    r_lens = [max(1, response_len - i % 5) for i in range(n_seqs)]
    seqs = [torch.randint(0, vocab, (p + r,), generator=g) for p, r in zip(p_lens, r_lens)]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    reward = torch.randint(0, 2, (n_seqs,), generator=g).float()
    td = TensorDict(
        {
            "input_ids": nested(seqs),
            "position_ids": nested([torch.arange(len(s)) for s in seqs]),
            "prompts": nested([s[:p] for s, p in zip(seqs, p_lens)]),
            "responses": nested([s[p:] for s, p in zip(seqs, p_lens)]),
            "response_mask": nested([torch.ones(n) for n in r_lens]),
            "rm_scores": nested([torch.nn.functional.one_hot(torch.tensor(n - 1), n).float() * r
                                 for n, r in zip(r_lens, reward)]),
            "ref_log_prob": nested([-torch.rand(n, generator=g) for n in r_lens]),
            "advantages": nested([torch.full((n,), float(r) - 0.5) for n, r in zip(r_lens, reward)]),
        },
        batch_size=[n_seqs],
    )
    tu.assign_non_tensor(td, use_remove_padding=True, pad_mode=DatasetPadMode.NO_PADDING, use_fused_kernels=False,
                         temperature=1.0, calculate_entropy=False, dp_size=1, global_batch_size=n_seqs,
                         max_response_len=max(r_lens), **flags)
    return td


def plain_log_prob_loss(model_output=None, data=None, dp_group=None):
    """GRPO's update in shape: −mean over response tokens of advantage · log π (the log-probs are all it reads)."""
    from verl.workers.utils.padding import no_padding_2_padding

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    padded = data.select("response_mask", "advantages").to_padded_tensor()
    width = padded["response_mask"].shape[1]
    mask = padded["response_mask"].bool()
    log_prob = log_prob[:, :width].float()
    loss = -(padded["advantages"][:, :width] * log_prob).masked_fill(~mask, 0.0).sum() / mask.sum()
    return loss, {}


def _engine(cls, model):
    import torch

    eng = object.__new__(cls)  # as verl's own CPU tests build engines: no process group, no FSDP wrapping
    eng.module = model
    eng.pad_to_length = False
    eng.use_ulysses_sp = False
    eng.ulysses_device_mesh = None
    eng._autocast_dtype = torch.float32
    return eng


class PeakBytes:
    """Peak of live tensor bytes allocated inside the `with` block, over what was live when it started."""

    def __init__(self, device: str):
        self.device = device
        self.peak = self.final = self.allocated = 0  # allocated: bytes of all allocations made (traffic)

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            self._base_total = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            self.final = torch.cuda.memory_allocated() - self._base
            self.allocated = torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - self._base_total
            return False
        self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:  # allocations positive, frees negative, in allocator order
            live += nbytes
            peak = max(peak, live)
        self.peak, self.final = peak, live
        self.allocated = sum(n for _, n in events if n > 0)
        return False


def measure(tokens: int = 4096, n_seqs: int = 8, vocab: int = QWEN_VOCAB, hidden: int = 64, layers: int = 2,
            tie: bool = True) -> dict:
    _select_platform()
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from tbrm_verl.engine import TBRMEngine
    from tbrm_verl.lean_v import LEAN_V_FLAG
    from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(vocab, hidden, layers, tie, device)
    per_seq = tokens // n_seqs
    prompt_len, response_len = per_seq // 2, per_seq - per_seq // 2

    def tbrm(**kw):
        return tbrm_loss(TBRMLossConfig(beta=0.1), **kw)

    runs = {
        "plain": (FSDPEngineWithLMHead, plain_log_prob_loss, {}),
        "hook": (FSDPEngineWithLMHead, tbrm, {"distillation_use_topk": True}),
        "lean": (TBRMEngine, tbrm, {LEAN_V_FLAG: True}),
    }
    out: dict = {}
    for name, (cls, loss_fn, flags) in runs.items():
        eng = _engine(cls, model)
        data = micro_batch(n_seqs, prompt_len, response_len, vocab, flags)
        nnz = int(data["input_ids"].offsets()[-1])
        for p in model.parameters():
            p.grad = None
        gc.collect()
        with PeakBytes(device) as pk:
            loss, _ = eng.forward_step(data, loss_function=loss_fn, forward_only=False)
            loss.backward()
            del loss
        out[name] = {"peak_bytes": pk.peak, "end_bytes": pk.final, "allocated_bytes": pk.allocated,
                     "peak_in_float32_logits": pk.peak / (nnz * vocab * 4)}
        del eng, data
    logits_bytes = nnz * vocab * 4
    params = sum(p.numel() for p in model.parameters())
    return {
        "plain_peak_bytes": out["plain"]["peak_bytes"],
        "hook_peak_bytes": out["hook"]["peak_bytes"],
        "lean_peak_bytes": out["lean"]["peak_bytes"],
        "lean_over_plain": out["lean"]["peak_bytes"] / out["plain"]["peak_bytes"],
        "hook_over_plain": out["hook"]["peak_bytes"] / out["plain"]["peak_bytes"],
        "hook_extra_in_logits": (out["hook"]["peak_bytes"] - out["plain"]["peak_bytes"]) / logits_bytes,
        "lean_extra_in_logits": (out["lean"]["peak_bytes"] - out["plain"]["peak_bytes"]) / logits_bytes,
        "target_lean_over_plain": 1.02,
        "target_met": out["lean"]["peak_bytes"] <= 1.02 * out["plain"]["peak_bytes"],
        "tokens": nnz, "sequences": n_seqs, "vocab": vocab, "hidden": hidden, "layers": layers,
        "tied_embeddings": tie, "params": params, "float32_logits_bytes": logits_bytes,
        "device": device, "dtype": "float32",
        "method": "torch.cuda.max_memory_allocated" if device == "cuda" else
                  "torch.profiler allocator events (profile_memory): running sum of CPU tensor allocations/frees",
        "runs": out,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="bench_out")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch (prompt + response)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, as small Qwen models)")
    args = ap.parse_args(argv)
    res = measure(args.tokens, args.sequences, args.vocab, args.hidden, args.layers, tie=not args.untied)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "update_memory.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    gb = 1e9
    print(f"one actor update, {res['tokens']} tokens x vocab {res['vocab']} (float32 logits "
          f"{res['float32_logits_bytes'] / gb:.2f} GB), {res['device']}:")
    for name in ("plain", "hook", "lean"):
        r = res["runs"][name]
        print(f"  {name:5s} peak {r['peak_bytes'] / gb:7.3f} GB  ({r['peak_bytes'] / res['plain_peak_bytes']:.3f} x plain)"
              f"  = {r['peak_in_float32_logits']:.2f} x logits;  allocated in all {r['allocated_bytes'] / gb:7.3f} GB")
    print(f"lean / plain = {res['lean_over_plain']:.4f} (target <= 1.02: {'met' if res['target_met'] else 'NOT met'}); "
          f"hook adds {res['hook_extra_in_logits']:.2f} x the float32 logits")
    print(f"[bench] wrote {path}")
