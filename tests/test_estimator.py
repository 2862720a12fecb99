"""SPEEstimator: saved after fit, reloaded safely, reproduces the callback's estimates; per-case scores."""

from __future__ import annotations

import csv
import json
import math
import pickle

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from spe_lightning import SPECallback, SPEConfig, SPEEstimator
from spe_lightning.cli import main as cli_main
from spe_lightning.data import SyntheticShapesDataModule, SyntheticShapesDataset
from spe_lightning.engine.percase import auroc, calibrate_flags, case_scores, shift, spearman
from spe_lightning.estimator import VERSION, IncompatibleEstimatorError
from spe_lightning.models import SegmentationModel
from spe_lightning.reverse import make_segmenter


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model trained 4 epochs with SPE on the phantom task: (callback, model, datamodule)."""
    pl.seed_everything(0)
    dm = SyntheticShapesDataModule(n_train=32, n_val=16, n_target=12, size=48, batch_size=4)
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    cb = SPECallback(
        segmenter="label_fusion", support_size=12, working_size=48, max_references=20, seed=0, verbose=False
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path_factory.mktemp("fit"),
    )
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    cb.ckpt_path = ckpt  # for the CLI test
    # the estimator as the callback would save it after fit (per-case flags calibrated on its calibration set)
    cb.estimator_path = SPEEstimator.from_callback(cb, model).save(ckpt.parent / "spe_estimator.pt")
    return cb, model, dm


def test_saved_estimator_reproduces_the_in_training_estimates(fitted, tmp_path):
    cb, model, dm = fitted
    path = cb.estimator_path
    # only tensors, numbers and strings: loads with weights_only=True
    state = torch.load(path, weights_only=True)
    assert state["format"] == "spe-estimator" and state["version"] == VERSION
    assert state["reference"]["images"].shape == (20, 1, 48, 48)
    assert state["reference"]["indices"] == cb.report["reference_indices"]
    est = SPEEstimator.load(path)
    for name in ("target", "target_noisy"):
        res = est.estimate(model, dm.targets[name], name=name)
        for metric, expected in cb.report["estimates"][name].items():
            got = res.estimates[metric]
            assert expected["value"] is not None
            for key in ("value", "lower", "upper", "pseudo"):
                assert got[key] == pytest.approx(expected[key], abs=1e-6), (name, metric, key)
        # the targets have masks: reported as the truth, like the callback does
        assert res.true["dice"] == pytest.approx(cb.report["true"][name]["dice"], abs=1e-6)
        assert len(res.cases) == len(dm.targets[name])
    # a tensor of images works as well as a dataset (same numbers, no masks -> no truth)
    images = torch.stack([dm.targets["target"][i]["image"] for i in range(len(dm.targets["target"]))])
    res = est.estimate(model, images, per_case=False)
    assert res.estimates["dice"]["value"] == pytest.approx(cb.report["estimates"]["target"]["dice"]["value"], abs=1e-6)
    assert res.true is None and res.cases == []


def test_per_case_calibration_is_stored_and_applied(fitted, tmp_path):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    cases = est.cases
    assert cases is not None and cases["n_cases"] == len(dm.val_set)
    assert len(cases["calibration_scores"]) == len(dm.val_set)
    assert all(0.0 <= s <= 1.0 for s in cases["calibration_scores"])
    assert cases["threshold"] is not None and cases["mapping"]["kind"] == "isotonic"
    res = est.estimate(model, dm.targets["target_noisy"], name="target_noisy")
    for row in res.cases:
        assert row["flagged"] == (row["quality"] < cases["threshold"])
        assert 0.0 <= row["estimated_dice_lower"] <= row["estimated_dice"] <= row["estimated_dice_upper"] <= 1.0
        assert row["real_dice"] is not None  # phantom targets have masks


def test_incompatible_or_unsafe_files_are_refused(fitted, tmp_path):
    cb, model, _ = fitted
    state = SPEEstimator.from_callback(cb).state()
    state["version"] = VERSION + 1
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(IncompatibleEstimatorError, match=f"version {VERSION + 1}.*reads versions 1 and {VERSION}"):
        SPEEstimator.load(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(IncompatibleEstimatorError, match="not an SPE estimator"):
        SPEEstimator.load(tmp_path / "other.pt")

    class Payload:  # what a malicious file would carry: unpickling it would call os.system
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "spe-estimator", "version": VERSION, "x": Payload()}, f, protocol=2)
    with pytest.raises(IncompatibleEstimatorError, match="refused to load"):
        SPEEstimator.load(tmp_path / "evil.pt")


def test_save_caps_the_embedded_references_and_can_leave_them_out(fitted, tmp_path):
    cb, model, dm = fitted
    est = SPEEstimator.from_callback(cb)
    with pytest.raises(ValueError, match="max_reference_mb"):
        est.save(tmp_path / "big.pt", max_reference_mb=0.1)
    # embedding a view of a larger tensor stores only the view (not its whole storage)
    big = torch.cat([est.reference_images] * 10)
    est.set_reference(big[:20], torch.cat([est.reference_masks] * 10)[:20])
    size = est.save(tmp_path / "view.pt").stat().st_size
    assert size < 1.2 * 20 * 48 * 48 * 5 + 50_000
    slim = SPEEstimator.load(est.save(tmp_path / "slim.pt", embed_reference=False))
    assert slim.reference_images is None
    with pytest.raises(ValueError, match="no reference images"):
        slim.estimate(model, dm.targets["target"])
    slim.set_reference_dataset(dm.train_set)  # the stored indices pick the same references again
    res = slim.estimate(model, dm.targets["target"], per_case=False)
    assert res.estimates["dice"]["value"] == pytest.approx(cb.report["estimates"]["target"]["dice"]["value"], abs=1e-6)


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return -torch.nn.functional.max_pool2d(-m.float(), 2 * r + 1, 1, r) > 0.5


def test_per_case_score_orders_a_bad_prediction_below_a_good_one():
    refs = SyntheticShapesDataset(24, 48, seed=5)
    ref_img = torch.stack([refs[i]["image"] for i in range(24)])
    ref_mask = torch.stack([refs[i]["label"] for i in range(24)]).bool()
    ref_mask[-1] = False  # a reference without foreground is never used as a query
    cases = SyntheticShapesDataset(6, 48, seed=6)
    img = torch.stack([cases[i]["image"] for i in range(6)])
    truth = torch.stack([cases[i]["label"] for i in range(6)]).bool()
    eroded = _erode(truth, 2)  # much too small (about a third of the area)
    dilated = torch.nn.functional.max_pool2d(truth.float(), 7, 1, 3) > 0.5  # much too large
    shifted = torch.roll(truth, shifts=(14, 14), dims=(-2, -1))  # right shape, off the organ
    seg = make_segmenter("label_fusion")
    good = case_scores(seg, img, truth, ref_img, ref_mask)
    assert good.score.min() > 0.85 and (good.best_reference < 23).all() and (good.best_reference >= 0).all()
    for bad in (eroded, dilated):  # shape errors: caught with the default centroid alignment
        assert (case_scores(seg, img, bad, ref_img, ref_mask).score < good.score - 0.15).all()
    # a pure translation error needs align=False (alignment registers it away)
    good_u = case_scores(seg, img, truth, ref_img, ref_mask, align=False)
    shifted_u = case_scores(seg, img, shifted, ref_img, ref_mask, align=False)
    assert (shifted_u.score < 0.1).all() and good_u.score.min() > 0.7
    # an empty prediction has no support: it gets the calibrated empty score
    empty = case_scores(seg, img, torch.zeros_like(truth), ref_img, ref_mask, empty_score=0.25)
    assert empty.empty.all() and torch.equal(empty.score, torch.full((6,), 0.25, dtype=torch.float64))


def test_shift_translates_without_wrapping():
    x = torch.arange(16.0).view(1, 4, 4)
    assert torch.equal(shift(x, 1, -2)[0], torch.tensor([[0, 0, 0, 0], [2, 3, 0, 0], [6, 7, 0, 0], [10, 11, 0, 0.0]]))
    assert torch.equal(shift(x, 0, 0), x) and not shift(x, 4, 0).any()


def test_flag_calibration_and_rank_statistics():
    scores = [0.9, 0.8, 0.85, 0.3, 0.2, 0.4, math.nan]
    dice = [0.95, 0.9, 0.8, 0.5, 0.1, 0.6, 0.0]
    empty = [False] * 6 + [True]
    flags = calibrate_flags(scores, dice, empty, dice_cut=0.7)
    assert flags["method"] == "youden" and 0.4 < flags["threshold"] < 0.8
    assert flags["empty_score"] == 0.0 and flags["n_below_cut"] == 4
    assert flags["auroc"] == 1.0 and flags["spearman"] > 0.9
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0  # higher score: more likely positive
    assert auroc([0.5, 0.5], [True, False]) == 0.5 and auroc([1.0], [True]) is None
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    few = calibrate_flags([0.9, 0.8, 0.7, 0.95], [0.9, 0.9, 0.85, 0.95])  # no bad case: quantile fallback
    assert few["method"].startswith("quantile") and few["threshold"] == pytest.approx(0.73)


def test_cli_estimate_on_a_folder_writes_json_csv_and_html(fitted, tmp_path, capsys):
    cb, model, dm = fitted
    est_path = cb.estimator_path
    folder = tmp_path / "new_images"
    folder.mkdir()
    target = dm.targets["target"]
    for i in range(len(target)):  # 8-bit PNGs, as a user would have them
        img = (target[i]["image"][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(img).save(folder / f"case_{i:02d}.png")
    out = tmp_path / "out"
    cli_main(
        [
            "estimate",
            "--ckpt",
            str(cb.ckpt_path),
            "--estimator",
            str(est_path),
            "--images",
            str(folder),
            "--out",
            str(out),
            "--gallery",
            "4",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "| dice |" in printed and "cases flagged" in printed

    summary = json.loads((out / "estimate.json").read_text())
    assert summary["n_images"] == len(target) and set(summary["estimates"]) == set(cb.report["metrics"])
    dice = summary["estimates"]["dice"]
    assert dice["lower"] <= dice["value"] <= dice["upper"]
    # 8-bit rounding of the images moves the estimate only a little
    assert dice["value"] == pytest.approx(cb.report["estimates"]["target"]["dice"]["value"], abs=0.05)
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["id"] for r in rows] == [f"case_{i:02d}" for i in range(len(target))]
    assert all(r["flagged"] in ("True", "False") and 0.0 <= float(r["quality"]) <= 1.0 for r in rows)
    assert summary["cases"]["n_flagged"] == sum(r["flagged"] == "True" for r in rows)
    with pytest.raises(SystemExit) as exit_:  # a wrong file: a one-line error, status 2
        cli_main(["estimate", "--ckpt", str(cb.ckpt_path), "--estimator", str(cb.ckpt_path), "--images", str(folder),
                  "--out", str(out)])  # fmt: skip
    assert exit_.value.code == 2 and "not an SPE estimator" in capsys.readouterr().err
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # estimates, quality histogram, gallery: self-contained
    assert "src='http" not in page and "Per-case quality" in page


def test_cli_reads_nifti_volumes_as_slices_and_16_bit_pngs(tmp_path):
    from spe_lightning.estimate_cli import read_image_folder

    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(0).normal(100.0, 20.0, (40, 30, 3)).astype(np.float32)  # H, W, slices
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(tmp_path / "x.png")
    ids, images, sources = read_image_folder(tmp_path, image_size=32)
    assert ids == ["ct#z000", "ct#z001", "ct#z002", "x"] and sources[0] == "ct.nii.gz"
    assert all(t.shape == (1, 32, 32) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0 for t in images)
    assert float(images[-1].max()) > 0.9  # 16-bit values are scaled, not clipped at 255


def test_estimates_from_pseudo_match_fit_and_estimate_paper_and_anchored(tmp_path):
    """The saved G (and the anchored intervals) give the callback's numbers after a save/load."""
    from spe_lightning.engine.records import fit_and_estimate

    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        x = 0.3 + 0.1 * i + 0.01 * rng.normal()
        records.append(
            {
                "pseudo": {"calibration": {"dice": x}, "site": {"dice": x - 0.08}},
                "real": {"calibration": {"dice": 0.2 + 0.12 * i + 0.02 * rng.normal()}},
            }
        )
    pairs = [
        {"name": f"shift{j}", "d_pseudo": {"dice": -0.02 * j}, "d_real": {"dice": -0.03 * j + 0.005 * rng.normal()}}
        for j in range(8)
    ]
    for anchored, anchor_pairs in ((False, None), (True, None), (True, pairs)):
        rep = fit_and_estimate(records, ["site"], ["dice"], "linear", 0.9, anchored=anchored, pairs=anchor_pairs)
        anchor = None
        if anchored:
            anchor = {
                "intervals": rep["anchor_intervals"],
                "calibration_pseudo": records[-1]["pseudo"]["calibration"],
                "calibration_real": records[-1]["real"]["calibration"],
            }
        config = SPEConfig(metrics=("dice",), support_size=8, min_foreground=4, working_size=32, anchored=anchored)
        est = SPEEstimator(config, {"name": "label_fusion"}, rep["mapping"], anchor=anchor)
        est = SPEEstimator.load(est.save(tmp_path / "e.pt", embed_reference=False))
        got = est.estimate_from_pseudo(records[-1]["pseudo"]["site"])["dice"]
        want = rep["estimates"]["site"]["dice"]
        assert got["method"] == want["method"] == ("anchored" if anchored else "paper")
        assert (rep.get("anchor_intervals", {}).get("dice") is not None) == (anchor_pairs is not None)
        for key in ("value", "lower", "upper"):
            assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_cli_estimate_escapes_ids_keeps_links_and_relative_paths(fitted, tmp_path, monkeypatch, capsys):
    cb, _, dm = fitted
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    target = dm.targets["target"]
    names = ["=HYPERLINK(1)", "<img src=x onerror=alert(1)>", "plain"]
    for i, name in enumerate(names):
        Image.fromarray((target[i]["image"][0].numpy() * 255).round().astype("uint8")).save(folder / f"{name}.png")
    victim = tmp_path / "victim.csv"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cases.csv").symlink_to(victim)
    ckpt = tmp_path / "model.ckpt"
    ckpt.symlink_to(cb.ckpt_path)
    est = tmp_path / "est.pt"
    est.symlink_to(cb.estimator_path)
    args = ["estimate", "--ckpt", "model.ckpt", "--estimator", "est.pt", "--images", "imgs", "--out", "out"]
    cli_main([*args, "--no-progress"])
    assert victim.read_text() == "keep me" and not (tmp_path / "out" / "cases.csv").is_symlink()
    rows = list(csv.reader((tmp_path / "out" / "cases.csv").open()))
    assert sorted(r[0] for r in rows[1:]) == sorted(["'=HYPERLINK(1)", names[1], "plain"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "onerror=alert(1)>" not in page  # ids reach the page only escaped (flagged-case table)
    summary = json.loads((tmp_path / "out" / "estimate.json").read_text())
    # relative to the folder holding estimate.json
    assert (summary["images"], summary["checkpoint"], summary["estimator"]) == ("../imgs", "../model.ckpt", "../est.pt")
    assert str(tmp_path) not in (tmp_path / "out" / "estimate.json").read_text()
    capsys.readouterr()


def test_empty_predictions_are_flagged_when_no_calibrated_score_exists():
    from spe_lightning.engine.percase import CaseScores, case_rows

    scores = CaseScores(
        score=torch.tensor([0.9, 0.2, float("nan")], dtype=torch.float64),
        best_reference=torch.tensor([0, 1, -1]),
        pseudo_dice=torch.zeros(3, 1, dtype=torch.float64),
        neighbours=torch.zeros(3, 1, dtype=torch.int64),
        empty=torch.tensor([False, False, True]),
    )
    masks = [torch.ones(1, 4, 4, dtype=torch.bool)] * 2 + [torch.zeros(1, 4, 4, dtype=torch.bool)]
    rows = case_rows(scores, {"threshold": 0.5, "mapping": None}, masks, torch.ones(3), ["a", "b", "c"])
    assert [r["flagged"] for r in rows] == [False, True, True] and rows[2]["empty_prediction"]
    assert all(r["flagged"] is None for r in case_rows(scores, None, masks, torch.ones(3), ["a", "b", "c"]))
