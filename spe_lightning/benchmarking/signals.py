"""The label-free signals beside SPE (issue 23) in the shift benchmark: measuring them for the benchmark's
targets (styled pairs, checkpoint agreement, the regressor held out per family), each signal's error on the
calibration pairs, and the one estimate from all signals (a row beside SPE's, never in its place)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from spe_lightning.benchmarking.scoring import ROW_FIELDS, shift_summary
from spe_lightning.engine.agreement import AGREEMENT_K, agreement_estimate, pairwise_agreement
from spe_lightning.engine.calibration_pairs import pairs_for_target, pairs_from_record
from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model, pair_family
from spe_lightning.engine.predict import model_device, predict_labels
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series
from spe_lightning.engine.signals import agreement_fit
from spe_lightning.engine.styled_pairs import styled_name, styled_set
from spe_lightning.estimator import heldout_regressor_means

__all__ = [
    "masks_by_epoch",
    "measure_signals",
    "pair_errors",
    "COMBINED_SIGNALS",
    "weight_grid",
    "all_signal_combination",
    "all_signal_rows",
]


def masks_by_epoch(
    run: Any, model: Any, sets: dict[str, Any], weights: dict[int, Any], epochs: Sequence[int]
) -> dict[str, list[list[Any]]]:
    """Each set's predicted masks at each of ``epochs`` (weights from the benchmark's snapshots); ``model``
    gets its own weights back afterwards."""
    c = run.config
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, list[list[Any]]] = {n: [] for n in sets}
    device = model_device(model)
    try:
        for e in epochs:
            model.load_state_dict(weights[e])
            for n, data in sets.items():
                masks, _ = predict_labels(
                    model,
                    data,
                    device,
                    c.batch_size,
                    run.logits_fn,
                    c.activation,
                    c.threshold,
                    c.foreground_class,
                    c.class_indices or None,
                )
                out[n].append([(m > 0).reshape(-1).numpy() for m in masks])
    finally:
        model.load_state_dict(final)
    return out


def measure_signals(
    run: Any, model: Any, targets: dict[str, Any], weights: dict[int, Any], regressor: Any
) -> dict[str, Any]:
    """The new signals of every benchmark target at the final weights (issue 23), with their seconds:

    - ``styled_pairs``: per target, the labelled pair of the calibration set restyled as that target
      (``engine/styled_pairs.py``; the product makes it for its own targets at fit end);
    - ``agreement``: per target and per calibration pair set, the mean pairwise Dice of the masks of the last
      ``AGREEMENT_K`` recorded checkpoints (the benchmark's targets are built after training, so their masks at
      those checkpoints come from the weight snapshots), and the map fitted on the calibration cases;
    - ``regressor_heldout_means``: the regressor's mean estimate on each shifted pair set with its calibration
      map refitted without that shift family (so the combination is chosen on data it was not fitted on).
    """
    out: dict[str, Any] = {"seconds": {}}
    cal = run.sets[CALIBRATION]
    start = time.perf_counter()
    styled, styles = {}, {}
    for i, (n, data) in enumerate(targets.items()):
        sset, style = styled_set(cal, data, seed=run.config.seed * 7919 + 31 * i, styling=run.config.styling)
        styled[sset.name], styles[n] = sset, {k: v for k, v in style.items() if k != "target_images"}
    record = run.evaluate(model, sets=styled)
    last = run.records[-1]
    for kind in ("pseudo", "real"):
        record[kind][CALIBRATION] = dict(last.measured(kind).get(CALIBRATION, {}))
    names = {styled_name(n): n for n in targets}
    out["styled_pairs"] = {p["target"]: p for p in pairs_from_record(record, CALIBRATION, list(styled), names)}
    out["styles"] = styles
    out["seconds"]["styled_pairs"] = time.perf_counter() - start
    print(f"[shift] styled pairs for {len(styled)} targets ({out['seconds']['styled_pairs']:.1f}s)")

    start = time.perf_counter()
    epochs = sorted(weights)[-AGREEMENT_K:]
    pair_sets = run.pair_sets()
    masks = masks_by_epoch(run, model, {CALIBRATION: cal, **targets, **pair_sets}, weights, epochs)
    per_case = {n: pairwise_agreement(m) for n, m in masks.items()}
    fit = agreement_fit(run.history, cal)  # the product's map: calibration cases at the final record
    mean = {n: (float(np.nanmean(v)) if np.isfinite(v).any() else None) for n, v in per_case.items()}
    out["agreement"] = {
        "epochs": epochs,
        "map": fit,
        "calibration": mean[CALIBRATION],
        "calibration_run": run.history.agreement(CALIBRATION),  # the product's own (should equal "calibration")
        "targets": {n: mean[n] for n in targets},
        "pairs": {n: mean[n] for n in pair_sets},
    }
    out["seconds"]["agreement"] = time.perf_counter() - start
    print(f"[shift] agreement over epochs {epochs} ({out['seconds']['agreement']:.1f}s)")
    out["regressor_heldout_means"] = heldout_regressor_means(
        regressor[0], model, run.sets[CALIBRATION], pair_sets, run.logits_fn
    )
    return out


def pair_errors(result: dict[str, Any]) -> dict[str, Any]:
    """Each signal's Dice error on the calibration pairs' sets (development data, real Dice known), every
    pair predicted without its own family where the signal is fitted on pairs: ``spe`` (its move rule fitted
    on the other families), ``quality_regressor`` (its map refitted without the family; subsets skipped);
    ``calibration_score``, ``soft_dice_confidence``, ``confidence`` (its G across checkpoints) and
    ``agreement`` (its map from the calibration cases) are not fitted on pairs. Per signal: ``mae`` over the
    pairs where it has a value, ``n`` and the error per pair."""
    seg = next(iter(result["shift_raw"]))
    raw, records = result["shift_raw"][seg], result["records"][seg]
    real_cal = series(records, "real", CALIBRATION, "dice")
    g, _ = fit_mapping("linear", series(records, "pseudo", CALIBRATION, "dice"), real_cal, "dice")
    g_conf, _ = fit_mapping("linear", series(records, "confidence", CALIBRATION, None), real_cal, "dice")
    p_c, r_c = raw["calibration"]["pseudo"].get("dice"), raw["calibration"]["real"].get("dice")
    if g is None or p_c is None or r_c is None:
        return {}
    pairs = pairs_for_target(raw["pairs"], None)
    reg = (raw.get("quality_regressor") or {}).get("heldout_dev_means") or {}
    agree = raw.get("agreement") or {}
    errors: dict[str, dict[str, float]] = {}
    predicted: dict[str, dict[str, float]] = {}
    truth: dict[str, float] = {}
    for p in pairs:
        dp, dr = p["d_pseudo"].get("dice"), p["d_real"].get("dice")
        if dp is None or dr is None:
            continue
        real = r_c + dr
        fam = pair_family(p["name"])
        model = fit_interval_model([q for q in pairs if pair_family(q["name"]) != fam], "dice", g, p_c)
        values = {
            "spe": anchored_estimate(g, "dice", p_c + dp, p_c, r_c, interval_model=model)["value"],
            "calibration_score": r_c,
            "soft_dice_confidence": p.get("confidence"),
            "confidence": float(g_conf.predict([p["confidence"]])[0]) if g_conf and p.get("confidence") else None,
            "quality_regressor": reg.get(p["name"]),
            "agreement": agreement_estimate(agree["map"], agree["pairs"].get(p["name"])) if agree else None,
        }
        truth[p["name"]] = float(real)
        for k, v in values.items():
            if v is not None and np.isfinite(v):
                errors.setdefault(k, {})[p["name"]] = float(abs(v - real))
                predicted.setdefault(k, {})[p["name"]] = float(v)
    out: dict[str, Any] = {
        k: {"mae": float(np.mean(list(e.values()))), "n": len(e), "by_pair": e, "values": predicted[k]}
        for k, e in errors.items()
    }
    out["real"] = truth
    return out


#: the signals item 4 of issue 23 may combine, the simplest first (SPE alone)
COMBINED_SIGNALS = ("spe", "quality_regressor", "agreement")


def weight_grid(n: int, step: float = 0.25) -> list[tuple[float, ...]]:
    """Weights on the simplex over ``n`` signals in steps of ``step``, the simplest (SPE alone) first, then by
    how many signals they mix."""
    k = int(round(1 / step))
    grid = [tuple(c / k for c in combo) for combo in np.ndindex(*(k + 1,) * n) if sum(combo) == k]
    return sorted(grid, key=lambda w: (sum(v > 0 for v in w), -w[0]))


def all_signal_combination(result: dict[str, Any], level: float = 0.9) -> dict[str, Any] | None:
    """Item 4 of issue 23: one Dice estimate ``sum_k w_k * signal_k`` over :data:`COMBINED_SIGNALS`, the weights
    chosen on the calibration pairs' shifted families only (every signal held out as in :func:`pair_errors`).

    ``heldout_mae``: each family predicted with weights chosen on the other families (nested), against SPE's
    own held-out error on the same pairs; ``weights``: chosen on every family (ties keep the simpler rule);
    ``half_width``: the split-conformal ``level`` quantile of the nested held-out misses. ``adopted``: whether
    it beat SPE on the held-out families of this run (adoption needs it across development runs).
    """
    errs = result.get("pair_errors") or {}
    real = errs.get("real") or {}
    names = [
        n
        for n in real
        if not n.startswith("subset") and all(n in (errs.get(s) or {}).get("values", {}) for s in COMBINED_SIGNALS)
    ]
    if len({pair_family(n) for n in names}) < 3:
        return None
    x = np.asarray([[errs[s]["values"][n] for s in COMBINED_SIGNALS] for n in names])
    y = np.asarray([real[n] for n in names])
    fam = np.asarray([pair_family(n) for n in names])
    grid = weight_grid(len(COMBINED_SIGNALS))

    def choose(mask: np.ndarray) -> tuple[float, ...]:
        maes = [float(np.mean(np.abs(x[mask] @ np.asarray(w) - y[mask]))) for w in grid]
        best = min(maes)
        return grid[next(i for i, m in enumerate(maes) if m <= best + 1e-12)]  # ties: the simpler rule

    pred = np.zeros(len(y))
    for f in np.unique(fam):
        out = fam == f
        pred[out] = x[out] @ np.asarray(choose(~out))
    miss = np.abs(pred - y)
    spe_miss = np.abs(x[:, 0] - y)
    q = np.sort(miss)[min(len(miss), int(np.ceil((len(miss) + 1) * level))) - 1]
    weights = choose(np.ones(len(y), bool))
    return {
        "signals": list(COMBINED_SIGNALS),
        "weights": [float(w) for w in weights],
        "pairs": names,
        "heldout_mae": float(miss.mean()),
        "spe_heldout_mae": float(spe_miss.mean()),
        "half_width": float(q),
        "adopted": bool(miss.mean() < spe_miss.mean()),
    }


def all_signal_rows(result: dict[str, Any]) -> None:
    """Add the ``all_signals`` row (item 4, with its conformal interval) to every target and rescore the
    summaries. It is a row beside SPE's, never in its place: adoption needs it to win across development runs."""
    combo = result.get("all_signals")
    if not combo:
        return
    w = combo["weights"]
    for row in result["targets"]:
        vals = [(row.get(s) or {}).get("dice") for s in combo["signals"]]
        vals = [v["value"] if isinstance(v, dict) else v for v in vals]
        if any(v is None for v in vals):
            row["all_signals"] = {"dice": None}
            continue
        v = float(np.dot(w, [float(x) for x in vals if x is not None]))
        h = combo["half_width"]
        row["all_signals"] = {"dice": {"value": v, "lower": max(0.0, v - h), "upper": min(1.0, v + h)}}
    methods = [k for k in result["targets"][0] if k not in ROW_FIELDS]
    result["summary"] = shift_summary([r for r in result["targets"] if not r["site"]], methods)
    result["sites"] = {r["name"]: shift_summary([r], methods) for r in result["targets"] if r["site"]}
