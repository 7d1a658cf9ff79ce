"""V(s_1) from B hidden rows (tbrm_verl/lean_v.py, tbrm_verl/engine.py) through verl 0.9.1's real FSDP engine code
(prepare_model_inputs -> model -> prepare_model_outputs -> loss) on tiny Qwen2 models, tied and untied: loss, V(s_1)
and every parameter gradient against today's logits-hook path and against a direct per-sequence forward of the
paper's formula; micro-batch splits; two FSDP2 ranks; verl's fused kernels; which engine verl builds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from transformers import Qwen2Config, Qwen2ForCausalLM
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import no_padding_2_padding

from tbrm_verl.engine import ENGINE_VENDOR, TBRMEngine
from tbrm_verl.lean_v import LEAN_V_FLAG, hidden_rows_logsumexp
from tbrm_verl.loss import TBRMLossConfig, tbrm_loss

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BETA = 96, 0.1
HOOK = {"distillation_use_topk": True}
LEAN = {LEAN_V_FLAG: True}


def tiny_qwen2(tie: bool, cls=Qwen2ForCausalLM, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).train()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    return tiny_qwen2(request.param)


def _batch(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, 8, (B,), generator=g).tolist()
    resp_lens = torch.randint(1, 7, (B,), generator=g).tolist()
    seqs = [torch.randint(0, VOCAB, (p + r,), generator=g) for p, r in zip(prompt_lens, resp_lens)]
    reward = torch.randint(0, 2, (B,), generator=g).float()
    ref = [-torch.rand(n, generator=g) for n in resp_lens]
    return dict(seqs=seqs, prompt_lens=prompt_lens, resp_lens=resp_lens, reward=reward, ref=ref)


def _td(b, idx, flags, use_remove_padding=True, dp_size=1, global_bs=None, fused=False):
    """verl's NO_PADDING micro-batch of sequences `idx` (nested tensors, non-tensor flags as the engine sets them)."""
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    seqs = [b["seqs"][i] for i in idx]
    P, R = [b["prompt_lens"][i] for i in idx], [b["resp_lens"][i] for i in idx]
    td = TensorDict(
        {
            "input_ids": nested(seqs),
            "position_ids": nested([torch.arange(len(s)) for s in seqs]),
            "prompts": nested([s[:p] for s, p in zip(seqs, P)]),
            "responses": nested([s[p:] for s, p in zip(seqs, P)]),
            "response_mask": nested([torch.ones(n) for n in R]),
            "rm_scores": nested([torch.nn.functional.one_hot(torch.tensor(n - 1), n).float() * b["reward"][i]
                                 for i, n in zip(idx, R)]),
            "ref_log_prob": nested([b["ref"][i] for i in idx]),
        },
        batch_size=[len(idx)],
    )
    tu.assign_non_tensor(
        td, use_remove_padding=use_remove_padding, pad_mode=DatasetPadMode.NO_PADDING, use_fused_kernels=fused,
        temperature=1.0, calculate_entropy=False, dp_size=dp_size,
        global_batch_size=len(idx) if global_bs is None else global_bs, max_response_len=max(R), **flags,
    )
    return td


def _engine(cls, model):
    eng = object.__new__(cls)  # as verl's own CPU tests build engines: no process group, no FSDP wrapping
    eng.module = model
    eng.pad_to_length = False
    eng.use_ulysses_sp = False
    return eng


def loss_fn(**kw):
    return tbrm_loss(TBRMLossConfig(beta=BETA), **kw)


def _step(eng, td):
    """One micro-batch as FSDPEngineWithLMHead.forward_step runs it (without moving it to a device)."""
    inputs, output_args = eng.prepare_model_inputs(micro_batch=td)
    out = eng.module(**inputs, use_cache=False)
    mo = eng.prepare_model_outputs(output=out, output_args=output_args, micro_batch=td, logits_processor_func=loss_fn)
    loss, _ = loss_fn(model_output=mo, data=td, dp_group=None)
    return loss, mo


def _update(cls, model, b, splits, flags, **td_kw):
    """Sum of micro-batch losses, V(s_1) per sequence, and every parameter's accumulated gradient."""
    model.zero_grad(set_to_none=True)
    eng, total, v = _engine(cls, model), 0.0, {}
    n = sum(len(s) for s in splits)
    for idx in splits:
        td = _td(b, idx, flags, global_bs=n, **td_kw)
        loss, mo = _step(eng, td)
        loss.backward()
        total += loss.item()
        for i, vi in zip(idx, no_padding_2_padding(mo["tbrm_v"], td)[:, 0].detach()):
            v[i] = vi
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return total, torch.stack([v[i] for i in range(n)]), grads


