"""Image files and folders (data/images.py, read by the estimate CLI): links, limits, NIfTI, bit depth
(docs/security.md)."""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import pytest
import torch
from _inputs import png
from PIL import Image

from spe_lightning.cli import main as cli_main
from spe_lightning.cli.estimate import read_image_folder
from spe_lightning.cli.estimate.inputs import read_masks
from spe_lightning.cli.estimate.labels import label_inputs
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


def _broken_images(folder, n_cut: int, n_text: int) -> list[str]:
    """``n_cut`` truncated PNGs and ``n_text`` text files named .png (in a sub-folder) beside one good image:
    the broken files' names under ``folder``."""
    whole = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8))
    png(folder / "ok.png")
    whole.save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    names = []
    for i in range(n_cut):
        (folder / f"cut_{i:02d}.png").write_bytes(data[: len(data) // 2])
        names.append(f"cut_{i:02d}.png")
    (folder / "sub").mkdir(exist_ok=True)
    for i in range(n_text):
        (folder / "sub" / f"text_{i:02d}.png").write_text("not an image")
        names.append(f"sub/text_{i:02d}.png")
    return names


def test_every_unreadable_image_of_a_folder_is_named_in_one_error(tmp_path):
    """A folder with several broken files stops once, naming each with its reason and the fix (not one per run)."""
    folder = tmp_path / "images"
    names = _broken_images(folder, 2, 1)
    with pytest.raises(ValueError) as err:
        read_image_folder(folder, 8)
    msg = str(err.value)
    assert msg.startswith(f"--images {folder}: cannot read 3 files: ") and "ok.png" not in msg
    assert all(f"{n} (" in msg for n in names), msg
    assert "sub/text_00.png (UnidentifiedImageError: cannot identify image file 'sub/text_00.png')" in msg
    assert msg.endswith("Remove or replace those files (re-save them as PNG/TIFF), or move them out of the folder.")
    names = _broken_images(folder, 6, 6)  # 12: the first 10 named, the others counted
    with pytest.raises(ValueError, match="cannot read 12 files: ") as err:
        read_image_folder(folder, 8)
    assert [n for n in names if f"{n} (" in str(err.value)] == names[:10] and "; and 2 more." in str(err.value)


def test_one_unreadable_image_keeps_its_message(tmp_path):
    folder = tmp_path / "images"
    _broken_images(folder, 0, 1)
    with pytest.raises(ValueError, match=r"^cannot read the image sub/text_00\.png: UnidentifiedImageError: .*"
                       r"\(remove it from the folder, or re-save it as PNG/TIFF\)$"):  # fmt: skip
        read_image_folder(folder, 8)


def test_broken_dicom_files_are_named_with_the_other_unreadable_images(tmp_path):
    pytest.importorskip("pydicom")
    folder = tmp_path / "images"
    _broken_images(folder, 1, 0)
    (folder / "bad.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match="cannot read 2 files: bad.dcm \\(InvalidDicomError: .*; cut_00.png \\("):
        read_image_folder(folder, 8)
    (folder / "cut_00.png").unlink()  # alone: the DICOM reader's own message, as before
    with pytest.raises(ValueError, match="^cannot read the DICOM file bad.dcm: InvalidDicomError"):
        read_image_folder(folder, 8)


def test_every_unreadable_mask_is_named_in_one_error(tmp_path):
    """--masks (and --labelled-masks, same loop): unreadable masks are listed together, not a raw PIL error."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    sources = [png(images / f"{c}.png").name for c in "abc"]
    png(masks / "a.png", 1)
    (masks / "b.png").write_text("not an image")
    (masks / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG cut after its signature
    with pytest.raises(ValueError) as err:
        read_masks(masks, sources, 8, None, images=images)
    msg = str(err.value)
    assert msg.startswith(f"--masks {masks}: cannot read 2 files: b.png (UnidentifiedImageError: ")
    assert "a.png" not in msg and "; c.png (" in msg and msg.endswith("Replace each with a readable PNG/TIFF mask.")
    a = argparse.Namespace(labelled_masks=str(masks), label_design=None, dataset=None, images=str(images), resize="pad")
    est = types.SimpleNamespace(config=types.SimpleNamespace(classes=None, foreground_class=None))
    with pytest.raises(ValueError, match=r"^--labelled-masks .*: cannot read 2 files: b\.png \(.*; c\.png \("):
        label_inputs(a, sources, 8, est)
