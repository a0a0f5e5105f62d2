"""The Model-SAT forward pass on a tiny random network: it must agree with the LLM's own forward."""
from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch

from scorer.modeling import ModelSAT, ModelSATConfig
from support import tiny_modelsat as tiny


def _full_logit(llm, ids, answer_id, n_layers=None):
    with torch.no_grad():
        out = llm(input_ids=torch.tensor([ids]), output_hidden_states=True)
    if n_layers is None:
        return out.logits[0, -1, answer_id]
    hidden = out.hidden_states[n_layers][0, -1]
    return llm.model.norm(hidden) @ llm.model.embed_tokens.weight[answer_id]


def _model(n_layers=3, **kw):
    tok, llm, enc = tiny.parts(0)
    return ModelSAT(ModelSATConfig(n_layers=n_layers, suite="tiny", **kw), enc, tok, llm, tok).eval(), llm


def test_yes_score_is_the_llm_logit_of_the_answer_token():
    model, llm = _model()
    ids = model.prefix_ids("what is algebra ?") + model.token_ids(model.config.tail)
    with torch.no_grad():
        score = model.score_rows([model.embed_ids(ids)])
    assert model.answer_id == model.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(score[0], _full_logit(llm, ids, model.answer_id), rtol=1e-4, atol=1e-4)


def test_truncated_phi_matches_the_hidden_state_of_that_layer():
    model, llm = _model(n_layers=2)
    assert len(model.layers) == 2
    ids = model.prefix_ids("biology cells") + model.token_ids(model.config.tail)
    with torch.no_grad():
        score = model.score_rows([model.embed_ids(ids)])
    torch.testing.assert_close(score[0], _full_logit(llm, ids, model.answer_id, n_layers=2), rtol=1e-4, atol=1e-4)


def test_shared_prefix_cache_equals_unshared_rows_for_ragged_suffixes():
    model, _ = _model(accuracy_feature=True)
    prefix = model.embed_ids(model.prefix_ids("what is the law of the market ?"))
    vecs = model.encode_clauses(['accuracy 50% on the task of "law"', 'accuracy 5% on the task of "war"',
                                 'accuracy 90% on the task of "cells"'])
    tail = model.embed_ids(model.token_ids(model.config.tail))
    with torch.no_grad():
        suffixes = [torch.cat([model.capability_embeds(vecs[:n], torch.rand(n)), tail]) for n in (3, 1, 2)]
        shared = model.score_shared(model.prefix_cache(prefix), suffixes)
        rows = model.score_rows([torch.cat([prefix, s]) for s in suffixes])
    assert shared.shape == (3,)
    torch.testing.assert_close(shared, rows, rtol=1e-4, atol=1e-4)


def test_capability_vectors_land_in_phi_space_and_use_the_accuracy_feature():
    model, _ = _model(accuracy_feature=True)
    vecs = model.encode_clauses(["accuracy 10% on the task of \"law\""] * 4)
    assert vecs.shape == (4, 32)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(4))
    low = model.capability_embeds(vecs, torch.zeros(4))
    high = model.capability_embeds(vecs, torch.ones(4))
    assert low.shape == (4, 64)
    assert not torch.allclose(low, high)
    plain, _ = _model(accuracy_feature=False)
    torch.testing.assert_close(plain.capability_embeds(vecs, torch.zeros(4)),
                               plain.capability_embeds(vecs, torch.ones(4)))


def test_lora_starts_as_identity_and_only_trained_parts_are_trainable():
    base, _ = _model()
    lora, _ = _model(lora_rank=4, lora_layers=1)
    ids = base.prefix_ids("history war") + base.token_ids(base.config.tail)
    with torch.no_grad():
        torch.testing.assert_close(lora.score_rows([lora.embed_ids(ids)]), base.score_rows([base.embed_ids(ids)]))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("connector.") or ".lora_" in n for n in names)
    assert all(n.startswith("connector.") or n.startswith("layers.2.") for n in names)
    assert set(lora.trainable_state()) == names


def test_text_variant_has_no_connector_and_config_round_trips(tmp_path):
    model, _ = _model(variant="text", text_max_tasks=3)
    assert not hasattr(model, "connector")
    model.config.save(tmp_path / "config.json")
    again = ModelSATConfig.load(tmp_path / "config.json")
    assert again == model.config
    assert ModelSATConfig.from_dict({**again.__dict__, "unknown_future_field": 1}) == again


