"""Capability instruction tuning on a tiny network: group losses, stages, resume, a real-data run."""
from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest
import torch

from scorer.inference import CapabilityWriter
from scorer.training import Pool, Source, Trainer, add_arguments
from support import tiny_modelsat as tiny

TOPICS = ["algebra", "biology", "law", "history"]


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args([])
    a.k, a.group_models, a.val_size, a.lr = 3, 2, 8, 2e-2
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _pool(n: int = 40) -> Pool:
    """Model 'alg' is right exactly on algebra questions, 'bio' on biology ones; 'none' never."""
    words = {"algebra": "equation", "biology": "cells", "law": "court", "history": "war"}
    texts, rows = [], []
    for i in range(n):
        topic = TOPICS[i % 4]
        texts.append(f"what is {topic} {words[topic]} ?")
        rows.append([topic == "algebra", topic == "biology", 0.0])
    profiles = {"alg": {"algebra": 0.9, "biology": 0.1, "law": 0.3, "history": 0.3},
                "bio": {"algebra": 0.1, "biology": 0.9, "law": 0.3, "history": 0.3},
                "none": {t: 0.0 for t in TOPICS}}
    return Pool(texts, np.array(rows, dtype=float), ["alg", "bio", "none"], profiles)


def _trainer(**kw) -> Trainer:
    model = tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1)
    pool = _pool()
    writer = CapabilityWriter(model, tiny.suite().keywords())
    return Trainer(model, writer, [Source("t", pool, _pool(8), ["alg", "bio", "none"])], _args(**kw))


def _fixed_loss(trainer: Trainer, seed: int = 123, groups: int = 6) -> float:
    trainer.rng.seed(seed)
    with torch.no_grad():
        total = 0.0
        for _ in range(groups):
            paper, route = trainer.group_losses()
            total += float(paper) + float(route)
    return total / groups


def test_group_losses_are_cross_entropies_over_the_groups():
    trainer = _trainer()
    paper, route = trainer.group_losses()
    # an untrained connector barely tells the members of a group apart: close to log(group size)
    assert paper.item() == pytest.approx(math.log(3), abs=0.5)
    assert route.item() == pytest.approx(math.log(2), abs=0.5)
    assert _trainer(route_weight=0.0).group_losses()[1] is None


def test_route_group_puts_a_model_that_was_right_first():
    trainer = _trainer()
    for r in range(8):
        group = trainer._route_group(r, 2)
        if r % 4 >= 2:  # law / history: no model was right, no routing group
            assert group == []
            continue
        assert len(group) == 2
        assert trainer.pool.correct[r, group[0]] == 1
        assert trainer.pool.correct[r, group[1]] == 0


def test_stage_one_trains_the_connector_only_and_stage_two_adds_lora():
    trainer = _trainer()
    trainer.set_stage(1)
    lora_before = {n: p.clone() for n, p in trainer.model.named_parameters() if ".lora_" in n}
    w_before = trainer.model.connector.weight.clone()
    for _ in range(2):
        trainer.train_step()
    assert not torch.equal(trainer.model.connector.weight, w_before)
    assert all(torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if ".lora_" in n)
    trainer.set_stage(2)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [trainer.args.lr_stage2_connector,
                                                               trainer.args.lr_lora]
    for _ in range(2):
        trainer.train_step()
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if ".lora_" in n)


def test_stage_two_tunes_psis_top_layers_through_live_clause_vectors():
    model = tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1, encoder_train_layers=1)
    writer = CapabilityWriter(model, tiny.suite().keywords())
    trainer = Trainer(model, writer, [Source("t", _pool(), _pool(8), ["alg", "bio", "none"])], _args())
    tuned = dict(model.named_parameters())
    names = [n for n in tuned if n.startswith(model.encoder_tuned_prefixes())]
    assert names and all(n.startswith("encoder.encoder.layer.0.") for n in names)
    before = {n: tuned[n].clone() for n in names}
    embeddings = model.encoder.embeddings.word_embeddings.weight.clone()
    trainer.set_stage(1)
    assert not writer.live
    trainer.train_step()
    assert all(torch.equal(tuned[n], before[n]) for n in names)  # stage 1: connector only
    trainer.set_stage(2)
    assert writer.live
    a = trainer.args
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [a.lr_stage2_connector, a.lr_encoder,
                                                               a.lr_lora]
    for _ in range(2):
        trainer.train_step()
    assert any(not torch.equal(tuned[n], before[n]) for n in names)
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, embeddings)  # below: frozen
    assert set(names) <= set(model.trainable_state())


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["full", "full+lora"])
def test_stage_two_can_tune_phis_top_layers_fully(lora_rank):
    """The issue's "the LLM (full or LoRA)": --llm-train-layers N tunes the full weights of phi's
    top N kept layers in stage 2, at --lr-llm, below the connector's and psi's rates by default."""
    model = tiny.build(accuracy_feature=True, lora_rank=lora_rank, lora_layers=1, llm_train_layers=1)
    writer = CapabilityWriter(model, tiny.suite().keywords())
    trainer = Trainer(model, writer, [Source("t", _pool(), _pool(8), ["alg", "bio", "none"])], _args(lr_llm=1e-2))
    top = len(model.layers) - 1
    params = dict(model.named_parameters())
    tuned = [n for n in params if n.startswith(f"layers.{top}.") and ".lora_" not in n]
    below = [n for n in params if n.startswith(f"layers.{top - 1}.")]
    assert tuned and below
    before = {n: params[n].clone() for n in tuned + below}
    trainer.set_stage(1)
    trainer.train_step()
    assert all(torch.equal(params[n], before[n]) for n in tuned)  # stage 1: connector only
    trainer.set_stage(2)
    a = trainer.args
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [a.lr_stage2_connector, a.lr_llm] + (
        [a.lr_lora] if lora_rank else [])
    for _ in range(2):
        trainer.train_step()
    assert any(not torch.equal(params[n], before[n]) for n in tuned)
    assert all(torch.equal(params[n], before[n]) for n in below)
    assert set(tuned) <= set(model.trainable_state())


def test_the_default_stage_two_rates_are_larger_on_connector_and_encoder_than_on_phi():
    a = _args()
    assert min(a.lr_stage2_connector, a.lr_encoder) > max(a.lr_lora, a.lr_llm)


