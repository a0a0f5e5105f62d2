"""The aptitude suite: tasks (five keywords + question ids), how they are chosen, and profiles.

Owns: the ``Suite`` / ``Task`` types and their JSON form (``scorer/assets/suites/<name>.json``:
keywords and question ids, never question text); ``build_suite``, which picks the tasks and
questions from the ``train`` split only; and capability profiles, ``{task_id: accuracy}``, computed
from recorded outcomes (``profile_from_outcomes``) or from live grading (``profile_from_graded``)
through the same code path. Built-in profiles live in ``scorer/assets/profiles/<suite>/``.

Does not know: how a question is asked to a model or graded (onboarding does that), the capability
text (``scorer.capability``), any model or the proxy.

Tasks are MMLU subjects. In MMLU-Pro a task is an ``ori_mmlu-<subject>`` source; elsewhere (RouterDC)
it is the ``category`` of the prompts whose ``dataset`` is ``mmlu``. Selection (deterministic given
the seed): in each subject, questions are ranked by p(1-p), p = share of the reference models that got
the question right (the paper weighs most the questions about half the zoo gets right), ties broken
by a seeded shuffle; the subject keeps its top ``n_questions``. Subjects are then ranked by how far
apart they set the reference models (the standard deviation across models of their accuracy on the
kept questions) and the top ``n_tasks`` are kept. Subjects with fewer than ``n_questions`` train
questions are used (with all their questions, at least ``min_questions``) only when too few full
subjects exist, the larger first: RouterDC's 2,000 MMLU train questions give only 34 subjects with 20,
so its suite has 34 tasks of 20 and 16 of 12-19 questions.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from scorer.data import DataError, RoutingData

SUITE_FORMAT_VERSION = 1
MMLU_PRO_PREFIX = "ori_mmlu-"


def assets_dir() -> Path:
    return Path(str(resources.files("scorer") / "assets"))


def load_keywords(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The hand-written five-keyword description of each of MMLU's 57 subjects."""
    with open(path or assets_dir() / "keywords.json", encoding="utf-8") as fh:
        return {k: list(v) for k, v in json.load(fh).items()}


@dataclass(frozen=True)
class Task:
    id: str
    keywords: tuple[str, ...]
    question_ids: tuple[str, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "keywords": list(self.keywords), "question_ids": list(self.question_ids)}


