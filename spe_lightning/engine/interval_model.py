"""The interval model of anchored estimates, fitted on labelled calibration pairs (docs/intervals.md).

:func:`fit_interval_model` learns, from pairs whose real difference to the calibration set is known
(:mod:`spe_lightning.engine.calibration_pairs`), how far an anchored prediction misses: the move rule (G's move,
the pairs' own slope, or a mix, chosen per run on held-out pair families), the scale of the misses
(``s0 + slope * |move|``), their normalised scores, the reach of the pairs (largest label-free distance, fewest
images of a pair's set) and whether SPE tracks the metric at all. :mod:`spe_lightning.engine.estimate` turns it
into half-widths and flags. Plain NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from spe_lightning.engine.calibration_pairs import independent_set_scale, pairs_for_target
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.metrics import BOUNDED

__all__ = [
    "INTERVAL_RULES",
    "MAX_HALF_WIDTH",
    "MIN_PAIRS",
    "MOVE_RULES",
    "QUANTILES",
    "finite_or_none",
    "fit_interval_model",
    "half_width",
    "metric_range",
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
#: how the half-width is read off the pairs' normalised misses: a Student-t prediction quantile of their
#: root mean square (default), their conformal order statistic (the worst pair's miss with 8 pairs), or the larger
#: of the two (``"max"``: a pair missed far beyond the others, a blind spot, is not averaged away)
QUANTILES = ("normal", "conformal", "max")
#: a metric is unreliable when its typical half-width exceeds this fraction of its range (dev choice: see
#: docs/intervals.md; Dice-type metrics have range 1, hd95 the image diagonal)
MAX_HALF_WIDTH = 0.25
#: held-out pair error allowed above the no-move baseline, as a fraction of the metric's range, before a metric
#: is called untracked (sampling noise of a handful of pairs)
TRACKING_TOLERANCE = 0.005


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when finite, else None (reports never hold NaN or inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def metric_range(metric: str, bounds: tuple[float | None, float | None] | None = None) -> float | None:
    """The width of ``metric``'s range (``bounds`` overrides :data:`~spe_lightning.engine.metrics.BOUNDED`),
    None when unbounded."""
    lo, hi = bounds if bounds is not None else BOUNDED.get(metric.split("/")[0], (None, None))
    return None if lo is None or hi is None else float(hi) - float(lo)


def fit_interval_model(
    pairs: Sequence[dict[str, Any]],
    metric: str,
    g: MetricMapping,
    pseudo_calibration: float | None,
    exclude: str | None = None,
    s0: float | None = None,
    rule: str = "fitted",
    move: str = "auto",
    quantile: str = "normal",
    target: str | None = None,
    bounds: tuple[float | None, float | None] | None = None,
    level: float = 0.9,
) -> dict[str, Any] | None:
    """The pair model of anchored estimates of ``metric``, fitted on labelled calibration pairs: how
    far an estimate moves from the calibration score, its interval, how far the pairs reached and
    whether SPE tracks the metric at all.

    Move (``model["move"]``): G fitted across checkpoints says how the real metric follows the pseudo
    one while the model trains; under a shift the pairs may say otherwise (on JSRT the real Dice fell
    about twice as fast per unit of pseudo Dice on the shifted copies as G says). The move is
    ``weight * (G(p_t) - G(p_c)) + (1 - weight) * pairs_slope * (p_t - p_c)``, ``pairs_slope`` the
    least-squares slope (through 0) of the pairs' real on their pseudo differences and ``weight`` in
    (1, 0.5, 0) the one whose predictions of held-out pair families (each family predicted from the
    others) missed least; ties keep G. ``move="g"`` keeps G alone (weight 1).

    Interval: each pair's prediction (its family's slope left out) misses its real difference; the
    model keeps the normalised misses ``|dr - prediction| / (s0 + slope * |prediction|)`` (plain
    numbers), so an estimate's half-width is their ``quantile`` (:data:`QUANTILES`) times the same scale
    at its own move (normalised split-conformal). ``rule="fitted"`` fits ``s0`` and ``slope`` to the
    pairs' misses (least squares of ``|miss|`` on ``|prediction|``, slope >= 0, ``s0`` at least the
    metric's floor times the slope); ``rule="proportional"`` fixes ``slope = 1`` and ``s0`` at the floor
    (or at the ``s0`` given). ``exclude`` drops pairs whose name starts with it. ``target``: keep the
    generic pairs and those styled like that target
    (:func:`~spe_lightning.engine.calibration_pairs.pairs_for_target`); None: the pairs as given (the caller
    has chosen them, e.g. ``pairs_for_target(pairs, None)`` for the generic model).

    ``model["distance"]``: the largest label-free distance of a pair (None when the pairs hold none);
    ``model["reliability"]``: ``{"reliable", "reason", ...}`` (see the module docstring); ``bounds``
    overrides the metric's range (hd95: the image diagonal).
    """
    if rule not in INTERVAL_RULES:
        raise ValueError(f"rule must be one of {INTERVAL_RULES}, got {rule!r}.")
    if move not in MOVE_RULES:
        raise ValueError(f"move must be one of {MOVE_RULES}, got {move!r}.")
    if quantile not in QUANTILES:
        raise ValueError(f"quantile must be one of {QUANTILES}, got {quantile!r}.")
    if pseudo_calibration is None:
        return None
    floor = _S0.get(metric.split("/")[0], 0.01) if s0 is None else float(s0)
    base = float(g.predict([pseudo_calibration])[0])
    fams, dps, drs, gms, dists, styled, sizes = [], [], [], [], [], [], []
    for p in pairs if target is None else pairs_for_target(pairs, target):
        if exclude and p["name"].startswith(exclude):
            continue
        dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
        if dp is None or dr is None:
            continue
        scale = independent_set_scale(p)  # a calibration subset stands for a set of new images of its size
        dp, dr = dp * scale, dr * scale
        gm = float(g.predict([pseudo_calibration + dp])[0]) - base
        if np.isfinite(gm) and np.isfinite(dr) and np.isfinite(dp):
            fams.append(pair_family(p["name"]))
            dps.append(float(dp))
            drs.append(float(dr))
            gms.append(gm)
            d = finite_or_none(p.get("distance"))
            if d is not None:
                dists.append(d)
            if isinstance(p.get("n"), int):
                sizes.append(p["n"])
            if p.get("target") is not None:
                styled.append({"d_pseudo": float(dp), "d_real": float(dr)})
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
    model: dict[str, Any] = {
        "s0": float(s),
        "slope": float(slope),
        "scores": sorted(float(v) for v in scores),
        "quantile": quantile,
        "move": rule_move,
        "n_pairs": len(dps),
        "n_target_pairs": len(styled),
        "styled": styled,
        "distance": max(dists) if len(dists) == len(dps) else None,
        # the fewest images of a pair's set: a smaller set's mean varies more than the pairs showed
        "n_images": min(sizes) if sizes and len(sizes) == len(dps) else None,
    }
    model["reliability"] = _reliability(model, metric, pred, dr_, bounds, level)
    return model


def _with_styled(model: dict[str, Any]) -> str:
    """`` (the target's styled one included)`` when the model holds target-styled pairs (the count then exceeds
    the run's generic pairs that the fit line prints), else empty."""
    return " (the target's styled one included)" if model.get("n_target_pairs") else ""


def _reliability(
    model: dict[str, Any],
    metric: str,
    pred: np.ndarray,
    dr: np.ndarray,
    bounds: tuple[float | None, float | None] | None,
    level: float,
) -> dict[str, Any]:
    """Whether SPE follows ``metric`` on the pairs: its held-out predictions miss less than not moving at all
    (estimate = calibration score, up to :data:`TRACKING_TOLERANCE` of the range), and its half-width at the
    pairs' median move is at most :data:`MAX_HALF_WIDTH` of the range."""
    span = metric_range(metric, bounds)
    mae, still = float(np.mean(np.abs(dr - pred))), float(np.mean(np.abs(dr)))
    half = half_width(model, float(np.median(np.abs(pred))), level)
    out: dict[str, Any] = {
        "reliable": True,
        "reason": None,
        "held_out_mae": mae,
        "no_move_mae": still,
        "half_width": half,
        "range": span,
    }
    tol = TRACKING_TOLERANCE * (span if span is not None else max(float(np.max(np.abs(dr))), 1e-12))
    if mae > still + tol:
        out.update(
            reliable=False,
            reason=f"on {len(dr)} calibration pairs{_with_styled(model)} SPE's held-out error {mae:.3g} was larger "
            f"than keeping the calibration score ({still:.3g}): SPE does not track {metric} here",
        )
    elif span is not None and half > MAX_HALF_WIDTH * span:
        out.update(
            reliable=False,
            reason=f"its interval half-width {half:.3g} on the calibration pairs exceeds {MAX_HALF_WIDTH:g} of the "
            f"metric's range ({span:.3g})",
        )
    return out


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


def half_width(model: dict[str, Any], moved: float, level: float) -> float:
    """The half-width at ``level`` of an estimate that moved by ``moved`` from the calibration score."""
    scores = np.asarray(model["scores"], float)
    # estimators saved before the fitted rule hold no slope (theirs was 1), before the t quantile no "quantile"
    scale = float(model["s0"]) + float(model.get("slope", 1.0)) * abs(moved)
    rule = model.get("quantile", "conformal")
    qs = []
    if rule in ("normal", "max"):
        # normalised misses taken as |N(0, sigma^2)|: the prediction quantile of a new one is t_n * rms
        qs.append(float(stats.t.ppf(0.5 + level / 2, df=len(scores))) * math.sqrt(float(np.mean(scores**2))))
    if rule != "normal":  # "conformal", "max" (and, as before, anything else a stored model may say)
        k = min(len(scores), math.ceil((len(scores) + 1) * level)) - 1
        qs.append(float(np.sort(scores)[k]))
    return max(qs) * scale
