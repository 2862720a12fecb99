"""SPEEstimator: the fitted SPE estimator applied to new unlabelled data.

A finished run builds it once (:func:`~spe_lightning.estimator.fitting.fit_estimator`, kept as
``run.estimator`` and saved as ``spe_estimator.pt``); it is never changed afterwards::

    run.estimator.save("spe_estimator.pt")
    result = SPEEstimator.load("spe_estimator.pt").estimate(model, new_images)
    result.estimates["dice"].value  # an Estimate: value, lower, upper, pseudo, reason, ...
    result.cases[0]                 # a CaseRow: per-case quality score, estimated Dice and flag

Given the same weights, data and target name, :meth:`SPEEstimator.estimate` reproduces the estimate the
callback reported after fit (same support order, reverse step and G).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning.config import ALERT_ON
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.input_check import border_fraction, compare_inputs, input_summary
from spe_lightning.engine.predict import LogitsFn, default_logits, model_device
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.shifts import subset
from spe_lightning.estimator.base import EstimatorBase
from spe_lightning.estimator.persistence import fitted_from_state, load
from spe_lightning.estimator.results import ChunkedResult, EstimateResult
from spe_lightning.monitoring.alerts import alerts_for
from spe_lightning.monitoring.chunks import Chunker, split
from spe_lightning.percase.combination import combined_value
from spe_lightning.percase.labels import (
    label_positions,
    labelled_estimates,
    labelled_metrics,
    ppi_alerts,
    suggest_labels,
)
from spe_lightning.percase.mirror import MIRROR, mirror_consistency
from spe_lightning.percase.rca import per_case_dice
from spe_lightning.percase.scorer import CaseInputs, CaseRow, case_rows
from spe_lightning.percase.set_agreement import rows_vs_set, with_set_uncertainty

__all__ = ["SPEEstimator"]


class SPEEstimator(EstimatorBase):
    """A fitted SPE estimator: settings, reverse segmenter, references, G per key, a fitted per-case scorer.

    Built once by a finished run (``run.estimator``) or :meth:`load`-ed from its file; :meth:`estimate` applies
    it to a model and new unlabelled images, :meth:`estimate_chunks` to chunks of incoming data. The fitted
    state is :attr:`fitted` (:class:`~spe_lightning.estimator.fitted.FittedSPE`); see
    :class:`~spe_lightning.estimator.base.EstimatorBase` for the constructor.
    """

    @classmethod
    def load(cls, path: str | Path, max_mb: float = 80.0, allow_download: bool = False) -> SPEEstimator:
        """Read an estimator file with ``torch.load(weights_only=True)``: it cannot run code.

        Files above ``max_mb`` (default: the 64 MB reference cap of :meth:`save` plus room for the
        rest) are refused before reading. The reverse segmenter the file names is rebuilt without
        downloading anything unless ``allow_download=True``.
        """
        return cls(load(path, max_mb), allow_download=allow_download)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SPEEstimator:
        """The estimator of a :meth:`state` dict (version-checked)."""
        return cls(fitted_from_state(state))

    # ------------------------------------------------------------------ the one estimate flow
    def _set_estimates(
        self, data: CachedSet, masks: Sequence[Tensor], conf: Tensor | None, device: torch.device, target: str | None
    ) -> tuple[dict[str, Estimate], dict[str, Any], dict[str, float | None] | None]:
        """One set's estimates, its pseudo metrics (values, support, reason) and its real metrics (with masks)."""
        engine = self.engine
        pseudo = engine.pseudo(data, masks, device)
        distance, nearest = self.distances(data, masks, conf)  # without the model's confidence (masks given): none
        estimates = self.estimate_from_pseudo(
            pseudo["values"], pseudo["reason"], distance, self.bounds(data), target, nearest=nearest, n_images=len(data)
        )
        real = engine.real(data, masks)
        if real:  # a set that came with masks: the truth beside each estimate, as in the run's report
            estimates = {k: e.with_true(real.get(k)) for k, e in estimates.items()}
        return estimates, pseudo, real

    def case_inputs(
        self, model: nn.Module, data: CachedSet, masks: Sequence[Tensor], conf: Tensor, ids: Sequence[str],
        device: torch.device, logits_fn: LogitsFn, name: str | None = None,
    ) -> CaseInputs:  # fmt: skip
        """The per-case scorer's inputs of ``data`` scored as the set ``name``, with the model's mirror
        consistency when the scorer stacks it there (:meth:`CaseScorer.model_signals`)."""
        real = per_case_dice(masks, data.masks) if data.masks is not None else None
        mirror = None
        if MIRROR in self.scorer(device).model_signals(name):
            mirror = mirror_consistency(lambda d: self.predict(model, d, device, logits_fn), data, masks)
        return CaseInputs(data.gray, masks, conf, ids, real, name, mirror)

    def _case_rows(
        self, model: nn.Module, data: CachedSet, masks: Sequence[Tensor], conf: Tensor, ids: Sequence[str] | None,
        device: torch.device, logits_fn: LogitsFn, progress: Callable[[int], Any] | None, name: str | None = None,
    ) -> tuple[list[CaseRow], float | None]:  # fmt: skip
        ids = [str(i) for i in ids] if ids is not None else data.ids or [str(i) for i in data.indices]
        inputs = self.case_inputs(model, data, masks, conf, ids, device, logits_fn, name)
        scoring = self.scorer(device).score(inputs, device, progress)
        return list(scoring.rows), scoring.threshold

    @torch.no_grad()
    def case_estimates(
        self,
        model: nn.Module,
        images: Any,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
    ) -> list[CaseRow]:
        """Only the per-case rows of :meth:`estimate` (no set-level reverse step): each case's quality,
        estimated Dice with its interval and flag (from the quality regressor when fitted, else RCA)."""
        data = self.cache(images, "cases")
        self.check_2d(data)
        device = model_device(model, device)
        masks, conf = self.predict(model, data, device, logits_fn)
        return self._case_rows(model, data, masks, conf, None, device, logits_fn, None)[0]

    @torch.no_grad()
    def check_inputs(
        self,
        model: nn.Module,
        images: Any,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
    ) -> dict[str, Any]:
        """Compare ``images`` with the images the estimator was fitted on, before estimating.

        The model's inputs (intensity statistics, padding bars) and its predictions (foreground fraction,
        confidence) against the calibration images' (stored at fit time; estimator files without them are
        compared on what they hold, the rest is listed under ``not_compared``). Returns the record of
        :func:`~spe_lightning.engine.input_check.compare_inputs` (``verdict``, ``checks``, ``warnings`` naming
        the likely cause and the fix). Raises ``ValueError`` when the channel count differs from the model's
        calibration inputs (the model could not take them).
        """
        data = self.cache(images, "target", image_key, label_key)
        if data.volumetric:  # the statistics are of 2D images; a 3D run stores none
            why = "every statistic: the input check compares 2D images; these are 3D volumes (compare them yourself)"
            model_check = self.compare_model(model)
            warned = [model_check["message"] + "."] if model_check["message"] else []
            return {"verdict": "not_compared", "checks": [], "not_compared": [why], "warnings": warned,
                    "model": model_check}  # fmt: skip
        stored = self.info.get("input_summary")
        shape = self.info.get("input_shape")
        want = set(stored["channels"]) if stored and stored.get("channels") else {int(shape[0])} if shape else None
        have = sorted({int(x.shape[0]) for x in data.inputs})
        if want and have and set(have) - want:
            fix = "--channels rgb" if 3 in want else "--channels gray" if 1 in want else "your --dataset / --transform"
            raise ValueError(
                f"the model was calibrated on {'/'.join(map(str, sorted(want)))}-channel images and these have "
                f"{'/'.join(map(str, have))} channel(s): read them as in training ({fix})."
            )
        device = model_device(model, device)
        masks, conf = self.predict(model, data, device, logits_fn)
        new = input_summary(data.inputs, masks, conf)
        ref_border = None
        if stored is None and self.reference_images is not None:
            ref_border = [border_fraction(x) for x in self.reference_images]
        written = self.written_by  # the loaded file's version ("unknown": not recorded)
        out = compare_inputs(stored, new, ref_border, None if written in (None, "", "unknown") else str(written))
        out["n_images"] = len(data)
        out["n_calibration"] = int(stored["n"]) if stored else None
        out["model"] = self.compare_model(model)
        if out["model"]["message"]:
            out["warnings"].append(out["model"]["message"] + ".")
        return out

    @torch.no_grad()
    def estimate(
        self,
        model: nn.Module,
        images: Any,
        name: str = "target",
        per_case: bool | None = None,
        ids: Sequence[str] | None = None,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
        progress: Callable[[int], Any] | None = None,
        labelled_masks: Mapping[str | int, Tensor] | None = None,
        label_design: Mapping[str, Any] | None = None,
    ) -> EstimateResult:
        """Estimate every metric (with its interval) of ``model`` on ``images``, and score each case.

        Args:
            model: the trained segmentation model (``model(x)`` gives logits; else pass ``logits_fn``).
            images: a dataset (items ``image``, ``(image, mask)`` or dicts), a tensor ``[N,C,H,W]`` or a
                list of ``[C,H,W]`` tensors. Masks, if present, are only used to report the truth.
            name: the set's name; it seeds the support order, so use the callback's target name
                (``"target"`` for a single dataset) to reproduce the in-training estimate exactly.
            per_case: also compute per-case quality scores and flags (None: for 2D images, not for 3D volumes,
                whose per-case scores do not exist; True on volumes raises).
            ids: one id per image for the per-case rows (default: the dict items' ``"id"`` when every item has
                one, else positions).
            logits_fn: ``fn(model, images) -> logits`` as given to the callback.
            device: where to run (default: the model's device).
            image_key, label_key: keys of dict items (default: the run's, ``SPEConfig.image_key``/``label_key``).
            progress: called with the number of finished cases (e.g. ``tqdm.update``).
            labelled_masks: masks of some of the cases (``{case id or position: mask}``, binary, at the
                image's size): ``result.labelled`` then holds the prediction-powered estimate of Dice, IoU,
                precision and recall with its interval at ``level`` beside the labelled-only interval, and
                the labelled rows their real Dice. The labelled cases must be a uniform random sample of
                the images, or exactly the cases of ``label_design`` (see docs/few_labels.md).
            label_design: the dict of :meth:`suggest_labels` whose suggested cases were labelled.
        """
        data = self.cache(images, name, image_key, label_key)
        if per_case is None:
            per_case = not (data.volumetric or len(data.units) != len(data))
        if labelled_masks is not None and not per_case:
            raise ValueError("labelled_masks need the per-case estimates: leave per_case=True.")
        if ids is not None and len(ids) != len(data):
            raise ValueError(f"{len(ids)} ids for {len(data)} images.")
        if per_case:
            self.check_2d(data)
        device = model_device(model, device)
        masks, conf = self.predict(model, data, device, logits_fn)
        if progress is not None:
            progress(0)
        estimates, pseudo, true = self._set_estimates(data, masks, conf, device, target=name)
        cases: list[CaseRow] = []
        threshold = None
        widened = None
        if per_case:
            cases, threshold = self._case_rows(model, data, masks, conf, ids, device, logits_fn, progress, name)
            if self.config.case_set_uncertainty and "dice" in estimates:
                cases, widened = with_set_uncertainty(cases, estimates["dice"].lower, estimates["dice"].upper)
        labelled = None
        if labelled_masks is not None:
            cases, labelled = self._with_labels(cases, masks, labelled_masks, label_design)
        return EstimateResult(
            name=name,
            combined=self._combined(estimates, cases),
            estimates=estimates,
            n_images=len(data),
            n_support=pseudo["n_support"],
            level=self.config.level,
            cases=cases,
            masks=list(masks),
            gray=data.gray,
            true=true,
            case_threshold=threshold,
            reason=pseudo["reason"],
            labelled=labelled,
            case_agreement=_rows_vs_set(cases, estimates, widened),
        )

    def _combined(self, estimates: Mapping[str, Estimate], cases: Sequence[CaseRow]) -> dict[str, Any] | None:
        """SPE's Dice combined with the regressor's mean per-case estimate, with the weight the run chose."""
        weight = ((self.quality or {}).get("combination") or {}).get("weight")
        dice = estimates.get("dice")
        spe = None if dice is None else dice.value
        values = [c.estimated_dice for c in cases if c.estimated_dice is not None]
        if weight is None or spe is None or not values:
            return None
        reg, w = float(np.mean(values)), float(weight)
        return {"value": combined_value(w, reg, spe), "weight": w, "spe": spe, "regressor": reg}

    @torch.no_grad()
    def estimate_chunks(
        self,
        model: nn.Module,
        images: Any,
        chunks: Chunker,
        name: str = "target",
        masks: Sequence[Tensor] | None = None,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
        alert_below: Mapping[str, float] | None = None,
        alert_above: Mapping[str, float] | None = None,
        alert_on: str | None = None,
        progress: Callable[[int], Any] | None = None,
        labelled_masks: Mapping[str | int, Tensor] | None = None,
        cases: Sequence[CaseRow] | None = None,
    ) -> ChunkedResult:
        """Monitor incoming data: predict once, then one estimate with its interval per chunk, and alerts.

        Args:
            model, images, name, logits_fn, device, image_key, label_key: as for :meth:`estimate`.
            chunks: a chunker (:func:`~spe_lightning.monitoring.chunks.split`): images per chunk (consecutive,
                in the given order), ``{label: positions}`` (e.g. :func:`~spe_lightning.monitoring.chunks.
                chunks_by_column`), a list of position lists, or a function ``n -> {label: positions}``.
            masks: the model's predicted masks of ``images`` when already known (e.g. ``EstimateResult.masks``
                of the same images): inference is then skipped.
            alert_below, alert_above, alert_on: thresholds as for :class:`~spe_lightning.SPECallback`
                (default: the ones the run was configured with).
            progress: called with 1 after each chunk (e.g. ``tqdm.update``).
            labelled_masks: masks of some cases (as for :meth:`estimate`): each chunk with at least 3 of
                them gets their prediction-powered estimate and interval (``labelled``; the labels inside a
                chunk must be a uniform random sample of it), and an alert (``alert_on="ppi_interval"``)
                when that whole interval lies beyond a threshold.
            cases: the per-case rows of these images (``EstimateResult.cases``) for ``labelled_masks``;
                computed here when not given (with ``masks`` given, the model then runs once more).

        Each chunk runs the flow of :meth:`estimate` on its own images (its own support set and reverse
        step; no target-styled interval model); its realised metrics (``true``) are reported when the images
        came with masks. A chunk smaller than every calibration pair's set (subsets as large as the training
        targets, at most the calibration set's size minus one) gets a wider interval and
        ``outside_calibrated_range`` (its mean varies more).
        """
        c = self.config
        data = self.cache(images, name, image_key, label_key)
        device = model_device(model, device)
        n = len(data)
        groups = split(chunks, n)
        below = c.alert_below if alert_below is None else dict(alert_below)
        above = c.alert_above if alert_above is None else dict(alert_above)
        on = alert_on or c.alert_on
        if on not in ALERT_ON:
            raise ValueError(f"alert_on must be one of {ALERT_ON}, got {on!r}.")
        start = time.perf_counter()
        conf = None  # without the model's confidence (masks given) no distance is measured
        if masks is None:
            masks, conf = self.predict(model, data, device, logits_fn)
        elif len(masks) != n:
            raise ValueError(f"{len(masks)} masks for {n} images.")
        labels: dict[int, Tensor] = {}
        labelled_cases: list[CaseRow] = []
        if labelled_masks is not None:
            labelled_cases, labels = self._chunk_labels(
                model, data, masks, conf, labelled_masks, cases, device, logits_fn
            )
        predicted = time.perf_counter()
        rows: list[dict[str, Any]] = []
        alerts: list[dict[str, Any]] = []
        for label, pos in groups.items():
            part = subset(data, pos, name)  # the set's name seeds the support order, as in training
            part_masks = [masks[i] for i in pos]
            estimates, pseudo, true = self._set_estimates(
                part, part_masks, None if conf is None else conf[pos], device, target=None
            )
            # a chunk's events are kept in their JSON form beside the prediction-powered ones (ChunkedResult)
            events = [e.to_dict() for e in alerts_for({name: estimates}, below, above, on, chunk=label)]
            with_labels = None
            if labelled_masks is not None:
                with_labels, ppi_events = self._chunk_ppi(labelled_cases, masks, labels, pos, name, below, above, label)
                events.extend(ppi_events)
            alerts.extend(events)
            rows.append(
                {
                    "chunk": label,
                    "n_images": len(pos),
                    "positions": list(pos),
                    "estimates": estimates,
                    "true": true,
                    "n_support": pseudo["n_support"],
                    "reason": pseudo["reason"],
                    "alerts": events,
                    **({} if with_labels is None else {"labelled": with_labels}),
                }
            )
            if progress is not None:
                progress(1)
        small_ones = [e for r in rows for e in r["estimates"].values() if e.widened_by_size]
        if small_ones:
            small = sorted({e.n_images for e in small_ones if e.n_images is not None})
            calibrated = small_ones[0].pairs_n_images
            corrected = (
                "their estimates are anchored on calibration subsets of their size (the size probes measured at fit "
                "end)"
                if any(e.anchor_pseudo is not None for e in small_ones)
                else "their pseudo metric comes from a smaller support set than the calibration's, which this "
                "estimator file cannot correct for (no size probes: re-fit with size_probes > 0; it runs low: false "
                "alerts)"
            )
            warnings.warn(
                f"SPE: chunks of {', '.join(map(str, small))} images are smaller than the calibrated sets "
                f"({calibrated} images): their intervals were widened and {corrected}; chunks of at least "
                f"{calibrated} images are estimated as calibrated.",
                stacklevel=2,
            )
        done = time.perf_counter()
        return ChunkedResult(
            name=name,
            chunks=rows,
            alerts=alerts,
            level=c.level,
            thresholds={"alert_below": below, "alert_above": above},
            alert_on=on,
            seconds={"predict": predicted - start, "estimate": done - predicted},
        )

    # ------------------------------------------------------------------ few labels (prediction-powered inference)
    def suggest_labels(
        self, result: EstimateResult | Sequence[CaseRow], k: int, seed: int = 0, n_strata: int | None = None
    ) -> dict[str, Any]:
        """The ``k`` target cases to label (a stratified random draw by per-case uncertainty, seeded), as a
        plain dict: label exactly those, then pass the dict as ``label_design`` with their masks to
        :meth:`estimate` (see :func:`~spe_lightning.percase.labels.suggest_labels`)."""
        cases = result.cases if isinstance(result, EstimateResult) else result
        if not cases:
            raise ValueError("suggest_labels needs the per-case rows (estimate with per_case=True).")
        return suggest_labels(cases, k, seed=seed, n_strata=n_strata)

    def _with_labels(
        self,
        cases: list[CaseRow],
        masks: Sequence[Tensor],
        labelled_masks: Mapping[str | int, Tensor],
        design: Mapping[str, Any] | None,
    ) -> tuple[list[CaseRow], dict[str, Any]]:
        """The rows marked labelled or not (the labelled ones with their real Dice) and the prediction-powered
        estimates of the labelled cases."""
        if self.config.classes:
            raise NotImplementedError("labelled_masks: prediction-powered estimates are for binary estimators.")
        ids = [c.id for c in cases]
        labels = label_positions(labelled_masks, ids)
        out = labelled_estimates(cases, masks, labels, self.config.level, design)
        real = dict(zip(labels, labelled_metrics(masks, labels, ids)["dice"]))
        rows = [
            c.with_label(float(real[i]), True) if i in real else c.with_label(c.real_dice, False)
            for i, c in enumerate(cases)
        ]
        return rows, out

    def _chunk_labels(
        self,
        model: nn.Module,
        data: CachedSet,
        masks: Sequence[Tensor],
        conf: Tensor | None,
        labelled_masks: Mapping[str | int, Tensor],
        cases: Sequence[CaseRow] | None,
        device: torch.device,
        logits_fn: LogitsFn,
    ) -> tuple[list[CaseRow], dict[int, Tensor]]:
        """The per-case rows (given, or computed) and the labelled positions of :meth:`estimate_chunks`."""
        if self.config.classes:
            raise NotImplementedError("labelled_masks: prediction-powered estimates are for binary estimators.")
        if cases is None:
            self.check_2d(data)
            if conf is None:  # masks were given: the confidence needs the model once more
                _, conf = self.predict(model, data, device, logits_fn)
            cases = self._case_rows(model, data, masks, conf, None, device, logits_fn, None)[0]
        if len(cases) != len(data):
            raise ValueError(f"{len(cases)} per-case rows for {len(data)} images.")
        rows = case_rows(cases)
        return rows, label_positions(labelled_masks, [c.id for c in rows])

    def _chunk_ppi(
        self,
        cases: Sequence[CaseRow],
        masks: Sequence[Tensor],
        labels: dict[int, Tensor],
        positions: Sequence[int],
        name: str,
        below: Mapping[str, float] | None,
        above: Mapping[str, float] | None,
        chunk: str,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One chunk's prediction-powered estimates (uniform design inside the chunk) and their alerts."""
        out = labelled_estimates(cases, masks, labels, self.config.level, None, positions)
        bounds = {
            m: {"value": r["estimate"], "lower": r["lower"], "upper": r["upper"]}
            for m, r in out["metrics"].items()
            if "estimate" in r
        }
        return out, ppi_alerts({name: bounds}, dict(below or {}), dict(above or {}), chunk=chunk, source="labels")

    def __repr__(self) -> str:
        images = self.reference_images
        n = 0 if images is None else images.shape[0]
        return (
            f"SPEEstimator(segmenter={self.segmenter_spec.get('name')!r}, metrics={self.metrics}, references={n}, "
            f"per_case={'regressor' if self.quality else 'calibrated' if self.cases else 'uncalibrated'}, "
            f"written_by='spe-lightning {self.written_by}')"
        )


def _rows_vs_set(
    cases: Sequence[CaseRow], estimates: Mapping[str, Estimate], widened: Mapping[str, float] | None
) -> dict[str, Any] | None:
    """The mean per-case Dice beside SPE's set Dice (:func:`~spe_lightning.percase.set_agreement.rows_vs_set`),
    and by how much the case intervals were widened for the set's uncertainty (None: not widened)."""
    dice = estimates.get("dice") or Estimate(None, None, None)
    out = rows_vs_set([c.estimated_dice for c in cases], dice.value, dice.lower, dice.upper)
    if out is not None:
        out["case_intervals_widened"] = None if widened is None else dict(widened)
    return out
