"""Prediction-powered inference (percase/ppi.py): hand computations and coverage by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import t

from spe_lightning.percase.ppi import (
    LabelDesign,
    classical_mean,
    ppi_mean,
    stratified_design,
    stratified_ppi_mean,
    uncertainty_of,
)

F_U = np.array([0.9, 0.8, 0.7, 0.95, 0.6])
F_L = np.array([0.85, 0.75, 0.5, 0.9])
Y_L = np.array([0.8, 0.6, 0.3, 0.88])


def test_plain_ppi_matches_hand_computation() -> None:
    # lambda = 1: mean of all 9 predictions plus the labelled cases' mean error; finite-population variance
    res = ppi_mean(F_U, F_L, Y_L, level=0.9, lam=1.0)
    e = Y_L - F_L
    center = np.concatenate([F_U, F_L]).mean() + e.mean()
    half = t.ppf(0.95, 3) * math.sqrt((1 - 4 / 9) * e.var(ddof=1) / 4)
    assert res.estimate == pytest.approx(center)
    assert res.lower == pytest.approx(center - half)
    assert res.upper == pytest.approx(center + half)
    assert (res.n_labelled, res.n_unlabelled, res.lam, res.design) == (4, 5, 1.0, "uniform")
    # the classical interval: the labels' mean, same correction
    c_half = t.ppf(0.95, 3) * math.sqrt((1 - 4 / 9) * Y_L.var(ddof=1) / 4)
    assert res.classical == pytest.approx(Y_L.mean())
    assert res.classical_upper - res.classical_lower == pytest.approx(2 * c_half)


def test_lambda_zero_is_the_classical_interval() -> None:
    res = ppi_mean(F_U, F_L, Y_L, lam=0.0)
    assert (res.estimate, res.lower, res.upper) == pytest.approx(
        (res.classical, res.classical_lower, res.classical_upper)
    )
    assert classical_mean(Y_L, 0.9, 9) == pytest.approx((res.classical, res.classical_lower, res.classical_upper))


def test_tuned_lambda_and_jackknife_match_hand_computation() -> None:
    y_t = np.array([0.7, 0.62, 0.5, 0.78])  # slope 0.65; one leave-one-out slope (1.03) is clipped
    res = ppi_mean(F_U, F_L, y_t, level=0.8)
    mean_all = np.concatenate([F_U, F_L]).mean()

    def fit(y: np.ndarray, f: np.ndarray) -> tuple[float, float]:
        lam = np.sum((y - y.mean()) * (f - f.mean())) / np.sum((f - f.mean()) ** 2)
        lam = min(max(lam, 0.0), 1.0)  # clipped between the classical mean and plain PPI
        return lam, lam * mean_all + np.mean(y - lam * f)

    lam, center = fit(y_t, F_L)
    loo = np.array([fit(np.delete(y_t, i), np.delete(F_L, i))[1] for i in range(4)])
    var = (1 - 4 / 9) * 3 / 4 * np.sum((loo - loo.mean()) ** 2)
    half = t.ppf(0.9, 2) * math.sqrt(var)
    assert res.lam == pytest.approx(lam) and 0.6 < lam < 0.7
    assert ppi_mean(F_U, F_L, Y_L).lam == 1.0  # a slope of 1.44 is clipped to plain PPI
    assert res.estimate == pytest.approx(center)
    assert (res.lower, res.upper) == pytest.approx((center - half, center + half))


def test_population_form_adds_the_unlabelled_variance() -> None:
    res = ppi_mean(F_U, F_L, Y_L, level=0.9, lam=1.0, finite_population=False, bounds=None)
    e = Y_L - F_L
    center = F_U.mean() + e.mean()
    half = t.ppf(0.95, 3) * math.sqrt(e.var(ddof=1) / 4 + F_U.var(ddof=1) / 5)
    assert res.estimate == pytest.approx(center)
    assert (res.lower, res.upper) == pytest.approx((center - half, center + half))
    assert not res.finite_population


def test_every_case_labelled_gives_the_exact_mean() -> None:
    res = ppi_mean(np.array([]), F_L, Y_L)
    assert res.estimate == pytest.approx(Y_L.mean())
    assert res.width == pytest.approx(0.0)


def test_intervals_are_clipped_to_the_metric_range() -> None:
    res = ppi_mean([0.99, 0.98], [0.99, 0.97, 0.98], [1.0, 0.99, 1.0], lam=1.0)
    assert res.upper <= 1.0 and res.classical_upper <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pred_labelled": F_L[:2], "y_labelled": Y_L[:2]}, "at least 3"),
        ({"pred_labelled": F_L[:3]}, "3 predictions for 4"),
        ({"pred_unlabelled": [0.5, float("nan")]}, "non-finite"),
        ({"level": 1.0}, "level"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, match: str) -> None:
    args = {"pred_unlabelled": F_U, "pred_labelled": F_L, "y_labelled": Y_L, **kwargs}
    with pytest.raises(ValueError, match=match):
        ppi_mean(**args)


def _population(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A target whose predictions are biased (too high by ~0.1), compressed and noisier on poor cases."""
    rng = np.random.default_rng(seed)
    f = rng.beta(6, 2, n)
    y = np.clip(0.1 + 0.7 * f + rng.normal(0, 1, n) * 0.25 * (1 - f), 0, 1)
    return f, y


