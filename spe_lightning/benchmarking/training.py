"""What one benchmark run trains (:class:`BenchmarkConfig`) and the training itself: the reference model with
one SPECallback per reverse segmenter, the weights of every recorded checkpoint kept for later rows."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from spe_lightning.benchmarking.selection import SelectionTargets
from spe_lightning.callback import SPECallback
from spe_lightning.data import FolderSegmentationDataModule
from spe_lightning.models import SegmentationModel
from spe_lightning.reverse.base import segmenter_from_text

__all__ = ["BenchmarkConfig", "train", "WeightSnapshots"]


@dataclass(frozen=True)
class BenchmarkConfig:
    """What one benchmark run trains and how SPE is set up (shared by :func:`run_paper` and :func:`run_shift`).

    ``segmenters``: ``"auto"`` or ``"name[:key=value,...]"`` each; the first one is the ``spe`` row.
    """

    data: str
    class_index: int = 1
    epochs: int = 30
    seed: int = 0
    segmenters: tuple[str, ...] = ("auto",)
    image_size: int = 128
    lr: float = 1e-3
    batch_size: int = 8
    support_size: int | None = None  # None: each segmenter's own (see SPECallback)
    max_references: int | None = None
    accelerator: str = "auto"
    log_dir: str = "spe_runs/benchmark"
    #: other sites as extra targets, ``(name, root)``: every split under the root, scored beside extra_test
    targets: tuple[tuple[str, str], ...] = ()
    select_every: int = 0  # shift: measure the selection targets at every k-th epoch (0: off)
    styling: str = "v1"  # the target-styled sets' recipe (SPEConfig.styling); the recorded runs use the default


def train(cfg: BenchmarkConfig) -> tuple[Any, Any, list[Any], dict[int, Any], float]:
    """Train the reference model with one SPECallback per segmenter: ``(model, datamodule, callbacks,
    weights by recorded epoch, seconds)``."""
    pl.seed_everything(cfg.seed)
    dm = FolderSegmentationDataModule(
        cfg.data,
        class_index=cfg.class_index,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        target_splits=["extra_test"],
        extra_targets=dict(cfg.targets),
    )
    callbacks = [
        SPECallback(
            segmenter=s if s == "auto" else segmenter_from_text(s),
            support_size=cfg.support_size,
            max_references=cfg.max_references,
            seed=cfg.seed,
            styling=cfg.styling,
            verbose=i == 0,
        )
        for i, s in enumerate(cfg.segmenters)
    ]
    if cfg.select_every > 0:  # the selection targets join the first segmenter's records at every k-th epoch
        run = callbacks[0].run
        run.record_hooks.append(SelectionTargets(run, dm, cfg.seed, cfg.select_every))
    snapshots = WeightSnapshots(callbacks[0])  # for the quality regressor's row per checkpoint (issue 17)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=1,
        logger=TensorBoardLogger(cfg.log_dir, name=Path(cfg.data).name),
        callbacks=[*callbacks, snapshots],  # Lightning appends its own callbacks to this list
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    model = SegmentationModel(lr=cfg.lr)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return model, dm, callbacks, snapshots.weights, time.perf_counter() - start


class WeightSnapshots(Callback):
    """Benchmark only: a copy of the model's weights (CPU tensors, by epoch) at every epoch ``spe`` (an
    SPECallback) recorded, for the quality regressor's row per checkpoint."""

    def __init__(self, spe: SPECallback) -> None:
        self.spe = spe
        self.weights: dict[int, dict[str, Any]] = {}

    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the weights when ``spe`` has just recorded this epoch."""
        epoch, records = trainer.current_epoch, self.spe.run.records
        if records and records[-1].epoch == epoch and epoch not in self.weights:
            self.weights[epoch] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.take(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.take(trainer, pl_module)
