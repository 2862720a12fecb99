"""The benchmarks' reference model: ``SegmentationModel`` trained on ``<root>/train`` without SPE, checkpointed.

One Trainer set-up shared by the per-case and coverage benchmarks (percase_busi.py, percase_quality.py,
ppi_coverage.py), so they train the same model the same way: 128 px, batch 8, seeded, CPU, no logger.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def train_reference_model(
    root: str | Path,
    ckpt: Path,
    epochs: int,
    seed: int,
    class_index: int = 1,
    lr: float = 1e-3,
    callbacks: Sequence[Any] = (),
) -> float:
    """Train on ``root/train`` for ``epochs`` (seeded), save the checkpoint at ``ckpt``; the seconds it took."""
    import lightning.pytorch as pl

    from spe_lightning.data import FolderSegmentationDataModule
    from spe_lightning.models import SegmentationModel
    from spe_lightning.testing import tiny_trainer

    pl.seed_everything(seed)
    dm = FolderSegmentationDataModule(
        str(root), class_index=class_index, image_size=128, batch_size=8, target_splits=[]
    )
    # the Trainer of every benchmark (no logger, checkpointing or progress bar); Lightning's default sanity check
    trainer = tiny_trainer(ckpt.parent, epochs, list(callbacks), num_sanity_val_steps=2)
    start = time.perf_counter()
    trainer.fit(SegmentationModel(lr=lr), datamodule=dm)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(ckpt)
    return time.perf_counter() - start
