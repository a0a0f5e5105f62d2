"""What dispatch sends a local model (llama-cpp-python's server): the request in the form that
server reads, its litellm_params defaults included; nothing that would make that server fetch a URL;
and the re-ask of a stream it could not begin stays within the attempt's time."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from proxy.cooldown import Cooldowns
from proxy.dispatch import Call, RetryingDispatcher
from proxy.errors import UpstreamClientError, UpstreamTransient
from proxy.localserver import llama_cpp_available
from proxy.providers import ProviderRegistry
from proxy.upstream import Answer, PassThrough


class Recording:
    def __init__(self):
        self.bodies = []

    async def attempt(self, d, body, stream, first_byte_s, timeout_s, redact, connect_s=None, sent=None):
        self.bodies.append(body)
        return Answer(body=b'{"choices": []}')

    async def close(self):
        pass


@pytest.fixture
def local(tmp_path):
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "local", "litellm_params": {"model": "openai/smol", "max_completion_tokens": 6},
        "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28431}}}]}))
    return ProviderRegistry(path, dict).snapshot


async def test_a_local_model_s_defaults_are_put_in_the_form_its_server_reads_too(local):
    sent = Recording()
    dispatcher = RetryingDispatcher(Cooldowns(), passthrough=sent)
    await dispatcher.complete(Call(targets=[local.models["local"]], stream=False, router=local.router,
                                   body={"model": "local", "messages": [{"role": "user", "content": None}]}))
    assert sent.bodies[0]["max_tokens"] == 6  # which the server reads; max_completion_tokens it ignores
    assert sent.bodies[0]["messages"] == [{"role": "user", "content": ""}]


async def test_a_client_s_grammar_is_not_sent_to_a_local_model_an_admin_s_is(local, tmp_path):
    """Some GBNF grammars crash llama-cpp-python's server (a segfault): one client could keep the
    shared model down by sending one every time it came back."""
    sent = Recording()
    dispatcher = RetryingDispatcher(Cooldowns(), passthrough=sent)
    body = {"model": "local", "messages": [{"role": "user", "content": "hi"}], "grammar": "root ::= foo",
            "top_k": 20}
    await dispatcher.complete(Call(targets=[local.models["local"]], stream=False, router=local.router, body=body))
    assert "grammar" not in sent.bodies[0] and sent.bodies[0]["top_k"] == 20  # llama.cpp's sampling stays
    path = tmp_path / "admin.yaml"
    path.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "local", "litellm_params": {"model": "openai/smol",
                                                  "extra_body": {"grammar": 'root ::= "yes" | "no"'}},
        "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28432}}}]}))
    admin = ProviderRegistry(path, dict).snapshot
    await dispatcher.complete(Call(targets=[admin.models["local"]], stream=False, router=admin.router, body=body))
    assert sent.bodies[1]["grammar"] == 'root ::= "yes" | "no"'


async def test_an_image_by_url_is_never_sent_to_a_multimodal_local_model(tmp_path):
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "llava", "litellm_params": {"model": "openai/llava"},
        "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28432,
                                        "args": ["--clip_model_path", "mmproj.gguf",
                                                 "--chat_format", "llava-1-5"]}}}]}))
    snap = ProviderRegistry(path, dict).snapshot
    sent = Recording()
    dispatcher = RetryingDispatcher(Cooldowns(), passthrough=sent)

    def asking(url):
        return Call(targets=[snap.models["llava"]], stream=False, router=snap.router, body={
            "model": "llava", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]})

    with pytest.raises(UpstreamClientError) as refused:
        await dispatcher.complete(asking("http://169.254.169.254/latest/meta-data/"))
    assert refused.value.status == 400 and refused.value.unfit == "untranslatable"
    assert "data: URLs" in str(refused.value) and sent.bodies == []
    await dispatcher.complete(asking("data:image/png;base64,iVBORw0KGgo="))
    assert len(sent.bodies) == 1  # an inline image still goes


async def test_asking_a_local_server_again_stays_within_the_attempt_s_time(local):
    started = time.monotonic()
    with pytest.raises(UpstreamTransient) as late:
        await PassThrough()._asked_again(local.models["local"], {"stream": True, "messages": []},
                                         started + 0.05, 5.0, str, None)
    assert late.value.timeout and time.monotonic() - started < 0.05


FUNCTION = {"name": "get_w", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ASKED = {"tools": {"tools": [{"type": "function", "function": FUNCTION}]}, "functions": {"functions": [FUNCTION]}}


@pytest.mark.parametrize("form", ["tools", "functions"])
async def test_a_local_model_s_streamed_call_names_its_id_and_name_once(tmp_path, form):
    """llama-cpp-python's server repeats a tool call's id, type and name in every delta (and the
    call again as the legacy function_call): the openai SDK joined them into `get_wget_wget_w...`.
    As OpenAI streams it, they come in the call's first delta only, in the form asked for:
    `tool_calls` for `tools`, `function_call` for legacy `functions`."""
    import json

    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    def chunk(delta, finish=None):
        return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "smol",
                                       "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                    "finish_reason": finish}]}).encode() + b"\n\n"

    def call(arguments):  # function_call's name as chatml-function-calling writes it: wrong
        return {"role": None, "content": None, "function_call": {"name": "get_w:", "arguments": arguments},
                "tool_calls": [{"index": 0, "id": "call__0_get_w", "type": "function",
                                "function": {"name": "get_w", "arguments": arguments}}]}

    events = [chunk({"role": "assistant", "content": None, "function_call": None, "tool_calls": None}),
              *(chunk(call(a)) for a in ('{"', "city", '":"', "Paris", '"}')),
              chunk({"role": None, "content": None, "function_call": None, "tool_calls": None}, "tool_calls"),
              b"data: [DONE]\n\n"]
    streamed = await _asked_through_the_pass_through(tmp_path, b"text/event-stream", b"".join(events), stream=True,
                                                     **ASKED[form])
    state = ChatCompletionStreamState()
    for line in streamed.split(b"\n\n"):
        if line.startswith(b"data: {"):
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(line[6:])))
    message = state.get_final_completion().choices[0].message
    if form == "tools":
        made = message.tool_calls[0]
        assert (made.id, made.function.name, made.function.arguments) == ("call__0_get_w", "get_w", '{"city":"Paris"}')
        assert b'"function_call":{' not in streamed
    else:
        assert (message.function_call.name, message.function_call.arguments) == ("get_w", '{"city":"Paris"}')
        assert b'"tool_calls":[' not in streamed
        assert state.get_final_completion().choices[0].finish_reason == "function_call"


PHONE = {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"}}}
QUOTED_TOOL = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {'say "hi"': {"type": "string"}}}}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}}}
PLAIN = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ENUM_20K = {"type": "object", "properties": {"v": {"enum": [f"value-{n}" for n in range(20_000)]}}, "required": ["v"]}


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")
@pytest.mark.parametrize("asked", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": PHONE}}},
    QUOTED_TOOL,
])
async def test_a_local_model_is_never_sent_a_schema_that_would_crash_its_server(tmp_path, asked):
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "local", "litellm_params": {"model": "openai/smol"},
        "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28434}}}]}))
    snap = ProviderRegistry(path, dict).snapshot
    sent = Recording()
    dispatcher = RetryingDispatcher(Cooldowns(), passthrough=sent)
    body = {"model": "local", "messages": [{"role": "user", "content": "hi"}], **asked}
    with pytest.raises(UpstreamClientError) as refused:
        await dispatcher.complete(Call(targets=[snap.models["local"]], stream=False, router=snap.router, body=body))
    assert refused.value.status == 400 and refused.value.unfit == "untranslatable"
    assert "cannot parse" in refused.value.message and sent.bodies == []
    fine = {"model": "local", "messages": body["messages"],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": PLAIN}}}
    await dispatcher.complete(Call(targets=[snap.models["local"]], stream=False, router=snap.router, body=fine))
    assert len(sent.bodies) == 1


@pytest.mark.parametrize("asked", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ENUM_20K}}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": ENUM_20K}}],
     "tool_choice": {"type": "function", "function": {"name": "f"}}},
])
async def test_a_schema_past_openai_s_bounds_is_not_sent_to_a_local_model_another_answers(tmp_path, asked):
    """An enum of 20,000 values (a 0.3 MB body) held the local model 30 s, every other client
    waiting as long: it is refused as a schema llama.cpp cannot parse is, and a routed request
    goes to the next model."""
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "local", "litellm_params": {"model": "openai/smol"},
         "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28435}}},
        {"model_name": "remote", "litellm_params": {"model": "openai/gpt", "api_base": "http://127.0.0.1:9/v1",
                                                    "api_key": "k"}}]}))
    snap = ProviderRegistry(path, dict).snapshot
    sent = Recording()
    dispatcher = RetryingDispatcher(Cooldowns(), passthrough=sent)
    body = {"model": "local", "messages": [{"role": "user", "content": "hi"}], **asked}
    started = time.monotonic()
    with pytest.raises(UpstreamClientError) as refused:
        await dispatcher.complete(Call(targets=[snap.models["local"]], stream=False, router=snap.router, body=body))
    assert refused.value.status == 400 and refused.value.unfit == "untranslatable"
    assert refused.value.body()["error"]["code"] == "untranslatable_request"
    assert "more than 1,000 enum values" in refused.value.message and sent.bodies == []
    assert time.monotonic() - started < 1
    routed = await dispatcher.complete(Call(targets=[snap.models["local"], snap.models["remote"]], stream=False,
                                            router=snap.router, body={**body, "model": "auto"}))
    assert routed.model == "remote" and routed.failed == [("local", "untranslatable")]
    assert len(sent.bodies) == 1 and not dispatcher.cooldowns.cooling("local")


@pytest.mark.parametrize("written", [
    {"name": "get_w:", "arguments": '{"city": "Paris"}'},  # chatml-function-calling's own, wrong
    None,  # or none at all, for two calls
])
async def test_a_legacy_call_is_made_of_the_first_tool_call_not_the_server_s_copy(tmp_path, written):
    """With a --chat_format such as chatml-function-calling, the server writes function_call with
    a wrong name (or none for two calls): a legacy client got `get_w:` or no call it could read."""
    import json

    calls = [{"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}
             for n, name in enumerate(["get_w", "get_w"])]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    if written is not None:
        message["function_call"] = written
    whole = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "smol", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": message}]}).encode()
    answered = json.loads(await _asked_through_the_pass_through(tmp_path, b"application/json", whole, stream=False,
                                                                **ASKED["functions"]))
    choice = answered["choices"][0]
    assert choice["message"]["function_call"] == {"name": "get_w", "arguments": '{"city": "Paris"}'}
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "function_call"


@pytest.mark.parametrize("form", ["tools", "functions"])
async def test_a_local_model_s_whole_answer_has_its_call_in_the_form_asked_for(tmp_path, form):
    """llama-cpp-python writes a call both as `tool_calls` and as the legacy `function_call`;
    OpenAI answers `tools` with the one and legacy `functions` with the other: a client reading
    both acts on the call twice."""
    import json

    call = {"id": "call__0_get_w", "type": "function", "function": {"name": "get_w", "arguments": '{"city": "Paris"}'}}
    whole = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "smol", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": None, "tool_calls": [call],
            "function_call": {"name": "get_w", "arguments": '{"city": "Paris"}'}}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}).encode()
    answered = await _asked_through_the_pass_through(tmp_path, b"application/json", whole, stream=False,
                                                     **ASKED[form])
    message = json.loads(answered)["choices"][0]["message"]
    if form == "tools":
        assert message["tool_calls"] == [call] and "function_call" not in message
    else:
        assert message["function_call"] == {"name": "get_w", "arguments": '{"city": "Paris"}'}
        assert "tool_calls" not in message and json.loads(answered)["choices"][0]["finish_reason"] == "function_call"


# llama-cpp-python's answer to a request its validation refuses: a 500, its traceback's last frame with it
VALIDATION_500 = json.dumps({"error": {"message": (
    "1 validation error:\n  {'type': 'less_than_equal', 'loc': ('body', 'mirostat_mode'), 'msg': 'Input should "
    "be less than or equal to 2', 'input': 7, 'ctx': {'le': 2}}\n\n  File \"/srv/venv/lib/python3.11/"
    "site-packages/llama_cpp/server/app.py\", line 376, in create_chat_completion\n    POST /v1/chat/completions"),
    "type": "internal_server_error", "param": None, "code": None}}).encode()


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_local_server_s_validation_500_is_a_400_never_retried_nor_cooling_the_model(tmp_path, fast_path):
    """OpenAI answers a value out of range with a 400; llama-cpp-python's server with a 500 and its
    traceback, which went to the client as a 502 after two retries, and three such requests put the
    model in cooldown for everyone."""
    from proxy.errors import AllUpstreamsFailed
    from support.raw_upstream import raw_upstream

    asked = []

    def respond(request):
        asked.append(request)
        if request["model"] == "gpt":
            body = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt", "choices": [{
                "index": 0, "finish_reason": "stop", "logprobs": None,
                "message": {"role": "assistant", "content": "Hi"}}]}).encode()
            status = b"200 OK"
        else:
            body, status = (VALIDATION_500 if request.get("mirostat_mode") != 1 else
                            b'{"error": {"message": "boom", "type": "internal_server_error"}}'), b"500 Internal Server Error"
        return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    with raw_upstream(respond) as url:
        path = tmp_path / "providers.yaml"
        path.write_text(yaml.safe_dump({"model_list": [
            {"model_name": "smol", "litellm_params": {"model": "openai/smol", "api_base": url},
             "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28436}, "fast_path": fast_path}},
            {"model_name": "remote", "litellm_params": {"model": "openai/gpt", "api_base": url}}],
            "router_settings": {"num_retries": 2, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.02,
                                "allowed_fails": 3}}))
        snap = ProviderRegistry(path, dict).snapshot
        passthrough = PassThrough()
        dispatcher = RetryingDispatcher(Cooldowns(), passthrough=passthrough)
        try:
            def call(*targets, **fields):
                return Call(targets=[snap.models[t] for t in targets], stream=False, router=snap.router,
                            body={"model": targets[0], "messages": [{"role": "user", "content": "hi"}], **fields})

            for mode in (7, 8, 9):  # three distinct requests, as three clients' would be
                with pytest.raises(UpstreamClientError) as refused:
                    await dispatcher.complete(call("smol", mirostat_mode=mode))
                error = refused.value.body()["error"]
                assert refused.value.status == 400 and error["type"] == "invalid_request_error"
                assert error["code"] == "untranslatable_request" and error["param"] == "mirostat_mode"
                assert error["message"] == ("model smol cannot take this request: its server refused "
                                            "mirostat_mode: Input should be less than or equal to 2")
            assert len(asked) == 3 and not dispatcher.cooldowns.cooling("smol")  # not retried, not cooled
            routed = await dispatcher.complete(call("smol", "remote", mirostat_mode=7))
            assert routed.model == "remote" and routed.failed == [("smol", "untranslatable")]
            with pytest.raises(AllUpstreamsFailed):  # any other 500 of its server is still its failure
                await dispatcher.complete(call("smol", mirostat_mode=1))
            assert len(asked) == 5 + 3
        finally:
            await passthrough.close()


async def _asked_through_the_pass_through(tmp_path, content_type: bytes, body: bytes, stream: bool,
                                          **asked) -> bytes:
    """What dispatch makes of ``body``, answered by a local model's server (a raw upstream in its
    place) through the real pass-through, to a request with ``asked`` in it: the answer's bytes,
    a stream's joined."""
    from support.raw_upstream import raw_upstream

    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
    with raw_upstream(lambda request: answer) as url:
        path = tmp_path / "providers.yaml"
        path.write_text(yaml.safe_dump({"model_list": [{
            "model_name": "smol", "litellm_params": {"model": "openai/smol", "api_base": url},
            "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28433}}}]}))
        snap = ProviderRegistry(path, dict).snapshot
        passthrough = PassThrough()
        try:
            reply = await RetryingDispatcher(Cooldowns(), passthrough=passthrough).complete(Call(
                targets=[snap.models["smol"]], stream=stream, router=snap.router,
                body={"model": "smol", "messages": [{"role": "user", "content": "Weather in Paris?"}], **asked}))
            return b"".join([c async for c in reply.chunks]) if stream else reply.body
        finally:
            await passthrough.close()