def _direct(model, b):
    """mean_τ δ(τ)² from a plain forward of each sequence alone: logits -> logsumexp / log_softmax, no verl code."""
    model.zero_grad(set_to_none=True)
    total, vs = 0.0, []
    for i, s in enumerate(b["seqs"]):
        logits = model(input_ids=s[None]).logits[0].float()
        p, n = b["prompt_lens"][i], b["resp_lens"][i]
        v = torch.logsumexp(logits[p - 1], -1)
        lp = torch.log_softmax(logits[p - 1: p - 1 + n], -1).gather(-1, s[p: p + n, None]).squeeze(-1)
        total = total + (v + (lp - b["ref"][i]).sum() - b["reward"][i] / BETA) ** 2
        vs.append(v.detach())
    loss = total / len(b["seqs"])
    loss.backward()
    return loss.item(), torch.stack(vs), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, rel: float):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-30)
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# 1. The function itself, against autograd through the dense product
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_rows_logsumexp_value_and_gradients(with_bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    assert torch.autograd.gradcheck(hidden_rows_logsumexp, (h, w, bias))
    # float32, against autograd through the dense product and logsumexp
    leaves = [t.detach().float().requires_grad_(True) if t is not None else None for t in (h, w, bias)]
    h32, w32, b32 = leaves
    upstream = torch.randn(5, generator=g)
    z = h32 @ w32.t() + (b32 if with_bias else 0.0)
    want = torch.autograd.grad(torch.logsumexp(z, -1), [t for t in leaves if t is not None], upstream)
    v = hidden_rows_logsumexp(h32, w32, b32)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, torch.logsumexp(z, -1), rtol=1e-6, atol=1e-5)
    got = torch.autograd.grad(v, [t for t in leaves if t is not None], upstream)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    # bf16 weights (as under FSDP mixed precision): V still comes out in float32, gradients in the inputs' dtype
    vb = hidden_rows_logsumexp(h32.bfloat16(), w32.bfloat16())
    assert vb.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 2. Through verl's engine: same loss, V(s_1) and gradients as the logits hook and as the direct formula
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["rmpad", "padded"])
def test_lean_path_equals_logits_hook_and_direct_forward(model, use_remove_padding):
    b = _batch(seed=1)
    everything = [list(range(6))]
    hook = _update(FSDPEngineWithLMHead, model, b, everything, HOOK, use_remove_padding=use_remove_padding)
    lean = _update(TBRMEngine, model, b, everything, LEAN, use_remove_padding=use_remove_padding)
    direct = _direct(model, b)
    assert lean[0] == pytest.approx(hook[0], rel=1e-5)
    torch.testing.assert_close(lean[1], hook[1], rtol=1e-5, atol=1e-5)
    assert_grads_close(lean[2], hook[2], rel=1e-5)
    # the direct forward packs nothing: same numbers up to float32 summation order
    assert lean[0] == pytest.approx(direct[0], rel=1e-4)
    torch.testing.assert_close(lean[1], direct[1], rtol=1e-5, atol=1e-4)
    assert_grads_close(lean[2], direct[2], rel=1e-4)


def test_v_s1_is_not_detached_and_only_last_prompt_positions_are_set(model):
    b = _batch(seed=2)
    td = _td(b, list(range(6)), LEAN)
    _, mo = _step(_engine(TBRMEngine, model), td)
    v = mo["tbrm_v"]
    assert v.is_nested and v.values().requires_grad and v.values().grad_fn is not None
    off = td["input_ids"].offsets()
    last = [int(off[i]) + b["prompt_lens"][i] - 1 for i in range(6)]
    nonzero = torch.nonzero(v.values().detach()).squeeze(-1).tolist()
    assert nonzero == last
    # V(s_1) sits near log(vocab) for a near-uniform random model: it is V, not a log-prob or 0
    assert all(abs(v.values()[i].item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0 for i in last)


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["rmpad", "padded"])
def test_micro_batch_split_accumulates_to_the_full_batch(model, use_remove_padding):
    b = _batch(seed=3)
    full = _update(FSDPEngineWithLMHead, model, b, [list(range(6))], HOOK, use_remove_padding=use_remove_padding)
    split = _update(TBRMEngine, model, b, [[0], [1, 2, 3], [4, 5]], LEAN, use_remove_padding=use_remove_padding)
    assert split[0] == pytest.approx(full[0], rel=1e-5)
    torch.testing.assert_close(split[1], full[1], rtol=1e-5, atol=1e-5)
    assert_grads_close(split[2], full[2], rel=1e-5)


