"""``spe-lightning fit / validate / test / predict``: LightningCLI over any LightningModule and LightningDataModule."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

# registered by import so that LightningCLI finds our datamodules and model by their short names too
import spe_lightning.data.folder  # noqa: F401
import spe_lightning.data.synthetic  # noqa: F401
import spe_lightning.models  # noqa: F401

__all__ = ["cli", "SPELightningCLI"]


class SPELightningCLI(LightningCLI):
    """LightningCLI whose class-instantiation errors (a misspelt or invalid value) are one line and exit 2."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            root: BaseException = err
            while root.__cause__ is not None:  # jsonargparse wraps the class's own error in a union error
                root = root.__cause__
            cmd = f"spe-lightning {self.subcommand}" if self.subcommand else "spe-lightning"
            print(f"{cmd}: error: {root}", file=sys.stderr)
            raise SystemExit(2) from None


def cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI over any LightningModule (e.g. :class:`~spe_lightning.models.SegmentationModel`) and any
    LightningDataModule, both given by class path (``--model my.module.Net``, ``--data my.module.Data``).

    Add SPE from YAML (``trainer.callbacks: [{class_path: spe_lightning.SPECallback, init_args: ...}]``)
    or from flags (``--trainer.callbacks+=spe_lightning.SPECallback --trainer.callbacks.config.every_n_epochs=2``).
    """
    return SPELightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )
