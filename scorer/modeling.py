"""The Model-SAT network, whole forward pass in one file: psi -> connector -> phi -> score of 'Yes'.

Owns: ``ModelSATConfig`` (everything needed to rebuild the network; saves to JSON), ``ModelSAT``
(capability encoder psi, one-layer connector W, the first ``n_layers`` decoder layers of the LLM phi
with its final norm and the LM-head row of the answer token: the embedding's where the head is
tied, else a copy of the head's own), the LoRA adapter used to tune
phi, and the two forward paths:

- ``score_rows``: right-padded full sequences, causal attention (training groups whose rows
  hold different instructions);
- ``score_shared``: one instruction prefix whose key/value cache is computed once and shared by a
  batch of candidate suffixes (inference, and the training groups over models for one instruction).

Layout of one capability instruction (instruction first, so its cache is shared by every candidate
and both re-orderings)::

    [HEAD instruction MID] [capability vectors (encoder variant) | capability text (text variant)] [TAIL]
     '------ prefix ------' '------------------------- candidate suffix --------------------------'

With ``instruction_vector_tokens`` > 0, psi's sentence vector of the instruction (read over psi's
own, longer window) goes through its own connector and sits just before the instruction's tokens,
in either layout: phi then sees the whole instruction's gist, not only its first
``max_instruction_tokens`` tokens.

The paper's layout (``layout="paper"``) puts the capability first, so every instruction token is
read in the light of the candidate's capability, at the price of computing the instruction once per
candidate and re-ordering instead of once per request (``score_rows``)::

    [PAPER_HEAD] [capability vectors | text] [PAPER_MID instruction PAPER_TAIL]

The score is ``h_last . H['Yes']`` (the raw 'Yes' logit; only that row of the head H, which is the
embedding E where phi ties them, is computed).

phi's layers are run by this file's own code, which computes exactly what the library does for the
architectures in ``SUPPORTED_LLMS`` with plain RoPE, their sliding attention windows included
(``_attention_windows``); another phi is refused when the network is built.

Does not know: profiles, suites or how clause texts are written (``scorer.capability``), data sets,
training loops, caching across requests (``scorer.inference``).
"""
from __future__ import annotations

import difflib
import json
import math
from collections import OrderedDict
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scorer.data import mended

HEAD = "<|im_start|>user\nInstruction: "
MID = ("\n\nWill a model with the following capability handle this instruction correctly?"
       "\nCapability:")
TAIL = "\nAnswer Yes or No.<|im_end|>\n<|im_start|>assistant\n"
# The paper's order: [capability, instruction, performance-inquiry prompt]
PAPER_HEAD = "<|im_start|>user\nCapability:"
PAPER_MID = "\n\nInstruction: "
PAPER_TAIL = ("\n\nWill a model with the above capability handle this instruction correctly? "
              "Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
LAYOUTS = {"instruction_first": (HEAD, MID, TAIL), "paper": (PAPER_HEAD, PAPER_MID, PAPER_TAIL)}
# phi's layers are run by ``ModelSAT._layer``, written for LLaMA's: separate q/k/v/o projections,
# plain RoPE, one norm before attention and one before the MLP. These architectures compute exactly
# what their library does through it; others would fail or, worse, compute something else without
# a word (Gemma-2's soft-capping and extra norms, Llama-3.1's scaled RoPE). Phi-3 (the 4k models:
# plain RoPE) is the LLaMA layer with fused q/k/v and gate/up projections: it is split into one
# (``as_llama``), as the paper's GPU configuration and the issue name Phi-3-mini.
SUPPORTED_LLMS = ("gemma", "llama", "mistral", "qwen2")
# Generous: a token of the default backbones spans at most 81 characters (SmolLM2's longest) or one
# word (MiniLM: at most 100 characters, or a longer word read as one [UNK]), so a text's first N
# tokens lie in its first N * this many characters unless it holds long runs of spaces or of such
# words. Cutting there first keeps a huge instruction from being tokenized whole, inside the
# scorer's lock, for the few tokens kept; a text within the bound is read as it always was.
CHARS_PER_TOKEN = 128
# psi's and phi's inputs are padded to a multiple of this many tokens (masked: the scores move by
# rounding only). A CPU's kernel libraries keep what they built for each input shape they meet, several
# MB each in bfloat16: with every instruction length a shape of its own, a serving process grew by
# about 270 MB over 75 lengths; with lengths in steps of 16, by some 25 (bench/scorer_memory.py).
PAD_MULTIPLE = 16


def head_text(text: str, tokens: int) -> str:
    """The start of ``text`` that holds its first ``tokens`` tokens (``CHARS_PER_TOKEN`` characters
    each): both backbones keep a text's first tokens, so it is the end that goes. A text within that
    bound is returned as it is."""
    limit = tokens * CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]


