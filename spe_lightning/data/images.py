"""Reading image files: the one reader used for training (:class:`~spe_lightning.data.FolderSegmentationDataset`)
and for ``spe-lightning estimate``, plus the safe listing of an image folder.

Intensity rule (the default everywhere, ``intensity="auto"``): 8-bit images (and RGB/palette images,
converted to grayscale) are divided by 255; 16-bit, 32-bit integer and float images and NIfTI volumes are
scaled between their 0.5th and 99.5th intensity percentiles and clipped to [0, 1] (dividing a 12-bit scan
stored in 16 bits by 65535 would leave it nearly black). :class:`ReadOptions` names the other choices
(``spe-lightning estimate --resize/--intensity/--channels``, the folder datasets' arguments), for a model
trained on images read another way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.data.adapters import resize_images, resize_masks

__all__ = [
    "RESIZE_MODES",
    "INTENSITY_MODES",
    "CHANNEL_MODES",
    "ReadOptions",
    "read_image_array",
    "fit_to_size",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ImageLimits",
    "UnreadableImageError",
    "is_image_file",
    "is_nifti",
    "is_dicom",
    "read_dicom_array",
    "image_shape",
    "DICOM_SUFFIXES",
    "read_image",
    "read_mask",
    "mask_foreground",
    "MASK_SUFFIXES",
    "find_mask_file",
    "check_mask_shape",
    "read_nifti_slices",
    "scale_percentile",
    "square_resize",
    "list_image_files",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: PIL modes read as 8-bit (divided by 255); every other mode is scaled between percentiles
_EIGHT_BIT = ("1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "PA", "RGBa")


@dataclass(frozen=True)
class ImageLimits:
    """Caps on what an image folder may make us read (``spe-lightning estimate --max-*`` raise them).

    Args:
        max_files: image files in the folder.
        max_file_mb: bytes of one file (compressed size for ``.nii.gz``).
        max_voxels: pixels of one 2D image, voxels of one NIfTI volume.
    """

    max_files: int = 10_000
    max_file_mb: float = 512.0
    max_voxels: int = 2**27  # 134 M: a 512^3 volume, a 11585^2 image


#: ``pad``: zero-pad to a square, then resize (default); ``plain``: stretch to the square; ``none``: keep the size
RESIZE_MODES = ("pad", "plain", "none")
#: ``auto``: 8-bit / 255, other types between their 0.5th and 99.5th percentiles (default); ``divide``: by the
#: type's maximum (255, 65535; floats as they are); ``percentile``: every image between its percentiles;
#: ``none``: the stored values
INTENSITY_MODES = ("auto", "divide", "percentile", "none")
#: ``gray``: one channel (colour averaged; default); ``rgb``: three channels (gray images repeated)
CHANNEL_MODES = ("gray", "rgb")


@dataclass(frozen=True)
class ReadOptions:
    """How image files become model inputs; the defaults are the reader's long-standing behaviour.

    Args:
        resize: one of :data:`RESIZE_MODES`.
        intensity: one of :data:`INTENSITY_MODES`.
        channels: one of :data:`CHANNEL_MODES`.
    """

    resize: str = "pad"
    intensity: str = "auto"
    channels: str = "gray"

    def __post_init__(self) -> None:
        for name, allowed in (("resize", RESIZE_MODES), ("intensity", INTENSITY_MODES), ("channels", CHANNEL_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")


class UnreadableImageError(ValueError):
    """A DICOM or NIfTI file that cannot be decoded (not that format, truncated, corrupt): unlike a limit or an
    unsupported layout, the file itself is broken. ``reason``: the short why, for a list of such files."""

    def __init__(self, path: Path, kind: str, reason: str) -> None:
        super().__init__(f"cannot read the {kind} file {path.name}: {reason}")
        self.reason = reason


def is_nifti(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a DICOM file (``.dcm``, ``.dicom``)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or is_nifti(path) or is_dicom(path)


def read_dicom_array(path: str | os.PathLike, limits: ImageLimits | None = None) -> tuple[np.ndarray, bool]:
    """A single-frame DICOM image as float32 ``[H,W]`` (or ``[H,W,3]``) in its modality's units (the stored values
    through ``RescaleSlope``/``RescaleIntercept``: Hounsfield units for CT), and whether it is MONOCHROME1 (low
    values displayed bright). Needs ``pydicom`` (``pip install 'spe-lightning[dicom]'``); a multi-frame file is
    refused (read its frames with a dataset of your own)."""
    path = Path(path)
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(f"{path.name}: reading DICOM needs pydicom: pip install 'spe-lightning[dicom]'.") from err
    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ValueError(
                f"a multi-frame DICOM ({frames} frames); read its frames with a dataset of your own (--dataset in "
                "spe-lightning estimate)"
            )
        _check_voxels(path, (int(ds.Rows), int(ds.Columns)), limits)
        arr = np.asarray(ds.pixel_array, dtype=np.float32)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err
    except AttributeError as err:  # no Rows/Columns/pixel data: not an image, or cut short
        raise UnreadableImageError(path, "DICOM", "no image in it (truncated or corrupt?)") from err
    except Exception as err:  # not DICOM, truncated, a compression without its decoder...
        raise UnreadableImageError(path, "DICOM", f"{type(err).__name__}: {err}") from err
    arr = arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    return arr, str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of a 2D image file (DICOM: its header only)."""
    if is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def scale_percentile(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` scaled between its 0.5th and 99.5th percentiles, clipped to [0, 1]."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(x, [0.5, 99.5]) if x.size else (0.0, 1.0)
    return np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def _check_voxels(path: Path, shape: tuple[int, ...], limits: ImageLimits | None) -> None:
    n = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if limits is not None and n > limits.max_voxels:
        raise ValueError(
            f"{path.name}: {'x'.join(map(str, shape))} = {n} voxels, above the limit of {limits.max_voxels} "
            "(raise it with --max-voxels)."
        )


def read_image(path: str | os.PathLike, limits: ImageLimits | None = None) -> np.ndarray:
    """A 2D image file as float32 ``[H,W]`` grayscale in [0, 1] (the module's intensity rule)."""
    return read_image_array(path, limits)[0]


def _channels(arr: np.ndarray, channels: str) -> np.ndarray:
    """``[H,W]`` or ``[H,W,C]`` -> ``[C,H,W]`` with 1 (gray: colour averaged) or 3 (rgb) channels."""
    x = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    if channels == "gray":
        return x if x.shape[0] == 1 else x.mean(axis=0, keepdims=True)
    return np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]


def read_image_array(
    path: str | os.PathLike, limits: ImageLimits | None = None, intensity: str = "auto", channels: str = "gray"
) -> np.ndarray:
    """A 2D image file as float32 ``[C,H,W]`` (``C`` 1 or 3 by ``channels``), scaled by ``intensity``
    (:data:`INTENSITY_MODES`; ``"auto"``, the default, is the module's intensity rule)."""
    from PIL import Image

    ReadOptions(intensity=intensity, channels=channels)  # validates
    path = Path(path)
    if is_dicom(path):  # the modality's units: kept ("none", "divide"), or scaled like 16-bit images
        arr, monochrome1 = read_dicom_array(path, limits)
        x = _channels(arr, channels)
        if intensity in ("none", "divide"):
            return np.ascontiguousarray(x, dtype=np.float32)
        return scale_percentile(-x if monochrome1 else x)  # scaled as displayed: MONOCHROME1 shows low values bright
    cap = Image.MAX_IMAGE_PIXELS  # PIL's own decompression-bomb cap: raised with ours, never lowered
    try:
        if limits is not None and cap is not None and limits.max_voxels > cap:
            Image.MAX_IMAGE_PIXELS = limits.max_voxels
        with Image.open(path) as im:
            _check_voxels(path, (im.size[1], im.size[0]), limits)
            eight_bit = im.mode in _EIGHT_BIT
            top = 255.0 if eight_bit else 65535.0 if im.mode.startswith("I;16") else None
            if eight_bit:
                arr = np.asarray(im.convert("RGB" if channels == "rgb" else "L"), dtype=np.float32)
            else:
                arr = np.asarray(im, dtype=np.float32)
                if im.mode == "I" and arr.size and float(arr.max()) <= 65535 and float(arr.min()) >= 0:
                    top = 65535.0  # 16-bit PNGs open as 32-bit integers
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path.name}: {err} (raise the limit with --max-voxels)") from err
    finally:
        Image.MAX_IMAGE_PIXELS = cap
    x = _channels(arr, channels)
    if intensity == "none" or (intensity == "divide" and top is None):
        return np.ascontiguousarray(x, dtype=np.float32)
    if intensity == "divide" or (intensity == "auto" and eight_bit):
        return np.ascontiguousarray(x / np.float32(top), dtype=np.float32)
    return scale_percentile(x)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as an integer array (class indices; colour-coded masks: any channel non-zero)."""
    from PIL import Image

    with Image.open(path) as im:
        m = np.asarray(im).astype(np.int64)
    return m.max(axis=-1) if m.ndim == 3 else m


#: the suffixes a mask file may have beside its image's name
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def find_mask_file(root: Path, source: str) -> Path | None:
    """The mask of image ``source`` (a path relative to its folder) under ``root``: the same relative name, or the
    same stem with a mask suffix (never a symbolic link); None when there is none."""
    found = [root / source, *(root / Path(source).with_suffix(x) for x in MASK_SUFFIXES)]
    return next((f for f in found if f.is_file() and not f.is_symlink()), None)


def mask_foreground(mask: np.ndarray, foreground: int | None) -> np.ndarray:
    """The boolean foreground of a class-index mask: ``== foreground`` (None: any non-zero class). An 8-bit binary
    mask (only 0 and 255) counts 255 as class 1."""
    if mask.size and mask.max() == 255 and np.isin(mask, (0, 255)).all():
        mask = (mask == 255).astype(mask.dtype)
    return (mask != 0) if foreground is None else (mask == foreground)


def check_mask_shape(
    mask: np.ndarray, image: str | os.PathLike, what: str, shape: tuple[int, int] | None = None
) -> None:
    """Raise a ``ValueError`` naming both files when a 2D mask's height x width differs from its image's (``shape``
    when the image is already read, else read from the file ``image``): a resized, cropped or transposed mask would
    score, or teach, the wrong pixels."""
    h, w = shape if shape is not None else image_shape(image)
    if tuple(mask.shape[:2]) != (h, w):
        raise ValueError(
            f"{what}: the mask is {mask.shape[0]}x{mask.shape[1]} (height x width) and its image {image} is {h}x{w}; "
            "give masks at their images' size."
        )


def read_nifti_slices(
    path: str | os.PathLike, limits: ImageLimits | None = None, intensity: str = "auto"
) -> list[np.ndarray]:
    """The slices along the last axis of a NIfTI volume (first channel of 4D volumes), scaled as one volume
    between its percentiles (``intensity`` ``"none"`` or ``"divide"``: the stored values)."""
    path = Path(path)
    try:
        import nibabel
    except ImportError as err:
        raise RuntimeError(
            f"{path.name} is a NIfTI volume; reading it needs nibabel: pip install 'spe-lightning[nifti]'."
        ) from err
    try:
        img = nibabel.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        _check_voxels(path, shape, limits)
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except ValueError as err:
        if "voxels, above the limit" in str(err):
            raise
        raise UnreadableImageError(path, "NIfTI", f"{type(err).__name__}: {err}") from err
    except Exception as err:  # nibabel's ImageFileError, gzip/EOF errors of a truncated file...
        raise UnreadableImageError(path, "NIfTI", f"{type(err).__name__}: {err}") from err
    if vol.ndim == 4:  # channel-last volumes: first channel
        vol = vol[..., 0]
    if vol.ndim not in (2, 3):
        raise ValueError(f"{path.name}: a NIfTI volume of shape {vol.shape}; expected 2D or 3D.")
    if intensity in ("auto", "percentile"):
        vol = scale_percentile(vol)
    return [vol] if vol.ndim == 2 else [vol[..., z] for z in range(vol.shape[-1])]


def square_resize(x: Tensor, size: int | None, mode: str = "bilinear", keep_aspect: bool = True) -> Tensor:
    """``[C,H,W]`` -> zero-padded to a square (when ``keep_aspect``), resized to ``size`` x ``size``.

    ``mode="bilinear"`` for images (antialiased when shrinking), ``"nearest"`` for masks (returns float 0/1).
    """
    h, w = x.shape[-2:]
    if keep_aspect and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
    if size is None:
        return x.float() if mode == "nearest" else x
    if mode == "nearest":
        return resize_masks(x[None], (size, size))[0].float()
    return resize_images(x[None], (size, size))[0]


def fit_to_size(x: Tensor, size: int | None, resize: str = "pad", mode: str = "bilinear") -> Tensor:
    """``[C,H,W]`` to ``size`` x ``size`` by :data:`RESIZE_MODES` (``"none"``: unchanged; masks ``"nearest"``)."""
    if resize == "none":
        return x.float() if mode == "nearest" else x
    return square_resize(x, size, mode, keep_aspect=resize == "pad")


def image_tensor(
    path: str | os.PathLike, size: int | None, limits: ImageLimits | None = None, options: ReadOptions | None = None
) -> Tensor:
    """An image file as float ``[C,S,S]``: read by :func:`read_image_array` and sized by :func:`fit_to_size`
    (default :class:`ReadOptions`: gray, the intensity rule, padded to a square and resized)."""
    o = options or ReadOptions()
    x = torch.from_numpy(read_image_array(path, limits, o.intensity, o.channels))
    return fit_to_size(x, size, o.resize)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def list_image_files(folder: str | os.PathLike, limits: ImageLimits | None = None) -> list[Path]:
    """The image files (PNG/JPEG/TIFF/BMP/DICOM/NIfTI) under ``folder``, recursively, sorted.

    Only regular files inside ``folder`` are read: a symbolic link (to a file or a folder) whose
    target lies outside ``folder`` is refused with an error naming it; links to folders are not
    descended (a link inside the folder to a file inside it is read once, as the link's name).
    Raises ``ValueError`` above ``limits.max_files`` files or a file above ``limits.max_file_mb``.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "a file" if root.is_file() else "no such folder"
        raise FileNotFoundError(f"--images {root}: {what}; give the folder that holds the images (read recursively).")
    real_root = root.resolve()
    files: list[Path] = []
    outside: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in list(dirnames):
            p = d / name
            if p.is_symlink() and not _inside(p.resolve(), real_root):
                outside.append(str(p.relative_to(root)))
        for name in filenames:
            p = d / name
            if not is_image_file(p):
                continue
            if p.is_symlink():
                if not _inside(p.resolve(), real_root):
                    outside.append(str(p.relative_to(root)))
                    continue
                if not p.resolve().is_file():
                    continue
            elif not p.is_file():  # sockets, FIFOs, devices
                continue
            files.append(p)
    if outside:
        shown = ", ".join(sorted(outside)[:5]) + (f" (+{len(outside) - 5} more)" if len(outside) > 5 else "")
        raise ValueError(
            f"--images {root}: refusing symbolic links that point outside the folder: {shown}. "
            "Copy those files into the folder instead."
        )
    files.sort()
    if limits is not None:
        if len(files) > limits.max_files:
            raise ValueError(
                f"--images {root}: {len(files)} image files, above the limit of {limits.max_files} "
                "(raise it with --max-images)."
            )
        cap = limits.max_file_mb * 2**20
        for p in files:
            size = p.stat().st_size
            if size > cap:
                raise ValueError(
                    f"{p.relative_to(root)}: {size / 2**20:.1f} MB, above the limit of {limits.max_file_mb:g} MB "
                    "per file (raise it with --max-file-mb)."
                )
    return files
