"""A dataset held in memory for SPE: model inputs, native-size masks and working-size gray images.

Items are 2D images ``[C,H,W]`` (or ``[H,W]``) or 3D volumes ``[C,D,H,W]``. The reverse step is 2D:
a 2D item is one *unit* (a working-size gray image); a volume contributes some of its axial slices
(``D`` axis) as units, see :func:`cache_dataset`. Masks are kept per item at the native size: bool
``[1,*S]`` for one foreground, or uint8 label maps ``[1,*S]`` (0 background, ``j + 1`` for the j-th
class of ``classes``) for several.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from spe_lightning.data.adapters import (
    binarize_mask,
    encode_labels,
    require_map_dataset,
    resize_images,
    split_item,
    to_gray01,
)

__all__ = ["CachedSet", "SLICE_MODES", "SizedDataset", "cache_dataset"]

SLICE_MODES = ("all", "foreground")


class SizedDataset(Protocol):
    """What SPE reads a dataset through: ``len(ds)`` and ``ds[i]`` (a map-style torch Dataset with ``__len__``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


@dataclass
class CachedSet:
    """A dataset held in memory: model inputs, optional masks and working-size gray images.

    ``gray`` has one row per *unit* (``units[r] = (item position, slice)``; slice -1 for 2D items).
    """

    name: str
    inputs: list[Tensor]  # model inputs [C,H,W] or [C,D,H,W] (dtype as the dataset returns them); may be empty
    masks: list[Tensor] | None  # per item: bool [1,*S], or uint8 labels [1,*S] with classes; None (unlabelled)
    gray: Tensor  # float [U,1,w,w] in [0,1]: what the reverse segmenter sees
    indices: list[int] = field(default_factory=list)  # positions in the source dataset
    units: list[tuple[int, int]] = field(default_factory=list)  # (item position, slice or -1) per gray row
    ids: list[str] = field(default_factory=list)  # dict items' own "id"s, when every item has one (else empty)

    def __post_init__(self) -> None:
        if not self.indices:
            self.indices = list(range(len(self.inputs) or self.gray.shape[0]))
        if not self.units:
            self.units = [(i, -1) for i in range(self.gray.shape[0])]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def volumetric(self) -> bool:
        """True when the items are 3D volumes (units are slices)."""
        return any(z >= 0 for _, z in self.units)

    def batches(self, batch_size: int, positions: Sequence[int] | None = None) -> Iterator[tuple[list[int], Tensor]]:
        """``(positions, stacked inputs)`` of consecutive items (of ``positions``) while their shapes agree."""
        pos = list(range(len(self.inputs))) if positions is None else list(positions)
        i = 0
        while i < len(pos):
            j = i + 1
            shape = self.inputs[pos[i]].shape
            while j < len(pos) and j - i < batch_size and self.inputs[pos[j]].shape == shape:
                j += 1
            yield pos[i:j], torch.stack([self.inputs[p] for p in pos[i:j]])
            i = j

    def unit_mask(self, row: int) -> Tensor:
        """The native-size mask ``[1,H,W]`` of gray row ``row`` (a slice of a volume's mask for 3D)."""
        assert self.masks is not None
        item, z = self.units[row]
        m = self.masks[item]
        return m if z < 0 else m[:, z]


def _as_item_image(image: Tensor, spatial_dims: int | None, where: str) -> Tensor:
    if image.ndim == 2 and spatial_dims in (None, 2):
        return image[None]
    if image.ndim == 3 and spatial_dims == 3:
        return image[None]
    if image.ndim == 3 or (image.ndim == 4 and spatial_dims in (None, 3)):
        return image
    want = "[C,D,H,W] or [D,H,W]" if spatial_dims == 3 else "[C,H,W], [H,W] or a volume [C,D,H,W]"
    raise ValueError(f"SPE {where}: image has shape {tuple(image.shape)}; expected {want}.")


def _as_item_mask(
    mask: Tensor, spatial: tuple[int, ...], foreground: int | None, classes: Sequence[int] | None, where: str
) -> Tensor:
    nd = len(spatial)
    if mask.ndim == nd:
        mask = mask[None]
    if mask.ndim != nd + 1 or tuple(mask.shape[1:]) != spatial:
        raise ValueError(
            f"SPE {where}: mask shape {tuple(mask.shape)} does not match the image's spatial size {spatial} "
            "(expected the same size, with at most one channel axis); resize them together in the dataset."
        )
    if mask.shape[0] > 1:  # one-hot / multi-channel: channel index = class index
        if classes is None and foreground is None:
            return binarize_mask(mask[1:]).any(0, keepdim=True)
        m = mask.float()
        mask = torch.where(m.amax(0) > 0.5, m.argmax(0), torch.zeros_like(m[0], dtype=torch.long))[None]
    if classes is not None:
        return encode_labels(mask, classes)
    return binarize_mask(mask, foreground)


def _slices(depth: int, mask: Tensor | None, mode: str, max_slices: int | None) -> list[int]:
    """Slice positions of a volume: all, or those whose mask has foreground; evenly thinned to ``max_slices``."""
    zs = list(range(depth))
    if mode == "foreground" and mask is not None:
        zs = [z for z in zs if bool(mask[:, z].any())]
    if max_slices is not None and len(zs) > max_slices:
        zs = [zs[int(k)] for k in np.linspace(0, len(zs) - 1, max_slices).round().astype(int)]
    return zs


#: key names that usually hold a segmentation mask in dict items (MONAI and other pipelines)
MASK_KEY_WORDS = ("label", "mask", "seg", "gt", "target", "annotation")


def _label_key_hint(item: dict, image_key: str) -> str:
    """A fix to suggest when dict items hold their mask under another key: ``label_key=<that key>``."""
    found = [str(k) for k in item if k != image_key and any(w in str(k).lower() for w in MASK_KEY_WORDS)]
    if len(found) != 1:
        return ""
    return (
        f" If {found[0]!r} holds the mask, set label_key={found[0]!r} "
        f"(SPECallback(label_key={found[0]!r}) or SPEConfig(label_key={found[0]!r}))."
    )


def cache_dataset(
    name: str,
    dataset: SizedDataset,
    working_size: int,
    image_key: str = "image",
    label_key: str = "label",
    foreground: int | None = None,
    indices: Sequence[int] | None = None,
    require_masks: bool = False,
    classes: Sequence[int] | None = None,
    spatial_dims: int | None = None,
    slices: str = "all",
    max_slices: int | None = None,
    keep_inputs: bool = True,
) -> CachedSet:
    """Read ``dataset`` (items ``(image, mask)`` tuples or dicts) once into a :class:`CachedSet`.

    Args:
        foreground: the mask class that is foreground (None: any non-zero); binary masks (bool).
        classes: class indices of a multi-class mask; masks become uint8 label maps 1..K.
        spatial_dims: 2 or 3 (None: 4-D items ``[C,D,H,W]`` are volumes, others 2D).
        slices: which slices of a volume become units: ``"all"`` or ``"foreground"`` (mask non-empty).
        max_slices: at most this many evenly spaced slices per volume (None: no limit).
        keep_inputs: keep the model inputs (not needed for sets that are never predicted).
    """
    if slices not in SLICE_MODES:
        raise ValueError(f"slices must be one of {SLICE_MODES}, got {slices!r}.")
    require_map_dataset(name, dataset)
    try:
        n = len(dataset)
    except TypeError as err:
        raise TypeError(f"SPE {name} dataset must be a map-style Dataset with __len__.") from err
    if n == 0:
        raise ValueError(f"The SPE {name} dataset is empty; give it at least one item.")
    idx = list(range(n)) if indices is None else list(indices)
    inputs: list[Tensor] = []
    masks: list[Tensor] = []
    gray: list[Tensor] = []
    units: list[tuple[int, int]] = []
    ids: list[str] = []
    has_mask = True
    size = (working_size, working_size)
    dims = None
    flat: Tensor | None = None
    for pos, i in enumerate(idx):
        where = f"{name} item {i}"
        item = dataset[i]
        image, mask = split_named(item, image_key, label_key, where)
        if isinstance(item, Mapping) and isinstance(item.get("id"), str):
            ids.append(item["id"])
        image = _as_item_image(image, spatial_dims, where)
        if dims is None:
            dims = image.ndim - 1
        elif image.ndim - 1 != dims:
            raise ValueError(f"SPE {where}: mixes 2D and 3D items ({tuple(image.shape)}).")
        if keep_inputs:
            inputs.append(image)
        if mask is None:
            has_mask = False
        else:
            mask = _as_item_mask(mask, tuple(image.shape[1:]), foreground, classes, where)
            masks.append(mask)
        x = image.float().mean(0, keepdim=True)  # [1,*S]
        if dims == 2:  # written into one preallocated tensor: no list of copies, no concatenation peak
            if flat is None:
                flat = torch.empty(len(idx), 1, *size)
            flat[pos] = resize_images(to_gray01(x[None]), size)[0]
            units.append((pos, -1))
        else:  # one intensity normalisation per volume, then its slices
            d, h, w = x.shape[1:]
            vol = to_gray01(x.reshape(1, 1, d * h, w)).reshape(d, 1, h, w)
            zs = _slices(d, mask, slices, max_slices)
            if zs:
                gray.append(resize_images(vol[zs], size))
                units.extend((pos, z) for z in zs)
    if require_masks and not has_mask:
        first = dataset[idx[0]] if idx else None
        keys = f" (its items have the keys {sorted(map(str, first))})" if isinstance(first, dict) else ""
        hint = _label_key_hint(first, image_key) if isinstance(first, dict) else ""
        raise ValueError(
            f"The SPE {name} dataset must return masks: items need (image, mask) or a {label_key!r} key{keys}.{hint}"
        )
    g = flat if flat is not None else torch.cat(gray) if gray else torch.zeros(0, 1, *size)
    return CachedSet(name, inputs, masks if has_mask else None, g, idx, units, ids if len(ids) == len(idx) else [])


def split_named(item: Any, image_key: str, label_key: str, where: str) -> tuple[Tensor, Tensor | None]:
    """:func:`~spe_lightning.data.adapters.split_item` whose key error names the set and item (``where``)."""
    try:
        return split_item(item, image_key, label_key)
    except KeyError as err:  # image_key/label_key apply to every set: say which set's items lack them
        raise KeyError(
            f"SPE {where}: {err.args[0]} image_key and label_key apply to every set, so all sets' items "
            "need the same keys."
        ) from err
