"""One SPE evaluation: support sets from predicted masks, the reverse step, pseudo and real metrics."""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spe_lightning.data.adapters import resize_masks
from spe_lightning.engine.metrics import per_image_metrics
from spe_lightning.engine.predict import CachedSet
from spe_lightning.reverse.base import ReverseSegmenter

__all__ = ["SPEEngine", "SupportSet", "set_seed"]


def set_seed(seed: int, name: str) -> int:
    """A stable per-set seed (independent of Python's hash randomisation)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


@dataclass
class SupportSet:
    """The support of one reverse step: working-size images, predicted masks and their dataset positions."""

    images: Tensor  # [S,1,w,w]
    labels: Tensor  # [S,1,w,w] float {0,1}
    indices: list[int]


def _mean(values: Tensor) -> float | None:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else None


class SPEEngine:
    """Computes the pseudo metrics of a set of predictions by reverse segmentation.

    The queries are a fixed reference subset (labelled); for every set the support candidates
    are visited in one fixed seeded order, so successive checkpoints reuse the same support
    images whenever their predicted masks are usable. Supports whose predicted mask has fewer
    than ``min_foreground`` pixels (at the working size) are dropped, as in the SPE paper.

    Args:
        segmenter: the reverse (in-context) segmenter.
        reference: labelled reference set (queries of the reverse step).
        metrics: metric names (see :mod:`spe_lightning.engine.metrics`).
        support_size: maximum support images per reverse step (paper: 64).
        min_foreground: minimum predicted foreground pixels for a support mask.
        threshold: binarisation threshold of the reverse probabilities.
        seed: seed of the support orders.
    """

    def __init__(
        self,
        segmenter: ReverseSegmenter,
        reference: CachedSet,
        metrics: Sequence[str],
        support_size: int = 64,
        min_foreground: int = 16,
        threshold: float = 0.5,
        seed: int = 0,
    ) -> None:
        if reference.masks is None:
            raise ValueError("The SPE reference set needs ground-truth masks.")
        self.segmenter = segmenter
        self.metrics = tuple(metrics)
        self.support_size, self.min_foreground = support_size, min_foreground
        self.threshold, self.seed = threshold, seed
        size = tuple(reference.gray.shape[-2:])
        self.ref_images = reference.gray
        self.ref_masks = torch.cat([resize_masks(m[None], size) for m in reference.masks])
        self.ref_indices = list(reference.indices)

    def support(self, data: CachedSet, masks: Sequence[Tensor]) -> SupportSet:
        """The support set of ``data`` with predicted ``masks`` (native size, bool ``[1,H,W]``)."""
        size = tuple(data.gray.shape[-2:])
        g = torch.Generator().manual_seed(set_seed(self.seed, data.name))
        order = torch.randperm(len(data), generator=g).tolist()
        chosen: list[int] = []
        labels: list[Tensor] = []
        for i in order:
            m = resize_masks(masks[i][None], size)
            if int(m.sum()) >= self.min_foreground:
                chosen.append(i)
                labels.append(m)
                if len(chosen) == self.support_size:
                    break
        if not chosen:
            return SupportSet(data.gray[:0], data.gray[:0], [])
        return SupportSet(data.gray[chosen], torch.cat(labels).float(), [data.indices[i] for i in chosen])

    def reverse_metrics(self, support: SupportSet, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Per-reference metrics of the reverse segmentation from ``support``."""
        probs = self.segmenter(self.ref_images.to(device), support.images.to(device), support.labels.to(device))
        pred = (probs > self.threshold).cpu()
        return per_image_metrics(pred, self.ref_masks, self.metrics)

    def pseudo(self, data: CachedSet, masks: Sequence[Tensor], device: torch.device | str = "cpu") -> dict[str, Any]:
        """``{"values": {metric: float|None}, "n_support": int, "reason": str|None}`` for one set."""
        support = self.support(data, masks)
        if not support.indices:
            reason = f"no predicted mask in '{data.name}' has >= {self.min_foreground} foreground pixels"
            return {"values": dict.fromkeys(self.metrics), "n_support": 0, "reason": reason}
        per_ref = self.reverse_metrics(support, device)
        return {"values": {m: _mean(v) for m, v in per_ref.items()}, "n_support": len(support.indices), "reason": None}

    def real(self, data: CachedSet, masks: Sequence[Tensor]) -> dict[str, float | None] | None:
        """Mean real metrics of predicted ``masks`` against ``data``'s masks (None when unlabelled)."""
        if data.masks is None:
            return None
        values: dict[str, list[Tensor]] = {m: [] for m in self.metrics}
        # group by size: images of different sizes cannot be stacked
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, m in enumerate(masks):
            groups.setdefault(tuple(m.shape), []).append(i)
        for idx in groups.values():
            res = per_image_metrics(
                torch.stack([masks[i] for i in idx]), torch.stack([data.masks[i] for i in idx]), self.metrics
            )
            for k, v in res.items():
                values[k].append(v)
        return {k: _mean(torch.cat(v)) for k, v in values.items()}

    def evaluate(
        self,
        predictions: Mapping[str, tuple[CachedSet, Sequence[Tensor], Tensor]],
        device: torch.device | str = "cpu",
    ) -> dict[str, Any]:
        """One record: ``predictions`` maps set name -> (data, predicted masks, per-image confidence)."""
        start = time.perf_counter()
        record: dict[str, Any] = {"pseudo": {}, "real": {}, "confidence": {}, "n_support": {}, "reasons": {}}
        for name, (data, masks, conf) in predictions.items():
            res = self.pseudo(data, masks, device)
            record["pseudo"][name] = res["values"]
            record["n_support"][name] = res["n_support"]
            if res["reason"]:
                record["reasons"][name] = res["reason"]
            real = self.real(data, masks)
            if real is not None:
                record["real"][name] = real
            record["confidence"][name] = _mean(conf)
        record["seconds"] = time.perf_counter() - start
        return record
