"""Per-case scorers behind one small protocol: :class:`CaseScorer` (``fit`` on labelled data, ``score`` new cases).

A scorer turns each case (its working-size gray image, the model's mask and confidence) into a
:class:`CaseRow`: a quality score, an estimated Dice with its interval and a flag. Two implement it:

- :class:`~spe_lightning.percase.rca.RCAScorer`: reverse classification accuracy against similar references,
  its flag threshold and score -> Dice map calibrated on the calibration set;
- :class:`~spe_lightning.percase.regressor.RegressorScorer`: a small CNN image + mask -> Dice fitted on the
  references' damaged masks, calibrated on the calibration set.

:class:`~spe_lightning.SPEEstimator` holds one fitted scorer and scores cases only through ``score``;
``state()`` is what the estimator file keeps of it (plain numbers and tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from spe_lightning.data.adapters import resize_masks
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.frozen import DictReads, check_stored

__all__ = ["CaseRow", "case_rows", "CaseInputs", "CaseScoring", "ScorerFitData", "CaseScorer", "working_masks"]

#: ``fn(cached set) -> (the model's masks, its confidence)``, as the estimator predicts them
PredictFn = Callable[[CachedSet], tuple[list[Tensor], Tensor]]


def working_masks(masks: Sequence[Tensor], size: tuple[int, ...]) -> Tensor:
    """Bool ``[N,1,w,w]`` foreground (any class) of native-size masks, at the working size."""
    return torch.cat([resize_masks((m > 0)[None], size) for m in masks])


@dataclass(frozen=True)
class CaseRow(DictReads):
    """One case's row: what every scorer gives (``real_dice`` only when the images came with masks).

    ``to_dict()`` is the row of ``cases.csv`` (``row["quality"]`` reads it, as when rows were dicts).
    """

    id: str
    quality: float | None
    estimated_dice: float | None
    estimated_dice_lower: float | None
    estimated_dice_upper: float | None
    flagged: bool | None
    empty_prediction: bool
    foreground_pixels: int
    confidence: float | None
    best_reference: int  # RCA: the best-fitting reference's position; -1 for the regressor and empty masks
    real_dice: float | None = None
    with_real: bool = field(default=False, repr=False)  # whether the row carries ``real_dice`` at all
    #: set by a per-target (site) calibration only: the case's distance to the nearest calibrated case, whether
    #: it lies beyond the calibrated range (its interval widened), and the signals stacked ("regressor+confidence")
    distance: float | None = None
    beyond_calibrated: bool | None = None
    signals: str | None = None
    #: with a few labelled target cases (``SPEEstimator.estimate(labelled_masks=...)``): whether this case
    #: was labelled (its ``real_dice`` is then the labelled mask's); None without labels
    labelled: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict (``real_dice`` only when known to the row)."""
        row: dict[str, Any] = {
            "id": self.id,
            "quality": self.quality,
            "estimated_dice": self.estimated_dice,
            "estimated_dice_lower": self.estimated_dice_lower,
            "estimated_dice_upper": self.estimated_dice_upper,
            "flagged": self.flagged,
            "empty_prediction": self.empty_prediction,
            "foreground_pixels": self.foreground_pixels,
            "confidence": self.confidence,
            "best_reference": self.best_reference,
        }
        if self.signals is not None:  # a site-calibrated row (percase.sites); other rows keep their columns
            row.update(distance=self.distance, beyond_calibrated=self.beyond_calibrated, signals=self.signals)
        if self.with_real:
            row["real_dice"] = self.real_dice
        if self.labelled is not None:
            row["labelled"] = self.labelled
        return row

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseRow:
        """The row of :meth:`to_dict`'s form (e.g. a row of ``cases.csv`` read back with its types)."""
        check_stored(data, "id", "a per-case row")
        return cls(
            id=str(data["id"]),
            quality=data.get("quality"),
            estimated_dice=data.get("estimated_dice"),
            estimated_dice_lower=data.get("estimated_dice_lower"),
            estimated_dice_upper=data.get("estimated_dice_upper"),
            flagged=data.get("flagged"),
            empty_prediction=bool(data.get("empty_prediction", False)),
            foreground_pixels=int(data.get("foreground_pixels", 0)),
            confidence=data.get("confidence"),
            best_reference=int(data.get("best_reference", -1)),
            real_dice=data.get("real_dice"),
            with_real="real_dice" in data,
            distance=data.get("distance"),
            beyond_calibrated=data.get("beyond_calibrated"),
            signals=data.get("signals"),
            labelled=data.get("labelled"),
        )

    def with_label(self, real_dice: float | None, labelled: bool) -> CaseRow:
        """This row with whether it was labelled (and, when it was, the labelled mask's Dice)."""
        return replace(self, real_dice=real_dice, with_real=True, labelled=labelled)