@pytest.mark.parametrize("change, words", [
    ({"aptitude_weight": "8.0"}, "aptitude_weight must be a finite number"),
    ({"aptitude_weight": float("nan")}, "aptitude_weight must be a finite number"),
    ({"max_instruction_tokens": "64"}, "max_instruction_tokens must be int"),
    ({"n_layers": "4"}, "n_layers must be int"),
    ({"n_orders": 0}, "n_orders must be 1 or more"),
    ({"lora_rank": -1}, "lora_rank must be 0 or more"),
    ({"accuracy_feature": 1}, "accuracy_feature must be bool"),
    ({"lora_targets": "q_proj"}, "lora_targets must be list of strings"),
    ({"variant": "audio"}, "variant must be 'encoder' or 'text'"),
    ({"aptitude_wieght": 8.0}, "unknown field 'aptitude_wieght'; did you mean 'aptitude_weight'?"),
])
def test_a_config_no_network_can_be_scored_with_is_refused_naming_the_field(change, words):
    """config.json is edited by hand (its model card says how to set aptitude_weight): a value of
    the wrong type or range loaded fine and failed on every scoring call, or scored NaN; a
    misspelt field was dropped without a word."""
    with pytest.raises(ValueError, match=re.escape(words)):
        ModelSATConfig.from_dict({**asdict(ModelSATConfig()), **change})
    assert ModelSATConfig.from_dict({**asdict(ModelSATConfig()), "lora_alpha": 16}).lora_alpha == 16


def test_bfloat16_copy_keeps_rope_in_float32_and_close_scores():
    model, _ = _model()
    ids = model.prefix_ids("what is the history of the war ?") + model.token_ids(model.config.tail)
    with torch.no_grad():
        ref = model.score_rows([model.embed_ids(ids)])
        half = model.to(torch.bfloat16)
        got = half.score_rows([half.embed_ids(ids)])
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_a_bfloat16_network_reads_its_score_in_float32():
    """The logit is not rounded to bfloat16, whose steps (1/16 near 10) exceed many candidates' gaps."""
    model, _ = _model()
    model = model.to(torch.bfloat16)
    hidden = torch.randn(16, model.embed.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = model.answer_score(hidden.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    assert (scores != scores.to(torch.bfloat16).float()).any()  # finer than bfloat16 can hold


def test_instruction_vector_reads_past_phis_window_as_one_more_prefix_token():
    model, _ = _model(accuracy_feature=True, max_instruction_tokens=3)
    a, b = "what is algebra equation court war", "what is algebra cells history law"
    torch.testing.assert_close(model.instruction_embeds(a), model.embed_ids(model.prefix_ids(a)))
    torch.testing.assert_close(model.instruction_embeds(a), model.instruction_embeds(b))  # phi sees 3 tokens

    model.add_instruction_vector(64)
    assert model.config.instruction_vector_tokens == 64
    d_enc = model.encoder.config.hidden_size  # starts as the clause connector, less the accuracy column
    torch.testing.assert_close(model.instruction_connector.weight, model.connector.weight[:, :d_enc])
    with torch.no_grad():
        ea, eb = model.instruction_embeds(a), model.instruction_embeds(b)
    plain = model.embed_ids(model.prefix_ids(a))
    assert ea.shape[0] == plain.shape[0] + 1
    n_head = len(model.token_ids(model.config.head))
    torch.testing.assert_close(torch.cat([ea[:n_head], ea[n_head + 1:]]), plain)
    assert not torch.allclose(ea[n_head], eb[n_head])  # psi read the words phi's window cut off
    assert set(model.trainable_state()) >= {"instruction_connector.weight", "instruction_connector.bias"}


def test_instruction_vectors_are_encoded_once_per_instruction(monkeypatch):
    model, _ = _model(accuracy_feature=True, instruction_vector_tokens=32)
    calls = []
    encode = model._encode
    monkeypatch.setattr(model, "_encode", lambda texts, n, *r: calls.append((tuple(texts), n)) or encode(texts, n))
    with torch.no_grad():
        first = model.instruction_vector("law court")
        again = model.instruction_vector("law court")
        model.instruction_vector("history war")
    torch.testing.assert_close(first, again)
    assert calls == [(("law court",), 32), (("history war",), 32)]


def test_a_huge_instruction_is_cut_before_it_is_tokenized_and_reads_the_same():
    from scorer.modeling import CHARS_PER_TOKEN, head_text

    model, _ = _model(accuracy_feature=True, max_instruction_tokens=8, instruction_vector_tokens=16)
    text = "what is algebra ? the law of the market " * 5000  # 200,000 characters
    with torch.no_grad():
        expected_ids = model.token_ids(text)[:8]
        expected_vec = model.instruction_connector(model._encode([text], 16))
    lengths = []

    class Recording:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, texts, **kw):
            lengths.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
            return self.tok(texts, **kw)

        def __getattr__(self, name):  # pad_token_id and the like
            return getattr(self.tok, name)

    model.tokenizer, model.encoder_tokenizer = Recording(model.tokenizer), Recording(model.encoder_tokenizer)
    with torch.no_grad():
        assert model._instruction(text) == expected_ids  # its start is kept, as the tokenizers keep it
        torch.testing.assert_close(model.instruction_vector(text), expected_vec)
    assert lengths and max(lengths) <= 16 * CHARS_PER_TOKEN
    assert all(len(key) <= 16 * CHARS_PER_TOKEN for key in model._instruction_vectors)  # nor kept whole
    short = "what is algebra ?"
    assert head_text(short, 1) is short and head_text(text, 8) == text[:8 * CHARS_PER_TOKEN]


def _library_hidden(kind: str, **extra):
    """A tiny randomly initialised LLM of ``kind`` on the tiny vocabulary."""
    import transformers

    tok = tiny.tokenizer()
    config_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM"),
                             "gemma": ("GemmaConfig", "GemmaForCausalLM"),
                             "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                             "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                             "llama": ("LlamaConfig", "LlamaForCausalLM")}[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, **{"tie_word_embeddings": True, "pad_token_id": 1, **extra})
    return tok, getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "gemma", "phi3"])
