"""spe-lightning: estimate segmentation performance on unlabelled data during Lightning training.

Implements SPE (Zou et al., "Performance Estimation for Supervised Medical Image Segmentation
Models on Unlabeled Data Using UniverSeg", MICCAI 2025) as a Lightning callback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SPECallback", "SPEConfig", "SPEEstimator", "SPERun", "make_segmenter", "__version__"]

# Lazy: importing the engine or the segmenters should not pay for importing Lightning.
_LAZY = {
    "SPECallback": "spe_lightning.callback",
    "SPEConfig": "spe_lightning.config",
    "SPEEstimator": "spe_lightning.estimator",
    "SPERun": "spe_lightning.run",
    "make_segmenter": "spe_lightning.reverse",
}

if TYPE_CHECKING:
    from spe_lightning.callback import SPECallback
    from spe_lightning.config import SPEConfig
    from spe_lightning.estimator import SPEEstimator
    from spe_lightning.reverse import make_segmenter
    from spe_lightning.run import SPERun


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spe_lightning' has no attribute {name!r}")
