"""Routing accuracy when a frontend wraps the question in a retrieval template.

Open WebUI's retrieval (documents attached to a chat, web search) wraps the user's turn in a
template: instructions, the documents found in a ``<context>`` block, then the question. Older
versions replace the turn with it, the question last in ``<user_query>`` tags (``--shape
replaced``); newer ones put the template before the user's own turn, without the tags
(``--shape prepended``). The
proxy scores the start of the last user turn; this measures what reading the template's start
costs, against reading the question the template holds (what ``proxy.routing.instruction_text``
does now), on a seeded sample of a data set's test prompts, with the served scorer:

- ``plain``: the prompt as the data set gives it (a chat without retrieval);
- ``template start``: the wrapped turn read from its start, cut to the routing budget;
- ``question``: the wrapped turn as ``instruction_text`` reads it.

The template's wording is ours, laid out as Open WebUI's default is (the documents are filler
text on an unrelated subject, as retrieved passages often are to the scorer). Prints one table.

    .venv/bin/python bench/retrieval_routing.py --data ../shared/data/routerdc --limit 300
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def wrapped(question: str, shape: str = "replaced") -> str:
    if shape == "prepended":  # the template before the user's turn, the query not quoted
        return template_start() + "</context>\n\n" + question
    return template_start() + "</context>\n<user_query>\n" + question + "\n</user_query>\n"


def template_start() -> str:
    return ("### Task:\nAnswer the user's query with the documents below, citing a document by its "
            "id where the answer comes from it.\n### Guidelines:\n- If the documents do not hold "
            "the answer, say so and answer from what you know.\n- Answer in the language of the "
            "query.\n- Do not quote these instructions.\n<context>\n"
            + "".join(f'<source id="{i}">' + "The committee met on Tuesday to review the annual "
                      "budget, the staffing plan and the schedule for the coming year. " * 12
                      + "</source>\n" for i in range(1, 4)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/routerdc")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=512, help="router_settings.routing_context_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", choices=["replaced", "prepended"], default="replaced",
                        help="how the template holds the turn (see above)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import numpy as np
    import torch

    from proxy.routing import instruction_text
    from scorer import load_scorer
    from scorer.aptitude import builtin_profiles, suite_for
    from scorer.data import format_instruction, load_dataset
    from scorer.evaluation import eligible_rows, route

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    profiles = builtin_profiles(suite_for(args.data, "auto"))
    models = [m for m in data.models if m in profiles]
    part, _ = eligible_rows(data, models, limit=args.limit, seed=args.seed)
    correct = part.correct_matrix()
    plain = [format_instruction(p) for p in part.prompts]
    turns = [wrapped(q, args.shape) for q in plain]
    readings = {
        "plain": [instruction_text([{"role": "user", "content": q}], args.budget) for q in plain],
        "template start": [t[: args.budget * 4] for t in turns],
        "question": [instruction_text([{"role": "user", "content": t}], args.budget) for t in turns],
    }
    scorer = load_scorer()
    print(f"{args.data}: {len(plain)} test prompts, {len(models)} models, budget {args.budget} tokens")
    print("| reading | routing accuracy | distinct picks | seconds |")
    print("|---|---|---|---|")
    for name, texts in readings.items():
        started = time.perf_counter()
        picks = route(scorer, texts, models, profiles)
        acc = float(correct[np.arange(len(picks)), picks].mean())
        print(f"| {name} | {acc:.4f} | {len(set(picks.tolist()))} | {time.perf_counter() - started:.0f} |")
    best = correct.mean(axis=0)
    print(f"best single: {models[int(best.argmax())]} {best.max():.4f}; oracle {correct.max(axis=1).mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
