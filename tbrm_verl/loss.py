"""The TBRM objective (arXiv 2505.15311, Eq. 4 / Algorithm 1) and its verl engine loss.

    Q_θ(s, a) = logit_θ(s, a)            V_θ(s) = logsumexp_a logit_θ(s, a)          (temperature 1)
    δ(τ)      = V_θ(s_1) + Σ_h log π_θ(a_h|s_h) − Σ_h log π_ref(a_h|s_h) − r(τ)/β
    L(θ)      = mean_τ δ(τ)²

`tbrm_residual` is that formula and nothing else. `tbrm_loss` wires it into verl 0.9.1's FSDP engine. It reads
V(s) per token from `model_output["tbrm_v"]`, a nested (B, j) tensor like verl's log-probs, which one of two paths
fills:

* `loss_variant=tbrm` (default): tbrm_verl's actor engine (tbrm_verl/engine.py, tbrm_verl/lean_v.py) computes
  V(s_1) inside the model's forward from the B hidden rows at the last prompt positions times the output embedding;
  the loss is called once, and the update holds no [tokens, vocab] tensor beyond the log-prob path's own.
* `loss_variant=brm` needs V(s_h) at every response position, from verl's logits hook:
  verl calls a loss twice per micro-batch when the non-tensor flag `distillation_use_topk` is set. First with
  `student_logits` (1, nnz, V), the packed logits of every token of every sequence (prompt + response), still in
  the autograd graph; every (1, nnz) tensor returned is stored per token in `model_output`. We return V(s) only at the
  last prompt position of each sequence (the logsumexp of B rows, in float32), zeros elsewhere: no float32
  (nnz, V) copy is made. Then verl calls `loss_fn(model_output=..., data=..., dp_group=...)` for the loss itself.
* `no_padding_2_padding` slices `values[seq_end - resp_len - 1 : seq_end - 1]` per sequence, so column 0 of that
  slice is the last prompt position, i.e. V(s_1); column h-1 holds quantities of s_h.
* Normalisation: each micro-batch returns Σ_τ δ² / global_batch_size · dp_size, so summing micro-batches and
  averaging data-parallel ranks (FSDP's gradient mean) gives mean_τ δ² over the global batch, however it is split.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["TBRMLossConfig", "tbrm_residual", "brm_residuals", "tbrm_loss", "last_prompt_positions", "choices"]


@dataclass(frozen=True)
class TBRMLossConfig:
    """What the loss needs from the `tbrm:` config section (see hydra_configs/tbrm_verl.yaml for docs).

    The Literal types are the valid values (tbrm_verl.config checks the `tbrm:` section against them too)."""

    beta: float = 0.002
    loss_variant: Literal["tbrm", "brm"] = "tbrm"  # one residual per trajectory, or the classical per-token ablation
    loss_scale: Literal["delta", "beta_delta"] = "delta"  # δ², or (β·δ)² (same minimiser, gradients scaled by β²)
    reference_free: bool = False

    def __post_init__(self):
        for name in choices():
            value, allowed = getattr(self, name), choices(name)
            if value not in allowed:
                raise ValueError(f"TBRMLossConfig.{name}={value!r}: not one of {', '.join(map(repr, allowed))}")
        if not self.beta > 0:  # also refuses NaN
            raise ValueError(f"TBRMLossConfig.beta={self.beta!r}: β must be > 0 (the target is r/β)")


def choices(field: str | None = None):
    """The allowed values of one enumerated TBRMLossConfig field (its Literal); without a field, the fields' names."""
    hints = typing.get_type_hints(TBRMLossConfig)
    literals = {k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is Literal}
    return tuple(literals) if field is None else literals[field]


