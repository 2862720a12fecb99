"""Per-case quality that travels to another site: a score -> Dice map recalibrated per target, distance-aware intervals.

The calibration-set map (:func:`~spe_lightning.percase.quality_calibration.calibrate_quality`) is fitted on
images that look like training; at another site the map from score to Dice moves. A target offers, without
labels, its *target-styled pairs* (:func:`~spe_lightning.engine.styled_pairs.styled_set`: the calibration
images restyled like the target, their real per-case Dice known). Here:

- :class:`CaseSignals`: per case, the label-free signals (the regressor's raw output, RCA, the model's
  confidence / Soft Dice Confidence, checkpoint agreement, mirror consistency), label-free features (for
  distances) and, for calibrated cases, the real Dice and the source image (a styled copy shares its original's group);
- :func:`fit_site_calibration`: a linear stack of the chosen signals (or a monotone map of it, where Dice piles up
  at 0 and near 1: :mod:`~spe_lightning.percase.score_map`) fitted on the calibration cases *and* the target's
  styled pairs, with per-case 90% intervals from split-conformal out-of-fold residuals normalised by distance: a
  case farther from every calibrated case than ``distance_ref`` (the calibrated cases' own ``reference_quantile``
  of leave-one-group-out nearest-neighbour distance) gets its interval widened by ``distance / distance_ref`` and
  ``beyond_calibrated`` set;
- :func:`choose_rule`: which signals enter and the map's shape, chosen by held-out MAE on development folds only
  (ties, within ``tie``, keep the rule with fewer signals, then the linear map);

The rows beside the set estimate are in :mod:`spe_lightning.percase.set_agreement`. Plain NumPy (and scikit-learn's
isotonic regression); everything fitted is plain numbers (:meth:`SiteCalibration.to_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spe_lightning.percase.score_map import SHAPES, apply_score_map, design, fit_score_map

__all__ = [
    "SIGNALS",
    "RULES",
    "SHAPES",
    "CaseSignals",
    "SiteCalibration",
    "case_distances",
    "fit_site_calibration",
    "fit_width_factor",
    "heldout_errors",
    "choose_rule",
    "rule_name",
]

#: every per-case signal a rule may stack
SIGNALS = ("regressor", "rca", "confidence", "agreement", "mirror")
#: candidate rules (signals stacked), simplest first: a tie keeps the earlier one
RULES: tuple[tuple[str, ...], ...] = (
    ("regressor",),
    ("regressor", "confidence"),
    ("regressor", "rca"),
    ("regressor", "agreement"),
    ("regressor", "rca", "confidence"),
    ("regressor", "rca", "confidence", "agreement"),
)
#: estimate bins of the per-bin (Mondrian) conformal quantile: bad cases need wider intervals
BINS = (0.0, 0.5, 0.7, 0.85, 1.0)
#: interval rules of :func:`fit_site_calibration`
INTERVALS = ("heldout", "correction")
#: The product's interval rule and width factor, fixed on development folds only (JSRT lungs' calibration split;
#: benchmarks/results/percase_quality_jsrt_development.json, docs/per_case.md): on the folds where the styled pairs
#: imitate the held-out half imperfectly ("mismatched", "content") the smallest factor reaching 90% on both is 1.25
#: (0.957 / 0.917); the "correction" rule covered 0.985 / 0.997 at factor 1 but wider, so it was not taken.
INTERVAL_RULE = "heldout"
WIDTH_FACTOR = 1.25


@dataclass(frozen=True)
class CaseSignals:
    """Per-case signals of a set of cases (each array ``[N]``), their features ``[N, F]`` and, when labelled,
    their real Dice and group (the source image: a styled copy and its original share it)."""

    signals: Mapping[str, np.ndarray]
    features: np.ndarray
    real: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.features)
        for name, v in self.signals.items():
            if name not in SIGNALS:
                raise ValueError(f"unknown per-case signal {name!r}; known: {', '.join(SIGNALS)}.")
            if len(v) != n:
                raise ValueError(f"signal {name!r} has {len(v)} values for {n} cases.")
        for name, col in (("real", self.real), ("groups", self.groups)):
            if col is not None and len(col) != n:
                raise ValueError(f"{name} has {len(col)} values for {n} cases.")

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, pos: np.ndarray) -> CaseSignals:
        """The cases at ``pos``."""
        return CaseSignals(
            {k: np.asarray(v)[pos] for k, v in self.signals.items()},
            np.asarray(self.features)[pos],
            None if self.real is None else np.asarray(self.real)[pos],
            None if self.groups is None else np.asarray(self.groups)[pos],
        )

    @staticmethod
    def concat(parts: Sequence[CaseSignals]) -> CaseSignals:
        """The cases of every part, in order (signals present in every part only)."""
        names = [k for k in parts[0].signals if all(k in p.signals for p in parts)]
        labelled = all(p.real is not None for p in parts)
        grouped = all(p.groups is not None for p in parts)
        return CaseSignals(
            {k: np.concatenate([np.asarray(p.signals[k], float) for p in parts]) for k in names},
            np.concatenate([np.asarray(p.features, float) for p in parts]),
            np.concatenate([np.asarray(p.real, float) for p in parts]) if labelled else None,
            np.concatenate([np.asarray(p.groups) for p in parts]) if grouped else None,
        )


def _standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = features.mean(0), features.std(0)
    return mu, np.maximum(sd, 1e-6 * (np.abs(mu) + 1.0))  # a constant feature must not divide by zero


def case_distances(
    features: np.ndarray,
    calibrated: np.ndarray,
    groups: np.ndarray | None = None,
    calibrated_groups: np.ndarray | None = None,
    scale: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per case, the Euclidean distance to the nearest calibrated case in standardised features.

    ``scale`` (mean, sd) standardises (default: the calibrated cases'); a case is never matched with a
    calibrated case of its own group (``groups``/``calibrated_groups``: leave-one-group-out). Inf when no
    calibrated case is left to match.
    """
    x, c = np.asarray(features, float), np.asarray(calibrated, float)
    if c.ndim != 2 or x.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"features {x.shape} and calibrated features {c.shape} need the same columns.")
    if len(x) == 0:
        return np.zeros(0)
    if len(c) == 0:
        return np.full(len(x), np.inf)
    mu, sd = scale if scale is not None else _standardiser(c)
    z, zc = (x - mu) / sd, (c - mu) / sd
    d = np.sqrt(((z[:, None, :] - zc[None, :, :]) ** 2).sum(-1))
    if groups is not None and calibrated_groups is not None:
        d[np.asarray(groups)[:, None] == np.asarray(calibrated_groups)[None, :]] = np.inf
    return d.min(1)


