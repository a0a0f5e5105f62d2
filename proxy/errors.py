"""The proxy's one error tree and the one place that turns an error into an HTTP response.

Owns: every exception the proxy raises on purpose, their HTTP status, OpenAI error ``type`` and
``code``, and the rendering to OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape.
Does not know: where errors come from (parsing, routing, upstreams) or how they are logged.

    SatrouteError                      base; never rendered with a stack trace
    ├── ConfigError                    providers.yaml / settings invalid (start-up, hot reload)
    ├── RequestError            400    the client's request is malformed or inconsistent
    │   ├── BodyTooLarge        413
    │   └── ModelNotFound       404    `model` is neither the router's name nor a configured model
    ├── AuthError               401    missing or wrong master key
    ├── ServiceUnavailable      503    no routable candidate, scorer not loaded, a local model starting
    └── UpstreamError                  raised by dispatch
        ├── UpstreamClientError 4xx    the upstream refused the request (400, 401, 404, ...):
        │                              its status and error body go back to the client
        ├── UpstreamTransient          retryable: connection error, timeout, 408, 409, 425, 429, 5xx
        └── AllUpstreamsFailed  502/504 every model tried failed before the first byte

Messages never carry API keys: dispatch redacts configured secrets before raising.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import orjson
from starlette.responses import Response


class SatrouteError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class ConfigError(SatrouteError):
    type = "config_error"


class StateStoreError(ConfigError):
    """The state store cannot be opened at start-up: no fault of the configuration's."""