def test_a_warm_start_can_tune_more_of_psi_and_phi_than_its_checkpoint(tmp_path):
    from scorer.inference import save_checkpoint
    from scorer.training import warm_start

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1, encoder=enc, llm=llm),
                             tmp_path / "ckpt")
    grown = warm_start(folder, "cpu", encoder_train_layers=1, llm_train_layers=2)
    assert (grown.config.encoder_train_layers, grown.config.llm_train_layers) == (1, 2)
    assert grown.encoder_tuned_parameters() and len(grown.llm_tuned_prefixes()) == 2
    kept = warm_start(folder, "cpu")
    assert (kept.config.encoder_train_layers, kept.config.llm_train_layers) == (0, 0)
    with pytest.raises(ValueError, match="more than the 3 layers"):
        warm_start(folder, "cpu", llm_train_layers=4)


def test_a_tuned_psi_reads_each_instruction_afresh_not_from_vectors_of_earlier_steps():
    """With psi's top layer tuned, an instruction vector kept from an earlier step would be an older
    psi's: training, validation and the saved network would each see different inputs."""
    model = tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1, encoder_train_layers=1,
                       instruction_vector_tokens=16)
    writer = CapabilityWriter(model, tiny.suite().keywords())
    pool = _pool()
    trainer = Trainer(model, writer, [Source("t", pool, _pool(8), ["alg", "bio", "none"])], _args(lr_encoder=5e-2))
    trainer.set_stage(1)
    trainer.train_step()  # psi frozen: vectors are kept
    assert model._instruction_vectors
    trainer.set_stage(2)
    for _ in range(3):
        trainer.train_step()
    text = pool.instructions[0]
    window = model._psi_window(model.config.instruction_vector_tokens)
    with torch.no_grad():
        fresh = model.instruction_connector(model._encode([text], window)[0])[None]
        torch.testing.assert_close(model.instruction_vector(text), fresh)
    assert not model._instruction_vectors
    live = model.instruction_vector(text)  # and psi learns through it
    live.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_tuned_parameters())


def test_training_reduces_the_loss():
    # connector + LoRA (stage 2): a frozen random phi alone learns far too slowly to test
    trainer = _trainer(lr_stage2_connector=3e-2, lr_lora=1e-2)
    trainer.set_stage(2)
    before = _fixed_loss(trainer)
    for _ in range(40):
        trainer.train_step()
    assert _fixed_loss(trainer) < before - 0.2
    assert 0.0 <= trainer.validate() <= 0.5  # only the algebra and biology questions are routable


def _flipped_pool(n: int = 40) -> Pool:
    """A second data set: its models are 'alg2' (right on algebra) and 'never' (never right)."""
    base = _pool(n)
    profiles = {"alg2": base.profiles["alg"], "never": base.profiles["none"]}
    return Pool(base.instructions, base.correct[:, [0, 2]], ["alg2", "never"], profiles)


def test_groups_come_from_each_source_by_weight_and_validation_reports_each():
    model = tiny.build(accuracy_feature=True, lora_rank=2, lora_layers=1)
    writer = CapabilityWriter(model, tiny.suite().keywords())
    first = Source("a", _pool(), _pool(8), ["alg", "bio", "none"], weight=1.0)
    second = Source("b", _flipped_pool(), _flipped_pool(8), ["not-there"], weight=3.0)
    assert second.val_models == ["alg2", "never"]  # none of the asked models: the source's own
    trainer = Trainer(model, writer, [first, second], _args())
    trainer.rng.seed(0)
    picks = [trainer._pick_source().name for _ in range(400)]
    assert 0.65 < picks.count("b") / len(picks) < 0.85
    trainer.set_stage(1)
    trainer.train_step()
    acc = trainer.validate()
    assert set(trainer.last_val) == {"a", "a:best_single", "b", "b:best_single"}
    assert acc == pytest.approx((trainer.last_val["a"] + trainer.last_val["b"]) / 2, abs=1e-3)
    # on the 8 validation prompts: algebra (2 of 8) is the only topic 'alg2' gets right
    assert trainer.last_val["b:best_single"] == pytest.approx(0.25)
    assert trainer.last_val["a:best_single"] == pytest.approx(0.25)


def test_sources_parse_one_suite_and_weight_per_folder(tmp_path):
    from scorer.aptitude import suite_for
    from scorer.training import build_sources

    assert suite_for("/x/routerdc", "auto") == "routerdc"
    assert suite_for("/x/mmlu_pro", "auto") == "mmlu_pro"
    assert suite_for("/x/anything_else", "auto") == "mmlu_pro"
    assert suite_for("/x/routerdc", "mmlu_pro") == "mmlu_pro"
    with pytest.raises(ValueError, match="one value per --data folder"):
        build_sources(_args(data="a,b", data_weights="1,2,3"))


def test_a_suite_given_as_a_file_is_named_by_its_path_so_the_checkpoint_loads_it_back(tmp_path, monkeypatch):
    from scorer.aptitude import load_suite
    from scorer.training import suite_reference

    path = tmp_path / "suites" / "mine.json"
    tiny.suite().save(path)
    monkeypatch.chdir(tmp_path)
    ref = suite_reference(_args(data="somewhere/mmlu_pro", suite="suites/mine.json"))
    assert ref == str(path) and load_suite(ref) == tiny.suite()
    assert suite_reference(_args(data="somewhere/mmlu_pro", suite="auto")) == "mmlu_pro"  # committed: by name


