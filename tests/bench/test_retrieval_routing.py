"""bench/retrieval_routing.py: its template is one the router reads the question from, and its
three readings are what the figures in docs/benchmarks.md compare."""
from __future__ import annotations

import pytest

from proxy.routing import instruction_text
from support import bench_module


@pytest.mark.parametrize("shape", ["replaced", "prepended"])
def test_the_template_hides_the_question_from_its_start_and_the_router_finds_it(shape):
    """In both shapes the router reads the very string it reads without a template, and from its
    start the same template text: the figures measured with one shape hold for the other."""
    bench = bench_module.load("retrieval_routing")
    question = "Tom has 3 times as many marbles as Ann. Together they have 48. How many has Tom?"
    turn = bench.wrapped(question, shape)
    assert question not in turn[: 512 * 4]  # read from its start, the question is out of reach
    assert turn[: 512 * 4] == bench.wrapped("another question", "replaced")[: 512 * 4]
    assert instruction_text([{"role": "user", "content": turn}], 512) == question
