"""CaseRow: a case's row, frozen; ``to_dict`` is the row of cases.csv and ``from_dict`` reads it back."""

from __future__ import annotations

import dataclasses

import pytest

from spe_lightning.percase.scorer import CaseRow, case_rows

ROW = CaseRow("case_3", 0.8, 0.7, 0.6, 0.8, False, False, 120, 0.9, 4)


def test_to_dict_and_from_dict_round_trip_every_kind_of_row():
    site = dataclasses.replace(ROW, distance=1.5, beyond_calibrated=True, signals="regressor+confidence")
    labelled = ROW.with_label(0.75, True)
    for row in (ROW, site, dataclasses.replace(ROW, real_dice=0.7, with_real=True), labelled):
        assert CaseRow.from_dict(row.to_dict()) == row
    assert list(ROW.to_dict())[-1] == "best_reference" and "real_dice" not in ROW.to_dict()
    assert list(labelled.to_dict())[-2:] == ["real_dice", "labelled"] and labelled.real_dice == 0.75
    assert ROW.with_label(None, False).to_dict()["real_dice"] is None  # unlabelled rows say so


def test_a_row_is_frozen_and_reads_like_the_dict_it_was():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ROW.quality = 0.1  # type: ignore[misc]
    assert ROW["estimated_dice"] == ROW.estimated_dice and ROW.get("real_dice") is None
    assert case_rows([ROW.to_dict(), ROW]) == [ROW, ROW]
    with pytest.raises(ValueError, match="needs at least 'id'"):
        CaseRow.from_dict({"quality": 0.3})
