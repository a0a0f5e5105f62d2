"""Bad input and authentication: always OpenAI's error shape, 400/401/413 naming the problem."""
from __future__ import annotations

import functools
import time

import httpx
import openai
import orjson
import pytest

MESSAGES = [{"role": "user", "content": "hi"}]


def post(proxy, content: bytes | None = None, json=None, headers=None) -> httpx.Response:
    return httpx.post(f"{proxy.url}/chat/completions", content=content, json=json,
                      headers=headers, timeout=10)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], (word, err["message"])
    assert "Traceback" not in r.text
    return err


@pytest.fixture
def proxy(config, upstream, start_proxy):
    return start_proxy(config, max_body_bytes=2048)


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    (b"", ["empty"]),
    (b"[1, 2]", ["JSON object", "list"]),
    (b'"text"', ["JSON object", "str"]),
    (b"null", ["JSON object"]),
])
def test_malformed_bodies_are_400(proxy, upstream, body, words):
    assert_error(post(proxy, content=body, headers={"content-type": "application/json"}),
                 400, *words)
    assert upstream.bodies() == []


def test_a_chat_body_that_turns_out_malformed_is_answered_400_as_that_request(proxy, upstream, caplog):
    """A chunked body whose next chunk is no chunk, while the app waits for it: the connection was
    closed with no answer, and the log and /metrics said the client had left (499)."""
    import json
    import logging
    import socket

    from support.prometheus import scrape

    caplog.set_level(logging.INFO, logger="satroute.request")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n10\r\n{\"model\":\"m1\",\"m\r\n")
        time.sleep(0.3)  # the app has the request, and reads its body
        sock.sendall(b"ZZZ\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(body)["error"]["code"] == "invalid_http_request"
    rid = next(line.split(b": ")[1].decode() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-request-id:"))
    deadline = time.monotonic() + 5
    while not (lines := [r for r in caplog.records if r.name == "satroute.request"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # a second line, were one written
    lines = [r for r in caplog.records if r.name == "satroute.request"]
    assert [(r.fields["request_id"], r.fields["status"], r.fields["error"]) for r in lines] == [
        (rid, 400, "invalid_http_request")]
    counted = {labels: v for (name, labels), v in scrape(proxy.base).items()
               if name == "satroute_requests_total"}
    assert counted == {(("model", "none"), ("status", "400")): 1.0}
    assert upstream.bodies() == []


@pytest.mark.parametrize("body, param", [
    ({"model": "auto"}, "messages"),
    ({"model": "auto", "messages": []}, "messages"),
    ({"messages": MESSAGES}, "model"),
    ({"model": "", "messages": MESSAGES}, "model"),
    ({"model": 5, "messages": MESSAGES}, "model"),
    ({"model": "auto", "messages": "hi"}, "messages"),
    ({"model": "auto", "messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"model": "auto", "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"model": "auto", "messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages.0.content"),
    ({"model": "auto", "messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages.0.content.0.type"),
    ({"model": "auto", "messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"model": "auto", "messages": MESSAGES, "stream_options": {"include_usage": "x"}},
     "stream_options.include_usage"),
    ({"model": "auto", "messages": MESSAGES, "satroute": {"models": "m1"}}, "satroute.models"),
    ({"model": "auto", "messages": MESSAGES, "satroute": {"modles": ["m1"]}}, "satroute.modles"),
    ({"model": "auto", "messages": MESSAGES, "satroute": {}}, "satroute.models"),
    ({"model": "auto", "messages": MESSAGES, "satroute": {"models": None}}, "satroute.models"),
    ({"model": "auto", "messages": MESSAGES, "satroute": {"models": []}}, "satroute.models"),
    ({"model": "auto", "messages": MESSAGES, "tools": 5}, "tools"),  # as OpenAI: an array
    ({"model": "auto", "messages": MESSAGES, "functions": {"name": "f"}}, "functions"),
    # OpenAI's bound, 0 to 20: a local model's server wrote its whole vocabulary for every token
    ({"model": "auto", "messages": MESSAGES, "logprobs": True, "top_logprobs": 100_000}, "top_logprobs"),
    ({"model": "auto", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"model": "auto", "messages": MESSAGES, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"model": "auto", "messages": MESSAGES, "logprobs": True, "top_logprobs": 1e30}, "top_logprobs"),
    # an object, as OpenAI: litellm's own code failed on any other value (a 500 on its path)
    ({"model": "auto", "messages": MESSAGES, "web_search_options": "x"}, "web_search_options"),
])
def test_wrong_shapes_are_400_naming_the_field(proxy, upstream, body, param):
    err = assert_error(post(proxy, json=body), 400, param)
    assert err["param"] == param  # the field the client sent, never pydantic's union branch names
    assert upstream.bodies() == []


@pytest.mark.parametrize("top", [0, 20])
def test_top_logprobs_within_openai_s_bound_is_taken(top):
    from proxy.endpoints import parse_request

    body, req = parse_request(orjson.dumps({"model": "auto", "messages": MESSAGES, "logprobs": True,
                                            "top_logprobs": top}))
    assert body["top_logprobs"] == req.top_logprobs == top


def test_a_union_failing_both_ways_counts_as_one_more_problem(proxy, upstream):
    body = {"model": "auto", "messages": [{"role": "user", "content": 5},
                                          {"role": "user", "content": [{"text": "no type"}]}]}
    err = assert_error(post(proxy, json=body), 400)
    assert err["message"] == "messages.1.content.0.type: Field required (and 1 more problems)"


def test_body_over_the_limit_is_413(proxy, upstream):
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 4096}]}
    assert_error(post(proxy, json=big), 413, "limit")
    # without a content-length (chunked upload) the limit holds too

    def chunks():
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(post(proxy, content=chunks()), 413, "limit")
    assert upstream.bodies() == []


def test_a_photo_sent_as_base64_fits_the_default_limit(config, upstream, start_proxy):
    """Frontends put images in the body as base64 data URLs; a phone photo is 5 to 10 MB of it."""
    import base64

    photo = "data:image/jpeg;base64," + base64.b64encode(b"\xff" * 7_000_000).decode()
    body = {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": photo}}]}]}
    proxy = start_proxy(config)  # the default SATROUTE_MAX_BODY_BYTES
    r = post(proxy, json=body)
    assert r.status_code == 200, r.text[:300]
    [sent] = upstream.bodies()
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == photo


def test_a_compressed_body_is_refused_saying_so(proxy, upstream):
    """No OpenAI client compresses its request; one that does got "surrogates not allowed"."""
    import gzip

    raw = gzip.compress(orjson.dumps({"model": "auto", "messages": MESSAGES}))
    r = httpx.post(f"{proxy.url}/chat/completions", content=raw,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding"
    assert "'gzip' is not supported" in r.json()["error"]["message"]
    r = httpx.post(f"{proxy.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not UTF-8 text (byte 1)" in r.json()["error"]["message"]
    assert upstream.bodies() == []


def test_unknown_route_and_method_use_openai_shape(proxy):
    assert_error(httpx.get(f"{proxy.url}/nope"), 404)
    wrong_method = httpx.get(f"{proxy.url}/chat/completions")
    assert_error(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed


def test_master_key_guards_v1_but_not_probes(config, upstream, start_proxy):
    proxy = start_proxy(config, master_key="sk-master-123")
    for headers, why in [(None, "missing"), ({"Authorization": "Bearer wrong"}, "invalid"),
                         ({"Authorization": "sk-master-123"}, "invalid"),
                         ({"Authorization": "Basic sk-master-123"}, "invalid"),
                         ({"Authorization": "Bearer sk-master-1234"}, "invalid")]:
        err = assert_error(post(proxy, json={"model": "m1", "messages": MESSAGES},
                                headers=headers), 401, why)
        assert err["code"] == "invalid_api_key"
        assert "sk-master-123" not in str(err)
    assert_error(httpx.get(f"{proxy.url}/models"), 401)
    assert upstream.bodies() == []
    assert httpx.get(f"{proxy.base}/health").status_code == 200
    assert httpx.get(f"{proxy.base}/ready").status_code == 200
    for spelled in ("bearer sk-master-123", "BEARER  sk-master-123"):  # the scheme is case-insensitive
        assert httpx.get(f"{proxy.url}/models", headers={"Authorization": spelled}).status_code == 200
    good = openai.OpenAI(base_url=proxy.url, api_key="sk-master-123", max_retries=0)
    assert good.chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url, api_key="nope", max_retries=0).models.list()


def test_master_key_from_environment(config, upstream, start_proxy, monkeypatch):
    monkeypatch.setenv("SATROUTE_MASTER_KEY", "env-key-456")
    proxy = start_proxy(config)
    assert post(proxy, json={"model": "m1", "messages": MESSAGES}).status_code == 401
    ok = post(proxy, json={"model": "m1", "messages": MESSAGES},
              headers={"Authorization": "Bearer env-key-456"})
    assert ok.status_code == 200


def test_bodies_that_would_hold_the_event_loop_are_refused_cheaply(config, upstream, start_proxy):
    """Millions of messages (inside the body limit) took the proxy 41 s and 4 GB to refuse while
    every other request, /health included, waited; nesting past what can be sent on was a 500."""
    from proxy.endpoints import MAX_CONTENT_PARTS, MAX_MESSAGES

    proxy = start_proxy(config)  # the default body limit
    cases = [({"model": "auto", "messages": [{"role": 1}] * (MAX_MESSAGES + 1)}, "messages"),
             ({"model": "auto", "messages": [{"role": "user", "content": [
                 {"type": "text", "text": ""}] * (MAX_CONTENT_PARTS + 1)}]}, "messages"),
             ({"model": "auto", "messages": MESSAGES, "x": functools.reduce(
                 lambda inner, _: [inner], range(600), [])}, None),
             # a million wrong names, or keys, were a million validation errors: 4 s and 1 GB
             ({"model": "auto", "messages": MESSAGES, "satroute": {"models": [1] * 200_000}},
              "satroute.models"),
             ({"model": "auto", "messages": MESSAGES, "satroute": {f"k{i}": 1 for i in range(100_000)}},
              "satroute")]
    for body, param in cases:
        started = time.monotonic()
        r = httpx.post(f"{proxy.url}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert time.monotonic() - started < 2, param
    assert upstream.bodies() == []


@pytest.mark.parametrize("body, message", [
    ({"model": "auto", "messages": [{"role": 1, "content": 1}] * 19_999},
     "messages.0.content: Input should be a valid string or Input should be a valid list "
     "(and 1 more problems)"),
    ({"model": "auto", "messages": [{"role": "user", "content": [{"type": 1}] * 49_000}]},
     "messages.0.content.0.type: Input should be a valid string")], ids=["messages", "parts"])
def test_a_large_body_wrong_throughout_is_refused_at_its_first_fault(body, message):
    """Within the caps, pydantic built an error for every wrong message or part, holding the GIL:
    20,000 wrong messages (460 KB) held the event loop 0.5 s, as they would on a thread. Past a
    hundred messages and parts, validation stops at the first fault and names it."""
    from proxy.endpoints import parse_request
    from proxy.errors import RequestError

    with pytest.raises(RequestError) as refused:
        parse_request(orjson.dumps(body))
    assert refused.value.message == message and refused.value.param == message.split(":")[0]


def test_a_large_valid_body_is_read_as_any_other():
    from proxy.endpoints import ALL_PROBLEMS_UP_TO, parse_request
    from proxy.protocol import ChatCompletionRequest

    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * ALL_PROBLEMS_UP_TO
    body, req = parse_request(orjson.dumps({"model": "auto", "messages": messages, "stream": True}))
    assert isinstance(req, ChatCompletionRequest) and req.stream is True
    assert len(req.messages) == ALL_PROBLEMS_UP_TO and req.messages[-1].content[0].text == "hi"
    assert body["messages"] == messages


async def test_a_large_body_is_parsed_off_the_event_loop():
    import threading

    from proxy import endpoints

    seen = []
    real = endpoints.parse_request
    endpoints.parse_request = lambda raw: seen.append(threading.current_thread()) or real(raw)
    try:
        small = orjson.dumps({"model": "auto", "messages": MESSAGES})
        big = orjson.dumps({"model": "auto", "messages": MESSAGES, "pad": "x" * (2 << 20)})
        for raw in (small, big):
            await endpoints.parse_request_async(raw)
    finally:
        endpoints.parse_request = real
    assert seen[0] is threading.main_thread() and seen[1] is not threading.main_thread()


def test_an_unknown_model_s_name_is_cut_in_the_error(config, upstream, start_proxy):
    proxy = start_proxy(config)  # the default body limit
    r = httpx.post(f"{proxy.url}/chat/completions",
                   json={"model": "m" * 100_000, "messages": MESSAGES}, timeout=30)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 500


def test_an_escaped_lone_surrogate_is_replaced_not_refused(proxy, upstream):
    """A JavaScript client that cuts a string through an emoji sends ``"\\ud83d"``: JSON's grammar
    takes it, so the proxy does too, sending U+FFFD on as a UTF-8 decoder would."""
    body = (b'{"model": "m1", "messages": [{"role": "user", "content": '
            b'"cut \\ud83d here, whole \\ud83d\\ude00, stray \\ude00"}]}')
    r = post(proxy, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert upstream.bodies()[-1]["messages"][0]["content"] == "cut \ufffd here, whole \U0001f600, stray \ufffd"


@pytest.mark.parametrize("body, words", [
    (b'{"model": "m1", "messages": [{"role": "user", "content": "\\ud83d"}], "temperature": NaN}', ["NaN"]),
    (b'{"model": "m1", "messages": [{"role": "user", "content": "\\ud83d"}]', ["not valid JSON"]),
    (b'{"model": "m1", "messages": [{"role": "user", "content": "\\ud83d"}], "temperature": 1e400}',
     ["1e400 is not a JSON number"]),  # orjson refuses an infinity too; Python's reader would take it
])
def test_a_lone_surrogate_does_not_let_other_faults_through(proxy, upstream, body, words):
    assert_error(post(proxy, content=body, headers={"content-type": "application/json"}), 400, *words)
    assert upstream.bodies() == []


def test_mending_a_lone_surrogate_reads_every_other_value_as_orjson_does():
    from proxy.protocol import read_json

    rest = b'"n": 123456789012345678901234567890, "m": 18446744073709551615, "f": 0.1, "t": true, "z": null'
    assert read_json(b'{"s": "\\ud83d", ' + rest + b"}") == {"s": "\ufffd", **orjson.loads(b"{" + rest + b"}")}
    for bad in (b'{"s": "\\ud83d", "x": NaN}', b'{"s": "\\ud83d", "x": -Infinity}', b'{"s": "\\ud83d", "x": -1e999}',
                b'{"s": "\\ud83d", "x": 1}}', b'{"s": "\\ud83d\xff"}'):
        with pytest.raises(ValueError):
            read_json(bad)
