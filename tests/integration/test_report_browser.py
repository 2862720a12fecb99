"""`spe-lightning estimate`'s report.html as a person sees it: rendered in headless Chromium.

Needs a Chromium binary on PATH (Debian: ``apt-get install chromium``); without one the test skips and
says so, unless ``SPE_REQUIRE_BROWSER=1`` (CI), where a missing browser fails it.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from _browser import Browser, find_chromium
from PIL import Image

from spe_lightning.cli import main as cli_main
from spe_lightning.reporting.html import METRIC_LABELS


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = "no Chromium on PATH (chromium, chromium-browser, google-chrome); apt-get install chromium"
        if os.environ.get("SPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SPE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def report(fitted, tmp_path_factory):
    """report.html of the estimate CLI on the fitted phantom model's target, with chunks and a gallery."""
    cb, _, dm = fitted
    tmp = tmp_path_factory.mktemp("browser")
    folder = tmp / "images"
    folder.mkdir()
    target = dm.targets["target"]
    for i in range(len(target)):
        img = (target[i]["image"][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(img).save(folder / f"case_{i:02d}.png")
    out = tmp / "out"
    args = ["--ckpt", str(cb.ckpt_path), "--estimator", str(cb.estimator_path), "--images", str(folder)]
    cli_main(["estimate", *args, "--out", str(out), "--gallery", "6", "--chunk-by", "4", "--no-progress"])
    return out / "report.html", json.loads((out / "estimate.json").read_text())


# every <img>: its alt, whether it decoded, its natural and drawn size, its right edge on the screen
IMAGES = """[...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
  shown: i.getBoundingClientRect().width, right: i.getBoundingClientRect().right}))"""
# the estimates table (the one whose header starts with "metric"): its rows' cells as text
ESTIMATES_TABLE = """(() => { const t = [...document.querySelectorAll('table')]
  .find(t => t.rows[0].cells[0].innerText.trim() === 'metric');
  return t ? [...t.rows].slice(1).map(r => [...r.cells].map(c => c.innerText.trim())) : null; })()"""
# how wide the page is laid out against the screen, and the smallest text size of any paragraph or cell
LAYOUT = """({inner: window.innerWidth, doc: document.documentElement.scrollWidth, body: document.body.scrollWidth,
  font: Math.min(...[...document.querySelectorAll('p, td, th, li')].map(e => parseFloat(getComputedStyle(e).fontSize))),
  visible_text: document.body.innerText.length})"""


def _pixel_std(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32).std())


def test_report_renders_in_chromium_on_a_desktop_and_a_phone(chromium, report, tmp_path):
    page, summary = report
    with Browser(chromium, tmp_path / "profile") as b:
        b.viewport(1280, 900)
        b.open(page.as_uri())
        shot = b.screenshot()
        (page.parent / "desktop.png").write_bytes(shot)  # kept beside the report, to look at after a failure
        # not blank: a white or one-colour page has (near) zero spread of gray levels
        assert Image.open(io.BytesIO(shot)).size[0] == 1280 and _pixel_std(shot) > 10.0

        images = b.js(IMAGES)
        alts = sorted(i["alt"] for i in images)
        assert alts == ["chunks", "estimates", "gallery", "quality"], alts
        for img in images:  # every plot decoded and drawn
            assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img

        rows = b.js(ESTIMATES_TABLE)
        assert rows is not None, "no estimates table on the page"
        assert [r[0] for r in rows] == [METRIC_LABELS.get(m, m) for m in summary["estimates"]]  # every metric, in order
        for row, (m, e) in zip(rows, summary["estimates"].items()):
            assert row[1] == ("n/a" if e["value"] is None else f"{e['value']:.3f}"), (m, row)
        assert b.js("document.body.innerText").count("cases flagged for review") == 1

        # a phone: the page follows the screen's width (viewport meta tag), nothing wider than it, text readable
        b.viewport(390, 844, mobile=True, scale=2)
        b.open(page.as_uri())
        layout = b.js(LAYOUT)
        assert layout["inner"] == 390, f"laid out {layout['inner']} px wide on a 390 px phone: zoomed-out, unreadable"
        assert layout["doc"] <= layout["inner"] and layout["body"] <= layout["inner"], layout
        assert layout["font"] >= 12, layout
        for img in b.js(IMAGES):
            assert img["w"] > 0 and img["right"] <= layout["inner"] + 0.5, img
        phone = b.screenshot()
        (page.parent / "phone.png").write_bytes(phone)
        assert _pixel_std(phone) > 10.0

        assert b.console_errors() == []
