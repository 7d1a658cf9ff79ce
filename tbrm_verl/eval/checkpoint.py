"""Turn ``--model`` into what a generation backend loads: a Hugging Face model directory or a hub id.

Accepted: a HF model directory (``config.json`` plus weights) or a hub id; a verl actor checkpoint
``.../global_step_N/actor``, whose ``huggingface/`` subdirectory is used when it holds full weights (verl writes them
only with ``actor.checkpoint.save_contents`` including ``hf_model``), else its FSDP shards are merged once with
``python -m verl.model_merger merge --backend fsdp`` into ``--merged-dir`` (default
``.../global_step_N/actor/merged_hf``); ``.../global_step_N`` (its ``actor/``); a checkpoint or run directory holding
``latest_checkpointed_iteration.txt`` (directly or under ``checkpoints/``): the latest step's actor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tbrm_verl.eval import EvalError, log

MERGED_MARKER = ".tbrm_merged"


def _has_weights(d: Path) -> bool:
    return d.is_dir() and (any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin"))
                           or (d / "model.safetensors.index.json").exists())


def _is_hf_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and _has_weights(d)


def _is_actor_ckpt(d: Path) -> bool:
    return d.is_dir() and any(d.glob("model_world_size_*_rank_0.pt"))


def _latest_step_dir(d: Path) -> Path | None:
    for base in (d, d / "checkpoints"):
        f = base / "latest_checkpointed_iteration.txt"
        if f.is_file():
            step = f.read_text().strip()
            if not step.isdigit():
                raise EvalError(f"{f}: expected a step number, found {step!r}")
            return base / f"global_step_{step}"
    return None


@dataclass
class ResolvedModel:
    path: str                      # what the backend loads
    source: str                    # what the user gave
    kind: str                      # hf_dir | hub_id | checkpoint_hf | checkpoint_merged
    checkpoint: str | None = None  # the actor checkpoint directory, if any
    merged_now: bool = False


def resolve_model(model: str, merged_dir: str | None = None, merge: bool = True) -> ResolvedModel:
    """Turn --model into a directory (or hub id) a backend can load; merges FSDP shards when needed."""
    p = Path(model).expanduser()
    if not p.exists():
        if model.startswith(("/", ".", "~")) or model.count("/") > 1:
            raise EvalError(f"--model {model}: no such directory")
        return ResolvedModel(model, model, "hub_id")
    if _is_hf_dir(p):
        return ResolvedModel(str(p.resolve()), model, "hf_dir")
    step = _latest_step_dir(p)
    if step is not None:
        if not step.is_dir():
            raise EvalError(f"{p}: latest_checkpointed_iteration.txt names {step.name}, which does not exist")
        p = step
    if (p / "actor").is_dir() and not _is_actor_ckpt(p):
        p = p / "actor"
    if not _is_actor_ckpt(p):
        raise EvalError(
            f"--model {model}: not a Hugging Face model directory (config.json + weights) nor a verl checkpoint "
            "(global_step_N/actor with model_world_size_*_rank_*.pt, or a directory with "
            "latest_checkpointed_iteration.txt)"
        )
    p = p.resolve()
    hf = p / "huggingface"
    if _is_hf_dir(hf):
        return ResolvedModel(str(hf), model, "checkpoint_hf", checkpoint=str(p))
    target = Path(merged_dir).expanduser().resolve() if merged_dir else p / "merged_hf"
    if (target / MERGED_MARKER).is_file() and _is_hf_dir(target):
        return ResolvedModel(str(target), model, "checkpoint_merged", checkpoint=str(p))
    if not merge:
        raise EvalError(f"{p}: holds FSDP shards only; merge them first (drop --no-merge)")
    merge_checkpoint(p, target)
    return ResolvedModel(str(target), model, "checkpoint_merged", checkpoint=str(p), merged_now=True)


def merge_checkpoint(actor_dir: Path, target: Path) -> None:
    """``python -m verl.model_merger merge --backend fsdp --local_dir ACTOR --target_dir TARGET`` (bf16 weights)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / MERGED_MARKER).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(actor_dir),
           "--target_dir", str(target)]
    log("merging FSDP shards: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not _is_hf_dir(target):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EvalError(f"verl.model_merger failed on {actor_dir} (exit {proc.returncode}):\n{tail}")
    (target / MERGED_MARKER).write_text(json.dumps({"from": str(actor_dir), "at": time.time()}) + "\n")
    log(f"merged model written to {target}")
