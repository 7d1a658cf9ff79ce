"""The cost model's inputs: model, workload, hardware, offload and method specs, model presets, the phases a step is
split into (see the package docstring for what each phase costs)."""

from __future__ import annotations

from dataclasses import dataclass

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