def _rope(llm_config) -> dict:
    # transformers 5 keeps the RoPE settings in rope_parameters, 4 in rope_scaling (None when plain)
    return getattr(llm_config, "rope_parameters", None) or getattr(llm_config, "rope_scaling", None) or {}


def _rope_scaling(rope: dict) -> str:
    """The RoPE variant ``_rope``'s settings name ("default": plain RoPE)."""
    return rope.get("rope_type", rope.get("type", "default"))


def _rope_unsupported(llm_config) -> str | None:
    """What of phi's RoPE the scorer's plain RoPE, over every dimension of a head, does not compute,
    in words (None: nothing)."""
    rope = _rope(llm_config)
    scaling = _rope_scaling(rope)
    if scaling != "default":
        return f"RoPE scaling {scaling!r}"
    partial = float(rope.get("partial_rotary_factor", getattr(llm_config, "partial_rotary_factor", None) or 1.0))
    if partial != 1.0:
        return f"partial rotary factor {partial:g} (RoPE on part of each head)"
    return None


def _attention_windows(llm_config) -> list[int | None]:
    """Each layer's sliding attention window as transformers applies it (None: the whole causal
    past), a query seeing itself and the ``window - 1`` positions before it. Mistral and Phi-3
    window every layer by ``sliding_window`` (Mistral-7B-v0.1: 4096, Phi-3-mini-4k: 2047); Qwen2
    only the layers its ``layer_types`` name "sliding_attention", none where
    ``use_sliding_window`` is false (Qwen2.5's configs name a window they do not apply); LLaMA
    (SmolLM2) and Gemma never, whatever their config says."""
    kind, window = getattr(llm_config, "model_type", None), getattr(llm_config, "sliding_window", None)
    n = llm_config.num_hidden_layers
    if not window or kind not in ("mistral", "phi3", "qwen2"):
        return [None] * n
    if kind == "qwen2":
        types = getattr(llm_config, "layer_types", None) or [None] * n
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n


def as_llama(llm: nn.Module) -> nn.Module:
    """A Phi-3 causal LM with plain RoPE (Phi-3-mini-4k) as the LLaMA one that computes the same:
    its fused ``qkv_proj`` and ``gate_up_proj`` split into LLaMA's projections, the same weights
    (moved, not copied); any other model as it is (``check_llm`` says what it refuses)."""
    cfg = getattr(llm, "config", None)
    if getattr(cfg, "model_type", None) != "phi3" or not hasattr(llm, "lm_head"):
        return llm
    if _rope_unsupported(cfg):
        return llm  # the 128k models' longrope, a partial RoPE: refused by check_llm, naming it
    rope = _rope(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0))
    lcfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    state = {}
    for name, weight in llm.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):
            at = name[: -len("qkv_proj.weight")]
            for part, piece in zip(("q_proj", "k_proj", "v_proj"),
                                   weight.split([heads * head_dim, kv * head_dim, kv * head_dim])):
                state[f"{at}{part}.weight"] = piece
        elif name.endswith("mlp.gate_up_proj.weight"):
            at = name[: -len("gate_up_proj.weight")]
            state[f"{at}gate_proj.weight"], state[f"{at}up_proj.weight"] = weight.chunk(2)
        else:
            state[name] = weight
    with torch.device("meta"):  # no second copy of the weights: they are assigned below
        llama = LlamaForCausalLM(lcfg)
    llama.load_state_dict(state, strict=False, assign=True)
    llama.model.rotary_emb = type(llama.model.rotary_emb)(config=lcfg)  # its buffers, built for real
    missing = [n for n, p in llama.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"phi (Phi-3) could not be laid out as LLaMA's layers: {missing[:3]} missing")
    return llama.to(next(llm.parameters()).dtype).train(llm.training)


