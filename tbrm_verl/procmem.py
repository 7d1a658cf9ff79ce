"""Peak memory of a process tree (a run's driver plus everything it started: Ray's GCS, raylet, workers, servers).

`PeakTreeRSS` / `run_measured`: the summed RSS of the whole tree. `ProcessTreeSampler`: the same samples kept per
process (first sample, a baseline chosen by the process title, peak, titles seen), for per-worker accounting.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

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


# ------------------------------------------------------------------------------------------- per-process accounting


@dataclass
class ProcStats:
    """What a sampler saw of one process. RSS in bytes, times in seconds since the sampler started.

    `baseline_*` is the first sample at which the sampler's `baseline_when(title, name)` held (for a Ray actor: its
    title names its class, i.e. Ray has imported the class and its modules, before `__init__` has built anything
    large); `peak_rss` is the largest sample from the baseline on (from the first sample when there is none)."""

    pid: int
    first_rss: int
    first_title: str
    first_t: float
    title: str = ""
    name: str = ""
    baseline_rss: int | None = None
    baseline_title: str | None = None
    baseline_t: float | None = None
    peak_rss: int = 0
    peak_title: str = ""
    peak_t: float = 0.0
    last_rss: int = 0
    last_t: float = 0.0
    n_samples: int = 0
    titles: list[str] = field(default_factory=list)  # distinct titles, in the order first seen

    @property
    def above_baseline(self) -> int:
        """Peak RSS above the baseline (above the first sample when no baseline was seen)."""
        base = self.baseline_rss if self.baseline_rss is not None else self.first_rss
        return max(0, self.peak_rss - base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["above_baseline"] = self.above_baseline
        return d


def _title_and_name(p: psutil.Process) -> tuple[str, str]:
    """The process title as `ps` shows it (Ray rewrites argv: `ray::WorkerDict.update_actor`) and its comm name."""
    try:
        cmd = " ".join(p.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        cmd = ""
    try:
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        name = ""
    return cmd or name, name


class ProcessTreeSampler:
    """Samples every process of the tree under `pid` every `interval_s` (a background thread): per-process RSS
    (first sample, baseline, peak, titles seen) and the summed tree RSS peak (what PeakTreeRSS measures).

    `baseline_when(title, name) -> bool` marks the sample that is a process's baseline (the first one for which it
    holds). Processes that never satisfy it keep `baseline_rss=None`."""

    def __init__(self, pid: int, interval_s: float = 0.2, baseline_when=None):
        self.pid, self.interval_s = pid, interval_s
        self.baseline_when = baseline_when or (lambda title, name: False)
        self.procs: dict[tuple[int, float], ProcStats] = {}  # (pid, create_time): pids can be reused
        self.tree_peak = 0
        self._t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        t = time.time() - self._t0
        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                key = (p.pid, p.create_time())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            title, name = _title_and_name(p)
            total += rss
            s = self.procs.get(key)
            if s is None:
                s = self.procs[key] = ProcStats(pid=p.pid, first_rss=rss, first_title=title, first_t=t)
            s.title, s.name, s.last_rss, s.last_t = title, name, rss, t
            s.n_samples += 1
            if title not in s.titles:
                s.titles.append(title)
            if s.baseline_rss is None and self.baseline_when(title, name):
                s.baseline_rss, s.baseline_title, s.baseline_t = rss, title, t
                s.peak_rss, s.peak_title, s.peak_t = rss, title, t  # the peak counts from the baseline on
            elif rss > s.peak_rss:
                s.peak_rss, s.peak_title, s.peak_t = rss, title, t
        self.tree_peak = max(self.tree_peak, total)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def stats(self) -> list[ProcStats]:
        return sorted(self.procs.values(), key=lambda s: (s.first_t, s.pid))
