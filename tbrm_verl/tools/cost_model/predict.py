"""One method's prediction (FLOPs, time per phase, memory) and the ratios between methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tbrm_verl.tools.cost_model.formulas import _counts, _memory, _phase_times, phase_flops
from tbrm_verl.tools.cost_model.specs import H100, METHODS, Hardware, MethodSpec, ModelSpec, Offload, Workload


# ------------------------------------------------------------------------------------------------------ predict
@dataclass
class Prediction:
    method: str
    label: str
    counts: dict
    flops: dict
    time_s: dict
    step_time_s: float
    memory: dict
    rollout: dict
    fits: bool = field(default=True)

    @property
    def peak_mem_gb(self) -> float:
        return self.memory["peak_device_gb"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_mem_gb"] = self.peak_mem_gb
        return d


def predict(
    model: ModelSpec, w: Workload, method: MethodSpec | str, hw: Hardware = H100, offload: Offload = Offload()
) -> Prediction:
    m = METHODS[method] if isinstance(method, str) else method
    fl = phase_flops(model, w, m)
    t, ro = _phase_times(model, w, m, hw, offload, fl)
    mem = _memory(model, w, m, hw, offload)
    return Prediction(
        method=m.key,
        label=m.label,
        counts=_counts(model, w, m),
        flops=fl,
        time_s=t,
        step_time_s=sum(t.values()),
        memory=mem,
        rollout={k: v for k, v in ro.items() if k != "gen_s"},
        fits=bool(mem["fits"] and ro["fits"]),
    )


def predict_all(
    model: ModelSpec, w: Workload, hw: Hardware = H100, offload: Offload = Offload(), methods=None
) -> dict[str, Prediction]:
    return {k: predict(model, w, METHODS[k], hw, offload) for k in (methods or METHODS)}


def ratios_vs(preds: dict[str, Prediction], base: str = "ppo_n1") -> dict[str, dict]:
    """Per method: step time / base, base step time / time (speed-up), peak memory / base (both definitions)."""
    b = preds[base]
    out = {}
    for k, p in preds.items():
        out[k] = {
            "time_ratio": p.step_time_s / b.step_time_s,
            "speedup": b.step_time_s / p.step_time_s,
            "peak_device_ratio": p.memory["peak_device_gb"] / b.memory["peak_device_gb"],
            "peak_train_ratio": p.memory["peak_train_gb"] / b.memory["peak_train_gb"],
        }
    return out
