"""SPEEstimator: the fitted SPE estimator, saved after training and reused on new unlabelled data.

The file (``spe_estimator.pt``) holds only tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)`` and cannot run code: G is stored as its parameters
(:meth:`MetricMapping.to_dict`), the reverse segmenter as its spec (name + settings), and the reference
images/masks at the working size as tensors (float32 images, bool masks: about 86 KB per
reference at 128 px, e.g. 15 MB for 172 references; :meth:`SPEEstimator.save` refuses more than
``max_reference_mb``, default 64 MB, unless the references are left out with ``embed_reference=False``
and given again at load time).

    est = SPEEstimator.from_run(spe_callback.run, trainer.lightning_module)
    est.save("spe_estimator.pt")
    result = SPEEstimator.load("spe_estimator.pt").estimate(model, new_images)
    result.estimates["dice"]  # {"value", "lower", "upper", "pseudo", "reason"}
    result.cases[0]           # per-case quality score, estimated Dice and flag

Given the same weights, data and target name, :meth:`estimate` reproduces the estimate the
callback reported after fit (same support order, reverse step and G).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning import __version__
from spe_lightning.config import ALERT_ON, SPEConfig
from spe_lightning.data.adapters import resize_labels, resize_masks
from spe_lightning.engine.cached_set import CachedSet, SizedDataset, cache_dataset
from spe_lightning.engine.distance import diagonal, image_features, set_distance
from spe_lightning.engine.estimate import estimate
from spe_lightning.engine.input_check import border_fraction, compare_inputs, input_summary
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.predict import LogitsFn, default_logits, model_device, predict_labels
from spe_lightning.engine.records import CALIBRATION
from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set, subset
from spe_lightning.engine.spe_engine import SPEEngine
from spe_lightning.monitoring.alerts import alerts_for
from spe_lightning.monitoring.chunks import chunks_of
from spe_lightning.percase.labels import label_positions, labelled_estimates, labelled_metrics, suggest_labels
from spe_lightning.percase.rca import (
    CaseScores,
    calibrate_cases,
    case_rows,
    case_scores,
    per_case_dice,
    regressor_case_rows,
)
from spe_lightning.percase.regressor import (
    QualityRegressor,
    QualitySettings,
    calibrate_quality,
    combined_value,
    quality_estimates,
)
from spe_lightning.progress import Progress
from spe_lightning.reverse.base import ReverseSegmenter, make_segmenter

if TYPE_CHECKING:
    from spe_lightning.run import SPERun

__all__ = ["SPEEstimator", "EstimateResult", "ChunkedResult", "FORMAT", "VERSION", "IncompatibleEstimatorError"]

#: the ``format`` tag of an estimator file
FORMAT = "spe-estimator"
#: the file layout version this code writes (it reads 1 and 2)
VERSION = 2
#: settings of a version-1 file that SPEConfig names differently or not at all
_V1_ONLY = ("class_names", "class_indices")
_log = logging.getLogger(__name__)


class IncompatibleEstimatorError(ValueError):
    """The file is not an SPE estimator, or one of a layout version this spe-lightning cannot read."""


@dataclass
class EstimateResult:
    """What :meth:`SPEEstimator.estimate` found for one set of images."""

    name: str
    estimates: dict[str, dict[str, Any]]  # metric -> value, lower, upper, pseudo, reason
    n_images: int
    n_support: int | dict[str, int]  # per class with classes
    level: float
    cases: list[dict[str, Any]]  # per case: id, quality, estimated_dice, flagged, ... (empty if per_case=False)
    masks: list[Tensor] = field(repr=False)  # predicted masks, bool [1,H,W], native size
    gray: Tensor = field(repr=False)  # working-size gray images [N,1,w,w]
    true: dict[str, float | None] | None = None  # real metrics when the images came with masks
    case_threshold: float | None = None
    reason: str | None = None
    #: Dice as ``w * regressor mean + (1 - w) * SPE`` when the estimator holds a quality regressor with the
    #: weight its run chose (``{"value", "weight", "spe", "regressor"}``); None otherwise
    combined: dict[str, Any] | None = None
    #: with labelled target cases: the prediction-powered estimates
    #: (:func:`~spe_lightning.percase.labels.labelled_estimates`); None otherwise
    labelled: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no tensors, no per-case rows)."""
        flagged = sum(1 for c in self.cases if c.get("flagged"))
        return {
            "name": self.name,
            "n_images": self.n_images,
            "n_support": self.n_support,
            "level": self.level,
            "estimates": self.estimates,
            "true": self.true,
            "reason": self.reason,
            "cases": {"n": len(self.cases), "n_flagged": flagged, "threshold": self.case_threshold},
            "combined": self.combined,
            "labelled": self.labelled,
        }


@dataclass
class ChunkedResult:
    """What :meth:`SPEEstimator.estimate_chunks` found: one estimate (with interval) per chunk, and the alerts."""

    name: str
    chunks: list[dict[str, Any]]  # per chunk: chunk, n_images, positions, estimates, true, n_support, reason, alerts
    alerts: list[dict[str, Any]]  # every chunk's alert events, in chunk order
    level: float
    thresholds: dict[str, dict[str, float] | None]  # {"alert_below": ..., "alert_above": ...}
    alert_on: str
    seconds: dict[str, float]  # "predict" (model inference) and "estimate" (reverse steps and G)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no positions)."""
        chunks = [{k: v for k, v in c.items() if k != "positions"} for c in self.chunks]
        return {
            "name": self.name,
            "level": self.level,
            "alert_on": self.alert_on,
            **self.thresholds,
            "chunks": chunks,
            "alerts": self.alerts,
            "seconds": self.seconds,
        }


