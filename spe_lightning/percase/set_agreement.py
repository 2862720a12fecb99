"""Per-case rows beside the set estimate: whether they agree, and per-case intervals that carry the set's uncertainty.

A per-case map (the regressor's or RCA's score -> Dice, recalibrated per target in
:mod:`spe_lightning.percase.sites`) gives each case an interval for how far the case lies from what the map
predicts. At another site the whole map can be off by the same amount for every case (a content shift the
styled pairs cannot copy), and the case intervals do not see it. SPE's set estimate is the label-free
statement about the site's mean Dice: its interval ``[lower, upper]`` says where the mean may lie.

- :func:`rows_vs_set`: the mean per-case estimate beside the set estimate, and whether they disagree by more
  than the set interval's half-width;
- :func:`with_set_uncertainty`: each case's interval widened by the set's: the rows' mean may be off by as
  much as the set interval reaches beyond it on each side (``mean - lower`` below, ``upper - mean`` above),
  and that site-level error is added to the case's own half-width in quadrature (the two errors are
  independent: one is shared by the site's cases, the other is each case's scatter around the map).

The rule has no free parameter; it was judged on development runs only (``benchmarks/case_set_intervals.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from spe_lightning.percase.scorer import CaseRow

__all__ = ["rows_vs_set", "set_reach", "with_set_uncertainty"]


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def rows_vs_set(
    case_estimates: Sequence[float | None], set_estimate: float | None, lower: float | None, upper: float | None
) -> dict[str, Any] | None:
    """The mean per-case estimate beside the set estimate, and whether they disagree.

    ``disagree`` when ``|mean per-case - set| > the set interval's half-width``: then the rows and the set
    estimate cannot both be right and the report says so. None when either side is missing.
    """
    values = _finite(case_estimates)
    if not values or set_estimate is None or lower is None or upper is None:
        return None
    mean = float(np.mean(values))
    half = (float(upper) - float(lower)) / 2.0
    diff = mean - float(set_estimate)
    disagree = abs(diff) > half
    note = (
        f"the mean per-case Dice {mean:.3f} differs from the set estimate {float(set_estimate):.3f} by "
        f"{diff:+.3f}, more than its interval's half-width {half:.3f}: trust neither without a few labels"
        if disagree
        else None
    )
    return {
        "mean_case_estimate": mean,
        "set_estimate": float(set_estimate),
        "half_width": half,
        "difference": diff,
        "disagree": bool(disagree),
        "note": note,
    }


def set_reach(case_estimates: Sequence[float | None], lower: float, upper: float) -> tuple[float, float]:
    """How far the set interval reaches below and above the rows' mean: ``(max(0, mean - lower),
    max(0, upper - mean))``, the site-level error each case's interval must also hold."""
    values = _finite(case_estimates)
    if not values:
        raise ValueError("set_reach: no finite per-case estimate.")
    if not (math.isfinite(lower) and math.isfinite(upper)) or lower > upper:
        raise ValueError(f"set_reach: the set interval [{lower}, {upper}] is not an interval.")
    mean = float(np.mean(values))
    return max(0.0, mean - lower), max(0.0, upper - mean)


def with_set_uncertainty(
    rows: Sequence[CaseRow], lower: float | None, upper: float | None
) -> tuple[list[CaseRow], dict[str, float] | None]:
    """``rows`` with each interval widened by the set interval ``[lower, upper]`` (SPE's Dice interval).

    A row's half-width below, ``estimate - estimated_dice_lower``, becomes ``sqrt(half**2 + below**2)`` with
    ``below, above = set_reach(...)`` (likewise above), clipped to [0, 1]. Rows without an estimate or an
    interval stay as they are. Returns the rows and ``{"below": ..., "above": ...}`` (None, with the rows
    unchanged, when there is no set interval or no row to widen).
    """
    if lower is None or upper is None or not (math.isfinite(float(lower)) and math.isfinite(float(upper))):
        return list(rows), None
    usable = [
        r
        for r in rows
        if r.estimated_dice is not None and r.estimated_dice_lower is not None and r.estimated_dice_upper is not None
    ]
    if not usable:
        return list(rows), None
    below, above = set_reach([r.estimated_dice for r in usable], float(lower), float(upper))
    out: list[CaseRow] = []
    for r in rows:
        if r.estimated_dice is None or r.estimated_dice_lower is None or r.estimated_dice_upper is None:
            out.append(r)
            continue
        e = float(r.estimated_dice)
        lo = e - math.hypot(e - float(r.estimated_dice_lower), below)
        hi = e + math.hypot(float(r.estimated_dice_upper) - e, above)
        out.append(replace(r, estimated_dice_lower=max(0.0, lo), estimated_dice_upper=min(1.0, hi)))
    return out, {"below": below, "above": above}
