"""Classic routing baselines, each trained on a data set's ``train`` split and used as a ``Scorer``.

Owns: the four baselines the paper compares Model-SAT with, all predicting per model the chance that it
answers an instruction right, from the instruction's sentence embedding (``scorer.embeddings``):

- ``knn``: the share of the k nearest train prompts (cosine; ``neighbour_counts``, which training's
  ``--neighbours`` targets reuse) each model got right; k is chosen on a held-out slice of train.
- ``mlp``: one hidden layer, one sigmoid output per model, trained with a masked binary
  cross-entropy (missing outcomes do not count), early-stopped on a held-out slice of train.
- ``rf``: a multi-output random forest regressor on the embedding (a missing outcome is filled with
  that model's train accuracy).
- ``category``: per (data set, category) the model with the best train accuracy; the category of an
  instruction is looked up by its text among the data set's prompts (else the best overall model).

These four know models only by name: a candidate unseen in training (not in the zoo, or with no
outcome on the train split) scores -inf (never chosen while a known candidate exists); profiles are
ignored. That is exactly what Model-SAT adds.

- ``aptitude``: no training and no instruction: each candidate's mean accuracy over its aptitude
  profile. It reads what Model-SAT reads about a model, so it places unseen models too: the floor a
  profile-reading router has to clear.

Does not know: how routing accuracy is computed (``scorer.evaluation``), Model-SAT, the proxy.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from scorer import Profile
from scorer.data import DataError, RoutingData, format_instruction, load_dataset
from scorer.embeddings import Embedder, dataset_embeddings

HOLDOUT_FRAC = 0.1


class _PerModelScorer:
    """Shared Scorer plumbing: ``predict(instructions) -> (n, len(models))`` probabilities."""

    name = "baseline"

    def __init__(self, models: Sequence[str]):
        self.models = list(models)
        self._col = {m: j for j, m in enumerate(self.models)}

    def predict(self, instructions: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def score_many(self, instructions: Sequence[str], candidates: Mapping[str, Profile]) -> list[dict[str, float]]:
        probs = self.predict(list(instructions))
        return [{m: float(row[self._col[m]]) if m in self._col else float("-inf") for m in candidates}
                for row in probs]

    def score(self, instruction: str, candidates: Mapping[str, Profile]) -> dict[str, float]:
        return self.score_many([instruction], candidates)[0]


def _holdout(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(n * HOLDOUT_FRAC))
    return perm[cut:], perm[:cut]


def _routing_accuracy(probs: np.ndarray, correct: np.ndarray) -> float:
    """Share right when routing each row to its argmax (rows with any missing outcome skipped)."""
    ok = ~np.isnan(correct).any(axis=1)
    pick = probs[ok].argmax(axis=1)
    return float(correct[ok][np.arange(ok.sum()), pick].mean()) if ok.any() else 0.0


class EmbeddingScorer(_PerModelScorer):
    """Wraps an embedding-space predictor ``f(X) -> probs`` behind the Scorer interface."""

    def __init__(self, name: str, models: Sequence[str], embedder: Embedder, fn: Callable[[np.ndarray], np.ndarray]):
        super().__init__(models)
        self.name, self.embedder, self.fn = name, embedder, fn

    def predict(self, instructions: Sequence[str]) -> np.ndarray:
        return self.fn(self.embedder.encode(instructions))


def neighbour_counts(Q: np.ndarray, X: np.ndarray, Y: np.ndarray, k: int, *, leave_self_out: bool = False,
                     chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``Q``, over its ``k`` most similar rows of ``X`` (cosine of unit vectors): how
    many each model got right (``Y``: 1 / 0 / NaN) and how many it has an outcome for.

    ``leave_self_out``: ``Q`` is ``X`` itself and no row counts as its own neighbour.
    """
    known = ~np.isnan(Y)
    Y0 = np.nan_to_num(Y)
    hits, seen = np.empty((len(Q), Y.shape[1])), np.empty((len(Q), Y.shape[1]), dtype=np.int64)
    for start in range(0, len(Q), chunk):
        sims = Q[start:start + chunk] @ X.T
        if leave_self_out:
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        nn = np.argpartition(-sims, min(k, len(X) - 1), axis=1)[:, :k]
        hits[start:start + chunk], seen[start:start + chunk] = Y0[nn].sum(axis=1), known[nn].sum(axis=1)
    return hits, seen


