"""Turning a pseudo metric into an estimate with an interval: the one place where this happens.

The paper estimates a target as ``G(pseudo_target)``, with G fitted across checkpoints. At any
checkpoint SPE also knows the calibration set's *real* metric, so by default (*anchored*) it estimates

    estimate = real_calibration + G(pseudo_target) - G(pseudo_calibration)

which cancels the part of G's error shared by the two sets at that checkpoint (on BUSI the
calibration pseudo Dice is not monotone in the real one; the difference still is informative).

Intervals (normalised split-conformal): at the final weights SPE measures labelled *pairs*
(:mod:`spe_lightning.engine.calibration_pairs`) whose real difference is known, and how far the
anchored prediction misses it. Each miss is divided by a scale ``s0 + slope * |prediction|``; the
half-width of an estimate is the ``level`` quantile of these scores times the scale at
``|G(p_t) - G(p_c)|``. The scale is fitted per run to the pairs' misses (``rule="fitted"``): where
the reverse step's misses grow with the move (JSRT) the intervals widen with it, where it misses
moves it cannot see whatever their size (blur, low resolution; BUSI) the width is nearly constant.
Without pairs, G's leave-one-out residual quantile across checkpoints is used.

Used by the run (:mod:`spe_lightning.engine.records`), :class:`~spe_lightning.SPEEstimator` and the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.metrics import BOUNDED

__all__ = [
    "INTERVAL_RULES",
    "MIN_PAIRS",
    "MOVE_RULES",
    "anchored_estimate",
    "estimate",
    "finite_or_none",
    "fit_interval_model",
    "pair_family",
]

#: floor of the interval scale per metric (metric units)
_S0 = {"hd95": 1.0}
#: the fewest labelled pairs an interval model is fitted on
MIN_PAIRS = 5
#: how the interval scale is set: fitted per run to the pairs' misses (default), or proportional to the move
INTERVAL_RULES = ("fitted", "proportional")
#: how far an anchored estimate moves: chosen per run on the pairs (default), or G alone
MOVE_RULES = ("auto", "g")
#: the candidate weights of G's move against the pairs' slope
MOVE_WEIGHTS = (1.0, 0.5, 0.0)


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when finite, else None (reports never hold NaN or inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fit_interval_model(
    pairs: Sequence[dict[str, Any]],
    metric: str,
    g: MetricMapping,
    pseudo_calibration: float | None,
    exclude: str | None = None,
    s0: float | None = None,
    rule: str = "fitted",
    move: str = "auto",
) -> dict[str, Any] | None:
    """The pair model of anchored estimates of ``metric``, fitted on labelled calibration pairs: how
    far an estimate moves from the calibration score, and its interval.

    Move (``model["move"]``): G fitted across checkpoints says how the real metric follows the pseudo
    one while the model trains; under a shift the pairs may say otherwise (on JSRT the real Dice fell
    about twice as fast per unit of pseudo Dice on the shifted copies as G says). The move is
    ``weight * (G(p_t) - G(p_c)) + (1 - weight) * pairs_slope * (p_t - p_c)``, ``pairs_slope`` the
    least-squares slope (through 0) of the pairs' real on their pseudo differences and ``weight`` in
    (1, 0.5, 0) the one whose predictions of held-out pair families (each family predicted from the
    others) missed least; ties keep G. ``move="g"`` keeps G alone (weight 1).

    Interval: each pair's prediction (its family's slope left out) misses its real difference; the
    model keeps the normalised misses ``|dr - prediction| / (s0 + slope * |prediction|)`` (plain
    numbers), so an estimate's half-width is their quantile times the same scale at its own move
    (normalised split-conformal). ``rule="fitted"`` fits ``s0`` and ``slope`` to the pairs' misses
    (least squares of ``|miss|`` on ``|prediction|``, slope >= 0, ``s0`` at least the metric's floor
    times the slope); ``rule="proportional"`` fixes ``slope = 1`` and ``s0`` at the floor (or at the
    ``s0`` given). ``exclude`` drops pairs whose name starts with it.
    """
    if rule not in INTERVAL_RULES:
        raise ValueError(f"rule must be one of {INTERVAL_RULES}, got {rule!r}.")
    if move not in MOVE_RULES:
        raise ValueError(f"move must be one of {MOVE_RULES}, got {move!r}.")
    if pseudo_calibration is None:
        return None
    floor = _S0.get(metric.split("/")[0], 0.01) if s0 is None else float(s0)
    base = float(g.predict([pseudo_calibration])[0])
    fams, dps, drs, gms = [], [], [], []
    for p in pairs:
        if exclude and p["name"].startswith(exclude):
            continue
        dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
        if dp is None or dr is None:
            continue
        gm = float(g.predict([pseudo_calibration + dp])[0]) - base
        if np.isfinite(gm) and np.isfinite(dr) and np.isfinite(dp):
            fams.append(pair_family(p["name"]))
            dps.append(float(dp))
            drs.append(float(dr))
            gms.append(gm)
    if len(dps) < MIN_PAIRS:
        return None
    fam, dp_, dr_, gm_ = np.asarray(fams), np.asarray(dps), np.asarray(drs), np.asarray(gms)
    rule_move: dict[str, Any] = (
        _choose_move(fam, dp_, dr_, gm_) if move == "auto" else {"weight": 1.0, "pairs_slope": None}
    )
    pred = _held_out_predictions(fam, dp_, dr_, gm_, rule_move["weight"])
    moved, missed = np.abs(pred), np.abs(dr_ - pred)
    s, slope = (floor, 1.0) if rule == "proportional" else _fit_scale(moved, missed, floor)
    scores = missed / (s + slope * moved)
    return {
        "s0": float(s),
        "slope": float(slope),
        "scores": sorted(float(v) for v in scores),
        "move": rule_move,
    }


def pair_family(name: str) -> str:
    """A calibration pair's family: ``subset`` for random subsets, else the shift (``noise_2`` -> ``noise``)."""
    return "subset" if name.startswith("subset") else name.rsplit("_", 1)[0]