def test_a_category_prior_without_neighbour_targets_or_outside_0_1_is_refused():
    from scorer.training import build_sources

    # refused before any folder is read: a run that would silently train without its prior never starts
    with pytest.raises(ValueError, match="--neighbours"):
        build_sources(_args(data="/nonexistent", category_prior=0.5, neighbours=0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        build_sources(_args(data="/nonexistent", category_prior=1.5, neighbours=50))


def test_accumulation_averages_several_groups_per_step():
    trainer = _trainer(accumulate=3)
    trainer.set_stage(1)
    calls = []
    original = trainer.group_losses
    trainer.group_losses = lambda: calls.append(1) or original()
    rec = trainer.train_step()
    assert len(calls) == 3 and trainer.step == 1
    assert rec["loss"] == pytest.approx(rec["paper"] + rec["route"], rel=1e-5)


def test_both_connectors_train_in_every_stage():
    trainer = _trainer()
    trainer.model.add_instruction_vector(32)
    for stage in (1, 2):
        trainer.set_stage(stage)
        before = trainer.model.instruction_connector.weight.clone()
        trainer.train_step()
        assert not torch.equal(trainer.model.instruction_connector.weight, before)


def test_a_warm_start_changes_layout_and_grows_an_instruction_vector_only_once(tmp_path):
    from scorer.inference import save_checkpoint
    from scorer.training import warm_start

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    plain = save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "plain")
    assert not hasattr(warm_start(plain, "cpu"), "instruction_connector")
    grown = warm_start(plain, "cpu", layout="paper", instruction_vector_tokens=24)
    assert grown.config.layout == "paper" and grown.config.instruction_vector_tokens == 24
    with torch.no_grad():
        grown.instruction_connector.bias.add_(1.0)
    again = warm_start(save_checkpoint(grown, tmp_path / "grown"), "cpu", instruction_vector_tokens=64)
    assert again.config.instruction_vector_tokens == 24  # its trained vector is kept, not re-grown
    torch.testing.assert_close(again.instruction_connector.bias, grown.instruction_connector.bias)


def test_a_warm_start_drops_the_aptitude_weight_fitted_to_the_old_weights(tmp_path):
    from scorer.inference import load_model, save_checkpoint
    from scorer.training import warm_start

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    fitted = save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm, aptitude_weight=2.5),
                             tmp_path / "fitted")
    assert load_model(fitted, device="cpu").config.aptitude_weight == 2.5
    assert warm_start(fitted, "cpu").config.aptitude_weight == 0.0


def test_a_warm_start_widens_lora_without_changing_a_score_and_the_new_adapters_train(tmp_path):
    from scorer.inference import load_model, save_checkpoint
    from scorer.training import warm_start

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    net = tiny.build(accuracy_feature=True, encoder=enc, llm=llm, lora_rank=4, lora_layers=1)
    with torch.no_grad():  # a trained adapter: nonzero, so a lost one would change the score
        for n, p in net.named_parameters():
            if ".lora_b" in n:
                p.normal_(0, 0.05)
    narrow = save_checkpoint(net, tmp_path / "narrow")
    rows = [net.embed_ids(net.token_ids("Instruction : what is algebra ? Yes"))]
    wide = warm_start(narrow, "cpu", lora_layers=3)
    assert wide.config.lora_layers == 3
    assert sum(".lora_a" in k for k in wide.trainable_state()) == 3 * sum(
        ".lora_a" in k for k in net.trainable_state())
    with torch.no_grad():
        torch.testing.assert_close(wide.score_rows(rows), net.score_rows(rows))
    assert warm_start(narrow, "cpu", lora_layers=1).config.lora_layers == 1  # not asked to widen
    with pytest.raises(ValueError, match="narrow"):
        wide.widen_lora(2)
    other = load_model(narrow, device="cpu")
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    other.widen_lora(3)
    assert torch.equal(torch.rand(1), expected)  # widening leaves the caller's RNG where it was
    torch.testing.assert_close(other.trainable_state(), wide.trainable_state())  # the same new adapters
    again = load_model(save_checkpoint(wide, tmp_path / "wide"), device="cpu")  # the widened parts load back
    assert again.config.lora_layers == 3 and set(again.trainable_state()) == set(wide.trainable_state())
    bottom = [p for n, p in wide.named_parameters() if n.startswith("layers.0.") and ".lora_b" in n]
    assert bottom and all(torch.count_nonzero(p) == 0 for p in bottom)
    wide.train()
    loss = -wide.score_rows(rows).sum()
    loss.backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in bottom)


def test_save_and_resume_continue_the_same_run(tmp_path):
    trainer = _trainer()
    trainer.set_stage(1)
    trainer.train_step()
    trainer.save(tmp_path, {"note": "t"})
    meta = json.loads((tmp_path / "training.json").read_text())
    assert meta["steps"] == 1 and meta["train_models"] == ["alg", "bio", "none"]
    assert meta["paper_weight"] == 1.0 and meta["profile_noise"] == 0.0  # how the weights were trained
    expected = trainer.train_step()
    other = _trainer()
    other.model.load_trainable_state({k: v for k, v in _load(tmp_path).items()})
    other.args.lr = 0.5  # the learning rate of the resuming invocation wins over the saved one
    other.resume(tmp_path)
    assert other.step == 1 and other.optimizer.param_groups[0]["lr"] == 0.5
    other.optimizer.param_groups[0]["lr"] = trainer.args.lr
    got = other.train_step()
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_a_kill_between_the_checkpoint_and_the_state_still_resumes_the_same_run(tmp_path):
    """The state is written last and holds the weights: a kill after the checkpoint's files were
    replaced but before the state was leaves weights a step ahead, and a resume must not use them."""
    from scorer.inference import save_checkpoint

    trainer = _trainer()
    trainer.set_stage(1)
    trainer.train_step()
    trainer.save(tmp_path, {}, ema=1.25)
    expected = trainer.train_step()
    save_checkpoint(trainer.model, tmp_path, trainer.meta(tmp_path, {}))  # ... killed before the state
    assert not list(tmp_path.glob("*.tmp"))
    other = _trainer()
    other.model.load_trainable_state(_load(tmp_path))  # what load_model reads: a step ahead
    assert other.resume(tmp_path) == 1.25 and other.step == 1
    got = other.train_step()
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_psis_tuned_layers_alone_are_a_reason_for_stage_two():
    from scorer.modeling import ModelSATConfig
    from scorer.training import has_stage_two

    assert has_stage_two(ModelSATConfig(lora_rank=0, encoder_train_layers=1))
    assert has_stage_two(ModelSATConfig(lora_rank=8, encoder_train_layers=0))
    assert not has_stage_two(ModelSATConfig(lora_rank=0, encoder_train_layers=0))


def test_a_resume_drops_the_log_lines_of_the_steps_it_runs_again(tmp_path):
    from scorer.training import _truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    _truncate_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_a_resumed_run_keeps_the_best_validation_of_the_runs_before_it(tmp_path):
    from scorer.training import _best_so_far

    assert _best_so_far(tmp_path) == -1.0  # nothing saved yet: any validation is an improvement
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "training.json").write_text('{"val_routing_acc": 0.65, "steps": 250}')
    assert _best_so_far(tmp_path) == 0.65  # a resumed run must beat 0.65 to replace out/best
    (tmp_path / "best" / "training.json").write_text("{not json")
    assert _best_so_far(tmp_path) == -1.0


