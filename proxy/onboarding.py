"""Onboarding: a model takes the aptitude test, its answers are graded and stored, its profile made.

Owns: running the test for one model through one seam, ``Asker.ask(model, messages, **params) ->
text`` or ``Said`` (the text with the usage billed; the proxy fills it with its dispatch path, so the same retries, timeouts and cooldowns
apply, but for a rate limit, which it raises at once; tests fill it with fakes); bounded
concurrency, paced by the upstream's rate limits (``_Pace``: a 429's hold on every question, and
fewer questions at once after it); a spend cap checked against an estimate made
from the model's prices before the first question, and enforced again while answers come in and
as asks are sent that bring none but may be billed (timed out, cut off: ``unanswered``);
states (``running``; ``stalled`` with the reason while the upstream is down, with backoff, until it
answers again, or while it holds the run (a rate limit's hold, until the end it says); ``failed``
with the reason when it never answered, refused the model (or 10 questions in a row), or the cap
was reached; ``pending`` when an ``Asker`` cancelled the run with ``RunCancelled``; ``done``); grading a question as no answer when the upstream refuses that one
prompt (a 4xx other than 401/402/403/404) or it alone keeps failing while others are answered;
resuming from the store without asking any stored question again (nor, when the upstream
fingerprint changed, with the old answers); grading stored answers again with this version's
grader, from their stored text (``regrade``: a run does it before it resumes, so a fixed grader's
earlier faults do not stay in the profile); and the ``satroute onboard`` command
(``add_arguments``/``run``).
A profile exists only once every question is graded: ``Store.finish`` writes it together with the
``done`` status, so routing never sees a half-finished one.
A crash loses only the questions in flight at that moment (at most ``concurrency``): they were never
stored, so they are asked again on resume; every stored answer is final.
One process at a time: a run holds the store's lease on its model (``Store.claim``), refreshed every
``heartbeat_s`` and released however the run ends; ``run`` raises ``ModelBusy`` when another process
onboards the model. The run's writes are made only under its lease (``leased=True``), and a worker
checks the lease before a new question when the last heartbeat is late (the event loop was held
up), so a run taken over stops at once, asking and writing nothing more. A run cancelled midway
(shutdown, a signal) leaves its model ``pending`` ("interrupted"), not ``running``, the asks it
had out counted for the spend (the upstream bills them all the same).
Every store call runs on a worker thread (a write may wait for another process's lock for the busy
timeout; the event loop, which also serves the proxy's requests, must not), and a write the store
refuses (locked past that timeout, disk full) stalls the run and is tried again: an answer that
was paid for is not dropped.
Does not know: HTTP serving, litellm, the registry (``proxy.onboarding_service`` wires those).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar

from proxy.errors import ConfigError, UpstreamClientError, UpstreamError
from proxy.questions import Question
from proxy.routing import approx_tokens
from proxy.store import GradedAnswer, ModelBusy, Progress, Store, UpstreamInUse, unopenable
from scorer.aptitude import Suite, profile_from_graded
from scorer.grading import build_messages, extract_answer, reasoning_conclusion

log = logging.getLogger("satroute.onboarding")
T = TypeVar("T")

# What a failed ask may raise: the dispatch path's errors, or a bare network/timeout error.
TRANSIENT = (UpstreamError, TimeoutError, ConnectionError)
# what tells a model that answers from one that is down, when only failing questions are left
PROBE = "Reply with the word OK."
PROBE_TOKENS = 16


# the upstream (``upstream_fingerprint``) the run asking now was begun for, seen by its asker's
# asks (the workers' tasks inherit it): an ask sent after an edit that points the model elsewhere
# would store another model's answers as this one's
RUN_UPSTREAM: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_upstream", default=None)


class RunCancelled(Exception):
    """Raised by an ``Asker`` when the run must stop without failing (the model left
    providers.yaml): nothing is recorded against the model, and a later run resumes."""


@dataclass(frozen=True)
class Said:
    """A model's answer with the tokens its upstream billed for it (``usage``), where it told:
    a reasoning model's hidden tokens are many times its visible text."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cut_off: bool = False  # the upstream stopped it at max_tokens (finish_reason "length")
    filtered: bool = False  # the provider withheld it (finish_reason "content_filter": a safety block)
    # attempts of the same ask before this answer that the upstream may have billed with no answer
    # back (timed out, cut after sending: dispatch's retries), counted apart from ``billed``
    unanswered: int = 0
    # the reasoning its upstream returned beside the answer (``reasoning_content``, thinking parts):
    # not graded, but generated and billed
    reasoning: str = ""

    def billed(self, question: Question, budget: int = 0) -> tuple[int, int]:
        """(input, output) tokens to count for the spend: the larger of what the usage says and
        an estimate from the text (the answer's and the reasoning's returned beside it), so a
        usage left out or zero-filled (litellm fills zeros for an upstream that sends none), or
        one that counts reasoning only in its total, is no discount. An answer cut off at the
        limit with no usage to say what it cost counts ``budget`` (the ask's ``max_tokens``) at
        least: reasoning it did not return may have spent it all."""
        out = self.completion_tokens or 0
        if self.total_tokens is not None and self.prompt_tokens is not None:
            out = max(out, self.total_tokens - self.prompt_tokens)
        if self.cut_off and out <= 0:
            out = budget
        return (max(self.prompt_tokens or 0, prompt_tokens(question)),
                max(out, approx_tokens(self.text) + approx_tokens(self.reasoning)))


class Asker(Protocol):
    async def ask(self, model: str, messages: list[dict], **params: object) -> "str | Said": ...


def unanswered(exc: BaseException) -> int:
    """How many attempts of a failed or cancelled ask the upstream may have billed with no answer
    back: as the ``Asker`` counted them (the exception's ``unanswered``: ``DispatchAsker`` reads
    dispatch's record of each attempt), else one for a timeout (the request was out when the
    wait ended) or a cancellation (it may have been), and none for another failure."""
    told = getattr(exc, "unanswered", None)
    if isinstance(told, int):
        return told
    return int(isinstance(exc, (TimeoutError, asyncio.CancelledError))
               or getattr(exc, "timeout", False) is True)


def answer_budget(params: dict, default: int) -> int:
    """The longest answer an ask with ``params`` allows (``max_completion_tokens`` where the
    model takes that name, else ``max_tokens``; ``default`` where neither is given)."""
    for name in ("max_completion_tokens", "max_tokens"):
        if isinstance(params.get(name), int):
            return params[name]
    return default


@dataclass(frozen=True)
class Prices:
    """USD per million tokens; None = unknown, counted as free (a local model)."""

    input_per_mtok: float | None = None
    output_per_mtok: float | None = None

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return ((self.input_per_mtok or 0.0) * input_tokens
                + (self.output_per_mtok or 0.0) * output_tokens) / 1e6


@dataclass(frozen=True)
class Options:
    concurrency: int = 8  # questions in flight per upstream account (``run``'s ``account``)
    max_tokens: int = 2048  # MMLU-Pro's own harness budget; a cut-off answer grades as no answer
    temperature: float = 0.0
    spend_cap_usd: float | None = 20.0  # None: no cap
    expected_output_tokens: int = 400  # for the estimate; a chain of thought is ~200-600 tokens
    backoff_s: float = 1.0  # first wait after a failure that the dispatch retries did not absorb
    backoff_max_s: float = 60.0
    give_up_s: float = 120.0  # a model that never answered for this long has failed
    question_attempts: int = 5  # transient failures of one question, while others answer
    refusals_in_a_row: int = 10  # 4xx about single prompts, no answer between: the run fails
    heartbeat_s: float = 5.0  # how often the run refreshes its lease (stale after LEASE_STALE_S)