def tbrm_residual(
    v_s1: torch.Tensor,
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor | None,
    response_mask: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """δ = V(s_1) + Σ_t mask·(log π − log π_ref) − r/β, one value per trajectory.

    v_s1: [B]; log_prob, ref_log_prob, response_mask: [B, T]; reward: [B]. `ref_log_prob=None` is the
    reference-free objective (π_ref uniform, its constant absorbed into V). Padding positions may hold any value,
    even inf/NaN: they are selected away, not multiplied by zero.
    """
    mask = response_mask.bool()
    log_ratio = log_prob if ref_log_prob is None else log_prob - ref_log_prob
    log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
    return v_s1 + log_ratio.sum(dim=-1) - reward / beta


def brm_residuals(
    v: torch.Tensor,
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor | None,
    response_mask: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Classical per-token Bellman residuals (the paper's ablation), [B, T], zero on padding.

    ε_h = Q(s_h, a_h) − r_h/β − log π_ref(a_h|s_h) − V(s_{h+1}),  Q(s_h, a_h) = log π(a_h|s_h) + V(s_h),
    with V(s_{H+1}) = 0 and the outcome reward on the last response token. v: [B, T], V(s_h) in column h-1.
    Summing ε_h over h telescopes to the trajectory residual δ.
    """
    mask = response_mask.bool()
    ref = 0.0 if ref_log_prob is None else ref_log_prob
    q = log_prob + v
    v_next = F.pad(torch.where(mask[:, 1:], v[:, 1:], 0.0), (0, 1))  # V(s_{h+1}); 0 past the last token
    lengths = mask.sum(dim=-1)
    is_last = torch.arange(mask.shape[1], device=mask.device) == (lengths - 1).unsqueeze(-1)
    r_tok = torch.where(is_last, (reward / beta).unsqueeze(-1), 0.0)
    return torch.where(mask, q - r_tok - ref - v_next, 0.0)


def last_prompt_positions(data) -> torch.Tensor:
    """Index, in the packed (nnz,) token stream of a micro-batch, of each sequence's last prompt token."""
    offsets = data["input_ids"].offsets()
    response_lens = data["responses"].offsets().diff()
    return offsets[1:] - response_lens - 1


class _RowsLogSumExp(torch.autograd.Function):
    """float32 logsumexp of B rows of the (nnz, V) logits; keeps only a B × V float32 copy for backward.

    Same values and gradient as `torch.logsumexp(logits[idx].float(), -1)`, whose backward allocates a dense zero
    (nnz, V) tensor and then an out-of-place index_put copy of it; here the B gradient rows are written in place
    into one zero tensor. (A row-sparse gradient would avoid even that, but sparse gradients cannot flow back
    through the views verl's engine takes of the logits.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rows = logits[idx].float()
        v = torch.logsumexp(rows, dim=-1)
        ctx.save_for_backward(rows, v, idx)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return v

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor):
        rows, v, idx = ctx.saved_tensors
        grad_rows = torch.exp(rows - v.unsqueeze(-1)) * grad_v.unsqueeze(-1)  # softmax(z) · g
        grad = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=rows.device)
        grad.index_copy_(0, idx, grad_rows.to(ctx.logits_dtype))
        return grad, None


def _values_from_logits(student_logits: torch.Tensor, data, cfg: TBRMLossConfig) -> dict[str, torch.Tensor]:
    """First call of the dual-call contract: per-token values computed from the full logits, shape (1, nnz)."""
    logits = student_logits.squeeze(0)  # (nnz, V), raw logits (temperature is checked to be 1)
    nnz = logits.shape[0]
    if cfg.loss_variant == "tbrm":
        idx = last_prompt_positions(data).to(logits.device)
        v_s1 = _RowsLogSumExp.apply(logits, idx)
        v = torch.zeros(nnz, dtype=torch.float32, device=logits.device).index_put((idx,), v_s1)
    else:  # brm needs V(s_h) at every response position
        v = torch.logsumexp(logits.float(), dim=-1)
    return {"tbrm_v": v.unsqueeze(0), "tbrm_entropy": entropy_no_grad(logits).unsqueeze(0)}


@torch.no_grad()
def entropy_no_grad(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token entropy of softmax(logits) for the `actor/entropy` metric, (nnz,) float32.

    In chunks of rows, outside autograd: a float32 [chunk, V] temporary at a time, never a second [tokens, vocab]
    tensor (verl's own entropy path keeps one for backward)."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        z = logits[i : i + chunk].float()
        logp = torch.log_softmax(z, dim=-1)
        out[i : i + chunk] = -(logp.exp() * logp).sum(dim=-1)
    return out


def tbrm_loss(cfg: TBRMLossConfig, model_output=None, data=None, dp_group=None, student_logits=None):
    """verl engine loss: `partial(tbrm_loss, cfg)` is installed with `set_loss_fn` on the actor worker group."""
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    if student_logits is not None:
        return _values_from_logits(student_logits, data, cfg)
    if "tbrm_v" not in model_output:
        raise RuntimeError(
            "TBRM loss got no V(s_1) (model_output['tbrm_v']): the actor update ran neither tbrm_verl's engine "
            "(flag tbrm_lean_v) nor verl's logits hook (distillation_use_topk). Use tbrm_verl's trainer."
        )

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    v = no_padding_2_padding(model_output["tbrm_v"], data)
    fields = ["response_mask", "rm_scores"] + (["ref_log_prob"] if not cfg.reference_free else [])
    missing = [f for f in fields if f not in data.keys()]
    if missing:
        raise RuntimeError(f"TBRM loss: batch lacks {missing} (reference model missing while reference_free=false?)")
    # the rollout's own log-probs, for the health metric verl logs only after its old-log-prob pass (skipped here)
    has_rollout_lp = "rollout_log_probs" in data.keys()
    padded = data.select(*fields, *(["rollout_log_probs"] if has_rollout_lp else [])).to_padded_tensor()
    mask = padded["response_mask"].bool()
    width = mask.shape[1]
    log_prob, v = log_prob[:, :width], v[:, :width]
    # π_ref is a fixed target: never let a gradient reach it, whatever the caller passes
    ref_log_prob = None if cfg.reference_free else padded["ref_log_prob"][:, :width].detach().float()
    # verl puts the outcome score on the last response token: the trajectory reward is the row sum.
    reward = torch.where(mask, padded["rm_scores"][:, :width].float(), 0.0).sum(dim=-1)
    log_prob = log_prob.float()

    delta = tbrm_residual(v[:, 0], log_prob, ref_log_prob, mask, reward, cfg.beta)
    if cfg.loss_variant == "tbrm":
        per_traj = delta.square()
    else:
        per_traj = brm_residuals(v, log_prob, ref_log_prob, mask, reward, cfg.beta).square().sum(dim=-1)
    if cfg.loss_scale == "beta_delta":
        per_traj = per_traj * cfg.beta**2

    # Fully masked rows are padding added to balance data-parallel ranks: they are not trajectories.
    valid = mask.any(dim=-1)
    dp_size = data["dp_size"]
    global_batch_size = data["global_batch_size"] if "global_batch_size" in data.keys() else None
    if global_batch_size is None:  # a guess (e.g. this micro-batch's size) would silently rescale the gradient
        raise RuntimeError(
            "TBRM loss: the micro-batch carries no global_batch_size, so the loss cannot be normalised to the mean "
            "over the global batch; call it through verl's engine update (train_mini_batch), which sets it"
        )
    scale = dp_size / global_batch_size

    def global_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, 0.0).sum() * scale

    loss = global_mean(per_traj)
    log_ratio = torch.where(
        mask, log_prob - (ref_log_prob if ref_log_prob is not None else 0.0), 0.0
    ).sum(dim=-1)
    d = delta.detach()
    with torch.no_grad():
        metrics = {
            "actor/tbrm_loss": global_mean(per_traj.detach()),
            "actor/tbrm_residual_mean": global_mean(d),
            "actor/tbrm_residual_abs_mean": global_mean(d.abs()),
            "actor/tbrm_v_s1": global_mean(v[:, 0].detach()),
            "actor/tbrm_log_ratio_sum": global_mean(log_ratio.detach()),
            "actor/tbrm_target": global_mean(reward / cfg.beta),
        }
    metrics = {k: Metric(value=val, aggregation=AggregationType.SUM) for k, val in metrics.items()}
    metrics.update(_token_metrics(model_output, data, mask, log_prob, padded if has_rollout_lp else None, width))
    return loss, metrics


@torch.no_grad()
def _token_metrics(model_output, data, mask, log_prob, padded, width) -> dict:
    """verl's health metrics that skipping the old-log-prob pass would drop, from this update's own forward.

    TBRM makes one optimizer step per batch, so the update's log-probs are π_old's: |log π − log π_rollout| per
    response token (mean and max) is the rollout-vs-training mismatch, and the entropy is π_old's entropy.
    Token means are normalised like verl's token-mean loss (Σ over this micro-batch / global token count · dp_size),
    so they sum over micro-batches and average over ranks to the mean over every response token of the batch."""
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    out = {}
    num_tokens = data["batch_num_tokens"] if "batch_num_tokens" in data.keys() else None
    if padded is not None:
        diff = torch.where(mask, (log_prob.detach() - padded["rollout_log_probs"][:, :width].float()).abs(), 0.0)
        out["actor/tbrm_rollout_log_prob_diff_max"] = Metric(value=diff.max(), aggregation=AggregationType.MAX)
        if num_tokens:
            out["actor/tbrm_rollout_log_prob_diff_mean"] = Metric(
                value=diff.sum() * data["dp_size"] / num_tokens, aggregation=AggregationType.SUM)
    entropy = model_output.get("tbrm_entropy", model_output.get("entropy")) if hasattr(model_output, "get") else None
    if entropy is not None and num_tokens:
        ent = torch.where(mask, no_padding_2_padding(entropy, data)[:, :width].float(), 0.0)
        out["actor/entropy"] = Metric(value=ent.sum() * data["dp_size"] / num_tokens, aggregation=AggregationType.SUM)
    return out
