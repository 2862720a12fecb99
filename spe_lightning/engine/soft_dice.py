"""Soft Dice Confidence (SDC; Borges, Pacheco & Silva, arXiv 2402.10665, 2024): a label-free Dice estimate per case.

For a case with foreground probabilities ``p`` and the model's own thresholded mask ``y_hat``,

    SDC = 2 * sum(p * y_hat) / (sum(p) + sum(y_hat))

the soft Dice between the soft prediction and its own hard mask. Under conditional independence of the
pixels it approximates the expected Dice of ``y_hat`` against a truth drawn from ``p`` (the paper bounds the
ratio to the intractable optimum close to 1), with no tuning and no held-out data. A case where both sums are
0 (nothing predicted, no probability mass) scores 1: an empty prediction of an empty case.

SPE reports it as a baseline (``soft_dice_confidence``): per case as is, per set the mean over cases (the
paper's estimate of the set's mean Dice). The ``confidence`` baseline is the same per-case score mapped by a
G fitted across checkpoints on the calibration set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["soft_dice_confidence", "set_soft_dice_confidence"]


def soft_dice_confidence(prob: Tensor, mask: Tensor) -> Tensor:
    """Per-case SDC ``float32 [B]`` of foreground probabilities ``prob`` ``[B,...]`` in [0, 1] and the model's
    own hard masks ``mask`` (same shape; bool or 0/1). 1 where both are empty."""
    if prob.shape != mask.shape:
        raise ValueError(f"prob {tuple(prob.shape)} and mask {tuple(mask.shape)} must have the same shape.")
    p = prob.float().flatten(1)
    m = mask.float().flatten(1)
    inter = (p * m).sum(1)
    denom = p.sum(1) + m.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-8), torch.ones_like(denom))


def set_soft_dice_confidence(per_case: Sequence[float] | Tensor) -> float | None:
    """The set-level SDC: the mean of the finite per-case values (None when there are none)."""
    v = torch.as_tensor(per_case, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else None
