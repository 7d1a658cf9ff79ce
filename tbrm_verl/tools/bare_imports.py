"""Import verl's FSDP engine on a bare GPU machine: one with torch and transformers but no Ray (and no network).

Why: a lent GPU machine has torch and transformers; the GPU check (tbrm_verl/tools/gpu_check/) brings verl and the
small wheels its engine imports in an offline bundle (tbrm_verl/tools/gpu_bundle.py), but not Ray: its wheel
(~79 MB) alone is over the bundle's limit. Ray is not needed to run the engine's forward on one process, only to
import two verl modules:
  * verl's package `__init__` imports ray (through `verl.protocol`);
  * verl's FSDP engine module imports ray at import time (verl.utils.checkpoint -> verl.single_controller), and only
    uses `ray.remote` / `ray.ObjectRef` there as names.

What `prepare_imports()` does, only when `import ray` fails:
  1. registers an empty package module `verl` (with verl's real `__path__`), so that verl's submodules import from
     the installed wheel without running verl/__init__.py;
  2. imports `verl.workers.engine.fsdp.transformer_impl` with a stand-in `ray` module in `sys.modules` (every
     attribute is another stand-in; calling one returns the decorated function or itself), and removes the stand-in
     and its submodules again afterwards, so nothing later sees a fake Ray.
With Ray installed it imports everything normally. No verl code is copied or replaced; every other import is real,
so a missing distribution raises ImportError naming it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["prepare_imports"]

ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
# imported first so that a missing distribution is named before the engine's long import chain
LIGHT_MODULES = ("tensordict", "verl.workers.utils.padding", "verl.utils.metric", "verl.utils.torch_functional",
                 "verl.utils.tensordict_utils")

_ENV: dict = {}


def prepare_imports() -> dict:
    """Import verl's light modules and its FSDP engine class (once per process). Returns what was done: `ray`,
    `verl_init` (only when skipped), `flash_attn_cross_entropy`, `engine_import`, `engine_class`.
    Raises ImportError naming what is missing."""
    if _ENV:
        return _ENV
    info = {}
    try:
        import ray  # noqa: F401

        info["ray"] = "available"
    except Exception as e:  # noqa: BLE001
        info["ray"] = f"missing ({type(e).__name__})"
        if "verl" not in sys.modules:
            _register_verl_without_init()
            info["verl_init"] = "skipped (package __init__ imports ray)"
    for mod in LIGHT_MODULES:
        importlib.import_module(mod)
    from verl.utils import torch_functional as vF

    info["flash_attn_cross_entropy"] = bool(vF.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE)
    have_ray = info["ray"] == "available"
    try:
        module = importlib.import_module(ENGINE_MODULE) if have_ray else _import_with_ray_stand_in(ENGINE_MODULE)
    except ImportError as e:
        raise ImportError(f"{e} (imported by verl's FSDP engine module)") from e
    info["engine_class"] = module.FSDPEngineWithLMHead
    info["engine_import"] = "ok" + ("" if have_ray else " (ray stand-in during import)")
    _ENV.update(info)
    return _ENV


def _register_verl_without_init() -> None:
    spec = importlib.util.find_spec("verl")
    if spec is None:
        raise ImportError("verl is not installed: pip install --no-deps verl==0.9.1")
    pkg = types.ModuleType("verl")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__spec__ = spec
    sys.modules["verl"] = pkg


class _RayStandIn(types.ModuleType):
    """Any attribute is another stand-in (registered as a submodule, so `from ray.x import y` works); calling one
    returns the function it decorates (`@ray.remote`) or itself."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _RayStandIn(f"{self.__name__}.{name}")
        sub.__spec__ = importlib.machinery.ModuleSpec(sub.__name__, None)
        sys.modules[sub.__name__] = sub
        return sub

    def __call__(self, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else self


def _import_with_ray_stand_in(name: str):
    before = set(sys.modules)
    stub = _RayStandIn("ray")
    stub.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    stub.__path__ = []
    sys.modules["ray"] = stub
    try:
        return importlib.import_module(name)
    finally:
        for n in [n for n in sys.modules if (n == "ray" or n.startswith("ray.")) and n not in before]:
            del sys.modules[n]
