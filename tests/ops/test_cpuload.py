"""The load of other processes, from /proc/stat less the proxy's own CPU time (proxy/cpuload.py)."""
from __future__ import annotations

import os

import pytest

from proxy.cpuload import CpuLoad, usable_cores

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
TICK = os.sysconf("SC_CLK_TCK")


class Clock:
    def __init__(self):
        self.now = 100.0
        self.own = 5.0


def write_stat(path, busy_s_per_cpu: float, idle_s: float = 1000.0, steal_s: float = 0.0):
    """A /proc/stat in which each of this process's cores spent ``busy_s_per_cpu`` seconds busy
    (user), plus a core it may not run on that is always busy."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for n in CPUS:
        ticks = [int(busy_s_per_cpu * TICK), 0, 0, int(idle_s * TICK), 7, 0, 0, int(steal_s * TICK), 0, 0]
        lines.append(f"cpu{n} " + " ".join(map(str, ticks)))
    lines.append(f"cpu{max(CPUS) + 1} {10**9} 0 0 0 0 0 0 0 0 0")  # not ours: never counted
    lines.append("intr 12345 1 2 3")
    path.write_text("\n".join(lines) + "\n")


def make(tmp_path, clock):
    stat = tmp_path / "stat"
    write_stat(stat, 10.0)
    load = CpuLoad(str(stat), own_cpu=lambda: clock.own, clock=lambda: clock.now)
    return stat, load


def test_a_core_kept_busy_by_another_process_counts_and_the_proxys_own_time_does_not(tmp_path):
    clock = Clock()
    stat, load = make(tmp_path, clock)
    assert load.busy_cores() == 0
    # one second: every core busy for a whole second, of which the proxy itself spent all but one
    clock.now += 1.0
    clock.own += len(CPUS) - 1.0
    write_stat(stat, 11.0)
    assert load.sample() == pytest.approx(1.0, abs=0.02)
    assert load.busy_cores() == 1
    # the next second: only the proxy worked
    clock.now += 1.0
    clock.own += float(len(CPUS))
    write_stat(stat, 12.0)
    assert load.sample() == pytest.approx(0.0, abs=0.02)
    assert load.busy_cores() == 0


def test_less_than_half_a_core_is_no_core_and_steal_time_is_busy(tmp_path):
    clock = Clock()
    stat, load = make(tmp_path, clock)
    clock.now += 2.0
    write_stat(stat, 10.0 + 0.4 / len(CPUS))  # 0.4 of a core-second over 2 s: 0.2 of a core
    load.sample()
    assert load.others == pytest.approx(0.2, abs=0.02) and load.busy_cores() == 0
    clock.now += 1.0
    write_stat(stat, 10.0 + 0.4 / len(CPUS), steal_s=1.2 / len(CPUS))  # the host took 1.2 core-s
    load.sample()
    assert load.busy_cores() == 1


def test_an_unreadable_stat_counts_as_no_load(tmp_path):
    clock = Clock()
    load = CpuLoad(str(tmp_path / "missing"), own_cpu=lambda: clock.own, clock=lambda: clock.now)
    clock.now += 1.0
    assert load.sample() == 0.0 and load.busy_cores() == 0
    garbled = tmp_path / "garbled"
    garbled.write_text("cpu0 a b c d\n")
    load = CpuLoad(str(garbled), own_cpu=lambda: clock.own, clock=lambda: clock.now)
    clock.now += 1.0
    assert load.sample() == 0.0


def test_the_real_proc_stat_sees_a_busy_process(tmp_path):
    """On Linux: a process spinning beside this one is counted as about a core."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here (not Linux)")
    import subprocess
    import sys
    import time

    load = CpuLoad()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the interpreter's start-up is not the spin
        load.sample()
        time.sleep(1.0)
        seen = load.sample()
    finally:
        spinner.kill()
        spinner.wait()
    assert seen >= 0.7  # the spinner's core, and whatever else ran meanwhile


def test_the_usable_cores_are_the_cpu_set_not_the_host(monkeypatch):
    """Under taskset or docker --cpuset-cpus torch got a thread for every core of the host."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 1
