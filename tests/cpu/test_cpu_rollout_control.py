"""The cpu_hf server's abort / resume, as verl's colocate_async trainer uses them around a weight sync (verl's vLLM
server is the reference: abort returns partial outputs, requests wait until resume, or come back empty when the
abort rejects them). No Ray: the server object runs on a plain event loop with a stand-in model."""

import asyncio
import time
from types import SimpleNamespace

import torch

from tbrm_verl.cpu.rollout import CPURolloutServer

VOCAB, TOKEN = 8, 5


class SlowModel:
    """Every forward takes `delay` seconds and puts all probability on TOKEN (never EOS)."""

    def __init__(self, delay=0.01):
        self.delay, self.calls = delay, 0

    def __call__(self, input_ids, **_):
        self.calls += 1
        time.sleep(self.delay)
        logits = torch.full((*input_ids.shape, VOCAB), -50.0)
        logits[..., TOKEN] = 50.0
        return SimpleNamespace(logits=logits)


def server(delay=0.01):
    s = object.__new__(CPURolloutServer)
    s.config = SimpleNamespace(ignore_eos=False, response_length=400, seed=0)
    s.model, s.eos_ids, s.pad_id = SlowModel(delay), {3}, 0
    s.max_model_len, s.base_seed, s.replica_rank, s.global_steps = 1024, 0, 0, 7
    s._init_request_state()
    return s


def test_abort_returns_the_partial_response_and_parks_new_requests_until_resume():
    async def go():
        s = server()
        first = asyncio.create_task(s.generate([1, 2], {"max_tokens": 400}, "a"))
        await asyncio.sleep(0.3)  # ~30 decoding steps of 400
        info = await s.abort_all_requests()
        out = await first
        assert out.stop_reason == "aborted" and 0 < len(out.token_ids) < 400, len(out.token_ids)
        assert out.token_ids == [TOKEN] * len(out.token_ids) and len(out.log_probs) == len(out.token_ids)
        assert out.extra_fields["global_steps"] == 7
        assert info == {"aborted_count": 1, "request_ids": ["a"]}
        # paused: a request made now waits, and nothing is generated for it
        calls = s.model.calls
        parked = asyncio.create_task(s.generate([1, 2, *out.token_ids], {"max_tokens": 400 - len(out.token_ids)}, "b"))
        await asyncio.sleep(0.2)
        assert not parked.done() and s.model.calls == calls
        s.global_steps = 8  # what the weight sync sets
        await s.resume_generation()
        rest = await asyncio.wait_for(parked, 30)
        # what verl's FullyAsyncLLMServerClient assembles: the partial tokens then the resumed ones, max_tokens in all
        assert rest.stop_reason == "completed" and len(out.token_ids) + len(rest.token_ids) == 400
        assert rest.extra_fields["global_steps"] == 8

    asyncio.run(go())


def test_abort_with_reject_answers_new_requests_empty_at_once():
    async def go():
        s = server()
        assert await s.abort_all_requests(reject_request=True) == {"aborted_count": 0, "request_ids": []}
        out = await asyncio.wait_for(s.generate([1], {"max_tokens": 5}, "c"), 1)
        assert out.stop_reason == "aborted" and out.token_ids == [] and s.model.calls == 0
        await s.resume_generation()
        out = await asyncio.wait_for(s.generate([1], {"max_tokens": 5}, "d"), 10)
        assert out.stop_reason == "completed" and out.token_ids == [TOKEN] * 5

    asyncio.run(go())


def test_queued_requests_are_aborted_empty_and_finished_ones_are_untouched():
    async def go():
        s = server(delay=0.0)
        done = await s.generate([1], {"max_tokens": 3}, "done")
        queued = asyncio.create_task(s.generate([2], {"max_tokens": 3}, "q"))
        await asyncio.sleep(0)  # queued, the batching window (20 ms) not over yet
        info = await s.abort_all_requests()
        out = await queued
        assert done.stop_reason == "completed" and done.token_ids == [TOKEN] * 3
        assert out.stop_reason == "aborted" and out.token_ids == [] and info["request_ids"] == ["q"]

    asyncio.run(go())
