"""The grammars a request makes a local model's server build, checked before it is sent there.

llama-cpp-python's server turns a JSON schema into a llama.cpp grammar: a ``response_format``'s
schema, and the parameters of a tool the request forces (``tool_choice`` naming a function, or the
legacy ``function_call``). Its converter writes grammars llama.cpp cannot parse for ordinary
schemas (a ``pattern`` with ``\\d``, a property name or an ``enum`` value holding a ``"``), and the
server does not check what llama.cpp returns: it crashes (a segfault), and with it the model for
every client, streams in flight included. So each such grammar is built and parsed first in a
throwaway process (``python -m proxy.grammars``, about 0.3 s: llama.cpp's own parser, on the
built-in model's vocabulary, which a grammar of a schema never refers to), once per schema: the
verdicts are remembered. A request whose grammar llama.cpp refuses, or that could not be checked,
is refused (``why_not``) instead of sent; so is one whose schema is larger than OpenAI takes for
Structured Outputs (``past_bounds``): llama.cpp's sampler follows every alternative of a grammar at
once, at every token, and one client's enum of 20,000 values held the model 30 s (60,000: 138 s)
while every other client waited.

Owns: which schemas of a request become grammars, their bounds, and the check. Does not know:
dispatch.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import sys
from typing import Any, Mapping

log = logging.getLogger("satroute.dispatch")

CHECK_TIMEOUT_S = 30.0
REMEMBERED = 1024  # verdicts kept, by schema
MAX_CRASHES = 3  # checking processes a batch may crash (0.3 s each) before the rest waits for the next
# exit statuses of ``python -m proxy.grammars`` that say no check can run here, whatever the schema:
# llama-cpp-python is not installed (at once), or the vocabulary cannot be read (a damaged file;
# so once out of memory too: only after that many runs in a row); any other failure may pass
_SETUP_FAILURES = {3: "llama-cpp-python is not installed", 2: "llama.cpp cannot read the vocabulary"}
_SETUP_RUNS = {3: 1, 2: 3}


# What a local model takes of a JSON schema: OpenAI's bounds for Structured Outputs, counted so that
# they bound what sampling costs. The sampler follows, at each token, every alternative open at
# that point of the grammar; its cost grows with those, not with the schema's size: a 1,000-value
# enum took 83 ms a token against 25-37 ms for a small schema, while 600 nullable fields (two types
# each, one field after another) took 21 ms. So the 1,000 of OpenAI's enum values bounds the
# alternatives open at once: an enum's values, the branches of an anyOf or oneOf (with all they
# open in turn: 5,000 consts in an anyOf cost as much as 5,000 enum values), a list of types, a
# pattern's "|", and the optional properties of one object that may come next (900 cost about as
# much as 1,000 enum values). The other bounds are OpenAI's on the schema's size.
MAX_ALTERNATIVES = 1_000  # alternatives open at once
MAX_PROPERTIES = 5_000  # object properties, in all
MAX_NESTING = 10  # objects and arrays within one another
MAX_LENGTH = 120_000  # characters of property and definition names, enum and const values, patterns
LARGE_ENUM = 250  # an enum of more values than this...
MAX_LARGE_ENUM_LENGTH = 15_000  # ...has this many characters of string values at most


class _Past(Exception):
    """A schema's count passed one of the bounds (its message says which)."""


def past_bounds(schema: Any) -> str | None:
    """Why ``schema`` is larger than a local model takes (the ``MAX_*`` bounds above), or None.
    Counted as if each ``$ref`` to a ``#/...`` definition were written out where it stands (a
    reference back into a definition it is already inside counts nothing: a recursive schema),
    so references cannot multiply what the sampler follows unseen; each definition is measured
    once, and counting stops at the first bound passed."""
    names = 0
    for defs in ("$defs", "definitions"):
        found = schema.get(defs) if isinstance(schema, dict) else None
        names += sum(len(name) for name in found) if isinstance(found, dict) else 0
    try:
        _within(*_measure(schema, schema, {}, names))
    except _Past as exc:
        return str(exc)
    except RecursionError:
        return "its definitions refer to one another too deeply to be measured"
    return None


