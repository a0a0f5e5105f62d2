"""How long would onboarding the built-in local model (SmolLM2-135M via llama-cpp-python) take here?

Starts the real local server the way the proxy does (proxy.localserver), asks it N aptitude questions
of the committed MMLU-Pro suite with the onboarding prompt and budget (scorer.grading, the
onboarding Options), and prints the time per question, tokens per second, the share of answers that
were cut off or gave no letter, and the projected wall time of the whole test (the llama.cpp server
answers one request at a time, so concurrency does not help on one CPU server).

    .venv/bin/python bench/local_onboarding_cost.py --n 8 --threads 2
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.localserver import (  # noqa: E402
    BUILTIN_SMOLLM2, LocalServer, LocalServerSpec, free_port, resolve_gguf)
from proxy.onboarding import Options  # noqa: E402
from proxy.questions import load_questions  # noqa: E402
from scorer.aptitude import load_suite  # noqa: E402
from scorer.grading import build_messages, extract_answer  # noqa: E402


def pick(ids: list[str], n: int) -> list[str]:
    step = max(1, len(ids) // n)
    return ids[::step][:n]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="questions to ask")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=Options().max_tokens)
    parser.add_argument("--data", default=os.environ.get("SATROUTE_ONBOARDING_DATA"),
                        help="mmlu_pro data folder (default: SATROUTE_ONBOARDING_DATA, else the shared data)")
    args = parser.parse_args()

    suite = load_suite("mmlu_pro")
    ids = pick(suite.question_ids, args.n)
    questions = load_questions(ids, "mmlu_pro", args.data, hub=False)
    spec = LocalServerSpec(model_path=resolve_gguf(BUILTIN_SMOLLM2), alias="smollm2",
                           port=free_port(), n_ctx=args.max_tokens + 1024,
                           n_threads=args.threads)
    server = LocalServer.for_spec(spec)
    t0 = time.perf_counter()
    await server.start()
    print(f"server ready in {time.perf_counter() - t0:.1f} s (threads={args.threads})")
    rows = []
    try:
        async with httpx.AsyncClient(timeout=1800, trust_env=False) as client:
            for q in questions:
                started = time.perf_counter()
                r = await client.post(f"{spec.api_base}/chat/completions", json={
                    "model": "smollm2", "temperature": Options().temperature,
                    "max_tokens": args.max_tokens,
                    "messages": build_messages(q.question, q.options, q.subject)})
                seconds = time.perf_counter() - started
                body = r.json()
                text = body["choices"][0]["message"]["content"]
                usage = body["usage"]
                letter = extract_answer(text, len(q.options))
                rows.append((seconds, usage["prompt_tokens"], usage["completion_tokens"],
                             body["choices"][0]["finish_reason"], letter, letter == q.answer))
                print(f"{q.id:>16}  {seconds:6.1f} s  prompt {usage['prompt_tokens']:4d}  "
                      f"completion {usage['completion_tokens']:4d}  "
                      f"finish {rows[-1][3]:>6}  answer {letter} (gold {q.answer})")
    finally:
        await server.stop()
    secs = [r[0] for r in rows]
    out_tokens = sum(r[2] for r in rows)
    total = len(suite.question_ids)
    mean = statistics.mean(secs)
    print(f"\n{len(rows)} questions: mean {mean:.1f} s, median {statistics.median(secs):.1f} s, "
          f"{out_tokens / sum(secs):.1f} completion tokens/s overall")
    print(f"cut off at max_tokens: {sum(r[3] == 'length' for r in rows)}/{len(rows)}; "
          f"no answer letter: {sum(r[4] is None for r in rows)}/{len(rows)}; "
          f"correct: {sum(r[5] for r in rows)}/{len(rows)}")
    print(f"projected aptitude test ({total} questions, one at a time): "
          f"{total * mean / 3600:.1f} h")


if __name__ == "__main__":
    asyncio.run(main())
