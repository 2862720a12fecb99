"""The ``spe-lightning`` command: LightningCLI subcommands (fit, validate, ...) plus SPE's own tools."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

__all__ = ["main", "cli"]

COMMANDS = """\
spe-lightning: train a segmentation model with SPE, and apply a saved SPE estimator.

commands:
  fit, validate, test, predict   LightningCLI over any LightningModule and any LightningDataModule
                                 (spe-lightning fit --help); add SPE with --trainer.callbacks+=spe_lightning.SPECallback
  estimate                       estimate a trained model's metrics on a folder of unlabelled images
                                 with a saved spe_estimator.pt (spe-lightning estimate --help)
  benchmark                      the paper's protocol and the shift benchmark (spe-lightning benchmark --help)
  --version                      print the installed spe-lightning version
"""


class _CLI(LightningCLI):
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
    import spe_lightning.data.folder  # noqa: F401  (our datamodules and model by short name too)
    import spe_lightning.data.synthetic  # noqa: F401
    import spe_lightning.models  # noqa: F401

    return _CLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def _tool(name: str, fn: object, argv: list[str]) -> None:
    """Run ``estimate`` / ``benchmark``: an input problem is one line on stderr and exit status 2."""
    try:
        fn(argv)  # type: ignore[operator]
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"spe-lightning {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``spe-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        from spe_lightning import __version__

        print(f"spe-lightning {__version__}")
        return
    if not args or args[0] in ("-h", "--help"):
        print(COMMANDS)
        if not args:
            raise SystemExit(2)
    if args and args[0] == "benchmark":
        from spe_lightning.benchmark import main as benchmark_main

        _tool("benchmark", benchmark_main, args[1:])
        return
    if args and args[0] == "estimate":
        from spe_lightning.estimate_cli import main as estimate_main

        _tool("estimate", estimate_main, args[1:])
        return
    from spe_lightning.class_paths import find_missing_class_paths

    for problem in find_missing_class_paths(args):  # before LightningCLI's long "does not validate" error
        print(f"spe-lightning {args[0]}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    from spe_lightning.lightning.settings import find_moved_settings

    moved = find_moved_settings(args)  # SPE's settings live under the callback's `config` now
    if moved:
        print(f"spe-lightning {args[0]}: error: {moved}", file=sys.stderr)
        raise SystemExit(2)
    cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
