"""How SPE's dataset-level Dice and the quality regressor's mean per-case estimate are combined.

``w * regressor mean + (1 - w) * SPE``, the weight ``w`` chosen on development sets only (the calibration
pairs' sets, whose real Dice is known) and kept only where it beats SPE alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spe_lightning.engine.mapping import MetricMapping

__all__ = ["choose_combination", "combination_from_pairs", "combined_value"]


def choose_combination(
    spe: Sequence[float] | np.ndarray,
    regressor: Sequence[float] | np.ndarray,
    real: Sequence[float] | np.ndarray,
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> dict[str, Any]:
    """Weight ``w`` of the dataset-level combination ``w * regressor + (1 - w) * spe``, from development sets only.

    ``spe``, ``regressor``, ``real``: one value per development set (e.g. SPE's estimate, the mean per-case
    regressor estimate and the real mean Dice on shifted copies of the calibration set). The weight with the
    lowest mean absolute error is kept only if it beats SPE alone (``w = 0``); ``mae`` maps each weight to
    its error. Non-finite sets are skipped.
    """
    s, q, y = (np.asarray(v, dtype=float).reshape(-1) for v in (spe, regressor, real))
    if not (s.shape == q.shape == y.shape):
        raise ValueError(f"lengths differ: {s.size} SPE, {q.size} regressor, {y.size} real values.")
    ok = np.isfinite(s) & np.isfinite(q) & np.isfinite(y)
    s, q, y = s[ok], q[ok], y[ok]
    if s.size == 0:
        return {"weight": 0.0, "mae": {}, "n_sets": 0}
    mae = {float(w): float(np.mean(np.abs(w * q + (1 - w) * s - y))) for w in weights}
    best = min(mae, key=lambda w: (mae[w], w))
    keep = best if mae[best] < mae.get(0.0, float(np.mean(np.abs(s - y)))) else 0.0
    return {"weight": keep, "mae": {str(k): v for k, v in mae.items()}, "n_sets": int(s.size)}


def combined_value(weight: float, regressor: float | None, spe: float | None) -> float | None:
    """``weight * regressor + (1 - weight) * spe`` (None when either is missing)."""
    if regressor is None or spe is None:
        return None
    return float(weight) * float(regressor) + (1 - float(weight)) * float(spe)


def combination_from_pairs(
    pairs: Sequence[dict[str, Any]],
    regressor_means: dict[str, float | None],
    g: MetricMapping | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
) -> dict[str, Any] | None:
    """:func:`choose_combination` on a run's calibration pairs (Dice): development sets whose real Dice
    (``real_calibration + d_real``), SPE's anchored estimate and the regressor's mean estimate
    (``regressor_means`` by pair name) are all known. None without them.

    Neither signal is scored on data it was fitted on: SPE's estimate of a pair is made with the move rule it
    applies (:func:`~spe_lightning.engine.estimate.fit_interval_model`) fitted without that pair's family,
    and ``regressor_means`` must be held out the same way (e.g. :func:`spe_lightning.estimator.heldout_regressor_means`;
    a pair whose mean is None, such as a subset of the calibration cases the regressor's map was fitted on,
    is skipped). Only generic pairs (no ``"target"``) are used."""
    from spe_lightning.engine.calibration_pairs import pairs_for_target
    from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model, pair_family

    if not regressor_means or g is None or pseudo_calibration is None or real_calibration is None:
        return None
    generic = pairs_for_target(pairs, None)
    spe, reg, real, names = [], [], [], []
    for p in generic:
        dp, dr, mean = p["d_pseudo"].get("dice"), p["d_real"].get("dice"), regressor_means.get(p["name"])
        if dp is None or dr is None or mean is None:
            continue
        fam = pair_family(p["name"])
        held_out = [q for q in generic if pair_family(q["name"]) != fam]
        model = fit_interval_model(held_out, "dice", g, pseudo_calibration)
        value = anchored_estimate(
            g, "dice", pseudo_calibration + dp, pseudo_calibration, real_calibration, interval_model=model
        )["value"]
        spe.append(np.nan if value is None else value)
        reg.append(mean)
        real.append(real_calibration + dr)
        names.append(p["name"])
    return {**choose_combination(spe, reg, real), "sets": names, "held_out": True}
