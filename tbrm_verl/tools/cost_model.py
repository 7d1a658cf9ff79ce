"""Analytic per-step cost model for TBRM vs PPO vs GRPO in verl (FLOPs, time split like `timing_s/*`, peak memory).

What a step costs, per method (N = prompts_per_step · n trajectories, T = prompt_len + response_len tokens each):

    phase            FLOPs (model FLOPs)                  who runs it
    gen              2·P·(prefill tokens + N·response)    all (vLLM; decode is modelled as memory-bound)
    ref              2·P·N·T                              all but reference-free TBRM
    old_log_prob     2·P·N·T                              PPO, GRPO (TBRM has no π_old)
    values           2·P·N·T                              PPO (critic = same size as the actor)
    update_critic    6·P·N·T·ppo_epochs                   PPO
    update_actor     6·P·N·T·ppo_epochs                   all
    other            fixed + per-sample + weight sync     all (reward, advantage, vLLM wake/sleep, resharding)

FLOPs are converted to time with a stated MFU per phase and the hardware peak; decode time is computed step by
step from the bytes a decode step moves (weights + KV cache of the running batch) at a stated fraction of the
memory bandwidth. Peak memory per GPU is the maximum over phases of what is resident in that phase (FSDP-sharded
fp32 actor/critic states, bf16 reference, activations of one micro-batch, FSDP unsharded buffers, vLLM's reserved
fraction while it is awake). Every constant is a field of `Hardware` / `Workload` / `Offload`; see
docs/cost_model.md for the equations, the assumptions and the comparison with the paper.

CLI: `python -m tbrm_verl.cost_model --help` (default action: the paper's 7B / 4×H100 setting vs the paper's ratios).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace

__all__ = [
    "ModelSpec",
    "Workload",
    "Hardware",
    "Offload",
    "MethodSpec",
    "Prediction",
    "PRESETS",
    "METHODS",
    "H100",
    "PAPER_RATIOS",
    "PARTS",
    "qwen2_param_count",
    "cpu_hardware",
    "phase_flops",
    "predict",
    "predict_all",
    "ratios_vs",
    "paper_setting",
    "Setting",
    "model_spec_for",
    "from_config",
    "stated_hardware",
    "fit_line",
    "compare_with_paper",
    "compare_with_bench",
    "main",
]

GB = 1e9
PARTS = ("gen", "ref", "old_log_prob", "values", "update_critic", "update_actor", "other")
TRAIN_PHASES = ("ref", "old_log_prob", "values", "update_critic", "update_actor")


# --------------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelSpec:
    """Decoder-only LM. `num_kv_heads`/`head_dim` size the KV cache (default: MHA, kv width = hidden);
    `intermediate` sizes the MLP activations (default 4·hidden)."""

    name: str
    params: float
    layers: int
    hidden: int
    vocab: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None
    tied_embeddings: bool = False

    @property
    def kv_width(self) -> int:
        if self.num_kv_heads is None or self.head_dim is None:
            return self.hidden
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> float:
        """K and V for every layer, bf16."""
        return 2 * self.layers * self.kv_width * dtype_bytes

    @property
    def ffn(self) -> int:
        return self.intermediate if self.intermediate else 4 * self.hidden

    @property
    def embedding_params(self) -> float:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def layer_params(self) -> float:
        return max(self.params - self.embedding_params, 0.0) / self.layers


def qwen2_param_count(vocab, hidden, layers, intermediate, num_heads, num_kv_heads, head_dim, tied,
                      qkv_bias: bool = True) -> int:
    """Exact parameter count of a HF Qwen2 model (q/k/v biases, no o bias, RMSNorm weights); qkv_bias=False: Llama."""
    q = hidden * num_heads * head_dim + (num_heads * head_dim if qkv_bias else 0)
    kv = 2 * (hidden * num_kv_heads * head_dim + (num_kv_heads * head_dim if qkv_bias else 0))
    o = num_heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden
    per_layer = q + kv + o + mlp + norms
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


PRESETS: dict[str, ModelSpec] = {
    # Qwen/Qwen2.5-Math-1.5B config.json: 28 layers, hidden 1536, 12 heads / 2 KV heads, MLP 8960, tied embeddings.
    "qwen2.5-math-1.5b": ModelSpec(
        "Qwen2.5-Math-1.5B",
        params=qwen2_param_count(151936, 1536, 28, 8960, 12, 2, 128, True),
        layers=28, hidden=1536, vocab=151936, num_kv_heads=2, head_dim=128, intermediate=8960, tied_embeddings=True,
    ),
    # Qwen/Qwen2.5-Math-7B config.json: 28 layers, hidden 3584, 28 heads / 4 KV heads, MLP 18944, untied lm head.
    "qwen2.5-math-7b": ModelSpec(
        "Qwen2.5-Math-7B",
        params=qwen2_param_count(152064, 3584, 28, 18944, 28, 4, 128, False),
        layers=28, hidden=3584, vocab=152064, num_kv_heads=4, head_dim=128, intermediate=18944, tied_embeddings=False,
    ),
}


@dataclass(frozen=True)
class Workload:
    """One training step. `response_len` is the (mean) generated length used for FLOPs/time; `max_response_len`
    (default = response_len) sizes activations and the vLLM KV budget. `micro_batch_size` is sequences per GPU per
    micro-batch of the actor update, and of every other pass whose own size is None: `log_prob_micro_batch_size`
    (π_old forward, verl's rollout.log_prob_micro_batch_size_per_gpu), `ref_micro_batch_size` (reference forward),
    `critic_micro_batch_size` (critic update) and `critic_forward_micro_batch_size` (values). `ppo_mini_batch_size` is
    in prompts (None: one optimizer step per batch, as TBRM does)."""

    prompt_len: int
    response_len: int
    prompts_per_step: int
    n_gpus: int
    micro_batch_size: int = 1
    gpu_memory_utilization: float = 0.4
    ppo_mini_batch_size: int | None = None
    ppo_epochs: int = 1
    rollout_tp: int = 1
    max_response_len: int | None = None
    prefix_caching: bool = True  # vLLM prefix cache: the n samples of a prompt share its prefill
    max_num_seqs: int = 256  # vLLM concurrency cap per replica
    free_cache_engine: bool = True  # vLLM sleeps (frees weights + KV) outside rollout
    gradient_checkpointing: bool = True
    kv_cache_gb: float | None = None  # override vLLM's KV-cache budget per GPU (default: fraction − weights − workspace)
    log_prob_micro_batch_size: int | None = None
    ref_micro_batch_size: int | None = None
    critic_micro_batch_size: int | None = None
    critic_forward_micro_batch_size: int | None = None

    @property
    def max_resp(self) -> int:
        return self.max_response_len if self.max_response_len is not None else self.response_len

    def mb(self, phase: str) -> int:
        """Sequences per GPU per micro-batch in `phase`."""
        own = {"old_log_prob": self.log_prob_micro_batch_size, "ref": self.ref_micro_batch_size,
               "update_critic": self.critic_micro_batch_size, "values": self.critic_forward_micro_batch_size}.get(phase)
        return own if own else self.micro_batch_size


@dataclass(frozen=True)
class Hardware:
    """Per-device throughputs and the MFU/efficiency assumed for each phase (model FLOPs / peak)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    mem_bw: float  # bytes/s per device
    mem_gb: float  # device memory
    interconnect_bw: float = 300e9  # effective per-device collective bandwidth (FSDP all-gather / reduce-scatter)
    host_bw: float = 25e9  # effective host<->device bandwidth (offload)
    mfu_prefill: float = 0.50
    mfu_decode: float = 0.40  # caps decode when compute-bound (large batches)
    decode_bw_eff: float = 0.60  # fraction of mem_bw a decode step achieves
    decode_step_overhead_s: float = 0.002  # scheduler + sampling + launch per decode step
    tp_allreduce_latency_s: float = 10e-6  # per all-reduce (2 per layer per decode step) when rollout_tp > 1
    mfu_forward: float = 0.45  # ref / old_log_prob / values (forward only)
    mfu_train: float = 0.35  # update_actor / update_critic, model FLOPs (6PT) incl. recompute + FSDP overheads
    phase_overhead_s: float = 0.5  # fixed cost of one worker-group call (dispatch, data movement, sync)
    other_fixed_s: float = 2.0  # per step: vLLM wake/sleep, reward set-up, advantage, metrics, data loading
    other_per_sample_s: float = 0.002  # per trajectory: reward scoring (process pool), bookkeeping
    vllm_workspace_gb: float = 1.0  # vLLM activation workspace / CUDA graphs per GPU, taken from its budget
    # what each vLLM worker keeps on its GPU outside that budget and through sleep mode: its own CUDA context and
    # allocator/graph pools (sleep frees only the "weights" and "kv_cache" pools)
    vllm_resident_gb: float = 1.0
    runtime_overhead_gb: float = 2.0  # CUDA context, NCCL buffers, allocator slack per GPU (device-level peak)


# H100 SXM 80GB: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3.
H100 = Hardware("H100-SXM-80GB", peak_flops=989e12, mem_bw=3.35e12, mem_gb=80.0)


def cpu_hardware(
    peak_tflops: float,
    mem_bw_gbs: float,
    mem_gb: float = 64.0,
    phase_overhead_s: float = 1.0,
    other_fixed_s: float = 2.0,
    decode_step_overhead_s: float = 0.01,
    mfu: float = 1.0,
    runtime_overhead_gb: float = 0.0,
    **kw,
) -> Hardware:
    """A CPU 'device' for comparing with a CPU benchmark: throughputs are arguments (measure them), MFUs default to
    1 (the peak given is already an achieved rate), fixed start-up costs are explicit, vLLM is absent."""
    return Hardware(
        "cpu",
        peak_flops=peak_tflops * 1e12,
        mem_bw=mem_bw_gbs * 1e9,
        mem_gb=mem_gb,
        interconnect_bw=kw.pop("interconnect_bw", 10e9),
        host_bw=kw.pop("host_bw", 1e12),
        mfu_prefill=mfu,
        mfu_decode=mfu,
        decode_bw_eff=1.0,
        decode_step_overhead_s=decode_step_overhead_s,
        tp_allreduce_latency_s=0.0,
        mfu_forward=mfu,
        mfu_train=mfu,
        phase_overhead_s=phase_overhead_s,
        other_fixed_s=other_fixed_s,
        other_per_sample_s=kw.pop("other_per_sample_s", 0.0),
        vllm_workspace_gb=0.0,
        vllm_resident_gb=0.0,
        runtime_overhead_gb=runtime_overhead_gb,
        **kw,
    )


@dataclass(frozen=True)
class Offload:
    """FSDP offload flags, verl 0.9.1's defaults: actor and critic resident (fsdp_config.param_offload /
    optimizer_offload false, critic: critic.fsdp.*), reference offloaded: verl builds the reference engine with
    `ref.fsdp_config.forward_only=true`, which wraps it in FSDP CPU offload (params on the host, streamed per unit)."""

    actor_param: bool = False
    actor_optimizer: bool = False
    critic_param: bool = False
    critic_optimizer: bool = False
    ref_param: bool = True


@dataclass(frozen=True)
class MethodSpec:
    key: str
    label: str
    n: int
    reference: bool  # reference-policy forward (KL term / TBRM's log π_ref)
    old_log_prob: bool  # π_old forward (PPO/GRPO ratio)
    critic: bool  # value model: values forward + critic update


METHODS: dict[str, MethodSpec] = {
    "tbrm_n1": MethodSpec("tbrm_n1", "TBRM n=1", 1, True, False, False),
    "tbrm_n1_ref_free": MethodSpec("tbrm_n1_ref_free", "TBRM n=1 ref-free", 1, False, False, False),
    "tbrm_n4": MethodSpec("tbrm_n4", "TBRM n=4", 4, True, False, False),
    "ppo_n1": MethodSpec("ppo_n1", "PPO n=1", 1, True, True, True),
    "grpo_n4": MethodSpec("grpo_n4", "GRPO n=4", 4, True, True, False),
}


# -------------------------------------------------------------------------------------------------------- FLOPs
def _counts(model: ModelSpec, w: Workload, m: MethodSpec) -> dict:
    n_traj = w.prompts_per_step * m.n
    seq = w.prompt_len + w.response_len
    prefill_tokens = (w.prompts_per_step if w.prefix_caching else n_traj) * w.prompt_len
    return {
        "trajectories": n_traj,
        "seq_tokens": n_traj * seq,  # tokens every training-side pass processes
        "prefill_tokens": prefill_tokens,
        "rollout_tokens": n_traj * w.response_len,  # generated tokens
    }


def phase_flops(model: ModelSpec, w: Workload, m: MethodSpec) -> dict[str, float]:
    """Model FLOPs per phase (2·P per token forward, 6·P per token forward+backward); attention's O(T²) term and
    the logits-hook's logsumexp over a handful of rows are ignored."""
    c = _counts(model, w, m)
    P, T = model.params, c["seq_tokens"]
    fl = dict.fromkeys(PARTS, 0.0)
    fl["gen"] = 2 * P * (c["prefill_tokens"] + c["rollout_tokens"])
    if m.reference:
        fl["ref"] = 2 * P * T
    if m.old_log_prob:
        fl["old_log_prob"] = 2 * P * T
    if m.critic:
        fl["values"] = 2 * P * T
        fl["update_critic"] = 6 * P * T * w.ppo_epochs
    fl["update_actor"] = 6 * P * T * w.ppo_epochs
    return fl


# --------------------------------------------------------------------------------------------------------- time
def _rollout(model: ModelSpec, w: Workload, m: MethodSpec, hw: Hardware) -> dict:
    """vLLM rollout: prefill at mfu_prefill; decode step by step, each step max(bytes/bw, flops/peak) + overhead."""
    c = _counts(model, w, m)
    G, tp = w.n_gpus, w.rollout_tp
    replicas = max(G // tp, 1)
    seqs = math.ceil(c["trajectories"] / replicas)  # per replica
    kv_tok = model.kv_bytes_per_token()
    weights = 2 * model.params  # bf16, split over tp GPUs
    budget = tp * (w.gpu_memory_utilization * hw.mem_gb - hw.vllm_workspace_gb) * GB - weights
    if w.kv_cache_gb is not None:
        budget = tp * w.kv_cache_gb * GB
    ctx_max = w.prompt_len + w.max_resp
    if w.gpu_memory_utilization <= 0:  # no vLLM budget modelled (e.g. CPU HF rollout): everything in one batch
        cap = seqs
    else:
        cap = int(budget // (kv_tok * ctx_max)) if budget > 0 else 0
    concurrency = max(min(seqs, w.max_num_seqs, cap), 0)
    if concurrency == 0:
        return {"fits": False, "gen_s": float("inf"), "prefill_s": float("inf"), "decode_s": float("inf"),
                "decode_tail_s": float("inf"), "concurrency": 0, "waves": 0, "kv_budget_gb": budget / GB}
    # continuous batching with a KV-limited concurrency b: the replica's S sequences pass through b slots, i.e.
    # S / b "waves" of R decode steps each (fractional: real lengths vary, finished slots are refilled)
    waves = seqs / concurrency
    prefill_s = 2 * model.params * c["prefill_tokens"] / (G * hw.peak_flops * hw.mfu_prefill)
    comm = 2 * model.layers * hw.tp_allreduce_latency_s if tp > 1 else 0.0
    b = concurrency
    wave_s = 0.0
    for t in range(w.response_len):
        ctx = w.prompt_len + t + 0.5
        bytes_gpu = (weights + b * ctx * kv_tok) / tp
        flops_gpu = 2 * model.params * b / tp
        step = max(bytes_gpu / (hw.mem_bw * hw.decode_bw_eff), flops_gpu / (hw.peak_flops * hw.mfu_decode))
        wave_s += step + hw.decode_step_overhead_s + comm
    decode_s = wave_s * waves
    # synchronous rollout waits for the longest response: steps beyond the mean length run with a near-empty batch,
    # i.e. at the weight-read cost (only when max_response_len > response_len)
    tail_steps = max(w.max_resp - w.response_len, 0)
    tail_s = tail_steps * (weights / tp / (hw.mem_bw * hw.decode_bw_eff) + hw.decode_step_overhead_s + comm)
    decode_s += tail_s
    return {"fits": True, "gen_s": prefill_s + decode_s + hw.phase_overhead_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_tail_s": tail_s, "concurrency": concurrency, "waves": waves,
            "kv_budget_gb": budget / GB}


def _fsdp_pass_s(model: ModelSpec, w: Workload, hw: Hardware, flops_total: float, n_traj: int, mfu: float,
                 train: bool, micro_batch_size: int | None = None) -> float:
    """Time of a forward-only or forward+backward pass over the batch. Each GPU runs
    ceil(n_traj / G / micro_batch_size) micro-batches; per micro-batch, compute and the FSDP collectives (bf16
    all-gather per forward and per backward, fp32 reduce-scatter of grads) overlap: max(compute, comm)."""
    G = w.n_gpus
    n_mb = max(math.ceil(n_traj / G / (micro_batch_size or w.micro_batch_size)), 1)
    compute_mb = flops_total / (n_mb * G) / (hw.peak_flops * mfu)
    return n_mb * max(compute_mb, _fsdp_comm_bytes(model, G, train) / hw.interconnect_bw)


def _fsdp_comm_bytes(model: ModelSpec, G: int, train: bool) -> float:
    if G <= 1:
        return 0.0
    frac = (G - 1) / G
    ag = 2 * model.params * frac  # bf16 all-gather of the full model, per pass
    if not train:
        return ag
    return 2 * ag + 4 * model.params * frac  # forward AG + backward AG + fp32 reduce-scatter of gradients


def _optimizer_step_s(model: ModelSpec, w: Workload, hw: Hardware) -> float:
    """AdamW step + grad-norm clip on the local shard: memory-bound, ~32 bytes moved per parameter."""
    return 32 * model.params / w.n_gpus / hw.mem_bw


def _phase_times(model: ModelSpec, w: Workload, m: MethodSpec, hw: Hardware, off: Offload, fl: dict) -> dict:
    c = _counts(model, w, m)
    G, P = w.n_gpus, model.params
    t = dict.fromkeys(PARTS, 0.0)
    ro = _rollout(model, w, m, hw)
    t["gen"] = ro["gen_s"]
    n_updates = w.ppo_epochs * math.ceil(w.prompts_per_step / (w.ppo_mini_batch_size or w.prompts_per_step))
    h2d = lambda nbytes: nbytes / G / hw.host_bw  # noqa: E731  (one host<->device copy of a sharded state)
    for phase in ("ref", "old_log_prob", "values"):
        if fl[phase] == 0:
            continue
        load = 0.0
        if phase == "ref" and off.ref_param:
            load = h2d(2 * P)
        if phase == "old_log_prob" and off.actor_param:
            load = 2 * h2d(4 * P)
        if phase == "values" and off.critic_param:
            load = 2 * h2d(4 * P)
        t[phase] = (_fsdp_pass_s(model, w, hw, fl[phase], c["trajectories"], hw.mfu_forward, train=False,
                                 micro_batch_size=w.mb(phase)) + load + hw.phase_overhead_s)
    for phase, param_off, opt_off in (
        ("update_actor", off.actor_param, off.actor_optimizer),
        ("update_critic", off.critic_param, off.critic_optimizer),
    ):
        if fl[phase] == 0:
            continue
        load = (2 * h2d(8 * P) if param_off else 0.0) + (2 * h2d(8 * P) if opt_off else 0.0)
        t[phase] = (
            _fsdp_pass_s(model, w, hw, fl[phase], c["trajectories"], hw.mfu_train, train=True,
                         micro_batch_size=w.mb(phase))
            + n_updates * _optimizer_step_s(model, w, hw)
            + load
            + hw.phase_overhead_s
        )
    weight_sync = 2 * P / w.rollout_tp * ((G - 1) / G if G > 1 else 0.0) / hw.interconnect_bw
    t["other"] = hw.other_fixed_s + hw.other_per_sample_s * c["trajectories"] + weight_sync
    return t, ro


# ------------------------------------------------------------------------------------------------------- memory
def _memory(model: ModelSpec, w: Workload, m: MethodSpec, hw: Hardware, off: Offload) -> dict:
    """Per-GPU bytes resident in each phase, and the peaks (verl 0.9.1's FSDP engine workers + vLLM in hybrid mode).

    states: fp32 params (4) + fp32 grads (4) + Adam m, v (8) = 16 bytes/param, FSDP-sharded over the GPUs. The grads
    exist during an update only: verl's engine leaves train mode with `optimizer.zero_grad()` (set_to_none), so
    outside update_actor / update_critic a model holds 12 bytes/param. Reference: bf16 params, sharded. An offloaded
    state is resident only in its own phase(s) (verl loads it on entering the engine's train/eval mode).
    activations (one micro-batch of T_mb = micro-batch·(prompt + max_response) tokens, the phase's own micro-batch):
      train, gradient checkpointing: L·T·d·2 (layer inputs) + T·(10·d + 4·ffn)·2 (one layer recomputed)
             + T·V·2·2 (bf16 logits + their gradient; not for the critic's value head); without checkpointing the
             per-layer term is kept for all L.
      forward only: T·(10·d + 4·ffn)·2 + T·V·2 (logits) + T·V·4 (fp32 log-softmax workspace).
    FSDP unsharded buffers: bf16 params of 2 layers (current + prefetch) + the root unit (embeddings, lm head);
      in backward also fp32 grads of 2 layers + root before reduce-scatter.
    vLLM: gpu_memory_utilization · device memory while it is awake (vLLM ≥ 0.10 sizes its KV cache so that its own
      total is that fraction of the device, whatever else is resident), i.e. in rollout, and in every phase when
      free_cache_engine=False; asleep (level 2: weights and KV cache released) only `vllm_resident_gb` remains, which
      is also counted while awake (CUDA context, outside the fraction).
    """
    G, P = w.n_gpus, model.params
    d, L, V = model.hidden, model.layers, model.vocab
    T_seq = w.prompt_len + w.max_resp
    states = {
        "actor": 16 * P / G,
        "critic": 16 * P / G if m.critic else 0.0,
        "ref": 2 * P / G if m.reference else 0.0,
    }

    def layer_act(T):
        return T * (10 * d + 4 * model.ffn) * 2

    def act_train(T, logits=True):
        per_layer = L * T * d * 2 + layer_act(T) if w.gradient_checkpointing else L * layer_act(T)
        return per_layer + (T * V * 2 * 2 if logits else 0.0)

    def act_fwd(T):
        return layer_act(T) + T * V * (2 + 4)

    unsharded_fwd = 2 * (2 * model.layer_params + model.embedding_params)  # bf16: 2 layers + root unit
    unsharded_train = unsharded_fwd + 4 * (2 * model.layer_params + model.embedding_params)  # + fp32 grads
    uses_vllm = w.gpu_memory_utilization > 0
    vllm = w.gpu_memory_utilization * hw.mem_gb * GB

    def model_states(phase, param_off, opt_off, own_phases, update_phase):
        params = 4 * P / G if (not param_off or phase in own_phases) else 0.0
        grads = 4 * P / G if phase == update_phase else 0.0
        opt = 8 * P / G if (not opt_off or phase == update_phase) else 0.0
        return params + grads + opt

    def resident(phase: str) -> dict:
        r = {"actor_states": model_states(phase, off.actor_param, off.actor_optimizer,
                                          ("update_actor", "old_log_prob"), "update_actor")}
        if m.critic:
            r["critic_states"] = model_states(phase, off.critic_param, off.critic_optimizer,
                                              ("update_critic", "values"), "update_critic")
        if m.reference:
            r["ref_params"] = states["ref"] if (not off.ref_param or phase == "ref") else 0.0
        T = w.mb(phase) * T_seq
        if phase in ("update_actor", "update_critic"):
            r["activations"] = act_train(T, logits=phase == "update_actor")  # the critic has a value head
            r["fsdp_unsharded"] = unsharded_train
        elif phase in ("ref", "old_log_prob", "values"):
            r["activations"] = act_fwd(T) if phase != "values" else layer_act(T)  # value head: no [T, V] logits
            r["fsdp_unsharded"] = unsharded_fwd
        r["vllm"] = vllm if (phase == "gen" or not w.free_cache_engine) else 0.0
        r["vllm_resident"] = hw.vllm_resident_gb * GB if uses_vllm else 0.0
        return r

    phases = ["gen"] + [p for p in TRAIN_PHASES if _phase_active(m, p)]
    per_phase = {p: resident(p) for p in phases}
    train_side = {p: sum(v for k, v in r.items() if not k.startswith("vllm")) for p, r in per_phase.items()}
    device = {p: sum(r.values()) + hw.runtime_overhead_gb * GB for p, r in per_phase.items()}
    peak_train_phase = max((p for p in phases if p != "gen"), key=lambda p: train_side[p])
    peak_device_phase = max(phases, key=lambda p: device[p])
    fwd_mb = max(w.mb("ref") if m.reference else 0, w.mb("old_log_prob") if m.old_log_prob else 0) or w.mb("ref")
    return {
        "states_gb": {k: v / GB for k, v in states.items()},
        "activations_train_gb": act_train(w.mb("update_actor") * T_seq) / GB,
        "activations_forward_gb": act_fwd(fwd_mb * T_seq) / GB,
        "vllm_reserved_gb": vllm / GB,
        "per_phase_gb": {p: {k: v / GB for k, v in r.items()} for p, r in per_phase.items()},
        "device_gb": {p: v / GB for p, v in device.items()},
        "peak_train_gb": train_side[peak_train_phase] / GB,
        "peak_train_phase": peak_train_phase,
        "peak_device_gb": device[peak_device_phase] / GB,
        "peak_device_phase": peak_device_phase,
        "fits": device[peak_device_phase] / GB <= hw.mem_gb,
    }


def _phase_active(m: MethodSpec, phase: str) -> bool:
    return {
        "ref": m.reference,
        "old_log_prob": m.old_log_prob,
        "values": m.critic,
        "update_critic": m.critic,
        "update_actor": True,
    }[phase]


# ------------------------------------------------------------------------------------------------------ predict
@dataclass
class Prediction:
    method: str
    label: str
    counts: dict
    flops: dict
    time_s: dict
    step_time_s: float
    memory: dict
    rollout: dict
    fits: bool = field(default=True)

    @property
    def peak_mem_gb(self) -> float:
        return self.memory["peak_device_gb"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_mem_gb"] = self.peak_mem_gb
        return d


def predict(
    model: ModelSpec, w: Workload, method: MethodSpec | str, hw: Hardware = H100, offload: Offload = Offload()
) -> Prediction:
    m = METHODS[method] if isinstance(method, str) else method
    fl = phase_flops(model, w, m)
    t, ro = _phase_times(model, w, m, hw, offload, fl)
    mem = _memory(model, w, m, hw, offload)
    return Prediction(
        method=m.key,
        label=m.label,
        counts=_counts(model, w, m),
        flops=fl,
        time_s=t,
        step_time_s=sum(t.values()),
        memory=mem,
        rollout={k: v for k, v in ro.items() if k != "gen_s"},
        fits=bool(mem["fits"] and ro["fits"]),
    )


def predict_all(
    model: ModelSpec, w: Workload, hw: Hardware = H100, offload: Offload = Offload(), methods=None
) -> dict[str, Prediction]:
    return {k: predict(model, w, METHODS[k], hw, offload) for k in (methods or METHODS)}


def ratios_vs(preds: dict[str, Prediction], base: str = "ppo_n1") -> dict[str, dict]:
    """Per method: step time / base, base step time / time (speed-up), peak memory / base (both definitions)."""
    b = preds[base]
    out = {}
    for k, p in preds.items():
        out[k] = {
            "time_ratio": p.step_time_s / b.step_time_s,
            "speedup": b.step_time_s / p.step_time_s,
            "peak_device_ratio": p.memory["peak_device_gb"] / b.memory["peak_device_gb"],
            "peak_train_ratio": p.memory["peak_train_gb"] / b.memory["peak_train_gb"],
        }
    return out


# ----------------------------------------------------------------------------------------------- paper compare
# Paper (arXiv 2505.15311), 7B, 4×H100, 128 prompts, response 2048, micro-batch 1, vLLM memory fraction 0.4.
PAPER_RATIOS = {
    "tbrm_n1_mem_saving_vs_ppo_n1": 0.333,  # 33.3% less peak GPU memory
    "ppo_n1_over_tbrm_n1_time": 1.3,  # TBRM n=1 1.3× faster per step than PPO n=1
    "grpo_n4_over_tbrm_n1_time": 3.1,  # TBRM n=1 3.1× faster than GRPO n=4
    "grpo_n4_over_tbrm_n4_time": 1.0,  # TBRM n=4 ≈ GRPO n=4
}


def paper_setting(prompt_len: int = 160, response_len: int = 2048, **kw) -> tuple[ModelSpec, Workload]:
    w = Workload(
        prompt_len=prompt_len, response_len=response_len, prompts_per_step=128, n_gpus=4, micro_batch_size=1,
        gpu_memory_utilization=0.4, **kw,
    )
    return PRESETS["qwen2.5-math-7b"], w


def _paper_metrics(preds: dict[str, Prediction]) -> dict[str, dict]:
    t = {k: p.step_time_s for k, p in preds.items()}
    out = {
        "tbrm_n1_mem_saving_vs_ppo_n1 (device peak)": (
            1 - preds["tbrm_n1"].memory["peak_device_gb"] / preds["ppo_n1"].memory["peak_device_gb"],
            PAPER_RATIOS["tbrm_n1_mem_saving_vs_ppo_n1"],
        ),
        "tbrm_n1_mem_saving_vs_ppo_n1 (training-engine peak)": (
            1 - preds["tbrm_n1"].memory["peak_train_gb"] / preds["ppo_n1"].memory["peak_train_gb"],
            PAPER_RATIOS["tbrm_n1_mem_saving_vs_ppo_n1"],
        ),
        "ppo_n1_over_tbrm_n1_time": (t["ppo_n1"] / t["tbrm_n1"], PAPER_RATIOS["ppo_n1_over_tbrm_n1_time"]),
        "grpo_n4_over_tbrm_n1_time": (t["grpo_n4"] / t["tbrm_n1"], PAPER_RATIOS["grpo_n4_over_tbrm_n1_time"]),
        "grpo_n4_over_tbrm_n4_time": (t["grpo_n4"] / t["tbrm_n4"], PAPER_RATIOS["grpo_n4_over_tbrm_n4_time"]),
    }
    return {k: {"predicted": p, "paper": q, "difference": p - q} for k, (p, q) in out.items()}


def compare_with_paper(
    hw: Hardware = H100, offload: Offload = Offload(), file=None, **workload_kw
) -> dict:
    file = file or sys.stdout
    model, w = paper_setting(**workload_kw)
    preds = predict_all(model, w, hw, offload)
    print(_format_table(model, w, hw, offload, preds), file=file)
    cmp = _paper_metrics(preds)
    print("\nPaper comparison (7B, 4×H100, 128 prompts, micro-batch 1, vLLM fraction 0.4):", file=file)
    print(f"  {'quantity':55s} {'predicted':>10s} {'paper':>8s} {'diff':>8s}", file=file)
    for k, v in cmp.items():
        print(f"  {k:55s} {v['predicted']:10.3f} {v['paper']:8.3f} {v['difference']:+8.3f}", file=file)
    return {"setting": _setting_dict(model, w, hw, offload), "predictions": {k: p.to_dict() for k, p in preds.items()},
            "ratios_vs_ppo_n1": ratios_vs(preds), "paper_comparison": cmp}


# ------------------------------------------------------------------------------------------------ from a config
HF_ARCHITECTURES = ("qwen2", "llama", "mistral")  # decoder layouts qwen2_param_count counts exactly


@dataclass(frozen=True)
class Setting:
    """Everything predict() needs, as read from one composed tbrm_verl config (see from_config)."""

    model: ModelSpec
    workload: Workload
    method: MethodSpec
    hardware: Hardware
    offload: Offload

    def predict(self) -> Prediction:
        return predict(self.model, self.workload, self.method, self.hardware, self.offload)


def model_spec_for(path: str) -> ModelSpec:
    """The ModelSpec of a model path: a local directory's config.json if there is one, else a preset named like the
    path's last component (`Qwen/Qwen2.5-Math-7B` -> qwen2.5-math-7b)."""
    local = os.path.join(os.path.expanduser(str(path)), "config.json")
    if os.path.isfile(local):
        with open(local, encoding="utf-8") as f:
            return model_spec_from_hf_config(json.load(f), name=str(path))
    key = os.path.basename(os.path.normpath(str(path))).lower()
    if key in PRESETS:
        return PRESETS[key]
    raise ValueError(f"model {path}: no config.json there and no preset named {key!r} (presets: "
                     f"{', '.join(sorted(PRESETS))}); point actor_rollout_ref.model.path at a local model directory")


def model_spec_from_hf_config(c: dict, name: str = "hf") -> ModelSpec:
    mt = c.get("model_type")
    if mt not in HF_ARCHITECTURES:
        raise ValueError(f"model {name}: model_type {mt!r} is not modelled (only {', '.join(HF_ARCHITECTURES)})")
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    tied = bool(c.get("tie_word_embeddings", False))
    params = qwen2_param_count(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], heads,
                               kv_heads, head_dim, tied, qkv_bias=mt == "qwen2")
    return ModelSpec(name, params=params, layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                     vocab=c["vocab_size"], num_kv_heads=kv_heads, head_dim=head_dim,
                     intermediate=c["intermediate_size"], tied_embeddings=tied)


def _get(cfg, key: str, default=None):
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key, default=default)
    return default if v is None else v


def _refuse(key: str, value, why: str) -> ValueError:
    return ValueError(f"{key}={value}: {why}")


def from_config(cfg, hw: Hardware = H100, response_len: int | None = None) -> Setting:
    """Translate a composed tbrm_verl config (tbrm_verl.config.compose, or what tbrm_verl.main runs) into the cost
    model's inputs. Every workload number and offload flag is read from the config:

      method, n            run.method (tbrm: TBRM trainer), actor_rollout_ref.rollout.n; reference and critic as verl
                           decides them (verl.trainer.ppo.utils.need_reference_policy / need_critic); π_old pass for
                           PPO/GRPO only (the TBRM trainer skips it)
      lengths, batch       data.max_prompt_length, data.max_response_length (every response at the cap unless
                           `response_len` is given: a memory check must assume the longest), data.train_batch_size,
                           actor.ppo_mini_batch_size, actor.ppo_epochs
      micro-batches        actor.ppo_micro_batch_size_per_gpu, rollout.log_prob_micro_batch_size_per_gpu,
                           ref.log_prob_micro_batch_size_per_gpu, critic.ppo_micro_batch_size_per_gpu,
                           critic.forward_micro_batch_size_per_gpu
      GPUs                 trainer.n_gpus_per_node × trainer.nnodes (FSDP shards over all of them)
      rollout              rollout.name (vllm: gpu_memory_utilization; otherwise no vLLM), tensor_model_parallel_size,
                           max_num_seqs, enable_prefix_caching, free_cache_engine
      offload              actor.fsdp_config.{param,optimizer}_offload, critic.fsdp.{param,optimizer}_offload,
                           ref.fsdp_config.{forward_only,param_offload} (forward_only = FSDP CPU offload in verl
                           0.9.1); fsdp2 `offload_policy` counts as both
      model                actor_rollout_ref.model.path (model_spec_for); enable_gradient_checkpointing

    `hw` is the GPU (memory, throughputs): configs do not name it. Raises ValueError for what the model does not
    cover (dynamic batch sizes, Megatron, FSDP sub-groups)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    ar = "actor_rollout_ref"
    if _get(cfg, f"{ar}.actor.use_dynamic_bsz", False):
        raise _refuse(f"{ar}.actor.use_dynamic_bsz", True, "token-budgeted micro-batches are not modelled; "
                      "estimate with fixed *_micro_batch_size_per_gpu")
    strategy = _get(cfg, f"{ar}.actor.strategy", "fsdp")
    if strategy not in ("fsdp", "fsdp2"):
        raise _refuse(f"{ar}.actor.strategy", strategy, "only FSDP engines are modelled")
    world = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    fsdp_size = int(_get(cfg, f"{ar}.actor.fsdp_config.fsdp_size", -1))
    if fsdp_size not in (-1, world):
        raise _refuse(f"{ar}.actor.fsdp_config.fsdp_size", fsdp_size, f"sharding over fewer than all {world} GPUs "
                      "is not modelled")

    tbrm = _get(cfg, "run.method", None) == "tbrm"
    n = int(_get(cfg, f"{ar}.rollout.n", 1))
    reference, critic = bool(need_reference_policy(cfg)), bool(need_critic(cfg))
    method_name = str(_get(cfg, "run.method", "tbrm" if tbrm else "ppo"))
    key = f"{method_name}_n{n}" + ("_ref_free" if tbrm and not reference else "")
    method = MethodSpec(key, f"{method_name.upper()} n={n}" + (" ref-free" if tbrm and not reference else ""), n,
                        reference=reference, old_log_prob=not tbrm, critic=critic)

    def offload(section: str, engine_key: str, forward_only_counts: bool = False) -> tuple[bool, bool]:
        policy = bool(_get(cfg, f"{section}.{engine_key}.offload_policy", False))
        param = bool(_get(cfg, f"{section}.{engine_key}.param_offload", False)) or policy
        if forward_only_counts:
            param = param or bool(_get(cfg, f"{section}.{engine_key}.forward_only", False))
        opt = bool(_get(cfg, f"{section}.{engine_key}.optimizer_offload", False)) or policy
        return param, opt

    a_par, a_opt = offload(f"{ar}.actor", "fsdp_config")
    c_par, c_opt = offload("critic", "fsdp") if critic else (False, False)
    r_par, _ = offload(f"{ar}.ref", "fsdp_config", forward_only_counts=True)

    rollout = cfg[ar].rollout
    vllm = rollout.name == "vllm"
    max_resp = int(cfg.data.max_response_length)
    sleep = bool(_get(cfg, f"{ar}.rollout.free_cache_engine", True)) and \
        _get(cfg, f"{ar}.rollout.enable_sleep_mode", True) is not False
    w = Workload(
        prompt_len=int(cfg.data.max_prompt_length),
        response_len=int(response_len or max_resp),
        max_response_len=max_resp,
        prompts_per_step=int(cfg.data.train_batch_size),
        n_gpus=world,
        micro_batch_size=int(cfg[ar].actor.ppo_micro_batch_size_per_gpu),
        log_prob_micro_batch_size=_get(cfg, f"{ar}.rollout.log_prob_micro_batch_size_per_gpu"),
        ref_micro_batch_size=_get(cfg, f"{ar}.ref.log_prob_micro_batch_size_per_gpu"),
        critic_micro_batch_size=_get(cfg, "critic.ppo_micro_batch_size_per_gpu") if critic else None,
        critic_forward_micro_batch_size=_get(cfg, "critic.forward_micro_batch_size_per_gpu") if critic else None,
        gpu_memory_utilization=float(rollout.gpu_memory_utilization) if vllm else 0.0,
        ppo_mini_batch_size=int(_get(cfg, f"{ar}.actor.ppo_mini_batch_size", cfg.data.train_batch_size)),
        ppo_epochs=int(_get(cfg, f"{ar}.actor.ppo_epochs", 1)),
        rollout_tp=int(_get(cfg, f"{ar}.rollout.tensor_model_parallel_size", 1)),
        prefix_caching=bool(_get(cfg, f"{ar}.rollout.enable_prefix_caching", True)),
        max_num_seqs=int(_get(cfg, f"{ar}.rollout.max_num_seqs", 256)),
        free_cache_engine=sleep,
        gradient_checkpointing=bool(_get(cfg, f"{ar}.model.enable_gradient_checkpointing", True)),
    )
    return Setting(model=model_spec_for(cfg[ar].model.path), workload=w, method=method, hardware=hw,
                   offload=Offload(a_par, a_opt, c_par, c_opt, r_par))


_STATED_HW = re.compile(r"(\d+)\s*[x×]\s*([A-Za-z][\w-]*)\s+(\d+(?:\.\d+)?)\s*GB")


def stated_hardware(recipe_path) -> tuple[int, str, float] | None:
    """(GPUs per node, GPU name, GB per GPU) from a recipe's header comment, e.g. `# ... 4x H100 80GB, one node`."""
    with open(recipe_path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            hit = _STATED_HW.search(line)
            if hit:
                return int(hit.group(1)), hit.group(2), float(hit.group(3))
    return None


def fit_line(name: str, pred: Prediction, hw: Hardware) -> str:
    """One line: the predicted per-GPU peak of `name` against the GPU's memory."""
    m = pred.memory
    verdict = "fits" if pred.fits else ("EXCEEDS the GPU memory" if not m["fits"] else "vLLM has no room for one "
                                                                                      "sequence's KV cache")
    return (f"{name}: predicted peak {m['peak_device_gb']:.1f} GB per GPU (in {m['peak_device_phase']}) of "
            f"{hw.mem_gb:g} GB ({hw.name}): {verdict}")


# ----------------------------------------------------------------------------------------------- bench compare
def compare_with_bench(bench_json_path, hw: Hardware | None = None, offload: Offload = Offload(), file=None,
                       **workload_kw) -> dict:
    """Print the model's predicted ratios (vs PPO n=1) beside those measured in a benchmark's bench.json.

    `hw` should describe the machine the benchmark ran on (on CPU: `cpu_hardware(...)` with measured throughputs and
    fixed start-up costs). `workload_kw` overrides Workload fields the bench file does not carry (micro_batch_size,
    gpu_memory_utilization (use 0 for a non-vLLM CPU rollout), ppo_mini_batch_size, ...)."""
    file = file or sys.stdout
    with open(bench_json_path, encoding="utf-8") as f:
        bench = json.load(f)
    s = bench["setting"]
    model = ModelSpec(
        "bench", params=float(s["params"]), layers=int(s["layers"]), hidden=int(s["hidden"]), vocab=int(s["vocab"]),
        num_kv_heads=s.get("num_kv_heads"), head_dim=s.get("head_dim"), intermediate=s.get("intermediate"),
    )
    wkw = {"micro_batch_size": 1, "gpu_memory_utilization": 0.0 if hw is not None and hw.name == "cpu" else 0.4}
    wkw.update(workload_kw)
    w = Workload(prompt_len=int(s["prompt_len"]), response_len=int(s["response_len"]),
                 prompts_per_step=int(s["prompts_per_step"]), n_gpus=int(s["n_gpus"]), **wkw)
    hw = hw or H100
    measured = bench["methods"]
    keys = [k for k in METHODS if k in measured]
    preds = predict_all(model, w, hw, offload, methods=keys)
    base = "ppo_n1" if "ppo_n1" in measured else keys[0]
    mb = measured[base]
    rows = {}
    print(f"bench: {bench_json_path}  (ratios vs {base}; hardware model: {hw.name})", file=file)
    print(f"  {'method':18s} {'time ratio meas':>15s} {'pred':>7s} {'diff':>7s} | {'mem ratio meas':>14s} "
          f"{'pred':>7s} {'diff':>7s} | {'step s meas':>11s} {'pred':>8s}", file=file)
    for k in keys:
        me, p = measured[k], preds[k]
        tr_m = me["step_time_s"] / mb["step_time_s"]
        tr_p = p.step_time_s / preds[base].step_time_s
        mr_m = me["peak_mem_gb"] / mb["peak_mem_gb"] if mb.get("peak_mem_gb") else float("nan")
        mr_p = p.peak_mem_gb / preds[base].peak_mem_gb
        parts_m = {q: float(me.get("parts", {}).get(q, 0.0)) for q in PARTS}
        rows[k] = {"time_ratio": {"measured": tr_m, "predicted": tr_p}, "mem_ratio": {"measured": mr_m,
                   "predicted": mr_p}, "step_time_s": {"measured": me["step_time_s"], "predicted": p.step_time_s},
                   "peak_mem_gb": {"measured": me.get("peak_mem_gb"), "predicted": p.peak_mem_gb},
                   "parts_s": {"measured": parts_m, "predicted": dict(p.time_s)}}
        print(f"  {k:18s} {tr_m:15.3f} {tr_p:7.3f} {tr_p - tr_m:+7.3f} | {mr_m:14.3f} {mr_p:7.3f} "
              f"{mr_p - mr_m:+7.3f} | {me['step_time_s']:11.2f} {p.step_time_s:8.2f}", file=file)
    print("  parts (s), measured / predicted:", file=file)
    print("  " + f"{'method':18s}" + "".join(f"{q:>18s}" for q in PARTS), file=file)
    for k in keys:
        r = rows[k]["parts_s"]
        print("  " + f"{k:18s}" + "".join(f"{r['measured'][q]:8.2f}/{r['predicted'][q]:<8.2f} " for q in PARTS),
              file=file)
    return {"setting": _setting_dict(model, w, hw, offload), "base": base, "methods": rows}


# ------------------------------------------------------------------------------------------------------ output
def _setting_dict(model, w, hw, offload) -> dict:
    return {"model": asdict(model), "workload": asdict(w), "hardware": asdict(hw), "offload": asdict(offload)}


def _format_table(model: ModelSpec, w: Workload, hw: Hardware, offload: Offload, preds: dict[str, Prediction]) -> str:
    lines = [
        f"model {model.name}: P={model.params / 1e9:.3f}B L={model.layers} d={model.hidden} V={model.vocab} "
        f"kv/token={model.kv_bytes_per_token() / 1024:.0f} KiB",
        f"workload: prompts/step={w.prompts_per_step} prompt={w.prompt_len} response={w.response_len} "
        f"(max {w.max_resp}) GPUs={w.n_gpus} micro-batch={w.micro_batch_size} vLLM fraction="
        f"{w.gpu_memory_utilization} rollout TP={w.rollout_tp} ppo_epochs={w.ppo_epochs} "
        f"mini-batch={w.ppo_mini_batch_size or w.prompts_per_step}",
        f"hardware {hw.name}: peak {hw.peak_flops / 1e12:.0f} TFLOP/s, {hw.mem_bw / 1e12:.2f} TB/s, {hw.mem_gb:.0f} GB;"
        f" MFU prefill {hw.mfu_prefill} forward {hw.mfu_forward} train {hw.mfu_train}; decode {hw.decode_bw_eff}"
        f"·BW + {hw.decode_step_overhead_s * 1e3:.1f} ms/step; phase overhead {hw.phase_overhead_s} s; other "
        f"{hw.other_fixed_s} s + {hw.other_per_sample_s * 1e3:.1f} ms/trajectory",
        f"offload: {asdict(offload)}",
        "",
        f"{'method':18s} {'PFLOP':>8s} " + "".join(f"{p:>14s}" for p in PARTS)
        + f" {'step s':>8s} {'x PPO':>6s} {'peak dev GB':>11s} {'peak train GB':>13s} {'fits':>5s}",
    ]
    base = preds.get("ppo_n1")
    for k, p in preds.items():
        ratio = p.step_time_s / base.step_time_s if base else float("nan")
        lines.append(
            f"{k:18s} {sum(p.flops.values()) / 1e15:8.1f} " + "".join(f"{p.time_s[q]:14.2f}" for q in PARTS)
            + f" {p.step_time_s:8.2f} {ratio:6.3f} {p.memory['peak_device_gb']:11.1f} "
            f"{p.memory['peak_train_gb']:13.1f} {str(p.fits):>5s}"
        )
    lines.append("")
    first = next(iter(preds.values()))
    lines.append(f"vLLM KV-cache budget per replica: {first.rollout['kv_budget_gb']:.1f} GB "
                 f"({model.kv_bytes_per_token() / 1024:.0f} KiB/token, {w.prompt_len + w.max_resp} tokens/sequence)")
    lines.append("rollout: " + "; ".join(
        f"{k}: {p.rollout['concurrency']} seqs/replica x {p.rollout['waves']:.2f} waves, prefill "
        f"{p.rollout['prefill_s']:.2f}s decode {p.rollout['decode_s']:.2f}s" for k, p in preds.items()))
    lines.append("memory (GB/GPU): " + "; ".join(
        f"{k}: states {', '.join(f'{a}={b:.1f}' for a, b in p.memory['states_gb'].items() if b)}, act(train) "
        f"{p.memory['activations_train_gb']:.1f}, FSDP unsharded(train) "
        f"{p.memory['per_phase_gb']['update_actor']['fsdp_unsharded']:.1f}, vLLM {p.memory['vllm_reserved_gb']:.1f}, "
        f"device peak in {p.memory['peak_device_phase']}, training peak in {p.memory['peak_train_phase']}"
        for k, p in preds.items()))
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.cost_model", description=__doc__.split("\n")[0])
    ap.add_argument("--paper", action="store_true", help="7B/4xH100 paper setting vs the paper's ratios (default)")
    ap.add_argument("--bench", help="compare with a bench.json (see compare_with_bench)")
    ap.add_argument("--model", choices=sorted(PRESETS), help="preset model (custom: --params/--layers/--hidden/--vocab)")
    ap.add_argument("--params", type=float)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--response-len", type=int, default=None)
    ap.add_argument("--max-response-len", type=int)
    ap.add_argument("--prompts", type=int, default=128, help="prompts per step")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--gpu-mem-util", type=float, default=None, help="vLLM gpu_memory_utilization")
    ap.add_argument("--mini-batch", type=int, help="ppo_mini_batch_size in prompts (default: whole batch)")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--kv-cache-gb", type=float, help="override vLLM's KV-cache budget per GPU (GB)")
    for f in ("actor-param", "actor-optimizer", "critic-param", "critic-optimizer"):
        ap.add_argument(f"--offload-{f}", action="store_true")
    ap.add_argument("--offload-ref-param", action=argparse.BooleanOptionalAction, default=True,
                    help="reference on the host between its passes (verl 0.9.1's forward_only reference: default on)")
    ap.add_argument("--hw", choices=["h100", "cpu"], default="h100")
    ap.add_argument("--peak-tflops", type=float, help="override peak FLOP/s (cpu: achieved matmul rate)")
    ap.add_argument("--mem-bw-gbs", type=float, help="override memory bandwidth, GB/s")
    ap.add_argument("--mem-gb", type=float)
    ap.add_argument("--mfu-train", type=float)
    ap.add_argument("--mfu-forward", type=float)
    ap.add_argument("--mfu-prefill", type=float)
    ap.add_argument("--decode-bw-eff", type=float)
    ap.add_argument("--decode-step-overhead-s", type=float)
    ap.add_argument("--phase-overhead-s", type=float)
    ap.add_argument("--other-fixed-s", type=float)
    ap.add_argument("--other-per-sample-s", type=float)
    ap.add_argument("--runtime-overhead-gb", type=float)
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    ap.add_argument("--recipe", help="check a recipe: a config name in --config-dir or a path to a .yaml; prints "
                    "its per-GPU memory by phase and exits 1 when the predicted peak exceeds the GPU memory (the "
                    "recipe header's 'Nx GPU MGB', else 80 GB, or --mem-gb), 2 when it cannot be checked")
    ap.add_argument("--config-dir", default=str(RECIPES_DIR), help="where --recipe names are looked up")
    ap.add_argument("overrides", nargs="*", help="with --recipe: Hydra overrides (key=value), as for tbrm_verl.main")
    return ap


RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")


def recipe_setting(recipe: str, overrides=(), config_dir: str = RECIPES_DIR, hw: Hardware | None = None,
                   response_len: int | None = None) -> tuple[str, Setting]:
    """Compose a recipe as a GPU launch would (profile=gpu unless overridden) and translate it (from_config); the GPU
    memory is the one the recipe's header states unless `hw` is given. Returns (recipe name, Setting)."""
    from tbrm_verl.config import compose

    path = recipe if recipe.endswith(".yaml") else os.path.join(config_dir, recipe + ".yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path}")
    name = os.path.basename(path)[: -len(".yaml")]
    overrides = list(overrides)
    if not any(o.split("=", 1)[0].lstrip("+~") == "profile" for o in overrides):
        overrides.append("profile=gpu")  # what the recipe is for; compose() would pick cpu on a machine without GPU
    cfg = compose(overrides, config_name=name, config_dirs=[os.path.dirname(os.path.abspath(path))])
    if hw is None:
        stated = stated_hardware(path)
        hw = H100 if stated is None else replace(H100, name=f"{stated[1]} {stated[2]:g}GB", mem_gb=stated[2])
    return name, from_config(cfg, hw=hw, response_len=response_len)


def _format_recipe(name: str, st: Setting, p: Prediction) -> str:
    w, off = st.workload, st.offload
    lines = [
        f"recipe {name}: {st.method.label} on {st.model.name} (P={st.model.params / 1e9:.3f}B), {w.n_gpus} GPUs, "
        f"{w.prompts_per_step} prompts x n={st.method.n}, prompt <= {w.prompt_len}, response <= {w.max_resp} tokens",
        f"  micro-batches per GPU: actor {w.mb('update_actor')}, pi_old {w.mb('old_log_prob')}, ref {w.mb('ref')}"
        + (f", critic {w.mb('update_critic')} / values {w.mb('values')}" if st.method.critic else "")
        + f"; vLLM fraction {w.gpu_memory_utilization}, TP {w.rollout_tp}, sleeps outside rollout: "
        f"{w.free_cache_engine}",
        "  offload: " + ", ".join(f"{k}={v}" for k, v in asdict(off).items()),
        "",
        f"  {'phase':14s} {'device GB':>9s}  resident (GB per GPU)",
    ]
    for phase, parts in p.memory["per_phase_gb"].items():
        desc = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v)
        lines.append(f"  {phase:14s} {p.memory['device_gb'][phase]:9.1f}  {desc}, runtime "
                     f"{st.hardware.runtime_overhead_gb:.1f}")
    lines += ["", f"  step time (every response at the cap): {p.step_time_s:.1f} s ("
              + ", ".join(f"{q} {p.time_s[q]:.1f}" for q in PARTS if p.time_s[q]) + ")",
              fit_line(name, p, st.hardware)]
    return "\n".join(lines)


def _hardware_from_args(a) -> Hardware:
    if a.hw == "cpu":
        hw = cpu_hardware(peak_tflops=a.peak_tflops or 0.1, mem_bw_gbs=a.mem_bw_gbs or 10.0, mem_gb=a.mem_gb or 64.0)
    else:
        hw = H100
        if a.peak_tflops:
            hw = replace(hw, peak_flops=a.peak_tflops * 1e12)
        if a.mem_bw_gbs:
            hw = replace(hw, mem_bw=a.mem_bw_gbs * 1e9)
        if a.mem_gb:
            hw = replace(hw, mem_gb=a.mem_gb)
    over = {
        "mfu_train": a.mfu_train, "mfu_forward": a.mfu_forward, "mfu_prefill": a.mfu_prefill,
        "decode_bw_eff": a.decode_bw_eff, "decode_step_overhead_s": a.decode_step_overhead_s,
        "phase_overhead_s": a.phase_overhead_s, "other_fixed_s": a.other_fixed_s,
        "other_per_sample_s": a.other_per_sample_s, "runtime_overhead_gb": a.runtime_overhead_gb,
    }
    return replace(hw, **{k: v for k, v in over.items() if v is not None})


def _workload_kw(a) -> dict:
    kw = {"ppo_epochs": a.ppo_epochs, "rollout_tp": a.rollout_tp, "prefix_caching": not a.no_prefix_caching,
          "kv_cache_gb": a.kv_cache_gb}
    if a.max_response_len is not None:
        kw["max_response_len"] = a.max_response_len
    if a.mini_batch is not None:
        kw["ppo_mini_batch_size"] = a.mini_batch
    if a.micro_batch is not None:
        kw["micro_batch_size"] = a.micro_batch
    if a.gpu_mem_util is not None:
        kw["gpu_memory_utilization"] = a.gpu_mem_util
    return kw


def main(argv=None) -> int:
    a = _build_parser().parse_args(argv)
    hw = _hardware_from_args(a)
    off = Offload(a.offload_actor_param, a.offload_actor_optimizer, a.offload_critic_param,
                  a.offload_critic_optimizer, a.offload_ref_param)
    wkw = _workload_kw(a)
    if a.overrides and not a.recipe:
        raise SystemExit(f"unexpected arguments {a.overrides}: key=value overrides go with --recipe")
    if a.recipe:
        if a.mem_gb:
            hw = replace(hw, name=f"{a.mem_gb:g} GB per GPU from --mem-gb")
        try:
            name, st = recipe_setting(a.recipe, a.overrides, a.config_dir, hw=hw if a.mem_gb else None,
                                      response_len=a.response_len)
        except (FileNotFoundError, ValueError) as exc:  # no such recipe; a setting the model does not cover
            print(f"tbrm_verl.tools.cost_model: {exc}", file=sys.stderr)
            return 2  # 1 means "does not fit"
        p = st.predict()
        print(_format_recipe(name, st, p))
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump({"recipe": name, "setting": _setting_dict(st.model, st.workload, st.hardware, st.offload),
                           "method": asdict(st.method), "prediction": p.to_dict()}, f, indent=2, default=float)
        return 0 if p.fits else 1
    if a.bench:
        result = compare_with_bench(a.bench, hw=hw, offload=off, **wkw)
    elif a.model or a.params:
        if a.model:
            model = PRESETS[a.model]
        else:
            missing = [n for n in ("params", "layers", "hidden", "vocab") if getattr(a, n) is None]
            if missing:
                raise SystemExit(f"custom model needs --{' --'.join(missing)}")
            model = ModelSpec("custom", a.params, a.layers, a.hidden, a.vocab, a.kv_heads, a.head_dim, a.intermediate)
        wkw.setdefault("micro_batch_size", 1)
        w = Workload(prompt_len=a.prompt_len or 160, response_len=a.response_len or 2048,
                     prompts_per_step=a.prompts, n_gpus=a.gpus, **wkw)
        preds = predict_all(model, w, hw, off)
        print(_format_table(model, w, hw, off, preds))
        rat = ratios_vs(preds)
        print("\nratios vs PPO n=1 (step time, speed-up, device-peak memory, training-engine-peak memory):")
        for k, r in rat.items():
            print(f"  {k:18s} time x{r['time_ratio']:.3f}  speed-up {r['speedup']:.3f}  mem(dev) "
                  f"x{r['peak_device_ratio']:.3f}  mem(train) x{r['peak_train_ratio']:.3f}")
        result = {"setting": _setting_dict(model, w, hw, off), "predictions": {k: p.to_dict() for k, p in
                  preds.items()}, "ratios_vs_ppo_n1": rat}
    else:
        kw = dict(wkw)
        if a.prompt_len:
            kw["prompt_len"] = a.prompt_len
        if a.response_len:
            kw["response_len"] = a.response_len
        kw.pop("micro_batch_size", None)
        kw.pop("gpu_memory_utilization", None)
        result = compare_with_paper(hw=hw, offload=off, **kw)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
