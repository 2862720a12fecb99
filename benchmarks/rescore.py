"""Rewrite the derived fields of recorded benchmark JSONs with the current scoring code.

A benchmark JSON holds what a run measured (records, raw pseudo and real metrics, calibration
pairs) and what the scoring code of the day derived from it (paper metrics, shift scores,
selection). When only the scoring changes (an interval rule, a new row), this recomputes the
derived fields in place, so the files stay what the current code writes without retraining:

    python benchmarks/rescore.py benchmarks/results/select_*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spe_lightning.benchmarking import paper_metrics, selection_scores, shift_scores


def rescore(result: dict) -> dict:
    """The result with ``metrics*`` (paper protocol), shift scores and selection recomputed where measured."""
    if result.get("records"):
        paper_metrics(result)
    if result.get("shift_raw"):
        result.update(shift_scores(result))
        result["selection"] = selection_scores(result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    for f in ap.parse_args().files:
        path = Path(f)
        path.write_text(json.dumps(rescore(json.loads(path.read_text())), indent=2))
        print(f"rescored {path}")


if __name__ == "__main__":
    main()
