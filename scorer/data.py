"""Routing data sets: prompts and per-model outcomes, in the shared on-disk format.

Owns: reading a folder holding ``prompts.jsonl.gz`` (one JSON object per prompt) and
``outcomes.csv.gz`` (``prompt_id,model,score``) into a ``RoutingData``: the prompts, the model
names, and a (prompt x model) score matrix with NaN where a model has no result; the ``train`` /
``test`` split; the rule that turns a raw score into right/wrong; and ``format_instruction``, the
text a router sees for a prompt (used identically in training, evaluation and the proxy's tests).

Reading is strict, each mistake a ``DataError`` naming the file and line: a ``split`` other than
``train`` / ``test``, a score outside [0, 1] (NaN is no result, as a missing row), a second row for
one (prompt, model), outcomes none of which names a listed prompt. A UTF-8 byte-order mark is skipped.

Does not know: aptitude suites, capability profiles, any model or the proxy.

Correctness semantics (``is_correct``), by the prompt's ``dataset``:

- ``mmlu``, ``arc_challenge``, ``arc_easy``, ``cmmlu``, ``ceval``: the score is the probability of
  the gold option when the model answered correctly and 0 otherwise, so correct = score > 0.
- ``gsm8k``, ``humaneval``, ``humaneval_js``, ``mbpp``: the score is the share of 10 samples that
  were correct; we call a prompt correct when at least half were (score >= 0.5).
- ``math_prealgebra``, ``mmlu_pro`` and any other data set: 0/1 (or a share): score >= 0.5.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

PROMPTS_FILE = "prompts.jsonl.gz"
OUTCOMES_FILE = "outcomes.csv.gz"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: the splits the format knows: a prompt in any other would be silently neither trained nor tested on
SPLITS = ("train", "test")
#: data sets whose score is the gold option's probability when right, 0 when wrong
POSITIVE_IS_CORRECT = frozenset({"mmlu", "arc_challenge", "arc_easy", "cmmlu", "ceval"})


class DataError(ValueError):
    """A routing data folder is missing, malformed, or asked for something it does not hold."""


def mended(text: str) -> str:
    """``text`` as a tokenizer takes it: a lone surrogate (half an emoji, from a string cut
    through one) as U+FFFD, as the proxy mends a request's; any other text as it is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@dataclass(frozen=True)
class Prompt:
    id: str
    dataset: str
    category: str
    source: str
    split: str
    question: str
    options: tuple[str, ...] = ()
    answer: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping) -> "Prompt":
        return cls(
            id=str(obj["id"]),
            dataset=str(obj.get("dataset", "")),
            category=str(obj.get("category", "")),
            source=str(obj.get("source", "")),
            split=str(obj.get("split", "")),
            question=mended(str(obj.get("question", ""))),
            options=tuple(mended(str(o)) for o in obj.get("options") or ()),
            answer=obj.get("answer"),
        )


def format_instruction(prompt: Prompt | Mapping) -> str:
    """The text a router sees: the question, then ``A. ...`` lines for the options if any."""
    if isinstance(prompt, Mapping):
        question, options = str(prompt.get("question", "")), list(prompt.get("options") or ())
    else:
        question, options = prompt.question, list(prompt.options)
    if not options:
        return question
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options[: len(LETTERS)])]
    return question + "\n" + "\n".join(lines)


