"""scorer.capability: clause and sentence text, perturbations, inference orders."""
from __future__ import annotations

import random

import numpy as np
import pytest

from scorer.aptitude import Suite, Task
from scorer.capability import clauses, orders, percent, perturb, sentence, task_clause

SUITE = Suite("tiny", 1, (
    Task("econ", ("Economics", "Market Dynamics", "Supply", "Demand", "Elasticity"), ("q1",)),
    Task("bio", ("Biology", "Cells", "Genetics", "Ecology", "Evolution"), ("q2",)),
    Task("law", ("Law", "Contracts", "Torts", "Courts", "Procedure"), ("q3",)),
))


def test_clause_text():
    assert task_clause(["Economics", "Market Dynamics"], 0.85) == 'accuracy 85% on the task of "Economics, Market Dynamics"'
    assert percent(0.845) == "85%" and percent(0.0) == "0%" and percent(1.2) == "100%"


def test_sentence_in_suite_order_and_custom_order():
    profile = {"econ": 0.85, "bio": 0.4, "law": 1.0}
    assert sentence(profile, SUITE) == (
        'The model achieves accuracy 85% on the task of "Economics, Market Dynamics, Supply, Demand, Elasticity", '
        'accuracy 40% on the task of "Biology, Cells, Genetics, Ecology, Evolution", '
        'accuracy 100% on the task of "Law, Contracts, Torts, Courts, Procedure".')
    assert clauses(profile, SUITE, ["law", "econ"]) == [
        'accuracy 100% on the task of "Law, Contracts, Torts, Courts, Procedure"',
        'accuracy 85% on the task of "Economics, Market Dynamics, Supply, Demand, Elasticity"']


def test_partial_profile_skips_and_unknown_task_fails():
    assert len(clauses({"bio": 0.5}, SUITE)) == 1
    with pytest.raises(KeyError):
        clauses({"chemistry": 0.5}, SUITE)


def test_perturb_subset_and_order():
    ids = [f"t{i}" for i in range(50)]
    rng = random.Random(3)
    seen_sizes, seen_first = set(), set()
    for _ in range(200):
        out = perturb(ids, rng, min_frac=0.5)
        assert 25 <= len(out) <= 50 and len(set(out)) == len(out) and set(out) <= set(ids)
        seen_sizes.add(len(out))
        seen_first.add(out[0])
    assert len(seen_sizes) > 10 and len(seen_first) > 10
    assert perturb(ids, random.Random(1)) == perturb(ids, random.Random(1))
    out = perturb(ids, np.random.default_rng(0), min_frac=1.0)
    assert sorted(out) == sorted(ids) and out != ids


def test_orders_deterministic_permutations():
    ids = [f"t{i}" for i in range(10)]
    a = orders(ids, 2, seed=0)
    assert a == orders(ids, 2, seed=0) and len(a) == 2
    assert all(sorted(o) == sorted(ids) for o in a) and a[0] != a[1]
    assert orders(ids, 2, seed=1) != a
