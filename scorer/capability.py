"""The capability representation: a profile written out in words, and its perturbations.

Owns: the text of one task clause (``accuracy 85% on the task of "Economics, Market Dynamics,
..."``), the paper's whole sentence (``The model achieves accuracy 85% on the task of "...",
accuracy 40% on the task of "...", ...``), the per-task clauses the capability encoder reads, and the
random re-orderings / subsets of tasks used in training (``perturb``) and averaged at inference
(``orders``).

Does not know: how a profile was measured (``scorer.aptitude``), any tokenizer, encoder or model.
A task of the order that the profile has no accuracy for is skipped (a partial profile stays
usable); a profile task the suite does not know is an error.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

from scorer.aptitude import Suite

SENTENCE_PREFIX = "The model achieves "


def percent(accuracy: float) -> str:
    """``0.854`` -> ``85%`` (rounded half up to a whole percent, clamped to 0..100)."""
    value = min(max(float(accuracy), 0.0), 1.0)
    return f"{int(math.floor(value * 100 + 0.5))}%"


def task_clause(keywords: Sequence[str], accuracy: float) -> str:
    return f'accuracy {percent(accuracy)} on the task of "{", ".join(keywords)}"'


def _ordered_tasks(profile: Mapping[str, float], suite: Suite, order: Sequence[str] | None) -> list[str]:
    known = set(suite.task_ids)
    unknown = [t for t in profile if t not in known]
    if unknown:
        raise KeyError(f"profile tasks not in suite {suite.name!r}: {unknown[:5]}")
    order = suite.task_ids if order is None else order
    return [t for t in order if t in profile]


def clauses(profile: Mapping[str, float], suite: Suite, order: Sequence[str] | None = None) -> list[str]:
    """One clause per task, in ``order`` (default: the suite's order)."""
    keywords = suite.keywords()
    return [task_clause(keywords[t], profile[t]) for t in _ordered_tasks(profile, suite, order)]


def sentence(profile: Mapping[str, float], suite: Suite, order: Sequence[str] | None = None) -> str:
    """The paper's capability representation, as one sentence."""
    return SENTENCE_PREFIX + ", ".join(clauses(profile, suite, order)) + "."


def _shuffled(items: list[str], rng) -> list[str]:
    if hasattr(rng, "sample"):  # random.Random
        return rng.sample(items, len(items))
    return [items[i] for i in rng.permutation(len(items))]  # numpy Generator


def _randint(rng, low: int, high: int) -> int:
    if hasattr(rng, "randint"):  # random.Random: inclusive
        return rng.randint(low, high)
    return int(rng.integers(low, high + 1))


def perturb(task_ids: Sequence[str], rng, min_frac: float = 0.5) -> list[str]:
    """A random order of a random subset of at least ``ceil(min_frac * n)`` tasks (training).

    ``rng`` is a ``random.Random`` or a ``numpy.random.Generator``.
    """
    items = list(task_ids)
    if not items:
        return []
    low = max(1, min(len(items), math.ceil(min_frac * len(items))))
    keep = _randint(rng, low, len(items))
    return _shuffled(items, rng)[:keep]


def orders(task_ids: Sequence[str], n: int = 2, seed: int = 0) -> list[list[str]]:
    """``n`` deterministic random re-orderings of all tasks (averaged over at inference)."""
    rng = random.Random(seed)
    items = list(task_ids)
    return [rng.sample(items, len(items)) for _ in range(n)]


__all__ = ["SENTENCE_PREFIX", "clauses", "orders", "percent", "perturb", "sentence", "task_clause"]
