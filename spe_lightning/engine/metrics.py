"""Per-image segmentation metrics of binary masks (2D or 3D), one value per image.

:func:`per_image_metrics` returns, for each requested metric, a float64 CPU tensor ``[N]``.
Inputs are binary masks (bool, or numeric 0/1) of shape ``[N, 1, *spatial]`` or ``[N, *spatial]``
with 2 or 3 spatial dimensions; a 4-D input whose dim 1 has size 1 is read as ``[N, 1, H, W]``
(a single channel), never as a 3D volume of depth 1.

Metrics (``PAPER_METRICS``)
---------------------------
``dice``, ``iou``, ``precision``, ``recall``
    From the per-image confusion counts TP, FP, FN (the same counts as
    ``torchmetrics.functional.classification.binary_stat_scores(..., multidim_average="samplewise")``,
    computed directly: 26x faster in benchmarks/metrics_speed.py; a test checks they agree):
    dice = 2TP / (2TP + FP + FN), iou = TP / (TP + FP + FN), precision = TP / (TP + FP),
    recall = TP / (TP + FN).
``hd95``
    The 95th-percentile symmetric Hausdorff distance, as
    ``monai.metrics.compute_hausdorff_distance(percentile=95, include_background=True)``
    defines it: the boundary of a mask is its foreground pixels with at least one face neighbour
    (4-neighbourhood in 2D, 6 in 3D) in the background or outside the image; d(P->T) are the
    Euclidean distances from each boundary pixel of P to the nearest boundary pixel of T, and
    hd95 = max(q95(d(P->T)), q95(d(T->P))) with linearly interpolated quantiles. It is computed
    for a whole chunk at once (one exact KD-tree nearest-neighbour query, as MONAI does per image)
    because MONAI's per-image loop is 7.5x slower (benchmarks/metrics_speed.py); a test checks
    the two agree. In pixels, or in the units of ``spacing`` (one number, or one per spatial axis).
``pearson_r``
    The pixel-wise Pearson correlation between the binary prediction and the truth of each image
    (the phi coefficient, computed in closed form from the confusion counts:
    (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); a test checks it against
    ``torchmetrics.functional.pearson_corrcoef``).

Empty-mask conventions (never NaN or inf)
-----------------------------------------
``diag`` is the image diagonal, sqrt(sum_i (size_i * spacing_i)^2).

=================================  ====  ===  =========  ======  =====  =========================
case                               dice  iou  precision  recall  hd95   pearson_r
=================================  ====  ===  =========  ======  =====  =========================
both empty                         1     1    1          1       0      1
prediction empty, truth not        0     0    0          0       diag   0
truth empty, prediction not        0     0    0          0       diag   0
=================================  ====  ===  =========  ======  =====  =========================

pearson_r is undefined whenever the prediction or the truth is constant (empty *or* full); then
r = 1 if the prediction equals the truth exactly (e.g. both full), else 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import KDTree
from torch import Tensor

__all__ = [
    "PAPER_METRICS",
    "HIGHER_IS_BETTER",
    "BOUNDED",
    "validate_metrics",
    "per_image_metrics",
    "per_item_metrics",
]

#: the metrics of the SPE paper, in its order
PAPER_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95", "pearson_r")

#: whether a larger value is better
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True,
    "iou": True,
    "precision": True,
    "recall": True,
    "hd95": False,
    "pearson_r": True,
}

#: the range of each metric, (lower, upper); None = unbounded on that side
BOUNDED: dict[str, tuple[float | None, float | None]] = {
    "dice": (0.0, 1.0),
    "iou": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "hd95": (0.0, None),
    "pearson_r": (-1.0, 1.0),
}

_COUNT_METRICS = frozenset({"dice", "iou", "precision", "recall", "pearson_r"})


def validate_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """``metrics`` as a tuple of known metric names (a single string means one metric).

    Raises ValueError when it is empty, holds duplicates, or names unknown metrics.
    """
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise ValueError(f"metrics must name at least one of {PAPER_METRICS}; got an empty list.")
    unknown = [m for m in names if not isinstance(m, str) or m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid metrics are {PAPER_METRICS}.")
    dupes = sorted({m for m in names if names.count(m) > 1})
    if dupes:
        raise ValueError(f"duplicate metric(s) {dupes} in {list(names)}.")
    return names


def _spatial(x: Tensor) -> Tensor:
    """``[N,1,*S]`` or ``[N,*S]`` (2 or 3 spatial dims) -> ``[N,*S]``."""
    if x.ndim in (4, 5) and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim not in (3, 4):
        raise ValueError(
            "masks must be [N, 1, *spatial] or [N, *spatial] with 2 or 3 spatial dimensions; "
            f"got shape {tuple(x.shape)}."
        )
    return x


def _as_bool(x: Tensor, name: str) -> Tensor:
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1), got a complex tensor.")
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        example = x[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1) but holds other values (e.g. {example}); "
            f"threshold it first, e.g. `{name} > 0.5`."
        )
    return x != 0


def _spacing(spacing: float | Sequence[float] | None, nd: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * nd
    if isinstance(spacing, (int, float)):
        sp = (float(spacing),) * nd
    else:
        sp = tuple(float(s) for s in spacing)
        if len(sp) == 1:
            sp = sp * nd
    if len(sp) != nd:
        raise ValueError(f"spacing must be one number or {nd} numbers (one per spatial axis); got {spacing!r}.")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite; got {spacing!r}.")
    return sp


def _boundary(m: Tensor) -> Tensor:
    """Foreground pixels of ``m`` ``[N,*S]`` with a face neighbour in the background or outside the image.

    The same as ``m ^ scipy.ndimage.binary_erosion(m)`` per image (cross structuring element, zero border),
    which is what MONAI uses.
    """
    nd = m.ndim - 1
    q = F.pad(m.to(torch.uint8), (1, 1) * nd)  # the outside is background
    centre = (slice(None),) + (slice(1, -1),) * nd
    inner = torch.ones_like(m, dtype=torch.uint8)
    for d in range(1, nd + 1):
        for shift in (slice(None, -2), slice(2, None)):
            idx = list(centre)
            idx[d] = shift
            inner &= q[tuple(idx)]
    return m & (inner == 0)


def _grouped_quantile(values: np.ndarray, group: np.ndarray, n_groups: int, q: float) -> np.ndarray:
    """The ``q`` quantile (linear interpolation, as numpy/torch) of ``values`` per ``group`` (none empty)."""
    order = np.lexsort((values, group))
    v = values[order]
    counts = np.bincount(group, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    pos = q * (counts - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    a, b = v[starts + lo], v[starts + hi]
    return a + (pos - lo) * (b - a)


def _hd95_boundaries(pe: np.ndarray, te: np.ndarray, spacing: tuple[float, ...], diag: float) -> np.ndarray:
    """hd95 per image of the non-empty boundary masks ``pe``, ``te`` ``[K,*S]``.

    All images at once: one KD-tree over the boundary coordinates, with the image index as an extra
    coordinate spaced more than ``diag`` apart so that a nearest neighbour is always in the same image.
    """
    k = pe.shape[0]
    scale = np.asarray((2.0 * diag + 1.0, *spacing))
    pc, tc = np.argwhere(pe), np.argwhere(te)
    pxy, txy = pc * scale, tc * scale
    d_pt = KDTree(txy, leafsize=32).query(pxy, k=1)[0]
    d_tp = KDTree(pxy, leafsize=32).query(txy, k=1)[0]
    return np.maximum(_grouped_quantile(d_pt, pc[:, 0], k, 0.95), _grouped_quantile(d_tp, tc[:, 0], k, 0.95))


def _hd95(pred: Tensor, target: Tensor, spacing: tuple[float, ...]) -> Tensor:
    n = pred.shape[0]
    p_any = pred.flatten(1).any(1)
    t_any = target.flatten(1).any(1)
    diag = math.sqrt(sum((s * sp) ** 2 for s, sp in zip(pred.shape[1:], spacing)))
    out = torch.zeros(n, dtype=torch.float64)
    out[p_any ^ t_any] = diag
    both = torch.nonzero(p_any & t_any).flatten()
    if len(both):
        pe = _boundary(pred[both]).numpy()
        te = _boundary(target[both]).numpy()
        out[both] = torch.from_numpy(_hd95_boundaries(pe, te, spacing, diag))
    return out


def _count_metrics(pred: Tensor, target: Tensor, metrics: Sequence[str]) -> dict[str, Tensor]:
    p, t = pred.flatten(1), target.flatten(1)
    # uint8 with int32 sums is ~15x faster than summing bools (int64) on CPU; int32 holds any image size
    p8, t8 = p.view(torch.uint8), t.view(torch.uint8)
    tp = (p8 & t8).sum(1, dtype=torch.int32).cpu().double()
    n_p = p8.sum(1, dtype=torch.int32).cpu().double()
    n_t = t8.sum(1, dtype=torch.int32).cpu().double()
    size = float(p.shape[1])
    fp, fn = n_p - tp, n_t - tp
    both_empty = (n_p == 0) & (n_t == 0)
    equal = (fp == 0) & (fn == 0)

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        # 0/0 happens only when a mask is empty: 1 if both are, else 0
        return torch.where(den > 0, num / den.clamp_min(1), both_empty.double())

    out: dict[str, Tensor] = {}
    for m in metrics:
        if m == "dice":
            out[m] = ratio(2 * tp, 2 * tp + fp + fn)
        elif m == "iou":
            out[m] = ratio(tp, tp + fp + fn)
        elif m == "precision":
            out[m] = ratio(tp, n_p)
        elif m == "recall":
            out[m] = ratio(tp, n_t)
        elif m == "pearson_r":
            mp, mt = n_p / size, n_t / size
            var = mp * (1 - mp) * mt * (1 - mt)
            r = (tp / size - mp * mt) / var.clamp_min(1e-300).sqrt()
            out[m] = torch.where(var > 0, r.clamp(-1.0, 1.0), equal.double())
    return out


def per_image_metrics(
    pred: Tensor,
    target: Tensor,
    metrics: str | Sequence[str] = PAPER_METRICS,
    spacing: float | Sequence[float] | None = None,
    chunk_size: int = 64,
) -> dict[str, Tensor]:
    """Per-image ``metrics`` of binary masks ``pred`` against ``target``; see the module docstring.

    Args:
        pred, target: binary masks (bool or 0/1), ``[N, 1, *spatial]`` or ``[N, *spatial]``, 2D or 3D,
            the same shape; on any device (hd95 is computed on the CPU).
        metrics: names from ``PAPER_METRICS``.
        spacing: pixel size for hd95, one number or one per spatial axis (default 1: pixels).
        chunk_size: images processed at a time, to bound memory.

    Returns:
        ``{metric: float64 CPU tensor [N]}`` in the order of ``metrics``.
    """
    names = validate_metrics(metrics)
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape; got pred {tuple(pred.shape)} and target {tuple(target.shape)}."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    pred, target = _spatial(pred), _spatial(target)
    sp = _spacing(spacing, pred.ndim - 1)

    parts: dict[str, list[Tensor]] = {m: [] for m in names}
    counted = [m for m in names if m in _COUNT_METRICS]
    for start in range(0, pred.shape[0], chunk_size):
        # validated and converted chunk by chunk, so no full-size temporary is made
        p = _as_bool(pred[start : start + chunk_size], "pred")
        t = _as_bool(target[start : start + chunk_size], "target").to(p.device)
        if counted:
            for m, v in _count_metrics(p, t, counted).items():
                parts[m].append(v)
        if "hd95" in parts:
            parts["hd95"].append(_hd95(p.cpu(), t.cpu(), sp))
    empty = torch.zeros(0, dtype=torch.float64)
    return {m: torch.cat(v) if v else empty.clone() for m, v in parts.items()}


def per_item_metrics(
    pred: Sequence[Tensor],
    target: Sequence[Tensor],
    metrics: str | Sequence[str] = PAPER_METRICS,
    select: Callable[[Tensor], Tensor] | None = None,
    chunk_size: int = 32,
) -> dict[str, Tensor]:
    """:func:`per_image_metrics` of two lists of masks whose sizes may differ between items.

    Items of one size are stacked and measured in chunks of ``chunk_size``; ``select(mask)`` picks
    the binary mask of each (e.g. one class of a label map; default: the mask as it is). Returns
    ``{metric: float64 [n]}`` in item order.
    """
    if len(pred) != len(target):
        raise ValueError(f"{len(pred)} predicted masks but {len(target)} targets.")
    names = validate_metrics(metrics)
    out = {m: torch.zeros(len(pred), dtype=torch.float64) for m in names}
    groups: dict[tuple[int, ...], list[int]] = {}  # items of different sizes cannot be stacked
    for i, m in enumerate(pred):
        groups.setdefault(tuple(m.shape), []).append(i)
    pick = select or (lambda m: m)
    for idx in groups.values():
        for start in range(0, len(idx), chunk_size):
            chunk = idx[start : start + chunk_size]
            res = per_image_metrics(
                pick(torch.stack([pred[i] for i in chunk])), pick(torch.stack([target[i] for i in chunk])), names
            )
            for name, v in res.items():
                out[name][chunk] = v.double()
    return out
