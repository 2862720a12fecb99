"""Estimate: frozen, ``to_dict`` exactly the dict estimates have always been, ``from_dict`` reads them back."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from spe_lightning.engine.estimate import estimate, fit_interval_model
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.results import Estimate, Interval, estimates_from_dict, estimates_to_dict

#: the estimate dicts main 074a787 (estimates as plain dicts) wrote for the cases of :func:`_cases`
OLD = json.loads((Path(__file__).parent / "data" / "estimates_074a787.json").read_text())

G = MetricMapping.fit("linear", [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])  # G(p) = p + 0.1


def _cases() -> dict[str, Estimate]:
    """Every shape an estimate takes: no G, no pseudo, paper, anchored (G's residuals, the pairs' model, with
    and without a distance), unreliable (withheld)."""
    rng = np.random.default_rng(0)
    distances = [1.0, 1.2, 2.0, 3.0, 1.1, 0.9, 1.5, 2.5]
    tracked = [
        {"name": f"fam{i}_2", "d_pseudo": {"dice": float(mv)}, "d_real": {"dice": float(mv + rng.normal(0, 0.01))},
         "distance": d}
        for i, (mv, d) in enumerate(zip(np.linspace(-0.3, 0.05, 8), distances))
    ]  # fmt: skip
    moves = [(-0.2, -0.2), (-0.2, 0.15), (-0.15, 0.0), (-0.1, 0.0), (0.1, 0.0)]
    untracked = [
        {"name": f"f{i}_{k}", "d_pseudo": {"dice": dp}, "d_real": {"dice": dr}}
        for i, (dp, dr) in enumerate(moves)
        for k in (1, 2)
    ]
    m_tr, m_un = fit_interval_model(tracked, "dice", G, 0.8), fit_interval_model(untracked, "dice", G, 0.8)
    return {
        "no_g": estimate(None, "dice", 0.6, 0.9),
        "no_pseudo": estimate(G, "dice", None, 0.9),
        "paper": estimate(G, "dice", 0.6, 0.9),
        "anchored_loo": estimate(G, "dice", 0.6, 0.9, anchor=(0.8, 0.9, None)),
        "anchored_pairs_outside": estimate(G, "dice", 0.7, 0.9, anchor=(0.8, 0.9, m_tr), distance=6.0),
        "anchored_pairs_no_distance": estimate(G, "dice", 0.7, 0.9, anchor=(0.8, 0.9, m_tr)),
        "unreliable": estimate(G, "dice", 0.6, 0.9, anchor=(0.8, 0.9, m_un), distance=1.0),
    }


def _same(new: object, old: object) -> bool:
    """Same keys in the same order, same strings and flags, numbers equal to the last few bits.

    The numbers come from fits (G's closed-form least squares since stop 10; scikit-learn's before), which may
    differ in the last bit; the key layout and everything else must not differ at all."""
    if isinstance(new, dict) and isinstance(old, dict):
        return list(new) == list(old) and all(_same(new[k], old[k]) for k in new)
    if isinstance(new, float) and isinstance(old, float) and not isinstance(new, bool):
        return new == pytest.approx(old, rel=1e-12, abs=1e-12)
    return type(new) is type(old) and new == old


def test_to_dict_is_the_dict_estimates_always_were_key_order_included():
    cases = _cases()
    assert set(cases) == set(OLD)
    for name, est in cases.items():
        assert isinstance(est, Estimate)
        # same keys, same order, same numbers (to the last bits of the fits): spe_report.json's layout is kept
        assert _same(json.loads(json.dumps(est.to_dict())), OLD[name]), name


def test_from_dict_reads_every_old_estimate_back_exactly():
    cases = _cases()
    for name, old in OLD.items():
        back = Estimate.from_dict(old)
        assert _same(back.to_dict(), cases[name].to_dict()), name
        assert json.dumps(back.to_dict()) == json.dumps(old), name  # reading and writing back: byte-identical
        assert not back.extra  # every key of today's estimates is a field
    e = Estimate.from_dict(OLD["unreliable"])
    assert e.value is None and e.reliable is False and e.reason.startswith("unreliable: ")
    assert e.withheld is not None and e.withheld.value is not None and e.unreliable in e.reason
    out = Estimate.from_dict(OLD["anchored_pairs_outside"])
    assert out.method == "anchored" and out.from_pairs and out.outside_calibrated_range is True
    assert out.paper == Interval(**OLD["anchored_pairs_outside"]["paper"]) and out.interval == (out.lower, out.upper)


def test_keys_a_version_does_not_know_are_kept_and_the_true_value_goes_last():
    stored = {**OLD["paper"], "future_key": [1, 2]}
    e = Estimate.from_dict(stored)
    assert dict(e.extra) == {"future_key": (1, 2)}
    assert json.dumps(e.to_dict()) == json.dumps(stored)
    with_true = e.with_true(0.75)
    assert with_true.true == 0.75 and e.true is None  # a new estimate; the old one is unchanged
    assert list(with_true.to_dict())[-2:] == ["true", "future_key"]


def test_an_estimate_is_frozen_and_copies_pickle_as_its_dict_form():
    e = _cases()["anchored_pairs_outside"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.value = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Estimate.from_dict({**OLD["paper"], "x": {"a": 1}}).extra["x"]["a"] = 2  # read-only, nested too
    assert pickle.loads(pickle.dumps(e)) == e and copy.deepcopy(e) == e


def test_dict_style_reads_keep_code_written_for_dicts_working():
    e = _cases()["anchored_pairs_outside"]
    assert e["value"] == e.value and e["paper"] == e.paper.to_dict()
    assert e.get("withheld") is None and "withheld" not in e and "distance" in e
    assert dict(e) == e.to_dict() and {**e} == e.to_dict() and list(e) == list(e.to_dict())
    assert dict(e.items()) == e.to_dict() and list(e.values()) == list(e.to_dict().values())
    with pytest.raises(KeyError):
        e["withheld"]
    with pytest.raises(TypeError):
        json.dumps(e)  # JSON needs to_dict(): a typed result is not silently a dict


def test_not_an_estimate_is_refused_with_what_it_holds():
    with pytest.raises(ValueError, match="needs at least 'value'"):
        Estimate.from_dict({"lower": 0.1})
    with pytest.raises(ValueError, match="not an SPE estimate"):
        Estimate.from_dict([0.1, 0.2])  # type: ignore[arg-type]


def test_nested_estimates_convert_both_ways():
    nested = {"t": {"dice": OLD["paper"], "iou": OLD["unreliable"]}}
    typed = estimates_from_dict(nested)
    assert isinstance(typed["t"]["dice"], Estimate) and estimates_to_dict(typed) == nested
    with pytest.raises(TypeError):
        typed["t"]["dice"] = typed["t"]["iou"]  # type: ignore[index]
