"""`rollout.name=cpu_hf`: the CPU stand-in for the vLLM rollout that GPU runs use.

verl 0.9.1's rollout is server based (vLLM / SGLang / TRT-LLM replicas behind an agent loop), none of which runs
beside verl on a CPU machine. This backend plugs into the same seams as vLLM:

* `CPURolloutServer`, a Ray actor that serves verl's token-in/token-out `generate(prompt_ids, sampling_params,
  request_id, ...) -> TokenOutput` with a transformers model in float32. Concurrent requests are gathered into one
  batch (left padding, KV cache) and sampled with a per-request generator seeded from (seed, training step, prompt,
  occurrence), so a resumed run samples what an uninterrupted one would.
  `rollout.ignore_eos=true` (or a request's `ignore_eos`) samples past EOS to max_tokens, as vLLM does.
  `abort_all_requests` / `resume_generation` behave as verl's vLLM server's (what `colocate_async` calls around the
  weight sync): abort stops the batch in flight between two decoding steps and returns each request's tokens so far
  with `stop_reason="aborted"` (verl's FullyAsyncLLMServerClient resends prompt + partial tokens later); until
  resume, a new request waits (or, after `abort_all_requests(reject_request=True)`, comes back empty and aborted).
* `CPURolloutReplica`, the replica class verl's LLMServerManager launches (one server per actor rank).
* `CPUServerAdapter`, the rollout object inside each FSDP actor worker: after every actor update it receives the
  full weights from verl's checkpoint engine ("naive" backend) and loads them into its server.

It is slow (no paged attention, no continuous batching) and meant for tiny models: tests, CI, the embedded default.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

logger = logging.getLogger(__name__)

NAME = "cpu_hf"
_BATCH_WINDOW_S = 0.02  # how long the server waits for more concurrent requests before generating a batch


def server_name(replica_rank: int, node_rank: int = 0, kind: str = "") -> str:
    return f"{NAME}_server{kind}_{replica_rank}_{node_rank}"


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    future: asyncio.Future = field(repr=False)
    ignore_eos: bool = False
    request_id: str = ""


class _Control:
    """Abort and resume state: `abort` is read by the generation thread between decoding steps; `gate` is closed from
    abort_all_requests until resume_generation."""

    def __init__(self):
        self.abort = threading.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.reject = False


def _request_seed(base_seed: int, global_steps: Optional[int], prompt_ids: list[int], occurrence: int) -> int:
    digest = hashlib.sha256(f"{base_seed}|{global_steps}|{occurrence}|{prompt_ids}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sample(logits: torch.Tensor, req: _Request, generator: torch.Generator) -> tuple[int, float]:
    """One token from 1-D float32 logits under the request's sampling params; returns (token, its log-prob)."""
    if req.temperature <= 0:  # greedy, as vLLM treats temperature 0
        logp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        return tok, float(logp[tok])
    scaled = logits / req.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    if (req.top_k and req.top_k > 0) or req.top_p < 1.0:
        keep = torch.ones_like(probs, dtype=torch.bool)
        if req.top_k and req.top_k > 0:
            kth = torch.topk(probs, min(req.top_k, probs.numel())).values[-1]
            keep &= probs >= kth
        if req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > req.top_p
            keep[order[drop]] = False
        probs = torch.where(keep, probs, 0.0)
    tok = int(torch.multinomial(probs, 1, generator=generator))
    return tok, float(logp[tok])


