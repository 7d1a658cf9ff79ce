"""V(s_1) from B hidden rows, computed inside the model's forward: no [tokens, vocab] tensor beyond verl's own.

V(s_1) = logsumexp_a logit(s_1, a) needs the logits of one position per sequence (the last prompt token). Taking
it from the full logits (verl's logits hook, `distillation_use_topk`) makes autograd build a dense zero
[tokens, vocab] gradient for those B rows and add it to the log-prob gradient: +1 to +2 times the logits per
micro-batch. Here the B rows are recomputed from the hidden states instead:

    z = lm_head(h[rows]) = h[rows] @ Wᵀ (+ b)      V = logsumexp(float32(z))              (B × vocab, not nnz × vocab)

with the gradient going to the hidden rows and to the output embedding W (tied or not), through a custom autograd
function whose backward never reads W: Σ_a softmax(z)_a · W_a is formed in the forward (B × hidden), so the
backward is correct even when FSDP has resharded W by then (FSDP2 frees an untied lm_head's unsharded weight after
its forward).

Where it runs: a forward pre-hook on the lm_head (its input is exactly the hidden states the logits come from, and
its weight is unsharded there under FSDP1 and FSDP2, tied or untied), or, with verl's fused kernels (which never
call lm_head), a forward hook on the decoder whose output verl's fused forward multiplies by `lm_head.weight`.
`LeanV.arm` says which rows the next forward must produce; `LeanV.take` returns them as the per-token tensor the
loss reads (`model_output["tbrm_v"]`: V(s_1) at each last prompt position, zeros elsewhere, nested like verl's
log-probs). The engine that calls them is `tbrm_verl.engine.TBRMEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tbrm_verl.loss import entropy_no_grad, last_prompt_positions

__all__ = ["LEAN_V_FLAG", "LeanV", "hidden_rows_logsumexp", "last_prompt_rows"]

LEAN_V_FLAG = "tbrm_lean_v"  # non-tensor micro-batch flag: compute V(s_1) from hidden rows in this forward


class _HiddenRowsLogSumExp(torch.autograd.Function):
    """v = logsumexp(float32(F.linear(h_rows, weight, bias))), [B]; backward without reading `weight`."""

    @staticmethod
    def forward(ctx, h_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        z = F.linear(h_rows, weight, bias)  # lm_head's own op on B rows (ambient autocast applies as in lm_head)
        z32 = z.to(torch.promote_types(z.dtype, torch.float32))  # float32 at least, as the loss reads logits
        v = torch.logsumexp(z32, dim=-1)
        p = torch.exp(z32 - v.unsqueeze(-1))  # softmax(z) = dV/dz, float32, B × vocab
        pw = p.to(z.dtype) @ weight.to(z.dtype)  # dV/dh = Σ_a p_a W_a, B × hidden: the backward needs no W
        ctx.save_for_backward(p, h_rows, pw)
        ctx.z_dtype, ctx.w_dtype = z.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return v

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor):
        p, h_rows, pw = ctx.saved_tensors
        g = grad_v.to(p.dtype).unsqueeze(-1)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (pw.to(p.dtype) * g).to(h_rows.dtype)
        gz = (p * g).to(ctx.z_dtype)  # dL/dz for the B rows, in the logits' dtype as lm_head's backward sees it
        if ctx.needs_input_grad[1]:
            grad_w = (gz.t() @ h_rows.to(ctx.z_dtype)).to(ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = gz.sum(0).to(ctx.b_dtype)
        return grad_h, grad_w, grad_b


def hidden_rows_logsumexp(h_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """logsumexp of `F.linear(h_rows, weight, bias)` per row in float32 (float64 stays), differentiable in all three."""
    return _HiddenRowsLogSumExp.apply(h_rows, weight, bias)


def last_prompt_rows(data, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each sequence's last prompt token in the hidden states verl's engine feeds the model.

    use_remove_padding: one packed row (1, nnz, H), column = offset + prompt length − 1 (a static or Ulysses pad
    is a suffix, so columns do not move). Otherwise the padded layout (B, max_len, H), sequence i left-aligned in
    row i (`torch.nested.to_padded_tensor`), column = prompt length − 1.
    """
    offsets = data["input_ids"].offsets()
    last = offsets.diff() - data["responses"].offsets().diff() - 1
    if padded:
        return torch.arange(last.numel(), device=last.device), last
    return torch.zeros_like(last), offsets[:-1] + last


