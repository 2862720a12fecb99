"""``python -m spe_lightning.cli``: the ``spe-lightning`` command."""

from spe_lightning.cli import main

main()
