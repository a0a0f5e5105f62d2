"""The litellm path to a provider litellm translates for (Anthropic's Messages API, served by the
mock upstream), driven by the openai SDK: what a client sees must not depend on which path or
provider answered."""
from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from conftest import RecordingScorer, model_entry, profile_file, write_config
from support.mock_upstream import answer, fail
from support.prometheus import scrape
from support.raw_upstream import never_connecting_port

MESSAGES = [{"role": "user", "content": "hello"}]


def _reply(content_type: bytes, body: bytes, status: bytes = b"200 OK") -> bytes:
    """A whole HTTP answer, for raw_upstream."""
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0, timeout=30)


def claude(upstream, name: str = "claude", **params) -> dict:
    """An Anthropic model on the mock upstream (litellm appends /v1/messages to api_base)."""
    return {"model_name": name,
            "litellm_params": {"model": f"anthropic/{name}-upstream", "api_key": "sk-ant-test",
                               "api_base": upstream.url.removesuffix("/v1"), **params},
            "model_info": {"capability_profile": "claude.profile.json"}}


@pytest.fixture
def proxy(tmp_path, upstream, start_proxy):
    """claude ranked first, then an OpenAI-compatible model on each path."""
    (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
    models = [claude(upstream), model_entry("oai-lite", upstream.url, tmp_path, fast_path=False),
              model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)]
    cfg = write_config(tmp_path / "providers.yaml", models, num_retries=0)
    return start_proxy(cfg, scorer=RecordingScorer({"claude": 0.9, "oai-lite": 0.5, "oai-fast": 0.1}))


