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
