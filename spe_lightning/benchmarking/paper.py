"""``spe-lightning benchmark paper``: the SPE paper's evaluation protocol on a folder dataset.

Train the reference model on ``ROOT/train`` with SPE (reference = train without augmentation,
calibration = ``ROOT/test``, target = ``ROOT/extra_test``, whose masks only score the result),
then compare estimated and real extra_test metrics across the recorded checkpoints for SPE
(one row per reverse segmenter) and for the baselines a user would try instead:

- ``calibration_score``: extra_test scores what the calibration split scores at that checkpoint;
- ``confidence``: the model's soft-Dice confidence on the target, mapped by a G of the same kind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from spe_lightning.benchmarking.regressor import fit_regressor, regressor_by_checkpoint
from spe_lightning.benchmarking.training import BenchmarkConfig, train
from spe_lightning.engine.metrics import PAPER_METRICS
from spe_lightning.engine.records import CALIBRATION, Record, as_records, fit_and_estimate, fit_mapping, series

__all__ = [
    "checkpoint_series",
    "score_on_common_checkpoints",
    "score_records",
    "paper_result",
    "paper_metrics",
    "with_regressor",
    "write_result",
    "run_paper",
]


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def error_scores(est: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    if est.size == 0:
        return {"pearson_r": None, "mae": None, "final_abs_error": None}
    ok = np.isfinite(est) & np.isfinite(real)
    return {
        "pearson_r": pearson(est, real),
        "mae": float(np.mean(np.abs(est[ok] - real[ok]))) if ok.any() else None,
        "final_abs_error": float(abs(est[-1] - real[-1])) if np.isfinite(est[-1]) and np.isfinite(real[-1]) else None,
    }


def checkpoint_series(
    records: Sequence[Record] | Sequence[Mapping[str, Any]],
    target: str,
    metrics: Sequence[str],
    mapping: str = "linear",
    anchored: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Per metric, the per-checkpoint estimate of SPE, the calibration score and the confidence, and the truth
    (stored JSON records are read once with :func:`~spe_lightning.engine.records.as_records`)."""
    records = as_records(records)
    fitted = fit_and_estimate(records, [target], metrics, mapping, anchored=anchored)
    conf_cal = series(records, "confidence", CALIBRATION, None)
    conf_t = series(records, "confidence", target, None)
    out: dict[str, dict[str, np.ndarray]] = {}
    for m in metrics:
        by_ckpt = fitted["by_checkpoint"][target].get(m) or [None] * len(records)  # absent when G could not fit
        cal = series(records, "real", CALIBRATION, m)
        g_conf, _ = fit_mapping(mapping, conf_cal, cal, m)
        out[m] = {
            "spe": np.asarray([np.nan if v is None else v for v in by_ckpt], dtype=float),
            "calibration_score": cal,
            "confidence": g_conf.predict(conf_t) if g_conf else np.full(len(records), np.nan),
            "real": series(records, "real", target, m),
        }
    return out


def score_on_common_checkpoints(rows: dict[str, np.ndarray], real: np.ndarray) -> dict[str, dict[str, Any]]:
    """Every method scored on the same checkpoints: those where the truth and every method have a value.

    A method without a value somewhere would otherwise be scored on easier checkpoints (e.g. SPE has
    none while no predicted mask is usable early in training); each row says how many were used.
    """
    ok = np.isfinite(real)
    for values in rows.values():
        if np.isfinite(values).any():  # a method never measured on this target (e.g. a selection target
            ok &= np.isfinite(values)  # measured for the first segmenter only) has no row, not an empty scoring
    n = len(real)
    # the final checkpoint keeps its place at the end: final_abs_error is still the last common checkpoint
    return {
        k: {**error_scores(v[ok], real[ok]), "n_scored": int(ok.sum()), "n_checkpoints": n}
        for k, v in rows.items()
        if np.isfinite(v).any()
    }


