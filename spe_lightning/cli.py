"""The ``spe-lightning`` command: LightningCLI subcommands (fit, validate, ...) plus SPE's own tools."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from spe_lightning.models import SegmentationModel

__all__ = ["main", "cli"]


def cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI over :class:`SegmentationModel` (or any LightningModule) and any datamodule.

    Add SPE from YAML (``trainer.callbacks: [{class_path: spe_lightning.SPECallback, init_args: ...}]``)
    or from flags (``--trainer.callbacks+=spe_lightning.SPECallback --trainer.callbacks.every_n_epochs=2``).
    """
    return LightningCLI(
        SegmentationModel,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``spe-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "benchmark":
        from spe_lightning.benchmark import main as benchmark_main

        benchmark_main(args[1:])
        return
    if args and args[0] == "estimate":
        from spe_lightning.estimate_cli import main as estimate_main

        estimate_main(args[1:])
        return
    cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