@dataclass(frozen=True)
class Suite:
    name: str
    version: int
    tasks: tuple[Task, ...]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def task_ids(self) -> list[str]:
        return [t.id for t in self.tasks]

    @property
    def question_ids(self) -> list[str]:
        return [q for t in self.tasks for q in t.question_ids]

    def task(self, task_id: str) -> Task:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(task_id)

    def keywords(self) -> dict[str, tuple[str, ...]]:
        return {t.id: t.keywords for t in self.tasks}

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "meta": self.meta,
                "tasks": [t.to_json() for t in self.tasks]}

    @classmethod
    def from_json(cls, obj: Mapping) -> "Suite":
        tasks = tuple(Task(str(t["id"]), tuple(t["keywords"]), tuple(t["question_ids"])) for t in obj["tasks"])
        return cls(str(obj["name"]), int(obj.get("version", SUITE_FORMAT_VERSION)), tasks, dict(obj.get("meta", {})))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh, indent=1)
            fh.write("\n")


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """A committed suite by name (``mmlu_pro``, ``routerdc``) or any suite JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = assets_dir() / "suites" / f"{name_or_path}.json"
    if not path.exists():
        raise DataError(f"no aptitude suite at {path}")
    with open(path, encoding="utf-8") as fh:
        return Suite.from_json(json.load(fh))


def subject_of(prompt) -> str | None:
    """The MMLU subject a prompt belongs to, or None if it is not an MMLU question."""
    if prompt.source.startswith(MMLU_PRO_PREFIX):
        return prompt.source[len(MMLU_PRO_PREFIX):]
    if prompt.dataset == "mmlu" and prompt.category:
        return prompt.category
    return None


def _subject_rows(data: RoutingData) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(data.prompts):
        subject = subject_of(p)
        if p.split == "train" and subject:
            groups.setdefault(subject, []).append(i)
    return groups


def build_suite(data: RoutingData, name: str, n_tasks: int = 50, n_questions: int = 20, seed: int = 0,
                models: Sequence[str] | None = None, keywords: Mapping[str, Sequence[str]] | None = None,
                min_questions: int = 10) -> Suite:
    """Choose ``n_tasks`` subjects x ``n_questions`` train questions that tell ``models`` apart."""
    models = list(models) if models is not None else list(data.models)
    if len(models) < 2:
        raise DataError("building a suite needs outcomes of at least two reference models")
    keywords = keywords if keywords is not None else load_keywords()
    correct = data.correct_matrix()[:, [data.column(m) for m in models]]
    complete = ~np.isnan(correct).any(axis=1)  # only questions every reference model has a result on
    rng = random.Random(seed)
    candidates = []
    for subject, rows in sorted(_subject_rows(data).items()):
        if subject not in keywords:
            continue
        rows = [r for r in rows if complete[r]]
        if len(rows) < min_questions:
            continue
        rng.shuffle(rows)  # seeded tie-break before the stable sort
        p = correct[rows].mean(axis=1)
        order = sorted(range(len(rows)), key=lambda k: -(p[k] * (1 - p[k])))
        kept = [rows[k] for k in order[:n_questions]]
        spread = float(correct[kept].mean(axis=0).std())
        candidates.append((len(kept), spread, subject, kept))
    candidates.sort(key=lambda c: (-c[0], -c[1], c[2]))  # full subjects first, then by spread
    if len(candidates) < n_tasks:
        raise DataError(f"only {len(candidates)} subjects with >= {min_questions} train questions, need {n_tasks}")
    chosen = sorted(candidates[:n_tasks], key=lambda c: c[2])
    tasks = tuple(Task(subject, tuple(keywords[subject]), tuple(data.prompts[r].id for r in kept))
                  for _, _, subject, kept in chosen)
    meta = {"data": Path(data.path).name if data.path else None, "reference_models": models, "seed": seed,
            "n_questions": n_questions, "selection": "p(1-p) per question, model spread per task, train only"}
    return Suite(name, SUITE_FORMAT_VERSION, tasks, meta)


def profile_from_graded(suite: Suite, graded: Mapping[str, bool | float]) -> dict[str, float]:
    """Per-task accuracy from ``{question_id: right}``.

    Questions absent from ``graded`` (or graded NaN) are left out of their task's denominator; a task
    with no graded question is left out of the profile.
    """
    profile: dict[str, float] = {}
    for task in suite.tasks:
        marks = [float(graded[q]) for q in task.question_ids if q in graded]
        marks = [m for m in marks if not np.isnan(m)]
        if marks:
            profile[task.id] = sum(marks) / len(marks)
    return profile


def check_train_only(suite: Suite, data: RoutingData) -> list[str]:
    """The suite's questions ``data`` holds; ``DataError`` if one is outside the train split.

    A suite is built from train questions; one that names a question of another split (a suite
    edited by hand, or built from other data) would carry test outcomes into a profile, and a
    profile measured on it (built-in ones included) would have seen questions the router is then
    scored on."""
    qids = [q for q in suite.question_ids if q in data]
    foreign = [q for q in qids if data.prompt(q).split != "train"]
    if foreign:
        where = f" of {data.path}" if data.path else ""
        raise DataError(f"suite {suite.name!r} names {len(foreign)} question(s) outside the train split{where} "
                        f"(e.g. {foreign[0]!r}): a profile must not read them")
    return qids


def graded_from_outcomes(suite: Suite, data: RoutingData, model: str) -> dict[str, float]:
    """``{question_id: 1.0/0.0}`` for the suite's questions ``model`` has a recorded outcome on
    (``check_train_only`` first: a suite question outside the train split is a ``DataError``)."""
    qids = check_train_only(suite, data)
    values = data.correct(model)[data.rows(qids)]
    return {q: float(v) for q, v in zip(qids, values) if not np.isnan(v)}


def profile_from_outcomes(suite: Suite, data: RoutingData, model: str) -> dict[str, float]:
    """A known model's profile from its recorded outcomes, through ``profile_from_graded``."""
    return profile_from_graded(suite, graded_from_outcomes(suite, data, model))


#: a profile computed from recorded outcomes must rest on at least this share of its suite's
#: questions: on a few questions over a few tasks, mean accuracy is mostly noise, and routing by it
#: collapses onto whichever model was lucky there
MIN_COVERAGE = 0.5


def computed_profiles(suite: Suite, data: RoutingData, models: Sequence[str]
                      ) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, int]]]:
    """Profiles of ``models`` computed from ``data``'s outcomes, and on how much of the suite each
    rests: ``{model: (graded questions, tasks covered)}``, for ``check_coverage``."""
    profiles, coverage = {}, {}
    for model in models:
        graded = graded_from_outcomes(suite, data, model)
        profiles[model] = profile_from_graded(suite, graded)
        coverage[model] = (len(graded), len(profiles[model]))
    return profiles, coverage


