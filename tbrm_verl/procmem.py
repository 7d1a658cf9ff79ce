"""Peak memory of a process tree (a run's driver plus everything it started: Ray's GCS, raylet, workers, servers)."""

from __future__ import annotations

import threading
import time

import psutil


def tree_rss_bytes(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakTreeRSS:
    """Samples the summed RSS of `pid` and its descendants every `interval_s` in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], **popen_kwargs) -> tuple[int, float, float]:
    """Run a command; return (exit code, wall seconds, peak summed RSS in GB of its process tree)."""
    import subprocess

    start = time.time()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    with PeakTreeRSS(proc.pid) as mem:
        rc = proc.wait()
    return rc, time.time() - start, mem.peak / 1e9
