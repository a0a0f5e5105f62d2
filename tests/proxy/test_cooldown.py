"""Cooldowns: when a model starts cooling, and what a failure during a cooldown does."""
from __future__ import annotations

import logging

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


def test_a_cooldown_lasts_the_wait_its_failure_named():
    """A 429 with Retry-After: 3600 (an hourly limit) cooled its model for cooldown_s, and the
    model was asked again every 30 s; a Retry-After: 1 kept it out for 30 s."""
    clock = Clock()
    c = Cooldowns(clock)
    assert c.failure("m", 2, 30) is False and c.failure("m", 2, 30, wait=3600) is True
    clock.now += 3599
    assert c.cooling("m")
    clock.now += 2
    assert not c.cooling("m")
    assert c.failure("m", 2, 30, wait=1) is True  # half-open: one more failure cools it again
    clock.now += 1.5
    assert not c.cooling("m")
    # a failure while it cools that names no wait, or a shorter one, does not cut its wait short
    assert c.failure("m", 2, 30, wait=600) is True
    assert c.failure("m", 2, 30) is False and c.failure("m", 2, 30, wait=5) is False
    clock.now += 599
    assert c.cooling("m")
    clock.now += 2
    assert not c.cooling("m")
    assert c.failure("m", 1, 0, wait=600) is False and not c.cooling("m")  # cooldown_s 0: none at all


def test_a_cooldown_says_how_long_it_lasts_and_why(caplog):
    """One 429 header can now take a model out of routing for everyone for an hour: the log and
    /ready (cooling_left_s) say so, where only the model's name was listed."""
    clock = Clock()
    c = Cooldowns(clock)
    c.failure("named", 1, 30, wait=3600)
    c.failure("counted", 2, 30)
    c.failure("counted", 2, 30)
    assert c.cooling_left() == {"named": 3600.0, "counted": 30.0}
    clock.now += 100
    assert c.cooling_left() == {"named": 3500.0}
    assert [r.getMessage() for r in caplog.records if r.name == "satroute.cooldown"] == [
        "model named cooling down for 3600 s (the wait its upstream named)",
        "model counted cooling down for 30 s (2 failures in a row)"]


def test_a_cooldown_stretched_or_ended_early_says_so(caplog):
    """The only line said 30 s while a 429 kept the model out for an hour, and a cooldown a
    success ended at once was still logged as lasting 30 s; a quota's cooldown said only how many
    failures."""
    caplog.set_level(logging.INFO, logger="satroute.cooldown")
    clock = Clock()
    c = Cooldowns(clock)
    c.failure("m", 1, 30, why="http_500")
    clock.now += 0.2
    c.failure("m", 1, 30, why="http_500")  # a request in flight when it began: no line
    clock.now += 5
    c.failure("m", 1, 30, why="http_429", wait=3600)
    c.failure("q", 1, 30, why="insufficient_quota")
    clock.now += 1
    c.success("q")
    c.success("m", since=clock.now - 100)  # made before the cooldown began: says nothing
    c.failure("f", 1, 30)
    c.forget("f")
    assert [r.getMessage() for r in caplog.records if r.name == "satroute.cooldown"] == [
        "model m cooling down for 30 s (1 failures in a row, the last http_500)",
        "model m still cooling down, now for 3600 s more (the wait its upstream named, http_429)",
        "model q cooling down for 30 s (1 failures in a row, the last insufficient_quota)",
        "model q answered: its cooldown ended 29 s early",
        "model f cooling down for 30 s (1 failures in a row)",
        "model f: its upstream changed; its cooldown ended"]
    assert c.cooling_left() == {"m": 3599.0}


def test_lowering_the_settings_shortens_the_cooldowns_running():
    """An edit that lowers cooldown_s ends the cooldowns it set sooner; those for a wait the
    upstream named are bounded by cooldown_max_s instead."""
    clock = Clock()
    c = Cooldowns(clock)
    c.failure("plain", 1, 30)
    c.failure("named", 1, 30, wait=3600)
    c.shorten(5, 60)
    clock.now += 10
    assert c.cooling_models() == ["named"]
    clock.now += 51
    assert c.cooling_models() == []


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


