"""Grammars a request makes a local model's server build are parsed first, in a process of their
own: llama-cpp-python's converter writes grammars llama.cpp cannot parse for everyday JSON schemas,
and its server then crashes, taking the model down for every client."""
from __future__ import annotations

import asyncio
import json
import stat
import time

import pytest

from proxy.grammars import GrammarCheck, past_bounds, request_schemas
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


def _whats(body, every_tool=False):
    return [what for what, _ in request_schemas(body, every_tool)]


def test_the_schemas_the_server_makes_grammars_of_resolved_as_it_resolves_them():
    assert _whats(_fmt(PLAIN)) == ["response_format's schema"]
    assert _whats(_tool(PLAIN)) == ["the parameters of tool 'f'"]
    assert _whats(_tool(PHONE, forced=False)) == []  # "auto": no grammar of its parameters
    assert _whats(_tool(PHONE, forced=False), every_tool=True) == [  # a --chat_format's handler
        "the parameters of tool 'f'", "the parameters of tool 'g'"]
    legacy = {"functions": [{"name": "f", "parameters": PLAIN}], "function_call": {"name": "f"}}
    assert _whats(legacy) == ["the parameters of tool 'f'"]
    # legacy functions replace tools, and a function_call naming one is the tool_choice: the
    # server's own resolution, which two mixed forms got past the check by
    mixed = {"functions": [{"name": "f", "parameters": PHONE}], "tool_choice": {"type": "function",
                                                                                "function": {"name": "f"}}}
    assert [json.loads(s) for _, s in request_schemas(mixed)] == [PHONE]
    other = {**_tool(PLAIN, forced=False), "function_call": {"name": "g"}}
    assert [json.loads(s) for _, s in request_schemas(other)] == [PHONE]
    twice = {"tools": [{"type": "function", "function": {"name": "f", "parameters": PHONE}},
                       {"type": "function", "function": {"name": "f", "parameters": PLAIN}}],
             "tool_choice": {"type": "function", "function": {"name": "f"}}}
    assert [json.loads(s) for _, s in request_schemas(twice)] == [PHONE]  # the first of that name
    assert request_schemas({"response_format": {"type": "json_object"}}) == []
    for shape in (5, True, "x", [5], [{"function": 5}]):  # not a 500: llama.cpp's own refusal comes
        assert request_schemas({"tools": shape, "tool_choice": {"type": "function", "function": {"name": "f"}},
                                "functions": shape, "function_call": {"name": "f"}}) == []


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


async def test_a_schema_that_crashes_the_check_is_refused_and_the_ones_after_it_checked(tmp_path):
    # the first process answers one schema then dies; the next checks what was left
    runs = tmp_path / "runs"
    check = GrammarCheck(python=_fake_python(tmp_path, f"echo run >> {runs}\n"
                                                       f"if [ $(wc -l < {runs}) -eq 1 ]; then echo null; kill -SEGV $$; fi\n"
                                                       "echo null\n"))
    three = {**_fmt(PLAIN), **_tool(QUOTED, forced=False), "functions": None}
    assert await check.why_not(three, every_tool=True) is not None  # the tool that crashed it
    assert await check.why_not(_fmt(PLAIN)) is None  # the first one's verdict, remembered
    assert "crashed" in await check.why_not(_tool(QUOTED))
    assert await check.why_not(_tool(PHONE, forced=False), every_tool=True) is None  # checked after it
    assert len(runs.read_text().split()) == 2


async def test_new_schemas_waiting_at_once_are_checked_together_not_one_process_each(tmp_path):
    runs = tmp_path / "runs"
    check = GrammarCheck(python=_fake_python(tmp_path, f"echo run >> {runs}\nsleep 0.3\n"
                                                       "for i in 1 2 3 4 5 6 7 8 9 10; do echo null; done\n"))
    schemas = [{"type": "object", "properties": {f"p{n}": {"type": "string"}}} for n in range(10)]
    started = time.perf_counter()
    assert await asyncio.gather(*(check.why_not(_fmt(schema)) for schema in schemas)) == [None] * 10
    assert len(runs.read_text().split()) == 2 and time.perf_counter() - started < 2.5  # not 10 x 0.3 s


