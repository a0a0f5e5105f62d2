"""How many prompt tokens the embedding baselines should read: 64 against 128, measured.

Trains the kNN and MLP baselines on a fixed sample of MMLU-Pro train prompts (3,000) for the small
zoo and prints their routing accuracy on 1,000 other train prompts held out from that fit, with the
embedding of the first 64 and the first 128 tokens, and the time each embedding took. The choice is
made on the train split alone; the test split is not read.

    python bench/baseline_embedding_tokens.py [--data ../shared/data/mmlu_pro] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from scorer.baselines import _routing_accuracy, train_knn, train_mlp
    from scorer.data import data_root, format_instruction, load_dataset
    from scorer.embeddings import Embedder

    zoo = ["Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "gemma-7b", "Qwen1.5-7B-Chat",
           "Mistral-7B-Instruct-v0.2"]
    data = load_dataset(args.data or data_root() / "mmlu_pro").with_models(zoo)
    rng = np.random.default_rng(args.seed)
    pool = data.split("train")
    drawn = rng.choice(len(pool), 4000, replace=False)
    train, held_out = pool.subset(np.sort(drawn[:3000])), pool.subset(np.sort(drawn[3000:]))
    for tokens in (64, 128):
        embedder = Embedder(max_length=tokens)
        start = time.perf_counter()
        x_train = embedder.encode([format_instruction(p) for p in train.prompts])
        x_held = embedder.encode([format_instruction(p) for p in held_out.prompts])
        print(f"{tokens} tokens: embedding 4000 prompts {time.perf_counter() - start:.1f} s")
        for name, train_fn in (("knn", train_knn), ("mlp", train_mlp)):
            fn, _ = train_fn(x_train, train.correct_matrix(), seed=args.seed)
            accuracy = _routing_accuracy(fn(x_held), held_out.correct_matrix())
            print(f"{tokens} tokens: {name} routing accuracy on the held-out train prompts {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
