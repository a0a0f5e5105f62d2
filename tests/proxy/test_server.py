"""The proxy served by uvicorn on loopback, driven by the official openai SDK (sync, async, stream)."""
from __future__ import annotations

import httpx
import openai
import pytest

from conftest import RecordingScorer

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is 2+2?"}]


def client(proxy, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key=key, max_retries=0, timeout=20)


def test_auto_routes_to_the_best_scored_model(config, upstream, start_proxy):
    scorer = RecordingScorer({"m1": 0.2, "m2": 0.9, "m3": 0.5})
    proxy = start_proxy(config, scorer=scorer)
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    resp = raw.parse()
    assert resp.model == "m2"
    assert resp.choices[0].message.content == "reply from m2"
    assert raw.headers["x-satroute-model"] == "m2"
    assert raw.headers["x-satroute-route"] == "routed"
    assert raw.headers["x-satroute-scores"] == "m2=0.9000,m3=0.5000,m1=0.2000"
    assert float(raw.headers["x-satroute-scorer-ms"]) >= 0
    instruction, candidates = scorer.calls[0]
    assert instruction == "what is 2+2?"  # the system prompt is not scored
    assert set(candidates) == {"m1", "m2", "m3"}
    assert candidates["m1"] == {"t1": 0.5, "t2": 0.5}
    assert upstream.bodies()[-1]["model"] == "m2"


def test_constant_scorer_ties_keep_config_order(config, upstream, start_proxy):
    proxy = start_proxy(config)  # scorer=constant from settings
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m1"


def test_direct_call_is_not_routed(config, upstream, start_proxy):
    scorer = RecordingScorer({"m2": 1.0})
    proxy = start_proxy(config, scorer=scorer)
    raw = client(proxy).chat.completions.with_raw_response.create(model="m3", messages=MESSAGES)
    assert raw.parse().model == "m3"
    assert raw.headers["x-satroute-route"] == "direct"
    assert "x-satroute-scores" not in raw.headers
    assert scorer.calls == []


def test_unknown_model_is_404_model_not_found(config, upstream, start_proxy):
    proxy = start_proxy(config)
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    assert "gpt-nope" in err.value.message
    assert upstream.bodies() == []


def test_the_openai_endpoints_not_served_are_a_404_the_sdk_understands(config, upstream, start_proxy):
    """Responses, embeddings and legacy completions (docs/frontends.md): OpenAI's error shape, so
    the SDK raises NotFoundError rather than failing to parse an HTML page."""
    proxy = start_proxy(config)
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).responses.create(model="auto", input="hi")
    assert err.value.code == "not_found"
    # Frameworks report a 404 as "model not found": the message is what tells the user what to do.
    assert "POST /v1/responses: not served here" in err.value.message
    assert "POST /v1/chat/completions" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).embeddings.create(model="auto", input="hi")
    assert "not served here" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).completions.create(model="auto", prompt="hi")
    assert "not served here" in err.value.message
    assert upstream.bodies() == []
    # A path that is no API of OpenAI's keeps the plain answer.
    other = httpx.get(f"{proxy.base}/v1/nothing-here")
    assert other.status_code == 404
    assert other.json()["error"]["message"] == "GET /v1/nothing-here: Not Found"


def test_allow_list_narrows_candidates(config, upstream, start_proxy):
    scorer = RecordingScorer({"m1": 0.9, "m2": 0.1, "m3": 0.5})
    proxy = start_proxy(config, scorer=scorer)
    resp = client(proxy).chat.completions.create(
        model="auto", messages=MESSAGES, extra_body={"satroute": {"models": ["m2", "m3"]}})
    assert resp.model == "m3"
    assert set(scorer.calls[0][1]) == {"m2", "m3"}
    assert "satroute" not in upstream.bodies()[-1]  # our field never goes upstream


def test_allow_list_without_routable_model_is_400(config, upstream, start_proxy):
    proxy = start_proxy(config)
    with pytest.raises(openai.BadRequestError) as err:
        client(proxy).chat.completions.create(
            model="auto", messages=MESSAGES, extra_body={"satroute": {"models": ["zz"]}})
    assert err.value.code == "no_candidates"


