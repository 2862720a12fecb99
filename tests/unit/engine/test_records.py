"""Records: frozen once made, their dict form (report JSON, checkpoint state) unchanged, old dicts readable."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle

import pytest
import torch

from spe_lightning import SPEConfig, SPERun
from spe_lightning.engine.records import Record, as_records, fit_and_estimate, series
from spe_lightning.monitoring.alerts import AlertEvent

#: a record as the run writes it today (key order included): spe_report.json's ``records`` hold exactly this
CURRENT = {
    "pseudo": {"calibration": {"dice": 0.71, "hd95": 4.5}, "t": {"dice": 0.62, "hd95": None}},
    "real": {"calibration": {"dice": 0.8, "hd95": 3.0}},
    "confidence": {"calibration": 0.9, "t": 0.85},
    "n_support": {"calibration": 8, "t": 8},
    "reasons": {"t": "no foreground for hd95"},
    "seconds": 1.25,
    "distance": {"t": 0.4},
    "epoch": 3,
    "step": 40,
    "final": True,
    "selection": ["noise_2"],
    "agreement": {"calibration": 0.93, "t": None},
    "epoch_seconds": 9.5,
}

#: a record from a checkpoint written before distances, agreement and the record hooks existed
OLD = {
    "pseudo": {"calibration": {"dice": 0.7}, "t": {"dice": 0.6}},
    "real": {"calibration": {"dice": 0.8}},
    "confidence": {"calibration": 0.9, "t": 0.8},
    "n_support": {"calibration": 8, "t": 8},
    "reasons": {},
    "seconds": 2.0,
    "epoch": 0,
    "step": 5,
    "final": False,
}


@pytest.mark.parametrize("stored", [CURRENT, OLD], ids=["current", "old checkpoint"])
def test_a_record_round_trips_to_the_same_dict_and_json(stored):
    record = Record.from_dict(stored)
    assert record.to_dict() == stored and list(record.to_dict()) == list(stored)  # same keys, same order
    assert json.dumps(record.to_dict()) == json.dumps(stored)
    assert Record.from_dict(record.to_dict()) == record
    assert copy.deepcopy(record) == record and pickle.loads(pickle.dumps(record)) == record


def test_an_old_record_reads_with_nothing_invented_and_unknown_keys_kept():
    record = Record.from_dict({**OLD, "written_by": "0.1"})
    assert record.distance is None and record.agreement is None and record.selection is None
    assert record.epoch_seconds is None and record.extra == {"written_by": "0.1"}
    assert record.to_dict()["written_by"] == "0.1"
    with pytest.raises(ValueError, match="without \\['epoch', 'step'\\]"):
        Record.from_dict({"pseudo": {}})


def test_a_record_is_read_only():
    record = Record.from_dict(CURRENT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.final = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.pseudo["t"] = {"dice": 1.0}  # type: ignore[index]
    with pytest.raises(TypeError):
        record.real["calibration"]["dice"] = 1.0  # type: ignore[index]
    mine = record.to_dict()  # a copy: editing it leaves the record alone
    mine["pseudo"]["t"]["dice"] = 1.0
    assert record.pseudo["t"]["dice"] == 0.62
    assert record.as_final() is not record and Record.from_dict(OLD).as_final().final is True


def test_stored_json_records_and_engine_measurements_are_read_as_records():
    """Benchmark JSON and SPEEngine.evaluate's output (no epoch: numbered by position) give the same series
    and estimates as the records themselves."""
    raw = [
        {"pseudo": {"calibration": {"dice": p}, "t": {"dice": p - 0.1}}, "real": {"calibration": {"dice": r}}}
        for p, r in ((0.3, 0.4), (0.5, 0.6), (0.7, 0.75), (0.8, 0.85))
    ]
    records = as_records(raw)
    assert [r.epoch for r in records] == [0, 1, 2, 3]
    assert series(raw, "pseudo", "t", "dice").tolist() == series(records, "pseudo", "t", "dice").tolist()
    assert fit_and_estimate(raw, ["t"], ["dice"]) == fit_and_estimate(records, ["t"], ["dice"])
    with pytest.raises(KeyError, match="no 'seconds'"):
        records[0].measured("seconds")


def test_the_run_checkpoints_plain_dicts_and_reads_old_ones():
    run = SPERun(SPEConfig(metrics=("dice",), support_size=4, working_size=32, fit_cache=None))
    run.load_state_dict({"records": [OLD, CURRENT], "config": run.config.to_dict(), "alerts": []})
    assert all(isinstance(r, Record) for r in run.records) and run.records[1].epoch_seconds == 9.5
    run.alerts = [AlertEvent("t", "dice", 0.6, 0.5, 0.7, 0.6, 0.8, "below", "estimate", epoch=3, step=40)]
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)  # what a Lightning checkpoint holds
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["records"] == [OLD, CURRENT]
    assert state["alerts"] == [{**run.alerts[0].to_dict()}] and "stage" not in state["alerts"][0]
    again = SPERun(run.config)
    again.load_state_dict(state)
    assert again.records == run.records and again.alerts == run.alerts
