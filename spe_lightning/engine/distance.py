"""How far a set of images is from the calibration set, without labels: what an interval may extrapolate.

Each item is described by a few numbers that exist for any model and any image, so no hook into
the user's ``nn.Module`` is needed (forward hooks on an encoder layer depend on its architecture):

- the image as the reverse segmenter sees it (gray, ``[0, 1]``, working size): its 10th, 50th and 90th
  intensity percentiles, standard deviation, mean absolute Laplacian (noise raises it, blur and low
  resolution lower it) and mean gradient magnitude (edges, contrast);
- the model's output: the predicted foreground fraction and the mean confidence (soft Dice of its
  probabilities against its own mask, as :func:`~spe_lightning.engine.predict.predict_labels` gives).

Features are standardised by the calibration set's mean and standard deviation. The distance of a
set is the mean, over its items, of the Euclidean distance to the nearest calibration item, divided
by the calibration set's own spread: the same mean nearest-neighbour distance of each calibration
item to the others (leave one out). About 1 means "as far as calibration images are from each
other"; a shifted set is farther. Items made from calibration items (the calibration pairs: subsets
and shifted copies) are never matched with their own original (``exclude_same``), so a copy counts
as a new set from a shifted distribution.

A set's *nearest-set distance* (:func:`nearest_set_distance`) is the same distance to the calibrated set it
looks most like: the calibration set itself or any calibration pair's set. Beyond
:data:`NEAREST_SET_LIMIT` the set looks like nothing SPE's interval was calibrated on, in whatever way it
differs (one far pair, e.g. strong noise, does not make every other kind of difference look covered).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.engine.cached_set import CachedSet

__all__ = ["FEATURES", "NEAREST_SET_LIMIT", "diagonal", "image_features", "nearest_set_distance", "set_distance"]

#: the per-item features, in column order
FEATURES = ("q10", "q50", "q90", "std", "laplacian", "gradient", "foreground", "confidence")

#: a set whose nearest-set distance exceeds this is "outside the calibrated range". Chosen on development data
#: only (``benchmarks/reach_dev.py``: the test splits' halves, each shift family held out from the pairs): 1.5
#: marked all 18 held-out targets the unwidened interval missed and no clean target on two seeds (2 marked 12
#: of the 18); on a third seed, run after the choice, 10 of 11 and no clean target (the farthest pair: 4 of 11)
NEAREST_SET_LIMIT = 1.5

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def _gray_features(gray: Tensor) -> Tensor:
    """``[U, 6]`` intensity features of gray rows ``[U,1,w,w]``."""
    x = gray.float()
    flat = x.flatten(1)
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]), dim=1).T
    lap = F.conv2d(x, _LAPLACE, padding=1)[..., 1:-1, 1:-1].abs().flatten(1).mean(1)
    dx, dy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    grad = (dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2).sqrt().flatten(1).mean(1)
    return torch.cat([q, flat.std(1, keepdim=True), lap[:, None], grad[:, None]], 1)


def image_features(data: CachedSet, masks: Sequence[Tensor], confidence: Tensor) -> np.ndarray:
    """``[n_items, len(FEATURES)]`` label-free features of ``data`` with the model's ``masks`` and ``confidence``."""
    n = len(data)
    if len(masks) != n or len(confidence) != n:
        raise ValueError(f"{len(masks)} masks and {len(confidence)} confidences for {n} items.")
    out = np.zeros((n, len(FEATURES)))
    if n == 0:
        return out
    rows = _gray_features(data.gray).double().numpy() if data.gray.shape[0] else np.zeros((0, 6))
    sums, counts = np.zeros((n, rows.shape[1])), np.zeros(n)
    for row, (item, _) in enumerate(data.units):  # a volume's slices: their mean
        sums[item] += rows[row]
        counts[item] += 1
    out[:, :6] = sums / np.maximum(counts, 1)[:, None]
    out[:, 6] = [float((m > 0).float().mean()) if m.numel() else 0.0 for m in masks]
    out[:, 7] = confidence.double().numpy()
    return out


#: the smallest spread a feature is standardised by, in its own units (intensities and fractions in [0, 1]; the
#: Laplacian and gradient means are about 0.005-0.1 on gray rows): a feature constant on the calibration set, as
#: the 10th percentile of zero-padded images is, would otherwise turn a small difference into thousands of standard
#: deviations. A tenth or less of the smallest spread of the calibration sets measured (JSRT's Laplacian 0.0056, the
#: demo phantoms' std 0.0062), so their distances are unchanged
SD_FLOOR = np.array([0.001, 0.001, 0.001, 0.001, 0.0001, 0.0001, 0.001, 0.001])


def _standardise(x: np.ndarray, calibration: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    floor = SD_FLOOR if calibration.shape[1] == len(SD_FLOOR) else SD_FLOOR.min()  # other feature sets: the least
    mu, sd = calibration.mean(0), np.maximum(calibration.std(0), floor)
    return (x - mu) / sd, (calibration - mu) / sd


def set_distance(
    features: np.ndarray,
    calibration: np.ndarray,
    ids: Sequence[int] | None = None,
    calibration_ids: Sequence[int] | None = None,
) -> float | None:
    """The distance of a set (``features`` of its items) to the calibration set (see the module docstring).

    ``ids``/``calibration_ids``: source ids of the items; an item is never matched with a calibration
    item of the same id (a pair set made from the calibration set). None when the calibration set has
    fewer than 3 items or the set is empty.
    """
    features, calibration = np.asarray(features, float), np.asarray(calibration, float)
    if len(calibration) < 3 or len(features) == 0:
        return None
    z, zc = _standardise(features, calibration)
    within = np.sqrt(((zc[:, None, :] - zc[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(within, np.inf)
    spread = float(within.min(1).mean())
    d = np.sqrt(((z[:, None, :] - zc[None, :, :]) ** 2).sum(-1))
    if ids is not None and calibration_ids is not None:
        d[np.asarray(ids)[:, None] == np.asarray(calibration_ids)[None, :]] = np.inf
    nearest = d.min(1)
    nearest = nearest[np.isfinite(nearest)]
    if not len(nearest):
        return None
    value = float(nearest.mean()) / max(spread, 1e-12)
    return value if math.isfinite(value) else None


def nearest_set_distance(
    features: np.ndarray, calibration: np.ndarray, pair_sets: Mapping[str, np.ndarray]
) -> float | None:
    """The smallest :func:`set_distance` of a set (``features`` of its items) to the calibration set and to each
    calibration pair's set (``pair_sets``: their items' features at the same weights); None when none is
    measurable. The pairs' own sets are the reference here, so "about 1" means "as alike as that pair's
    images are to each other"."""
    found = [set_distance(features, calibration), *(set_distance(features, f) for f in pair_sets.values())]
    known = [d for d in found if d is not None]
    return min(known) if known else None


def diagonal(data: CachedSet) -> float | None:
    """The largest item diagonal of ``data`` in pixels (voxels): the largest hd95 its masks allow."""
    sides = [tuple(int(s) for s in x.shape[1:]) for x in data.inputs]
    if not sides:
        return None
    return max(math.sqrt(sum(s * s for s in side)) for side in sides)
