"""In-context (reverse) segmenters: UniverSeg and weight-free alternatives. Plain PyTorch."""

from spe_lightning.reverse.base import (
    CallableSegmenter,
    ReverseSegmenter,
    available_segmenters,
    downloads_allowed,
    make_segmenter,
    register_segmenter,
    resolve_auto,
    segmenter_from_text,
)

# Weight-free segmenters (each module registers itself on import).
from spe_lightning.reverse.ensemble import EnsembleSegmenter  # noqa: E402
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter  # noqa: E402  (keep after base)
from spe_lightning.reverse.learned import LearnedPropagationSegmenter  # noqa: E402
from spe_lightning.reverse.pixel_classifiers import PixelKNNSegmenter, PixelRidgeSegmenter  # noqa: E402
from spe_lightning.reverse.universeg import UniverSeg, UniverSegSegmenter

__all__ = [
    "CallableSegmenter",
    "EnsembleSegmenter",
    "LabelFusionSegmenter",
    "LearnedPropagationSegmenter",
    "PixelKNNSegmenter",
    "PixelRidgeSegmenter",
    "ReverseSegmenter",
    "UniverSeg",
    "UniverSegSegmenter",
    "available_segmenters",
    "downloads_allowed",
    "make_segmenter",
    "register_segmenter",
    "resolve_auto",
    "segmenter_from_text",
]