# A 4xx in MODEL_REFUSALS refuses every request to the model (credentials, billing, no such
# model), unless it says the input was flagged; any other 4xx is about the one prompt (content
# filter, context length, ...).
_NO_SUCH_MODEL = re.compile(r"model_not_found|\bmodel\b.{0,120}?\b(?:not found|does not exist)",
                            re.IGNORECASE | re.DOTALL)


def refuses_the_model(exc: UpstreamClientError) -> bool:
    """True when a 4xx means no request to this model can succeed, not just this prompt."""
    return exc.refuses_the_model() or _NO_SUCH_MODEL.search(exc.text()) is not None


# A 4xx that refuses one of the run's own parameters for this model (OpenAI's reasoning models:
# "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead", "Unsupported
# value: 'temperature' does not support 0 with this model"; litellm's "don't support temperature").
# Anthropic's: "`temperature` is deprecated for this model", "temperature may only be set to 1 when
# thinking is enabled".
_REFUSED_PARAM = re.compile(r"(?i)(unsupported|not supported|n't support|does not support|only the "
                            r"default).{0,80}?\b(max_tokens|temperature)\b|\b(max_tokens|temperature)"
                            r"\b.{0,80}?(unsupported|not supported|n't support|does not support|"
                            r"deprecated|may only be set)")


def adapted_params(params: dict, exc: UpstreamClientError) -> dict | None:
    """The run's sampling parameters as this model takes them, when ``exc`` refuses one of them:
    ``max_tokens`` becomes ``max_completion_tokens``, a ``temperature`` it rejects is left to its
    default. None when ``exc`` is about something else."""
    match = _REFUSED_PARAM.search(exc.text())
    if match is None:
        return None
    name = match.group(2) or match.group(3)
    if name not in params:
        return None
    out = dict(params)
    value = out.pop(name)
    if name == "max_tokens":
        out["max_completion_tokens"] = value
    return out


def spend_kept(spent: float) -> str:
    """What a line saying that a model's answers were forgotten for another upstream adds about
    the spend kept (``Store.forget``); "" when nothing was spent."""
    return f"; the ${spent:.2f} spent on it is kept, and counts against the spend cap" if spent else ""


def prompt_tokens(question: Question) -> int:
    return sum(approx_tokens(m["content"]) + 4 for m in messages_for(question))


def messages_for(question: Question) -> list[dict]:
    return build_messages(question.question, question.options, question.subject)


def estimate_cost(questions: Sequence[Question], prices: Prices, options: Options) -> float:
    """USD the remaining questions should cost: prompt tokens + the expected answer length."""
    tokens_in = sum(prompt_tokens(q) for q in questions)
    return prices.cost(tokens_in, options.expected_output_tokens * len(questions))


class _Pace:
    """How fast an upstream is asked (one event loop, no locks): at most ``limit`` questions in
    flight (``in_flight``), none sent before ``resume_at`` (a clock time: the upstream's hold).
    ``limit`` starts at the run's concurrency; a failure that says the upstream limits how fast it
    is asked (a 429, 503 or 529, a Retry-After) halves it, down to 1, once for the asks in flight
    then (``epoch``), and each answer to an ask sent since adds ``1 / limit`` back, up to the
    concurrency again: one question more for each round of answers, so the questions held do not
    all go again at once."""

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.limit = float(concurrency)
        self.in_flight = 0
        self.resume_at = 0.0
        # what the hold is: the Retry-After the upstream said (None: it said none), the model
        # whose question was told, and the hold's clock time at its start
        self.said: float | None = None
        self.told: str = ""
        self.held_at = 0.0
        self.epoch = 0  # times the limit was cut: an ask remembers the one it started under
        self.runs: list[_Run] = []  # the runs asking through it, in the order they began
        self._freed = asyncio.Event()

    @property
    def full(self) -> bool:
        return self.in_flight >= int(self.limit)

    def freed(self) -> Awaitable[bool]:
        """Awaited until a question in flight ends (``release``) or ``wake`` is called."""
        return self._freed.wait()

    def wake(self) -> None:
        """Wake every worker waiting in ``freed`` (to look at the queue, the run's end, again)."""
        self._freed.set()
        self._freed = asyncio.Event()

    def ahead_of(self, run: _Run, now: float) -> _Run | None:
        """The run that has the turn before ``run`` now, or None: a worker of ``run`` may take a
        free place. The runs on one account are served in the order they began, so the first
        finishes (and joins routing) first: shared round the runs, ten models on one key all
        finished together near the end, none routable before. A run before it that cannot ask now
        (in its backoff, stopping, its workers gone, nothing left to send) holds no one back."""
        for other in self.runs:
            if other is run:
                return None
            if other.queue and other.workers and not other.stopping and other.resume_at <= now:
                return other
        return None

    def take(self) -> int:
        """One more question in flight; the ``epoch`` it goes out under."""
        self.in_flight += 1
        return self.epoch

    def release(self) -> None:
        self.in_flight -= 1
        self.wake()

    def answered(self, epoch: int) -> None:
        """An answer to an ask sent under ``epoch``: one sent since the last cut grows the limit."""
        if epoch == self.epoch:
            self.limit = min(float(self.concurrency), self.limit + 1 / int(self.limit))

    def slow_down(self, epoch: int) -> None:
        """Halve the limit for a rate limit met by an ask sent under ``epoch``: the asks in flight
        when it was cut already were sent at the rate that was too fast, and cut it once."""
        if epoch == self.epoch:
            self.epoch += 1
            self.limit = max(1.0, self.limit / 2)

    def hold(self, now: float, until: float, said: float | None, model: str) -> None:
        """Send nothing before ``until``, a hold ``said`` (a Retry-After, or None) to ``model``'s
        question at ``now``; a longer hold on already stays."""
        if until > self.resume_at:
            self.resume_at, self.said, self.told, self.held_at = until, said, model, now


class _Run:
    """Mutable state of one model's run, shared by its workers (one event loop, no locks)."""

    def __init__(self, model: str, todo: Sequence[Question], answered_before: bool,
                 price_now: Callable[[], Prices], prices: Prices, pace: _Pace):
        self.model = model
        self.queue: deque[Question] = deque(todo)
        self.in_flight = 0
        self.storing = 0  # answers being written: not progress until they are stored
        self.params: dict = {}  # the sampling parameters of each ask (adapted to what the model takes)
        self.ever_answered = answered_before
        self.failures = 0  # consecutive transient failures
        self.saying = asyncio.Lock()  # status writes (``_set_status``), in the order decided
        # clock times: when the run sent its first question (its wait in line behind another
        # run on its account is no wait on the upstream), and its last answer
        self.started = self.answered_at = 0.0
        self.asked = False  # it has sent a question
        # since when it has waited, nothing of its own out, for another run on its account to
        # leave it a place: no wait on its upstream, so the clocks above move on by it
        self.in_line_since: float | None = None
        self.said_in_line = False  # its status says it waits in line
        self.first_failure = 0.0  # of the failures in a row
        self.quiet = False  # said stalled because asks are out and no answer came for give_up_s
        self.probing = False
        self.asking: set[str] = set()  # the questions in flight
        self.price_now = price_now  # what answers cost now (providers.yaml may change it mid-run)
        self.prices = prices  # as last read
        self.resume_at = 0.0  # clock time before which this run asks nothing (its backoff)
        self.pace = pace  # how fast its upstream is asked
        self.stalled = False  # the status it last said is stalled
        self.held_until = 0.0  # the upstream's hold (pace.resume_at) that status says it waits out
        self.fatal: str | None = None
        self.cancelled: str | None = None
        self.lease_lost = False  # another process took the model over: stop, write nothing more
        self.beat_at = 0.0  # clock time of the last refresh of the lease
        self.spent = 0.0
        self.answers = 0  # answered in this run
        self.epoch = 0  # counted failures so far: an ask remembers the one it started under
        self.refused_in_a_row = 0  # 4xx about single prompts since the last answer
        self.failed_since_answer: set[str] = set()  # questions failed since the last answer
        self.strikes: Counter[str] = Counter()  # failures of a question while others answered
        self.cut_off = 0  # answers stopped at max_tokens before they stated a letter (graded wrong)
        self.filtered = 0  # answers the provider's content filter withheld, with no letter (graded wrong)
        # answers whose content came back empty, the model's text in its reasoning (graded from it)
        self.from_reasoning = 0
        self.workers = 0  # asking now: the run's pace serves it in its turn while any is

    @property
    def stopping(self) -> bool:
        return self.fatal is not None or self.cancelled is not None or self.lease_lost