def test_fields_outside_openai_s_chat_parameters_do_not_break_a_translated_provider(proxy, upstream):
    """The SDK's `metadata` and vendor fields of OpenAI's (`prompt_cache_key`) are left out for
    Anthropic, which refuses unknown fields; an OpenAI-like model still gets them."""
    for model in ("auto", "claude"):
        raw = client(proxy).chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, metadata={"trace": "abc"},
            extra_body={"prompt_cache_key": "k1"})
        assert raw.headers["x-satroute-model"] == "claude" and "x-satroute-failed" not in raw.headers
        assert raw.parse().choices[0].message.content == "reply from claude-upstream"
        sent = upstream.bodies("claude-upstream")[-1]
        assert not {"metadata", "prompt_cache_key", "extra_body"} & set(sent)
    stream = client(proxy).chat.completions.create(model="claude", messages=MESSAGES, stream=True,
                                                   extra_body={"prompt_cache_key": "k1"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        "reply from claude-upstream"
    client(proxy).chat.completions.create(model="oai-lite", messages=MESSAGES, user="u-42",
                                          extra_body={"prompt_cache_key": "k1"})
    sent = upstream.bodies("oai-lite")[-1]
    assert (sent["prompt_cache_key"], sent["user"]) == ("k1", "u-42")


def test_the_configured_extra_body_is_merged_with_the_client_s(tmp_path, upstream, start_proxy):
    entry = model_entry("oai-lite", upstream.url, tmp_path, fast_path=False)
    entry["litellm_params"]["extra_body"] = {"admin_field": 1, "shared": "admin"}
    proxy = start_proxy(write_config(tmp_path / "p.yaml", [entry]))
    client(proxy).chat.completions.create(model="oai-lite", messages=MESSAGES,
                                          extra_body={"client_field": 2, "shared": "client"})
    sent = upstream.bodies("oai-lite")[-1]
    assert (sent["admin_field"], sent["client_field"], sent["shared"]) == (1, 2, "client")


def test_a_parameter_the_top_model_cannot_take_falls_back_and_a_named_call_says_why(proxy, upstream):
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,
                                                                  seed=7)
    assert raw.headers["x-satroute-model"] == "oai-lite"
    assert raw.headers["x-satroute-failed"] == "claude:unsupported_params"
    assert upstream.bodies("claude-upstream") == []  # nothing was sent to it
    with pytest.raises(openai.BadRequestError) as err:
        client(proxy).chat.completions.create(model="claude", messages=MESSAGES, seed=7)
    assert err.value.code == "unsupported_parameter"
    assert "['seed']" in err.value.message and "drop_params" in err.value.message
    assert "litellm_settings" not in err.value.message  # litellm's own proxy's advice is not ours
    for _ in range(5):  # not the model's health: it never cools down for it
        client(proxy).chat.completions.create(model="auto", messages=MESSAGES, seed=7)
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "claude"


@pytest.fixture
def thinking_proxy(tmp_path, upstream, start_proxy):
    """Claude models that think for reasoning_effort, on the mock upstream: one with a fixed
    budget per effort (Sonnet 4.5), one adaptive (Sonnet 4.6), ranked above an OpenAI-compatible
    model."""
    (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
    models = [claude(upstream, "sonnet-45", model="anthropic/claude-sonnet-4-5-20250929"),
              claude(upstream, "sonnet-46", model="anthropic/claude-sonnet-4-6"),
              model_entry("oai-lite", upstream.url, tmp_path, fast_path=False)]
    scores = {"sonnet-45": 0.9, "sonnet-46": 0.8, "oai-lite": 0.1}
    return start_proxy(write_config(tmp_path / "providers.yaml", models, num_retries=2),
                       scorer=RecordingScorer(scores))


@pytest.mark.parametrize("effort, limit, budget", [
    ("high", {"max_completion_tokens": 4096}, 4095), ("medium", {"max_tokens": 2048}, 2047),
    ("xhigh", {"max_tokens": 1025}, 1024), ("low", {"max_completion_tokens": 3000}, 1024)])
def test_a_claude_thinking_budget_is_fitted_under_the_client_s_limit(thinking_proxy, upstream, effort, limit,
                                                                      budget):
    """litellm gives each effort a fixed budget (high: 4096) and keeps the client's limit, which
    Anthropic refuses unless it is above the budget; the limit counts the reasoning in OpenAI's
    terms, so it stays, and the budget goes under it."""
    for model in ("sonnet-45", "auto"):
        raw = client(thinking_proxy).chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, reasoning_effort=effort, **limit)
        assert raw.headers["x-satroute-model"] == "sonnet-45" and "x-satroute-failed" not in raw.headers
        sent = upstream.bodies("claude-sonnet-4-5-20250929")[-1]
        assert sent["max_tokens"] == next(iter(limit.values()))
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": budget}


@pytest.mark.parametrize("model, params, said", [
    ("sonnet-45", {"max_tokens": 1024}, "Send a higher max_tokens"),
    ("sonnet-45", {"temperature": 0.7}, "`temperature` may only be set to 1 when thinking is enabled"),
    ("sonnet-46", {"temperature": 0.7}, "`temperature` may only be set to 1 when thinking is enabled")])
def test_reasoning_effort_claude_cannot_take_falls_back_and_a_named_call_gets_the_reason(
        thinking_proxy, upstream, model, params, said):
    """A limit with no room for Anthropic's least budget (1024, below the limit), or a temperature
    other than 1 beside thinking: Anthropic refuses the request litellm makes of it. A routed
    request goes to the next model, without retry or cooldown; one naming the model gets a 400 that
    says why; nothing is sent to Claude."""
    body = {"messages": MESSAGES, "reasoning_effort": "low", **params}
    for _ in range(4):  # not the model's health: it never cools down for it
        raw = client(thinking_proxy).chat.completions.with_raw_response.create(
            model="auto", extra_body={"satroute": {"models": [model, "oai-lite"]}}, **body)
        assert raw.headers["x-satroute-model"] == "oai-lite"
        assert raw.headers["x-satroute-failed"] == f"{model}:unsupported_params"
    with pytest.raises(openai.BadRequestError) as err:
        client(thinking_proxy).chat.completions.create(model=model, **body)
    assert err.value.code == "unsupported_parameter" and said in err.value.message
    assert not [b for b in upstream.bodies() if str(b.get("model")).startswith("claude")]
    assert "x-satroute-failed" not in client(thinking_proxy).chat.completions.with_raw_response.create(
        model="auto", extra_body={"satroute": {"models": [model, "oai-lite"]}}, messages=MESSAGES).headers


def test_onboarding_leaves_its_temperature_out_for_a_claude_model_configured_to_think(tmp_path):
    """A model with `reasoning_effort` in its litellm_params refuses onboarding's temperature in
    words onboarding reads: it asks again without it, rather than grading every question wrong."""
    from proxy.dispatch import _fit_thinking
    from proxy.errors import UpstreamClientError
    from proxy.onboarding import adapted_params
    from proxy.providers import parse
    from proxy.settings import prepare_litellm_environment

    prepare_litellm_environment()
    import litellm

    entry = {"model_name": "sonnet", "litellm_params": {"model": "anthropic/claude-sonnet-4-5-20250929",
                                                        "api_key": "sk-ant-test", "reasoning_effort": "high"}}
    cfg = write_config(tmp_path / "providers.yaml", [entry])
    model = parse(cfg.read_text(), cfg, {}, lambda d: None).models["sonnet"]
    asked = {"temperature": 0.0, "max_tokens": 2048}
    with pytest.raises(UpstreamClientError) as refused:
        _fit_thinking(litellm, {**model.params, **asked}, model)
    assert adapted_params(asked, refused.value) == {"max_tokens": 2048}
    kwargs = {**model.params, "max_tokens": 2048}
    _fit_thinking(litellm, kwargs, model)  # as asked again: the budget under onboarding's limit
    assert kwargs["thinking"] == {"type": "enabled", "budget_tokens": 2047} and "reasoning_effort" not in kwargs


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("model, params, reason, code, said", [
    # outside OpenAI's spec: litellm fails translating it, on the litellm path only
    ("oai-lite", {"tool_choice": {"type": "function"}, "tools": TOOLS}, "untranslatable",
     "untranslatable_request", "Invalid tool choice"),
    ("claude", {"response_format": {"type": "json_schema"}}, "untranslatable",
     "untranslatable_request", "json_schema"),
    # litellm fetches images itself for Anthropic, and never from a private address
    ("claude", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://10.0.0.5/cat.png"}}]}]},
     "image_fetch", "image_fetch_failed", "10.0.0.5"),
])
def test_a_request_litellm_refuses_to_send_falls_back_and_a_named_call_gets_the_reason(
        tmp_path, upstream, start_proxy, model, params, reason, code, said):
    (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
    models = [claude(upstream), model_entry("oai-lite", upstream.url, tmp_path, fast_path=False),
              model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)]
    scores = {"claude": 0.1, "oai-lite": 0.1, "oai-fast": 0.05, model: 0.9}
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", models, num_retries=2),
                        scorer=RecordingScorer(scores))
    body = {"messages": MESSAGES, **params}
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", **body)
    assert raw.headers["x-satroute-failed"].startswith(f"{model}:{reason}")
    assert raw.headers["x-satroute-model"] != model
    with pytest.raises(openai.BadRequestError) as err:  # not a 502 "connection"
        client(proxy).chat.completions.create(model=model, **body)
    assert err.value.code == code and said in err.value.message
    assert "general_settings" not in err.value.message and "Traceback" not in err.value.message
    sent = upstream.bodies("claude-upstream" if model == "claude" else model)
    assert sent == []  # nothing reached the upstream, and it was not tried again
    metrics = scrape(proxy.base)  # no upstream time for a call never made, no retry, no cooldown
    assert ("satroute_upstream_latency_seconds_count", (("model", model),)) not in metrics
    assert ("satroute_retries_total", (("model", model),)) not in metrics
    assert ("satroute_cooldowns_total", (("model", model),)) not in metrics


@pytest.mark.parametrize("status, reason, error", [
    (529, "http_529", None), (504, "http_504", None), (408, "http_408", None),
    (413, None, openai.APIStatusError)])
def test_the_upstream_s_own_status_is_reported_as_on_the_pass_through(proxy, upstream, status,
                                                                       reason, error):
    """litellm relabels some answers (529 as 500, 504 and 408 as its timeout, 413 as 400)."""
    upstream.set("claude-upstream", fail(status, f"status {status}", "api_error"))
    if error is None:
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-satroute-failed"] == f"claude:{reason}"
    else:
        with pytest.raises(error) as err:
            client(proxy).chat.completions.create(model="claude", messages=MESSAGES)
        assert err.value.status_code == status and f"status {status}" in err.value.message


def test_a_refusal_and_the_null_fields_come_back_in_openai_s_shape(proxy, upstream):
    upstream.set("oai-lite", answer(refusal="I can't help with that."))
    upstream.set("oai-fast", answer(refusal="I can't help with that."))
    shapes = {}
    for name in ("oai-lite", "oai-fast"):
        raw = client(proxy).chat.completions.with_raw_response.create(model=name, messages=MESSAGES)
        body = raw.http_response.json()
        choice = body["choices"][0]
        assert choice["message"]["refusal"] == "I can't help with that."
        assert choice["message"]["content"] is None and choice["logprobs"] is None
        assert "provider_specific_fields" not in choice and \
            "provider_specific_fields" not in choice["message"]
        shapes[name] = (sorted(choice), sorted(choice["message"]))
    assert shapes["oai-lite"] == shapes["oai-fast"]


