"""What the estimate CLI writes (cli/estimate/outputs.py): CSV cells a spreadsheet would run, links in the output
folder (docs/security.md)."""

from __future__ import annotations

import csv
import io

from spe_lightning.cli.estimate import cases_csv, csv_cell, write_file


def test_csv_cells_that_spreadsheets_would_run_are_quoted():
    for bad in ('=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "\tx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("case_01") == "case_01" and csv_cell(-0.5) == -0.5
    cases = [{"id": "=cmd|' /C calc'!A0", "quality": 0.5, "flagged": False}]
    rows = list(csv.reader(io.StringIO(cases_csv(cases, ["=cmd.png"]))))
    assert rows[1][:3] == ["'=cmd|' /C calc'!A0", "'=cmd.png", "0.5"]


def test_outputs_replace_links_instead_of_writing_through_them(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases.csv").symlink_to(victim)
    write_file(out / "cases.csv", "id\n")
    assert victim.read_text() == "keep me"
    assert not (out / "cases.csv").is_symlink() and (out / "cases.csv").read_text() == "id\n"
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv"]  # no temporary file left


def test_the_flag_count_says_when_the_threshold_is_only_a_calibration_quantile():
    from spe_lightning.cli.estimate.outputs import flag_line

    fitted = flag_line(3, 20, 0.41, {"method": "youden", "dice_cut": 0.7})
    assert fitted == "3 of 20 cases flagged (quality < 0.410)"
    # every calibration case above Dice 0.7: the threshold is a low quantile of their scores, not a Dice cut
    quantile = flag_line(20, 20, 0.993, {"method": "quantile 0.05", "dice_cut": 0.7})
    assert quantile.startswith("20 of 20 cases flagged (quality < 0.993): ")
    assert "too few cases on one side of real Dice 0.7" in quantile and "not a Dice below 0.7" in quantile
    assert flag_line(1, 2, 0.5, None) == "1 of 2 cases flagged (quality < 0.500)"
