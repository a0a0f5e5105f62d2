"""Serving the trained Model-SAT network: ``ModelSATScorer.score(instruction, candidates)``.

Owns: loading a checkpoint folder (``config.json`` + ``model.safetensors`` holding only the trained
parts; the backbones come from the specs in the config), turning a profile into the candidate
suffix phi reads (capability vectors or capability text, then the inquiry prompt), the per-profile
cache of encoded capability vectors, the two re-orderings averaged at inference, the calibrated
``aptitude_weight`` (a candidate's score plus that weight times its profile's mean), device and
dtype choice (CUDA with bf16 when there is a GPU; on the CPU bf16 where the processor computes it
natively, AVX512-BF16 or AMX, else fp32: ``default_dtype``) and thread safety (one lock around the
forward pass: torch already uses every core for one request on the CPU).

Does not know: HTTP, providers, routing policy, training.

Checkpoint layout (``save_checkpoint``)::

    config.json        ModelSATConfig
    model.safetensors  connector (+ LoRA adapters): the only trained tensors
    training.json      how it was trained (data, steps, seed, models never seen); informational
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch

from scorer.aptitude import Suite, aptitude, load_keywords, load_suite
from scorer.capability import SENTENCE_PREFIX, orders, task_clause
from scorer.modeling import ModelSAT, ModelSATConfig, write_atomically

log = logging.getLogger("satroute.scorer")

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "default"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "training.json"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this processor computes bfloat16 natively (the x86 flags avx512_bf16 or amx_bf16).

    Elsewhere (no such file, other architectures) the answer is no: emulated bfloat16 is slower
    than float32, so it is never chosen on a guess.
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype(device: str, requested: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype the scorer runs in: ``requested`` (``float32``, ``bfloat16`` or a torch dtype), or,
    for None / ``auto``, bfloat16 where it is native: a CUDA card from Ampere on (compute
    capability 8.0: A100, H100, L4, RTX 30xx) or a CPU with AVX512-BF16/AMX; float32 elsewhere (a
    T4 or V100 only emulates bfloat16, slower than float32).

    On the 2-core AVX512-BF16 CPU of docs/evaluation.md bfloat16 scores 1.4x faster than float32 with
    2 threads (1.8x with one) and routes RouterDC's and MMLU-Pro's test splits as float32 does within
    a few prompts (eleventh round).
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        if requested not in DTYPES:
            raise ValueError(f"dtype must be auto, {' or '.join(DTYPES)}, not {requested!r}")
        return DTYPES[requested]
    if str(device).startswith("cuda"):
        return torch.bfloat16 if native_bf16_cuda(device) else torch.float32
    if str(device).startswith("cpu") and native_bf16_cpu():
        return torch.bfloat16
    return torch.float32


def native_bf16_cuda(device: str) -> bool:
    """Whether the CUDA card ``device`` computes bfloat16 natively (compute capability 8.0 or later);
    True when the capability cannot be read (the load that follows reports why)."""
    try:
        return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    except (RuntimeError, AssertionError, ValueError):
        return True


class CheckpointError(FileNotFoundError):
    """A checkpoint folder is missing or incomplete, a file of it (or a training state) cannot be
    read, or its config does not describe its weights.

    Not a ``RuntimeError``: ``ModelSATScorer.load`` must not take it for a CUDA failure and load
    the same broken checkpoint again on the CPU."""


LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file begins


def unreadable(path: str | Path, exc: BaseException, what: str) -> CheckpointError:
    """The ``CheckpointError`` for ``path``, which failed to load as ``what`` with ``exc``: named,
    with the first sentence of the reason, or, for a Git LFS pointer (a clone made without git-lfs),
    saying so."""
    try:
        with open(path, "rb") as f:
            pointer = f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        pointer = False
    if pointer:
        return CheckpointError(f"{path} is a Git LFS pointer, not the file itself: this checkout was made "
                               "without git-lfs (install it, then run `git lfs pull`)")
    reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0] or type(exc).__name__
    return CheckpointError(f"{path} is damaged, or not {what}: {reason}")


def save_checkpoint(model: ModelSAT, folder: str | Path, meta: Mapping | None = None) -> Path:
    """Write config + trained parts (+ meta) into ``folder`` (files replaced atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state().items()}, str(tmp))
    tmp.replace(folder / WEIGHTS)
    model.config.save(folder / CONFIG)
    if meta is not None:
        write_atomically(folder / META, json.dumps(dict(meta), indent=1) + "\n")
    return folder


