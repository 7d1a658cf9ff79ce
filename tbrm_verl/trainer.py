"""TBRM's trainer: verl's v1 trainers (`sync`, `colocate_async`, and `separate_async` on GPUs) with TBRM's changes,
and the TaskRunner that selects them. The changes live in one mixin (_TBRM) put in front of verl's class for each
mode, so every mode trains exactly the same loss; the async modes add only what verl's modes do (`colocate_async`:
partial rollouts aborted at the end of sampling and resumed with the new weights, warm-up batches, a staleness-aware
replay buffer; `separate_async`: rollout on its own GPUs, weights pushed every few mini-batches). TBRM needs no
importance correction there: its residual is valid for trajectories from any behaviour policy.

1. The TBRM loss replaces verl's PPO loss, installed once on the actor workers before the first weight sync.
2. V(s_1) for the loss. `loss_variant=tbrm`: the actor worker is built with TBRM's engine (tbrm_verl/engine.py) and
   the actor update carries the flag `tbrm_lean_v`, so V(s_1) = logsumexp of the logits at the last prompt position
   is computed from B hidden rows inside the model's forward (no [tokens, vocab] tensor added). `loss_variant=brm`
   needs V at every position: the update runs with verl's logits hook (`distillation_use_topk`) and the loss sees the
   raw logits. Only the update sets either flag: the reference pass, the rollout and validation compute log-probs.
3. No old-log-prob pass: TBRM has no importance ratio, so π_old is never needed (the PPO/GRPO baselines keep it).
4. Optional trajectory reuse (`tbrm.reuse_window=k`): each update also trains on the last k batches, with their
   stored π_ref log-probs (tbrm_verl/reuse.py); the window is saved with each checkpoint.

What stays verl's: rollout, reward loop, reference log-probs (built only when `tbrm.reference_free=false`),
checkpointing, resume, validation, logging, metrics (`timing_s/*`, `actor/*`, ...). No critic is built
(`critic.enable=false`, advantage estimator `tbrm`).

For every method (the _Console mixin, TaskRunner): the replay buffer's poll interval (`run.replay_poll_s`) and the console
(tbrm_verl/console.py): verl's print of the whole config only with `run.print_config=full`, and one progress line
per step in place of verl's console metric line unless `run.progress=verbose`.
"""

from __future__ import annotations

import os
import time
from functools import partial

import ray
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1 import trainer_base
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
from verl.trainer.ppo.v1.trainer_separate_async import PPOTrainerSeparateAsync
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from tbrm_verl.config import cfg_profile, check_profile_on_cluster, is_tbrm
from tbrm_verl.console import install_progress
from tbrm_verl.lean_v import LEAN_V_FLAG
from tbrm_verl.loss import TBRMLossConfig, tbrm_loss
from tbrm_verl.reuse import CHECKPOINT_FILE, ReuseWindow, grown_mini_batch


def loss_config(config) -> TBRMLossConfig:
    t = config.tbrm
    return TBRMLossConfig(
        beta=float(t.beta),
        loss_variant=str(t.loss_variant),
        loss_scale=str(t.loss_scale),
        reference_free=bool(t.reference_free),
    )


PAUSE_AFTER_CHECKPOINT_ENV = "TBRM_TEST_PAUSE_AFTER_CHECKPOINT_S"


class _Console:
    """For every method and mode: the replay buffer's poll interval configurable (`run.replay_poll_s`) and the
    compact progress line (`run.progress`).

    verl polls for finished rollouts every 2 s (not configurable), which rounds every step's generation time up to
    a multiple of 2 s: negligible on GPUs with minutes-long rollouts, most of a step on the CPU profile. Used for the
    PPO and GRPO baselines too, so that the methods are timed and shown alike.
    """

    def _build_replay_buffer(self):
        buffer = super()._build_replay_buffer()
        buffer.poll_interval = float(self.config.run.replay_poll_s)
        return buffer

    def _save_checkpoint(self):
        super()._save_checkpoint()
        self._checkpoint_just_saved = True

    def on_step_begin(self):
        # Tests only: the Ctrl-C/resume tests interrupt once a checkpoint is saved; on a fast machine the tiny runs
        # finished their last steps before the signal landed. Pausing at the start of the step after a checkpoint
        # (its step's metrics already logged) gives the signal a window. Unset: no-op.
        pause = os.environ.get(PAUSE_AFTER_CHECKPOINT_ENV)
        if pause and getattr(self, "_checkpoint_just_saved", False):
            time.sleep(float(pause))
        self._checkpoint_just_saved = False
        super().on_step_begin()

    def _compact_progress(self):
        # verl's fit() builds its Tracking (self.logger) right before the first validation or the training loop
        if self.config.run.progress == "compact":
            install_progress(self.logger, self.total_training_steps)

    def on_validate_begin(self):
        self._compact_progress()
        super().on_validate_begin()

    def on_train_begin(self):
        self._compact_progress()
        super().on_train_begin()


