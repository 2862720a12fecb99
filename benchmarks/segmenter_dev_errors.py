"""Why ``segmenter="auto"`` falls back to ``learned_propagation``, on development data only.

The recorded runs ``shift_<dataset>_current_seed0.json`` trained one model per dataset with two SPE callbacks on the
same checkpoints (label fusion and the learned propagation). Their calibration pairs (random subsets of the
``test`` split and its shifted copies, real Dice known) are development data; each pair is predicted by SPE's move
rule fitted on the *other* pair families (:func:`spe_lightning.benchmarking.pair_errors`). No extra_test image, shifted
copy of it or other site enters this table.

    python benchmarks/segmenter_dev_errors.py          # prints the markdown table of the stored JSON
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spe_lightning.benchmarking import pair_errors

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"JSRT heart": "jsrt_heart", "JSRT lungs": "jsrt_lungs_covid", "BUSI lesions": "busi"}
SEGMENTERS = ("label_fusion", "learned_propagation")


def dev_errors(result: dict[str, Any], segmenter: str) -> dict[str, Any]:
    """SPE's held-out Dice error on the calibration pairs of one segmenter's callback in a two-segmenter run."""
    one = {**result, "shift_raw": {segmenter: result["shift_raw"][segmenter]}}
    one["records"] = {segmenter: result["records"][segmenter]}
    return pair_errors(one)["spe"]


def table() -> str:
    lines = [
        "| dataset | pairs | " + " | ".join(f"{s} Dice MAE" for s in SEGMENTERS) + " |",
        "|---|---|" + "---|" * len(SEGMENTERS),
    ]
    for label, stem in RUNS.items():
        result = json.loads((RESULTS / f"shift_{stem}_current_seed0.json").read_text())
        errs = [dev_errors(result, s) for s in SEGMENTERS]
        lines.append(f"| {label} | {errs[0]['n']} | " + " | ".join(f"{e['mae']:.3f}" for e in errs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
