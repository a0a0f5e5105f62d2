"""Model-SAT scorer: pure ML (torch + transformers); never imports the proxy, starlette or litellm.

Public API (the only names the proxy may use):

- ``Profile``: a model's capability profile, ``{task_id: accuracy in [0, 1]}`` over the aptitude
  suite's tasks (see ``scorer.aptitude``).
- ``Scorer``: the one-method seam, ``score(instruction, candidates) -> {model: score}``, where
  ``candidates`` maps each candidate model's name to its profile. Higher is better; scores of one
  call are comparable with each other, not across calls. A profile value that is not an accuracy
  in [0, 1] (NaN, a percentage), or a profile with no task the scorer reads, is a ValueError.
- ``load_scorer(checkpoint=None, device=None, dtype=None)``: the trained Model-SAT scorer (the
  committed default checkpoint when ``checkpoint`` is None), on CUDA when available, else the CPU;
  in bfloat16 where it is native (a CUDA card of compute capability 8.0 on, or a CPU with
  AVX512-BF16/AMX), else float32, unless ``dtype`` says.
"""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

Profile = Mapping[str, float]


@runtime_checkable
class Scorer(Protocol):
    def score(self, instruction: str, candidates: Mapping[str, Profile]) -> dict[str, float]: ...


def load_scorer(checkpoint: str | None = None, device: str | None = None, dtype: str | None = None) -> Scorer:
    """Load the trained Model-SAT scorer; imports torch lazily so importing ``scorer`` stays cheap.

    ``dtype``: ``auto`` (None), ``float32`` or ``bfloat16`` (``scorer.inference.default_dtype``)."""
    from scorer.inference import ModelSATScorer

    return ModelSATScorer.load(checkpoint, device=device, dtype=dtype)


__all__ = ["Profile", "Scorer", "load_scorer"]
