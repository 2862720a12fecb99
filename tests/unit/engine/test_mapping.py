import json
import math

import numpy as np
import pytest
import torch

from spe_lightning.engine.mapping import MAPPINGS, MIN_POINTS, MetricMapping, NotEnoughPointsError


def _noisy(n: int, rng: np.random.Generator, sd: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(0.3, 0.9, n)
    return x, 0.8 * x + 0.05 + rng.normal(0.0, sd, n)


def test_constants():
    assert MAPPINGS == ("linear", "huber", "isotonic")
    assert MIN_POINTS == 3
    assert issubclass(NotEnoughPointsError, ValueError)


@pytest.mark.parametrize("kind", ["linear", "huber"])
def test_linear_kinds_recover_exact_line(kind):
    x = np.linspace(0.2, 0.8, 8)
    g = MetricMapping.fit(kind, x, 2.0 * x + 0.1)
    assert g.kind == kind and g.n_points == 8 and g.params["degenerate"] == 0.0
    assert g.params["slope"] == pytest.approx(2.0, abs=1e-6)
    assert g.params["intercept"] == pytest.approx(0.1, abs=1e-6)
    assert np.abs(g.residuals).max() < 1e-6
    assert g.predict(0.5) == pytest.approx(1.1, abs=1e-6)


def test_huber_resists_an_outlier():
    x = np.linspace(0.2, 0.8, 12)
    y = 0.9 * x + 0.05
    y[4] += 0.6
    lin, hub = MetricMapping.fit("linear", x, y), MetricMapping.fit("huber", x, y)
    assert abs(hub.params["slope"] - 0.9) < 0.02 and abs(hub.params["intercept"] - 0.05) < 0.02
    assert abs(hub.params["slope"] - 0.9) < abs(lin.params["slope"] - 0.9)
    assert abs(hub.params["intercept"] - 0.05) < abs(lin.params["intercept"] - 0.05)
    grid = np.linspace(0.2, 0.8, 7)
    assert np.abs(hub.predict(grid) - (0.9 * grid + 0.05)).max() < np.abs(lin.predict(grid) - (0.9 * grid + 0.05)).max()


def test_isotonic_monotone_and_clips():
    rng = np.random.default_rng(1)
    x, y = _noisy(25, rng, sd=0.05)
    g = MetricMapping.fit("isotonic", x, y)
    knots_x, knots_y = np.asarray(g.params["x"]), np.asarray(g.params["y"])
    assert np.all(np.diff(knots_x) > 0) and np.all(np.diff(knots_y) >= 0)
    grid = np.linspace(-1.0, 2.0, 301)
    pred = g.predict(grid)
    assert np.all(np.diff(pred) >= 0)
    # out of the fitted range: constant at the end knots
    assert g.predict(-5.0) == pytest.approx(knots_y[0]) and g.predict(5.0) == pytest.approx(knots_y[-1])
    # matches scikit-learn
    from sklearn.isotonic import IsotonicRegression

    ref = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x, y).predict(grid)
    assert np.allclose(pred, ref)