def test_the_supported_architectures_run_as_their_library_does(kind):
    """Phi-3-mini (the issue's and the paper's GPU phi) was refused: its fused projections are
    split into LLaMA's, and the layers compute what Phi-3's do."""
    tok, llm = _library_hidden(kind)
    _, _, enc = tiny.parts(0)
    model = ModelSAT(ModelSATConfig(n_layers=2, suite="tiny"), enc, tok, llm, tok).eval()
    with torch.no_grad():
        x = model.embed_ids(model.token_ids("what is algebra ? Will a model with the following capability " * 3))
        ours = model.norm(model.run_layers(x[None])[0])[0]
        theirs = llm.model(inputs_embeds=x[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "own head"])
def test_the_yes_score_is_the_library_s_yes_logit_whether_or_not_the_head_is_tied(kind, tied):
    """Mistral-7B and Qwen2.5-7B have an LM head of their own: its 'Yes' row, not the embedding's."""
    tok, llm = _library_hidden(kind, tie_word_embeddings=tied)
    assert (llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()) == tied
    _, _, enc = tiny.parts(0)
    model = ModelSAT(ModelSATConfig(n_layers=2, suite="tiny"), enc, tok, llm, tok).eval()
    with torch.no_grad():
        x = model.embed_ids(model.token_ids("what is algebra ? Will a model with the following capability"))
        ours = model.answer_score(model.run_layers(x[None])[0][0, -1])
        theirs = llm(inputs_embeds=x[None]).logits[0, -1, model.answer_id]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, extra, message", [
    ("phi3", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
              "original_max_position_embeddings": 4096, "max_position_embeddings": 131072},
     "phi's RoPE scaling 'longrope' is not supported"),
    ("phi3", {"partial_rotary_factor": 0.5}, "phi's partial rotary factor 0.5 .*is not supported"),
    ("gemma2", {}, "'gemma2' model"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "RoPE scaling 'llama3'"),
])
def test_an_llm_the_forward_pass_would_compute_differently_is_refused(kind, extra, message):
    tok, llm = _library_hidden(kind, **extra)
    _, _, enc = tiny.parts(0)
    with pytest.raises(ValueError, match=message):
        ModelSAT(ModelSATConfig(n_layers=2, suite="tiny"), enc, tok, llm, tok)


