"""The per-case score -> Dice map (spe_lightning.percase.score_map): the stack, and the monotone map through
isotonic regression's block centres."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import Ridge

from spe_lightning.percase.score_map import apply_score_map, centred_knots, design, fit_score_map, fit_stack


def _piled(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 1, n)
    return s, np.clip(0.9 / (1 + np.exp(-(s - 0.5) * 30)) + rng.normal(0, 0.05, n), 0, 1)


def test_stack_equals_ridge_with_an_unpenalised_intercept() -> None:
    rng = np.random.default_rng(0)
    sig = {"a": rng.normal(size=80), "b": rng.normal(size=80)}
    y = 0.3 * sig["a"] - 0.2 * sig["b"] + 0.5 + rng.normal(0, 0.1, 80)
    x = design(sig, ("a", "b"))
    coef = fit_stack(x, y, ridge=1e-2)
    ref = Ridge(alpha=1e-2 * 80).fit(x[:, :2], y)  # scikit-learn centres x, so its intercept is not penalised
    assert np.allclose(coef[:2], ref.coef_) and coef[2] == pytest.approx(ref.intercept_)
    with pytest.raises(ValueError, match="which these cases do not have"):
        design(sig, ("a", "c"))


def test_monotone_map_keeps_the_ranking_and_the_isotonic_levels() -> None:
    s, y = _piled(200, 1)
    x = np.stack([s, np.ones_like(s)], 1)
    coef, kx, ky = fit_score_map(x, y, "isotonic")
    score = x @ coef
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, y)
    fitted = iso.predict(score)
    # the knots: one per isotonic level, at the mean score of the cases fitted to it
    assert np.allclose(ky, np.unique(fitted))
    assert np.allclose(kx, [score[fitted == v].mean() for v in np.unique(fitted)])
    assert np.all(np.diff(kx) > 0) and np.all(np.diff(ky) > 0)
    est = apply_score_map(x, coef, kx, ky)
    inner = (score > kx[0]) & (score < kx[-1])
    order = np.argsort(score[inner])
    assert np.all(np.diff(est[inner][order]) > 0)  # strictly increasing: no case tied with another
    assert est.min() == pytest.approx(ky[0]) and est.max() == pytest.approx(ky[-1])  # flat beyond the end knots
    # close to the step map it smooths: most of the fit's error is the data's, not the smoothing's
    assert np.mean(np.abs(est - y)) < np.mean(np.abs(fitted - y)) + 0.02
    assert 0 <= est.min() and est.max() <= 1


def test_centred_knots_merge_levels_that_clip_to_the_same_value() -> None:
    kx, ky = centred_knots(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0, 1.0]))
    assert kx == (0.5, 2.5) and ky == (0.0, 1.0)


def test_linear_map_has_no_knots_and_unknown_shapes_are_refused() -> None:
    s, y = _piled(50, 2)
    x = np.stack([s, np.ones_like(s)], 1)
    coef, kx, ky = fit_score_map(x, y, "linear")
    assert kx == () and ky == ()
    assert np.allclose(apply_score_map(x, coef, kx, ky), np.clip(x @ coef, 0, 1))
    with pytest.raises(ValueError, match="shape must be one of"):
        fit_score_map(x, y, "spline")