def check_coverage(suite: Suite, coverage: Mapping[str, tuple[int, int]], where: str, advice: str,
                   allow_partial: bool = False) -> list[str]:
    """One line per computed profile saying on how much of the suite it rests. A model with no
    graded suite question is a ``DataError``, as is one with under ``MIN_COVERAGE`` of the suite's
    questions unless ``allow_partial``; ``advice`` ends those messages (what the user can do)."""
    notes = []
    if coverage and not any(n for n, _ in coverage.values()):  # the folder, not a model: say so once
        raise DataError(f"no model has an outcome on a question of suite {suite.name!r} in {where}: its train "
                        f"split holds none of them (pass --suite naming the suite its questions are from); "
                        + advice)
    for model, (n_graded, n_tasks) in coverage.items():
        said = (f"{n_graded} of the {len(suite.question_ids)} questions of suite {suite.name!r} ({n_tasks} of its "
                f"{len(suite.tasks)} tasks)")
        if not n_graded:
            raise DataError(f"model {model!r} has no outcomes on the questions of suite {suite.name!r} in {where}, "
                            f"so no profile can be computed for it; {advice}")
        if n_graded < MIN_COVERAGE * len(suite.question_ids) and not allow_partial:
            raise DataError(f"the profile of model {model!r} computed from {where} rests on {said}, under "
                            f"{MIN_COVERAGE:.0%}: too thin to route by (--allow-partial-profiles uses it anyway); "
                            + advice)
        notes.append(f"profile of {model!r} computed from {where}: {said}")
    return notes


def profile_filename(model: str) -> str:
    """File name of a built-in profile: the model name with ``/`` written as ``--``."""
    return model.replace("/", "--") + ".json"


def save_profile(suite: Suite, model: str, profile: Mapping[str, float], root: str | os.PathLike | None = None) -> Path:
    path = Path(root or assets_dir() / "profiles") / suite.name / profile_filename(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"model": model, "suite": suite.name, "tasks": {k: round(float(v), 4) for k, v in profile.items()}}
    path.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    return path


def builtin_profile_path(ref: str, root: str | os.PathLike | None = None) -> Path:
    """The file ``builtin:<suite>/<model>`` (or ``<suite>/<model>``) names, whether or not it
    exists: the model as its profile's ``model`` field spells it (``meta-llama/Meta-Llama-3-8B``)
    or as its file is named (``meta-llama--Meta-Llama-3-8B``) is the same file. ``DataError`` for
    a reference not of that form."""
    body = ref.removeprefix("builtin:")
    suite, sep, model = body.partition("/")
    if not sep or not model:
        raise DataError(f"expected builtin:<suite>/<model>, got {ref!r}")
    return Path(root or assets_dir() / "profiles") / suite / profile_filename(model)


def load_builtin_profile(ref: str, root: str | os.PathLike | None = None) -> dict:
    """``builtin:<suite>/<model>`` (or ``<suite>/<model>``) -> ``{"model", "suite", "tasks"}``."""
    path = builtin_profile_path(ref, root)
    if not path.exists():
        raise DataError(f"no built-in profile {ref!r} (looked for {path})")
    return json.loads(path.read_text(encoding="utf-8"))


def builtin_profiles(suite: str, root: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Every built-in profile of a suite: ``{model: {task_id: accuracy}}``."""
    folder = Path(root or assets_dir() / "profiles") / suite
    out = {}
    for path in sorted(folder.glob("*.json")):
        obj = json.loads(path.read_text(encoding="utf-8"))
        out[obj["model"]] = dict(obj["tasks"])
    return out


def suite_for(folder: str | os.PathLike, suite: str | None = "auto") -> str:
    """The suite a data folder's profiles are measured on: ``suite`` if given, else the committed
    suite named like the folder, else ``mmlu_pro``."""
    if suite and suite != "auto":
        return suite
    # "." (run from inside the folder) has no name of its own; a link keeps the name it was given
    name = Path(os.path.abspath(folder)).name
    return name if (assets_dir() / "suites" / f"{name}.json").exists() else "mmlu_pro"


def aptitude(profile: Mapping[str, float]) -> float:
    """A profile's overall aptitude: its mean accuracy over the tasks it has (0 for an empty one)."""
    return float(sum(profile.values()) / len(profile)) if profile else 0.0


__all__ = [
    "MIN_COVERAGE", "Suite", "Task", "aptitude", "build_suite", "builtin_profile_path", "builtin_profiles",
    "check_coverage", "check_train_only", "computed_profiles", "graded_from_outcomes",
    "load_builtin_profile", "load_keywords", "load_suite", "profile_filename", "profile_from_graded",
    "profile_from_outcomes", "save_profile", "subject_of", "suite_for",
]
