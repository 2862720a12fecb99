"""Size probes: the calibration pseudo metric at a smaller set's size, the anchor of chunks of a few images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.estimate import estimate
from spe_lightning.engine.interval_model import fit_interval_model
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.set_size import calibration_pseudo_at, probe_sets, probe_sizes, probe_values, size_slope

G = MetricMapping.fit("linear", [0.5, 0.6, 0.7, 0.8], [0.6, 0.7, 0.8, 0.9])


def _calibration(n: int) -> CachedSet:
    images = torch.rand(n, 1, 16, 16)
    return CachedSet("calibration", list(images), [m for m in images > 0.5], images)


def test_probe_sizes_are_powers_of_two_below_the_reference_then_the_reference():
    assert probe_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert probe_sizes(16) == [1, 2, 4, 8, 16]
    assert probe_sizes(2) == [1, 2]
    assert probe_sizes(1) == []


def test_probe_sets_are_disjoint_subsets_of_each_size_at_most_draws_of_them():
    cal = _calibration(20)
    sets = probe_sets(cal, 10, draws=3, seed=0)
    by_size: dict[int, list[CachedSet]] = {}
    for name, data in sets.items():
        assert name.startswith("size_probe") and data.name == name
        by_size.setdefault(len(data), []).append(data)
    assert sorted(by_size) == [1, 2, 4, 8, 10]
    assert len(by_size[8]) == 2 and len(by_size[10]) == 2  # 20 images hold only two disjoint sets of 8 or 10
    for same in by_size.values():
        seen = [i for data in same for i in data.indices]
        assert len(seen) == len(set(seen))  # disjoint: the probes of one size share no image
    assert probe_sets(cal, 10, draws=3, seed=0).keys() == sets.keys()
    assert [d.indices for d in probe_sets(cal, 10, 3, seed=0).values()] == [d.indices for d in sets.values()]
    assert probe_sets(cal, 10, draws=0) == {}


def test_probe_values_keep_one_row_per_probe_and_skip_missing_values():
    cal = _calibration(12)
    sets = probe_sets(cal, 4, draws=2, seed=1)
    pseudo = {name: {"dice": 0.1 * len(d)} for name, d in sets.items()}
    pseudo["size_probe1_1"] = {"dice": None}  # a probe with too little foreground gives no pseudo metric
    got = probe_values(pseudo, sets, ["dice"])
    assert got["reference_size"] == 4
    assert sorted(got["values"]["dice"]) == sorted([len(d), pytest.approx(0.1 * len(d))] for n, d in sets.items()
                                                   if n != "size_probe1_1")  # fmt: skip


def _probes(slope: float, noise: float, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    sizes = [1] * 8 + [2] * 8 + [4] * 8 + [8] * 6 + [16] * 3
    rows = [[m, 0.7 + slope * (1 / m - 1 / 16) + g.normal(0, noise / math.sqrt(m))] for m in sizes]
    return {"reference_size": 16, "values": {"dice": rows}}


def test_the_size_slope_equals_numpys_weighted_least_squares():
    rows = _probes(-0.2, 0.1)["values"]["dice"]
    m, v = np.array([r[0] for r in rows], float), np.array([r[1] for r in rows])
    coef, cov = np.polyfit(1 / m, v, 1, w=np.sqrt(m), cov="unscaled")
    sigma2 = np.sum(m * (v - np.polyval(coef, 1 / m)) ** 2) / (len(m) - 2)
    slope, se = size_slope(rows)
    assert slope == pytest.approx(coef[0], abs=1e-12) and se == pytest.approx(math.sqrt(cov[0, 0] * sigma2), rel=1e-9)
    assert size_slope(rows[:2]) is None and size_slope([[4, 0.5], [4, 0.6], [4, 0.7]]) is None


def test_the_anchor_moves_along_a_clear_size_effect_only_for_sets_smaller_than_the_reference():
    probes = _probes(-0.2, 0.02)  # the pseudo metric falls by 0.2 / size: 0.1 at 2 images
    slope, se = size_slope(probes["values"]["dice"])
    assert -slope > 10 * se  # a clear effect: barely shrunk
    assert calibration_pseudo_at(0.8, probes, "dice", 16) is None  # as large as calibrated: the probes do not apply
    assert calibration_pseudo_at(0.8, probes, "dice", 100) is None
    shrunk = slope * (1 - (2 * se / slope) ** 2)
    assert calibration_pseudo_at(0.8, probes, "dice", 4) == pytest.approx(0.8 + shrunk * (1 / 4 - 1 / 16))
    assert calibration_pseudo_at(0.8, probes, "dice", 4) == pytest.approx(0.8 - 0.2 * (1 / 4 - 1 / 16), abs=0.005)
    # no size effect, only noise: the slope is within two standard errors of 0 and the anchor stays
    flat = [calibration_pseudo_at(0.8, _probes(0.0, 0.1, seed), "dice", 2) for seed in range(20)]
    assert sum(f == 0.8 for f in flat) >= 15 and max(abs(f - 0.8) for f in flat) < 0.03
    # nothing to go on: the probes do not apply (the whole calibration set's pseudo metric is the anchor)
    for args in (
        (0.8, None, "dice", 4),
        (0.8, probes, "hd95", 4),
        (0.8, probes, "dice", None),
        (None, probes, "dice", 4),
    ):
        assert calibration_pseudo_at(*args) is None


def test_a_small_set_is_anchored_on_the_calibration_pseudo_at_its_size():
    pairs = [
        {"name": f"f{i}", "kind": "shift", "n": n, "d_pseudo": {"dice": d}, "d_real": {"dice": d + 0.01 * (-1) ** i}}
        for i, (d, n) in enumerate(zip([-0.1, -0.05, 0.0, 0.02, -0.2, -0.15, 0.05, -0.08], [16, 16] + [40] * 6))
    ]
    model = fit_interval_model(pairs, "dice", G, 0.8)
    probes = _probes(-0.2, 0.0)  # an exact size effect: -0.2 / size
    plain = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=4)
    sized = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=4, probes=probes)
    # the 4-image set's pseudo 0.7 is read against the calibration pseudo at 4 images, not the whole set's 0.8
    at_4 = 0.8 - 0.2 * (1 / 4 - 1 / 16)
    assert sized.anchor_pseudo == pytest.approx(at_4) and plain.anchor_pseudo is None
    assert sized.value == pytest.approx(plain.value + (G.predict([0.8])[0] - G.predict([at_4])[0]))
    # the same move read from the corrected pseudo metric: the same interval, shifted (the paper's G(p_t) too)
    assert sized.upper - sized.lower == pytest.approx(plain.upper - plain.lower, abs=1e-9)
    assert sized.range_note.endswith("interval widened, anchored on calibration subsets of its size")
    assert Estimate.from_dict(sized.to_dict()) == sized and sized.to_dict()["anchor_pseudo"] == pytest.approx(at_4)
    large = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=16, probes=probes)
    assert large.anchor_pseudo is None and large == estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=16)