def test_predict_scalar_array_and_nonfinite():
    g = MetricMapping.fit("linear", [0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    s = g.predict(0.5)
    assert isinstance(s, np.ndarray) and s.shape == () and float(s) == pytest.approx(2.0)
    a = g.predict([0.5, 1.5])
    assert a.shape == (2,) and a.dtype == np.float64 and a.tolist() == pytest.approx([2.0, 4.0])
    assert g.predict(np.ones((2, 3))).shape == (2, 3)
    assert np.isnan(g.predict([np.nan])[0])
    gi = MetricMapping.fit("isotonic", [0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert np.isnan(gi.predict(np.nan)) and gi.predict(0.5) == pytest.approx(2.0)


@pytest.mark.parametrize("kind", MAPPINGS)
def test_bounds_clip(kind):
    x = np.linspace(0.0, 1.0, 6)
    g = MetricMapping.fit(kind, x, 1.5 * x - 0.2, bounds=(0.0, 1.0))
    pred = g.predict([-10.0, 0.0, 0.5, 1.0, 10.0])
    assert pred.min() >= 0.0 and pred.max() <= 1.0
    assert pred[0] == 0.0 and pred[-1] == 1.0
    lo, hi = g.interval([-10.0, 0.5, 10.0])
    assert lo.min() >= 0.0 and hi.max() <= 1.0 and np.all(lo <= hi)
    half = MetricMapping.fit(kind, x, -5 * x, bounds=(0.0, None))
    assert half.predict(1.0) == 0.0


@pytest.mark.parametrize("kind", MAPPINGS)
def test_round_trip(kind, tmp_path):
    rng = np.random.default_rng(2)
    x, y = _noisy(9, rng)
    g = MetricMapping.fit(kind, x, y, bounds=(0.0, 1.0))
    d = g.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = MetricMapping.from_dict(json.loads(text))
    assert back == g
    assert back.to_dict() == d
    grid = np.linspace(0, 1, 11)
    assert np.array_equal(back.predict(grid), g.predict(grid))
    assert all(np.array_equal(a, b) for a, b in zip(back.interval(grid), g.interval(grid)))
    # safe for torch.load(weights_only=True)
    torch.save({"G": d}, tmp_path / "g.pt")
    assert MetricMapping.from_dict(torch.load(tmp_path / "g.pt", weights_only=True)["G"]) == g
    unbounded = MetricMapping.fit(kind, x, y)
    assert MetricMapping.from_dict(json.loads(json.dumps(unbounded.to_dict()))) == unbounded


def test_from_dict_rejects_bad_dicts():
    with pytest.raises(ValueError, match="missing"):
        MetricMapping.from_dict({"kind": "linear"})
    with pytest.raises(ValueError, match="unknown mapping kind"):
        MetricMapping.from_dict({"kind": "spline", "params": {}, "n_points": 3})
    with pytest.raises(ValueError, match="slope"):
        MetricMapping.from_dict({"kind": "linear", "params": {"x": [0.0]}, "n_points": 3})


def test_not_enough_points():
    with pytest.raises(NotEnoughPointsError, match=r"2 finite .*at least 3"):
        MetricMapping.fit("linear", [0.1, 0.2], [0.3, 0.4])
    with pytest.raises(NotEnoughPointsError, match=r"2 finite .*2 pair\(s\) with a non-finite.*at least 3"):
        MetricMapping.fit("huber", [0.1, np.nan, 0.3, 0.4], [0.2, 0.3, np.inf, 0.5])
    # exactly MIN_POINTS finite pairs is enough; non-finite pairs are dropped
    g = MetricMapping.fit("linear", [0.1, np.nan, 0.2, 0.3], [0.2, 0.5, 0.4, 0.6])
    assert g.n_points == 3 and len(g.residuals) == 3


def test_validation_errors():
    with pytest.raises(ValueError, match=r"unknown mapping kind 'cubic'.*\('linear', 'huber', 'isotonic'\)"):
        MetricMapping.fit("cubic", [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="same length; got 3 and 4"):
        MetricMapping.fit("linear", [1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="bounds"):
        MetricMapping.fit("linear", [1, 2, 3], [1, 2, 3], bounds=(1.0, 0.0))
    g = MetricMapping.fit("linear", [1, 2, 3], [1, 2, 3])
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="level"):
            g.interval([1.0], level)


@pytest.mark.parametrize("kind", MAPPINGS)
def test_degenerate_x(kind):
    g = MetricMapping.fit(kind, [0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4])
    assert g.params["degenerate"] == 1.0
    assert g.predict([0.0, 0.5, 1.0]).tolist() == pytest.approx([0.25, 0.25, 0.25])
    # LOO: each point predicted by the mean of the others
    assert g.residuals == pytest.approx([0.1 - 0.3, 0.2 - 0.8 / 3, 0.3 - 0.7 / 3, 0.4 - 0.2])
    lo, hi = g.interval(0.5)
    assert lo < 0.25 < hi and math.isfinite(float(hi))
    if kind != "isotonic":
        assert g.params["slope"] == 0.0 and g.params["intercept"] == pytest.approx(0.25)


@pytest.mark.parametrize("kind", MAPPINGS)
def test_loo_refits_on_two_distinct_points(kind):
    # leaving one out of three points with two equal x leaves a degenerate refit
    g = MetricMapping.fit(kind, [0.2, 0.2, 0.6], [0.3, 0.5, 0.7])
    assert len(g.residuals) == 3 and all(math.isfinite(r) for r in g.residuals)


def test_interval_coverage_and_width():
    rng = np.random.default_rng(3)
    coverage = []
    for _ in range(8):
        x, y = _noisy(30, rng)
        g = MetricMapping.fit("linear", x, y, bounds=(0.0, 1.0))
        xn, yn = _noisy(400, rng)
        lo, hi = g.interval(xn, 0.9)
        assert np.all(lo <= g.predict(xn)) and np.all(g.predict(xn) <= hi)
        coverage.append(np.mean((yn >= lo) & (yn <= hi)))
        assert 0.6 <= coverage[-1] <= 1.0  # one calibration draw: coverage is only nominal on average
        widths = [np.mean(np.subtract(*g.interval(xn, lv)[::-1])) for lv in (0.5, 0.8, 0.9, 0.95)]
        assert np.all(np.diff(widths) >= 0) and widths[-1] > widths[0]
    assert 0.82 <= np.mean(coverage) <= 0.97
    assert 0.75 <= min(np.mean(coverage[:4]), np.mean(coverage[4:]))


def test_half_width_rank():
    g = MetricMapping(
        kind="linear", params={"slope": 1.0, "intercept": 0.0}, n_points=4, residuals=[0.1, -0.4, 0.2, -0.3]
    )
    # |r| sorted: .1 .2 .3 .4; level .5 -> rank ceil(5 * .5) = 3 -> .3; level .9 -> rank 5 > 4 -> the max
    assert g.half_width(0.5) == pytest.approx(0.3)
    assert g.half_width(0.9) == pytest.approx(0.4)
    lo, hi = g.interval([1.0, 2.0], 0.5)
    assert lo.tolist() == pytest.approx([0.7, 1.7]) and hi.tolist() == pytest.approx([1.3, 2.3])


def test_linear_closed_form_equals_sklearn_linear_regression():
    """G's linear fit is written out for speed; it must give scikit-learn's numbers, LOO residuals included."""
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(0)
    for n in (3, 5, 30):  # n = 3: the LOO refits stand on 2 points
        x = rng.uniform(0.0, 1.0, n)
        y = 0.7 * x + 0.2 + rng.normal(0.0, 0.05, n)
        lr = LinearRegression().fit(x[:, None], y)
        g = MetricMapping.fit("linear", x, y)
        assert g.params["slope"] == pytest.approx(lr.coef_[0], rel=1e-10)
        assert g.params["intercept"] == pytest.approx(lr.intercept_, rel=1e-10)
        for i in range(n):
            keep = np.arange(n) != i
            loo = LinearRegression().fit(x[keep, None], y[keep])
            assert g.residuals[i] == pytest.approx(y[i] - loo.predict(x[i : i + 1, None])[0], rel=1e-9, abs=1e-13)
