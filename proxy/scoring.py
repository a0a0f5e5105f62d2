"""The scorer as the proxy holds it: which one to load, loading it in the background, calling it.

Owns: choosing the scorer from settings (``modelsat``: ``scorer.load_scorer``; ``constant``: every
candidate scores the same, so the ranking is providers.yaml's order), loading it off the event loop
so the server answers /health while a large model loads, and running ``score`` on a small thread
pool because scoring is CPU-bound and synchronous. A scorer whose ``runs_inline`` attribute is true
(the constant one) is called directly: a thread hop would cost more than the scoring. Warming the
scorer up (its first forward pass, each routable profile's encoding) before requests meet those
costs: at load, and again whenever a profile becomes routable. Remembering the last scores it
gave: the scorer is deterministic, so a request scored again (a client's retry, a chat frontend's
"regenerate", the same prompt sent twice) against the same candidates gets the same scores at once,
without queueing behind other requests, and one that arrives while its twin is still being scored
waits for that call rather than queueing a second.
Does not know: HTTP, routing policy, the scorer's internals (only the ``scorer.Scorer`` seam).
"""
from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from scorer import Profile, Scorer

from proxy.cpuload import usable_cores
from proxy.errors import ServiceUnavailable
from proxy.settings import Settings

log = logging.getLogger("satroute.scoring")
# The Retry-After of a routed request refused while the scorer loads (about 7 s after a start on
# 2 CPU cores): the openai SDKs wait that long before each of their two retries, where their own
# backoff (under 2 s in all) gave up first.
LOADING_RETRY_AFTER_S = 5.0


class ConstantScorer:
    """Every candidate gets the same score: ties keep the configured order."""

    runs_inline = True

    def score(self, instruction: str, candidates: Mapping[str, Profile]) -> dict[str, float]:
        return dict.fromkeys(candidates, 0.0)


Profiles = Callable[[], Mapping[str, Profile]]


class ScorerDegraded(Exception):
    """The scorer failed on one request or took too long: ``reason`` is ``scorer_failed``,
    ``scorer_timeout``, or ``scorer_stalled`` (one call has run far past any normal time, so the
    request did not wait at all); ``ms`` the time spent waiting."""

    def __init__(self, reason: str, ms: float):
        super().__init__(reason)
        self.reason, self.ms = reason, ms


class Scored(NamedTuple):
    """One request's scores, the milliseconds they took, and whether they were remembered from an
    earlier request with the same instruction and candidates (then no scoring ran)."""

    scores: dict[str, float]
    ms: float
    remembered: bool = False


class _TooLate(Exception):
    """A queued scoring call skipped: it could not have ended before its deadline, or no request
    waits for it any more."""


