"""Trajectory reuse (tbrm.reuse_window=k) through the TBRM trainer mixin's update, against a dict-backed stand-in for
TransferQueue and a stand-in actor worker that evaluates the real TBRM loss with a bigram model's current weights.

Checked against direct computations: which rows each update trains on (FIFO window of the last k batches, fresh rows
first), that reused rows carry the π_ref log-probs stored at their own step (not recomputed), that the loss over the
mixed batch equals mean δ² written out from the paper over fresh + reused trajectories under the current weights, that
the copies leave no trace, and that a window saved with a checkpoint and loaded by a new trainer gives the same next
update as the run that never stopped."""

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1 import trainer_base
from verl.utils import tensordict_utils as tu

from tbrm_verl.loss import TBRMLossConfig, tbrm_loss
from tbrm_verl.reuse import PARTITION, ReuseWindow, grown_mini_batch
from tbrm_verl.trainer import _TBRM

V, BETA, B = 7, 0.05, 4  # vocabulary, β, fresh trajectories per step


class FakeTQ:
    """partition -> key -> (row, tag); kv_batch_get hands back rows, as opaque to ReuseWindow as a TensorDict."""

    def __init__(self):
        self.parts: dict[str, dict] = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        part = self.parts.setdefault(partition_id, {})
        for i, key in enumerate(keys):
            part[key] = (copy.deepcopy(fields[i]), dict(tags[i]))

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        return [copy.deepcopy(self.parts[partition_id][k][0]) for k in keys]

    def kv_clear(self, keys, partition_id):
        for k in keys:
            del self.parts[partition_id][k]

    def keys(self, partition_id):
        return sorted(self.parts.get(partition_id, {}))


def bigram_logits(W, seq):
    return W[seq]  # logits at position t depend on token t only: a tiny model whose weights W the "training" moves


class FakeWorkers:
    """update_actor: fetch the rows of the batch, run the real tbrm_loss on them with the current weights, record."""

    def __init__(self, tq, W):
        self.tq, self.W, self.calls = tq, W, []

    def update_actor(self, b):
        rows = self.tq.kv_batch_get(b.keys, b.partition_id)
        cfg = TBRMLossConfig(beta=BETA)
        nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
        seqs = [r["seq"] for r in rows]
        data = TensorDict({
            "input_ids": nested(seqs),
            "prompts": nested([r["seq"][: r["p"]] for r in rows]),
            "responses": nested([r["seq"][r["p"]:] for r in rows]),
            "response_mask": nested([torch.ones(len(r["ref"])) for r in rows]),
            "rm_scores": nested([torch.nn.functional.pad(torch.tensor([r["reward"]]), (len(r["ref"]) - 1, 0))
                                 for r in rows]),
            "ref_log_prob": nested([r["ref"] for r in rows]),
        }, batch_size=[len(rows)])
        tu.assign_non_tensor(data, dp_size=1, global_batch_size=b.extra_info["global_batch_size"])
        logits = torch.cat([bigram_logits(self.W, s) for s in seqs])
        ids = torch.cat(seqs)
        lp = torch.log_softmax(logits, -1).gather(-1, torch.roll(ids, -1)[:, None]).squeeze(-1)
        cu = data["input_ids"].offsets()
        out = {"log_probs": torch.nested.nested_tensor_from_jagged(lp, cu),
               "tbrm_v": torch.nested.nested_tensor_from_jagged(torch.logsumexp(logits, -1), cu)}
        loss, _ = tbrm_loss(cfg, model_output=out, data=data)
        self.calls.append(SimpleNamespace(keys=list(b.keys), rows=rows, extra=dict(b.extra_info), loss=loss.item()))
        return {"metrics": {"mfu": 0.0}}


class FakeVerlTrainer:
    """What _TBRM calls on verl's trainer, as verl 0.9.1 does it (trainer_base._update_actor sets the mini-batch)."""

    def __init__(self, k, tq, W, ckpt_dir):
        self.config = OmegaConf.create({  # the keys the mixin reads, as the composed config holds them
            "tbrm": {"beta": BETA, "loss_variant": "tbrm", "loss_scale": "delta", "reference_free": False,
                     "reuse_window": k},
            "trainer": {"default_local_dir": ckpt_dir, "resume_mode": "auto", "resume_from_path": None}})
        self.actor_rollout_wg = FakeWorkers(tq, W)
        self.global_steps = 0
        self.balanced = 0

    def _balance_batch(self, batch, metrics):
        self.balanced += 1
        return batch

    def _update_actor(self, batch, metrics):
        batch.extra_info.update(global_batch_size=B, mini_batch_size=B)  # ppo_mini_batch_size · n = one batch
        self.actor_rollout_wg.update_actor(batch)
        return batch

    def _save_checkpoint(self):
        pass

    def _load_checkpoint(self):
        self.global_steps = self.resume_at


