"""A routed request longer than a model's context window goes to a model with room for it: the
declared ``model_info.context_window`` (or a local server's ``n_ctx``) leaves the short ones out
before scoring, and a model that still answers "too long" hands the request to the next one,
without cooling. Before, the key was read and never used: a long prompt went to the best-scored
model, whose 400 reached the client, with the model that could take it never asked."""
from __future__ import annotations

import httpx
import openai
import pytest

from conftest import RecordingScorer, model_entry, write_config
from proxy.providers import Deployment, LocalServerConfig, ModelInfo
from proxy.routing import CHARS_PER_TOKEN_AT_MOST, candidates, tokens_needed, with_room
from proxy.upstream import CONTEXT_WINDOW, classify
from support.mock_upstream import fail

PATHS = [pytest.param(True, id="passthrough"), pytest.param(False, id="litellm")]
VLLM_WORDS = ("This model's maximum context length is 2048 tokens. However, you requested 9000 "
              "tokens (8990 in the messages, 10 in the completion). Please reduce the length.")


def _deployment(name: str, window: int | None = None, n_ctx: int | None = None) -> Deployment:
    info = ModelInfo(context_window=window, local_server=LocalServerConfig(n_ctx=n_ctx) if n_ctx else None)
    return Deployment(name=name, model=f"openai/{name}", provider="openai", upstream_model=name,
                      api_base="http://127.0.0.1:9/v1", api_key=None, params={}, info=info,
                      profile={"t1": 0.5}, unavailable=None, fast_path=True)


def test_the_estimate_errs_low_and_counts_the_completion_asked_for():
    body = {"messages": [{"role": "system", "content": "a" * 1000},
                         {"role": "user", "content": [{"type": "text", "text": "b" * 500}]}]}
    assert tokens_needed(body) == (1500 // CHARS_PER_TOKEN_AT_MOST, 0)
    assert tokens_needed({**body, "max_tokens": 700}) == (300, 700)
    assert tokens_needed({**body, "max_completion_tokens": 50, "max_tokens": 700}) == (300, 50)
    assert tokens_needed({"messages": "not a list", "max_tokens": True}) == (0, 0)


def test_models_without_room_are_left_out_and_an_unknown_window_is_room():
    small, big, unknown, local = (_deployment("small", 2048), _deployment("big", 128_000),
                                  _deployment("unknown"), _deployment("local", n_ctx=1024))
    pool = [small, big, unknown, local]
    assert [d.name for d in with_room(pool, (1000, 0))] == ["small", "big", "unknown", "local"]
    assert [d.name for d in with_room(pool, (1500, 0))] == ["small", "big", "unknown"]  # n_ctx counts
    assert [d.name for d in with_room(pool, (5000, 0))] == ["big", "unknown"]
    # the completion asked for counts, but not at a local server, which shortens it to the room left
    assert [d.name for d in with_room(pool, (100, 4000))] == ["big", "unknown", "local"]
    # longer than every window as estimated: the widest is the one asked (it may hold it)
    assert [d.name for d in with_room([small, local], (5000, 0))] == ["small"]
    assert [d.name for d in candidates(pool, None, lambda name: False, (5000, 0))] == ["big", "unknown"]


@pytest.mark.parametrize("said", [
    {"code": "context_length_exceeded", "message": "too long"},  # OpenAI, llama-cpp-python
    {"code": 400, "type": "BadRequestError", "message": VLLM_WORDS},  # vLLM
    {"code": 400, "type": "exceed_context_size_error",  # llama.cpp's server
     "message": "the request exceeds the available context size, try increasing it"},
])
def test_an_upstream_s_words_for_too_long_make_the_request_unfit_for_it(said):
    import orjson

    refused = classify(400, orjson.dumps({"error": said}), "m", {}, str)
    assert refused.unfit == CONTEXT_WINDOW and refused.status == 400
    assert refused.upstream_body["error"]["message"] == said["message"]  # its own words go back
    other = classify(400, orjson.dumps({"error": {"code": "invalid_value", "message": "bad temperature"}}),
                     "m", {}, str)
    assert other.unfit is None
    # a validation error quoting the request back: the client's words are not the model's answer
    echo = ("1 validation error: messages.0.name: Input should be a valid string [type=string_type, "
            "input_value={'role': 'user', 'content': 'What is the maximum context length of GPT-4?'}]")
    for body in ({"error": {"code": 400, "message": echo}}, {"detail": echo}):
        assert classify(400, orjson.dumps(body), "m", {}, str).unfit is None, body


def _setup(tmp_path, upstream, start_proxy, fast: bool, small_window: int | None):
    small = model_entry("small", upstream.url, tmp_path, fast_path=fast)
    if small_window is None:
        del small["model_info"]["context_window"]
    else:
        small["model_info"]["context_window"] = small_window
    big = model_entry("big", upstream.url, tmp_path, fast_path=fast)
    big["model_info"]["context_window"] = 128_000
    cfg = write_config(tmp_path / "providers.yaml", [small, big])
    return start_proxy(cfg, scorer=RecordingScorer({"small": 0.9, "big": 0.5}))


def _client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0, timeout=30)


LONG = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 500}]  # 22,500 chars


def test_a_long_prompt_is_routed_to_a_model_with_room_without_asking_the_short_one(tmp_path, upstream,
                                                                                   start_proxy):
    proxy = _setup(tmp_path, upstream, start_proxy, True, small_window=2048)
    raw = _client(proxy).chat.completions.with_raw_response.create(model="auto", messages=LONG)
    assert raw.headers["x-satroute-model"] == "big" and "x-satroute-failed" not in raw.headers
    assert upstream.bodies("small") == []
    short = _client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}])
    assert short.headers["x-satroute-model"] == "small"  # the scorer's choice when it fits


@pytest.mark.parametrize("fast", PATHS)
def test_a_model_that_says_too_long_hands_a_routed_request_to_the_next_without_cooling(
        tmp_path, upstream, start_proxy, fast):
    proxy = _setup(tmp_path, upstream, start_proxy, fast, small_window=None)  # its window unknown
    upstream.set("small", fail(400, VLLM_WORDS))
    raw = _client(proxy).chat.completions.with_raw_response.create(model="auto", messages=LONG)
    assert raw.headers["x-satroute-model"] == "big"
    assert raw.headers["x-satroute-failed"] == "small:context_window"
    assert len(upstream.bodies("small")) == 1  # not retried
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    # a request naming the model gets the model's own answer
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _client(proxy).chat.completions.create(model="small", messages=LONG)
