"""The TBRM loss against independent computations: the paper's formula written out, a closed-form optimum, closed-form
gradients, and batch-splitting invariance through verl's real loss-call contract."""

import math

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from tbrm_verl.loss import TBRMLossConfig, brm_residuals, tbrm_loss, tbrm_residual

torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# 1. The residual is the paper's δ, with padding garbage ignored
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_ref", [True, False])
def test_residual_matches_direct_loop(with_ref):
    B, T, beta = 5, 7, 0.002
    lengths = [7, 3, 1, 5, 6]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    log_prob = -torch.rand(B, T) * 3
    ref = -torch.rand(B, T) * 3 if with_ref else None
    # garbage where the mask is 0: must not leak (not even as NaN through 0 * inf)
    log_prob = torch.where(mask.bool(), log_prob, torch.tensor(float("inf")))
    if ref is not None:
        ref = torch.where(mask.bool(), ref, torch.tensor(float("nan")))
    v = torch.randn(B) * 5
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])

    got = tbrm_residual(v, log_prob, ref, mask, r, beta)

    for i in range(B):
        total = v[i].item()
        for t in range(lengths[i]):
            total += log_prob[i, t].item() - (ref[i, t].item() if ref is not None else 0.0)
        total -= r[i].item() / beta
        assert got[i].item() == pytest.approx(total, rel=1e-6, abs=1e-4)


def test_brm_per_token_residuals_match_direct_definition_and_telescope():
    B, T, beta = 3, 5, 0.1
    lengths = [5, 2, 4]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    lp, ref, v = -torch.rand(B, T), -torch.rand(B, T), torch.randn(B, T)
    r = torch.tensor([1.0, 0.0, 1.0])
    eps = brm_residuals(v, lp, ref, mask, r, beta)
    for i, n in enumerate(lengths):
        for h in range(n):
            q = lp[i, h] + v[i, h]  # Q(s_h, a_h) = log π + V(s_h)
            v_next = v[i, h + 1] if h + 1 < n else 0.0  # V(s_{H+1}) = 0
            r_h = r[i] / beta if h == n - 1 else 0.0
            assert eps[i, h].item() == pytest.approx((q - r_h - ref[i, h] - v_next).item(), abs=1e-5)
        assert torch.all(eps[i, n:] == 0)
    # Σ_h ε_h telescopes to the trajectory residual δ
    torch.testing.assert_close(eps.sum(-1), tbrm_residual(v[:, 0], lp, ref, mask, r, beta))


