"""Plot routing accuracy by zoo from ``satroute evaluate --json`` reports.

Usage: ``python bench/plot_accuracy.py OUT.png LABEL=report.json [LABEL=report.json ...]``

One group of bars per zoo (the LABEL): random choice, the best single model, each baseline, the
router when the report has one, and the oracle. Prints the table it plots.

``LABEL=report.json+scores.jsonl:ZOO:WEIGHT`` takes the router's figure from the line of a
``bench/router_scores.py report`` output whose zoo and weight are those (a checkpoint routed from
its saved scores), the rest from the ``satroute evaluate`` report; both must count the same prompts.
"""
from __future__ import annotations

import json
import sys


def load_report(spec: str) -> dict:
    """``report.json`` or ``report.json+scores.jsonl:ZOO:WEIGHT`` (see the module's doc)."""
    path, _, router = spec.partition("+")
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    if not router:
        return report
    lines, zoo, weight = router.rsplit(":", 2)
    with open(lines, encoding="utf-8") as fh:
        found = [r for r in map(json.loads, fh) if r["zoo"] == zoo and float(r["weight"]) == float(weight)]
    if len(found) != 1:
        raise SystemExit(f"{lines}: {len(found)} lines of zoo {zoo!r} at weight {weight}, expected one")
    if found[0]["n"] != report["n"]:
        raise SystemExit(f"{lines} counts {found[0]['n']} prompts for {zoo!r}, {path} {report['n']}")
    return {**report, "router": found[0]["router"], "router_name": "model-sat"}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, pairs = argv[0], [a.partition("=") for a in argv[1:]]
    reports = {label: load_report(spec) for label, _, spec in pairs}
    series: dict[str, list[float]] = {}
    for label, r in reports.items():
        row = {"random": r["random"], "best single": r["best_single"]["accuracy"], **r.get("baselines", {})}
        if r.get("router") is not None:
            row[f"router ({r.get('router_name', 'router')})"] = r["router"]
        row["oracle"] = r["oracle"]
        for name, value in row.items():
            series.setdefault(name, [float("nan")] * len(reports))[list(reports).index(label)] = value
    print("| zoo | " + " | ".join(series) + " |")
    for i, label in enumerate(reports):
        print(f"| {label} | " + " | ".join(f"{v[i]:.3f}" for v in series.values()) + " |")
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(reports), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(reports))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(reports))], list(reports))
    ax.set_ylabel("routing accuracy (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
