"""OpenAI wire types for the endpoints the proxy serves; no logic beyond validation.

Owns: the shape of a chat-completions request as far as the proxy reads it (and how its JSON is
read: ``read_json``), the model list, and the names of the proxy's own additions to the wire format.
Every field the proxy does not read is kept (``extra="allow"``) and forwarded untouched: the request
body sent upstream is the client's own dict, not a re-serialisation of these models.
Does not know: routing, dispatch, HTTP.

Departures from the OpenAI spec (each one is ours, and documented in docs/routing.md):
- ``ROUTE_FIELD`` (``"satroute"``): optional object ``{"models": [names]}`` that narrows the
  candidates of a routed request. It is removed before the request goes upstream.
- Response headers ``HEADER_*``: the routed model, the ranked scores, the scorer's latency, the
  models that failed before the answering one; model names in them as ``header_name`` writes them.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from scorer.data import mended  # a lone surrogate as U+FFFD, as the scorer reads its data

ROUTE_FIELD = "satroute"
# The request parameters of the OpenAI chat completions API (besides ``model``; ``metadata`` left
# out: litellm reads it as its own, so on its path a client's ``metadata`` travels in extra_body).
OPENAI_CHAT_PARAMS = frozenset({
    "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "response_format", "seed", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "modalities", "audio", "prediction", "reasoning_effort",
    "service_tier", "store", "web_search_options", "verbosity"})

HEADER_MODEL = "x-satroute-model"
HEADER_ROUTE = "x-satroute-route"  # routed, direct, default, or aptitude (scorer failed, timed out, stalled)
HEADER_DEGRADED = "x-satroute-degraded"  # why "aptitude": scorer_failed, scorer_timeout, scorer_stalled
HEADER_SCORES = "x-satroute-scores"  # "name=0.8123,name2=0.4410", best first
HEADER_SCORER_MS = "x-satroute-scorer-ms"
HEADER_FAILED = "x-satroute-failed"  # "name:reason,name2:reason" (models tried before the answer)
# What a model name may hold unchanged in those headers; anything else (",", "=", "%", spaces,
# non-ASCII: a header value is Latin-1 on the wire) is percent-encoded as UTF-8.
_HEADER_NAME_SAFE = "-._~/:@+!*()'"


def header_name(name: str) -> str:
    """A model name as the ``x-satroute-*`` headers carry it: unchanged for the usual names
    (``gpt-4o``, ``openai/gpt-4o-mini``, ``llama3:8b``), percent-encoded otherwise, so any name
    can be sent and read back (``urllib.parse.unquote``) and the lists stay parseable."""
    return quote(name, safe=_HEADER_NAME_SAFE)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    # None is legal for assistant turns that only carry tool_calls.
    content: StrictStr | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


MAX_ROUTE_MODELS = 1024  # names in satroute.models; no deployment lists that many models
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class RouteOptions(BaseModel):
    """Our extension: ``{"satroute": {"models": ["a", "b"]}}`` narrows the routed candidates."""

    model_config = ConfigDict(extra="forbid")
    # bounded: a list of a million wrong items was a million validation errors (seconds, GBs)
    models: list[StrictStr] = Field(min_length=1, max_length=MAX_ROUTE_MODELS)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    satroute: RouteOptions | None = None
    # arrays, as OpenAI refuses anything else with a 400; not checked further (each provider says
    # what it takes of them): a local model's server answered a 500, retried, for ``"tools": 5``
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    # 0 to 20, as OpenAI refuses any other with a 400: a local model's server takes any number and
    # writes that many alternatives of every token (at 100,000, its whole vocabulary: about 43 MB
    # of its memory and 25 MB of the proxy's a token)
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # an object, as OpenAI refuses anything else with a 400: litellm builds its own options from
    # it before sending, and any other value raised a TypeError there (a 500 on that path)
    web_search_options: dict[str, Any] | None = None


class _FirstFaultMessage(Message):
    content: StrictStr | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None


class FirstFaultRequest(ChatCompletionRequest):
    """``ChatCompletionRequest`` for a body too large to have all its faults listed: the same
    request once valid, but its validation stops at the first wrong message, and at a message's
    first wrong content part (pydantic would build an error for each of them, holding the GIL:
    20,000 wrong messages took 0.5 s to refuse, the event loop blocked even on a worker thread)."""

    messages: list[_FirstFaultMessage] = Field(min_length=1, fail_fast=True)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "satroute"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def read_json(raw: bytes) -> Any:
    """A request body's JSON, as orjson reads it; ValueError (its message names the fault) when it
    is none. One fault orjson refuses is mended instead: an escaped lone surrogate (``"\\ud83d"``,
    from a JavaScript client that cut a string through an emoji; JSON's grammar allows it), each
    replaced by U+FFFD as a UTF-8 decoder would. Nothing else is let through that orjson refuses."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("str is not valid UTF-8"):  # orjson says "surrogates" for any bad byte
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise ValueError(f"not UTF-8 text (byte {bad.start})") from None
        if "surrogate" not in str(exc):
            raise ValueError(str(exc)) from None
        first = str(exc)

    def refuse(name: str) -> Any:  # NaN, Infinity, 1e400: not JSON numbers, whatever Python reads
        raise json.JSONDecodeError(f"{name} is not a JSON number", "", 0)

    def number(text: str) -> float:
        value = float(text)
        return value if math.isfinite(value) else refuse(text)

    def integer(text: str) -> int | float:  # past 64 bits, a float, as orjson reads it
        value = int(text)
        return value if -(1 << 63) <= value < (1 << 64) else float(value)

    def mend(value: Any) -> Any:
        if isinstance(value, str):
            return mended(value)
        if isinstance(value, list):
            return [mend(v) for v in value]
        if isinstance(value, dict):
            return {mend(k): mend(v) for k, v in value.items()}
        return value

    try:
        return mend(json.loads(raw.decode("utf-8"), parse_constant=refuse, parse_float=number,
                               parse_int=integer))
    except json.JSONDecodeError as other:  # a further fault: the reader that saw past the first names it
        raise ValueError(other.msg) from None
    except (ValueError, RecursionError):  # not UTF-8, or nested past Python's reader
        raise ValueError(first) from None
