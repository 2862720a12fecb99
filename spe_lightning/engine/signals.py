"""The label-free signals reported beside SPE (issue 23), as baseline rows of the report.

- ``soft_dice_confidence``: the set's mean per-case Soft Dice Confidence (:mod:`~spe_lightning.engine.soft_dice`),
  used as is (tuning-free), Dice only;
- ``styled_calibration_score``: the model's real metrics on the calibration set restyled as the target
  (:mod:`~spe_lightning.engine.styled_pairs`), every key;
- ``agreement``: the mean pairwise Dice of the last checkpoints' masks of the target, mapped to Dice by the line
  fitted on the calibration cases (:mod:`~spe_lightning.engine.agreement`), Dice only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spe_lightning.engine.agreement import MaskHistory, agreement_estimate, fit_agreement_map
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.estimate import finite_or_none
from spe_lightning.engine.records import CALIBRATION, Record
from spe_lightning.engine.styled_pairs import styled_name

__all__ = ["SIGNAL_ROWS", "agreement_fit", "signal_baselines"]

#: the baseline rows this module adds
SIGNAL_ROWS = ("soft_dice_confidence", "styled_calibration_score", "agreement")


def agreement_fit(history: MaskHistory, calibration: CachedSet) -> dict[str, Any]:
    """:func:`~spe_lightning.engine.agreement.fit_agreement_map` on the calibration cases: their agreement over
    the kept checkpoints against the real Dice of the newest checkpoint's masks."""
    from spe_lightning.percase.rca import per_case_dice

    agree = history.per_case(CALIBRATION)
    latest = history.latest(CALIBRATION)
    if calibration.masks is None or not latest or len(latest) != len(calibration.masks):
        return fit_agreement_map([], [])
    real = per_case_dice(latest, calibration.masks)
    return {**fit_agreement_map(agree, real), "epochs": history.epochs(CALIBRATION)}


def signal_baselines(
    records: Sequence[Record],
    targets: Sequence[str],
    keys: Sequence[str],
    pairs: Sequence[dict[str, Any]],
    history: MaskHistory | None,
    calibration: CachedSet | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rows, details)``: the three baseline rows ``{row: {target: {key: value}}}`` at the last record, and
    what stands behind them (the agreement map and per-case agreement, the styled pairs' names)."""
    rows: dict[str, Any] = {r: {t: {} for t in targets} for r in SIGNAL_ROWS}
    details: dict[str, Any] = {}
    if not records:
        return rows, details
    last = records[-1]
    real_cal = last.real.get(CALIBRATION, {})
    fit = agreement_fit(history, calibration) if history is not None and calibration is not None else None
    if history is not None:
        details["agreement"] = {
            "k": history.k,
            "map": fit,
            "nbytes": history.nbytes,
            "per_case": {name: [finite_or_none(v) for v in history.per_case(name)] for name in (CALIBRATION, *targets)},
        }
    styled = {p.get("target"): p for p in pairs if p.get("kind") == "styled"}
    for t in targets:
        if "dice" in keys:
            rows["soft_dice_confidence"][t]["dice"] = finite_or_none(last.confidence.get(t))
            agree = history.agreement(t) if history is not None else None
            rows["agreement"][t]["dice"] = agreement_estimate(fit, agree) if fit is not None else None
        pair = styled.get(t)
        for k in keys:
            d = (pair or {}).get("d_real", {}).get(k)
            rows["styled_calibration_score"][t][k] = (
                finite_or_none(real_cal[k] + d) if d is not None and real_cal.get(k) is not None else None
            )
    details["styled_pairs"] = {t: p["name"] for t, p in styled.items() if p.get("name") == styled_name(str(t))}
    return rows, details


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the finite values (None when there are none)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None
