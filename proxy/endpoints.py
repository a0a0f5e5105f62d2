"""Thin HTTP handlers: read and check the request, delegate to routing and dispatch, write the answer.

Owns: the endpoints ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /ready``, and ``POST /admin/route`` (where a request would go, decided as a real one is,
with no model called); the body size limit; JSON and shape errors (400/413 naming the problem);
the routing headers; handing each request to the router's name to the routing log
(``proxy.routelog``), answered or not (when every model failed, with no answering model);
server-sent events for streams.
Does not know: how scores are computed, how upstreams are called (``Services`` holds both).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Coroutine, Mapping, TypeVar

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from proxy import protocol
from proxy.dispatch import Call, Reply
from proxy.errors import (AllUpstreamsFailed, BodyTimeout, BodyTooLarge, ModelNotFound, RequestError, SatrouteError,
                          ServiceUnavailable, UnsupportedEncoding, UpstreamClientError, error_response)
from proxy.localserver import STARTING_RETRY_AFTER_S, coming_back
from proxy.logs import Redactor, RequestRecord, parse_scores, redacted, request_record
from proxy.providers import Deployment, Snapshot
from proxy.routing import (Decision, candidates, features_needed, instruction_text, rank,
                           shortlist, tokens_needed)
from proxy.scoring import ScorerDegraded, profile_means

if TYPE_CHECKING:
    from proxy.app import Services

log = logging.getLogger("satroute.endpoints")

JSON = "application/json"
T = TypeVar("T")


# A body none of which arrives for this long is given up (408): a client that declared more than it
# sends, or a chunked body that never ends, would otherwise hold its connection for ever.
BODY_IDLE_TIMEOUT_S = 30.0


async def read_body(request: Request, limit: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):  # read as JSON it would be a puzzling "not valid UTF-8"
        raise UnsupportedEncoding(f"request bodies are read as they are sent: Content-Encoding "
                                  f"{encoding[:40]!r} is not supported; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    stream = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout(BODY_IDLE_TIMEOUT_S):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BodyTimeout(f"no part of the request body arrived for {BODY_IDLE_TIMEOUT_S:g}s "
                              f"({size} bytes received)") from None
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# Bounds that no real conversation reaches but that keep one request's validation in milliseconds
# (three million messages took the event loop 41 s and 4 GB to refuse).
MAX_MESSAGES = 20_000
MAX_CONTENT_PARTS = 50_000
# Up to this many messages and content parts in all, a wrong body's deepest problem is named among
# all of its problems, and the others counted; beyond it, validation stops at the first wrong
# message or part (protocol.FirstFaultRequest): what refusing a body costs no longer grows with it.
ALL_PROBLEMS_UP_TO = 100
# A body this large is parsed and validated on a thread, not on the event loop. A thread frees the
# loop only between Python steps: orjson and pydantic hold the GIL for a whole call, which is why
# what one call may build is bounded (above, and ALL_PROBLEMS_UP_TO) rather than moved off the loop.
PARSE_ON_THREAD_BYTES = 1 << 20
MAX_LOGGED_MODEL = 256  # characters of an unknown model name in a log line or an error


async def parse_request_async(raw: bytes) -> tuple[dict[str, Any], protocol.ChatCompletionRequest]:
    if len(raw) < PARSE_ON_THREAD_BYTES:
        return parse_request(raw)
    return await asyncio.to_thread(parse_request, raw)


def parse_request(raw: bytes) -> tuple[dict[str, Any], protocol.ChatCompletionRequest]:
    if not raw.strip():
        raise RequestError("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = protocol.read_json(raw)
    except ValueError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, not {type(body).__name__}",
                           code="invalid_body")
    try:  # what the body must be to be sent on: orjson writes 255 levels, reads 1,024
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise RequestError("request body is nested too deeply (more than 255 levels)",
                           code="invalid_body") from None
    messages = body.get("messages")
    schema = protocol.ChatCompletionRequest
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise RequestError(f"messages: {len(messages)} messages; at most {MAX_MESSAGES} are "
                               "taken", param="messages", code="invalid_value")
        parts = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise RequestError(f"messages: {parts} content parts; at most {MAX_CONTENT_PARTS} are "
                               "taken", param="messages", code="invalid_value")
        if len(messages) + parts > ALL_PROBLEMS_UP_TO:
            schema = protocol.FirstFaultRequest
    route = body.get(protocol.ROUTE_FIELD)
    if isinstance(route, dict) and len(route) > 16:  # each key but models would be one error more
        raise RequestError(f"{protocol.ROUTE_FIELD}: {len(route)} keys; it takes models only",
                           param=protocol.ROUTE_FIELD, code="invalid_value")
    try:
        req = schema.model_validate(body)
    except ValidationError as exc:
        loc, message, more = _first_problem(exc.errors())
        more_text = f" (and {more} more problems)" if more else ""
        raise RequestError(f"{loc}: {message}{more_text}", param=loc or None,
                           code="invalid_value") from None
    return body, req


def _first_problem(errors: list[dict]) -> tuple[str, str, int]:
    """The problem to name: ``(param, message, how many others)``. A misspelt field first
    ("satroute.modles: not permitted" says more than "models: required"); else the deepest one,
    so that a content part without its ``type`` is named as such rather than as "content should
    be a string". The union's branch names pydantic puts in a location (``str``,
    ``list[ContentPart]``) are left out, and the branches that fail at the same place are named
    together; the others are counted by place (a union failing both ways is one problem), leaving
    out the branches that failed above the one named."""
    def place(err: dict) -> str:
        return ".".join(str(p) for p in err["loc"]
                        if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p)))

    first = min(errors, key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
    where = place(first)
    same = [e for e in errors if place(e) == where and len(e["loc"]) == len(first["loc"])]
    message = " or ".join(dict.fromkeys(e["msg"] for e in same))
    # the other branches of a union that failed deeper are not other problems
    others = {place(e) for e in errors if e not in same and not (where + ".").startswith(place(e) + ".")}
    return where, message, len(others)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _starting(message: str) -> ServiceUnavailable:
    """A 503 with Retry-After for local models on their way back (their server starting or
    restarting), which the SDK waits for and retries, unlike a 404 or a 502."""
    err = ServiceUnavailable(message, code="model_starting")
    err.retry_after = STARTING_RETRY_AFTER_S
    return err


def _refuse_if_starting(target: Deployment | None) -> None:
    if target is not None and coming_back(target.unavailable):
        raise _starting(f"The model '{target.name}' is not available yet: {target.unavailable}")


def _wait_if_coming_back(snap: Snapshot, exc: AllUpstreamsFailed) -> None:
    """Every model that failed is a local one whose server is restarting now (an edit of its
    block, a crash): the failures were its old server going away under requests queued at it."""
    names = {name for name, _ in exc.failed}
    back = [snap.models[n] for n in names if n in snap.models and coming_back(snap.models[n].unavailable)]
    if names and len(back) == len(names):
        raise _starting(f"The model '{back[0].name}' is not available yet: {back[0].unavailable}"
                        if len(back) == 1 else "No model is available yet: their local servers are "
                        "restarting") from exc


def services(request: Request) -> "Services":
    return request.app.state.services


@dataclass(frozen=True)
class Plan:
    """Where a chat request goes: the decision, the models to try in order, the configuration it
    was decided under, whether the default model answers because nothing is routable yet, and the
    text the scorer read (routed only)."""

    decision: Decision
    targets: list[Deployment]
    snap: Snapshot
    default: bool = False
    instruction: str | None = None
    epochs: Mapping[str, int] | None = None  # the cooldowns' epochs as of ``snap`` (Cooldowns.epochs)


async def plan_route(svc: "Services", body: dict[str, Any], req: protocol.ChatCompletionRequest) -> Plan:
    """Choose the models for ``body`` (its ``satroute`` field is taken out): the named model, the
    default model while nothing is routable, or the candidates ranked by the scorer (by the
    profiles' means when it fails or times out). Records no metric but the scorer's own (its call's
    latency) and calls no model."""
    body.pop(protocol.ROUTE_FIELD, None)
    narrowed = req.satroute is not None  # {"models": [...]}, checked by the request model
    # read together (an edit swaps both in one step): a model's api_base fixed while this request
    # is scored must not count the old upstream's failures against the new one
    snap, epochs = svc.registry.snapshot, svc.cooldowns.epochs()
    default = default_target(snap) if req.model == snap.router.router_name and not narrowed else None
    if default is not None:  # nothing is routable yet: the configured default model answers
        return Plan(Decision(((default.name, 0.0),), routed=False), [default], snap, default=True,
                    epochs=epochs)
    if req.model == snap.router.router_name:
        pool = candidates(snap.models.values(), req.satroute.models if narrowed else None,
                          svc.cooldowns.cooling, tokens_needed(body), features_needed(body))
        text = instruction_text(body["messages"], snap.router.routing_context_tokens)
        # past max_scored_candidates, the scorer reads those with the best means; the others are
        # tried after them, best mean first, shown unscored (-Infinity)
        read, unread = shortlist(pool, snap.router.max_scored_candidates, profile_means)
        try:
            scores, ms, remembered = await svc.scoring.score(
                text, {d.name: d.profile for d in read}, snap.router.scorer_timeout_s)
            ranked = rank(scores, [d.name for d in read]) + tuple((d.name, -math.inf) for d in unread)
            degraded = None
        except ScorerDegraded as exc:  # the request is still answered: ranked by the profiles
            scores, ms = svc.scoring.ranked_without_scorer({d.name: d.profile for d in pool}), exc.ms
            ranked, remembered, degraded = rank(scores, [d.name for d in pool]), False, exc.reason
        decision = Decision(ranked, routed=True, scorer_ms=ms, degraded=degraded, remembered=remembered)
        targets = [snap.models[n] for n, _ in decision.ranked[: 1 + snap.router.max_fallbacks]]
        return Plan(decision, targets, snap, instruction=text, epochs=epochs)
    target = snap.models.get(req.model)
    _refuse_if_starting(target)
    if target is None or not target.available:
        why = "is not available" if target else "does not exist"
        raise ModelNotFound(f"The model '{req.model[:MAX_LOGGED_MODEL]}' {why}; GET /v1/models lists the models "
                            f"served here, '{snap.router.router_name}' routes automatically",
                            param="model")
    return Plan(Decision(((target.name, 0.0),), routed=False), [target], snap, epochs=epochs)


async def chat_completions(request: Request) -> Response:
    svc = services(request)
    try:
        raw = await read_body(request, svc.settings.max_body_bytes)
    except ClientDisconnect:  # it left while sending its request: no error of ours
        return _client_left(request)
    body, req = await parse_request_async(raw)
    record = request_record(request)  # this request's log line (proxy.logs)
    if record is not None:  # cut: the client chooses it, and it is in every line of its requests
        record.requested_model = req.model[:MAX_LOGGED_MODEL]
        record.stream = req.stream is True  # also when the answer is an error, not a stream
    chat = _Chat(svc, body, req, record)
    try:
        # one watcher for the whole request: a client that leaves while its request is scored or
        # while models are called gets nothing more (a scoring call already running finishes,
        # shared, and its scores are remembered for a retry; one still queued is skipped)
        reply = await _unless_the_client_leaves(request, chat.run())
    except AllUpstreamsFailed as exc:  # no model answered: the log says so, the client gets the error
        chat.log_route(None, exc.failed)
        _log_failed(record, exc.failed, chat.plan)
        _wait_if_coming_back(svc.registry.snapshot, exc)
        raise
    except UpstreamClientError as exc:  # the model refused the request: logged, passed back as it is
        failed = [*exc.failed, (exc.model, exc.reason)]
        chat.log_route(None, failed)
        _log_failed(record, failed, chat.plan)
        raise
    except (Exception, asyncio.CancelledError):
        # the proxy's own failure (a 500), or a shutdown that cut the request (the client left is
        # not one: it ends in None): the decision made is still in the routing log
        chat.log_route(None, [])
        raise
    if reply is None:  # the client left before any model answered: the calls were cancelled
        chat.log_route(None, [])  # a decision made (and counted) is in the routing log too
        return _client_left(request)
    if record is not None:  # to the answer, or to a stream's first chunk; retries included
        record.upstream_ms = round((time.perf_counter() - chat.started) * 1000, 2)
    chat.log_route(reply.model, reply.failed)
    plan = chat.plan
    assert plan is not None  # a reply comes only after the plan
    headers = routing_headers(plan.decision, reply, plan.default)
    if reply.chunks is not None:
        return _ClientPacedStream(reply.chunks, plan.snap.router.client_write_timeout_s, record,
                                  media_type="text/event-stream",
                                  # nginx (a reverse proxy in front) would otherwise buffer the
                                  # stream by default and pass it on only at its end
                                  headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(reply.body, media_type=JSON, headers=headers)


class _ClientStalled(Exception):
    pass


class _ClientPacedStream(StreamingResponse):
    """A streamed answer whose every write waits ``stall_s`` at most for a client that stopped
    reading without leaving (its buffers full): then the answer ends there, and so does the call to
    the model, whose connection (and, on a server of one's own, generation slot) it would hold for
    ever. The client's own connection stays until it reads or closes it (no error event can reach a
    client that reads nothing, and an ASGI app cannot abort a connection: uvicorn logs the response
    as not completed)."""

    def __init__(self, content, stall_s: float, record: RequestRecord | None, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.stall_s, self.record = stall_s, record

    async def stream_response(self, send) -> None:
        async def paced(message) -> None:
            try:
                async with asyncio.timeout(self.stall_s):
                    await send(message)
            except TimeoutError:
                raise _ClientStalled from None

        try:
            await super().stream_response(paced)
        except _ClientStalled:
            log.warning("a write to the client waited %.0f s (client_write_timeout_s): it stopped "
                        "reading; its stream ends here and the model's call with it", self.stall_s)
            if self.record is not None:
                self.record.error = "client stopped reading"
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class _Chat:
    """One chat completion between its body and its reply: the plan once it is made (the
    decision counted in the metrics), the call to the models, and its routing-log entry."""

    def __init__(self, svc: "Services", body: dict[str, Any], req: protocol.ChatCompletionRequest,
                 record: RequestRecord | None):
        self.svc, self.body, self.req, self.record = svc, body, req, record
        self.plan: Plan | None = None
        self.started = 0.0  # when the models were first called

    async def run(self) -> Reply:
        svc = self.svc
        plan = self.plan = await plan_route(svc, self.body, self.req)
        decision = plan.decision
        if plan.default:
            svc.metrics.observe_routing(decision.chosen)
        elif decision.routed:
            if decision.degraded:
                svc.metrics.observe_degraded(decision.degraded)
            # the scorer's latency histogram is fed by the scoring calls themselves (ScorerHost)
            svc.metrics.observe_routing(decision.chosen, remembered=decision.remembered)
        self.started = time.perf_counter()
        return await svc.dispatcher.complete(Call(
            targets=plan.targets, body=self.body, stream=self.req.stream is True,
            router=plan.snap.router, redact=plan.snap.redact, epochs=plan.epochs))

    def log_route(self, chosen: str | None, failed) -> None:
        """The routing-log entry of a request to the router's name (or answered by the default
        model), once it was decided; nothing otherwise."""
        plan, route_log = self.plan, self.svc.route_log
        if plan is None or route_log is None or not (plan.decision.routed or plan.default):
            return
        decision, record = plan.decision, self.record
        route_log.record(
            self.req.model, chosen, scores=dict(decision.ranked) if decision.routed else None,
            scorer_ms=decision.scorer_ms if decision.routed else None, failed=failed,
            request_id=record.request_id if record is not None else None, degraded=decision.degraded)


def _log_failed(record: RequestRecord | None, failed, plan: Plan | None) -> None:
    """An error answer carries no routing headers: its log line is told directly which models
    failed, and why, as ``model:reason``, and a routed request's scores and scoring time, as an
    answer's line reads them from its headers."""
    if record is None:
        return
    record.failed_models = [f"{name}:{why}" for name, why in failed]
    if plan is not None and plan.decision.routed:
        record.scores = parse_scores(plan.decision.scores_header())
        record.scorer_ms = round(plan.decision.scorer_ms, 2)


