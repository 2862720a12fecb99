"""The demo config and the overrides that make it a few-second fit, shared by the tests that run it."""

from __future__ import annotations

from pathlib import Path

#: the shipped demo config (configs/synthetic.yaml)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
#: overrides that shrink the demo to 3 epochs of 32-px phantoms
SMALL = [
    "--trainer.max_epochs=3",
    "--trainer.enable_progress_bar=false",
    "--data.n_train=24",
    "--data.n_val=12",
    "--data.n_target=8",
    "--data.size=32",
]
#: SPE settings that halve such a fit where the test checks the command's plumbing, not the estimates: the
#: working size of the 32-px phantoms, one shift family and 16 references (117 s -> 60 s for one fit, loaded)
CHEAP_SPE = [
    "--trainer.callbacks.init_args.config.working_size=32",
    "--trainer.callbacks.init_args.config.interval_shifts=[noise]",
    "--trainer.callbacks.init_args.config.max_references=16",
]