# OpenRouter's reasoning for Gemini 3: the encrypted detail is what a client must send back
ENCRYPTED = {"type": "reasoning.encrypted", "data": "gAAAAB-blob", "id": "rs_1",
             "format": "google-gemini-v1", "index": 0}


def _openrouter(request) -> bytes:
    """OpenRouter's answer with reasoning, whole or streamed as it streams it (the encrypted
    detail alone in a chunk), with its own usage.cost."""
    import json

    head = {"id": "gen-1", "created": 1, "model": "google/gemini-3-pro-preview", "provider": "Google"}
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14, "cost": 0.00123}
    if not request.get("stream"):
        message = {"role": "assistant", "content": "42", "refusal": None, "reasoning": "6 times 7",
                   "reasoning_details": [ENCRYPTED]}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        whole = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        return _reply(b"application/json", json.dumps(whole).encode())
    text = {"type": "reasoning.text", "text": "6 times 7", "index": 0}
    deltas = [({"role": "assistant", "content": "", "reasoning": "6 times 7", "reasoning_details": [text]}, None),
              ({"role": "assistant", "content": "", "reasoning": None, "reasoning_details": [ENCRYPTED]}, None),
              ({"role": "assistant", "content": "42"}, None), ({"role": "assistant", "content": ""}, "stop")]
    events = [{**head, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} for delta, finish in deltas]
    events.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    return _reply(b"text/event-stream", b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                  + b"data: [DONE]\n\n")


def test_a_provider_s_reasoning_fields_reach_the_client_on_the_litellm_path_too(tmp_path, start_proxy):
    """OpenRouter's `reasoning` and `reasoning_details` (litellm keeps them aside, under
    `provider_specific_fields`, and drops a streamed chunk that carries only the encrypted detail),
    and its own usage.cost, reach the client as on the pass-through path."""
    from support.raw_upstream import raw_upstream

    with raw_upstream(_openrouter) as url:
        models = [{"model_name": "or-lite", "litellm_params": {"model": "openrouter/google/gemini-3-pro-preview",
                                                               "api_key": "sk-or-test", "api_base": url}},
                  {"model_name": "or-fast", "litellm_params": {"model": "openai/google/gemini-3-pro-preview",
                                                               "api_base": url}}]
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", models, num_retries=0))
        seen = {}
        for name in ("or-lite", "or-fast"):
            whole = client(proxy).chat.completions.with_raw_response.create(model=name, messages=MESSAGES)
            body = whole.http_response.json()
            message = body["choices"][0]["message"]
            assert "provider_specific_fields" not in message
            chunks = _streamed(proxy, name)
            details = [d for c in chunks if c.choices for d in (c.choices[0].delta.model_extra or {}).get(
                "reasoning_details") or ()]
            seen[name] = (message["reasoning"], message["reasoning_details"], body["usage"]["cost"],
                          details, chunks[-1].usage.model_extra.get("cost"))
    assert seen["or-lite"] == seen["or-fast"] == (
        "6 times 7", [ENCRYPTED], 0.00123,
        [{"type": "reasoning.text", "text": "6 times 7", "index": 0}, ENCRYPTED], 0.00123)


def test_a_streamed_refusal_reaches_the_client_on_the_litellm_path_too(tmp_path, start_proxy):
    """OpenAI streams a refusal in `delta.refusal`, with no content: litellm dropped those chunks."""
    import json

    from support.raw_upstream import raw_upstream

    def chunk(delta, finish=None):
        event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    body = (chunk({"role": "assistant", "content": None, "refusal": ""}) + chunk({"refusal": "I can't "})
            + chunk({"refusal": "help with that."}) + chunk({}, "stop") + b"data: [DONE]\n\n")
    with raw_upstream(lambda request: _reply(b"text/event-stream", body)) as url:
        entry = model_entry("oai-lite", url, tmp_path, fast_path=False)
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry], num_retries=0))
        chunks = list(client(proxy).chat.completions.create(model="oai-lite", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices) == "I can't help with that."


def test_gemini_s_thought_signature_goes_to_the_client_and_back_without_litellm_s_additions(
        tmp_path, start_proxy):
    """Gemini 3's signature of its text (litellm keeps it under `provider_specific_fields`) reaches
    the client, and goes back to Gemini when the client sends the message back on its next turn;
    what litellm adds of its own does not reach the client: an empty `images`, empty
    `vertex_ai_*` lists, the Anthropic names of the usage's cached tokens, and a `usage.cost` of
    its own estimate on a stream's usage chunk (Gemini gives none)."""
    import json

    from support.raw_upstream import raw_upstream

    parts = [{"text": "Thinking about 6*7.", "thought": True}, {"text": "42", "thoughtSignature": "sig-text"}]
    frame = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
             "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 40,
                               "thoughtsTokenCount": 25, "cachedContentTokenCount": 4},
             "modelVersion": "gemini-3-pro-preview"}
    replies = [_reply(b"application/json", json.dumps(frame).encode()),
               _reply(b"text/event-stream", b"data: " + json.dumps(frame).encode() + b"\r\n\r\n"),
               _reply(b"application/json", json.dumps(frame).encode())]
    asked = []

    def respond(request):
        asked.append(request)
        return replies[len(asked) - 1]

    with raw_upstream(respond) as url:
        entry = {"model_name": "gem", "litellm_params": {"model": "gemini/gemini-3-pro-preview",
                                                         "api_key": "g-test", "api_base": url}}
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry], num_retries=0))
        raw = client(proxy).chat.completions.with_raw_response.create(model="gem", messages=MESSAGES)
        body = raw.http_response.json()
        message = body["choices"][0]["message"]
        assert message["thought_signatures"] == ["sig-text"] and message["content"] == "42"
        assert "images" not in message and not [k for k in body if k.startswith("vertex_ai_")]
        assert "cache_read_input_tokens" not in body["usage"]
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 4  # OpenAI's name for them
        chunks = _streamed(proxy, "gem")
        signed = [(c.choices[0].delta.model_extra or {}).get("thought_signatures") for c in chunks if c.choices]
        assert signed[0] == ["sig-text"]
        usage = chunks[-1].usage
        assert usage.total_tokens == 40 and not {"cost", "cache_read_input_tokens"} & set(usage.model_extra)
        client(proxy).chat.completions.create(model="gem", messages=[*MESSAGES, message,
                                                                     {"role": "user", "content": "and 6*8?"}])
    assert {"text": "42", "thoughtSignature": "sig-text"} in asked[2]["contents"][1]["parts"]


