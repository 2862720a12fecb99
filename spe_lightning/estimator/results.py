"""The typed results of :class:`~spe_lightning.SPEEstimator`: one set's estimate, and the chunks of a monitored set.

Each has ``to_dict()``: the JSON-safe summary the ``estimate`` command writes (no tensors, no per-case rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["EstimateResult", "ChunkedResult"]


@dataclass
class EstimateResult:
    """What :meth:`SPEEstimator.estimate` found for one set of images.

    ``cases`` holds one :meth:`~spe_lightning.percase.scorer.CaseRow.to_dict` row per case (empty with
    ``per_case=False``); labelled cases add ``real_dice`` and ``labelled`` to their rows.
    """

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
    #: the mean per-case estimated Dice beside SPE's set Dice, and whether they differ by more than SPE's
    #: interval half-width (:func:`~spe_lightning.percase.sites.rows_vs_set`); None without per-case estimates
    case_agreement: dict[str, Any] | None = None

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
            "case_agreement": self.case_agreement,
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