_NOTHING = (0, 0, 0, 0)


def _measure(node: Any, root: Any, measured: dict[int, tuple[int, int, int, int] | None],
             length: int = 0) -> tuple[int, int, int, int]:
    """``(alternatives open at once, properties, length, levels)`` of a schema and all below it,
    ``length`` counted from the given one (the root's definition names), raising ``_Past`` once
    one passes its bound; ``measured``: the sizes of the definitions measured so far, by id
    (None: being measured, further up)."""
    if not isinstance(node, dict):
        return _NOTHING
    if "$ref" in node:  # as the server's converter reads it: the reference alone
        target = _definition(root, node["$ref"])
        if target is None:  # one it cannot resolve: it falls back to its plain JSON grammar
            return _NOTHING
        if id(target) not in measured:
            measured[id(target)] = None
            measured[id(target)] = _measure(target, root, measured)
        return measured[id(target)] or _NOTHING
    # open at once: what starts the value (an enum's values, every branch, each type of a list,
    # a pattern's alternatives: added up), or, later in it, one property's value, one item, or
    # the optional properties that may come next (the most of these)
    starts = later = properties = levels = 0
    enum = node.get("enum")
    if isinstance(enum, list):
        starts += len(enum)
        _within(starts)
        strings = sum(len(v) for v in enum if isinstance(v, str))
        if len(enum) > LARGE_ENUM and strings > MAX_LARGE_ENUM_LENGTH:
            raise _Past(f"an enum of more than {LARGE_ENUM} values with more than "
                        f"{MAX_LARGE_ENUM_LENGTH:,} characters of strings")
        length += strings + sum(len(json.dumps(v)) for v in enum if not isinstance(v, str))
    if "const" in node:
        const = node["const"]
        length += len(const) if isinstance(const, str) else len(json.dumps(const))
    branches: list[Any] = []  # schemas of which the value is any one: all open at its start
    for union in ("anyOf", "oneOf"):
        if isinstance(node.get(union), list):
            branches += node[union]
    parts = node["allOf"] if isinstance(node.get("allOf"), list) else []  # all of them, merged
    starts += len(node["type"]) if isinstance(node.get("type"), list) else 0
    if isinstance(node.get("pattern"), str):
        starts += node["pattern"].count("|")
        length += len(node["pattern"])
    inside: list[Any] = []  # schemas of the values within it, one after another
    props = node.get("properties")
    if isinstance(props, dict):
        properties += len(props)
        required = node.get("required")
        required = set(r for r in required if isinstance(r, str)) if isinstance(required, list) else set()
        later = sum(name not in required for name in props)  # any of them may come next
        length += sum(len(name) for name in props)
        inside += props.values()
    for key in ("items", "prefixItems", "additionalProperties"):
        value = node.get(key)
        inside += value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    _within(max(starts, later), properties, length)
    for child, kind in [*((c, "branch") for c in branches), *((c, "part") for c in parts),
                        *((c, "inside") for c in inside)]:
        more = _measure(child, root, measured)
        if kind == "branch":
            starts += max(more[0], 1)
        else:
            later = max(later, more[0])
        properties, length = properties + more[1], length + more[2]
        levels = max(levels, more[3] + (kind == "inside"))
        _within(max(starts, later), properties, length, levels)
    return max(starts, later), properties, length, levels


def _within(alternatives: int, properties: int = 0, length: int = 0, levels: int = 0) -> None:
    """Raise ``_Past`` naming the first count past its bound."""
    for count, bound, what in (
            (alternatives, MAX_ALTERNATIVES, "enum values and other alternatives open at once "
                                             "(anyOf and oneOf branches with all they open, types "
                                             "in a list, a pattern's '|', an object's optional "
                                             "properties)"),
            (properties, MAX_PROPERTIES, "object properties in all"),
            (length, MAX_LENGTH, "characters in all of property and definition names, enum and const "
                                 "values, and patterns"),
            (levels, MAX_NESTING, "levels of objects and arrays within one another")):
        if count > bound:
            raise _Past(f"more than {bound:,} {what}")