def _slope_through_zero(x: np.ndarray, y: np.ndarray) -> float | None:
    xx = float((x * x).sum())
    return float((x * y).sum()) / xx if xx > 1e-12 else None


def _held_out_predictions(fam: np.ndarray, dp: np.ndarray, dr: np.ndarray, gm: np.ndarray, weight: float) -> np.ndarray:
    """Each pair's predicted real difference with the pairs' slope fitted without its family."""
    if weight >= 1.0:
        return gm.copy()
    pred = gm.copy()
    for f in np.unique(fam):
        out = fam == f
        k = _slope_through_zero(dp[~out], dr[~out])
        if k is not None:
            pred[out] = weight * gm[out] + (1 - weight) * k * dp[out]
    return pred


def _choose_move(fam: np.ndarray, dp: np.ndarray, dr: np.ndarray, gm: np.ndarray) -> dict[str, Any]:
    """The move weight with the smallest held-out-family error (see :func:`fit_interval_model`)."""
    k = _slope_through_zero(dp, dr)
    if k is None or len(np.unique(fam)) < 3:
        return {"weight": 1.0, "pairs_slope": k, "errors": {}}
    errors = {w: float(np.mean(np.abs(_held_out_predictions(fam, dp, dr, gm, w) - dr))) for w in MOVE_WEIGHTS}
    best = min(MOVE_WEIGHTS, key=lambda w: (round(errors[w], 12), -w))  # ties keep G
    return {"weight": best, "pairs_slope": k, "errors": {str(w): e for w, e in errors.items()}}


