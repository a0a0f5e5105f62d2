"""Read a running proxy's /metrics as ``{(sample name, sorted label pairs): value}``."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base: str) -> dict:
    return scrape_with(base, {})


def scrape_with(base: str, headers: dict[str, str]) -> dict:
    """As ``scrape``, sending ``headers`` (a master key's authorization)."""
    text = httpx.get(f"{base}/metrics", headers=headers).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