class _Ticket:
    """How many requests wait on one scoring call now (they come and go on the event loop; the
    scorer thread reads it when the call's turn comes)."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters = 0


WARM_UP_CHUNK = 2  # profiles encoded in one warm-up call (0.1 to 0.4 s each on a 2-core CPU)


def profile_means(candidates: Mapping[str, Profile]) -> dict[str, float]:
    """What ranks a request when the scorer cannot: each candidate's mean aptitude (its profile's
    mean accuracy), the floor a profile-reading router has to clear."""
    from scorer.aptitude import aptitude

    return {n: aptitude(p) for n, p in candidates.items()}


def _profile_key(profile: Profile) -> tuple:
    return tuple(sorted((str(k), float(v)) for k, v in profile.items()))


def _request_key(instruction: str, candidates: Mapping[str, Profile]) -> bytes:
    """A 16-byte digest of what decides a request's scores: the instruction and each candidate's
    name and profile (a profile that changes, after onboarding or a reload, is a new key)."""
    parts = (instruction, sorted((str(n), _profile_key(p)) for n, p in candidates.items()))
    return hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=16).digest()


class ScorerHost:
    def __init__(self, scorer: Scorer | None = None, threads: int = 1, remember: int = 1024,
                 stall_after_s: float = 10.0, on_call: Callable[[float], None] | None = None):
        self.scorer = scorer
        # told the seconds of every scoring call that ran to its end (on the thread that ran it),
        # including those no request waited for any more: a slow scorer shows in full
        self.on_call = on_call
        self.error: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scorer")
        self._torch_threads: Callable[[], int] | None = None  # torch's threads for a call now
        self._thread_state = threading.local()  # what each scorer thread has set torch to
        self._warm: set[tuple] = set()  # the profiles the scorer has already encoded
        self._typical_s = 0.0  # a moving average of recent scoring calls
        self._remember = remember  # how many requests' scores are kept (0: none)
        self._recent: OrderedDict[bytes, dict[str, float]] = OrderedDict()
        self._calls: dict[bytes, asyncio.Future] = {}  # scoring calls running or queued, by request
        self._tickets: dict[asyncio.Future, _Ticket] = {}  # who waits on each call running or queued
        self._open = 0  # scoring calls started and not ended (on the event loop's side)
        self._unreadable: set[tuple[str, str]] = set()  # (model, why) already reported
        # A call running longer than this (or 5 scorer timeouts, if longer) on every scorer thread
        # is a stall: a hung device or a deadlock. Requests then skip the queue behind it and are
        # ranked by the profiles' means at once, until a call returns.
        self.stall_after_s = stall_after_s
        self._stall_s = stall_after_s
        self._busy_since: dict[int, float] = {}  # scorer thread -> when its current call began
        self._busy_lock = threading.Lock()
        self._threads = threads
        self._stall_reported = False

    @property
    def ready(self) -> bool:
        return self.scorer is not None

    def describe(self) -> dict:
        """What ``/ready`` says about the scorer: ``state`` (loading, loaded, failed, or stalled with
        ``busy_s``: every scorer thread stuck on one call, requests ranked by the profiles' means)
        and, once loaded, where it runs (``runs_on``: "cuda, bfloat16", "cpu, float32"), or
        ``constant``, which trained weights it holds (``checkpoint``: ``{"path",
        "weights_sha256"}``), where the scorer says, and ``cuda_error`` when the machine has CUDA
        but the scorer could not run there and runs on the CPU."""
        if self.scorer is None:
            return {"state": "failed" if self.error else "loading"}
        if getattr(self.scorer, "runs_inline", False):
            return {"state": "loaded", "runs_on": "constant"}
        where = getattr(self.scorer, "runs_on", None)
        checkpoint = getattr(self.scorer, "checkpoint", None)
        busy = self.stalled_for()
        cuda_error = getattr(self.scorer, "cuda_error", None)
        state = {"state": "stalled", "busy_s": round(busy, 1)} if busy else {"state": "loaded"}
        return {**state, **({"runs_on": where} if where else {}), **({"checkpoint": checkpoint} if checkpoint else {}),
                **({"cuda_error": cuda_error} if cuda_error else {})}

    def stalled_for(self) -> float | None:
        """When every scorer thread has been on one call for longer than the stall limit: how long
        the most recent of those calls has run, in seconds; else None."""
        with self._busy_lock:
            starts = list(self._busy_since.values())
        if len(starts) < self._threads:
            return None  # a thread is free: calls still run
        busy = time.perf_counter() - max(starts)
        return busy if busy > self._stall_s else None

    async def load(self, settings: Settings, profiles: Profiles | None = None,
                   cores_busy: Callable[[], int] | None = None) -> None:
        """Build the configured scorer (in a thread: the real one loads torch and weights), then
        warm it up on ``profiles()`` (the routable models' profiles) before it takes requests.

        torch runs a call on ``settings.scorer_torch_threads`` threads, by default on the cores
        that ``cores_busy()`` (the threads of the local model servers answering now, or the cores
        other processes kept busy over the last second: proxy/app.py) leaves, read
        at each call: on all of them, a scoring call and a local model generating beside it slowed
        each other down two to four times (their threads spin on a busy CPU), and routed requests
        timed out to the aptitude ranking; an idle local server takes nothing.
        Once warm, what start-up built is frozen out of the garbage collector's walks
        (``gc.freeze``): a full collection over it held the event loop for ~350 ms."""
        if self.scorer is not None:
            return
        if settings.scorer == "constant":
            self.scorer = ConstantScorer()
            return
        started = time.perf_counter()
        told = settings.scorer_torch_threads
        self._torch_threads = (lambda: told) if told else (
            lambda: max(1, usable_cores() - (cores_busy() if cores_busy else 0)))

        def build() -> Scorer:  # torch's threads are set where calls run (``_busy``)
            from scorer import load_scorer

            return load_scorer(settings.scorer_checkpoint, device=settings.scorer_device, dtype=settings.scorer_dtype)

        try:
            scorer = await asyncio.get_running_loop().run_in_executor(self._pool, build)
        except Exception as exc:  # noqa: BLE001 (any failure: /ready must say it, not "loading" for ever)
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("scorer failed to load; routed requests answer 503: %s", self.error)
            return
        where = getattr(scorer, "runs_on", "")  # e.g. "cpu, bfloat16", where a scorer says
        checkpoint = getattr(scorer, "checkpoint", None)
        if checkpoint:
            where = f"{where}; checkpoint {checkpoint['path']}, weights {checkpoint['weights_sha256']}"
        log.info("scorer loaded in %.1f s (%s%s torch threads)", time.perf_counter() - started,
                 f"{where}; " if where else "", told or "up to %d" % usable_cores())
        await self._warm_up(scorer, dict(profiles()) if profiles else {}, first=True)
        self.scorer = scorer
        self.error = None
        gc.freeze()

    async def keep_loading(self, settings: Settings, profiles: Profiles | None = None,
                           cores_busy: Callable[[], int] | None = None, first_wait_s: float = 5.0,
                           max_wait_s: float = 300.0) -> None:
        """``load``, and again while it fails, after ``first_wait_s``, doubling up to ``max_wait_s``:
        a failure that passes (a volume mounted late, a full disk freed, a checkpoint pulled with
        git-lfs) no longer leaves the proxy not ready for good, which a liveness probe (``/health``
        answers) never restarts. ``error`` says the last failure meanwhile."""
        wait = first_wait_s
        await self.load(settings, profiles, cores_busy)
        while self.scorer is None and self.error is not None:
            log.info("scorer: loading it again in %.0f s", wait)
            await asyncio.sleep(wait)
            await self.load(settings, profiles, cores_busy)
            wait = min(wait * 2, max_wait_s)

    async def _warm_up(self, scorer: Scorer, profiles: Mapping[str, Profile], first: bool = False) -> None:
        """Run the scorer's ``warm_up`` (if it has one) on the profiles it has not met yet, once
        each: a failure is logged, never raised or retried (the request that meets it reports it)."""
        warm = getattr(scorer, "warm_up", None)
        keys = {n: _profile_key(p) for n, p in profiles.items()}
        # only the profiles routable now are remembered: a model re-onboarded or renamed a
        # thousand times leaves no trace (one that comes back is encoded again, in milliseconds)
        self._warm.intersection_update(keys.values())
        fresh = {n: profiles[n] for n, k in keys.items() if k not in self._warm}
        if warm is None or not (fresh or first):
            return
        self._warm.update(keys[n] for n in fresh)
        for name in self._unreadable_candidates(scorer, fresh):  # would fail the others' warm-up
            del fresh[name]
        started = time.perf_counter()
        # a few profiles a call: requests queue behind each call, not behind all of them (60
        # profiles of a reload took 7 s in one call, and the requests meanwhile timed out)
        names = list(fresh)
        for chunk in [names[i:i + WARM_UP_CHUNK] for i in range(0, len(names), WARM_UP_CHUNK)] or [[]]:
            self._open += 1  # it holds a thread like a call: requests behind it are queued
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._held, warm, {n: fresh[n] for n in chunk})
            except Exception as exc:  # noqa: BLE001 (a warm-up that fails must not end keep_warm)
                log.warning("scorer warm-up failed: %s: %s", type(exc).__name__, exc)
                return
            finally:
                self._open -= 1
        log.info("scorer warmed up in %.0f ms (%d new profile%s)", (time.perf_counter() - started) * 1000,
                 len(fresh), "" if len(fresh) == 1 else "s")

    async def keep_warm(self, profiles: Profiles, interval_s: float) -> None:
        """Until cancelled: encode each profile that becomes routable (a reload, an onboarding)
        before a request needs it. Run from the app's lifespan beside the config watch."""
        while True:
            await asyncio.sleep(interval_s)
            if self.scorer is not None:
                await self._warm_up(self.scorer, dict(profiles()))

    async def score(self, instruction: str, candidates: Mapping[str, Profile],
                    timeout_s: float | None = None) -> Scored:
        """Scores and the scorer's latency in milliseconds (``Scored``). A request with the same
        instruction and candidates as one scored earlier gets those scores at once, and one that
        arrives while such a request is being scored waits for that call instead of queueing a
        second: both come back ``remembered``. Raises ``ScorerDegraded`` when the scorer fails on
        the request or takes longer than ``timeout_s`` (the caller can still rank by the profiles),
        ``ServiceUnavailable`` while no scorer is loaded. Only scores the scorer gave are
        remembered, never a failure; a call already running when its requests stop waiting
        finishes and is remembered, for their retries, and one still queued then is skipped
        (``_run``). A twin that joined a call later than
        the request that started it has a later deadline: if the call is skipped as hopeless for
        the earlier one, the twin still gets a call of its own."""
        scorer = self.scorer
        if scorer is None:
            why = self.error or "still loading"
            err = ServiceUnavailable(f"the routing scorer is not available ({why})",
                                     code="scorer_unavailable")
            if self.error is None:  # it loads in seconds after a start: the SDKs wait and retry
                err.retry_after = LOADING_RETRY_AFTER_S
            raise err
        started = time.perf_counter()
        unread = self._unreadable_candidates(scorer, candidates)
        if unread:  # scored last, the others as ever: one bad profile must not fail every request
            candidates = {n: p for n, p in candidates.items() if n not in unread}
            scored = await self.score(instruction, candidates, timeout_s) if candidates else \
                Scored({}, 0.0, False)
            return scored._replace(scores={**scored.scores, **dict.fromkeys(unread, float("-inf"))})
        inline = getattr(scorer, "runs_inline", False)
        key = _request_key(instruction, candidates) if self._remember and not inline else None
        if key is not None and key in self._recent:
            self._recent.move_to_end(key)
            return Scored(dict(self._recent[key]), (time.perf_counter() - started) * 1000, True)
        call = self._calls.get(key) if key is not None else None
        joined = call is not None
        self._stall_s = max(self.stall_after_s, 5 * timeout_s if timeout_s else 0.0)
        if not inline and (busy := self.stalled_for()) is not None:
            if not self._stall_reported:
                self._stall_reported = True
                log.error("a scoring call has run for %.0f s; routing by the profiles' means until it returns", busy)
            raise ScorerDegraded("scorer_stalled", 0.0)
        try:
            if inline:
                scores = scorer.score(instruction, candidates)
                if self.on_call is not None:
                    self.on_call(time.perf_counter() - started)
            else:
                deadline = started + timeout_s if timeout_s else None
                while True:
                    if call is None:
                        call = self._start(key, scorer, instruction, candidates, deadline)
                    # shielded: a request that stops waiting leaves the call to the others waiting
                    # on it; a queued call past its deadline is skipped when its turn comes (``_run``)
                    shared = asyncio.shield(call)
                    left = deadline - time.perf_counter() if deadline is not None else None
                    ticket = self._tickets.get(call)
                    if ticket is not None:
                        ticket.waiters += 1
                    try:
                        scores = await asyncio.wait_for(shared, left) if left is not None else await shared
                        break
                    except _TooLate:
                        if not joined:
                            raise
                        # skipped for the earlier deadline of the twin that started it: this
                        # request's own is later, so it joins a newer call or starts its own
                        newer = self._calls.get(key)
                        call, joined = (newer, True) if newer is not None and newer is not call else (None, False)
                    finally:  # answered, timed out, or the client left: a call nobody waits for is skipped
                        if ticket is not None:
                            ticket.waiters -= 1
        except (asyncio.TimeoutError, _TooLate):
            ms = (time.perf_counter() - started) * 1000
            log.warning("scorer could not answer within %.0f ms (waited %.0f ms); ranked by the profiles' means",
                        timeout_s * 1000, ms)
            raise ScorerDegraded("scorer_timeout", ms) from None
        except Exception as exc:  # noqa: BLE001 (cancellation is a BaseException and passes through)
            # A scorer bug (torch's IndexError on an out-of-range token, say) or an exhausted
            # device must not become a 500 with a trace: the request is ranked by the profiles.
            log.error("scorer failed on a request: %s: %s", type(exc).__name__, exc)
            raise ScorerDegraded("scorer_failed", (time.perf_counter() - started) * 1000) from None
        return Scored(dict(scores), (time.perf_counter() - started) * 1000, joined)

    def ranked_without_scorer(self, candidates: Mapping[str, Profile]) -> dict[str, float]:
        """What ranks a request the scorer failed or timed out on: the profiles' means, but a
        candidate whose profile the scorer cannot read last, as when the scorer ranks it."""
        means = profile_means(candidates)
        scorer = self.scorer
        if scorer is not None:
            means.update(dict.fromkeys(self._unreadable_candidates(scorer, candidates), float("-inf")))
        return means

    def _unreadable_candidates(self, scorer: Scorer, candidates: Mapping[str, Profile]) -> list[str]:
        """The candidates whose profile the scorer cannot read (``read_profile`` raises: no task of
        its suite, say, in a profile file written by hand), each reported once."""
        read = getattr(scorer, "read_profile", None)
        if read is None:
            return []
        out = []
        for name, profile in candidates.items():
            try:
                read(name, profile)
            except ValueError as exc:
                out.append(name)
                if (name, str(exc)) not in self._unreadable:
                    self._unreadable.add((name, str(exc)))
                    log.warning("the scorer cannot read the profile of %s (%s): it is ranked last "
                                "until its profile changes", name, exc)
        return out

    def _start(self, key: bytes | None, scorer: Scorer, instruction: str, candidates: Mapping[str, Profile],
               deadline: float | None) -> asyncio.Future:
        """A new scoring call, found by its twins under ``key`` until it ends."""
        queued = self._open >= self._threads  # every thread has a call: this one waits behind them
        self._open += 1
        ticket = _Ticket()
        call = asyncio.ensure_future(self._call(key, scorer, instruction, candidates,
                                                deadline if queued else None, ticket))
        self._tickets[call] = ticket
        if key is not None:
            self._calls[key] = call
        call.add_done_callback(functools.partial(self._settled, key))
        return call

    async def _call(self, key: bytes | None, scorer: Scorer, instruction: str,
                    candidates: Mapping[str, Profile], deadline: float | None,
                    ticket: _Ticket | None = None) -> dict[str, float]:
        """One scoring call on the scorer's threads; its scores are remembered under ``key``.
        ``deadline`` (a call queued behind others) lets ``_run`` skip it if it can no longer end in
        time; a call that found a thread free has none, and always runs: it is how the pace is
        measured again after a slow spell."""
        scores = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._run, scorer, instruction, candidates, deadline, ticket)
        if key is not None:
            self._recent[key] = dict(scores)
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
        return scores

    def _settled(self, key: bytes | None, call: asyncio.Future) -> None:
        """A call ended: later requests find its scores remembered, or score afresh after a
        failure. Its outcome is read here, so a failure nobody waited for is not reported as lost."""
        self._open -= 1
        self._tickets.pop(call, None)
        if key is not None and self._calls.get(key) is call:
            del self._calls[key]
        if not call.cancelled():
            call.exception()

    def _run(self, scorer: Scorer, instruction: str, candidates: Mapping[str, Profile],
             deadline: float | None, ticket: _Ticket | None = None) -> dict[str, float]:
        """On a scorer thread: score, unless the call could no longer end before its deadline at
        the recent pace, or every request that waited for it has left (clients that hung up while
        queued: a burst of them held the next live request for seconds). Under overload the oldest
        queued calls are the ones about to give up; a queue served first-come would spend the
        scorer on them and answer nobody in time. A call already running finishes, its scores
        remembered for a retry."""
        started = time.perf_counter()
        if deadline is not None and started + self._typical_s > deadline:
            raise _TooLate
        if ticket is not None and ticket.waiters == 0:
            raise _TooLate
        with self._busy():
            scores = scorer.score(instruction, candidates)
        took = time.perf_counter() - started
        if self.on_call is not None:
            self.on_call(took)
        if took <= self._stall_s:  # a hang that ended is not the pace of the calls to come
            self._typical_s = 0.8 * self._typical_s + 0.2 * took
        return scores

    def _held(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a scorer thread, counted as busy like a scoring call."""
        with self._busy():
            return fn(*args)

    def _use_torch_threads(self) -> None:
        """torch's thread count for the call about to run on this scorer thread (OpenMP keeps one
        per calling thread), set when it changes."""
        if self._torch_threads is None:
            return
        wanted = self._torch_threads()
        if getattr(self._thread_state, "torch", None) == wanted:
            return
        import torch

        torch.set_num_threads(wanted)
        self._thread_state.torch = wanted

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """On a scorer thread, around anything that holds it (a scoring call, a warm-up): what the
        stall detection counts."""
        self._use_torch_threads()
        thread, started = threading.get_ident(), time.perf_counter()
        with self._busy_lock:
            self._busy_since[thread] = started
        try:
            yield
        finally:
            with self._busy_lock:
                del self._busy_since[thread]
            if self._stall_reported and self.stalled_for() is None:  # it ended, well or not
                self._stall_reported = False
                log.warning("the stalled scorer call ended after %.0f s; scoring again",
                            time.perf_counter() - started)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
