"""Per-phase FLOPs, time and per-GPU memory of one training step: the cost model's equations (docs/cost_model.md)."""

from __future__ import annotations

import math

from tbrm_verl.tools.cost_model.specs import (
    GB,
    PARTS,
    TRAIN_PHASES,
    Hardware,
    MethodSpec,
    ModelSpec,
    Offload,
    Workload,
)


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