def _load(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.data
def test_real_pools_hold_out_suite_questions_validation_and_excluded_models(shared_data):
    from scorer.aptitude import load_suite
    from scorer.data import load_dataset
    from scorer.training import build_pools

    data = load_dataset(shared_data / "mmlu_pro")
    pool, val, suite = build_pools(data, "mmlu_pro", ["gemma-7b", "Yi-34B"], 50, 0)
    assert "gemma-7b" not in pool.models and "Yi-34B" not in pool.models and len(pool.models) == 22
    assert all(data.prompt(q).split == "train" for q in load_suite("mmlu_pro").question_ids)
    assert len(val.instructions) == 50 and not set(val.instructions) & set(pool.instructions)
    assert len(pool.instructions) + 50 + len(suite.question_ids) <= len(data.split("train"))
    assert len(pool.instructions) + 50 + len(suite.question_ids) > len(data.split("train")) - 20
    assert pool.correct.shape == (len(pool.instructions), 22)


@pytest.mark.data
def test_real_pools_blend_the_category_prior_into_the_neighbour_targets(shared_data, monkeypatch):
    import scorer.embeddings as embeddings
    from scorer.data import load_dataset
    from scorer.training import blend_targets, build_pools, category_key, category_means, neighbour_targets

    def vectors(data, embedder):  # stands in for MiniLM: any fixed unit vectors will do here
        v = np.random.default_rng(0).normal(size=(len(data.prompts), 8)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setattr(embeddings, "dataset_embeddings", vectors)
    data = load_dataset(shared_data / "routerdc")
    plain, _, _ = build_pools(data, "routerdc", [], 50, 0, neighbours=20)
    blended, _, _ = build_pools(data, "routerdc", [], 50, 0, neighbours=20, category_prior=0.7)
    train = data.split("train")
    rows = train.subset(train.rows(plain.ids))
    keys = np.array([category_key(p) for p in rows.prompts])
    knn = neighbour_targets(vectors(rows, None), plain.correct, 20)
    assert np.allclose(plain.soft, knn, equal_nan=True)
    expected = blend_targets(plain.soft, category_means(plain.correct, keys), 0.7)
    assert np.allclose(blended.soft, expected, equal_nan=True)
    assert not np.allclose(blended.soft, plain.soft, equal_nan=True)


def test_paper_layout_trains_through_full_rows():
    # capability first: its signal must cross the whole instruction to reach the score, so the tiny
    # network needs gentler steps than instruction-first (3e-2 makes it collapse to a constant score)
    trainer = _trainer(lr_stage2_connector=3e-3, lr_lora=3e-3)
    trainer.model.config = trainer.model.config.with_layout("paper")
    trainer.set_stage(2)
    before = _fixed_loss(trainer)
    for _ in range(40):
        trainer.train_step()
    assert _fixed_loss(trainer) < before - 0.1


@pytest.mark.gpu
def test_training_runs_on_cuda_and_saves_cpu_tensors(tmp_path):
    trainer = _trainer(lr_stage2_connector=3e-2, lr_lora=1e-2)
    trainer.model.to("cuda")
    trainer.set_stage(2)
    before = _fixed_loss(trainer)
    for _ in range(40):
        trainer.train_step()
    assert _fixed_loss(trainer) < before - 0.2
    trainer.save(tmp_path, {})
    assert json.loads((tmp_path / "training.json").read_text())["device"].startswith("cuda")
    assert all(t.device.type == "cpu" for t in _load(tmp_path).values())


def test_profile_noise_changes_every_accuracy_in_whole_percents_and_is_off_by_default():
    profile = {"algebra": 0.9, "biology": 0.1, "law": 0.3, "history": 0.0}
    assert _trainer()._noisy(profile) is profile
    trainer = _trainer(profile_noise=0.1)
    draws = [trainer._noisy(profile) for _ in range(50)]
    assert all(set(d) == set(profile) for d in draws)
    assert all(0.0 <= v <= 1.0 and abs(v * 100 - round(v * 100)) < 1e-6 for d in draws for v in d.values())
    spread = np.std([d["law"] for d in draws])
    assert 0.05 < spread < 0.15
    trainer.set_stage(1)
    trainer.train_step()  # noisy clauses are encoded on the fly when not precomputed


def test_neighbour_targets_average_the_nearest_other_rows_and_skip_unknown_outcomes():
    from scorer.training import neighbour_targets

    # rows 0-2 point one way, rows 3-4 the other; row 0 is never its own neighbour
    v = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.1, 0.99]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    correct = np.array([[1, 0], [0, 1], [0, np.nan], [1, 1], [0, 0]], dtype=float)
    soft = neighbour_targets(v, correct, k=2, chunk=2)  # chunks smaller than the data: same answer
    assert soft[0].tolist() == [0.0, 1.0]          # rows 1 and 2; row 2's NaN is left out
    assert soft[3].tolist() == [0.0, 0.0]          # row 4 and the nearest of 0-2 (row 2: 0, NaN)
    assert soft[2].tolist() == [0.5, 0.5]          # rows 1 and 0
    only_nan = neighbour_targets(v[:2], np.array([[1, np.nan], [0, np.nan]]), k=1)
    assert np.isnan(only_nan[:, 1]).all() and only_nan[:, 0].tolist() == [0.0, 1.0]


def test_category_means_leave_the_row_out_and_skip_unknown_outcomes():
    from scorer.training import category_means

    correct = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0]], dtype=float)
    means = category_means(correct, np.array(["a", "a", "a", "b"]))
    assert means[0].tolist() == [0.5, 1.0]   # rows 1 and 2; row 1's NaN is left out
    assert means[1].tolist() == [1.0, 0.5]   # its own NaN does not remove another row's outcome
    assert means[2].tolist() == [0.5, 0.0]
    assert np.isnan(means[3]).all()          # alone in its category: nothing to average


