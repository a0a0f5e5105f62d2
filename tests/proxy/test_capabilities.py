"""A routed request with images, audio, files or tools goes to a model that can read them: models
whose ``model_info`` says ``supports_vision`` / ``supports_audio_input`` / ``supports_pdf_input`` /
``supports_function_calling: false`` (LiteLLM's keys) are left out before scoring, and a model
that still answers that it cannot read them (vLLM's "is not a multimodal model", its "auto" tool
choice without a tool parser, OpenAI's, Ollama's words) hands the request to the next one,
without cooling. Before, the keys were accepted and never read: the best-scored text-only model's
400 reached the client, with the vision model never asked."""
from __future__ import annotations

from dataclasses import replace

import httpx
import openai
import orjson
import pytest

from conftest import RecordingScorer, model_entry, write_config
from proxy.providers import Deployment, LocalServerConfig, ModelInfo
from proxy.routing import candidates, features_needed, part_types, supports
from proxy.upstream import UNSUPPORTED, classify
from support.mock_upstream import fail

PATHS = [pytest.param(True, id="passthrough"), pytest.param(False, id="litellm")]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
PICTURE = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
VLLM_IMAGE = "meta-llama/Llama-3.1-70B-Instruct is not a multimodal model None"
VLLM_TOOLS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def _deployment(name: str, local: LocalServerConfig | None = None, **info) -> Deployment:
    return Deployment(name=name, model=f"openai/{name}", provider="openai", upstream_model=name,
                      api_base="http://127.0.0.1:9/v1", api_key=None, params={},
                      info=ModelInfo(local_server=local, **info), profile={"t1": 0.5},
                      unavailable=None, fast_path=True)


def test_what_a_request_needs_is_read_from_every_turn_and_its_tools():
    assert features_needed({"messages": [{"role": "user", "content": "hi"}]}) == frozenset()
    earlier_image = [PICTURE[0], {"role": "assistant", "content": "A cat."},
                     {"role": "user", "content": "And its colour?"}]
    assert features_needed({"messages": earlier_image}) == {"supports_vision"}
    parts = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
             {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}]
    assert features_needed({"messages": [{"role": "user", "content": parts}], "tools": TOOLS}) == {
        "supports_audio_input", "supports_pdf_input", "supports_function_calling"}
    assert features_needed({"messages": [], "functions": [{"name": "f"}]}) == {"supports_function_calling"}
    assert features_needed({"messages": [], "tools": []}) == frozenset()
    assert features_needed({"messages": ["junk", {"content": [1, {"type": None}]}]}) == frozenset()


def test_models_known_unable_are_left_out_and_an_unknown_one_is_kept():
    text_only = _deployment("text", supports_vision=False, supports_function_calling=False)
    vision = _deployment("vision", supports_vision=True)
    unknown = _deployment("unknown")
    local = _deployment("local", local=LocalServerConfig())
    local_clip = _deployment("local-clip", local=LocalServerConfig(
        args=["--clip_model_path", "x.gguf", "--chat_format", "llava-1-6"]))
    pool = [text_only, vision, unknown, local, local_clip]
    cool = lambda name: False  # noqa: E731

    def names(needs):
        return [d.name for d in candidates(pool, None, cool, needs=frozenset(needs))]

    assert names([]) == ["text", "vision", "unknown", "local", "local-clip"]
    assert names(["supports_vision"]) == ["vision", "unknown", "local-clip"]  # a local one needs clip and format
    assert names(["supports_function_calling"]) == ["vision", "unknown", "local", "local-clip"]
    assert names(["supports_vision", "supports_function_calling"]) == ["vision", "unknown", "local-clip"]
    # none can: the pool as it was (the best-scored one says why it cannot)
    assert [d.name for d in candidates([text_only, local], None, cool,
                                       needs=frozenset({"supports_vision"}))] == ["text", "local"]


def test_a_part_litellm_leaves_out_for_a_provider_makes_its_models_unable_to_read_it():
    """litellm's translation for Anthropic leaves sound out, for Ollama sound and files: the
    model answered as if they were not there, whatever its model_info said."""
    claude = replace(_deployment("claude", supports_audio_input=True), provider="anthropic", fast_path=False)
    ollama = replace(_deployment("ollama"), provider="ollama_chat", fast_path=False)
    named = replace(_deployment("named"), params={"custom_llm_provider": "ollama"}, fast_path=False)
    passed = replace(_deployment("passed"), provider="anthropic")  # sent as it is (fast_path)
    assert [supports(claude, f) for f in ("supports_audio_input", "supports_pdf_input", "supports_vision")] == [
        False, None, None]
    assert [supports(d, "supports_pdf_input") for d in (ollama, named, passed)] == [False, False, None]
    audio = frozenset({"supports_audio_input"})
    assert [d.name for d in candidates([claude, ollama, named, passed], None, lambda n: False, needs=audio)] == [
        "passed"]
    assert part_types({"messages": [{"content": "hi"}, {"content": [{"type": "text"}, {"type": 3}, "x"]},
                                    {"content": [{"type": "input_audio"}]}, None]}) == {"text", "input_audio"}