class Trainer(_TBRM, FakeVerlTrainer):
    pass


def fresh_rows(step):
    """B trajectories of a step, with a reference pass's log-probs that differ from step to step."""
    g = torch.Generator().manual_seed(step)
    rows = []
    for _ in range(B):
        p, n = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        rows.append({"seq": torch.randint(0, V, (p + n,), generator=g), "p": p,
                     "ref": -torch.rand(n, generator=g) * 2, "reward": float(torch.randint(0, 2, (1,), generator=g))})
    return rows


def train_step(trainer, tq, step):
    """One step as verl's fit runs it around the update: fresh rows in 'train', the update, then the end-of-step clear."""
    trainer.global_steps = step
    rows = fresh_rows(step)
    keys = [f"s{step}_{i}" for i in range(B)]
    tq.kv_batch_put(keys, "train", rows, [{"seq_len": len(r["seq"])} for r in rows])
    batch = KVBatchMeta(partition_id="train", keys=keys, tags=[{"seq_len": len(r["seq"])} for r in rows])
    metrics = {}
    trainer._update_actor(batch, metrics)
    tq.kv_clear(batch.keys, "train")
    return rows, metrics


def direct_loss(W, rows):
    """mean_τ δ(τ)², δ = V(s_1) + Σ_t (log π_W(a_t|s_t) − log π_ref(a_t|s_t)) − r/β, one trajectory at a time."""
    total = 0.0
    for r in rows:
        z, seq, p = bigram_logits(W, r["seq"]), r["seq"], r["p"]
        delta = torch.logsumexp(z[p - 1], -1) - r["reward"] / BETA
        for t in range(len(r["ref"])):
            delta = delta + torch.log_softmax(z[p - 1 + t], -1)[seq[p + t]] - r["ref"][t]
        total += float(delta) ** 2
    return total / len(rows)


@pytest.fixture
def run(monkeypatch, tmp_path):
    def make(k, W=None):
        tq = FakeTQ()
        monkeypatch.setattr(trainer_base, "tq", tq)  # the mixin uses verl's own handle
        W = torch.randn(V, V, generator=torch.Generator().manual_seed(99)) if W is None else W
        return Trainer(k, tq, W, str(tmp_path / "ckpt")), tq
    return make


def test_window_is_fifo_and_reused_rows_enter_the_loss_with_their_stored_reference(run):
    k = 2
    trainer, tq = run(k)
    W = trainer.actor_rollout_wg.W
    history = {}
    for step in range(1, 6):
        W += 0.3 * torch.randn(V, V, generator=torch.Generator().manual_seed(1000 + step))  # "training" moves weights
        history[step], metrics = train_step(trainer, tq, step)
        call = trainer.actor_rollout_wg.calls[-1]
        window_steps = list(range(max(1, step - k), step))
        # rows: this step's first, then each window batch, oldest first
        expect_keys = [f"s{step}_{i}" for i in range(B)] + [f"s{s}_{i}@reuse{step}" for s in window_steps for i in range(B)]
        assert call.keys == expect_keys
        expect_rows = history[step] + [r for s in window_steps for r in history[s]]
        for got, want in zip(call.rows, expect_rows):
            assert torch.equal(got["ref"], want["ref"]) and torch.equal(got["seq"], want["seq"])
        # one optimizer step over the mixed batch: mean over all its trajectories
        n = B * (1 + len(window_steps))
        assert call.extra["global_batch_size"] == call.extra["mini_batch_size"] == n
        assert call.loss == pytest.approx(direct_loss(W, expect_rows), rel=1e-5)
        if window_steps:
            assert call.loss != pytest.approx(direct_loss(W, history[step]), rel=1e-3)  # reused rows count
            # with a reference recomputed now (what reuse must not do), the loss would differ
            recomputed = [dict(r, ref=r["ref"] - 0.5) for s in window_steps for r in history[s]]
            assert call.loss != pytest.approx(direct_loss(W, history[step] + recomputed), rel=1e-3)
            assert metrics["tbrm/reuse/rows"] == B * len(window_steps)
            assert metrics["tbrm/reuse/age_mean"] == pytest.approx(sum(step - s for s in window_steps) / len(window_steps))
        # nothing of the copies is left in the batch partition; the window holds exactly the last k batches
        assert tq.keys("train") == []
        assert tq.keys(PARTITION) == sorted(f"s{s}_{i}" for s in range(max(1, step - k + 1), step + 1) for i in range(B))
    assert trainer.balanced == 4  # the grown batch is spread over the DP ranks again whenever copies were mixed in