def _client_left(request: Request) -> Response:
    """What a request whose client disconnected ends with: 499 in its log line (nobody reads it)."""
    record = request_record(request)
    if record is not None:
        record.error = "client disconnected"
    return Response(status_code=499)


async def _unless_the_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """``work``'s result, or None when the client disconnects first: then ``work`` (scoring, or
    retries, fallbacks and the upstream call in flight) is cancelled, so nothing more is asked or
    paid for.
    ``work`` runs in this request's own task; one small task waits for the disconnect and
    cancels it (no task for the work itself: this runs on every request)."""
    me = asyncio.current_task()
    left = False

    async def watch() -> None:
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        reply = await work
    except asyncio.CancelledError:
        if left and me.uncancel() == 0:  # cancelled by the watcher alone, not by a shutdown
            return None
        raise
    finally:
        # synchronously after the work returned: the watcher cannot have cancelled a finished work
        # (it would have had to run first, and then the cancellation lands in the await above)
        watcher.cancel()  # a response that streams listens for the disconnect itself
    return reply


async def route_preview(request: Request) -> Response:
    """Where a chat completion request would go, without calling any model (``POST /admin/route``).

    The body is a chat completion request: ``model`` (the router's name, or a model's) and
    ``messages``; ``satroute.models`` narrows the candidates as it does for a real request. The
    answer: ``{"chosen", "route", "degraded", "ranked": [{"model", "score"}] (routed only, best
    first), "tries": [models in the order they would be tried], "scorer_ms", "instruction" (the
    text the scorer read)}``. Counts no request or routing decision (its scoring call is in the
    scorer's latency histogram, like any) and writes no routing log; the scores are remembered
    like a real request's. Whether they were remembered is not said: remembered scores are another
    client's request of the same text, which the clients sharing the key need not be told of.
    Errors as for chat completions (400, 404, 503).
    The choice is ``chosen``, not ``model``: a request's log line reads ``model`` as the model that
    answered, and none did.
    """
    svc = services(request)
    body, req = await parse_request_async(await read_body(request, svc.settings.max_body_bytes))
    plan = await plan_route(svc, body, req)
    d = plan.decision
    payload = {"chosen": d.chosen, "route": route_kind(d, plan.default), "degraded": d.degraded,
               "ranked": [{"model": n, "score": s} for n, s in d.ranked] if d.routed else [],
               "tries": [t.name for t in plan.targets],
               "scorer_ms": round(d.scorer_ms, 2) if d.routed else None,
               "instruction": plan.instruction}
    return Response(orjson.dumps(payload), media_type=JSON)