def check_llm(llm_config) -> None:
    """Refuse (ValueError) a phi whose layers ``ModelSAT._layer`` would not compute as its library does."""
    kind = getattr(llm_config, "model_type", None)
    other = (f"phi is a {kind!r} model; the scorer's forward pass runs only "
             f"{', '.join(SUPPORTED_LLMS)} layers, and phi3 with plain RoPE")
    if kind not in SUPPORTED_LLMS and kind != "phi3":
        raise ValueError(other)
    # a Phi-3 here is one as_llama left as it is: its RoPE is the reason, where it has one
    unsupported = _rope_unsupported(llm_config)
    if unsupported:
        raise ValueError(f"phi's {unsupported} is not supported: the scorer's forward pass computes "
                         "plain RoPE over whole heads")
    if kind == "phi3":
        raise ValueError(other)


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds the old text or the new, never a part of either (a kill mid-write)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@dataclass
class ModelSATConfig:
    """Everything that defines the network; the checkpoint stores it as ``config.json``."""

    variant: str = "encoder"          # "encoder" (psi + connector) or "text" (phi reads the sentence)
    encoder: str = "default:minilm"   # psi: HF id, local path, or a scorer.backbones default
    llm: str = "default:smollm2"      # phi: HF id, local path, .gguf, or a scorer.backbones default
    n_layers: int = 6                 # decoder layers of phi kept (the rest are dropped)
    max_instruction_tokens: int = 96
    max_clause_tokens: int = 48       # psi's window per task clause
    accuracy_feature: bool = False    # also feed each clause's accuracy as a scalar to the connector
    lora_rank: int = 0                # 0 = phi frozen; >0 = LoRA on lora_targets of the top layers
    lora_layers: int = 2              # how many of the kept layers (from the top) get adapters
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj"])
    encoder_train_layers: int = 0     # top layers of psi tuned in stage 2 (0 = psi stays frozen)
    llm_train_layers: int = 0         # top kept layers of phi whose full weights stage 2 tunes (0: LoRA
    #                                   alone, or phi frozen); their weights are then checkpoint parts
    answer_token: str = "Yes"
    text_max_tasks: int = 12          # text variant: tasks written into the sentence (cost bound)
    head: str = HEAD
    mid: str = MID
    tail: str = TAIL
    suite: str = "mmlu_pro"           # aptitude suite whose task keywords the clauses are written with
    n_orders: int = 2                 # re-orderings averaged at inference
    order_seed: int = 0
    layout: str = "instruction_first"  # or "paper": capability first (see the module docstring)
    instruction_vector_tokens: int = 0  # >0: psi also reads the instruction's first N tokens; its
    #                                     vector, through its own connector, is one more token of phi's
    aptitude_weight: float = 0.0      # inference: + this x the mean of the candidate's profile (its
    #                                   overall aptitude), fitted on the train split, not learned

    def __post_init__(self):
        """Refuse (ValueError, naming the field) what no network can be built or scored with: a
        checkpoint's config.json is edited by hand (its ``aptitude_weight`` is meant to be), and a
        value of the wrong type or range otherwise loaded fine and failed on every scoring call."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default) if f.default is not MISSING else list
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind is list:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise ValueError(f"{f.name} must be {'a finite number' if kind is float else kind.__name__}"
                                 f"{' of strings' if kind is list else ''}, not {value!r}")
        for name in ("n_layers", "max_instruction_tokens", "max_clause_tokens", "text_max_tasks", "n_orders"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, not {getattr(self, name)}")
        for name in ("lora_rank", "lora_layers", "encoder_train_layers", "llm_train_layers",
                     "instruction_vector_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.variant not in ("encoder", "text"):
            raise ValueError(f"variant must be 'encoder' or 'text', not {self.variant!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, not {self.layout!r}")

    def with_layout(self, layout: str) -> "ModelSATConfig":
        """The same network reading its pieces in ``layout``'s order, with that layout's prompts."""
        head, mid, tail = LAYOUTS[layout]
        return ModelSATConfig.from_dict({**asdict(self), "layout": layout, "head": head, "mid": mid,
                                         "tail": tail})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, obj: dict) -> "ModelSATConfig":
        """The config ``obj`` describes. A key it does not know is left out (a later version's
        field), unless it is close to one it knows: that is refused (ValueError), since a misspelt
        ``aptitude_wieght`` left the weight at 0 without a word."""
        if not isinstance(obj, dict):
            raise ValueError(f"a config is a JSON object, not {type(obj).__name__}")
        known = [f.name for f in fields(cls)]
        for key in obj:
            close = [] if key in known else difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
            if close:
                raise ValueError(f"unknown field {key!r}; did you mean {close[0]!r}?")
        return cls(**{k: v for k, v in obj.items() if k in known})

    def save(self, path: str | Path) -> None:
        write_atomically(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelSATConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with the base frozen and B zero-initialised."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelSAT(nn.Module):
    """psi + connector + truncated phi. Build with ``ModelSAT.from_backbones`` or from loaded parts."""

    def __init__(self, config: ModelSATConfig, encoder: nn.Module | None, encoder_tokenizer,
                 llm: nn.Module, llm_tokenizer):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.encoder_tokenizer = encoder_tokenizer
        self.tokenizer = llm_tokenizer
        windows = _attention_windows(llm.config)  # Phi-3's: as_llama's LLaMA config has none
        llm = as_llama(llm)
        body = llm.model if hasattr(llm, "model") else llm
        lcfg = llm.config
        check_llm(lcfg)
        self.embed = body.embed_tokens
        self.layers = nn.ModuleList(list(body.layers)[: config.n_layers])
        self.windows = windows[: len(self.layers)]
        self.norm = body.norm
        self.n_heads = lcfg.num_attention_heads
        self.n_kv = lcfg.num_key_value_heads
        self.head_dim = getattr(lcfg, "head_dim", None) or lcfg.hidden_size // self.n_heads
        rope = getattr(lcfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(lcfg, "rope_theta", 10000.0))
        self.rope_theta = float(theta)  # a float, not a buffer: .to(bfloat16) must not round it
        for p in self.parameters():
            p.requires_grad_(False)
        ids = llm_tokenizer(config.answer_token, add_special_tokens=False)["input_ids"]
        self.answer_id = int(ids[-1])
        # the LM head's 'Yes' row: the embedding's own where the head is tied to it (SmolLM2, Qwen2.5
        # up to 3B), else a copy of the head's (Mistral-7B, Qwen2.5-7B), kept alone, not the head
        head = getattr(llm, "lm_head", None)
        untied = head is not None and not getattr(lcfg, "tie_word_embeddings", True)
        self.register_buffer("answer_head", head.weight[self.answer_id].detach().clone() if untied else None,
                             persistent=False)
        d_llm = lcfg.hidden_size
        if config.variant == "encoder":
            if encoder is None:
                raise ValueError("the encoder variant needs a capability encoder")
            d_in = encoder.config.hidden_size + (1 if config.accuracy_feature else 0)
            self.connector = nn.Linear(d_in, d_llm)
            with torch.no_grad():  # a unit clause vector starts at the norm of phi's token embeddings
                target = self.embed.weight.norm(dim=-1).mean()
                nn.init.normal_(self.connector.weight, std=float(target) / math.sqrt(d_llm))
                self.connector.bias.zero_()
        elif config.variant != "text":
            raise ValueError(f"unknown variant {config.variant!r}")
        if config.instruction_vector_tokens > 0:
            self.add_instruction_vector(config.instruction_vector_tokens)
        if config.lora_rank > 0:
            self._wrap_lora(list(self.layers)[len(self.layers) - config.lora_layers:])

    def _wrap_lora(self, layers) -> None:
        cfg = self.config
        for layer in layers:
            for name in cfg.lora_targets:
                parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
                setattr(parent, name, LoRALinear(getattr(parent, name), cfg.lora_rank, cfg.lora_alpha))

    def widen_lora(self, lora_layers: int) -> None:
        """Give LoRA adapters to more of phi's kept layers (counted from the top), the ones it has kept.

        A new adapter starts at zero (its B is zero), so a trained network scores exactly as before
        and only then learns with the extra capacity. Narrowing is refused: it would drop trained parts.
        """
        cfg = self.config
        if cfg.lora_rank <= 0:
            raise ValueError("this network has no LoRA adapters to widen (lora_rank 0)")
        lora_layers = min(int(lora_layers), len(self.layers))
        if lora_layers < cfg.lora_layers:
            raise ValueError(f"cannot narrow LoRA from {cfg.lora_layers} to {lora_layers} layers")
        start, end = len(self.layers) - lora_layers, len(self.layers) - cfg.lora_layers
        if start == end:
            return
        added = list(self.layers)[start:end]
        with torch.random.fork_rng(devices=[]):  # the same new A matrices in every run; the caller's RNG untouched
            torch.manual_seed(0)
            self._wrap_lora(added)
        weight = self.embed.weight
        for layer in added:
            layer.to(weight.device, weight.dtype)
        cfg.lora_layers = lora_layers

    def add_instruction_vector(self, tokens: int) -> None:
        """Give phi psi's sentence vector of the whole instruction (its first ``tokens`` tokens), as one
        soft token just before the instruction's own tokens.

        phi reads only ``max_instruction_tokens`` of the instruction; psi's window is longer and its
        vector is the kind the kNN and MLP baselines route on. The vector has its own connector,
        started as a copy of the clause connector (both map psi's space into phi's), so a checkpoint
        trained without it keeps its scores' meaning when it is added.
        """
        if self.config.variant != "encoder":
            raise ValueError("the instruction vector needs the encoder variant's psi")
        d_enc = self.encoder.config.hidden_size
        layer = nn.Linear(d_enc, self.connector.out_features).to(self.connector.weight.device,
                                                                 self.connector.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.connector.weight[:, :d_enc])
            layer.bias.copy_(self.connector.bias)
        self.instruction_connector = layer
        self.config.instruction_vector_tokens = int(tokens)
        self._instruction_vectors: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_backbones(cls, config: ModelSATConfig) -> "ModelSAT":
        from scorer.backbones import load_encoder, load_llm

        enc = load_encoder(config.encoder) if config.variant == "encoder" else None
        llm = load_llm(config.llm, n_layers=config.n_layers)
        model = cls(config, enc.model if enc else None, enc.tokenizer if enc else None, llm.model, llm.tokenizer)
        return model.eval()

    def train(self, mode: bool = True) -> "ModelSAT":
        """psi stays in eval mode (no dropout), frozen or tuned, whatever the rest of the network does."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    # ---- trained parts -------------------------------------------------------------------------
    def encoder_tuned_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of psi's top ``encoder_train_layers`` layers (tuned in stage 2)."""
        n = self.config.encoder_train_layers
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if n <= 0 or layers is None:
            return ()
        return tuple(f"encoder.encoder.layer.{i}." for i in range(max(0, len(layers) - n), len(layers)))

    def encoder_tuned_parameters(self) -> list[nn.Parameter]:
        prefixes = self.encoder_tuned_prefixes()
        return [p for n, p in self.named_parameters() if n.startswith(prefixes)] if prefixes else []

    def llm_tuned_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of phi's top ``llm_train_layers`` kept layers (fully tuned in stage 2)."""
        n = min(self.config.llm_train_layers, len(self.layers))
        return tuple(f"layers.{i}." for i in range(len(self.layers) - n, len(self.layers))) if n > 0 else ()

    def llm_tuned_parameters(self) -> list[nn.Parameter]:
        """Those layers' own weights; their LoRA adapters, if any, are LoRA's."""
        prefixes = self.llm_tuned_prefixes()
        return [p for n, p in self.named_parameters()
                if n.startswith(prefixes) and ".lora_" not in n] if prefixes else []

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the parts training changes: the connector, the LoRA adapters, psi's and phi's tuned layers."""
        tuned = ("connector.", "instruction_connector.") + self.encoder_tuned_prefixes() + self.llm_tuned_prefixes()
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k.startswith(tuned) or ".lora_" in k}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """The trained parts, which must be exactly this network's, in their shapes (ValueError)."""
        expected = self.trainable_state()
        if set(state) != set(expected):
            raise ValueError(f"checkpoint parts differ: missing {sorted(set(expected) - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - set(expected))[:3]}")
        wrong = [f"{k} {tuple(v.shape)} (the network's: {tuple(expected[k].shape)})" for k, v in state.items()
                 if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"checkpoint parts differ in shape: {', '.join(sorted(wrong)[:3])}")
        self.load_state_dict(state, strict=False)

    # ---- psi + connector -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_clauses(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """psi: mean-pooled, L2-normalised sentence vectors, one per clause text ``[n, d_enc]``."""
        return self.encode_clauses_live(texts, batch_size)

    def encode_clauses_live(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """``encode_clauses`` with autograd on: stage 2 tunes psi's top layers through it."""
        return self._encode(texts, self.config.max_clause_tokens, batch_size)

    def _psi_window(self, tokens: int) -> int:
        """``tokens``, or fewer where psi has fewer positions (MiniLM: 512): a longer ``max_length``
        would hand psi more tokens than it can place, and fail on long instructions."""
        limit = getattr(getattr(self.encoder, "config", None), "max_position_embeddings", None)
        return min(tokens, limit) if limit else tokens

    def _encode(self, texts: list[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.encoder_tokenizer([mended(t) for t in texts[i:i + batch_size]], padding=True, truncation=True,
                                         max_length=max_length, return_tensors="pt")
            length = tok["input_ids"].shape[1]  # 0 for empty texts where the tokenizer adds no [CLS]/[SEP]
            extra = self._psi_window(max(1, -(-length // PAD_MULTIPLE)) * PAD_MULTIPLE) - length
            pad_id = self.encoder_tokenizer.pad_token_id or 0
            tok = {key: F.pad(value, (0, extra), value=pad_id if key == "input_ids" else 0).to(device)
                   for key, value in tok.items()}
            hidden = self.encoder(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(F.normalize(pooled, dim=-1))
        return torch.cat(out).to(self.embed.weight.dtype)

    def capability_embeds(self, clause_vecs: torch.Tensor, accuracies: torch.Tensor) -> torch.Tensor:
        """Connector W: ``[..., n_tasks, d_enc]`` (+ accuracies ``[..., n_tasks]``) -> phi's space."""
        x = clause_vecs
        if self.config.accuracy_feature:
            x = torch.cat([x, accuracies.unsqueeze(-1).to(x.dtype)], dim=-1)
        return self.connector(x)

    def instruction_vector(self, instruction: str) -> torch.Tensor:
        """psi's vector of the instruction through its connector ``[1, D]``. While psi is frozen the
        vectors of the last few thousand instructions are kept; while training tunes psi's top
        layers (stage 2, ``encoder_train_layers``) each is computed afresh, through autograd: a kept
        one would be psi's of some steps before."""
        window = self._psi_window(self.config.instruction_vector_tokens)
        text = head_text(instruction, window)  # also the key: a huge instruction is not kept whole
        if any(p.requires_grad for p in self.encoder_tuned_parameters()):
            self._instruction_vectors.clear()
            vec = self._encode([text], window)[0]
        elif (vec := self._instruction_vectors.get(text)) is None:
            with torch.no_grad():
                vec = self._encode([text], window)[0]
            self._instruction_vectors[text] = vec
            while len(self._instruction_vectors) > 4096:
                self._instruction_vectors.popitem(last=False)
        else:
            self._instruction_vectors.move_to_end(text)
        weight = self.embed.weight  # a cached vector may predate a move to another device or dtype
        return self.instruction_connector(vec.to(weight.device, weight.dtype))[None]

    def instruction_embeds(self, instruction: str) -> torch.Tensor:
        """The pieces around the instruction, embedded ``[P, D]``: HEAD + instruction + MID (instruction
        first: the shared prefix), or MID + instruction + TAIL (the paper's layout). With an
        instruction vector, it comes just before the instruction's tokens."""
        cfg = self.config
        before, after = (cfg.head, cfg.mid) if cfg.layout == "instruction_first" else (cfg.mid, cfg.tail)
        pieces = [self.embed_ids(self.token_ids(before))]
        if cfg.instruction_vector_tokens > 0:
            pieces.append(self.instruction_vector(instruction))
        pieces += [self.embed_ids(self._instruction(instruction)), self.embed_ids(self.token_ids(after))]
        return torch.cat(pieces)

    # ---- token pieces ----------------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(mended(text), add_special_tokens=False)["input_ids"])

    def prefix_ids(self, instruction: str) -> list[int]:
        """HEAD + the instruction truncated to ``max_instruction_tokens`` + MID."""
        return self.token_ids(self.config.head) + self._instruction(instruction) + self.token_ids(self.config.mid)

    def _instruction(self, instruction: str) -> list[int]:
        keep = self.config.max_instruction_tokens
        return self.token_ids(head_text(instruction, keep))[:keep]

    def embed_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.embed.weight.device)
        return self.embed(ids)

    # ---- phi ----------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device)
        inv_freq = 1.0 / (self.rope_theta ** (dims / self.head_dim))
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        dtype = self.embed.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _layer(self, layer, h, cos, sin, past, mask, is_causal):
        """One LLaMA decoder layer; ``past`` = (k, v) of a shared prefix ``[1, n_kv, P, hd]``."""
        b, t, _ = h.shape
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv = (k, v)
        if past is not None:
            pk, pv = past
            k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, kv

    def run_layers(self, h: torch.Tensor, start: int = 0, past: list | None = None):
        """phi's kept layers over ``h [B, T, D]`` at positions ``start..``; returns (h, per-layer kv)."""
        t = h.shape[1]
        positions = torch.arange(start, start + t, device=h.device)
        cos, sin = self._rope(positions)
        keys = positions if past is None else torch.cat([torch.arange(past[0][0].shape[2], device=h.device),
                                                         positions])
        masks = {window: self._mask(positions, keys, window, past is None and start + t <= (window or t))
                 for window in set(self.windows)}
        kvs = []
        for i, layer in enumerate(self.layers):
            h, kv = self._layer(layer, h, cos, sin, None if past is None else past[i], *masks[self.windows[i]])
            kvs.append(kv)
        return h, kvs

    @staticmethod
    def _mask(queries: torch.Tensor, keys: torch.Tensor, window: int | None, causal_only: bool):
        """(mask, is_causal) for one layer: each query sees the keys at its position and before
        (a shared prefix's keys come first), the last ``window`` of them where the layer has a
        sliding window, as transformers' ``kv > q - window``. No mask where plain causal attention
        computes the same (``causal_only``: no shared prefix, and no window or one that reaches
        back to position 0 from the last query)."""
        if causal_only:
            return None, True
        seen = keys[None, :] <= queries[:, None]
        if window is not None:
            seen &= keys[None, :] > queries[:, None] - window
        return seen, False

    def answer_score(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The 'Yes' logit: final norm, then the LM head's row of 'Yes', in float32 whatever the
        network's dtype. In bfloat16 a logit of about 10 is rounded to steps of 1/16, coarser than
        the gap between the two best candidates of one prompt in one case in ten (RouterDC)."""
        row = self.embed.weight[self.answer_id] if self.answer_head is None else self.answer_head
        return self.norm(last_hidden.float()) @ row.float()

    def _score_padded(self, rows, past=None) -> torch.Tensor:
        """Right-pad ``rows`` (``[T_i, D]`` each) and read the score at each row's last real position.

        Right padding needs no mask beyond the causal one (and the layers' windows): a pad only
        ever follows real tokens.
        """
        if isinstance(rows, torch.Tensor):
            rows = list(rows)
        lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
        batch = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        start = 0 if past is None else past[0][0].shape[2]
        h, _ = self.run_layers(batch, start=start, past=past)
        last = h[torch.arange(len(rows), device=h.device), lengths - 1]
        return self.answer_score(last)

    def score_rows(self, rows) -> torch.Tensor:
        """Full sequences ``[T_i, D]`` (causal attention, no shared prefix) -> scores ``[B]``."""
        return self._score_padded(rows)

    def prefix_cache(self, prefix: torch.Tensor) -> list:
        """The key/value cache of one prefix ``[P, D]`` (or of a stack of them, ``[B, P, D]``),
        shared by every candidate suffix. It runs padded at its end to a multiple of
        ``PAD_MULTIPLE`` positions (under causal attention a pad changes nothing before it), and
        the cache is cut back to its ``P`` positions."""
        batch = prefix if prefix.dim() == 3 else prefix.unsqueeze(0)
        p = batch.shape[1]
        _, kvs = self.run_layers(F.pad(batch, (0, 0, 0, -p % PAD_MULTIPLE)))
        return [(k[:, :, :p], v[:, :, :p]) for k, v in kvs]

    def score_shared(self, past: list, suffixes) -> torch.Tensor:
        """Candidate suffixes (``[S_i, D]`` each, or one ``[B, S, D]`` tensor) after a cached prefix."""
        return self._score_padded(suffixes, past=past)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


__all__ = ["CHARS_PER_TOKEN", "HEAD", "LAYOUTS", "MID", "PAPER_HEAD", "PAPER_MID", "PAPER_TAIL", "SUPPORTED_LLMS",
           "TAIL", "LoRALinear", "ModelSAT", "ModelSATConfig", "check_llm", "head_text", "write_atomically"]
