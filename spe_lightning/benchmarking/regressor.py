"""The per-case quality regressor's rows of the benchmark: fitted once at the final weights (as a user fits it
after training), then its mean per-case Dice estimate per checkpoint and per target."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from spe_lightning.engine.records import CALIBRATION
from spe_lightning.estimator import fit_estimator, with_case_scorer
from spe_lightning.percase.regressor import RegressorScorer

__all__ = ["fit_regressor", "regressor_mean", "regressor_by_checkpoint", "regressor_means"]


def fit_regressor(run: Any, model: Any, datamodule: Any, settings: Any = None) -> tuple[Any, float]:
    """The per-case quality regressor fitted on the run's references, calibrated on its calibration set at
    ``model``'s weights (as the callback does at fit end): ``(estimator, seconds)``. ``settings``: a
    :class:`~spe_lightning.percase.regressor.QualitySettings` (None: the product's)."""
    start = time.perf_counter()
    reference = datamodule.spe_datasets()["reference"]
    est = fit_estimator(run.outcome(), None)  # the run's artifact without per-case calibration
    est = with_case_scorer(est, model, RegressorScorer(settings), run.sets[CALIBRATION], reference)
    return est, time.perf_counter() - start


def regressor_mean(est: Any, model: Any, data: Any) -> float | None:
    rows = est.case_estimates(model, data)
    values = [r.estimated_dice for r in rows if r.estimated_dice is not None]
    return float(np.mean(values)) if values else None


def regressor_by_checkpoint(est: Any, model: Any, run: Any, weights: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The quality regressor's mean per-case Dice estimate of every target of ``run`` at each recorded
    checkpoint (``weights`` by epoch), for the paper protocol's ``quality_regressor`` row. The regressor is
    fitted once, at the final weights, as a user fits it after training; ``model`` ends at its final weights."""
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = {n: d for n, d in run.sets.items() if n != CALIBRATION}
    means: dict[str, list[float | None]] = {n: [] for n in targets}
    epochs = sorted(weights)
    try:
        for epoch in epochs:
            model.load_state_dict(weights[epoch])
            for n, data in targets.items():
                means[n].append(regressor_mean(est, model, data))
    finally:
        model.load_state_dict(final)
    return {"epochs": epochs, "means": means}


def regressor_means(regressor: tuple[Any, float], model: Any, targets: dict[str, Any]) -> dict[str, Any]:
    """Per target, the mean of the fitted quality regressor's per-case Dice estimates, with its fit's seconds."""
    est, fit_s = regressor
    return {"means": {name: regressor_mean(est, model, data) for name, data in targets.items()}, "fit_s": fit_s}
