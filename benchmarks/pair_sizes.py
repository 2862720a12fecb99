"""Write the set sizes the current code records with each calibration pair into benchmark files made before it did.

Since the independent-set scale (engine.calibration_pairs.independent_set_scale) a run's pairs carry ``n`` (images in
the pair's set) and, for a random calibration subset, ``n_calibration`` (images in the calibration set it was drawn
from). Files written before hold the same measurements without them; this adds them, so that the summary tables
(benchmarks/summary_table.py scores every file with the current estimators) read those pairs as the current code
does. ``n`` of a subset comes from its name (``subset<n>_<k>``); the calibration set is the benchmark's ``test``
split, counted in the dataset's meta.csv; a shifted or styled pair's set is the calibration set itself.
Nothing else in a file changes, and a pair that already has its sizes is left as it is.

    python benchmarks/pair_sizes.py benchmarks/results/select_*.json
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def calibration_size(result: dict[str, Any]) -> int:
    """The number of items in the run's calibration set: the dataset's ``test`` split (BenchmarkConfig's)."""
    data = Path(result["settings"]["data"])
    meta = (data if data.is_absolute() else REPO / data) / "meta.csv"
    with meta.open(newline="") as f:
        return sum(1 for row in csv.DictReader(f) if row["split"] == "test")


def with_sizes(pair: dict[str, Any], n_calibration: int) -> dict[str, Any]:
    """``pair`` with ``n`` (and ``n_calibration`` for a subset) as a run of the current code writes them."""
    out = dict(pair)
    found = re.fullmatch(r"subset(\d+)_\d+", str(pair.get("name", "")))
    if pair.get("kind") == "subset" and found:
        out.setdefault("n", int(found.group(1)))
        out.setdefault("n_calibration", n_calibration)
    else:
        out.setdefault("n", n_calibration)
    return out


def add_sizes(result: dict[str, Any]) -> int:
    """Add the sizes to every stored pair of ``result`` (in place); returns how many pairs changed."""
    n_cal, changed = calibration_size(result), 0
    for raw in result.get("shift_raw", {}).values():
        pairs = [with_sizes(p, n_cal) for p in raw.get("pairs", [])]
        changed += sum(a != b for a, b in zip(pairs, raw.get("pairs", [])))
        raw["pairs"] = pairs
        styled = raw.get("styled_pairs") or {}
        for target, p in styled.items():
            sized = with_sizes(p, n_cal)
            changed += sized != p
            styled[target] = sized
    return changed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", type=Path, nargs="+")
    for path in ap.parse_args().files:
        result = json.loads(path.read_text())
        changed = add_sizes(result)
        if changed:
            path.write_text(json.dumps(result, indent=2))
        print(f"{path}: {changed} pairs given their sizes (calibration set: {calibration_size(result)} images)")


if __name__ == "__main__":
    main()
