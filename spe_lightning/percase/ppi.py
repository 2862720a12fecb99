"""Prediction-powered inference (PPI) for a target's mean metric when a few of its cases are labelled.

SPE gives every target case an estimated Dice without labels; when ``n`` of the ``N`` target cases are
labelled, their real Dice corrects the mean of the estimates (Angelopoulos et al., "Prediction-powered
inference", Science 2023) and the interval is valid whatever the estimates' bias. The estimator is
PPI++'s power-tuned one (Angelopoulos, Duchi, Zrnic, "PPI++", 2023)::

    estimate = lambda * mean(f over the target) + mean(y - lambda * f over the labelled cases)

with ``lambda`` chosen from the labelled cases to minimise the estimated variance, clipped to [0, 1]:
``lambda = 0`` is the classical labelled-only mean and ``lambda = 1`` plain PPI, so asymptotically it is
never worse than the labelled cases alone.

**The estimand and the sampling design.** The target is a finite set of ``N`` cases and its mean Dice is
the mean over those cases (what a user asks for and what the benchmarks score). By default
(``finite_population=True``) the labelled cases must be a *uniform random sample without replacement*
of the target; the estimator above is then exactly unbiased for any fixed ``lambda`` and is the
difference/regression estimator of survey sampling, whose variance carries the finite-population
correction ``1 - n/N`` (labelling every case gives width 0). With ``finite_population=False`` the
cases are treated as i.i.d. draws of a larger population (the setting of the PPI papers): the mean of
the predictions is taken over the unlabelled cases only and its variance is added.

**Suggested cases** (:func:`stratified_design`) keep the guarantee by randomising too: the target is
split into strata by a per-case uncertainty computed *before* any label is seen, each stratum gets a
share of the ``k`` labels (Neyman allocation, at least 2 each), and the cases are drawn uniformly at
random *within* each stratum. :func:`stratified_ppi_mean` is the matching estimator (stratified PPI:
the same estimator per stratum, weighted by the stratum's share of the target, one power-tuned
``lambda``). Labels chosen by hand, or drawn by any other rule, void the interval.

**Intervals** are Student-t intervals on the estimated variance (asymptotically exact by the central
limit theorem; not a finite-sample guarantee). The degrees of freedom drop by one for the tuned
``lambda`` (as for a regression estimator's residual variance) and by one per stratum mean; stratified
intervals use Satterthwaite's degrees of freedom. Intervals are clipped to ``bounds`` (the metric's
range), which can only keep the truth inside.

Plain NumPy/SciPy; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from spe_lightning.percase.label_design import LabelDesign, default_strata, stratified_design, uncertainty_of

__all__ = [
    "LabelDesign",
    "PPIResult",
    "classical_mean",
    "default_strata",
    "ppi_mean",
    "stratified_design",
    "stratified_ppi_mean",
    "uncertainty_of",
]

#: the design names a result states
UNIFORM, STRATIFIED = "uniform", "stratified"


@dataclass(frozen=True)
class PPIResult:
    """A prediction-powered mean with its interval, beside the labelled-only (classical) one.

    ``lam`` is PPI++'s power-tuning weight of the predictions (0: classical, 1: plain PPI); ``design``
    the sampling design the interval assumes (``"uniform"`` or ``"stratified"``).
    """

    estimate: float
    lower: float
    upper: float
    classical: float
    classical_lower: float
    classical_upper: float
    n_labelled: int
    n_unlabelled: int
    lam: float
    level: float
    design: str = UNIFORM
    finite_population: bool = True

    @property
    def width(self) -> float:
        """Width of the prediction-powered interval."""
        return self.upper - self.lower

    @property
    def classical_width(self) -> float:
        """Width of the labelled-only interval."""
        return self.classical_upper - self.classical_lower

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``lambda`` under its own name)."""
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return d


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values; PPI needs a number per case.")
    return a


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")


def _t(level: float, df: float) -> float:
    """The two-sided Student-t quantile (``scipy.special.stdtrit``: ``scipy.stats.t.ppf`` costs ~1000x more)."""
    from scipy.special import stdtrit

    return float(stdtrit(max(df, 1.0), 0.5 + level / 2))


def _clip(lo: float, hi: float, bounds: tuple[float, float] | None) -> tuple[float, float]:
    if bounds is None:
        return lo, hi
    return min(max(lo, bounds[0]), bounds[1]), max(min(hi, bounds[1]), bounds[0])


def _no_spread(y: np.ndarray) -> bool:
    """Every labelled value the same (all recall 1): no variance sizes an interval, so it spans the range."""
    return bool(np.ptp(y) == 0.0)