def test_category_shrink_pulls_a_small_category_toward_its_data_sets_mean():
    from scorer.training import category_means

    # data set "d": category "a" (rows 0-2) and "b" (rows 3-4); one model
    correct = np.array([[1], [1], [0], [0], [0]], dtype=float)
    keys, parents = np.array(["a", "a", "a", "b", "b"]), np.array(["d"] * 5)
    plain = category_means(correct, keys)
    assert category_means(correct, keys, parents, 0.0).tolist() == plain.tolist()
    pulled = category_means(correct, keys, parents, 2.0)
    # row 0: its category's other rows average 0.5 over n=2; the data set's other rows 0.25 over 4
    assert pulled[0, 0] == pytest.approx((2 * 0.5 + 2 * 0.25) / 4)
    # row 3: "b"'s other row 0.0 (n=1); the data set's others 2/4
    assert pulled[3, 0] == pytest.approx((1 * 0.0 + 2 * 0.5) / 3)
    # a category with no other row falls back on the data set's mean
    lone = category_means(correct, np.array(["a", "a", "a", "b", "c"]), parents, 2.0)
    assert lone[4, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pseudo-count"):
        from scorer.training import build_sources
        build_sources(_args(data="/nonexistent", category_prior=0.5, neighbours=50, category_shrink=-1))


def test_category_accuracies_key_rows_by_category_else_data_set_and_shrink_toward_the_data_set():
    from types import SimpleNamespace

    from scorer.training import category_accuracies, category_means

    prompts = [SimpleNamespace(category="a", dataset="d"), SimpleNamespace(category="a", dataset="d"),
               SimpleNamespace(category="", dataset="d"), SimpleNamespace(category="", dataset="d"),
               SimpleNamespace(category="", dataset="e")]
    correct = np.array([[1], [0], [1], [1], [0]], dtype=float)
    keys, parents = np.array(["a", "a", "d", "d", "e"]), np.array(["d", "d", "d", "d", "e"])
    assert np.allclose(category_accuracies(prompts, correct), category_means(correct, keys), equal_nan=True)
    assert np.allclose(category_accuracies(prompts, correct, 2.0), category_means(correct, keys, parents, 2.0),
                       equal_nan=True)
    assert category_accuracies(prompts, correct)[0, 0] == 0.0  # row 1's outcome, row 0 left out


def test_blend_targets_weigh_the_prior_and_fall_back_on_whichever_is_known():
    from scorer.training import blend_targets

    soft = np.array([[0.0, 1.0, np.nan, np.nan]], dtype=np.float32)
    prior = np.array([[1.0, 0.0, 0.4, np.nan]], dtype=np.float32)
    out = blend_targets(soft, prior, 0.7)
    assert out[0, :3].tolist() == pytest.approx([0.7, 0.3, 0.4]) and np.isnan(out[0, 3])
    assert blend_targets(soft, prior, 0.0)[0, :2].tolist() == [0.0, 1.0]


def _soft_trainer(**kw) -> Trainer:
    trainer = _trainer(**kw)
    pool = trainer.pool
    # denoised targets: on algebra 'alg' 0.9, on biology 'bio' 0.9, elsewhere all alike
    pool.soft = np.where(pool.correct == 1, 0.9, 0.2).astype(np.float32)
    return trainer


def test_neighbour_targets_make_the_route_loss_a_soft_cross_entropy():
    trainer = _soft_trainer(group_models=3, target_temperature=0.1)
    src = trainer.sources[0]
    for r in range(8):
        group = trainer._soft_group(r, 2, src)
        assert group[0] == 2 and sorted(group) == [0, 1, 2]  # every model has a target: no right/wrong needed
    # an untrained network scores the three alike: the loss is the target's cross-entropy with uniform
    _, route = trainer.group_losses()
    assert route.item() == pytest.approx(math.log(3), abs=0.3)
    trainer.pool.soft[:, 1] = np.nan  # a model without a target never enters a group
    assert 1 not in trainer._soft_group(0, 0, src) and trainer._soft_group(0, 1, src) == []


def test_training_on_neighbour_targets_learns_the_routing():
    trainer = _soft_trainer(lr_stage2_connector=3e-2, lr_lora=1e-2, target_temperature=0.1)
    trainer.set_stage(2)
    before = _fixed_loss(trainer)
    for _ in range(40):
        trainer.train_step()
    assert _fixed_loss(trainer) < before - 0.2


def test_neighbours_is_parsed_and_off_by_default():
    assert _args().neighbours == 0
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--neighbours", "50", "--target-temperature", "0.1"])
    assert (a.neighbours, a.target_temperature) == (50, 0.1)
    assert a.category_prior == 0.0 and p.parse_args(["--category-prior", "0.7"]).category_prior == 0.7


def test_the_split_follows_split_seed_so_a_warm_start_can_change_seed_and_keep_its_validation(monkeypatch):
    import scorer.training as training

    seeds = []

    def pools(data, suite, exclude, val_size, seed, neighbours=0, category_prior=0.0, category_shrink=0.0):
        seeds.append(seed)
        return _pool(), _pool(8), tiny.suite()

    monkeypatch.setattr(training, "load_dataset", lambda folder: folder)
    monkeypatch.setattr(training, "build_pools", pools)
    p = argparse.ArgumentParser()
    add_arguments(p)
    for argv, split in ((["--seed", "3"], 3), (["--seed", "3", "--split-seed", "0"], 0)):
        a = p.parse_args(["--data", "d1,d2", *argv])
        training.build_sources(a)
        assert seeds[-2:] == [split, split]  # the groups' draws still follow --seed (Trainer's rng)
        trainer = Trainer(tiny.build(accuracy_feature=True), None, [], a)
        assert trainer.meta(None, {})["split_seed"] == split


def test_paper_weight_scales_the_papers_term_in_the_step_loss():
    def step_loss(**kw) -> dict:
        trainer = _trainer(**kw)
        trainer.set_stage(2)
        return trainer.train_step()

    full, quarter, none = step_loss(), step_loss(paper_weight=0.25), step_loss(paper_weight=0.0)
    # the same seed draws the same first group: same paper and route terms, differently weighted
    assert quarter["paper"] == pytest.approx(full["paper"]) and none["route"] == pytest.approx(full["route"])
    assert full["loss"] == pytest.approx(full["paper"] + full["route"], rel=1e-5)
    assert quarter["loss"] == pytest.approx(0.25 * full["paper"] + full["route"], rel=1e-5)
    assert none["loss"] == pytest.approx(full["route"], rel=1e-5)


@pytest.fixture()
def tiny_run(tmp_path):
    """``satroute train`` arguments for a two-step run of the tiny network on a tiny data folder
    (models 'alg' and 'bio' right on their topic's questions, 'none' never) with its own suite."""
    from scorer.aptitude import Suite, Task
    from scorer.data import write_dataset

    words = {"algebra": "equation", "biology": "cells", "law": "court", "history": "war"}
    prompts, outcomes, suite_ids = [], [], {t: [] for t in TOPICS}
    for i in range(32):
        topic = TOPICS[i % 4]
        pid, split = f"q{i}", "train" if i < 24 else "test"
        prompts.append({"id": pid, "dataset": "tiny", "category": topic, "split": split,
                        "question": f"what is {topic} {words[topic]} {i % 10} ?"})
        if split == "train" and len(suite_ids[topic]) < 2:
            suite_ids[topic].append(pid)
        outcomes += [(pid, "alg", float(topic == "algebra")), (pid, "bio", float(topic == "biology")),
                     (pid, "none", 0.0)]
    folder = write_dataset(tmp_path / "tinydata", prompts, outcomes)
    suite = Suite("tinysuite", 1, tuple(Task(t, tiny.suite().task(t).keywords, tuple(suite_ids[t])) for t in TOPICS))
    suite.save(tmp_path / "tinysuite.json")
    enc, llm = tiny.save_backbones(tmp_path / "backbones")

    def argv(*extra: str) -> list[str]:
        return ["--data", str(folder), "--suite", str(tmp_path / "tinysuite.json"), "--out", str(tmp_path / "out"),
                "--encoder", enc, "--llm", llm, "--n-layers", "3", "--lora-rank", "2", "--lora-layers", "1",
                "--stage1-steps", "1", "--stage2-steps", "1", "--val-every", "1", "--val-size", "4", "--k", "2",
                "--group-models", "2", "--threads", str(torch.get_num_threads()), *extra]

    return argv


def test_a_new_run_into_an_old_out_folder_starts_a_new_log(tiny_run, tmp_path):
    from scorer.training import main

    log = tmp_path / "out" / "log.jsonl"
    assert main(tiny_run()) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    assert main(tiny_run()) == 0  # not --resume: the old run's lines go
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_resume_without_a_saved_state_says_it_starts_a_new_run(tiny_run, tmp_path, capsys):
    from scorer.training import main

    assert main(tiny_run("--resume")) == 0
    assert f"--resume: no train_state.pt in {tmp_path / 'out'}; starting a new run" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("--exclude-models", "ALG"), "--exclude-models: 'ALG' in no --data folder"),
    (("--val-models", "alg,Bio"), "--val-models: 'Bio' in no --data folder"),
    (("--suite", "mmlu_pro"), "no model has an outcome on a question of suite 'mmlu_pro' in .*: its train split "
                              "holds none of them"),
    (("--exclude-models", "alg,bio,none"), "every model of .* is excluded"),
    (("--k", "20"), "no model of tinydata has a train instruction it got right and 19 it got wrong"),
    (("--data-weights", "a"), "--data-weights takes numbers"),
    (("--suite", "nosuch"), "no aptitude suite at"),
    (("--init", "/nonexistent"), "no Model-SAT checkpoint in /nonexistent"),
    (("--data", "/nonexistent"), "/nonexistent holds no prompts.jsonl.gz"),
    (("--category-prior", "2", "--neighbours", "5"), "--category-prior is a weight between 0 and 1"),
    (("--n-layers", "0"), "--n-layers is 0; it takes 1 or more"),
    (("--val-size", "0"), "--val-size is 0; it takes 1 or more"),
    (("--accumulate", "0"), "--accumulate is 0; it takes 1 or more"),
    (("--group-models", "1"), "--group-models is 1; a routing group is one model"),
    (("--device", "gpu"), "--device takes cpu or cuda"),
    (("--val-size", "100000"), "--val-size 100000 leaves no train prompt of .* to train on"),
    (("--llm-train-layers", "5"), "--llm-train-layers 5 is more than the 3 layers of phi kept"),
    (("--threads", "0"), "--threads is 0; it takes 1 or more"),
    (("--llm", "/nonexistent/phi"), "cannot load LLM"),
])
def test_a_mistake_is_one_line_and_exit_2(tiny_run, capsys, flags, message):
    from scorer.training import main

    assert main(tiny_run(*flags)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()  # but the profiles' coverage, said before the run goes on
             if line.startswith("satroute train:") and " profiles computed from " not in line]
    assert len(lines) == 1 and re.match(f"satroute train: {message}", lines[0]), err


