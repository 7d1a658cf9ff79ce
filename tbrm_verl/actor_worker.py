"""TBRM's actor worker: verl's worker classes, with TBRMEngine (tbrm_verl/engine.py) for the actor's engine only."""

from __future__ import annotations

import functools
import os

from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from tbrm_verl.engine import ENGINE_VENDOR


class TBRMTrainingWorker(TrainingWorker):
    """verl's TrainingWorker whose engine is looked up under the `tbrm` vendor key (TBRMEngine for FSDP)."""

    def __init__(self, config):
        previous = os.environ.get("VERL_ENGINE_VENDOR")
        os.environ["VERL_ENGINE_VENDOR"] = ENGINE_VENDOR
        try:
            super().__init__(config)
        finally:  # only this engine: the reference model built in the same process keeps verl's
            if previous is None:
                os.environ.pop("VERL_ENGINE_VENDOR", None)
            else:
                os.environ["VERL_ENGINE_VENDOR"] = previous


class TBRMActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker with TBRMEngine for the actor; the reference keeps `TrainingWorker`."""

    actor_worker_cls = TBRMTrainingWorker


@functools.cache  # one class for the whole process, however often the trainer or a test asks
def detach_actor_worker_class():
    """separate_async: verl's DetachActorWorker (saves/restores the actor to CPU around its π_old pass) with TBRMEngine
    for the actor. Built on first use: the module imports verl's experimental separation package."""
    from verl.experimental.separation.engine_workers import DetachActorWorker

    class TBRMDetachActorWorker(DetachActorWorker):
        actor_worker_cls = TBRMTrainingWorker

    return TBRMDetachActorWorker