def test_the_same_cause_counts_once_until_the_model_succeeds():
    """A request the model cannot serve (its own 500), retried by the proxy and again by its
    client, counts once: it must not cool the model for everyone. Other requests failing do."""
    clock = Clock()
    c = Cooldowns(clock)
    assert [c.failure("m", 3, 30, cause=b"poison") for _ in range(9)] == [False] * 9
    assert not c.cooling("m")
    assert c.failure("m", 3, 30, cause=b"b") is False and c.failure("m", 3, 30) is True
    clock.now += 31
    assert not c.cooling("m")
    # half-open: the request that already counted does not cool it again; another failure does
    assert c.failure("m", 3, 30, cause=b"poison") is False and not c.cooling("m")
    assert c.failure("m", 3, 30, cause=b"c") is True
    c.success("m")  # a success forgets the causes: the same request failing again counts again
    assert c.failure("m", 1, 30, cause=b"poison") is True


def test_the_causes_kept_per_model_are_bounded():
    from proxy.cooldown import CAUSES_KEPT

    c = Cooldowns(Clock())
    for i in range(CAUSES_KEPT + 10):  # a long outage: every request fails, none succeeds
        c.failure("m", 10**9, 30, cause=i)
    assert len(c._causes["m"]) == CAUSES_KEPT
    assert c.failure("m", 10**9, 30, cause=CAUSES_KEPT + 9) is False  # the newest are kept
    assert 0 not in c._causes["m"]
    c.forget("m")
    assert "m" not in c._causes


def test_successes_of_calls_made_before_a_cooldown_began_do_not_end_it():
    """Requests let in before an overload finish well while new ones get 429: the cooldown the
    model earned stands. A call made once it cools (a request naming it) that succeeds ends it."""
    clock = Clock()
    c = Cooldowns(clock)
    before = c.now()
    clock.now += 1
    assert [c.failure("m", 3, 30) for _ in range(3)] == [False, False, True]
    clock.now += 1
    c.success("m", since=before)
    assert c.cooling("m")
    c.success("m", since=c.now())
    assert not c.cooling("m")
    # with no cooldown running, any success clears the count
    c.failure("m", 3, 30)
    c.success("m", since=before)
    assert [c.failure("m", 3, 30) for _ in range(3)] == [False, False, True]


def test_epochs_taken_before_an_edit_stay_as_they_were():
    """A request planned under the old configuration keeps the epochs of that moment: an edit
    swaps in a new map, it does not change the one handed out."""
    c = Cooldowns(Clock())
    taken = c.epochs()
    c.forget("m")
    assert taken.get("m", 0) == 0 and c.epochs()["m"] == 1 == c.epoch("m")


def test_a_request_s_body_is_digested_once_however_many_of_its_attempts_fail(monkeypatch):
    """A body may be 32 MiB: its digest (what a 500 counts under) is taken once per request, on
    the event loop, not at each failed attempt; failures that count per attempt need none."""
    import proxy.dispatch as dispatch
    from proxy.errors import UpstreamTransient
    from proxy.providers import RouterSettings

    dumped = []
    real = dispatch.dumps_lenient
    monkeypatch.setattr(dispatch, "dumps_lenient", lambda obj: dumped.append(obj) or real(obj))
    call = dispatch.Call(targets=[], body={"model": "a", "messages": [{"role": "user", "content": "x"}]},
                         stream=False, router=RouterSettings())
    assert dispatch._cause(UpstreamTransient("m", status=503), call) is None
    assert dispatch._cause(UpstreamTransient("m", status=500, timeout=True), call) is None
    assert dumped == []
    first = dispatch._cause(UpstreamTransient("m", status=500), call)
    assert dispatch._cause(UpstreamTransient("m", status=501), call) == first
    assert dumped == [{"messages": [{"role": "user", "content": "x"}]}]  # the model aside, once
    other = dispatch.Call(targets=[], body={"model": "b", "messages": [{"role": "user", "content": "x"}]},
                          stream=False, router=RouterSettings())
    assert dispatch._cause(UpstreamTransient("m", status=500), other) == first  # named or routed alike
