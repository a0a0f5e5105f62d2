"""scorer.baselines and scorer.embeddings: each baseline learns a separable zoo; embeddings are cached."""
from __future__ import annotations

import numpy as np
import pytest

from scorer.baselines import CategoryBestScorer, EmbeddingScorer, train_baseline, train_knn, train_mlp, train_rf
from scorer.data import format_instruction, load_dataset, write_dataset
from scorer.embeddings import Embedder, dataset_embeddings


@pytest.fixture()
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: extra threads only contend on a busy machine
    yield
    torch.set_num_threads(before)


def _clusters(n=300, seed=0):
    """Two topics; model A is right on topic 0, B on topic 1, C never; some outcomes missing."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 2, n)
    centers = np.eye(8)[:2] * 3
    X = centers[topic] + rng.normal(scale=0.5, size=(n, 8))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Y = np.stack([topic == 0, topic == 1, np.zeros(n, bool)], axis=1).astype(float)
    Y[rng.random(n) < 0.05, 2] = np.nan
    return X.astype(np.float32), Y, topic


@pytest.mark.parametrize("train, kwargs", [(train_knn, {}), (train_mlp, {"hidden": 32, "epochs": 20, "lr": 1e-2}),
                                           (train_rf, {"n_estimators": 10})])
def test_baselines_route_each_topic_to_its_model(train, kwargs, one_thread):
    X, Y, _ = _clusters()
    Xt, _, topic = _clusters(seed=1)
    fn, info = train(X, Y, seed=0, **kwargs)
    picks = fn(Xt).argmax(axis=1)
    assert (picks == topic).mean() > 0.95
    assert isinstance(info, dict)


class FakeEmbedder(Embedder):
    """Hashes words into 8 buckets: deterministic, no model; counts how many texts it computed."""

    def __init__(self):
        super().__init__(spec="fake")
        self.computed = 0

    def _compute(self, texts, progress=False):
        self.computed += len(texts)
        out = np.zeros((len(texts), 8), np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, sum(map(ord, w)) % 8] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture()
def zoo(tmp_path):
    words = {"mmlu": "cell gene protein", "gsm8k": "sum apples total"}
    prompts, outcomes = [], []
    for i in range(40):
        ds = "mmlu" if i % 2 else "gsm8k"
        pid = f"p{i}"
        prompts.append({"id": pid, "dataset": ds, "category": ds, "source": "s",
                        "split": "test" if i >= 30 else "train", "question": f"{words[ds]} {i}"})
        outcomes += [(pid, "A", float(ds == "mmlu")), (pid, "B", float(ds == "gsm8k"))]
    return load_dataset(write_dataset(tmp_path / "zoo", prompts, outcomes))


def test_dataset_embeddings_cached_on_disk(zoo, tmp_path):
    emb = FakeEmbedder()
    train = zoo.split("train")
    X = dataset_embeddings(train, emb, tmp_path / "cache")
    assert X.shape == (30, 8) and emb.computed == 40  # the whole folder, once
    files = list((tmp_path / "cache" / "embeddings").glob("zoo-*.npy"))
    assert len(files) == 1
    again = FakeEmbedder()
    assert np.array_equal(dataset_embeddings(train, again, tmp_path / "cache"), X) and again.computed == 0
    # texts seen through the cache are remembered: routing them costs no encoder call
    again.encode([format_instruction(zoo.prompts[35])])
    assert again.computed == 0


def test_train_baseline_as_scorer(zoo, tmp_path):
    knn = train_baseline("knn", zoo, ["A", "B"], FakeEmbedder(), cache_dir=tmp_path)
    assert isinstance(knn, EmbeddingScorer)
    s = knn.score(format_instruction(zoo.prompt("p31")), {"A": {}, "B": {}, "New": {}})
    assert s["A"] > s["B"] and s["New"] == float("-inf")
    with pytest.raises(ValueError):
        train_baseline("nope", zoo, ["A", "B"], FakeEmbedder(), cache_dir=tmp_path)


def test_category_best(zoo):
    scorer = CategoryBestScorer(zoo.split("train"), ["A", "B"])
    assert max(scorer.score("cell gene protein 31", {"A": {}, "B": {}}).items(), key=lambda kv: kv[1])[0] == "A"
    assert max(scorer.score("sum apples total 30", {"A": {}, "B": {}}).items(), key=lambda kv: kv[1])[0] == "B"
    unknown = scorer.score("never seen", {"A": {}, "B": {}})
    assert set(unknown) == {"A", "B"}


def test_aptitude_mean_ranks_by_profile_and_places_unseen_models(zoo):
    scorer = train_baseline("aptitude", zoo, ["A", "B"])
    candidates = {"A": {"t1": 0.2, "t2": 0.4}, "New": {"t1": 0.9, "t2": 0.5}, "Empty": {}}
    scores = scorer.score("anything at all", candidates)
    assert scores == {"A": pytest.approx(0.3), "New": pytest.approx(0.7), "Empty": float("-inf")}
    assert scorer.score_many(["one", "two"], candidates) == [scores, scores]  # the instruction is ignored


@pytest.fixture()
def zoo_with_a_test_only_model(tmp_path, zoo):
    """``zoo`` plus model C, right on every prompt but with outcomes on the test split only."""
    outcomes = [(p.id, m, float(zoo.scores[i, j])) for i, p in enumerate(zoo.prompts) for j, m in enumerate(zoo.models)]
    outcomes += [(p.id, "C", 1.0) for p in zoo.prompts if p.split == "test"]
    return load_dataset(write_dataset(tmp_path / "zoo_c", zoo.prompts, outcomes))


@pytest.mark.parametrize("name", ["knn", "mlp", "rf", "category"])
def test_a_model_without_train_outcomes_scores_minus_infinity(zoo_with_a_test_only_model, tmp_path, name, one_thread):
    data = zoo_with_a_test_only_model
    scorer = train_baseline(name, data, ["A", "C", "B"], FakeEmbedder(), cache_dir=tmp_path)
    for p in data.split("test").prompts:
        scores = scorer.score(format_instruction(p), {"A": {}, "C": {}, "B": {}})
        assert scores["C"] == float("-inf") and np.isfinite([scores["A"], scores["B"]]).all()


def test_a_zoo_without_train_outcomes_is_a_data_error(zoo_with_a_test_only_model, tmp_path):
    from scorer.data import DataError

    with pytest.raises(DataError, match="no model of the zoo has an outcome on .*'s train split"):
        train_baseline("knn", zoo_with_a_test_only_model, ["C"], FakeEmbedder(), cache_dir=tmp_path)


def test_category_best_falls_back_on_overall_accuracy_without_a_warning(zoo, tmp_path):
    """A model with no train outcome in a category: its overall accuracy there, and no numpy
    "Mean of empty slice" RuntimeWarning on stderr."""
    import warnings

    outcomes = [(p.id, m, float(zoo.scores[i, j])) for i, p in enumerate(zoo.prompts) for j, m in enumerate(zoo.models)
                if not (m == "B" and p.dataset == "mmlu")]
    data = load_dataset(write_dataset(tmp_path / "zoo_b", zoo.prompts, outcomes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer = CategoryBestScorer(data.split("train"), ["A", "B"])
    assert scorer.table[("mmlu", "mmlu")].tolist() == [1.0, scorer.overall[1]]
    assert scorer.table[("gsm8k", "gsm8k")].tolist() == [0.0, 1.0]
