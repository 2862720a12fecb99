"""Turning user dataset items and batches into tensors SPE can use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor

__all__ = [
    "split_item",
    "as_tensor",
    "to_gray01",
    "resize_images",
    "resize_masks",
    "resize_labels",
    "binarize_mask",
    "encode_labels",
]

#: torch.quantile refuses inputs above 2**24 elements; larger images are subsampled for the percentiles
_QUANTILE_MAX = 2**20


def as_tensor(x: Any) -> Tensor:
    """A tensor view of ``x`` (tensor, NumPy array, MONAI MetaTensor, PIL image or nested list)."""
    if isinstance(x, Tensor):
        return x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> plain tensor
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(np.asarray(x))


def require_map_dataset(name: str, dataset: Any) -> None:
    """Raise a ``TypeError`` that names the set and the fix unless ``dataset`` is map-style (``len()`` and ``[i]``):
    a ``DataLoader`` (its batches are not items) or an iterable-style dataset is refused."""
    if isinstance(dataset, torch.utils.data.DataLoader):
        raise TypeError(
            f"SPE {name}: got a DataLoader; pass its dataset instead ({name}=loader.dataset). SPE reads the items "
            "one at a time and batches them itself."
        )
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"SPE {name}: needs a map-style dataset (len() and dataset[i]), got {type(dataset).__name__}; "
            "collect the items of an iterable dataset or generator in a list first."
        )


def require_targets(target: Any) -> None:
    """Raise a ``TypeError`` for a list or tuple of datasets given where one dataset or a dict of them is expected."""
    if isinstance(target, (list, tuple)) and target:
        first = target[0]
        if isinstance(first, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
            raise TypeError(
                f"SPE target: got a {type(target).__name__} of {len(target)} datasets; give one dataset or a dict "
                "that names each, e.g. target={'site_a': ds_a, 'site_b': ds_b}."
            )


@overload
def split_item(
    item: Any, image_key: str = ..., label_key: str = ..., *, require_label: Literal[True]
) -> tuple[Tensor, Tensor]: ...
@overload
def split_item(
    item: Any, image_key: str = ..., label_key: str = ..., *, require_label: bool = ...
) -> tuple[Tensor, Tensor | None]: ...
def split_item(
    item: Any, image_key: str = "image", label_key: str = "label", *, require_label: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``(image, mask or None)`` from a dataset item: a tuple/list ``(image, mask, ...)``, a dict, or an image alone.

    A dict item without ``label_key`` gives no mask (unlabelled data), or, with ``require_label=True``,
    a ``KeyError`` that names the keys the item has.
    """
    if isinstance(item, Mapping):
        keys = sorted(map(str, item))
        if image_key not in item:
            raise KeyError(f"Dataset item has no key {image_key!r} (its keys: {keys}); set image_key= to one of them.")
        if require_label and item.get(label_key) is None:
            what = "no key" if label_key not in item else "None under the key"
            raise KeyError(
                f"Dataset item has {what} {label_key!r} (its keys: {keys}); set label_key= to the key of its masks."
            )
        label = item.get(label_key)
        return as_tensor(item[image_key]), None if label is None else as_tensor(label)
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and not isinstance(item, Tensor):
        if len(item) == 0:
            raise ValueError("Dataset item is an empty sequence; expected (image, mask).")
        mask = item[1] if len(item) > 1 else None
        if require_label and mask is None:
            raise ValueError(f"Dataset item is a sequence of {len(item)} without a mask; expected (image, mask).")
        return as_tensor(item[0]), None if mask is None else as_tensor(mask)
    if require_label:
        raise ValueError(f"Dataset item is a lone {type(item).__name__} without a mask; expected (image, mask).")
    return as_tensor(item), None