def test_a_run_that_tunes_phi_fully_without_lora_saves_a_checkpoint_that_loads(tiny_run, tmp_path):
    from scorer.inference import load_model
    from scorer.training import main

    assert main(tiny_run("--llm-train-layers", "1", "--lora-rank", "0")) == 0
    model = load_model(tmp_path / "out", device="cpu")
    assert model.config.llm_train_layers == 1 and model.config.lora_rank == 0
    assert any(k.startswith("layers.2.") for k in model.trainable_state())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_where_there_is_none_is_one_line_and_exit_2(tiny_run, capsys):
    from scorer.training import main

    assert main(tiny_run("--device", "cuda")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "satroute train: --device cuda: this torch sees no CUDA device"


def test_a_cuda_device_past_the_machine_s_count_is_one_line_and_exit_2(tiny_run, capsys, monkeypatch):
    from scorer.training import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(tiny_run("--device", "cuda:1")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "satroute train: --device cuda:1: this machine's CUDA devices are cuda:0")


def test_the_log_writes_null_where_a_figure_is_not_a_number(tiny_run, tmp_path, monkeypatch):
    """A validation slice with no outcome gives NaN, which is no JSON."""
    from scorer.training import Trainer, main

    monkeypatch.setattr(Trainer, "validate", lambda self: float("nan"))
    assert main(tiny_run()) == 0
    lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the log")) for line in lines]
    assert any("val_routing_acc" in r and r["val_routing_acc"] is None for r in records)


def test_a_folder_without_a_train_split_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    from scorer.data import write_dataset
    from scorer.training import main

    folder = write_dataset(tmp_path / "testonly", [{"id": "q1", "split": "test", "question": "what?"}], [("q1", "a", 1)])
    assert main(tiny_run("--data", str(folder))) == 2
    assert capsys.readouterr().err == "satroute train: no prompts in split 'train' (the splits found: 'test')\n"


def test_a_thin_profile_is_refused_and_the_coverage_of_each_is_said(tiny_run, tmp_path, capsys):
    """Every training profile is computed from the folder: on under half the suite's questions it is noise."""
    from scorer.aptitude import Suite, Task, load_suite
    from scorer.training import main

    assert main(tiny_run()) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "computed from" in line]
    assert notes == [f"satroute train: 3 profiles computed from {tmp_path / 'tinydata'}, each on 8 of the 8 "
                     "questions of suite 'tinysuite'"]
    full = load_suite(tmp_path / "tinysuite.json")  # 2 questions a task: add 3 the folder lacks to each
    padded = Suite("padded", 1, tuple(Task(t.id, t.keywords, t.question_ids + ("x1", "x2", "x3")) for t in full.tasks))
    padded.save(tmp_path / "padded.json")
    assert main(tiny_run("--suite", str(tmp_path / "padded.json"), "--allow-partial-profiles",
                         "--stage1-steps", "0", "--stage2-steps", "0")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "computed from" in line]
    assert notes[1:] == [f"satroute train: profile of {m!r} computed from {tmp_path / 'tinydata'}: 8 of the 20 "
                         "questions of suite 'padded' (4 of its 4 tasks)" for m in ("alg", "bio", "none")], notes
    assert main(tiny_run("--suite", str(tmp_path / "padded.json"))) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"satroute train: the profile of model 'alg' computed from {tmp_path / 'tinydata'} rests on 8 of the 20 "
        "questions of suite 'padded' (4 of its 4 tasks), under 50%: too thin to route by (--allow-partial-profiles "
        "uses it anyway); training computes every profile from the folder's train split, which must hold the "
        "suite's questions; otherwise leave the model out (--exclude-models)")
    assert main(tiny_run("--suite", str(tmp_path / "padded.json"), "--allow-partial-profiles")) == 0


