"""Wall time of onboarding against an upstream with a fixed latency, versus the ideal.

Runs the real onboarding path (engine -> DispatchAsker -> RetryingDispatcher -> HTTP) for N aptitude
questions against the replay upstream (tests/support/replay_upstream.py, in its own process, as a
real upstream would be) answering every question after a fixed latency, at each concurrency, each
time into a fresh state store, and prints the wall time next to the ideal
``questions x latency / concurrency``.

    .venv/bin/python bench/onboarding_wall.py [--questions 1000] [--latency 0.5] [--concurrency 8,32]
        [--data ../shared/data/mmlu_pro] [--model Yi-34B]
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The repository first: tests/ holds folders named like the packages (tests/scorer is not scorer).
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from proxy.cooldown import Cooldowns  # noqa: E402
from proxy.dispatch import RetryingDispatcher  # noqa: E402
from proxy.onboarding import Onboarding, Options  # noqa: E402
from proxy.onboarding_service import DispatchAsker  # noqa: E402
from proxy.providers import ProviderRegistry  # noqa: E402
from proxy.questions import from_folder  # noqa: E402
from proxy.store import Store  # noqa: E402
from scorer.aptitude import Suite, Task, load_suite  # noqa: E402


def suite_of(n: int) -> Suite:
    """The first n questions of the mmlu_pro suite (task by task), as a suite of their own."""
    full, tasks, left = load_suite("mmlu_pro"), [], n
    for t in full.tasks:
        if left <= 0:
            break
        tasks.append(Task(t.id, t.keywords, t.question_ids[:left]))
        left -= len(tasks[-1].question_ids)
    if left > 0:
        raise SystemExit(f"the suite has only {n - left} questions")
    return Suite(f"{full.name}-first{n}", full.version, tuple(tasks))


async def one_run(suite: Suite, questions, url: str, model: str, concurrency: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "providers.yaml"
        config.write_text(yaml.safe_dump({
            "model_list": [{"model_name": model, "litellm_params": {"model": f"openai/{model}",
                                                                    "api_base": url}}],
            "router_settings": {"timeout_s": 30, "deadline_s": 60}}))
        registry = ProviderRegistry(config, dict)
        dispatcher = RetryingDispatcher(Cooldowns())
        with Store(Path(tmp) / "state") as store:
            engine = Onboarding(store, suite, questions, DispatchAsker(registry, dispatcher),
                                Options(concurrency=concurrency, spend_cap_usd=None))
            started = time.perf_counter()
            progress = await engine.run(model)
            wall = time.perf_counter() - started
        await dispatcher.close()
    return wall, f"{progress.status} {progress.done}/{progress.total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mmlu_pro"))
    parser.add_argument("--model", default="Yi-34B")
    args = parser.parse_args()
    suite = suite_of(args.questions)
    questions = from_folder(args.data, suite.question_ids)
    print(f"onboarding {len(questions)} questions, upstream latency {args.latency}s "
          f"(replay of {args.model}), real dispatch path over loopback HTTP")
    print("| concurrency | wall (s) | ideal q x latency / c (s) | overhead | result |")
    print("|---|---|---|---|---|")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "support.replay_upstream", "--data", args.data, "--models",
         args.model, "--latency", str(args.latency)], cwd=REPO / "tests", stdout=subprocess.PIPE,
        text=True)
    try:
        url = upstream.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit("the replay upstream did not start")
        for c in (int(x) for x in args.concurrency.split(",")):
            wall, result = asyncio.run(one_run(suite, questions, url, args.model, c))
            ideal = len(questions) * args.latency / c
            print(f"| {c} | {wall:.2f} | {ideal:.2f} | {100 * (wall / ideal - 1):+.1f}% | {result} |",
                  flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)

if __name__ == "__main__":
    main()
