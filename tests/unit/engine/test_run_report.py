"""SPEReport: frozen, ``to_dict`` exactly ``spe_report.json``, ``from_dict`` reads reports written before it."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from spe_lightning.engine.records import Record
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.run_report import SPEReport, as_report
from spe_lightning.reporting.report import summary_table, write_csv, write_json

#: spe_report.json as main 074a787 wrote it (the report a plain dict): a 3-epoch fit of the phantom task
#: with the label-fusion segmenter, calibration pairs, two targets with masks and a Dice alert
OLD_TEXT = (Path(__file__).parent / "data" / "spe_report_074a787.json").read_text()


def test_a_report_written_before_the_typed_report_loads_and_writes_back_byte_identical(tmp_path):
    old = json.loads(OLD_TEXT)
    report = SPEReport.from_dict(old)
    assert json.dumps(report.to_dict(), indent=2, allow_nan=False) == OLD_TEXT
    assert write_json(report, tmp_path / "r.json").read_text() == OLD_TEXT  # what the run writes
    # typed, read by attribute
    dice = report.estimates["target"]["dice"]
    assert isinstance(dice, Estimate) and dice.value == old["estimates"]["target"]["dice"]["value"]
    assert dice.method == "anchored" and dice.reliable is True and dice.true == old["true"]["target"]["dice"]
    assert all(isinstance(r, Record) for r in report.records) and len(report.records) == old["n_records"]
    assert report.reason is None and report.version == old["version"] and report.level == old["level"]
    assert report.targets == ["target", "target_noisy"] and report.estimated_keys == old["keys"]
    assert report.mapping["dice"]["kind"] == old["mapping"]["dice"]["kind"]
    assert report.anchor_intervals is not None and report.alerts[0]["metric"] == "dice"
    assert report.combined is None and report.section("quality") is None
    # the CSV and the summary read the typed report as they read the dict
    write_csv(report, tmp_path / "typed.csv")
    write_csv(old, tmp_path / "dict.csv")
    assert (tmp_path / "typed.csv").read_text() == (tmp_path / "dict.csv").read_text()
    assert summary_table(report) == summary_table(old)


def test_the_report_is_frozen_and_changes_make_a_new_report():
    report = SPEReport.from_dict(json.loads(OLD_TEXT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.reason = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.sections["level"] = 0.5  # type: ignore[index]
    with pytest.raises(TypeError):
        report.baselines["confidence"]["target"] = {}  # nested sections are read-only too
    with pytest.raises(TypeError):
        report.estimates["target"]["dice"] = report.estimates["target"]["iou"]  # type: ignore[index]
    finished = report.with_sections(combined={"metric": "dice", "weight": 0.0, "n_sets": 8, "estimates": {}})
    assert report.combined is None and finished.combined["weight"] == 0.0
    assert list(finished.to_dict())[-1] == "combined"  # finishing's sections come last, as they always did
    assert copy.deepcopy(report).to_dict() == report.to_dict()


def test_a_report_without_estimates_says_why():
    skipped = SPEReport({}, (), "SPE has not finished a fit yet")
    assert skipped.to_dict() == {"estimates": {}, "records": [], "reason": "SPE has not finished a fit yet"}
    assert SPEReport.from_dict(skipped.to_dict()) == skipped
    assert skipped.version is None and skipped.targets == [] and skipped.mapping == {}


def test_dict_style_reads_give_the_json_form_of_a_section():
    old = json.loads(OLD_TEXT)
    report = as_report(old)
    assert as_report(report) is report
    assert report["estimates"] == old["estimates"] and report["records"] == old["records"]
    assert report["reason"] is None and report["pairs"] == old["pairs"] and report.get("quality") is None
    assert "alerts" in report and "combined" not in report and list(report.keys()) == list(old)


def test_what_is_not_a_report_is_refused():
    with pytest.raises(ValueError, match="not an SPE report"):
        SPEReport.from_dict({"records": []})
    with pytest.raises(ValueError, match="fields of the report"):
        SPEReport({}, (), None, {"reason": "x"})
