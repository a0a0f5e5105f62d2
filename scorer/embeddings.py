"""Sentence embeddings of prompts for the classic routing baselines, cached on disk per data set.

Owns: ``Embedder`` (all-MiniLM-L6-v2 by default, loaded offline through ``scorer.backbones``; mean
pooling over tokens, L2-normalised; the first 128 tokens by default, the length the model was trained
at and half the cost of its 256-token window) with an in-memory memo of the texts already seen, and
``dataset_embeddings``, which embeds every prompt of a data folder once (``format_instruction``
text) and keeps the matrix under the cache directory (``<cache>/embeddings/<folder>-<hash>.npy``,
outside git), so later runs load it in milliseconds.

Measured on a busy 2-core CPU, one torch thread (two were 3x slower there: they contend with
everything else running): 64 tokens embed MMLU-Pro's 12,032 prompts in 498 s; 128 tokens take about
twice as long. On 1,000 train prompts held out of a 3,000-prompt fit (small MMLU-Pro zoo) the two
are level (kNN 0.438 at 64, 0.425 at 128; MLP 0.446, 0.441: ``bench/baseline_embedding_tokens.py``),
and so they are on the full test split; 128 is the default as the encoder's training length, so
that no baseline reads less of a prompt than the model was trained to read.

Does not know: routing, outcomes, any baseline's model, the proxy.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from scorer.data import RoutingData, format_instruction, load_dataset


class Embedder:
    """Texts -> (n, d) float32 unit vectors; thread-safe; remembers texts it has embedded."""

    def __init__(self, spec: str | None = None, max_length: int = 128, batch_size: int = 32):
        self.spec = spec
        self.max_length = max_length
        self.batch_size = batch_size
        self._loaded = None
        self._memo: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self.spec or 'default:minilm'}@{self.max_length}"

    def _load(self):
        if self._loaded is None:
            from scorer.backbones import DEFAULT_ENCODER, load_encoder

            self._loaded = load_encoder(self.spec or DEFAULT_ENCODER)
        return self._loaded

    def _compute(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        import torch

        loaded = self._load()
        order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
        out = np.zeros((len(texts), loaded.model.config.hidden_size), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch")
        with torch.inference_mode():
            for start in starts:
                idx = order[start:start + self.batch_size]
                batch = loaded.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt")
                hidden = loaded.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            self._memo.update(zip(texts, vectors))

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
            if missing:
                self._memo.update(zip(missing, self._compute(missing, progress)))
            return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)


def _cache_file(data: RoutingData, texts: Sequence[str], embedder: Embedder, cache_dir: Path) -> Path:
    digest = hashlib.sha256(embedder.name.encode())
    for pid, text in zip(data.ids, texts):
        digest.update(pid.encode() + b"\0" + text.encode() + b"\0")
    folder = Path(data.path).name if data.path else "data"
    return cache_dir / "embeddings" / f"{folder}-{digest.hexdigest()[:16]}.npy"


def dataset_embeddings(data: RoutingData, embedder: Embedder, cache_dir: str | Path | None = None,
                       progress: bool = False) -> np.ndarray:
    """Embeddings of ``data``'s prompts (rows in ``data`` order), computed once per folder and cached.

    The whole folder (every split) is embedded and cached; ``data`` may be any subset of it. The
    embedder also remembers every text, so routing those prompts later costs no encoder call.
    """
    if cache_dir is None:
        from scorer.backbones import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    full = load_dataset(data.path) if data.path else data
    texts = [format_instruction(p) for p in full.prompts]
    path = _cache_file(full, texts, embedder, Path(cache_dir))
    if path.exists():
        vectors = np.load(path)
    else:
        vectors = embedder.encode(texts, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    embedder.remember(texts, vectors)
    return vectors[full.rows(data.ids)] if full is not data else vectors


__all__ = ["Embedder", "dataset_embeddings"]
