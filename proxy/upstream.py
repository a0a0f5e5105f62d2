"""The pass-through path: one attempt against an OpenAI-compatible upstream over a pooled client.

Owns: building the upstream request (the client's JSON body with only ``model`` replaced, admin
defaults from ``litellm_params`` filled in where the client set none), one shared aiohttp session
with keep-alive, classifying the outcome (answer, retryable failure, client error), reading a stream
up to its first event before committing, and rewriting the ``model`` field of the answer and of
every streamed chunk to the configured name. Everything else in the bytes is kept as the upstream
sent it (unknown fields, chunk boundaries per event).
Does not know: retries, fallback, cooldown, routing (``dispatch.py`` drives it).
"""
from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import aiohttp
import orjson

from proxy import __version__
from proxy.errors import UpstreamClientError, UpstreamTransient, error_event
from proxy.localserver import validation_refusal
from proxy.protocol import OPENAI_CHAT_PARAMS
from proxy.providers import DEFAULT_BASES, Deployment

# litellm_params keys that fill the request body where the client's body has none.
BODY_DEFAULTS = OPENAI_CHAT_PARAMS - {"messages", "stream", "stream_options"}
# the two names of a request's one limit on its answer: a model's default under either fills it
# only when the client gave neither (OpenAI refuses the two together, 400
# invalid_parameter_combination), on both paths
LIMIT_NAMES = frozenset({"max_tokens", "max_completion_tokens"})


def limited(body: Mapping[str, Any]) -> bool:
    """Whether the client set a limit on the answer, under either name (a null sets none)."""
    return any(body.get(name) is not None for name in LIMIT_NAMES)
USER_AGENT = f"satroute/{__version__}"
MODEL_FIELD = re.compile(rb'"model"\s*:\s*(?:"(?:[^"\\]|\\.)*"|null)')
RETRYABLE = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
# text-generation-inference's failure while generating (a GPU out of memory, a shard gone): a 424
# whose error_type is "generation", the server's though a 4xx, and counted and billed as a 500 is
# (``dispatch._cause``, ``dispatch.Attempt``). Only that one: SageMaker's 424 wraps any error of
# its model's container, the client's 400 included
GENERATION_FAILED = 424


def transient(status: int, error_type: object = None) -> bool:
    """Whether an upstream's ``status`` (with its error's type) says a failure worth retrying."""
    return status in RETRYABLE or (status == GENERATION_FAILED and error_type == "generation")


def retried_already(headers: Mapping[str, str]) -> bool:
    """Whether the upstream says not to ask again (``x-should-retry: false``, the OpenAI SDK's
    convention): a proxy in front of the model (another satroute, a LiteLLM proxy) that has
    retried it already, or a provider that knows another try fails too. Its retries on top of
    that proxy's multiply the calls to the model (3 x 3); falling back to another model stays."""
    return str(headers.get("x-should-retry", "")).strip().lower() == "false"


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After (seconds or HTTP date) or retry-after-ms, in seconds; one that is no finite
    number (``1e999``, ``nan``) is none."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            if math.isfinite(seconds := float(ms) / 1000):
                return max(0.0, seconds)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - _sent_at(headers))
        except (TypeError, ValueError, OverflowError, OSError):  # a year past what a clock holds
            return None


def _sent_at(headers: Mapping[str, str]) -> float:
    """When the answer was sent, by the upstream's clock: its ``Date`` header, which the times it
    names (a Retry-After date, Anthropic's resets) are to be read against, so that this host's
    clock being off (a virtual machine resumed before NTP set it) neither holds a model out for
    an hour nor ignores the wait; this host's clock when it sent none, or one unreadable."""
    try:
        date = email.utils.parsedate_to_datetime(headers.get("date") or "")
        return date.timestamp() if date.tzinfo is not None else time.time()
    except (TypeError, ValueError, OverflowError, OSError):  # a year past what a clock holds
        return time.time()


