"""Synthetic segmentation errors: degraded copies of true masks with a known Dice (training data for quality).

Each kind imitates an error segmentation models make; a strength ``s`` in (0, 1] scales the damage:

* ``erode`` / ``dilate``: under- / over-segmentation (the boundary moved in or out);
* ``shift``: the mask displaced;
* ``holes``: missed disks inside the structure;
* ``blobs``: spurious false-positive blobs (near the structure, or anywhere when there is none);
* ``boundary``: a wavy boundary (a smooth random field added to the signed distance);
* ``chop``: a missed part (everything beyond a random line removed);
* ``swap``: another case's true mask (a plausible shape, wrong for this image), moved onto this one's centroid;
* ``empty``: nothing segmented;
* ``lookalike``: a region of the *image* that looks like the structure (smoothed intensity near the
  structure's own, or a random dark/bright level when there is none) segmented instead of it (strength
  > 0.5) or besides it: the false positive on a shadow or a similar organ that models make.

:func:`make_candidates` draws ``per_case`` candidates per true mask (random kind, uniform strength,
sometimes two kinds one after the other) and returns them with their exact Dice against the truth.
NumPy / SciPy on the CPU; deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["ERROR_KINDS", "dice_np", "degrade", "make_candidates"]

ERROR_KINDS: tuple[str, ...] = (
    "erode",
    "dilate",
    "shift",
    "holes",
    "blobs",
    "boundary",
    "chop",
    "swap",
    "empty",
    "lookalike",
)


def dice_np(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    den = int(a.sum()) + int(b.sum())
    return 1.0 if den == 0 else 2.0 * float((a & b).sum()) / den


def _sdf(m: np.ndarray) -> np.ndarray:
    """Signed distance: positive inside ``m``, negative outside."""
    if not m.any():
        return -np.full(m.shape, float(max(m.shape)))
    if m.all():
        return np.full(m.shape, float(max(m.shape)))
    return ndimage.distance_transform_edt(m) - ndimage.distance_transform_edt(~m)


def _ellipses(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    out = np.zeros(shape, bool)
    for (cy, cx), r in zip(centres, radii):
        a, th = rng.uniform(0.6, 1.6), rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dy * np.cos(th) + dx * np.sin(th), -dy * np.sin(th) + dx * np.cos(th)
        out |= (u / (r * a)) ** 2 + (v / (r / a)) ** 2 <= 1.0
    return out


def _lookalike(m: np.ndarray, image: np.ndarray, s: float, r: float, rng: np.random.Generator) -> np.ndarray:
    sm = ndimage.gaussian_filter(image.astype(float), sigma=max(r * 0.15, 1.0))
    level = (
        float(np.median(sm[m]))
        if m.any()
        else float(np.quantile(sm, np.clip(rng.choice([0.1, 0.9]) + rng.normal(0, 0.05), 0.0, 1.0)))
    )
    tol = (0.03 + 0.1 * rng.random()) * (float(sm.max() - sm.min()) + 1e-6)
    region = (np.abs(sm - level) < tol) & ~ndimage.binary_dilation(m, iterations=2)
    lab, n = ndimage.label(region)
    if n == 0:
        return m.copy()
    sizes = ndimage.sum_labels(region, lab, np.arange(1, n + 1))
    ok = np.flatnonzero(sizes >= max(8.0, 0.1 * np.pi * r * r))
    if ok.size == 0:
        return m.copy()
    blob = lab == int(rng.choice(ok)) + 1
    limit = max(np.pi * r * r * rng.uniform(0.3, 1.5), 16.0)
    if blob.sum() > limit:  # keep a compact piece of a large region: its pixels closest to a random seed
        ys, xs = np.nonzero(blob)
        k = int(rng.integers(len(ys)))
        d2 = (ys - ys[k]) ** 2 + (xs - xs[k]) ** 2
        keep = np.argsort(d2)[: int(limit)]
        blob = np.zeros_like(blob)
        blob[ys[keep], xs[keep]] = True
    blob = ndimage.binary_fill_holes(ndimage.binary_closing(blob, iterations=2))
    return blob if s > 0.5 else m | blob


def degrade(
    mask: np.ndarray,
    kind: str,
    s: float,
    rng: np.random.Generator,
    other: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """``mask`` (bool ``[H,W]``) damaged by ``kind`` at strength ``s`` in (0, 1].

    ``other`` is the mask for ``swap``; ``image`` (``[H,W]``) is needed for ``lookalike`` (else it is ``blobs``).
    """
    m = mask.astype(bool)
    h, w = m.shape
    area = float(m.sum())
    side = float(min(h, w))
    r = np.sqrt(area / np.pi) if area > 0 else rng.uniform(0.04, 0.15) * side
    ys, xs = np.nonzero(m)
    centre = np.array([ys.mean(), xs.mean()]) if area > 0 else rng.uniform(0.2, 0.8, 2) * [h, w]
    if kind == "empty":
        return np.zeros_like(m)
    if kind == "erode":
        return _sdf(m) > s * r * 0.9
    if kind == "dilate":
        return _sdf(m) > -s * r * 1.0
    if kind == "shift":
        ang, d = rng.uniform(0, 2 * np.pi), s * r * 1.5 + 1.0
        return ndimage.shift(m.astype(np.uint8), (d * np.sin(ang), d * np.cos(ang)), order=0) > 0
    if kind == "holes":
        if area == 0:
            return m.copy()
        n = int(rng.integers(1, 4))
        pick = rng.integers(0, len(ys), n)
        return m & ~_ellipses(m.shape, np.stack([ys[pick], xs[pick]], 1), rng.uniform(0.4, 0.9, n) * s * r, rng)
    if kind == "blobs":
        n = int(rng.integers(1, 4))
        if area > 0:
            angles = rng.uniform(0, 2 * np.pi, n)
            dist = r * rng.uniform(0.8, 2.5, n)
            c = centre[None] + np.stack([np.sin(angles), np.cos(angles)], 1) * dist[:, None]
        else:
            c = rng.uniform(0.1, 0.9, (n, 2)) * [h, w]
        c = np.clip(c, 0, [h - 1, w - 1])
        return m | _ellipses(m.shape, c, rng.uniform(0.3, 1.0, n) * max(s, 0.15) * r, rng)
    if kind == "boundary":
        field = ndimage.gaussian_filter(rng.standard_normal(m.shape), sigma=max(r * rng.uniform(0.15, 0.5), 1.0))
        return (_sdf(m) + s * r * 1.2 * field / (field.std() + 1e-8)) > 0
    if kind == "chop":
        if area == 0:
            return m.copy()
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:h, :w].astype(float)
        proj = (yy - centre[0]) * np.sin(ang) + (xx - centre[1]) * np.cos(ang)
        return m & (proj <= np.quantile(proj[m], 1.0 - s * 0.9))
    if kind == "swap":
        if other is None or not other.any():
            return np.zeros_like(m)
        oy, ox = np.nonzero(other)
        d = (centre - [oy.mean(), ox.mean()]) * (1.0 - s) + rng.normal(0, s * r, 2)
        return ndimage.shift(other.astype(np.uint8), d, order=0) > 0
    if kind == "lookalike":
        return _lookalike(m, image, s, r, rng) if image is not None else degrade(m, "blobs", s, rng)
    raise ValueError(f"Unknown error kind {kind!r}; choose from {ERROR_KINDS}.")


def make_candidates(
    masks: Tensor,
    per_case: int = 16,
    images: Tensor | None = None,
    seed: int = 0,
    kinds: tuple[str, ...] = ERROR_KINDS,
    second_kind: float = 0.3,
    keep_true: float = 0.04,
) -> tuple[Tensor, Tensor, Tensor]:
    """``per_case`` damaged copies of every true mask.

    Args:
        masks: true masks ``[N,1,H,W]`` (bool or 0/1).
        per_case: candidates per mask.
        images: the images ``[N,1,H,W]`` (for ``lookalike``; without them it falls back to ``blobs``).
        seed: NumPy seed of every random draw.
        kinds: error kinds to draw from (uniformly; ``empty`` and ``swap`` at half the rate).
        second_kind: probability that a second kind is applied on top of the first.
        keep_true: probability that a candidate is the true mask itself (Dice 1).

    Returns:
        ``(candidates bool [N*per_case,1,H,W], source index int64 [N*per_case], Dice float32 [N*per_case])``.
    """
    rng = np.random.default_rng(seed)
    truth = masks.detach().cpu().numpy()[:, 0] > 0
    pics = None if images is None else images.detach().cpu().float().numpy()[:, 0]
    n = truth.shape[0]
    with_fg = np.flatnonzero(truth.reshape(n, -1).any(1))
    weights = np.array([0.5 if k in ("empty", "swap") else 1.0 for k in kinds])
    weights /= weights.sum()
    out = np.zeros((n * per_case, *truth.shape[1:]), bool)
    src = np.repeat(np.arange(n), per_case)
    dice = np.ones(n * per_case, np.float32)
    for j, i in enumerate(src):
        m = truth[i]
        if rng.random() < keep_true:
            out[j] = m
            continue
        c = m
        for step in range(2 if rng.random() < second_kind else 1):
            kind = kinds[int(rng.choice(len(kinds), p=weights))]
            if step and kind in ("empty", "swap", "lookalike"):
                kind = "boundary"
            other = truth[int(rng.choice(with_fg))] if kind == "swap" and with_fg.size else None
            c = degrade(c, kind, float(rng.uniform(0.05, 1.0)), rng, other, None if pics is None else pics[i])
        out[j] = c
        dice[j] = dice_np(c, m)
    return torch.from_numpy(out)[:, None], torch.from_numpy(src), torch.from_numpy(dice)
