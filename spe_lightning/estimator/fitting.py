"""Finishing: a run's outcome becomes the fitted estimator, once.

A finished run hands over one frozen :class:`RunOutcome` (its report, last calibration values, references,
segmenter, cached sets, calibration pairs) and nothing else; :func:`fit_estimator` does every step of
finishing exactly once: the artifact (:class:`~spe_lightning.estimator.fitted.FittedSPE`), the per-case
RCA calibration, the quality regressor's fit (``quality_regressor=True``) and the weight of its combination
with SPE, chosen on the calibration pairs' sets (development data). :func:`with_case_scorer` fits one
per-case scorer on an existing estimator (a new estimator; the old one is unchanged).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning.config import SPEConfig
from spe_lightning.engine.cached_set import CachedSet, SizedDataset
from spe_lightning.engine.frozen import json_form
from spe_lightning.engine.input_check import input_summary
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.predict import LogitsFn, default_logits, model_device, model_fingerprint
from spe_lightning.engine.records import CALIBRATION, Record, series
from spe_lightning.engine.results import estimates_to_dict
from spe_lightning.engine.run_report import SPEReport
from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set
from spe_lightning.estimator.core import SPEEstimator
from spe_lightning.estimator.fitted import FittedSPE
from spe_lightning.percase.combination import combination_from_pairs, combined_value
from spe_lightning.percase.quality_calibration import calibrate_quality, quality_estimates
from spe_lightning.percase.rca import per_case_dice
from spe_lightning.percase.regressor import QualitySettings, RegressorScorer
from spe_lightning.percase.scorer import CaseScorer, ScorerFitData
from spe_lightning.reverse.base import ReverseSegmenter

__all__ = ["RunOutcome", "fit_estimator", "with_case_scorer", "heldout_regressor_means"]

#: the artifact's field a fitted scorer's state goes to, by scorer name
_SCORER_FIELDS = {"rca": "cases", "regressor": "quality"}


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run hands over to build its estimator (see :meth:`~spe_lightning.SPERun.outcome`).

    Args:
        config: the run's settings.
        report: the run's :class:`~spe_lightning.engine.run_report.SPEReport` (G per key under ``mapping``,
            ``estimates``, ``anchor_intervals`` ...).
        calibration_pseudo, calibration_real: the last record's calibration metrics (the anchor);
            ``pseudo_by_size``: the size probes' pseudo metrics (engine/set_size.py; None: not measured).
        calibration_features: the calibration set's label-free features at the last weights (or None);
            ``pair_features``: the generic calibration pairs' sets' features at the same weights, by pair name.
        reference_images, reference_masks, reference_indices: the engine's references at the working size.
        segmenter: the reverse segmenter instance that ran in training (its fitted weights included).
        calibration: the cached labelled calibration set.
        reference_dataset: the reference dataset as given (the quality regressor learns from it), or None.
        targets: the cached target sets by name.
        records: the run's records (the calibration Dice series of the combination).
        pairs: the labelled calibration pairs; ``pair_sets``: their sets by pair name (for the combination).
        styled_sets: each target's styled calibration set by target name (the regressor's per-target map).
        logits_fn: how the model's logits are read.
        volumetric: the sets are 3D (no per-case step).
        progress: show the long fits' progress.
    """

    config: SPEConfig
    report: SPEReport
    calibration_pseudo: Mapping[str, Any]
    calibration_real: Mapping[str, Any]
    calibration_features: np.ndarray | None
    reference_images: Tensor
    reference_masks: Tensor
    reference_indices: Sequence[int]
    segmenter: ReverseSegmenter
    calibration: CachedSet
    reference_dataset: SizedDataset | None = None
    pair_features: Mapping[str, np.ndarray] = field(default_factory=dict)
    pseudo_by_size: Mapping[str, Any] | None = None
    targets: Mapping[str, CachedSet] = field(default_factory=dict)
    records: Sequence[Record] = ()
    pairs: Sequence[dict[str, Any]] = ()
    pair_sets: Mapping[str, CachedSet] = field(default_factory=dict)
    styled_sets: Mapping[str, CachedSet] = field(default_factory=dict)
    logits_fn: LogitsFn = default_logits
    volumetric: bool = False
    progress: bool = False


