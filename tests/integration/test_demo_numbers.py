"""The demo's numbers (issue 26 item 5): `spe-lightning fit --config configs/synthetic.yaml` estimates Dice and IoU
of both targets within the tolerance the README states, with the truth inside the 90% interval.

The tolerance comes from benchmarks/results/demo_spread.json (training seeds 0-2: the largest error was 0.040
for Dice and 0.049 for IoU, on the noisy target). The demo's real default reverse step (learned propagation)
is fitted once here (~1 min on an idle 2-core machine, several when loaded), so the test is marked ``slow``
and runs with ``SPE_RUN_SLOW=1`` (skipped, with that reason, otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _demo import CONFIG

from spe_lightning.cli import cli

REPO = Path(__file__).resolve().parents[2]
#: |estimate - truth| the README states for the demo, per metric (the spread over seeds, rounded up)
TOLERANCE = {"dice": 0.05, "iou": 0.05}


def test_the_recorded_spread_is_within_the_stated_tolerance():
    """The table the README quotes comes from this file: every seed's error is within TOLERANCE."""
    result = json.loads((REPO / "benchmarks" / "results" / "demo_spread.json").read_text())
    assert len(result["runs"]) >= 3
    for run in result["runs"]:
        for target, metrics in run["targets"].items():
            for m, tol in TOLERANCE.items():
                e = metrics[m]
                assert abs(e["estimate"] - e["true"]) <= tol, (run["seed"], target, m)
                assert e["lower"] <= e["true"] <= e["upper"], (run["seed"], target, m)


@pytest.mark.slow
@pytest.mark.real_default
@pytest.mark.skipif(os.environ.get("SPE_RUN_SLOW") != "1", reason="the full demo fit: set SPE_RUN_SLOW=1 to run it")
def test_demo_estimates_are_within_the_stated_tolerance_of_the_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("SPE_CACHE_DIR", str(tmp_path / "fit_cache"))
    cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (path,) = tmp_path.rglob("spe_report.json")
    report = json.loads(path.read_text())
    assert report["segmenter"]["name"] == "learned_propagation"  # the demo's real reverse step, not a test stand-in
    for target in ("target", "target_noisy"):
        for m, tol in TOLERANCE.items():
            e, true = report["estimates"][target][m], report["true"][target][m]
            assert abs(e["value"] - true) <= tol, (target, m, e["value"], true)
            assert e["lower"] <= true <= e["upper"], (target, m)
