"""Per-case quality at another site (spe_lightning.percase.sites): styled recalibration, distance-aware
intervals, the stacking rule's choice, rows vs the set estimate."""

from __future__ import annotations

import numpy as np
import pytest

from spe_lightning.percase.set_agreement import rows_vs_set
from spe_lightning.percase.sites import (
    INTERVAL_RULE,
    WIDTH_FACTOR,
    CaseSignals,
    SiteCalibration,
    case_distances,
    choose_rule,
    fit_site_calibration,
    fit_width_factor,
    heldout_errors,
)


def _cases(
    n: int, seed: int, offset: float = 0.0, feat_shift: float = 0.0, noise: float = 0.03, groups: bool = True
) -> CaseSignals:
    """Cases whose real Dice is ``0.2 + 0.8 * regressor + offset`` (+ noise); features near the origin
    (+ ``feat_shift``). ``offset`` is how the score -> Dice map moved at this 'site'."""
    rng = np.random.default_rng(seed)
    reg = rng.uniform(0.2, 1.0, n)
    conf = np.clip(reg + rng.normal(0, 0.2, n), 0, 1)
    real = np.clip(0.2 + 0.8 * reg + offset + rng.normal(0, noise, n), 0, 1)
    feats = rng.normal(0, 1, (n, 3)) + feat_shift
    return CaseSignals({"regressor": reg, "confidence": conf}, feats, real, np.arange(n) if groups else None)


def test_styled_pairs_move_the_map_where_the_target_differs() -> None:
    cal = _cases(60, 0)
    # at the target the same score means 0.15 lower Dice; its styled pairs (same images restyled) show it
    styled = _cases(60, 1, offset=-0.15)
    target = _cases(80, 2, offset=-0.15)
    before = fit_site_calibration(cal, None, ["regressor"])
    after = fit_site_calibration(cal, styled, ["regressor"])
    e_before, e_after = before.estimate(target), after.estimate(target)
    assert np.mean(e_after["estimate"]) < np.mean(e_before["estimate"]) - 0.04
    err_b = heldout_errors(before, target)["mae"]
    err_a = heldout_errors(after, target)["mae"]
    assert err_a < err_b - 0.03
    # where the target does not differ, styled pairs that agree with the calibration set leave the map alone
    same = fit_site_calibration(cal, _cases(60, 3), ["regressor"])
    assert np.allclose(same.estimate(target)["estimate"], e_before["estimate"], atol=0.03)
    assert after.n_styled == 60 and before.n_styled == 0


def test_intervals_widen_with_distance_and_say_so() -> None:
    cal = _cases(80, 0)
    site = fit_site_calibration(cal, None, ["regressor"])
    near, far = _cases(40, 5), _cases(40, 5, feat_shift=8.0)  # same signals, features far from every calibrated case
    qn, qf = site.estimate(near), site.estimate(far)
    assert np.allclose(qn["estimate"], qf["estimate"])
    wn, wf = qn["upper"] - qn["lower"], qf["upper"] - qf["lower"]
    assert qf["beyond_calibrated"].all()
    assert qn["beyond_calibrated"].mean() < 0.5
    assert np.median(wf) > 1.5 * np.median(wn)
    assert (qf["distance"] > qn["distance"].max()).all()


def test_intervals_cover_exchangeable_cases() -> None:
    cal = _cases(150, 0, noise=0.06)
    site = fit_site_calibration(cal, None, ["regressor"], level=0.9)
    cov = heldout_errors(site, _cases(400, 9, noise=0.06))["coverage"]
    assert 0.82 <= cov <= 0.99


