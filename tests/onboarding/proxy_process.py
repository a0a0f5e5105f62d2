"""The real proxy app in a process of its own, with a per-subject profile-lookup scorer (e2e tests).

Settings come from the SATROUTE_* environment as for ``satroute serve``. The scorer stands in for
Model-SAT where a test needs routing it can predict: it finds the instruction's MMLU subject by its
exact question text in the routing data (``SATROUTE_TEST_PROMPTS``: a prompts.jsonl.gz) and scores
each candidate with its profile's accuracy on that subject's task (its mean accuracy when the subject
is not a task).

    python tests/onboarding/proxy_process.py      # serves until killed
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import uvicorn  # noqa: E402

from proxy.app import create_app  # noqa: E402
from proxy.httpserver import BoundedHttpToolsProtocol  # noqa: E402
from proxy.settings import Settings  # noqa: E402


def _norm(text: str) -> str:
    return " ".join(text.split())


class SubjectScorer:
    def __init__(self, prompts: str | Path):
        self.subject: dict[str, str] = {}
        with gzip.open(prompts, "rt", encoding="utf-8") as fh:
            for line in fh:
                p = json.loads(line)
                if p["source"].startswith("ori_mmlu-"):
                    self.subject[_norm(p["question"])] = p["source"].removeprefix("ori_mmlu-")

    def score(self, instruction, candidates):
        subject = self.subject.get(_norm(instruction))
        return {m: float(profile[subject]) if subject in profile
                else sum(profile.values()) / max(1, len(profile))
                for m, profile in candidates.items()}


def main() -> None:
    settings = Settings()
    app = create_app(settings, scorer=SubjectScorer(os.environ["SATROUTE_TEST_PROMPTS"]))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                http=BoundedHttpToolsProtocol)  # as `satroute serve` runs it


if __name__ == "__main__":
    main()