@pytest.mark.parametrize("flag", ["--val-every", "--k"])
def test_counts_that_must_be_positive_are_checked_when_parsed(flag):
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args([flag, "0"])


@pytest.mark.parametrize("flags, message", [
    (("--target-temperature", "0"), "--target-temperature is 0.0; it takes a number above 0"),
    (("--target-temperature=-0.5",), "--target-temperature is -0.5; it takes a number above 0"),
    (("--data-weights", "0"), "--data-weights takes weights of 0 or more, at least one above 0, not '0'"),
    (("--data-weights=-1",), "--data-weights takes weights of 0 or more, at least one above 0, not '-1'"),
    (("--data-weights", "nan"), "--data-weights takes weights of 0 or more, at least one above 0, not 'nan'"),
    (("--data-weights", "1,1"), r"--suite and --data-weights need one value per --data folder \(or one suite for all\)"),
    (("--budget-minutes=-1",), r"--budget-minutes is -1.0; it takes 0 \(no limit\) or more"),
    (("--lora-layers", "4"), r"--lora-layers 4 is more than the 3 layers of phi kept \(--n-layers\)"),
    (("--category-prior", "0.5"), "--category-prior blends into the --neighbours targets: give --neighbours K too"),
    (("--neighbours", "5", "--category-prior", "2"), "--category-prior is a weight between 0 and 1"),
    (("--category-shrink=-1",), "--category-shrink is a pseudo-count, 0 or more"),
])
def test_an_option_value_no_run_can_use_is_refused_before_out_is_created(tiny_run, tmp_path, capsys, flags,
                                                                            message):
    from scorer.training import main

    assert main(tiny_run(*flags)) == 2
    assert re.fullmatch(f"satroute train: {message}\n", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    from scorer.training import main

    (tmp_path / "file").write_text("not a folder")
    assert main(tiny_run("--out", str(tmp_path / "file"))) == 2
    assert capsys.readouterr().err == f"satroute train: --out {tmp_path / 'file'} is a file, not a folder\n"
    assert main(tiny_run("--out", str(tmp_path / "file" / "out"))) == 2  # a file in its path
    assert capsys.readouterr().err == f"satroute train: --out {tmp_path / 'file' / 'out'}: Not a directory\n"


def test_a_resume_takes_its_network_from_the_run_so_n_layers_does_not_bound_its_layers(tiny_run, tmp_path):
    from scorer.inference import load_model
    from scorer.training import main

    assert main(tiny_run("--lora-layers", "2")) == 0
    assert main(tiny_run("--lora-layers", "2", "--n-layers", "1", "--stage2-steps", "2", "--resume")) == 0
    config = load_model(tmp_path / "out", device="cpu").config
    assert (config.n_layers, config.lora_layers) == (3, 2)


def test_a_loss_that_is_not_finite_stops_the_run_before_it_reaches_the_weights(tiny_run, tmp_path, capsys,
                                                                                monkeypatch):
    from safetensors.torch import load_file

    from scorer.training import main

    original, calls = Trainer.group_losses, []

    def diverging(self):
        paper, route = original(self)
        calls.append(1)
        return (paper * float("nan") if len(calls) > 1 else paper), route

    monkeypatch.setattr(Trainer, "group_losses", diverging)
    assert main(tiny_run()) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "satroute train: the loss of step 2 is nan: training diverged; stopped before it reached the weights "
        "(--out keeps the last saved ones)")
    out = tmp_path / "out"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    for folder in (out, out / "best"):
        assert not any(v.isnan().any() for v in load_file(folder / "model.safetensors").values())
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 1


def test_a_data_file_that_is_not_gzip_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    from scorer.training import main

    outcomes = tmp_path / "tinydata" / "outcomes.csv.gz"
    outcomes.write_text("prompt_id,model,score\nq1,alg,1\n")
    assert main(tiny_run()) == 2
    assert capsys.readouterr().err == f"satroute train: {outcomes}: not a gzip file\n"



