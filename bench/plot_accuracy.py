"""Plot routing accuracy by zoo from ``satroute evaluate --json`` reports.

Usage: ``python bench/plot_accuracy.py OUT.png LABEL=report.json [LABEL=report.json ...]``

One group of bars per zoo (the LABEL): random choice, the best single model, each baseline, the
router when the report has one, and the oracle. Prints the table it plots.
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, pairs = argv[0], [a.partition("=") for a in argv[1:]]
    reports = {label: json.load(open(path, encoding="utf-8")) for label, _, path in pairs}
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
