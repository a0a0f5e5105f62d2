"""A tiny randomly initialised Model-SAT (word-level tokenizer, 3-layer LLaMA, 1-layer BERT): no downloads."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scorer.aptitude import Suite, Task
from scorer.inference import ModelSATScorer
from scorer.modeling import ModelSAT, ModelSATConfig

WORDS = ("Yes No accuracy on the task of model Instruction Answer or Will a with following capability handle "
         "this instruction correctly Capability what is algebra biology law history physics chemistry "
         "economics cells equation court war energy atoms market prices % \" , . ? : 0 1 2 3 4 5 6 7 8 9 "
         "achieves The").split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def parts(seed: int = 0):
    """(tokenizer, LLaMA causal LM, BERT encoder), randomly initialised from ``seed``."""
    torch.manual_seed(seed)
    tok = tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0))
    enc = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64))
    return tok, llm.eval(), enc.eval()


def build(seed: int = 0, **overrides) -> ModelSAT:
    tok, llm, enc = parts(seed)
    config = ModelSATConfig(**{"n_layers": 3, "suite": "tiny", **overrides})
    return ModelSAT(config, enc, tok, llm, tok).eval()


def save_backbones(folder, seed: int = 0) -> tuple[str, str]:
    """Write the tiny backbones as HF folders; returns (encoder path, llm path) for a config."""
    tok, llm, enc = parts(seed)
    enc_dir, llm_dir = f"{folder}/encoder", f"{folder}/llm"
    enc.save_pretrained(enc_dir)
    tok.save_pretrained(enc_dir)
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    return enc_dir, llm_dir


def suite() -> Suite:
    tasks = (Task("algebra", ("algebra", "equation", "0", "1", "2"), ()),
             Task("biology", ("biology", "cells", "3", "4", "5"), ()),
             Task("law", ("law", "court", "6", "7", "8"), ()),
             Task("history", ("history", "war", "9", "0", "1"), ()))
    return Suite("tiny", 1, tasks)


# Three profiles over the tiny suite's tasks: one strong, one weak, one strong in algebra only.
PROFILES = {
    "strong": {"algebra": 0.9, "biology": 0.8, "law": 0.7, "history": 0.85},
    "weak": {"algebra": 0.1, "biology": 0.2, "law": 0.15, "history": 0.3},
    "mixed": {"algebra": 0.95, "biology": 0.05, "law": 0.5, "history": 0.4},
}


def scorer(**overrides) -> ModelSATScorer:
    """A ModelSATScorer over ``build(accuracy_feature=True, **overrides)`` and the tiny suite."""
    return ModelSATScorer(build(accuracy_feature=True, **overrides), suite())
