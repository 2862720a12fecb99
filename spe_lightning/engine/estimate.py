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
Without pairs, G's leave-one-out residual quantile across checkpoints is used. The interval model is fitted
in :mod:`spe_lightning.engine.interval_model`.

Five guards on top (docs/intervals.md; compared on held-out families of development pairs by
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
- *set size*: a set with fewer images than every pair's set has a noisier mean: half-width times
  ``sqrt(pairs' size / set size)``, flagged ``outside_calibrated_range``; and its pseudo metric comes from a
  smaller support: it is read against the calibration pseudo metric at its size
  (:mod:`~spe_lightning.engine.set_size`).
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
from typing import Any

import numpy as np

from spe_lightning.engine.distance import NEAREST_SET_LIMIT
from spe_lightning.engine.interval_model import (
    INTERVAL_RULES,
    MAX_HALF_WIDTH,
    MIN_PAIRS,
    MOVE_RULES,
    QUANTILES,
    finite_or_none,
    fit_interval_model,
    half_width,
    metric_range,
    pair_family,
)
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.metrics import BOUNDED
from spe_lightning.engine.results import Estimate, Interval
from spe_lightning.engine.set_size import calibration_pseudo_at

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
    half = half_width(interval_model, moved, level) if interval_model else g.half_width(level)
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
    probes: dict[str, Any] | None = None,
) -> Estimate:
    """One :class:`~spe_lightning.engine.results.Estimate` (value, lower, upper, pseudo, reason, method) from a
    pseudo metric.

    ``anchor = (pseudo_calibration, real_calibration, interval_model)`` at the same weights makes it
    anchored (see the module docstring); the paper's ``G(pseudo)`` then moves to ``paper``. ``distance``:
    the target's label-free distance to the calibration set, ``nearest`` its nearest-set distance, ``n_images``
    its size (see :func:`anchored_estimate`); ``bounds``: the metric's range when it differs from
    :data:`~spe_lightning.engine.metrics.BOUNDED` (hd95: up to the image diagonal). ``probes``: the size probes
    (:mod:`~spe_lightning.engine.set_size`); a set smaller than them is anchored on the calibration pseudo metric
    at its size (kept in ``anchor_pseudo``).

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
    p_c = finite_or_none(p_c)
    at_size = calibration_pseudo_at(p_c, probes, metric, n_images)
    # a set smaller than the calibrated ones: its pseudo metric as a support of the calibration's size would give
    # it (every candidate move, the paper's G(p_t) among them, is read from the same corrected value)
    p_read = p if at_size is None or p_c is None else p + p_c - at_size  # at_size None: the probes do not apply
    res = anchored_estimate(
        g, metric, p_read, p_c, finite_or_none(r_c), level, model, distance, bounds,
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
        anchor_pseudo=at_size,
    )
    if anchored.reliable is False:  # no number for a metric SPE cannot follow; what it would have said is kept
        withheld = Interval(anchored.value, anchored.lower, anchored.upper)
        return dataclasses.replace(
            anchored, value=None, lower=None, upper=None, reason=f"unreliable: {res['unreliable']}", withheld=withheld
        )
    return anchored