def _streamed(proxy, name: str, **params) -> list:
    """The chunks of a streamed answer, with include_usage's chunk."""
    return list(client(proxy).chat.completions.create(model=name, messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True}, **params))


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_every_choice_of_a_streamed_n_answer_starts_and_ends_as_on_the_pass_through(proxy, upstream, finish):
    """litellm ends only choice 0 (the upstream ends each) and names only its role; the proxy ends
    and names the others, with the stream's finish_reason, before the usage chunk."""
    for name in ("oai-lite", "oai-fast"):
        upstream.set(name, answer(finish=finish))
    ends = {}
    for name in ("oai-lite", "oai-fast"):
        chunks = _streamed(proxy, name, n=2)
        assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
        assert {(c.id, c.created, c.model) for c in chunks} == {(chunks[0].id, chunks[0].created, name)}
        ends[name] = sorted((c.index, c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason)
        state = ChatCompletionStreamState()  # the SDK's own accumulator, as its .stream() helper uses
        for chunk in chunks:
            state.handle_chunk(chunk)
        assert [(c.index, c.message.role, c.message.content, c.finish_reason)
                for c in state.current_completion_snapshot.choices] == \
            [(i, "assistant", f"reply from {name}", finish) for i in (0, 1)]
    assert ends["oai-lite"] == ends["oai-fast"] == [(0, finish), (1, finish)]


def test_a_one_choice_stream_gets_no_chunk_more_on_the_litellm_path(proxy, upstream):
    """The relay's closing of the other choices adds nothing to a stream with one."""
    lite, fast = _streamed(proxy, "oai-lite"), _streamed(proxy, "oai-fast")
    assert len(lite) == len(fast) == 7  # the role, 4 pieces, the end, the usage
    assert [c.choices[0].finish_reason for c in lite[:-1]] == [None] * 5 + ["stop"]
    assert lite[-1].choices == [] and lite[-1].usage is not None


def test_litellm_s_own_reason_for_a_refused_parameter_is_kept_without_its_proxy_advice():
    """Model families have their own wording; onboarding reads the parameter's name from it."""
    from proxy.dispatch import _classify_litellm
    from proxy.settings import prepare_litellm_environment

    prepare_litellm_environment()
    import litellm

    exc = litellm.UnsupportedParamsError(
        message="O-series models don't support temperature=0.0. Only temperature=1 is supported. To "
                "drop unsupported openai params from the call, set `litellm.drop_params = True`",
        model="o3-mini", llm_provider="openai")
    err = _classify_litellm(exc, "o3", str)
    assert err.unfit == "unsupported_params" and err.status == 400
    assert "cannot take the parameters ['temperature']" in err.message
    assert "O-series models don't support temperature=0.0" in err.message
    assert "litellm.drop_params" not in err.message and "drop_params: true" in err.message


def test_a_litellm_connection_failure_is_summed_up_as_one_not_as_litellm_s_label():
    """With prompts off the log reads the summary: litellm labels a refused connection an
    InternalServerError, which read as an upstream's HTTP 500."""
    import httpx

    from proxy.dispatch import _classify_litellm
    from proxy.settings import prepare_litellm_environment

    prepare_litellm_environment()
    import litellm

    for cause, said in ((httpx.ConnectError("refused"), "connection failed"),
                        (httpx.ReadTimeout("slow"), "no answer in time")):
        exc = litellm.InternalServerError(message="Connection error.", model="m", llm_provider="openai")
        exc.__cause__ = cause
        err = _classify_litellm(exc, "m", str)
        assert err.summary == f"m: {said} (InternalServerError)", err.summary


def test_an_error_in_the_middle_of_a_litellm_stream_keeps_the_upstream_s_reason():
    """Anthropic's mid-stream `event: error` ("Overloaded") reaches the client, redacted; not only
    litellm's class name."""
    import asyncio

    from proxy.dispatch import _litellm_chunks

    class Chunk:
        model = ""

        def model_dump(self, exclude_none=True):
            return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}]}

    class Failed(Exception):
        message = "litellm.MidStreamFallbackError: AnthropicError - Overloaded (key sk-secret)\nTraceback ..."

    async def stream():
        yield Chunk()
        raise Failed()

    async def collect():
        return [c async for c in _litellm_chunks(Chunk(), stream(), "claude", Failed,
                                                  lambda s: s.replace("sk-secret", "[redacted]"))]

    events = asyncio.run(collect())
    last = events[-1].decode()
    assert len(events) == 3 and '"code":"stream_interrupted"' in last
    assert "AnthropicError - Overloaded (key [redacted])" in last
    assert "sk-secret" not in last and "Traceback" not in last and "MidStreamFallbackError" not in last


def test_a_litellm_stream_of_n_choices_cut_mid_way_ends_in_the_error_not_in_invented_ends():
    """Choice 0 ended, choice 1 not yet, then the upstream failed: no finish_reason is given to
    choice 1, which did not finish; the stream ends in the error event."""
    import asyncio

    from proxy.dispatch import _litellm_chunks

    class Chunk:
        model = ""

        def __init__(self, index, finish=None):
            self.choice = {"index": index, "delta": {"content": "a"}, "finish_reason": finish}

        def model_dump(self, exclude_none=True):
            return {"id": "c", "object": "chat.completion.chunk", "choices": [dict(self.choice)]}

    class Failed(Exception):
        message = "Overloaded"

    async def stream():
        yield Chunk(1)
        yield Chunk(0, "stop")
        raise Failed()

    async def collect():
        return [c async for c in _litellm_chunks(Chunk(0), stream(), "m", Failed, str)]

    events = asyncio.run(collect())
    assert len(events) == 4 and b'"finish_reason":"stop"' in events[2]
    assert b'"code":"stream_interrupted"' in events[3]


