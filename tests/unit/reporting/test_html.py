"""report.html (reporting/html.py): ids and paths are escaped (docs/security.md)."""

from __future__ import annotations


def test_report_html_escapes_ids_and_paths(tmp_path):
    from spe_lightning.reporting.html import write_html_report

    bad = "<img src=x onerror=alert(1)>"
    cases = [{"id": bad, "quality": 0.1, "flagged": True, "estimated_dice": 0.2, "foreground_pixels": 5}]
    page = write_html_report(
        tmp_path / "r.html", {"n_images": 1}, cases, calibration={"threshold": 0.5}, meta={"images": bad}
    ).read_text()
    assert bad not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 2


def test_report_html_says_what_widened_an_interval(tmp_path):
    from spe_lightning.reporting.html import write_html_report

    est = {
        "dice": {"value": 0.9, "lower": 0.7, "upper": 0.95, "pseudo": 0.8, "reason": None, "styled_anchor": 0.7,
                 "distance": 5.0, "pairs_distance": 2.0, "outside_calibrated_range": True},
        "iou": {"value": 0.8, "lower": 0.7, "upper": 0.9, "pseudo": 0.7, "reason": None, "styled_anchor": 0.75},
        "hd95": {"value": None, "lower": None, "upper": None, "pseudo": 9.0, "reason": "unreliable: too wide"},
    }  # fmt: skip
    page = write_html_report(tmp_path / "r.html", {"n_images": 3, "estimates": est}, []).read_text()
    row = {m: page.split(f"<td>{label}</td>", 1)[1].split("</tr>", 1)[0] for m, label in
           (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95 (px)"))}  # fmt: skip
    assert "outside the calibrated range" in row["dice"] and "interval reaches 0.700" in row["dice"]
    assert "reaches" not in row["iou"]  # inside its interval: it widened nothing
    assert "unreliable: too wide" in row["hd95"]


def test_report_html_shows_the_truth_and_the_prediction_powered_estimates(tmp_path):
    from spe_lightning.reporting.html import write_html_report

    est = {"dice": {"value": 0.6, "lower": 0.5, "upper": 0.7, "pseudo": 0.55, "reason": None}}
    ppi = {"estimate": 0.586, "lower": 0.555, "upper": 0.616, "classical": 0.51, "classical_lower": 0.44,
           "classical_upper": 0.57, "lambda": 0.8}  # fmt: skip
    summary = {"n_images": 40, "estimates": est, "true": {"dice": 0.582},
               "labelled": {"n_labels": 10, "metrics": {"dice": ppi}}}  # fmt: skip
    page = write_html_report(tmp_path / "r.html", summary, []).read_text()
    assert "<th>true (masks)</th>" in page and "<td>0.582</td>" in page
    assert "Estimates with 10 labelled cases" in page and "<td>0.586</td>" in page and "0.555 – 0.616" in page
    plain = write_html_report(tmp_path / "p.html", {"n_images": 40, "estimates": est}, []).read_text()
    assert "true (masks)" not in plain and "labelled cases</h2>" not in plain


def test_the_input_check_line_reads_any_not_compared_reason(capsys):
    from spe_lightning.cli.estimate.outputs import report_input_check

    for reason in ("every statistic: these are 3D volumes", "a reason without a colon"):
        report_input_check({"verdict": "not_compared", "checks": [], "not_compared": [reason], "warnings": []})
        assert "input check: not compared" in capsys.readouterr().err
