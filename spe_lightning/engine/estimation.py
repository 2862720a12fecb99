"""Fitting G on the calibration records and turning target pseudo metrics into estimates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spe_lightning.engine.mapping import Mapping, NotEnoughPointsError
from spe_lightning.engine.metrics import BOUNDED

__all__ = ["CALIBRATION", "fit_and_estimate", "fit_mapping", "finite_or_none", "series"]

#: the record key of the calibration set
CALIBRATION = "calibration"


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when finite, else None (reports never hold NaN or inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def series(records: Sequence[dict], kind: str, name: str, metric: str | None) -> np.ndarray:
    """``records[i][kind][name][metric]`` (or ``[kind][name]`` when metric is None) as floats, NaN where missing."""
    out = []
    for r in records:
        v = r.get(kind, {}).get(name)
        if metric is not None:
            v = None if v is None else v.get(metric)
        out.append(np.nan if v is None else float(v))
    return np.asarray(out, dtype=float)


def fit_mapping(kind: str, x: np.ndarray, y: np.ndarray, metric: str) -> tuple[Mapping | None, str | None]:
    """``(G, None)`` fitted within the metric's bounds, or ``(None, reason)`` when too few points."""
    try:
        # per-class keys ("dice/heart") have the bounds of their metric
        bounds = BOUNDED.get(metric, BOUNDED.get(metric.split("/")[0], (None, None)))
        return Mapping.fit(kind, x, y, bounds=bounds), None
    except NotEnoughPointsError as err:
        return None, str(err)


def fit_and_estimate(
    records: Sequence[dict],
    targets: Sequence[str],
    metrics: Sequence[str],
    mapping: str = "linear",
    level: float = 0.9,
) -> dict[str, Any]:
    """Fit G per metric (calibration pseudo -> real, one point per record) and estimate every target.

    Returns a JSON-safe dict with ``mapping``, ``estimates`` (at the last record: value, lower,
    upper, pseudo, reason), ``by_checkpoint`` (estimate per record), ``true`` (targets with
    masks, at the last record) and ``baselines`` (``calibration_score``: the calibration metric
    at the same record; ``confidence``: the model's soft-Dice confidence mapped by a G of the
    same kind fitted on calibration).
    """
    last = len(records) - 1
    out: dict[str, Any] = {
        "mapping": {},
        "estimates": {t: {} for t in targets},
        "by_checkpoint": {t: {} for t in targets},
        "true": {},
        "baselines": {"calibration_score": {t: {} for t in targets}, "confidence": {t: {} for t in targets}},
        "level": level,
        "n_records": len(records),
    }
    conf_cal = series(records, "confidence", CALIBRATION, None)
    for metric in metrics:
        x = series(records, "pseudo", CALIBRATION, metric)
        y = series(records, "real", CALIBRATION, metric)
        g, why = fit_mapping(mapping, x, y, metric)
        out["mapping"][metric] = g.to_dict() if g else {"kind": mapping, "error": why}
        g_conf, _ = fit_mapping(mapping, conf_cal, y, metric)
        for t in targets:
            xt = series(records, "pseudo", t, metric)
            est: dict[str, Any] = {"value": None, "lower": None, "upper": None, "pseudo": None, "reason": None}
            if last >= 0:
                est["pseudo"] = finite_or_none(xt[last])
            if g is None:
                est["reason"] = f"no mapping G: {why}"
                cal_reason = (records[last].get("reasons", {}) if last >= 0 else {}).get(CALIBRATION)
                if cal_reason:  # why the calibration set gave no pseudo metric
                    est["reason"] += f" (calibration: {cal_reason})"
            elif est["pseudo"] is None:
                reason = (records[last].get("reasons", {}) if last >= 0 else {}).get(t)
                est["reason"] = f"no pseudo {metric} at the last checkpoint" + (f" ({reason})" if reason else "")
            else:
                lo, hi = g.interval([est["pseudo"]], level)
                est.update(
                    value=finite_or_none(g.predict([est["pseudo"]])[0]),
                    lower=finite_or_none(lo[0]),
                    upper=finite_or_none(hi[0]),
                )
            out["estimates"][t][metric] = est
            if g is not None:
                ok = np.isfinite(xt)
                vals = np.full(len(xt), np.nan)
                if ok.any():
                    vals[ok] = g.predict(xt[ok])
                out["by_checkpoint"][t][metric] = [finite_or_none(v) for v in vals]
            out["baselines"]["calibration_score"][t][metric] = finite_or_none(y[last]) if last >= 0 else None
            ct = series(records, "confidence", t, None)
            conf_val = None
            if g_conf is not None and last >= 0 and np.isfinite(ct[last]):
                conf_val = finite_or_none(g_conf.predict([ct[last]])[0])
            out["baselines"]["confidence"][t][metric] = conf_val
            true = series(records, "real", t, metric)
            if last >= 0 and np.isfinite(true[last]):
                out["true"].setdefault(t, {})[metric] = float(true[last])
    return out
