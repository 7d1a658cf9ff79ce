"""Every reach into verl is listed in tbrm_verl/seams.py, and the list still matches the installed verl.

`test_installed_verl_offers_every_seam` is the one that fails, with one line per seam, when a verl upgrade moves
something the project relies on. The checker itself is tested on targets that are known to be wrong."""

import inspect
import re
from pathlib import Path

import pytest

from tbrm_verl import seams

PKG = Path(__file__).resolve().parents[2] / "tbrm_verl"


def test_installed_verl_offers_every_seam():
    problems = seams.check()
    assert not problems, "verl's side of these seams moved:\n" + "\n".join(problems)


@pytest.mark.parametrize("seam, says", [
    (seams.Seam("json:no_such_function", "callable"), "is gone"),
    (seams.Seam("json:dumps", "callable", ("indent",)), "now takes (obj"),
    (seams.Seam("json:dumps", "dict"), "not a dict"),
    (seams.Seam("json:dumps", "class"), "no longer a class"),
    (seams.Seam("json:dumps", "keywords", ("poll_interval",)), "no longer takes poll_interval"),
    (seams.Seam("json", "source", ("verl.plugins",)), "no longer contains verl.plugins"),
    (seams.Seam("no_such_module_xyz:f", "attr"), "is gone"),
])
def test_checker_reports_a_moved_seam(seam, says):
    line = seams.problem(seam)
    assert line is not None and seam.target in line and says in line and "\n" not in line


@pytest.mark.parametrize("seam", [
    seams.Seam("json:dumps", "callable", ("obj",)),
    seams.Seam("json:JSONDecoder", "class"),
    seams.Seam("json:dumps", "keywords", ("indent", "sort_keys")),
    seams.Seam("json", "source", ("def dumps",)),
])
def test_checker_accepts_a_seam_that_holds(seam):
    assert seams.problem(seam) is None


def _listed(module: str, dotted: str) -> bool:
    return any(s.target == f"{module}:{dotted}" or s.target.endswith(f".{dotted}") or
               s.target.endswith(f":{dotted}") for s in seams.SEAMS)


def test_every_overridden_verl_method_is_listed():
    """Each method a tbrm_verl class overrides on a verl base class is a seam, so it must be in the list."""
    from tbrm_verl import actor_worker, engine, trainer

    classes = [trainer.SyncTrainer, trainer.TBRMTrainerSync, trainer.ColocateAsyncTrainer,
               trainer.TBRMTrainerColocateAsync, trainer.SeparateAsyncTrainer, trainer.TBRMTrainerSeparateAsync,
               trainer.TBRMTaskRunner, engine.TBRMEngine, actor_worker.TBRMTrainingWorker,
               actor_worker.TBRMActorRolloutRefWorker, actor_worker.detach_actor_worker_class()]
    missing = []
    for cls in classes:
        verl_bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("verl.")]
        # methods from tbrm_verl mixins count too: they override verl's methods once mixed in
        own = {name for c in cls.__mro__ if c.__module__.startswith("tbrm_verl") for name in c.__dict__}
        for name in sorted(own):
            if (name.startswith("__") and name != "__init__") or name == "_abc_impl":  # ABCMeta bookkeeping
                continue
            for base in verl_bases:
                if name in base.__dict__:
                    if not any(s.target.endswith(f".{name}") and base.__name__ in s.target or
                               s.target.endswith(f"{base.__name__}.{name}") for s in seams.SEAMS):
                        missing.append(f"{cls.__name__}.{name} overrides {base.__module__}.{base.__name__}.{name}")
                    break
    assert not missing, "not in tbrm_verl/seams.py:\n" + "\n".join(missing)


def test_every_runtime_replacement_and_private_registry_is_listed():
    """Assignments into another package's module (`module.attr = ...`) and writes into verl's private registries,
    found by reading tbrm_verl's source, each have an entry."""
    found = set()
    for path in PKG.rglob("*.py"):
        src = path.read_text()
        aliases = {}  # local name -> imported module, for `import x.y as z` / `from x import y`
        for m in re.finditer(r"^\s*import ((?:verl|torch)[\w.]*) as (\w+)", src, re.M):
            aliases[m.group(2)] = m.group(1)
        for m in re.finditer(r"^\s*from ((?:verl|torch)[\w.]*) import (\w+)(?: as (\w+))?$", src, re.M):
            aliases[m.group(3) or m.group(2)] = f"{m.group(1)}.{m.group(2)}"
        for m in re.finditer(r"^\s*(\w+)\.(\w+) = ", src, re.M):
            if m.group(1) in aliases:
                found.add((aliases[m.group(1)], m.group(2)))
        for m in re.finditer(r"(\w+)\.(_[A-Z_]+|[A-Z_]+_REGISTRY)\[", src):
            if m.group(1) in aliases:
                found.add((aliases[m.group(1)], m.group(2)))
    assert found, "the scan found nothing: it no longer reads the sources it is meant to"
    unlisted = [f"{mod}.{attr}" for mod, attr in sorted(found)
                if not any(s.target in (f"{mod}:{attr}",) for s in seams.SEAMS)]
    assert not unlisted, "not in tbrm_verl/seams.py: " + ", ".join(unlisted)
    # the known ones, so that a broken scan cannot pass by finding nothing relevant
    targets = {f"{m}:{a}" for m, a in found}
    for known in ("torch.distributed:init_process_group", "verl.utils.model:load_valuehead_model",
                  "verl.workers.rollout.base:_ROLLOUT_REGISTRY", "verl.trainer.ppo.v1.trainer_base:TRAINER_REGISTRY",
                  "verl.workers.engine.fsdp.transformer_impl:CPUOffloadPolicy"):
        assert known in targets, known


def test_each_seam_says_where_and_why():
    for s in seams.SEAMS:
        assert s.used_in and s.why, s.target
        for f in re.findall(r"tbrm_verl/[\w/]+\.py|setup\.py", s.used_in):
            assert (PKG.parent / f).exists(), f"{s.target}: {f} does not exist"
    assert inspect.getdoc(seams)