def _working_masks(masks: Sequence[Tensor], size: tuple[int, ...]) -> Tensor:
    """Bool ``[N,1,w,w]`` foreground (any class) of native-size masks, at the working size."""
    return torch.cat([resize_masks((m > 0)[None], size) for m in masks])


def _is_safe(obj: Any) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_safe(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_safe(v) for k, v in obj.items())
    return False


class SPEEstimator:
    """A fitted SPE estimator: settings, reverse segmenter spec, references, G per key, per-case calibration.

    Build it with :meth:`from_run` after fit (or :meth:`load` a saved one); :meth:`estimate`
    applies it to a model and new unlabelled images.

    Args:
        config: the run's :class:`~spe_lightning.SPEConfig` (or its ``to_dict()``).
        segmenter: the reverse segmenter's spec (``ReverseSegmenter.spec()``).
        mappings: key -> :meth:`MetricMapping.to_dict` (or ``{"kind", "error"}`` when G could not be fitted).
        reference_images: working-size gray references ``[R,1,w,w]`` in [0, 1] (None: give them later).
        reference_masks: their masks ``[R,1,w,w]`` bool (uint8 label maps with classes).
        reference_indices: positions of the references in the source reference dataset.
        cases: per-case calibration (:func:`~spe_lightning.percase.rca.calibrate_cases`); None when not calibrated.
        info: free-form extras (targets' in-training estimates, model class, input size).
        anchor: for anchored estimates (:mod:`spe_lightning.engine.estimate`): ``{"intervals": {key:
            interval model (plain numbers) or None}, "calibration_pseudo": {key: float},
            "calibration_real": {key: float}}`` at the last record; used when ``config.anchored``.
            ``"calibration_features"`` (a list of per-item feature lists, engine/distance.py) gives new
            sets their distance to the calibration set (the extrapolation flag); older files lack it.
    """

    def __init__(
        self,
        config: SPEConfig | dict[str, Any],
        segmenter: dict[str, Any],
        mappings: dict[str, dict[str, Any]] | None = None,
        reference_images: Tensor | None = None,
        reference_masks: Tensor | None = None,
        reference_indices: Sequence[int] = (),
        cases: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        anchor: dict[str, Any] | None = None,
    ) -> None:
        if "name" not in segmenter:
            raise ValueError("SPEEstimator: the segmenter spec needs a 'name'.")
        self.config = config if isinstance(config, SPEConfig) else SPEConfig.from_dict(config)
        self.segmenter_spec = dict(segmenter)
        self.reference_indices = [int(i) for i in reference_indices]
        self.mappings = {k: dict((mappings or {}).get(k, {"error": "no mapping stored"})) for k in self.keys}
        self.cases = cases
        #: the per-case quality regressor (:mod:`spe_lightning.percase.regressor`): ``{"regressor": state tensors,
        #: "calibration": plain numbers}``; None: per-case scores come from RCA
        self.quality: dict[str, Any] | None = None
        #: a learned reverse segmenter's fitted weights (plain tensors); empty for weight-free ones
        self.segmenter_state: dict[str, Tensor] = {}
        self._regressor: QualityRegressor | None = None
        self.anchor = anchor if self.config.anchored else None
        self.info = dict(info or {})
        self.reference_images: Tensor | None = None
        self.reference_masks: Tensor | None = None
        #: whether rebuilding the reverse segmenter may download weights (never from a file's own say-so)
        self.allow_download = False
        #: the spe-lightning version that wrote this estimator's file (this version's for a new estimator)
        self.written_by: str = __version__
        self._segmenter: ReverseSegmenter | None = None
        self._case_segmenter: ReverseSegmenter | None = None
        self._engine: SPEEngine | None = None
        if reference_images is not None:
            self.set_reference(reference_images, reference_masks)

    @property
    def metrics(self) -> list[str]:
        """The metric names."""
        return list(self.config.metrics)

    @property
    def keys(self) -> list[str]:
        """Estimate keys: the metrics, or per metric its class mean and ``"<metric>/<class>"``."""
        return self.config.keys

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run(
        cls, run: SPERun, module: nn.Module | None = None, k: int = 16, top: int = 1, dice_cut: float = 0.7
    ) -> SPEEstimator:
        """The estimator of a finished :class:`~spe_lightning.SPERun` (after its report was built).

        With ``module`` (the trained model) the per-case quality flags are calibrated on the run's
        calibration set (``k``/``top`` of :func:`~spe_lightning.percase.rca.case_scores`, flag
        cases whose real Dice is below ``dice_cut``); without it, per-case scores are not flagged.
        The estimator reuses the run's segmenter instance.
        """
        report, engine = run.report, run.engine
        if engine is None or report is None:
            raise ValueError("SPEEstimator.from_run: the run has no report yet; build it after fit.")
        cal = run.sets[CALIBRATION]
        info: dict[str, Any] = {
            "targets": {t: dict(e) for t, e in report.get("estimates", {}).items()},
            "n_records": int(report.get("n_records", len(run.records))),
            "custom_logits_fn": run.logits_fn is not default_logits,
        }
        if len(cal):
            info["input_shape"] = [int(s) for s in cal.inputs[0].shape]
        if module is not None:
            info["model_class"] = f"{type(module).__module__}.{type(module).__qualname__}"
        anchor: dict[str, Any] | None = None
        if report.get("anchor_intervals") is not None:
            last = run.records[-1]
            anchor = {
                "intervals": dict(report["anchor_intervals"]),
                # a run target's own model (its target-styled pair joined it): used for a set of the same name
                "intervals_by_target": dict(report.get("anchor_intervals_by_target", {})),
                "calibration_pseudo": dict(last["pseudo"].get(CALIBRATION, {})),
                "calibration_real": dict(last["real"].get(CALIBRATION, {})),
            }
            if run.calibration_features is not None:  # label-free features for the extrapolation flag
                anchor["calibration_features"] = [[float(v) for v in row] for row in run.calibration_features]
        est = cls(
            run.config,
            engine.segmenter.spec(),
            report["mapping"],
            engine.ref_images,
            engine.ref_labels,
            engine.ref_indices,
            info=info,
            anchor=anchor,
        )
        est._segmenter = engine.segmenter  # the very instance that ran during training
        est.segmenter_state = engine.segmenter.state_tensors() if engine.segmenter.needs_fit else {}
        if module is not None:
            est.calibrate_cases(module, cal, k=k, top=top, dice_cut=dice_cut, logits_fn=run.logits_fn)
        return est

    @classmethod
    def from_callback(cls, callback: Any, module: nn.Module | None = None, **kwargs: Any) -> SPEEstimator:
        """:meth:`from_run` of a fitted :class:`~spe_lightning.SPECallback`'s run (``callback.run``)."""
        return cls.from_run(callback.run, module, **kwargs)

    def set_reference(self, images: Tensor, masks: Tensor | None) -> None:
        """Use these working-size references: ``[R,1,w,w]`` gray in [0, 1], masks bool (or uint8 label maps)."""
        w = self.config.working_size
        if masks is None or images.ndim != 4 or tuple(images.shape[1:]) != (1, w, w) or masks.shape != images.shape:
            shape = None if masks is None else tuple(masks.shape)
            raise ValueError(f"references must be [R,1,{w},{w}] images and masks; got {tuple(images.shape)}, {shape}.")
        if len(self.reference_indices) not in (0, images.shape[0]):
            raise ValueError(f"{images.shape[0]} references given; the estimator used {len(self.reference_indices)}.")
        # clones: a view would make torch.save write its whole underlying storage
        self.reference_images = images.detach().float().cpu().clone()
        labels = bool(self.config.classes)
        self.reference_masks = masks.detach().cpu().to(torch.uint8 if labels else torch.bool).clone()
        self._engine = None

    def _cache_kwargs(self) -> dict[str, Any]:
        # the keys of dict items are per call here (estimate(..., image_key=, label_key=))
        return {k: v for k, v in self.config.cache_kwargs().items() if k not in ("image_key", "label_key")}

    def set_reference_dataset(self, dataset: SizedDataset, image_key: str = "image", label_key: str = "label") -> None:
        """Re-read the references from the dataset they came from (the stored indices pick them)."""
        ref = cache_dataset(
            "reference",
            dataset,
            image_key=image_key,
            label_key=label_key,
            indices=sorted(set(self.reference_indices)) or None,
            require_masks=True,
            slices="foreground",
            keep_inputs=False,
            **self._cache_kwargs(),
        )
        size = tuple(ref.gray.shape[-2:])
        self.set_reference(
            ref.gray, torch.cat([resize_labels(ref.unit_mask(r)[None], size) for r in range(len(ref.units))])
        )

    @property
    def segmenter(self) -> ReverseSegmenter:
        """The reverse segmenter, rebuilt from its spec on first use."""
        if self._segmenter is None:
            spec = dict(self.segmenter_spec)
            name = spec.pop("name")
            if name in ("universeg", "auto"):  # a file never starts a download on its own
                spec["download"] = self.allow_download
                w = spec.get("weights")
                if isinstance(w, str) and not Path(w).expanduser().is_file():
                    spec.pop("weights")  # saved on another machine: look in SPE_UNIVERSEG_WEIGHTS / the hub cache
            try:
                self._segmenter = make_segmenter(name, **spec)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"SPEEstimator: cannot rebuild the reverse segmenter {self.segmenter_spec}: {err} "
                    "(register a custom segmenter with register_segmenter before estimating)."
                ) from err
            if self._segmenter.needs_fit:
                if not self.segmenter_state:
                    raise ValueError(
                        f"SPEEstimator: the reverse segmenter {name!r} learns from the references, and this "
                        "estimator holds no fitted weights for it; re-export it with SPEEstimator.from_run."
                    )
                self._segmenter.load_state_tensors(self.segmenter_state)
        return self._segmenter

    @property
    def case_segmenter(self) -> ReverseSegmenter:
        """The segmenter of per-case scores: the reverse segmenter, or the one it names as ``case_segmenter``."""
        name = getattr(self.segmenter, "case_segmenter", None)
        if name is None:
            return self.segmenter
        if self._case_segmenter is None or self._case_segmenter.name != name:
            self._case_segmenter = make_segmenter(name)
        return self._case_segmenter

    @property
    def engine(self) -> SPEEngine:
        """The SPE engine over the stored references."""
        if self.reference_images is None or self.reference_masks is None:
            raise ValueError(
                "SPEEstimator: this file holds no reference images; give them with set_reference_dataset(dataset) "
                "(or --reference ROOT on the command line)."
            )
        if self._engine is None:
            n = self.reference_images.shape[0]
            ref = CachedSet(
                "reference",
                [],
                list(self.reference_masks),
                self.reference_images,
                list(self.reference_indices) or list(range(n)),
                [(i, -1) for i in range(n)],
            )
            self._engine = SPEEngine(self.segmenter, ref, **self.config.engine_kwargs())
        return self._engine

    # ------------------------------------------------------------------ save / load
    def state(self, embed_reference: bool = True) -> dict[str, Any]:
        """The saved dict: only tensors, numbers, strings, lists, dicts and None."""
        from spe_lightning import __version__

        ref: dict[str, Any] = {"indices": list(self.reference_indices), "embedded": bool(embed_reference)}
        if embed_reference:
            if self.reference_images is None:
                raise ValueError("SPEEstimator: no references to embed; save with embed_reference=False.")
            ref.update(images=self.reference_images, masks=self.reference_masks)
        state = {
            "format": FORMAT,
            "version": VERSION,
            "spe_lightning": __version__,
            "segmenter": dict(self.segmenter_spec),
            "config": self.config.to_dict(),
            "mappings": self.mappings,
            "reference": ref,
            "cases": self.cases,
            "quality": self.quality,
            "segmenter_state": self.segmenter_state,
            "anchor": self.anchor,
            "info": self.info,
        }
        if not _is_safe(state):
            raise TypeError("SPEEstimator state holds a non-plain object; it must be tensors, numbers and strings.")
        return state

    def save(self, path: str | Path, embed_reference: bool = True, max_reference_mb: float = 64.0) -> Path:
        """Write the estimator to ``path`` (``torch.save`` of :meth:`state`)."""
        if embed_reference and self.reference_images is not None and self.reference_masks is not None:
            mb = (
                self.reference_images.numel() * self.reference_images.element_size()
                + self.reference_masks.numel() * self.reference_masks.element_size()
            ) / 2**20
            if mb > max_reference_mb:
                raise ValueError(
                    f"SPEEstimator.save: the {self.reference_images.shape[0]} references take {mb:.1f} MB "
                    f"(> max_reference_mb={max_reference_mb:g}); use max_references= on SPECallback, raise "
                    "max_reference_mb, or save with embed_reference=False and give the references at load time."
                )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state(embed_reference), path)
        return path

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SPEEstimator:
        """The estimator of a :meth:`state` dict (version-checked)."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            hint = (
                " It is a Lightning checkpoint: did you swap the checkpoint and the estimator (--ckpt, --estimator)?"
                if isinstance(state, dict) and "state_dict" in state
                else " SPECallback writes spe_estimator.pt next to spe_report.json after fit."
            )
            raise IncompatibleEstimatorError(f"not an SPE estimator file (no 'format': 'spe-estimator' entry).{hint}")
        version = state.get("version")
        if version not in (1, VERSION):
            raise IncompatibleEstimatorError(
                f"SPE estimator file version {version!r} (written by spe-lightning {state.get('spe_lightning', '?')}) "
                f"cannot be read by this spe-lightning, which reads versions 1 and {VERSION}; re-export the "
                "estimator with a matching spe-lightning (SPEEstimator.from_run(...).save(...))."
            )
        config = state["config"]
        if version == 1:
            config = _config_from_v1(config, state["metrics"], anchored=state.get("anchor") is not None)
        ref = state["reference"]
        est = cls(
            config,
            state["segmenter"],
            state["mappings"],
            ref.get("images"),
            ref.get("masks"),
            ref.get("indices", []),
            cases=state.get("cases"),
            anchor=state.get("anchor"),
            info=state.get("info"),
        )
        est.quality = state.get("quality")
        est.segmenter_state = dict(state.get("segmenter_state") or {})
        est.written_by = str(state.get("spe_lightning") or "unknown")
        return est

    @classmethod
    def load(cls, path: str | Path, max_mb: float = 80.0, allow_download: bool = False) -> SPEEstimator:
        """Read an estimator file with ``torch.load(weights_only=True)``: it cannot run code.

        Files above ``max_mb`` (default: the 64 MB reference cap of :meth:`save` plus room for the
        rest) are refused before reading. The reverse segmenter the file names is rebuilt without
        downloading anything unless ``allow_download=True``.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path}: no such estimator file. SPECallback writes spe_estimator.pt next to spe_report.json after "
                "fit (the trainer's log folder, or log_dir=); SPEEstimator.from_run(...).save(path) writes one too."
            )
        size_mb = Path(path).stat().st_size / 2**20
        if size_mb > max_mb:
            raise IncompatibleEstimatorError(
                f"{path}: {size_mb:.1f} MB, above max_mb={max_mb:g} (--max-estimator-mb); "
                "raise it if you trust the file."
            )
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise IncompatibleEstimatorError(
                f"{path}: refused to load; an SPE estimator file holds only tensors, numbers and strings, "
                f"and this one holds something else ({str(err).splitlines()[0][:200]})."
            ) from err
        try:
            est = cls.from_state(state)
        except IncompatibleEstimatorError as err:
            raise IncompatibleEstimatorError(f"{path}: {err}") from None
        est.allow_download = bool(allow_download)
        from spe_lightning import __version__

        written = state.get("spe_lightning") if isinstance(state, dict) else None
        _log.info("SPE estimator %s: written by spe-lightning %s (this is %s)", path, written or "?", __version__)
        return est

    # ------------------------------------------------------------------ estimating
    def _cache(self, name: str, images: Any, image_key: str, label_key: str) -> CachedSet:
        if isinstance(images, CachedSet):
            return images
        if isinstance(images, Tensor) and images.ndim == 3:
            images = images[:, None]
        return cache_dataset(name, images, image_key=image_key, label_key=label_key, **self._cache_kwargs())

    def cache(self, images: Any, name: str = "target", image_key: str = "image", label_key: str = "label") -> CachedSet:
        """``images`` read once at this estimator's settings (for :meth:`estimate` and :meth:`estimate_chunks`)."""
        return self._cache(name, images, image_key, label_key)

    def _predict(
        self, model: nn.Module, data: CachedSet, device: torch.device, logits_fn: LogitsFn
    ) -> tuple[list[Tensor], Tensor]:
        """Predicted masks (bool, or uint8 label maps with classes) and confidence, as the callback predicts them."""
        c = self.config
        return predict_labels(
            model,
            data,
            device,
            c.batch_size,
            logits_fn,
            c.activation,
            c.threshold,
            c.foreground_class,
            c.class_indices or None,
        )

    def _check_2d(self, data: CachedSet) -> None:
        if data.volumetric or len(data.units) != len(data):
            raise NotImplementedError("SPEEstimator: per-case scores are for 2D images; pass per_case=False for 3D.")

    @torch.no_grad()
    def calibrate_cases(
        self,
        model: nn.Module,
        calibration: Any,
        k: int = 16,
        top: int = 1,
        dice_cut: float = 0.7,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """Calibrate the per-case flags on a labelled set (the model's predictions vs its masks), and keep what the
        model was given and predicted there (``info["input_summary"]``, the yardstick of :meth:`check_inputs`)."""
        data = self._cache("calibration", calibration, "image", "label")
        if data.masks is None:
            raise ValueError("SPEEstimator.calibrate_cases: the calibration set needs masks.")
        self._check_2d(data)
        device = model_device(model, device)
        masks, conf = self._predict(model, data, device, logits_fn)
        if data.inputs:
            self.info["input_summary"] = input_summary(data.inputs, masks, conf)
        scores = self._scores(data, masks, k, top, None, device)
        self.cases = calibrate_cases(scores, per_case_dice(masks, data.masks), k, top, dice_cut)
        return self.cases

    def fit_quality(
        self,
        model: nn.Module,
        reference: Any,
        calibration: Any,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        settings: QualitySettings | None = None,
        extra_candidates: Sequence[Tensor] = (),
        progress: bool = False,
    ) -> dict[str, Any]:
        """Fit the per-case quality regressor on the labelled ``reference`` set and calibrate it on ``calibration``.

        The regressor learns Dice from the references' true masks damaged in the ways models err
        (:mod:`spe_lightning.percase.mask_errors`) and from ``model``'s own masks of the references (plus
        ``extra_candidates``, e.g. masks from earlier checkpoints, working size). Calibration maps its output
        to per-case Dice with intervals on the model's calibration predictions: combined with the model's
        confidence when the calibration set has at least 5 cases below Dice 0.7, else with the model's
        predictions on shifted copies of the calibration images as extra pairs. 2D binary only.
        ``progress``: show the regressor's fit (:mod:`spe_lightning.progress`, one unit per epoch and member).
        """
        ref = self._cache("reference", reference, "image", "label")
        data = self._cache("calibration", calibration, "image", "label")
        if ref.masks is None or data.masks is None:
            raise ValueError("SPEEstimator.fit_quality: the reference and calibration sets need masks.")
        self._check_2d(ref)
        self._check_2d(data)
        device = model_device(model, device)
        size = tuple(ref.gray.shape[-2:])

        ref_pred, _ = self._predict(model, ref, device, logits_fn)
        regressor = QualityRegressor(settings, device=device)
        s = regressor.settings
        with Progress(s.epochs * max(1, s.n_models), "SPE: fitting the quality regressor", progress, "epoch") as bar:
            regressor.fit(
                ref.gray,
                _working_masks(ref.masks, size),
                extra_candidates=[_working_masks(ref_pred, size), *extra_candidates],
                seed=self.config.seed,
                progress=lambda epoch, loss: bar.update(1),
            )
        masks, conf = self._predict(model, data, device, logits_fn)
        raw = regressor.predict(data.gray, _working_masks(masks, size)).numpy()
        real = per_case_dice(masks, data.masks)
        level = self.config.level
        if int((real < 0.7).sum()) >= 5:
            qcal = calibrate_quality(raw, real, kind="linear", level=level, confidence=conf.numpy())
        else:  # too few bad calibration cases: the model's predictions on shifted copies join the fit
            xs, ys = [], []
            for i, family in enumerate(SHIFT_FAMILIES):
                shifted = shift_set(data, family, 2, seed=self.config.seed * 7919 + 97 * i)
                s_masks, _ = self._predict(model, shifted, device, logits_fn)
                xs.append(regressor.predict(shifted.gray, _working_masks(s_masks, size)).numpy())
                assert shifted.masks is not None  # shifted copies keep the calibration set's masks
                ys.append(per_case_dice(s_masks, shifted.masks))
            qcal = calibrate_quality(
                raw, real, kind="isotonic", level=level, extra_pairs=(np.concatenate(xs), np.concatenate(ys))
            )
        self.quality = {"regressor": regressor.state_tensors(), "calibration": qcal}
        self._regressor = regressor
        return qcal

    def _quality_regressor(self, device: torch.device) -> QualityRegressor:
        if self._regressor is None:
            assert self.quality is not None
            self._regressor = QualityRegressor.from_state(self.quality["regressor"], device=device)
        return self._regressor

    def _scores(
        self,
        data: CachedSet,
        masks: Sequence[Tensor],
        k: int,
        top: int,
        empty_score: float | None,
        device: torch.device,
        progress: Callable[[int], Any] | None = None,
    ) -> CaseScores:
        size = tuple(data.gray.shape[-2:])
        wmasks = _working_masks(masks, size)
        engine = self.engine
        return case_scores(
            self.case_segmenter,
            data.gray,
            wmasks,
            engine.ref_images,
            engine.ref_masks,
            k=k,
            top=top,
            threshold=self.config.threshold,
            min_foreground=self.config.min_foreground,
            empty_score=empty_score,
            device=device,
            progress=progress,
        )

    @torch.no_grad()
    def case_estimates(
        self,
        model: nn.Module,
        images: Any,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
    ) -> list[dict[str, Any]]:
        """Only the per-case rows of :meth:`estimate` (no set-level reverse step): each case's quality,
        estimated Dice with its interval and flag (from the quality regressor when fitted, else RCA)."""
        data = self._cache("cases", images, "image", "label")
        self._check_2d(data)
        device = model_device(model, device)
        masks, conf = self._predict(model, data, device, logits_fn)
        return self._case_rows(data, masks, conf, None, device, None)[0]

    @torch.no_grad()
    def check_inputs(
        self,
        model: nn.Module,
        images: Any,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ) -> dict[str, Any]:
        """Compare ``images`` with the images the estimator was fitted on, before estimating.

        The model's inputs (intensity statistics, padding bars) and its predictions (foreground fraction,
        confidence) against the calibration images' (stored at fit time; estimator files without them are
        compared on what they hold, the rest is listed under ``not_compared``). Returns the record of
        :func:`~spe_lightning.engine.input_check.compare_inputs` (``verdict``, ``checks``, ``warnings`` naming
        the likely cause and the fix). Raises ``ValueError`` when the channel count differs from the model's
        calibration inputs (the model could not take them).
        """
        data = self._cache("target", images, image_key, label_key)
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
        masks, conf = self._predict(model, data, device, logits_fn)
        new = input_summary(data.inputs, masks, conf)
        ref_border = None
        if stored is None and self.reference_images is not None:
            ref_border = [border_fraction(x) for x in self.reference_images]
        written = getattr(self, "written_by", None)  # the loaded file's version ("unknown": not recorded)
        out = compare_inputs(stored, new, ref_border, None if written in (None, "", "unknown") else str(written))
        out["n_images"] = len(data)
        out["n_calibration"] = int(stored["n"]) if stored else None
        return out

    @torch.no_grad()
    def estimate(
        self,
        model: nn.Module,
        images: Any,
        name: str = "target",
        per_case: bool = True,
        ids: Sequence[str] | None = None,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str = "image",
        label_key: str = "label",
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
            per_case: also compute per-case quality scores and flags.
            ids: one id per image for the per-case rows (default: positions).
            logits_fn: ``fn(model, images) -> logits`` as given to the callback.
            device: where to run (default: the model's device).
            image_key, label_key: keys of dict items.
            progress: called with the number of finished cases (e.g. ``tqdm.update``).
            labelled_masks: masks of some of the cases (``{case id or position: mask}``, binary, at the
                image's size): ``result.labelled`` then holds the prediction-powered estimate of Dice, IoU,
                precision and recall with its interval at ``level`` beside the labelled-only interval, and
                the labelled rows their real Dice. The labelled cases must be a uniform random sample of
                the images, or exactly the cases of ``label_design`` (see docs/few_labels.md).
            label_design: the dict of :meth:`suggest_labels` whose suggested cases were labelled.
        """
        data = self._cache(name, images, image_key, label_key)
        if labelled_masks is not None and not per_case:
            raise ValueError("labelled_masks need the per-case estimates: leave per_case=True.")
        if ids is not None and len(ids) != len(data):
            raise ValueError(f"{len(ids)} ids for {len(data)} images.")
        if per_case:
            self._check_2d(data)
        device = model_device(model, device)
        masks, conf = self._predict(model, data, device, logits_fn)
        if progress is not None:
            progress(0)
        engine = self.engine
        pseudo = engine.pseudo(data, masks, device)
        estimates = self.estimate_from_pseudo(
            pseudo["values"], pseudo["reason"], self._distance(data, masks, conf), self._bounds(data), target=name
        )
        true = engine.real(data, masks)
        cases: list[dict[str, Any]] = []
        threshold = None
        if per_case:
            cases, threshold = self._case_rows(data, masks, conf, ids, device, progress)
        labelled = None
        if labelled_masks is not None:
            labelled = self._with_labels(cases, masks, labelled_masks, label_design)
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
        )

    def _combined(self, estimates: dict[str, dict[str, Any]], cases: list[dict[str, Any]]) -> dict[str, Any] | None:
        """SPE's Dice combined with the regressor's mean per-case estimate, with the weight the run chose."""
        weight = ((self.quality or {}).get("combination") or {}).get("weight")
        spe = (estimates.get("dice") or {}).get("value")
        values = [c["estimated_dice"] for c in cases if c.get("estimated_dice") is not None]
        if weight is None or spe is None or not values:
            return None
        reg, w = float(np.mean(values)), float(weight)
        return {"value": combined_value(w, reg, spe), "weight": w, "spe": spe, "regressor": reg}

    @torch.no_grad()
    def estimate_chunks(
        self,
        model: nn.Module,
        images: Any,
        chunks: int | Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
        name: str = "target",
        masks: Sequence[Tensor] | None = None,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        alert_below: Mapping[str, float] | None = None,
        alert_above: Mapping[str, float] | None = None,
        alert_on: str | None = None,
        progress: Callable[[int], Any] | None = None,
        labelled_masks: Mapping[str | int, Tensor] | None = None,
        cases: Sequence[dict[str, Any]] | None = None,
    ) -> ChunkedResult:
        """Monitor incoming data: predict once, then one estimate with its interval per chunk, and alerts.

        Args:
            model, images, name, logits_fn, device, image_key, label_key: as for :meth:`estimate`.
            chunks: images per chunk (consecutive, in the given order), ``{label: positions}`` (e.g.
                :func:`~spe_lightning.monitoring.chunks.chunks_by_column`) or a list of position lists.
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

        Each chunk gets its own support set (its images with their predicted masks) and reverse step;
        its realised metrics (``true``) are reported when the images came with masks. The intervals
        were sized for sets as large as the training targets: smaller chunks vary more than that.
        """
        c = self.config
        data = self._cache(name, images, image_key, label_key)
        device = model_device(model, device)
        n = len(data)
        if isinstance(chunks, bool):
            raise TypeError("chunks: give images per chunk (an int), {label: positions} or a list of position lists.")
        if isinstance(chunks, int):
            groups = chunks_of(n, chunks)
        elif isinstance(chunks, Mapping):
            groups = {str(k): [int(i) for i in v] for k, v in chunks.items()}
        else:
            groups = {str(i): [int(j) for j in v] for i, v in enumerate(chunks)}
        bad = [k for k, v in groups.items() if not v or min(v) < 0 or max(v) >= n]
        if bad:
            raise ValueError(f"chunks {bad[:3]} are empty or name positions outside 0..{n - 1}.")
        below = c.alert_below if alert_below is None else dict(alert_below)
        above = c.alert_above if alert_above is None else dict(alert_above)
        on = alert_on or c.alert_on
        if on not in ALERT_ON:
            raise ValueError(f"alert_on must be one of {ALERT_ON}, got {on!r}.")
        start = time.perf_counter()
        conf = None  # without the model's confidence (masks given) no distance is measured
        if masks is None:
            masks, conf = self._predict(model, data, device, logits_fn)
        elif len(masks) != n:
            raise ValueError(f"{len(masks)} masks for {n} images.")
        labels: dict[int, Tensor] = {}
        labelled_cases: list[dict[str, Any]] = []
        if labelled_masks is not None:
            labelled_cases, labels = self._chunk_labels(
                model, data, masks, conf, labelled_masks, cases, device, logits_fn
            )
            cases = labelled_cases
        predicted = time.perf_counter()
        engine = self.engine
        rows: list[dict[str, Any]] = []
        alerts: list[dict[str, Any]] = []
        for label, pos in groups.items():
            part = subset(data, pos, name)  # the set's name seeds the support order, as in training
            part_masks = [masks[i] for i in pos]
            pseudo = engine.pseudo(part, part_masks, device)
            distance = None if conf is None else self._distance(part, part_masks, conf[pos])
            estimates = self.estimate_from_pseudo(pseudo["values"], pseudo["reason"], distance, self._bounds(part))
            events = alerts_for({name: estimates}, below, above, on, chunk=label)
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
                    "true": engine.real(part, part_masks),
                    "n_support": pseudo["n_support"],
                    "reason": pseudo["reason"],
                    "alerts": events,
                    **({} if with_labels is None else {"labelled": with_labels}),
                }
            )
            if progress is not None:
                progress(1)
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

    def _distance(self, data: CachedSet, masks: Sequence[Tensor], conf: Tensor) -> float | None:
        """``data``'s label-free distance to the calibration set (None for estimators saved without features)."""
        cal = (self.anchor or {}).get("calibration_features")
        if not cal:
            return None
        return set_distance(image_features(data, masks, conf), np.asarray(cal, float))

    def _bounds(self, data: CachedSet) -> dict[str, tuple[float | None, float | None]]:
        """hd95 keys range from 0 to ``data``'s largest image diagonal."""
        diag = diagonal(data)
        return {} if diag is None else {k: (0.0, diag) for k in self.keys if k.split("/")[0] == "hd95"}

    def estimate_from_pseudo(
        self,
        pseudo: dict[str, float | None],
        reason: str | None = None,
        distance: float | None = None,
        bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
        target: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Estimates (value, interval, pseudo, reason, method) from a set's pseudo metrics, as the callback makes them.

        The paper's G maps the pseudo value; with ``anchor`` the estimate is anchored instead (the last
        calibration score moved by G(pseudo) - G(calibration pseudo)), the paper's one kept under ``paper``.
        ``distance``: the set's label-free distance to the calibration set (a set farther than the
        calibration pairs gets a wider interval and ``outside_calibrated_range``); ``bounds``: per key range
        overrides (hd95: the images' diagonal). A metric the run found unreliable has no value (see ``reason``).
        """
        level = self.config.level
        anchor = self.anchor
        # the run's own targets had a target-styled pair in their interval model; other sets use the generic one
        intervals = (anchor or {}).get("intervals") or {}
        intervals = {**intervals, **((anchor or {}).get("intervals_by_target") or {}).get(target or "", {})}
        out: dict[str, dict[str, Any]] = {}
        for key in self.keys:
            md = self.mappings.get(key, {})
            out[key] = estimate(
                MetricMapping.from_dict(md) if "params" in md else None,
                key,
                pseudo.get(key),
                level,
                no_g=f"no mapping G: {md.get('error', 'not stored')}",
                no_pseudo=f"no pseudo {key}" + (f" ({reason})" if reason else ""),
                anchor=(
                    anchor["calibration_pseudo"].get(key),
                    anchor["calibration_real"].get(key),
                    intervals.get(key),
                )
                if anchor
                else None,
                distance=distance,
                bounds=(bounds or {}).get(key),
            )
        return out

    def _case_rows(
        self,
        data: CachedSet,
        masks: Sequence[Tensor],
        conf: Tensor,
        ids: Sequence[str] | None,
        device: torch.device,
        progress: Callable[[int], Any] | None,
    ) -> tuple[list[dict[str, Any]], float | None]:
        real = per_case_dice(masks, data.masks) if data.masks is not None else None
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in data.indices]
        if self.quality is not None:  # the regressor: one forward per case, calibrated estimates
            qcal = self.quality["calibration"]
            size = tuple(data.gray.shape[-2:])
            wmasks = _working_masks(masks, size)
            raw = self._quality_regressor(device).predict(data.gray, wmasks).numpy()
            est = quality_estimates(qcal, raw, conf.numpy() if qcal.get("weights") else None)
            if progress is not None:
                progress(len(ids))
            return regressor_case_rows(est, masks, conf, ids, real), float(qcal["threshold"])
        cal = self.cases or {}
        k, top = int(cal.get("k", 16)), int(cal.get("top", 1))
        scores = self._scores(data, masks, k, top, cal.get("empty_score"), device, progress)
        rows = case_rows(scores, self.cases, masks, conf, ids, real, self.config.level)
        return rows, cal.get("threshold")

    # ------------------------------------------------------------------ few labels (prediction-powered inference)
    def suggest_labels(
        self, result: EstimateResult | Sequence[dict[str, Any]], k: int, seed: int = 0, n_strata: int | None = None
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
        cases: list[dict[str, Any]],
        masks: Sequence[Tensor],
        labelled_masks: Mapping[str | int, Tensor],
        design: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The prediction-powered estimates of the labelled cases; their rows get their real Dice."""
        if self.config.classes:
            raise NotImplementedError("labelled_masks: prediction-powered estimates are for binary estimators.")
        ids = [c["id"] for c in cases]
        labels = label_positions(labelled_masks, ids)
        out = labelled_estimates(cases, masks, labels, self.config.level, design)
        real = labelled_metrics(masks, labels, ids)["dice"]
        for c in cases:
            c.setdefault("real_dice", None)
            c["labelled"] = False
        for pos, value in zip(labels, real):
            cases[pos]["real_dice"], cases[pos]["labelled"] = float(value), True
        return out

    def _chunk_labels(
        self,
        model: nn.Module,
        data: CachedSet,
        masks: Sequence[Tensor],
        conf: Tensor | None,
        labelled_masks: Mapping[str | int, Tensor],
        cases: Sequence[dict[str, Any]] | None,
        device: torch.device,
        logits_fn: LogitsFn,
    ) -> tuple[list[dict[str, Any]], dict[int, Tensor]]:
        """The per-case rows (given, or computed) and the labelled positions of :meth:`estimate_chunks`."""
        if self.config.classes:
            raise NotImplementedError("labelled_masks: prediction-powered estimates are for binary estimators.")
        if cases is None:
            self._check_2d(data)
            if conf is None:  # masks were given: the confidence needs the model once more
                _, conf = self._predict(model, data, device, logits_fn)
            cases = self._case_rows(data, masks, conf, None, device, None)[0]
        if len(cases) != len(data):
            raise ValueError(f"{len(cases)} per-case rows for {len(data)} images.")
        return list(cases), label_positions(labelled_masks, [c["id"] for c in cases])

    def _chunk_ppi(
        self,
        cases: Sequence[dict[str, Any]],
        masks: Sequence[Tensor],
        labels: dict[int, Tensor],
        positions: Sequence[int],
        name: str,
        below: Mapping[str, float] | None,
        above: Mapping[str, float] | None,
        chunk: str,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One chunk's prediction-powered estimates (uniform design inside the chunk) and their alerts."""
        from spe_lightning.percase.ppi import ppi_alerts

        out = labelled_estimates(cases, masks, labels, self.config.level, None, positions)
        bounds = {
            m: {"value": r["estimate"], "lower": r["lower"], "upper": r["upper"]}
            for m, r in out["metrics"].items()
            if "estimate" in r
        }
        return out, ppi_alerts({name: bounds}, dict(below or {}), dict(above or {}), chunk=chunk, source="labels")

    def __repr__(self) -> str:
        n = 0 if self.reference_images is None else self.reference_images.shape[0]
        return (
            f"SPEEstimator(segmenter={self.segmenter_spec.get('name')!r}, metrics={self.metrics}, references={n}, "
            f"per_case={'regressor' if self.quality else 'calibrated' if self.cases else 'uncalibrated'}, "
            f"written_by='spe-lightning {self.written_by}')"
        )


def _config_from_v1(config: dict[str, Any], metrics: Sequence[str], anchored: bool) -> SPEConfig:
    """The :class:`SPEConfig` of a version-1 estimator file's config dict."""
    names, indices = config.get("class_names"), config.get("class_indices")
    nullable = ("foreground_class", "spatial_dims", "max_references", "memory_budget_mb")
    known = {k: v for k, v in config.items() if k not in _V1_ONLY and (v is not None or k in nullable)}
    classes = dict(zip(names, indices)) if names and indices else None
    return SPEConfig.from_dict({**known, "metrics": tuple(metrics), "classes": classes, "anchored": anchored})
