"""Synthetic segmentation data for the reverse-segmenter tests: ellipses on textured, noisy backgrounds.

Everything is generated from a seed (no files), as ``[N,1,S,S]`` float images in [0, 1] and binary masks.
``degrade`` damages masks with the error kinds of a training model (erosion, dilation, shift,
holes, spurious blobs) at a strength in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.styled_pairs import gaussian_blur


def _grid(size: int) -> tuple[Tensor, Tensor]:
    t = torch.arange(size, dtype=torch.float32)
    return torch.meshgrid(t, t, indexing="ij")


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> Tensor:
    yy, xx = _grid(size)
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def make_shapes(n: int, size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images with one bright ellipse each (varying position, size, angle, contrast) and their masks."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=g))

    images, masks = [], []
    for _ in range(n):
        r = u(0.12, 0.22) * size
        m = _ellipse(size, u(0.3, 0.7) * size, u(0.3, 0.7) * size, r, r * u(0.6, 1.0), u(0, 3.14))
        texture = F.avg_pool2d(torch.rand(1, 1, size, size, generator=g), 5, 1, 2, count_include_pad=False)[0, 0]
        back = u(0.2, 0.4) + 0.25 * (texture - 0.5)
        fg = back + u(0.25, 0.4)
        img = torch.where(m, fg, back) + 0.06 * torch.randn(size, size, generator=g)
        images.append(img.clamp(0, 1))
        masks.append(m.float())
    return torch.stack(images)[:, None], torch.stack(masks)[:, None]


def _dilate(m: Tensor, r: int) -> Tensor:
    return F.max_pool2d(m, 2 * r + 1, 1, r) if r > 0 else m


def degrade(masks: Tensor, strength: float, seed: int = 0) -> Tensor:
    """Damage binary masks ``[N,1,S,S]``; each image gets one kind, cycling through five, at ``strength``."""
    if strength <= 0:
        return masks.clone()
    g = torch.Generator().manual_seed(seed)
    size = masks.shape[-1]
    out = []
    for i, m in enumerate(masks):
        m = m[None]
        r_eq = float(torch.sqrt(m.sum() / torch.pi))
        kind = i % 5
        if kind == 0:  # erosion
            d = 1.0 - _dilate(1.0 - m, max(1, round(strength * 0.6 * r_eq)))
        elif kind == 1:  # dilation
            d = _dilate(m, max(1, round(strength * 0.8 * r_eq)))
        elif kind == 2:  # shift
            s = max(1, round(strength * 1.0 * r_eq))
            d = torch.roll(m, shifts=(s, -s if i % 2 else s), dims=(-2, -1))
        elif kind == 3:  # hole at the centre of mass
            yy, xx = _grid(size)
            w = m[0, 0]
            cy, cx = float((yy * w).sum() / w.sum()), float((xx * w).sum() / w.sum())
            d = m * (~_ellipse(size, cy, cx, strength * 0.8 * r_eq + 0.5, strength * 0.8 * r_eq + 0.5, 0.0)).float()
        else:  # spurious blob next to the object
            yy, xx = _grid(size)
            w = m[0, 0]
            cy, cx = float((yy * w).sum() / w.sum()), float((xx * w).sum() / w.sum())
            ang = float(torch.rand((), generator=g)) * 6.28
            by = min(max(cy + 1.8 * r_eq * torch.sin(torch.tensor(ang)).item(), 0), size - 1)
            bx = min(max(cx + 1.8 * r_eq * torch.cos(torch.tensor(ang)).item(), 0), size - 1)
            rb = strength * 1.0 * r_eq + 0.5
            d = torch.maximum(m, _ellipse(size, by, bx, rb, rb, 0.0).float())
        out.append(d[0])
    return torch.stack(out)


def erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return -torch.nn.functional.max_pool2d(-m.float(), 2 * r + 1, 1, r) > 0.5


def shapes_set(n: int = 12, seed: int = 0) -> CachedSet:
    """A cached set of ``n`` shape images (gray = inputs) for the engine tests."""
    img, msk = make_shapes(n, seed=seed)
    return CachedSet("cal", list(img), list(msk.bool()), img.clone(), list(range(n)))


def smooth_scene(seed: int, size: int) -> Tensor:
    """A smooth ``[size, size]`` image with a ramp and a few blobs, in [0, 1] (the styling tests' images)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = 0.3 * xx + 0.1 * yy
    for _ in range(4):
        cy, cx, r = torch.rand(3, generator=g)
        img = img + 0.4 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.05 + 0.1 * r) ** 2).float()
    return gaussian_blur(img, 1.0)
