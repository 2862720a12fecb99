"""FittedSPE: the fitted SPE estimator as frozen data (what finishing a run produces and what a file holds).

Everything here is plain numbers, strings, lists, dicts and tensors: G per key (its parameters), the
anchor's interval models, the reverse segmenter's spec and fitted weights, the references at the working
size, the per-case calibration (RCA) and the quality regressor's weights, calibration and combination weight.
:class:`~spe_lightning.SPEEstimator` applies it; :mod:`~spe_lightning.estimator.persistence` saves and loads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from spe_lightning import __version__
from spe_lightning.config import SPEConfig
from spe_lightning.engine.results import Estimate, estimates_from_dict

__all__ = ["FittedSPE"]


@dataclass(frozen=True)
class FittedSPE:
    """The fitted state of an SPE estimator (frozen: build a new one with :meth:`replace`).

    Args:
        config: the run's :class:`~spe_lightning.SPEConfig` (or its ``to_dict()``).
        segmenter: the reverse segmenter's spec (``ReverseSegmenter.spec()``).
        mappings: key -> :meth:`MetricMapping.to_dict` (or ``{"kind", "error"}`` when G could not be fitted).
        reference_images: working-size gray references ``[R,1,w,w]`` in [0, 1] (None: give them later).
        reference_masks: their masks ``[R,1,w,w]`` bool (uint8 label maps with classes).
        reference_indices: positions of the references in the source reference dataset.
        segmenter_state: a learned reverse segmenter's fitted weights (empty for weight-free ones).
        anchor: for anchored estimates (:mod:`spe_lightning.engine.estimate`): ``{"intervals": {key:
            interval model (plain numbers) or None}, "intervals_by_target": {target: {key: ...}},
            "calibration_pseudo": {key: float}, "calibration_real": {key: float}}`` at the last record, and
            ``"calibration_features"`` (per-item feature lists, engine/distance.py) for the extrapolation flag
            and ``"pair_features"`` (``{pair name: per-item feature lists}``: the sets a new set may look like),
            ``"pseudo_by_size"`` (the size probes, engine/set_size.py: the anchor of smaller sets); kept only when
            ``config.anchored``.
        cases: the RCA per-case calibration (:func:`~spe_lightning.percase.rca.calibrate_cases`); None: uncalibrated.
        quality: the quality regressor (``{"regressor": state tensors, "calibration": plain numbers,
            "combination": {"weight", "n_sets"}}``); None: per-case scores come from RCA.
        info: extras (targets' in-training estimates, model class, input shape and summary).
        written_by: the spe-lightning version that fitted (or wrote the file of) this estimator.
        notes: what finishing found for the run's report (quality summary, combination); never saved.
    """

    config: SPEConfig
    segmenter: Mapping[str, Any]
    mappings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reference_images: Tensor | None = field(default=None, repr=False)
    reference_masks: Tensor | None = field(default=None, repr=False)
    reference_indices: Sequence[int] = ()
    segmenter_state: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    anchor: Mapping[str, Any] | None = field(default=None, repr=False)
    cases: Mapping[str, Any] | None = field(default=None, repr=False)
    quality: Mapping[str, Any] | None = field(default=None, repr=False)
    info: Mapping[str, Any] = field(default_factory=dict, repr=False)
    written_by: str = __version__
    notes: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        config = self.config if isinstance(self.config, SPEConfig) else SPEConfig.from_dict(dict(self.config))
        if "name" not in self.segmenter:
            raise ValueError("SPEEstimator: the segmenter spec needs a 'name'.")
        mappings = {k: dict(self.mappings.get(k, {"error": "no mapping stored"})) for k in config.keys}
        set_ = object.__setattr__  # frozen: the normalised values are written once, here
        set_(self, "config", config)
        set_(self, "segmenter", dict(self.segmenter))
        set_(self, "mappings", mappings)
        set_(self, "reference_indices", tuple(int(i) for i in self.reference_indices))
        set_(self, "segmenter_state", dict(self.segmenter_state or {}))
        set_(self, "anchor", self.anchor if config.anchored else None)
        set_(self, "info", dict(self.info or {}))
        if self.reference_images is not None:
            images, masks = self._checked_references(self.reference_images, self.reference_masks)
            set_(self, "reference_images", images)
            set_(self, "reference_masks", masks)
        elif self.reference_masks is not None:
            raise ValueError("reference masks given without reference images.")

    def _checked_references(self, images: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor]:
        w = self.config.working_size
        if masks is None or images.ndim != 4 or tuple(images.shape[1:]) != (1, w, w) or masks.shape != images.shape:
            shape = None if masks is None else tuple(masks.shape)
            raise ValueError(f"references must be [R,1,{w},{w}] images and masks; got {tuple(images.shape)}, {shape}.")
        if len(self.reference_indices) not in (0, images.shape[0]):
            raise ValueError(f"{images.shape[0]} references given; the estimator used {len(self.reference_indices)}.")
        # clones: a view would make torch.save write its whole underlying storage
        labels = bool(self.config.classes)
        return (
            images.detach().float().cpu().clone(),
            masks.detach().cpu().to(torch.uint8 if labels else torch.bool).clone(),
        )

    @property
    def keys(self) -> list[str]:
        """Estimate keys: the metrics, or per metric its class mean and ``"<metric>/<class>"``."""
        return self.config.keys

    @property
    def target_estimates(self) -> Mapping[str, Mapping[str, Estimate]]:
        """The run's final estimate per target and key (kept in ``info["targets"]`` in their dict form, which
        the file holds), as :class:`~spe_lightning.engine.results.Estimate` objects."""
        return estimates_from_dict(self.info.get("targets", {}))

    def replace(self, **changes: Any) -> FittedSPE:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)
