"""bench/scorer_memory.py runs the served scorer over varied instruction lengths and reports RSS."""
from __future__ import annotations

import json

import pytest

from support import bench_module


@pytest.mark.backbone
def test_it_scores_every_length_for_every_candidate_count_and_reports_rss(tmp_path, capsys):
    bench = bench_module.load("scorer_memory")
    out = tmp_path / "memory.json"
    bench.main(["--words", "3", "--candidates", "3,2", "--passes", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [(r.get("candidates"), r.get("pass")) for r in report["rows"]] == [(None, None), (3, 1), (2, 1)]
    assert all(r["peak_mb"] >= r["rss_mb"] > 100 for r in report["rows"])
    assert "2 candidates, 1..3 words, pass 1" in capsys.readouterr().out