class _TBRM:
    """TBRM's changes to a verl trainer class (put in front of it): the loss, V(s_1), no π_old."""

    def _lean_v(self) -> bool:
        return loss_config(self.config).loss_variant == "tbrm"

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not self._lean_v():
            return
        from verl.trainer.ppo.utils import Role

        from tbrm_verl.actor_worker import TBRMActorRolloutRefWorker, detach_actor_worker_class

        # the worker that holds the actor (with the rollout, and the reference when colocated); a separate
        # reference worker (Role.RefPolicy) keeps verl's class. separate_async's base maps the actor to verl's
        # DetachActorWorker: its TBRM counterpart keeps that class's CPU save/restore.
        worker = detach_actor_worker_class() if self.trainer_mode == "separate_async" else TBRMActorRolloutRefWorker
        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(worker)

    def on_init_end(self):
        # Installed before the base hook, which pushes weights to the rollout and may start work.
        self.actor_rollout_wg.set_loss_fn(partial(tbrm_loss, loss_config(self.config)))
        super().on_init_end()

    def _compute_old_log_prob(self, batch, metrics):
        return batch  # TBRM needs no π_old: the old-log-prob forward is skipped entirely

    def _reuse_window(self) -> ReuseWindow:
        if getattr(self, "_tbrm_reuse", None) is None:
            self._tbrm_reuse = ReuseWindow(self.config.tbrm.get("reuse_window", 0), trainer_base.tq)  # verl's own tq handle
        return self._tbrm_reuse

    def _update_actor(self, batch, metrics):
        # With tbrm.reuse_window=k the update trains on this batch plus the last k (tbrm_verl/reuse.py); the fresh
        # batch alone goes on to verl's metrics and end-of-step clear.
        window = self._reuse_window()
        mixed, copies, reuse_metrics = window.mix(batch, self.global_steps) if window.k else (batch, [], {})
        if copies:  # spread the grown batch over the data-parallel ranks (every part is a whole multiple: no padding)
            mixed = self._balance_batch(mixed, metrics={})

        # The base method writes distillation_use_topk=False into the batch right before calling the worker
        # group; set the V(s_1) flag (and the grown mini-batch) in a wrapper around that one call.
        wg = self.actor_rollout_wg
        update_actor = wg.update_actor
        flag = LEAN_V_FLAG if self._lean_v() else "distillation_use_topk"

        def update_actor_with_v(b):
            b.extra_info[flag] = True
            if copies:
                for key in ("global_batch_size", "mini_batch_size"):
                    b.extra_info[key] = grown_mini_batch(b.extra_info[key], len(batch), len(b))
            return update_actor(b)

        wg.update_actor = update_actor_with_v
        try:
            super()._update_actor(mixed, metrics)
        finally:
            wg.update_actor = update_actor
            if copies:
                window.release(copies, batch.partition_id)
        if window.k:
            window.store(batch, self.global_steps)
            metrics.update(reuse_metrics)
        return batch

    def _save_checkpoint(self):
        window = self._reuse_window()
        if window.k:  # before verl's save, which ends by writing the tracker file that makes the checkpoint count
            window.save(os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}"))
        super()._save_checkpoint()

    def _load_checkpoint(self):
        super()._load_checkpoint()
        window = self._reuse_window()
        if window.k and self.global_steps > 0:
            folder = (self.config.trainer.resume_from_path if self.config.trainer.resume_mode == "resume_path"
                      else os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}"))
            if not window.load(folder):
                print(f"tbrm_verl: {folder} holds no reuse window ({CHECKPOINT_FILE}): reuse starts empty")


class SyncTrainer(_Console, PPOTrainerSync):
    """verl's sync trainer, for the PPO and GRPO baselines."""


class TBRMTrainerSync(_TBRM, SyncTrainer):
    """TBRM on verl's sync trainer."""


class ColocateAsyncTrainer(_Console, PPOTrainerColocateAsync):
    """verl's colocate_async trainer, for the PPO and GRPO baselines (their importance correction is verl's
    `algorithm.rollout_correction.*`)."""


class TBRMTrainerColocateAsync(_TBRM, ColocateAsyncTrainer):
    """TBRM on verl's colocate_async trainer: the same loss, no correction for stale or mixed-version rollouts."""


class SeparateAsyncTrainer(_Console, PPOTrainerSeparateAsync):
    """verl's separate_async trainer (GPU only: standalone rollout GPUs, a non-naive weight-sync backend), for the
    PPO and GRPO baselines."""


class TBRMTrainerSeparateAsync(_TBRM, SeparateAsyncTrainer):
    """TBRM on verl's separate_async trainer: rollout on its own GPUs, weights pushed every parameter_sync_step
    mini-batches; the same loss, no π_old (verl's CPU copy of the actor for decoupled PPO is never made)."""


TRAINERS = {  # trainer mode -> (TBRM's class, the baselines' class)
    "sync": (TBRMTrainerSync, SyncTrainer),
    "colocate_async": (TBRMTrainerColocateAsync, ColocateAsyncTrainer),
    "separate_async": (TBRMTrainerSeparateAsync, SeparateAsyncTrainer),
}


class TBRMTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's v1 TaskRunner, with the trainer modes of TRAINERS served by this module's classes."""

    def run(self, config):
        # Here, on the cluster, the workers' hardware is known: refuse a profile that does not match it.
        check_profile_on_cluster(cfg_profile(config), ray.nodes())
        # verl's registry refuses re-registration of a name; the mode names stay verl's on purpose (the string
        # switches replay-buffer and checkpoint behaviour), so the entries are replaced directly.
        for mode, (tbrm_cls, baseline_cls) in TRAINERS.items():
            trainer_base.TRAINER_REGISTRY[mode] = tbrm_cls if is_tbrm(config) else baseline_cls
        if config.run.print_config != "full":
            # verl's run() pprints the whole resolved config (~900 lines; `pprint` serves nothing else in that
            # module); the driver wrote it to <run.dir>/config.yaml instead. This process is the TaskRunner's own.
            from verl.trainer import main_ppo

            main_ppo.pprint = lambda *args, **kwargs: None
        return super().run(config)


def task_runner_class():
    return ray.remote(num_cpus=1)(TBRMTaskRunner)
