"""Rebuild the committed aptitude suites and built-in profiles from the shared routing data.

Owns: the recipe ``python -m scorer.build_assets [--data DIR] [--out DIR] [--seed N]``, which writes
``<out>/suites/{mmlu_pro,routerdc}.json`` and ``<out>/profiles/<suite>/<model>.json`` for every model
of each data set. The keywords (``keywords.json``) are hand-written and only read here.

Does not know: how suites are chosen or profiles computed (``scorer.aptitude``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorer.aptitude import assets_dir, build_suite, profile_from_outcomes, save_profile
from scorer.data import DataError, data_root, load_dataset

#: suite name -> data set folder it is built from
SUITES = {"mmlu_pro": "mmlu_pro", "routerdc": "routerdc"}
DEFAULT_SEED = 0


def build(data_dir: Path, out: Path, seed: int = DEFAULT_SEED) -> list[Path]:
    written = []
    for suite_name, folder in SUITES.items():
        data = load_dataset(data_dir / folder)
        suite = build_suite(data, suite_name, seed=seed)
        path = out / "suites" / f"{suite_name}.json"
        suite.save(path)
        written.append(path)
        for model in data.models:
            written.append(save_profile(suite, model, profile_from_outcomes(suite, data, model), out / "profiles"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="shared data root (default: $SATROUTE_DATA_DIR or ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="assets folder (default: scorer/assets)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    try:
        paths = build(args.data or data_root(), args.out or assets_dir(), args.seed)
    except DataError as exc:  # a data folder missing or malformed: one line, not a traceback
        print(f"python -m scorer.build_assets: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