def test_choose_rule_keeps_the_simpler_rule_on_a_tie_and_takes_a_signal_that_helps() -> None:
    folds = [(_cases(50, s), _cases(50, s + 10), _cases(50, s + 20)) for s in range(3)]
    # confidence is the regressor plus noise: it adds nothing, so the single-signal rule is kept
    plain = choose_rule(folds, rules=[("regressor",), ("regressor", "confidence")], tie=0.005)
    assert plain["rule"] == ["regressor"]
    assert plain["shape"] == "linear"  # a straight relation: the monotone map gains nothing, the line is kept
    assert set(plain["scores"]) == {
        "regressor",
        "regressor+confidence",
        "regressor/isotonic",
        "regressor+confidence/isotonic",
    }

    def informative(c: CaseSignals, seed: int) -> CaseSignals:
        # here the real Dice also depends on 'rca', which only the stacked rule sees
        rng = np.random.default_rng(seed)
        rca = rng.uniform(0, 1, len(c))
        real = np.clip(np.asarray(c.real) - 0.3 * (rca - 0.5), 0, 1)
        return CaseSignals({**c.signals, "rca": rca}, c.features, real, c.groups)

    folds2 = [tuple(informative(c, 100 * s + j) for j, c in enumerate(f)) for s, f in enumerate(folds)]
    both = choose_rule(folds2, rules=[("regressor",), ("regressor", "rca")])  # type: ignore[arg-type]
    assert both["rule"] == ["regressor", "rca"]


def _piled_up(n: int, seed: int) -> CaseSignals:
    """Cases whose real Dice piles up at 0 and near 0.9 (a steep step in the regressor's score, as on BUSI where
    a third of the lesions are missed): a straight line pulls both ends toward the mean."""
    rng = np.random.default_rng(seed)
    reg = rng.uniform(0, 1, n)
    real = np.clip(0.9 / (1 + np.exp(-(reg - 0.5) * 30)) + rng.normal(0, 0.03, n), 0, 1)
    return CaseSignals(
        {"regressor": reg, "confidence": rng.uniform(0, 1, n)}, rng.normal(0, 1, (n, 3)), real, np.arange(n)
    )


def test_a_monotone_map_is_chosen_where_dice_piles_up_and_travels_as_plain_numbers() -> None:
    folds = [(_piled_up(60, s), _piled_up(60, s + 10), _piled_up(60, s + 20)) for s in range(3)]
    choice = choose_rule(folds, rules=[("regressor",)])
    line, mono = choice["scores"]["regressor"], choice["scores"]["regressor/isotonic"]
    assert choice["rule"] == ["regressor"] and choice["shape"] == "isotonic"
    assert mono["mae"] < line["mae"] - 0.03
    site = fit_site_calibration(_piled_up(120, 0), None, ["regressor"], shape="isotonic")
    target = _piled_up(200, 7)
    est = site.estimate(target)["estimate"]
    assert est.min() < 0.1 and est.max() > 0.8  # both piles reached, not pulled toward the mean
    assert np.all(np.diff(est[np.argsort(target.signals["regressor"])]) >= -1e-12)  # monotone in the score
    again = SiteCalibration.from_dict(site.to_dict())
    assert again.shape == "isotonic" and np.allclose(again.estimate(target)["estimate"], est)
    old = {k: v for k, v in site.to_dict().items() if k not in ("shape", "knots_x", "knots_y")}
    assert SiteCalibration.from_dict(old).shape == "linear"  # a calibration saved before the shape: a line
    with pytest.raises(ValueError, match="shape must be one of"):
        fit_site_calibration(_piled_up(60, 0), None, ["regressor"], shape="spline")
    for bad in ({"shape": "spline"}, {"knots_x": [], "knots_y": []}, {"knots_y": [0.5]}):  # e.g. a file from elsewhere
        with pytest.raises(ValueError, match="not one this version reads"):
            SiteCalibration.from_dict({**site.to_dict(), **bad})


def test_calibration_round_trips_through_plain_numbers() -> None:
    site = fit_site_calibration(_cases(60, 0), _cases(60, 1, offset=-0.1), ["regressor", "confidence"])
    again = SiteCalibration.from_dict(site.to_dict())
    target = _cases(30, 4, feat_shift=2.0)
    a, b = site.estimate(target), again.estimate(target)
    for k in ("estimate", "lower", "upper", "distance"):
        assert np.allclose(a[k], b[k])


def test_case_distances_leave_the_own_group_out() -> None:
    x = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    d = case_distances(x, x, np.arange(3), np.arange(3))
    assert d[0] > 0 and d[2] > d[0]
    assert np.allclose(case_distances(x, x), 0.0)


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="unknown per-case signal"):
        CaseSignals({"vibes": np.zeros(3)}, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="real Dice"):
        fit_site_calibration(CaseSignals({"regressor": np.zeros(20)}, np.zeros((20, 2))), None, ["regressor"])
    with pytest.raises(ValueError, match="do not have"):
        fit_site_calibration(_cases(30, 0), None, ["regressor", "rca"])


