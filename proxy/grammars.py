"""The grammars a request makes a local model's server build, checked before it is sent there.

llama-cpp-python's server turns a JSON schema into a llama.cpp grammar: a ``response_format``'s
schema, and the parameters of a tool the request forces (``tool_choice`` naming a function, or the
legacy ``function_call``). Its converter writes grammars llama.cpp cannot parse for ordinary
schemas (a ``pattern`` with ``\\d``, a property name or an ``enum`` value holding a ``"``), and the
server does not check what llama.cpp returns: it crashes (a segfault), and with it the model for
every client, streams in flight included. So each such grammar is built and parsed first in a
throwaway process (``python -m proxy.grammars``, about 0.2 s: llama.cpp's own parser, on the
built-in model's vocabulary, which a grammar of a schema never refers to), once per schema: the
verdicts are remembered. A request whose grammar llama.cpp refuses, or that could not be checked,
is refused (``why_not``) instead of sent.

Owns: which schemas of a request become grammars, and the check. Does not know: dispatch.
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


def request_schemas(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(what, schema as the server dumps it)`` for each schema of ``body`` (in the form
    ``proxy.localserver.llama_cpp_request`` gives it) that the server makes a grammar of."""
    found = []
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_object" and fmt.get("schema") is not None:
        found.append(("response_format's schema", fmt["schema"]))
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        for tool in body.get("tools") or ():
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if isinstance(function, Mapping) and function.get("name") == name and "parameters" in function:
                found.append((f"the parameters of tool {name!r}", function["parameters"]))
    call = body.get("function_call")
    if isinstance(call, Mapping):
        for function in body.get("functions") or ():
            if isinstance(function, Mapping) and function.get("name") == call.get("name") \
                    and "parameters" in function:
                found.append((f"the parameters of function {call.get('name')!r}", function["parameters"]))
    return [(what, json.dumps(schema)) for what, schema in found]


class GrammarCheck:
    """``why_not(body)``: why llama-cpp-python's server cannot take ``body``'s schemas, or None."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S, python: str = sys.executable):
        self.timeout_s, self.python = timeout_s, python
        self._verdicts: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self._lock = asyncio.Lock()  # one checking process at a time: a burst of one new schema checks it once
        self._said_unchecked = False

    async def why_not(self, body: Mapping[str, Any]) -> str | None:
        schemas = request_schemas(body)
        if not schemas:
            return None
        keys = [hashlib.sha256(schema.encode()).hexdigest() for _, schema in schemas]
        unchecked: set[str] = set()  # no check can run here: sent as they are, and not remembered
        if any(key not in self._verdicts for key in keys):
            async with self._lock:
                todo = {key: schema for key, (_, schema) in zip(keys, schemas) if key not in self._verdicts}
                if todo:
                    for key, verdict in zip(todo, await self._check(list(todo.values()))):
                        if verdict == _SEND_UNCHECKED:
                            unchecked.add(key)
                        elif verdict != _UNCHECKED:
                            self._verdicts[key] = verdict
                            while len(self._verdicts) > REMEMBERED:
                                self._verdicts.popitem(last=False)
        for (what, _), key in zip(schemas, keys):
            if key in unchecked:
                continue
            if key not in self._verdicts:
                return f"{what} could not be checked against its server's grammar parser (in {self.timeout_s:g} s)"
            self._verdicts.move_to_end(key)
            if self._verdicts[key] is not None:
                return f"{what} makes a grammar its server cannot parse ({self._verdicts[key]})"
        return None

    async def _check(self, schemas: list[str]) -> list[str | None]:
        """One verdict per schema, in order: None (it parses), why not, or ``_UNCHECKED``."""
        from proxy.localserver import LocalServerError, builtin_gguf_path

        try:
            vocab = builtin_gguf_path()
        except LocalServerError as exc:  # a setup that cannot check: sent unchecked, as before
            self._cannot_check(exc.message)
            return [_SEND_UNCHECKED] * len(schemas)
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "proxy.grammars", str(vocab),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(json.dumps(schemas).encode()), self.timeout_s)
        except TimeoutError:
            return [_UNCHECKED] * len(schemas)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        verdicts = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        if proc.returncode is not None and proc.returncode < 0:  # killed by the schema after the last verdict
            verdicts += ["llama.cpp crashed on it"] + [_UNCHECKED] * (len(schemas) - len(verdicts) - 1)
        elif proc.returncode != 0:  # the check itself could not run (llama-cpp-python, the vocabulary)
            self._cannot_check(f"python -m proxy.grammars exited with status {proc.returncode}")
            verdicts += [_SEND_UNCHECKED] * (len(schemas) - len(verdicts))
        return verdicts[:len(schemas)]

    def _cannot_check(self, why: str) -> None:
        if not self._said_unchecked:
            self._said_unchecked = True
            log.warning("local models' grammars are not checked before they are sent: %s", why)


_UNCHECKED = "it could not be checked"  # in time: the request is refused, and it is checked again next time
_SEND_UNCHECKED = "no check can run"  # here at all: sent as it is, as before the check existed


def _main(gguf: str) -> int:
    """Read a JSON list of schemas on stdin; print one verdict per line as it is reached: null
    (llama.cpp parses the grammar the server would build) or why not."""
    import llama_cpp
    from llama_cpp import llama_grammar

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