def _right(question: Question, letter: str | None) -> bool:
    """Whether ``letter``, read from an answer, is ``question``'s gold: the rule of a live answer's
    grade and of a stored one's graded again (``_graded_otherwise``)."""
    return letter is not None and letter == question.answer


def _graded_otherwise(answers: Sequence[Any], questions: Sequence[Question]
                      ) -> dict[str, tuple[str | None, bool]]:
    """The stored ``answers`` this version's grader grades otherwise: question id -> (letter,
    right); answers to questions not in ``questions`` (another suite's) are left as they are."""
    by_id = {q.id: q for q in questions}
    changed: dict[str, tuple[str | None, bool]] = {}
    for a in answers:
        q = by_id.get(a.question_id)
        if q is None:  # another suite's question: its gold is not loaded
            continue
        letter = a.letter if a.text is None else extract_answer(a.text, len(q.options))
        right = _right(q, letter)
        if right != a.correct:
            changed[a.question_id] = (letter, right)
    return changed


class Onboarding:
    """Runs the aptitude test of ``suite`` against models, one call of ``run`` per model."""

    def __init__(self, store: Store, suite: Suite, questions: Sequence[Question], asker: Asker,
                 options: Options = Options(),
                 on_progress: Callable[[str, int, int], None] | None = None):
        ids = set(suite.question_ids)
        self.questions = [q for q in questions if q.id in ids]
        if len(self.questions) != len(ids):
            raise ValueError(f"{len(ids) - len(self.questions)} suite questions have no text")
        self.store, self.suite, self.asker, self.options = store, suite, asker, options
        self.on_progress = on_progress
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.draining = False  # the proxy is stopping: no new ask, the ones out are answered
        self._live: set[_Run] = set()
        # model -> the status (and reason) its live run could not record: the store refused the
        # write (a full disk), and what it holds still says running; shown instead of it
        self.unstored: dict[str, tuple[str, str | None]] = {}
        # how fast each upstream is asked, shared by the runs on it (``run``'s ``account``; else
        # the model's own): key -> (the pace, how many runs use it)
        self._paces: dict[tuple[str, str], tuple[_Pace, int]] = {}

    def drain(self) -> None:
        """Ask no new question (the proxy is stopping): the asks out are answered and their
        answers stored (``asks_out`` says how many are left), then each run stops ``pending``
        ("interrupted") and the next start resumes it, asking nothing twice."""
        self.draining = True

    def asks_out(self) -> int:
        """Asks sent and not yet answered and stored, over every run (a probe included)."""
        return sum(s.in_flight + s.storing + s.probing for s in self._live)

    def answers_unstored(self) -> int:
        """Of ``asks_out``, the answers in hand that wait for the store to take them."""
        return sum(s.storing for s in self._live)

    async def run(self, model: str, prices: Prices | Callable[[], Prices] = Prices(),
                  upstream: str | None = None, legacy: str | None = None,
                  config: str | None = None, failed_since: float | None = None,
                  account: str | None = None, also: Sequence[str] = (),
                  plain: str | None = None) -> Progress:
        """Onboard ``model`` (resuming from the store); returns its final stored progress.

        ``prices`` may be a callable, read before each question: what answers cost now (an
        edit of providers.yaml mid-run). ``upstream`` fingerprints what answers for ``model``
        (``upstream_fingerprint``; ``legacy``, its ``legacy_fingerprint``, the form earlier
        versions recorded; ``also``, ``earlier_forms``; ``plain``, ``plain_fingerprint``, the form
        its ``upstream_plain`` is recorded in): when the store's answers came from another one,
        they are forgotten and the test starts over. ``config``, a digest of what the run depends
        on, is stored with a failure (``Store.failure``); with ``failed_since``, a stored failure
        of that ``config`` recorded since then raises ``FailedAlready`` instead of a run (``Store.claim``).
        Raises ``ModelBusy`` (having asked and written nothing) when another process onboards
        ``model`` now, or ``UpstreamInUse`` when the store's answers came from another upstream
        that another live process points ``model`` at; this run's lease is released however it
        ends. Runs given the same ``account`` (``upstream_account``: one provider account, whose
        rate limits its models share) share one pace: at most ``concurrency`` questions in flight
        over all of them, and a hold one of them meets holds them all; None: the run's own.
        """
        await self._store(self.store.claim, model, self.suite.name, config, failed_since)
        try:
            return await self._run(model, prices, upstream, legacy, config, account, also, plain)
        except asyncio.CancelledError:  # the proxy stops, or a signal: the store must not say running
            try:
                await self._store(self.store.interrupted, model)
            except sqlite3.Error as exc:
                log.warning("onboarding %s: cannot record the interruption: %s", model, exc)
            raise
        finally:
            try:
                await self._store(self.store.release, model)
            except sqlite3.OperationalError as exc:  # the lease goes stale by itself
                log.warning("onboarding %s: cannot release the lease: %s", model, exc)

    async def regrade(self, model: str, leased: bool = False) -> int:
        """Grade ``model``'s stored answers to the suite's questions again with this version's
        grader, from what is stored: an answer's text as the upstream gave it (one stored without
        text, no answer, by its letter), against the question's gold letter as loaded now. The
        grades that change are rewritten, with the profile they make where one of this suite is
        stored (``Store.regrade``), and logged. Returns how many changed. ``leased``: the caller's
        run holds the model's lease; otherwise ``ModelBusy`` (nothing written) while another live
        process holds it."""
        answers = await self._store(self.store.answers, model)
        # on a worker thread, as the store's calls: a model's 1,000 long answers (a reasoning
        # model's) took half a second of the grader, and the serving loop must not wait on it
        changed = await asyncio.to_thread(_graded_otherwise, answers, self.questions)
        if not changed:
            return 0
        graded = {a.question_id: changed[a.question_id][1] if a.question_id in changed else a.correct
                  for a in answers}
        rewrote = await self._store(self.store.regrade, model, changed,
                                    profile_from_graded(self.suite, graded), self.suite.name,
                                    leased=leased)
        now_right = sum(right for _, right in changed.values())
        log.warning("onboarding %s: %d of its %d stored answers are graded otherwise by this "
                    "version's grader (%d now right, %d now wrong); their grades%s are rewritten",
                    model, len(changed), len(answers), now_right, len(changed) - now_right,
                    " and its profile" if rewrote else "")
        return len(changed)

    async def _run(self, model: str, priced: Prices | Callable[[], Prices], upstream: str | None,
                   legacy: str | None, config: str | None, account: str | None,
                   also: Sequence[str] = (), plain: str | None = None) -> Progress:
        opts = self.options
        store = self.store
        if upstream is not None and await self._store(store.upstream_changed, model, upstream, legacy,
                                                      also, plain):
            kept = await self._store(store.forget, model, moved=True)  # the lease stays this run's
            log.warning("onboarding %s: its upstream changed; its answers and profile were "
                        "forgotten%s; onboarding it again", model, spend_kept(kept))
        # answers an earlier version graded stored otherwise: the profile is made of today's grades
        await self.regrade(model, leased=True)
        done = await self._store(store.answered, model)
        todo = [q for q in self.questions if q.id not in done]
        price_now = priced if callable(priced) else (lambda: priced)
        prices = price_now()
        estimate = estimate_cost(todo, prices, opts)
        spent = await self._store(store.spent, model)
        total = len(self.questions)
        if opts.spend_cap_usd is not None and spent + estimate > opts.spend_cap_usd:
            before = f" plus ${spent:.2f} already spent" if spent else ""
            forgotten = (await self._progress(model)).spent_forgotten
            if forgotten:
                before += (f" (${forgotten:.2f} of it on answers forgotten when it pointed at "
                           "another upstream)")
            await self._store(store.set_status, model, "failed",
                              f"estimated cost ${estimate:.2f} for {len(todo)} questions{before} "
                              f"exceeds the spend cap ${opts.spend_cap_usd:.2f}",
                              suite=self.suite.name, total=total, leased=True, config=config)
            return await self._progress(model)
        # the whole onboarding's estimate, as the cap sees it: a resumed run's is what was spent
        # plus what is left, not the questions left alone beside the spend of the others
        await self._store(store.begin, model, self.suite.name, total, round(spent + estimate, 4),
                          upstream, legacy, plain)
        log.info("onboarding %s: %d of %d questions to ask (estimated $%.2f, $%.2f spent before)",
                 model, len(todo), total, estimate, spent)
        RUN_UPSTREAM.set(upstream)  # in this task's context, which its workers' copy
        paced = ("account", account) if account is not None else ("model", model)
        pace, runs = self._paces.get(paced, (_Pace(opts.concurrency), 0))
        self._paces[paced] = (pace, runs + 1)
        state = _Run(model, todo, answered_before=bool(done), price_now=price_now, prices=prices,
                     pace=pace)
        state.params = {"max_tokens": opts.max_tokens, "temperature": opts.temperature}
        state.spent = spent
        state.beat_at = state.started = state.answered_at = self.clock()  # ``begin`` refreshed the lease
        pace.runs.append(state)
        state.workers = min(opts.concurrency, len(todo))
        workers = [asyncio.create_task(self._worker(state), name=f"onboard-{model}-{i}")
                   for i in range(state.workers)]
        beat = asyncio.create_task(self._heartbeat(state), name=f"onboard-{model}-lease")
        self._live.add(state)
        try:
            await asyncio.gather(*workers)
        finally:
            self._live.discard(state)
            self.unstored.pop(model, None)
            beat.cancel()
            for w in workers:
                w.cancel()
            try:
                # a worker storing an answer finishes that first: nothing is written after the run
                await asyncio.gather(beat, *workers, return_exceptions=True)
            finally:
                pace.runs.remove(state)
                pace.wake()  # the runs after it in line ask now
                pace, runs = self._paces.pop(paced)
                if runs > 1:  # the last run on the upstream forgets how fast it was asked
                    self._paces[paced] = (pace, runs - 1)
        if state.lease_lost:
            raise ModelBusy(model, "another process (this run's lease went stale)")
        if state.cancelled is not None:  # not a failure: the next run resumes where this stopped
            log.info("onboarding %s cancelled: %s", model, state.cancelled)
            await self._store(store.set_status, model, "pending", f"cancelled: {state.cancelled}",
                              suite=self.suite.name, leased=True)
            return await self._progress(model)
        if state.fatal is not None:
            await self._store(store.set_status, model, "failed", state.fatal, suite=self.suite.name,
                              leased=True, config=config)
            log.error("onboarding %s failed: %s", model, state.fatal)
            return await self._progress(model)
        if self.draining and state.queue:  # the proxy stops; every ask sent was answered and stored
            log.info("onboarding %s stopped for the shutdown; %d questions left for the next start",
                     model, len(state.queue))
            await self._store(store.interrupted, model)
            return await self._progress(model)
        answers = await self._store(store.answers, model)
        graded = {a.question_id: a.correct for a in answers}
        missing = [q.id for q in self.questions if q.id not in graded]
        if missing:  # cannot happen unless the store was edited meanwhile
            await self._store(store.set_status, model, "failed",
                              f"{len(missing)} answers missing after the run", suite=self.suite.name,
                              leased=True, config=config)
            return await self._progress(model)
        ids = set(self.suite.question_ids)
        # the form of the answers: those with no text at all (a content filter's block, an empty
        # answer, in this run or an earlier one) show none
        letters = [a.letter for a in answers if a.question_id in ids and (a.text or "").strip()]
        # answers that came back empty (a text of "", not a question never answered: None)
        empty = sum(a.question_id in ids and a.text is not None and not a.text.strip() for a in answers)
        note = _understated(state, self.options.max_tokens, letters, empty)
        if note:  # the profile stands, but an admin must see what it may understate
            log.warning("onboarding %s done, but %s", model, note)
        await self._write(state, store.finish, model, self.suite.name,
                          profile_from_graded(self.suite, graded), note, leased=True)
        log.info("onboarding %s done", model)
        return await self._progress(model)

    async def _progress(self, model: str) -> Progress:
        progress = await self._store(self.store.progress, model, self.suite.question_ids)
        assert progress is not None
        return progress

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)`` (a store method) on a worker thread. A cancellation waits for
        the call to end before it goes on, so a run that stopped writes nothing afterwards and an
        answer being stored is stored."""
        task = asyncio.ensure_future(asyncio.to_thread(call, *args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # seen: the cancellation is what goes on
            raise

    async def _write(self, state: _Run, call: Callable[..., object], *args: Any,
                     **kwargs: Any) -> None:
        """A write the run cannot do without (an answer paid for, the profile): a refusal of the
        store (locked past the busy timeout, disk full) stalls the run (no new question is asked
        meanwhile) and the write is tried again with backoff, until it succeeds or the run is
        cancelled. ``ModelBusy``: the lease was taken over, the run stops."""
        opts = self.options
        delay = opts.backoff_s
        state.storing += 1
        try:
            while True:
                try:
                    await self._store(call, *args, **kwargs)
                    return
                except ModelBusy:
                    self._lost(state)
                    raise
                except sqlite3.OperationalError as exc:
                    reason = f"the state store refuses writes: {exc}"
                    log.warning("onboarding %s stalled: %s; trying again in %.0fs", state.model,
                                reason, delay)
                    state.resume_at = max(state.resume_at, self.clock() + delay)
                    await self._set_status(state, "stalled", reason)
                    await self.sleep(delay)
                    delay = min(opts.backoff_max_s, delay * 2)
        finally:
            state.storing -= 1

    async def _set_status(self, state: _Run, status: str, reason: str | None = None) -> None:
        """A status change along the way (stalled, running again): one the store refuses now is
        only logged, the run goes on and the next change says it."""
        state.stalled = status == "stalled"
        try:
            # one at a time, in the order the run's workers decided them: two writes at once on
            # the store's threads may land in either order, the earlier decision last
            async with state.saying:
                await self._store(self.store.set_status, state.model, status, reason,
                                  suite=self.suite.name, leased=True)
            self.unstored.pop(state.model, None)
        except ModelBusy:
            self._lost(state)
            raise
        except sqlite3.OperationalError as exc:
            log.warning("onboarding %s: cannot record the status %s: %s", state.model, status, exc)
            self.unstored[state.model] = (status, reason)

    def _lost(self, state: _Run) -> None:
        """The run's lease is gone (this process stalled past ``LEASE_STALE_S`` and another one
        took the model over): every worker stops; logged once."""
        if not state.lease_lost:
            log.error("onboarding %s: another process took it over; stopping", state.model)
        state.lease_lost = True

    async def _still_held(self, state: _Run) -> bool:
        """Before a new question: the lease, checked when the last heartbeat is late (the event
        loop was held up, maybe past ``LEASE_STALE_S``), so that a run taken over asks nothing
        more. A store locked now counts as held: the lease outlasts a few beats."""
        if self.clock() - state.beat_at <= self.options.heartbeat_s:
            return True
        try:
            held = await self._store(self.store.heartbeat, state.model)
        except sqlite3.OperationalError:
            return True
        if not held:
            self._lost(state)
            return False
        state.beat_at = self.clock()
        return True

    async def _heartbeat(self, state: _Run) -> None:
        """Refresh the run's lease every ``heartbeat_s``. A lease found taken (this process
        stalled past ``LEASE_STALE_S`` and another one took the model over) stops the run."""
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            try:
                held = await self._store(self.store.heartbeat, state.model)
            except sqlite3.OperationalError as exc:  # locked now: the lease outlasts a few beats
                log.warning("onboarding %s: cannot refresh the lease: %s", state.model, exc)
                continue
            if not held:
                self._lost(state)
                return
            state.beat_at = self.clock()
            await self._quiet(state)

    async def _quiet(self, state: _Run) -> None:
        """Say ``stalled`` when questions are out and none has been answered for ``give_up_s``
        (an upstream that accepts requests and never answers fails each only at its timeout,
        five minutes by default, and showed ``running`` all along); the next answer says
        ``running`` again."""
        waited = self.clock() - state.answered_at
        if state.quiet or not state.in_flight or state.failures or waited < self.options.give_up_s:
            return
        state.quiet = True
        reason = (f"no answer for {waited:.0f}s; {state.in_flight} question"
                  f"{'' if state.in_flight == 1 else 's'} waiting on the upstream")
        log.warning("onboarding %s stalled: %s", state.model, reason)
        await self._set_status(state, "stalled", reason)

    async def _worker(self, state: _Run) -> None:
        try:
            await self._asking(state)
        finally:  # a worker that stops lets the others waiting for a turn see why
            state.workers -= 1
            state.pace.wake()

    async def _asking(self, state: _Run) -> None:
        pace = state.pace
        while state.queue and not state.stopping and not self.draining:
            if not self._repriced(state):
                return
            if not await self._still_held(state) or self.draining:  # (that may have waited on the store)
                return
            if not state.queue:  # another worker took the last question meanwhile
                continue
            if pace.resume_at > self.clock() and state.held_until != pace.resume_at:
                # the upstream said to wait (maybe to another model on its account): say so
                if pace.told != state.model and not state.held_until:  # its own is said as it fails
                    log.info("onboarding %s held: %s", state.model, self._held(state))
                state.held_until = pace.resume_at
                state.said_in_line = False  # the status says the hold now, not the wait in line
                await self._set_status(state, "stalled", self._held(state))
                continue
            if state.held_until and pace.resume_at <= self.clock():
                state.held_until = 0.0
                if state.stalled:
                    log.info("onboarding %s: the upstream's hold is over, resuming", state.model)
                    await self._set_status(state, "running")
                continue
            # from here to the ask, nothing awaits: what is checked is what holds when it is sent
            wait = max(state.resume_at, pace.resume_at) - self.clock()
            if wait > 0:  # the upstream is down, or said to wait: everyone waits for it to end
                await self.sleep(wait)
                continue
            # as many questions in flight as the upstream is asked at once now, or another
            # model's run on its account, begun earlier, has the turn
            ahead = pace.ahead_of(state, self.clock())
            if pace.full or ahead is not None:
                if state.in_flight == 0:
                    if state.in_line_since is None:
                        state.in_line_since = self.clock()
                    if ahead is not None and not state.said_in_line and not state.held_until:
                        # not a stale failure's "stalled", nor "running" unsaid (again after a
                        # hold, which said itself); not during a hold, which another worker of the
                        # run has just said (one worker's wait in line wrote over it)
                        await self._set_status(
                            state, "running", f"waiting for {ahead.model}, begun earlier on its "
                            "provider account: its models are onboarded one after another")
                        state.said_in_line = True
                        continue  # that awaited: what holds now is looked at again
                await pace.freed()
                continue
            if state.said_in_line:  # its turn: the status says so before it asks
                state.said_in_line = False
                await self._set_status(state, "running")
                continue
            question = state.queue.popleft()
            if not state.queue:  # the runs after it in line may take the places left
                pace.wake()
            if state.in_line_since is not None:  # what "no answer for" counts, less its wait in line
                waited, state.in_line_since = self.clock() - state.in_line_since, None
                state.started += waited
                state.answered_at += waited
                state.first_failure += waited
            if not state.asked:  # counted from its first ask
                state.asked = True
                state.started = state.answered_at = self.clock()
            state.in_flight += 1
            paced = pace.take()  # how fast the upstream was asked when this ask went
            state.asking.add(question.id)
            epoch = state.epoch  # which backoff this ask started under
            params = state.params
            try:
                said = await self._ask(state, messages_for(question), params, prompt_tokens(question))
            except RunCancelled as exc:
                state.queue.appendleft(question)
                state.cancelled = str(exc)
                return
            except UpstreamClientError as exc:
                adapted = adapted_params(params, exc)
                if adapted is not None:  # asked again, as the model takes it; not the prompt's fault
                    if state.params is params:
                        log.warning("onboarding %s: the model refuses %s; asking with %s", state.model,
                                    sorted(params), sorted(adapted))
                        state.params = adapted
                    state.queue.appendleft(question)
                    continue
                if exc.unfit == "unsupported_params":  # the run's parameters: every ask would fail
                    state.queue.appendleft(question)
                    state.fatal = f"the model cannot take the run's parameters: {exc.message}"
                    return
                if refuses_the_model(exc):
                    state.queue.appendleft(question)
                    state.fatal = f"the upstream refused the request: {exc.message}"
                    return
                await self._refused(state, question, exc)
                continue
            except TRANSIENT as exc:
                reason = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                # a rate limit says how fast the upstream is asked, nothing of the question
                limited = getattr(exc, "slow_down", False) is True
                if limited or not await self._give_up_on(state, question, reason):
                    state.queue.append(question)  # asked again after the backoff
                    if limited:
                        pace.slow_down(paced)
                    # a 503's Retry-After too, not only a 429's (RFC 9110: both say when)
                    told = getattr(exc, "upstream_retry_after", None)
                    await self._failed(state, reason, epoch,
                                       told if told is not None else getattr(exc, "retry_after", None),
                                       timeout=isinstance(exc, TimeoutError) or getattr(exc, "timeout", False),
                                       limited=limited)
                continue
            finally:
                state.in_flight -= 1
                pace.release()
                state.asking.discard(question.id)
            pace.answered(paced)
            await self._answered(state, question, said, answer_budget(params, self.options.max_tokens))

    async def _ask(self, state: _Run, messages: list[dict], params: dict, prompt: int) -> Said:
        """One ask of the run. The attempts it sent that the upstream may have billed with no
        answer back (``Said.unanswered``; a failure's, ``unanswered``) count for the spend and the
        cap at once, each as ``prompt`` tokens in and the whole answer budget the ask allowed out
        (``max_tokens``): nothing of their answer came to measure, and it may have run to that
        limit (a timed-out one likely did), so the expected answer length could count less than
        was billed; the budget never does (an upstream bills no more than it was allowed). An ask
        cancelled (the run stops: its model left providers.yaml or changed upstream, the proxy's
        stop, a signal) counts the attempts it sent as well, the one out when it came included,
        before the cancellation goes on (``_spend_cut``)."""
        def lost(attempts: int) -> float:  # at the prices of when the ask came back
            return attempts * state.prices.cost(prompt, answer_budget(params, self.options.max_tokens))

        try:
            said = await self.asker.ask(state.model, messages, **params)
        except TRANSIENT as exc:
            await self._spend(state, lost(unanswered(exc)))
            raise
        except asyncio.CancelledError as exc:
            await self._spend_cut(state, lost(unanswered(exc)))
            raise
        said = said if isinstance(said, Said) else Said(said or "")
        await self._spend(state, lost(said.unanswered))
        return said

    async def _spend(self, state: _Run, cost: float) -> None:
        """Count ``cost`` (USD) of requests that brought no answer to store (attempts unanswered,
        a probe) for the spend, stored as the answers' is, and for the cap."""
        if not cost:
            return
        state.spent += cost
        await self._write(state, self.store.add_spend, state.model, cost, leased=True)
        self._capped(state)

    async def _spend_cut(self, state: _Run, cost: float) -> None:
        """Count ``cost`` (USD) of asks a cancellation cut for the spend, stored while the run
        stops. Tried once: a store that refuses it (locked past the busy timeout, the lease taken
        over) is logged, not waited out, since the run must stop; a second cancellation meanwhile
        waits for the write to end (``_store``)."""
        if not cost:
            return
        state.spent += cost
        try:
            await self._store(self.store.add_spend, state.model, cost, leased=True)
        except (ModelBusy, sqlite3.Error) as exc:
            log.warning("onboarding %s: cannot store the $%.4f its asks cut by the stop may have "
                        "cost: %s", state.model, cost, exc)

    def _capped(self, state: _Run) -> None:
        """Stop the run (``fatal``) once its spend passed the cap."""
        cap = self.options.spend_cap_usd
        if cap is not None and state.spent > cap and state.fatal is None:
            state.fatal = f"spend cap ${cap:.2f} reached after ${state.spent:.2f}"

    def _repriced(self, state: _Run) -> bool:
        """The run's prices as providers.yaml gives them now: an edit mid-run counts the rest of
        the run at the new prices, with the asks in flight kept (they are paid for), and the
        spend cap checked again on the estimate for what is left. False when that is over it."""
        prices = state.price_now()
        if prices == state.prices:
            return True
        state.prices = prices
        cap = self.options.spend_cap_usd
        left = estimate_cost(state.queue, prices, self.options)
        if cap is not None and state.spent + left > cap:
            state.fatal = (f"estimated cost ${left:.2f} for {len(state.queue)} questions plus "
                           f"${state.spent:.2f} already spent exceeds the spend cap ${cap:.2f} "
                           "(prices changed mid-run)")
            return False
        log.info("onboarding %s: going on at the new prices", state.model)
        return True

    async def _answered(self, state: _Run, question: Question, said: Said, budget: int) -> None:
        text = said.text
        if not text.strip() and said.reasoning.strip() and not (said.cut_off or said.filtered):
            # the content empty and the model's text in its reasoning, finished: a server's
            # reasoning parser holds all of it when the model never closed its thinking (vLLM's
            # deepseek_r1 gives content null): graded by its conclusion, stored so (a re-grade
            # reads the same), and said, rather than a profile of zeros that says nothing
            text = reasoning_conclusion(said.reasoning, len(question.options))
            state.from_reasoning += 1
            if state.from_reasoning == 1:
                log.warning("onboarding %s: an answer came back with empty content and the model's "
                            "text in its reasoning (reasoning_content); graded from the reasoning: "
                            "check the server's reasoning parser", state.model)
        letter = extract_answer(text, len(question.options))
        if said.filtered and letter is None:  # a safety block: no sign of the answer's form
            state.filtered += 1
        elif said.cut_off and letter is None:  # a reasoning model's budget spent before its answer
            state.cut_off += 1
            if state.cut_off == 1:
                log.warning("onboarding %s: an answer was cut off at max_tokens=%d before it stated a "
                            "letter (graded wrong); a reasoning model needs a larger "
                            "SATROUTE_ONBOARDING_MAX_TOKENS", state.model, self.options.max_tokens)
        cost = state.prices.cost(*said.billed(question, budget))
        await self._write(state, self.store.record, state.model,
                          GradedAnswer(question.id, letter, _right(question, letter), text), cost,
                          leased=True)
        # an answer to a question sent before the upstream said to wait: the run still waits
        if state.stalled and self.clock() >= state.pace.resume_at:
            log.info("onboarding %s: answers are stored again, resuming", state.model)
            await self._set_status(state, "running")
        state.failures, state.ever_answered, state.quiet = 0, True, False
        state.answered_at = self.clock()
        state.answers += 1
        state.refused_in_a_row = 0
        state.failed_since_answer.clear()
        state.spent += cost
        self._capped(state)
        self._tick(state)

    async def _no_answer(self, state: _Run, question: Question) -> None:
        """Grade ``question`` as no answer (wrong): it could not be asked, and the run moves on."""
        await self._write(state, self.store.record, state.model,
                          GradedAnswer(question.id, None, False, None), leased=True)
        self._tick(state)

    def _tick(self, state: _Run) -> None:
        if self.on_progress is not None:
            self.on_progress(state.model, len(self.questions) - len(state.queue) - state.in_flight
                             - state.storing, len(self.questions))

    async def _refused(self, state: _Run, question: Question, exc: UpstreamClientError) -> None:
        """A 4xx about this one prompt (content filter, context length): no answer, unless the
        upstream refuses everything (then the run fails, and nothing refused was recorded)."""
        state.refused_in_a_row += 1
        limit = self.options.refusals_in_a_row
        if state.refused_in_a_row >= limit:
            state.queue.appendleft(question)
            state.fatal = (f"the upstream refused {limit} requests in a row "
                           f"(HTTP {exc.status}): {exc.message}")
            return
        if not state.answers:  # nothing answered in this run yet: it may refuse every request
            state.queue.append(question)  # so ask this one again after the others
            return
        log.warning("onboarding %s: the upstream refused question %s (HTTP %s: %s); graded as no "
                    "answer", state.model, question.id, exc.status, exc.message)
        await self._no_answer(state, question)

    async def _model_answers(self, state: _Run) -> bool:
        """Whether the model answers now, when every question left has failed since its last
        answer (two questions that always fail, left last, fail in turn: neither failed alone,
        and nothing else was left to answer, so the run stalled for ever). Asked with a probe of
        a few tokens that is no question of the test (no stored answer is asked again); its cost
        counts for the spend. False at once while another worker probes."""
        if state.probing or self.draining:
            return False
        cap = "max_completion_tokens" if "max_completion_tokens" in state.params else "max_tokens"
        state.probing = True
        try:
            said = await self._ask(state, [{"role": "user", "content": PROBE}],
                                   {**state.params, cap: PROBE_TOKENS}, approx_tokens(PROBE))
        except UpstreamClientError:  # a refusal of the probe itself (its few tokens under a
            return True  # thinking budget, say) is an answer: the model is up
        except (*TRANSIENT, RunCancelled):
            return False  # still down (a cancellation is seen by the next ask)
        finally:
            state.probing = False
        await self._spend(state, state.prices.cost(max(said.prompt_tokens or 0, approx_tokens(PROBE)),
                                                   max(said.completion_tokens or 0, PROBE_TOKENS)))
        return True

    async def _give_up_on(self, state: _Run, question: Question, reason: str) -> bool:
        """Count a transient failure against ``question`` when it is the only question failing
        while the model answers others, or, when no other question is left to be answered, when
        the model answers a probe (``_model_answers``): a failure of several questions is an
        outage, not theirs. After ``question_attempts`` of them it is graded as no answer. True
        when given up."""
        state.failed_since_answer.add(question.id)
        if not state.ever_answered:
            return False
        if {q.id for q in state.queue} | state.asking <= state.failed_since_answer:
            # nothing left that may still be answered (this question alone, or those that always
            # fail, left last): whether the model answers at all is asked, not inferred
            if not await self._model_answers(state):
                return False
        elif state.failed_since_answer != {question.id}:
            return False
        state.strikes[question.id] += 1
        attempts = self.options.question_attempts
        if state.strikes[question.id] < attempts:
            return False
        log.warning("onboarding %s: question %s failed %d times while the model answered others "
                    "(last: %s); graded as no answer", state.model, question.id, attempts, reason)
        state.failed_since_answer.discard(question.id)  # graded: it keeps no other from counting
        await self._no_answer(state, question)
        return True

    async def _failed(self, state: _Run, reason: str, epoch: int | None = None,
                      retry_after: float | None = None, timeout: bool = False,
                      limited: bool = False) -> None:
        """A transient failure of an ask that started under backoff ``epoch``. Only an ask started
        after the last counted failure counts (so an outage that fails every request in flight at
        once is one failure, not ``concurrency`` of them); None: count it. No ask goes out to the
        upstream again before its ``retry_after`` (seconds), when it gave one, nor, when it said
        it limits how fast it is asked (``limited``: a 429, 503, 529), before the backoff ends."""
        now = self.clock()
        opts = self.options
        if state.failures == 0:
            state.first_failure = now
        counted = state.failures == 0 or epoch is None or epoch == state.epoch
        if counted:
            state.epoch += 1
            state.failures += 1
            delay = min(opts.backoff_max_s, opts.backoff_s * 2 ** min(state.failures - 1, 20))
            state.resume_at = max(state.resume_at, now + delay)
        if retry_after is not None:  # whichever ask it came with: the upstream said when
            state.pace.hold(now, now + min(retry_after, opts.backoff_max_s), retry_after, state.model)
        elif limited:
            state.pace.hold(now, state.resume_at, None, state.model)
        if counted and (state.failures == 1 or state.failures % 10 == 0):
            if retry_after is not None and state.failures < 10:
                # a wait the upstream named, which the run keeps by itself: routine, one line
                # with its end (a rate limit an account meets every few minutes is no warning)
                log.info("onboarding %s held: %s (%s)", state.model, self._held(state), reason)
            else:
                log.warning("onboarding %s stalled (%d failures): %s", state.model,
                            state.failures, reason)
        # a timeout counts from the run's start (the ask waited all along: a hung upstream's first
        # failure comes at its timeout, and counting from it doubled the wait); another failure
        # from the first one (a slow model's answers may be on their way past one 429)
        since = state.started if timeout else state.first_failure
        if not state.ever_answered and now - since >= opts.give_up_s:
            # nothing answered since the run began: the first failure heard of may have come
            # long after (a gateway's 500s after dispatch's attempts, each waiting on the model)
            state.fatal = f"no answer for {now - state.started:.0f}s: {reason}"
            return
        # the status says the hold (its end is when it says running again), or this failure alone
        state.held_until = state.pace.resume_at if limited and state.pace.resume_at > now else 0.0
        if state.held_until:
            reason = f"{reason}; {self._held(state)}"
        await self._set_status(state, "stalled", reason)

    def _held(self, state: _Run) -> str:
        """What the status of ``state``'s run says of the hold on its upstream (``_Pace.hold``):
        how long the upstream asked to wait, and when the run resumes (UTC; its own backoff may
        end later)."""
        pace, now = state.pace, self.clock()
        until = max(state.resume_at, pace.resume_at)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + until - now))
        held = pace.resume_at - pace.held_at
        said = ("limits how fast it is asked" if pace.said is None
                else f"asked to wait {round(pace.said, 1):g}s (Retry-After)")
        told = ("" if pace.told == state.model
                else f" when asked for {pace.told}, another model on its provider account")
        longest = (f" after {round(held, 1):g}s, the longest hold," if pace.said is not None
                   and pace.said > held + 0.5 else "")
        return f"the upstream {said}{told}; resuming{longest} at {at}"


