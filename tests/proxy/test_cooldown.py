"""Cooldowns: when a model starts cooling, and what a failure during a cooldown does."""
from __future__ import annotations

from proxy.cooldown import Cooldowns


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_while_cooling_keeps_the_model_out_but_is_not_a_new_cooldown():
    clock = Clock()
    c = Cooldowns(clock)
    assert [c.failure("m", 3, 30) for _ in range(3)] == [False, False, True]
    # attempts that were in flight, and requests naming the model, fail during the cooldown
    clock.now += 20
    assert c.failure("m", 3, 30) is False and c.failure("m", 3, 30) is False
    clock.now += 25  # past the first cooldown's end: the later failure extended it
    assert c.cooling("m")
    clock.now += 10
    assert not c.cooling("m")
    # half-open: one more failure after the cooldown ended is a new cooldown
    assert c.failure("m", 3, 30) is True


def test_a_success_clears_the_count_and_the_cooldown():
    c = Cooldowns(Clock())
    assert c.failure("m", 2, 30) is False
    c.success("m")
    assert c.failure("m", 2, 30) is False
    assert c.failure("m", 2, 30) is True and c.cooling_models() == ["m"]
    c.success("m")
    assert c.cooling_models() == []


def test_failures_of_calls_made_before_the_model_s_upstream_changed_do_not_count():
    """An edit that fixed the model's api_base lands while requests to the old one are in flight:
    their failures must not cool the model now reached another way."""
    c = Cooldowns(Clock())
    before = c.epoch("m")
    assert c.failure("m", 2, 30, before) is False
    c.forget("m")  # the edit
    after = c.epoch("m")
    assert [c.failure("m", 2, 30, before) for _ in range(3)] == [False] * 3
    assert not c.cooling("m")
    c.success("m", before)  # nor does an old call's success clear the new upstream's record
    assert c.failure("m", 2, 30, after) is False and c.failure("m", 2, 30, after) is True