def _fit_scale(moved: np.ndarray, missed: np.ndarray, floor: float) -> tuple[float, float]:
    """``(s0, slope)`` of the least-squares line ``|miss| ~ s0 + slope * |move|`` with ``slope >= 0`` and
    ``s0 >= floor * slope`` (only their ratio matters: the conformal quantile absorbs the scale)."""
    a = np.stack([np.ones_like(moved), moved], 1)
    (s, slope), *_ = np.linalg.lstsq(a, missed, rcond=None)
    if not np.isfinite(slope) or slope <= 0:  # misses do not grow with the move: a constant width
        return max(float(missed.mean()), 1e-9), 0.0
    return max(float(s), floor * float(slope), 1e-9), float(slope)


def _half_width(model: dict[str, Any], moved: float, level: float) -> float:
    scores = model["scores"]
    k = min(len(scores), math.ceil((len(scores) + 1) * level)) - 1
    # estimators saved before the fitted rule hold no slope: theirs was 1
    return float(scores[k]) * (float(model["s0"]) + float(model.get("slope", 1.0)) * abs(moved))


def anchored_estimate(
    g: MetricMapping | None,
    metric: str,
    pseudo_target: float | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
    level: float = 0.9,
    interval_model: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """``{"value", "lower", "upper"}``: ``real_c + G(p_t) - G(p_c)``, clipped to the metric's range.

    The half-width comes from ``interval_model`` (:func:`fit_interval_model`) when given, else from G's
    leave-one-out residuals across checkpoints.
    """
    none: dict[str, float | None] = {"value": None, "lower": None, "upper": None}
    if g is None or pseudo_target is None or pseudo_calibration is None or real_calibration is None:
        return none
    moved = float(g.predict([pseudo_target])[0]) - float(g.predict([pseudo_calibration])[0])
    rule_move = (interval_model or {}).get("move") or {}
    w, k = float(rule_move.get("weight", 1.0)), rule_move.get("pairs_slope")
    if w < 1.0 and k is not None:  # the pairs' own slope under shift (see fit_interval_model)
        moved = w * moved + (1 - w) * float(k) * (float(pseudo_target) - float(pseudo_calibration))
    value = float(real_calibration) + moved
    half = _half_width(interval_model, moved, level) if interval_model else g.half_width(level)
    vals = np.asarray([value, value - half, value + half], float)
    low, high = BOUNDED.get(metric.split("/")[0], (None, None))
    vals = np.clip(vals, -np.inf if low is None else low, np.inf if high is None else high)
    out = dict(zip(("value", "lower", "upper"), (finite_or_none(v) for v in vals)))
    return out if out["value"] is not None else none


def estimate(
    g: MetricMapping | None,
    metric: str,
    pseudo: float | None,
    level: float = 0.9,
    no_g: str = "no mapping G",
    no_pseudo: str = "no pseudo metric",
    anchor: tuple[float | None, float | None, dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """One estimate ``{"value", "lower", "upper", "pseudo", "reason", "method"}`` from a pseudo metric.

    ``anchor = (pseudo_calibration, real_calibration, interval_model)`` at the same weights makes it
    anchored (see the module docstring); the paper's ``G(pseudo)`` then moves to ``paper``.
    """
    est: dict[str, Any] = {"value": None, "lower": None, "upper": None, "pseudo": finite_or_none(pseudo)}
    est["reason"] = no_g if g is None else (no_pseudo if est["pseudo"] is None else None)
    if est["reason"] is not None:
        return est
    assert g is not None
    lo, hi = g.interval([est["pseudo"]], level)
    est.update(
        value=finite_or_none(g.predict([est["pseudo"]])[0]),
        lower=finite_or_none(lo[0]),
        upper=finite_or_none(hi[0]),
        method="paper",
    )
    if anchor is not None:
        p_c, r_c, model = anchor
        res = anchored_estimate(g, metric, est["pseudo"], finite_or_none(p_c), finite_or_none(r_c), level, model)
        if res["value"] is not None:
            est["paper"] = {k: est[k] for k in ("value", "lower", "upper")}
            est.update(res, method="anchored")
    return est
