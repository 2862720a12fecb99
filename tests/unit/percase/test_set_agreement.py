"""Per-case rows beside the set estimate (spe_lightning.percase.set_agreement): intervals that carry its uncertainty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spe_lightning.percase.scorer import CaseRow
from spe_lightning.percase.set_agreement import set_reach, with_set_uncertainty


def _row(i: int, est: float | None, lo: float | None, hi: float | None, real: float | None = None) -> CaseRow:
    return CaseRow(f"c{i}", est, est, lo, hi, False, False, 10, 0.9, -1, real_dice=real, with_real=real is not None)


def test_each_side_adds_the_set_reach_in_quadrature() -> None:
    rows = [_row(0, 0.80, 0.74, 0.84), _row(1, 0.90, 0.86, 0.95)]  # mean 0.85
    out, reach = with_set_uncertainty(rows, 0.77, 0.95)
    assert reach == pytest.approx({"below": 0.08, "above": 0.10})
    assert out[0].estimated_dice_lower == pytest.approx(0.80 - math.hypot(0.06, 0.08))
    assert out[0].estimated_dice_upper == pytest.approx(0.80 + math.hypot(0.04, 0.10))
    assert out[1].estimated_dice_upper == 1.0  # 0.90 + hypot(0.05, 0.10) > 1: clipped
    assert [r.estimated_dice for r in out] == [0.80, 0.90]  # only the intervals move
    assert [r.id for r in out] == ["c0", "c1"]


def test_a_set_interval_below_the_rows_widens_them_downwards_only() -> None:
    rows = [_row(0, 0.90, 0.85, 0.95), _row(1, 0.92, 0.87, 0.97)]
    out, reach = with_set_uncertainty(rows, 0.70, 0.80)  # SPE says the site is worse than the rows
    assert reach == pytest.approx({"below": 0.21, "above": 0.0})
    assert out[0].estimated_dice_upper == pytest.approx(0.95)
    assert out[0].estimated_dice_lower == pytest.approx(0.90 - math.hypot(0.05, 0.21))


def test_rows_without_an_interval_and_sets_without_one_stay_as_they_are() -> None:
    rows = [_row(0, 0.8, 0.7, 0.9), _row(1, None, None, None), _row(2, 0.6, None, None)]
    out, reach = with_set_uncertainty(rows, 0.7, 0.9)
    assert out[1] == rows[1] and out[2] == rows[2] and reach is not None
    assert with_set_uncertainty(rows, None, None) == (rows, None)
    assert with_set_uncertainty(rows, float("nan"), 0.9) == (rows, None)
    assert with_set_uncertainty([rows[1]], 0.7, 0.9) == ([rows[1]], None)


def test_set_reach_rejects_what_is_not_an_interval() -> None:
    with pytest.raises(ValueError, match="not an interval"):
        set_reach([0.8], 0.9, 0.7)
    with pytest.raises(ValueError, match="no finite"):
        set_reach([None], 0.7, 0.9)


def test_intervals_hold_again_when_the_whole_site_is_off() -> None:
    # the per-case map is right about each case's scatter but 0.08 too high for every case of this site; the
    # case intervals (scatter only) then miss most cases, the set interval [0.70, 0.82] holds the site's mean
    rng = np.random.default_rng(0)
    real = np.clip(rng.normal(0.76, 0.06, 400), 0, 1)
    est = real + 0.08 + rng.normal(0, 0.03, 400)
    rows = [_row(i, float(e), float(e - 0.05), float(e + 0.05), float(r)) for i, (e, r) in enumerate(zip(est, real))]

    def coverage(rs: list[CaseRow]) -> float:
        return float(np.mean([r.estimated_dice_lower <= r.real_dice <= r.estimated_dice_upper for r in rs]))

    out, _ = with_set_uncertainty(rows, 0.70, 0.82)
    assert coverage(rows) < 0.2
    assert coverage(out) > 0.85
    # where the rows' mean sits in a narrow set interval, the case intervals barely move
    calm, reach = with_set_uncertainty(rows, float(np.mean(est)) - 0.01, float(np.mean(est)) + 0.01)
    assert reach["below"] == pytest.approx(0.01) and calm[0].estimated_dice_lower > rows[0].estimated_dice_lower - 0.002
