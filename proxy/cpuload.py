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


def usable_cores() -> int:
    """The cores this process may run on (its CPU set: taskset, docker --cpuset-cpus), not the
    host's: torch threads beyond them wait on one another."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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
