"""bench/grammar_check.py: it times one new schema, a known one, and a burst checked together."""
from __future__ import annotations

import pytest

from proxy.localserver import llama_cpp_available
from support import bench_module


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")
def test_the_grammar_check_bench_times_a_burst_in_few_processes(capsys):
    assert bench_module.load("grammar_check").main(["--burst", "4", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 new at once" in out and "checking processes" in out
    processes = int(out.split(" checking processes")[0].rsplit(" ", 1)[1])
    assert 1 <= processes <= 2  # the burst shares processes, not one each
