"""Device checks of the TBRM loss that a CPU cannot make: bf16 numerics on the GPU and the logits hook's overhead.

    python -m tbrm_verl.gpu_check                                          # after the GPU install (<1 min, est.)
    python -m tbrm_verl.gpu_check bundle --out DIR --python-version 3.12   # here; then, on a bare GPU machine
    bash DIR/run.sh                                                        #   (torch, transformers, no network;
                                                                           #   1-1.5 min, estimated)
    python -m tbrm_verl.gpu_check --device cpu --out /tmp/gpu_check.json   # same checks, small shapes (<1 min)

Writes one JSON (default docs/gpu_check.json; DIR/gpu_check.json from the bundle) whose fields docs/gpu_check.md
explains: `passed` and `failed_checks` first, then every number. Exits 0 when every check passed, 1 when one failed,
2 when a required module is missing.

Always runs verl's own engine code: FSDPEngineWithLMHead.prepare_model_inputs/prepare_model_outputs build the packed
inputs, call the logits hook and the loss, as in training. Ray and vLLM are not needed: without Ray, verl's engine is
imported as tbrm_verl/tools/bare_imports.py says (verl's package `__init__` skipped, a stand-in `ray` during the
engine module's import). The model is wrapped in torch FSDP2 (`fully_shard` per decoder layer + root,
MixedPrecisionPolicy(param bf16, reduce fp32), like verl's `apply_fsdp2`) on a single-rank process group and run
under autocast, as verl's engine does.

Modules: harness.py (process group, FSDP2 wrap, tiny Qwen2, verl batches, one micro-batch through verl's engine),
correctness.py (checks a+b), measure.py (check c and the update-memory measurement), cli.py (JSON, summary, `main`).

Checks:
  (a)+(b) correctness: a tiny random Qwen2 (hidden 128, 2 layers, 4 heads, head_dim 32, vocab 512) runs the TBRM
      loss through verl's dual-call contract (logits hook -> per-token `tbrm_v`, then the loss call) or TBRMEngine's
      lean V(s_1) path on packed micro-batches built as verl builds them (nested input_ids/position_ids/prompts/
      responses; response-side fields padded [B, R] or nested as the v1 trainer stores them); V(s_1), the loss, the
      mean residual and the gradient of every parameter are compared with a float32 CPU reference computed per
      sequence (no packing) straight from the paper's formula. Variants: TBRM (padded and nested layouts),
      reference-free TBRM, and the classical-BRM ablation. Run in float32 (tight tolerances) and bf16 (bf16
      tolerances).
  (c) overhead: forward+backward of the TBRM loss vs a plain log-prob loss (sum of response log-probs) on a
      larger shape (lm head 151936 x 1536, 2 layers, 4 x 2048 tokens on a GPU): CUDA-event time, peak
      `max_memory_allocated`, and a dispatch-level scan for float32 [tokens, vocab] tensors. Target: <= 3% time
      overhead, no float32 [tokens, vocab] copy. The time target is reported, not enforced (it depends on the
      machine); the float32-copy scan is a correctness check. On a GPU also the peak memory of one actor update,
      plain / logits hook / lean V(s_1), at the 1.5B recipe's shapes (lean must stay within 2% of plain).
"""

import time

IMPORT_T0 = time.time()  # wall time of a `python -m tbrm_verl.gpu_check` run counts from here, before torch's import

from tbrm_verl.tools.bare_imports import prepare_imports  # noqa: E402
from tbrm_verl.tools.gpu_check.cli import failed_checks, main, run_all  # noqa: E402
from tbrm_verl.tools.gpu_check.correctness import TOLERANCES, VARIANTS, reference_losses, run_correctness  # noqa: E402
from tbrm_verl.tools.gpu_check.measure import run_overhead, run_update_memory  # noqa: E402

__all__ = ["prepare_imports", "run_correctness", "run_overhead", "run_update_memory", "run_all", "main",
           "reference_losses", "failed_checks", "VARIANTS", "TOLERANCES"]
