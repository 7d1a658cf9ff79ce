"""A verl device platform for CPU-only machines, loaded through verl's plugin mechanism (no verl file patched).

verl 0.9.1 knows only accelerators: with none present it falls back to "nvidia" (device `cuda`, backend `nccl`).
Selected with `VERL_PLATFORM=cpu` (tbrm_verl.main sets it when no GPU is visible), this platform makes verl's
device helpers answer `cpu` / `gloo`. Ray still schedules workers on logical "GPU" resources, which the CPU profile
declares with `ray_kwargs.ray_init.num_gpus`, because verl's resource pools ask Ray for GPUs by name.

Three small adjustments verl needs on CPU are applied by `install()` in every process, and only when the CPU
platform is selected:
* `init_process_group("cpu:gloo,cpu:gloo")` is rejected by torch as a duplicate: de-duplicate the backend string.
* FSDP2 forward-only engines (the reference model) use `CPUOffloadPolicy(pin_memory=True)`, and pinning memory needs
  an accelerator: use `pin_memory=False`.
* the FSDP engines are registered for devices `cuda`/`npu` only: `VERL_ENGINE_DEVICE=cuda` picks that registry key;
  the engine code itself then runs on this platform's `cpu` device.
* verl's `load_valuehead_model` (PPO's critic) hard-codes `attn_implementation="flash_attention_2"`, which has no
  CPU kernel: on CPU the critic is loaded the same way with `sdpa`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace
from typing import Any, Optional

import torch

PLATFORM_NAME = "cpu"


def _zero(*_args, **_kwargs) -> int:
    return 0


def _noop(*_args, **_kwargs) -> None:
    return None


def _mem_get_info(*_args, **_kwargs) -> tuple[int, int]:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    avail = os.sysconf("SC_AVPHYS_PAGES") * page_size
    return avail, pages * page_size


class _CPUDeviceModule(SimpleNamespace):
    """Stands in for `torch.cuda` where verl calls `get_torch_device().<fn>()`: memory queries report 0 bytes
    allocated, cache and sync calls do nothing, RNG state is the CPU generator's."""

    def __getattr__(self, name: str):  # any other torch.cuda helper verl may call: a harmless no-op
        if name.startswith("__"):
            raise AttributeError(name)
        return _noop


DEVICE_MODULE = _CPUDeviceModule(
    is_available=lambda: True,
    device_count=lambda: 1,
    current_device=lambda: "cpu",
    set_device=_noop,
    synchronize=_noop,
    empty_cache=_noop,
    memory_allocated=_zero,
    memory_reserved=_zero,
    max_memory_allocated=_zero,
    max_memory_reserved=_zero,
    reset_peak_memory_stats=_noop,
    mem_get_info=_mem_get_info,
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    get_rng_state=torch.get_rng_state,
    set_rng_state=torch.set_rng_state,
    get_device_name=lambda *_: "cpu",
    get_device_capability=lambda *_: (None, None),
    is_initialized=lambda: True,
)


def selected() -> bool:
    """True when this process runs verl on the CPU platform."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def _dedupe_backend(init_process_group):
    @functools.wraps(init_process_group)
    def wrapper(*args, **kwargs):
        backend = kwargs.get("backend")
        if isinstance(backend, str) and "," in backend:
            parts = list(dict.fromkeys(p.strip() for p in backend.split(",")))
            kwargs["backend"] = ",".join(parts)
        return init_process_group(*args, **kwargs)

    wrapper._tbrm_cpu = True
    return wrapper


def _load_valuehead_model_sdpa(local_path, torch_dtype, model_config, trust_remote_code):
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(
        pretrained_model_name_or_path=local_path, torch_dtype=torch_dtype, config=model_config,
        attn_implementation="sdpa", trust_remote_code=trust_remote_code,
    )


_load_valuehead_model_sdpa._tbrm_cpu = True


def install() -> None:
    """Register the platform; when it is selected, apply the CPU adjustments described in the module docstring."""
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    if PlatformRegistry.get(PLATFORM_NAME) is None:

        @PlatformRegistry.register(platform=PLATFORM_NAME)
        class PlatformCPU(PlatformBase):
            device_name = "cpu"
            vendor_name = "cpu"
            device_module = DEVICE_MODULE

            def is_available(self) -> bool:
                return True

            def is_platform_available(self, use_smi_check=False) -> bool:
                return False  # never auto-detected: chosen explicitly with VERL_PLATFORM=cpu

            def current_device(self):
                return "cpu"  # verl calls tensor.to(get_device_id()); an int would mean cuda:N

            def device_count(self) -> int:
                return 1

            def set_device(self, device_index) -> None:
                return None

            def synchronize(self, device_index: Optional[int] = None) -> None:
                return None

            def manual_seed(self, seed: int) -> None:
                torch.manual_seed(seed)

            def manual_seed_all(self, seed: int) -> None:
                torch.manual_seed(seed)

            def set_allocator_settings(self, settings: str) -> None:
                return None

            def empty_cache(self) -> None:
                return None

            def get_device_capability(self, device_index: int = 0):
                return None, None

            def communication_backend_name(self) -> str:
                return "gloo"

            def visible_devices_envvar(self) -> str:
                return "CUDA_VISIBLE_DEVICES"

            @contextlib.contextmanager
            def nvtx_range(self, msg: str):
                yield

            def profiler_start(self) -> None:
                return None

            def profiler_stop(self) -> None:
                return None

            def ray_resource_name(self) -> str:
                return "GPU"  # logical GPUs declared to Ray by the CPU profile

            def ray_noset_envvars(self) -> list[str]:
                return []

            def is_ipc_supported(self) -> bool:
                return False

            def cudart(self) -> Any:
                return None

    if not selected():
        return
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    import torch.distributed as dist

    if not getattr(dist.init_process_group, "_tbrm_cpu", False):
        dist.init_process_group = _dedupe_backend(dist.init_process_group)

    import warnings

    with warnings.catch_warnings():  # verl warns about every optional engine (megatron, veomni, ...) it cannot import
        warnings.simplefilter("ignore", UserWarning)
        from verl.workers.engine.fsdp import transformer_impl

    import verl.utils.model as verl_model

    if not getattr(verl_model.load_valuehead_model, "_tbrm_cpu", False):
        verl_model.load_valuehead_model = _load_valuehead_model_sdpa  # the engine imports it at call time

    policy = transformer_impl.CPUOffloadPolicy
    if policy is not None and not getattr(policy, "_tbrm_cpu", False):

        def unpinned_offload_policy(*args, **kwargs):
            kwargs["pin_memory"] = False  # the engine passes pin_memory=True explicitly
            return policy(*args, **kwargs)

        unpinned_offload_policy._tbrm_cpu = True
        transformer_impl.CPUOffloadPolicy = unpinned_offload_policy
