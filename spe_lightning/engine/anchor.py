"""Anchored estimation: the calibration score plus what the reverse step says is different.

The paper's G maps a target's pseudo metric to a metric across checkpoints. At the final
checkpoint SPE also knows the calibration set's *real* metric, so it can estimate the target as

    estimate = real_calibration + G_delta(pseudo_target - pseudo_calibration)

where G_delta is fitted at the final weights on labelled pairs whose real difference is known:

- random subsets of the calibration set, as large as the target (same distribution, sampling
  noise only: teaches G_delta how much of a pseudo difference is noise and how fewer support
  images bias the pseudo metric);
- the calibration set under synthetic appearance shifts (:mod:`spe_lightning.engine.shifts`):
  harmful ones (noise, low resolution) and nearly harmless ones (gamma, contrast), so that
  G_delta learns which pseudo drops go with real drops.

The intervals are split-conformal: quantiles of G_delta's leave-one-out residuals over the pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from spe_lightning.engine.estimation import finite_or_none
from spe_lightning.engine.mapping import Mapping, NotEnoughPointsError
from spe_lightning.engine.metrics import BOUNDED
from spe_lightning.engine.predict import CachedSet
from spe_lightning.engine.shifts import shift_set, subset

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
    pairs: Sequence[dict[str, Any]], metric: str, kind: str = "linear", exclude: str | None = None
) -> Mapping | None:
    """G_delta for ``metric`` (pseudo difference -> real difference); ``exclude``: drop pairs named with this prefix."""
    use = [p for p in pairs if not (exclude and p["name"].startswith(exclude))]
    x = np.asarray([np.nan if p["d_pseudo"].get(metric) is None else p["d_pseudo"][metric] for p in use], float)
    y = np.asarray([np.nan if p["d_real"].get(metric) is None else p["d_real"][metric] for p in use], float)
    try:
        return Mapping.fit(kind, x, y, bounds=(None, None))
    except NotEnoughPointsError:
        return None


def anchored_estimate(
    g_delta: Mapping | None,
    metric: str,
    pseudo_target: float | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
    level: float = 0.9,
) -> dict[str, float | None]:
    """``{"value", "lower", "upper"}``: the calibration score moved by G_delta, clipped to the metric's range."""
    none = {"value": None, "lower": None, "upper": None}
    if g_delta is None or None in (pseudo_target, pseudo_calibration, real_calibration):
        return none
    d = float(pseudo_target) - float(pseudo_calibration)
    lo, hi = g_delta.interval([d], level)
    vals = np.asarray([g_delta.predict([d])[0], lo[0], hi[0]], float) + float(real_calibration)
    low, high = BOUNDED.get(metric, (None, None))
    vals = np.clip(vals, -np.inf if low is None else low, np.inf if high is None else high)
    out = dict(zip(("value", "lower", "upper"), (finite_or_none(v) for v in vals)))
    return out if out["value"] is not None else none
