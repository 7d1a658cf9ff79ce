"""TBRM's actor engine: verl's FSDP engine plus V(s_1) from B hidden rows (tbrm_verl/lean_v.py).

`TBRMEngine` subclasses verl's `FSDPEngineWithLMHead` and changes nothing unless a micro-batch carries the
non-tensor flag `tbrm_lean_v` (set by TBRM's trainer for the actor update only): then `prepare_model_inputs` arms
the hooks with the micro-batch's last-prompt positions, the model's forward computes V(s_1) there, and
`prepare_model_outputs` adds it to `model_output["tbrm_v"]` for `tbrm_loss`. Log-probs, entropy, fused kernels,
remove-padding and no-padding layouts are verl's code, untouched.

Selection: the engine is registered in verl's `EngineRegistry` under its own vendor key (`tbrm`), which verl looks
up before the device-only key when `VERL_ENGINE_VENDOR` names it. `TBRMTrainingWorker` (tbrm_verl/actor_worker.py,
kept apart so that this module imports without Ray, as `python -m tbrm_verl.gpu_check` needs) sets that variable only
while it builds its engine, and `TBRMActorRolloutRefWorker` uses it for the actor alone: the reference model, the
critic and the PPO/GRPO baselines keep verl's engine. The same key is registered for `cuda` and `npu`; the CPU
platform looks engines up as `cuda` (VERL_ENGINE_DEVICE, tbrm_verl/cpu/platform.py), so CPU and GPU runs execute
the same class.
"""

from __future__ import annotations

import warnings

from verl.utils import tensordict_utils as tu

with warnings.catch_warnings():  # verl warns about every optional engine (megatron, veomni, ...) it cannot import
    warnings.simplefilter("ignore", UserWarning)
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from tbrm_verl.lean_v import LEAN_V_FLAG, LeanV

ENGINE_VENDOR = "tbrm"


@EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=["cuda", "npu"],
                         vendor=ENGINE_VENDOR)
class TBRMEngine(FSDPEngineWithLMHead):
    def _tbrm_lean_v(self) -> LeanV:
        lean = self.__dict__.get("_lean_v")
        if lean is None or lean.model is not self.module:  # hooks go on the module actually run (built lazily)
            if lean is not None:
                lean.remove()
            lean = self.__dict__["_lean_v"] = LeanV(self.module)
            print("[tbrm_verl] actor engine: V(s_1) from the hidden rows at the last prompt positions", flush=True)
        return lean

    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        if tu.get_non_tensor_data(data=micro_batch, key=LEAN_V_FLAG, default=False):
            if self.use_ulysses_sp:  # the hidden states would be this rank's slice of the sequence
                raise NotImplementedError("TBRM V(s_1) from hidden rows does not support Ulysses sequence parallel")
            self._tbrm_lean_v().arm(
                micro_batch,
                use_remove_padding=tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True),
                fused=tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False),
            )
        return model_inputs, output_args

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        if tu.get_non_tensor_data(data=micro_batch, key=LEAN_V_FLAG, default=False):
            model_output.update(self._tbrm_lean_v().take(micro_batch))  # tbrm_v (+ tbrm_entropy)
        return model_output
