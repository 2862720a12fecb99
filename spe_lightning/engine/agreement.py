"""Checkpoint agreement: how much the model's masks of a set agree across its last K recorded checkpoints.

SPE already predicts every target at every recorded checkpoint. :class:`MaskHistory` keeps, per set, the
foreground masks of the last ``k`` checkpoints (bit-packed: one bit per pixel, so the demo's 64-px sets cost
``k * n * 512`` bytes and JSRT's 128-px sets ``k * n * 2 KiB``), and :func:`pairwise_agreement` scores each
case by the mean pairwise Dice between those masks (cf. the pairwise-Dice ensembles of Zenk et al., MedIA
2025): where checkpoints disagree, the model is unsure of that case, a signal SPE's reverse step does not see.

:func:`fit_agreement_map` calibrates it on the calibration set's cases at the final checkpoint (least-squares
line of real Dice on agreement, slope >= 0), and :func:`agreement_estimate` turns a target's set-level
agreement into a Dice estimate anchored at the calibration score:
``real_calibration + slope * (agreement_target - agreement_calibration)``.
Several classes: the agreement of the foreground (any class).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["AGREEMENT_K", "MaskHistory", "agreement_estimate", "fit_agreement_map", "pairwise_agreement"]

#: the checkpoints whose masks are kept per set (the agreement needs at least 2)
AGREEMENT_K = 3


def _pack(mask: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    m = (mask > 0).reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(m)), tuple(int(s) for s in mask.shape)


def _unpack(packed: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    return np.unpackbits(packed.numpy(), count=n).astype(bool)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s  # both empty: they agree


def pairwise_agreement(masks_by_checkpoint: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Per case, the mean Dice over every pair of checkpoints' masks (``masks_by_checkpoint[c][i]``: case
    ``i`` at checkpoint ``c``, flat bool); NaN for every case with fewer than 2 checkpoints."""
    if not masks_by_checkpoint:
        return np.zeros(0)
    n = len(masks_by_checkpoint[0])
    if any(len(ms) != n for ms in masks_by_checkpoint):
        raise ValueError("every checkpoint needs a mask of every case.")
    if len(masks_by_checkpoint) < 2:
        return np.full(n, np.nan)
    pairs = list(itertools.combinations(range(len(masks_by_checkpoint)), 2))
    return np.asarray(
        [np.mean([_dice(masks_by_checkpoint[a][i], masks_by_checkpoint[b][i]) for a, b in pairs]) for i in range(n)]
    )


class MaskHistory:
    """The foreground masks of the last ``k`` checkpoints per set, bit-packed (bounded memory).

    Args:
        k: checkpoints kept per set (>= 2).
    """

    def __init__(self, k: int = AGREEMENT_K) -> None:
        if int(k) < 2:
            raise ValueError(f"MaskHistory: k must be at least 2 (agreement compares checkpoints), got {k!r}.")
        self.k = int(k)
        self._sets: dict[str, deque[tuple[int, list[tuple[Tensor, tuple[int, ...]]]]]] = {}

    def push(self, name: str, masks: Sequence[Tensor], epoch: int) -> None:
        """Keep ``masks`` (one per case; bool or label maps: foreground = > 0) of set ``name`` at ``epoch``.
        A set whose number of cases changed starts over."""
        hist = self._sets.setdefault(name, deque(maxlen=self.k))
        if hist and len(hist[-1][1]) != len(masks):
            hist.clear()
        hist.append((int(epoch), [_pack(m) for m in masks]))

    def epochs(self, name: str) -> list[int]:
        """The epochs whose masks of ``name`` are kept, oldest first."""
        return [e for e, _ in self._sets.get(name, ())]

    def per_case(self, name: str) -> np.ndarray:
        """Each case's mean pairwise Dice over the kept checkpoints (NaN with fewer than 2)."""
        hist = self._sets.get(name)
        if not hist:
            return np.zeros(0)
        return pairwise_agreement([[_unpack(p, s) for p, s in masks] for _, masks in hist])

    def agreement(self, name: str) -> float | None:
        """Set-level agreement: the mean over cases of :meth:`per_case` (None with fewer than 2 checkpoints)."""
        v = self.per_case(name)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else None

    def latest(self, name: str) -> list[Tensor]:
        """The newest kept foreground masks of ``name`` (bool tensors of their original shapes)."""
        hist = self._sets.get(name)
        return [] if not hist else [torch.from_numpy(_unpack(p, s).reshape(s)) for p, s in hist[-1][1]]

    @property
    def nbytes(self) -> int:
        """Memory held by the packed masks."""
        return sum(int(p.numel()) for hist in self._sets.values() for _, masks in hist for p, _ in masks)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, ints and uint8 tensors (``torch.load(..., weights_only=True)`` reads them)."""
        return {
            "k": self.k,
            "sets": {
                name: [
                    {"epoch": e, "masks": [p for p, _ in masks], "shapes": [list(s) for _, s in masks]}
                    for e, masks in hist
                ]
                for name, hist in self._sets.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the newest ``k`` checkpoints of each set are kept)."""
        self._sets = {}
        for name, entries in dict(state.get("sets", {})).items():
            hist: deque[tuple[int, list[tuple[Tensor, tuple[int, ...]]]]] = deque(maxlen=self.k)
            for entry in entries:
                masks = [
                    (torch.as_tensor(p, dtype=torch.uint8), tuple(int(v) for v in s))
                    for p, s in zip(entry["masks"], entry["shapes"])
                ]
                hist.append((int(entry["epoch"]), masks))
            self._sets[str(name)] = hist


def fit_agreement_map(agreement: Sequence[float] | np.ndarray, real: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The line ``real Dice ~ intercept + slope * agreement`` over calibration cases (least squares; a negative
    or undefined slope is set to 0, i.e. the estimate stays at the calibration score), with the means it is
    anchored at: ``{"slope", "agreement_calibration", "real_calibration", "n_cases"}``."""
    a = np.asarray(agreement, dtype=float).reshape(-1)
    y = np.asarray(real, dtype=float).reshape(-1)
    if a.shape != y.shape:
        raise ValueError(f"{a.size} agreement values but {y.size} real Dice values.")
    ok = np.isfinite(a) & np.isfinite(y)
    a, y = a[ok], y[ok]
    if a.size == 0:
        return {"slope": None, "agreement_calibration": None, "real_calibration": None, "n_cases": 0}
    va = float(((a - a.mean()) ** 2).sum())
    slope = float(((a - a.mean()) * (y - y.mean())).sum()) / va if va > 1e-12 else 0.0
    return {
        "slope": max(slope, 0.0),
        "agreement_calibration": float(a.mean()),
        "real_calibration": float(y.mean()),
        "n_cases": int(a.size),
    }


def agreement_estimate(fit: Mapping[str, Any], agreement: float | None) -> float | None:
    """A target's Dice from its set-level ``agreement`` and :func:`fit_agreement_map` (clipped to [0, 1])."""
    if agreement is None or fit.get("slope") is None or not np.isfinite(agreement):
        return None
    v = float(fit["real_calibration"]) + float(fit["slope"]) * (float(agreement) - float(fit["agreement_calibration"]))
    return float(np.clip(v, 0.0, 1.0))
