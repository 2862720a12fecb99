"""Per-case quality: RCA scores, their calibration, flags and rank statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _shapes import erode

from spe_lightning.data import SyntheticShapesDataset
from spe_lightning.percase.rca import auroc, calibrate_flags, case_scores, shift, spearman
from spe_lightning.reverse import make_segmenter


def test_per_case_score_orders_a_bad_prediction_below_a_good_one():
    refs = SyntheticShapesDataset(24, 48, seed=5)
    ref_img = torch.stack([refs[i]["image"] for i in range(24)])
    ref_mask = torch.stack([refs[i]["label"] for i in range(24)]).bool()
    ref_mask[-1] = False  # a reference without foreground is never used as a query
    cases = SyntheticShapesDataset(6, 48, seed=6)
    img = torch.stack([cases[i]["image"] for i in range(6)])
    truth = torch.stack([cases[i]["label"] for i in range(6)]).bool()
    eroded = erode(truth, 2)  # much too small (about a third of the area)
    dilated = torch.nn.functional.max_pool2d(truth.float(), 7, 1, 3) > 0.5  # much too large
    shifted = torch.roll(truth, shifts=(14, 14), dims=(-2, -1))  # right shape, off the organ
    seg = make_segmenter("label_fusion")
    good = case_scores(seg, img, truth, ref_img, ref_mask)
    assert good.score.min() > 0.85 and (good.best_reference < 23).all() and (good.best_reference >= 0).all()
    for bad in (eroded, dilated):  # shape errors: caught with the default centroid alignment
        assert (case_scores(seg, img, bad, ref_img, ref_mask).score < good.score - 0.15).all()
    # a pure translation error needs align=False (alignment registers it away)
    good_u = case_scores(seg, img, truth, ref_img, ref_mask, align=False)
    shifted_u = case_scores(seg, img, shifted, ref_img, ref_mask, align=False)
    assert (shifted_u.score < 0.1).all() and good_u.score.min() > 0.7
    # an empty prediction has no support: it gets the calibrated empty score
    empty = case_scores(seg, img, torch.zeros_like(truth), ref_img, ref_mask, empty_score=0.25)
    assert empty.empty.all() and torch.equal(empty.score, torch.full((6,), 0.25, dtype=torch.float64))


def test_shift_translates_without_wrapping():
    x = torch.arange(16.0).view(1, 4, 4)
    assert torch.equal(shift(x, 1, -2)[0], torch.tensor([[0, 0, 0, 0], [2, 3, 0, 0], [6, 7, 0, 0], [10, 11, 0, 0.0]]))
    assert torch.equal(shift(x, 0, 0), x) and not shift(x, 4, 0).any()


def test_flag_calibration_and_rank_statistics():
    scores = [0.9, 0.8, 0.85, 0.3, 0.2, 0.4, math.nan]
    dice = [0.95, 0.9, 0.8, 0.5, 0.1, 0.6, 0.0]
    empty = [False] * 6 + [True]
    flags = calibrate_flags(scores, dice, empty, dice_cut=0.7)
    assert flags["method"] == "youden" and 0.4 < flags["threshold"] < 0.8
    assert flags["empty_score"] == 0.0 and flags["n_below_cut"] == 4
    assert flags["auroc"] == 1.0 and flags["spearman"] > 0.9
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0  # higher score: more likely positive
    assert auroc([0.5, 0.5], [True, False]) == 0.5 and auroc([1.0], [True]) is None
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    few = calibrate_flags([0.9, 0.8, 0.7, 0.95], [0.9, 0.9, 0.85, 0.95])  # no bad case: quantile fallback
    assert few["method"].startswith("quantile") and few["threshold"] == pytest.approx(0.73)


def test_empty_predictions_are_flagged_when_no_calibrated_score_exists():
    from spe_lightning.percase.rca import CaseScores, case_rows

    scores = CaseScores(
        score=torch.tensor([0.9, 0.2, float("nan")], dtype=torch.float64),
        best_reference=torch.tensor([0, 1, -1]),
        pseudo_dice=torch.zeros(3, 1, dtype=torch.float64),
        neighbours=torch.zeros(3, 1, dtype=torch.int64),
        empty=torch.tensor([False, False, True]),
    )
    masks = [torch.ones(1, 4, 4, dtype=torch.bool)] * 2 + [torch.zeros(1, 4, 4, dtype=torch.bool)]
    rows = [
        r.to_dict()
        for r in case_rows(scores, {"threshold": 0.5, "mapping": None}, masks, torch.ones(3), ["a", "b", "c"])
    ]
    assert [r["flagged"] for r in rows] == [False, True, True] and rows[2]["empty_prediction"]
    assert all(r.flagged is None for r in case_rows(scores, None, masks, torch.ones(3), ["a", "b", "c"]))


def test_a_case_scoring_below_every_calibration_case_gets_a_low_estimate():
    """The isotonic score -> Dice map is flat below the calibration scores; a case no reference fits (score 0)
    must not inherit the worst calibration case's Dice (issue 16: "quality 0.000, estimated Dice 0.968")."""
    from spe_lightning.percase.rca import CaseScores, calibrate_cases, case_rows

    cal_scores = CaseScores(
        score=torch.tensor([0.6, 0.7, 0.8, 0.85, 0.9], dtype=torch.float64),
        best_reference=torch.zeros(5, dtype=torch.int64),
        pseudo_dice=torch.zeros(5, 1, dtype=torch.float64),
        neighbours=torch.zeros(5, 1, dtype=torch.int64),
        empty=torch.zeros(5, dtype=torch.bool),
    )
    cal = calibrate_cases(cal_scores, np.array([0.95, 0.96, 0.97, 0.97, 0.98]), k=1, top=1)
    new = CaseScores(
        score=torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64),
        best_reference=torch.zeros(3, dtype=torch.int64),
        pseudo_dice=torch.zeros(3, 1, dtype=torch.float64),
        neighbours=torch.zeros(3, 1, dtype=torch.int64),
        empty=torch.zeros(3, dtype=torch.bool),
    )
    masks = [torch.ones(1, 4, 4, dtype=torch.bool)] * 3
    rows = [r.to_dict() for r in case_rows(new, cal, masks, torch.ones(3), ["zero", "low", "typical"])]
    zero, low, typical = (r["estimated_dice"] for r in rows)
    assert zero == 0.0 and low == pytest.approx(0.95 * 0.3 / 0.6) and typical == pytest.approx(0.97)
    assert rows[0]["estimated_dice_lower"] == 0.0 and rows[1]["estimated_dice_lower"] == 0.0
    assert all(r["estimated_dice_lower"] <= r["estimated_dice"] <= r["estimated_dice_upper"] for r in rows)
    assert [r["flagged"] for r in rows] == [True, True, False]
