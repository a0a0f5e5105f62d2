"""bench/batch_requests.py: its stacked pass must compute what one-at-a-time scoring computes."""
from __future__ import annotations

import pytest

from support import bench_module
from support import tiny_modelsat as tiny

TEXTS = ["what is algebra ?", "law court war .", "biology cells 4 ?"]  # equal token counts


@pytest.mark.parametrize("overrides", [{}, {"instruction_vector_tokens": 16, "aptitude_weight": 2.5}])
def test_the_stacked_pass_scores_each_request_as_its_own_call_does(overrides):
    bench = bench_module.load("batch_requests")
    scorer = tiny.scorer(**overrides)
    stacked, ms = bench.stacked_scores(scorer, TEXTS, tiny.PROFILES)
    assert set(ms) == {"psi", "prefix", "suffixes", "total"}
    for text, got in zip(TEXTS, stacked):
        want = scorer.score(text, tiny.PROFILES)
        assert got == pytest.approx(want, abs=1e-5)
    # the requests differ, so a pass that mixed up their caches would not match every one
    assert stacked[0] != pytest.approx(stacked[1], abs=1e-5)


def test_the_stacked_pass_refuses_instructions_of_different_lengths():
    bench = bench_module.load("batch_requests")
    with pytest.raises(SystemExit, match="different token counts"):
        bench.stacked_scores(tiny.scorer(), ["algebra", "law court war"], tiny.PROFILES)