def default_target(snap: Snapshot) -> Deployment | None:
    """``router_settings.default_model`` while no model is routable (none has a profile yet)."""
    name = snap.router.default_model
    target = snap.models.get(name) if name else None
    if target is None or not target.available or any(d.routable for d in snap.models.values()):
        return None
    return target


def route_kind(decision: Decision, default: bool = False) -> str:
    """What ``x-satroute-route`` says: routed, aptitude (the profiles' means ranked it), direct
    (the client named the model) or default (the default model, while nothing is routable)."""
    if default:
        return "default"
    return ("aptitude" if decision.degraded else "routed") if decision.routed else "direct"


def failed_header(failed) -> str:
    """``x-satroute-failed``: ``name:reason`` of each model that failed, names as headers carry them."""
    return ",".join(f"{protocol.header_name(n)}:{r}" for n, r in failed)


def routing_headers(decision: Decision, reply: Reply, default: bool = False) -> dict[str, str]:
    headers = {protocol.HEADER_MODEL: protocol.header_name(reply.model),
               protocol.HEADER_ROUTE: route_kind(decision, default)}
    if decision.degraded:
        headers[protocol.HEADER_DEGRADED] = decision.degraded
    if decision.routed:
        headers[protocol.HEADER_SCORES] = decision.scores_header()
        headers[protocol.HEADER_SCORER_MS] = f"{decision.scorer_ms:.2f}"
    if reply.failed:
        headers[protocol.HEADER_FAILED] = failed_header(reply.failed)
    return headers