def test_rows_and_the_set_estimate_agree_or_say_so() -> None:
    ok = rows_vs_set([0.80, 0.84, 0.82], 0.83, 0.78, 0.88)
    assert ok is not None and not ok["disagree"] and ok["note"] is None
    assert ok["mean_case_estimate"] == pytest.approx(0.82)
    off = rows_vs_set([0.60, 0.62, None], 0.83, 0.78, 0.88)
    assert off is not None and off["disagree"]
    assert "differs from the set estimate" in off["note"]
    assert rows_vs_set([], 0.8, 0.7, 0.9) is None
    assert rows_vs_set([0.8], None, None, None) is None


def _row(i: int, site: bool, signals: str = "regressor+confidence") -> dict:
    from spe_lightning.percase.scorer import CaseRow

    extra = {"distance": 0.5 + i, "beyond_calibrated": i > 0, "signals": signals} if site else {}
    return CaseRow(f"c{i}", 0.6, 0.6, 0.4, 0.8, True, False, 10, 0.9, -1, **extra).to_dict()


def test_site_rows_reach_cases_csv_and_the_html_report(tmp_path) -> None:
    from spe_lightning.cli.estimate.outputs import cases_csv
    from spe_lightning.reporting.html import write_html_report

    plain = cases_csv([_row(0, False)], ["a.png"]).splitlines()[0].split(",")
    assert "distance" not in plain and "signals" not in plain  # a row without a site calibration: columns as before
    head, first, second = cases_csv([_row(0, True), _row(1, True)], ["a.png", "b.png"]).splitlines()
    cols = head.split(",")
    assert cols[-3:] == ["distance", "beyond_calibrated", "signals"]
    assert second.split(",")[cols.index("beyond_calibrated")] == "True"
    agreement = rows_vs_set([0.6, 0.6], 0.85, 0.8, 0.9)
    summary = {"level": 0.9, "estimates": {"dice": {"value": 0.85, "lower": 0.8, "upper": 0.9}}}
    page = write_html_report(
        tmp_path / "r.html",
        {**summary, "case_agreement": agreement},
        [_row(0, True), _row(1, True)],
        calibration={"threshold": 0.7},
    ).read_text()
    assert "regressor+confidence" in page and "beyond calibrated" in page
    assert "They disagree by more than SPE's interval" in page and "carries SPE's uncertainty" not in page
    widened = {**agreement, "case_intervals_widened": {"below": 0.25, "above": 0.05}}
    page = write_html_report(tmp_path / "w.html", {**summary, "case_agreement": widened}, [_row(0, True)]).read_text()
    assert "carries SPE's uncertainty" in page and "0.250 below" in page
    calm = rows_vs_set([0.84, 0.86], 0.85, 0.8, 0.9)
    page = write_html_report(tmp_path / "s.html", {**summary, "case_agreement": calm}, [_row(0, True)]).read_text()
    assert "They disagree" not in page and "beside SPE's" in page
    assert "monotone map" not in page
    mono = [_row(0, True, "regressor+confidence/isotonic")]  # rows of a map through isotonic regression
    page = write_html_report(tmp_path / "m.html", {**summary, "case_agreement": calm}, mono).read_text()
    assert "<b>regressor+confidence</b> through a monotone map" in page