# ---------------------------------------------------------------------------------------------------------------
# 2. The minimiser on a small tree MDP is the KL-regularised optimum (closed form)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_ref", [True, False])
def test_tabular_optimum_is_kl_regularised_policy(with_ref):
    """Horizon 2, 3 actions: tabular logits for the root and each child. Minimising mean δ² over all 9 trajectories
    must give π*(τ) ∝ π_ref(τ) exp(r/β) and V*(s_1) = log E_{π_ref}[exp(r/β)]."""
    A, beta = 3, 0.5
    g = torch.Generator().manual_seed(1)
    reward = torch.randint(0, 2, (A, A), generator=g).float()
    reward[0, 0] = 1.0
    ref_logits_root = torch.randn(A, generator=g)
    ref_logits_child = torch.randn(A, A, generator=g)
    ref_lp_root = torch.log_softmax(ref_logits_root, -1) if with_ref else torch.zeros(A)
    ref_lp_child = torch.log_softmax(ref_logits_child, -1) if with_ref else torch.zeros(A, A)

    root = torch.zeros(A, requires_grad=True)  # Q(s_1, ·)
    child = torch.zeros(A, A, requires_grad=True)  # Q(s_2 = a1, ·)
    a1 = torch.arange(A).repeat_interleave(A)
    a2 = torch.arange(A).repeat(A)
    mask = torch.ones(A * A, 2)
    r = reward[a1, a2]
    ref_lp = torch.stack([ref_lp_root[a1], ref_lp_child[a1, a2]], dim=1)

    opt = torch.optim.LBFGS([root, child], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        v = torch.logsumexp(root, -1).expand(A * A)
        lp = torch.stack([torch.log_softmax(root, -1)[a1], torch.log_softmax(child, -1)[a1, a2]], dim=1)
        loss = tbrm_residual(v, lp, ref_lp if with_ref else None, mask, r, beta).square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)

    pi_ref_traj = (ref_lp_root[a1] + ref_lp_child[a1, a2]).exp()
    if not with_ref:
        pi_ref_traj = torch.ones(A * A)  # uniform "reference" up to a constant absorbed into V
    target = pi_ref_traj * torch.exp(r / beta)
    pi_star = target / target.sum()
    pi_learned = (torch.log_softmax(root, -1)[a1] + torch.log_softmax(child, -1)[a1, a2]).exp()
    torch.testing.assert_close(pi_learned, pi_star, atol=1e-5, rtol=1e-4)
    v_star = math.log(target.sum().item())
    assert torch.logsumexp(root, -1).item() == pytest.approx(v_star, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# helpers that build verl's micro-batch TensorDict and model_output exactly as the FSDP engine does
# ---------------------------------------------------------------------------------------------------------------
def _make_batch(B=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, 6, (B,), generator=g).tolist()
    resp_lens = torch.randint(1, 6, (B,), generator=g).tolist()
    seqs = [torch.randint(0, V, (p + r,), generator=g) for p, r in zip(prompt_lens, resp_lens)]
    T = max(resp_lens)
    mask = torch.zeros(B, T)
    for i, n in enumerate(resp_lens):
        mask[i, :n] = 1
    rm = torch.zeros(B, T)
    reward = torch.randint(0, 2, (B,), generator=g).float()
    for i, n in enumerate(resp_lens):
        rm[i, n - 1] = reward[i]
    ref = -torch.rand(B, T, generator=g) * 2
    logits = torch.randn(sum(p + r for p, r in zip(prompt_lens, resp_lens)), V, generator=g) * 2
    return dict(seqs=seqs, prompt_lens=prompt_lens, resp_lens=resp_lens, mask=mask, rm=rm, reward=reward, ref=ref,
                logits=logits)


def _td(b, idx, dp_size, global_bs):
    seqs = [b["seqs"][i] for i in idx]
    prompts = [b["seqs"][i][: b["prompt_lens"][i]] for i in idx]
    responses = [b["seqs"][i][b["prompt_lens"][i]:] for i in idx]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    # verl stores response-shaped fields as nested tensors too (response_from_nested / to_padded_tensor)
    resp_nested = lambda x: nested([x[i, : b["resp_lens"][i]] for i in idx])  # noqa: E731
    td = TensorDict(
        {
            "input_ids": nested(seqs),
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": resp_nested(b["mask"]),
            "rm_scores": resp_nested(b["rm"]),
            "ref_log_prob": resp_nested(b["ref"]),
        },
        batch_size=[len(idx)],
    )
    if "rollout" in b:  # the rollout's own log-probs, as verl's agent loop stores them
        td["rollout_log_probs"] = resp_nested(b["rollout"])
    tu.assign_non_tensor(td, dp_size=dp_size, global_batch_size=global_bs)  # as verl's workers do
    if b.get("batch_num_tokens") is not None:  # the engine sets it: response tokens of the global batch
        tu.assign_non_tensor(td, batch_num_tokens=b["batch_num_tokens"])
    return td


def _offsets(b):
    lens = [p + r for p, r in zip(b["prompt_lens"], b["resp_lens"])]
    return [0] + torch.tensor(lens).cumsum(0).tolist()


def _run_loss(b, idx, logits_param, cfg, dp_size, global_bs):
    """verl's dual call on the packed rows of sequences `idx`: hook call with (1, nnz, V) logits, then the loss."""
    off = _offsets(b)
    rows = torch.cat([torch.arange(off[i], off[i + 1]) for i in idx])
    logits = logits_param[rows]  # (nnz, V), in the graph
    data = _td(b, idx, dp_size, global_bs)
    ids = data["input_ids"].values()
    per_tok = tbrm_loss(cfg, student_logits=logits.unsqueeze(0), data=data)
    cu = data["input_ids"].offsets()
    # log_probs as verl computes them: next token of the packed stream (roll by -1)
    rolled = torch.roll(ids, -1)
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, rolled[:, None]).squeeze(-1)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, cu)}
    for k, v in per_tok.items():
        model_output[k] = torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu)
    return tbrm_loss(cfg, model_output=model_output, data=data)