def test_pass_through_of_fields_the_proxy_does_not_use(config, upstream, start_proxy):
    proxy = start_proxy(config)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                             {"type": "image_url",
                                              "image_url": {"url": "data:image/png;base64,AA"}}]}]
    resp = client(proxy).chat.completions.create(
        model="auto", messages=messages, tools=tools, tool_choice="auto", temperature=0.3, n=1,
        seed=7, stop=["\n"], logprobs=True, user="u1",
        response_format={"type": "json_object"}, extra_body={"vendor_knob": {"a": [1, 2]}})
    assert resp.model == "m1"
    sent = upstream.bodies()[-1]
    for key, value in {"tools": tools, "tool_choice": "auto", "temperature": 0.3, "n": 1,
                       "seed": 7, "stop": ["\n"], "logprobs": True, "user": "u1",
                       "response_format": {"type": "json_object"},
                       "vendor_knob": {"a": [1, 2]}, "messages": messages}.items():
        assert sent[key] == value, key
    # unknown response fields come back as the upstream sent them
    assert resp.model_extra["x_mock_extra"] == {"kept": True}


def test_streaming_sync_reports_routed_model_in_every_chunk(config, upstream, start_proxy):
    proxy = start_proxy(config, scorer=RecordingScorer({"m3": 1.0}))
    with client(proxy).chat.completions.with_streaming_response.create(
            model="auto", messages=MESSAGES, stream=True) as raw:
        assert raw.headers["x-satroute-model"] == "m3"
        assert raw.headers["content-type"].startswith("text/event-stream")
        # nginx buffers a proxied answer by default: a stream came through it all at once, at its end
        assert raw.headers["x-accel-buffering"] == "no" and raw.headers["cache-control"] == "no-cache"
        chunks = list(raw.parse())
    assert chunks and all(c.model == "m3" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "reply from m3"
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(config, upstream, start_proxy):
    proxy = start_proxy(config)
    chunks = list(client(proxy).chat.completions.create(
        model="m2", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
    assert upstream.bodies()[-1]["stream_options"] == {"include_usage": True}


async def test_async_client_non_streaming_and_streaming(config, upstream, start_proxy):
    proxy = start_proxy(config, scorer=RecordingScorer({"m2": 1.0}))
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key="x", max_retries=0) as aclient:
        resp = await aclient.chat.completions.create(model="auto", messages=MESSAGES)
        assert resp.model == "m2"
        text = ""
        async for chunk in await aclient.chat.completions.create(
                model="auto", messages=MESSAGES, stream=True):
            assert chunk.model == "m2"
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert text == "reply from m2"


def test_raw_sse_ends_with_done(config, upstream, start_proxy):
    proxy = start_proxy(config)
    with httpx.stream("POST", f"{proxy.url}/chat/completions",
                      json={"model": "m1", "messages": MESSAGES, "stream": True}, timeout=60) as r:
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("data: [DONE]")


def test_models_lists_router_and_available_models(tmp_path, upstream, start_proxy, monkeypatch):
    from conftest import model_entry, write_config

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    models = [model_entry("m1", upstream.url, tmp_path),
              model_entry("locked", upstream.url, tmp_path, key="os.environ/NO_SUCH_KEY_VAR"),
              model_entry("fresh", upstream.url, tmp_path, profile=False)]
    proxy = start_proxy(write_config(tmp_path / "p.yaml", models, router_name="best"))
    ids = [m.id for m in client(proxy).models.list()]
    assert ids == ["best", "m1", "fresh"]
    # a model without a profile is callable by name but never routed to
    assert client(proxy).chat.completions.create(model="fresh", messages=MESSAGES).model == "fresh"
    for _ in range(3):
        assert client(proxy).chat.completions.create(model="best", messages=MESSAGES).model == "m1"
    with pytest.raises(openai.NotFoundError):
        client(proxy).chat.completions.create(model="locked", messages=MESSAGES)


def test_health_and_ready(config, upstream, start_proxy):
    proxy = start_proxy(config)
    assert httpx.get(f"{proxy.base}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.base}/ready")
    assert ready.status_code == 200 and ready.json()["models"] == ["m1", "m2", "m3"]
    assert ready.json()["scorer"] == {"state": "loaded", "runs_on": "constant"}


def test_ready_is_503_while_the_scorer_is_unavailable(config, upstream, start_proxy, monkeypatch):
    import scorer

    def broken(*a, **k):
        raise ImportError("no trained checkpoint")

    monkeypatch.setattr(scorer, "load_scorer", broken)
    proxy = start_proxy(config, scorer_kind="modelsat")
    import time

    time.sleep(0.2)
    r = httpx.get(f"{proxy.base}/ready")
    assert r.status_code == 503 and "scorer" in r.json()["reasons"][0]
    assert r.json()["scorer"] == {"state": "failed"}
    with pytest.raises(openai.InternalServerError) as err:
        client(proxy).chat.completions.create(model="auto", messages=MESSAGES)
    assert err.value.status_code == 503 and err.value.code == "scorer_unavailable"
    assert "retry-after" not in err.value.response.headers  # failed: it will not come back by waiting
    # direct calls still work
    assert client(proxy).chat.completions.create(model="m1", messages=MESSAGES).model == "m1"


def test_a_routed_request_while_the_scorer_loads_says_when_to_retry(config, upstream, start_proxy, monkeypatch):
    """The scorer loads for seconds after every start: without Retry-After the openai SDK's own
    backoff (under 2 s) gave up first, and every client's first requests after a restart failed."""
    import threading

    import scorer

    loaded = threading.Event()

    def slow(*a, **k):
        loaded.wait(30)
        raise ImportError("never mind")

    monkeypatch.setattr(scorer, "load_scorer", slow)
    proxy = start_proxy(config, scorer_kind="modelsat")
    try:
        raw = httpx.post(f"{proxy.url}/chat/completions", json={"model": "auto", "messages": MESSAGES})
        assert raw.status_code == 503 and raw.json()["error"]["code"] == "scorer_unavailable"
        assert "still loading" in raw.json()["error"]["message"] and raw.headers["retry-after"] == "5"
    finally:
        loaded.set()


def test_litellm_path_keeps_fields_and_reports_model(tmp_path, upstream, start_proxy):
    from conftest import model_entry, write_config

    cfg = write_config(tmp_path / "p.yaml",
                       [model_entry("slow", upstream.url, tmp_path, fast_path=False,
                                    upstream_name="vendor-model-1")])
    proxy = start_proxy(cfg)
    resp = client(proxy).chat.completions.create(
        model="auto", messages=MESSAGES, temperature=0.2, seed=3,
        response_format={"type": "json_object"}, extra_body={"vendor_knob": 1})
    assert resp.model == "slow"
    sent = upstream.bodies()[-1]
    assert sent["model"] == "vendor-model-1"
    assert (sent["temperature"], sent["seed"], sent["vendor_knob"]) == (0.2, 3, 1)
    assert sent["response_format"] == {"type": "json_object"}
    chunks = list(client(proxy).chat.completions.create(
        model="slow", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"slow"}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 18


def test_retrieve_model(config, upstream, start_proxy):
    c = client(start_proxy(config))
    assert c.models.retrieve("m2").id == "m2"
    assert c.models.retrieve("auto").owned_by == "satroute"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_any_model_name_can_be_routed_to_and_read_back_from_the_headers(tmp_path, upstream, start_proxy):
    """Header values are Latin-1 on the wire, and the score list is split at "," and "=": a name
    outside plain ASCII or holding those is percent-encoded there, never a 500 after the answer."""
    from urllib.parse import unquote

    from proxy.logs import parse_scores
    from conftest import model_entry, write_config

    models = [model_entry("qwen-中文", upstream.url, tmp_path, upstream_name="q"),
              model_entry("a=1,b", upstream.url, tmp_path, upstream_name="ab"),
              model_entry("openai/gpt-4o-mini", upstream.url, upstream_name="g")]  # called by name only
    config = write_config(tmp_path / "providers.yaml", models)
    proxy = start_proxy(config, scorer=RecordingScorer({"qwen-中文": 0.9, "a=1,b": 0.5}))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-satroute-model"] == "qwen-%E4%B8%AD%E6%96%87"
    assert unquote(raw.headers["x-satroute-model"]) == "qwen-中文"
    assert raw.headers["x-satroute-scores"] == "qwen-%E4%B8%AD%E6%96%87=0.9000,a%3D1%2Cb=0.5000"
    assert parse_scores(raw.headers["x-satroute-scores"]) == {"qwen-中文": 0.9, "a=1,b": 0.5}
    direct = client(proxy).chat.completions.with_raw_response.create(model="a=1,b", messages=MESSAGES)
    assert direct.headers["x-satroute-model"] == "a%3D1%2Cb"
    plain = client(proxy).chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert plain.headers["x-satroute-model"] == "openai/gpt-4o-mini"  # the usual names pass unchanged


@pytest.mark.parametrize("name", ['we"ird\\x', "a\\nb", "tab\tname", "ctl\x01x"])
def test_a_name_with_backslashes_or_control_characters_comes_back_as_it_is(tmp_path, upstream,
                                                                         start_proxy, name):
    """The configured name replaces the upstream's `model` in the bytes of the answer: it was
    used as a regex template, so `\\x` made invalid JSON, `\\n` a newline and `\x01` a 500
    after the upstream had answered."""
    from conftest import model_entry, write_config

    proxy = start_proxy(write_config(tmp_path / "providers.yaml",
                                     [model_entry(name, upstream.url, tmp_path, upstream_name="u", fast_path=True)]))
    assert client(proxy).chat.completions.create(model=name, messages=MESSAGES).model == name
    chunks = list(client(proxy).chat.completions.create(model=name, messages=MESSAGES, stream=True))
    assert chunks and {c.model for c in chunks} == {name}


def test_the_pass_through_fills_only_chat_parameters_from_litellm_params(tmp_path, upstream, start_proxy):
    """litellm_params also holds litellm's own settings and credentials under many names: only the
    OpenAI chat parameters (and extra_body's fields) may become defaults of the upstream body."""
    from conftest import model_entry, write_config

    entry = model_entry("m1", upstream.url, tmp_path, fast_path=True)
    entry["litellm_params"].update(temperature=0.3, max_tokens=64, drop_params=True, tags=["free"],
                                   aws_secret_access_key="AWSSECRET0123456789", max_parallel_requests=4,
                                   extra_body={"top_k": 5})
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry]))
    client(proxy).chat.completions.create(model="m1", messages=MESSAGES, max_tokens=8)
    sent = upstream.bodies()[-1]
    assert sent["temperature"] == 0.3 and sent["top_k"] == 5
    assert sent["max_tokens"] == 8  # the client's own value wins
    assert not {"drop_params", "tags", "aws_secret_access_key", "max_parallel_requests", "extra_body"} & set(sent)