def is_correct(dataset: str, scores: np.ndarray) -> np.ndarray:
    """1.0 / 0.0 per score under the data set's semantics (module docstring); NaN stays NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    right = scores > 0 if dataset in POSITIVE_IS_CORRECT else scores >= 0.5
    return np.where(np.isnan(scores), np.nan, right.astype(np.float64))


class RoutingData:
    """Prompts and a (prompt x model) raw-score matrix (NaN = no result). Treat as immutable."""

    def __init__(self, prompts: Sequence[Prompt], models: Sequence[str], scores: np.ndarray,
                 path: str | None = None):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(prompts), len(models)):
            raise DataError(f"scores shape {scores.shape} != ({len(prompts)}, {len(models)})")
        self.prompts: tuple[Prompt, ...] = tuple(prompts)
        self.models: list[str] = list(models)
        self.scores = scores
        self.scores.setflags(write=False)
        self.path = path
        self._row = {p.id: i for i, p in enumerate(self.prompts)}
        self._col = {m: j for j, m in enumerate(self.models)}
        self._correct: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"RoutingData({self.path!r}, {len(self)} prompts, {len(self.models)} models)"

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._row

    def prompt(self, prompt_id: str) -> Prompt:
        try:
            return self.prompts[self._row[prompt_id]]
        except KeyError:
            raise DataError(f"unknown prompt id {prompt_id!r}") from None

    def rows(self, prompt_ids: Iterable[str]) -> np.ndarray:
        try:
            return np.array([self._row[i] for i in prompt_ids], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"unknown prompt id {exc.args[0]!r}") from None

    def column(self, model: str) -> int:
        try:
            return self._col[model]
        except KeyError:
            raise DataError(f"model {model!r} not in {self.models}") from None

    def subset(self, rows: Sequence[int] | np.ndarray, models: Sequence[str] | None = None) -> "RoutingData":
        """The given rows (indices or a boolean mask), optionally restricted to some models."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        cols = [self.column(m) for m in models] if models is not None else list(range(len(self.models)))
        return RoutingData([self.prompts[i] for i in idx], [self.models[j] for j in cols],
                           self.scores[np.ix_(idx, cols)], self.path)

    def split(self, name: str) -> "RoutingData":
        """Only the prompts of one split (``train`` or ``test``)."""
        mask = np.array([p.split == name for p in self.prompts], dtype=bool)
        if not mask.any():
            found = sorted({p.split for p in self.prompts})
            raise DataError(f"no prompts in split {name!r} (the splits found: {', '.join(map(repr, found)) or 'none'})")
        return self.subset(mask)

    def with_models(self, models: Sequence[str]) -> "RoutingData":
        return self.subset(np.arange(len(self)), models)

    def correct_matrix(self) -> np.ndarray:
        """(prompt x model) 1.0 / 0.0 / NaN under each prompt's data set semantics."""
        if self._correct is None:
            out = np.full(self.scores.shape, np.nan)
            datasets = np.array([p.dataset for p in self.prompts])
            for ds in np.unique(datasets):
                mask = datasets == ds
                out[mask] = is_correct(str(ds), self.scores[mask])
            out.setflags(write=False)
            self._correct = out
        return self._correct

    def correct(self, model: str) -> np.ndarray:
        """1.0 / 0.0 per prompt for ``model``, NaN where it has no result."""
        return self.correct_matrix()[:, self.column(model)]


