"""Label-free checkpoint selection and alert quality, scored over a run's records (pure functions).

For a target measured at several checkpoints (its pseudo metric in the records, and its real
metric where it has masks, for scoring only), the checkpoint each rule selects:

- ``spe``: the best anchored estimate of the final G (``by_checkpoint``, what SPE reports after fit);
- ``spe_running``: the best running estimate (G fitted on the records so far, from the 3rd record):
  what ``ModelCheckpoint(monitor="spe/estimate/<target>/<metric>")`` keeps during training;
- ``validation``: the best real calibration (validation) score;
- ``oracle``: the best real target score.

The regret of a rule is the oracle's real score minus the real score of the rule's checkpoint
(sign-flipped for lower-is-better metrics such as HD95), so 0 is perfect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spe_lightning.engine.records import CALIBRATION, Record, as_records, fit_and_estimate, series

__all__ = ["LOWER_IS_BETTER", "alert_quality", "selection_regret", "selection_summary"]

#: metrics where a lower value is better
LOWER_IS_BETTER = ("hd95",)


def _best(values: Sequence[float | None], candidates: Sequence[int], lower: bool) -> int | None:
    """The candidate index with the best finite value (the earliest on ties), or None."""
    ok = [(i, float(v)) for i in candidates if (v := values[i]) is not None and np.isfinite(v)]
    if not ok:
        return None
    if lower:
        return min(ok, key=lambda iv: (iv[1], iv[0]))[0]
    return max(ok, key=lambda iv: (iv[1], -iv[0]))[0]


def selection_regret(
    records: Sequence[Record] | Sequence[Mapping[str, Any]],
    target: str,
    metric: str = "dice",
    mapping: str = "linear",
    anchored: bool = True,
) -> dict[str, Any]:
    """Real score and regret of the checkpoint selected by SPE, by validation and by the oracle for ``target``.

    Candidates are the records where ``target`` has both a pseudo and a real ``metric``. Returns
    ``{"n_candidates", "oracle": {...}, "spe": {...}, "spe_running": {...}, "validation": {...}}``,
    each ``{"epoch", "real", "regret"}`` (None when the rule could not choose). Stored JSON records (a
    benchmark result's) are read with :func:`~spe_lightning.engine.records.as_records`.
    """
    records = as_records(records)
    lower = metric.split("/")[0] in LOWER_IS_BETTER
    real = series(records, "real", target, metric)
    pseudo = series(records, "pseudo", target, metric)
    candidates = [i for i in range(len(records)) if np.isfinite(real[i]) and np.isfinite(pseudo[i])]
    final = fit_and_estimate(records, [target], [metric], mapping, anchored=anchored)
    by_ckpt = final["by_checkpoint"][target].get(metric) or [None] * len(records)
    running: list[float | None] = [None] * len(records)
    for i in candidates:
        if i >= 2:
            est = fit_and_estimate(records[: i + 1], [target], [metric], mapping, anchored=anchored)
            running[i] = est["estimates"][target][metric].value
    picks = {
        "oracle": _best(list(real), candidates, lower),
        "spe": _best(by_ckpt, candidates, lower),
        "spe_running": _best(running, candidates, lower),
        "validation": _best(list(series(records, "real", CALIBRATION, metric)), candidates, lower),
    }
    best = picks["oracle"]
    out: dict[str, Any] = {"n_candidates": len(candidates)}
    for rule, pick in picks.items():
        if pick is None or best is None:
            out[rule] = {"epoch": None, "real": None, "regret": None}
            continue
        gap = float(real[best] - real[pick])
        out[rule] = {
            "epoch": records[pick].epoch,
            "real": float(real[pick]),
            "regret": -gap if lower else gap,
        }
    return out


def selection_summary(per_target: Mapping[str, Mapping[str, Any]], targets: Sequence[str] | None = None) -> dict:
    """Mean regret per rule over ``targets`` (default: all) that every rule could choose for."""
    names = [t for t in (targets if targets is not None else list(per_target)) if t in per_target]
    rules = ("spe", "spe_running", "validation")
    usable = [t for t in names if all(per_target[t][r]["regret"] is not None for r in rules)]
    out: dict[str, Any] = {"n_targets": len(usable)}
    for r in rules:
        out[r] = float(np.mean([per_target[t][r]["regret"] for t in usable])) if usable else None
    return out


def alert_quality(
    estimates: Sequence[float | None], real: Sequence[float | None], threshold: float, below: bool = True
) -> dict[str, Any]:
    """Precision and recall of "estimate crosses ``threshold``" as a detector of "real value crosses it".

    Pairs where either value is missing are left out. Precision is None without alerts, recall None
    without real crossings.
    """
    pairs = [(float(e), float(r)) for e, r in zip(estimates, real) if e is not None and r is not None]
    alert = [(e < threshold) if below else (e > threshold) for e, _ in pairs]
    truth = [(r < threshold) if below else (r > threshold) for _, r in pairs]
    tp = sum(a and t for a, t in zip(alert, truth))
    n_alert, n_true = sum(alert), sum(truth)
    return {
        "threshold": float(threshold),
        "n": len(pairs),
        "alerts": n_alert,
        "crossings": n_true,
        "true_alerts": tp,
        "precision": tp / n_alert if n_alert else None,
        "recall": tp / n_true if n_true else None,
    }
