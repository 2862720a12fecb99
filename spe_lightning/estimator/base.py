"""What every use of a fitted estimator needs: the artifact, its segmenter, engine and scorer, and G.

:class:`EstimatorBase` wraps a :class:`~spe_lightning.estimator.fitted.FittedSPE` and is never changed after
construction: the segmenter, the engine and the per-case scorer are built from the artifact on first use
and cached. :class:`~spe_lightning.SPEEstimator` adds the estimates of new sets on top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning.config import SPEConfig
from spe_lightning.data.adapters import resize_labels
from spe_lightning.engine.cached_set import CachedSet, SizedDataset, cache_dataset
from spe_lightning.engine.distance import diagonal, image_features, nearest_set_distance, set_distance
from spe_lightning.engine.estimate import estimate
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.predict import LogitsFn, model_fingerprint, predict_labels
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.spe_engine import SPEEngine
from spe_lightning.estimator.fitted import FittedSPE
from spe_lightning.estimator.persistence import fitted_state, save
from spe_lightning.percase.rca import RCAScorer
from spe_lightning.percase.regressor import RegressorScorer
from spe_lightning.percase.scorer import CaseScorer
from spe_lightning.reverse.base import ReverseSegmenter, make_segmenter

__all__ = ["EstimatorBase"]


class EstimatorBase:
    """A fitted SPE estimator's artifact and what is built from it (see :class:`~spe_lightning.SPEEstimator`).

    Args:
        fitted: the fitted state.
        segmenter: the reverse segmenter instance that ran in training (rebuilt from the spec when None).
        scorer: the fitted per-case scorer (built from ``fitted.quality`` or ``fitted.cases`` when None).
        allow_download: whether rebuilding the reverse segmenter may download weights (never a file's own say).
    """

    def __init__(
        self,
        fitted: FittedSPE,
        *,
        segmenter: ReverseSegmenter | None = None,
        scorer: CaseScorer | None = None,
        allow_download: bool = False,
    ) -> None:
        if not isinstance(fitted, FittedSPE):
            raise TypeError(f"SPEEstimator takes a FittedSPE, got {type(fitted).__name__}.")
        self.fitted = fitted
        self.allow_download = bool(allow_download)
        self._segmenter = segmenter
        self._scorer = scorer
        self._case_segmenter: ReverseSegmenter | None = None
        self._engine: SPEEngine | None = None

    # ------------------------------------------------------------------ the artifact, read-only
    @property
    def config(self) -> SPEConfig:
        """The run's settings."""
        return self.fitted.config

    @property
    def metrics(self) -> list[str]:
        """The metric names."""
        return list(self.config.metrics)

    @property
    def keys(self) -> list[str]:
        """Estimate keys: the metrics, or per metric its class mean and ``"<metric>/<class>"``."""
        return self.config.keys

    @property
    def segmenter_spec(self) -> dict[str, Any]:
        """The reverse segmenter's spec (name + settings)."""
        return dict(self.fitted.segmenter)

    @property
    def mappings(self) -> Mapping[str, Mapping[str, Any]]:
        """G per key (:meth:`MetricMapping.to_dict`, or ``{"error": ...}``)."""
        return self.fitted.mappings

    @property
    def anchor(self) -> Mapping[str, Any] | None:
        """The anchored estimates' calibration values and interval models (None: the paper's G only)."""
        return self.fitted.anchor

    @property
    def cases(self) -> dict[str, Any] | None:
        """The RCA per-case calibration (a copy; None: not calibrated)."""
        return None if self.fitted.cases is None else dict(self.fitted.cases)

    @property
    def quality(self) -> dict[str, Any] | None:
        """The quality regressor's state, calibration and combination (a copy; None: per-case scores from RCA)."""
        return None if self.fitted.quality is None else dict(self.fitted.quality)

    @property
    def info(self) -> Mapping[str, Any]:
        """Extras: the targets' in-training estimates, model class, input shape and summary."""
        return self.fitted.info

    @property
    def reference_images(self) -> Tensor | None:
        """Working-size gray references ``[R,1,w,w]`` (None: give them with :meth:`with_reference_dataset`)."""
        return self.fitted.reference_images

    @property
    def reference_indices(self) -> list[int]:
        """Positions of the references in the source reference dataset."""
        return list(self.fitted.reference_indices)

    @property
    def written_by(self) -> str:
        """The spe-lightning version that wrote this estimator's file (this version's for a new estimator)."""
        return self.fitted.written_by

    # ------------------------------------------------------------------ built on first use
    @property
    def segmenter(self) -> ReverseSegmenter:
        """The reverse segmenter, rebuilt from its spec on first use."""
        if self._segmenter is None:
            spec = dict(self.fitted.segmenter)
            name = spec.pop("name")
            if name in ("universeg", "auto"):  # a file never starts a download on its own
                spec["download"] = self.allow_download
                w = spec.get("weights")
                if isinstance(w, str) and not Path(w).expanduser().is_file():
                    spec.pop("weights")  # saved on another machine: look in SPE_UNIVERSEG_WEIGHTS / the hub cache
            try:
                segmenter = make_segmenter(name, **spec)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"SPEEstimator: cannot rebuild the reverse segmenter {self.segmenter_spec}: {err} "
                    "(register a custom segmenter with register_segmenter before estimating)."
                ) from err
            if segmenter.needs_fit:
                if not self.fitted.segmenter_state:
                    raise ValueError(
                        f"SPEEstimator: the reverse segmenter {name!r} learns from the references, and this "
                        "estimator holds no fitted weights for it; re-export it from a finished run (run.estimator)."
                    )
                segmenter.load_state_tensors(dict(self.fitted.segmenter_state))
            self._segmenter = segmenter
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
        images, masks = self.fitted.reference_images, self.fitted.reference_masks
        if images is None or masks is None:
            raise ValueError(
                "SPEEstimator: this file holds no reference images; give them with with_reference_dataset(dataset) "
                "(or --reference ROOT on the command line)."
            )
        if self._engine is None:
            n = images.shape[0]
            ref = CachedSet(
                "reference",
                [],
                list(masks),
                images,
                list(self.fitted.reference_indices) or list(range(n)),
                [(i, -1) for i in range(n)],
            )
            self._engine = SPEEngine(self.segmenter, ref, **self.config.engine_kwargs())
        return self._engine

    def rca_scorer(self, k: int = 16, top: int = 1, dice_cut: float = 0.7) -> RCAScorer:
        """An RCA scorer over this estimator's references (calibrated with the stored calibration, if any)."""
        engine, c = self.engine, self.config
        return RCAScorer(
            self.case_segmenter,
            engine.ref_images,
            engine.ref_masks,
            None if self.fitted.cases is None else dict(self.fitted.cases),
            k=k,
            top=top,
            dice_cut=dice_cut,
            threshold=c.threshold,
            min_foreground=c.min_foreground,
            level=c.level,
        )

    def scorer(self, device: torch.device | str = "cpu") -> CaseScorer:
        """The fitted per-case scorer: the quality regressor when the estimator holds one, else RCA.
        Built on first use (a saved regressor on ``device``)."""
        if self._scorer is None:
            quality = self.fitted.quality
            self._scorer = RegressorScorer(state=dict(quality), device=device) if quality else self.rca_scorer()
        return self._scorer

    # ------------------------------------------------------------------ shared steps
    def cache(
        self, images: Any, name: str = "target", image_key: str | None = None, label_key: str | None = None
    ) -> CachedSet:
        """``images`` read once at this estimator's settings (for :meth:`estimate` and :meth:`estimate_chunks`);
        dict items are read with ``image_key``/``label_key``, by default the run's (``SPEConfig.image_key``...)."""
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"name must be the set's name, a non-empty str (default 'target'; a run target's name reuses its "
                f"in-training interval model), got {name!r}."
            )
        if isinstance(images, CachedSet):
            return images
        if isinstance(images, Tensor) and images.ndim == 3:
            images = images[:, None]
        return cache_dataset(name, images, **self._read_kwargs(image_key, label_key))

    def _read_kwargs(self, image_key: str | None, label_key: str | None) -> dict[str, Any]:
        """:func:`cache_dataset`'s settings of this run; dict items' keys given per call (``estimate(...,
        image_key=, label_key=)``) replace the run's own."""
        kwargs = self.config.cache_kwargs()
        kwargs["image_key"] = image_key or kwargs["image_key"]
        kwargs["label_key"] = label_key or kwargs["label_key"]
        return kwargs

    def predict(
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

    def compare_model(self, model: nn.Module) -> dict[str, str | None]:
        """``model`` against the one the estimator was fitted with: ``verdict`` ``"same"`` (its final weights),
        ``"other_weights"`` (the same architecture, other weights: another checkpoint or run, so the anchor, the
        calibration score at the fitted weights, does not hold for it), ``"other_architecture"`` or
        ``"not_recorded"`` (files from before the fingerprint); ``message`` says what it means (None when same)."""
        stored = self.info.get("model_fingerprint")
        if not isinstance(stored, Mapping):
            return {"verdict": "not_recorded", "message": None}
        now = model_fingerprint(model)
        if now["architecture"] != stored.get("architecture"):
            return {
                "verdict": "other_architecture",
                "message": "the model's parameters differ in names or shapes from the model this estimator was fitted "
                "with: it belongs to another model (pass the checkpoint of the training run that wrote the estimator)",
            }
        if now["weights"] != stored.get("weights"):
            return {
                "verdict": "other_weights",
                "message": "the model has other weights than the final ones this estimator was fitted at (another "
                "checkpoint, or another run of the same architecture): its estimates are anchored on the calibration "
                "score of the fitted weights and may be off by their difference",
            }
        return {"verdict": "same", "message": None}

    def check_2d(self, data: CachedSet) -> None:
        """Raise for 3D data: per-case scores are for 2D images."""
        if data.volumetric or len(data.units) != len(data):
            raise NotImplementedError(
                "SPEEstimator: per-case scores are for 2D images; for 3D volumes leave per_case unset (or False)."
            )

    def distances(
        self, data: CachedSet, masks: Sequence[Tensor], conf: Tensor | None
    ) -> tuple[float | None, float | None]:
        """``data``'s label-free distance to the calibration set and its nearest-set distance (to the calibration
        set and each calibration pair's set; None for an estimator saved without the pairs' features); both None
        without calibration features or the model's confidence."""
        anchor = self.anchor or {}
        cal = anchor.get("calibration_features")
        if not cal or conf is None:
            return None, None
        feats, cal_ = image_features(data, masks, conf), np.asarray(cal, float)
        pairs = {name: np.asarray(rows, float) for name, rows in (anchor.get("pair_features") or {}).items()}
        return set_distance(feats, cal_), nearest_set_distance(feats, cal_, pairs) if pairs else None

    def bounds(self, data: CachedSet) -> dict[str, tuple[float | None, float | None]]:
        """hd95 keys range from 0 to ``data``'s largest image diagonal."""
        diag = diagonal(data)
        return {} if diag is None else {k: (0.0, diag) for k in self.keys if k.split("/")[0] == "hd95"}

    def estimate_from_pseudo(
        self,
        pseudo: Mapping[str, float | None],
        reason: str | None = None,
        distance: float | None = None,
        bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
        target: str | None = None,
        nearest: float | None = None,
        n_images: int | None = None,
    ) -> dict[str, Estimate]:
        """Estimates (value, interval, pseudo, reason, method) from a set's pseudo metrics, as the callback makes them.

        The paper's G maps the pseudo value; with ``anchor`` the estimate is anchored instead (the last
        calibration score moved by G(pseudo) - G(calibration pseudo)), the paper's one kept under ``paper``.
        ``distance``: the set's label-free distance to the calibration set (a set farther than the
        calibration pairs gets a wider interval and ``outside_calibrated_range``); ``nearest``: its nearest-set
        distance (above the limit: ``outside_calibrated_range``, no widening); ``n_images``: its size (smaller than
        every calibration pair's set: a wider interval and ``outside_calibrated_range``); ``bounds``: per key range
        overrides (hd95: the images' diagonal). A metric the run found unreliable has no value (see ``reason``).
        """
        level = self.config.level
        anchor = self.anchor
        # the run's own targets had a target-styled pair in their interval model; other sets use the generic one
        intervals = (anchor or {}).get("intervals") or {}
        intervals = {**intervals, **((anchor or {}).get("intervals_by_target") or {}).get(target or "", {})}
        out: dict[str, Estimate] = {}
        for key in self.keys:
            md = self.mappings.get(key, {})
            out[key] = estimate(
                MetricMapping.from_dict(dict(md)) if "params" in md else None,
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
                nearest=nearest,
                n_images=n_images,
                probes=(anchor or {}).get("pseudo_by_size"),
            )
        return out

    # ------------------------------------------------------------------ new estimators of the same artifact
    def with_fitted(self, fitted: FittedSPE, scorer: CaseScorer | None = None) -> Any:
        """A new estimator of ``fitted`` (same class and download policy; the segmenter instance is kept)."""
        return type(self)(fitted, segmenter=self._segmenter, scorer=scorer, allow_download=self.allow_download)

    def with_reference_dataset(
        self, dataset: SizedDataset, image_key: str | None = None, label_key: str | None = None
    ) -> Any:
        """A new estimator with the references re-read from the dataset they came from (the stored indices
        pick them): for a file saved with ``embed_reference=False``; dict items read with the run's keys unless
        ``image_key``/``label_key`` are given."""
        ref = cache_dataset(
            "reference",
            dataset,
            indices=sorted(set(self.fitted.reference_indices)) or None,
            require_masks=True,
            slices="foreground",
            keep_inputs=False,
            **self._read_kwargs(image_key, label_key),
        )
        size = tuple(ref.gray.shape[-2:])
        masks = torch.cat([resize_labels(ref.unit_mask(r)[None], size) for r in range(len(ref.units))])
        return self.with_fitted(self.fitted.replace(reference_images=ref.gray, reference_masks=masks))

    # ------------------------------------------------------------------ files
    def state(self, embed_reference: bool = True) -> dict[str, Any]:
        """The saved dict: only tensors, numbers, strings, lists, dicts and None."""
        return fitted_state(self.fitted, embed_reference)

    def save(self, path: str | Path, embed_reference: bool = True, max_reference_mb: float = 64.0) -> Path:
        """Write the estimator to ``path`` (``torch.save`` of :meth:`state`)."""
        return save(self.fitted, path, embed_reference, max_reference_mb)