def case_rows(rows: Sequence[CaseRow | Mapping[str, Any]]) -> list[CaseRow]:
    """``rows`` as :class:`CaseRow` objects (plain dict rows, e.g. read back from JSON, through
    :meth:`CaseRow.from_dict`)."""
    return [r if isinstance(r, CaseRow) else CaseRow.from_dict(r) for r in rows]


@dataclass(frozen=True)
class CaseInputs:
    """The cases a scorer scores: working-size gray images ``[N,1,w,w]``, the model's native-size masks,
    its confidence ``[N]``, one id per case, (when the images came with masks) their real Dice, the set's name
    and, when the scorer asks for it (:meth:`CaseScorer.model_signals`), the model's mirror consistency ``[N]``."""

    gray: Tensor
    masks: Sequence[Tensor]
    confidence: Tensor
    ids: Sequence[str]
    real_dice: np.ndarray | None = None
    name: str | None = None  # the set's name: a run target's own (site) calibration applies to it
    mirror: np.ndarray | None = None  # percase.mirror.mirror_consistency of the cases

    @property
    def working_masks(self) -> Tensor:
        """The masks' foreground at the images' working size."""
        return working_masks(self.masks, tuple(self.gray.shape[-2:]))


@dataclass(frozen=True)
class CaseScoring:
    """What :meth:`CaseScorer.score` gives: one row per case and the flag threshold (None: uncalibrated)."""

    rows: list[CaseRow]
    threshold: float | None


@dataclass(frozen=True)
class ScorerFitData:
    """Everything a scorer may fit on (each takes what it needs).

    Args:
        calibration: the labelled calibration set (masks required).
        predict: the model's masks and confidence of a cached set (the estimator's prediction).
        device: where to fit.
        seed: seeds every random draw of the fit.
        level: the interval level of the per-case estimates.
        reference: the labelled reference set (the regressor learns from it); None when absent.
        progress: show the long fits' progress.
        styled: each run target's styled calibration set, by target name (the regressor's per-target calibration).
    """

    calibration: CachedSet
    predict: PredictFn
    device: torch.device
    seed: int
    level: float
    reference: CachedSet | None = None
    progress: bool = False
    styled: Mapping[str, CachedSet] = field(default_factory=dict)


@runtime_checkable
class CaseScorer(Protocol):
    """A per-case scorer: fitted once on labelled data, then scores cases it has never seen."""

    #: short name ("rca", "regressor") shown in reports
    name: str

    def fit(self, data: ScorerFitData) -> CaseScorer:
        """Fit (or calibrate) on ``data``; returns the fitted scorer."""
        ...

    def score(
        self, cases: CaseInputs, device: torch.device, progress: Callable[[int], Any] | None = None
    ) -> CaseScoring:
        """One :class:`CaseRow` per case of ``cases`` and the flag threshold."""
        ...

    def state(self) -> dict[str, Any] | None:
        """What an estimator file keeps of the fitted scorer (plain numbers, strings and tensors)."""
        ...

    def model_signals(self, name: str | None) -> tuple[str, ...]:
        """The signals beyond masks and confidence that scoring a set called ``name`` needs from the model
        (``"mirror"``: :func:`~spe_lightning.percase.mirror.mirror_consistency`); the caller computes them."""
        ...