def _interval(
    center: float, var: float, df: float, level: float, bounds: tuple[float, float] | None
) -> tuple[float, float]:
    half = _t(level, df) * math.sqrt(max(var, 0.0))
    return _clip(center - half, center + half, bounds)


def classical_mean(
    y: ArrayLike, level: float = 0.9, population_size: int | None = None, bounds: tuple[float, float] | None = (0, 1)
) -> tuple[float, float, float]:
    """``(mean, lower, upper)`` of the labelled values alone (Student t; finite-population correction
    ``1 - n/population_size`` when the population size is given)."""
    _check_level(level)
    y = _vector(y, "y")
    n = y.size
    if n < 2:
        raise ValueError(f"an interval needs at least 2 labelled cases, got {n}.")
    fpc = 1.0 if population_size is None else 1.0 - n / population_size
    mean = float(y.mean())
    lo, hi = _interval(mean, fpc * float(y.var(ddof=1)) / n, n - 1, level, bounds)
    return mean, lo, hi


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    """Sample covariance (``ddof=1``); faster than ``np.cov`` for the many small vectors of the jackknife."""
    return float(((a - a.mean()) * (b - b.mean())).sum() / (a.size - 1))


def _tuned_lambda(y: np.ndarray, f: np.ndarray, scale: float = 1.0) -> float:
    """The variance-minimising weight ``cov(y, f) / (scale * var(f))`` clipped to [0, 1] (0 when the
    predictions are constant); see :data:`LAMBDA_RANGE`."""
    var_f = float(f.var(ddof=1))
    if var_f <= 1e-15:
        return 0.0
    return _clip_lambda(_cov(y, f) / (scale * var_f))


#: the tuned lambda is clipped to this range, between the classical mean (0) and plain PPI (1):
#: in a development simulation on the synthetic command's kind of targets (600 draws, not kept)
#: it narrowed the interval of weak or useless predictions at k=10 by 3-4% (width vs labelled-only 1.09 ->
#: 1.05, 1.08 -> 1.05) and changed neither the coverage nor the width of good ones
LAMBDA_RANGE = (0.0, 1.0)


def _clip_lambda(lam: float) -> float:
    return float(min(max(lam, LAMBDA_RANGE[0]), LAMBDA_RANGE[1]))


