"""The command line of the GPU check: run the checks, write the JSON (verdict first), print the summary.
`python -m tbrm_verl.gpu_check` (tbrm_verl/gpu_check.py) calls `main`; `main(["bundle", ...])` makes the offline
bundle (tbrm_verl/tools/gpu_bundle.py)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import torch

from tbrm_verl.tools import gpu_check
from tbrm_verl.tools.bare_imports import prepare_imports
from tbrm_verl.tools.gpu_check.correctness import run_correctness
from tbrm_verl.tools.gpu_check.harness import engine_path
from tbrm_verl.tools.gpu_check.measure import BENCH_CPU, BENCH_GPU, OVERHEAD_TARGET, run_overhead, run_update_memory


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib import metadata

    for pkg in ("transformers", "tensordict", "verl", "triton", "flash-attn"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _bundle_record():
    """What run.sh installed from the bundle and what it reused from the machine (None when not run by run.sh)."""
    path = os.environ.get("TBRM_GPU_CHECK_BUNDLE")
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def failed_checks(res: dict) -> list[str]:
    """Dotted names of the correctness checks that failed (the overhead *time* target is reported, not a check)."""
    bad = [f"correctness.{dt}.{name}.{k}" for dt, c in res["correctness"].items()
           for name, r in c["variants"].items() for k, ok in r["checks"].items() if not ok]
    o = res.get("overhead")
    if o is not None and not o["no_float32_tokens_x_vocab_copy"]:
        bad.append("overhead.no_float32_tokens_x_vocab_copy")
    m = res.get("update_memory")
    if m is not None and not m["target_met"]:
        bad.append("update_memory.lean_peak_within_2pct_of_plain")
    return bad


def run_all(device="auto", dtypes=("fp32", "bf16"), overhead=True, bench_spec=None) -> dict:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    env = prepare_imports()
    cls = env["engine_class"]
    # verdict first: the JSON is read by a person
    out = {
        "passed": None, "failed_checks": None, "notes": [], "wall_time_s": None,
        "device": _device_name(dev), "device_type": dev.type, "ran_on_gpu": dev.type == "cuda",
        "cuda": torch.version.cuda, "versions": _versions(),
        "engine_path": engine_path(cls),
        "engine_source": inspect.getsourcefile(cls),
        "imports": {k: v for k, v in env.items() if k != "engine_class"}, "bundle": _bundle_record(),
        "correctness": {}, "overhead": None, "update_memory": None,
    }
    for dt in dtypes:
        out["correctness"][dt] = run_correctness(dev, dt)
    if overhead:
        out["overhead"] = run_overhead(dev, "bf16", spec=bench_spec)
        # on the CPU: `python -m tbrm_verl.bench memory` (verl's engine moves data to its device)
        if dev.type == "cuda":
            out["update_memory"] = run_update_memory(dev)
    out["failed_checks"] = failed_checks(out)
    out["passed"] = not out["failed_checks"]
    if dev.type != "cuda":
        out["notes"].append("ran on the CPU with small shapes: run on a GPU for the bf16 device numerics and timing")
    if out["overhead"] is not None and not out["overhead"]["overhead_target_met"]:
        out["notes"].append(f"hook time overhead {out['overhead']['overhead_frac']:+.1%} is above the "
                            f"{OVERHEAD_TARGET:.0%} target (reported, not a pass/fail check)")
    out["wall_time_s"] = time.time() - _start_time()
    return out


def _start_time() -> float:
    """run.sh exports its start (wheel install included); otherwise, in a `python -m tbrm_verl.gpu_check` process,
    the import of this package (before torch's), or the latest `main()` call when imported by another program."""
    try:
        return float(os.environ["TBRM_GPU_CHECK_T0"])
    except (KeyError, ValueError):
        pass
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return gpu_check.IMPORT_T0 if getattr(main_spec, "name", None) == "tbrm_verl.gpu_check" else _MAIN_T0


def _summary(res: dict) -> str:
    L = [f"TBRM device check on {res['device']} (torch {res['versions']['torch']}, transformers "
         f"{res['versions']['transformers']}, verl {res['versions']['verl']}; ray {res['imports'].get('ray')}; "
         f"verl engine import: {res['imports'].get('engine_import')})", f"engine: {res['engine_path']} from "
         f"{res['engine_source']}"]
    for dt, c in res["correctness"].items():
        L.append(f"[{'PASS' if c['passed'] else 'FAIL'}] correctness {dt}: {c['engine_path']}; {c['fsdp']}; "
                 f"packed-vs-per-seq logits diff {c['packed_vs_per_sequence_max_abs_logit_diff_fp32']:.1e}")
        for name, r in c["variants"].items():
            bad = [k for k, ok in r["checks"].items() if not ok]
            L.append(f"    {'ok  ' if r['passed'] else 'FAIL'} {name:14s} V(s1) max|err| {r['v_s1']['max_abs_err']:.2e}"
                     f"  loss rel {r['loss']['rel_err']:.2e}  mean δ err {r['residual_mean']['abs_err']:.2e}  grad "
                     f"rel {r['grads']['global_rel_err']:.2e} (worst tensor {r['grads']['worst_tensor_rel_err']:.2e},"
                     f" max|err| {r['grads']['max_abs_err']:.2e}, cos {r['grads']['cosine']:.6f})  hook logits "
                     f"{','.join(r['hook_logits_dtype'])}" + (f"  failed: {bad}" if bad else ""))
    o = res.get("overhead")
    if o:
        mem = (f"peak {o['peak_alloc_gib']['plain']:.2f} -> {o['peak_alloc_gib']['tbrm']:.2f} GiB (delta "
               f"{o['peak_delta_gib']:+.3f} = {o['peak_delta_in_bf16_tokens_x_vocab']:+.2f} x bf16 [tokens,vocab])"
               if o["peak_delta_gib"] is not None else "peak memory: n/a on CPU")
        L.append(f"[{'met' if o['overhead_target_met'] else 'MISSED'}] hook overhead {o['overhead_frac'] * 100:+.2f}% "
                 f"({o['median_s']['plain'] * 1e3:.1f} -> {o['median_s']['tbrm'] * 1e3:.1f} ms, {o['tokens']} tokens, "
                 f"vocab {o['shape']['vocab_size']}, {o['logprob_kernel']}; target <= {o['overhead_target']:.0%})")
        L.append(f"[{'PASS' if o['no_float32_tokens_x_vocab_copy'] else 'FAIL'}] no float32 [tokens, vocab] copy: "
                 f"scan fp32 full-size tensors plain {o['large_tensor_scan']['plain']['float32_count']} / tbrm "
                 f"{o['large_tensor_scan']['tbrm']['float32_count']}; half-precision full-size tensors plain "
                 f"{o['large_tensor_scan']['plain']['half_count']} / tbrm "
                 f"{o['large_tensor_scan']['tbrm']['half_count']}; {mem}")
    m = res.get("update_memory")
    if m:
        gb = 2 ** 30
        L.append(f"[{'PASS' if m['target_met'] else 'FAIL'}] one actor update, {m['tokens']} tokens x vocab "
                 f"{m['vocab']} ({m['method'].split(':')[0]}): peak plain {m['plain_peak_bytes'] / gb:.2f} GiB, "
                 f"logits hook {m['hook_peak_bytes'] / gb:.2f} GiB, lean V(s_1) {m['lean_peak_bytes'] / gb:.2f} GiB "
                 f"(lean/plain {m['lean_over_plain']:.4f}, target <= 1.02)")
    L.extend(f"note: {n}" for n in res["notes"])
    L.append(f"overall: {'PASS' if res['passed'] else 'FAIL'}" + (f" (failed: {', '.join(res['failed_checks'])})"
             if res["failed_checks"] else "") + f"  ({res['wall_time_s']:.1f} s)")
    return "\n".join(L)


_MAIN_T0 = 0.0  # set by main()


def main(argv=None) -> int:
    global _MAIN_T0
    _MAIN_T0 = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bundle"]:
        from tbrm_verl.tools import gpu_bundle

        return gpu_bundle.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tbrm_verl.gpu_check", description=gpu_check.__doc__.split("\n")[0],
                                 epilog="python -m tbrm_verl.gpu_check bundle --out DIR [--python-version 3.12]: "
                                 "a folder that runs this check offline on a GPU machine without verl "
                                 "(docs/gpu_check.md)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--out", default="docs/gpu_check.json")
    ap.add_argument("--dtypes", default="fp32,bf16", help="correctness dtypes, comma-separated (fp32, bf16)")
    ap.add_argument("--no-overhead", action="store_true", help="skip check (c) and the update-memory measurement")
    ap.add_argument("--bench-seqs", type=int)
    ap.add_argument("--bench-seq-len", type=int)
    ap.add_argument("--bench-vocab", type=int)
    ap.add_argument("--bench-reps", type=int)
    a = ap.parse_args(argv)
    try:
        prepare_imports()
    except ImportError as e:
        if os.environ.get("TBRM_GPU_CHECK_BUNDLE"):  # run by the bundle's run.sh: the module is one it leaves out
            fix = "the bundle does not carry it (bundle.json: not_carried): install it on this machine"
        else:
            fix = ("install the project (pip install -e \".[gpu]\") or, on a machine without network, run the bundle: "
                   "python -m tbrm_verl.gpu_check bundle --out DIR (docs/gpu_check.md)")
        print(f"gpu_check: missing module: {e}; {fix}")
        return 2
    dev = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    spec = dict(BENCH_GPU if torch.device(dev).type == "cuda" else BENCH_CPU)
    for k, v in (("n_seqs", a.bench_seqs), ("seq_len", a.bench_seq_len), ("vocab_size", a.bench_vocab),
                 ("reps", a.bench_reps)):
        if v:
            spec[k] = v
    res = run_all(dev, tuple(x for x in a.dtypes.split(",") if x), not a.no_overhead, spec)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, default=str)
    print(_summary(res))
    if a.out:
        print(f"wrote {a.out}")
    return 0 if res["passed"] else 1

