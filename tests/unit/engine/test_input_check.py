"""`spe-lightning estimate` reads images the way the model was trained, and says when it does not (issue 26 item 0).

The real mismatch of the issue, in small: landscape images (72x96) a model was trained on as plain
(stretched) resizes; the CLI's default reading pads them to a square. The check must warn with the fix
(--resize plain), --strict must stop, and the matching reading must pass without a warning.
"""

from __future__ import annotations

import json
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spe_lightning import SPECallback, SPEEstimator
from spe_lightning.cli import main as cli_main
from spe_lightning.cli.estimate import STRICT_EXIT
from spe_lightning.data.folder import FolderSegmentationDataModule
from spe_lightning.data.images import ReadOptions, image_tensor, read_image_array
from spe_lightning.data.synthetic import make_phantom
from spe_lightning.engine.input_check import border_fraction, compare_inputs, input_summary
from spe_lightning.models import SegmentationModel

H, W = 72, 96  # landscape files, as the dermoscopy images


def _write(root, split, n, seed):
    g = torch.Generator().manual_seed(seed)
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, m = make_phantom(g, 64)
        img = F.interpolate(img[None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        m = F.interpolate(m[None], size=(H, W), mode="nearest")[0, 0]
        png = (img.clamp(0, 1).numpy() * 255).round().astype("uint8")
        Image.fromarray(png).save(root / split / "images" / f"c{i:03d}.png")
        Image.fromarray(m.numpy().astype("uint8")).save(root / split / "masks" / f"c{i:03d}.png")


@pytest.fixture(scope="module")
def plain_trained(tmp_path_factory):
    """A model trained on plain resizes (keep_aspect=False) of landscape phantoms, its estimator: (root, ckpt, est)."""
    root = tmp_path_factory.mktemp("plain")
    _write(root, "train", 48, 1)
    _write(root, "val", 16, 2)
    _write(root, "target", 12, 3)
    pl.seed_everything(0)
    dm = FolderSegmentationDataModule(
        str(root), 1, 48, batch_size=4, val_split="val", target_splits=["target"], augment=False, keep_aspect=False
    )
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    # Lightning merges both hparams for the loggers and refuses a key with two values: the reading options must
    # not reuse the model's names (a "channels" option did)
    assert not set(dm.hparams) & set(model.hparams)
    cb = SPECallback(
        segmenter="label_fusion", support_size=12, working_size=48, max_references=16, seed=0, verbose=False,
        every_n_epochs=2, log_dir=str(root / "run"),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=6, accelerator="cpu", devices=1, logger=False, callbacks=[cb], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(root / "run"),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(root / "model.ckpt")
    return root, root / "model.ckpt", root / "run" / "spe_estimator.pt"


def _estimate(root, ckpt, est, out, *extra, images="target/images"):
    args = ["estimate", "--ckpt", str(ckpt), "--estimator", str(est), "--images", str(root / images)]
    return cli_main([*args, "--out", str(out), "--no-progress", "--gallery", "2", *extra])


def test_estimator_stores_what_the_calibration_images_looked_like(plain_trained):
    _, _, path = plain_trained
    est = SPEEstimator.load(path)
    s = est.info["input_summary"]
    assert s["n"] == 16 and s["channels"] == [1] and s["shapes"] == [[1, 48, 48][1:]]
    assert len(s["mean"]) == len(s["foreground"]) == len(s["confidence"]) == 16
    assert max(s["border"]) == 0.0  # stretched, never padded


def test_padding_the_plain_trained_images_warns_with_the_fix(plain_trained, tmp_path, capsys):
    root, ckpt, est = plain_trained
    _estimate(root, ckpt, est, tmp_path / "pad", "--masks", str(root / "target" / "masks"))
    err = capsys.readouterr().err
    assert "warning:" in err and "padded to a square" in err and "--resize plain" in err
    summary = json.loads((tmp_path / "pad" / "estimate.json").read_text())
    check = summary["input_check"]
    assert check["verdict"] == "mismatch" and check["reading"]["resize"] == "pad"
    border = next(c for c in check["checks"] if c["statistic"] == "border")
    assert (
        border["verdict"] == "higher" and 0.18 <= border["new_median"] <= 1 - H / W
    )  # bars, less the rows blurred by the resize
    assert "input check</b>: mismatch" in (tmp_path / "pad" / "report.html").read_text()


def test_the_matching_reading_passes_without_a_warning(plain_trained, tmp_path, capsys):
    root, ckpt, est = plain_trained
    _estimate(root, ckpt, est, tmp_path / "plain", "--resize", "plain", "--strict")
    err = capsys.readouterr().err
    assert "warning" not in err
    check = json.loads((tmp_path / "plain" / "estimate.json").read_text())["input_check"]
    assert check["verdict"] == "ok" and check["warnings"] == [] and check["not_compared"] == []
    assert {c["statistic"] for c in check["checks"]} >= {"mean", "p99", "border", "foreground", "confidence"}


def test_strict_stops_before_estimating_and_records_the_check(plain_trained, tmp_path, capsys):
    root, ckpt, est = plain_trained
    with pytest.raises(SystemExit) as exit_:
        _estimate(root, ckpt, est, tmp_path / "strict", "--strict")
    assert exit_.value.code == STRICT_EXIT
    err = capsys.readouterr().err
    assert "stopped (--strict)" in err and "--resize plain" in err
    summary = json.loads((tmp_path / "strict" / "estimate.json").read_text())
    assert summary["estimates"] is None and summary["input_check"]["verdict"] == "mismatch"
    assert set(summary["spe_lightning"]) == {"running", "estimator_written_by"}
    assert not (tmp_path / "strict" / "cases.csv").exists()


def test_unscaled_intensities_are_named(plain_trained, tmp_path, capsys):
    root, ckpt, est = plain_trained
    _estimate(root, ckpt, est, tmp_path / "raw", "--resize", "plain", "--intensity", "none")
    err = capsys.readouterr().err
    assert "intensities differ" in err and "--intensity auto or divide" in err
    check = json.loads((tmp_path / "raw" / "estimate.json").read_text())["input_check"]
    assert next(c for c in check["checks"] if c["statistic"] == "p99")["verdict"] == "higher"


def test_an_old_estimator_file_loads_and_the_check_says_what_it_could_not_compare(plain_trained, tmp_path, capsys):
    root, ckpt, path = plain_trained
    state = torch.load(path, weights_only=True)
    del state["info"]["input_summary"], state["spe_lightning"]  # as files written before these existed
    old = tmp_path / "old.pt"
    torch.save(state, old)
    _estimate(root, ckpt, old, tmp_path / "out")
    err = capsys.readouterr().err
    assert "input check: not compared: intensity mean" in err
    check = json.loads((tmp_path / "out" / "estimate.json").read_text())["input_check"]
    assert any(
        "intensity mean" in n and "an older spe-lightning" in n and "re-export" in n for n in check["not_compared"]
    )
    # the stored references still show that the model never saw padding
    (border,) = check["checks"]
    assert border["against"] == "stored references" and border["verdict"] == "higher"
    assert check["verdict"] == "mismatch" and "--resize plain" in err


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's module ``mydata`` next to the data: a dataset reading plain resizes, and a transform."""
    code = textwrap.dedent(
        """
        from pathlib import Path

        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image


        class PlainResized:
            def __init__(self, folder):
                self.files = sorted(Path(folder).glob("*.png"))

            def __len__(self):
                return len(self.files)

            def __getitem__(self, i):
                x = torch.from_numpy(np.asarray(Image.open(self.files[i]), dtype=np.float32) / 255.0)
                x = F.interpolate(x[None, None], size=(48, 48), mode="bilinear", antialias=True)[0]
                return {"image": x, "id": "user_" + self.files[i].stem}


        def invert(x):
            return 1.0 - x
        """
    )
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "mydata.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    yield "mydata"
    sys.modules.pop("mydata", None)


def test_user_dataset_reads_the_images_as_in_training(plain_trained, tmp_path, capsys, user_module):
    root, ckpt, est = plain_trained
    _estimate(root, ckpt, est, tmp_path / "ds", "--dataset", f"{user_module}.PlainResized", "--strict")
    assert "warning" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "ds" / "estimate.json").read_text())
    assert summary["input_check"]["verdict"] == "ok" and summary["input_check"]["reading"] == {
        "dataset": "mydata.PlainResized"
    }
    rows = (tmp_path / "ds" / "cases.csv").read_text().splitlines()
    assert rows[1].startswith("user_c000,user_c000,")


def test_transform_is_applied_and_an_inverted_image_is_caught(plain_trained, tmp_path, capsys, user_module):
    root, ckpt, est = plain_trained
    _estimate(root, ckpt, est, tmp_path / "tf", "--resize", "plain", "--transform", f"{user_module}.invert")
    check = json.loads((tmp_path / "tf" / "estimate.json").read_text())["input_check"]
    assert check["reading"]["transform"] == "mydata.invert"
    mean = next(c for c in check["checks"] if c["statistic"] == "mean")
    assert mean["verdict"] == "higher" and check["verdict"] == "mismatch"  # 1 - x: a bright background
    assert "intensities differ" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--dataset", "--transform", "--model"])
def test_a_class_path_that_cannot_be_imported_names_pythonpath(plain_trained, tmp_path, capsys, monkeypatch, flag):
    root, ckpt, est = plain_trained
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # as under the console script
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notonpath.py").write_text("X = 1\n")
    with pytest.raises(SystemExit) as exit_:
        _estimate(root, ckpt, est, tmp_path / "o", flag, "notonpath.Thing")
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"{flag} notonpath.Thing: 'notonpath' is in the current folder" in err and "PYTHONPATH=." in err


def test_fit_with_a_model_that_cannot_be_imported_names_pythonpath(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--model", "mymodule.MyNet", "--data", "spe_lightning.data.SyntheticShapesDataModule"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "--model mymodule.MyNet: no module named 'mymodule'" in err and "PYTHONPATH=." in err
    assert "pip install -e ." in err


# ---------------------------------------------------------------- units
def test_border_fraction_measures_padding_bars():
    g = torch.Generator().manual_seed(0)
    img, _ = make_phantom(g, 64)
    assert border_fraction(img) == 0.0
    padded = F.pad(img[:, 8:56], (0, 0, 8, 8))  # 48 rows of content in 64
    assert border_fraction(padded) == pytest.approx(16 / 64)
    assert border_fraction(torch.zeros(1, 8, 8)) == 1.0


def test_reader_options_keep_the_default_and_change_each_choice(tmp_path):
    arr = (np.arange(40 * 60).reshape(40, 60) % 251).astype("uint8")
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(np.stack([arr, arr // 2, arr // 3], -1)).save(tmp_path / "rgb.png")
    default = image_tensor(tmp_path / "a.png", 32)
    assert default.shape == (1, 32, 32) and float(default[0, 0, 0]) == 0.0  # padded: a zero bar on top
    plain = image_tensor(tmp_path / "a.png", 32, options=ReadOptions(resize="plain"))
    assert border_fraction(plain) == 0.0 and not torch.equal(plain, default)
    assert image_tensor(tmp_path / "a.png", 32, options=ReadOptions(resize="none")).shape == (1, 40, 60)
    raw = read_image_array(tmp_path / "a.png", intensity="none")
    assert float(raw.max()) == 250.0 and np.allclose(read_image_array(tmp_path / "a.png"), raw / 255.0)
    assert read_image_array(tmp_path / "rgb.png", channels="rgb").shape == (3, 40, 60)
    assert read_image_array(tmp_path / "rgb.png").shape == (1, 40, 60)
    pct = read_image_array(tmp_path / "a.png", intensity="percentile")
    assert float(pct.max()) == 1.0 and float(pct.min()) == 0.0
    with pytest.raises(ValueError, match="resize must be one of"):
        ReadOptions(resize="square")


def test_compare_inputs_accepts_the_same_population():
    g = torch.Generator().manual_seed(1)
    images = [make_phantom(g, 48)[0] for _ in range(24)]
    masks = [torch.rand(1, 48, 48, generator=g) > 0.8 for _ in images]
    conf = torch.full((24,), 0.9)
    cal, new = input_summary(images[:12], masks[:12], conf[:12]), input_summary(images[12:], masks[12:], conf[12:])
    check = compare_inputs(cal, new)
    assert check["verdict"] == "ok" and check["warnings"] == []
    scaled = input_summary([x * 255 for x in images[12:]], masks[12:], conf[12:])
    assert compare_inputs(cal, scaled)["verdict"] == "mismatch"


def test_a_lower_spread_is_caught_where_an_additive_margin_could_never_call_it_low():
    g = torch.Generator().manual_seed(0)
    z = [(lambda x: (x - x.mean()) / x.std())(torch.rand(1, 32, 32, generator=g)) for _ in range(12)]  # z-scored
    raw = [0.5 + 0.08 * torch.randn(1, 32, 32, generator=g) for _ in range(12)]  # not normalised: std 0.08
    masks, conf = [torch.zeros(1, 32, 32, dtype=torch.bool)] * 12, torch.full((12,), 0.9)
    stored = input_summary(z, masks, conf)
    out = compare_inputs(stored, input_summary(raw, masks, conf))
    std = next(c for c in out["checks"] if c["statistic"] == "std")
    assert std["verdict"] == "lower" and std["accepted"][0] > 0.4 and out["verdict"] == "mismatch"
    assert any("std" in w for w in out["warnings"])
    same = compare_inputs(stored, input_summary([1.3 * x for x in z], masks, conf))  # 1.3x the spread: accepted
    assert next(c for c in same["checks"] if c["statistic"] == "std")["verdict"] == "ok"
