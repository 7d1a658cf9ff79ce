"""Every place tbrm_verl reaches into verl 0.9.1, in one list, with a check that verl's side is still there.

No verl file is copied or edited. The project uses verl's registries and subclasses its classes; where verl 0.9.1
has no public seam it writes a private registry entry, overrides private methods, or replaces a function at run
time. Each entry below names verl's side of the seam (`module:attribute.path`), what verl must still offer there
(a dict, a class, a callable whose parameters start with given names), where this project uses it, and why.
`check()` resolves every entry; `tests/extension/test_seams.py` runs it, so that a verl upgrade that moves a seam
fails with one line naming the seam and what changed, not deep inside a Ray worker. verl is pinned exactly
(setup.py) because these seams change between minor releases.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Seam:
    target: str  # "module:attr.attr" on verl's (or torch's) side
    kind: str  # "dict" | "class" | "callable" | "keywords" (callable taking these names anywhere) | "attr" (present)
    #            | "source" (the module's text contains params[0])
    params: tuple[str, ...] = ()  # a callable's leading parameter names (self excluded), in order; "source": a text
    used_in: str = ""  # where this project uses it
    why: str = ""  # one line: why this seam and not a public one
    cpu_only: bool = False  # a run-time replacement made only on the CPU platform (VERL_PLATFORM=cpu)


SEAMS: tuple[Seam, ...] = (
    # --- loading: verl imports every `verl.plugins` entry point in each process (setup.py declares tbrm_verl.plugin)
    Seam("verl", "source", ('group="verl.plugins"',), "setup.py entry_points['verl.plugins']",
         "verl's plugin discovery (`verl.plugins` entry points, in verl/__init__.py) loads tbrm_verl.plugin in the "
         "driver, the TaskRunner and every worker before any of them builds a trainer or engine"),
    # --- registries (public)
    Seam("verl.plugin.platform:PlatformRegistry.register", "callable", ("platform",), "tbrm_verl/cpu/platform.py",
         "registers the `cpu` device platform, chosen with VERL_PLATFORM=cpu"),
    Seam("verl.plugin.platform:PlatformBase", "class", used_in="tbrm_verl/cpu/platform.py",
         why="the CPU platform implements verl's platform interface"),
    Seam("verl.workers.rollout.replica:RolloutReplicaRegistry.register", "callable", ("name", "loader"),
         "tbrm_verl/plugin.py", "registers the `cpu_hf` rollout replica (the CPU stand-in for vLLM)"),
    Seam("verl.trainer.ppo.core_algos:register_adv_est", "callable", ("name_or_enum",), "tbrm_verl/plugin.py",
         "registers the `tbrm` advantage estimator (zeros: verl's metrics read `advantages`; keeps the critic off)"),
    Seam("verl.workers.engine:EngineRegistry.register", "callable", ("model_type", "backend", "device", "vendor"),
         "tbrm_verl/engine.py", "registers TBRMEngine under its own vendor key `tbrm` (looked up before device alone)"),
    # --- registries (private: verl 0.9.1 offers no public way)
    Seam("verl.workers.rollout.base:_ROLLOUT_REGISTRY", "dict", used_in="tbrm_verl/plugin.py",
         why="the in-worker rollout adapter of `cpu_hf`: verl has no public registration for it"),
    Seam("verl.trainer.ppo.v1.trainer_base:TRAINER_REGISTRY", "dict", used_in="tbrm_verl/trainer.py",
         why="the `sync` and `colocate_async` entries are replaced by this project's trainers: the names must stay "
             "verl's (they switch verl's replay buffer and checkpoint behaviour) and verl's register refuses "
             "re-registration"),
    # --- subclassing: the engine and the worker
    Seam("verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.prepare_model_inputs", "callable",
         ("micro_batch",), "tbrm_verl/engine.py", "TBRMEngine arms the V(s_1) hooks with the micro-batch"),
    Seam("verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.prepare_model_outputs", "callable",
         ("output", "output_args", "micro_batch", "logits_processor_func"), "tbrm_verl/engine.py",
         "TBRMEngine adds `tbrm_v` (V(s_1)) to the model output the loss reads"),
    Seam("verl.workers.engine_workers:ActorRolloutRefWorker.actor_worker_cls", "attr",
         used_in="tbrm_verl/actor_worker.py", why="the actor's engine is built by TBRMTrainingWorker, the reference's "
                                                  "by verl's TrainingWorker"),
    Seam("verl.workers.engine_workers:TrainingWorker.__init__", "callable", ("config",), "tbrm_verl/actor_worker.py",
         "TBRMTrainingWorker selects the `tbrm` engine vendor while verl's constructor builds the engine"),
    Seam("verl.workers.engine_workers:ActorRolloutRefWorker.set_loss_fn", "callable", ("loss_fn",), "tbrm_verl/trainer.py",
         "installs tbrm_loss, verl's engine-loss hook (cfg-bound function of model_output, data, dp_group)"),
    # --- subclassing: the trainer (private methods of verl's v1 sync trainer)
    Seam("verl.trainer.main_ppo:TaskRunnerV1.__ray_actor_class__.run", "callable", ("config",), "tbrm_verl/trainer.py",
         "TBRMTaskRunner checks the profile against the cluster and selects the trainer"),
    Seam("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync._build_replay_buffer", "callable", (), "tbrm_verl/trainer.py",
         "sets the replay buffer's poll interval (`poll_interval`, fixed at 2 s in verl) from the config"),
    Seam("verl.trainer.ppo.v1.replay_buffer:ReplayBuffer.__init__", "keywords", ("poll_interval",), used_in=
         "tbrm_verl/trainer.py", why="the attribute set above; checked by name where verl defines it"),
    Seam("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync._init_resource_pool_mgr", "callable", (),
         "tbrm_verl/trainer.py", "maps the actor's role to TBRM's worker class (lean V(s_1) engine)"),
    Seam("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync.on_init_end", "callable", (), "tbrm_verl/trainer.py",
         "installs the loss before verl pushes weights to the rollout"),
    Seam("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync._compute_old_log_prob", "callable", ("batch", "metrics"),
         "tbrm_verl/trainer.py", "skipped: TBRM has no π_old"),
    Seam("verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync._update_actor", "callable", ("batch", "metrics"),
         "tbrm_verl/trainer.py", "flags the actor update (and only it) for V(s_1)"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer._update_actor", "source", ('"mini_batch_size": ppo_mini_batch_size',),
         "tbrm_verl/trainer.py", "trajectory reuse grows the update's global/mini-batch size in extra_info, which "
         "verl sets here from ppo_mini_batch_size"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer._balance_batch", "callable", ("batch", "metrics"),
         "tbrm_verl/trainer.py", "trajectory reuse spreads the grown batch over the data-parallel ranks again"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer._save_checkpoint", "callable", (), "tbrm_verl/trainer.py",
         "trajectory reuse saves its window into global_step_N/ before verl writes the tracker file"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer._load_checkpoint", "callable", (), "tbrm_verl/trainer.py",
         "trajectory reuse puts its window back after verl has set global_steps from the checkpoint"),
    Seam("verl.trainer.ppo.v1.trainer_base:tq", "attr", used_in="tbrm_verl/trainer.py, tbrm_verl/reuse.py",
         why="the TransferQueue handle verl's trainer uses; the reuse window keeps its batches in a partition of it"),
    Seam("transfer_queue:kv_batch_put", "keywords", ("keys", "partition_id", "fields", "tags"),
         "tbrm_verl/reuse.py", "the window copies rows (all fields, tags) between partitions"),
    Seam("transfer_queue:kv_batch_get", "keywords", ("keys", "partition_id"), "tbrm_verl/reuse.py",
         "the window reads every field of the rows it keeps"),
    Seam("transfer_queue:kv_clear", "keywords", ("keys", "partition_id"), "tbrm_verl/reuse.py",
         "copies and evicted batches are cleared"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer.on_validate_begin", "callable", (), "tbrm_verl/trainer.py",
         "puts the compact progress line in place of verl's console logger, once fit() has built its Tracking"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer.on_train_begin", "callable", (), "tbrm_verl/trainer.py",
         "the same, when no validation runs before training"),
    Seam("verl.trainer.ppo.v1.trainer_base:PPOTrainer.on_step_begin", "callable", (), "tbrm_verl/trainer.py",
         "tests only: a pause after a checkpoint (TBRM_TEST_PAUSE_AFTER_CHECKPOINT_S) so Ctrl-C lands between steps"),
    Seam("verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync.on_step_begin", "callable", (),
         "tbrm_verl/trainer.py", "the same hook where separate_async overrides it (called through super())"),
    Seam("verl.trainer.ppo.v1.trainer_colocate_async:PPOTrainerColocateAsync.on_init_end", "callable", (),
         "tbrm_verl/trainer.py", "colocate_async: installs the loss before verl pushes weights to the rollout"),
    Seam("verl.trainer.ppo.v1.trainer_colocate_async:PPOTrainerColocateAsync.on_train_begin", "callable", (),
         "tbrm_verl/trainer.py", "colocate_async: the compact progress line, then verl's warm-up batches"),
    Seam("verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync._init_resource_pool_mgr", "callable", (),
         "tbrm_verl/trainer.py", "separate_async (GPU): maps the actor to DetachActorWorker, replaced by its TBRM "
         "subclass (tbrm_verl/actor_worker.py)"),
    Seam("verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync._compute_old_log_prob", "callable",
         ("batch", "metrics"), "tbrm_verl/trainer.py", "separate_async: skipped, with its CPU copy of the actor"),
    Seam("verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync.on_init_end", "callable", (),
         "tbrm_verl/trainer.py", "separate_async: installs the loss before verl pushes weights to the rollout"),
    Seam("verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync.on_train_begin", "callable", (),
         "tbrm_verl/trainer.py", "separate_async: the compact progress line, then verl's own hook"),
    Seam("verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync.on_validate_begin", "callable", (),
         "tbrm_verl/trainer.py", "separate_async: the compact progress line, then verl's own hook"),
    Seam("verl.experimental.separation.engine_workers:DetachActorWorker.actor_worker_cls", "attr",
         used_in="tbrm_verl/actor_worker.py", why="separate_async's actor worker; its TBRM subclass swaps the "
         "training worker class for TBRMEngine, as TBRMActorRolloutRefWorker does"),
    Seam("verl.workers.rollout.llm_server:FullyAsyncLLMServerClient.generate", "source", ("aborted",),
         "tbrm_verl/cpu/rollout.py", "colocate_async resends prompt + partial tokens while a server answers "
         "stop_reason `aborted`: what cpu_hf's abort_all_requests returns for the batch it stops", cpu_only=True),
    Seam("verl.utils.tracking:Tracking.__init__", "source", ("self.logger[",), "tbrm_verl/console.py",
         "Tracking keeps its backends in the dict `self.logger` (name -> backend): the console entry is replaced"),
    # --- run-time replacements (functions replaced in the running process; verl's files untouched)
    Seam("torch.distributed:init_process_group", "callable", ("backend",), "tbrm_verl/cpu/platform.py",
         "CPU only: de-duplicates verl's `cpu:gloo,cpu:gloo` backend string, which gloo rejects", cpu_only=True),
    Seam("verl.workers.engine.fsdp.transformer_impl:CPUOffloadPolicy", "attr", used_in="tbrm_verl/cpu/platform.py",
         why="CPU only: verl passes pin_memory=True, which needs a GPU; replaced by an unpinned policy", cpu_only=True),
    Seam("verl.trainer.main_ppo:pprint", "callable", (), "tbrm_verl/trainer.py",
         "TaskRunner process only, unless run.print_config=full: verl's run() pprints the whole config (~900 lines); "
         "replaced by a no-op (the driver writes the config to <run.dir>/config.yaml)"),
    Seam("verl.utils.model:load_valuehead_model", "callable",
         ("local_path", "torch_dtype", "model_config", "trust_remote_code"), "tbrm_verl/attn.py, tbrm_verl/cpu/platform.py",
         "verl's critic loader hard-codes flash_attention_2: wrapped to honour critic.model.override_config "
         "(every platform), replaced by an sdpa loader on the CPU platform"),
)


def _resolve(target: str):
    mod_name, _, path = target.partition(":")
    with warnings.catch_warnings():  # verl warns about every optional engine it cannot import
        warnings.simplefilter("ignore")
        obj = importlib.import_module(mod_name)
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def problem(seam: Seam) -> str | None:
    """None when verl's side of `seam` is as this project expects, else one line saying what changed."""
    try:
        obj = _resolve(seam.target)
    except (ImportError, AttributeError) as exc:
        return f"{seam.target} is gone ({exc}); used in {seam.used_in} to: {seam.why}"
    if seam.kind == "source" and seam.params[0] not in inspect.getsource(obj):
        return f"{seam.target} no longer contains {seam.params[0]}; used in {seam.used_in} to: {seam.why}"
    if seam.kind == "dict" and not isinstance(obj, dict):
        return f"{seam.target} is a {type(obj).__name__}, not a dict; used in {seam.used_in}"
    if seam.kind == "class" and not inspect.isclass(obj):
        return f"{seam.target} is no longer a class; used in {seam.used_in}"
    if seam.kind == "keywords":
        missing = [k for k in seam.params if k not in inspect.signature(obj).parameters]
        if missing:
            return f"{seam.target} no longer takes {', '.join(missing)}; used in {seam.used_in} to: {seam.why}"
    if seam.kind == "callable":
        if not callable(obj):
            return f"{seam.target} is no longer callable; used in {seam.used_in}"
        try:
            names = [p for p in inspect.signature(obj).parameters if p != "self"]
        except (TypeError, ValueError):
            names = None
        if names is not None and tuple(names[: len(seam.params)]) != seam.params:
            return (f"{seam.target} now takes ({', '.join(names)}), expected ({', '.join(seam.params)}, ...); "
                    f"used in {seam.used_in} to: {seam.why}")
    return None


def check(seams=SEAMS) -> list[str]:
    """One line per seam whose verl side moved (empty when all hold)."""
    return [p for p in (problem(s) for s in seams) if p]