def to_gray01(images: Tensor) -> Tensor:
    """``[N,C,H,W]`` (any dtype, any range) -> float ``[N,1,H,W]`` in [0, 1] per image.

    Channels are averaged; each image is rescaled between its 1st and 99th intensity
    percentiles, so uint8, [0, 1] and z-scored inputs all look alike to the reverse step.
    """
    x = images.float()
    if x.ndim != 4:
        raise ValueError(f"Expected images [N,C,H,W], got shape {tuple(images.shape)}.")
    x = x.mean(dim=1, keepdim=True)
    flat = x.flatten(1)
    if flat.shape[1] > _QUANTILE_MAX:  # a strided sample is plenty for two percentiles
        flat = flat[:, :: -(-flat.shape[1] // _QUANTILE_MAX)]
    flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    q = torch.quantile(flat, torch.tensor([0.01, 0.99], device=x.device), dim=1)  # [2,N]
    lo, hi = q[0].view(-1, 1, 1, 1), q[1].view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return torch.nan_to_num(x.clamp_(0.0, 1.0), nan=0.0)


#: how :func:`resize_images` interpolates, by name (why each caller picks its own is said where it calls)
RESIZE_METHODS = ("bilinear", "antialiased", "area", "area_down")


def resize_images(images: Tensor, size: int | tuple[int, int], method: str = "bilinear") -> Tensor:
    """Resize ``[N,C,H,W]`` float images to ``size`` (an int: a square); the one resize of the package.

    ``method``: ``"bilinear"`` (antialiased when shrinking), ``"antialiased"`` (bilinear, antialiased
    always), ``"area"`` (box average, both directions), ``"area_down"`` (box average when shrinking,
    bilinear when enlarging). Images already at ``size`` come back unchanged (same tensor).
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == hw:
        return images
    if method == "bilinear":
        shrink = images.shape[-2] > hw[0] or images.shape[-1] > hw[1]
        return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    if method == "antialiased":
        return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)
    if method == "area":
        return F.interpolate(images, size=hw, mode="area")
    if method == "area_down":
        mode = "area" if images.shape[-1] >= hw[1] else "bilinear"
        return F.interpolate(images, size=hw, mode=mode)
    raise ValueError(f"resize_images: method must be one of {RESIZE_METHODS}, got {method!r}.")


def resize_masks(masks: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour resize of ``[N,1,H,W]`` binary masks; returns bool."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.bool()
    return F.interpolate(masks.float(), size=size, mode="nearest").bool()


def resize_labels(labels: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour resize of ``[N,1,*S]`` label maps (2D or 3D), dtype kept."""
    if tuple(labels.shape[2:]) == tuple(size):
        return labels
    out = F.interpolate(labels.float(), size=tuple(size), mode="nearest")
    return out.bool() if labels.dtype == torch.bool else out.to(labels.dtype)


def binarize_mask(mask: Tensor, foreground: int | None = None) -> Tensor:
    """Boolean foreground from a mask of class indices, 0/1, 0/255, bool or floats in [0, 1].

    ``foreground`` picks one class index; ``None`` means "any non-zero class". Integer-valued
    masks (also when stored as floats, as MONAI loads them) are class indices, except 0/255
    masks (foreground: 255); soft float masks are thresholded at 0.5 (at 127.5 when above 1).
    """
    m = as_tensor(mask)
    if m.dtype == torch.bool:
        return m
    if foreground is not None:
        return m == foreground
    if not m.numel():
        return m != 0
    if m.is_floating_point() and not bool((m == m.round()).all()):  # soft (or NaN-holding) mask
        mx = float(torch.nan_to_num(m, nan=0.0).max())
        return m > (127.5 if mx > 1.0 + 1e-6 else 0.5)
    if int(m.max()) == 255 and not bool(((m != 0) & (m != 255)).any()):
        return m > 127
    return m != 0


def encode_labels(mask: Tensor, classes: Sequence[int]) -> Tensor:
    """uint8 label map of a class-index mask: 0 for background, ``j + 1`` where it holds ``classes[j]``.

    Float masks are rounded first (class maps stored as floats); other values count as background.
    """
    if len(classes) > 254:
        raise ValueError(f"At most 254 classes are supported, got {len(classes)}.")
    m = as_tensor(mask)
    if m.dtype == torch.bool:
        m = m.to(torch.uint8)
    elif m.is_floating_point():
        m = torch.nan_to_num(m, nan=-1.0).round()
    out = torch.zeros(m.shape, dtype=torch.uint8)
    for j, c in enumerate(classes):
        out[m == c] = j + 1
    return out
