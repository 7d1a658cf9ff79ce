"""V(s_1) through verl 0.9.1's real FSDP engine code path (prepare_model_inputs -> model -> prepare_model_outputs with
the logits hook, or TBRM's engine computing V(s_1) from hidden rows -> loss) on a tiny locally built Qwen2 model,
against a direct forward pass of each sequence. tests/extension/test_lean_v.py compares the two paths in more settings."""

import pytest
import torch
from tensordict import TensorDict
from transformers import Qwen2Config, Qwen2ForCausalLM
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import no_padding_2_padding

from tbrm_verl.engine import TBRMEngine
from tbrm_verl.lean_v import LEAN_V_FLAG
from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


# (engine, flag): verl's engine with its logits hook (the brm variant's path), TBRM's engine (the tbrm default)
PATHS = {"logits_hook": (FSDPEngineWithLMHead, "distillation_use_topk"), "hidden_rows": (TBRMEngine, LEAN_V_FLAG)}


def _engine(model, path="logits_hook"):
    # verl's own CPU tests build engines this way: skip __init__ (no process group, no FSDP wrapping)
    eng = object.__new__(PATHS[path][0])
    eng.module = model
    eng.pad_to_length = False
    eng.use_ulysses_sp = False
    return eng


def _micro_batch(use_remove_padding, seed=0, path="logits_hook"):
    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = [5, 3, 7, 4], [4, 6, 2, 5]
    seqs = [torch.randint(0, VOCAB, (p + r,), generator=g) for p, r in zip(prompt_lens, resp_lens)]
    B, T = len(seqs), max(resp_lens)
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    reward = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ref = [-torch.rand(n, generator=g) for n in resp_lens]
    td = TensorDict(
        {
            "input_ids": nested(seqs),
            "position_ids": nested([torch.arange(len(s)) for s in seqs]),
            "prompts": nested([s[:p] for s, p in zip(seqs, prompt_lens)]),
            "responses": nested([s[p:] for s, p in zip(seqs, prompt_lens)]),
            "response_mask": nested([torch.ones(n) for n in resp_lens]),
            "rm_scores": nested([torch.nn.functional.one_hot(torch.tensor(n - 1), n).float() * r
                                 for n, r in zip(resp_lens, reward)]),
            "ref_log_prob": nested(ref),
        },
        batch_size=[B],
    )
    tu.assign_non_tensor(
        td, use_remove_padding=use_remove_padding, pad_mode=DatasetPadMode.NO_PADDING, use_fused_kernels=False,
        temperature=1.0, calculate_entropy=False, dp_size=1, global_batch_size=B, max_response_len=T,
        **{PATHS[path][1]: True},
    )
    return td, seqs, prompt_lens, resp_lens, reward, ref


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_v_s1_through_engine_hook_equals_direct_logsumexp(model, use_remove_padding, path):
    cfg = TBRMLossConfig(beta=0.1)
    td, seqs, prompt_lens, resp_lens, reward, ref = _micro_batch(use_remove_padding, path=path)
    eng = _engine(model, path)
    loss_fn = lambda **kw: tbrm_loss(cfg, **kw)  # noqa: E731

    inputs, output_args = eng.prepare_model_inputs(micro_batch=td)
    out = model(**inputs, use_cache=False)
    model_output = eng.prepare_model_outputs(output=out, output_args=output_args, micro_batch=td,
                                             logits_processor_func=loss_fn)
    assert "tbrm_v" in model_output, "the engine stored no V(s_1)"
    loss, _ = loss_fn(model_output=model_output, data=td, dp_group=None)

    v = no_padding_2_padding(model_output["tbrm_v"], td)[:, 0]
    direct_v, direct_loss = [], 0.0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            logits = model(input_ids=s[None]).logits[0].float()  # one sequence, no packing, no padding
            p, n = prompt_lens[i], resp_lens[i]
            vi = torch.logsumexp(logits[p - 1], -1)
            lp = torch.log_softmax(logits[p - 1: p - 1 + n], -1).gather(-1, s[p: p + n, None]).squeeze(-1)
            direct_v.append(vi)
            direct_loss += (vi + (lp - ref[i]).sum() - reward[i] / 0.1) ** 2
    torch.testing.assert_close(v.detach(), torch.stack(direct_v), atol=1e-4, rtol=1e-5)
    assert loss.item() == pytest.approx(direct_loss.item() / len(seqs), rel=1e-4)


@pytest.mark.parametrize("path", list(PATHS))
def test_engine_path_gradient_reaches_model_through_v_s1(model, path):
    """Backprop through the engine path: the parameters get the gradient of the direct formula."""
    cfg = TBRMLossConfig(beta=0.1)
    td, seqs, prompt_lens, resp_lens, reward, ref = _micro_batch(True, seed=1, path=path)
    eng = _engine(model, path)
    loss_fn = lambda **kw: tbrm_loss(cfg, **kw)  # noqa: E731
    model.zero_grad()
    inputs, output_args = eng.prepare_model_inputs(micro_batch=td)
    out = model(**inputs, use_cache=False)
    mo = eng.prepare_model_outputs(output=out, output_args=output_args, micro_batch=td, logits_processor_func=loss_fn)
    loss, _ = loss_fn(model_output=mo, data=td, dp_group=None)
    loss.backward()
    engine_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total = 0.0
    for i, s in enumerate(seqs):
        logits = model(input_ids=s[None]).logits[0].float()
        p, n = prompt_lens[i], resp_lens[i]
        lp = torch.log_softmax(logits[p - 1: p - 1 + n], -1).gather(-1, s[p: p + n, None]).squeeze(-1)
        total = total + (torch.logsumexp(logits[p - 1], -1) + (lp - ref[i]).sum() - reward[i] / 0.1) ** 2
    (total / len(seqs)).backward()
    for ge, p in zip(engine_grads, model.parameters()):
        torch.testing.assert_close(ge, p.grad, atol=1e-4, rtol=1e-3)