@contextmanager
def _gzip_text(path: Path, newline: str | None = None):
    """``path`` opened as gzip-compressed UTF-8 text (a byte-order mark at its start, as some Windows
    tools write, skipped); a file that is not one is a ``DataError``."""
    try:
        with gzip.open(path, "rt", encoding="utf-8-sig", newline=newline) as fh:
            yield fh
    except (gzip.BadGzipFile, EOFError, zlib.error):  # not gzip at all, or a damaged / cut-short one
        raise DataError(f"{path}: not a gzip file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def _read_prompts(path: Path, strict: bool = True) -> list[Prompt]:
    """The prompts of ``path``; ``strict``: a split other than train and test is a ``DataError``
    (a folder without outcomes, as MMLU's with its ``dev`` split, is routed by nothing)."""
    prompts = []
    stray = None  # the first line whose split is neither train nor test
    with _gzip_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {n}: not JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
            if "id" not in obj:
                raise DataError(f"{path}: line {n}: the prompt has no \"id\"")
            try:
                prompts.append(Prompt.from_json(obj))
            except TypeError as exc:  # e.g. "options" that is no list
                raise DataError(f"{path}: line {n}: {exc}") from None
            if strict and stray is None and prompts[-1].split not in SPLITS:
                stray = n, prompts[-1]
    if stray is not None:
        n, prompt = stray
        found = sorted({p.split for p in prompts})
        raise DataError(f"{path}: line {n}: prompt {prompt.id!r} has split {prompt.split!r}; the format allows only "
                        f"'train' and 'test' (the splits found: {', '.join(map(repr, found))})")
    return prompts


def _read_outcomes(path: Path, row_of: Mapping[str, int]) -> tuple[list[str], np.ndarray]:
    models: dict[str, int] = {}
    triples: list[tuple[int, int, float]] = []
    lines: list[int] = []  # each triple's line, to name a duplicate's
    n_rows, first_id = 0, None
    with _gzip_text(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None or header[:3] != ["prompt_id", "model", "score"]:
                raise DataError(f"{path}: expected header prompt_id,model,score, got {header}")
            for fields in reader:
                if not fields:
                    continue  # a blank line
                if len(fields) < 3:
                    raise DataError(f"{path}: line {reader.line_num}: expected prompt_id,model,score, got {fields}")
                pid, model, score = fields[:3]  # columns after the third are not ours to read
                n_rows += 1
                if first_id is None:
                    first_id = pid
                row = row_of.get(pid)
                if row is None:
                    continue  # an outcome for a prompt this folder does not list: ignored
                try:
                    value = float(score)
                except ValueError:
                    raise DataError(f"{path}: line {reader.line_num}: score {score!r} is not a number") from None
                if not 0.0 <= value <= 1.0 and not math.isnan(value):  # NaN: no result, as a missing row
                    raise DataError(f"{path}: line {reader.line_num}: score {score!r} is outside [0, 1]")
                col = models.setdefault(model, len(models))
                triples.append((row, col, value))
                lines.append(reader.line_num)
        except csv.Error as exc:  # a stray quote swallows the rest of the file into one field
            raise DataError(f"{path}: line {reader.line_num}: {exc}") from None
    if n_rows and not triples:
        raise DataError(f"{path}: none of its {n_rows} rows names a prompt id of {PROMPTS_FILE} (e.g. {first_id!r}, "
                        f"where {PROMPTS_FILE} has ids like {next(iter(row_of), None)!r})")
    scores = np.full((len(row_of), len(models)), np.nan)
    if triples:
        r, c, s = (np.array(x) for x in zip(*triples))
        _refuse_duplicates(path, r.astype(np.int64) * len(models) + c.astype(np.int64), s, lines, row_of, models)
        scores[r.astype(np.int64), c.astype(np.int64)] = s
    return list(models), scores


def _refuse_duplicates(path: Path, cells: np.ndarray, values: np.ndarray, lines: Sequence[int],
                       row_of: Mapping[str, int], models: Mapping[str, int]) -> None:
    """A second row for one (prompt, model) is a ``DataError`` naming both lines: which one should
    count is not ours to guess (the last used to win without a word)."""
    order = np.argsort(cells, kind="stable")
    again = np.flatnonzero(cells[order][1:] == cells[order][:-1])
    if not len(again):
        return
    first, second = order[again[0]], order[again[0] + 1]
    pid = next(p for p, i in row_of.items() if i == cells[first] // len(models))
    model = next(m for m, j in models.items() if j == cells[first] % len(models))
    same = values[first] == values[second] or (np.isnan(values[first]) and np.isnan(values[second]))
    raise DataError(f"{path}: line {lines[second]}: a second row for prompt {pid!r} and model {model!r} (the first "
                    f"is line {lines[first]}, {'the same' if same else 'a different'} score); keep one row per pair")


@lru_cache(maxsize=8)
def _load_cached(path: str, version: tuple) -> RoutingData:
    """Only a folder that passed every check is kept (a ``DataError`` is not cached), under its files'
    versions: a file rewritten since, even within one mtime tick, is parsed and checked afresh."""
    folder = Path(path)
    prompts = _read_prompts(folder / PROMPTS_FILE, strict=(folder / OUTCOMES_FILE).exists())
    row_of = {p.id: i for i, p in enumerate(prompts)}
    if len(row_of) != len(prompts):
        raise DataError(f"{folder}: duplicate prompt ids")
    outcomes = folder / OUTCOMES_FILE
    models, scores = _read_outcomes(outcomes, row_of) if outcomes.exists() else ([], np.zeros((len(prompts), 0)))
    return RoutingData(prompts, models, scores, str(folder))


def load_dataset(path: str | os.PathLike) -> RoutingData:
    """Load a folder in the shared format; parsed once per path (and file version) per process."""
    folder = Path(path).expanduser().resolve()
    prompts = folder / PROMPTS_FILE
    if not prompts.exists():
        raise DataError(f"{folder} holds no {PROMPTS_FILE}")
    outcomes = folder / OUTCOMES_FILE
    version = tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in
                    (f.stat() for f in (prompts, outcomes) if f.exists()))
    return _load_cached(str(folder), version)


def write_dataset(path: str | os.PathLike, prompts: Sequence[Prompt | Mapping],
                  outcomes: Iterable[tuple[str, str, float]]) -> Path:
    """Write a folder in the shared format (for subsets, fixtures and tests)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / PROMPTS_FILE, "wt", encoding="utf-8") as fh:
        for p in prompts:
            obj = dict(p) if isinstance(p, Mapping) else {
                "id": p.id, "dataset": p.dataset, "category": p.category, "source": p.source,
                "split": p.split, "question": p.question, "options": list(p.options), "answer": p.answer}
            fh.write(json.dumps(obj) + "\n")
    with gzip.open(folder / OUTCOMES_FILE, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt_id", "model", "score"])
        writer.writerows(outcomes)
    return folder


def data_root() -> Path:
    """Where the shared data lives: $SATROUTE_DATA_DIR, else ../shared/data beside the checkout."""
    env = os.environ.get("SATROUTE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


__all__ = [
    "DataError", "Prompt", "RoutingData", "data_root", "format_instruction", "is_correct", "load_dataset",
    "write_dataset",
]