@pytest.mark.parametrize("fast_path", [True, False], ids=["pass-through", "litellm"])
def test_a_configured_limit_gives_way_to_the_client_s_under_either_name(tmp_path, upstream, start_proxy,
                                                                         fast_path):
    """max_tokens and max_completion_tokens are one limit: OpenAI refuses the two together (400
    invalid_parameter_combination), so a model's default under one name was a 400 for every client
    that sends the other (the SDKs' max_completion_tokens). The default fills the limit only when
    the client gave neither, under the name the admin wrote."""
    from conftest import model_entry, write_config

    entries = [model_entry("tokens", upstream.url, tmp_path, fast_path=fast_path),
               model_entry("completion", upstream.url, tmp_path, fast_path=fast_path)]
    entries[0]["litellm_params"]["max_tokens"] = 512
    entries[1]["litellm_params"]["max_completion_tokens"] = 512
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", entries))
    limits = ("max_tokens", "max_completion_tokens")
    for name, configured in zip(("tokens", "completion"), limits):
        for asked in limits:
            client(proxy).chat.completions.create(model=name, messages=MESSAGES, **{asked: 4000})
            assert {k: v for k, v in upstream.bodies(name)[-1].items() if k in limits} == {asked: 4000}
        client(proxy).chat.completions.create(model=name, messages=MESSAGES)
        assert {k: v for k, v in upstream.bodies(name)[-1].items() if k in limits} == {configured: 512}
        # a null is a limit left unset, as OpenAI reads it: the default fills it, and the null goes
        for asked in limits:
            client(proxy).chat.completions.create(model=name, messages=MESSAGES, extra_body={asked: None})
            assert {k: v for k, v in upstream.bodies(name)[-1].items() if k in limits} == {configured: 512}


