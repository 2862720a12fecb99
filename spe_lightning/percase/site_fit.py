"""The quality regressor's per-target (site) calibration inside a run: signals of a cached set, the rule's choice on
the calibration set and the styled pairs (development data only), and the rows it gives.

:func:`fit_sites` is called by :class:`~spe_lightning.percase.regressor.RegressorScorer` at fit time with each run
target's styled calibration set (:func:`~spe_lightning.engine.styled_pairs.styled_set`); :func:`site_rows` scores
the cases of a set of the same name. The signals available there are the regressor's raw output, the model's
confidence (its Soft Dice Confidence) and its mirror consistency (:mod:`~spe_lightning.percase.mirror`: one more
forward per case); RCA and checkpoint agreement enter in the benchmark (``benchmarks/percase_quality.py``), where
they are computed per case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.distance import image_features
from spe_lightning.percase.mirror import MIRROR, mirror_consistency
from spe_lightning.percase.scorer import CaseInputs, CaseRow
from spe_lightning.percase.sites import (
    INTERVAL_RULE,
    WIDTH_FACTOR,
    CaseSignals,
    SiteCalibration,
    choose_rule,
    fit_site_calibration,
    rule_name,
)

__all__ = ["PRODUCT_RULES", "features_of", "fit_sites", "heldout_site_means", "site_rows"]

#: the rules a run chooses from (the signals it has per case), simplest first
PRODUCT_RULES: tuple[tuple[str, ...], ...] = (
    ("regressor",),
    ("regressor", "confidence"),
    ("regressor", MIRROR),
    ("regressor", "confidence", MIRROR),
)


def features_of(gray: Tensor, masks: Sequence[Tensor], confidence: Tensor) -> np.ndarray:
    """The label-free per-case features (:func:`~spe_lightning.engine.distance.image_features`) of 2D cases."""
    return image_features(CachedSet("cases", [], None, gray), masks, confidence)


def _signals(
    raw: Callable[[Tensor, Sequence[Tensor]], np.ndarray],
    data: CachedSet,
    masks: Sequence[Tensor],
    conf: Tensor,
    real: np.ndarray | None,
    groups: np.ndarray | None = None,
    mirror: np.ndarray | None = None,
) -> CaseSignals:
    sig = {"regressor": np.asarray(raw(data.gray, masks), float), "confidence": conf.double().numpy()}
    if mirror is not None:
        sig[MIRROR] = np.asarray(mirror, float)
    group = np.arange(len(data)) if groups is None else np.asarray(groups)
    return CaseSignals(sig, features_of(data.gray, masks, conf), real, group)


def fit_sites(
    raw: Callable[[Tensor, Sequence[Tensor]], np.ndarray],
    predict: Callable[[CachedSet], tuple[list[Tensor], Tensor]],
    real_dice: Callable[[Sequence[Tensor], Sequence[Tensor]], np.ndarray],
    calibration: CachedSet,
    styled: Mapping[str, CachedSet],
    level: float,
    seed: int,
    splits: int = 3,
) -> dict[str, Any]:
    """Per run target, a :class:`~spe_lightning.percase.sites.SiteCalibration` of the regressor fitted on the
    calibration cases and the target's styled pairs (``styled``: by *target* name).

    The rule (:data:`PRODUCT_RULES`, and the map's shape, :data:`~spe_lightning.percase.sites.SHAPES`) is chosen
    on development folds only: random halves A/B of the calibration
    images, fitted on A and A's styled copies, scored on B's styled copies (every target's styled set is one
    pair family); without styled sets, on B's own cases. The intervals follow the product's interval rule
    (:data:`~spe_lightning.percase.sites.INTERVAL_RULE`, :data:`~spe_lightning.percase.sites.WIDTH_FACTOR`).
    Returns ``{"rule", "shape", "scores", "targets": {name: SiteCalibration.to_dict()}}`` (plain numbers).
    """
    if calibration.masks is None:
        raise ValueError("fit_sites: the calibration set needs masks.")
    masks, conf = predict(calibration)
    mirror = mirror_consistency(predict, calibration, masks)
    cal = _signals(raw, calibration, masks, conf, real_dice(masks, calibration.masks), mirror=mirror)
    families = {}
    for name, data in styled.items():
        if data.masks is None or len(data) != len(calibration):
            raise ValueError(f"fit_sites: the styled set of {name!r} must hold the calibration set's items and masks.")
        s_masks, s_conf = predict(data)
        s_real, s_mirror = real_dice(s_masks, data.masks), mirror_consistency(predict, data, s_masks)
        families[name] = _signals(raw, data, s_masks, s_conf, s_real, mirror=s_mirror)
    n = len(calibration)
    rng = np.random.default_rng(seed)
    folds: list[tuple[CaseSignals, CaseSignals | None, CaseSignals]] = []
    for _ in range(splits):
        perm = rng.permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
        if families:
            folds += [(cal.subset(a), fam.subset(a), fam.subset(b)) for fam in families.values()]
        else:
            folds.append((cal.subset(a), None, cal.subset(b)))
    choice = choose_rule(folds, rules=PRODUCT_RULES, level=level, seed=seed)
    rule, shape = choice["rule"], choice["shape"]
    targets = {
        name: fit_site_calibration(
            cal, fam, rule, level=level, seed=seed, interval=INTERVAL_RULE, width_factor=WIDTH_FACTOR, shape=shape
        ).to_dict()
        for name, fam in families.items()
    }
    return {"rule": rule, "shape": shape, "scores": choice["scores"], "targets": targets}


def heldout_site_means(
    raw: Callable[[Tensor, Sequence[Tensor]], np.ndarray],
    predict: Callable[[CachedSet], tuple[list[Tensor], Tensor]],
    real_dice: Callable[[Sequence[Tensor], Sequence[Tensor]], np.ndarray],
    calibration: CachedSet,
    pair_sets: Mapping[str, CachedSet],
    rule: Sequence[str],
    level: float,
    seed: int,
    shape: str = "linear",
) -> dict[str, float | None]:
    """Each shifted pair set's mean per-case estimate from a per-target map built as :func:`fit_sites` builds a
    run target's (the calibration cases and the calibration images styled like the set, stacking ``rule``, the
    map of ``shape``),
    held out: a pair set holds the calibration images themselves, shifted, so the images are split in halves
    and the map fitted on half A (and A styled like the pair set's half B) estimates B's cases, and vice versa.

    These are the development means the combination weight is chosen with when the run's targets are scored
    by their own maps (the use: the mean of those rows), so the weight is chosen and used on the same kind of
    rows. Sets that are not a full shifted copy (``subset...``, other sizes): None.
    """
    from spe_lightning.engine.shifts import subset
    from spe_lightning.engine.styled_pairs import styled_set

    if calibration.masks is None:
        raise ValueError("heldout_site_means: the calibration set needs masks.")

    def mirror_of(data: CachedSet, masks: Sequence[Tensor]) -> np.ndarray | None:
        return mirror_consistency(predict, data, masks) if MIRROR in rule else None

    masks, conf = predict(calibration)
    cal = _signals(
        raw, calibration, masks, conf, real_dice(masks, calibration.masks), mirror=mirror_of(calibration, masks)
    )
    n = len(calibration)
    perm = np.random.default_rng(seed).permutation(n)
    a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    out: dict[str, float | None] = {}
    for name, data in pair_sets.items():
        if name.startswith("subset") or len(data) != n:
            out[name] = None
            continue
        p_masks, p_conf = predict(data)
        target = _signals(raw, data, p_masks, p_conf, None, mirror=mirror_of(data, p_masks))
        est = np.full(n, np.nan)
        for fit_half, score_half in ((a, b), (b, a)):
            half = subset(calibration, fit_half.tolist(), f"{calibration.name}_half")
            sty, _ = styled_set(half, subset(data, score_half.tolist(), name), seed)
            assert sty.masks is not None  # styled copies keep the calibration masks
            s_masks, s_conf = predict(sty)
            s_real = real_dice(s_masks, sty.masks)
            styled = _signals(raw, sty, s_masks, s_conf, s_real, groups=fit_half, mirror=mirror_of(sty, s_masks))
            site = fit_site_calibration(cal.subset(fit_half), styled, rule, level=level, seed=seed, shape=shape)
            est[score_half] = site.point(target.subset(score_half).signals)
        out[name] = float(np.mean(est))
    return out


def site_rows(
    site: Mapping[str, Any],
    raw: np.ndarray,
    cases: CaseInputs,
    threshold: float,
) -> list[CaseRow]:
    """One row per case from a saved site calibration (:meth:`SiteCalibration.to_dict`): the stacked estimate,
    its distance-aware interval, ``distance``, ``beyond_calibrated`` and the rule that gave it (the signals that
    entered, ``/isotonic`` when through a monotone map: :func:`~spe_lightning.percase.sites.rule_name`); flagged below
    ``threshold`` (the calibration-set map's)."""
    cal = SiteCalibration.from_dict(site)
    feats = features_of(cases.gray, cases.masks, cases.confidence)
    sig = {"regressor": np.asarray(raw, float), "confidence": cases.confidence.double().numpy()}
    if cases.mirror is not None:
        sig[MIRROR] = np.asarray(cases.mirror, float)
    elif MIRROR in cal.signals:
        raise ValueError(
            f"the per-case map of {cases.name!r} stacks the model's mirror consistency, which these cases lack: "
            "score them through SPEEstimator.estimate (it computes it with the model)."
        )
    q = cal.estimate(CaseSignals(sig, feats))
    real = cases.real_dice
    rows = []
    for i, case_id in enumerate(cases.ids):
        mask = cases.masks[i]
        rows.append(
            CaseRow(
                str(case_id),
                float(q["estimate"][i]),
                float(q["estimate"][i]),
                float(q["lower"][i]),
                float(q["upper"][i]),
                bool(q["estimate"][i] < threshold),
                not bool(mask.any()),
                int(mask.sum()),
                float(cases.confidence[i]),
                -1,
                None if real is None else float(real[i]),
                real is not None,
                distance=float(q["distance"][i]),
                beyond_calibrated=bool(q["beyond_calibrated"][i]),
                signals=rule_name(cal.signals, cal.shape),  # "regressor+confidence/isotonic": the map that gave it
            )
        )
    return rows
