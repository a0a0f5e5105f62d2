"""Cooldown of failing models: who is left out of routing for now, and when they come back.

Owns: counting consecutive failures per model name (transient ones, and refusals of its key) and the time until which a model is
cooling down. A model that fails ``allowed_fails`` times in a row is cooled for ``cooldown_s``, or
for the wait the failure named (a Retry-After: the caller bounds it); the cooldown ends by itself;
one more failure right after it ends cools the model again at once (half-open), a success clears
the count. A failure may name its ``cause`` (which request it was):
the same cause fails again without counting again until the model succeeds, so that one request
the model cannot serve, retried by the proxy and then by its client, does not cool the model for
everyone.
Does not know: why a call failed (a failure's label is kept as given, to say which models last
failed so: ``failing``), HTTP, configuration files (limits are passed in per call).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Hashable, Mapping

log = logging.getLogger("satroute.cooldown")

CAUSES_KEPT = 64  # per model, the causes counted since its last success: the oldest go first


class Cooldowns:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._fails: dict[str, int] = {}
        self._until: dict[str, float] = {}
        # bumped when a model's upstream changes (``forget``): a failure of a call made to the
        # upstream it had before (a request in flight across the edit) is not the new one's
        self._epoch: dict[str, int] = {}  # replaced, never changed in place: ``epochs`` hands it out
        self._began: dict[str, float] = {}  # when each model's current cooldown began
        self._causes: dict[str, dict[Hashable, None]] = {}  # counted since the last success, in order
        self._why: dict[str, str] = {}  # the label of each model's last failure, since its last success
        self._named: set[str] = set()  # cooling for a wait its upstream named, not for cooldown_s

    def epoch(self, name: str) -> int:
        """Which upstream of ``name`` a call about to be made goes to; given back to ``failure``."""
        return self._epoch.get(name, 0)

    def epochs(self) -> Mapping[str, int]:
        """Every model's epoch as of now, read in O(1) (a model absent is at 0): taken together with
        the configuration a request is planned under, since its calls go to the upstreams that
        configuration names, however late they are made (after scoring, as fallbacks)."""
        return self._epoch

    def now(self) -> float:
        """The clock's time: when a call was made, given back to ``success``."""
        return self._clock()

    def cooling(self, name: str) -> bool:
        until = self._until.get(name)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[name]
        self._named.discard(name)
        return False

    def failure(self, name: str, allowed_fails: int, cooldown_s: float, epoch: int | None = None,
                cause: Hashable | None = None, why: str | None = None, wait: float | None = None) -> bool:
        """Count one failure; True when it starts a cooldown. The cooldown lasts ``cooldown_s``, or
        ``wait`` where the failure named one (seconds, bounded by the caller); none while
        ``cooldown_s`` is 0 (cooldowns are off). A failure while the model is already cooling (a
        request that was in flight when it began, or one naming the model) keeps it cooling at
        least its own time from now, but is not a new cooldown: what the metric and the log
        count. A failure of a call made before the model's upstream changed (``epoch``), or one
        whose ``cause`` already counted since the model's last success, is not counted. ``why``:
        its label (``insufficient_quota``), kept as the model's last until it succeeds
        (``failing``)."""
        if epoch is not None and epoch != self.epoch(name):
            return False
        if why is not None:
            self._why[name] = why
        if cause is not None:
            causes = self._causes.setdefault(name, {})
            if cause in causes:
                return False
            causes[cause] = None
            if len(causes) > CAUSES_KEPT:
                del causes[next(iter(causes))]
        count = self._fails.get(name, 0) + 1
        length = cooldown_s if wait is None or cooldown_s <= 0 else wait
        if count >= allowed_fails and length > 0:
            started = not self.cooling(name)
            if started:
                self._began[name] = self._clock()
            now = self._clock()
            until = now + length
            before = self._until.get(name, until)
            # a failure that names no wait (or a shorter one) does not cut short a longer wait
            # an earlier one named
            if until >= before:
                self._until[name] = until
                if wait is not None:
                    self._named.add(name)
                else:
                    self._named.discard(name)
            reason = (f"the wait its upstream named{f', {why}' if why else ''}" if wait is not None
                      else f"{count} failures in a row{f', the last {why}' if why else ''}")
            if started:  # a cooldown of an hour (an upstream's named wait) must not pass unseen
                log.warning("model %s cooling down for %.0f s (%s)", name, length, reason)
            elif until - before >= max(1.0, (before - self._began.get(name, now)) / 4):
                # nor one stretched so (a 30 s cooldown that a 429 made an hour); failures of the
                # requests in flight when it began, each a moment later, are not worth a line
                log.warning("model %s still cooling down, now for %.0f s more (%s)", name, length, reason)
            self._fails[name] = allowed_fails - 1  # half-open once the cooldown ends
            return started
        self._fails[name] = count
        return False

    def success(self, name: str, epoch: int | None = None, since: float | None = None) -> None:
        """A call to ``name`` answered: its record is cleared, and its cooldown ended, unless the
        call was made to the upstream it had before (``epoch``), or before (``since``, from
        ``now``) a cooldown that is still running began: requests let in before an overload
        finishing well do not say that the model takes new ones again."""
        if epoch is not None and epoch != self.epoch(name):  # the upstream it had before answered
            return
        if since is not None and self.cooling(name) and self._began.get(name, since) > since:
            return
        if self.cooling(name):  # it ends before its time: the line that said how long was wrong
            log.info("model %s answered: its cooldown ended %.0f s early", name,
                     self._until[name] - self._clock())
        self._fails.pop(name, None)
        self._until.pop(name, None)
        self._causes.pop(name, None)
        self._began.pop(name, None)
        self._why.pop(name, None)
        self._named.discard(name)

    def cooling_models(self) -> list[str]:
        return [n for n in list(self._until) if self.cooling(n)]

    def cooling_left(self) -> dict[str, float]:
        """The seconds each cooling model has left, from now."""
        now = self._clock()
        return {n: round(self._until[n] - now, 1) for n in self.cooling_models() if n in self._until}

    def failing(self, why: str) -> list[str]:
        """The models whose last failure was labelled ``why``, and that have not succeeded since."""
        return [name for name, said in self._why.items() if said == why]

    def forget(self, name: str) -> None:
        """Drop a model's record: what failed was another upstream (its configuration changed),
        and so is what calls still in flight to it may yet fail on."""
        if self.cooling(name):
            log.info("model %s: its upstream changed; its cooldown ended", name)
            self._until.pop(name, None)
        self.success(name)
        self._epoch = {**self._epoch, name: self.epoch(name) + 1}

    def shorten(self, cooldown_s: float, named_max_s: float | None = None) -> None:
        """End every cooldown at most ``cooldown_s`` from now (the setting was lowered), and one
        that lasts the wait its failure named at most ``named_max_s`` (None: ``cooldown_s``)."""
        now = self._clock()
        for name, until in list(self._until.items()):
            latest = now + (named_max_s if name in self._named and named_max_s is not None else cooldown_s)
            if until > latest:
                self._until[name] = latest
