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

Four guards on top (docs/intervals.md; compared on held-out families of development pairs by
benchmarks/interval_rules.py):

- *quantile*: with 8 pairs the 90% conformal quantile is the single worst pair's miss; by default the
  half-width is a Student-t prediction quantile of the normalised misses (``quantile="normal"``), which
  uses every pair (on the recorded runs' pairs: same coverage, width sd over seeds 0.015 vs 0.018).
- *extrapolation*: each pair and target carries a label-free distance to the calibration set
  (:mod:`spe_lightning.engine.distance`); a target farther than every pair the model was fitted on
  gets its half-width multiplied by ``distance / largest pair distance`` and is flagged
  ``outside_calibrated_range``; so is a target whose nearest-set distance (to the calibration set and to
  each pair's set) exceeds :data:`~spe_lightning.engine.distance.NEAREST_SET_LIMIT`: it looks like nothing the
  interval was calibrated on, though one far pair may reach farther in another direction.
- *disagreeing moves*: the interval always spans the candidate estimates (G's move, the pairs' slope,
  the paper's ``G(p_t)``, and the estimate anchored on the target's styled calibration set instead of the
  calibration set): when they disagree by more than the interval, which one is right is unknown.
- *reliability*: a metric whose held-out pair predictions miss by more than not moving at all
  (estimate = calibration score), or whose half-width exceeds :data:`MAX_HALF_WIDTH` of the metric's
  range, is reported as unreliable: no value, a ``reason`` saying why (the numbers stay under ``withheld``).

Used by the run (:mod:`spe_lightning.engine.records`), :class:`~spe_lightning.SPEEstimator` and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from spe_lightning.engine.calibration_pairs import pairs_for_target
from spe_lightning.engine.distance import NEAREST_SET_LIMIT
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.metrics import BOUNDED
from spe_lightning.engine.results import Estimate, Interval

__all__ = [
    "INTERVAL_RULES",
    "MAX_HALF_WIDTH",
    "MIN_PAIRS",
    "MOVE_RULES",
    "QUANTILES",
    "anchored_estimate",
    "anchored_value",
    "estimate",
    "finite_or_none",
    "fit_interval_model",
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
    half = _half_width(model, float(np.median(np.abs(pred))), level)
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
            reason=f"on {len(dr)} calibration pairs SPE's held-out error {mae:.3g} was larger than keeping the "
            f"calibration score ({still:.3g}): SPE does not track {metric} here",
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


def _half_width(model: dict[str, Any], moved: float, level: float) -> float:
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


def _moves(
    g: MetricMapping, pseudo_target: float, pseudo_calibration: float, interval_model: dict[str, Any] | None
) -> tuple[float, float, float | None, float]:
    """``(move, G's move, the pairs' slope move or None, G(p_t))`` of an anchored estimate."""
    g_t = float(g.predict([pseudo_target])[0])
    g_move = g_t - float(g.predict([pseudo_calibration])[0])
    moved = g_move
    rule_move = (interval_model or {}).get("move") or {}
    w, k = float(rule_move.get("weight", 1.0)), rule_move.get("pairs_slope")
    slope_move = None if k is None else float(k) * (float(pseudo_target) - float(pseudo_calibration))
    if w < 1.0 and slope_move is not None:  # the pairs' own slope under shift (see fit_interval_model)
        moved = w * g_move + (1 - w) * slope_move
    return moved, g_move, slope_move, g_t


def _styled_anchor(
    g: MetricMapping,
    moved: float,
    pseudo_calibration: float,
    real_calibration: float,
    interval_model: dict[str, Any] | None,
) -> float | None:
    """The estimate anchored on the target-styled calibration set instead of the calibration set: its real score
    ``real_c + d_real`` plus the same move rule from its pseudo metric ``p_c + d_pseudo`` to the target's
    (``moved``: the target's move from the calibration set; the mean over the target's styled pairs; None without
    any).

    Both anchors are labelled sets at the final weights; the styled one looks more like the target, the plain
    one is what the pairs were measured against. On development data neither is the better one on every task
    (benchmarks/styled_anchor_dev.py), so where they disagree the interval spans both.
    """
    pairs = (interval_model or {}).get("styled") or []
    cands = []
    for p in pairs:
        moved_s = _moves(g, pseudo_calibration + float(p["d_pseudo"]), pseudo_calibration, interval_model)[0]
        cands.append(float(real_calibration) + float(p["d_real"]) + moved - moved_s)
    cands = [c for c in cands if math.isfinite(c)]
    return float(np.mean(cands)) if cands else None


def anchored_value(
    g: MetricMapping | None,
    metric: str,
    pseudo_target: float | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
    interval_model: dict[str, Any] | None = None,
    bounds: tuple[float | None, float | None] | None = None,
) -> float | None:
    """The value of :func:`anchored_estimate` alone (the same move rule and range), e.g. per checkpoint."""
    if g is None or None in (pseudo_target, pseudo_calibration, real_calibration):
        return None
    assert pseudo_target is not None and pseudo_calibration is not None and real_calibration is not None
    value = float(real_calibration) + _moves(g, pseudo_target, pseudo_calibration, interval_model)[0]
    low, high = bounds if bounds is not None else BOUNDED.get(metric.split("/")[0], (None, None))
    return finite_or_none(np.clip(value, -np.inf if low is None else low, np.inf if high is None else high))


def anchored_estimate(
    g: MetricMapping | None,
    metric: str,
    pseudo_target: float | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
    level: float = 0.9,
    interval_model: dict[str, Any] | None = None,
    distance: float | None = None,
    bounds: tuple[float | None, float | None] | None = None,
    span: bool = True,
    nearest: float | None = None,
    n_images: int | None = None,
) -> dict[str, Any]:
    """``{"value", "lower", "upper"}``: ``real_c + G(p_t) - G(p_c)``, clipped to the metric's range.

    The half-width comes from ``interval_model`` (:func:`fit_interval_model`) when given, else from G's
    leave-one-out residuals across checkpoints. With an interval model: ``distance`` (the target's
    label-free distance to the calibration set) beyond the pairs' largest widens the interval by their
    ratio and adds ``outside_calibrated_range``, which ``nearest`` (the target's nearest-set distance) beyond
    :data:`~spe_lightning.engine.distance.NEAREST_SET_LIMIT` also sets (without widening); ``span`` makes the
    interval include every candidate move's estimate, the paper's ``G(p_t)`` and the styled anchor
    (``styled_anchor``, when the model holds the target's styled pairs). ``bounds`` overrides the metric's range.
    ``n_images``: the set's size; a set smaller than every pair's set (``interval_model["n_images"]``) varies
    more than the pairs showed: its half-width is multiplied by ``sqrt(pairs' size / n_images)`` (the spread of
    a mean of ``n`` cases) and it is ``outside_calibrated_range``.
    """
    none: dict[str, float | None] = {"value": None, "lower": None, "upper": None}
    if g is None or pseudo_target is None or pseudo_calibration is None or real_calibration is None:
        return none
    assert pseudo_target is not None and pseudo_calibration is not None and real_calibration is not None
    moved, g_move, slope_move, g_t = _moves(g, pseudo_target, pseudo_calibration, interval_model)
    value = float(real_calibration) + moved
    half = _half_width(interval_model, moved, level) if interval_model else g.half_width(level)
    extra: dict[str, Any] = {}
    if interval_model:
        reach = finite_or_none(interval_model.get("distance"))
        d = finite_or_none(distance)
        extra["distance"] = d
        extra["pairs_distance"] = reach
        beyond = None if d is None or reach is None else bool(d > reach)
        near = finite_or_none(nearest)
        unlike = None if near is None else bool(near > NEAREST_SET_LIMIT)
        m = interval_model.get("n_images")
        smaller = None if not isinstance(n_images, int) or not isinstance(m, int) else n_images < m
        flags = [f for f in (beyond, unlike, smaller) if f is not None]
        extra["outside_calibrated_range"] = bool(any(flags)) if flags else None
        if near is not None:
            extra["nearest_set_distance"] = near
        if smaller is not None:
            extra["n_images"], extra["pairs_n_images"] = n_images, m
        if beyond and d is not None and reach is not None:  # beyond every pair: widen with the distance
            half *= d / max(reach, 1e-12)
        if smaller and isinstance(m, int) and isinstance(n_images, int):
            half *= math.sqrt(m / max(n_images, 1))
    lower, upper = value - half, value + half
    styled = _styled_anchor(g, moved, pseudo_calibration, real_calibration, interval_model)
    if interval_model and span:
        cands = [real_calibration + g_move, g_t] + ([real_calibration + slope_move] if slope_move is not None else [])
        cands += [] if styled is None else [styled]
        cands = [c for c in cands if math.isfinite(c)]
        lower, upper = min([lower, *cands]), max([upper, *cands])
    vals = np.asarray([value, lower, upper], float)
    low, high = bounds if bounds is not None else BOUNDED.get(metric.split("/")[0], (None, None))
    vals = np.clip(vals, -np.inf if low is None else low, np.inf if high is None else high)
    out: dict[str, Any] = dict(zip(("value", "lower", "upper"), (finite_or_none(v) for v in vals)))
    if out["value"] is None:
        return none
    if styled is not None:
        extra["styled_anchor"] = finite_or_none(
            np.clip(styled, -np.inf if low is None else low, np.inf if high is None else high)
        )
    reliability = (interval_model or {}).get("reliability") or {}
    if reliability.get("reliable") is False:
        extra["reliable"], extra["unreliable"] = False, reliability.get("reason")
    elif reliability:  # interval models saved before the rule say nothing either way
        extra["reliable"] = True
    return {**out, **extra}


def estimate(
    g: MetricMapping | None,
    metric: str,
    pseudo: float | None,
    level: float = 0.9,
    no_g: str = "no mapping G",
    no_pseudo: str = "no pseudo metric",
    anchor: tuple[float | None, float | None, dict[str, Any] | None] | None = None,
    distance: float | None = None,
    bounds: tuple[float | None, float | None] | None = None,
    nearest: float | None = None,
    n_images: int | None = None,
) -> Estimate:
    """One :class:`~spe_lightning.engine.results.Estimate` (value, lower, upper, pseudo, reason, method) from a
    pseudo metric.

    ``anchor = (pseudo_calibration, real_calibration, interval_model)`` at the same weights makes it
    anchored (see the module docstring); the paper's ``G(pseudo)`` then moves to ``paper``. ``distance``:
    the target's label-free distance to the calibration set, ``nearest`` its nearest-set distance, ``n_images``
    its size (see :func:`anchored_estimate`); ``bounds``: the metric's range when it differs from
    :data:`~spe_lightning.engine.metrics.BOUNDED` (hd95: up to the image diagonal).

    A metric the interval model finds unreliable gets ``value``/``lower``/``upper`` None, ``reliable=False``
    and the ``reason``; the numbers it would have said stay under ``withheld``.
    """
    p = finite_or_none(pseudo)
    reason = no_g if g is None else (no_pseudo if p is None else None)
    if reason is not None or g is None or p is None:
        return Estimate(None, None, None, pseudo=p, reason=reason)
    lo, hi = g.interval([p], level)
    vals = np.asarray([g.predict([p])[0], lo[0], hi[0]], float)
    if bounds is not None:
        vals = np.clip(vals, -np.inf if bounds[0] is None else bounds[0], np.inf if bounds[1] is None else bounds[1])
    paper = Interval(*(finite_or_none(v) for v in vals))
    plain = Estimate(paper.value, paper.lower, paper.upper, pseudo=p, method="paper")
    if anchor is None:
        return plain
    p_c, r_c, model = anchor
    res = anchored_estimate(
        g, metric, p, finite_or_none(p_c), finite_or_none(r_c), level, model, distance, bounds,
        nearest=nearest, n_images=n_images,
    )  # fmt: skip
    if res["value"] is None:
        return plain
    anchored = Estimate(
        res["value"],
        res["lower"],
        res["upper"],
        pseudo=p,
        method="anchored",
        paper=paper,
        from_pairs="outside_calibrated_range" in res,
        distance=res.get("distance"),
        pairs_distance=res.get("pairs_distance"),
        outside_calibrated_range=res.get("outside_calibrated_range"),
        nearest_set_distance=res.get("nearest_set_distance"),
        n_images=res.get("n_images"),
        pairs_n_images=res.get("pairs_n_images"),
        reliable=res.get("reliable"),
        unreliable=res.get("unreliable"),
        styled_anchor=res.get("styled_anchor"),
    )
    if anchored.reliable is False:  # no number for a metric SPE cannot follow; what it would have said is kept
        withheld = Interval(anchored.value, anchored.lower, anchored.upper)
        return dataclasses.replace(
            anchored, value=None, lower=None, upper=None, reason=f"unreliable: {res['unreliable']}", withheld=withheld
        )
    return anchored
