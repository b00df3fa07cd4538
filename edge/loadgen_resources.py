"""What the load generator measures about processes (its own and the target's), and what it may open.

- `ProcessSampler`: CPU time (utime + stime from `/proc/PID/stat`, in clock ticks) and RSS
  (`/proc/PID/statm`) of a set of PIDs and their children (re-listed at every sample, so nginx's
  workers or a respawned child are counted), sampled by the caller; `cpu_percent` is % of ONE core
  over a window (200 % = two cores busy). No psutil: two small reads per process.
- `LoopLagMonitor`: a task sleeping 100 ms and recording how late it wakes (`Histogram` in µs). A late
  wake-up means callbacks waited: the generator itself is the bottleneck (uvloop's timers tick in whole
  milliseconds, so its lags read 0, 1, 2 ... ms). Its own CPU comes from `/proc/self/stat` the same way.
- `raise_nofile_limit()`: the soft RLIMIT_NOFILE up to the hard limit (done at start, and in every
  worker process).
- `capacity_problems()`: refuses a run that cannot be opened: every stream needs a descriptor in its
  worker process (plus a reserve), and loopback connections to one address:port are bounded by the
  ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`, about 28k here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from dataclasses import dataclass, field

from meshkit.edge.loadgen_stats import Histogram

__all__ = [
    "FD_RESERVE",
    "LoopLagMonitor",
    "ProcessSampler",
    "capacity_problems",
    "ephemeral_ports",
    "process_cpu_seconds",
    "raise_nofile_limit",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
FD_RESERVE = 64  # per process: the publisher's connections, pipes, logs, the event loop itself
LAG_INTERVAL = 0.1


def _stat_fields(pid: int | str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state is fields[0]


def process_cpu_seconds(pid: int | str = "self") -> float | None:
    """utime + stime of `pid` in seconds, None when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _children(parents: set[int]) -> set[int]:
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and len(fields) > 1 and int(fields[1]) in parents:
                out.add(int(entry))
    return out


@dataclass
class Sample:
    t: float
    cpu_seconds: float
    rss_bytes: int
    pids: int


@dataclass
class ProcessSampler:
    """CPU and RSS of `pids` and their children, one `sample()` at a time (see the module docstring)."""

    pids: tuple[int, ...]
    samples: list[Sample] = field(default_factory=list)
    _cpu_seen: dict[int, float] = field(default_factory=dict)

    def sample(self) -> Sample:
        roots = {p for p in self.pids if os.path.exists(f"/proc/{p}")}
        everyone = roots | _children(roots) if roots else set()
        rss = 0
        for pid in everyone:
            cpu = process_cpu_seconds(pid)
            if cpu is not None:
                self._cpu_seen[pid] = cpu  # the last value of a process that has exited stays counted
            rss += _rss_bytes(pid) or 0
        s = Sample(time.monotonic(), sum(self._cpu_seen.values()), rss, len(everyone))
        self.samples.append(s)
        return s

    @staticmethod
    def cpu_percent(start: Sample, end: Sample) -> float | None:
        elapsed = end.t - start.t
        if elapsed <= 0:
            return None
        return 100.0 * (end.cpu_seconds - start.cpu_seconds) / elapsed


class LoopLagMonitor:
    """Samples how late the running event loop wakes a 100 ms sleeper, and this process's CPU %."""

    def __init__(self, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.lag_us = Histogram()
        self.recent_max_us = 0  # since the last `take_recent()` (for the progress line)
        self._task: asyncio.Task[None] | None = None
        self._cpu0: float = 0.0
        self._t0: float = 0.0
        self._window_cpu: float = 0.0
        self._window_t: float = 0.0
        self.peak_cpu_percent = 0.0

    def start(self) -> None:
        self.reset()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def reset(self) -> None:
        """Forget what was measured so far (the connection burst before the measured window)."""
        self.lag_us = Histogram()
        self.recent_max_us = 0
        self.peak_cpu_percent = 0.0
        self._cpu0 = self._window_cpu = process_cpu_seconds() or 0.0
        self._t0 = self._window_t = time.monotonic()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            late = max(0.0, loop.time() - before - self.interval)
            us = int(late * 1e6)
            self.lag_us.record(us)
            self.recent_max_us = max(self.recent_max_us, us)

    def take_recent(self) -> tuple[int, float]:
        """(max lag µs, CPU %) since the previous call; the peak CPU % is kept."""
        lag, self.recent_max_us = self.recent_max_us, 0
        now, cpu = time.monotonic(), process_cpu_seconds() or 0.0
        elapsed = now - self._window_t
        percent = 100.0 * (cpu - self._window_cpu) / elapsed if elapsed > 0 else 0.0
        self._window_t, self._window_cpu = now, cpu
        self.peak_cpu_percent = max(self.peak_cpu_percent, percent)
        return lag, percent

    def cpu_percent(self) -> float:
        elapsed = time.monotonic() - self._t0
        cpu = process_cpu_seconds() or 0.0
        return 100.0 * (cpu - self._cpu0) / elapsed if elapsed > 0 else 0.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ephemeral_ports() -> int:
    """How many local ports loopback connections to one address:port can use."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_000


def capacity_problems(streams: int, processes: int, nofile: int, ports: int) -> list[str]:
    """Why `streams` over `processes` worker processes cannot be opened here (empty: they can)."""
    problems = []
    per_process = -(-streams // processes)
    if nofile != resource.RLIM_INFINITY and per_process + FD_RESERVE > nofile:
        need = -(-streams // max(1, nofile - FD_RESERVE))
        problems.append(
            f"{streams} streams over {processes} process(es) are {per_process} per process, "
            f"which need {per_process + FD_RESERVE} file descriptors; the limit is {nofile} "
            f"(RLIMIT_NOFILE hard limit): use --processes {need} or more"
        )
    if streams > ports:
        problems.append(
            f"{streams} streams to one address:port need {streams} local ports; loopback offers {ports} "
            "(net.ipv4.ip_local_port_range): fewer conversations x viewers"
        )
    return problems
