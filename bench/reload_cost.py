"""What a providers.yaml edit costs the event loop: the reload runs on it, between requests.

Usage::

    python bench/reload_cost.py [--models 5 50 200] [--edits 5]

Writes a providers.yaml of N models (each with a built-in profile, prices and an environment key)
and times ``ProviderRegistry.reload`` on this process's thread: a tick where nothing changed (read
and hash the file), and a reload after an edit (parse, validate, resolve, swap in). Prints one line
per N with the median of ``--edits`` edits in milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def providers_yaml(n: int) -> tuple[str, dict[str, str]]:
    profiles = sorted(p.stem for p in (REPO / "scorer/assets/profiles/mmlu_pro").glob("*.json"))
    lines = ["model_list:"]
    for i in range(n):
        lines.append(f"  - model_name: m{i}\n"
                     f"    litellm_params: {{model: openai/m{i}, api_base: 'http://127.0.0.1:9/v1', "
                     f"api_key: os.environ/KEY_{i}}}\n"
                     f"    model_info: {{capability_profile: 'builtin:mmlu_pro/{profiles[i % len(profiles)]}', "
                     "input_price_per_mtok: 1, output_price_per_mtok: 2}")
    return "\n".join(lines) + "\n", {f"KEY_{i}": "sk-" + "x" * 20 for i in range(n)}


def measure(n: int, edits: int) -> dict:
    from proxy.providers import ProviderRegistry

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "providers.yaml"
        text, env = providers_yaml(n)
        path.write_text(text)
        registry = ProviderRegistry(path, lambda: env, None)
        ticks = 50
        started = time.perf_counter()
        for _ in range(ticks):
            assert not registry.reload()
        unchanged = (time.perf_counter() - started) / ticks * 1000
        changed = []
        for k in range(edits):
            with path.open("a") as f:
                f.write(f"# edit {k}\n")
            started = time.perf_counter()
            assert registry.reload()
            changed.append((time.perf_counter() - started) * 1000)
    return {"models": n, "unchanged_ms": unchanged, "reload_ms": statistics.median(changed)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, nargs="+", default=[5, 50, 200])
    ap.add_argument("--edits", type=int, default=5)
    args = ap.parse_args(argv)
    for n in args.models:
        r = measure(n, args.edits)
        print(f"{r['models']:4d} models: unchanged tick {r['unchanged_ms']:.2f} ms, "
              f"reload after an edit {r['reload_ms']:.1f} ms (median of {args.edits})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
