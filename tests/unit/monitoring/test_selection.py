"""Label-free checkpoint selection and alert quality scored over records (issue 15, benchmark item)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from spe_lightning.benchmarking import selection_scores
from spe_lightning.config import SPEConfig
from spe_lightning.monitoring.selection import alert_quality, selection_regret, selection_summary
from spe_lightning.run import SPERun


def _records(n: int = 8) -> list[dict]:
    """Calibration peaks at the last epoch; the shifted target peaks at epoch 4 and its pseudo Dice follows it."""
    recs = []
    for i in range(n):
        cal = 0.6 + 0.04 * i
        tgt = 0.7 - 0.02 * abs(i - 4)
        hd = 5.0 + abs(i - 4)
        recs.append(
            {
                "epoch": i,
                "step": 10 * i,
                "pseudo": {
                    "calibration": {"dice": 0.5 * cal + 0.2, "hd95": 3.0},
                    "t": {"dice": 0.5 * tgt + 0.2, "hd95": hd},
                },
                "real": {"calibration": {"dice": cal, "hd95": 3.0 + 0.01 * i}, "t": {"dice": tgt, "hd95": hd}},
                "confidence": {"calibration": 0.9, "t": 0.8},
            }
        )
    return recs


def test_spe_selects_the_targets_best_checkpoint_where_validation_does_not():
    res = selection_regret(_records(), "t", "dice")
    assert res["n_candidates"] == 8
    assert res["oracle"] == {"epoch": 4, "real": pytest.approx(0.7), "regret": 0.0}
    assert res["spe"]["epoch"] == 4 and res["spe"]["regret"] == pytest.approx(0.0)
    assert res["spe_running"]["epoch"] == 4  # the running estimate exists from the 3rd record
    assert res["validation"]["epoch"] == 7 and res["validation"]["regret"] == pytest.approx(0.06)
    summary = selection_summary({"t": res, "u": res}, ["t"])
    assert summary == {"n_targets": 1, "spe": pytest.approx(0.0), "spe_running": pytest.approx(0.0),
                       "validation": pytest.approx(0.06)}  # fmt: skip


def test_lower_is_better_and_missing_checkpoints():
    recs = _records()
    for r in recs[::2]:  # the target measured at every other checkpoint only
        del r["pseudo"]["t"], r["real"]["t"]
    res = selection_regret(recs, "t", "hd95")
    assert res["n_candidates"] == 4 and res["oracle"]["epoch"] in (3, 5) and res["oracle"]["real"] == 6.0
    assert res["validation"]["epoch"] == 1 and res["validation"]["regret"] == pytest.approx(2.0)  # lowest cal hd95
    empty = selection_regret(recs[:1], "t", "dice")
    assert empty["n_candidates"] == 0 and empty["spe"]["regret"] is None


def test_alert_quality_precision_and_recall():
    q = alert_quality([0.5, 0.9, 0.7, None, 0.6], [0.55, 0.85, 0.9, 0.1, 0.7], threshold=0.75)
    assert (q["n"], q["alerts"], q["crossings"], q["true_alerts"]) == (4, 3, 2, 2)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == 1.0
    above = alert_quality([12.0, 8.0], [9.0, 11.0], threshold=10.0, below=False)
    assert above["precision"] == 0.0 and above["recall"] == 0.0
    assert alert_quality([], [], 0.5)["precision"] is None


def test_selection_scores_of_a_benchmark_result():
    recs = _records()
    for r in recs:
        r["pseudo"]["extra_test"], r["real"]["extra_test"] = r["pseudo"]["t"], r["real"]["t"]
        r["pseudo"]["site"], r["real"]["site"] = r["pseudo"]["t"], r["real"]["t"]
        r["selection"] = ["t"]
    result = {
        "records": {"label_fusion": recs},
        "shift_raw": {"label_fusion": {"calibration": {"real": {"dice": 0.88}}}},
        "targets": [
            {"name": "clean", "real": {"dice": 0.9}, "spe": {"dice": {"value": 0.9, "lower": 0.85}}},
            {"name": "noise_3", "real": {"dice": 0.6}, "spe": {"dice": {"value": 0.7, "lower": 0.6}}},
            {"name": "gamma_1", "real": {"dice": 0.85}, "spe": {"dice": {"value": 0.8, "lower": 0.75}}},
        ],
    }
    sel = selection_scores(result)
    assert list(sel["targets"]) == ["extra_test", "site", "t"] and sel["summary"]["shifted"]["n_targets"] == 1
    assert sel["summary"]["sites"] == sel["summary"]["shifted"]  # same numbers by construction
    assert sel["alerts"]["estimate"]["threshold"] == pytest.approx(0.78)
    assert (sel["alerts"]["estimate"]["alerts"], sel["alerts"]["lower"]["alerts"]) == (1, 2)
    assert sel["alerts"]["estimate"]["recall"] == 1.0 and sel["alerts"]["lower"]["precision"] == 0.5
    assert np.isfinite(sel["summary"]["all"]["validation"])


def _fake_run(**config) -> tuple[SPERun, list[str]]:
    """An SPERun whose evaluation returns fixed numbers (its own record: the calibration set; a hook's: the
    sets asked for), counting the hooks' evaluations; warnings collected."""
    warned: list[str] = []
    run = SPERun(SPEConfig(**config), warn=warned.append)
    run.hook_calls = 0  # type: ignore[attr-defined]

    def evaluate(model, shard=None, sets=None, **kw):
        if sets is not None:
            run.hook_calls += 1  # type: ignore[attr-defined]
        names = ["calibration"] if sets is None else list(sets)
        return {
            "pseudo": {n: {"dice": 0.5} for n in names},
            "real": {n: {"dice": 0.6} for n in names},
            "confidence": dict.fromkeys(names, 0.9),
            "n_support": dict.fromkeys(names, 3),
            "reasons": {},
            "distance": {},
        }

    run.evaluate = evaluate  # type: ignore[method-assign]
    return run, warned


def test_selection_hook_adds_the_targets_to_every_kth_record_before_it_is_kept(monkeypatch):
    """``--select-every 2``: the selection targets are measured into the records of epochs 1 and 3 only, by the
    run's record hook (the record is complete when kept: nothing edits it afterwards)."""
    import spe_lightning.benchmarking.selection as selection

    run, warned = _fake_run()
    monkeypatch.setattr(selection, "selection_targets", lambda r, dm, seed: {"noise_2": [0, 1, 2]})
    run.record_hooks.append(selection.SelectionTargets(run, None, 0, 2))
    kept: list = []
    for epoch in range(4):
        record = run.record(None, epoch, 10 * epoch)
        kept.append(copy.deepcopy(record))  # as it was when record() returned
    assert run.hook_calls == 2 and warned == []
    assert [("noise_2" in r.pseudo, r.selection) for r in kept] == [
        (False, None),
        (True, ("noise_2",)),
        (False, None),
        (True, ("noise_2",)),
    ]
    assert kept == run.records
    assert kept[1].real["noise_2"] == {"dice": 0.6} and kept[3].confidence["noise_2"] == 0.9
    assert all(r.pseudo["calibration"] == {"dice": 0.5} for r in kept)  # the run's own sets are untouched
    assert "noise_2" not in kept[1].n_support  # only pseudo, real and confidence join the record
    with pytest.raises(TypeError):  # a kept record is read-only, its maps too
        run.records[1].pseudo["noise_2"] = {"dice": 1.0}  # type: ignore[index]


def test_record_hooks_merge_and_a_failing_hook_warns_and_is_skipped():
    run, warned = _fake_run()
    measured = {"pseudo": {"dice": 0.4}, "real": {"dice": 0.3}, "confidence": 0.7}

    def broken(model, epoch):
        raise RuntimeError("no such set")

    run.record_hooks += [lambda m, e: {"b": measured}, broken, lambda m, e: {"a": measured, "c": {"pseudo": {}}}]
    record = run.record(None, 0, 0)
    assert record is run.records[-1] and record.selection == ("b",)  # "c" lacks real/confidence: nothing joins
    assert record.real["b"] == {"dice": 0.3} and "a" not in record.pseudo
    assert len(warned) == 2 and "no such set" in warned[0] and "'c'" in warned[1] and "real" in warned[1]

    strict, _ = _fake_run(strict=True)
    strict.record_hooks.append(broken)
    with pytest.raises(RuntimeError, match="no such set"):
        strict.record(None, 0, 0)
    assert strict.records == []