# The share of answers stating no letter in the graded form above which a profile is flagged. The
# five zoo models whose answers are recorded (asked with MMLU-Pro's 5-shot prompt) state none in
# 8.7% (Llama-3.1-8B-Instruct) to 23.4% (Qwen1.5-7B-Chat) of them, 15.9% overall
# (tests/onboarding/test_grading_data.py): above all of them, a model's format, not its knowledge,
# is likely what the grading missed.
NO_LETTER_SHARE = 0.30


def _understated(state: _Run, max_tokens: int, letters: Sequence[str | None], empty: int = 0) -> str | None:
    """What the status's reason says of a finished run whose profile may understate its model:
    answers of this run cut off at ``max_tokens`` or withheld by a content filter, or graded from
    their reasoning (their content empty); stored answers that are empty (``empty`` of them, past
    ``NO_LETTER_SHARE``); and, over all its
    stored answers that hold text (``letters``, earlier runs' too: the profile is made of them),
    answers in a form the grading does not read."""
    notes = []
    if state.cut_off:
        notes.append(f"{state.cut_off} of {state.answers} answers of this run were cut off at "
                     f"max_tokens={max_tokens} before they stated a letter (graded wrong; a model that "
                     "reasons at length needs a larger SATROUTE_ONBOARDING_MAX_TOKENS)")
    if state.filtered:
        notes.append(f"{state.filtered} of {state.answers} answers of this run were withheld by the "
                     "provider's content filter (finish_reason content_filter; graded wrong)")
    if state.from_reasoning:
        notes.append(f"{state.from_reasoning} of {state.answers} answers of this run came back with empty "
                     "content and the model's text in its reasoning (reasoning_content), and were graded "
                     "from it: the server's reasoning parser may be holding back the model's answers")
    unexplained = empty - state.cut_off - state.filtered  # those this run's notes above do not name
    if unexplained > NO_LETTER_SHARE * (len(letters) + empty):
        notes.append(f"{unexplained} of its {len(letters) + empty} stored answers are empty (graded wrong): "
                     "stored before this version graded a reasoning model's text returned as reasoning "
                     "only, or cut off or withheld in an earlier run; `satroute onboard --restart` asks "
                     "them again")
    none = sum(letter is None for letter in letters)
    if letters and none / len(letters) > NO_LETTER_SHARE:
        notes.append(f"{none} of its {len(letters)} answers stated no letter as 'the answer is (X)' "
                     "(graded wrong), more than any zoo model whose answers are recorded (9% to 23%): "
                     "its profile may understate it")
    return "; ".join(notes) or None


