"""The shift benchmark's targets, built from the run's ``extra_test`` (clean, synthetic shifts, ``meta.csv``
groups), and measuring sets at the model's current weights the way the run does."""

from __future__ import annotations

from typing import Any

from spe_lightning.data.folder import read_meta
from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set, subset

__all__ = ["measure", "set_features", "shift_targets", "targets_from", "selection_targets", "SELECTION_SEVERITY"]


def measure(run: Any, model: Any, sets: dict[str, Any]) -> dict[str, Any]:
    """Pseudo metrics, real metrics and confidence of each of ``sets`` under ``model``'s weights (the run's path)."""
    rec = run.evaluate(model, sets=sets)
    return {
        name: {
            "pseudo": rec["pseudo"][name],
            "real": rec["real"].get(name, {}),
            "confidence": rec["confidence"][name],
            "n_support": rec["n_support"][name],
            "n_images": len(data),
            "distance": rec.get("distance", {}).get(name),  # label-free, to the calibration set (engine/distance.py)
        }
        for name, data in sets.items()
    }


def set_features(run: Any, targets: list[str]) -> dict[str, Any]:
    """The label-free item features (engine/distance.py) of the calibration set, the generic calibration pairs and
    ``targets`` at their last evaluation, rounded for the JSON: what the nearest-set flag is scored from, with a
    synthetic target's own shift family left out as its interval model leaves it out."""

    def rows(f: Any) -> list[list[float]]:
        return [[round(float(v), 6) for v in row] for row in f]

    cal = run.calibration_features
    return {
        "calibration": None if cal is None else rows(cal),
        "pairs": {n: rows(f) for n, f in run.pair_features().items()},
        "targets": {n: rows(run.set_features[n]) for n in targets if n in run.set_features},
    }


def shift_targets(run: Any, datamodule: Any, seed: int = 0) -> dict[str, Any]:
    """The benchmark's targets built from the run's ``extra_test``: clean, synthetic shifts, ``meta.csv`` groups."""
    ds = datamodule.spe_datasets()["target"]["extra_test"]
    return targets_from(run.sets["extra_test"], ds.ids, datamodule.root, seed)


def targets_from(base: Any, ids: Any, root: Any, seed: int = 0) -> dict[str, Any]:
    """Clean, synthetic shifts and ``meta.csv`` groups of the cached set ``base``.

    ``ids[i]`` is the id of ``base``'s dataset index ``i``; ``root`` holds the ``meta.csv``.
    """
    targets = {"clean": subset(base, range(len(base)), "clean")}
    for fam in SHIFT_FAMILIES:
        for sev in (1, 2, 3):
            t = shift_set(base, fam, sev, seed=seed * 100_000)
            targets[t.name] = t
    meta = read_meta(root)
    groups: dict[str, list[int]] = {}
    for pos, i in enumerate(base.indices):
        g = meta.get(ids[i], {}).get("group")
        if g:
            groups.setdefault(g, []).append(pos)
    for g, members in sorted(groups.items()):
        if len(groups) > 1 and len(members) >= 5:
            targets[f"group_{g}"] = subset(base, members, f"group_{g}")
    return targets


#: the shifted targets measured at every k-th checkpoint for checkpoint selection (``--select-every``)
SELECTION_SEVERITY = "_2"


def selection_targets(run: Any, datamodule: Any, seed: int = 0) -> dict[str, Any]:
    """The targets scored for checkpoint selection: the synthetic shifts at severity 2 and the meta.csv groups."""
    every = shift_targets(run, datamodule, seed)
    return {n: t for n, t in every.items() if n.endswith(SELECTION_SEVERITY) or n.startswith("group_")}
