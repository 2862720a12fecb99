"""Calibration of the quality regressor's raw output: raw -> per-case Dice with intervals and a flag threshold.

:func:`calibrate_quality` fits an isotonic (or linear) map raw -> real per-case Dice on a labelled calibration
set, an interval from its leave-one-out residuals (split-conformal half-width at ``level``, per estimated-Dice
bin) and a flag threshold for real Dice < ``dice_cut``; :func:`quality_estimates` applies it to new cases.
Plain NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from spe_lightning.engine.mapping import MetricMapping

__all__ = ["calibrate_quality", "quality_estimates"]


def _combine(x: np.ndarray, c: np.ndarray | None, weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return x
    if c is None:
        raise ValueError("this quality calibration combines the regressor with the model's confidence; pass it.")
    return float(weights[0]) * x + float(weights[1]) * c


def _conformal(abs_resid: np.ndarray, level: float) -> float:
    r = np.sort(abs_resid)
    return float(r[min(math.ceil((r.size + 1) * level), r.size) - 1])


def _bin_half_widths(
    est: np.ndarray, resid: np.ndarray, bins: Sequence[float], level: float, fallback: float, min_per_bin: int
) -> list[float]:
    edges = np.asarray(bins, dtype=float)
    k = np.clip(np.searchsorted(edges, est, side="right") - 1, 0, len(edges) - 2)
    return [
        _conformal(np.abs(resid[k == b]), level) if (k == b).sum() >= min_per_bin else float(fallback)
        for b in range(len(edges) - 1)
    ]


def calibrate_quality(
    predicted: Sequence[float] | np.ndarray | Tensor,
    real_dice: Sequence[float] | np.ndarray | Tensor,
    kind: str = "isotonic",
    level: float = 0.9,
    dice_cut: float = 0.7,
    confidence: Sequence[float] | np.ndarray | Tensor | None = None,
    extra_pairs: tuple[np.ndarray, ...] | None = None,
    bins: Sequence[float] = (0.0, 0.5, 0.7, 0.85, 1.0),
    min_per_bin: int = 10,
) -> dict[str, Any]:
    """Map raw regressor outputs to per-case Dice on a labelled calibration set (plain numbers, safe to save).

    ``mapping``: G score -> real Dice (``kind`` isotonic or linear, bounded to [0, 1]; :meth:`MetricMapping.to_dict`),
    where the score is the raw output, or, with the model's per-case ``confidence``, ``weights[0] * raw +
    weights[1] * confidence`` (least-squares weights). ``extra_pairs`` (raw, Dice) or (raw, Dice, confidence),
    e.g. :func:`synthetic_pairs` or the model's predictions on shifted copies of the calibration images,
    join the fit of the weights, the map and the per-bin widths (not the flag threshold nor the reported
    statistics). ``half_width``: the split-conformal half-width at ``level`` from the
    leave-one-out residuals of the real calibration cases; ``bin_half_widths``: the same per bin of the
    estimate (``bins`` edges; Mondrian conformal), from the leave-one-out residuals of every pair whose
    estimate falls in the bin (the global half-width for bins with fewer than ``min_per_bin``), so a case
    estimated bad gets the wider interval bad cases need; ``threshold``: cases whose *estimated* Dice is
    below it are flagged; it maximises Youden's J (TPR - FPR) for real Dice < ``dice_cut`` on the
    leave-one-out estimates (``dice_cut`` itself when either kind has fewer than 2 cases). Also the
    calibration ``spearman`` and ``auroc`` of the score.
    """
    from spe_lightning.percase.rca import auroc, spearman

    x = np.asarray(predicted, dtype=float).reshape(-1)
    y = np.asarray(real_dice, dtype=float).reshape(-1)
    c = None if confidence is None else np.asarray(confidence, dtype=float).reshape(-1)
    if x.shape != y.shape or (c is not None and c.shape != x.shape):
        raise ValueError(
            f"{x.size} predictions, {y.size} real Dice values" + ("" if c is None else f", {c.size} confidences.")
        )
    ok = np.isfinite(x) & np.isfinite(y) & (np.isfinite(c) if c is not None else True)
    x, y = x[ok], y[ok]
    c = None if c is None else c[ok]
    ex = ey = ec = np.zeros(0)
    if extra_pairs is not None:
        ex, ey = (np.asarray(v, dtype=float).reshape(-1) for v in extra_pairs[:2])
        ec = np.asarray(extra_pairs[2], dtype=float).reshape(-1) if len(extra_pairs) > 2 else np.zeros(0)
        if c is not None and ec.shape != ex.shape:
            raise ValueError("with confidence, extra_pairs must be (raw, Dice, confidence).")
        keep = np.isfinite(ex) & np.isfinite(ey) & (np.isfinite(ec) if c is not None else True)
        ex, ey, ec = ex[keep], ey[keep], (ec[keep] if c is not None else ec)
    weights = None
    if c is not None:
        xa, ca, ya = np.concatenate([x, ex]), np.concatenate([c, ec]), np.concatenate([y, ey])
        w = np.linalg.lstsq(np.stack([xa, ca, np.ones_like(xa)], 1), ya, rcond=None)[0]
        weights = [float(w[0]), float(w[1])] if w[0] > 0 and w[1] > 0 else ([1.0, 0.0] if w[0] > 0 else [0.0, 1.0])
    score = _combine(x, c, weights)
    n = score.size
    fit_x = np.concatenate([score, _combine(ex, ec if c is not None else None, weights)])
    fit_y = np.concatenate([y, ey])
    g = MetricMapping.fit(kind, fit_x, fit_y, bounds=(0.0, 1.0))
    all_resid = np.asarray(g.residuals)
    resid = all_resid[:n]  # leave-one-out residuals of the real calibration cases
    g.residuals = [float(r) for r in resid]
    widths = _bin_half_widths(fit_y - all_resid, all_resid, bins, level, g.half_width(level), min_per_bin)
    loo = y - resid
    bad = y < dice_cut
    threshold, method = float(dice_cut), "dice_cut"
    if bad.sum() >= 2 and (~bad).sum() >= 2:
        cand = np.unique(loo)
        cuts = np.concatenate([[cand[0] - 1e-9], (cand[:-1] + cand[1:]) / 2, [cand[-1] + 1e-9]])
        flag = loo[None, :] < cuts[:, None]
        j = flag[:, bad].mean(1) - flag[:, ~bad].mean(1)
        best = np.flatnonzero(j == j.max())
        threshold, method = float(cuts[best[len(best) // 2]]), "youden"
    return {
        "mapping": g.to_dict(),
        "weights": weights,
        "n_extra_pairs": 0 if extra_pairs is None else int(len(fit_x) - n),
        "level": float(level),
        "half_width": g.half_width(level),
        "bins": [float(b) for b in bins],
        "bin_half_widths": widths,
        "dice_cut": float(dice_cut),
        "threshold": threshold,
        "threshold_method": method,
        "n_cases": int(n),
        "n_below_cut": int(bad.sum()),
        "spearman": spearman(score, y),
        "auroc": auroc(-score, bad),
        "loo_mae": float(np.mean(np.abs(resid))) if n else None,
    }


def quality_estimates(
    calibration: dict[str, Any],
    predicted: Sequence[float] | np.ndarray | Tensor,
    confidence: Sequence[float] | np.ndarray | Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Per case from :func:`calibrate_quality`: ``score`` (what is ranked), ``estimate``, ``lower``, ``upper``
    (float64) and ``flagged`` (bool). ``confidence`` is needed when the calibration combined it."""
    x = np.asarray(predicted, dtype=float).reshape(-1)
    c = None if confidence is None else np.asarray(confidence, dtype=float).reshape(-1)
    score = _combine(x, c, calibration.get("weights"))
    g = MetricMapping.from_dict(calibration["mapping"])
    est = g.predict(score)
    q = np.full(est.shape, float(calibration["half_width"]))
    if calibration.get("bins"):
        edges = np.asarray(calibration["bins"], dtype=float)
        k = np.clip(np.searchsorted(edges, est, side="right") - 1, 0, len(edges) - 2)
        q = np.asarray(calibration["bin_half_widths"], dtype=float)[k]
    return {
        "score": score,
        "estimate": est,
        "lower": np.clip(est - q, 0.0, 1.0),
        "upper": np.clip(est + q, 0.0, 1.0),
        "flagged": est < float(calibration["threshold"]),
    }