class CPURolloutServer:
    """Ray actor holding an HF causal LM; verl's LLMServerClient calls `generate` on it directly."""

    def __init__(self, config, model_config, replica_rank: int = 0, num_threads: int | None = None):
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.config = config
        self.replica_rank = replica_rank
        torch.set_num_threads(num_threads or max(1, os.cpu_count() or 1))
        path = model_config.local_path
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa")
        self.model.eval()
        gen_cfg = getattr(model_config, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if eos is None:
            eos = model_config.tokenizer.eos_token_id if getattr(model_config, "tokenizer", None) else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        tok = getattr(model_config, "tokenizer", None)
        self.pad_id = (tok.pad_token_id if tok is not None else None) or 0
        self.max_model_len = (config.max_model_len or (config.prompt_length + config.response_length))
        self.base_seed = int(config.seed or 0)
        self.global_steps: Optional[int] = None
        self._init_request_state()

    def _init_request_state(self) -> None:
        """The queue, batching and abort state (no model): also what tests build a server skeleton with."""
        self._pending: list[_Request] = []
        self._occurrences: dict[tuple, int] = {}
        self._worker: Optional[asyncio.Task] = None  # the one task batching pending requests (see _drain)
        self._control = _Control()
        self._in_flight: list[_Request] = []  # the batch being generated (abort_all_requests reports its ids)

    # ---- generation -------------------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        priority: int = 0,
        **_ignored,
    ) -> TokenOutput:
        if image_data or video_data or audio_data:
            raise NotImplementedError("the cpu_hf rollout serves text-only models")
        prompt_ids = [int(t) for t in prompt_ids]
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"Prompt length ({len(prompt_ids)}) leaves no room to generate within max_model_len "
                f"({self.max_model_len}); raise data.max_prompt_length / rollout.prompt_length or shorten the prompt."
            )
        ctl = self._control
        if not ctl.gate.is_set():  # aborted and not resumed yet: what vLLM's server does
            if ctl.reject:
                return TokenOutput(token_ids=[], log_probs=[], stop_reason="aborted",
                                   extra_fields={"global_steps": self.global_steps})
            await ctl.gate.wait()
        params = dict(sampling_params)
        max_tokens = params.get("max_tokens", params.get("max_new_tokens"))
        if max_tokens is None:
            max_tokens = min(self.config.response_length, room)
        key = (self.global_steps, tuple(prompt_ids))
        occurrence = self._occurrences.get(key, 0)
        self._occurrences[key] = occurrence + 1
        req = _Request(
            prompt_ids=prompt_ids,
            max_tokens=max(1, min(int(max_tokens), room)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1) or -1),
            seed=_request_seed(self.base_seed + self.replica_rank, self.global_steps, prompt_ids, occurrence),
            future=asyncio.get_running_loop().create_future(),
            # as verl's vLLM server: the request's flag, else rollout.ignore_eos (fixed-length responses for benches)
            ignore_eos=bool(params.get("ignore_eos", getattr(self.config, "ignore_eos", False))),
            request_id=request_id,
        )
        self._pending.append(req)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        token_ids, log_probs, stop_reason = await req.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs,
            stop_reason=stop_reason,
            extra_fields={"global_steps": self.global_steps},
        )

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(_BATCH_WINDOW_S)
            batch, self._pending = self._pending, []
            if not batch:  # abort_all_requests took them while this task waited
                continue
            self._in_flight = batch
            try:
                results = await asyncio.to_thread(self._generate_batch, batch)
            except Exception as exc:  # every waiting request gets the error, none hangs  # noqa: BLE001
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            for req, res in zip(batch, results, strict=True):
                if not req.future.done():
                    req.future.set_result(res)
            self._in_flight = []

    @torch.no_grad()
    def _generate_batch(self, batch: list[_Request]) -> list[tuple[list[int], list[float], str]]:
        from transformers import DynamicCache

        bsz = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((bsz, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((bsz, width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attn[i, width - len(r.prompt_ids) :] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(r.seed) for r in batch]
        tokens: list[list[int]] = [[] for _ in batch]
        logps: list[list[float]] = [[] for _ in batch]
        done = [False] * bsz
        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids, attention_mask=attn, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        last_pos = position_ids[:, -1]
        for _ in range(max(r.max_tokens for r in batch)):
            if self._control.abort.is_set():  # abort_all_requests: stop here, keep what each request has
                break
            logits = out.logits[:, -1, :].float()
            next_ids = torch.full((bsz,), self.pad_id, dtype=torch.long)
            for i, r in enumerate(batch):
                if done[i]:
                    continue
                tok, lp = _sample(logits[i], r, generators[i])
                tokens[i].append(tok)
                logps[i].append(lp)
                next_ids[i] = tok
                done[i] = (tok in self.eos_ids and not r.ignore_eos) or len(tokens[i]) >= r.max_tokens
            if all(done):
                break
            attn = torch.cat([attn, torch.ones((bsz, 1), dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            out = self.model(
                input_ids=next_ids[:, None],
                attention_mask=attn,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
        return [(t, lp, "completed" if d else "aborted") for t, lp, d in zip(tokens, logps, done, strict=True)]

    # ---- weights and control -----------------------------------------------------------------------------------
    def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> dict:
        start = time.time()
        result = self.model.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = set(result.missing_keys) - tied
        if result.unexpected_keys or missing:
            raise RuntimeError(
                f"cpu_hf rollout: weight sync mismatch, unexpected={result.unexpected_keys[:5]} missing={sorted(missing)[:5]}"
            )
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        if global_steps is not None:
            self.set_global_steps(global_steps)
        return {"update_weights_s": time.time() - start, "num_tensors": len(state_dict)}

    def set_global_steps(self, global_steps: int) -> None:
        if global_steps != self.global_steps:
            self._occurrences.clear()
        self.global_steps = global_steps

    def get_global_steps(self) -> Optional[int]:
        return self.global_steps

    def get_server_address(self):
        return f"{NAME}-replica-{self.replica_rank}", 0

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Close the gate, stop the batch in flight between two decoding steps (its requests return their tokens so
        far, `stop_reason="aborted"`) and return queued requests empty and aborted; generation stays paused until
        resume_generation. verl's colocate_async trainer calls this after sampling, before the weight sync."""
        ctl = self._control
        ctl.gate.clear()
        ctl.reject = reject_request
        ctl.abort.set()
        queued, self._pending = self._pending, []
        in_flight = list(self._in_flight)
        for req in queued:
            if not req.future.done():
                req.future.set_result(([], [], "aborted"))
        if self._worker is not None and not self._worker.done():
            await asyncio.wait([self._worker])
        stopped = [r for r in in_flight if r.future.done() and not r.future.exception()
                   and r.future.result()[2] == "aborted"]
        ids = [r.request_id for r in stopped + queued]
        return {"aborted_count": len(ids), "request_ids": ids}

    async def resume_generation(self):
        """Open the gate again (after the weight sync): parked requests and new ones are generated."""
        self._control.abort.clear()
        self._control.gate.set()

    async def abort_request(self, request_id: str) -> dict:
        return {"aborted": False, "request_id": request_id}

    async def wait_for_requests_to_drain(self) -> None:
        while self._pending or (self._worker is not None and not self._worker.done()):
            await asyncio.sleep(0.01)

    # Memory management hooks of GPU engines: nothing to free or restore on CPU.
    async def wake_up(self, tags=None): ...
    async def sleep(self): ...
    async def clear_kv_cache(self): ...
    async def release_kv_cache(self): ...
    async def resume_kv_cache(self): ...
    async def resume_engine_generation(self): ...
    async def open_submission_gate(self): ...
    async def start_profile(self, **kwargs): ...
    async def stop_profile(self): ...


class CPURolloutReplica(RolloutReplica):
    """One CPU rollout server per replica (rollout tp = dp = pp = 1 on CPU), on the node of its actor worker."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    def _kind(self) -> str:
        return "_reward" if self.is_reward_model else "_teacher" if self.is_teacher_model else ""

    async def launch_servers(self):
        if self.world_size != 1:
            raise ValueError(
                "rollout.name=cpu_hf serves one model per replica: set actor_rollout_ref.rollout."
                "tensor_model_parallel_size=1 (and data/pipeline parallel size 1)."
            )
        options: dict[str, Any] = {"name": server_name(self.replica_rank, 0, self._kind()) + self.name_suffix}
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda w: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = (
            ray.remote(CPURolloutServer)
            .options(num_cpus=0, max_concurrency=self.max_concurrency, **options)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        address, _ = await server.get_server_address.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = address


class CPUServerAdapter(BaseRollout):
    """Lives in each FSDP actor worker; pushes the trained weights to this rank's CPU rollout server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        rollout_world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world
        self._server = None

    def _handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    @torch.no_grad()
    async def update_weights(self, weights, global_steps: int = None, **kwargs):
        from torch.distributed.tensor import DTensor
        from verl.workers.rollout.utils import ensure_async_iterator

        # Every rank must walk the whole iterator: materialising sharded tensors is collective.
        state: dict[str, torch.Tensor] = {}
        async for name, tensor in ensure_async_iterator(weights):
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            if self.rollout_rank == 0:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.rollout_rank == 0:
            await self._handle().update_weights.remote(state, global_steps)

    def generate_sequences(self, prompts):
        raise NotImplementedError("the cpu_hf rollout is server based, like vLLM's: use the agent loop")
