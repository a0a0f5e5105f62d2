"""Grammars a request makes a local model's server build are parsed first, in a process of their
own: llama-cpp-python's converter writes grammars llama.cpp cannot parse for everyday JSON schemas,
and its server then crashes, taking the model down for every client."""
from __future__ import annotations

import stat
import time

import pytest

from proxy.grammars import GrammarCheck, request_schemas
from proxy.localserver import llama_cpp_available

PHONE = {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"}}}
QUOTED = {"type": "object", "properties": {'say "hi"': {"type": "string"}}}
PLAIN = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
real = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")


def _fmt(schema):
    return {"response_format": {"type": "json_object", "schema": schema}}


def _tool(schema, forced=True):
    body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}},
                      {"type": "function", "function": {"name": "g", "parameters": PHONE}}]}
    if forced:
        body["tool_choice"] = {"type": "function", "function": {"name": "f"}}
    return body


def test_the_schemas_the_server_makes_grammars_of():
    assert [what for what, _ in request_schemas(_fmt(PLAIN))] == ["response_format's schema"]
    assert [what for what, _ in request_schemas(_tool(PLAIN))] == ["the parameters of tool 'f'"]
    assert request_schemas(_tool(PHONE, forced=False)) == []  # "auto": no grammar of its parameters
    legacy = {"functions": [{"name": "f", "parameters": PLAIN}], "function_call": {"name": "f"}}
    assert [what for what, _ in request_schemas(legacy)] == ["the parameters of function 'f'"]
    assert request_schemas({"response_format": {"type": "json_object"}}) == []


@real
async def test_a_schema_llama_cpp_cannot_parse_is_named_and_a_good_one_passes(monkeypatch):
    check = GrammarCheck()
    assert "makes a grammar its server cannot parse" in await check.why_not(_fmt(PHONE))
    assert "the parameters of tool 'f'" in await check.why_not(_tool(QUOTED))
    assert await check.why_not(_fmt(PLAIN)) is None
    spawned = []
    real_check = check._check

    async def counting(schemas):
        spawned.append(schemas)
        return await real_check(schemas)

    monkeypatch.setattr(check, "_check", counting)
    started = time.perf_counter()
    assert await check.why_not(_fmt(PHONE)) and await check.why_not(_fmt(PLAIN)) is None
    assert spawned == [] and time.perf_counter() - started < 0.05  # remembered: no process


def _fake_python(tmp_path, script: str) -> str:
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\ncat > /dev/null\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


async def test_a_schema_that_crashes_the_check_is_refused_and_the_next_checked_again(tmp_path):
    check = GrammarCheck(python=_fake_python(tmp_path, "echo null\nkill -SEGV $$\n"))
    both = {**_fmt(PLAIN), **_tool(QUOTED)}
    assert "crashed" in await check.why_not(both) and "tool 'f'" in await check.why_not(both)
    assert await check.why_not(_fmt(PLAIN)) is None  # the first one's verdict, remembered


async def test_a_check_that_cannot_finish_in_time_refuses_the_request_and_is_not_remembered(tmp_path):
    check = GrammarCheck(timeout_s=0.3, python=_fake_python(tmp_path, "sleep 5\n"))
    assert "could not be checked" in await check.why_not(_fmt(PLAIN))
    check.python = _fake_python(tmp_path, "echo null\n")
    assert await check.why_not(_fmt(PLAIN)) is None


async def test_where_no_check_can_run_requests_are_sent_as_before(tmp_path, caplog):
    check = GrammarCheck(python=_fake_python(tmp_path, "exit 1\n"))
    assert await check.why_not(_fmt(PHONE)) is None
    assert "not checked before they are sent" in caplog.text