def _artifact(outcome: RunOutcome, model: nn.Module | None) -> FittedSPE:
    """The fitted state of ``outcome`` without any per-case scorer."""
    report, cal = outcome.report, outcome.calibration
    info: dict[str, Any] = {
        "targets": estimates_to_dict(report.estimates),  # plain dicts: the estimator file holds no objects
        "n_records": int(report.section("n_records", len(outcome.records))),
        "custom_logits_fn": outcome.logits_fn is not default_logits,
    }
    if len(cal):
        info["input_shape"] = [int(s) for s in cal.inputs[0].shape]
    if model is not None:
        info["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
        info["model_fingerprint"] = model_fingerprint(model)  # the final weights the estimator was fitted at
    anchor: dict[str, Any] | None = None
    if report.anchor_intervals is not None:
        anchor = {
            "intervals": json_form(report.anchor_intervals),
            # a run target's own model (its target-styled pair joined it): used for a set of the same name
            "intervals_by_target": json_form(report.anchor_intervals_by_target),
            "calibration_pseudo": dict(outcome.calibration_pseudo),
            "calibration_real": dict(outcome.calibration_real),
        }
        if outcome.pseudo_by_size:  # the anchor of sets smaller than the calibrated ones
            anchor["pseudo_by_size"] = json_form(outcome.pseudo_by_size)
        if outcome.calibration_features is not None:  # label-free features for the extrapolation flag
            anchor["calibration_features"] = np.asarray(outcome.calibration_features, float).tolist()
            if outcome.pair_features:  # the calibrated sets a new set may look like (nearest-set distance)
                anchor["pair_features"] = {n: np.asarray(f, float).tolist() for n, f in outcome.pair_features.items()}
    seg = outcome.segmenter
    return FittedSPE(
        outcome.config,
        seg.spec(),
        json_form(report.mapping),
        outcome.reference_images,
        outcome.reference_masks,
        outcome.reference_indices,
        segmenter_state=seg.state_tensors() if seg.needs_fit else {},
        anchor=anchor,
        info=info,
    )


@torch.no_grad()
def with_case_scorer(
    est: SPEEstimator,
    model: nn.Module,
    scorer: CaseScorer,
    calibration: Any,
    reference: Any = None,
    logits_fn: LogitsFn = default_logits,
    device: torch.device | str | None = None,
    progress: bool = False,
    predicted: tuple[list[Tensor], Tensor] | None = None,
    styled: Mapping[str, CachedSet] | None = None,
) -> SPEEstimator:
    """A new estimator: ``est``'s artifact with ``scorer`` fitted on the labelled ``calibration`` set (and
    ``reference``, for scorers that learn from it) at ``model``'s weights. 2D only. ``predicted``: the
    model's masks and confidence of ``calibration`` (a cached set) when already known (not predicted again).
    ``styled``: the run targets' styled calibration sets by target name (the regressor recalibrates per target)."""
    if scorer.name not in _SCORER_FIELDS:
        raise ValueError(f"no estimator field for a scorer named {scorer.name!r}; known: {sorted(_SCORER_FIELDS)}.")
    c = est.config
    # the run's own labelled sets: their dict items carry the run's keys
    cal = est.cache(calibration, "calibration", c.image_key, c.label_key)
    ref = None if reference is None else est.cache(reference, "reference", c.image_key, c.label_key)
    for labelled in (cal, ref):
        if labelled is not None:
            est.check_2d(labelled)
    device = model_device(model, device)

    def predict(d: CachedSet) -> tuple[list[Tensor], Tensor]:
        if predicted is not None and d is cal:
            return predicted
        return est.predict(model, d, device, logits_fn)

    data = ScorerFitData(
        cal,
        predict,
        device,
        c.seed,
        c.level,
        reference=ref,
        progress=progress,
        styled=dict(styled or {}),
    )
    with torch.enable_grad():  # the regressor trains
        scorer.fit(data)
    fitted = est.fitted.replace(**{_SCORER_FIELDS[scorer.name]: scorer.state()})
    active = "regressor" if fitted.quality else "rca"  # the scorer the new estimator scores cases with
    return est.with_fitted(fitted, scorer=scorer if scorer.name == active else None)


def fit_estimator(
    outcome: RunOutcome,
    model: nn.Module | None = None,
    *,
    quality: bool | None = None,
    settings: QualitySettings | None = None,
    combine: bool = True,
    warn: Callable[[str], Any] | None = None,
) -> SPEEstimator:
    """The fitted estimator of a finished run: built once, never changed afterwards.

    With ``model`` (the trained model; 2D only) the per-case RCA flags are calibrated on the run's calibration
    set (and what the model was given there is kept: ``info["input_summary"]``, the yardstick of
    ``check_inputs``). With ``quality`` (default ``config.quality_regressor``; binary only) the quality
    regressor is fitted (``settings``) and, with ``combine``, its weight beside SPE chosen on the calibration
    pairs' sets. A failing combination is warned and left out (``config.strict``: raised). What the fit
    found for the report is under ``estimator.fitted.notes`` (``quality``, ``combined``, ``quality_seconds``).
    """
    c = outcome.config
    say = warn or (lambda message: warnings.warn(message, stacklevel=3))
    module = None if outcome.volumetric else model
    est = SPEEstimator(_artifact(outcome, model), segmenter=outcome.segmenter)  # the class is recorded for 3D too
    if module is None:
        return est
    device = model_device(module)
    cal = outcome.calibration
    masks, conf = est.predict(module, cal, device, outcome.logits_fn)
    fitted = est.fitted
    if cal.inputs:
        fitted = fitted.replace(info={**fitted.info, "input_summary": input_summary(cal.inputs, masks, conf)})
    est = with_case_scorer(
        est.with_fitted(fitted), module, est.rca_scorer(), cal, logits_fn=outcome.logits_fn, predicted=(masks, conf)
    )
    if not (c.quality_regressor if quality is None else quality) or c.classes:
        return est
    start = time.perf_counter()
    reference = outcome.reference_dataset
    regressor = RegressorScorer(settings)
    est = with_case_scorer(
        est, module, regressor, cal, reference, outcome.logits_fn, progress=outcome.progress, styled=outcome.styled_sets
    )
    assert regressor.calibration is not None  # fitted just now
    notes: dict[str, Any] = {"quality": {k: v for k, v in regressor.calibration.items() if k != "mapping"}}
    combined = None
    if combine:
        try:
            combined = _combination(est, module, outcome)
        except Exception as err:
            if c.strict:
                raise
            say(f"SPE: combining SPE with the quality regressor failed: {err!r}")
    quality_state = dict(est.quality or {})
    if combined is not None:
        notes["combined"] = combined
        quality_state["combination"] = {"weight": combined["weight"], "n_sets": combined["n_sets"]}
    notes["quality_seconds"] = time.perf_counter() - start
    return est.with_fitted(est.fitted.replace(quality=quality_state, notes=notes), scorer=regressor)


def _mean_estimate(
    est: SPEEstimator, model: nn.Module, data: CachedSet, logits_fn: LogitsFn, name: str | None = None
) -> float | None:
    """The mean per-case estimate of ``data`` scored as the set called ``name`` (a run target: its own map,
    the rows ``estimate(..., name=<target>)`` gives; None: the calibration-set map)."""
    device = model_device(model)
    masks, conf = est.predict(model, data, device, logits_fn)
    ids = [str(i) for i in data.indices]
    rows = (
        est.scorer(device).score(est.case_inputs(model, data, masks, conf, ids, device, logits_fn, name), device).rows
    )
    values = [r.estimated_dice for r in rows if r.estimated_dice is not None]
    return float(np.mean(values)) if values else None


def _combination(est: SPEEstimator, model: nn.Module, outcome: RunOutcome) -> dict[str, Any] | None:
    """Dice of every target as ``w * regressor mean + (1 - w) * SPE``, ``w`` chosen on the calibration pairs'
    sets (development data: their real Dice is known) with the fitted quality regressor; None without pairs."""
    report = outcome.report
    mapping = report.mapping.get("dice")
    if not outcome.pairs or not mapping or "error" in mapping:
        return None
    pseudo = series(list(outcome.records), "pseudo", CALIBRATION, "dice")
    real = series(list(outcome.records), "real", CALIBRATION, "dice")
    ok = np.isfinite(pseudo) & np.isfinite(real)
    if not ok.any():
        return None
    last = int(np.flatnonzero(ok)[-1])
    # held out: the regressor's map refitted without each pair's shift family (subsets: none left, skipped)
    dev = heldout_regressor_means(est, model, outcome.calibration, outcome.pair_sets, outcome.logits_fn)
    g = MetricMapping.from_dict(json_form(mapping))
    choice = combination_from_pairs(list(outcome.pairs), dev, g, float(pseudo[last]), float(real[last]))
    if choice is None:
        return None
    w = float(choice["weight"])
    estimates = {}
    for t, data in outcome.targets.items():
        spe, reg = report.estimates[t]["dice"].value, _mean_estimate(est, model, data, outcome.logits_fn, t)
        estimates[t] = {"value": combined_value(w, reg, spe), "spe": spe, "regressor": reg}
    return {
        "metric": "dice",
        # the rows both the choice and the use average: the run targets' own maps, or the calibration-set map
        "regressor_rows": "per_target" if (est.quality or {}).get("sites", {}).get("targets") else "calibration_set",
        "weight": w,
        "mae_by_weight": choice["mae"],
        "n_sets": choice["n_sets"],
        "estimates": estimates,
    }


@torch.no_grad()
def heldout_regressor_means(
    est: SPEEstimator,
    model: nn.Module,
    calibration: CachedSet,
    pair_sets: Mapping[str, CachedSet],
    logits_fn: LogitsFn = default_logits,
) -> dict[str, float | None]:
    """The regressor's mean estimate on each shifted pair set, made with the same kind of map as the run's
    targets' rows, so the combination weight is chosen on the rows it is applied to.

    When the run's targets have their own per-target maps (``scorer.sites``), each pair set gets one too,
    held out (:func:`~spe_lightning.percase.site_fit.heldout_site_means`). Otherwise the calibration-set map,
    refitted with the shifted copies of every *other* family (as
    :class:`~spe_lightning.percase.regressor.RegressorScorer` builds them), only when the fit used shifted copies
    (few bad calibration cases); else the map never saw the shifted sets and the plain means are returned.
    Subsets: None (they are the calibration cases the map is fitted on)."""
    device = model_device(model)
    scorer = est.scorer(device)
    if not isinstance(scorer, RegressorScorer) or scorer.calibration is None:
        raise ValueError("heldout_regressor_means: the estimator holds no fitted quality regressor.")
    qcal = scorer.calibration
    if (scorer.sites or {}).get("targets"):
        from spe_lightning.percase.site_fit import heldout_site_means

        def predict(data: CachedSet) -> tuple[list[Tensor], Tensor]:
            masks, conf = est.predict(model, data, device, logits_fn)
            return list(masks), conf

        assert scorer.sites is not None
        generic = {n: d for n, d in pair_sets.items() if n.rsplit("_", 1)[0] in SHIFT_FAMILIES}
        means = heldout_site_means(
            scorer.raw,
            predict,
            per_case_dice,
            calibration,
            generic,
            scorer.sites["rule"],
            qcal["level"],
            est.config.seed,
            shape=scorer.sites.get("shape", "linear"),  # estimators saved before the shape was chosen: linear
        )
        return {n: means.get(n) for n in pair_sets}

    def raw_of(data: CachedSet) -> tuple[np.ndarray, np.ndarray]:
        masks, _ = est.predict(model, data, device, logits_fn)
        if data.masks is None:
            raise ValueError(f"heldout_regressor_means: the set {data.name!r} has no masks.")
        return scorer.raw(data.gray, masks), per_case_dice(masks, data.masks)

    out: dict[str, float | None] = {n: None for n in pair_sets}
    if not qcal.get("n_extra_pairs"):
        for n, data in pair_sets.items():
            if not n.startswith("subset"):
                out[n] = _mean_estimate(est, model, data, logits_fn)
        return out
    x0, y0 = raw_of(calibration)
    seed = est.config.seed
    fam = {f: raw_of(shift_set(calibration, f, 2, seed=seed * 7919 + 97 * i)) for i, f in enumerate(SHIFT_FAMILIES)}
    for n, data in pair_sets.items():
        f = n.rsplit("_", 1)[0]
        if n.startswith("subset") or f not in fam:
            continue
        others = [fam[o] for o in fam if o != f]
        q = calibrate_quality(
            x0,
            y0,
            kind="isotonic",
            level=qcal["level"],
            extra_pairs=(np.concatenate([a for a, _ in others]), np.concatenate([b for _, b in others])),
        )
        out[n] = float(np.mean(quality_estimates(q, raw_of(data)[0])["estimate"]))
    return out
