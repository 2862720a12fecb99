"""Synthetic appearance shifts (MONAI intensity/spatial transforms) at three severities.

Used by the shift benchmark to build shifted targets and by SPE to show G harmful and harmless
shifts of the labelled calibration set. Images are shifted in a per-image ``[0, 1]`` range
(min-max) and mapped back to their own range, so normalised model inputs work too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from spe_lightning.data.adapters import resize_images, to_gray01
from spe_lightning.engine.cached_set import CachedSet

__all__ = ["SHIFTS", "SHIFT_FAMILIES", "apply_shift", "gray_rows", "shift_name", "shift_set", "subset"]

#: family -> parameter per severity 1, 2, 3
SHIFTS: dict[str, tuple[float, float, float]] = {
    "noise": (0.05, 0.15, 0.30),  # Gaussian noise std
    "gamma": (0.4, 2.5, 4.0),  # intensity ** gamma
    "contrast": (0.6, 0.35, 0.2),  # intensities squeezed into a window of this width around 0.5
    "blur": (1.0, 2.5, 4.0),  # Gaussian blur sigma (pixels at 128 x 128)
    "bias_field": (0.3, 0.6, 0.9),  # max |coefficient| of a random smooth multiplicative bias field (degree 3)
    "low_resolution": (0.5, 0.33, 0.25),  # down-sampling factor before up-sampling back
}
SHIFT_FAMILIES: tuple[str, ...] = tuple(SHIFTS)


def shift_name(family: str, severity: int) -> str:
    """``"<family>_<severity>"``, e.g. ``noise_2``."""
    return f"{family}_{severity}"


def _transform(family: str, value: float, seed: int, spatial_dims: int = 2) -> Callable[[Tensor], Tensor]:
    from monai.transforms import (
        AdjustContrast,
        GaussianSmooth,
        RandBiasField,
        RandGaussianNoise,
        RandSimulateLowResolution,
        ScaleIntensityRange,
    )

    t: Any  # one of MONAI's transforms
    if family == "noise":
        t = RandGaussianNoise(prob=1.0, std=value, sample_std=False)
    elif family == "gamma":
        t = AdjustContrast(gamma=value)
    elif family == "contrast":
        t = ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.5 - value / 2, b_max=0.5 + value / 2)
    elif family == "blur":
        t = GaussianSmooth(sigma=value)
    elif family == "bias_field":
        t = RandBiasField(degree=3, coeff_range=(-value, value), prob=1.0)
    else:  # low_resolution
        t = RandSimulateLowResolution(
            prob=1.0, zoom_range=(value, value), upsample_mode="bilinear" if spatial_dims == 2 else "trilinear"
        )
    if hasattr(t, "set_random_state"):
        t.set_random_state(seed)
    return t


def apply_shift(image: Tensor, family: str, severity: int, seed: int = 0) -> Tensor:
    """``image`` ``[C,H,W]`` or ``[C,D,H,W]`` (any range) with ``family`` at ``severity`` 1-3 (same range, dtype)."""
    if family not in SHIFTS:
        raise ValueError(f"Unknown shift family {family!r}; choose from {SHIFT_FAMILIES}.")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity!r}.")
    x = image.float()
    dims = tuple(range(1, x.ndim))
    lo = x.amin(dim=dims, keepdim=True)
    span = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-8)
    unit = (x - lo) / span
    out = _transform(family, SHIFTS[family][severity - 1], seed, x.ndim - 1)(unit)
    # MONAI returns a MetaTensor: every later torch call on it pays for metadata bookkeeping (the
    # calibration pairs' step took 1.6 s instead of 1.3 s on the demo), so keep a plain tensor
    out = torch.as_tensor(out).as_subclass(torch.Tensor).float()
    out = out.clamp(0.0, 1.0) * span + lo
    return out.to(image.dtype)


def gray_rows(inputs: Sequence[Tensor], units: Sequence[tuple[int, int]], size: tuple[int, int]) -> Tensor:
    """Working-size gray rows of ``units`` (as :func:`~spe_lightning.engine.predict.cache_dataset` builds them)."""
    rows = []
    for pos, z in units:
        x = inputs[pos].float().mean(0, keepdim=True)  # [1,*S]
        if z < 0:
            rows.append(resize_images(to_gray01(x[None]), size))
        else:  # volumes: intensity normalised per volume, then the slice
            d, h, w = x.shape[1:]
            vol = to_gray01(x.reshape(1, 1, d * h, w)).reshape(d, 1, h, w)
            rows.append(resize_images(vol[z : z + 1], size))
    return torch.cat(rows) if rows else torch.zeros(0, 1, *size)


def shift_set(data: CachedSet, family: str, severity: int, seed: int = 0) -> CachedSet:
    """A copy of ``data`` whose images carry a synthetic shift (masks unchanged); item i uses seed ``seed + i``."""
    inputs = [apply_shift(x, family, severity, seed + i) for i, x in enumerate(data.inputs)]
    gray = gray_rows(inputs, data.units, (data.gray.shape[-2], data.gray.shape[-1]))
    return CachedSet(shift_name(family, severity), inputs, data.masks, gray, list(data.indices), list(data.units))


def subset(data: CachedSet, positions: Sequence[int], name: str) -> CachedSet:
    """The items of ``data`` at ``positions`` (with their gray rows) as a new set called ``name``."""
    pos = list(positions)
    new = {p: k for k, p in enumerate(pos)}
    rows = [r for r, (p, _) in enumerate(data.units) if p in new]
    rows.sort(key=lambda r: (new[data.units[r][0]], data.units[r][1]))
    units = [(new[data.units[r][0]], data.units[r][1]) for r in rows]
    masks = None if data.masks is None else [data.masks[i] for i in pos]
    ids = [data.ids[i] for i in pos] if data.ids else []
    return CachedSet(
        name, [data.inputs[i] for i in pos], masks, data.gray[rows], [data.indices[i] for i in pos], units, ids
    )