def test_the_bare_host_serves_the_same_endpoints_behind_the_same_key(config, upstream, start_proxy):
    """A client configured with the host alone as base URL (no /v1), as LiteLLM's proxy allows."""
    proxy = start_proxy(config, scorer=RecordingScorer({"m2": 1.0}), master_key="sk-master-123")
    bare = openai.OpenAI(base_url=proxy.base, api_key="sk-master-123", max_retries=0, timeout=20)
    raw = bare.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and raw.headers["x-satroute-route"] == "routed"
    assert "auto" in {m.id for m in bare.models.list()}
    assert bare.models.retrieve("m1").id == "m1"
    stream = bare.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    for path in ("/chat/completions", "/models", "/models/m1"):  # the key guards them too
        method = httpx.post if path == "/chat/completions" else httpx.get
        assert method(f"{proxy.base}{path}").status_code == 401
    doc = httpx.get(f"{proxy.base}/openapi.json", headers={"Authorization": "Bearer sk-master-123"})
    assert "/v1/models" in doc.json()["paths"] and "/models" not in doc.json()["paths"]


def test_a_path_with_a_trailing_slash_is_served_not_redirected(config, upstream, start_proxy):
    """Starlette answered /v1/chat/completions/ with an empty 307 to a Location built from the Host
    header and the connection's scheme (http:// behind a TLS-terminating balancer), which an SDK
    given a client that follows no redirects reported as a bare 307."""
    proxy = start_proxy(config, scorer=RecordingScorer({"m2": 1.0}), master_key="sk-master-123")
    key = {"Authorization": "Bearer sk-master-123"}
    chat = httpx.post(f"{proxy.base}/v1/chat/completions/?api-version=1", headers=key,
                      json={"model": "auto", "messages": MESSAGES})
    assert chat.status_code == 200 and chat.json()["model"] == "m2"
    for path in ("/v1/models/", "/models/", "/health/", "/v1/models/m1/"):
        got = httpx.get(f"{proxy.base}{path}", headers=key)
        assert got.status_code == 200, (path, got.status_code)
    assert httpx.get(f"{proxy.base}/v1/models/m1/", headers=key).json()["id"] == "m1"
    assert httpx.post(f"{proxy.base}/v1/chat/completions/", json={}).status_code == 401  # guarded alike
    assert httpx.get(f"{proxy.base}/v1/nothing/", headers=key).status_code == 404