DRAWS = 1500  # the coverage's standard error is about 0.008: 0.87 is 4 of them below 0.9


def test_coverage_by_simulation_and_a_biased_estimator_fails_the_same_check() -> None:
    f, y = _population(0)
    truth = y.mean()
    rng = np.random.default_rng(1)
    hits, naive_hits, ratios = [], [], []
    for _ in range(DRAWS):
        lab = rng.choice(f.size, 20, replace=False)
        unl = np.setdiff1d(np.arange(f.size), lab)
        res = ppi_mean(f[unl], f[lab], y[lab], level=0.9)
        hits.append(res.lower <= truth <= res.upper)
        ratios.append(res.width / res.classical_width)
        # the unrectified mean of the predictions with an interval as wide: biased, so it must fail
        naive = f.mean()
        naive_hits.append(naive - res.width / 2 <= truth <= naive + res.width / 2)
    assert 0.87 <= np.mean(hits) <= 0.94
    assert np.mean(naive_hits) < 0.5
    assert np.median(ratios) < 0.85  # predictions that track the truth make the interval narrower


def test_useless_predictions_keep_coverage() -> None:
    rng = np.random.default_rng(2)
    f, y = rng.uniform(0, 1, 150), rng.beta(5, 2, 150)
    truth = y.mean()
    hits = []
    for _ in range(DRAWS):
        lab = rng.choice(150, 15, replace=False)
        res = ppi_mean(np.delete(f, lab), f[lab], y[lab], level=0.9)
        hits.append(res.lower <= truth <= res.upper)
    assert 0.87 <= np.mean(hits) <= 0.94


# ------------------------------------------------------------------------------------------ stratified design


def test_stratified_design_draws_within_strata() -> None:
    u = uncertainty_of(np.linspace(0.05, 0.99, 60))
    d = stratified_design(u, k=20, seed=3, exclude=[0, 1])
    assert len(d.chosen) == 20 and len(set(d.chosen)) == 20
    assert not {0, 1} & set(d.chosen)
    assert sum(d.allocation) == 20 and min(d.allocation) >= 2 and len(d.allocation) == 4
    for s, a in enumerate(d.allocation):
        assert sum(1 for i in d.chosen if d.strata[i] == s) == a
    # strata are ordered by uncertainty
    by = [u[np.array(d.strata) == s].mean() for s in range(4)]
    assert by == sorted(by)
    assert stratified_design(u, k=20, seed=3, exclude=[0, 1]) == d
    assert LabelDesign.from_dict(d.to_dict()) == d
    with pytest.raises(ValueError, match="between 2"):
        stratified_design(u, k=61)


def test_stratified_estimator_matches_hand_computation() -> None:
    f = np.array([0.9, 0.8, 0.85, 0.7, 0.4, 0.5, 0.3, 0.6])
    strata = [0, 0, 0, 0, 1, 1, 1, 1]
    lab, y = [0, 2, 4, 6], np.array([0.8, 0.8, 0.2, 0.35])
    res = stratified_ppi_mean(f, strata, lab, y, level=0.9, lam=1.0)
    e0, e1 = y[:2] - f[[0, 2]], y[2:] - f[[4, 6]]
    center = 0.5 * (f[:4].mean() + e0.mean()) + 0.5 * (f[4:].mean() + e1.mean())
    terms = [0.25 * 0.5 * e.var(ddof=1) / 2 for e in (e0, e1)]
    df = sum(terms) ** 2 / sum(v * v for v in terms)
    half = t.ppf(0.95, df) * math.sqrt(sum(terms))
    assert res.estimate == pytest.approx(center)
    assert (res.lower, res.upper) == pytest.approx((center - half, center + half))
    assert res.classical == pytest.approx(0.5 * y[:2].mean() + 0.5 * y[2:].mean())
    assert res.design == "stratified"
    with pytest.raises(ValueError, match="at least 2 each"):
        stratified_ppi_mean(f, strata, [0, 2, 4], y[:3])


def test_stratified_coverage_by_simulation() -> None:
    f, y = _population(5)
    truth = y.mean()
    u = uncertainty_of(f)
    hits = []
    for seed in range(800):  # seeded draws of the design; the coverage's standard error is about 0.011
        d = stratified_design(u, k=20, seed=seed)
        res = stratified_ppi_mean(f, d.strata, d.chosen, y[d.chosen], level=0.9)
        hits.append(res.lower <= truth <= res.upper)
    assert 0.87 <= np.mean(hits) <= 0.95


def test_labels_without_spread_size_no_interval_so_it_spans_the_range() -> None:
    f_u = np.full(40, 0.97)
    res = ppi_mean(f_u, np.full(10, 0.99), np.ones(10))  # 10 labelled cases, every one at recall 1
    assert res.estimate == pytest.approx(1.0, abs=0.03)
    assert (res.lower, res.upper) == (0.0, 1.0) and (res.classical_lower, res.classical_upper) == (0.0, 1.0)
    spread = ppi_mean(f_u, np.full(10, 0.99), np.r_[np.ones(9), 0.9])  # one differs: an interval again
    assert 0.0 < spread.lower < spread.upper <= 1.0
