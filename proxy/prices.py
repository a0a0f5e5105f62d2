"""What a hosted model costs per million tokens, when providers.yaml does not say.

Owns: reading litellm's bundled price list (``model_prices_and_context_window_backup.json``,
shipped inside the litellm package) without importing litellm, once per process, and looking a
deployment up in it. Onboarding estimates and caps its spend with these prices, for each side
(input, output) that providers.yaml does not price itself (``onboarding_service.prices_of``); a
model called at an ``api_base`` of its own (a self-hosted server, whatever its model is called) is
never looked up: its price is not the provider's.
Does not know: onboarding, the spend cap.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("satroute.prices")

PRICE_LIST = "model_prices_and_context_window_backup.json"


@functools.cache
def price_list() -> dict[str, Any]:
    """litellm's bundled price list, ``{model: {"input_cost_per_token", ...}}``; empty when litellm
    or the file is missing or unreadable (prices then come from providers.yaml only)."""
    try:
        spec = importlib.util.find_spec("litellm")
        folders = list(spec.submodule_search_locations or []) if spec else []
        for folder in folders:
            path = Path(folder) / PRICE_LIST
            if path.exists():
                with open(path, encoding="utf-8") as fh:
                    table = json.load(fh)
                return table if isinstance(table, dict) else {}
    except (OSError, ValueError, ImportError) as exc:
        log.warning("litellm's price list cannot be read (%s): unpriced models count as free", exc)
    return {}


# LiteLLM's own per-deployment price keys (USD per token), in model_info or litellm_params: a
# LiteLLM model_list priced so loads as it is, and its models are not taken for free
LITELLM_PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token")


def litellm_cost(value: Any) -> float | None:
    """A LiteLLM cost as a number (YAML 1.1 reads ``2.5e-6`` as a string), or None when it is
    absent or no non-negative number."""
    if isinstance(value, bool):
        return None
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return price if math.isfinite(price) and price >= 0 else None


def _listed(model: str, provider: str) -> Iterator[dict[str, Any]]:
    """litellm's list entries for ``model`` (a litellm model string such as ``openai/gpt-4o``) at
    ``provider``, in the order litellm looks them up: the whole string, then the name without its
    prefix where that entry is the same provider's (the same name at another provider is another
    model)."""
    table = price_list()
    bare = model.split("/", 1)[1] if "/" in model else model
    for key in dict.fromkeys((model, bare)):
        entry = table.get(key)
        if isinstance(entry, dict) and (key == model or entry.get("litellm_provider") == provider):
            yield entry


def listed_flag(model: str, provider: str, flag: str) -> bool:
    """Whether litellm's list says ``flag`` (``supports_vision``, ...) of ``model`` at ``provider``,
    by its first entry (``_listed``). False where the list has none, or does not say: what
    litellm's own ``supports_*`` answer then."""
    entry = next(_listed(model, provider), None)
    return entry is not None and entry.get(flag) is True


def listed_prices(model: str, provider: str, api_base: str | None) -> tuple[float, float] | None:
    """USD per million input and output tokens of ``model`` (a litellm model string such as
    ``openai/gpt-4o``) at its provider, or None when the list does not have it or the model is
    served at an ``api_base`` of its own."""
    if api_base:
        return None
    for entry in _listed(model, provider):
        inp, out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
        if isinstance(inp, (int, float)) and isinstance(out, (int, float)):
            return inp * 1e6, out * 1e6
    return None
