"""Graded, realistic degradations of binary masks (numpy / scipy), for reverse-segmenter benchmarks.

Every kind takes a mask and a strength ``s`` in [0, 1] (0 = untouched) and a ``numpy.random.Generator``;
its random draws (directions, centres, noise fields) are made before the strength is applied, so for a
fixed generator state the damage grows monotonically with ``s``. :func:`degrade_to` picks the strength
whose Dice against the original is closest to a target, so a support set can be degraded to a chosen
mean quality with a mixture of error kinds:

* ``erode`` / ``dilate``: under- / over-segmentation (a boundary offset, as a biased model makes);
* ``shift``: a misplaced mask;
* ``holes``: missed disks inside the object;
* ``blobs``: spurious false-positive blobs near the object;
* ``boundary``: a wavy boundary (smooth random field added to the signed distance);
* ``chop``: a missed part (everything beyond a random line cut away).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["KINDS", "dice", "apply_kind", "degrade_to", "degrade_set"]

KINDS = ("erode", "dilate", "shift", "holes", "blobs", "boundary", "chop")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    den = a.sum() + b.sum()
    return 1.0 if den == 0 else float(2.0 * (a & b).sum() / den)


def _geometry(mask: np.ndarray) -> tuple[float, np.ndarray]:
    area = max(float(mask.sum()), 1.0)
    ys, xs = np.nonzero(mask)
    centre = np.array([ys.mean(), xs.mean()]) if ys.size else np.array(mask.shape, float) / 2
    return float(np.sqrt(area / np.pi)), centre


def _disks(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray, aspect: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    out = np.zeros(shape, bool)
    for (cy, cx), r, a in zip(centres, radii, aspect):
        if r <= 0:
            continue
        out |= ((yy - cy) / (r * a)) ** 2 + ((xx - cx) / (r / a)) ** 2 <= 1.0
    return out


class _Draw:
    """The random parameters of one degradation (drawn once, applied at any strength)."""

    def __init__(self, kind: str, mask: np.ndarray, rng: np.random.Generator) -> None:
        self.kind, self.mask = kind, mask.astype(bool)
        self.r_eq, self.centre = _geometry(self.mask)
        h, w = mask.shape
        r = self.r_eq
        if kind in ("erode", "dilate", "boundary"):
            self.sdf = ndimage.distance_transform_edt(self.mask) - ndimage.distance_transform_edt(~self.mask)
        if kind == "shift":
            self.angle = rng.uniform(0, 2 * np.pi)
        elif kind == "holes":
            ys, xs = np.nonzero(self.mask)
            n = int(rng.integers(1, 4))
            pick = rng.integers(0, max(len(ys), 1), n)
            self.centres = np.stack([ys[pick], xs[pick]], 1) if len(ys) else np.zeros((0, 2))
            self.rel = rng.uniform(0.6, 1.0, n)
            self.aspect = rng.uniform(0.7, 1.4, n)
        elif kind == "blobs":
            n = int(rng.integers(1, 4))
            ang = rng.uniform(0, 2 * np.pi, n)
            dist = r * rng.uniform(1.2, 2.5, n)
            c = self.centre[None] + np.stack([np.sin(ang), np.cos(ang)], 1) * dist[:, None]
            self.centres = np.clip(c, [0, 0], [h - 1, w - 1])
            self.rel = rng.uniform(0.6, 1.0, n)
            self.aspect = rng.uniform(0.6, 1.6, n)
        elif kind == "boundary":
            field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma=max(r * 0.35, 1.5))
            self.field = field / (field.std() + 1e-8)
        elif kind == "chop":
            self.angle = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[:h, :w].astype(float)
            self.proj = (yy - self.centre[0]) * np.sin(self.angle) + (xx - self.centre[1]) * np.cos(self.angle)

    def __call__(self, s: float) -> np.ndarray:
        m, r, k = self.mask, self.r_eq, self.kind
        if s <= 0:
            return m.copy()
        if k == "erode":
            return self.sdf > s * r * 0.7
        if k == "dilate":
            return self.sdf > -s * r * 0.9
        if k == "shift":
            d = s * r * 1.2
            return ndimage.shift(m.astype(float), (d * np.sin(self.angle), d * np.cos(self.angle)), order=0) > 0.5
        if k == "holes":
            return m & ~_disks(m.shape, self.centres, self.rel * s * r * 1.1, self.aspect)
        if k == "blobs":
            return m | _disks(m.shape, self.centres, self.rel * s * r * 1.4, self.aspect)
        if k == "boundary":
            return (self.sdf + s * r * 1.5 * self.field) > 0
        if k == "chop":
            inside = self.proj[m]
            if inside.size == 0:
                return m.copy()
            cut = np.quantile(inside, 1.0 - min(s, 1.0) * 0.8)
            return m & (self.proj <= cut)
        raise ValueError(f"Unknown degradation kind {k!r}; choose from {KINDS}.")


def apply_kind(mask: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Degrade ``mask`` by one ``kind`` at ``strength`` in [0, 1]."""
    return _Draw(kind, mask, rng)(strength)


def degrade_to(
    mask: np.ndarray, target: float, kind: str, rng: np.random.Generator, min_pixels: int = 16
) -> np.ndarray:
    """Degrade ``mask`` with ``kind`` to the strength whose Dice is closest to ``target`` (>= ``min_pixels``)."""
    mask = mask.astype(bool)
    if target >= 0.999 or not mask.any():
        return mask.copy()
    draw = _Draw(kind, mask, rng)
    best, best_err = mask.copy(), abs(1.0 - target)
    for s in np.linspace(0.0, 1.0, 41)[1:]:
        out = draw(float(s))
        if out.sum() < min_pixels:
            break
        err = abs(dice(out, mask) - target)
        if err < best_err:
            best, best_err = out, err
    return best


def degrade_set(
    masks: np.ndarray, level: float, rng: np.random.Generator, jitter: float = 0.04, dominant_share: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Degrade a stack of masks ``[N,H,W]`` to a mean Dice near ``level``.

    Like a real checkpoint, one randomly chosen *dominant* kind (e.g. a bias to under-segment)
    affects ``dominant_share`` of the images; the others get a random kind each. Per-image targets
    scatter by ``jitter`` around ``level``. Returns the degraded masks and their Dice values.
    """
    n = len(masks)
    dominant = KINDS[int(rng.integers(len(KINDS)))]
    kinds = [dominant if rng.random() < dominant_share else KINDS[int(rng.integers(len(KINDS)))] for _ in range(n)]
    targets = np.clip(level + rng.normal(0.0, jitter, n), 0.25, 1.0) if level < 0.999 else np.ones(n)
    out = np.stack([degrade_to(m, float(t), k, rng) for m, t, k in zip(masks, targets, kinds)])
    d = np.array([dice(o, m) for o, m in zip(out, masks)])
    return out, d
