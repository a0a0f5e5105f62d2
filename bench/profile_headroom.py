"""How much can a router that knows only subject-level ability gain over the best single model?

Model-SAT sees a model only through its aptitude profile (accuracy on 50 subject tasks). This script
measures, on a data set's test split, simple routers that use exactly that kind of knowledge with
no learning at all, next to the best single model and the oracle:

- ``profile-lookup``: the model whose *aptitude profile* is highest on the question's own subject
  (the task matching its MMLU subject; questions of other sources go to the best profile mean);
- ``subject-best``: the model with the best *train-split* accuracy on the question's subject (all
  train questions of that subject, not only the 20 of the suite);
- ``category-best``: the same over the data set's coarser ``category``.

If these stay near the best single model, the headroom a capability-profile router can reach on this
zoo is small, whatever its architecture. Nothing is tuned on ``test``.

    python bench/profile_headroom.py --data ../shared/data/mmlu_pro --zoo small
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from scorer.aptitude import load_suite, profile_from_outcomes, subject_of
from scorer.data import data_root, load_dataset

ZOOS = {
    "small": ["Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "gemma-7b", "Qwen1.5-7B-Chat",
              "Mistral-7B-Instruct-v0.2"],
    "mixed": ["Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "Yi-34B", "Qwen1.5-72B-Chat",
              "Meta-Llama-3-70B", "DeepSeek-Coder-V2", "jamba-1.5-large", "c4ai-command-r-v01"],
}


def _best_by(key, prompts, correct: np.ndarray) -> dict[str, int]:
    rows = defaultdict(list)
    for i, p in enumerate(prompts):
        rows[key(p)].append(i)
    return {k: int(np.nanargmax(np.nanmean(correct[r], axis=0))) for k, r in rows.items()}


def headroom(data_dir, zoo: list[str], suite_name: str) -> dict:
    data, suite = load_dataset(data_dir), load_suite(suite_name)
    train, test = data.split("train").with_models(zoo), data.split("test").with_models(zoo)
    c_test = test.correct_matrix()
    keep = ~np.isnan(c_test).any(axis=1)  # the evaluation harness's rule: all zoo outcomes known
    c_test = c_test[keep]
    prompts = [p for p, k in zip(test.prompts, keep) if k]
    c_train = train.correct_matrix()
    overall = int(np.nanargmax(np.nanmean(c_train, axis=0)))
    profiles = [profile_from_outcomes(suite, train, m) for m in zoo]
    means = [np.mean(list(p.values())) for p in profiles]
    by_subject = _best_by(subject_of, train.prompts, c_train)
    by_category = _best_by(lambda p: p.category, train.prompts, c_train)

    def lookup(p) -> int:
        task = subject_of(p)
        if task is not None and all(task in prof for prof in profiles):
            return int(np.argmax([prof[task] for prof in profiles]))
        return int(np.argmax(means))

    picks = {
        "profile-lookup": [lookup(p) for p in prompts],
        "subject-best": [by_subject.get(subject_of(p), overall) for p in prompts],
        "category-best": [by_category.get(p.category, overall) for p in prompts],
    }
    rows = np.arange(len(prompts))
    single = c_test.mean(axis=0)
    return {
        "n": len(prompts),
        "best_single": {"model": zoo[int(single.argmax())], "accuracy": round(float(single.max()), 4)},
        "oracle": round(float(c_test.max(axis=1).mean()), 4),
        **{k: round(float(c_test[rows, np.array(v)].mean()), 4) for k, v in picks.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(data_root() / "mmlu_pro"))
    ap.add_argument("--suite", default="mmlu_pro")
    ap.add_argument("--zoo", choices=sorted(ZOOS), action="append")
    a = ap.parse_args()
    for name in a.zoo or sorted(ZOOS):
        print(json.dumps({"zoo": name, **headroom(a.data, ZOOS[name], a.suite)}))


if __name__ == "__main__":
    main()