class RequestError(SatrouteError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"


class UnsupportedEncoding(RequestError):
    status = 415
    code = "unsupported_content_encoding"


class BodyTimeout(RequestError):
    status = 408
    code = "request_timeout"


class ModelNotFound(RequestError):
    status = 404
    code = "model_not_found"


class AuthError(SatrouteError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(SatrouteError):
    """403: a request this proxy does not take from where it came (a web page, while no master
    key is set)."""
    status = 403
    type = "permission_error"
    code = "forbidden_origin"


class ServiceUnavailable(SatrouteError):
    status = 503
    type = "service_unavailable"


class UpstreamError(SatrouteError):
    status = 502
    type = "upstream_error"

    def __init__(self, message: str, *, model: str = "", summary: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.model = model
        # what the log says of it while prompts are not logged (SATROUTE_LOG_PROMPTS): the message
        # where the proxy wrote all of it, else one without the upstream's words, which may quote
        # the request back (a 400 "... 'the user's text' ...", a traceback); the client gets the
        # message either way
        self.summary = message if summary is None else summary
        # how many attempts of the call the upstream may have billed with no answer back, where
        # the caller counted them (onboarding's asker, from ``Call.attempts``); None: not counted
        self.unanswered: int | None = None


# 4xx answers that say the model cannot be used as configured (its key is refused, its account has
# no credit left, or the upstream has no such model), whatever the request: dispatch hands a routed
# request to the next model on them, and onboarding stops a run; but a 403 for flagged input is
# about the prompt (UpstreamClientError.refuses_the_model).
# 429 only as an UpstreamClientError: a quota used up (``insufficient_quota``), which waiting does
# not fix; a rate limit is an UpstreamTransient, retried
MODEL_REFUSALS = frozenset({401, 402, 403, 404, 429})


class UpstreamClientError(UpstreamError):
    """A 4xx from the upstream: returned to the client as is (OpenAI shape), never retried."""

    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int, model: str = "",
                 upstream_body: dict[str, Any] | None = None, unfit: str | None = None,
                 summary: str | None = None):
        super().__init__(message, model=model, summary=summary)
        self.status = status
        self.upstream_body = upstream_body
        # set when the request is refused for what this model cannot take (a parameter its
        # provider does not support), before anything was sent: another model may take it
        self.unfit = unfit
        self.failed: list[tuple[str, str]] = []  # models that failed before this one refused (dispatch)

    def body(self) -> dict[str, Any]:
        if self.upstream_body is not None:
            return self.upstream_body
        return super().body()

    def text(self) -> str:
        """What the 4xx says: its message, and the upstream's error body when there is one."""
        return self.message if self.upstream_body is None else f"{self.message} {self.upstream_body}"

    @property
    def reason(self) -> str:
        """Why the model failed, as ``x-satroute-failed`` says it: what it cannot take
        (``unfit``), ``insufficient_quota`` where its account is out of quota or credit
        (``out_of_credit``), else ``http_<status>``."""
        if self.unfit:
            return self.unfit
        return "insufficient_quota" if self.out_of_credit else f"http_{self.status}"

    @property
    def out_of_credit(self) -> bool:
        """The model's account has no quota or credit left: a 429 (as an UpstreamClientError, only a
        used-up quota), a 402, or Anthropic's 400 "Your credit balance is too low"."""
        if self.unfit is not None:  # the proxy's own refusal of what the model cannot take
            return False
        if self.status in (402, 429):
            return True
        # by the upstream's own error object only, its message as Anthropic begins it: a 400 that
        # quotes the request back (OpenAI's "Invalid value: '...'", vLLM's input_value=...) must
        # not let a client make a model look out of credit, and cool it for everyone
        err = self.upstream_body.get("error") if isinstance(self.upstream_body, dict) else None
        said = err.get("message") if isinstance(err, dict) else None
        return (self.status == 400 and isinstance(said, str) and err.get("type") == "invalid_request_error"
                and _NO_CREDIT.match(said) is not None)

    def refuses_the_model(self) -> bool:
        """A status of MODEL_REFUSALS, except a moderation refusal of this request's content:
        OpenRouter's 403 for a model it moderates ("Your input was flagged for ...", with
        ``metadata.reasons`` and ``flagged_input``) is about the prompt, as Azure's 400
        ``content_filter`` is; another prompt to the same model is answered. And a model out of
        credit, whatever the status it says it with (``out_of_credit``)."""
        return (self.status in MODEL_REFUSALS and not (self.status == 403 and _FLAGGED.search(self.text()))
                or self.out_of_credit)


# Anthropic's words for an account out of credit, which it sends as a 400 invalid_request_error
# (every request to any of its models is refused until credit is bought)
_NO_CREDIT = re.compile(r"\s*Your credit balance is too low")


# OpenRouter's words ("Your input was flagged for ...") or its body's metadata key, not the bare
# word: "your account has been flagged" refuses the key, as any other 403
_FLAGGED = re.compile(r"\binput (?:was|has been|is) flagged\b|\bflagged_input\b", re.IGNORECASE)


# statuses that say the upstream limits how fast it is asked: rate limited (429), unavailable
# (503), overloaded (Anthropic's 529)
SLOW_DOWN = frozenset({429, 503, 529})


class UpstreamTransient(UpstreamError):
    """Worth retrying; ``status`` is the upstream's HTTP status (0: none, the connection failed);
    ``retry_after`` is the wait it named, in seconds: its Retry-After, or for a 429 without one,
    when the rate limit it hit is whole again (``upstream.wait_seconds``). ``counts``: whether it says
    something about the model's health (False: the failure may be the request's own, as when
    litellm fails before sending anything), so whether it feeds the model's cooldown. ``reason``
    names what failed when neither the status nor a timeout does (``x-satroute-failed``).
    ``sent``: whether the request may have reached the upstream (False: the connection to it was
    never made, so nothing was generated for it, nor billed). ``retried``: the upstream said not
    to ask again (``upstream.retried_already``): the same model is not, another one may be."""

    def __init__(self, message: str, *, model: str = "", status: int = 0,
                 retry_after: float | None = None, timeout: bool = False, counts: bool = True,
                 reason: str | None = None, summary: str | None = None, sent: bool = True,
                 retried: bool = False):
        super().__init__(message, model=model, summary=summary)
        self.retried = retried
        self.reason = reason
        self.upstream_status = status
        self.retry_after = retry_after
        self.timeout = timeout
        self.counts = counts
        self.sent = sent

    @property
    def slow_down(self) -> bool:
        """Whether the upstream said it limits how fast it is asked: a ``SLOW_DOWN`` status, or
        a wait it named (``retry_after``: when to ask again)."""
        return self.retry_after is not None or self.upstream_status in SLOW_DOWN


class AllUpstreamsFailed(UpstreamError):
    code = "upstream_failed"

    def __init__(self, message: str, *, failed: list[tuple[str, str]], timeout: bool = False):
        super().__init__(message)
        self.failed = failed
        self.retry_after: float | None = None  # sent to the client: when every failure was a 429
        # the longest Retry-After any failure carried (a 503's too), for a caller that waits on
        # the models itself (onboarding); not sent to a client, whose other models may answer
        self.upstream_retry_after: float | None = None
        # the last failure said the upstream limits how fast it is asked
        # (``UpstreamTransient.slow_down``), for a caller that paces its requests (onboarding)
        self.slow_down = False
        self.timeout = timeout  # the last failure was one
        if timeout:
            self.status = 504
            self.code = "upstream_timeout"


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_event(message: str, type_: str, code: str | None = None) -> bytes:
    """An error as the in-band SSE event that ends a stream whose headers are gone (the OpenAI SDK
    raises on it)."""
    return b"data: " + orjson.dumps(error_body(message, type_, code)) + b"\n\n"


def error_response(exc: SatrouteError, headers: dict[str, str] | None = None) -> Response:
    """The single renderer of errors to HTTP."""
    return Response(orjson.dumps(exc.body()), status_code=exc.status,
                    media_type="application/json", headers=headers)


def plain_error_response(status: int, message: str, type_: str, code: str | None = None,
                         headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(error_body(message, type_, code)), status_code=status,
                    media_type="application/json", headers=headers)