def test_a_local_model_on_its_way_back_is_a_503_to_retry_not_a_404(tmp_path, upstream, start_proxy):
    """While a local server (re)starts, a request naming its model and an `auto` request with
    nothing else routable get 503 with the reason and Retry-After (the SDK waits and retries);
    a model down for good stays a 404."""
    from conftest import model_entry, write_config
    from proxy.localserver import STARTING

    cfg = write_config(tmp_path / "p.yaml", [model_entry("local", upstream.url, tmp_path),
                                             model_entry("keyless", upstream.url, tmp_path)])
    proxy = start_proxy(cfg)
    registry = proxy.app.state.services.registry
    registry.set_unavailable("local", STARTING)
    registry.set_unavailable("keyless", "litellm_params.api_key references unset environment variable K")
    for model, code in (("local", "model_starting"), ("auto", "no_candidates")):
        raw = httpx.post(f"{proxy.url}/chat/completions", json={"model": model, "messages": MESSAGES})
        assert raw.status_code == 503 and raw.json()["error"]["code"] == code
        assert raw.headers["retry-after"] == "5" and STARTING in raw.json()["error"]["message"]
    raw = httpx.get(f"{proxy.url}/models/local")  # the same answer as a chat naming it
    assert raw.status_code == 503 and raw.headers["retry-after"] == "5"
    long = httpx.get(f"{proxy.url}/models/{'m' * 5000}")
    assert long.status_code == 404 and len(long.json()["error"]["message"]) < 400
    with pytest.raises(openai.NotFoundError):
        client(proxy).chat.completions.create(model="keyless", messages=MESSAGES)
    registry.set_unavailable("local", None)
    assert client(proxy).chat.completions.create(model="local", messages=MESSAGES).model == "local"
