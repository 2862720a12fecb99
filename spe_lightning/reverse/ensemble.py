"""Ensembles of weight-free reverse segmenters: the mean of their foreground probabilities."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from spe_lightning.reverse.base import ReverseSegmenter, make_segmenter, register_segmenter

__all__ = ["EnsembleSegmenter", "fusion_ridge"]


class EnsembleSegmenter(ReverseSegmenter):
    """Averages the probabilities of several segmenters (each prepared once per support set).

    Args:
        members: segmenters to average.
        weights: one non-negative weight per member (default: equal).
        chunk_size: queries per step.
    """

    def __init__(
        self, members: list[ReverseSegmenter], weights: list[float] | None = None, chunk_size: int = 32
    ) -> None:
        super().__init__(chunk_size)
        if not members:
            raise ValueError("An ensemble needs at least one member.")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("Need one non-negative weight per member, not all zero.")
        self.members, self.weights = members, [w / sum(weights) for w in weights]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "members": [m.spec() for m in self.members], "weights": self.weights}

    def prepare(self, support_images: Tensor, support_labels: Tensor) -> Any:
        return [m.prepare(support_images, support_labels) for m in self.members]

    def predict(self, query_images: Tensor, prepared: Any) -> Tensor:
        out = None
        for m, w, p in zip(self.members, self.weights, prepared):
            prob = m.predict(query_images, p).float().clamp(0.0, 1.0) * w
            out = prob if out is None else out + prob
        assert out is not None  # __init__ refuses an ensemble without members
        return out


@register_segmenter("fusion_ridge")
def fusion_ridge(chunk_size: int = 32, fusion_weight: float = 0.5, **fusion_kwargs: Any) -> EnsembleSegmenter:
    """Mean of ``label_fusion`` (registration-free patch fusion) and ``pixel_ridge`` (calibrated filter-bank ridge)."""
    seg = EnsembleSegmenter(
        [make_segmenter("label_fusion", **fusion_kwargs), make_segmenter("pixel_ridge")],
        weights=[fusion_weight, 1.0 - fusion_weight],
        chunk_size=chunk_size,
    )
    seg.name = "fusion_ridge"
    return seg
