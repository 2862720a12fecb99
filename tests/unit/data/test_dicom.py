"""DICOM images (data/images.py): modality units, MONOCHROME1, the folder readers, multi-frame refused."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # in the dev extras: CI runs these

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from spe_lightning.data.images import image_shape, is_image_file, list_image_files, read_image_array  # noqa: E402


def _dicom(path, pixels: np.ndarray, slope=1.0, intercept=-1024.0, photometric="MONOCHROME2", frames=1):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_ct_slice_reads_in_hounsfield_units_or_scaled_and_monochrome1_is_inverted(tmp_path):
    raw = np.zeros((20, 30), np.uint16) + 1024  # 0 HU (water)
    raw[5:15, 10:20] = 2024  # +1000 HU (bone)
    path = _dicom(tmp_path / "ct.dcm", raw)
    assert is_image_file(path) and image_shape(path) == (20, 30)
    hu = read_image_array(path, intensity="none")
    assert hu.shape == (1, 20, 30) and hu.min() == 0.0 and hu.max() == 1000.0
    scaled = read_image_array(path)  # auto: between the 0.5th and 99.5th percentiles, as 16-bit images
    assert scaled.min() == 0.0 and scaled.max() == 1.0 and scaled[0, 10, 15] == 1.0
    cr = _dicom(tmp_path / "cr.dcm", raw, photometric="MONOCHROME1")
    inverted = read_image_array(cr)
    assert inverted[0, 10, 15] == 0.0 and inverted[0, 0, 0] == 1.0  # scaled as displayed: low values bright
    assert np.array_equal(read_image_array(cr, intensity="none"), hu)  # the units kept as stored
    assert list_image_files(tmp_path) == [tmp_path / "cr.dcm", tmp_path / "ct.dcm"]


def test_a_multi_frame_or_broken_dicom_is_refused_naming_the_file(tmp_path):
    multi = _dicom(tmp_path / "cine.dcm", np.zeros((3, 8, 8), np.uint16), frames=3)
    with pytest.raises(ValueError, match="cine.dcm: a multi-frame DICOM \\(3 frames\\); read its frames"):
        read_image_array(multi)
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match="cannot read the DICOM file bad.dcm"):
        read_image_array(tmp_path / "bad.dcm")
    whole = (tmp_path / "cine.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) // 3])  # cut short before the pixel data
    with pytest.raises(ValueError, match="cannot read the DICOM file cut.dcm"):
        read_image_array(tmp_path / "cut.dcm")


def test_the_folder_dataset_reads_dicom_images_with_png_masks(tmp_path):
    from PIL import Image

    from spe_lightning.data.folder import FolderSegmentationDataset

    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    raw = np.full((16, 16), 1024, np.uint16)
    raw[4:12, 4:12] = 1500
    _dicom(tmp_path / "train" / "images" / "a.dcm", raw)
    Image.fromarray(((raw > 1024) * 1).astype(np.uint8)).save(tmp_path / "train" / "masks" / "a.png")
    item = FolderSegmentationDataset(tmp_path, "train", image_size=16)[0]
    assert item["image"].shape == (1, 16, 16) and int(item["label"].sum()) == 64 and item["id"] == "a"
