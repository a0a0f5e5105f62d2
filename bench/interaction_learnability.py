"""Can the Model-SAT network learn an instruction x capability interaction when the data has one?

Usage::

    python bench/interaction_learnability.py [--checkpoint PATH] [--layout instruction_first|paper]
                                             [--steps 300] [--every 50] [--threads 1]

A clean, synthetic routing problem on real prompts and real profiles: RouterDC's GSM8K and CMMLU
``train`` prompts, two candidates (dolphin-2.9-llama3-8b and Chinese-Mistral-7B, with their built-in
``routerdc`` profiles); the first is labelled right on every GSM8K prompt and wrong on every CMMLU
one, the second the other way round. Neither model's overall strength nor a prompt's difficulty
can lower the loss: only the interaction can. Starting from the checkpoint, stage 2 (connector +
LoRA, 4 groups a step) runs for ``--steps``; every ``--every`` steps it prints the losses and the
routing accuracy on 100 held-out prompts of the two sets (one fixed task order). If this does not
climb well above the share of the majority set, the network cannot route per prompt, whatever the
real data say.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", default=None, help="RouterDC folder (default: the shared data's)")
    p.add_argument("--layout", default="", help="switch the checkpoint's layout before training")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    from scorer.aptitude import builtin_profiles, load_suite
    from scorer.data import data_root, format_instruction, load_dataset
    from scorer.inference import DEFAULT_CHECKPOINT, CapabilityWriter, load_model, suite_keywords
    from scorer.training import Pool, Source, Trainer, _precompute_clauses, add_arguments

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = load_dataset(a.data or data_root() / "routerdc")
    profiles = builtin_profiles("routerdc")
    first = next(m for m in profiles if "dolphin-2.9" in m)
    second = next(m for m in profiles if "Chinese-Mistral" in m)
    prompts = [q for q in data.prompts if q.split == "train" and q.dataset in ("gsm8k", "cmmlu")]
    np.random.default_rng(a.seed).shuffle(prompts)

    def pool(items) -> Pool:
        right = np.array([[q.dataset == "gsm8k", q.dataset == "cmmlu"] for q in items], dtype=float)
        return Pool([format_instruction(q) for q in items], right, [first, second],
                    {first: profiles[first], second: profiles[second]})

    train, val = pool(prompts[100:]), pool(prompts[:100])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--k", "3", "--group-models", "2", "--val-size", "100", "--accumulate", "4",
                              "--seed", str(a.seed)])
    model = load_model(a.checkpoint or DEFAULT_CHECKPOINT)
    if a.layout and a.layout != model.config.layout:
        model.config = model.config.with_layout(a.layout)
    writer = CapabilityWriter(model, suite_keywords(load_suite("routerdc")))
    _precompute_clauses(writer, [train, val])
    trainer = Trainer(model, writer, [Source("synthetic", train, val, [first, second])], args)
    trainer.set_stage(2)
    majority = max(val.correct.mean(axis=0))
    print(f"layout {model.config.layout}; {len(train.instructions)} train prompts; held-out majority share "
          f"{majority:.2f}; routing accuracy before training {trainer.validate():.2f}")
    print("| step | seconds | paper loss | route loss | held-out routing accuracy |")
    print("|---|---|---|---|---|")
    started = time.monotonic()
    for step in range(1, a.steps + 1):
        rec = trainer.train_step()
        if step % a.every == 0 or step == a.steps:
            print(f"| {step} | {time.monotonic() - started:.0f} | {rec['paper']:.3f} | {rec['route']:.3f} "
                  f"| {trainer.validate():.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
