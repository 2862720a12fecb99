"""Fitting G on the calibration records and turning target pseudo metrics into estimates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spe_lightning.engine.mapping import Mapping, NotEnoughPointsError
from spe_lightning.engine.metrics import BOUNDED

__all__ = ["CALIBRATION", "estimate", "fit_and_estimate", "fit_mapping", "finite_or_none", "series"]

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
    anchored: bool = True,
    pairs: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fit G per metric (calibration pseudo -> real, one point per record) and estimate every target.

    ``anchored`` (default): the estimate is the calibration score at the same record moved by
    ``G(p_target) - G(p_calibration)`` (``method: "anchored"``, see :mod:`spe_lightning.engine.anchor`);
    the paper's ``G(p_target)`` stays under ``paper``. ``pairs`` (labelled calibration pairs from
    :func:`~spe_lightning.engine.anchor.anchor_pairs` at the last record's weights) give the
    anchored intervals; without them G's leave-one-out residuals do.

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
    if anchored:
        out["anchor_intervals"] = {}
    conf_cal = series(records, "confidence", CALIBRATION, None)
    for metric in metrics:
        x = series(records, "pseudo", CALIBRATION, metric)
        y = series(records, "real", CALIBRATION, metric)
        g, why = fit_mapping(mapping, x, y, metric)
        out["mapping"][metric] = g.to_dict() if g else {"kind": mapping, "error": why}
        g_conf, _ = fit_mapping(mapping, conf_cal, y, metric)
        interval_model = None
        if anchored and g is not None and pairs:
            from spe_lightning.engine.anchor import fit_anchor  # anchor imports this module

            interval_model = fit_anchor(pairs, metric, g, finite_or_none(x[last]))
        if anchored:
            out["anchor_intervals"][metric] = interval_model
        for t in targets:
            xt = series(records, "pseudo", t, metric)
            no_g = f"no mapping G: {why}"
            cal_reason = (records[last].get("reasons", {}) if last >= 0 else {}).get(CALIBRATION)
            if cal_reason:  # why the calibration set gave no pseudo metric
                no_g += f" (calibration: {cal_reason})"
            reason = (records[last].get("reasons", {}) if last >= 0 else {}).get(t)
            est = estimate(
                g,
                metric,
                xt[last] if last >= 0 else None,
                level,
                no_g=no_g,
                no_pseudo=f"no pseudo {metric} at the last checkpoint" + (f" ({reason})" if reason else ""),
                anchor=(x[last], y[last], interval_model) if anchored and last >= 0 else None,
            )
            out["estimates"][t][metric] = est
            if anchored and g is not None:
                out["by_checkpoint"][t][metric] = _anchored_series(g, metric, xt, x, y)
            elif g is not None:
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


def estimate(
    g: Mapping | None,
    metric: str,
    pseudo: float | None,
    level: float = 0.9,
    no_g: str = "no mapping G",
    no_pseudo: str = "no pseudo metric",
    anchor: tuple[float | None, float | None, dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """One estimate ``{"value", "lower", "upper", "pseudo", "reason", "method"}`` from a pseudo metric.

    ``anchor = (pseudo_calibration, real_calibration, interval_model)`` at the same weights makes it
    anchored (:mod:`spe_lightning.engine.anchor`); the paper's ``G(pseudo)`` then moves to ``paper``.
    """
    from spe_lightning.engine.anchor import anchored_estimate  # anchor imports this module

    est: dict[str, Any] = {"value": None, "lower": None, "upper": None, "pseudo": finite_or_none(pseudo)}
    est["reason"] = no_g if g is None else (no_pseudo if est["pseudo"] is None else None)
    if est["reason"] is not None:
        return est
    assert g is not None
    lo, hi = g.interval([est["pseudo"]], level)
    est.update(
        value=finite_or_none(g.predict([est["pseudo"]])[0]),
        lower=finite_or_none(lo[0]),
        upper=finite_or_none(hi[0]),
        method="paper",
    )
    if anchor is not None:
        p_c, r_c, model = anchor
        res = anchored_estimate(g, metric, est["pseudo"], finite_or_none(p_c), finite_or_none(r_c), level, model)
        if res["value"] is not None:
            est["paper"] = {k: est[k] for k in ("value", "lower", "upper")}
            est.update(res, method="anchored")
    return est


def _anchored_series(g: Any, metric: str, xt: np.ndarray, x: np.ndarray, y: np.ndarray) -> list[float | None]:
    """Anchored estimate per record: calibration score + G(target pseudo) - G(calibration pseudo)."""
    from spe_lightning.engine.anchor import anchored_estimate

    return [
        anchored_estimate(g, metric, finite_or_none(a), finite_or_none(b), finite_or_none(c))["value"]
        for a, b, c in zip(xt, x, y)
    ]