@pytest.mark.parametrize("body", [b"<html>Sign in to the Wi-Fi</html>", b'{"unexpected": true}'])
def test_a_200_litellm_cannot_read_is_the_model_s_failure_not_the_request_s(tmp_path, upstream, start_proxy,
                                                                          body):
    """litellm labels a failure to read the answer as it labels one to translate the request
    (APIConnectionError): this one falls back, counts towards cooldown, and is a 502 by name."""
    from support.raw_upstream import raw_upstream

    answer = _reply(b"text/html", body)
    with raw_upstream(lambda request: answer) as url:
        bad = claude(upstream)
        bad["litellm_params"]["api_base"] = url.removesuffix("/v1")
        (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
        cfg = write_config(tmp_path / "providers.yaml",
                           [bad, model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)],
                           num_retries=0, allowed_fails=2)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"claude": 0.9, "oai-fast": 0.1}))
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError) as err:
            client(proxy).chat.completions.create(model="claude", messages=MESSAGES)
        cooling = scrape(proxy.base).get(("satroute_cooldowns_total", (("model", "claude"),)))
    assert raw.headers["x-satroute-failed"] == "claude:bad_answer" and raw.parse().model == "oai-fast"
    assert err.value.status_code == 502 and "claude (bad_answer)" in err.value.message
    assert cooling == 1  # two failures of its own, allowed_fails 2


def test_an_answer_orjson_cannot_write_is_still_relayed_on_the_litellm_path(tmp_path, start_proxy):
    """A lone surrogate (an emoji cut at max_tokens) made orjson refuse litellm's answer: a 500."""
    from support.raw_upstream import raw_upstream

    body = (b'{"id": "c", "object": "chat.completion", "created": 0, "model": "up", "choices": [{"index": 0, '
            b'"finish_reason": "length", "message": {"role": "assistant", "content": "Sure \\ud83d"}}]}')
    answer = _reply(b"application/json", body)
    with raw_upstream(lambda request: answer) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("lite", url, tmp_path, fast_path=False)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        got = client(proxy).chat.completions.create(model="lite", messages=MESSAGES)
    assert got.model == "lite" and got.choices[0].message.content.startswith("Sure")


@pytest.mark.parametrize("answer", [
    _reply(b"text/html", b"<html>Sign in to the Wi-Fi</html>"),
    _reply(b"application/json", b""),
    _reply(b"application/json", b'{"error": {"message": "engine died"}}'),
    _reply(b"text/event-stream", b": keep-alive\n\n"),
    _reply(b"text/event-stream", b"data: [DONE]\n\n"),
], ids=["html", "empty", "error-object", "keep-alive", "done"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_200_that_is_no_answer_falls_back_on_the_litellm_path_as_on_the_other(
        tmp_path, upstream, start_proxy, answer, stream):
    """litellm made a streamed HTML page one empty chunk with finish_reason "stop" (a success
    that cleared the model's failures), and an error object sent with 200 a 422."""
    from support.raw_upstream import raw_upstream

    with raw_upstream(lambda request: answer) as url:
        cfg = write_config(tmp_path / "providers.yaml",
                           [model_entry("lite", url, tmp_path, fast_path=False),
                            model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)], num_retries=0)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"lite": 0.9, "oai-fast": 0.1}))
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,
                                                                      stream=stream)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            text = raw.parse().choices[0].message.content
    assert raw.headers["x-satroute-failed"] == "lite:bad_answer"
    assert raw.headers["x-satroute-model"] == "oai-fast" and text


def test_the_connect_timeout_bounds_a_connect_on_the_litellm_path_too(tmp_path, upstream, start_proxy):
    """A listener whose backlog is full never completes a connect: connect_timeout_s, not the
    attempt's timeout_s, decides when the next model is tried."""
    import time

    with never_connecting_port() as port:
        cfg = write_config(tmp_path / "providers.yaml",
                           [model_entry("lite", f"http://127.0.0.1:{port}/v1", tmp_path, fast_path=False),
                            model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)],
                           num_retries=0, timeout_s=8, connect_timeout_s=0.5)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"lite": 0.9, "oai-fast": 0.1}))
        client(proxy).chat.completions.create(model="oai-fast", messages=MESSAGES)  # litellm imported
        started = time.monotonic()
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        took = time.monotonic() - started
    assert raw.headers["x-satroute-model"] == "oai-fast" and raw.headers["x-satroute-failed"].startswith("lite:")
    assert took < 4, f"the connect took {took:.1f} s to give up, connect_timeout_s is 0.5"


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_that_is_not_json_reaches_the_client_in_its_own_words(tmp_path, upstream,
                                                                                start_proxy, stream):
    from support.raw_upstream import raw_upstream

    answer = _reply(b"text/html", b"<html>plain error 403</html>", b"403 Forbidden")
    with raw_upstream(lambda request: answer) as url:
        anthropic = claude(upstream)
        anthropic["litellm_params"]["api_base"] = url.removesuffix("/v1")
        (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("lite", url, tmp_path, fast_path=False),
                                                         model_entry("fast", url, tmp_path, fast_path=True),
                                                         anthropic], num_retries=0)
        proxy = start_proxy(cfg)
        said = {}
        for name in ("lite", "fast", "claude"):
            with pytest.raises(openai.PermissionDeniedError) as err:
                got = client(proxy).chat.completions.create(model=name, messages=MESSAGES, stream=stream)
                list(got) if stream else None
            said[name] = err.value.body["message"]
    assert said == dict.fromkeys(("lite", "fast", "claude"), "<html>plain error 403</html>")


@pytest.mark.parametrize("content_type", [b"Text/Event-Stream", b"application/json", b"text/plain; charset=utf-8"])
def test_a_real_stream_under_an_odd_content_type_is_still_relayed_on_the_litellm_path(tmp_path, start_proxy,
                                                                                      content_type):
    from support.raw_upstream import raw_upstream

    events = (b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,'
              b'"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}]}\n\n'
              b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,'
              b'"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    with raw_upstream(lambda request: _reply(content_type, events)) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("lite", url, tmp_path, fast_path=False)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        chunks = list(client(proxy).chat.completions.create(model="lite", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"


def test_a_client_s_malformed_tool_arguments_are_its_own_error_not_the_model_s(tmp_path, upstream, start_proxy):
    """Arguments cut off at max_tokens, sent back in the chat: litellm cannot translate them for
    Anthropic. That is a 400 for the client; it must not cool the model for everyone."""
    (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
    cfg = write_config(tmp_path / "providers.yaml", [claude(upstream)], num_retries=2, allowed_fails=2)
    proxy = start_proxy(cfg)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}
    chat = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError):
        client(proxy).chat.completions.create(model="claude", messages=chat, tools=tools)
    ready = httpx.get(f"{proxy.base}/ready").json()
    assert ready["cooling"] == [] and upstream.bodies("claude-upstream") == []


