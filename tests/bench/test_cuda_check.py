"""bench/backbone_bundle.py and bench/cuda_check.sh: the prepared GPU check, run here on the CPU.

The bundle must carry no weights (it travels to a machine without the backbone packages), and the
network built from it must be the served network in every shape, with the checkpoint's own trained
parts: otherwise its times would not be the served network's times.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import bench_module

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "scorer" / "checkpoints" / "default"
pytestmark = pytest.mark.backbone


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return bench_module.load("backbone_bundle").export(tmp_path_factory.mktemp("bundle") / "b")


def test_the_bundle_holds_configs_and_tokenizers_and_no_weights(bundle):
    files = [f for f in bundle.rglob("*") if f.is_file()]
    assert {f.relative_to(bundle).as_posix() for f in files} >= {
        "bundle.json", "encoder/config.json", "encoder/tokenizer.json", "llm/config.json", "llm/tokenizer.json"}
    assert not [f for f in files if f.suffix in {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx"}]
    assert sum(f.stat().st_size for f in files) < 8e6
    assert json.loads((bundle / "bundle.json").read_text())["checkpoint"] == str(CHECKPOINT)


def test_the_bundle_network_is_the_served_network_with_its_trained_parts(bundle):
    from scorer.aptitude import builtin_profiles
    from scorer.inference import ModelSATScorer

    built = bench_module.load("backbone_bundle").build_scorer(None, bundle, device="cpu", dtype="float32")
    served = ModelSATScorer.load(None, device="cpu", dtype="float32")
    shapes = {n: tuple(p.shape) for n, p in built.model.state_dict().items()}
    assert shapes == {n: tuple(p.shape) for n, p in served.model.state_dict().items()}
    assert built.model.config == served.model.config
    trained = load_file(str(CHECKPOINT / "model.safetensors"))
    state = built.model.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor.float()), name
    # the backbones are drawn, not loaded: phi's embeddings differ from the served ones
    assert not torch.equal(state["embed.weight"], served.model.state_dict()["embed.weight"])
    # and drawn from a fixed seed, so two builds score alike
    again = bench_module.load("backbone_bundle").build_scorer(None, bundle, device="cpu", dtype="float32")
    profiles = builtin_profiles("mmlu_pro")
    cands = {n: profiles[n] for n in sorted(profiles)[:3]}
    assert built.score("Which gas do plants take in?", cands) == again.score("Which gas do plants take in?", cands)


def _check(bundle: Path, out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "cuda_check.sh")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, "BUNDLE": str(bundle),
                                            "OUT": str(out), **env})


def test_the_gpu_check_script_runs_its_steps_on_the_cpu(bundle, tmp_path):
    run = _check(bundle, tmp_path, DEVICE="cpu", REPEATS="1", CANDIDATES="2,3", BATCHES="1,2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "cuda_check: done" in run.stdout
    assert "torch" in (tmp_path / "env.txt").read_text()
    for name, budget in (("scorer_latency_cpu.json", 64), ("scorer_latency_cpu_256.json", 256)):
        report = json.loads((tmp_path / name).read_text())
        assert report["device"] == "cpu" and report["backbone_weights"] == "random (--bundle)"
        assert report["instruction_budget"] == budget
        assert [r["candidates"] for r in report["rows"]] == [2, 3]
        assert all(r["p50_ms"] > 0 for r in report["rows"])
    batches = json.loads((tmp_path / "batch_requests_cpu.json").read_text())
    assert [r["batch"] for r in batches["rows"]] == [1, 2] and batches["candidates"] == 8
    assert max(r["max_diff"] for r in batches["rows"]) < 1e-3


def test_the_gpu_check_script_stops_at_once_without_a_bundle(tmp_path):
    run = _check(tmp_path / "missing", tmp_path / "out", DEVICE="cpu")
    assert run.returncode == 2 and "backbone_bundle.py" in run.stderr


def test_compare_times_both_scorers_in_alternation(bundle):
    report = bench_module.load("backbone_bundle").compare(None, bundle, [2], repeats=1)
    (row,) = report["rows"]
    assert row["candidates"] == 2 and row["trained_p50_ms"] > 0 and row["random_p50_ms"] > 0
    assert row["ratio"] == pytest.approx(row["random_p50_ms"] / row["trained_p50_ms"])


def test_a_step_that_fails_leaves_the_others_to_run_and_is_named(bundle, tmp_path):
    """One crashing step (a CUDA error in the first latency curve) ended the script there: a
    machine lent for minutes gave back nothing else. The commit is named even where the copy of
    the tree holds no .git."""
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\n"
                      "case \" $* \" in *scorer_latency.py*\" --json \"*\"scorer_latency_cpu.json\"*) "
                      "echo 'RuntimeError: CUDA error (injected)' >&2; exit 3;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    run = _check(bundle, out, DEVICE="cpu", REPEATS="1", CANDIDATES="2", BATCHES="1", PYTHON=str(python),
                 COMMIT="abc1234")
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    assert "cuda_check: failed: the latency curve (exit 3)" in run.stderr
    assert (out / "scorer_latency_cpu_256.json").exists() and (out / "batch_requests_cpu.json").exists()
    assert "commit abc1234" in (out / "env.txt").read_text()
