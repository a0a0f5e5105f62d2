"""Prometheus metrics of one proxy instance, in a registry the app owns (no module-level collectors).

Owns: the metric names, labels and buckets, the small ``observe_*`` methods the rest of the proxy
calls, and the ``GET /metrics`` endpoint that renders the registry in Prometheus' text format.

Does not know: where the events come from. The request log middleware (``proxy.logs``) reports each
finished request (``observe_request``); dispatch reports upstream latency, retries, fallbacks and
cooldowns; routing reports decisions and scorer latency; onboarding reports progress; the local
server supervisor reports restarts. Each app builds its own ``Metrics`` so tests and several apps in
one process never share counters.

Names (all prefixed ``satroute_``):
    requests_total{model,status}             finished chat completions by answering model
    stream_errors_total{model}               streams that began (200) and ended in an error event
    in_flight_requests                       requests being served right now
    routing_decisions_total{model}           ``auto`` requests routed to each model
    scorer_latency_seconds                   one Model-SAT scoring call (that ran)
    scorer_remembered_total                  routed with an identical request's scores (no new call)
    scorer_degraded_total{reason}            routed by the profiles' means: scorer failed, timed out or is stalled
    upstream_latency_seconds{model}          one upstream call, to the first byte for streams
    fallbacks_total{from_model,to_model}     a failed model handed the request to the next-ranked
    retries_total{model}                     retried upstream attempts
    cooldowns_total{model}                   a model put in cooldown
    onboarding_questions_answered{model}     graded aptitude answers stored so far
    onboarding_questions{model}              questions in that model's aptitude test
    onboarding_state{model,state}            1 for the model's current state, 0 for the others
    local_server_up{name}                    1 while a managed local server answers
    local_server_restarts_total{name}        restarts of a managed local server (and retries of a failed start)
    config_rejected                          1 while providers.yaml on disk is not what is served (unreadable, or its edit rejected)
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import Response

# Scoring on a CPU takes tens to hundreds of milliseconds, on a GPU a few.
SCORER_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# where chat completions are served (the second for clients given the bare host as base URL)
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
# Upstream calls range from a loopback mock (ms) to long generations (minutes).
UPSTREAM_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ONBOARDING_STATES = ("pending", "running", "stalled", "failed", "done")


class Metrics:
    """All collectors of one app, registered in its own ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "satroute"):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._gone: set[str] = set()  # models that left providers.yaml: not counted (forget_model)
        r, p = self.registry, prefix
        self.requests = Counter(f"{p}_requests", "Finished requests by routed model and status",
                                ["model", "status"], registry=r)
        self.stream_errors = Counter(f"{p}_stream_errors",
                                     "Streamed answers that began and then ended in an error event "
                                     "(the upstream's stream was cut short)", ["model"], registry=r)
        self.in_flight = Gauge(f"{p}_in_flight_requests", "Requests being served now", registry=r)
        self.routing_decisions = Counter(f"{p}_routing_decisions",
                                         "Requests for the router's name routed to each model",
                                         ["model"], registry=r)
        self.scorer_latency = Histogram(f"{p}_scorer_latency_seconds",
                                        "Time of one scoring call over all candidates",
                                        buckets=SCORER_BUCKETS, registry=r)
        self.scorer_remembered = Counter(f"{p}_scorer_remembered",
                                         "Routed requests given the scores of another request with the "
                                         "same instruction and candidates (remembered, or being scored when "
                                         "it came): no scoring call of their own", registry=r)
        self.scorer_degraded = Counter(f"{p}_scorer_degraded",
                                       "Routed requests ranked by the profiles' means because the scorer "
                                       "failed, timed out or is stalled", ["reason"], registry=r)
        self.upstream_latency = Histogram(f"{p}_upstream_latency_seconds",
                                          "Upstream call time (to the first byte for streams)",
                                          ["model"], buckets=UPSTREAM_BUCKETS, registry=r)
        self.fallbacks = Counter(f"{p}_fallbacks", "Requests handed to the next-ranked model",
                                 ["from_model", "to_model"], registry=r)
        self.retries = Counter(f"{p}_retries", "Retried upstream attempts", ["model"], registry=r)
        self.cooldowns = Counter(f"{p}_cooldowns", "Models put in cooldown", ["model"], registry=r)
        self.onboarding_answered = Gauge(f"{p}_onboarding_questions_answered",
                                         "Graded aptitude answers stored", ["model"], registry=r)
        # not ``_total``: Prometheus keeps that suffix for counters
        self.onboarding_total = Gauge(f"{p}_onboarding_questions",
                                      "Questions in the model's aptitude test", ["model"],
                                      registry=r)
        self.onboarding_state = Gauge(f"{p}_onboarding_state",
                                      "1 for the model's current onboarding state",
                                      ["model", "state"], registry=r)
        self.local_server_up = Gauge(f"{p}_local_server_up", "1 while the local server answers",
                                     ["name"], registry=r)
        self.local_server_restarts = Counter(f"{p}_local_server_restarts",
                                             "Restarts (and start retries) of a managed local server", ["name"],
                                             registry=r)
        self.config_rejected = Gauge(f"{p}_config_rejected",
                                     "1 while providers.yaml on disk is not the configuration served: "
                                     "it cannot be read, or its last edit was rejected", registry=r)

    # -- what the rest of the proxy calls -------------------------------------------------------

    def observe_request(self, model: str | None, status: int) -> None:
        if model not in self._gone:
            self.requests.labels(model=model or "none", status=str(status)).inc()

    def observe_record(self, record) -> None:
        """A finished request from the request log middleware (``proxy.logs.RequestRecord``):
        chat completions are counted by the model that answered and status. A request no model
        answered counts under ``none``: the name a client sent is never a label (a client could
        otherwise grow the registry without bound)."""
        if record.method == "POST" and record.path in CHAT_PATHS:  # not a GET's 405, nor a 404 elsewhere
            self.observe_request(record.routed_model, record.status)
            if (record.stream and record.status == 200 and record.upstream_error  # not a client leaving
                    and record.routed_model not in self._gone):
                self.stream_errors.labels(model=record.routed_model or "none").inc()

    def observe_routing(self, model: str, remembered: bool = False) -> None:
        if model not in self._gone:
            self.routing_decisions.labels(model=model).inc()
        if remembered:
            self.scorer_remembered.inc()

    def observe_scoring(self, seconds: float) -> None:
        """One scoring call that ran, from the scorer's thread (prometheus_client is thread-safe)."""
        self.scorer_latency.observe(seconds)

    def observe_degraded(self, reason: str) -> None:
        self.scorer_degraded.labels(reason=reason).inc()

    def observe_upstream(self, model: str, seconds: float) -> None:
        if model not in self._gone:
            self.upstream_latency.labels(model=model).observe(seconds)

    def observe_fallback(self, from_model: str, to_model: str) -> None:
        if not {from_model, to_model} & self._gone:
            self.fallbacks.labels(from_model=from_model, to_model=to_model).inc()

    def observe_retry(self, model: str) -> None:
        if model not in self._gone:
            self.retries.labels(model=model).inc()

    def observe_cooldown(self, model: str) -> None:
        if model not in self._gone:
            self.cooldowns.labels(model=model).inc()

    def observe_onboarding(self, model: str, answered: int, total: int, state: str) -> None:
        self.onboarding_answered.labels(model=model).set(answered)
        self.onboarding_total.labels(model=model).set(total)
        states: Iterable[str] = ONBOARDING_STATES if state in ONBOARDING_STATES else (
            *ONBOARDING_STATES, state)
        for s in states:
            self.onboarding_state.labels(model=model, state=s).set(1 if s == state else 0)

    def forget_onboarding(self, model: str) -> None:
        """Drop a model's onboarding series (it left providers.yaml): a gauge of a model that is no
        longer configured would show its last state for ever."""
        self.onboarding_answered.remove(model)
        self.onboarding_total.remove(model)
        states = {s.labels["state"] for m in self.onboarding_state.collect() for s in m.samples
                  if s.labels.get("model") == model}
        for state in states:
            self.onboarding_state.remove(model, state)

    def follow_models(self, old: Iterable[str], new: Iterable[str]) -> None:
        """providers.yaml now lists ``new`` instead of ``old``: the models that left it are
        forgotten, those (back) in it counted again."""
        old, new = set(old), set(new)
        self._gone -= new
        for model in old - new:
            self.forget_model(model)

    def forget_model(self, model: str) -> None:
        """Drop every request, routing and upstream series of a model that left providers.yaml:
        an admin who renames models now and then would otherwise grow /metrics for ever. A request
        to it still under way (a local model's old server answers for up to a minute) counts
        nowhere: its series would come back and stay."""
        self._gone.add(model)
        by_model = ((self.requests, ("model", "status")), (self.stream_errors, ("model",)),
                    (self.routing_decisions, ("model",)), (self.upstream_latency, ("model",)),
                    (self.retries, ("model",)), (self.cooldowns, ("model",)),
                    (self.fallbacks, ("from_model", "to_model")))
        for metric, names in by_model:
            series = {tuple(sample.labels[n] for n in names)
                      for family in metric.collect() for sample in family.samples
                      if model in (sample.labels.get(n) for n in names if n != "status")}
            for labels in series:
                metric.remove(*labels)

    def observe_local_server(self, name: str, event: str) -> None:
        """The ``on_event`` callback of ``proxy.localserver.LocalServer``."""
        if event == "ready":
            self.local_server_up.labels(name=name).set(1)
        elif event in ("exited", "stopped"):
            self.local_server_up.labels(name=name).set(0)
        if event == "restarting":
            self.local_server_restarts.labels(name=name).inc()
        if event == "removed":  # no longer declared: its series go, as a removed model's onboarding's do
            for metric in (self.local_server_up, self.local_server_restarts):
                try:
                    metric.remove(name)
                except KeyError:  # never observed (it never started)
                    pass

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        """``GET /metrics``: the registry in Prometheus' text exposition format."""
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)