def _conformal(values: np.ndarray, level: float) -> float:
    r = np.sort(np.asarray(values, float))
    if r.size == 0:
        return math.inf
    return float(r[min(math.ceil((r.size + 1) * level), r.size) - 1])


def _bin_of(est: np.ndarray) -> np.ndarray:
    edges = np.asarray(BINS)
    return np.clip(np.searchsorted(edges, est, side="right") - 1, 0, len(edges) - 2)


@dataclass(frozen=True)
class SiteCalibration:
    """A per-target score -> Dice map with distance-aware intervals (plain numbers; :func:`fit_site_calibration`).

    ``estimate(cases)`` gives per case ``estimate``, ``lower``, ``upper``, ``distance`` (to the nearest
    calibrated case, in standardised features) and ``beyond_calibrated`` (distance > ``distance_ref``).
    """

    signals: tuple[str, ...]
    coef: tuple[float, ...]
    level: float
    bin_quantiles: tuple[float, ...]  # normalised conformal quantile per estimate bin (BINS)
    distance_ref: float
    feature_mean: tuple[float, ...]
    feature_sd: tuple[float, ...]
    calibrated_features: np.ndarray = field(repr=False)
    n_calibration: int = 0
    n_styled: int = 0
    heldout_mae: float | None = None
    # the interval rule (issue 27): defaults are the stop-8 rule, so a calibration saved before them loads unchanged
    interval: str = "heldout"
    width_factor: float = 1.0
    # the map's shape (SHAPES); a calibration saved before it is linear
    shape: str = "linear"
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        knots = len(self.knots_x) == len(self.knots_y) and (self.shape == "isotonic") == bool(self.knots_x)
        if self.shape not in SHAPES or not knots:
            raise ValueError(
                f"a per-case map of shape {self.shape!r} with {len(self.knots_x)}/{len(self.knots_y)} knots is not one "
                f"this version reads (shapes: {', '.join(SHAPES)}); refit the estimator with this version."
            )

    def scale(self, distance: np.ndarray) -> np.ndarray:
        """Interval scale of each case: 1 within the calibrated range, ``distance / distance_ref`` beyond."""
        return np.maximum(1.0, np.asarray(distance, float) / max(self.distance_ref, 1e-12))

    def point(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """The map's estimate of each case, clipped to [0, 1]."""
        return apply_score_map(design(signals, self.signals), self.coef, self.knots_x, self.knots_y)

    def estimate(self, cases: CaseSignals) -> dict[str, np.ndarray]:
        """Per case: ``estimate``, ``lower``, ``upper``, ``distance``, ``beyond_calibrated``."""
        est = self.point(cases.signals)
        dist = case_distances(
            cases.features,
            self.calibrated_features,
            scale=(np.asarray(self.feature_mean), np.asarray(self.feature_sd)),
        )
        half = np.asarray(self.bin_quantiles)[_bin_of(est)] * self.width_factor * self.scale(dist)
        return {
            "estimate": est,
            "lower": np.clip(est - half, 0.0, 1.0),
            "upper": np.clip(est + half, 0.0, 1.0),
            "distance": dist,
            "beyond_calibrated": dist > self.distance_ref,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (the calibrated features as nested lists)."""
        return {
            "signals": list(self.signals),
            "coef": list(self.coef),
            "level": self.level,
            "bins": list(BINS),
            "bin_quantiles": list(self.bin_quantiles),
            "distance_ref": self.distance_ref,
            "feature_mean": list(self.feature_mean),
            "feature_sd": list(self.feature_sd),
            "calibrated_features": np.asarray(self.calibrated_features).tolist(),
            "n_calibration": self.n_calibration,
            "n_styled": self.n_styled,
            "heldout_mae": self.heldout_mae,
            "interval": self.interval,
            "width_factor": self.width_factor,
            "shape": self.shape,
            "knots_x": list(self.knots_x),
            "knots_y": list(self.knots_y),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteCalibration:
        """Inverse of :meth:`to_dict`."""
        return cls(
            signals=tuple(d["signals"]),
            coef=tuple(float(v) for v in d["coef"]),
            level=float(d["level"]),
            bin_quantiles=tuple(float(v) for v in d["bin_quantiles"]),
            distance_ref=float(d["distance_ref"]),
            feature_mean=tuple(float(v) for v in d["feature_mean"]),
            feature_sd=tuple(float(v) for v in d["feature_sd"]),
            calibrated_features=np.asarray(d["calibrated_features"], float),
            n_calibration=int(d.get("n_calibration", 0)),
            n_styled=int(d.get("n_styled", 0)),
            heldout_mae=d.get("heldout_mae"),
            interval=str(d.get("interval", "heldout")),
            width_factor=float(d.get("width_factor", 1.0)),
            shape=str(d.get("shape", "linear")),
            knots_x=tuple(float(v) for v in d.get("knots_x", ())),
            knots_y=tuple(float(v) for v in d.get("knots_y", ())),
        )


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Positions of each of ``k`` folds, whole groups in one fold."""
    uniq = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {g: i % k for i, g in zip(range(len(uniq)), uniq[perm])}
    which = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(which == f) for f in range(k)]


def fit_site_calibration(
    calibration: CaseSignals,
    styled: CaseSignals | None,
    signals: Sequence[str],
    level: float = 0.9,
    folds: int = 5,
    reference_quantile: float = 0.9,
    min_per_bin: int = 10,
    seed: int = 0,
    interval: str = "heldout",
    width_factor: float = 1.0,
    shape: str = "linear",
) -> SiteCalibration:
    """Stack ``signals`` on the calibration cases and the target's ``styled`` pairs (None: calibration only).

    The map: least squares of real Dice on the signals (small ridge), clipped to [0, 1]; with
    ``shape="isotonic"`` a monotone map of that stack's score, fitted on the same cases. The interval:
    out-of-fold residuals (``folds`` folds of whole groups: a styled copy is held out with its original),
    each divided by its case's scale (:meth:`SiteCalibration.scale`, from its leave-one-group-out distance to
    the other calibrated cases), the ``level`` split-conformal quantile per estimate bin (the pooled one
    for bins with fewer than ``min_per_bin`` cases). ``distance_ref``: the ``reference_quantile`` of those
    leave-one-group-out distances.

    ``interval`` (:data:`INTERVALS`): ``"heldout"`` uses those out-of-fold residuals only; ``"correction"``
    also pools each styled pair's residual under the map fitted on the calibration cases alone (what the pairs
    had to correct; without styled pairs both rules are the same). ``width_factor`` multiplies every
    half-width (:func:`fit_width_factor`).
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}.")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}.")
    if not (math.isfinite(width_factor) and width_factor > 0):
        raise ValueError(f"width_factor must be a positive number, got {width_factor!r}.")
    parts = [calibration] if styled is None or len(styled) == 0 else [calibration, styled]
    for p in parts:
        if p.real is None:
            raise ValueError("fit_site_calibration: calibration cases and styled pairs need their real Dice.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")
    pool = CaseSignals.concat(parts)
    assert pool.real is not None
    n = len(pool)
    if n < 2 * folds:
        raise ValueError(f"fit_site_calibration: {n} calibrated cases; need at least {2 * folds}.")
    groups = pool.groups if pool.groups is not None else np.arange(n)
    names = tuple(signals)
    x, y = design(pool.signals, names), np.asarray(pool.real, float)
    ok = np.isfinite(x).all(1) & np.isfinite(y)
    if ok.sum() < 2 * folds:
        raise ValueError(f"fit_site_calibration: {int(ok.sum())} cases with every signal of {names}.")
    x, y, groups, feats = x[ok], y[ok], np.asarray(groups)[ok], np.asarray(pool.features, float)[ok]
    coef, knots_x, knots_y = fit_score_map(x, y, shape)
    oof = np.zeros(len(y))
    for pos in _folds(groups, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), pos)
        oof[pos] = apply_score_map(x[pos], *fit_score_map(x[train], y[train], shape))
    scale = _standardiser(feats)
    own = case_distances(feats, feats, groups, groups, scale=scale)
    own = np.where(np.isfinite(own), own, np.nan)
    ref = float(np.nanquantile(own, reference_quantile)) if np.isfinite(own).any() else 1.0
    s = np.maximum(1.0, np.nan_to_num(own, nan=ref) / max(ref, 1e-12))
    norm, b = np.abs(y - oof) / s, _bin_of(oof)
    n_cal = int(ok[: len(calibration)].sum())  # the pool is the calibration cases, then the styled pairs
    if interval == "correction" and n_cal >= 2 and len(y) > n_cal:
        # Styling imitates the target imperfectly (it copies appearance, not content), so the out-of-fold
        # residuals of the recalibrated map are optimistic where the imitation is wrong. How far the styled
        # pairs moved the calibration-only map is how far the pairs had to correct; the rule assumes they may
        # fail to correct by as much, and pools those residuals too (normalised and binned alike).
        cal_only = apply_score_map(x[n_cal:], *fit_score_map(x[:n_cal], y[:n_cal], shape))
        norm = np.concatenate([norm, np.abs(y[n_cal:] - cal_only) / s[n_cal:]])
        b = np.concatenate([b, b[n_cal:]])
    pooled = _conformal(norm, level)
    quant = tuple(
        _conformal(norm[b == i], level) if (b == i).sum() >= min_per_bin else pooled for i in range(len(BINS) - 1)
    )
    return SiteCalibration(
        signals=names,
        coef=tuple(float(v) for v in coef),
        level=float(level),
        bin_quantiles=quant,
        distance_ref=ref,
        feature_mean=tuple(float(v) for v in scale[0]),
        feature_sd=tuple(float(v) for v in scale[1]),
        calibrated_features=feats,
        n_calibration=len(calibration),
        n_styled=0 if styled is None else len(styled),
        heldout_mae=float(np.mean(np.abs(y - oof))),
        interval=interval,
        width_factor=float(width_factor),
        shape=shape,
        knots_x=knots_x,
        knots_y=knots_y,
    )


def heldout_errors(cal: SiteCalibration, cases: CaseSignals) -> dict[str, float]:
    """MAE, interval coverage and median width of ``cal`` on labelled held-out ``cases``."""
    if cases.real is None:
        raise ValueError("heldout_errors needs the cases' real Dice.")
    q = cal.estimate(cases)
    real = np.asarray(cases.real, float)
    return {
        "mae": float(np.mean(np.abs(q["estimate"] - real))),
        "coverage": float(np.mean((real >= q["lower"] - 1e-9) & (real <= q["upper"] + 1e-9))),
        "median_width": float(np.median(q["upper"] - q["lower"])),
    }


#: width factors :func:`fit_width_factor` tries, smallest first
FACTOR_GRID = tuple(1.0 + 0.25 * i for i in range(17))  # 1.0 ... 5.0


def fit_width_factor(
    folds: Sequence[tuple[CaseSignals, CaseSignals | None, CaseSignals]],
    signals: Sequence[str],
    interval: str = "heldout",
    level: float = 0.9,
    grid: Sequence[float] = FACTOR_GRID,
    seed: int = 0,
) -> dict[str, Any]:
    """The smallest factor of ``grid`` by which the ``interval`` rule's half-widths must grow for the held-out
    cases of development ``folds`` (as in :func:`choose_rule`; e.g. *mismatched* folds, the pairs styled like
    one shift while the held-out cases carry another) to be covered at ``level`` on average.

    Returns ``{"factor", "reached", "scores": {factor: {"coverage", "median_width"}}}``; ``reached`` is False
    (and ``factor`` the largest tried) when no factor of ``grid`` covers enough.
    """
    from dataclasses import replace

    if not folds:
        raise ValueError("fit_width_factor: no development folds.")
    fits = [(fit_site_calibration(c, s, signals, level=level, seed=seed, interval=interval), h) for c, s, h in folds]
    scores: dict[str, dict[str, float]] = {}
    factor = None
    for f in sorted(grid):
        rows = [heldout_errors(replace(site, width_factor=float(f)), held) for site, held in fits]
        fold_cov = np.array([r["coverage"] for r in rows])
        cov, width = float(fold_cov.mean()), float(np.mean([r["median_width"] for r in rows]))
        scores[f"{f:g}"] = {"coverage": cov, "median_width": width, "worst_fold_coverage": float(fold_cov.min())}
        if factor is None and cov >= level:
            factor = float(f)
    return {
        "factor": factor if factor is not None else float(max(grid)),
        "reached": factor is not None,
        "scores": scores,
    }


def rule_name(signals: Sequence[str], shape: str = "linear") -> str:
    """A rule's name in :func:`choose_rule`'s scores: ``"regressor+rca"``, ``"regressor+rca/isotonic"``."""
    return "+".join(signals) + ("" if shape == "linear" else f"/{shape}")


def choose_rule(
    folds: Sequence[tuple[CaseSignals, CaseSignals | None, CaseSignals]],
    rules: Sequence[Sequence[str]] = RULES,
    tie: float = 0.005,
    level: float = 0.9,
    seed: int = 0,
    shapes: Sequence[str] = SHAPES,
) -> dict[str, Any]:
    """The rule (signals stacked, the map's shape) with the lowest mean held-out MAE over development ``folds``.

    Each fold is ``(calibration cases, their styled pairs or None, held-out labelled cases)``, e.g. one half of
    the calibration set styled like a shifted copy of the other half, scored on that copy. Rules whose
    signals a fold lacks are skipped; among the rules within ``tie`` of the best MAE the one with fewer
    signals wins, then the linear map (:data:`SHAPES` order).
    Returns ``{"rule": [...], "shape", "scores": {rule_name: {"mae", "coverage", "median_width"}}, "tie"}``.
    """

    def has(rule: Sequence[str], cal: CaseSignals, styled: CaseSignals | None, held: CaseSignals) -> bool:
        return set(rule) <= set(cal.signals) & set(held.signals) & set(SIGNALS if styled is None else styled.signals)

    scores: dict[str, dict[str, float]] = {}
    for rule, shape in ((r, sh) for r in rules for sh in shapes if all(has(r, *f) for f in folds)):
        fits = [(fit_site_calibration(c, s, rule, level=level, seed=seed, shape=shape), h) for c, s, h in folds]
        rows = [heldout_errors(site, held) for site, held in fits]
        if rows:
            scores[rule_name(rule, shape)] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    if not scores:
        raise ValueError("choose_rule: no rule has every signal it stacks in every fold.")
    best = min(v["mae"] for v in scores.values())
    ok = [(r, sh) for r in rules for sh in shapes if rule_name(r, sh) in scores]
    ok = [(r, sh) for r, sh in ok if scores[rule_name(r, sh)]["mae"] <= best + tie]
    pick, shape = min(ok, key=lambda c: (len(c[0]), SHAPES.index(c[1]), scores[rule_name(*c)]["mae"]))
    return {"rule": list(pick), "shape": shape, "scores": scores, "tie": tie}
