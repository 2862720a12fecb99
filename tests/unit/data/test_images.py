"""Image files and folders (data/images.py, read by the estimate CLI): links, limits, NIfTI, bit depth
(docs/security.md)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from _inputs import png
from PIL import Image

from spe_lightning.cli import main as cli_main
from spe_lightning.cli.estimate import read_image_folder
from spe_lightning.data.images import ImageLimits, list_image_files, read_image, read_nifti_slices


def test_symlinks_leaving_the_folder_are_refused(tmp_path):
    secret = png(tmp_path / "outside" / "secret.png", 200)
    folder = tmp_path / "images"
    png(folder / "a.png")
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
        png(folder / f"{i}.png", size=(20, 30))
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
    png(tmp_path / "g.png", 51)
    assert read_image(tmp_path / "g.png").max() == pytest.approx(0.2)  # 8-bit: / 255
