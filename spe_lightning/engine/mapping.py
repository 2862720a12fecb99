"""The mapping G from a pseudo metric (reverse segmentation) to the real metric.

G is fitted with scikit-learn across checkpoints on the labelled calibration set, then stored as
plain numbers (:meth:`MetricMapping.to_dict` is JSON-safe and ``torch.load(weights_only=True)``-safe) and
evaluated with NumPy only.

Kinds (``MAPPINGS``)
--------------------
``linear``
    Ordinary least squares (the paper's choice), in closed form: the same numbers as
    ``sklearn.linear_model.LinearRegression`` to rounding (a test holds them equal), ~20x faster on the
    few points G is fitted on, which matters because every fit is refitted n times for its LOO residuals.
    ``params = {"slope", "intercept", "degenerate"}``.
``huber``
    Robust linear fit, ``sklearn.linear_model.HuberRegressor`` (epsilon 1.35, no L2 penalty; x is
    standardised for the fit and the coefficients are mapped back). Same ``params`` as linear.
``isotonic``
    Monotone increasing, ``sklearn.isotonic.IsotonicRegression(increasing=True, out_of_bounds="clip")``.
    ``params = {"x": [...], "y": [...], "degenerate"}``: the knots; G interpolates linearly between
    them and is constant beyond the first and last knot.

Degenerate x: when all fitting x are equal (no spread; this includes LOO refits) a slope cannot be
fitted. Then linear and huber store ``slope=0``, ``intercept=mean(y)`` and ``degenerate=1.0``
(isotonic gives one knot at ``mean(y)`` and ``degenerate=1.0``): G predicts the calibration mean
everywhere. Otherwise ``degenerate=0.0``.

Predictions are clipped to ``bounds`` (the metric's range, see ``metrics.BOUNDED``). Non-finite
inputs give NaN.

Intervals
---------
:meth:`MetricMapping.interval` is a split-conformal-style interval built from the leave-one-out (LOO)
residuals recorded at fit time (each point predicted by G refitted without it, the jackknife):
``G(x) -/+ q`` where ``q`` is the ``ceil((n + 1) * level)``-th smallest ``|LOO residual|`` (the
largest one when that rank exceeds n), clipped to ``bounds``. ``level`` is the nominal coverage
for a new checkpoint exchangeable with the calibration checkpoints; with the handful of checkpoints
SPE usually has (n ~ 5-30) it is approximate: the quantile is coarse, checkpoints of one run are
not exchangeable, and when ``ceil((n + 1) * level) > n`` the max residual gives slightly less than
the nominal guarantee. It does not cover the error of transferring G to a shifted target set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from threadpoolctl import ThreadpoolController

__all__ = ["MAPPINGS", "MIN_POINTS", "MetricMapping", "NotEnoughPointsError"]

#: the kinds of G
MAPPINGS: tuple[str, ...] = ("linear", "huber", "isotonic")

#: the fewest finite (pseudo, real) pairs G is fitted on
MIN_POINTS = 3


class NotEnoughPointsError(ValueError):
    """Fewer than ``MIN_POINTS`` finite (pseudo, real) pairs to fit G on."""


def _check_kind(kind: str) -> str:
    if kind not in MAPPINGS:
        raise ValueError(f"unknown mapping kind {kind!r}; valid kinds are {MAPPINGS}.")
    return kind


def _check_bounds(bounds: Any) -> tuple[float | None, float | None]:
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (lower, upper) of numbers or None; got {bounds!r}.") from None
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if (lo is not None and math.isnan(lo)) or (hi is not None and math.isnan(hi)):
        raise ValueError(f"bounds must not be NaN; got {bounds!r}.")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"bounds lower > upper: {bounds!r}.")
    return lo, hi


def _is_degenerate(x: np.ndarray) -> bool:
    return bool(np.ptp(x) <= 1e-12 * max(1.0, float(np.max(np.abs(x)))))


@cache
def _blas_pools() -> ThreadpoolController:
    """The loaded BLAS thread pools, scanned once (``threadpool_limits`` rescans them on every call: 3-6 ms)."""
    import sklearn.linear_model  # noqa: F401  (loads SciPy's BLAS, which the fits use, before the scan)

    return ThreadpoolController()


def _fit_params(kind: str, x: np.ndarray, y: np.ndarray) -> dict[str, float | list[float]]:
    """G's parameters on finite ``x``, ``y`` (at least one point; no MIN_POINTS check: LOO refits use n-1)."""
    if _is_degenerate(x):
        mean = float(np.mean(y))
        if kind == "isotonic":
            return {"x": [float(np.mean(x))], "y": [mean], "degenerate": 1.0}
        return {"slope": 0.0, "intercept": mean, "degenerate": 1.0}
    if kind == "linear":
        dx = x - np.mean(x)
        slope = float(np.dot(dx, y - np.mean(y)) / np.dot(dx, dx))
        return {"slope": slope, "intercept": float(np.mean(y) - slope * np.mean(x)), "degenerate": 0.0}
    if kind == "huber":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import HuberRegressor

        mu, sd = float(np.mean(x)), float(np.std(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            hr = HuberRegressor(epsilon=1.35, alpha=0.0, max_iter=1000).fit(((x - mu) / sd)[:, None], y)
        slope = float(hr.coef_[0]) / sd
        return {"slope": slope, "intercept": float(hr.intercept_) - slope * mu, "degenerate": 0.0}
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x, y)
    return {
        "x": [float(v) for v in iso.X_thresholds_],
        "y": [float(v) for v in iso.y_thresholds_],
        "degenerate": 0.0,
    }


def _evaluate(kind: str, params: dict, x: np.ndarray, bounds: tuple[float | None, float | None]) -> np.ndarray:
    if kind == "isotonic":
        y = np.interp(x, np.asarray(params["x"], dtype=float), np.asarray(params["y"], dtype=float))
        y = np.where(np.isfinite(x), y, np.nan)
    else:
        y = params["slope"] * x + params["intercept"]
    lo, hi = bounds
    if lo is not None or hi is not None:
        y = np.clip(y, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    return np.asarray(y, dtype=float)


@dataclass
class MetricMapping:
    """A fitted G: ``kind``, its ``params`` (plain numbers), and the LOO ``residuals`` (real - predicted)."""

    kind: str
    params: dict[str, float | list[float]]
    n_points: int
    residuals: list[float] = field(default_factory=list)
    bounds: tuple[float | None, float | None] = (None, None)

    @classmethod
    def fit(
        cls,
        kind: str,
        x: ArrayLike,
        y: ArrayLike,
        bounds: tuple[float | None, float | None] = (None, None),
    ) -> MetricMapping:
        """Fit G of ``kind`` on pairs (``x`` pseudo, ``y`` real); pairs with a non-finite value are dropped.

        Raises ValueError for an unknown kind, mismatched lengths or bad bounds, and
        :class:`NotEnoughPointsError` when fewer than ``MIN_POINTS`` finite pairs remain.
        """
        _check_kind(kind)
        bounds = _check_bounds(bounds)
        x = np.asarray(x, dtype=float).reshape(-1)
        y = np.asarray(y, dtype=float).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same length; got {x.size} and {y.size}.")
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = np.asarray(x[ok]), np.asarray(y[ok])  # (asarray: typed as arrays, not Any)
        n = int(x.size)
        if n < MIN_POINTS:
            dropped = int((~ok).sum())
            extra = f" ({dropped} pair(s) with a non-finite value dropped)" if dropped else ""
            raise NotEnoughPointsError(
                f"cannot fit the {kind} mapping G on {n} finite (pseudo, real) pair(s){extra}; "
                f"it needs at least {MIN_POINTS} (e.g. more checkpoints evaluated on the calibration set)."
            )
        # n + 1 tiny fits: multi-threaded BLAS only adds overhead (and stalls badly on a busy CPU)
        with _blas_pools().limit(limits=1, user_api="blas"):
            params = _fit_params(kind, x, y)
            residuals = []
            for i in range(n):
                keep = np.arange(n) != i
                pred_i = _evaluate(kind, _fit_params(kind, x[keep], y[keep]), x[i : i + 1], bounds)[0]
                residuals.append(float(y[i] - pred_i))
        return cls(kind=kind, params=params, n_points=n, residuals=residuals, bounds=bounds)

    def predict(self, x: ArrayLike) -> np.ndarray:
        """G(x): float64, the shape of ``x`` (0-d for a scalar), clipped to ``bounds``; NaN where x is not finite."""
        return _evaluate(self.kind, self.params, np.asarray(x, dtype=float), self.bounds)

    def half_width(self, level: float = 0.9) -> float:
        """The interval half-width at ``level``: the ceil((n+1)*level)-th smallest |LOO residual| (max if beyond n)."""
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
            raise ValueError(f"level must be a number in (0, 1); got {level!r}.")
        r = np.sort(np.abs(np.asarray(self.residuals, dtype=float)))
        if r.size == 0:
            return math.inf
        k = math.ceil((r.size + 1) * float(level))
        return float(r[min(k, r.size) - 1])

    def interval(self, x: ArrayLike, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) of G(x) -/+ :meth:`half_width`, clipped to ``bounds`` (see the module docstring)."""
        q = self.half_width(level)
        center = _evaluate(self.kind, self.params, np.asarray(x, dtype=float), (None, None))
        lo, hi = self.bounds
        lower, upper = center - q, center + q
        if lo is not None or hi is not None:
            lo_, hi_ = -np.inf if lo is None else lo, np.inf if hi is None else hi
            lower, upper = np.clip(lower, lo_, hi_), np.clip(upper, lo_, hi_)
        return np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (str, float, int, list, None); :meth:`from_dict` round-trips it exactly."""
        params = {
            k: [float(u) for u in v] if isinstance(v, (list, tuple, np.ndarray)) else float(v)
            for k, v in self.params.items()
        }
        return {
            "kind": self.kind,
            "params": params,
            "n_points": int(self.n_points),
            "residuals": [float(r) for r in self.residuals],
            "bounds": [None if b is None else float(b) for b in self.bounds],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricMapping:
        """The MetricMapping of a :meth:`to_dict` dict."""
        missing = {"kind", "params", "n_points"} - set(d)
        if missing:
            raise ValueError(f"not a MetricMapping dict: missing {sorted(missing)}.")
        kind = _check_kind(d["kind"])
        params = {
            k: [float(u) for u in v] if isinstance(v, (list, tuple)) else float(v) for k, v in d["params"].items()
        }
        need = {"x", "y"} if kind == "isotonic" else {"slope", "intercept"}
        if need - set(params):
            raise ValueError(f"{kind} mapping params need {sorted(need)}; got {sorted(params)}.")
        return cls(
            kind=kind,
            params=params,
            n_points=int(d["n_points"]),
            residuals=[float(r) for r in d.get("residuals", [])],
            bounds=_check_bounds(d.get("bounds", (None, None))),
        )