def status_of(progress: Progress | None) -> dict:
    """A model's status as the admin API shows it (``pending`` when nothing is stored yet)."""
    if progress is None:
        return {"status": "pending", "reason": None, "questions_done": 0, "questions_total": 0,
                "accuracy_so_far": None}
    return progress.to_json()


# -- satroute onboard --config FILE MODEL ------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("model", help="the model_name in providers.yaml to onboard")
    parser.add_argument("--config", help="providers.yaml (default: SATROUTE_CONFIG or ./providers.yaml)")
    parser.add_argument("--state-dir", help="state folder (default: SATROUTE_STATE_DIR or ./state)")
    parser.add_argument("--data", help="folder with the questions' prompts.jsonl.gz "
                        "(e.g. ../shared/data/mmlu_pro); default: the routing data if present, "
                        "else MMLU-Pro from the Hugging Face hub")
    parser.add_argument("--no-hub", action="store_true", help="never fetch questions from the hub")
    parser.add_argument("--suite", default=None, help="aptitude suite (default mmlu_pro)")
    parser.add_argument("--concurrency", type=int, default=None, help="questions in flight (default 8)")
    parser.add_argument("--spend-cap", type=float, default=None,
                        help="USD; refuse to start above this estimate (default 20; <0: no cap)")
    parser.add_argument("--restart", action="store_true",
                        help="forget the model's stored answers, profile and spend first")