async def list_models(request: Request) -> Response:
    snap = services(request).registry.snapshot
    cards = [protocol.ModelCard(id=snap.router.router_name)]
    cards += [protocol.ModelCard(id=d.name, owned_by=d.provider) for d in snap.available()]
    return Response(protocol.ModelList(data=cards).model_dump_json(), media_type=JSON)


async def retrieve_model(request: Request) -> Response:
    snap = services(request).registry.snapshot
    model_id = request.path_params["model_id"]
    if model_id == snap.router.router_name:
        card = protocol.ModelCard(id=model_id)
    else:
        target = snap.models.get(model_id)
        _refuse_if_starting(target)
        if target is None or not target.available:
            raise ModelNotFound(f"The model '{model_id[:MAX_LOGGED_MODEL]}' does not exist or is not "
                                "available", param="model")
        card = protocol.ModelCard(id=target.name, owned_by=target.provider)
    return Response(card.model_dump_json(), media_type=JSON)


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


async def ready(request: Request) -> Response:
    svc = services(request)
    snap = svc.registry.snapshot
    reasons = []
    if svc.stop_signalled:
        # SATROUTE_SHUTDOWN_DELAY_S: still serving, but a load balancer should send no more
        reasons.append("shutting down")
    # The scorer matters once a model is routable; until then the default model answers `auto`.
    if not svc.scoring.ready and default_target(snap) is None:
        reasons.append(f"scorer not loaded ({svc.scoring.error or 'loading'})")
    reachable = [d.name for d in snap.available() if not svc.cooldowns.cooling(d.name)]
    if not reachable:
        reasons.append("no model is reachable (credentials missing or all cooling down)")
    payload = {"status": "not ready" if reasons else "ready", "reasons": reasons,
               "models": reachable, "scorer": svc.scoring.describe(), "cooling": svc.cooldowns.cooling_models(),
               "cooling_left_s": svc.cooldowns.cooling_left(),
               # whose last call said its quota is used up (a 429 insufficient_quota), none answered since
               "out_of_quota": svc.cooldowns.failing("insufficient_quota"),
               "unavailable": {d.name: d.unavailable for d in snap.models.values()
                               if d.unavailable},
               "config_rejected": svc.registry.rejected,
               # the state store's file deleted or replaced under the running proxy (routing goes on)
               "state_store": svc.onboarding.store_lost if svc.onboarding is not None else None,
               # profiles of several aptitude suites: routing goes on, biased (providers.py says)
               "mixed_suites": snap.mixed_suites(),
               "checked_at": int(time.time())}
    # open to anyone who reaches the port: every string as the log shows it, the configuration's
    # secrets redacted (a reason may quote a value read from the environment, an api_base)
    payload = redacted(payload, Redactor(lambda: snap.secrets))
    return Response(orjson.dumps(payload), status_code=503 if reasons else 200, media_type=JSON)


async def satroute_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SatrouteError)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:  # whole seconds, rounded up: 2.5 s is not over after 2
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if isinstance(exc, AllUpstreamsFailed):
        # the proxy has already retried (a 429 after waiting its Retry-After) and fallen back: an
        # SDK that retries on top (the openai SDKs do, twice by default) runs the whole cascade
        # again, three times the load on a provider that is refusing it; they honour this. A
        # rate limit that named no wait is the exception: the proxy's backoff was short, and the
        # SDK's own (it waits longer at each retry) is the only wait left before the limit clears
        if not (exc.status == 429 and retry_after is None):
            headers["x-should-retry"] = "false"
    elif isinstance(exc, UpstreamClientError):
        # the last model's refusal, passed back: never retried here, and an SDK's retry of a
        # 429 (a used-up quota) would run the fallbacks before it again
        headers["x-should-retry"] = "false"
        if exc.failed:
            headers[protocol.HEADER_FAILED] = failed_header(exc.failed)
    return error_response(exc, headers or None)
