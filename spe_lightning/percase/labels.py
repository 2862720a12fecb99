"""A few labelled target cases: their real metrics, the prediction-powered estimates, and suggested cases.

The glue between :class:`~spe_lightning.SPEEstimator`'s per-case rows and :mod:`spe_lightning.percase.ppi`:
:func:`labelled_estimates` turns the masks of some cases into the prediction-powered mean of every metric
of :data:`PPI_METRICS` (the per-case estimated Dice as predictions) with the
labelled-only interval beside it; :func:`suggest_labels` draws the cases to label by the stratified design
and returns it as a plain dict (saved with the suggestions, given back with the labels).

Plain PyTorch/NumPy; no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from spe_lightning.engine.metrics import per_item_metrics
from spe_lightning.percase.ppi import (
    LabelDesign,
    ppi_mean,
    stratified_design,
    stratified_ppi_mean,
    uncertainty_of,
)
from spe_lightning.percase.scorer import CaseRow, case_rows

__all__ = [
    "MIN_LABELS",
    "PPI_METRICS",
    "label_positions",
    "metric_predictions",
    "ppi_alerts",
    "labelled_estimates",
    "labelled_metrics",
    "suggest_labels",
]

#: the fewest labels a prediction-powered interval is computed from (the tuned lambda needs 3)
MIN_LABELS = 3
#: what the predictions of each metric are, as reported
PREDICTIONS = "per-case estimated Dice (IoU: d / (2 - d); precision and recall: the estimated Dice itself)"
UNCERTAINTY = "sqrt(d (1 - d)) of the per-case estimated Dice d, at least 0.05"


#: the metrics a prediction-powered estimate is made for from the per-case estimated Dice
PPI_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall")


def metric_predictions(metric: str, estimated_dice: ArrayLike) -> np.ndarray:
    """Per-case predictions of ``metric`` from SPE's per-case estimated Dice ``d``.

    IoU is ``d / (2 - d)`` (exact per case for a binary mask); precision and recall have no per-case
    estimate of their own, so the estimated Dice stands in for them: any fixed predictor keeps the
    interval valid, and the tuned ``lambda`` gives a poor one little weight.
    """
    d = np.asarray(estimated_dice, dtype=float).reshape(-1)
    if not np.all(np.isfinite(d)):
        raise ValueError(
            f"estimated_dice has {int((~np.isfinite(d)).sum())} non-finite values; PPI needs a number per case."
        )
    d = np.clip(d, 0.0, 1.0)
    if metric == "iou":
        return d / (2.0 - d)
    if metric in ("dice", "precision", "recall"):
        return d
    raise ValueError(f"no per-case prediction for {metric!r}; PPI covers {PPI_METRICS}.")


def ppi_alerts(
    estimates: dict[str, dict[str, Any]],
    alert_below: dict[str, float] | None = None,
    alert_above: dict[str, float] | None = None,
    **context: Any,
) -> list[dict[str, Any]]:
    """Events where a prediction-powered interval lies wholly beyond a threshold.

    ``estimates`` is ``{target: {metric: {"value", "lower", "upper"}}}``. ``alert_below={"dice": 0.8}``
    fires when the *upper* bound is below 0.8 (the labels show the drop at the interval's level),
    ``alert_above`` when the lower bound is above. Events have the fields of
    :func:`~spe_lightning.monitoring.alerts.alerts_for`'s, with ``alert_on="ppi_interval"``.
    """
    events: list[dict[str, Any]] = []
    for direction, thresholds in (("below", alert_below), ("above", alert_above)):
        for key, threshold in (thresholds or {}).items():
            for target, per_key in estimates.items():
                e = per_key.get(key) or {}
                v = e.get("upper" if direction == "below" else "lower")
                if v is None or not (v < threshold if direction == "below" else v > threshold):
                    continue
                events.append(
                    {
                        "target": target,
                        "metric": key,
                        "value": e.get("value"),
                        "lower": e.get("lower"),
                        "upper": e.get("upper"),
                        "compared": float(v),
                        "threshold": float(threshold),
                        "direction": direction,
                        "alert_on": "ppi_interval",
                        **context,
                    }
                )
    return events


def label_positions(labelled_masks: Mapping[Any, Tensor], ids: Sequence[str]) -> dict[int, Tensor]:
    """``{position: mask}`` of masks keyed by case id (str) or position (int); unknown keys are an error."""
    where = {str(c): i for i, c in enumerate(ids)}
    out: dict[int, Tensor] = {}
    unknown = []
    for key, mask in labelled_masks.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            pos = int(key) if 0 <= int(key) < len(ids) else None
        else:
            pos = where.get(str(key))
        if pos is None:
            unknown.append(key)
        elif pos in out:
            raise ValueError(f"case {ids[pos]!r} is labelled twice (by id and by position).")
        else:
            out[pos] = torch.as_tensor(mask)
    if unknown:
        raise ValueError(
            f"labelled masks for {len(unknown)} case(s) not among the images, e.g. {unknown[:3]}; key them by the "
            "case ids (the ids passed to estimate, else positions 0..N-1)."
        )
    return dict(sorted(out.items()))


def labelled_metrics(predicted: Sequence[Tensor], labels: Mapping[int, Tensor], ids: Sequence[str]) -> dict[str, Any]:
    """Real Dice, IoU, precision and recall of the labelled cases (foreground: any non-zero value).

    A mask may be ``[H,W]`` or ``[1,H,W]``; its size must be the predicted mask's (the image's)."""
    preds, truths = [], []
    for pos, mask in labels.items():
        pred = predicted[pos]
        m = mask[None] if mask.ndim == pred.ndim - 1 else mask
        if tuple(m.shape) != tuple(pred.shape):
            raise ValueError(
                f"the labelled mask of case {ids[pos]!r} is {tuple(mask.shape)}; the image (and its prediction) is "
                f"{tuple(pred.shape[1:])}: give the mask at the image's size."
            )
        preds.append(pred)
        truths.append(m)
    if not preds:
        return {m: np.zeros(0) for m in PPI_METRICS}
    got = per_item_metrics(preds, truths, PPI_METRICS, select=lambda x: x > 0)
    return {m: got[m].double().numpy() for m in PPI_METRICS}


def _estimated_dice(cases: Sequence[CaseRow]) -> tuple[np.ndarray, int]:
    """Per-case estimated Dice, a missing one replaced by the mean of the others (a stand-in fixed before
    any label is seen, so the interval stays valid); and how many were missing."""
    d = np.array([np.nan if c.estimated_dice is None else c.estimated_dice for c in cases], dtype=float)
    missing = ~np.isfinite(d)
    if missing.all():
        return d, int(missing.sum())
    d[missing] = float(np.mean(d[~missing]))
    return d, int(missing.sum())


def labelled_estimates(
    cases: Sequence[CaseRow | Mapping[str, Any]],
    predicted: Sequence[Tensor],
    labels: Mapping[int, Tensor],
    level: float,
    design: Mapping[str, Any] | None = None,
    positions: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The prediction-powered estimate of every metric over the cases at ``positions`` (default: all).

    Args:
        cases: every case's :class:`~spe_lightning.percase.scorer.CaseRow` (``estimated_dice`` is the prediction;
            ``id`` names the case; plain dict rows are read with ``CaseRow.from_dict``).
        predicted: every case's predicted mask.
        labels: ``{position: mask}`` of the labelled cases (:func:`label_positions`).
        level: the intervals' coverage.
        design: the suggestions dict of :func:`suggest_labels` when the labelled cases are exactly its
            suggested ones (stratified estimator); None: they are a uniform random sample (see
            :mod:`spe_lightning.percase.ppi`).
        positions: the population (e.g. one chunk's cases); labels outside it are not used.

    Returns ``{"n_labels", "n_cases", "design", "level", "ids", "predictions", "n_missing_estimates",
    "metrics": {metric: PPIResult.to_dict()} , "reason"}``; with fewer than :data:`MIN_LABELS` labels,
    or no per-case estimate at all, ``metrics`` holds only the labelled-only mean (and ``reason`` says why).
    """
    rows = case_rows(cases)
    ids = [c.id for c in rows]
    pop = list(range(len(rows))) if positions is None else [int(p) for p in positions]
    in_pop = set(pop)
    lab = {p: m for p, m in labels.items() if p in in_pop}
    real = labelled_metrics(predicted, lab, ids)
    est, n_missing = _estimated_dice([rows[p] for p in pop])
    out: dict[str, Any] = {
        "n_labels": len(lab),
        "n_cases": len(pop),
        "design": "uniform" if design is None else "stratified",
        "level": level,
        "ids": [ids[p] for p in lab],
        "predictions": PREDICTIONS,
        "n_missing_estimates": n_missing,
        "metrics": {},
        "reason": None,
    }
    if len(lab) < MIN_LABELS:
        out["reason"] = f"{len(lab)} labelled case(s); a prediction-powered interval needs at least {MIN_LABELS}"
        out["metrics"] = {m: {"labelled_mean": float(v.mean()) if v.size else None} for m, v in real.items()}
        return out
    local = {p: i for i, p in enumerate(pop)}
    lab_local = np.array([local[p] for p in lab], dtype=int)
    if n_missing == len(pop):
        out["reason"] = "no per-case estimated Dice (per-case scores not calibrated): only the labelled-only mean"
        out["metrics"] = {m: {"labelled_mean": float(v.mean())} for m, v in real.items()}
        return out
    strata = None
    if design is not None:
        strata = _design_strata(design, ids, pop, [ids[p] for p in lab])
    for m in PPI_METRICS:
        f = metric_predictions(m, est)
        if strata is not None:
            res = stratified_ppi_mean(f, strata, lab_local, real[m], level)
        else:
            unl = np.setdiff1d(np.arange(len(pop)), lab_local)
            res = ppi_mean(f[unl], f[lab_local], real[m], level)
        out["metrics"][m] = res.to_dict()
    return out


