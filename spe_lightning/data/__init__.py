"""Batch adapters and the datasets used by the demo, the CLI and the benchmarks."""

from spe_lightning.data.adapters import as_tensor, binarize_mask, split_item, to_gray01
from spe_lightning.data.folder import FolderSegmentationDataModule, FolderSegmentationDataset, read_meta
from spe_lightning.data.synthetic import SyntheticShapesDataModule, SyntheticShapesDataset, make_phantom

__all__ = [
    "FolderSegmentationDataModule",
    "FolderSegmentationDataset",
    "SyntheticShapesDataModule",
    "SyntheticShapesDataset",
    "as_tensor",
    "binarize_mask",
    "make_phantom",
    "read_meta",
    "split_item",
    "to_gray01",
]
