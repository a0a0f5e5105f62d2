"""bench/plot_accuracy.py: reports joined with a router figure routed from saved scores."""
from __future__ import annotations

import json

import pytest

from support import bench_module


def _bench():
    return bench_module.load("plot_accuracy")


def test_the_plot_takes_the_router_from_the_report_line_of_its_zoo_and_weight(tmp_path, capsys):
    bench = _bench()
    base = {"n": 4, "random": 0.25, "best_single": {"model": "a", "accuracy": 0.5}, "oracle": 0.75,
            "baselines": {"knn": 0.4}, "router": None, "router_name": "none"}
    (tmp_path / "base.json").write_text(json.dumps(base))
    lines = [{"zoo": "small", "weight": 0.0, "n": 4, "router": 0.5}, {"zoo": "small", "weight": 6.35, "n": 4, "router": 0.7},
             {"zoo": "mixed", "weight": 6.35, "n": 3, "router": 0.1}]
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = bench.load_report(f"{tmp_path}/base.json+{tmp_path}/scores.jsonl:small:6.35")
    assert got["router"] == 0.7 and got["router_name"] == "model-sat" and got["baselines"] == {"knn": 0.4}
    assert bench.load_report(f"{tmp_path}/base.json") == base
    with pytest.raises(SystemExit, match="counts 3 prompts"):  # another zoo's prompts: refused
        bench.load_report(f"{tmp_path}/base.json+{tmp_path}/scores.jsonl:mixed:6.35")
    with pytest.raises(SystemExit, match="0 lines"):
        bench.load_report(f"{tmp_path}/base.json+{tmp_path}/scores.jsonl:small:2")

    out = tmp_path / "plot.png"
    assert bench.main([str(out), f"zoo={tmp_path}/base.json+{tmp_path}/scores.jsonl:small:6.35"]) == 0
    assert out.stat().st_size > 0
    table = capsys.readouterr().out
    assert "router (model-sat)" in table and "| zoo | 0.250 | 0.500 | 0.400 | 0.700 | 0.750 |" in table