@pytest.fixture()
def signals_caught():
    """SIGINT and SIGTERM do nothing to the test process outside the code under test (which
    catches them while it trains)."""
    import signal

    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _signal_at(monkeypatch, step: int, *signums: int) -> None:
    """Trainer.train_step sends the process ``signums``, one after the other, during step ``step``."""
    import os

    original = Trainer.train_step

    def train_step(self):
        rec = original(self)
        if self.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return rec

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _logged_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_the_step_in_progress_and_resume_continues_from_it(tiny_run, tmp_path, capsys, monkeypatch,
                                                                         signals_caught, signame, status):
    """Ctrl+C (or a container's stop) ends the run after the step it interrupts, saved: nothing
    since the last save is lost, and --resume runs each step once."""
    import signal

    from scorer.training import main

    out = tmp_path / "out"
    flags = ("--stage2-steps", "6", "--val-every", "100")  # no validation, so no save, before the end
    _signal_at(monkeypatch, 3, getattr(signal, signame))
    assert main(tiny_run(*flags)) == status
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"interrupted: step 3/7 saved in {out}; run the same command with --resume "
                                    "to continue")
    assert "Traceback" not in err
    assert _logged_steps(out) == [1, 2, 3]
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 3
    monkeypatch.undo()
    assert main(tiny_run(*flags, "--resume")) == 0
    assert "starting a new run" not in capsys.readouterr().err
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6, 7]


def test_a_second_signal_stops_at_once_and_the_last_save_stands(tiny_run, tmp_path, capsys, monkeypatch,
                                                                signals_caught):
    import signal

    from scorer.training import main

    out = tmp_path / "out"
    flags = ("--stage2-steps", "6", "--val-every", "2")  # saved at step 2
    _signal_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    assert main(tiny_run(*flags)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted again: stopped at once; step 2/7 is saved in {out}; run the same command with --resume to "
        "continue from it")
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 2
    monkeypatch.undo()
    assert main(tiny_run(*flags, "--resume")) == 0
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6, 7]


def test_ctrl_c_before_training_began_is_one_line_and_exit_130(tiny_run, capsys, monkeypatch):
    from scorer import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "build_sources", interrupted)
    try:
        status = training.main(tiny_run())
    except KeyboardInterrupt:
        pytest.fail("Ctrl+C before the first step is a traceback")
    assert status == 130
    assert capsys.readouterr().err == "interrupted\n"



@pytest.mark.parametrize("damage, message", [
    (lambda good: good[:1000], "is damaged, or not a training state: PytorchStreamReader failed"),
    (lambda good: b"garbage\n", "is damaged, or not a training state: "),
    (lambda good: b"", "is damaged, or not a training state: Ran out of input"),
], ids=["cut-short", "not-a-state", "empty"])
def test_a_damaged_training_state_is_one_line_naming_it_and_exit_2(tiny_run, tmp_path, capsys, damage, message):
    """A state file cut short (a full disk, a copy that stopped), or not one at all."""
    from scorer.training import main

    assert main(tiny_run()) == 0
    state = tmp_path / "out" / "train_state.pt"
    state.write_bytes(damage(state.read_bytes()))
    capsys.readouterr()
    assert main(tiny_run("--stage2-steps", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(re.escape(f"satroute train: {state} ") + message + ".*\n", err.splitlines(True)[-1])
    assert "Traceback" not in err


# a pickle of a class from a package this environment lacks: another tool's checkpoint
_FOREIGN = (b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x0elightning_fake\x94\x8c\x05Thing"
            b"\x94\x93\x94)\x81\x94.")


def _with_rng(state: dict) -> dict:
    return {**state, "torch_rng": torch.zeros(3, dtype=torch.uint8)}  # a generator state of another size


@pytest.mark.parametrize("write, said", [
    (lambda path: torch.save({"step": 2}, path), "is not a training state of this run's network: KeyError: 'stage'"),
    (lambda path: torch.save(torch.zeros(3), path),
     "is not a training state of this run's network: it holds a Tensor"),
    (lambda path: path.write_bytes(_FOREIGN), "is damaged, or not a training state: No module named 'lightning_fake'"),
    (lambda path: torch.save(_with_rng(torch.load(path, weights_only=False)), path),
     "is not a training state of this run's network: RuntimeError"),
], ids=["keys", "tensor", "foreign-class", "rng-size"])
def test_a_training_state_of_another_kind_is_one_line_naming_it_and_exit_2(tiny_run, tmp_path, capsys, write, said):
    from scorer.training import main

    assert main(tiny_run()) == 0
    state = tmp_path / "out" / "train_state.pt"
    write(state)
    capsys.readouterr()
    assert main(tiny_run("--stage2-steps", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"satroute train: {state} {said}") and "Traceback" not in err


def test_the_progress_bar_draws_at_its_own_pace_not_once_a_step(tiny_run, tmp_path, capsys, monkeypatch):
    """stderr sent to a log: a line per step (thousands an hour) was written there, though the
    bar is set to redraw every 10 s at most; it still shows the loss and stage when it draws."""
    from scorer.training import main

    def fast_step(self):
        self.step += 1
        return {"loss": 1.25, "paper": 1.25, "route": 0.0}

    monkeypatch.setattr(Trainer, "train_step", fast_step)
    assert main(tiny_run("--stage2-steps", "499", "--val-every", "1000")) == 0
    err = capsys.readouterr().err
    draws = [line for line in err.split("\r") if line.startswith("capability tuning")]
    assert len(draws) <= 4, f"{len(draws)} draws for 500 steps"
    assert "500/500" in draws[-1] and "loss=1.250, stage=2" in draws[-1]


def test_help_describes_every_option_and_gives_its_default():
    """`satroute train --help` listed eight options with no word on what they do, and no default."""
    p = argparse.ArgumentParser(prog="satroute train")
    add_arguments(p)
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert [a.option_strings[0] for a in options if not a.help] == []
    formatter = p._get_formatter()

    def shown(flag: str) -> str:
        action = next(a for a in options if flag in a.option_strings)
        return formatter._get_help_string(action) % {"default": action.default}

    for flag, default in [("--variant", "encoder"), ("--encoder", "default:minilm"), ("--llm", "default:smollm2"),
                          ("--n-layers", "4"), ("--max-instruction-tokens", "64"), ("--text-max-tasks", "12"),
                          ("--min-task-frac", "0.3"), ("--seed", "0"), ("--stage2-steps", "400"),
                          ("--save-every-minutes", "10")]:
        assert shown(flag).endswith(f" (default: {default})"), flag
    # an option whose help says its default in words is not given a second one
    assert shown("--device").count("default") == 1 and shown("--split-seed").count("(default") == 1
    assert "(default: 4)" in " ".join(p.format_help().split())