@pytest.mark.parametrize("kind, extra, windowed", [
    ("phi3", {"sliding_window": 8}, [8, 8]),
    ("mistral", {"sliding_window": 8}, [8, 8]),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}, [None, 8]),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": False}, [None, None]),  # Qwen2.5's
])
def test_a_sliding_window_shorter_than_the_sequence_is_applied_as_the_library_does(kind, extra, windowed):
    """Phi-3-mini-4k's window (2047) and Mistral-7B-v0.1's (4096) were neither applied nor refused:
    past the window, plain causal attention scored something else (0.19 apart with a window of 8).
    Each path is checked: full rows of different lengths, and suffixes after a shared prefix."""
    tok, llm = _library_hidden(kind, **extra)
    _, _, enc = tiny.parts(0)
    model = ModelSAT(ModelSATConfig(n_layers=2, suite="tiny"), enc, tok, llm, tok).eval()
    assert model.windows == windowed
    ids = model.token_ids("what is algebra ? Will a model with the following capability handle it " * 2)
    prefix, suffixes = ids[:11], [ids[11:], ids[11:15], ids[11:24]]
    assert len(ids) > 20  # past the window of 8
    with torch.no_grad():
        theirs = torch.stack([llm(input_ids=torch.tensor([prefix + s])).logits[0, -1, model.answer_id]
                              for s in suffixes]).float()
        rows = model.score_rows([model.embed_ids(prefix + s) for s in suffixes])
        shared = model.score_shared(model.prefix_cache(model.embed_ids(prefix)),
                                    [model.embed_ids(s) for s in suffixes])
        x = model.embed_ids(ids)
        ours = model.norm(model.run_layers(x[None])[0])[0]
        hidden = llm.model(inputs_embeds=x[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared, theirs, rtol=1e-4, atol=1e-4)


def test_inputs_are_padded_to_few_lengths_and_the_padding_changes_nothing():
    """A CPU's kernel libraries keep what they built for each input shape: a length per
    instruction made a serving process grow by some 270 MB over 75 lengths (bfloat16)."""
    from scorer.modeling import PAD_MULTIPLE

    model, _ = _model(accuracy_feature=True, max_instruction_tokens=64, instruction_vector_tokens=64)
    words = "what is the law of the market and the history of war in cells".split()
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in range(1, 61)]
    seen = {"psi": set(), "phi": set()}
    hooks = [model.encoder.register_forward_pre_hook(
                 lambda _, args, kwargs: seen["psi"].add(kwargs["input_ids"].shape[1]), with_kwargs=True),
             model.layers[0].self_attn.q_proj.register_forward_pre_hook(
                 lambda _, args: seen["phi"].add(args[0].shape[1]))]
    with torch.no_grad():
        pasts = [model.prefix_cache(model.instruction_embeds(text)) for text in texts]
    for hook in hooks:
        hook.remove()
    assert all(n % PAD_MULTIPLE == 0 for n in seen["psi"] | seen["phi"])
    assert len(seen["psi"]) <= 64 // PAD_MULTIPLE and len(seen["phi"]) <= 6
    with torch.no_grad():
        for text, past in zip(texts, pasts):
            _, unpadded = model.run_layers(model.instruction_embeds(text)[None])
            for (k, v), (k0, v0) in zip(past, unpadded):  # the cut-back cache is the prefix's own
                torch.testing.assert_close(k, k0, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-5)
            tok = model.encoder_tokenizer([text], truncation=True, max_length=64, return_tensors="pt")
            hidden = model.encoder(**tok).last_hidden_state.mean(1)  # unpadded: every token real
            torch.testing.assert_close(model._encode([text], 64)[0],
                                       torch.nn.functional.normalize(hidden, dim=-1)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_instruction_is_read_by_psi_as_a_padded_masked_input(text):
    """The tiny tokenizer adds no [CLS]/[SEP]: an empty text has no token, and psi met a 0-length batch."""
    from scorer.modeling import PAD_MULTIPLE

    model, _ = _model(accuracy_feature=True, instruction_vector_tokens=8)
    lengths = []
    hook = model.encoder.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        vec = model._encode([text, "law court"], 8)
        embeds = model.instruction_embeds(text)
    hook.remove()
    assert lengths[-1] == PAD_MULTIPLE and torch.isfinite(vec).all() and torch.isfinite(embeds).all()
    assert not vec[0].any()  # no token to pool: a zero vector, not a mean over padding
