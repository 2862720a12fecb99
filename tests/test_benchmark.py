"""Scoring of the paper protocol: SPE vs the baselines across checkpoints."""

import numpy as np
import pytest

from spe_lightning.benchmark import score_records


def _records(n=8, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        q = 0.3 + 0.6 * i / (n - 1)  # quality rises over checkpoints
        recs.append(
            {
                "epoch": i,
                "pseudo": {"calibration": {"dice": 0.5 * q + 0.2}, "extra_test": {"dice": 0.5 * (q - 0.1) + 0.2}},
                "real": {"calibration": {"dice": q}, "extra_test": {"dice": q - 0.1 + rng.normal(0, 0.005)}},
                "confidence": {"calibration": 0.9, "extra_test": 0.9},
            }
        )
    return recs


def test_spe_beats_calibration_score_when_target_is_worse():
    res = score_records(_records(), "extra_test", ["dice"])["dice"]
    assert res["spe"]["pearson_r"] > 0.99
    assert res["spe"]["mae"] < 0.02
    assert res["calibration_score"]["mae"] == pytest.approx(0.1, abs=0.01)
    assert res["spe"]["final_abs_error"] < res["calibration_score"]["final_abs_error"]
    # a constant confidence carries no information: no correlation can be computed
    assert res["confidence"]["pearson_r"] is None


def test_isotonic_mapping_follows_a_curved_relation():
    recs = _records()
    for r in recs:  # make pseudo -> real clearly non-linear
        for name in ("calibration", "extra_test"):
            r["pseudo"][name]["dice"] = r["pseudo"][name]["dice"] ** 4
    lin = score_records(recs, "extra_test", ["dice"], "linear")["dice"]["spe"]
    iso = score_records(recs, "extra_test", ["dice"], "isotonic")["dice"]["spe"]
    assert iso["pearson_r"] > 0.95
    assert iso["mae"] < lin["mae"]
