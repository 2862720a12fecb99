"""`spe-lightning estimate`: a saved estimator applied to a folder of images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spe_lightning.cli import main as cli_main


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
    captured = capsys.readouterr()
    printed = captured.out
    assert "| dice |" in printed and "cases flagged" in printed
    assert "warning" not in captured.err  # the images as the model saw them in training: the input check passes

    summary = json.loads((out / "estimate.json").read_text())
    assert summary["n_images"] == len(target) and set(summary["estimates"]) == set(cb.report["metrics"])
    assert summary["input_check"]["verdict"] == "ok" and summary["input_check"]["n_calibration"] == 16
    dice = summary["estimates"]["dice"]
    assert dice["lower"] <= dice["value"] <= dice["upper"]
    # 8-bit rounding of the images moves the estimate only a little
    assert dice["value"] == pytest.approx(cb.report.estimates["target"]["dice"].value, abs=0.05)
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["id"] for r in rows] == [f"case_{i:02d}" for i in range(len(target))]
    assert all(r["flagged"] in ("True", "False") and 0.0 <= float(r["quality"]) <= 1.0 for r in rows)
    assert summary["cases"]["n_flagged"] == sum(r["flagged"] == "True" for r in rows)
    # the per-case intervals carry SPE's set uncertainty by default; --case-intervals cases_only keeps the map's own
    assert summary["case_agreement"]["case_intervals_widened"] is not None
    plain_out = tmp_path / "out_cases_only"
    args = ["estimate", "--ckpt", str(cb.ckpt_path), "--estimator", str(est_path), "--images", str(folder)]
    cli_main([*args, "--out", str(plain_out), "--case-intervals", "cases_only", "--no-progress"])
    plain = json.loads((plain_out / "estimate.json").read_text())
    assert plain["case_agreement"]["case_intervals_widened"] is None
    assert plain["estimates"]["dice"] == summary["estimates"]["dice"]
    plain_rows = list(csv.DictReader((plain_out / "cases.csv").open()))

    def width(r: dict) -> float:
        return float(r["estimated_dice_upper"]) - float(r["estimated_dice_lower"])

    assert [r["estimated_dice"] for r in plain_rows] == [r["estimated_dice"] for r in rows]
    assert all(width(w) >= width(p) - 1e-9 for w, p in zip(rows, plain_rows))
    assert sum(width(w) for w in rows) > sum(width(p) for p in plain_rows)
    with pytest.raises(SystemExit) as exit_:  # a wrong file: a one-line error, status 2
        cli_main(["estimate", "--ckpt", str(cb.ckpt_path), "--estimator", str(cb.ckpt_path), "--images", str(folder),
                  "--out", str(out)])  # fmt: skip
    assert exit_.value.code == 2 and "not an SPE estimator" in capsys.readouterr().err
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # estimates, quality histogram, gallery: self-contained
    assert "src='http" not in page and "Per-case quality" in page


def test_cli_reads_nifti_volumes_as_slices_and_16_bit_pngs(tmp_path):
    from spe_lightning.cli.estimate import read_image_folder

    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(0).normal(100.0, 20.0, (40, 30, 3)).astype(np.float32)  # H, W, slices
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(tmp_path / "x.png")
    ids, images, sources = read_image_folder(tmp_path, image_size=32)
    assert ids == ["ct#z000", "ct#z001", "ct#z002", "x"] and sources[0] == "ct.nii.gz"
    assert all(t.shape == (1, 32, 32) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0 for t in images)
    assert float(images[-1].max()) > 0.9  # 16-bit values are scaled, not clipped at 255


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


def test_first_run_errors_name_the_fix(fitted, tmp_path, capsys):
    """The mistakes of a first run (issue 26 item 6): each one line, exit status 2, with what to do instead."""
    cb, _, dm = fitted
    folder = tmp_path / "imgs"
    folder.mkdir()
    (tmp_path / "empty").mkdir()
    for i in range(4):
        img = (dm.targets["target"][i]["image"][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(img).save(folder / f"c{i}.png")
    broken = tmp_path / "broken"  # two unreadable images beside a good one: both named in one run
    broken.mkdir()
    (broken / "c0.png").write_bytes((folder / "c0.png").read_bytes())
    whole = (folder / "c1.png").read_bytes()
    (broken / "c1.png").write_bytes(whole[: len(whole) // 2])  # cut short in its pixel data
    (broken / "notes.png").write_text("not an image")
    (tmp_path / "sites.csv").write_text("id,scanner\n" + "".join(f"c{i},A\n" for i in range(4)))
    bad_masks = tmp_path / "bad_masks"
    bad_masks.mkdir()
    for i in range(4):
        (bad_masks / f"c{i}.png").write_text("not a mask")
    state = torch.load(cb.estimator_path, weights_only=True)
    state["config"]["classes"] = {"a": 1, "b": 2}  # an estimator of another (multi-class) model
    other = tmp_path / "other_estimator.pt"
    torch.save(state, other)
    ckpt, est = str(cb.ckpt_path), str(cb.estimator_path)
    cases = [
        (["--ckpt", "missing.ckpt", "--estimator", est, "--images", str(folder)], "enable_checkpointing=true"),
        (["--ckpt", ckpt, "--estimator", "missing.pt", "--images", str(folder)], "writes spe_estimator.pt next to"),
        (["--ckpt", est, "--estimator", est, "--images", str(folder)], "did you swap --ckpt and --estimator"),
        (["--ckpt", ckpt, "--estimator", ckpt, "--images", str(folder)], "did you swap the checkpoint and the"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(tmp_path / "empty")], "give the folder that holds"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(folder / "c0.png")], "a file; give the folder"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(folder), "--masks", str(tmp_path / "empty")],
         "each mask must have its image's relative file name"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(broken)],
         "cannot read 2 files: c1.png (OSError: image file is truncated"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(broken)],
         "notes.png (UnidentifiedImageError: cannot identify image file 'notes.png'). Remove or replace those files"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(folder), "--masks", str(bad_masks)],
         "cannot read 4 files: c0.png (UnidentifiedImageError"),
        (["--ckpt", ckpt, "--estimator", est, "--images", str(folder), "--chunk-by", "sites.csv:hospital"],
         f"{tmp_path / 'sites.csv'} has no column 'hospital'"),
        (["--ckpt", ckpt, "--estimator", str(other), "--images", str(folder)],
         "Are the model and the estimator from the same training run?"),
    ]  # fmt: skip
    for args, fix in cases:
        with pytest.raises(SystemExit) as exit_:
            cli_main(["estimate", *args, "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and err.startswith("spe-lightning estimate: error: ") and fix in err, (args, err)