def _definition(root: Any, ref: Any) -> Any:
    """What a ``#/...`` reference points at in ``root``, read as the server's converter reads it
    (no other reference resolves there: a remote one is never fetched); None for none."""
    if not (isinstance(ref, str) and ref.startswith("#/")):
        return None
    target = root
    for part in ref[2:].split("/"):
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target


def request_schemas(body: Mapping[str, Any], every_tool: bool = False) -> list[tuple[str, str]]:
    """``(what, schema as the server dumps it)`` for each schema of ``body`` (``schemas_of``)."""
    return [(what, json.dumps(schema)) for what, schema in schemas_of(body, every_tool)]


def schemas_of(body: Mapping[str, Any], every_tool: bool = False) -> list[tuple[str, Any]]:
    """``(what, schema)`` for each schema of ``body`` (in the form
    ``proxy.localserver.llama_cpp_request`` gives it) that the server makes a grammar of, resolved
    as its chat handler resolves them: legacy ``functions`` replace ``tools``, a ``function_call``
    naming one is the ``tool_choice``, and the first tool of that name is the one. ``every_tool``:
    every tool's parameters, whatever the choice (a ``--chat_format`` such as
    ``chatml-function-calling`` builds grammars of the tool the model picks)."""
    found = []
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_object" and fmt.get("schema") is not None:
        found.append(("response_format's schema", fmt["schema"]))
    tools = body.get("tools")
    functions = body.get("functions")
    if isinstance(functions, list):
        tools = [{"type": "function", "function": function} for function in functions]
    tools = [tool["function"] for tool in tools if isinstance(tool, Mapping)
             and isinstance(tool.get("function"), Mapping)] if isinstance(tools, list) else []
    choice = body.get("tool_choice")
    call = body.get("function_call")
    if isinstance(call, Mapping) and "name" in call:
        choice = {"type": "function", "function": {"name": call["name"]}}
    named = choice.get("function") if isinstance(choice, Mapping) else None
    name = named.get("name") if isinstance(named, Mapping) else None
    chosen = next((tool for tool in tools if tool.get("name") == name), None) if name is not None else None
    for tool in (tools if every_tool else [chosen] if chosen is not None else []):
        if "parameters" in tool:
            found.append((f"the parameters of tool {tool.get('name')!r}", tool["parameters"]))
    return found


