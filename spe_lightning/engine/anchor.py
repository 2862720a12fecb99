"""Anchored estimation: the calibration score, moved by what the reverse step says is different.

The paper estimates a target as ``G(pseudo_target)``, with G fitted across checkpoints. At any
checkpoint SPE also knows the calibration set's *real* metric, so it estimates instead

    estimate = real_calibration + G(pseudo_target) - G(pseudo_calibration)

which cancels the part of G's error shared by the two sets at that checkpoint (on BUSI the
calibration pseudo Dice is not monotone in the real one; the difference still is informative).

Intervals (normalised split-conformal): at the final weights SPE measures labelled *pairs* whose
real difference is known, and how far the anchored prediction misses it:

- random subsets of the calibration set as large as each target (sampling noise only);
- the calibration set under synthetic appearance shifts (:mod:`spe_lightning.engine.shifts`),
  harmful ones (noise, bias field) and nearly harmless ones (gamma, contrast, blur).

Each miss is divided by ``s0 + |prediction|``; the half-width of an estimate is the ``level``
quantile of these scores times ``s0 + |G(p_t) - G(p_c)|``. Without pairs, G's leave-one-out
residual quantile across checkpoints is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from spe_lightning.engine.estimation import finite_or_none
from spe_lightning.engine.mapping import Mapping
from spe_lightning.engine.metrics import BOUNDED
from spe_lightning.engine.predict import CachedSet
from spe_lightning.engine.shifts import shift_set, subset

#: floor of the interval scale per metric (metric units)
_S0 = {"hd95": 1.0}
#: the fewest labelled pairs an interval model is fitted on
MIN_PAIRS = 5

__all__ = ["DEFAULT_SHIFTS", "anchor_pairs", "anchor_sets", "anchored_estimate", "fit_anchor", "pairs_from_record"]

#: shifts of the calibration set G_delta learns from: (family, severity)
DEFAULT_SHIFTS: tuple[tuple[str, int], ...] = tuple(
    (f, s) for f in ("noise", "gamma", "contrast", "blur", "bias_field", "low_resolution") for s in (1, 2, 3)
)


def anchor_sets(
    calibration: CachedSet,
    subset_sizes: Sequence[int],
    n_subsets: int = 8,
    shifts: Sequence[tuple[str, int]] = DEFAULT_SHIFTS,
    seed: int = 0,
) -> dict[str, CachedSet]:
    """The labelled sets G_delta learns from, by name: random calibration subsets and shifted copies.

    Args:
        calibration: the labelled calibration set.
        subset_sizes: sizes of the random calibration subsets (normally the targets' sizes; capped below n).
        n_subsets: subsets per size.
        shifts: synthetic shifts ``(family, severity)`` applied to the whole calibration set.
        seed: seed of the subsets and shift noise.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(calibration)
    sets: dict[str, CachedSet] = {}
    for size in sorted({min(max(int(s), 2), n - 1) for s in subset_sizes if n > 2}):
        for k in range(n_subsets):
            pos = sorted(torch.randperm(n, generator=g)[:size].tolist())
            sets[f"subset{size}_{k}"] = subset(calibration, pos, f"subset{size}_{k}")
    for i, (family, severity) in enumerate(shifts):
        t = shift_set(calibration, family, severity, seed=seed * 7919 + 1000 * i)
        sets[t.name] = t
    return sets


def pairs_from_record(record: dict[str, Any], base: str, names: Sequence[str]) -> list[dict[str, Any]]:
    """``(pseudo difference, real difference)`` of each set in ``names`` against set ``base`` of one record."""
    pairs = []
    for name in names:
        pairs.append(
            {
                "kind": "subset" if name.startswith("subset") else "shift",
                "name": name,
                "d_pseudo": _diff(record["pseudo"].get(name, {}), record["pseudo"].get(base, {})),
                "d_real": _diff(record["real"].get(name, {}), record["real"].get(base, {})),
            }
        )
    return pairs


def anchor_pairs(
    evaluate: Callable[[CachedSet], dict[str, Any]],
    calibration: CachedSet,
    base: dict[str, Any],
    subset_sizes: Sequence[int],
    n_subsets: int = 8,
    shifts: Sequence[tuple[str, int]] = DEFAULT_SHIFTS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Labelled pairs at the current weights, one set at a time.

    ``evaluate(set) -> {"pseudo": {m: v}, "real": {m: v}}`` runs the prediction and the reverse step;
    ``base`` is ``evaluate(calibration)``. See :func:`anchor_sets` for the other arguments.
    """
    sets = anchor_sets(calibration, subset_sizes, n_subsets, shifts, seed)
    record: dict[str, Any] = {"pseudo": {"base": base["pseudo"]}, "real": {"base": base["real"]}}
    for name, data in sets.items():
        res = evaluate(data)
        record["pseudo"][name], record["real"][name] = res["pseudo"], res["real"]
    pairs = pairs_from_record(record, "base", list(sets))
    for p in pairs:
        p["n_images"] = len(sets[p["name"]])
    return pairs


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {m: (a[m] - b[m]) if a.get(m) is not None and b.get(m) is not None else None for m in a}


def fit_anchor(
    pairs: Sequence[dict[str, Any]],
    metric: str,
    g: Mapping,
    pseudo_calibration: float | None,
    exclude: str | None = None,
) -> dict[str, Any] | None:
    """The interval model of anchored estimates of ``metric`` from labelled calibration pairs.

    For each pair the anchored prediction of its real difference is ``G(p_c + dp) - G(p_c)``; the
    model keeps the normalised residuals ``|dr - prediction| / (s0 + |prediction|)`` (plain
    numbers), so an estimate's half-width grows with how far G moves it from the calibration
    score (normalised split-conformal). ``exclude`` drops pairs whose name starts with it.
    """
    if pseudo_calibration is None:
        return None
    s0 = _S0.get(metric.split("/")[0], 0.01)
    base = float(g.predict([pseudo_calibration])[0])
    scores = []
    for p in pairs:
        if exclude and p["name"].startswith(exclude):
            continue
        dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
        if dp is None or dr is None:
            continue
        pred = float(g.predict([pseudo_calibration + dp])[0]) - base
        if np.isfinite(pred) and np.isfinite(dr):
            scores.append(abs(dr - pred) / (s0 + abs(pred)))
    if len(scores) < MIN_PAIRS:
        return None
    return {"s0": s0, "scores": sorted(float(v) for v in scores)}


def _half_width(model: dict[str, Any], moved: float, level: float) -> float:
    scores = model["scores"]
    k = min(len(scores), math.ceil((len(scores) + 1) * level)) - 1
    return float(scores[k]) * (float(model["s0"]) + abs(moved))


def anchored_estimate(
    g: Mapping | None,
    metric: str,
    pseudo_target: float | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
    level: float = 0.9,
    interval_model: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """``{"value", "lower", "upper"}``: ``real_c + G(p_t) - G(p_c)``, clipped to the metric's range.

    The half-width comes from ``interval_model`` (:func:`fit_anchor`) when given, else from G's
    leave-one-out residuals across checkpoints.
    """
    none = {"value": None, "lower": None, "upper": None}
    if g is None or None in (pseudo_target, pseudo_calibration, real_calibration):
        return none
    moved = float(g.predict([pseudo_target])[0]) - float(g.predict([pseudo_calibration])[0])
    value = float(real_calibration) + moved
    half = _half_width(interval_model, moved, level) if interval_model else g.half_width(level)
    vals = np.asarray([value, value - half, value + half], float)
    low, high = BOUNDED.get(metric.split("/")[0], (None, None))
    vals = np.clip(vals, -np.inf if low is None else low, np.inf if high is None else high)
    out = dict(zip(("value", "lower", "upper"), (finite_or_none(v) for v in vals)))
    return out if out["value"] is not None else none