def _design_strata(design: Mapping[str, Any], ids: Sequence[str], pop: Sequence[int], labelled: Sequence[str]) -> Any:
    """The strata of a suggestions dict, checked against these cases and labels."""
    d_ids = [str(i) for i in design.get("ids", [])]
    if d_ids != [ids[p] for p in pop]:
        raise ValueError(
            "the label design was drawn for other cases (its ids differ from these images'); draw the suggestions "
            "again for these images, or drop the design to treat the labels as a uniform random sample."
        )
    chosen = set(map(str, design.get("chosen_ids", [])))
    if chosen != set(labelled):
        extra, absent = sorted(set(labelled) - chosen), sorted(chosen - set(labelled))
        raise ValueError(
            "the labelled cases are not the suggested ones (the stratified interval needs exactly them): "
            f"{len(extra)} labelled but not suggested (e.g. {extra[:3]}), {len(absent)} suggested but not labelled "
            f"(e.g. {absent[:3]})."
        )
    return LabelDesign.from_dict(dict(design)).strata


def suggest_labels(
    cases: Sequence[CaseRow | Mapping[str, Any]], k: int, seed: int = 0, n_strata: int | None = None
) -> dict[str, Any]:
    """The ``k`` cases to label, drawn by the stratified design of :func:`~spe_lightning.percase.ppi.stratified_design`
    on the per-case estimated Dice's uncertainty; a plain dict to save and give back with the labels."""
    rows = case_rows(cases)
    ids = [c.id for c in rows]
    est, n_missing = _estimated_dice(rows)
    if n_missing == len(ids):
        raise ValueError(
            "suggesting cases needs per-case estimated Dice; this estimator's per-case scores are not calibrated "
            "(a finished run's run.estimator, or with_case_scorer(est, model, est.rca_scorer(), calibration))."
        )
    design = stratified_design(uncertainty_of(est), k, n_strata=n_strata, seed=seed)
    return {
        "design": "stratified",
        "rule": design.rule,
        "uncertainty": UNCERTAINTY,
        "k": int(k),
        "seed": int(seed),
        "ids": ids,
        "strata": design.strata,
        "allocation": design.allocation,
        "chosen": design.chosen,
        "chosen_ids": [ids[i] for i in design.chosen],
        "guarantee": "label exactly these cases and pass this design back with their masks: the interval assumes "
        "this random draw (stratified by uncertainty, uniform within strata); cases picked by hand void it",
    }