def test_an_empty_answer_from_a_translated_provider_is_an_answer_and_an_html_page_is_not(
        tmp_path, upstream, start_proxy):
    """Anthropic's stream of an empty answer and litellm's stream of an HTML page look the same
    (one empty chunk that says "stop"); the body's type tells them apart."""
    from support.raw_upstream import raw_upstream

    (tmp_path / "claude.profile.json").write_text('{"tasks": {"t1": 0.5}}')
    upstream.set("claude-upstream", answer(""))
    page = _reply(b"text/html", b"<html>Sign in to the Wi-Fi</html>")
    with raw_upstream(lambda request: page) as url:
        portal = claude(upstream, name="portal")
        portal["litellm_params"]["api_base"] = url.removesuffix("/v1")
        portal["model_info"]["capability_profile"] = "claude.profile.json"
        cfg = write_config(tmp_path / "providers.yaml",
                           [claude(upstream), portal, model_entry("oai-fast", upstream.url, tmp_path)],
                           num_retries=0)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"claude": 0.9, "portal": 0.9, "oai-fast": 0.1}))
        empty = list(client(proxy).chat.completions.create(model="claude", messages=MESSAGES, stream=True))
        raw = client(proxy).chat.completions.with_raw_response.create(
            model="auto", messages=MESSAGES, stream=True, extra_body={"satroute": {"models": ["portal", "oai-fast"]}})
        list(raw.parse())
    assert empty and empty[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in empty if c.choices) == ""
    assert raw.headers["x-satroute-failed"] == "portal:bad_answer"


def _wait_unavailable(proxy, name: str, present: bool = True) -> dict:
    """/ready's ``unavailable`` once ``name`` is (or is no longer) in it: litellm's import, which
    tells, runs in the background at start-up."""
    deadline = time.monotonic() + 60
    while True:
        unavailable = httpx.get(f"{proxy.base}/ready").json()["unavailable"]
        if (name in unavailable) == present or time.monotonic() > deadline:
            return unavailable
        time.sleep(0.1)


def test_a_provider_litellm_does_not_know_leaves_the_model_out_with_the_reason(tmp_path, upstream,
                                                                             start_proxy, caplog):
    """A misspelt prefix (`opneai/`) or a served id with a slash and no prefix
    (`meta-llama/...`, read as the provider `meta-llama`): litellm refuses every call with a 400
    that blamed the client, and a routed request never reached the next model. Now such a model
    is unavailable, with the reason in /ready and the log; an edit that fixes it brings it back."""
    typo = model_entry("typo", upstream.url, tmp_path)
    typo["litellm_params"]["model"] = "opneai/m1"
    served = model_entry("served", upstream.url, tmp_path)
    served["litellm_params"]["model"] = "meta-llama/Llama-3.1-8B-Instruct"
    bare = model_entry("bare", upstream.url, tmp_path, fast_path=False)
    bare["litellm_params"]["model"] = "my-model"  # no prefix: openai, on the litellm path too
    models = [typo, served, bare, model_entry("m1", upstream.url, tmp_path)]
    cfg = write_config(tmp_path / "providers.yaml", models, num_retries=0)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"typo": 0.9, "served": 0.8, "bare": 0.5, "m1": 0.1}))
    unavailable = _wait_unavailable(proxy, "typo")
    assert set(unavailable) == {"typo", "served"}
    assert "litellm knows no provider 'opneai'" in unavailable["typo"]
    assert "openai/meta-llama/Llama-3.1-8B-Instruct" in unavailable["served"]
    assert any("model typo unavailable: litellm knows no provider" in r.getMessage() for r in caplog.records)
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-model"] == "bare" and "x-satroute-failed" not in raw.headers
    assert upstream.bodies("my-model")  # litellm called it as an OpenAI-compatible model
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).chat.completions.create(model="typo", messages=MESSAGES)
    assert "'typo' is not available" in err.value.message  # as for any unavailable model
    typo["litellm_params"]["model"] = "openai/m1"  # the admin's fix
    write_config(cfg, models, num_retries=0)
    assert "typo" not in _wait_unavailable(proxy, "typo", present=False)
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "typo"


def test_a_request_that_reaches_a_model_litellm_cannot_call_falls_back(tmp_path, upstream):
    """Before the registry has left it out (litellm was still importing), a routed request falls
    back from such a model, and one naming it gets a 404 that says why."""
    import asyncio

    from proxy.cooldown import Cooldowns
    from proxy.dispatch import Call, RetryingDispatcher
    from proxy.errors import UpstreamClientError
    from proxy.providers import parse

    typo = model_entry("typo", upstream.url, tmp_path)
    typo["litellm_params"]["model"] = "opneai/m1"
    cfg = write_config(tmp_path / "providers.yaml", [typo, model_entry("m1", upstream.url, tmp_path)])
    snap = parse(cfg.read_text(), cfg, {}, lambda d: None)
    dispatcher = RetryingDispatcher(Cooldowns())

    async def go(targets):
        try:
            return await dispatcher.complete(Call(targets=targets, body={"model": "auto", "messages": MESSAGES},
                                                  stream=False, router=snap.router))
        finally:
            await dispatcher.close()

    reply = asyncio.run(go([snap.models["typo"], snap.models["m1"]]))
    assert reply.model == "m1" and reply.failed == [("typo", "http_404")]
    with pytest.raises(UpstreamClientError) as err:
        asyncio.run(go([snap.models["typo"]]))
    assert err.value.status == 404 and "litellm knows no provider 'opneai'" in err.value.message


def test_the_first_request_with_an_anthropic_beta_header_fetches_nothing(proxy, upstream, monkeypatch):
    """litellm reads which beta headers a provider takes from a config it fetches from GitHub,
    with a blocking httpx.get (5 s timeout) on the event loop, on the first request that carries
    one (an MCP tool adds one): offline, every request to the proxy would wait. Its bundled copy
    is what the proxy uses, as it does for the cost map."""
    from proxy.settings import prepare_litellm_environment

    monkeypatch.delenv("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", raising=False)
    prepare_litellm_environment()
    from litellm import anthropic_beta_headers_manager as manager

    monkeypatch.setattr(manager, "_BETA_HEADERS_CONFIG", None)  # as in a fresh process
    fetched = []

    def no_network(url, *args, **kwargs):
        fetched.append(url)
        raise httpx.ConnectError("no network in this test")

    monkeypatch.setattr(httpx, "get", no_network)
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="claude", messages=MESSAGES,
        tools=[{"type": "url", "url": "https://example.com/mcp", "name": "x"}])
    assert raw.headers["x-satroute-model"] == "claude"
    assert manager._BETA_HEADERS_CONFIG  # read, from the bundled copy
    assert fetched == [] and os.environ["LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS"] == "True"