@dataclass
class _Request:
    rows: torch.Tensor
    cols: torch.Tensor
    fused: bool
    lengths: torch.Tensor  # tokens per sequence (prompt + response)
    padded: bool
    v: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # (nnz,) per-token entropy for the `actor/entropy` metric, no grad


def _unwrap(module):
    return getattr(module, "_fsdp_wrapped_module", module)  # FSDP1 wrapper -> the module it runs


class LeanV:
    """Hooks on one causal LM that compute V(s_1) for the micro-batch armed with `arm`; inert otherwise."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        hf = _unwrap(model)
        self.lm_head = _unwrap(hf.get_output_embeddings())
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else getattr(hf, hf.base_model_prefix)
        cfg = getattr(hf, "config", None)
        for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(cfg, attr, None) not in (None, 1, 1.0):  # logits that are not lm_head(h)
                raise NotImplementedError(f"TBRM's V(s_1) from hidden rows assumes logits = lm_head(h); "
                                          f"this model sets config.{attr}={getattr(cfg, attr)}")
        self._req: _Request | None = None
        # pre-hook: runs after FSDP's own pre-forward (prepended) has unsharded the lm_head
        self._handles = [self.lm_head.register_forward_pre_hook(self._on_lm_head_input),
                         self.lm_head.register_forward_hook(self._on_lm_head_output),
                         _unwrap(decoder).register_forward_hook(self._on_decoder_output)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def arm(self, data, use_remove_padding: bool, fused: bool) -> None:
        rows, cols = last_prompt_rows(data, padded=not use_remove_padding)
        self._req = _Request(rows, cols, fused, data["input_ids"].offsets().diff(), not use_remove_padding)

    def take(self, data) -> dict[str, torch.Tensor]:
        """What the forward just run produced, as nested (B, j) per-token tensors like verl's log-probs:
        `tbrm_v` (V(s_1) at each last prompt position, zeros elsewhere) and, unless fused kernels skipped the
        lm_head, `tbrm_entropy` (no grad; for the `actor/entropy` metric)."""
        req, self._req = self._req, None
        if req is None or req.v is None:
            raise RuntimeError("TBRM V(s_1): the model forward did not reach the lm_head hook (armed but not run)")
        offsets = data["input_ids"].offsets().to(req.v.device)
        idx = last_prompt_positions(data).to(req.v.device)
        per_token = torch.zeros(int(offsets[-1]), dtype=torch.float32, device=req.v.device).index_put((idx,), req.v)
        out = {"tbrm_v": torch.nested.nested_tensor_from_jagged(per_token, offsets)}
        if req.entropy is not None:
            out["tbrm_entropy"] = torch.nested.nested_tensor_from_jagged(req.entropy, offsets)
        return out

    def _compute(self, hidden: torch.Tensor) -> None:
        req = self._req
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor) or isinstance(hidden, DTensor):
            raise RuntimeError("TBRM V(s_1): the output embedding is still sharded (DTensor) where V is computed; "
                               "tensor-parallel or separately sharded lm_head with fused kernels is not supported")
        h_rows = hidden[req.rows.to(hidden.device), req.cols.to(hidden.device)]  # B × hidden
        req.v = hidden_rows_logsumexp(h_rows, weight, bias)

    def _on_lm_head_input(self, module, args):
        if self._req is not None and not self._req.fused and self._req.v is None:
            self._compute(args[0])

    def _on_lm_head_output(self, module, args, output):
        """Per-token entropy from the logits lm_head just made, in row chunks outside autograd: no second
        [tokens, vocab] tensor (verl's own entropy path keeps one for backward, and runs only in the old-log-prob
        pass that TBRM skips)."""
        req = self._req
        if req is None or req.fused or req.entropy is not None:
            return

        logits = output if isinstance(output, torch.Tensor) else output[0]
        if req.padded:  # (B, max_len, V), sequence i left-aligned in row i
            req.entropy = torch.cat([entropy_no_grad(logits[i, :n]) for i, n in enumerate(req.lengths.tolist())])
        else:  # (1, nnz [+ pad suffix], V)
            req.entropy = entropy_no_grad(logits[0, : int(req.lengths.sum())])

    def _on_decoder_output(self, module, args, output):
        if self._req is not None and self._req.fused and self._req.v is None:
            self._compute(output[0])  # last_hidden_state: what verl's fused forward multiplies by lm_head.weight
