"""Per-worker memory of a verl run from a ProcessTreeSampler's per-process stats: each process's role from its Ray
title, its post-import baseline, and the training-state memory above it (``train_state_mem_gb``, see
docs/bench/README.md)."""

from __future__ import annotations

FSDP_WORKER = "ray::WorkerDict"  # verl's colocated worker class: actor, rollout adapter, reference, critic
ROLLOUT_SERVER = "ray::CPURolloutServer"  # tbrm_verl.cpu.rollout's server (the vLLM stand-in)
TRAIN_STATE_ROLES = ("fsdp_worker", "rollout_server")


def _ray_class(title: str) -> str | None:
    """The actor class a Ray worker's title names; None for a process that is not a Ray worker. Ray's titles (Ray
    2.60, checked in a run): `ray::IDLE`, `ray::BJLK64WorkerDict_0:0:WorkerDict.__init__` (a named actor's
    constructor: name, then class), `ray::WorkerDict`, `ray::WorkerDict.actor_rollout_ref_init_model` (a call)."""
    if not title.startswith("ray::"):
        return None
    head = title[len("ray::"):].split(" ", 1)[0]
    return head.split(".", 1)[0].rsplit(":", 1)[-1]


def role_of(title: str) -> str:
    """fsdp_worker, rollout_server, other_actor (TaskRunner, TransferQueue, agent loop, reward, ...), idle_worker
    (a pooled Ray worker that never became an actor) or runtime (driver, GCS, raylet, dashboard, ...)."""
    cls = _ray_class(title)
    if cls is None:
        return "runtime"
    if cls == FSDP_WORKER[len("ray::"):]:
        return "fsdp_worker"
    if cls == ROLLOUT_SERVER[len("ray::"):]:
        return "rollout_server"
    return "idle_worker" if cls == "IDLE" else "other_actor"


ACTOR_ROLES = ("fsdp_worker", "rollout_server", "other_actor")


def baseline_when(title: str, name: str = "") -> bool:
    """Whether a sample with this title is an actor's post-import baseline: the actor runs `__init__` or idles. Ray
    imports the actor's class and its modules (torch, transformers, verl) while the title is still `ray::IDLE` and
    only then names the class. A title naming another method is past the baseline (verl's workers build their
    models in `init_model`, the rollout server in `__init__`)."""
    if role_of(title) not in ACTOR_ROLES:
        return False
    head = title[len("ray::"):].split(" ", 1)[0]
    return "." not in head or head.endswith(".__init__")


def baseline_of(stats) -> tuple[tuple | None, str | None]:
    """(sample (t, rss, title, name), kind) of a process's post-import baseline:

    * "actor_init": its first sample with an actor title, when that title is `__init__` or the idle actor;
    * "pre_actor": else (the sampler missed a short `__init__` and saw the first method call, e.g. init_model),
      its last sample before that title, i.e. the end of Ray's import of the class under `ray::IDLE` (at most one
      sampling interval early);
    * (None, None): never an actor (driver, GCS, raylet, idle pooled workers)."""
    is_actor = lambda title, name: role_of(title) in ACTOR_ROLES  # noqa: E731
    first = stats.first_where(is_actor)
    if first is None:
        return None, None
    if baseline_when(first[2]):
        return first, "actor_init"
    prev = stats.last_before(is_actor)
    return (prev, "pre_actor") if prev is not None else (None, None)


def worker_memory(stats) -> dict:
    """Per-role and per-process memory above the post-import baseline (baseline_of) from a ProcessTreeSampler's
    stats, in GB. A pooled Ray worker that became an actor has that actor's role; processes without a baseline
    (not actors) count in their role's peak RSS only."""
    procs, by_role = [], {}
    for s in stats:
        roles = {role_of(t) for t in s.titles}
        role = next((r for r in ("fsdp_worker", "rollout_server", "other_actor", "idle_worker") if r in roles),
                    "runtime")
        base, kind = baseline_of(s)
        above = max(0, s.peak_rss - base[1]) / 1e9 if base is not None else None
        procs.append({"pid": s.pid, "role": role, "baseline_kind": kind,
                      "baseline_title": base[2] if base else None, "baseline_t": base[0] if base else None,
                      "baseline_rss_gb": base[1] / 1e9 if base else None, "first_rss_gb": s.first_rss / 1e9,
                      "peak_rss_gb": s.peak_rss / 1e9, "peak_title": s.peak_title, "peak_t": s.peak_t,
                      "above_baseline_gb": above})
        agg = by_role.setdefault(role, {"processes": 0, "above_baseline_gb": 0.0, "peak_rss_gb": 0.0})
        agg["processes"] += 1
        agg["above_baseline_gb"] += above or 0.0
        agg["peak_rss_gb"] += s.peak_rss / 1e9
    return {"train_state_mem_gb": sum(by_role.get(r, {}).get("above_baseline_gb", 0.0) for r in TRAIN_STATE_ROLES),
            "train_engine_mem_gb": by_role.get("fsdp_worker", {}).get("above_baseline_gb", 0.0),
            "rollout_server_mem_gb": by_role.get("rollout_server", {}).get("above_baseline_gb", 0.0),
            "roles": by_role, "processes": procs}
