"""A few labelled target cases (issue 28): SPEEstimator.estimate / estimate_chunks with labelled_masks,
suggested cases, and `spe-lightning estimate --labelled-masks / --suggest-labels`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spe_lightning import SPEEstimator
from spe_lightning.monitoring.chunks import chunk_rows
from spe_lightning.percase.labels import metric_predictions
from spe_lightning.percase.ppi import ppi_mean, stratified_ppi_mean


def _target(dm):
    tgt = dm.targets["target_noisy"]
    images = torch.stack([tgt[i]["image"] for i in range(len(tgt))])
    masks = [tgt[i]["label"] for i in range(len(tgt))]
    return images, masks


def test_labelled_masks_give_the_prediction_powered_estimate(fitted):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    images, masks = _target(dm)
    ids = [f"case{i:02d}" for i in range(len(images))]
    plain = est.estimate(model, images, name="target_noisy", ids=ids)
    assert plain.labelled is None and "real_dice" not in plain.cases[0]
    # the truth of every case, from a run on the same images with their masks
    truth = est.estimate(model, [{"image": i, "label": m} for i, m in zip(images, masks)], name="target_noisy")
    real = np.array([c["real_dice"] for c in truth.cases])
    chosen = [1, 4, 6, 9, 11]
    labelled = {ids[i]: masks[i][0] for i in chosen[:3]} | {i: masks[i] for i in chosen[3:]}  # by id or position
    res = est.estimate(model, images, name="target_noisy", ids=ids, labelled_masks=labelled)
    lab = res.labelled
    assert lab["n_labels"] == 5 and lab["n_cases"] == len(images) and lab["design"] == "uniform"
    assert lab["ids"] == [ids[i] for i in chosen] and lab["reason"] is None
    f = np.array([c["estimated_dice"] for c in plain.cases])
    other = [i for i in range(len(images)) if i not in chosen]
    expected = ppi_mean(f[other], f[chosen], real[chosen], est.config.level)
    got = lab["metrics"]["dice"]
    assert got["estimate"] == pytest.approx(expected.estimate)
    assert (got["lower"], got["upper"]) == pytest.approx((expected.lower, expected.upper))
    assert (got["classical_lower"], got["classical_upper"]) == pytest.approx(
        (expected.classical_lower, expected.classical_upper)
    )
    assert got["lambda"] == pytest.approx(expected.lam) and got["n_labelled"] == 5
    iou = ppi_mean(metric_predictions("iou", f[other]), metric_predictions("iou", f[chosen]),
                   real[chosen] / (2 - real[chosen]), est.config.level)  # fmt: skip
    assert lab["metrics"]["iou"]["estimate"] == pytest.approx(iou.estimate, abs=1e-6)
    assert set(lab["metrics"]) == {"dice", "iou", "precision", "recall"}
    # labelled rows show their real Dice, the others none
    for i, row in enumerate(res.cases):
        assert row["labelled"] == (i in chosen)
        assert row["real_dice"] == (pytest.approx(real[i]) if i in chosen else None)
    assert json.loads(json.dumps(res.to_dict(), allow_nan=False))["labelled"]["n_labels"] == 5


def test_bad_labels_are_refused_and_too_few_are_reported(fitted):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    images, masks = _target(dm)
    with pytest.raises(ValueError, match="not among the images"):
        est.estimate(model, images, labelled_masks={"nope": masks[0]})
    with pytest.raises(ValueError, match="at the image's size"):
        est.estimate(model, images, labelled_masks={0: masks[0][:, :10]})
    with pytest.raises(ValueError, match="per_case=True"):
        est.estimate(model, images, per_case=False, labelled_masks={0: masks[0]})
    few = est.estimate(model, images, labelled_masks={0: masks[0], 1: masks[1]}).labelled
    assert "at least 3" in few["reason"] and set(few["metrics"]["dice"]) == {"labelled_mean"}


def test_suggested_cases_use_the_stratified_estimator(fitted):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    images, masks = _target(dm)
    first = est.estimate(model, images, name="target_noisy")
    design = est.suggest_labels(first, k=6, seed=4)
    assert design == est.suggest_labels(first.cases, k=6, seed=4)  # seeded: the same draw again
    assert len(design["chosen_ids"]) == 6 and design["design"] == "stratified"
    labels = {int(i): masks[int(i)] for i in design["chosen_ids"]}
    res = est.estimate(model, images, name="target_noisy", labelled_masks=labels, label_design=design)
    assert res.labelled["design"] == "stratified"
    f = np.array([c["estimated_dice"] for c in first.cases])
    real = np.array([res.cases[i]["real_dice"] for i in design["chosen"]])
    expected = stratified_ppi_mean(f, design["strata"], design["chosen"], real, est.config.level)
    assert res.labelled["metrics"]["dice"]["estimate"] == pytest.approx(expected.estimate)
    assert res.labelled["metrics"]["dice"]["upper"] == pytest.approx(expected.upper)
    other = {i: masks[i] for i in range(6)} if set(labels) != set(range(6)) else {i: masks[i] for i in range(6, 12)}
    with pytest.raises(ValueError, match="not the suggested ones"):
        est.estimate(model, images, name="target_noisy", labelled_masks=other, label_design=design)


def test_chunks_get_their_own_prediction_powered_estimate_and_alert(fitted):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    images, masks = _target(dm)
    whole = est.estimate(model, images, name="target_noisy")
    labels = {i: masks[i] for i in (0, 2, 3, 5, 7)}  # chunk 0-5 gets 4 labels, 6-11 gets 1
    res = est.estimate_chunks(model, images, 6, name="target_noisy", labelled_masks=labels,
                              alert_below={"dice": 1.01}, alert_on="estimate")  # fmt: skip
    first, second = res.chunks
    assert first["labelled"]["n_labels"] == 4 and first["labelled"]["reason"] is None
    f = np.array([c["estimated_dice"] for c in whole.cases])
    real = est.estimate(model, images, name="target_noisy", labelled_masks=labels).cases
    y = np.array([real[i]["real_dice"] for i in (0, 2, 3, 5)])
    expected = ppi_mean(f[[1, 4]], f[[0, 2, 3, 5]], y, est.config.level)
    assert first["labelled"]["metrics"]["dice"]["estimate"] == pytest.approx(expected.estimate)
    assert "at least 3" in second["labelled"]["reason"]
    ppi_events = [e for e in res.alerts if e["alert_on"] == "ppi_interval"]
    assert [(e["chunk"], e["metric"]) for e in ppi_events] == [("0-5", "dice")]  # upper <= 1 < 1.01
    dice_rows = [r for r in chunk_rows(res.chunks) if r["metric"] == "dice"]  # chunks.csv
    assert [(r["labels"], r["ppi_alert"], r["alert"]) for r in dice_rows] == [(4, 1, 1), (1, 0, 1)]
    assert dice_rows[0]["ppi_estimate"] == pytest.approx(expected.estimate) and dice_rows[1]["ppi_estimate"] is None
    quiet = est.estimate_chunks(model, images, 6, name="target_noisy", masks=whole.masks, cases=whole.cases,
                                labelled_masks=labels, alert_below={"dice": 0.0})  # fmt: skip
    assert quiet.chunks[0]["labelled"]["metrics"]["dice"]["estimate"] == pytest.approx(expected.estimate)
    assert not [e for e in quiet.alerts if e["alert_on"] == "ppi_interval"]
    with pytest.raises(ValueError, match="4 per-case rows for 12 images"):
        est.estimate_chunks(model, images, 6, labelled_masks=labels, cases=whole.cases[:4])


def test_cli_suggests_cases_then_uses_their_masks(fitted, tmp_path, capsys):
    import csv

    from PIL import Image

    from spe_lightning.cli import main as cli_main

    cb, _, dm = fitted
    tgt = dm.targets["target_noisy"]
    images, masks = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    masks.mkdir()
    for i in range(len(tgt)):
        Image.fromarray((tgt[i]["image"][0].numpy() * 255).round().astype("uint8")).save(images / f"c{i:02d}.png")
    base = ["estimate", "--ckpt", str(cb.ckpt_path), "--estimator", str(cb.estimator_path), "--images", str(images)]
    base += ["--no-progress", "--gallery", "0"]
    cli_main([*base, "--out", str(tmp_path / "first"), "--suggest-labels", "6", "--suggest-seed", "2"])
    printed = capsys.readouterr().out
    assert "Label these 6 cases" in printed
    first = json.loads((tmp_path / "first" / "estimate.json").read_text())
    sug = first["suggested_labels"]
    rows = list(csv.DictReader((tmp_path / "first" / "suggested_labels.csv").open()))
    assert [r["id"] for r in rows] == sug["ids"] and len(set(sug["ids"])) == 6 and "strat" in sug["rule"]
    # the user labels exactly the suggested cases (masks named like the images)
    for case in sug["ids"]:
        i = int(case[1:])
        Image.fromarray((tgt[i]["label"][0].numpy() > 0).astype("uint8")).save(masks / f"{case}.png")
    design = str(tmp_path / "first" / "label_design.json")
    out = tmp_path / "second"
    cli_main([*base, "--out", str(out), "--labelled-masks", str(masks), "--label-design", design])
    printed = capsys.readouterr().out
    assert "With 6 labelled of 12 cases (stratified design" in printed and "| dice |" in printed
    summary = json.loads((out / "estimate.json").read_text())
    lab = summary["labelled"]
    assert lab["n_labels"] == 6 and lab["design"] == "stratified" and sorted(lab["ids"]) == sorted(sug["ids"])
    d = lab["metrics"]["dice"]
    assert 0 <= d["lower"] <= d["estimate"] <= d["upper"] <= 1
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert sorted(r["id"] for r in rows if r["real_dice"]) == sorted(sug["ids"])
    # the same masks without the design: treated as a uniform sample
    cli_main([*base, "--out", str(tmp_path / "third"), "--labelled-masks", str(masks)])
    assert json.loads((tmp_path / "third" / "estimate.json").read_text())["labelled"]["design"] == "uniform"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main([*base, "--out", str(tmp_path / "x"), "--labelled-masks", str(tmp_path / "first")])
    assert exit_.value.code == 2 and "no mask named like any" in capsys.readouterr().err
