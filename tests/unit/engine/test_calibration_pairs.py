"""Labelled calibration pairs for the anchored intervals."""

from __future__ import annotations

import pytest
from _shapes import shapes_set

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.calibration_pairs import calibration_sets, pairs_from_record
from spe_lightning.engine.shifts import SHIFT_FAMILIES


def test_calibration_pairs_measure_subsets_and_shifts_against_the_base():
    data = shapes_set(10)

    def measure(d: CachedSet) -> dict:
        v = float(d.gray.mean())  # a stand-in for the pseudo and real metric of a set
        return {"dice": v}

    def pairs_of(seed: int) -> tuple[dict, list]:
        sets = calibration_sets(data, subset_sizes=[4, 4, 30], n_subsets=3, shifts=[("gamma", 3)], seed=seed)
        record = {"pseudo": {"base": measure(data)}, "real": {"base": {"dice": 2 * measure(data)["dice"]}}}
        for name, d in sets.items():
            record["pseudo"][name], record["real"][name] = measure(d), {"dice": 2 * measure(d)["dice"]}
        return sets, pairs_from_record(record, "base", list(sets))

    sets, pairs = pairs_of(1)
    kinds = [p["kind"] for p in pairs]
    assert kinds.count("subset") == 6 and kinds.count("shift") == 1  # sizes 4 and 9 (capped below n)
    assert sorted({len(sets[p["name"]]) for p in pairs if p["kind"] == "subset"}) == [4, 9]
    for p in pairs:
        assert p["d_real"]["dice"] == pytest.approx(2 * p["d_pseudo"]["dice"])
    assert pairs[-1]["name"] == "gamma_3" and pairs[-1]["d_pseudo"]["dice"] != 0
    assert [p["d_pseudo"] for p in pairs_of(1)[1]] == [p["d_pseudo"] for p in pairs]


def test_calibration_sets_default_to_the_products_shifts():
    from spe_lightning.engine.calibration_pairs import INTERVAL_SEVERITIES

    sets = calibration_sets(shapes_set(6), subset_sizes=[3], n_subsets=1)
    shifted = [n for n in sets if not n.startswith("subset")]
    assert sorted(shifted) == sorted(f"{f}_{s}" for f in SHIFT_FAMILIES for s in INTERVAL_SEVERITIES)


def test_a_subset_pair_is_scaled_to_stand_for_a_set_of_new_images():
    import math

    import numpy as np

    from spe_lightning.engine.calibration_pairs import independent_set_scale

    assert independent_set_scale({"kind": "subset", "n": 24, "n_calibration": 48}) == pytest.approx(math.sqrt(2.9375))
    assert independent_set_scale({"kind": "subset", "n": 6, "n_calibration": 24}) == pytest.approx(
        math.sqrt(30 * 23 / 432)
    )
    # beyond half the calibration set: scaled as the half-size subset (23 of 24 would be 6.7 times)
    half = independent_set_scale({"kind": "subset", "n": 12, "n_calibration": 24})
    assert independent_set_scale({"kind": "subset", "n": 23, "n_calibration": 24}) == pytest.approx(half)
    for other in ({"kind": "shift", "n": 24, "n_calibration": 24}, {"kind": "subset", "n": 23}, {"kind": "subset"}):
        assert independent_set_scale(other) == 1.0  # the calibration images themselves, or an older run's pair
    # the formula's premise, simulated: a subset's mean against the whole set's varies less than a new set's mean
    rng = np.random.default_rng(0)
    big_n, n = 24, 12
    population = rng.normal(0, 1, 200_000)
    sub, new = [], []
    for _ in range(4000):
        cal = rng.choice(population, big_n, replace=False)
        sub.append(rng.choice(cal, n, replace=False).mean() - cal.mean())
        new.append(rng.choice(population, n, replace=False).mean() - cal.mean())
    ratio = float(np.std(new) / np.std(sub))
    assert ratio == pytest.approx(independent_set_scale({"kind": "subset", "n": n, "n_calibration": big_n}), rel=0.05)
