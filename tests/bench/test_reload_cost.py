"""bench/reload_cost.py: it builds a valid providers.yaml of N models and times real reloads."""
from __future__ import annotations

from support import bench_module


def test_the_reload_bench_times_unchanged_ticks_and_real_reloads(capsys):
    bench = bench_module.load("reload_cost")
    result = bench.measure(3, edits=2)
    assert result["models"] == 3 and result["unchanged_ms"] >= 0 and result["reload_ms"] > 0
    assert bench.main(["--models", "2", "--edits", "1"]) == 0
    assert "2 models: unchanged tick" in capsys.readouterr().out