@pytest.mark.parametrize("model, provider, images", [
    ("deepseek/deepseek-chat", "deepseek", False),  # listed, no vision: its parts become one string
    ("deepseek/deepseek-v4-flash", "deepseek", True),  # listed supports_vision: images are sent
    ("deepseek/my-finetune", "deepseek", False),  # unlisted: as litellm, no vision
    ("mistral/voxtral-mini-latest", "mistral", True),  # sound left out unless an image or file goes
    ("heroku/claude-4-sonnet", "heroku", False),  # every message made one string
])
def test_what_litellm_leaves_out_may_depend_on_the_model_as_its_list_says(model, provider, images):
    """DeepSeek's translation keeps images only for the models litellm's list says read them, and
    Mistral's and Heroku's make strings of parts: the answer came back as if they were not sent."""
    d = replace(_deployment("d", supports_vision=True, supports_audio_input=True), model=model,
                provider=provider, fast_path=False)
    assert ("image_url" not in d.dropped_parts) is images
    assert supports(d, "supports_vision") is images
    assert "input_audio" in d.dropped_parts and supports(d, "supports_audio_input") is False


def test_a_yaml_value_that_is_not_a_boolean_is_refused():
    with pytest.raises(ValueError, match="supports_vision"):
        ModelInfo(supports_vision="sometimes")


@pytest.mark.parametrize("said", [
    {"object": "error", "message": VLLM_IMAGE, "type": "BadRequestError", "code": 400},  # vLLM
    {"error": {"object": "error", "message": VLLM_TOOLS, "type": "BadRequestError", "code": 400}},
    {"error": {"message": "Invalid content type. image_url is only supported by certain models.",
               "type": "invalid_request_error", "param": "messages.[0].content.[1].type",
               "code": None}},  # OpenAI
    {"error": {"message": "registry.ollama.ai/library/gemma:2b does not support tools",
               "type": "api_error"}},  # Ollama
    {"error": {"message": "image input is not supported - hint: you may need to provide the mmproj",
               "type": "not_supported_error"}},  # llama.cpp's server
])
def test_an_upstream_s_words_for_what_it_cannot_read_make_the_request_unfit_for_it(said):
    refused = classify(400, orjson.dumps(said), "m", {}, str)
    assert refused.unfit == UNSUPPORTED and refused.status == 400
    inner = said.get("error", said)
    assert refused.upstream_body["error"]["message"] == inner["message"]  # its own words go back
    # a question about tools, echoed back by a validation error, is no such answer
    echo = {"error": {"message": "messages: content: 'why are tools not supported here?' is invalid"}}
    assert classify(400, orjson.dumps(echo), "m", {}, str).unfit is None
    assert classify(500, orjson.dumps(said), "m", {}, str).__class__.__name__ == "UpstreamTransient"


def test_vllm_s_top_level_error_reaches_the_client_as_its_message_not_as_json():
    raw = orjson.dumps({"object": "error", "message": "temperature must be >= 0", "type":
                        "BadRequestError", "param": None, "code": 400})
    refused = classify(400, raw, "m", {}, str)
    assert refused.message == "temperature must be >= 0"
    assert refused.upstream_body["error"]["message"] == "temperature must be >= 0"
    assert refused.upstream_body["error"]["type"] == "BadRequestError" and refused.unfit is None


def _setup(tmp_path, upstream, start_proxy, fast: bool, declared: bool):
    text = model_entry("text", upstream.url, tmp_path, fast_path=fast)
    if declared:
        text["model_info"].update(supports_vision=False, supports_function_calling=False)
    vision = model_entry("vision", upstream.url, tmp_path, fast_path=fast)
    vision["model_info"]["supports_vision"] = True
    cfg = write_config(tmp_path / "providers.yaml", [text, vision])
    scorer = RecordingScorer({"text": 0.9, "vision": 0.5})  # the text-only model scores best
    return start_proxy(cfg, scorer=scorer), scorer


def _client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0, timeout=30)


def test_a_routed_image_or_tools_request_skips_a_model_declared_unable_without_asking_it(
        tmp_path, upstream, start_proxy):
    proxy, scorer = _setup(tmp_path, upstream, start_proxy, True, declared=True)
    client = _client(proxy)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=PICTURE)
    assert raw.headers["x-satroute-model"] == "vision" and "x-satroute-failed" not in raw.headers
    assert set(scorer.calls[-1][1]) == {"vision"}  # left out before scoring
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS)
    assert raw.headers["x-satroute-model"] == "vision"
    assert upstream.bodies("text") == []
    plain = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}])
    assert plain.headers["x-satroute-model"] == "text"  # the scorer's choice when it can read it


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("words, request_", [
    pytest.param(VLLM_IMAGE, {"messages": PICTURE}, id="image"),
    pytest.param(VLLM_TOOLS, {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS},
                 id="tools"),
])
def test_a_model_that_says_it_cannot_read_the_request_hands_it_to_the_next_without_cooling(
        tmp_path, upstream, start_proxy, fast, words, request_):
    proxy, _ = _setup(tmp_path, upstream, start_proxy, fast, declared=False)  # not declared
    upstream.set("text", fail(400, words, error_type="BadRequestError"))
    raw = _client(proxy).chat.completions.with_raw_response.create(model="auto", **request_)
    assert raw.headers["x-satroute-model"] == "vision"
    assert raw.headers["x-satroute-failed"] == f"text:{UNSUPPORTED}"
    assert len(upstream.bodies("text")) == 1  # not retried
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    # a request naming the model gets the model's own answer
    with pytest.raises(openai.BadRequestError, match=words[:20].replace('"', '.')):
        _client(proxy).chat.completions.create(model="text", **request_)
