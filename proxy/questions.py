"""Where the aptitude test's question texts come from: a data folder, or the public MMLU-Pro dataset.

Owns: turning the suite's question ids (``mmlu_pro/<n>``) into ``Question`` objects (text, lettered
options, gold letter, subject). Sources, in order:
1. a data folder in the shared format (``prompts.jsonl.gz``; e.g. ``../shared/data/mmlu_pro``), when
   one is given, or found at the routing data's default place (``scorer.data.data_root()``);
2. when no folder is given and the hub is allowed, the public MMLU-Pro test split on the Hugging Face
   hub (``TIGER-Lab/MMLU-Pro``), read through the hub's dataset-viewer JSON API (no extra package).
   Our id ``mmlu_pro/<n>`` is the hub's ``question_id`` ``n`` (test split: ids 70..12256, the same
   12,032 questions, ``src`` = our ``source``). Fetched questions are cached under the state folder.
Otherwise ``QuestionSourceError`` says what to do.
Does not know: how questions are asked or graded, the store, HTTP serving.
"""
from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import httpx

from proxy.errors import ConfigError

log = logging.getLogger("satroute.onboarding")

PROMPTS_FILE = "prompts.jsonl.gz"
HUB_DATASET = "TIGER-Lab/MMLU-Pro"
HUB_ROWS_URL = "https://datasets-server.huggingface.co/rows"
HUB_PAGE = 100  # the viewer API's largest page
ID_PREFIX = "mmlu_pro/"


class QuestionSourceError(ConfigError):
    """Neither a data folder nor the hub can provide the aptitude questions."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, ...]
    answer: str  # gold letter, a capital as the grader reads it
    subject: str  # e.g. "ori_mmlu-high_school_biology" or a category name

    def __post_init__(self) -> None:
        # a folder of one's own may write "c": compared as it came, every answer graded wrong
        object.__setattr__(self, "answer", self.answer.strip().upper())

    @classmethod
    def from_json(cls, obj: dict) -> "Question":
        return cls(id=str(obj["id"]), question=str(obj["question"]),
                   options=tuple(str(o) for o in obj["options"]), answer=str(obj["answer"]),
                   subject=str(obj.get("source") or obj.get("category") or ""))

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "options": list(self.options),
                "answer": self.answer, "source": self.subject}


def _pick(found: dict[str, Question], ids: Sequence[str], where: str) -> list[Question]:
    missing = [q for q in ids if q not in found]
    if missing:
        raise QuestionSourceError(f"{where} lacks {len(missing)} of the suite's questions "
                                  f"(e.g. {missing[:3]})")
    return [found[q] for q in ids]


def from_folder(folder: str | Path, ids: Sequence[str]) -> list[Question]:
    """The questions ``ids`` from a folder holding ``prompts.jsonl.gz``, in the order of ``ids``."""
    path = Path(folder) / PROMPTS_FILE
    if not path.exists():
        raise QuestionSourceError(f"no {PROMPTS_FILE} in {folder}: pass a folder in the routing "
                                  "data format (e.g. ../shared/data/mmlu_pro)")
    wanted = set(ids)
    found: dict[str, Question] = {}
    n = 0
    try:  # a byte-order mark skipped, as the routing data's reader skips it
        with gzip.open(path, "rt", encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("id") in wanted:
                    found[obj["id"]] = Question.from_json(obj)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        where = f"{path}: line {n}" if n else str(path)  # OSError: not gzip (BadGzipFile)
        raise QuestionSourceError(f"{where}: {type(exc).__name__}: {exc}") from None
    return _pick(found, ids, str(path))


def hub_row_to_question(row: dict) -> Question:
    """One row of the hub's MMLU-Pro test split as a Question (``question_id`` n -> ``mmlu_pro/n``)."""
    return Question(id=f"{ID_PREFIX}{int(row['question_id'])}", question=str(row["question"]),
                    options=tuple(str(o) for o in row["options"]), answer=str(row["answer"]),
                    subject=str(row.get("src") or row.get("category") or ""))


def from_hub(ids: Sequence[str], cache: Path | None = None, *,
             client: httpx.Client | None = None, timeout_s: float = 30.0) -> list[Question]:
    """The questions ``ids`` from the MMLU-Pro test split on the hub (cached in ``cache``)."""
    if cache is not None and cache.exists():
        found = {q.id: q for q in _read_cache(cache)}
        if all(q in found for q in ids):
            return [found[q] for q in ids]
    own = client is None
    client = client or httpx.Client(timeout=timeout_s, follow_redirects=True)
    found = {}
    try:
        offset, total = 0, None
        while total is None or offset < total:
            resp = client.get(HUB_ROWS_URL, params={"dataset": HUB_DATASET, "config": "default",
                                                    "split": "test", "offset": offset,
                                                    "length": HUB_PAGE})
            resp.raise_for_status()
            page = resp.json()
            total = int(page.get("num_rows_total", 0))
            rows = page.get("rows") or []
            if not rows:
                break
            for item in rows:
                q = hub_row_to_question(item["row"])
                found[q.id] = q
            offset += len(rows)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise QuestionSourceError(
            f"cannot read {HUB_DATASET} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "give a data folder instead (--data or SATROUTE_ONBOARDING_DATA, e.g. "
            "../shared/data/mmlu_pro)") from None
    finally:
        if own:
            client.close()
    chosen = _pick(found, ids, f"{HUB_DATASET} (test split)")
    if cache is not None:
        _write_cache(cache, chosen)
    return chosen


def _read_cache(path: Path) -> Iterable[Question]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield Question.from_json(json.loads(line))


def _write_cache(path: Path, questions: Sequence[Question]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(json.dumps(q.to_json()) + "\n")
    tmp.replace(path)


def default_folder(suite_name: str) -> Path | None:
    """The routing data's folder for this suite, where the project keeps it, if present."""
    from scorer.data import data_root

    folder = data_root() / suite_name
    return folder if (folder / PROMPTS_FILE).exists() else None


def load_questions(ids: Sequence[str], suite_name: str, data: str | Path | None = None, *,
                   hub: bool = True, cache_dir: Path | None = None,
                   client: httpx.Client | None = None) -> list[Question]:
    """The suite's questions from ``data``, else the default folder, else (if allowed) the hub."""
    if data is not None:
        return from_folder(data, ids)
    folder = default_folder(suite_name)
    if folder is not None:
        return from_folder(folder, ids)
    if hub and suite_name == "mmlu_pro":
        cache = cache_dir / "questions" / f"{suite_name}.jsonl" if cache_dir else None
        log.info("fetching the aptitude questions from %s on the Hugging Face hub", HUB_DATASET)
        return from_hub(ids, cache, client=client)
    raise QuestionSourceError(
        f"no source for the {suite_name!r} aptitude questions: give a data folder (--data or "
        f"SATROUTE_ONBOARDING_DATA, e.g. ../shared/data/{suite_name})"
        + ("" if hub else ", or allow fetching MMLU-Pro from the Hugging Face hub"))
