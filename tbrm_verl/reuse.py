"""Trajectory reuse for TBRM (`tbrm.reuse_window=k`, off by default): each trained batch is trained on again, mixed
into the batches of the next k steps.

TBRM's residual δ(τ) = V_θ(s_1) + Σ log π_θ − Σ log π_ref − r/β is a valid target for a trajectory from any behaviour
policy (the paper's guarantee needs coverage, not on-policy data), so a past batch is ordinary training data: no
importance ratio, no clipping. PPO and GRPO would need a correction, so the config allows reuse for TBRM only.

Per step, in every trainer mode (the mixin in tbrm_verl/trainer.py calls `mix` and `store` around verl's update):
1. `mix`: the window's rows are copied into the fresh batch's TransferQueue partition under new keys; the update
   trains on fresh + copies in one pass. What a copy brings is what its original step stored: tokens, reward and
   π_ref log-probs (never recomputed: π_ref is frozen, and the issue asks to keep them with the data). log π_θ and
   V_θ(s_1) come from the update's own forward, under the current weights.
2. `release`: the copies are cleared after the update.
3. `store`: the fresh batch's rows (padding rows included, so every batch in the window has a size the data-parallel
   split already accepted) enter the window partition; the oldest batch leaves once more than k are held.

Only the fresh batch reaches verl's step metrics (training reward, lengths, staleness are of new rollouts); the
window reports `tbrm/reuse/{rows,batches,age_mean}`. The window is saved with each checkpoint (`tbrm_reuse.pt` in
`global_step_N/`) and put back on resume, so a resumed run trains on the same data as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections import deque

PARTITION = "tbrm_reuse"  # the window's own TransferQueue partition
CHECKPOINT_FILE = "tbrm_reuse.pt"


class ReuseWindow:
    """A FIFO window of the last k trained batches, kept in TransferQueue. `tq` is the transfer_queue module (or a
    stand-in with kv_batch_get / kv_batch_put / kv_clear)."""

    def __init__(self, k: int, tq):
        self.k, self.tq = int(k), tq
        self.batches: deque[tuple[int, list[str], list[dict]]] = deque()  # (step stored, keys, tags), oldest first

    def mix(self, batch, step: int):
        """(fresh + copies of the window's rows, the copies' keys, metrics). The fresh rows come first: verl's padding
        helper takes row 0 as its template, and it should never be a reused row."""
        from transfer_queue import KVBatchMeta

        keys, tags, ages = list(batch.keys), list(batch.tags), []
        copies: list[str] = []
        for stored, src_keys, src_tags in self.batches:
            data = self.tq.kv_batch_get(keys=src_keys, partition_id=PARTITION)
            new_keys = [f"{key}@reuse{step}" for key in src_keys]  # unique: a key is stored once, mixed once per step
            new_tags = [dict(tag, tbrm_reused=True) for tag in src_tags]
            self.tq.kv_batch_put(keys=new_keys, partition_id=batch.partition_id, fields=data, tags=new_tags)
            keys += new_keys
            tags += new_tags
            copies += new_keys
            ages += [step - stored] * sum(not tag.get("is_padding", False) for tag in src_tags)
        metrics = {
            "tbrm/reuse/batches": len(self.batches),
            "tbrm/reuse/rows": len(ages),
            "tbrm/reuse/age_mean": sum(ages) / len(ages) if ages else 0.0,
        }
        mixed = KVBatchMeta(partition_id=batch.partition_id, keys=keys, tags=tags, extra_info=dict(batch.extra_info or {}))
        return mixed, copies, metrics

    def release(self, copies: list[str], partition_id: str) -> None:
        if copies:
            self.tq.kv_clear(keys=copies, partition_id=partition_id)

    def store(self, batch, step: int) -> None:
        """Keep the rows of the batch just trained (before verl clears them at the end of the step)."""
        if self.k == 0:
            return
        data = self.tq.kv_batch_get(keys=list(batch.keys), partition_id=batch.partition_id)
        tags = [dict(tag) for tag in batch.tags]
        self.tq.kv_batch_put(keys=list(batch.keys), partition_id=PARTITION, fields=data, tags=tags)
        self.batches.append((step, list(batch.keys), tags))
        while len(self.batches) > self.k:
            _, old, _ = self.batches.popleft()
            self.tq.kv_clear(keys=old, partition_id=PARTITION)

    # ---- checkpoint: verl saves TransferQueue only in the async modes, so the window saves itself ----

    def save(self, folder: str) -> None:
        import torch

        state = [(stored, keys, tags, self.tq.kv_batch_get(keys=keys, partition_id=PARTITION))
                 for stored, keys, tags in self.batches]
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, CHECKPOINT_FILE + ".tmp")
        torch.save({"k": self.k, "batches": state}, tmp)
        os.replace(tmp, os.path.join(folder, CHECKPOINT_FILE))  # never a half-written window

    def load(self, folder: str) -> bool:
        """Put back the window saved in `folder`; False (window left empty) if the checkpoint has none."""
        import torch

        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.exists(path):
            return False
        state = torch.load(path, weights_only=False)
        self.batches.clear()
        for stored, keys, tags, data in state["batches"][-self.k:] if self.k else []:
            self.tq.kv_batch_put(keys=keys, partition_id=PARTITION, fields=data, tags=tags)
            self.batches.append((stored, keys, tags))
        return True


def grown_mini_batch(base: int, fresh: int, mixed: int) -> int:
    """The update's mini-batch size once the window is mixed in: grown by the same factor as the batch, so a step makes
    as many optimizer steps as without reuse (one, in every shipped config); one mini-batch if the factor is not whole."""
    return base * mixed // fresh if mixed % fresh == 0 else mixed