def test_an_error_chunk_litellm_cannot_read_ends_the_stream_in_the_error_event(tmp_path, start_proxy):
    """OpenRouter reports a failure mid-stream as a chunk with `error.code: "server_error"`, on
    which litellm raises ValueError, not an OpenAIError: the client must get the in-band error
    event (the SDK raises APIError), not a connection cut mid-body."""
    import json

    from support.raw_upstream import raw_upstream

    first = {"id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": "openai/gpt-4o",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello "},
                          "finish_reason": None}]}
    broken = {"id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": "openai/gpt-4o",
              "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
              "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
    body = b"".join([b": OPENROUTER PROCESSING\n\n", b"data: " + json.dumps(first).encode() + b"\n\n",
                     b"data: " + json.dumps(broken).encode() + b"\n\n", b"data: [DONE]\n\n"])
    with raw_upstream(lambda request: _reply(b"text/event-stream", body)) as url:
        entry = {"model_name": "routed-or",
                 "litellm_params": {"model": "openrouter/openai/gpt-4o", "api_key": "sk-or-test",
                                    "api_base": url}}
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry], num_retries=0))
        seen = ""
        with pytest.raises(openai.APIError) as raised:
            for chunk in client(proxy).chat.completions.create(model="routed-or", messages=MESSAGES,
                                                               stream=True):
                seen += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        assert seen == "Hello "
        assert "upstream stream interrupted" in str(raised.value) and "routed-or" in str(raised.value)
        assert "invalid literal" not in str(raised.value)


@pytest.mark.parametrize("model", ["ollama/llama3", "ollama_chat/llama3"])
def test_an_empty_streamed_answer_from_ollama_is_an_answer(tmp_path, start_proxy, model):
    """Ollama streams JSON lines (`application/x-ndjson`), never SSE: its empty answer, one line
    that says done, is an answer, as it is not streamed; it was `bad_answer`, retried, a 502 and
    the model cooled after one request."""
    import json

    from support.raw_upstream import raw_upstream

    done = {"model": "llama3", "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop",
            "message": {"role": "assistant", "content": ""}, "response": "", "prompt_eval_count": 5,
            "eval_count": 0}
    calls = []

    def respond(request):
        calls.append(request)
        return _reply(b"application/x-ndjson", json.dumps(done).encode() + b"\n")

    with raw_upstream(respond) as url:
        entry = {"model_name": "local-ollama",
                 "litellm_params": {"model": model, "api_base": url.removesuffix("/v1")}}
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry], num_retries=2,
                                         allowed_fails=1))
        chunks = list(client(proxy).chat.completions.create(model="local-ollama", messages=MESSAGES,
                                                            stream=True))
        ready = httpx.get(f"{proxy.base}/ready").json()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len(calls) == 1 and ready["cooling"] == []


@pytest.mark.parametrize("ended", [False, True])
def test_a_tool_call_stream_the_upstream_closed_unfinished_ends_in_the_error_event(tmp_path, start_proxy, ended):
    """Anthropic's stream closed cleanly in the middle of a tool call's arguments (no
    message_delta, no message_stop): litellm ends it with a chunk of its own that says "stop", and
    the client took arguments that are no JSON for a finished answer in text. As on the
    pass-through path, such a stream ends in the error event; a finished one as ever."""
    import json

    from support.raw_upstream import raw_upstream

    def event(name, obj):
        return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()

    events = [event("message_start", {"type": "message_start", "message": {
                  "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
                  "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
              event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                  "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
              event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                  "type": "input_json_delta", "partial_json": '{"city": "Pa'}})]
    if ended:
        events += [event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                       "type": "input_json_delta", "partial_json": 'ris"}'}}),
                   event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                                               "stop_sequence": None},
                                           "usage": {"output_tokens": 9}}),
                   event("message_stop", {"type": "message_stop"})]
    with raw_upstream(lambda request: _reply(b"text/event-stream", b"".join(events))) as url:
        entry = {"model_name": "claude", "litellm_params": {"model": "anthropic/claude-x", "api_key": "sk-ant-test",
                                                            "api_base": url.removesuffix("/v1")}}
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry], num_retries=0))
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        stream = client(proxy).chat.completions.create(model="claude", messages=MESSAGES, tools=tools, stream=True)
        if not ended:
            with pytest.raises(openai.APIError, match="upstream stream interrupted"):
                list(stream)
            return
        chunks = list(stream)
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert "".join(call[0].function.arguments or "" for call in calls) == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_gemini_stream_whose_finish_is_followed_by_a_usage_frame_ends_as_finished(tmp_path, start_proxy):
    """litellm holds Gemini's finish reason only while its frame is read, and forgets it at a
    later usage-only frame: its closing "stop" is then its own, but the upstream did finish; the
    answer must not end in the error event that a stream closed unfinished gets."""
    import json

    from support.raw_upstream import raw_upstream

    frames = [{"candidates": [{"content": {"parts": [{"text": "Hello"}], "role": "model"}, "finishReason": "STOP"}]},
              {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}}]
    body = b"".join(b"data: " + json.dumps(frame).encode() + b"\r\n\r\n" for frame in frames)
    with raw_upstream(lambda request: _reply(b"text/event-stream", body)) as url:
        entry = {"model_name": "gem", "litellm_params": {"model": "gemini/gemini-2.0-flash", "api_key": "g-test",
                                                         "api_base": url}}
        proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry], num_retries=0))
        chunks = list(client(proxy).chat.completions.create(model="gem", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_null_web_search_options_is_a_field_left_unset_on_the_litellm_path(proxy, upstream, stream):
    """litellm reads the field itself before calling (a null raised a TypeError there: a 500, and a
    routed request never reached its next model); a null is a field not given, as for OpenAI."""
    for model in ("claude", "oai-lite", "auto"):
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                       json={"model": model, "messages": MESSAGES, "stream": stream,
                             "web_search_options": None})
        assert r.status_code == 200, (model, r.text)
        assert r.headers.get("x-satroute-failed") is None
    sent = upstream.bodies("oai-lite")
    assert sent and all("web_search_options" not in body for body in sent)


def test_a_web_search_options_that_is_no_object_is_refused_as_openai_does(proxy, upstream):
    for value in ("x", [], 5, True):
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                       json={"model": "claude", "messages": MESSAGES, "web_search_options": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "web_search_options"
    assert upstream.received == []


def test_a_failure_of_litellm_s_own_code_falls_back_and_a_named_call_gets_a_400(proxy, upstream, monkeypatch,
                                                                                 caplog):
    """Whatever litellm raises that is none of its API errors (its own code failing on a request)
    is the request's: a routed request goes to the next model, with no retry and no cooldown; one
    naming the model gets a 400 saying what failed; the trace goes to the log, never a 500."""
    import litellm

    calls = []

    async def broken(**kwargs):
        calls.append(kwargs["model"])
        raise TypeError("WebSearchOptions() argument after ** must be a mapping")

    client(proxy).chat.completions.create(model="oai-lite", messages=MESSAGES)  # litellm imported
    monkeypatch.setattr(litellm, "acompletion", broken)
    for stream in (False, True):
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                       json={"model": "auto", "messages": MESSAGES, "stream": stream})
        assert r.status_code == 200, r.text
        assert r.headers["x-satroute-failed"] == "claude:untranslatable,oai-lite:untranslatable"
        assert r.headers["x-satroute-model"] == "oai-fast"
    with pytest.raises(openai.BadRequestError) as err:
        client(proxy).chat.completions.create(model="claude", messages=MESSAGES)
    assert err.value.code == "untranslatable_request"
    assert "litellm failed making it (TypeError: WebSearchOptions()" in err.value.message
    assert calls == ["anthropic/claude-upstream", "openai/oai-lite"] * 2 + ["anthropic/claude-upstream"]
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    # the log says where litellm failed, not its message (which may quote the request: prompts
    # are logged only with SATROUTE_LOG_PROMPTS)
    said = [rec.getMessage() for rec in caplog.records if "litellm failed on a request" in rec.getMessage()]
    assert said and all(line.startswith("model ") and ": TypeError in broken (test_translated_providers.py:"
                        in line for line in said)
    assert not any(rec.exc_info for rec in caplog.records if "litellm failed" in rec.getMessage())
    assert "must be a mapping" not in caplog.text


AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
PDF = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
OLLAMA_ANSWER = {"model": "llama3", "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello"}, "prompt_eval_count": 5, "eval_count": 1}


