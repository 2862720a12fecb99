"""Batch adapters and the datasets used by the demo, the CLI and the benchmarks.

The adapters are plain PyTorch; the datasets/datamodules (which need Lightning) load lazily, so
the engine can import the adapters without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from spe_lightning.data.adapters import as_tensor, binarize_mask, split_item, to_gray01

_LAZY = {
    "FolderSegmentationDataModule": "spe_lightning.data.folder",
    "FolderSegmentationDataset": "spe_lightning.data.folder",
    "read_meta": "spe_lightning.data.folder",
    "SyntheticShapesDataModule": "spe_lightning.data.synthetic",
    "SyntheticShapesDataset": "spe_lightning.data.synthetic",
    "make_phantom": "spe_lightning.data.synthetic",
}

__all__ = ["as_tensor", "binarize_mask", "split_item", "to_gray01", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spe_lightning.data' has no attribute {name!r}")