def test_without_the_flag_the_engine_is_verls(model):
    """The PPO/GRPO baselines and the reference never set the flag: output identical to verl's engine, no V."""
    b = _batch(seed=4)
    td = _td(b, list(range(6)), {})
    outs = []
    for cls in (FSDPEngineWithLMHead, TBRMEngine):
        eng = _engine(cls, model)
        with torch.no_grad():
            inputs, output_args = eng.prepare_model_inputs(micro_batch=td)
            out = model(**inputs, use_cache=False)
            outs.append(eng.prepare_model_outputs(output=out, output_args=output_args, micro_batch=td,
                                                  logits_processor_func=None))
    assert outs[0].keys() == outs[1].keys() == {"log_probs"}
    assert torch.equal(outs[0]["log_probs"].values(), outs[1]["log_probs"].values())


# ---------------------------------------------------------------------------------------------------------------
# 3. verl's fused kernels (torch backend: no logits are ever built) give the same update
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["rmpad", "padded"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_kernels_same_loss_and_gradients_as_unfused(tie, use_remove_padding):
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    class FusedQwen2(Qwen2ForCausalLM):  # verl patches the class's forward: a subclass keeps Qwen2 itself intact
        pass

    unfused = tiny_qwen2(tie)
    fused = tiny_qwen2(tie, cls=FusedQwen2)
    fused.load_state_dict(unfused.state_dict())
    patch_forward_with_backends(fused, use_fused_kernels=True, fused_kernels_backend="torch")
    assert FusedQwen2.forward is not Qwen2ForCausalLM.forward

    b = _batch(seed=5)
    splits = [[0, 1, 2], [3, 4, 5]]
    want = _update(FSDPEngineWithLMHead, unfused, b, splits, HOOK, use_remove_padding=use_remove_padding)
    got = _update(TBRMEngine, fused, b, splits, LEAN, use_remove_padding=use_remove_padding, fused=True)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert_grads_close(got[2], want[2], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 4. Two data-parallel ranks under verl's FSDP2 wrapping (untied: lm_head is its own FSDP unit, resharded after
#    its forward, so V's backward must not need its weight)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_two_fsdp2_ranks_equal_one_process_full_batch(tie, tmp_path):
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "extension" / "lean_v_fsdp2_ranks.py"), str(tmp_path), "1" if tie else "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = torch.load(tmp_path / "ranks.pt")
    assert res["lm_head_is_own_fsdp_unit"] == (not tie)

    b = _batch(seed=6)
    model = tiny_qwen2(tie)
    want = _update(FSDPEngineWithLMHead, model, b, [list(range(6))], HOOK)
    for path in ("lean", "hook"):
        loss, grads = res[path]
        assert loss == pytest.approx(want[0], rel=1e-5), path
        assert_grads_close(grads, want[2], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 5. Which engine verl builds
# ---------------------------------------------------------------------------------------------------------------
def test_registry_selects_tbrm_engine_only_for_the_tbrm_worker(monkeypatch):
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine_workers import TrainingWorker

    from tbrm_verl.actor_worker import TBRMActorRolloutRefWorker, TBRMTrainingWorker

    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")  # what the CPU platform sets; GPUs detect `cuda` themselves
    monkeypatch.delenv("VERL_ENGINE_VENDOR", raising=False)
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead
    built = []

    def fake_init(self, config):  # what TrainingWorker.__init__ does with the registry, nothing else
        built.append(EngineRegistry.get_engine_cls("language_model", "fsdp2"))

    monkeypatch.setattr(TrainingWorker, "__init__", fake_init)
    TBRMTrainingWorker(config=None)
    TrainingWorker(config=None)
    assert built == [TBRMEngine, FSDPEngineWithLMHead]
    assert "VERL_ENGINE_VENDOR" not in os.environ  # restored: the reference built next keeps verl's engine
    assert TBRMActorRolloutRefWorker.actor_worker_cls is TBRMTrainingWorker
    assert TBRMActorRolloutRefWorker.ref_worker_cls is TrainingWorker
    monkeypatch.setenv("VERL_ENGINE_VENDOR", ENGINE_VENDOR)
    assert EngineRegistry.get_engine_cls("language_model", "fsdp") is TBRMEngine
    assert EngineRegistry.get_engine_cls("value_model", "fsdp2") is not TBRMEngine


@pytest.mark.parametrize("variant", ["tbrm", "brm"])
def test_trainer_flags_and_actor_worker(monkeypatch, variant):
    import ray
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from tbrm_verl.actor_worker import TBRMActorRolloutRefWorker
    from tbrm_verl.trainer import TBRMTrainerSync

    class Batch:
        extra_info: dict

    seen = []

    class WorkerGroup:
        def update_actor(self, batch):
            seen.append(dict(batch.extra_info))

    def base_update_actor(self, batch, metrics):  # what verl's _update_actor does around the worker call
        batch.extra_info.update({"distillation_use_topk": False, "temperature": 1.0})
        self.actor_rollout_wg.update_actor(batch)

    original = ray.remote(TrainingWorkerStandIn)

    def base_pool_mgr(self):
        self.role_worker_mapping = {Role.ActorRolloutRef: original, Role.RefPolicy: original}

    monkeypatch.setattr(PPOTrainerSync, "_update_actor", base_update_actor)
    monkeypatch.setattr(PPOTrainerSync, "_init_resource_pool_mgr", base_pool_mgr)
    trainer = object.__new__(TBRMTrainerSync)
    trainer.config = OmegaConf.create({"tbrm": {"beta": 0.1, "loss_variant": variant, "loss_scale": "delta",
                                                "reference_free": False}})
    trainer.trainer_mode = "sync"  # set by verl's PPOTrainer.__init__
    trainer.actor_rollout_wg = WorkerGroup()
    batch = Batch()
    batch.extra_info = {}
    trainer._update_actor(batch, {})
    trainer._init_resource_pool_mgr()
    assert len(seen) == 1
    if variant == "tbrm":
        assert seen[0].get(LEAN_V_FLAG) is True and seen[0]["distillation_use_topk"] is False
        assert trainer.role_worker_mapping[Role.ActorRolloutRef].__ray_actor_class__ is TBRMActorRolloutRefWorker
    else:
        assert LEAN_V_FLAG not in seen[0] and seen[0]["distillation_use_topk"] is True
        assert trainer.role_worker_mapping[Role.ActorRolloutRef] is original
    assert trainer.role_worker_mapping[Role.RefPolicy] is original
    assert trainer.actor_rollout_wg.update_actor.__func__ is WorkerGroup.update_actor  # unwrapped again


class TrainingWorkerStandIn:
    pass


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_fused_kernels_accepted_for_tbrm_refused_for_brm(profile):
    from tbrm_verl.config import ConfigError, check_config, compose

    fused = ["actor_rollout_ref.model.use_fused_kernels=true"]
    check_config(compose([f"profile={profile}", *fused]))  # V(s_1) from hidden rows: the fused path suffices
    with pytest.raises(ConfigError, match="use_fused_kernels=true: .*brm"):
        check_config(compose([f"profile={profile}", "tbrm.loss_variant=brm", *fused]))


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["rmpad", "padded"])
def test_entropy_for_the_metric_equals_a_direct_forward(model, use_remove_padding):
    """`tbrm_entropy` (the `actor/entropy` metric on the lean path) is the entropy of softmax(logits) at every
    token, as a plain per-sequence forward gives it; it carries no gradient."""
    b = _batch(seed=4)
    td = _td(b, list(range(6)), LEAN, use_remove_padding=use_remove_padding)
    with torch.no_grad():
        _, mo = _step(_engine(TBRMEngine, model), td)
        want = []
        for s in b["seqs"]:
            logp = torch.log_softmax(model(input_ids=s[None]).logits[0].float(), -1)
            want.append(-(logp.exp() * logp).sum(-1))
    ent = mo["tbrm_entropy"]
    assert ent.is_nested and not ent.values().requires_grad
    torch.testing.assert_close(ent.values(), torch.cat(want), rtol=1e-5, atol=1e-5)
