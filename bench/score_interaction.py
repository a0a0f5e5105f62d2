"""How much a Model-SAT checkpoint's ranking of models depends on the instruction.

Usage::

    python bench/score_interaction.py [--checkpoint PATH] [--data DIR] [--suite NAME]
                                      [--models M1,M2,...] [--per-dataset 20] [--threads 1]

A router can only beat the best single model if its scores for the candidates move with the
instruction. For ``--per-dataset`` seeded test prompts of each data set in DIR (every zoo model,
built-in profiles of the suite), this prints per data set: the mean score of each model, the
standard deviation across prompts of its score centred on the prompt's mean (0 = the instruction
shifts every candidate alike), and the share of prompts whose top model is not the data set's most
frequent pick. Scores of the form f(instruction) + g(profile) give zeros in both last columns.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", default=None, help="routing data folder (default: the shared routerdc)")
    p.add_argument("--suite", default=None, help="built-in profiles to read (default: the folder's name)")
    p.add_argument("--models", default=None)
    p.add_argument("--per-dataset", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    from scorer.aptitude import builtin_profiles
    from scorer.data import data_root, format_instruction, load_dataset
    from scorer.inference import ModelSATScorer

    torch.set_num_threads(a.threads)
    folder = Path(a.data) if a.data else data_root() / "routerdc"
    data = load_dataset(folder)
    profiles = builtin_profiles(a.suite or folder.name)
    models = a.models.split(",") if a.models else [m for m in data.models if m in profiles]
    scorer = ModelSATScorer.load(a.checkpoint)
    rng = np.random.default_rng(a.seed)
    by_dataset: dict[str, list] = {}
    for prompt in data.prompts:
        if prompt.split == "test":
            by_dataset.setdefault(prompt.dataset, []).append(prompt)
    short = [m.split("/")[-1].split("--")[-1][:14] for m in models]
    print(f"checkpoint: {a.checkpoint or 'default'}; {folder.name}; {a.per_dataset} test prompts per data set")
    print("| data set | " + " | ".join(short) + " | centred std (mean) | off the modal pick |")
    print("|---" * (len(models) + 3) + "|")
    for name, prompts in sorted(by_dataset.items()):
        picked = rng.choice(len(prompts), min(a.per_dataset, len(prompts)), replace=False)
        rows = []
        for i in picked:
            scores = scorer.score(format_instruction(prompts[i]), {m: profiles[m] for m in models})
            rows.append([scores[m] for m in models])
        s = np.array(rows)
        centred = s - s.mean(axis=1, keepdims=True)
        top = s.argmax(axis=1)
        off = float(np.mean(top != np.bincount(top).argmax()))
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in s.mean(axis=0))
              + f" | {centred.std(axis=0).mean():.3f} | {off:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