def ppi_mean(
    pred_unlabelled: ArrayLike,
    pred_labelled: ArrayLike,
    y_labelled: ArrayLike,
    level: float = 0.9,
    lam: float | None = None,
    finite_population: bool = True,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> PPIResult:
    """Prediction-powered (PPI++) mean of ``y`` over the target, with its interval at ``level``.

    Args:
        pred_unlabelled: the predictions (e.g. SPE's per-case estimated Dice) of the unlabelled cases.
        pred_labelled: the predictions of the labelled cases.
        y_labelled: the labelled cases' real values (e.g. their real Dice).
        level: coverage of the intervals, e.g. 0.9.
        lam: the predictions' weight; None tunes it (PPI++), 1 is plain PPI, 0 the classical mean.
        finite_population: the estimand is the mean over these ``n + N`` cases and the labelled ones are a
            uniform random sample of them without replacement (see the module docstring); False: all
            cases are i.i.d. draws and the estimand is the population mean (the PPI papers' setting).
        bounds: the metric's range the intervals are clipped to (None: no clipping).

    The labelled cases must be a uniform random sample of the target (for suggested cases use
    :func:`stratified_ppi_mean`).
    """
    _check_level(level)
    f_u = _vector(pred_unlabelled, "pred_unlabelled")
    f_l = _vector(pred_labelled, "pred_labelled")
    y = _vector(y_labelled, "y_labelled")
    n, m = y.size, f_u.size
    if f_l.size != n:
        raise ValueError(f"{f_l.size} predictions for {n} labelled values.")
    tuned = lam is None
    if n < (3 if tuned else 2):
        raise ValueError(f"PPI needs at least {3 if tuned else 2} labelled cases, got {n}.")
    if not finite_population and m < 2:
        raise ValueError(f"PPI over a population needs at least 2 unlabelled cases, got {m}.")
    total = n + m
    mean_f = float((f_u.sum() + f_l.sum()) / total) if finite_population else float(f_u.mean())
    fpc = 1.0 - n / total if finite_population else 1.0
    scale = 1.0 if finite_population else 1.0 + n / m
    w = _tuned_lambda(y, f_l, scale) if tuned else float(lam)  # type: ignore[arg-type]
    e = y - w * f_l
    center = w * mean_f + float(e.mean())
    if tuned:
        # jackknife over the labelled cases, lambda re-tuned each time: the plug-in variance ignores the
        # tuning and under-covers with 10-20 labels when the errors are heteroscedastic (benchmarks/
        # ppi_coverage.py synthetic, 90% intervals: 0.81 vs 0.89 at k=10, 0.87 vs 0.92 at k=20)
        my, mf, cov, var_f = _leave_one_out(y, f_l)
        wi = np.where(var_f > 1e-15, np.clip(cov / (scale * np.maximum(var_f, 1e-300)), *LAMBDA_RANGE), 0.0)
        loo = wi * mean_f + my - wi * mf
        var = fpc * (n - 1) / n * float(((loo - loo.mean()) ** 2).sum())
        dof = n - 2
    else:
        var = fpc * float(e.var(ddof=1)) / n
        dof = n - 1
    if not finite_population:
        var += w * w * float(f_u.var(ddof=1)) / m
    lo, hi = _interval(center, var, dof, level, bounds)
    c, c_lo, c_hi = classical_mean(y, level, total if finite_population else None, bounds)
    if _no_spread(y) and bounds is not None and m > 0:
        (lo, hi), (c_lo, c_hi) = bounds, bounds
    return PPIResult(
        estimate=center,
        lower=lo,
        upper=hi,
        classical=c,
        classical_lower=c_lo,
        classical_upper=c_hi,
        n_labelled=n,
        n_unlabelled=m,
        lam=w,
        level=level,
        design=UNIFORM,
        finite_population=finite_population,
    )


# ---------------------------------------------------------------------------------------------- suggested cases
def stratified_ppi_mean(
    pred: ArrayLike,
    strata: ArrayLike,
    labelled: Sequence[int] | np.ndarray,
    y_labelled: ArrayLike,
    level: float = 0.9,
    lam: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> PPIResult:
    """Stratified prediction-powered mean over a finite target whose labels were drawn by a stratified design.

    Args:
        pred: predictions of every target case (labelled ones included).
        strata: every case's stratum (e.g. :attr:`LabelDesign.strata`).
        labelled: positions of the labelled cases (a uniform draw within each stratum, e.g.
            :attr:`LabelDesign.chosen`); at least 2 per stratum.
        y_labelled: their real values, in the order of ``labelled``.
        level, lam, bounds: as for :func:`ppi_mean`.

    Per stratum ``h`` (weight ``W_h = N_h / N``) the estimate is ``lambda * mean_h(f) + mean over its
    labelled cases of (y - lambda f)``, with variance ``W_h^2 (1 - n_h/N_h) s_h^2 / n_h``; one ``lambda``
    minimises the summed variance. The classical interval is the stratified mean of the labels alone.
    """
    _check_level(level)
    f = _vector(pred, "pred")
    st = np.asarray(strata).reshape(-1)
    pos = np.asarray(labelled, dtype=int).reshape(-1)
    y = _vector(y_labelled, "y_labelled")
    if st.size != f.size:
        raise ValueError(f"{st.size} strata for {f.size} predictions.")
    if pos.size != y.size:
        raise ValueError(f"{pos.size} labelled positions for {y.size} values.")
    if pos.size != np.unique(pos).size or (pos.size and (pos.min() < 0 or pos.max() >= f.size)):
        raise ValueError(f"labelled positions must be distinct and within 0..{f.size - 1}.")
    n_all, n = f.size, pos.size
    groups: list[_Stratum] = []
    for s in np.unique(st):
        members = st == s
        in_s = members[pos]
        n_h = int(in_s.sum())
        if n_h < 2:
            raise ValueError(f"stratum {s} has {n_h} labelled cases; the stratified interval needs at least 2 each.")
        groups.append(
            _Stratum(int(members.sum()) / n_all, int(members.sum()), float(f[members].mean()), y[in_s], f[pos[in_s]])
        )
    tuned = lam is None
    w = _stratified_lambda(groups) if tuned else float(lam)  # type: ignore[arg-type]
    center = _stratified_estimate(groups, w)
    c_center = _stratified_estimate(groups, 0.0)
    h = len(groups)
    dfs = [g.y.size - 1 for g in groups]
    c_terms = [g.factor() * float(g.y.var(ddof=1)) for g in groups]
    if tuned:  # stratified jackknife, lambda re-tuned in every replicate (see ppi_mean)
        var = 0.0
        for k, g in enumerate(groups):
            loo = _stratified_leave_one_out(groups, k)
            n_h = g.y.size
            var += (1.0 - n_h / g.size) * (n_h - 1) / n_h * float(((loo - loo.mean()) ** 2).sum())
        df = float(max(n - h - 1, 1))
    else:
        terms = [g.factor() * float((g.y - w * g.f).var(ddof=1)) for g in groups]
        var, df = float(sum(terms)), _satterthwaite(terms, dfs)
    lo, hi = _interval(center, var, df, level, bounds)
    c_lo, c_hi = _interval(c_center, float(sum(c_terms)), _satterthwaite(c_terms, dfs), level, bounds)
    if _no_spread(y) and bounds is not None and n < n_all:
        (lo, hi), (c_lo, c_hi) = bounds, bounds
    return PPIResult(
        estimate=center,
        lower=lo,
        upper=hi,
        classical=c_center,
        classical_lower=c_lo,
        classical_upper=c_hi,
        n_labelled=n,
        n_unlabelled=n_all - n,
        lam=w,
        level=level,
        design=STRATIFIED,
        finite_population=True,
    )


@dataclass(frozen=True)
class _Stratum:
    """One stratum's share of the target, size, mean prediction, and its labelled cases' values/predictions."""

    weight: float
    size: int
    mean_f: float
    y: np.ndarray
    f: np.ndarray

    def factor(self) -> float:
        """``W_h^2 (1 - n_h/N_h) / n_h``: the stratum mean's variance per unit of its cases' variance."""
        n_h = self.y.size
        return self.weight**2 * (1.0 - n_h / self.size) / n_h


def _stratified_estimate(groups: Sequence[_Stratum], lam: float) -> float:
    return float(sum(g.weight * (lam * g.mean_f + float((g.y - lam * g.f).mean())) for g in groups))


def _stratified_lambda(groups: Sequence[_Stratum]) -> float:
    """The ``lambda`` minimising the summed stratum variances (strata with fewer than 2 labels are skipped)."""
    ok = [g for g in groups if g.y.size >= 2]
    num = sum(g.factor() * _cov(g.y, g.f) for g in ok)
    den = sum(g.factor() * float(g.f.var(ddof=1)) for g in ok)
    return _clip_lambda(num / den) if den > 1e-15 else 0.0


def _leave_one_out(y: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each i, without case i: the means of ``y`` and ``f``, their covariance and the variance of ``f``
    (``ddof=1``; needs at least 3 cases), in closed form instead of n refits."""
    m = y.size - 1
    yc, fc = y - y.mean(), f - f.mean()  # centred first: the sums below then lose no precision
    my, mf = (yc.sum() - yc) / m, (fc.sum() - fc) / m
    cov = ((yc * fc).sum() - yc * fc - m * my * mf) / (m - 1)
    var_f = ((fc * fc).sum() - fc * fc - m * mf * mf) / (m - 1)
    return my + y.mean(), mf + f.mean(), cov, var_f


def _stratified_leave_one_out(groups: Sequence[_Stratum], k: int) -> np.ndarray:
    """The stratified estimate (lambda re-tuned) without each labelled case of stratum ``k`` in turn."""
    g = groups[k]
    others = [h for j, h in enumerate(groups) if j != k]
    ok = [h for h in others if h.y.size >= 2]
    num0 = sum(h.factor() * _cov(h.y, h.f) for h in ok)
    den0 = sum(h.factor() * float(h.f.var(ddof=1)) for h in ok)
    c_y = sum(h.weight * float(h.y.mean()) for h in others)
    c_f = sum(h.weight * (h.mean_f - float(h.f.mean())) for h in others)
    n_h = g.y.size
    if n_h - 1 >= 2:  # the reduced stratum still adds to lambda's fit
        my, mf, cov, var_f = _leave_one_out(g.y, g.f)
        a = g.weight**2 * (1.0 - (n_h - 1) / g.size) / (n_h - 1)
        num, den = num0 + a * cov, den0 + a * var_f
    else:
        my, mf = (g.y.sum() - g.y) / (n_h - 1), (g.f.sum() - g.f) / (n_h - 1)
        num, den = np.full(n_h, num0), np.full(n_h, den0)
    lam = np.where(den > 1e-15, np.clip(num / np.maximum(den, 1e-300), *LAMBDA_RANGE), 0.0)
    return c_y + lam * c_f + g.weight * (my + lam * (g.mean_f - mf))


def _satterthwaite(terms: Sequence[float], dfs: Sequence[int]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance terms (their sum of dfs when all are 0)."""
    num = sum(terms) ** 2
    den = sum(t * t / d for t, d in zip(terms, dfs) if d > 0)
    return float(num / den) if den > 0 else float(sum(dfs))
