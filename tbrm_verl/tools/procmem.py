"""Peak memory of a process tree (a run's driver plus everything it started: Ray's GCS, raylet, workers, servers).

`PeakTreeRSS` / `run_measured`: the summed RSS of the whole tree. `ProcessTreeSampler`: the same samples kept per
process (first sample, peak, titles seen, an RSS series to choose a baseline from by title), for per-worker
accounting. `run_sampled`: run a command under one of them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import psutil


def _tree(pid: int) -> list[psutil.Process]:
    """`pid` and its descendants; empty if `pid` is gone."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeriodicSampler:
    """Calls `self.sample()` every `interval_s` seconds in a background thread while used as a context manager."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

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


class PeakTreeRSS(PeriodicSampler):
    """Samples the summed RSS of `pid` and its descendants every `interval_s` in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        super().__init__(interval_s)
        self.pid, self.peak = pid, 0

    def sample(self) -> None:
        self.peak = max(self.peak, tree_rss_bytes(self.pid))


def run_sampled(cmd: list[str], sampler, **popen_kwargs) -> tuple[int, float, PeriodicSampler]:
    """Run a command while `sampler(pid)` (a PeriodicSampler) watches it; return (exit code, wall seconds, sampler)."""
    import subprocess

    start = time.time()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    with sampler(proc.pid) as watched:
        rc = proc.wait()
    return rc, time.time() - start, watched


def run_measured(cmd: list[str], **popen_kwargs) -> tuple[int, float, float]:
    """Run a command; return (exit code, wall seconds, peak summed RSS in GB of its process tree)."""
    rc, wall, mem = run_sampled(cmd, PeakTreeRSS, **popen_kwargs)
    return rc, wall, mem.peak / 1e9


# ------------------------------------------------------------------------------------------- per-process accounting

SERIES_STEP = 2**20  # a process's RSS series keeps a sample when its title changes or its RSS moved >= 1 MiB


@dataclass
class ProcStats:
    """What a sampler saw of one process. RSS in bytes, times in seconds since the sampler started.

    `series` holds [t, rss, title index, name index] samples (into `titles` / `names`): every title or name change
    and every RSS move of SERIES_STEP or more, so any sample left out is within SERIES_STEP of the one kept before
    it. `peak_rss` is the largest RSS of all samples."""

    pid: int
    first_rss: int
    first_title: str
    first_t: float
    title: str = ""
    name: str = ""
    peak_rss: int = 0
    peak_title: str = ""
    peak_t: float = 0.0
    last_rss: int = 0
    last_t: float = 0.0
    n_samples: int = 0
    titles: list[str] = field(default_factory=list)  # distinct titles, in the order first seen
    names: list[str] = field(default_factory=list)
    series: list[list] = field(default_factory=list)

    def add(self, t: float, rss: int, title: str, name: str) -> None:
        self.n_samples += 1
        if title not in self.titles:
            self.titles.append(title)
        if name not in self.names:
            self.names.append(name)
        ti, ni = self.titles.index(title), self.names.index(name)
        last = self.series[-1] if self.series else None
        if last is None or (last[2], last[3]) != (ti, ni) or abs(rss - last[1]) >= SERIES_STEP:
            self.series.append([t, rss, ti, ni])
        self.title, self.name, self.last_rss, self.last_t = title, name, rss, t
        if rss > self.peak_rss:
            self.peak_rss, self.peak_title, self.peak_t = rss, title, t

    def samples(self):
        """The kept samples as (t, rss, title, name)."""
        return [(t, rss, self.titles[ti], self.names[ni]) for t, rss, ti, ni in self.series]

    def first_where(self, pred):
        """The first kept sample (t, rss, title, name) with pred(title, name); None if there is none."""
        return next((x for x in self.samples() if pred(x[2], x[3])), None)

    def last_before(self, pred):
        """The last kept sample before the first one with pred(title, name); None if there is none before it (or
        pred never holds)."""
        prev = None
        for x in self.samples():
            if pred(x[2], x[3]):
                return prev
            prev = x
        return None

    def to_dict(self) -> dict:
        return asdict(self)


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


class ProcessTreeSampler(PeriodicSampler):
    """Samples every process of the tree under `pid` every `interval_s` (a background thread): per-process RSS
    (ProcStats: first sample, peak, titles seen, a series to pick a baseline from) and the summed tree RSS peak
    (what PeakTreeRSS measures)."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(interval_s)
        self.pid = pid
        self.procs: dict[tuple[int, float], ProcStats] = {}  # (pid, create_time): pids can be reused
        self.tree_peak = 0
        self._t0 = time.time()

    def sample(self) -> None:
        t = time.time() - self._t0
        total = 0
        for p in _tree(self.pid):
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
            s.add(t, rss, title, name)
        self.tree_peak = max(self.tree_peak, total)

    def stats(self) -> list[ProcStats]:
        return sorted(self.procs.values(), key=lambda s: (s.first_t, s.pid))
