"""The benchmark harness of ``spe-lightning benchmark`` (the SPE paper's protocol, the shift benchmark).

Not part of the package's import path: nothing in ``spe_lightning`` imports it but the ``benchmark``
subcommand, and it adds nothing to SPE itself. Modules: ``training`` (:class:`BenchmarkConfig`, the training
run), ``paper`` (the paper protocol), ``targets`` (the shift benchmark's targets), ``shift`` (the shift
benchmark), ``scoring`` (its scores and summaries), ``selection`` (checkpoint selection, the record hook),
``signals`` (the label-free signals beside SPE), ``regressor`` (the quality regressor's rows), ``cli``
(arguments and printed tables). The public names below are importable from here.
"""

from __future__ import annotations

from spe_lightning.benchmarking.cli import main
from spe_lightning.benchmarking.paper import paper_metrics, run_paper, score_on_common_checkpoints, score_records
from spe_lightning.benchmarking.regressor import fit_regressor, regressor_by_checkpoint
from spe_lightning.benchmarking.scoring import shift_scores
from spe_lightning.benchmarking.selection import SelectionTargets, selection_scores
from spe_lightning.benchmarking.shift import run_shift
from spe_lightning.benchmarking.signals import all_signal_combination, all_signal_rows, pair_errors, weight_grid
from spe_lightning.benchmarking.targets import selection_targets, shift_targets
from spe_lightning.benchmarking.training import BenchmarkConfig, WeightSnapshots

__all__ = [
    "BenchmarkConfig",
    "WeightSnapshots",
    "main",
    "run_paper",
    "run_shift",
    "paper_metrics",
    "score_records",
    "score_on_common_checkpoints",
    "shift_scores",
    "shift_targets",
    "selection_targets",
    "selection_scores",
    "SelectionTargets",
    "pair_errors",
    "all_signal_combination",
    "all_signal_rows",
    "weight_grid",
    "fit_regressor",
    "regressor_by_checkpoint",
]