def _knn_fn(X: np.ndarray, Y: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    prior = np.nanmean(Y, axis=0)

    def fn(Q: np.ndarray) -> np.ndarray:
        hits, seen = neighbour_counts(Q, X, Y, k)
        # one pseudo-count of the model's prior keeps a tie-free, defined estimate
        return (hits + prior) / (seen + 1)

    return fn


def train_knn(X: np.ndarray, Y: np.ndarray, seed: int = 0, ks: Sequence[int] = (5, 10, 20, 50, 100)):
    fit, val = _holdout(len(X), seed)
    best = max(ks, key=lambda k: (_routing_accuracy(_knn_fn(X[fit], Y[fit], k)(X[val]), Y[val]), -k))
    return _knn_fn(X, Y, best), {"k": int(best)}


def train_mlp(X: np.ndarray, Y: np.ndarray, seed: int = 0, hidden: int = 256, epochs: int = 60, lr: float = 1e-3,
              batch_size: int = 64):
    import torch

    torch.manual_seed(seed)
    fit, val = _holdout(len(X), seed)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(hidden, Y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    Xt, Yt = torch.tensor(X, dtype=torch.float32), torch.tensor(np.nan_to_num(Y), dtype=torch.float32)
    Mt = torch.tensor(~np.isnan(Y), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, stale = -1.0, None, 0
    for _ in range(epochs):
        net.train()
        for idx in torch.tensor(fit)[torch.randperm(len(fit), generator=gen)].split(batch_size):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(Xt[idx]), Yt[idx], weight=Mt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = _routing_accuracy(net(Xt[val]).numpy(), Y[val])
        if acc > best:
            best, best_state, stale = acc, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= 8:
                break
    net.load_state_dict(best_state)
    net.eval()

    def fn(Q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(net(torch.tensor(Q, dtype=torch.float32))).numpy()

    return fn, {"hidden": hidden, "holdout_routing_accuracy": round(best, 4)}


def train_rf(X: np.ndarray, Y: np.ndarray, seed: int = 0, n_estimators: int = 100):
    from sklearn.ensemble import RandomForestRegressor

    filled = np.where(np.isnan(Y), np.nanmean(Y, axis=0), Y)
    forest = RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=5, max_features="sqrt",
                                   random_state=seed, n_jobs=1).fit(X, filled)
    return (lambda Q: forest.predict(Q).reshape(len(Q), -1)), {"n_estimators": n_estimators}


class CategoryBestScorer(_PerModelScorer):
    """Per (data set, category): 1 for the model best on train there, 0 for the others."""

    name = "category"

    def __init__(self, train: RoutingData, models: Sequence[str]):
        super().__init__(models)
        correct = train.with_models(self.models).correct_matrix()
        self.overall = np.nanmean(correct, axis=0)
        keys = [(p.dataset, p.category) for p in train.prompts]
        self.table: dict[tuple[str, str], np.ndarray] = {}
        for key in set(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            known = ~np.isnan(correct[rows])
            # per model, its accuracy on the category's rows it has results for (np.nanmean would
            # warn "Mean of empty slice" for a model with none); none: its overall accuracy
            acc = np.nansum(correct[rows], axis=0) / np.maximum(known.sum(axis=0), 1)
            self.table[key] = np.where(known.any(axis=0), acc, self.overall)
        full = load_dataset(train.path) if train.path else train
        self.category_of = {format_instruction(p): (p.dataset, p.category) for p in full.prompts}

    def predict(self, instructions: Sequence[str]) -> np.ndarray:
        rows = [self.table.get(self.category_of.get(t), self.overall) for t in instructions]
        # exact best gets 1; the overall accuracy breaks ties between equally good models
        return np.stack([(r == r.max()).astype(float) + 1e-3 * self.overall for r in rows])


class AptitudeMeanScorer:
    """Each candidate's mean accuracy over its aptitude profile; the same for every instruction.

    The floor any profile-reading router must clear: it needs no training, reads only what
    Model-SAT reads about a model (its profile), and so places unseen models too. A candidate with
    an empty profile scores -inf.
    """

    name = "aptitude"

    def score(self, instruction: str, candidates: Mapping[str, Profile]) -> dict[str, float]:
        return {m: float(np.mean(list(p.values()))) if p else float("-inf") for m, p in candidates.items()}

    def score_many(self, instructions: Sequence[str], candidates: Mapping[str, Profile]) -> list[dict[str, float]]:
        return [self.score(text, candidates) for text in instructions]


EMBEDDING_BASELINES = {"knn": train_knn, "mlp": train_mlp, "rf": train_rf}
BASELINES = (*EMBEDDING_BASELINES, "category", "aptitude")


def train_baseline(name: str, data: RoutingData, models: Sequence[str], embedder: Embedder | None = None,
                   seed: int = 0, cache_dir=None) -> _PerModelScorer:
    """Train baseline ``name`` on ``data``'s train split for the zoo ``models``."""
    if name == "aptitude":
        return AptitudeMeanScorer()
    if name != "category" and name not in EMBEDDING_BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    train = data.split("train").with_models(models)
    # a model with no train outcome is unseen, like one outside the zoo: it scores -inf (its
    # column would be all NaN: a NaN prior or table row, or a forest that refuses to fit)
    seen = [m for m, known in zip(models, ~np.isnan(train.correct_matrix()).all(axis=0)) if known]
    if not seen:
        raise DataError(f"no model of the zoo has an outcome on {data.path}'s train split")
    train = train.with_models(seen)
    if name == "category":
        return CategoryBestScorer(train, seen)
    embedder = embedder or Embedder()
    X = dataset_embeddings(train, embedder, cache_dir)
    fn, info = EMBEDDING_BASELINES[name](X, train.correct_matrix(), seed)
    scorer = EmbeddingScorer(name, seen, embedder, fn)
    scorer.info = info
    return scorer


__all__ = ["AptitudeMeanScorer", "BASELINES", "CategoryBestScorer", "EmbeddingScorer", "neighbour_counts",
           "train_baseline"]
