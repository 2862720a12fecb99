"""Scoring the shift benchmark: every method's estimate per target and metric, and the summaries (MAE,
interval coverage and width, Dice false alarms)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spe_lightning.engine.agreement import agreement_estimate
from spe_lightning.engine.calibration_pairs import pairs_for_target
from spe_lightning.engine.distance import nearest_set_distance
from spe_lightning.engine.estimate import estimate, finite_or_none, fit_interval_model
from spe_lightning.engine.metrics import PAPER_METRICS
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series
from spe_lightning.engine.results import Estimate
from spe_lightning.percase.combination import combination_from_pairs, combined_value

__all__ = [
    "interval_row",
    "shift_scores",
    "regressor_combination",
    "shift_summary",
    "unshifted",
    "ROW_FIELDS",
    "ALARM_TOLERANCE",
    "ALARM_DROP",
]


def interval_row(est: Estimate) -> dict[str, Any]:
    """``{value, lower, upper}`` of an estimate (the benchmark's rows keep only these), with the flags of
    issue 23 where set: ``reliable`` (False: value None, the numbers under ``withheld``) and
    ``outside_calibrated_range`` (with the ``nearest_set_distance`` behind it, where measured), and the
    ``styled_anchor`` the interval spans."""
    out: dict[str, Any] = {"value": est.value, "lower": est.lower, "upper": est.upper}
    if est.styled_anchor is not None:
        out["styled_anchor"] = est.styled_anchor
    if est.reliable is not None:
        out["reliable"] = est.reliable
    if est.outside_calibrated_range is not None:
        out["outside_calibrated_range"] = est.outside_calibrated_range
    if est.nearest_set_distance is not None:
        out["nearest_set_distance"] = est.nearest_set_distance
    if est.withheld is not None:
        out["withheld"] = est.withheld.to_dict()
    return out


def nearest_without_family(features: dict[str, Any] | None, name: str, family: str | None) -> float | None:
    """A target's nearest-set distance from the run's stored features, its own shift family's pairs left out (as
    its interval model leaves them out); None for runs recorded before the features were stored."""
    if not features or features.get("calibration") is None or name not in features.get("targets", {}):
        return None
    pairs = {k: np.asarray(v, float) for k, v in features["pairs"].items() if not (family and k.startswith(family))}
    if not pairs:
        return None
    cal = np.asarray(features["calibration"], float)
    return nearest_set_distance(np.asarray(features["targets"][name], float), cal, pairs)


def shift_scores(result: dict[str, Any], level: float = 0.9) -> dict[str, Any]:
    """Per target and metric the estimate of every method, and a summary (MAE, coverage, false alarms).

    Methods: ``spe`` (the callback's default: anchored estimate, intervals from the calibration
    pairs; a synthetic target's own shift family is left out of its interval model),
    ``spe_paper`` (the paper's ``G(pseudo)`` with G's leave-one-out interval),
    ``calibration_score`` and ``confidence``; extra segmenters add ``spe_<name>`` rows.
    """
    segs = list(result["shift_raw"])
    raw0 = result["shift_raw"][segs[0]]
    names = list(raw0["targets"])
    sites = set(result.get("site_targets", []))
    rows: list[dict[str, Any]] = [
        {
            "name": n,
            "site": n in sites,
            "real": raw0["targets"][n]["real"],
            "spe": {},
            "calibration_score": {},
            "confidence": {},
        }
        for n in names
    ]
    combination = None
    for i, seg in enumerate(segs):
        raw, records = result["shift_raw"][seg], result["records"][seg]
        tag = "" if i == 0 else f"_{seg}"
        conf_cal = series(records, "confidence", CALIBRATION, None)
        cal = raw["calibration"]
        for m in PAPER_METRICS:
            real_cal = series(records, "real", CALIBRATION, m)
            g, _ = fit_mapping("linear", series(records, "pseudo", CALIBRATION, m), real_cal, m)
            g_conf, _ = fit_mapping("linear", conf_cal, real_cal, m)
            p_c, r_c = cal["pseudo"].get(m), cal["real"].get(m)
            if i == 0 and m == "dice":
                combination = regressor_combination(raw, g, p_c, r_c)
            side = result.get("settings", {}).get("image_size")  # hd95 ends at the image diagonal (2D here)
            bounds = (0.0, float(side) * 2**0.5) if m == "hd95" and side else None
            for row, n in zip(rows, names):
                t = raw["targets"][n]
                p_t = t["pseudo"].get(m)
                family = n.rsplit("_", 1)[0] + "_" if n.rsplit("_", 1)[-1] in ("1", "2", "3") else None
                generic = pairs_for_target(raw["pairs"], None)  # the run's own targets' styled pairs left out
                styled = (raw.get("styled_pairs") or {}).get(n)  # this target's styled pair (first segmenter)
                with_styled = generic + ([styled] if styled else [])

                fit_kw: dict[str, Any] = {"exclude": family, "bounds": bounds, "level": level}
                est_kw: dict[str, Any] = {"distance": t.get("distance"), "bounds": bounds}
                est_kw["nearest"] = nearest_without_family(raw0.get("features"), n, family)
                model = fit_interval_model(with_styled, m, g, p_c, **fit_kw) if g is not None else None
                anchor = (p_c, r_c, model)
                row.setdefault(f"spe{tag}", {})[m] = interval_row(estimate(g, m, p_t, level, anchor=anchor, **est_kw))
                if i == 0 and styled:  # SPE as before issue 23: generic pairs only
                    model = fit_interval_model(generic, m, g, p_c, **fit_kw) if g is not None else None
                    row.setdefault("spe_without_styled", {})[m] = interval_row(
                        estimate(g, m, p_t, level, anchor=(p_c, r_c, model), **est_kw)
                    )
                if i == 0 and styled and r_c is not None and styled["d_real"].get(m) is not None:
                    row.setdefault("styled_calibration_score", {})[m] = r_c + styled["d_real"][m]
                if i == 0 and m == "dice" and "agreement" in raw:
                    agree = raw["agreement"]
                    row["soft_dice_confidence"] = {"dice": finite_or_none(t["confidence"])}
                    row["agreement"] = {"dice": agreement_estimate(agree["map"], agree["targets"].get(n))}
                if i == 0:
                    row.setdefault("spe_paper", {})[m] = interval_row(estimate(g, m, p_t, level))
                    row["calibration_score"][m] = r_c
                    if m == "dice" and "quality_regressor" in raw:  # the regressor estimates Dice only
                        row.setdefault("quality_regressor", {})[m] = raw["quality_regressor"]["means"].get(n)
                    c = g_conf.predict([t["confidence"]])[0] if g_conf and t["confidence"] is not None else None
                    row["confidence"][m] = finite_or_none(c)
    if combination is not None:
        w = combination["weight"]
        for row in rows:
            spe_v, reg_v = (row["spe"].get("dice") or {}).get("value"), (row.get("quality_regressor") or {}).get("dice")
            value = combined_value(w, reg_v, spe_v)
            row["spe_combined"] = {"dice": value}
    for row in rows:  # a method without a value for this target still gets its (empty) entry
        for meth in {k for r in rows for k in r if k not in ROW_FIELDS}:
            row.setdefault(meth, {})
    methods = [k for k in rows[0] if k not in ROW_FIELDS]
    # another site's rows are reported on their own, never averaged with the synthetic shifts
    summary = shift_summary([r for r in rows if not r["site"]], methods)
    site_summary = {r["name"]: shift_summary([r], methods) for r in rows if r["site"]}
    return {"targets": rows, "summary": summary, "sites": site_summary, "level": level, "combination": combination}


def regressor_combination(raw: dict[str, Any], g: Any, p_c: float | None, r_c: float | None) -> dict[str, Any] | None:
    """The weight of the regressor in ``w * regressor + (1 - w) * spe`` (Dice), chosen on development data only
    (:func:`~spe_lightning.percase.combination.combination_from_pairs`: the calibration pairs' sets at the final
    weights). None when the run did not measure the regressor on them."""
    q = raw.get("quality_regressor") or {}
    dev = q.get("heldout_dev_means", q.get("dev_means"))  # older results: the means on the fitted families
    return combination_from_pairs(raw["pairs"], dev or {}, g, p_c, r_c)


#: the fields of a shift-benchmark row that are not methods
ROW_FIELDS = ("name", "real", "site")


def unshifted(name: str) -> bool:
    """Whether a shift-benchmark target is unshifted: ``clean`` or a ``group_*`` of extra_test (not a
    synthetic shift ``<family>_<severity>``, not another site)."""
    return name == "clean" or name.startswith("group_")


#: a Dice false alarm: on an unshifted target whose real Dice is at most this far below the calibration
#: score, the estimate is more than ``ALARM_DROP`` below the calibration score
ALARM_TOLERANCE, ALARM_DROP = 0.02, 0.05


def shift_summary(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per metric and method over ``rows``: MAE, max error, interval coverage and widths, how often the
    "outside the calibrated range" flag fired (and on how many of the intervals that missed), Dice false alarms
    (an estimate more than ``ALARM_DROP`` below the calibration score on an unshifted target whose real
    Dice stayed within ``ALARM_TOLERANCE`` of it: a user told to act for nothing)."""
    summary: dict[str, Any] = {}
    for m in PAPER_METRICS:
        summary[m] = {}
        for meth in methods:
            errs, cover, widths, alarms, outside = [], [], [], 0, []
            for r in rows:
                real = r["real"].get(m)
                e = r[meth].get(m)
                v = e["value"] if isinstance(e, dict) else e
                if real is None or v is None:
                    continue
                errs.append(abs(v - real))
                if isinstance(e, dict) and e["lower"] is not None:
                    cover.append(e["lower"] <= real <= e["upper"])
                    widths.append(e["upper"] - e["lower"])
                    if e.get("outside_calibrated_range") is not None:  # the flag, beside whether the truth was out
                        outside.append((bool(e["outside_calibrated_range"]), cover[-1]))
                cal = (r.get("calibration_score") or {}).get(m)
                if m == "dice" and cal is not None and unshifted(r["name"]) and not r.get("site"):
                    alarms += int(real >= cal - ALARM_TOLERANCE and v < cal - ALARM_DROP)
            summary[m][meth] = {
                "mae": float(np.mean(errs)) if errs else None,
                "max_abs_error": float(np.max(errs)) if errs else None,
                "n": len(errs),
            }
            flags = [r[meth].get(m) for r in rows if isinstance(r[meth].get(m), dict)]
            if any("reliable" in e for e in flags):  # issue 23: rows SPE declared unreliable (no value)
                summary[m][meth]["n_unreliable"] = sum(e.get("reliable") is False for e in flags)
            if cover:
                summary[m][meth].update(
                    coverage=float(np.mean(cover)),
                    median_width=float(np.median(widths)),
                    max_width=float(np.max(widths)),
                )
            if outside:  # how often the flag fired, and on how many of the misses
                summary[m][meth].update(
                    flagged=sum(f for f, _ in outside),
                    missed=sum(not c for _, c in outside),
                    missed_and_flagged=sum(f and not c for f, c in outside),
                )
            if m == "dice":
                summary[m][meth]["false_alarms"] = alarms
        summary[m]["coverage"] = summary[m].get("spe", {}).get("coverage")
    return summary
