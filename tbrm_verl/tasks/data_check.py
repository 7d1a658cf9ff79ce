"""Pre-flight check of verl-format RL parquet files, run by tbrm_verl.main before Ray starts.

verl reads the data inside Ray actors, where a bad row surfaces minutes later as a deep traceback (or, for an
overlong prompt with `data.truncation=error`, mid-training). Each problem here is one line naming the file, the row
and the fix.
"""

from __future__ import annotations

import math

from tbrm_verl.config import ConfigError, as_list, is_local_path

REQUIRED = ("prompt", "reward_model")


def _rows(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ConfigError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}); regenerate it") from exc
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"{path}: missing column(s) {missing}; verl's RL format needs prompt (chat messages) and "
            "reward_model.ground_truth (python -m tbrm_verl.data writes it)"
        )
    return table.to_pylist()


def check_parquet(path: str, tokenizer=None, max_prompt_length: int | None = None, key: str = "data.train_files"):
    """Raise ConfigError on the first malformed row; also on prompts longer than max_prompt_length tokens."""
    rows = _rows(path)
    if not rows:
        raise ConfigError(f"{key}: {path} has no rows")
    too_long = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            raise ConfigError(f"{key}: {path} row {i}: prompt must be a non-empty list of chat messages")
        for m in prompt:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role"):
                raise ConfigError(f"{key}: {path} row {i}: each prompt message needs a role and string content")
        if not any(m["content"].strip() for m in prompt):
            raise ConfigError(f"{key}: {path} row {i}: empty prompt; fix or drop the row")
        rm = row.get("reward_model")
        gt = rm.get("ground_truth") if isinstance(rm, dict) else None
        if gt is None or (isinstance(gt, float) and math.isnan(gt)) or (isinstance(gt, str) and not gt.strip()):
            raise ConfigError(f"{key}: {path} row {i}: reward_model.ground_truth is missing or empty")
        if tokenizer is not None and max_prompt_length:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if len(ids) > max_prompt_length:
                too_long.append((i, len(ids)))
    if too_long:
        i, n = too_long[0]
        raise ConfigError(
            f"{key}: {path}: {len(too_long)} prompt(s) longer than data.max_prompt_length={max_prompt_length} "
            f"(first: row {i}, {n} tokens); raise data.max_prompt_length or set data.filter_overlong_prompts=true"
        )
    return len(rows)


def check_data(cfg) -> None:
    """Check every local train/val file of a finished config (paths resolved)."""
    from omegaconf import OmegaConf

    tokenizer = None
    if not cfg.data.get("filter_overlong_prompts", False):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path, trust_remote_code=False)
        except Exception:  # noqa: BLE001
            tokenizer = None  # a hub id not cached locally: verl will load it later; skip the length check
    for key in ("data.train_files", "data.val_files"):
        for path in as_list(OmegaConf.select(cfg, key)):
            if is_local_path(path):
                check_parquet(path.removeprefix("file://"), tokenizer, cfg.data.max_prompt_length, key)
