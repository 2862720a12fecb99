"""Size probes: the calibration pseudo metric at a smaller set's size, the anchor of chunks of a few images."""

from __future__ import annotations

import math

import pytest
import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.estimate import estimate
from spe_lightning.engine.interval_model import fit_interval_model
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.set_size import calibration_pseudo_at, probe_means, probe_sets, probe_sizes

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


def test_probe_means_average_each_size_and_skip_missing_values():
    cal = _calibration(12)
    sets = probe_sets(cal, 4, draws=2, seed=1)
    pseudo = {name: {"dice": 0.1 * len(d) + (0.01 if name.endswith("_0") else -0.01)} for name, d in sets.items()}
    pseudo["size_probe1_1"] = {"dice": None}  # a probe with too little foreground gives no pseudo metric
    got = probe_means(pseudo, sets, ["dice"])
    assert got["reference_size"] == 4
    rows = dict((int(m), v) for m, v in got["values"]["dice"])
    assert rows[1] == pytest.approx(0.11) and rows[2] == pytest.approx(0.2) and rows[4] == pytest.approx(0.4)


def test_the_anchor_moves_only_for_sets_smaller_than_the_reference_and_interpolates_in_log_size():
    probes = {"reference_size": 16, "values": {"dice": [[1, 0.40], [2, 0.50], [4, 0.60], [8, 0.65], [16, 0.70]]}}
    assert calibration_pseudo_at(0.8, probes, "dice", 16) == 0.8  # as large as calibrated: unchanged
    assert calibration_pseudo_at(0.8, probes, "dice", 100) == 0.8
    assert calibration_pseudo_at(0.8, probes, "dice", 4) == pytest.approx(0.8 - 0.10)
    assert calibration_pseudo_at(0.8, probes, "dice", 1) == pytest.approx(0.8 - 0.30)
    between = 0.60 + (0.65 - 0.60) * (math.log(6) - math.log(4)) / (math.log(8) - math.log(4))
    assert calibration_pseudo_at(0.8, probes, "dice", 6) == pytest.approx(0.8 + between - 0.70)
    # nothing to go on: the whole calibration set's pseudo metric
    assert calibration_pseudo_at(0.8, None, "dice", 4) == 0.8
    assert calibration_pseudo_at(0.8, probes, "hd95", 4) == 0.8
    assert calibration_pseudo_at(0.8, probes, "dice", None) == 0.8
    assert calibration_pseudo_at(None, probes, "dice", 4) is None
    no_reference = {"reference_size": 16, "values": {"dice": [[1, 0.4], [2, 0.5]]}}
    assert calibration_pseudo_at(0.8, no_reference, "dice", 1) == 0.8


def test_a_small_set_is_anchored_on_the_calibration_pseudo_at_its_size():
    pairs = [
        {"name": f"f{i}", "kind": "shift", "n": n, "d_pseudo": {"dice": d}, "d_real": {"dice": d + 0.01 * (-1) ** i}}
        for i, (d, n) in enumerate(zip([-0.1, -0.05, 0.0, 0.02, -0.2, -0.15, 0.05, -0.08], [16, 16] + [40] * 6))
    ]
    model = fit_interval_model(pairs, "dice", G, 0.8)
    probes = {"reference_size": 16, "values": {"dice": [[1, 0.40], [2, 0.50], [4, 0.60], [8, 0.65], [16, 0.70]]}}
    plain = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=4)
    sized = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=4, probes=probes)
    # the 4-image set's pseudo 0.7 is read against the calibration pseudo at 4 images (0.7), not the whole set's 0.8
    assert sized.anchor_pseudo == pytest.approx(0.7) and plain.anchor_pseudo is None
    assert sized.value == pytest.approx(plain.value + (G.predict([0.8])[0] - G.predict([0.7])[0]))
    # the same move read from the corrected pseudo metric: the same interval, shifted (the paper's G(p_t) too)
    assert sized.upper - sized.lower == pytest.approx(plain.upper - plain.lower, abs=1e-9)
    assert sized.range_note.endswith("interval widened, anchored on calibration subsets of its size")
    assert Estimate.from_dict(sized.to_dict()) == sized and sized.to_dict()["anchor_pseudo"] == pytest.approx(0.7)
    large = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=16, probes=probes)
    assert large.anchor_pseudo is None and large == estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=16)
