"""The folder layout reader: labelled and unlabelled splits, missing masks refused, 0/255 masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spe_lightning.data.folder import FolderSegmentationDataModule, FolderSegmentationDataset


def _write(root, split, n, masks="masks", mask_value=1, skip=()):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((24, 32), 40 + 5 * i, np.uint8)
        img[6:18, 8:20] = 200
        Image.fromarray(img).save(root / split / "images" / f"c{i}.png")
        if masks and i not in skip:
            (root / split / masks).mkdir(exist_ok=True)
            m = np.zeros((24, 32), np.uint8)
            m[6:18, 8:20] = mask_value
            Image.fromarray(m).save(root / split / masks / f"c{i}.png")


def test_a_split_without_masks_is_unlabelled_and_never_poses_empty_masks_as_truth(tmp_path):
    _write(tmp_path, "site_c", 3, masks=None)
    ds = FolderSegmentationDataset(tmp_path, "site_c", image_size=16)
    assert not ds.labelled and "label" not in ds[0] and ds[0]["image"].shape == (1, 16, 16)
    with pytest.raises(FileNotFoundError, match=r"No mask folder .*site_c/masks; the 'site_c' split needs masks"):
        FolderSegmentationDataset(tmp_path, "site_c", image_size=16, require_masks=True)


def test_missing_mask_files_and_a_misnamed_mask_folder_are_refused_naming_the_fix(tmp_path):
    _write(tmp_path, "train", 4, skip=(1, 3))
    with pytest.raises(FileNotFoundError, match=r"no mask for 2 of 4 images, e.g. \['c1.png', 'c3.png'\]"):
        FolderSegmentationDataset(tmp_path, "train", image_size=16)
    _write(tmp_path / "other", "train", 2, masks="labels")
    dm = FolderSegmentationDataModule(str(tmp_path / "other"), val_split="train", image_size=16)
    with pytest.raises(FileNotFoundError, match=r"found labels/: rename the masks' folder to masks/"):
        dm.setup()


def test_binary_0_255_masks_read_as_class_1(tmp_path):
    _write(tmp_path / "a", "train", 2, mask_value=255)
    _write(tmp_path / "b", "train", 2, mask_value=1)
    a = FolderSegmentationDataset(tmp_path / "a", "train", class_index=1, image_size=16)[0]["label"]
    b = FolderSegmentationDataset(tmp_path / "b", "train", class_index=1, image_size=16)[0]["label"]
    assert a.sum() > 0 and (a == b).all()


def test_the_estimate_clis_masks_match_by_stem_and_must_have_their_images_size(tmp_path):
    from spe_lightning.cli.estimate.inputs import read_masks

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "t_masks").mkdir()
    img = np.zeros((24, 32), np.uint16)
    Image.fromarray(img).save(tmp_path / "images" / "a.tif")
    m = np.zeros((24, 32), np.uint8)
    m[4:10, 5:20] = 255
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")  # another suffix, 0/255
    Image.fromarray(m.T.copy()).save(tmp_path / "t_masks" / "a.png")  # transposed
    (out,) = read_masks(tmp_path / "masks", ["a.tif"], None, 1, "none", tmp_path / "images")
    assert out.shape == (1, 24, 32) and int(out.sum()) == 6 * 15  # found by stem; 255 read as class 1
    with pytest.raises(ValueError, match=r"the mask is 32x24 \(height x width\) and its image .*a.tif is 24x32"):
        read_masks(tmp_path / "t_masks", ["a.tif"], None, 1, "none", tmp_path / "images")


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path):
    _write(tmp_path, "train", 1)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "train" / "masks" / "c0.png")
    with pytest.raises(ValueError, match=r"c0.png: the mask is 40x48 \(height x width\) and its image c0.png is 24x32"):
        FolderSegmentationDataset(tmp_path, "train", image_size=16)[0]