async def test_a_check_that_cannot_finish_in_time_refuses_the_request_and_is_not_remembered(tmp_path):
    check = GrammarCheck(timeout_s=0.3, python=_fake_python(tmp_path, "sleep 5\n"))
    assert "could not be checked" in await check.why_not(_fmt(PLAIN))
    check.python = _fake_python(tmp_path, "echo null\n")
    assert await check.why_not(_fmt(PLAIN)) is None


async def test_where_no_check_can_run_requests_are_sent_as_before(tmp_path, caplog):
    check = GrammarCheck(python=_fake_python(tmp_path, "exit 3\n"))  # llama-cpp-python missing
    assert await check.why_not(_fmt(PHONE)) is None
    assert "not checked before they are sent: llama-cpp-python is not installed" in caplog.text


async def test_a_vocabulary_that_cannot_be_read_again_and_again_turns_the_check_off(tmp_path, caplog):
    """A damaged vocabulary is no passing failure: every schema request was refused for good. A
    moment out of memory reads the same once, so it takes three runs in a row."""
    check = GrammarCheck(python=_fake_python(tmp_path, "exit 2\n"))
    for _ in range(2):
        refused = await check.why_not(_fmt(PHONE))
        assert "could not be checked" in refused and "(status 2)" in refused and "30 s" not in refused
    assert await check.why_not(_fmt(PHONE)) is None and check.disabled == "llama.cpp cannot read the vocabulary"
    assert "not checked before they are sent: llama.cpp cannot read the vocabulary" in caplog.text


async def test_a_check_that_fails_once_is_not_given_up_for_good(tmp_path):
    """One failure of the checking process (a moment out of memory) turned the check off for
    the proxy's life: a schema that crashes the server then went through."""
    runs = tmp_path / "runs"
    check = GrammarCheck(python=_fake_python(tmp_path, f"echo run >> {runs}\n"
                                                       f"if [ $(wc -l < {runs}) -eq 1 ]; then exit 1; fi\n"
                                                       'echo \'"llama.cpp refuses the grammar"\'\n'))
    assert "could not be checked" in await check.why_not(_fmt(PHONE))  # this once: refused
    assert check.disabled is None
    assert "cannot parse" in await check.why_not(_fmt(PHONE))  # checked the next time


async def test_a_request_of_many_crashing_schemas_holds_the_check_a_bounded_time(tmp_path):
    runs = tmp_path / "runs"
    check = GrammarCheck(python=_fake_python(tmp_path, f"echo run >> {runs}\nkill -SEGV $$\n"))
    many = {"tools": [{"type": "function", "function": {"name": f"t{n}", "parameters": {"type": "string",
                                                                                        "maxLength": n}}}
                      for n in range(60)]}
    assert "crashed" in await check.why_not(many, every_tool=True)
    assert len(runs.read_text().split()) == 3  # not 60 processes of 0.3 s behind one lock


def _enum(n):
    return {"type": "object", "properties": {"v": {"enum": [f"value-{i}" for i in range(n)]}}, "required": ["v"]}


def _nested(levels):
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _required(properties):
    return {"type": "object", "properties": properties, "required": list(properties)}