def _direct_loss(b, logits, beta, with_ref=True):
    """mean_τ δ(τ)² written out from the paper, sequence by sequence, no verl code involved."""
    off = _offsets(b)
    total = 0.0
    for i in range(len(b["seqs"])):
        z = logits[off[i]: off[i + 1]]
        p, n = b["prompt_lens"][i], b["resp_lens"][i]
        seq = b["seqs"][i]
        v_s1 = torch.logsumexp(z[p - 1].float(), -1)
        s = 0.0
        for t in range(n):
            lp = torch.log_softmax(z[p - 1 + t].float(), -1)[seq[p + t]]
            s = s + lp - (b["ref"][i, t] if with_ref else 0.0)
        delta = v_s1 + s - b["reward"][i] / beta
        total = total + delta**2
    return total / len(b["seqs"])


# ---------------------------------------------------------------------------------------------------------------
# 3. Through verl's loss contract: value, closed-form gradient, V(s_1) not detached, no gradient to the reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_ref", [True, False])
def test_engine_loss_equals_direct_formula(with_ref):
    b = _make_batch()
    cfg = TBRMLossConfig(beta=0.05, reference_free=not with_ref)
    logits = b["logits"].clone().requires_grad_(True)
    loss, metrics = _run_loss(b, list(range(6)), logits, cfg, dp_size=1, global_bs=6)
    direct = _direct_loss(b, b["logits"], 0.05, with_ref)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    assert float(metrics["actor/tbrm_loss"].values[0]) == pytest.approx(direct.item(), rel=1e-5)


def test_gradient_reaches_v_s1_and_every_response_token_in_closed_form():
    """dL/dz at the last prompt position is (2δ/B)·e_{a_1}: V(s_1)=lse(z) contributes +softmax(z), which cancels the
    −softmax(z) of log π(a_1|s_1). With V(s_1) detached it would be (2δ/B)(e_{a_1} − softmax(z)).
    At response position t (predicting a_{t+1}): (2δ/B)(e_{a_{t+1}} − softmax(z_t)). The reference gets none."""
    b = _make_batch(seed=3)
    beta = 0.05
    cfg = TBRMLossConfig(beta=beta)
    logits = b["logits"].clone().requires_grad_(True)
    b["ref"] = b["ref"].clone().requires_grad_(True)
    loss, _ = _run_loss(b, list(range(6)), logits, cfg, dp_size=1, global_bs=6)
    loss.backward()
    off, B = _offsets(b), 6
    for i in range(B):
        p, n, seq = b["prompt_lens"][i], b["resp_lens"][i], b["seqs"][i]
        z = b["logits"][off[i]: off[i + 1]]
        delta = torch.logsumexp(z[p - 1], -1) - b["reward"][i] / beta
        for t in range(n):
            delta = delta + torch.log_softmax(z[p - 1 + t], -1)[seq[p + t]] - b["ref"][i, t].detach()
        coef = 2 * delta / B
        e = torch.nn.functional.one_hot(seq[p], z.shape[-1]).float()
        torch.testing.assert_close(logits.grad[off[i] + p - 1], coef * e, atol=1e-4, rtol=1e-4)
        for t in range(1, n):
            e = torch.nn.functional.one_hot(seq[p + t], z.shape[-1]).float()
            expect = coef * (e - torch.softmax(z[p - 1 + t], -1))
            torch.testing.assert_close(logits.grad[off[i] + p - 1 + t], expect, atol=1e-4, rtol=1e-4)
        # prompt positions before the last one, and the final token's logits, get nothing
        assert torch.all(logits.grad[off[i]: off[i] + p - 1] == 0)
    assert b["ref"].grad is None or torch.all(b["ref"].grad == 0)


