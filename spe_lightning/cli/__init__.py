"""The ``spe-lightning`` command: LightningCLI subcommands (fit, validate, ...) plus SPE's own tools.

- ``fit``, ``validate``, ``test``, ``predict``: :mod:`spe_lightning.cli.fit` (LightningCLI);
- ``estimate``: :mod:`spe_lightning.cli.estimate` (a saved estimator on a folder of images);
- ``benchmark``: :mod:`spe_lightning.benchmarking` (the paper's protocol and the shift benchmark).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from spe_lightning import __version__
from spe_lightning.class_paths import find_missing_class_paths
from spe_lightning.cli.estimate import main as estimate_main
from spe_lightning.cli.fit import cli
from spe_lightning.lightning.settings import find_moved_settings

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


def _tool(name: str, fn: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Run ``estimate`` / ``benchmark``: an input problem is one line on stderr and exit status 2."""
    try:
        fn(argv)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"spe-lightning {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``spe-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        print(f"spe-lightning {__version__}")
        return
    if not args or args[0] in ("-h", "--help"):
        print(COMMANDS)
        if not args:
            raise SystemExit(2)
    if args and args[0] == "benchmark":
        # deliberately lazy: the benchmark harness is no part of the package's import path (nothing else
        # imports spe_lightning.benchmarking); only this subcommand loads it
        from spe_lightning.benchmarking.cli import main as benchmark_main

        _tool("benchmark", benchmark_main, args[1:])
        return
    if args and args[0] == "estimate":
        _tool("estimate", estimate_main, args[1:])
        return
    for problem in find_missing_class_paths(args):  # before LightningCLI's long "does not validate" error
        print(f"spe-lightning {args[0]}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    moved = find_moved_settings(args)  # SPE's settings live under the callback's `config` now
    if moved:
        print(f"spe-lightning {args[0]}: error: {moved}", file=sys.stderr)
        raise SystemExit(2)
    cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
