"""Per-case quality scores by reverse classification accuracy (RCA).

After Valindria et al., "Reverse Classification Accuracy", IEEE TMI 2017, and its in-context
variant (In-Context RCA, 2025): a case's *own* prediction is used as a one-image support set
of the reverse segmenter, which then segments the ``k`` labelled references (among those with
foreground) that look most like the case. If the prediction is good, the transferred mask should
fit at least one similar reference well; the best (or top-``top`` mean) pseudo Dice against the
references' ground truth is the case's quality score.

RCA registers each reference to the case; here the registration is a translation (``align``):
each reference image and mask are shifted so that the centroid of its mask sits on the centroid
of the case's predicted mask (zero fill at the borders). Without it, a weight-free segmenter with
a small search window mostly measures whether the reference's structure happens to lie where the
prediction lies; with it, it measures whether the predicted region *looks and is shaped* like the
structure in similar references (BUSI, benchmarks/percase_busi.py: AUROC 0.73 -> 0.9).

A case whose predicted mask has fewer than ``min_foreground`` pixels (at the working size) has
no support to transfer. Its score is ``empty_score``: the mean real Dice of the calibration
cases that the model also left (nearly) empty (see :func:`calibrate_flags`), because an empty
prediction is right exactly when the case has no foreground. Without that calibration it is NaN.

:func:`calibrate_flags` turns calibration scores and real Dice into a flagging threshold (cases
scoring below it are flagged) and an isotonic map score -> estimated per-case Dice.

Plain PyTorch/NumPy; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.engine.estimate import finite_or_none
from spe_lightning.engine.mapping import MetricMapping, NotEnoughPointsError
from spe_lightning.engine.metrics import per_image_metrics, per_item_metrics
from spe_lightning.percase.scorer import CaseInputs, CaseRow, CaseScoring, ScorerFitData
from spe_lightning.reverse.base import ReverseSegmenter

__all__ = [
    "CaseScores",
    "auroc",
    "calibrate_cases",
    "calibrate_flags",
    "case_rows",
    "RCAScorer",
    "case_scores",
    "per_case_dice",
    "reference_neighbours",
    "regressor_case_rows",
    "shift",
    "spearman",
]


def _thumbs(images: Tensor, side: int) -> Tensor:
    """Per-image z-scored ``side x side`` thumbnails, flattened ``[N, side*side]``."""
    x = F.adaptive_avg_pool2d(images.float(), side).flatten(1)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-4)


def reference_neighbours(images: Tensor, references: Tensor, k: int, thumb: int = 16) -> Tensor:
    """Indices ``[N, min(k, R)]`` of the ``k`` references most similar to each image (thumbnail distance)."""
    k = min(int(k), references.shape[0])
    d = torch.cdist(_thumbs(images, thumb), _thumbs(references, thumb))
    return d.topk(k, dim=1, largest=False).indices


def _centroids(masks: Tensor) -> Tensor:
    """``[N,2]`` (row, column) centroids of ``[N,1,H,W]`` masks (NaN for empty ones)."""
    m = masks.flatten(2).float()[:, 0]
    h, w = masks.shape[-2:]
    yy = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
    xx = torch.arange(w, dtype=torch.float32).repeat(h)
    n = m.sum(1)
    return torch.stack([(m * yy).sum(1) / n, (m * xx).sum(1) / n], 1)


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Translate ``[...,H,W]`` by (``dy``, ``dx``) pixels, filling with zeros (no wrap-around)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if abs(dy) < h and abs(dx) < w:
        out[..., yd, xd] = x[..., ys, xs]
    return out


@dataclass
class CaseScores:
    """Per-case RCA results: ``score`` (NaN where undefined), ``best_reference`` (-1 for empty predictions)."""

    score: Tensor  # float64 [N]
    best_reference: Tensor  # int64 [N], position in the reference tensors (-1: none)
    pseudo_dice: Tensor  # float64 [N, k]: pseudo Dice against each neighbour (NaN rows for empty predictions)
    neighbours: Tensor  # int64 [N, k]
    empty: Tensor  # bool [N]: the prediction had < min_foreground pixels


@torch.no_grad()
def case_scores(
    segmenter: ReverseSegmenter,
    images: Tensor,
    masks: Tensor,
    ref_images: Tensor,
    ref_masks: Tensor,
    k: int = 16,
    top: int = 1,
    align: bool = True,
    threshold: float = 0.5,
    min_foreground: int = 16,
    empty_score: float | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], Any] | None = None,
) -> CaseScores:
    """RCA quality score of every case.

    Args:
        segmenter: reverse (in-context) segmenter.
        images: working-size gray images ``[N,1,w,w]`` in [0, 1].
        masks: the model's predicted masks at the working size ``[N,1,w,w]`` (bool or 0/1).
        ref_images, ref_masks: labelled references at the same size (those without foreground are skipped).
        k: references reverse-segmented per case (the most similar ones).
        top: the score is the mean of the ``top`` best pseudo Dice (1: the best one, RCA's choice).
        align: translate each reference onto the prediction's centroid first (see the module docstring).
        threshold: binarisation of the reverse probabilities.
        min_foreground: predictions with fewer pixels get ``empty_score`` (NaN when None).
        empty_score: score of empty predictions (calibrated by :func:`calibrate_flags`).
        device: where the reverse step runs.
        progress: called with 1 after each case (e.g. ``tqdm.update``).
    """
    if images.shape[0] != masks.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {masks.shape[0]} masks.")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}.")
    n = images.shape[0]
    ref_masks = ref_masks > 0
    pool = torch.nonzero(ref_masks.flatten(1).any(1)).flatten()
    if pool.numel() == 0:
        raise ValueError("per-case scores need references with foreground; none has any.")
    nb = pool[reference_neighbours(images, ref_images[pool], k)]  # positions in the full reference tensors
    kk = nb.shape[1]
    masks = masks.bool()
    c_case, c_ref = _centroids(masks), _centroids(ref_masks)
    empty = masks.flatten(1).sum(1) < min_foreground
    pseudo = torch.full((n, kk), math.nan, dtype=torch.float64)
    score = torch.full((n,), math.nan if empty_score is None else float(empty_score), dtype=torch.float64)
    best = torch.full((n,), -1, dtype=torch.int64)
    ref_images_d = ref_images.to(device)
    for i in range(n):
        if not bool(empty[i]):
            q = nb[i]
            queries, truth = ref_images_d[q], ref_masks[q]
            if align:
                d = (c_case[i][None] - c_ref[q]).round().long().tolist()
                queries = torch.stack([shift(queries[j], dy, dx) for j, (dy, dx) in enumerate(d)])
                truth = torch.stack([shift(truth[j], dy, dx) for j, (dy, dx) in enumerate(d)])
            probs = segmenter(queries, images[i : i + 1].to(device), masks[i : i + 1].float().to(device))
            dice = per_image_metrics((probs > threshold).cpu(), truth, ("dice",))["dice"].double()
            pseudo[i] = dice
            order = dice.argsort(descending=True)
            score[i] = dice[order[: min(top, kk)]].mean()
            best[i] = q[order[0]]
        if progress is not None:
            progress(1)
    return CaseScores(score=score, best_reference=best, pseudo_dice=pseudo, neighbours=nb, empty=empty)


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float | None:
    """ROC AUC of ``scores`` detecting the ``positive`` cases (higher score: more likely positive; ties count half)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float | None:
    """Spearman rank correlation over the pairs where both are finite (None when undefined)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


def calibrate_flags(
    scores: Sequence[float] | np.ndarray,
    real_dice: Sequence[float] | np.ndarray,
    empty: Sequence[bool] | np.ndarray | None = None,
    dice_cut: float = 0.7,
    fallback_quantile: float = 0.1,
) -> dict[str, Any]:
    """Flagging rule and per-case Dice map from calibration cases (plain numbers, safe to save).

    ``empty_score`` is the mean real Dice of calibration cases with an empty prediction
    (``empty``; None when there were none); their scores (NaN) are replaced by it first. The
    threshold maximises Youden's J (TPR - FPR) of ``score < threshold`` for "real Dice <
    ``dice_cut``" when both kinds have at least 2 cases; otherwise it is the
    ``fallback_quantile`` of the scores (``method`` says which). ``mapping`` is an isotonic G
    (score -> real Dice, :meth:`MetricMapping.to_dict`) or None when fewer than 3 cases.
    """
    s = np.asarray(scores, dtype=float).copy()
    d = np.asarray(real_dice, dtype=float)
    e = np.zeros(len(s), dtype=bool) if empty is None else np.asarray(empty, dtype=bool)
    if not (len(s) == len(d) == len(e)):
        raise ValueError(f"lengths differ: {len(s)} scores, {len(d)} Dice, {len(e)} empty flags.")
    empty_score = float(np.mean(d[e])) if e.any() else None
    if empty_score is not None:
        s[e] = empty_score
    ok = np.isfinite(s) & np.isfinite(d)
    s, d = s[ok], d[ok]
    bad = d < dice_cut
    out: dict[str, Any] = {
        "dice_cut": float(dice_cut),
        "empty_score": empty_score,
        "n_cases": int(ok.sum()),
        "n_below_cut": int(bad.sum()),
    }
    if s.size == 0:
        return {**out, "threshold": None, "method": None, "mapping": None, "auroc": None, "spearman": None}
    if bad.sum() >= 2 and (~bad).sum() >= 2:
        cand = np.unique(s)
        cuts = np.concatenate([[cand[0] - 1e-9], (cand[:-1] + cand[1:]) / 2, [cand[-1] + 1e-9]])
        flag = s[None, :] < cuts[:, None]
        j = flag[:, bad].mean(1) - flag[:, ~bad].mean(1)
        best = np.flatnonzero(j == j.max())
        threshold, method = float(cuts[best[len(best) // 2]]), "youden"
    else:
        threshold, method = float(np.quantile(s, fallback_quantile)), f"quantile {fallback_quantile:g}"
    try:
        mapping = MetricMapping.fit("isotonic", s, d, bounds=(0.0, 1.0)).to_dict()
    except NotEnoughPointsError:
        mapping = None
    return {
        **out,
        "threshold": threshold,
        "method": method,
        "mapping": mapping,
        "auroc": auroc(-s, bad),
        "spearman": spearman(s, d),
    }


def per_case_dice(masks: Sequence[Tensor], truth: Sequence[Tensor]) -> np.ndarray:
    """Real Dice of each predicted mask (any foreground class) against its truth; sizes may differ between cases."""
    return per_item_metrics(masks, truth, ("dice",), select=lambda m: m > 0)["dice"].numpy()


def calibrate_cases(scores: CaseScores, real_dice: np.ndarray, k: int, top: int, dice_cut: float = 0.7) -> dict:
    """The per-case calibration saved in an estimator: :func:`calibrate_flags` plus ``k``, ``top``
    and the calibration cases' scores (empty predictions at their calibrated score) and real Dice."""
    flags = calibrate_flags(scores.score.numpy(), real_dice, scores.empty.numpy(), dice_cut=dice_cut)
    values = scores.score.numpy().copy()
    if flags["empty_score"] is not None:
        values[scores.empty.numpy()] = flags["empty_score"]
    return {
        "k": int(k),
        "top": int(top),
        **flags,
        "calibration_scores": [finite_or_none(v) for v in values],
        "calibration_dice": [finite_or_none(v) for v in real_dice],
    }


def _flag(score: float | None, empty: bool, threshold: float | None) -> bool | None:
    """Flag a case below the threshold; an empty prediction without a calibrated score is flagged for review."""
    if threshold is None:
        return None
    if score is None:
        return empty
    return bool(score < threshold)


def _case_row(
    case_id: str,
    quality: float | None,
    estimate: tuple[float | None, float | None, float | None],
    flagged: bool | None,
    empty: bool,
    mask: Tensor,
    confidence: float | None,
    best_reference: int,
    real_dice: float | None,
    with_real: bool,
) -> CaseRow:
    """The columns every per-case row has (RCA or regressor): ``estimate`` is (value, lower, upper)."""
    value, lower, upper = estimate
    return CaseRow(
        case_id, quality, value, lower, upper, flagged, empty, int(mask.sum()), confidence, best_reference,
        real_dice, with_real,
    )  # fmt: skip


def case_rows(
    scores: CaseScores,
    calibration: dict[str, Any] | None,
    masks: Sequence[Tensor],
    confidence: Tensor,
    ids: Sequence[str],
    real_dice: np.ndarray | None = None,
    level: float = 0.9,
) -> list[CaseRow]:
    """One row per case: quality score, estimated Dice with interval and flag (when ``calibration``
    from :func:`calibrate_cases` is given), prediction size, confidence and real Dice (when known)."""
    cal = calibration or {}
    g = MetricMapping.from_dict(cal["mapping"]) if cal.get("mapping") else None
    threshold = cal.get("threshold")
    seen = [v for v in cal.get("calibration_scores") or [] if v is not None and math.isfinite(v)]
    lowest = min(seen) if seen else None
    rows = []
    for i in range(len(ids)):
        s = finite_or_none(scores.score[i])
        estimate: tuple[float | None, float | None, float | None] = (None, None, None)
        if g is not None and s is not None:
            estimate = _case_estimate(g, s, lowest, level)
        empty = bool(scores.empty[i])
        rows.append(
            _case_row(
                str(ids[i]),
                s,
                estimate,
                _flag(s, empty, threshold),
                empty,
                masks[i],
                finite_or_none(confidence[i]),
                int(scores.best_reference[i]),
                None if real_dice is None else finite_or_none(real_dice[i]),
                real_dice is not None,
            )
        )
    return rows


def _case_estimate(
    g: MetricMapping, score: float, lowest: float | None, level: float
) -> tuple[float | None, float | None, float | None]:
    """Estimated Dice ``(value, lower, upper)`` of a case's score through the isotonic map ``g``.

    Below the lowest calibration score the map is flat (it has seen nothing worse), which would give
    a case scoring 0 the Dice of the worst calibration case; there the estimate falls in proportion
    to the score instead (RCA's score is itself a Dice estimate: 0 means no reference fits) and the
    interval reaches 0.
    """
    if lowest is not None and lowest > 0 and score < lowest:
        value = float(g.predict([lowest])[0]) * max(score, 0.0) / lowest
        _, hi = g.interval([lowest], level)
        return finite_or_none(value), 0.0, finite_or_none(hi[0])
    lo, hi = g.interval([score], level)
    return finite_or_none(g.predict([score])[0]), finite_or_none(lo[0]), finite_or_none(hi[0])


def regressor_case_rows(
    estimates: dict[str, np.ndarray],
    masks: Sequence[Tensor],
    confidence: Tensor,
    ids: Sequence[str],
    real_dice: np.ndarray | None = None,
) -> list[CaseRow]:
    """One row per case from the quality regressor's calibrated estimates
    (:func:`~spe_lightning.percase.regressor.quality_estimates`): the same columns as :func:`case_rows`."""
    return [
        _case_row(
            str(ids[i]),
            finite_or_none(estimates["score"][i]),
            tuple(finite_or_none(estimates[k][i]) for k in ("estimate", "lower", "upper")),  # type: ignore[arg-type]
            bool(estimates["flagged"][i]),
            not bool(masks[i].any()),
            masks[i],
            finite_or_none(confidence[i]),
            -1,
            None if real_dice is None else finite_or_none(real_dice[i]),
            real_dice is not None,
        )
        for i in range(len(ids))
    ]


class RCAScorer:
    """Per-case scores by RCA (:func:`case_scores`), calibrated by :meth:`fit` (:func:`calibrate_cases`).

    Args:
        segmenter: the reverse segmenter of the per-case step.
        ref_images, ref_masks: the labelled references at the working size.
        calibration: a saved :func:`calibrate_cases` dict (None: scores without flags until :meth:`fit`).
        k, top, dice_cut: as for :func:`case_scores` and :func:`calibrate_cases` (a calibration's own win).
        threshold, min_foreground: the reverse step's binarisation and the empty-prediction cut.
        level: the interval level of the estimated Dice.
    """

    name = "rca"

    def __init__(
        self,
        segmenter: ReverseSegmenter,
        ref_images: Tensor,
        ref_masks: Tensor,
        calibration: dict[str, Any] | None = None,
        k: int = 16,
        top: int = 1,
        dice_cut: float = 0.7,
        threshold: float = 0.5,
        min_foreground: int = 16,
        level: float = 0.9,
    ) -> None:
        self.segmenter, self.ref_images, self.ref_masks = segmenter, ref_images, ref_masks
        self.calibration = calibration
        cal = calibration or {}
        self.k, self.top = int(cal.get("k", k)), int(cal.get("top", top))
        self.dice_cut, self.threshold, self.min_foreground, self.level = dice_cut, threshold, min_foreground, level

    def scores(
        self, cases: CaseInputs, device: torch.device, progress: Callable[[int], Any] | None = None
    ) -> CaseScores:
        """The raw RCA scores of ``cases`` (empty predictions at the calibrated empty score, if any)."""
        empty_score = (self.calibration or {}).get("empty_score")
        return case_scores(
            self.segmenter,
            cases.gray,
            cases.working_masks,
            self.ref_images,
            self.ref_masks,
            k=self.k,
            top=self.top,
            threshold=self.threshold,
            min_foreground=self.min_foreground,
            empty_score=empty_score,
            device=device,
            progress=progress,
        )

    def fit(self, data: ScorerFitData) -> RCAScorer:
        """Calibrate the flags and the score -> Dice map on the calibration set (the model's predictions there)."""
        cal = data.calibration
        if cal.masks is None:
            raise ValueError("RCAScorer.fit: the calibration set needs masks.")
        masks, conf = data.predict(cal)
        inputs = CaseInputs(cal.gray, masks, conf, [str(i) for i in cal.indices])
        self.calibration = None  # scored uncalibrated: the empty score is what the calibration finds
        scores = self.scores(inputs, data.device)
        self.calibration = calibrate_cases(scores, per_case_dice(masks, cal.masks), self.k, self.top, self.dice_cut)
        return self

    def score(
        self, cases: CaseInputs, device: torch.device, progress: Callable[[int], Any] | None = None
    ) -> CaseScoring:
        """One row per case: RCA score, estimated Dice with interval and flag (when calibrated)."""
        rows = case_rows(
            self.scores(cases, device, progress),
            self.calibration,
            cases.masks,
            cases.confidence,
            cases.ids,
            cases.real_dice,
            self.level,
        )
        return CaseScoring(rows, (self.calibration or {}).get("threshold"))

    def state(self) -> dict[str, Any] | None:
        """The calibration (``cases`` of an estimator file); None before :meth:`fit`."""
        return self.calibration

    def model_signals(self, name: str | None) -> tuple[str, ...]:
        """RCA needs nothing more from the model than its masks and confidence."""
        return ()