def checkpoint_identity(folder: str | Path) -> dict[str, str]:
    """``{"path", "weights_sha256"}``: the folder and the first 16 hex digits of the SHA-256 of its
    trained weights (the same weights give the same digest wherever the folder is)."""
    digest = hashlib.sha256((Path(folder) / WEIGHTS).read_bytes()).hexdigest()[:16]
    return {"path": str(folder), "weights_sha256": digest}


def load_model(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ModelSAT:
    """Rebuild the network from its config and the backbones, then load the trained parts;
    ``CheckpointError`` naming the file when a file is missing or cannot be read, or the config does
    not describe the weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise CheckpointError(f"no Model-SAT checkpoint in {folder} (need {CONFIG} and {WEIGHTS})")
    try:  # a file cut short, another program's, a Git LFS pointer: found before the backbones load
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise unreadable(folder / WEIGHTS, exc, "a safetensors file") from None
    try:  # a config that cannot be read, or names a network this code cannot run
        model = ModelSAT.from_backbones(ModelSATConfig.load(folder / CONFIG))
    except ValueError as exc:
        raise CheckpointError(f"{folder / CONFIG}: {exc}") from None
    try:  # on the CPU still: an error here is the checkpoint's, never the device's
        model.load_trainable_state(weights)
    except ValueError as exc:
        raise CheckpointError(f"{folder / CONFIG} does not describe the weights in {folder / WEIGHTS}: {exc}") from None
    return model.to(device=device, dtype=dtype).eval()


class CapabilityWriter:
    """Profile -> the candidate suffix ``[S, D]`` phi reads after the shared prefix.

    Clause vectors are cached per clause text (a profile's 50 clauses are encoded once, and a
    clause shared by two profiles once in all), so the per-request cost of a known profile is the
    connector alone. ``keywords`` maps task ids to their five keywords (the suite's, then every
    MMLU subject's, so a profile measured on another MMLU-based suite still reads).
    """

    def __init__(self, model: ModelSAT, keywords: Mapping[str, Sequence[str]], max_cached: int = 50_000):
        self.model = model
        self.keywords = dict(keywords)
        self.max_cached = max_cached
        self._vectors: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.live = False  # training psi: encode every clause afresh, with autograd, no cache

    def clause_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        if self.live:
            return self.model.encode_clauses_live(list(texts))
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            for text, vec in zip(missing, self.model.encode_clauses(list(missing))):
                self._vectors[text] = vec
        for text in dict.fromkeys(texts):  # this call's clauses are the freshest: evicted last
            self._vectors.move_to_end(text)
        out = torch.stack([self._vectors[t] for t in texts])
        while missing and len(self._vectors) > self.max_cached:
            self._vectors.popitem(last=False)
        return out

    def remember(self, texts: Sequence[str], vectors: torch.Tensor) -> None:
        """Seed the cache with precomputed vectors (training precomputes every clause once)."""
        for text, vec in zip(texts, vectors):
            self._vectors[text] = vec

    def suffix(self, profile: Mapping[str, float], order: Sequence[str]) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        tasks = [t for t in order if t in profile and t in self.keywords]
        # paper layout: the capability is followed by the instruction, which brings its own tail
        tail = model.embed_ids(model.token_ids(cfg.tail) if cfg.layout == "instruction_first" else [])
        if cfg.variant == "text":
            text = " " + SENTENCE_PREFIX + ", ".join(
                task_clause(self.keywords[t], profile[t]) for t in tasks[: cfg.text_max_tasks]) + "."
            return torch.cat([model.embed_ids(model.token_ids(text)), tail])
        texts = [task_clause(self.keywords[t], profile[t]) for t in tasks]
        vecs = self.clause_vectors(texts)
        accs = torch.tensor([float(profile[t]) for t in tasks], dtype=vecs.dtype)
        caps = model.capability_embeds(vecs.to(tail.device, tail.dtype), accs.to(tail.device))
        return torch.cat([caps.to(tail.dtype), tail])


def score_candidates(model: ModelSAT, writer: CapabilityWriter, instruction: str,
                     suffix_lists: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """One instruction, ``n`` candidates x ``r`` suffixes each -> mean score per candidate ``[n]``.

    Instruction first: the instruction prefix is computed once and all ``n * r`` suffixes run in one
    batch after its cache. Paper layout: ``n * r`` full rows [head, capability, instruction] in one
    batch.
    """
    flat = [s for group in suffix_lists for s in group]
    if model.config.layout == "paper":
        head = model.embed_ids(model.token_ids(model.config.head))
        rest = model.instruction_embeds(instruction)
        scores = model.score_rows([torch.cat([head, s.to(head.dtype), rest]) for s in flat])
    else:
        past = model.prefix_cache(model.instruction_embeds(instruction))
        scores = model.score_shared(past, flat)
    return scores.view(len(suffix_lists), -1).float().mean(dim=1)


def _release_cuda() -> None:
    """Give back what a failed CUDA load left allocated (best effort: the device may be unusable)."""
    import gc

    gc.collect()
    try:
        torch.cuda.empty_cache()
    except RuntimeError:
        pass


def suite_keywords(suite: Suite) -> dict[str, Sequence[str]]:
    """Task id -> five keywords: every MMLU subject's, overridden by the suite's own."""
    words: dict[str, Sequence[str]] = dict(load_keywords())
    words.update(suite.keywords())
    return words


class ModelSATScorer:
    """The ``scorer.Scorer`` seam over a trained Model-SAT checkpoint; safe to share across threads."""

    def __init__(self, model: ModelSAT, suite: Suite, checkpoint: Mapping[str, str] | None = None):
        self.model = model
        self.suite = suite
        # which trained weights these are (``load``: the folder and a digest of its weights file),
        # so an operator can tell the deployed checkpoint from another; None when built in memory
        self.checkpoint = dict(checkpoint) if checkpoint else None
        self.writer = CapabilityWriter(model, suite_keywords(suite))
        self.orders = orders(suite.task_ids, n=model.config.n_orders, seed=model.config.order_seed)
        self._lock = threading.Lock()
        self._suffixes: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        # why the scorer runs on the CPU on a machine with CUDA (``load`` fell back), else None
        self.cuda_error: str | None = None

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, device: str | None = None,
             dtype: str | torch.dtype | None = None) -> "ModelSATScorer":
        """The checkpoint on ``device`` in ``dtype`` (``default_dtype``: None or "auto" chooses by
        device).

        With no ``device``, CUDA when there is one, else the CPU; and when the network cannot run
        on that CUDA device (its memory taken by an inference server beside it, a driver or build
        that cannot run kernels on this card), on the CPU, with the error kept in ``cuda_error``
        and logged. A device named explicitly is never swapped for another: its errors raise.
        """
        folder = Path(checkpoint or DEFAULT_CHECKPOINT)
        if device is not None:
            return cls._load_on(folder, device, dtype)
        if not torch.cuda.is_available():
            return cls._load_on(folder, "cpu", dtype)
        from scorer.backbones import BackboneError

        try:
            scorer = cls._load_on(folder, "cuda", dtype)
            scorer.warm_up()  # the first pass: where a card that takes the weights but cannot run them fails
            return scorer
        except (BackboneError, CheckpointError):
            raise  # the backbones or the checkpoint are missing: the CPU has no more of them
        except Exception as exc:  # noqa: BLE001 (torch.OutOfMemoryError, AcceleratorError, a kernel
            # this torch or card lacks: whatever the CUDA pass raises, the CPU may still run it)
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        scorer = None  # a network that reached the card, if warm-up failed: drop it before the CPU load
        _release_cuda()
        log.warning("the scorer cannot run on CUDA (%s); it runs on the CPU", error)
        scorer = cls._load_on(folder, "cpu", dtype)
        scorer.cuda_error = error
        return scorer

    @classmethod
    def _load_on(cls, folder: Path, device: str, dtype: str | torch.dtype | None) -> "ModelSATScorer":
        model = load_model(folder, device=device, dtype=default_dtype(device, dtype))
        return cls(model, load_suite(model.config.suite), checkpoint_identity(folder))

    @property
    def runs_on(self) -> str:
        """Device and dtype of the network, as the proxy logs them: ``"cpu, bfloat16"``."""
        weight = self.model.embed.weight
        return f"{weight.device.type}, {str(weight.dtype).removeprefix('torch.')}"

    def _candidate_suffixes(self, profile: Mapping[str, float]) -> list[torch.Tensor]:
        weight = self.model.embed.weight  # suffixes built before a move to another device or dtype are stale
        key = (str(weight.device), str(weight.dtype),
               *sorted((str(k), round(float(v), 6)) for k, v in profile.items()))
        cached = self._suffixes.get(key)
        if cached is None:
            extra = [t for t in profile if t not in set(self.suite.task_ids)]
            cached = [self.writer.suffix(profile, list(order) + sorted(extra)) for order in self.orders]
            self._suffixes[key] = cached
            while len(self._suffixes) > 1024:
                self._suffixes.popitem(last=False)
        return cached

    def warm_up(self, profiles: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Pay the one-off costs before a request does: the first forward pass (several times a
        steady call's latency) and the capability encoding of each profile given (about 0.1 s each
        on a CPU; cached afterwards). With no profiles, a stand-in (every task at 0.5) is scored."""
        stand_in = {"warm-up": dict.fromkeys(self.suite.task_ids, 0.5)}
        self.score("Which of these statements is correct?", dict(profiles) if profiles else stand_in)

    def read_profile(self, name: str, profile: Mapping[str, float]) -> dict[str, float]:
        """The part of a candidate's profile the network reads: its tasks with keywords (the suite's,
        or another MMLU subject's). ValueError, naming the candidate, for a value that is not an
        accuracy in [0, 1] (a NaN, a percentage) or a profile with no task to read."""
        for task, value in profile.items():
            if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):  # NaN fails the comparison
                raise ValueError(f"candidate {name!r}: accuracy {value!r} on task {task!r} is not a number in [0, 1]")
        read = {t: v for t, v in profile.items() if t in self.writer.keywords}
        if not read:
            raise ValueError(f"candidate {name!r}: its profile has no task of suite {self.suite.name!r} "
                             f"(nor another MMLU subject) for the scorer to read")
        return read

    @torch.inference_mode()
    def score(self, instruction: str, candidates: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        names = list(candidates)
        if not names:
            return {}
        read = [self.read_profile(n, candidates[n]) for n in names]
        with self._lock:
            suffixes = [self._candidate_suffixes(candidates[n]) for n in names]
            scores = score_candidates(self.model, self.writer, instruction, suffixes)
        weight = self.model.config.aptitude_weight
        # the aptitude is the mean over what the network reads: a task it ignores moves neither
        return {n: float(s) + (weight * aptitude(profile) if weight else 0.0)
                for n, s, profile in zip(names, scores.tolist(), read)}


__all__ = ["CapabilityWriter", "aptitude", "checkpoint_identity", "CheckpointError", "DEFAULT_CHECKPOINT", "DTYPES",
           "ModelSATScorer", "default_dtype", "load_model", "native_bf16_cpu", "save_checkpoint",
           "score_candidates", "suite_keywords", "unreadable"]
