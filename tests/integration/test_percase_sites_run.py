"""A run's quality regressor recalibrated per target with its styled pairs (issue 27), end to end."""

from __future__ import annotations

import numpy as np
import pytest

from spe_lightning import SPEEstimator
from spe_lightning.percase.site_fit import PRODUCT_RULES
from spe_lightning.percase.sites import SHAPES, rule_name


def test_run_targets_get_their_own_per_case_map_with_distance_and_agreement(quality_fitted):
    cb, trainer, dm, log_dir = quality_fitted  # the shared 3-epoch run with quality_regressor=True (conftest)
    est = SPEEstimator.load(log_dir / "spe_estimator.pt")  # the site calibrations travel as plain numbers
    sites = est.quality["sites"]
    assert set(sites["targets"]) == set(dm.targets)
    assert tuple(sites["rule"]) in PRODUCT_RULES and sites["shape"] in SHAPES
    assert set(sites["scores"]) == {rule_name(r, sh) for r in PRODUCT_RULES for sh in SHAPES}
    site = sites["targets"]["target"]
    assert site["shape"] == sites["shape"]  # the chosen map's shape is the one each target's map is fitted with
    assert site["n_styled"] == site["n_calibration"] == 12

    target = dm.spe_datasets()["target"]["target"]
    res = est.estimate(trainer.lightning_module, target, name="target")
    for row in res.cases:
        assert row["signals"] == rule_name(sites["rule"], sites["shape"])
        assert row["distance"] >= 0 and isinstance(row["beyond_calibrated"], bool)
        assert row["estimated_dice_lower"] <= row["estimated_dice"] <= row["estimated_dice_upper"]
    # a set the run never saw keeps the calibration-set map (no styled pairs for it): no site columns
    other = est.estimate(trainer.lightning_module, target, name="elsewhere")
    assert all("signals" not in row for row in other.cases)
    # the rows and the set estimate side by side, in the result and its summary
    agree = res.case_agreement
    mean = float(np.mean([r["estimated_dice"] for r in res.cases]))
    assert agree["mean_case_estimate"] == pytest.approx(mean)
    assert agree["set_estimate"] == res.estimates["dice"].value
    half = (res.estimates["dice"].upper - res.estimates["dice"].lower) / 2
    assert agree["disagree"] == (abs(mean - agree["set_estimate"]) > half)
    assert res.to_dict()["case_agreement"] == agree
    # the combination weight is chosen and used on the same rows: the run target's own map (issue 27)
    combined = cb.report.get("combined")
    assert combined is not None and combined["regressor_rows"] == "per_target"
    assert combined["estimates"]["target"]["regressor"] == pytest.approx(mean, abs=1e-6)
    assert combined["n_sets"] > 0 and est.quality["combination"]["n_sets"] == combined["n_sets"]


def test_run_target_rows_carry_the_set_estimates_uncertainty(quality_fitted):
    from spe_lightning.percase.set_agreement import with_set_uncertainty

    cb, trainer, dm, log_dir = quality_fitted
    est = SPEEstimator.load(log_dir / "spe_estimator.pt")
    assert est.config.case_set_uncertainty  # the default
    cases_only = est.with_fitted(est.fitted.replace(config=est.config.replace(case_set_uncertainty=False)))
    target = dm.spe_datasets()["target"]["target"]
    res = est.estimate(trainer.lightning_module, target, name="target")
    plain = cases_only.estimate(trainer.lightning_module, target, name="target")
    dice = res.estimates["dice"]
    assert plain.estimates["dice"].value == dice.value
    expected, reach = with_set_uncertainty(plain.cases, dice.lower, dice.upper)
    assert reach is not None and res.case_agreement["case_intervals_widened"] == pytest.approx(reach)
    assert plain.case_agreement["case_intervals_widened"] is None
    assert [r.to_dict() for r in res.cases] == [r.to_dict() for r in expected]
    widths = [(r.estimated_dice_upper - r.estimated_dice_lower) for r in res.cases]
    plain_widths = [(r.estimated_dice_upper - r.estimated_dice_lower) for r in plain.cases]
    assert all(w >= p - 1e-12 for w, p in zip(widths, plain_widths))


def test_a_run_targets_map_stacking_the_mirror_gets_it_from_the_model(quality_fitted):
    import copy

    import torch

    from spe_lightning.engine.predict import default_logits
    from spe_lightning.percase.mirror import MIRROR, mirror_consistency

    cb, trainer, dm, log_dir = quality_fitted
    est = SPEEstimator.load(log_dir / "spe_estimator.pt")
    quality = copy.deepcopy(dict(est.quality))
    # the target's map made to read the mirror consistency alone: its rows are then exactly that signal
    quality["sites"]["targets"]["target"].update(
        signals=["regressor", MIRROR], coef=[0.0, 1.0, 0.0], shape="linear", knots_x=[], knots_y=[]
    )
    config = est.config.replace(case_set_uncertainty=False)
    mirrored_est = est.with_fitted(est.fitted.replace(quality=quality, config=config))
    model, target = trainer.lightning_module, dm.spe_datasets()["target"]["target"]
    res = mirrored_est.estimate(model, target, name="target")
    cpu = torch.device("cpu")
    data = est.cache(target, "target")
    masks, _ = est.predict(model, data, cpu, default_logits)
    expected = mirror_consistency(lambda d: est.predict(model, d, cpu, default_logits), data, masks)
    assert [r["estimated_dice"] for r in res.cases] == pytest.approx(np.clip(expected, 0, 1).tolist())
    assert {r["signals"] for r in res.cases} == {"regressor+mirror"}
    # a set scored with the calibration-set map needs no mirror: the same estimator scores it as before
    assert all("signals" not in r for r in mirrored_est.estimate(model, target, name="elsewhere").cases)
