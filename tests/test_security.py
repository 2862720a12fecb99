"""What input files can make `spe-lightning estimate` do (docs/security.md), and the CLI's error handling."""

from __future__ import annotations

import csv
import io
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from spe_lightning.cli import main as cli_main
from spe_lightning.cli.estimate import cases_csv, csv_cell, load_model, read_image_folder, write_file
from spe_lightning.config import SPEConfig
from spe_lightning.data.adapters import split_item
from spe_lightning.data.images import ImageLimits, list_image_files, read_image, read_nifti_slices
from spe_lightning.estimator import FittedSPE, IncompatibleEstimatorError, SPEEstimator

EVIL = """
import os
from pathlib import Path

import lightning.pytorch as pl

Path(os.environ["SPE_TEST_MARKER"]).write_text("side effect ran")


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
"""


def _ckpt(path: Path, class_path: str) -> Path:
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"_class_path": class_path},
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module with an import-time side effect on sys.path and a checkpoint naming its class."""
    mods = tmp_path / "mods"
    mods.mkdir()
    name = f"spe_evil_{tmp_path.name.replace('-', '_')}"
    (mods / f"{name}.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(mods))
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("SPE_TEST_MARKER", str(marker))
    yield _ckpt(tmp_path / "evil.ckpt", f"{name}.Model"), marker, name
    sys.modules.pop(name, None)


def test_checkpoint_class_path_is_not_imported(evil, capsys, tmp_path):
    ckpt, marker, name = evil
    est = _estimator({"name": "label_fusion"})
    est_path = tmp_path / "est.pt"
    torch.save(est.state(embed_reference=False), est_path)
    with pytest.raises(ValueError, match="--trust-checkpoint-class") as err:
        load_model(ckpt)
    assert f"--model {name}.Model" in str(err.value)
    assert not marker.exists() and name not in sys.modules
    with pytest.raises(SystemExit) as exit_:  # the same through the command: one line, status 2
        cli_main(["estimate", "--ckpt", str(ckpt), "--estimator", str(est_path), "--images", ".", "--out", "o"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and not marker.exists() and name not in sys.modules
    assert len(err.splitlines()) == 1 and "--trust-checkpoint-class" in err


def test_checkpoint_class_path_is_used_only_on_opt_in(evil):
    ckpt, marker, name = evil
    model = load_model(ckpt, trust_checkpoint_class=True)
    assert type(model).__module__ == name and marker.exists()  # the user asked for it


def test_lightning_guard_is_kept_for_foreign_classes(tmp_path):
    ckpt = _ckpt(tmp_path / "boring.ckpt", "lightning.pytorch.demos.boring_classes.BoringModel")
    with pytest.raises(ValueError, match="trust-checkpoint-class"):
        load_model(ckpt)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": types.SimpleNamespace(a=1)}}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_model(path, "spe_lightning.models.SegmentationModel")


# ----------------------------------------------------------------------------------- image folders
def _png(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_symlinks_leaving_the_folder_are_refused(tmp_path):
    secret = _png(tmp_path / "outside" / "secret.png", 200)
    folder = tmp_path / "images"
    _png(folder / "a.png")
    (folder / "b.png").symlink_to(secret)
    with pytest.raises(ValueError, match=r"outside the folder: b\.png"):
        read_image_folder(folder, 8)
    (folder / "b.png").unlink()
    (folder / "sub").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the folder: sub"):
        read_image_folder(folder, 8)
    (folder / "sub").unlink()
    (folder / "c.png").symlink_to(folder / "a.png")  # inside -> inside: read
    ids, _, sources = read_image_folder(folder, 8)
    assert ids == ["a", "c"] and sources == ["a.png", "c.png"]


def test_image_limits(tmp_path):
    folder = tmp_path / "images"
    for i in range(3):
        _png(folder / f"{i}.png", size=(20, 30))
    assert len(list_image_files(folder, ImageLimits())) == 3
    with pytest.raises(ValueError, match="3 image files, above the limit of 2 .*--max-images"):
        read_image_folder(folder, 8, limits=ImageLimits(max_files=2))
    with pytest.raises(ValueError, match="per file .*--max-file-mb"):
        read_image_folder(folder, 8, limits=ImageLimits(max_file_mb=1e-5))
    with pytest.raises(ValueError, match="20x30 = 600 voxels, above the limit of 599 .*--max-voxels"):
        read_image_folder(folder, 8, limits=ImageLimits(max_voxels=599))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["estimate", "--ckpt", "c", "--estimator", "e", "--images", ".", "--out", "o", "--gallery", "100000"])
    assert exit_.value.code == 2


def test_nifti_errors_name_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"not a nifti file")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # not installed
    with pytest.raises(RuntimeError, match="needs nibabel"):
        read_nifti_slices(path)

    def load(p):
        raise OSError("Not a gzipped file (b'no')")

    monkeypatch.setitem(sys.modules, "nibabel", types.SimpleNamespace(load=load))
    with pytest.raises(ValueError, match="cannot read the NIfTI file ct.nii.gz: OSError: Not a gzipped"):
        read_nifti_slices(path)


def test_one_reader_for_training_and_estimate_16_bit(tmp_path):
    from spe_lightning.data.folder import FolderSegmentationDataset

    arr = (np.arange(30 * 40).reshape(30, 40) * 3 + 500).astype(np.uint16)  # 12-bit-like values
    img = tmp_path / "ds" / "train" / "images" / "x.png"
    img.parent.mkdir(parents=True)
    Image.fromarray(arr).save(img)
    train = FolderSegmentationDataset(tmp_path / "ds", "train", image_size=32)[0]["image"]
    _, images, _ = read_image_folder(img.parent, 32)
    assert torch.equal(train, images[0])
    x = read_image(img)
    assert x.min() == 0.0 and x.max() == 1.0  # percentile-scaled, not / 65535 nor clipped at 255
    _png(tmp_path / "g.png", 51)
    assert read_image(tmp_path / "g.png").max() == pytest.approx(0.2)  # 8-bit: / 255


# ----------------------------------------------------------------------------------- outputs
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


# ----------------------------------------------------------------------------------- estimator files
def _estimator(spec: dict) -> SPEEstimator:
    cfg = SPEConfig(metrics=("dice",), support_size=4, min_foreground=1, working_size=32)
    return SPEEstimator(FittedSPE(cfg, spec))


def test_estimator_size_is_checked_on_load(tmp_path):
    path = tmp_path / "big.pt"
    path.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(IncompatibleEstimatorError, match="above max_mb=1"):
        SPEEstimator.load(path, max_mb=1)


def test_estimator_files_never_download_without_the_flag(tmp_path, monkeypatch):
    from spe_lightning.reverse import UniverSeg

    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        return UniverSeg().state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("SPE_UNIVERSEG_WEIGHTS", raising=False)
    monkeypatch.delenv("SPE_NO_DOWNLOAD", raising=False)
    monkeypatch.setenv("SPE_DOWNLOAD", "1")
    path = tmp_path / "est.pt"
    spec = {"name": "universeg", "weights": "/elsewhere/universeg.pt", "chunk_size": 4, "download": True}
    torch.save(_estimator(spec).state(embed_reference=False), path)
    with pytest.raises(FileNotFoundError, match="download=False"):
        SPEEstimator.load(path).segmenter  # noqa: B018
    assert calls == []
    assert SPEEstimator.load(path, allow_download=True).segmenter.name == "universeg"
    assert len(calls) == 1


# ----------------------------------------------------------------------------------- CLI
def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("fit", "estimate", "benchmark"):
        assert cmd in text.split("usage:")[0]


def test_fit_takes_any_lightning_module_and_datamodule(tmp_path, monkeypatch):
    (tmp_path / "spe_user_mod.py").write_text(
        "import lightning.pytorch as pl, torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "class TinySeg(pl.LightningModule):\n"
        "    def __init__(self, channels: int = 2):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Conv2d(1, 1, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n"
        "    def training_step(self, batch, i):\n"
        "        x, y = batch\n"
        "        return torch.nn.functional.binary_cross_entropy_with_logits(self(x), y)\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), 0.1)\n"
        "class PlainData(pl.LightningDataModule):\n"
        "    def train_dataloader(self):\n"
        "        x = torch.rand(4, 1, 8, 8)\n"
        "        return DataLoader(TensorDataset(x, (x > 0.5).float()), batch_size=2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli_main(
        [
            "fit",
            "--model=spe_user_mod.TinySeg",
            "--data=spe_user_mod.PlainData",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )


def test_a_misspelt_value_is_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(
            [
                "fit",
                "--model=spe_lightning.models.SegmentationModel",
                "--data=spe_lightning.data.SyntheticShapesDataModule",
                "--trainer.callbacks+=spe_lightning.SPECallback",
                "--trainer.callbacks.config.segmenter=univerzeg",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        line for line in err.splitlines() if "unknown segmenter 'univerzeg'" in line
    ]


def test_wrong_label_key_names_the_item_keys():
    item = {"img": torch.zeros(1, 4, 4), "seg": torch.zeros(1, 4, 4)}
    with pytest.raises(KeyError, match=r"no key 'image' \(its keys: \['img', 'seg'\]\)"):
        split_item(item)
    with pytest.raises(KeyError, match=r"no key 'label' \(its keys: \['img', 'seg'\]\); set label_key="):
        split_item(item, "img", require_label=True)
    assert split_item(item, "img")[1] is None  # unlabelled data stays allowed
    assert split_item(item, "img", "seg", require_label=True)[1] is not None


def test_benchmark_input_errors_are_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["benchmark", "paper", "--data", str(tmp_path / "missing"), "--epochs", "1", "--accelerator", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spe-lightning")]
    assert exit_.value.code == 2 and len(err) == 1 and "No image folder" in err[0]


def test_report_html_escapes_ids_and_paths(tmp_path):
    from spe_lightning.reporting.html import write_html_report

    bad = "<img src=x onerror=alert(1)>"
    cases = [{"id": bad, "quality": 0.1, "flagged": True, "estimated_dice": 0.2, "foreground_pixels": 5}]
    page = write_html_report(
        tmp_path / "r.html", {"n_images": 1}, cases, calibration={"threshold": 0.5}, meta={"images": bad}
    ).read_text()
    assert bad not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 2
