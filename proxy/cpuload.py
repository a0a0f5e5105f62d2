"""How many of the proxy's cores other processes keep busy: the scorer's torch threads are sized by it.

A scoring call on as many torch threads as there are cores, beside another process that keeps one
of them busy (an inference server on the same host, a build), waits at every parallel step for the
thread that is not running: on the 2-core machine the median call took 532 ms on 2 threads against
229 ms on 1, and a third of the calls passed the 2 s scorer timeout, so those requests were ranked
by aptitude alone. The load of other processes is read from ``/proc/stat`` (the cores this process
may run on), less this process's own CPU time; where that cannot be read it counts as none.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable


def cpu_set_size() -> int:
    """The cores this process may run on (its CPU set: taskset, docker --cpuset-cpus), not the
    host's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def usable_cores(cgroup_root: str = "/sys/fs/cgroup", own_cgroup: str = "/proc/self/cgroup") -> int:
    """The cores' worth of CPU time this process may use: its CPU set, or fewer where its cgroup's
    CPU quota allows less (``docker --cpus``, Kubernetes' ``resources.limits.cpu``), in whole
    cores, at least one. torch threads beyond either wait on one another: under a quota of one CPU
    on this 2-core machine, scoring calls on 2 threads took 1.7 s at the median against 0.2-0.5 s on
    1 (the quota stops every thread once the period's time is spent), past the scorer timeout."""
    cores = cpu_set_size()
    quota = cpu_quota(cgroup_root, own_cgroup)
    return cores if quota is None else max(1, min(cores, math.floor(quota)))


def busy_within_quota(others_busy: int) -> int:
    """Of the cores other processes keep busy on this process's CPU set, those that come out of
    what its quota leaves it: under a quota of 4 cores on 16, other processes may keep 12 busy and
    leave the 4 whole. Without a quota, all of them."""
    return max(0, others_busy - (cpu_set_size() - usable_cores()))


def cpu_quota(cgroup_root: str = "/sys/fs/cgroup", own_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPUs' worth of time per period that this process's cgroup, or one above it, allows
    (cgroup v2's ``cpu.max``, v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), the least of
    them; None where none is set or none can be read. A container sees its own cgroup as the root
    (``0::/``), a host process its path under the root: both are read, the path walked upwards."""
    try:
        with open(own_cgroup, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2 (under unified/ in the hybrid layout)
            for base in (cgroup_root, os.path.join(cgroup_root, "unified")):
                for folder in _upwards(base, path):
                    limits.extend(_v2_limit(folder))
        elif "cpu" in controllers.split(","):  # v1: mounted by its controllers' names, or cpu/
            for base in {os.path.join(cgroup_root, controllers), os.path.join(cgroup_root, "cpu")}:
                for folder in _upwards(base, path):
                    limits.extend(_v1_limit(folder))
    return min(limits) if limits else None


def _upwards(base: str, path: str) -> list[str]:
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [os.path.join(base, *parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_limit(folder: str) -> list[float]:
    said = _read(os.path.join(folder, "cpu.max"))  # "max 100000", or "<quota> <period>"
    fields = said.split() if said else []
    try:
        quota, period = (float(fields[0]), float(fields[1])) if len(fields) == 2 and fields[0] != "max" else (0, 0)
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def _v1_limit(folder: str) -> list[float]:
    quota, period = _read(os.path.join(folder, "cpu.cfs_quota_us")), _read(os.path.join(folder, "cpu.cfs_period_us"))
    try:
        q, p = float(quota or "-1"), float(period or "0")
    except ValueError:
        return []
    return [q / p] if q > 0 and p > 0 else []  # -1: no quota


class CpuLoad:
    def __init__(self, stat_path: str = "/proc/stat",
                 own_cpu: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic):
        self._path = stat_path
        self._own_cpu = own_cpu
        self._clock = clock
        self._cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        try:
            self._tick = float(os.sysconf("SC_CLK_TCK"))
        except (AttributeError, ValueError, OSError):
            self._tick = 100.0
        self.others = 0.0  # cores kept busy by other processes over the last interval
        self._last = self._read()

    def _busy_s(self) -> float | None:
        """CPU seconds spent, by anything, on this process's cores since boot; None if unknown."""
        try:
            with open(self._path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        busy = 0
        seen = False
        for line in lines:
            name, _, rest = line.partition(" ")
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            if self._cpus is not None and int(name[3:]) not in self._cpus:
                continue
            try:
                # user nice system idle iowait irq softirq steal: all but idle and iowait is busy
                # (steal too: a virtual machine's host ran something else on that core)
                ticks = [int(v) for v in rest.split()[:8]]
            except ValueError:
                return None
            if len(ticks) < 4:
                return None
            busy += sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
            seen = True
        return busy / self._tick if seen else None

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._busy_s()
        return None if busy is None else (self._clock(), busy, self._own_cpu())

    def sample(self) -> float:
        """Update ``others`` from what was spent since the last sample, and return it."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            self.others = 0.0 if now is None else self.others
            return self.others
        spent = (now[1] - last[1]) - (now[2] - last[2])
        self.others = max(0.0, spent / (now[0] - last[0]))
        return self.others

    def busy_cores(self) -> int:
        """Whole cores other processes took over the last interval (half a core or more counts)."""
        return math.floor(self.others + 0.5)

    async def watch(self, interval_s: float = 1.0) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.sample()
