"""Routing policy: the scored instruction, candidate selection, ranking."""
from __future__ import annotations

import math

import pytest

from proxy.errors import RequestError, ServiceUnavailable
from proxy.providers import parse
from proxy.routing import approx_tokens, candidates, instruction_text, rank


def test_last_user_turn_plus_context_that_fits():
    msgs = [{"role": "system", "content": "SYSTEM PROMPT"},
            {"role": "user", "content": "first question " * 10},
            {"role": "assistant", "content": "first answer"},
            {"role": "tool", "tool_call_id": "t", "content": "TOOL OUTPUT"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]},
            {"role": "user", "content": [{"type": "text", "text": "now this"},
                                         {"type": "image_url", "image_url": {"url": "u"}},
                                         {"type": "text", "text": "and that"}]}]
    text = instruction_text(msgs, budget_tokens=512)
    assert text.endswith("now this\nand that")
    assert "first answer" in text and "first question" in text
    assert "SYSTEM" not in text and "TOOL OUTPUT" not in text
    small = instruction_text(msgs, budget_tokens=approx_tokens("now this\nand that") + 5)
    assert small == "first answer\n\nnow this\nand that"


def test_long_last_turn_is_cut_to_budget_and_no_user_falls_back():
    assert len(instruction_text([{"role": "user", "content": "x" * 10000}], 100)) == 400
    assert instruction_text([{"role": "system", "content": "only system"}], 100) == "only system"
    assert instruction_text([{"role": "assistant", "content": None}], 100) == ""


def test_rank_orders_by_score_with_stable_ties_and_bad_scores_last():
    assert rank({"a": 0.1, "b": 0.9, "c": 0.1}, ["a", "b", "c"]) == (
        ("b", 0.9), ("a", 0.1), ("c", 0.1))
    ranked = rank({"a": math.nan, "b": 0.0}, ["a", "b", "c"])
    assert [n for n, _ in ranked] == ["b", "a", "c"]


CONF = """
model_list:
  - {model_name: a, litellm_params: {model: openai/a}}
  - {model_name: b, litellm_params: {model: openai/b}}
  - {model_name: c, litellm_params: {model: openai/c}}
"""


def models(profiled=("a", "b", "c")):
    lookup = {n: {"t": 0.5} for n in profiled}.get
    return list(parse(CONF, __import__("pathlib").Path("p.yaml"), {}, lookup).models.values())


def test_candidates_respect_profiles_allow_list_and_cooldown():
    names = lambda ds: [d.name for d in ds]  # noqa: E731
    assert names(candidates(models(("a", "c")), None, lambda n: False)) == ["a", "c"]
    assert names(candidates(models(), ["c", "b"], lambda n: False)) == ["b", "c"]
    assert names(candidates(models(), None, lambda n: n == "a")) == ["b", "c"]
    # everything cooling: better to try than to refuse
    assert names(candidates(models(), None, lambda n: True)) == ["a", "b", "c"]
    with pytest.raises(RequestError):
        candidates(models(("a",)), ["b"], lambda n: False)
    with pytest.raises(ServiceUnavailable):
        candidates(models(()), None, lambda n: False)