def _translated(tmp_path, model: str, url: str) -> dict:
    """A model of ``model``'s provider on ``url``, with a profile (ranked by the test's scorer)."""
    return {"model_name": "translated",
            "litellm_params": {"model": model, "api_key": "sk-test", "api_base": url.removesuffix("/v1")},
            "model_info": {"capability_profile": profile_file(tmp_path, "translated")}}


@pytest.mark.parametrize("model, part", [("anthropic/claude-x", AUDIO), ("ollama_chat/llama3", AUDIO),
                                         ("ollama/llama3", PDF)])
def test_a_part_litellm_would_leave_out_is_refused_unsent_and_a_routed_request_skips_the_model(
        tmp_path, upstream, start_proxy, model, part):
    """litellm's translation for Anthropic leaves sound out, for Ollama sound and files: the model
    answered 200 as if they were not there."""
    import json

    from support.raw_upstream import raw_upstream

    calls = []

    def respond(request):
        calls.append(request)
        return _reply(b"application/json", json.dumps(OLLAMA_ANSWER).encode())

    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in it?"}, part]}]
    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [_translated(tmp_path, model, url),
                                                         model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)])
        proxy = start_proxy(cfg, scorer=RecordingScorer({"translated": 0.9, "oai-fast": 0.1}))
        with pytest.raises(openai.BadRequestError) as err:
            client(proxy).chat.completions.create(model="translated", messages=messages)
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=messages)
    assert err.value.code == "untranslatable_request" and err.value.param == "messages"
    assert err.value.body["message"] == (f"model translated cannot take this request: litellm leaves "
                                         f"{part['type']} parts out of what it sends the model's provider")
    assert raw.headers["x-satroute-model"] == "oai-fast" and "x-satroute-failed" not in raw.headers
    assert calls == []


def test_a_part_litellm_cannot_count_after_ollama_answered_is_the_request_s_failure_not_the_model_s(
        tmp_path, upstream, start_proxy):
    """Reading Ollama's answer, litellm counts the request's tokens and fails on a part type its
    counter does not know (an assistant's refusal part): that was `bad_answer`, retried, and
    counted towards the model's cooldown, for every client."""
    import json

    from support.raw_upstream import raw_upstream

    calls = []

    def respond(request):
        calls.append(request)
        return _reply(b"application/json", json.dumps(OLLAMA_ANSWER).encode())

    messages = [{"role": "user", "content": "Tell me a secret."},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
                {"role": "user", "content": "Then say hello."}]
    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml",
                           [_translated(tmp_path, "ollama_chat/llama3", url),
                            model_entry("oai-fast", upstream.url, tmp_path, fast_path=True)],
                           num_retries=2, allowed_fails=1)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"translated": 0.9, "oai-fast": 0.1}))
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=messages)
        with pytest.raises(openai.BadRequestError) as err:
            client(proxy).chat.completions.create(model="translated", messages=messages)
        ready = httpx.get(f"{proxy.base}/ready").json()
    assert raw.headers["x-satroute-failed"] == "translated:untranslatable"
    assert raw.headers["x-satroute-model"] == "oai-fast"
    assert err.value.code == "untranslatable_request" and err.value.body["message"] == (
        "model translated cannot take this request: litellm cannot read its refusal parts for the "
        "model's provider")
    assert len(calls) == 2 and ready["cooling"] == []  # one call each, never retried


def test_litellm_s_own_failure_is_logged_with_its_trace_only_where_prompts_are(caplog):
    from proxy.dispatch import _litellm_failed

    try:
        raise ValueError("cannot count tokens in message {'content': 'a private prompt'}")
    except ValueError as exc:
        caught = exc
    for texts in (False, True):
        caplog.clear()
        _litellm_failed(caught, "m1", str, texts=texts)
        [record] = [r for r in caplog.records if "litellm failed" in r.getMessage()]
        assert record.levelname == "ERROR"  # the JSON log keeps a trace at ERROR only
        assert bool(record.exc_info) is texts
        assert ("a private prompt" in caplog.text) is texts


def test_a_connect_that_timed_out_is_not_told_as_a_slow_answer(tmp_path, start_proxy):
    """The 504 and the log said "no answer within 8.0s" for an attempt that gave up connecting
    after 0.5 s: an unreachable host read as a slow model."""
    with never_connecting_port() as port:
        cfg = write_config(tmp_path / "providers.yaml",
                           [model_entry("far", f"http://127.0.0.1:{port}/v1", tmp_path, fast_path=True)],
                           num_retries=0, timeout_s=8, connect_timeout_s=0.5)
        proxy = start_proxy(cfg)
        r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "far", "messages": MESSAGES}, timeout=30)
    assert r.status_code == 504 and "far: could not connect within 0.5s" in r.json()["error"]["message"], r.text