# ---------------------------------------------------------------------------------------------------------------
# 4. Splitting into micro-batches or data-parallel ranks changes neither the loss nor the gradient
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_variant", ["tbrm", "brm"])
def test_microbatch_and_dp_split_invariance(loss_variant):
    b = _make_batch(B=6, seed=5)
    cfg = TBRMLossConfig(beta=0.05, loss_variant=loss_variant)

    full = b["logits"].clone().requires_grad_(True)
    loss_full, _ = _run_loss(b, list(range(6)), full, cfg, dp_size=1, global_bs=6)
    loss_full.backward()

    # one rank, three micro-batches of uneven size: losses and gradients accumulate
    micro = b["logits"].clone().requires_grad_(True)
    total = 0.0
    for idx in ([0], [1, 2, 3], [4, 5]):
        loss, _ = _run_loss(b, idx, micro, cfg, dp_size=1, global_bs=6)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-5)
    torch.testing.assert_close(micro.grad, full.grad, atol=1e-5, rtol=1e-5)

    # two data-parallel ranks (FSDP averages their gradients), each with its own micro-batches
    rank_grads, rank_losses = [], []
    for rank_idx in ([[0, 1], [2]], [[3], [4, 5]]):
        x = b["logits"].clone().requires_grad_(True)
        s = 0.0
        for idx in rank_idx:
            loss, _ = _run_loss(b, idx, x, cfg, dp_size=2, global_bs=6)
            loss.backward()
            s += loss.item()
        rank_grads.append(x.grad)
        rank_losses.append(s)
    assert sum(rank_losses) / 2 == pytest.approx(loss_full.item(), rel=1e-5)
    torch.testing.assert_close((rank_grads[0] + rank_grads[1]) / 2, full.grad, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_not_trajectories():
    """verl pads batches with fully masked rows to balance ranks; they must add nothing to the loss."""
    b = _make_batch(B=6, seed=7)
    cfg = TBRMLossConfig(beta=0.05)
    with_row_5 = _direct_loss(b, b["logits"], 0.05)  # row 5 as a real trajectory
    b["mask"][5] = 0  # row 5 becomes padding
    loss, _ = _run_loss(b, list(range(6)), b["logits"].clone(), cfg, dp_size=1, global_bs=5)
    kept = {k: v[:5] for k, v in b.items() if k != "logits"}  # the 5 real rows, recomputed directly
    direct = _direct_loss(kept, b["logits"], 0.05)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    assert with_row_5.item() != pytest.approx(direct.item())  # the row would have mattered


def test_beta_delta_scale_is_beta_squared():
    b = _make_batch(seed=9)
    l1, _ = _run_loss(b, list(range(6)), b["logits"], TBRMLossConfig(beta=0.05), 1, 6)
    l2, _ = _run_loss(b, list(range(6)), b["logits"], TBRMLossConfig(beta=0.05, loss_scale="beta_delta"), 1, 6)
    assert l2.item() == pytest.approx(l1.item() * 0.05**2, rel=1e-6)


@pytest.mark.parametrize("field, bad, allowed", [
    ("loss_variant", "pairwise", "'tbrm', 'brm'"),
    ("loss_scale", "beta", "'delta', 'beta_delta'"),
])
def test_config_refuses_a_value_outside_its_literal_in_one_line(field, bad, allowed):
    with pytest.raises(ValueError) as err:
        TBRMLossConfig(**{field: bad})
    assert str(err.value) == f"TBRMLossConfig.{field}='{bad}': not one of {allowed}"


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_config_refuses_a_non_positive_beta(beta):
    with pytest.raises(ValueError, match="TBRMLossConfig.beta"):
        TBRMLossConfig(beta=beta)


def test_config_checks_take_the_values_from_the_loss_literals():
    """One source of truth: the launcher's check of the tbrm: section lists exactly the Literal's values."""
    from tbrm_verl.config import ConfigError, check_config, compose
    from tbrm_verl.loss import choices

    assert choices() == ("loss_variant", "loss_scale")
    assert choices("loss_variant") == ("tbrm", "brm") and choices("loss_scale") == ("delta", "beta_delta")
    for field in choices():
        for value in choices(field):
            TBRMLossConfig(**{field: value})  # every allowed value constructs
        with pytest.raises(ConfigError) as err:
            check_config(compose(["profile=cpu", f"tbrm.{field}=other"]))
        assert str(err.value) == f"tbrm.{field}=other: use one of {', '.join(choices(field))}"


def test_loss_without_logits_hook_fails_clearly():
    b = _make_batch()
    data = _td(b, list(range(6)), 1, 6)
    with pytest.raises(RuntimeError, match="logits hook"):
        tbrm_loss(TBRMLossConfig(), model_output={"log_probs": None}, data=data)


def test_loss_without_global_batch_size_raises_instead_of_guessing():
    b = _make_batch()
    with pytest.raises(RuntimeError, match="global_batch_size"):
        _run_loss(b, list(range(6)), b["logits"], TBRMLossConfig(beta=0.05), 1, None)


def test_rollout_mismatch_and_entropy_metrics_equal_direct_computation():
    """The health metrics verl drops with the old-log-prob pass, logged from the update instead: per response token,
    |log π − log π_rollout| (mean, max) and the entropy of π; split over micro-batches and 2 ranks, aggregated the
    way verl aggregates them, they equal the same quantities computed directly over the whole batch."""
    from verl.utils.metric import Metric

    b = _make_batch(B=6, seed=11)
    g = torch.Generator().manual_seed(5)
    b["rollout"] = -torch.rand(b["mask"].shape, generator=g) * 3
    b["batch_num_tokens"] = int(b["mask"].sum())
    off = _offsets(b)
    diffs, ents = [], []  # direct: token by token, no verl code
    for i in range(6):
        p, n = b["prompt_lens"][i], b["resp_lens"][i]
        for t in range(n):
            z = b["logits"][off[i] + p - 1 + t].float()
            logp = torch.log_softmax(z, -1)
            diffs.append(abs(logp[b["seqs"][i][p + t]].item() - b["rollout"][i, t].item()))
            ents.append(-(logp.exp() * logp).sum().item())
    assert len(diffs) == b["batch_num_tokens"]

    per_rank = []
    for rank_idx in ([[0, 1], [2]], [[3], [4, 5]]):
        collected: dict[str, list] = {}
        for idx in rank_idx:
            _, metrics = _run_loss(b, idx, b["logits"], TBRMLossConfig(beta=0.05), dp_size=2, global_bs=6)
            for k, m in metrics.items():
                collected.setdefault(k, []).append(m)
        per_rank.append(collected)
    agg = {}
    for k in per_rank[0]:
        ranks = []
        for r in per_rank:
            m = r[k][0].init_list()
            for x in r[k]:
                m.extend(x)
            ranks.append(m)
        agg[k] = Metric.aggregate_dp(ranks)
    assert agg["actor/tbrm_rollout_log_prob_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    assert agg["actor/tbrm_rollout_log_prob_diff_max"] == pytest.approx(max(diffs), rel=1e-6)
    assert agg["actor/entropy"] == pytest.approx(sum(ents) / len(ents), rel=1e-5)