def test_the_product_rule_covers_where_the_pairs_imitate_the_site_imperfectly() -> None:
    # the map moved by 0.14 at the site, but its styled pairs (an imperfect imitation) show only 0.10 of it
    cal, styled, site = _cases(80, 0), _cases(80, 1, offset=-0.10), _cases(200, 2, offset=-0.14)
    old = fit_site_calibration(cal, styled, ["regressor"])  # the stop-8 rule: interval "heldout", factor 1
    new = fit_site_calibration(cal, styled, ["regressor"], interval=INTERVAL_RULE, width_factor=WIDTH_FACTOR)
    corr = fit_site_calibration(cal, styled, ["regressor"], interval="correction")
    q_old, q_new = old.estimate(site), new.estimate(site)
    assert np.allclose(q_old["estimate"], q_new["estimate"])  # the same map: only the intervals differ
    assert np.allclose(corr.estimate(site)["estimate"], q_old["estimate"])
    cov_old, cov_new = heldout_errors(old, site)["coverage"], heldout_errors(new, site)["coverage"]
    cov_corr = heldout_errors(corr, site)["coverage"]
    assert cov_old < 0.7 and cov_new >= 0.8 and cov_corr >= cov_old + 0.15
    # where the pairs and the calibration cases agree there was nothing to correct: "correction" hardly widens
    calm = _cases(80, 3)
    w_old = heldout_errors(fit_site_calibration(cal, calm, ["regressor"]), site)["median_width"]
    w_new = heldout_errors(fit_site_calibration(cal, calm, ["regressor"], interval="correction"), site)["median_width"]
    assert w_new <= 1.3 * w_old
    # without styled pairs the two rules are the same
    a = fit_site_calibration(cal, None, ["regressor"], interval="correction")
    assert a.bin_quantiles == fit_site_calibration(cal, None, ["regressor"]).bin_quantiles


def test_width_factor_scales_half_widths_and_leaves_estimates_and_flags_alone() -> None:
    cal, target = _cases(80, 0), _cases(40, 5, feat_shift=3.0)
    one = fit_site_calibration(cal, None, ["regressor"])
    two = fit_site_calibration(cal, None, ["regressor"], width_factor=2.0)
    q1, q2 = one.estimate(target), two.estimate(target)
    assert np.array_equal(q1["estimate"], q2["estimate"])
    assert np.array_equal(q1["beyond_calibrated"], q2["beyond_calibrated"]) and q1["beyond_calibrated"].any()
    inside = (q2["lower"] > 0) & (q2["upper"] < 1)  # not clipped: exactly twice the half-width
    assert inside.any()
    assert np.allclose((q2["upper"] - q2["estimate"])[inside], 2 * (q1["upper"] - q1["estimate"])[inside])
    with pytest.raises(ValueError, match="width_factor"):
        fit_site_calibration(cal, None, ["regressor"], width_factor=0.0)
    with pytest.raises(ValueError, match="interval must be one of"):
        fit_site_calibration(cal, None, ["regressor"], interval="wider")


def test_fit_width_factor_widens_only_where_heldout_folds_need_it() -> None:
    exchangeable = [(_cases(60, s), _cases(60, s + 10), _cases(60, s + 20)) for s in range(3)]
    fit = fit_width_factor(exchangeable, ["regressor"])
    assert fit["reached"] and fit["factor"] <= 1.25
    # imperfect imitation: the held-out site moved further than its styled pairs show
    off = [(_cases(60, s), _cases(60, s + 10, offset=-0.04), _cases(60, s + 20, offset=-0.12)) for s in range(3)]
    wide = fit_width_factor(off, ["regressor"])
    assert wide["reached"] and wide["factor"] > 1.5
    assert wide["scores"][f"{wide['factor']:g}"]["coverage"] >= 0.9 > wide["scores"]["1"]["coverage"]


def test_new_fields_round_trip_and_an_old_saved_calibration_keeps_the_old_rule() -> None:
    site = fit_site_calibration(
        _cases(60, 0), _cases(60, 1, offset=-0.1), ["regressor"], interval="correction", width_factor=1.5
    )
    d = site.to_dict()
    assert d["interval"] == "correction" and d["width_factor"] == 1.5
    again = SiteCalibration.from_dict(d)
    assert again.interval == "correction" and again.width_factor == 1.5
    target = _cases(30, 4)
    assert np.allclose(site.estimate(target)["upper"], again.estimate(target)["upper"])
    # a calibration saved before these fields existed: the stop-8 rule (held-out residuals, factor 1)
    old = {k: v for k, v in d.items() if k not in ("interval", "width_factor")}
    legacy = SiteCalibration.from_dict(old)
    assert legacy.interval == "heldout" and legacy.width_factor == 1.0
    plain = SiteCalibration.from_dict({**old, "width_factor": 1.0})
    assert np.allclose(legacy.estimate(target)["upper"], plain.estimate(target)["upper"])