def run(args) -> int:
    """Run the same onboarding as the proxy, with a progress bar. Exit status: 0 when the profile
    is stored, 1 when the run failed, 2 for a usage or configuration error (a model another process
    onboards now included), 130 / 143 when interrupted by SIGINT / SIGTERM (the next run resumes)."""
    from pydantic import ValidationError

    from proxy.providers import env_references
    from proxy.settings import Settings, describe_invalid, unknown_variables, warn_unknown_variables

    overrides = {k: v for k, v in (("config", args.config), ("state_dir", args.state_dir),
                                   ("onboarding_data", args.data), ("onboarding_suite", args.suite),
                                   ("onboarding_concurrency", args.concurrency),
                                   ("onboarding_spend_cap_usd", args.spend_cap)) if v is not None}
    if args.no_hub:
        overrides["onboarding_hub"] = False
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        flags = {"config": "--config", "state_dir": "--state-dir", "onboarding_data": "--data",
                 "onboarding_suite": "--suite", "onboarding_concurrency": "--concurrency",
                 "onboarding_spend_cap_usd": "--spend-cap", "onboarding_hub": "--no-hub"}
        print(f"satroute onboard: invalid settings: {describe_invalid(exc, {k: flags[k] for k in overrides})}",
              file=sys.stderr)
        return 2
    # the master key's misspellings included: this command serves nothing, so a warning is enough
    warn_unknown_variables(unknown_variables(os.environ, env_references(settings.config)))
    try:
        return asyncio.run(_run_cli(settings, args.model, args.restart))
    except (ConfigError, ValueError) as exc:
        print(f"satroute onboard: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # the state store broke mid-run (what is stored stays stored)
        print(f"satroute onboard: the state store failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the run could catch it (starting up, or a second Ctrl-C)
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


async def _run_cli(settings, model: str, restart: bool) -> int:
    try:
        store = Store(settings.state_dir)
    except (OSError, sqlite3.Error) as exc:
        print(f"satroute onboard: {unopenable(settings.state_dir, exc)}", file=sys.stderr)
        return 2
    with store:  # closing it gives up the lease on the model, however the command ends
        try:
            return await _onboard_cli(settings, store, model, restart)
        except UpstreamInUse as exc:
            print(f"satroute onboard: {exc}; point {model} at the same upstream in "
                  f"{settings.config}, or stop that proxy, then run this again", file=sys.stderr)
            return 2
        except ModelBusy as exc:
            print(f"satroute onboard: {exc}; wait for that run to end (GET /admin/onboarding "
                  "shows its progress) or stop it, then run this again", file=sys.stderr)
            return 2


async def _in_daemon_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call`` on a thread of its own that does not hold the process up: an interrupted command
    exits at once, not when a download of the questions ends (``asyncio.to_thread``'s pool is
    waited for at exit)."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()

    def settle(outcome: BaseException | None, value: Any = None) -> None:
        if not result.done():
            result.set_exception(outcome) if outcome is not None else result.set_result(value)

    def work() -> None:
        try:
            value, outcome = call(*args, **kwargs), None
        except BaseException as exc:  # handed to the awaiting coroutine
            value, outcome = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome, value)

    threading.Thread(target=work, name="satroute-load", daemon=True).start()
    return await result


async def _onboard_cli(settings, store: Store, model: str, restart: bool) -> int:
    """The command once the store is open; raises ``ModelBusy`` when another process holds the
    model. SIGINT and SIGTERM stop the run: the model is left ``pending`` ("interrupted"), and the
    exit status is 128 + the signal."""
    from tqdm import tqdm

    from proxy.cooldown import Cooldowns
    from proxy.dispatch import RetryingDispatcher
    from proxy.localserver import KEY_FILE, published_key
    from proxy.onboarding_service import DispatchAsker, prices_of, service_options
    from proxy.providers import ProviderRegistry, fingerprints, plain_fingerprint
    from proxy.questions import load_questions
    from proxy.settings import environ
    from scorer.aptitude import load_suite

    # a local model's server is the serving proxy's, and answers only with the key it published
    local_key = published_key(store.dir)
    registry = ProviderRegistry(settings.config, environ, store, local_key=local_key)
    d = registry.snapshot.models.get(model)
    if d is None:
        print(f"satroute onboard: no model {model!r} in {settings.config}", file=sys.stderr)
        return 2
    if d.info.local_server is not None and local_key is None:
        print(f"satroute onboard: {model} is served by satroute serve, whose local server answers "
              f"only with the key it keeps in {store.dir / KEY_FILE}, and there is none: start "
              "satroute serve with the same state directory, then run this again", file=sys.stderr)
        return 2
    if not d.available:
        print(f"satroute onboard: {model} is unavailable: {d.unavailable}", file=sys.stderr)
        return 2
    if d.info.capability_profile:  # routing reads that one: a test would be paid for nothing
        print(f"satroute onboard: {model} has model_info.capability_profile "
              f"({d.info.capability_profile}) in {settings.config}, which routing uses; remove it "
              "to have the model tested and routed on its measured profile", file=sys.stderr)
        return 2
    await asyncio.to_thread(store.claim, model)  # before anything is forgotten, printed or asked
    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    received: list[int] = []

    def interrupt(signum: int) -> None:
        if not received:  # a second signal does not cut short what the first one is finishing
            main.cancel()
        received.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    suite = bar = dispatcher = None
    try:
        # on threads: the signal handlers above run only while the event loop does
        if restart and (dropped := await asyncio.to_thread(store.forget, model)):
            print(f"satroute onboard: --restart: the stored answers and profile of {model}, and the "
                  f"${dropped:.2f} spent on its onboarding, were forgotten: the spend cap counts from "
                  "$0 again", file=sys.stderr)
        upstream, legacy, also = fingerprints(d)
        plain = plain_fingerprint(d)
        if await asyncio.to_thread(store.upstream_changed, model, upstream, legacy, also, plain):
            kept = await asyncio.to_thread(store.forget, model, moved=True)
            print(f"satroute onboard: {model} now points at another upstream ({d.model}): "
                  f"its stored answers and profile were forgotten{spend_kept(kept)}", file=sys.stderr)
        suite = load_suite(settings.onboarding_suite)
        questions = await _in_daemon_thread(
            load_questions, suite.question_ids, suite.name, settings.onboarding_data,
            hub=settings.onboarding_hub, cache_dir=store.dir)
        dispatcher = RetryingDispatcher(Cooldowns())
        bar = tqdm(total=len(suite.question_ids), desc=f"onboarding {model}", unit="q",
                   initial=len(store.answered(model)))

        def tick(_model: str, done: int, total: int) -> None:
            bar.update(max(0, done - bar.n))

        engine = Onboarding(store, suite, questions, DispatchAsker(registry, dispatcher),
                            service_options(settings), on_progress=tick)
        progress = await engine.run(model, prices_of(d), upstream, legacy, also=also, plain=plain)
    except asyncio.CancelledError:
        if not received:
            raise
        if bar is not None:
            bar.close()  # before the line below, not after it
            bar = None
        ids = suite.question_ids if suite is not None else None
        stored = store.progress(model, ids)
        if stored is not None and stored.status in ("running", "stalled"):
            store.set_status(model, "pending", "interrupted")
        total = len(ids) if ids is not None else 0
        print(f"interrupted: {stored.done if stored else 0}/{total} answers stored; run the same "
              "command to resume", file=sys.stderr)
        return 128 + received[0]
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if bar is not None:
            bar.close()
        if dispatcher is not None:
            await dispatcher.close()
    acc = "n/a" if progress.accuracy is None else f"{progress.accuracy:.1%}"
    print(f"{model}: {progress.status}{' (' + progress.reason + ')' if progress.reason else ''}; "
          f"{progress.done}/{progress.total} questions, accuracy {acc}; state in {store.path}")
    return 0 if progress.status == "done" else 1
