"""``spe-lightning benchmark shift``: the paper protocol's training, then estimates on shifted copies of
``extra_test`` (and other sites) with the final weights, every method and signal scored."""

from __future__ import annotations

import time
from typing import Any

from spe_lightning.benchmarking.paper import paper_result, with_regressor, write_result
from spe_lightning.benchmarking.regressor import regressor_means
from spe_lightning.benchmarking.scoring import shift_scores
from spe_lightning.benchmarking.selection import selection_scores
from spe_lightning.benchmarking.signals import all_signal_combination, all_signal_rows, measure_signals, pair_errors
from spe_lightning.benchmarking.targets import measure, set_features, shift_targets
from spe_lightning.benchmarking.training import BenchmarkConfig, train
from spe_lightning.engine.records import CALIBRATION

__all__ = ["run_shift"]


def run_shift(cfg: BenchmarkConfig, out: str | None = None) -> dict[str, Any]:
    """Train as :func:`run_paper`, then estimate shifted versions of ``extra_test`` with the final weights.

    The result holds the paper-protocol scores too (same training), the raw measurements per
    target, the calibration set's final record and the product's calibration pairs (measured by
    the run at fit end, as the callback ships them), and every method's estimates (:func:`shift_scores`).
    """
    model, dm, callbacks, weights, total = train(cfg)
    result, regressor = with_regressor(paper_result(cfg, callbacks, total), model, dm, callbacks, weights)
    start = time.perf_counter()
    targets = shift_targets(callbacks[0].run, dm, cfg.seed)
    sites = [name for name, _ in cfg.targets]
    targets.update({name: callbacks[0].run.sets[name] for name in sites})  # another site: its own rows
    result["site_targets"] = sites
    raw: dict[str, Any] = {}
    signals = measure_signals(callbacks[0].run, model, targets, weights, regressor)  # the new signals (issue 23)
    for s, cb in zip(cfg.segmenters, callbacks):
        last = cb.run.records[-1]
        raw[s] = {
            "calibration": {k: last.to_dict()[k][CALIBRATION] for k in ("pseudo", "real", "confidence")},
            "targets": measure(cb.run, model, targets),
            "pairs": cb.run.pairs,
        }
        if s == cfg.segmenters[0]:  # the label-free features behind the nearest-set flag, scored per target
            raw[s]["features"] = set_features(cb.run, list(targets))
        if s == cfg.segmenters[0]:  # the per-case quality regressor's mean estimate per target (issue 17)
            raw[s]["quality_regressor"] = regressor_means(regressor, model, targets)
            # and on the calibration pairs' sets (development data), to choose its combination with SPE
            dev = regressor_means(regressor, model, cb.run.pair_sets())
            raw[s]["quality_regressor"]["dev_means"] = dev["means"]
            raw[s]["quality_regressor"]["heldout_dev_means"] = signals.pop("regressor_heldout_means")
            raw[s].update(signals)
        print(f"[shift] {s}: {len(targets)} targets evaluated; {len(raw[s]['pairs'])} calibration pairs")
    result["timing"]["shift_eval_s"] = time.perf_counter() - start
    result["shift_raw"] = raw
    result.update(shift_scores(result))
    result["pair_errors"] = pair_errors(result)
    result["all_signals"] = all_signal_combination(result)
    all_signal_rows(result)
    # the benchmark's own signal work (a styled pair for every benchmark target, the snapshots' masks) and the
    # product's (one styled pair per run target, the masks kept at each record) for the same run
    result["timing"]["signals_s"] = raw[cfg.segmenters[0]].get("seconds", {})
    result["timing"]["product_signals_s"] = dict(callbacks[0].run.signal_seconds)
    result["timing"]["product_spe_s"] = callbacks[0].run.seconds - sum(callbacks[0].run.signal_seconds.values())
    result["selection"] = selection_scores(result)
    write_result(result, out)
    return result
