"""`tbrm_verl.eval.generate.hf_sample`, the sampler of the eval hf backend and of the embedded task's accuracy check,
against a plain step-by-step loop: full forward over the whole sequence at every step (no KV cache), softmax of
logits / temperature, one multinomial draw per row from a generator seeded like hf_sample's, or argmax when greedy.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Qwen2 (the embedded task's architecture) and its tokenizer; 3 prompts of different lengths."""
    from tbrm_verl.tasks import embedded as E

    tok = E.build_tokenizer()
    model = E.build_tiny_qwen2(tok, seed=5).eval()
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("What is 3+4?", "Hi", "The answer is 12, so")]
    return model, tok, prompts


def _reference(model, prompts, k, temperature, max_new_tokens, stop_ids, pad_id, seed):
    rows = [p for p in prompts for _ in range(k)]  # prompt-major, as num_return_sequences
    L = max(len(p) for p in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    gen = torch.Generator().manual_seed(seed)
    done = torch.zeros(len(rows), dtype=torch.bool)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
            done |= torch.isin(nxt, torch.tensor(stop_ids))
            if bool(done.all()):
                break
    res = []
    for g in torch.stack(out, dim=1).tolist():
        cut = next((j for j, t in enumerate(g) if t in stop_ids), None)
        res.append((g if cut is None else g[:cut], cut is not None))
    return res


@pytest.mark.parametrize("k, temperature, seed", [(3, 1.0, 0), (2, 0.7, 11), (1, 0.0, 0)])
def test_hf_sample_equals_a_plain_sampling_loop(tiny, k, temperature, seed):
    from tbrm_verl.eval.generate import hf_sample

    model, tok, prompts = tiny
    stop_ids = list(range(100, 160))  # a random model stops at one of these now and then: cuts and flags both tested
    pad_id = tok.pad_token_id
    state = torch.random.get_rng_state()
    got = hf_sample(model, prompts, k=k, temperature=temperature, max_new_tokens=10, stop_ids=stop_ids,
                    pad_id=pad_id, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
    want = _reference(model, prompts, k, temperature, 10, stop_ids, pad_id, seed)
    assert len(got) == len(prompts) * k
    assert got == want
    for toks, stopped in got:
        assert not set(toks) & set(stop_ids) and (stopped or len(toks) == 10)
    if temperature > 0:
        assert len({tuple(t) for t, _ in got}) > 1  # sampling, not k copies of one answer