# the rate limits whose reset a 429 may name without a Retry-After, each as the header that says
# how much of it is left and the one that says when it is whole again: OpenAI's (a duration,
# "6m0s") and Anthropic's (an RFC 3339 time)
_OPENAI_LIMITS = tuple((f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
                       for kind in ("requests", "tokens"))
_ANTHROPIC_LIMITS = tuple((f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-reset")
                          for kind in ("requests", "tokens", "input-tokens", "output-tokens"))
# a Go duration as OpenAI writes one: "1s", "20ms", "1.5s", "6m0s", "2h3m4.5s"
_DURATION = re.compile(r"(?:\d+(?:\.\d*)?(?:h|ms|us|µs|ns|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(h|ms|us|µs|ns|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _duration_s(value: str) -> float | None:
    """A Go duration ("6m0s") in seconds; None for anything else (a bare number, which could as
    well be a time as a length, is not read)."""
    text = value.strip()
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))


def _time_left_s(value: str, sent_at: float) -> float | None:
    """An RFC 3339 time ("2026-12-07T14:00:00Z") as seconds from ``sent_at`` (0 once it is past);
    None for anything else."""
    try:
        when = datetime.datetime.fromisoformat(value.strip())
        if when.tzinfo is None:  # no offset: not RFC 3339, and a local time would be a guess
            return None
        return max(0.0, when.timestamp() - sent_at)
    except (ValueError, OverflowError):  # OverflowError: year 1 less a day
        return None


def rate_limit_reset_seconds(headers: Mapping[str, str]) -> float | None:
    """When a 429's rate limit is whole again, in seconds, from the headers OpenAI and Anthropic
    send with it in place of a Retry-After: ``x-ratelimit-reset-requests`` / ``-tokens``, and
    ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset``. Of the limits
    whose remaining count is 0 (those used up), the latest reset; when none says so, the latest of
    them all (the request may need more than is left of one, and none is named). None when no
    such header can be read."""
    said = {str(k).lower(): str(v) for k, v in headers.items()}
    resets: list[tuple[float, bool]] = []  # (seconds, used up)
    sent_at = _sent_at(said)
    for limits, read in ((_OPENAI_LIMITS, _duration_s),
                         (_ANTHROPIC_LIMITS, lambda value: _time_left_s(value, sent_at))):
        for remaining, reset in limits:
            seconds = read(said[reset]) if reset in said else None
            if seconds is not None and math.isfinite(seconds):
                resets.append((seconds, said.get(remaining, "").strip() == "0"))
    used_up = [seconds for seconds, empty in resets if empty]
    return max(used_up or [seconds for seconds, _ in resets], default=None)


def wait_seconds(status: int, headers: Mapping[str, str]) -> float | None:
    """How long the upstream said to wait before it is asked again: its Retry-After
    (``retry_after_seconds``), else, for a 429, when the rate limit it hit is whole again
    (``rate_limit_reset_seconds``); None when it said neither. Only a 429's reset headers are
    read: OpenAI sends them with every answer, and on a 500 they say nothing of waiting."""
    said = retry_after_seconds(headers)
    if said is None and status == 429:
        said = rate_limit_reset_seconds(headers)
    return said


def rename_model(data: bytes, name_json: bytes) -> bytes:
    """Replace the first ``"model": "..."`` (the top-level one in OpenAI payloads), or a null one."""
    field = b'"model":' + name_json  # a function, not a template: a name's backslashes stay as they are
    return MODEL_FIELD.sub(lambda _: field, data, count=1)


def loads_lenient(raw: bytes) -> Any:
    """JSON as servers really write it: strict first (fast), else what Python's own reader takes
    (``NaN``/``-Infinity`` in logprobs, a lone surrogate from an emoji cut at ``max_tokens``, a
    stray byte that is not UTF-8); None when it is no JSON at all."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None


def dumps_lenient(obj: Any) -> bytes:
    """``orjson.dumps``, or the standard library's for what orjson refuses (a lone surrogate)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj).encode()


def utf8_repaired(data: bytes) -> bytes:
    """``data`` as UTF-8 a client can decode: a byte sequence that is not (a character cut at
    ``max_tokens`` by a server that stops on a byte) becomes U+FFFD, as in the text the lenient
    reader took; the openai SDK raised a bare UnicodeDecodeError on the bytes relayed as they
    came. Valid bytes (nearly always) are returned as they are."""
    if data.isascii():
        return data
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode()


def _answer_or_failure(raw: bytes, name_json: bytes, model: str, content_type: str, redact) -> bytes:
    """A non-streamed 200's body, renamed, when it is a chat completion; else the model's failure
    (it falls back and counts towards cooldown, as on the litellm path): an error object sent
    with 200 (vLLM, OpenRouter), an HTML page (a captive portal, a base URL that is not the API),
    an empty body, a stream."""
    answer = loads_lenient(raw)
    if isinstance(answer, dict) and isinstance(answer.get("choices"), list):
        if isinstance(answer.get("model"), str):  # the usual case: the bytes as they came
            return rename_model(utf8_repaired(raw), name_json)
        answer["model"] = orjson.loads(name_json)  # null or absent: the configured name all the same
        return dumps_lenient(answer)
    raise _not_an_answer(answer, raw, model, content_type, redact)


def _not_an_answer(parsed: Any, raw: bytes, model: str, content_type: str, redact) -> Exception:
    """The failure a 200 that carries no answer stands for: the upstream's in-band error (by its
    ``code`` where that is an HTTP status: a 4xx about the request goes back as it is), or
    ``bad_answer``."""
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if err is not None:
        code = err.get("code") if isinstance(err, dict) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else None
        if status is not None:
            return classify(status, raw, model, {}, redact)
        said = err.get("message") if isinstance(err, dict) else err
        return UpstreamTransient(f"{model}: answered 200 with an error: {redact(str(said))[:300]}",
                                 model=model, status=200, reason="bad_answer",
                                 summary=f"{model}: answered 200 with an error{labelled(err, redact)}")
    what = "an empty body" if not raw.strip() else f"{content_type or 'a body'} that is not a chat completion"
    return UpstreamTransient(f"{model}: answered 200 with {what}", model=model, status=200,
                             reason="bad_answer")


def redirected(model: str, status: int) -> UpstreamTransient:
    """A 3xx answer: not followed (the request carries the model's key and the prompt, which must
    not go to a host the admin did not configure); the model's failure, as a 200 with no answer."""
    return UpstreamTransient(f"{model}: answered HTTP {status}, a redirect, which is not followed "
                             "(the request carries the model's key): set api_base to where it "
                             "points", model=model, status=status, reason="bad_answer")


def error_labels(err: Any) -> str:
    """An upstream error object's ``code`` and ``type``, as the checks that read them by label
    (``out_of_quota``, ``too_long``) take them; "" for no object."""
    return f"{err.get('code')} {err.get('type')}" if isinstance(err, dict) else ""


def labelled(err: Any, redact) -> str:
    """`` (type, code)`` of an upstream's error object, each redacted and cut to 80 characters; ""
    when it gives neither. What the log says of an upstream's error while prompts are not logged
    (``UpstreamError.summary``), beside its status: never its message, which may quote the request
    back."""
    labels = [str(_redacted(err[k], redact))[:80] for k in ("type", "code")
              if isinstance(err, dict) and err.get(k) is not None]
    return f" ({', '.join(labels)})" if labels else ""


def unfit_request(model: str, text: str, reason: str, code: str,
                  param: str | None = None, summary: str | None = None) -> UpstreamClientError:
    """A request this model cannot take: a routed request falls back (``x-satroute-failed:
    <model>:<reason>``, no retry, no cooldown); a request naming the model, or the last
    candidate, gets this 400. ``summary``: ``text`` without what came from elsewhere (litellm's
    words), where it quotes any."""
    return UpstreamClientError(text, status=400, model=model, unfit=reason, summary=summary,
                               upstream_body={"error": {"message": text, "type": "invalid_request_error",
                                                        "param": param, "code": code}})


def error_object(body: dict, whole: bool = True) -> dict | None:
    """The error object of an upstream's error body: OpenAI's ``error`` object (or, ``whole``, the
    body itself where it is one: what the openai SDK keeps of it), or an ``error`` that is a string
    made one: text-generation-inference's ``{"error": "<text>", "error_type": ...}`` (its text, its
    type), a web framework's ``{"error": "Bad Request", "message": "<text>"}`` (its message, which
    says more). None when it has neither."""
    err = body.get("error", body if whole else None)
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err
    if isinstance(err, str) and err:
        said, kind = body.get("message"), body.get("error_type")
        return {"message": said if isinstance(said, str) and said else err,
                "type": kind if isinstance(kind, str) else None}
    return None


def classify(status: int, body: bytes, model: str, headers: Mapping[str, str],
             redact, local: bool = False) -> Exception:
    """What an upstream's answer other than 200 stands for: a failure worth retrying, or the
    refusal of the request (a 4xx). ``local``: the upstream is a local model's llama-cpp-python
    server, whose 500 for a request its validation refuses is that refusal, as OpenAI's 400."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if err is None and isinstance(parsed, dict) and parsed.get("object") == "error":
        err = parsed  # vLLM's shape: {"object": "error", "message", "type", "code"} at the top
    if isinstance(err, dict):
        message = str(err.get("message", ""))
    elif isinstance(err, str):  # its text, or the message beside it (``error_object``)
        message = error_object(parsed, whole=False)["message"] if err else ""
    else:  # redacted whole, then cut: a key across the cut would no longer match the redaction
        message = redact(body.decode("utf-8", "replace"))[:300]
    message = redact(message) or f"upstream answered HTTP {status}"
    refused = validation_refusal(message) if local and status == 500 else None
    if refused is not None:  # the request's own fault: not retried, and the model's health unquestioned
        said, param = refused
        return unfit_request(model, f"model {model} cannot take this request: its server refused {said}",
                             "untranslatable", "untranslatable_request", param)
    labels = error_labels(err)
    said = f"HTTP {status}{labelled(err, redact)}"  # the summary: no words of the upstream's
    if transient(status, parsed.get("error_type") if isinstance(parsed, dict) else None) \
            and not out_of_quota(status, labels):
        return UpstreamTransient(f"{model}: HTTP {status}: {message}", model=model, status=status,
                                 retry_after=wait_seconds(status, headers), summary=f"{model}: {said}",
                                 retried=retried_already(headers))
    shaped = None
    if isinstance(err, dict):  # every field redacted: an upstream may echo the key in any of them
        shaped = {"error": {"message": message,
                            "type": _redacted(err.get("type"), redact) or "invalid_request_error",
                            "param": _redacted(err.get("param"), redact),
                            "code": _redacted(err.get("code"), redact)}}
    unfit = (CONTEXT_WINDOW if too_long(status, message, labels)
             else UNSUPPORTED if cannot_read(status, message) else None)
    return UpstreamClientError(message, status=status, model=model, upstream_body=shaped, unfit=unfit,
                               summary=unfit_summary(model, unfit, said))


def unfit_summary(model: str, unfit: str | None, said: str) -> str:
    """The summary of an upstream's 4xx (``said``: its status and labels): one that says the
    request does not fit this model (``unfit``) names the model, as the proxy's own refusals do."""
    return said if unfit is None else f"model {model} cannot take this request ({unfit}): {said}"


# a model's answer that the request is longer than its context: OpenAI's and llama-cpp-python's
# code, vLLM's and OpenAI's words, llama.cpp's server's type and words, Anthropic's words,
# text-generation-inference's ("`inputs` tokens + `max_new_tokens` must be <= 4096", "`inputs`
# must have less than 4096 tokens")
CONTEXT_WINDOW = "context_window"
_TOO_LONG_LABEL = re.compile(r"context_length_exceeded|exceed_context_size", re.I)
_TOO_LONG_WORDS = re.compile(r"context[_ ]length[_ ]exceeded|maximum context length"
                             r"|exceeds? (the )?(available |model'?s? )?context|prompt is too long"
                             r"|`?inputs`? tokens \+ `?max_new_tokens`? must be <="
                             r"|`?inputs`? must have less than \d+ tokens", re.I)
# where an error message starts quoting the request back (a validation error's "input": ...,
# input_value=..., 'content': ...), whose words are the client's, not the model's
_ECHO = re.compile(r"""\b(input|input_value|messages|content)['"]?\s*[:=]""", re.I)


# a 429 that says the account's quota or credit is used up: OpenAI's code and type
# ``insufficient_quota``. By that label only, never by words: Gemini says "You exceeded your current
# quota" for its per-minute limits too, which a wait does clear
_NO_QUOTA = re.compile(r"\binsufficient_quota\b")


def out_of_quota(status: int, labels: str) -> bool:
    """Whether a 429 says the quota is used up rather than the rate too high, by its error's code
    or type (``labels``): not retried, it refuses the model as a 402 does (a routed request falls
    back, and the model cools down)."""
    return status == 429 and bool(_NO_QUOTA.search(labels))


def too_long(status: int, message: str, labels: str = "") -> bool:
    """Whether a 4xx says that the request does not fit the model's context window (another
    model's may hold it: a routed request falls back, and the model is not cooled): by its
    error's code or type (``labels``), or by the words of its message's start, before any echo of
    the request (a question about "the maximum context length" is no such answer)."""
    if not 400 <= status < 500:
        return False
    said = _ECHO.split(message[:200], 1)[0]
    return bool(_TOO_LONG_LABEL.search(labels) or _TOO_LONG_WORDS.search(said))


# a model's answer that it cannot read a part of the request another model may (images, audio,
# tools): vLLM's words for images and for tools without its tool parser, OpenAI's, llama.cpp's
# server's, Ollama's, and the common forms of "does not support X" / "X is not supported"
UNSUPPORTED = "unsupported_feature"
_FEATURE = r"(tools?|tool[ _]?(use|calling|calls)|function[ _]?calling|images?|image[ _]input|vision|audio( input)?)"
_CANNOT_READ_WORDS = re.compile(
    r"not a multimodal model|only supported by certain models|tool choice requires"
    rf"|(does not|doesn'?t|do not|cannot) (support|accept|take) {_FEATURE}\b"
    rf"|\b{_FEATURE} (input )?(is |are )?not supported", re.I)


def cannot_read(status: int, message: str) -> bool:
    """Whether a 4xx says the model cannot read a part of the request (its images, audio or
    tools) that another model may: a routed request falls back, and the model is not cooled. By
    the words of the message's start, before any echo of the request (as ``too_long``)."""
    if not 400 <= status < 500:
        return False
    return bool(_CANNOT_READ_WORDS.search(_ECHO.split(message[:300], 1)[0]))


def _redacted(value: Any, redact) -> Any:
    """A field of an upstream's error object as the client may see it: text redacted; a number
    or null as it is; anything else (an object where a string belongs) as redacted text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(value if isinstance(value, str) else orjson.dumps(value).decode())


@dataclass
class Answer:
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None


async def _mark_sent(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    """aiohttp's trace hook once a request's headers are written: ``PassThrough.attempt``'s
    ``sent`` says so."""
    holder = ctx.trace_request_ctx
    if holder is not None:
        holder[0] = True


class PassThrough:
    """Calls OpenAI-compatible upstreams directly over one pooled aiohttp session."""

    def __init__(self, connect_timeout_s: float = 5.0):
        self._connect = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
            traced = aiohttp.TraceConfig()
            traced.on_request_headers_sent.append(_mark_sent)
            self._session = aiohttp.ClientSession(connector=conn, json_serialize=None,
                                                  auto_decompress=True, skip_auto_headers=("User-Agent",),
                                                  trace_configs=[traced])
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def url(d: Deployment) -> str:
        base = d.api_base or DEFAULT_BASES.get(d.provider, "")
        return base.rstrip("/") + "/chat/completions"

    @staticmethod
    def with_defaults(d: Deployment, body: Mapping[str, Any]) -> dict[str, Any]:
        """``body`` with the model's defaults for what it does not say: from litellm_params, the
        OpenAI chat parameters (temperature, max_tokens, ...) and the fields of its extra_body;
        never litellm's own settings or other credentials. A limit on the answer the client gave,
        under either name, is the one limit (``LIMIT_NAMES``). A field the client sent as null is
        one it left unset, as OpenAI reads it: a default fills it."""
        defaults = {k: v for k, v in d.params.items() if k in BODY_DEFAULTS}
        extra = d.params.get("extra_body")
        out = {**(extra if isinstance(extra, dict) else {}), **defaults}
        out = {k: v for k, v in out.items()
               if body.get(k) is None and not (k in LIMIT_NAMES and limited(body))}
        limit_filled = not LIMIT_NAMES.isdisjoint(out)
        out.update({k: v for k, v in body.items()
                    if not (v is None and (k in out or (k in LIMIT_NAMES and limit_filled)))})
        return out

    @staticmethod
    def payload(d: Deployment, body: Mapping[str, Any]) -> bytes:
        out = PassThrough.with_defaults(d, body)
        out["model"] = d.upstream_model
        return orjson.dumps(out)

    @staticmethod
    def headers(d: Deployment) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if d.api_key:
            h["Authorization"] = f"Bearer {d.api_key}"
        if d.params.get("organization"):
            h["OpenAI-Organization"] = str(d.params["organization"])
        extra = d.params.get("extra_headers")
        if isinstance(extra, dict):
            h.update({str(k): str(v) for k, v in extra.items()})
        if not any(k.lower() == "user-agent" for k in h):  # an admin's own extra_headers win
            h["User-Agent"] = USER_AGENT  # some gateways (WAFs) refuse a request with none
        return h

    async def attempt(self, d: Deployment, body: Mapping[str, Any], stream: bool,
                      first_byte_s: float, read_s: float, redact,
                      connect_s: float | None = None, sent: list[bool | None] | None = None) -> Answer:
        """One call; returns once the answer (or the stream's first event) is in hand. ``sent[0]``
        is made False, then True once the request has gone out (its headers written): whether
        an attempt cut short (the client left) can have been billed."""
        if sent is not None:
            sent[0] = False
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_s or self._connect,
                                        sock_read=read_s)
        name_json = orjson.dumps(d.name)
        resp = None
        try:
            async with asyncio.timeout(first_byte_s):
                # a redirect is not followed: it would send the request, key and prompt, on to
                # another host; it is the model's failure (below)
                resp = await self.session().post(self.url(d), data=self.payload(d, body),
                                                 headers=self.headers(d), timeout=timeout,
                                                 allow_redirects=False, trace_request_ctx=sent)
                if 300 <= resp.status < 400:
                    raise redirected(d.name, resp.status)
                if resp.status != 200:
                    raw = await resp.read()
                    raise classify(resp.status, raw, d.name, resp.headers, redact,
                                   local=d.info.local_server is not None)
                if not stream:
                    raw = await resp.read()
                    if d.info.local_server is not None:
                        raw = _one_call_form(raw, _legacy_functions(body))
                    return Answer(body=_answer_or_failure(raw, name_json, d.name, resp.content_type, redact))
                head = b""
                if resp.content_type != "text/event-stream":
                    # JSON (stream: true ignored upstream), an HTML page, or SSE under another
                    # type: told apart by the first bytes
                    head = await resp.content.readany()
                    while len(head.lstrip()) < 6 and (more := await resp.content.readany()):
                        head += more  # enough to tell "data:" from "{" or "<html>"
                    if not _looks_like_sse(head):
                        sse = completion_as_events(head + await resp.read(), name_json, _wants_usage(body),
                                                   d.name, resp.content_type, redact)
                        resp.release()
                        return Answer(chunks=_replay(sse))
                events = within_gaps(_events(resp, head), read_s, _has_data)
                first = await _first_event(events, d.name, redact)
        except TimeoutError as exc:
            if resp is not None:
                resp.close()
            # aiohttp's own connect timeout is one too, and so is the attempt's limit reached while
            # it still connects (a model's timeout_s below connect_timeout_s): the request never
            # went out (said so: an unreachable host is not a slow model)
            connecting = isinstance(exc, aiohttp.ConnectionTimeoutError)
            unsent = connecting or (sent is not None and sent[0] is False)
            limit = (connect_s or self._connect) if connecting else first_byte_s
            said = f"could not connect within {limit:.1f}s" if unsent else f"no answer within {limit:.1f}s"
            raise UpstreamTransient(f"{d.name}: {said}", model=d.name, status=504, timeout=True,
                                    sent=not unsent) from None
        except aiohttp.ClientError as exc:
            if resp is not None:
                resp.close()
            if not (stream and resp is not None and resp.status == 200 and d.info.local_server is not None):
                # refused, unresolvable: never sent; reset or closed later: maybe generated
                raise UpstreamTransient(f"{d.name}: connection failed: {type(exc).__name__}: "
                                        f"{redact(str(exc))}", model=d.name,
                                        sent=not isinstance(exc, aiohttp.ClientConnectorError)) from None
            first = b""  # a local server's stream that broke before its first event: as an empty one
        except (UpstreamClientError, UpstreamTransient):
            resp.release()
            raise
        except asyncio.CancelledError:  # the client left: the upstream must stop generating for it
            if resp is not None:
                resp.close()
            raise
        if not first:
            resp.close()
            if d.info.local_server is not None:
                # llama-cpp-python's server ends at once (empty, or reset), a stream it cannot
                # begin (a prompt longer than its context): asked again without streaming, it
                # says why (its 400 goes back to the client), or answers in one piece
                whole = await self._asked_again(d, body, started + first_byte_s, read_s, redact,
                                                connect_s)
                whole = _one_call_form(whole, _legacy_functions(body))
                return Answer(chunks=_replay(completion_as_events(whole, name_json, _wants_usage(body),
                                                                  d.name, redact=redact)))
            raise UpstreamTransient(f"{d.name}: answered 200 with a stream that ended before its first "
                                    "event", model=d.name, status=200, reason="bad_answer")
        shape = _FirstToolDeltas(_legacy_functions(body)) if d.info.local_server is not None else None
        return Answer(chunks=_relay(first, events, name_json, resp, _choices(body), shape))

    async def _asked_again(self, d: Deployment, body: Mapping[str, Any], by: float,
                           read_s: float, redact, connect_s: float | None) -> bytes:
        """A local server's whole answer to ``body`` asked without streaming, by ``by`` (the
        attempt's own first-byte limit, ``time.monotonic()``). Right after the stream it could not
        begin, that server resets the next connection for a moment (measured: at once, yes; 50 ms
        later, no): the question waits 0.1 s, and once more 0.5 s if it was."""
        body = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
        for pause in (0.1, 0.5):
            left = by - time.monotonic() - pause
            if left <= 0:
                raise UpstreamTransient(f"{d.name}: no answer within the attempt's time", model=d.name,
                                        status=504, timeout=True)
            await asyncio.sleep(pause)
            try:
                whole = await self.attempt(d, body, False, left, read_s, redact, connect_s)
            except UpstreamTransient as exc:
                if pause == 0.5 or exc.upstream_status or exc.timeout:  # only a reset is asked again
                    raise
                continue
            assert whole.body is not None
            return whole.body
        raise AssertionError("unreachable: the last pause raises or returns")


def _looks_like_sse(head: bytes) -> bool:
    start = head.lstrip()[:6]
    return start.startswith((b"data:", b":", b"event:", b"id:", b"retry:"))


def _data(batch: bytes) -> Iterator[bytes]:
    """The ``data:`` payload of each event of a batch of complete events (an event's several
    ``data:`` lines joined by newlines, as SSE says)."""
    for event in batch.split(b"\n\n"):
        lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if lines:
            yield b"\n".join(lines)


async def _first_event(events: AsyncIterator[bytes], model: str, redact) -> bytes:
    """The stream up to its first ``data:`` event (what commits the request to this model), with
    the comments before it (OpenRouter's ``: OPENROUTER PROCESSING`` keep-alives, which are not an
    answer: the first-byte timeout still runs); b"" when it ends first, or ends with ``[DONE]``. A first event that is an
    error (vLLM and OpenRouter send one with status 200) is the model's failure, before the
    commit: the request can still fall back."""
    seen = b""
    async for batch in events:
        seen += batch
        payload = next(_data(batch), None)
        if payload is None:
            continue
        if payload == b"[DONE]":  # a stream that ends before any answer: as one that just ends
            return b""
        if payload.startswith(b"{") and b'"error"' in payload:
            parsed = loads_lenient(payload)
            if isinstance(parsed, dict) and "error" in parsed and "choices" not in parsed:
                raise _not_an_answer(parsed, payload, model, "text/event-stream", redact)
        return seen
    return b""


MAX_EVENT_BYTES = 16 * 1024 * 1024  # of one SSE event not yet complete


class EventTooLarge(aiohttp.ClientPayloadError):
    """The upstream sent more than ``MAX_EVENT_BYTES`` without ending an event."""


class StreamStalled(TimeoutError):
    """No event of a stream came for the longest gap allowed (its message says how long)."""


async def within_gaps(items: AsyncIterator[Any], gap_s: float,
                      counts: Callable[[Any], bool] = lambda item: True) -> AsyncIterator[Any]:
    """``items`` as they come, until ``gap_s`` of waiting passes with none that ``counts`` (a
    stream's data event: keep-alive comments, and bytes that never end an event, do not; a
    socket's read timeout restarts at every byte, and such a stream never ended): then
    ``StreamStalled``. The time its consumer takes between items is not waiting."""
    waited = 0.0
    it = aiter(items)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            async with asyncio.timeout(max(0.0, gap_s - waited)):
                item = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise StreamStalled(f"no event for {gap_s:.0f}s") from None
        waited = 0.0 if counts(item) else waited + loop.time() - started
        yield item


def _has_data(batch: bytes) -> bool:
    return next(_data(batch), None) is not None


async def _events(resp: aiohttp.ClientResponse, head: bytes = b"") -> AsyncIterator[bytes]:
    """Complete SSE events (terminator included), batched per network read; ``head``: bytes of
    the body already read. Line ends are made ``\\n`` whichever of the three SSE allows came
    (``\\r\\n``, or a lone ``\\r``: a ``\\r`` that ends a read waits for the next one). Each
    read is looked at once (the bytes pending were scanned and copied again at every read: an
    upstream that never ended an event took a core), and more than ``MAX_EVENT_BYTES`` pending
    is ``EventTooLarge``."""
    buf = bytearray()
    held = False  # a \r that ended the last read: \r\n or \r, told by the next one

    async def reads() -> AsyncIterator[bytes]:
        if head:
            yield head
        async for data in resp.content.iter_any():
            yield data

    async for data in reads():
        if held:
            data, held = b"\r" + data, False
        if b"\r" in data:
            held = data.endswith(b"\r")
            data = (data[:-1] if held else data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = max(0, len(buf) - 1)  # an event's end may span the last read and this one
        buf += data
        cut = buf.rfind(b"\n\n", start)
        if cut < 0:
            if len(buf) > MAX_EVENT_BYTES:
                raise EventTooLarge(f"more than {MAX_EVENT_BYTES >> 20} MiB without the end of an event")
            continue
        yield bytes(buf[: cut + 2])
        del buf[: cut + 2]
    if buf.strip():
        yield bytes(buf) + b"\n\n"


def _rename_events(batch: bytes, name_json: bytes) -> bytes:
    if b'"model"' not in batch and b'"choices"' not in batch:  # keep-alives, [DONE]
        return batch
    return b"\n\n".join(_rename_event(ev, name_json) for ev in batch.split(b"\n\n"))


def _rename_event(event: bytes, name_json: bytes) -> bytes:
    """The model renamed in an event's ``data:`` line, also behind ``event:`` or ``id:`` lines;
    given to a chunk that has none (some servers leave it out)."""
    at = 0 if event.startswith(b"data:") else event.find(b"\ndata:") + 1
    if at == 0 and not event.startswith(b"data:"):  # no data line: a comment, an id
        return event
    data = event[at:]
    if b'"model"' in data:
        return event[:at] + rename_model(data, name_json)
    brace = data.find(b"{")
    if b'"choices"' in data and brace >= 0 and data[brace + 1:].lstrip().startswith(b'"'):
        return event[:at] + data[:brace + 1] + b'"model":' + name_json + b"," + data[brace + 1:]
    return event


def _wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def completion_as_events(raw: bytes, name_json: bytes, include_usage: bool, model: str,
                         content_type: str = "application/json", redact=str) -> bytes:
    """A whole ``chat.completion`` (an upstream that answered a stream request with JSON) as the
    SSE events a stream would have carried: one chunk with each choice's message as its delta, the
    usage chunk if asked for, ``[DONE]``. Anything else is a failure of the model, before the first
    byte (so it falls back), never relayed as a stream with no event in it."""
    answer = loads_lenient(raw)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise _not_an_answer(answer, raw, model, content_type, redact)
    head = {k: answer[k] for k in ("id", "created", "system_fingerprint", "service_tier") if k in answer}
    head.update(object="chat.completion.chunk", model=orjson.loads(name_json))
    deltas = []
    for i, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        delta = {k: v for k, v in message.items() if v is not None}
        if isinstance(delta.get("tool_calls"), list):  # a chunk's tool calls carry their index
            delta["tool_calls"] = [{"index": j, **call} if isinstance(call, dict) else call
                                   for j, call in enumerate(delta["tool_calls"])]
        deltas.append({"index": choice.get("index", i), "delta": delta,
                       "logprobs": choice.get("logprobs"), "finish_reason": choice.get("finish_reason")})
    events = [{**head, "choices": deltas}]
    if include_usage and isinstance(answer.get("usage"), dict):
        events.append({**head, "choices": [], "usage": answer["usage"]})
    return b"".join(b"data: " + dumps_lenient(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _replay(sse: bytes) -> AsyncIterator[bytes]:
    yield sse


# what may end a stream: [DONE], or a choice's finish_reason (a non-empty string); found by a
# pattern, then read: only an event of the stream's own, never text inside a chunk's content
_MAY_FINISH = re.compile(rb'\[DONE\]|"finish_reason"\s*:\s*"[^"]')


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    if isinstance(n, float) and n.is_integer():  # 2.0: the upstream takes it as 2
        n = int(n)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


class _Finish:
    """Whether a relayed stream has ended properly: ``[DONE]`` as an event's whole payload, or a
    ``finish_reason`` for each of the ``n`` choices asked for."""

    def __init__(self, choices: int):
        self.choices = choices
        self.finished: set[Any] = set()
        self.done = False
        self.said_done = False  # [DONE] itself came (a client may wait for it)

    def read(self, batch: bytes) -> None:
        if self.said_done or not _MAY_FINISH.search(batch):
            return
        for payload in _data(batch):
            if payload == b"[DONE]":
                self.done = self.said_done = True
                return
            if self.done or b'"finish_reason"' not in payload:
                continue
            chunk = loads_lenient(payload)
            for choice in chunk.get("choices") or () if isinstance(chunk, dict) else ():
                if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str) \
                        and choice["finish_reason"]:
                    self.finished.add(choice.get("index", 0))
        self.done = len(self.finished) >= self.choices


def interrupted_event(why: str) -> bytes:
    """The in-band error event of a stream cut short (headers are gone: the OpenAI SDK raises on it)."""
    return error_event(f"upstream stream interrupted: {why}", "upstream_error", "stream_interrupted")


def _legacy_functions(body: Mapping[str, Any]) -> bool:
    """Whether a request declares its functions the legacy way (``functions``, no ``tools``): OpenAI
    answers it with ``function_call``, and a request with ``tools`` with ``tool_calls``."""
    return isinstance(body.get("functions"), list) and not body.get("tools")


def _one_call_form(raw: bytes, legacy: bool) -> bytes:
    """llama-cpp-python's whole answer with its call in the one form OpenAI would give it: the
    server writes a call both as ``tool_calls`` and as the legacy ``function_call``, and a client
    reading the other one too acts on the call twice, or sends it back. ``legacy``: the request
    declared ``functions``: its ``function_call`` is made of the first tool call (some chat formats
    write a wrong name there, or none), and it finishes with ``function_call``; else ``tools``.
    Anything else as it came."""
    if b'"function_call"' not in raw and not (legacy and b'"tool_calls"' in raw):
        return raw
    answer = loads_lenient(raw)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list):
        return raw
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not (isinstance(calls, list) and calls):
            continue
        if not legacy:
            message.pop("function_call", None)
            continue
        function = calls[0].get("function") if isinstance(calls[0], dict) else None
        if isinstance(function, dict):
            message["function_call"] = {"name": function.get("name"), "arguments": function.get("arguments")}
            del message["tool_calls"]
            if choice.get("finish_reason") == "tool_calls":
                choice["finish_reason"] = "function_call"
    return dumps_lenient(answer)


class _FirstToolDeltas:
    """llama-cpp-python's streamed calls as OpenAI streams them. Its server repeats a call's
    ``id``, ``type`` and ``function.name`` in every delta, and the same call again as the legacy
    ``function_call``: clients join a call's deltas field by field (the openai SDK's stream helpers
    made ``get_wget_wget_w...`` of ``get_w``, and an id seven ids long). A call keeps its name (and
    id, type) in its first delta only, in the one form the request asked for (``legacy``:
    ``function_call``, for a request that declared ``functions``; else ``tool_calls``)."""

    def __init__(self, legacy: bool = False) -> None:
        self.legacy = legacy
        self.begun: set[tuple[Any, Any]] = set()  # (choice index, tool call index or "legacy") seen

    def __call__(self, batch: bytes) -> bytes:
        if b'"tool_calls"' not in batch and b'"function_call"' not in batch and not self.legacy:
            return batch
        return b"\n\n".join(self._event(event) for event in batch.split(b"\n\n"))

    def _event(self, event: bytes) -> bytes:
        at = 0 if event.startswith(b"data:") else event.find(b"\ndata:") + 1
        if at == 0 and not event.startswith(b"data:"):
            return event
        chunk = loads_lenient(event[at + 5:])
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return event
        for choice in chunk["choices"]:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            if self.legacy:  # the first tool call, as function_call (some chat formats write a wrong one)
                calls = delta.pop("tool_calls", None)
                first = next((c for c in calls if isinstance(c, dict) and c.get("index", 0) == 0), None) \
                    if isinstance(calls, list) else None
                if isinstance(first, dict) and isinstance(first.get("function"), dict):
                    delta["function_call"] = {k: v for k, v in first["function"].items()
                                              if k in ("name", "arguments")}
                elif isinstance(calls, list):  # another call's delta: no part of the one legacy call
                    delta.pop("function_call", None)
                if choice.get("finish_reason") == "tool_calls":
                    choice["finish_reason"] = "function_call"
                call = delta.get("function_call")
                if isinstance(call, dict) and not self._first(choice.get("index"), "legacy"):
                    call.pop("name", None)
                continue
            calls = delta.get("tool_calls")
            if not isinstance(calls, list):
                continue
            delta.pop("function_call", None)
            for call in calls:
                if not isinstance(call, dict) or self._first(choice.get("index"), call.get("index")):
                    continue
                call.pop("id", None)
                call.pop("type", None)
                if isinstance(call.get("function"), dict):
                    call["function"].pop("name", None)
        return event[:at] + b"data: " + dumps_lenient(chunk)

    def _first(self, choice: Any, call: Any) -> bool:
        """Whether this is the first delta of this call of this choice."""
        if (choice, call) in self.begun:
            return False
        self.begun.add((choice, call))
        return True


async def _relay(first: bytes, events: AsyncIterator[bytes], name_json: bytes,
                 resp: aiohttp.ClientResponse, choices: int = 1,
                 shape: Callable[[bytes], bytes] | None = None) -> AsyncIterator[bytes]:
    try:
        finish = _Finish(choices)
        finish.read(first)
        yield _rename_events(utf8_repaired(shape(first) if shape else first), name_json)
        try:
            async for batch in events:
                finish.read(batch)
                yield _rename_events(utf8_repaired(shape(batch) if shape else batch), name_json)
        except (aiohttp.ClientError, TimeoutError) as exc:
            yield interrupted_event(str(exc) if isinstance(exc, (StreamStalled, EventTooLarge))
                                    else type(exc).__name__)
            return
        if not finish.done:
            # the upstream closed the stream cleanly, but before a finish_reason or [DONE]: a
            # client must not take the part it got for the whole answer
            yield interrupted_event("the upstream ended it before the answer was finished")
        elif not finish.said_done:  # finished, but the upstream left out the [DONE] clients wait for
            yield b"data: [DONE]\n\n"
    finally:
        resp.release()
