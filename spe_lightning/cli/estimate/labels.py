"""``spe-lightning estimate`` with a few labelled cases (docs/few_labels.md): reading ``--labelled-masks`` and
``--label-design``, writing ``--suggest-labels``' files, printing the prediction-powered estimates."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from spe_lightning.cli.estimate.inputs import read_case_masks
from spe_lightning.cli.estimate.outputs import csv_cell, write_file
from spe_lightning.data.images import MASK_SUFFIXES, find_mask_file, is_nifti

__all__ = ["MASK_SUFFIXES", "label_inputs", "label_outputs", "print_labels"]


def label_inputs(a: argparse.Namespace, sources: Sequence[str], size: int | None, est: Any) -> dict[str, Any]:
    """``estimate``'s ``labelled_masks`` (by case position) and ``label_design`` from the options ({} without)."""
    if a.label_design is not None and a.labelled_masks is None:
        raise ValueError("--label-design needs --labelled-masks (the masks of the suggested cases).")
    if a.labelled_masks is None:
        return {}
    if a.dataset is not None:
        raise ValueError(
            "--labelled-masks reads masks named like image files: with --dataset, pass the labelled cases' masks "
            "through the Python API (SPEEstimator.estimate(labelled_masks=...))."
        )
    root = Path(a.labelled_masks)
    if not root.is_dir():
        raise NotADirectoryError(f"--labelled-masks {root}: no such folder.")
    if est.config.classes:
        raise ValueError("--labelled-masks: prediction-powered estimates are for binary estimators.")
    fg = est.config.foreground_class
    if any(is_nifti(src) for src in sources):
        raise ValueError("--labelled-masks: only for 2D images (the images include NIfTI volumes).")
    found = [(pos, find_mask_file(root, src), Path(a.images) / src) for pos, src in enumerate(sources)]
    cases = [(pos, path, image) for pos, path, image in found if path is not None]  # the cases labelled so far
    read = read_case_masks(cases, root, fg, size, a.resize, "--labelled-masks")
    masks: dict[int | str, Tensor] = {pos: mask for pos, mask in read.items()}  # the estimator takes ids or positions
    if not masks:
        raise ValueError(f"--labelled-masks {root}: no mask named like any of the {len(sources)} images.")
    design = None
    if a.label_design is not None:
        try:
            design = json.loads(Path(a.label_design).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--label-design {a.label_design}: cannot read it as JSON: {err}") from err
        if not isinstance(design, dict) or design.get("design") != "stratified":
            raise ValueError(f"--label-design {a.label_design}: not a label_design.json of --suggest-labels.")
    return {"labelled_masks": masks, "label_design": design}


def label_outputs(
    a: argparse.Namespace, est: Any, res: Any, sources: Sequence[str], out: Path, summary: dict[str, Any]
) -> None:
    """With ``--suggest-labels``: suggested_labels.csv, label_design.json and ``summary["suggested_labels"]``."""
    if a.suggest_labels is None:
        return
    if a.suggest_labels > len(res.cases):
        raise ValueError(f"--suggest-labels {a.suggest_labels}: only {len(res.cases)} images.")
    design = est.suggest_labels(res, a.suggest_labels, seed=a.suggest_seed)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "file", "stratum", "estimated_dice"])
    for i in design["chosen"]:
        c = res.cases[i]
        w.writerow([csv_cell(c.id), csv_cell(sources[i]), design["strata"][i], c.estimated_dice or ""])
    write_file(out / "suggested_labels.csv", buf.getvalue())
    write_file(out / "label_design.json", json.dumps(design, indent=2))
    summary["suggested_labels"] = {
        "k": design["k"],
        "ids": design["chosen_ids"],
        "files": [sources[i] for i in design["chosen"]],
        "design": design["design"],
        "rule": design["rule"],
        "uncertainty": design["uncertainty"],
        "seed": design["seed"],
        "guarantee": design["guarantee"],
        "csv": "suggested_labels.csv",
        "design_file": "label_design.json",
    }


def print_labels(res: Any, summary: dict[str, Any]) -> None:
    """The prediction-powered estimates (with labels) and the suggested cases (with --suggest-labels)."""
    lab = res.labelled
    if lab is not None:

        def f(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        print(
            f"\nWith {lab['n_labels']} labelled of {lab['n_cases']} cases ({lab['design']} design; "
            f"predictions: {lab['predictions']}):"
        )
        if lab["reason"]:
            print(f"no prediction-powered interval: {lab['reason']}")
        print(
            f"| metric | prediction-powered | {res.level:.0%} interval | labelled only | interval | lambda |\n"
            "|---|---|---|---|---|---|"
        )
        for m, r in lab["metrics"].items():
            if "estimate" not in r:
                print(f"| {m} | n/a | | {f(r.get('labelled_mean'))} | | |")
                continue
            print(
                f"| {m} | {f(r['estimate'])} | {f(r['lower'])} – {f(r['upper'])} | {f(r['classical'])} "
                f"| {f(r['classical_lower'])} – {f(r['classical_upper'])} | {r['lambda']:.2f} |"
            )
    sug = summary.get("suggested_labels")
    if sug is not None:
        print(f"\nLabel these {sug['k']} cases ({sug['rule']}; seed {sug['seed']}):")
        print("  " + ", ".join(sug["files"]))
        print(
            "then run again with --labelled-masks DIR --label-design label_design.json; "
            "cases picked by hand instead void the interval."
        )
