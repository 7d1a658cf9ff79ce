"""An asset cache directory (a model and train/val parquet files) and building it once, safely against concurrent
and interrupted builds: the build happens in a temporary directory next to the cache dir, under an fcntl lock, and is
renamed into place with a ``DONE`` marker written last, so a half-built cache is never taken as complete.

Used by tbrm_verl.tasks.embedded (the embedded task) and tbrm_verl.tools.work_assets (the work-setting bench).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import Callable

__all__ = ["asset_paths", "build_once", "file_lock", "is_built"]


def asset_paths(cache_dir: str) -> dict[str, str]:
    """{"model_path": HF model dir, "train_file": parquet, "val_file": parquet, "cache_dir": the cache dir}."""
    return {
        "model_path": os.path.join(cache_dir, "model"),
        "train_file": os.path.join(cache_dir, "data", "train.parquet"),
        "val_file": os.path.join(cache_dir, "data", "val.parquet"),
        "cache_dir": cache_dir,
    }


def is_built(cache_dir: str) -> bool:
    """The build finished (``DONE`` written last) and model and data are there."""
    if not os.path.isfile(os.path.join(cache_dir, "DONE")):
        return False
    p = asset_paths(cache_dir)
    return all(os.path.exists(p[k]) for k in ("model_path", "train_file", "val_file"))


@contextlib.contextmanager
def file_lock(path: str):
    """Hold an exclusive fcntl lock on the file ``path`` (created if absent)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build_once(cache_dir: str, is_complete: Callable[[str], bool], build: Callable[[str], dict], force: bool = False
               ) -> dict | None:
    """Build the cache directory ``cache_dir`` once, safely against concurrent builders; the meta ``build`` returned,
    or None when ``is_complete(cache_dir)`` already (``force=True`` rebuilds regardless).

    Under a lock file beside it, ``build(tmp)`` fills a fresh temp dir, a ``DONE`` marker (``meta["recipe"]`` and the
    time) is written last and the dir is renamed into place (an old or half-built one moved aside first); leftovers
    of dead builds are removed."""
    if not force and is_complete(cache_dir):
        return None
    parent, name = os.path.split(cache_dir)
    os.makedirs(parent, exist_ok=True)
    with file_lock(os.path.join(parent, f".{name}.lock")):
        if not force and is_complete(cache_dir):  # another process built it while we waited
            return None
        # Whoever holds the lock is the only builder, so any leftover temp dir is from a dead build.
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            meta = build(tmp)
            with open(os.path.join(tmp, "DONE"), "w") as f:  # written last
                f.write(json.dumps({"recipe": meta["recipe"], "built_at": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.lexists(cache_dir):  # a forced rebuild, or a half-built dir without DONE
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.rename(cache_dir, os.path.join(old, "x"))
            os.rename(tmp, cache_dir)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta
