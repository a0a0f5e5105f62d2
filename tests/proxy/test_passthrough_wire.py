"""The pass-through path against what OpenAI-compatible servers really put on the wire (vLLM,
OpenRouter, llama.cpp, gateways): a 200 that is no answer falls back as on the litellm path; a
stream is committed by its first event, not a keep-alive; its end is read from its events."""
from __future__ import annotations

import json
import time

import openai
import pytest

from conftest import RecordingScorer, model_entry, write_config
from support.raw_upstream import raw_upstream

MESSAGES = [{"role": "user", "content": "hi"}]
SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


def reply(content_type: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\nconnection: close\r\n\r\n" + body


def chunk(content: str | None = None, finish: str | None = None, index: int = 0, model="up") -> bytes:
    delta = {"content": content} if content is not None else {}
    return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                                   "choices": [{"index": index, "delta": delta,
                                                "finish_reason": finish}]}).encode() + b"\n\n"


def routed(tmp_path, upstream, start_proxy, url, **router):
    """``bad`` (at ``url``) ranked first, a working model after it."""
    cfg = write_config(tmp_path / "providers.yaml",
                       [model_entry("bad", url, tmp_path, fast_path=True),
                        model_entry("good", upstream.url, tmp_path, fast_path=True)],
                       num_retries=0, **router)
    return start_proxy(cfg, scorer=RecordingScorer({"bad": 0.9, "good": 0.5}))


def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0, timeout=30)


@pytest.mark.parametrize("body, reason", [
    (reply(b"text/html", b"<html><body>Sign in to the Wi-Fi</body></html>"), "bad_answer"),
    (reply(b"application/json", b""), "bad_answer"),
    (reply(b"application/json", b'{"error": {"message": "model overloaded", "code": 503}}'), "http_503"),
    (reply(b"application/json", b'{"error": {"message": "engine died"}}'), "bad_answer"),
    (reply(b"text/event-stream", b""), "bad_answer"),
    (reply(b"text/event-stream", b": keep-alive\n\n"), "bad_answer"),
    (reply(b"text/event-stream", b"data: [DONE]\n\n"), "bad_answer"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_200_that_is_no_answer_is_the_model_s_failure(tmp_path, upstream, start_proxy, body, reason,
                                                       stream):
    with raw_upstream(lambda request: body) as url:
        proxy = routed(tmp_path, upstream, start_proxy, url)
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,
                                                                      stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            assert raw.parse().choices[0].message.content
    assert raw.headers["x-satroute-model"] == "good"
    assert raw.headers["x-satroute-failed"] == f"bad:{reason}"


@pytest.mark.parametrize("error", [
    b'data: {"error": {"message": "upstream overloaded", "code": 503}}\n\n',
    b'data: {"error":\ndata: {"message": "overloaded", "code": 503}}\n\n',  # over several data: lines
], ids=["one-line", "several-lines"])
def test_a_stream_whose_first_event_is_an_error_falls_back(tmp_path, upstream, start_proxy, error):
    """vLLM and OpenRouter send a failure as an error event with status 200."""
    with raw_upstream(lambda request: SSE + error) as url:
        proxy = routed(tmp_path, upstream, start_proxy, url)
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,
                                                                      stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-satroute-model"] == "good" and text
    assert raw.headers["x-satroute-failed"] == "bad:http_503"


def test_keep_alive_comments_do_not_commit_a_stream(tmp_path, upstream, start_proxy):
    """OpenRouter's ': OPENROUTER PROCESSING' is not an answer: an upstream that sends only those
    is still held to timeout_s, and then falls back."""
    import asyncio

    async def pings(request, reader, writer):
        writer.write(SSE)
        for _ in range(40):
            writer.write(b": OPENROUTER PROCESSING\n\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    with raw_upstream(pings) as url:
        proxy = routed(tmp_path, upstream, start_proxy, url, timeout_s=1.0)
        started = time.monotonic()
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,
                                                                      stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-satroute-model"] == "good" and text
    assert raw.headers["x-satroute-failed"] == "bad:timeout"
    assert time.monotonic() - started < 3


def test_comments_before_the_first_event_are_relayed_with_it(tmp_path, start_proxy):
    body = SSE + b": ping\n\n" + chunk("a") + chunk(None, "stop") + b"data: [DONE]\n\n"
    with raw_upstream(lambda request: body) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        chunks = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["a", None]


@pytest.mark.parametrize("body", [
    # a model explaining SSE: its text holds "data: [DONE]"; then the connection is cut
    chunk("To end an SSE stream, send data: [DONE] as the") + chunk(" last"),
    # finish_reason "" on every chunk (some servers), then cut
    chunk("partial", "") + chunk(" more", ""),
])
def test_a_stream_cut_before_its_end_is_never_taken_for_a_whole_answer(tmp_path, start_proxy, body):
    with raw_upstream(lambda request: SSE + body) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        with pytest.raises(openai.APIError, match="stream interrupted"):
            list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))


@pytest.mark.parametrize("n", [2, 2.0])  # 2.0 passes validation, and the upstream takes it as 2
def test_with_n_choices_the_stream_ends_when_every_choice_has(tmp_path, start_proxy, n):
    one_done = chunk("a", index=0) + chunk("b", index=1) + chunk(None, "stop", index=0)
    with raw_upstream(lambda request: SSE + one_done) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        with pytest.raises(openai.APIError, match="stream interrupted"):
            list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True,
                                                       extra_body={"n": n}))
        both = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True, n=1))
    assert len(both) == 3  # n=1: the first choice's finish is the end


def test_bare_cr_line_ends_split_events_and_every_model_is_renamed(tmp_path, start_proxy):
    body = (chunk("a") + chunk("b") + chunk(None, "stop") + b"data: [DONE]\n\n").replace(b"\n", b"\r")
    with raw_upstream(lambda request: SSE + body) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        chunks = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
    assert [(c.model, c.choices[0].delta.content) for c in chunks] == [("m1", "a"), ("m1", "b"), ("m1", None)]


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/octet-stream"])
def test_a_stream_under_another_content_type_is_read_by_its_bytes(tmp_path, start_proxy, content_type):
    """SSE labelled text/plain is relayed as SSE; a whole completion so labelled becomes a stream."""
    completion = {"id": "c", "object": "chat.completion", "created": 0, "model": "up",
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "whole"}}]}

    def respond(request):
        if request["messages"][0]["content"] == "sse":
            return reply(content_type, chunk("a") + chunk(None, "stop") + b"data: [DONE]\n\n")
        return reply(content_type, json.dumps(completion).encode())

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        sse = list(client(proxy).chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "sse"}], stream=True))
        whole = list(client(proxy).chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "json"}], stream=True))
    assert [c.choices[0].delta.content for c in sse] == ["a", None]
    assert [(c.model, c.choices[0].delta.content) for c in whole] == [("m1", "whole")]


def test_a_null_or_missing_model_in_an_answer_becomes_the_configured_name(tmp_path, start_proxy):
    def respond(request):
        answer = {"id": "c", "object": "chat.completion", "created": 0,
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "x"}}]}
        if request["messages"][0]["content"] == "null":
            answer["model"] = None
        if request.get("stream"):
            absent = chunk("b").replace(b'"model": "up", ', b"")
            assert b'"model"' not in absent
            return SSE + chunk("a", model=None) + absent + chunk(None, "stop", model=None) + b"data: [DONE]\n\n"
        return reply(b"application/json", json.dumps(answer).encode())

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        for content in ("null", "absent"):
            got = client(proxy).chat.completions.create(model="m1", messages=[{"role": "user", "content": content}])
            assert got.model == "m1"
        chunks = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
    assert {c.model for c in chunks} == {"m1"}


def test_an_answer_with_json_python_writes_is_relayed_not_refused(tmp_path, start_proxy):
    """NaN in logprobs (json.dumps' default) and a lone surrogate (an emoji cut at max_tokens)
    are no reason to refuse an answer that was relayed as it came before."""
    body = (b'{"id": "c", "object": "chat.completion", "created": 0, "model": "up", "choices": [{"index": 0, '
            b'"finish_reason": "length", "message": {"role": "assistant", "content": "Sure \\ud83d"}, '
            b'"logprobs": {"content": [{"token": "x", "logprob": -Infinity, "bytes": null, "top_logprobs": []}]}}]}')
    with raw_upstream(lambda request: reply(b"application/json", body)) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        import httpx

        got = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m1", "messages": MESSAGES}, timeout=30)
        streamed = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                              json={"model": "m1", "messages": MESSAGES, "stream": True})
    assert got.status_code == 200 and b'"model":"m1"' in got.content and b"-Infinity" in got.content
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text and '"m1"' in streamed.text


def test_an_answer_with_bytes_that_are_not_utf8_reaches_the_sdk_as_text(tmp_path, start_proxy):
    """A server that stops on a byte cuts a character (an emoji's first two bytes at max_tokens):
    relayed as they came, the openai SDK raised a bare UnicodeDecodeError, streamed or not."""
    cut = "Sure 🚀".encode()[:-2]

    def respond(request):
        if request.get("stream"):
            return SSE + chunk("a").replace(b'"a"', b'"' + cut + b'"') + chunk(None, "stop") + b"data: [DONE]\n\n"
        return reply(b"application/json",
                     b'{"id": "c", "object": "chat.completion", "created": 0, "model": "up", "choices": [{"index": 0, '
                     b'"finish_reason": "length", "message": {"role": "assistant", "content": "' + cut + b'"}}]}')

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        got = client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
        chunks = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
    assert got.model == "m1" and got.choices[0].message.content == "Sure \ufffd"
    assert [c.choices[0].delta.content for c in chunks] == ["Sure \ufffd", None]
    assert {c.model for c in chunks} == {"m1"}


def test_sse_under_another_type_is_recognised_when_its_first_read_is_short(tmp_path, start_proxy):
    import asyncio

    async def slow(request, reader, writer):
        writer.write(reply(b"application/octet-stream", b"\n"))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"da")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write((b"ta" + chunk("a")[4:]) + chunk(None, "stop") + b"data: [DONE]\n\n")
        await writer.drain()

    with raw_upstream(slow) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        chunks = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["a", None]


def test_the_pass_through_names_itself_unless_the_admin_set_a_user_agent(tmp_path, upstream, start_proxy):
    """Gateways behind a WAF may refuse a request with no User-Agent; an admin's extra_headers one is
    sent instead of it, not beside it."""
    from proxy.upstream import PassThrough, USER_AGENT

    named = model_entry("named", upstream.url, tmp_path, fast_path=True)
    named["litellm_params"]["extra_headers"] = {"user-agent": "acme-gateway-client/2"}
    cfg = write_config(tmp_path / "providers.yaml",
                       [model_entry("plain", upstream.url, tmp_path, fast_path=True), named])
    proxy = start_proxy(cfg)
    for name in ("plain", "named"):
        client(proxy).chat.completions.create(model=name, messages=MESSAGES)
    assert USER_AGENT.startswith("satroute/") and len(USER_AGENT) > len("satroute/")
    assert [r.headers.get("user-agent") for r in upstream.received] == [USER_AGENT, "acme-gateway-client/2"]
    deployment = proxy.app.state.services.registry.snapshot.models["named"]
    assert [k for k in PassThrough.headers(deployment) if k.lower() == "user-agent"] == ["user-agent"]


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("after_first", ["pings", "trickle"])
def test_a_stream_kept_open_with_no_event_ends_after_its_gap(tmp_path, start_proxy, fast_path, after_first):
    """After its first chunk an upstream sent keep-alive comments (a stuck backend behind a
    gateway), or a byte a second that never ended an event: the socket's read timeout restarted
    at each byte, and the client waited for ever. No event for timeout_s ends the stream."""
    import asyncio

    async def stuck(request, reader, writer):
        writer.write(SSE + chunk("first"))
        await writer.drain()
        for _ in range(100):
            await asyncio.sleep(0.2)
            writer.write(b": ping\n\n" if after_first == "pings" else b"d")
            await writer.drain()

    with raw_upstream(stuck) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=fast_path)],
                           num_retries=0, timeout_s=1.0, deadline_s=30)
        proxy = start_proxy(cfg)
        began = time.monotonic()
        got = []
        with pytest.raises(openai.APIError, match="no event for 1s|stream interrupted"):
            for c in client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True):
                got.append(c.choices[0].delta.content)
        took = time.monotonic() - began
    assert got == ["first"] and took < 6, took


def test_an_event_that_never_ends_is_bounded(tmp_path, start_proxy, monkeypatch):
    """An upstream that sent bytes without ending an event had them piled up, each read copying
    and scanning them all again: 150 MiB and a core after a minute, every other request slower."""
    import asyncio

    from proxy import upstream as upstream_module

    monkeypatch.setattr(upstream_module, "MAX_EVENT_BYTES", 1 << 20)

    async def flood(request, reader, writer):
        writer.write(SSE + chunk("first") + b"data: {\"x\": \"")
        for _ in range(64):
            writer.write(b"y" * 65536)
            await writer.drain()
        await asyncio.sleep(5)

    with raw_upstream(flood) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0, timeout_s=10.0)
        proxy = start_proxy(cfg)
        with pytest.raises(openai.APIError, match="more than 1 MiB without the end of an event"):
            list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_models_stream_timeout_bounds_its_streamed_requests(tmp_path, start_proxy, fast_path):
    """litellm_params.stream_timeout, which LiteLLM configs carry, was ignored: a streamed request
    to a hung model waited timeout_s."""
    import asyncio

    async def hung(request, reader, writer):
        await asyncio.sleep(10)

    with raw_upstream(hung) as url:
        entry = model_entry("m1", url, tmp_path, fast_path=fast_path)
        entry["litellm_params"]["stream_timeout"] = 1
        cfg = write_config(tmp_path / "providers.yaml", [entry], num_retries=0, timeout_s=6.0, deadline_s=30)
        proxy = start_proxy(cfg)
        client(proxy).models.list()  # the litellm import is not the attempt's time
        began = time.monotonic()
        with pytest.raises(openai.APIError):
            list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
        took = time.monotonic() - began
    assert took < 4, took