@pytest.mark.parametrize("within, past", [
    (_enum(1000), _enum(1001)),  # OpenAI's 1,000 enum values
    ({"anyOf": [{"const": n} for n in range(1000)]}, {"anyOf": [{"const": n} for n in range(1001)]}),
    ({"type": "string", "pattern": "^(" + "|".join(map(str, range(1001))) + ")$"},
     {"type": "string", "pattern": "^(" + "|".join(map(str, range(1002))) + ")$"}),
    ({"type": ["string", "null"]}, {"type": ["string"] * 1001}),
    ({"type": "object", "properties": {f"p{n}": {"type": "integer"} for n in range(1000)}},  # optional
     {"type": "object", "properties": {f"p{n}": {"type": "integer"} for n in range(1001)}}),
    (_required({f"p{n}": {"type": "integer"} for n in range(5000)}),  # OpenAI's 5,000 properties
     _required({f"p{n}": {"type": "integer"} for n in range(5001)})),
    (_nested(10), _nested(11)),  # OpenAI's 10 levels
    (_required({"x" * 120_000: {"type": "string"}}), _required({"x" * 120_001: {"type": "string"}})),
    ({"enum": ["x" * 60] * 250}, {"enum": ["x" * 60] * 251}),  # past 250 values, 15,000 characters
    # a definition counts wherever it is referenced: 30 x 30 x 30 alternatives in a 2 kB schema
    ({"$defs": {"a": {"anyOf": [{"const": n} for n in range(30)]},
                "b": {"anyOf": [{"$ref": "#/$defs/a"}] * 30}}, "$ref": "#/$defs/b"},
     {"$defs": {"a": {"anyOf": [{"const": n} for n in range(30)]},
                "b": {"anyOf": [{"$ref": "#/$defs/a"}] * 30},
                "c": {"anyOf": [{"$ref": "#/$defs/b"}] * 30}}, "$ref": "#/$defs/c"}),
])
def test_a_schema_past_openai_s_bounds_is_past_a_local_model_s(within, past):
    """llama.cpp's sampler follows every alternative of the grammar at every token: one client's
    enum of 20,000 values held the local model 30 s, and every other client waited as long."""
    assert past_bounds(within) is None
    assert past_bounds(past) is not None


def _nullable(n):
    return {f"field_{i}": {"anyOf": [{"type": "string"}, {"type": "null"}]} for i in range(n)}


@pytest.mark.parametrize("within, past", [
    # a strict schema of 600 Optional fields (what the Agents SDK sends for such a model): two
    # alternatives open at a time, 21 ms a token against 83 for one 1,000-value enum
    (_required(_nullable(600)), {"anyOf": [_required(_nullable(600)), {"enum": list(range(999))}]}),
    # enums one after another are sampled one at a time; side by side in a union, together
    (_required({"a": {"enum": list(range(1000))}, "b": {"enum": list(range(1000))}}),
     {"anyOf": [{"enum": list(range(500))}, {"enum": list(range(501))}]}),
])
def test_the_alternatives_bounded_are_those_open_at_once(within, past):
    """Counting every alternative of the schema in all refused ordinary large strict schemas
    (501 nullable fields) that cost less to sample than a small one."""
    assert past_bounds(within) is None
    assert "open at once" in past_bounds(past)


def test_a_recursive_schema_is_measured_once_around():
    tree = {"$defs": {"node": _required({"name": {"type": "string"},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}})},
            "$ref": "#/$defs/node"}
    assert past_bounds(tree) is None
    chain = {"$defs": {f"d{n}": {"$ref": f"#/$defs/d{n + 1}"} for n in range(5000)}, "$ref": "#/$defs/d0"}
    assert "too deeply" in past_bounds(chain)


async def test_a_schema_past_the_bounds_is_refused_before_any_check(tmp_path):
    runs = tmp_path / "runs"
    check = GrammarCheck(python=_fake_python(tmp_path, f"echo run >> {runs}\necho null\n"))
    started = time.perf_counter()
    refused = await check.why_not(_fmt(_enum(20_000)))
    assert refused.startswith("response_format's schema is past the bounds OpenAI sets")
    assert "more than 1,000 enum values" in refused
    assert "the parameters of tool 'f'" in await check.why_not(_tool(_enum(20_000)))
    assert not runs.exists() and time.perf_counter() - started < 0.5
    assert await check.why_not(_fmt(_enum(1000))) is None and runs.exists()  # within them: checked
    check.disabled = "llama-cpp-python is not installed"  # and where no check runs, bounded all the same
    assert "more than 1,000 enum values" in await check.why_not(_fmt(_enum(20_000)))