def test_no_reuse_leaves_the_update_as_it_was(run):
    trainer, tq = run(0)
    for step in (1, 2, 3):
        _, metrics = train_step(trainer, tq, step)
        call = trainer.actor_rollout_wg.calls[-1]
        assert call.keys == [f"s{step}_{i}" for i in range(B)] and call.extra["global_batch_size"] == B
        assert not any(k.startswith("tbrm/reuse") for k in metrics)
    assert tq.keys(PARTITION) == [] and trainer.balanced == 0


def test_resumed_window_gives_the_same_update_as_an_uninterrupted_run(run):
    W0 = torch.randn(V, V, generator=torch.Generator().manual_seed(5))
    a, tq_a = run(2, W0.clone())
    for step in (1, 2, 3):
        train_step(a, tq_a, step)
    a._save_checkpoint()  # at step 3: the window (steps 2, 3) goes into global_step_3/
    train_step(a, tq_a, 4)

    b, tq_b = run(2, W0.clone())  # a new process: empty TransferQueue, window restored from the checkpoint
    b.resume_at = 3
    b._load_checkpoint()
    train_step(b, tq_b, 4)
    ca, cb = a.actor_rollout_wg.calls[-1], b.actor_rollout_wg.calls[-1]
    assert cb.keys == ca.keys and cb.loss == pytest.approx(ca.loss, rel=1e-6)
    for ra, rb in zip(ca.rows, cb.rows):
        assert torch.equal(ra["ref"], rb["ref"]) and torch.equal(ra["seq"], rb["seq"])


def test_loading_a_checkpoint_without_a_window_starts_empty(run, capsys):
    b, tq = run(1)
    b.resume_at = 2
    b._load_checkpoint()
    assert "reuse starts empty" in capsys.readouterr().out
    train_step(b, tq, 3)
    assert len(b.actor_rollout_wg.calls[-1].keys) == B


def test_grown_mini_batch_keeps_the_number_of_optimizer_steps():
    assert grown_mini_batch(4, 8, 24) == 12  # two mini-batches of 4 per batch of 8 -> two of 12 per batch of 24
    assert grown_mini_batch(8, 8, 16) == 16
    assert grown_mini_batch(4, 8, 20) == 20  # not a whole factor: one mini-batch


def test_window_k_keeps_only_k_batches_and_padding_rows_are_kept_as_padding():
    tq = FakeTQ()
    w = ReuseWindow(1, tq)
    for step in (1, 2):
        keys = [f"s{step}_{i}" for i in range(3)]
        tags = [{"seq_len": 5}, {"seq_len": 5}, {"seq_len": 128, "is_padding": True}]
        tq.kv_batch_put(keys, "train", [{"x": i} for i in range(3)], tags)
        w.store(KVBatchMeta(partition_id="train", keys=keys, tags=tags), step)
    assert tq.keys(PARTITION) == ["s2_0", "s2_1", "s2_2"]
    fresh = KVBatchMeta(partition_id="train", keys=["n0"], tags=[{"seq_len": 4}])
    tq.kv_batch_put(["n0"], "train", [{"x": 9}], [{"seq_len": 4}])
    mixed, copies, metrics = w.mix(fresh, 3)
    assert mixed.keys[0] == "n0" and copies == ["s2_0@reuse3", "s2_1@reuse3", "s2_2@reuse3"]
    assert mixed.tags[3].get("is_padding") and all(t["tbrm_reused"] for t in mixed.tags[1:])
    assert metrics == {"tbrm/reuse/batches": 1, "tbrm/reuse/rows": 2, "tbrm/reuse/age_mean": 1.0}  # padding not counted
