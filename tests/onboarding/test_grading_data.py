"""The extractor against the real model outputs recorded in ../shared/data/mmlu_pro (data-marked).

Every generation's extracted letter is compared with the ``pred`` the benchmark recorded for it.
Two figures: over all 60,160 generations, and over those whose recorded letter the text states at
all. The difference is 708 records, 696 of them Llama-3.1-8B-Instruct outputs (a repetition loop
cut at the token limit) that hold no standalone letter at all: the benchmark's harness recorded a
seeded random guess for them ('G' for 694), which no extractor can read from the text.
"""
from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter

import pytest

from scorer.grading import extract_answer

pytestmark = pytest.mark.data


def _n_options(folder) -> dict[str, int]:
    with gzip.open(folder / "prompts.jsonl.gz", "rt", encoding="utf-8") as fh:
        return {p["id"]: len(p["options"]) for p in map(json.loads, fh)}


def _no_letter_shares(folder) -> dict[str, float]:
    """Per model, the share of its recorded generations from which the extractor reads no letter."""
    n_options = _n_options(folder)
    total, none = Counter(), Counter()
    with gzip.open(folder / "generations.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            g = json.loads(line)
            total[g["model"]] += 1
            none[g["model"]] += extract_answer(g["text"], n_options[g["prompt_id"]]) is None
    return {m: none[m] / total[m] for m in total}


def test_no_zoo_model_s_recorded_answers_would_be_flagged_as_misread(shared_data):
    """Onboarding flags a profile whose answers state no letter more often than NO_LETTER_SHARE; the
    models the scorer learned from, asked as the data was, must all stay under it (and the status's
    reason quotes their range)."""
    from proxy.onboarding import NO_LETTER_SHARE

    shares = _no_letter_shares(shared_data / "mmlu_pro")
    print("\nno letter read, per model: " + ", ".join(f"{m} {v:.1%}" for m, v in sorted(shares.items())))
    assert len(shares) == 5
    assert 0.08 < min(shares.values()) and max(shares.values()) < 0.24 < NO_LETTER_SHARE


def _agreement(folder):
    n_options = _n_options(folder)
    preds = {}
    with gzip.open(folder / "predictions.csv.gz", "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            preds[(row["prompt_id"], row["model"])] = row["pred"]
    total = agree = stated = agree_stated = 0
    per_model: Counter = Counter()
    with gzip.open(folder / "generations.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            g = json.loads(line)
            recorded = preds[(g["prompt_id"], g["model"])]
            got = extract_answer(g["text"], n_options[g["prompt_id"]]) or ""
            ok = got == recorded
            total += 1
            agree += ok
            if recorded == "" or re.search(rf"(?<![A-Za-z0-9]){recorded}(?![A-Za-z0-9])", g["text"]):
                stated += 1
                agree_stated += ok
                per_model[g["model"]] += not ok
    return total, agree, stated, agree_stated, per_model


def test_extractor_agrees_with_recorded_predictions(shared_data):
    total, agree, stated, agree_stated, misses = _agreement(shared_data / "mmlu_pro")
    print(f"\nextractor vs recorded pred: {agree}/{total} = {agree / total:.4f} over all generations; "
          f"{agree_stated}/{stated} = {agree_stated / stated:.4f} where the text states the "
          f"recorded letter; misses by model: {dict(misses)}")
    assert total == 60160
    assert agree_stated / stated >= 0.99
    assert agree / total >= 0.98
    assert total - stated <= 710  # only the harness's guesses on letter-free texts are set aside
