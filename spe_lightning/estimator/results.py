"""The typed results of :class:`~spe_lightning.SPEEstimator`: one set's estimate, and the chunks of a monitored set.

Each has ``to_dict()``: the JSON-safe summary the ``estimate`` command writes (no tensors, no per-case rows).
The estimates are :class:`~spe_lightning.engine.results.Estimate` objects, the per-case rows
:class:`~spe_lightning.percase.scorer.CaseRow` objects (``to_dict()`` each for JSON or CSV).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from spe_lightning.engine.results import Estimate
from spe_lightning.percase.scorer import CaseRow

__all__ = ["EstimateResult", "ChunkedResult"]


@dataclass
class EstimateResult:
    """What :meth:`SPEEstimator.estimate` found for one set of images.

    ``estimates`` holds one :class:`~spe_lightning.engine.results.Estimate` per key (``result.estimates["dice"]
    .value``); ``cases`` one :class:`~spe_lightning.percase.scorer.CaseRow` per case (empty with
    ``per_case=False``); with labelled cases every row says whether it was labelled and the labelled rows hold
    their ``real_dice``.
    """

    name: str
    estimates: dict[str, Estimate]  # key -> value, lower, upper, pseudo, reason, ...
    n_images: int
    n_support: int | dict[str, int]  # per class with classes
    level: float
    cases: list[CaseRow]  # per case: id, quality, estimated_dice, flagged, ... (empty if per_case=False)
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
        flagged = sum(1 for c in self.cases if c.flagged)
        return {
            "name": self.name,
            "n_images": self.n_images,
            "n_support": self.n_support,
            "level": self.level,
            "estimates": {k: e.to_dict() for k, e in self.estimates.items()},
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
    #: per chunk: chunk, n_images, positions, estimates ({key: Estimate}), true, n_support, reason, alerts
    chunks: list[dict[str, Any]]
    alerts: list[dict[str, Any]]  # every chunk's alert events, in chunk order
    level: float
    thresholds: dict[str, dict[str, float] | None]  # {"alert_below": ..., "alert_above": ...}
    alert_on: str
    seconds: dict[str, float]  # "predict" (model inference) and "estimate" (reverse steps and G)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no positions)."""
        chunks = [_chunk_json(c) for c in self.chunks]
        return {
            "name": self.name,
            "level": self.level,
            "alert_on": self.alert_on,
            **self.thresholds,
            "chunks": chunks,
            "alerts": self.alerts,
            "seconds": self.seconds,
        }


def _chunk_json(chunk: dict[str, Any]) -> dict[str, Any]:
    """A chunk's JSON form: its estimates as dicts, without its positions."""
    out = {k: v for k, v in chunk.items() if k != "positions"}
    out["estimates"] = {m: e.to_dict() for m, e in chunk["estimates"].items()}
    return out
