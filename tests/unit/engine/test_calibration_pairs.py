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