class GrammarCheck:
    """``why_not(body)``: why llama-cpp-python's server cannot take ``body``'s schemas, or None."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S, python: str = sys.executable):
        self.timeout_s, self.python = timeout_s, python
        self._verdicts: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self._lock = asyncio.Lock()  # one checking process at a time: a burst of one new schema checks it once
        self._waiting: dict[str, str] = {}  # schemas requests wait to have checked, by key
        self.disabled: str | None = None  # why no check can run here: schemas are sent as they are
        self._failed_in_a_row = 0  # checking runs that ended in a setup failure, one after another
        self._trouble = "it could not be run"  # why the last schemas went unchecked, for the refusal

    async def why_not(self, body: Mapping[str, Any], every_tool: bool = False) -> str | None:
        found = schemas_of(body, every_tool)
        for what, schema in found:  # whether or not a check can run here
            past = past_bounds(schema)
            if past is not None:
                return (f"{what} is past the bounds OpenAI sets for Structured Outputs, which a "
                        f"local model keeps to: {past}")
        if not found or self.disabled is not None:
            return None
        schemas = [(what, json.dumps(schema)) for what, schema in found]
        keys = [hashlib.sha256(schema.encode()).hexdigest() for _, schema in schemas]
        mine = {key: schema for key, (_, schema) in zip(keys, schemas) if key not in self._verdicts}
        if mine:
            self._waiting.update(mine)
            async with self._lock:
                # everything waiting now, other requests' schemas too: one process for the lot
                todo = {k: v for k, v in {**self._waiting, **mine}.items() if k not in self._verdicts}
                for key in todo:
                    self._waiting.pop(key, None)
                if todo:
                    for key, verdict in zip(todo, await self._check(list(todo.values()))):
                        if verdict != _UNCHECKED:
                            self._verdicts[key] = verdict
                            while len(self._verdicts) > REMEMBERED:
                                self._verdicts.popitem(last=False)
        if self.disabled is not None:
            return None
        for (what, _), key in zip(schemas, keys):
            if key not in self._verdicts:
                return f"{what} could not be checked against its server's grammar parser: {self._trouble}"
            self._verdicts.move_to_end(key)
            if self._verdicts[key] is not None:
                return f"{what} makes a grammar its server cannot parse ({self._verdicts[key]})"
        return None

    async def _check(self, schemas: list[str]) -> list[str | None]:
        """One verdict per schema, in order: None (it parses), why not, or ``_UNCHECKED``. A schema
        that crashes the checking process is refused, and the ones after it checked in another."""
        from proxy.localserver import LocalServerError, builtin_gguf_path

        try:
            vocab = builtin_gguf_path()
        except LocalServerError as exc:  # a setup that cannot check: sent unchecked, as before
            self._cannot_check(exc.message)
            return [_UNCHECKED] * len(schemas)
        verdicts: list[str | None] = []
        crashes = 0
        while len(verdicts) < len(schemas):
            got, status = await self._run(str(vocab), schemas[len(verdicts):])
            verdicts += got
            if status is not None and status < 0:  # killed by the schema after its last verdict
                verdicts.append("llama.cpp crashed on it")
                crashes += 1
                if crashes < MAX_CRASHES:  # bounded: a request of many such tools holds no lock for long
                    continue
            else:
                self._failed_in_a_row = self._failed_in_a_row + 1 if status in _SETUP_FAILURES else 0
                if status in _SETUP_FAILURES and self._failed_in_a_row >= _SETUP_RUNS[status]:
                    self._cannot_check(_SETUP_FAILURES[status])  # no check can run here at all
                elif status is None:
                    self._trouble = f"it took longer than {self.timeout_s:g} s"
                elif status:  # this once (a process that could not start, out of memory): asked again next time
                    self._trouble = f"the check failed (status {status})"
                    log.warning("local models' grammar check failed (status %s); the requests it was "
                                "for are refused, and it is tried again for the next", status)
            break
        return (verdicts + [_UNCHECKED] * len(schemas))[:len(schemas)]

    async def _run(self, vocab: str, schemas: list[str]) -> tuple[list[str | None], int | None]:
        """The verdicts one checking process gave, and its exit status (None: out of time)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "proxy.grammars", vocab,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:  # out of processes or files for a moment: this batch only
            log.warning("local models' grammar check cannot start a process: %s", exc)
            return [], 1
        try:
            out, _ = await asyncio.wait_for(proc.communicate(json.dumps(schemas).encode()), self.timeout_s)
        except TimeoutError:
            return [], None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()], proc.returncode

    def _cannot_check(self, why: str) -> None:
        self.disabled = why
        log.warning("local models' grammars are not checked before they are sent: %s", why)


_UNCHECKED = "it could not be checked"  # in time: the request is refused, and it is checked again next time


def _main(gguf: str) -> int:
    """Read a JSON list of schemas on stdin; print one verdict per line as it is reached: null
    (llama.cpp parses the grammar the server would build) or why not."""
    try:
        import llama_cpp
        from llama_cpp import llama_grammar
    except ModuleNotFoundError as exc:
        if exc.name == "llama_cpp":  # not installed: no check can run here
            return 3
        raise  # anything else (a library that could not be mapped, out of memory): this once

    quiet = llama_cpp.llama_log_callback(lambda *args: None)  # kept referenced while llama.cpp may call it
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), params)
    if not model:
        return 2
    vocab = llama_cpp.llama_model_get_vocab(model)
    for schema in json.loads(sys.stdin.read()):
        try:
            grammar = llama_grammar.json_schema_to_gbnf(schema)
        except Exception:  # noqa: BLE001 (the server falls back to its plain JSON grammar then)
            grammar = llama_grammar.JSON_GBNF
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        print(json.dumps(None if sampler else "llama.cpp refuses the grammar"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
