"""The load of other processes, from /proc/stat less the proxy's own CPU time (proxy/cpuload.py)."""
from __future__ import annotations

import os

import pytest

from proxy.cpuload import CpuLoad, busy_within_quota, cpu_quota, usable_cores

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


def _cgroup(tmp_path, own: str, files: dict[str, str]) -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self").write_text(own)
    return str(root), str(tmp_path / "self")


@pytest.mark.parametrize("own, files, quota", [
    # a container (its cgroup namespace: its own cgroup is the root), docker --cpus=1.5, v2
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # a host process in a Kubernetes pod's cgroup, with a tighter limit on a level above, v2
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "400000 100000", "kubepods/pod1/cpu.max": "200000 100000",
                                "kubepods/cpu.max": "max 100000"}, 2.0),
    # hybrid: v2 under unified/, v1's cpu controller mounted with cpuacct
    ("2:cpu,cpuacct:/docker/abc\n0::/\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
                                           "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 0.5),
    # v1 without a quota (-1), and the container's own mount where its path is not found
    ("1:cpu:/docker/abc\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("1:cpu:/docker/abc\n", {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
    ("0::/\n", {"cpu.max": "garbage"}, None),
    ("", {}, None),
])
def test_the_cpu_quota_is_read_from_the_process_s_cgroup(tmp_path, own, files, quota):
    assert cpu_quota(*_cgroup(tmp_path, own, files)) == quota


def test_the_usable_cores_are_the_quota_s_not_the_cpu_set_s(tmp_path, monkeypatch):
    """Under docker --cpus=1 or a Kubernetes CPU limit on a 16-core node, torch got 16 threads, and
    a local model 8: the quota stops them all once its time is spent, and scoring calls passed the
    scorer's timeout."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    root, own = _cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    assert usable_cores(root, own) == 1
    root, own = _cgroup(tmp_path, "0::/\n", {"cpu.max": "450000 100000"})
    assert usable_cores(root, own) == 4  # whole cores: a fifth thread would be stopped each period
    root, own = _cgroup(tmp_path, "0::/\n", {"cpu.max": "3200000 100000"})
    assert usable_cores(root, own) == 16  # a quota above the CPU set leaves the set


def test_other_processes_take_from_the_scorer_only_what_the_quota_leaves(monkeypatch):
    import proxy.cpuload as cpuload

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpuload, "usable_cores", lambda: 4)
    assert busy_within_quota(10) == 0  # 6 cores left free beside ours: the 4 are whole
    assert busy_within_quota(14) == 2
    monkeypatch.setattr(cpuload, "usable_cores", lambda: 16)
    assert busy_within_quota(3) == 3  # no quota: every busy core is one less