def score_records(
    records: Sequence[Record] | Sequence[Mapping[str, Any]],
    target: str,
    metrics: Sequence[str],
    mapping: str = "linear",
    anchored: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per metric: SPE / calibration_score / confidence vs the target's real metric, on common checkpoints."""
    out = {}
    for m, rows in checkpoint_series(records, target, metrics, mapping, anchored).items():
        real = rows.pop("real")
        out[m] = score_on_common_checkpoints(rows, real)
    return out


def paper_result(cfg: BenchmarkConfig, callbacks: list, total: float) -> dict[str, Any]:
    segmenters = list(cfg.segmenters)
    spe_s = sum(r.seconds for cb in callbacks for r in cb.records)
    result: dict[str, Any] = {
        "dataset": Path(cfg.data).name,
        "class_index": cfg.class_index,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "log_dir"},
        "metrics": {},
        "segmenters": segmenters,
        "timing": {
            "train_s": total - spe_s,
            "spe_s": spe_s,
            "spe_s_per_checkpoint": {
                s: float(np.mean([r.seconds for r in cb.records])) for s, cb in zip(segmenters, callbacks)
            },
        },
    }
    result["records"] = {s: [r.to_dict() for r in cb.records] for s, cb in zip(segmenters, callbacks)}  # JSON
    return paper_metrics(result)


def paper_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """Fill ``result["metrics"]`` (extra_test), ``metrics_by_target`` (every target) and ``real_dice_range``.

    Rows: ``spe`` (the callback's default, anchored), ``spe_paper`` (the paper's G(pseudo)),
    ``spe_huber`` / ``spe_isotonic`` (anchored with those kinds of G), ``spe_<segmenter>`` for
    extra segmenters, ``calibration_score``, ``confidence`` and, for Dice when measured,
    ``quality_regressor`` (mean per-case estimate); all scored on the same checkpoints.
    """
    segs = list(result["records"])
    first = as_records(result["records"][segs[0]])  # stored JSON records, or the run's own
    targets = [t for t in first[-1].pseudo if t != "calibration"]
    main = "extra_test" if "extra_test" in targets else targets[0]  # the protocol's target
    real_dice = [v for r in first if (v := r.real.get(main, {}).get("dice")) is not None]
    result["real_dice_range"] = [min(real_dice), max(real_dice)] if real_dice else [None, None]
    result["metrics_by_target"] = {}
    for target in targets:
        series_by_row: dict[str, dict[str, np.ndarray]] = {}  # metric -> row -> value per checkpoint
        for i, s in enumerate(segs):
            for m, rows in checkpoint_series(result["records"][s], target, PAPER_METRICS).items():
                table = series_by_row.setdefault(m, {"real": rows["real"]})
                table["spe" if i == 0 else f"spe_{s}"] = rows["spe"]
                if i == 0:
                    table["calibration_score"] = rows["calibration_score"]
                    table["confidence"] = rows["confidence"]
        for m, rows in checkpoint_series(first, target, PAPER_METRICS, anchored=False).items():
            series_by_row[m]["spe_paper"] = rows["spe"]
        for kind in ("huber", "isotonic"):
            for m, rows in checkpoint_series(first, target, PAPER_METRICS, kind).items():
                series_by_row[m][f"spe_{kind}"] = rows["spe"]
        by_ckpt = result.get("quality_regressor_by_checkpoint")
        if by_ckpt and target in by_ckpt["means"] and "dice" in series_by_row:  # the regressor estimates Dice only
            at = dict(zip(by_ckpt["epochs"], by_ckpt["means"][target]))
            values = [at.get(r.epoch) for r in first]
            series_by_row["dice"]["quality_regressor"] = np.asarray([np.nan if v is None else v for v in values])
        scored = {}
        for m, rows in series_by_row.items():
            real = rows.pop("real")
            scored[m] = score_on_common_checkpoints(rows, real)
        result["metrics_by_target"][target] = scored
    result["metrics"] = result["metrics_by_target"][main]
    return result


def write_result(result: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))


def with_regressor(
    result: dict[str, Any], model: Any, datamodule: Any, callbacks: list, weights: dict[int, Any]
) -> tuple[dict[str, Any], tuple[Any, float]]:
    """Add the quality regressor's per-checkpoint means (``quality_regressor_by_checkpoint``) and its row;
    returns the result and ``(fitted regressor, fit seconds)`` for the shift targets."""
    spe = callbacks[0]
    est, fit_s = fit_regressor(spe.run, model, datamodule)
    start = time.perf_counter()
    result["quality_regressor_by_checkpoint"] = {
        **regressor_by_checkpoint(est, model, spe.run, weights),
        "fit_s": fit_s,
        "eval_s": time.perf_counter() - start,
    }
    return paper_metrics(result), (est, fit_s)


def run_paper(cfg: BenchmarkConfig, out: str | None = None) -> dict[str, Any]:
    """Run the paper protocol; returns (and writes to ``out``) the JSON result."""
    model, dm, callbacks, weights, total = train(cfg)
    result, _ = with_regressor(paper_result(cfg, callbacks, total), model, dm, callbacks, weights)
    write_result(result, out)
    return result
