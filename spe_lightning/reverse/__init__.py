"""In-context (reverse) segmenters: UniverSeg and weight-free alternatives. Plain PyTorch."""

from spe_lightning.reverse.base import (
    CallableSegmenter,
    ReverseSegmenter,
    available_segmenters,
    downloads_allowed,
    make_segmenter,
    register_segmenter,
    resolve_auto,
)
from spe_lightning.reverse.universeg import UniverSeg, UniverSegSegmenter

# Weight-free segmenters (each module registers itself on import).
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter  # noqa: E402  (keep after base)

__all__ = [
    "CallableSegmenter",
    "LabelFusionSegmenter",
    "ReverseSegmenter",
    "UniverSeg",
    "UniverSegSegmenter",
    "available_segmenters",
    "downloads_allowed",
    "make_segmenter",
    "register_segmenter",
    "resolve_auto",
]
