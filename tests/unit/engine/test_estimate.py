"""The one estimate function: anchored estimates, the interval model, G over records."""

from __future__ import annotations

import pytest

from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model


def test_interval_model_scales_with_the_move_and_leaves_a_family_out():
    from spe_lightning.engine.mapping import MetricMapping

    g = MetricMapping.fit("linear", [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])  # G(p) = p + 0.1, slope 1
    pairs = [
        {"name": f"subset{i}", "d_pseudo": {"dice": d}, "d_real": {"dice": d}}
        for i, d in enumerate((-0.02, -0.01, 0.0, 0.01, 0.02, 0.03))
    ]
    pairs.append({"name": "noise_3", "d_pseudo": {"dice": -0.2}, "d_real": {"dice": -0.4}})  # G misses it by 0.2
    with_noise = fit_interval_model(pairs, "dice", g, 0.8, rule="proportional")
    without = fit_interval_model(pairs, "dice", g, 0.8, exclude="noise_", rule="proportional")
    assert without["scores"] == pytest.approx([0.0] * 6) and max(with_noise["scores"]) == pytest.approx(0.2 / 0.21)
    assert fit_interval_model(pairs[:3], "dice", g, 0.8) is None  # too few pairs
    with pytest.raises(ValueError, match="rule must be one of"):
        fit_interval_model(pairs, "dice", g, 0.8, rule="wide")
    # value: calibration score moved by G(p_t) - G(p_c); the half-width grows with that move
    near = anchored_estimate(g, "dice", 0.79, 0.80, 0.90, 0.9, with_noise)
    far = anchored_estimate(g, "dice", 0.60, 0.80, 0.90, 0.9, with_noise)
    assert near["value"] == pytest.approx(0.89) and far["value"] == pytest.approx(0.70)
    assert far["upper"] - far["lower"] > 5 * (near["upper"] - near["lower"]) > 0
    clipped = anchored_estimate(g, "dice", 1.0, 0.5, 0.95)
    assert clipped["value"] == 1.0 and clipped["upper"] == 1.0  # Dice stays in [0, 1]
    assert anchored_estimate(g, "dice", None, 0.5, 0.9) == {"value": None, "lower": None, "upper": None}


def _pairs(moves_and_misses):
    """Pairs whose anchored prediction (G has slope 1) is ``move`` and whose real difference misses it by ``miss``."""
    return [
        {"name": f"p{i}", "d_pseudo": {"dice": mv}, "d_real": {"dice": mv - ms}}
        for i, (mv, ms) in enumerate(moves_and_misses)
    ]


def test_fitted_interval_scale_follows_how_the_misses_grow():
    from spe_lightning.engine.mapping import MetricMapping

    g = MetricMapping.fit("linear", [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])  # slope 1
    # misses that grow with the move: a positive slope, a wider interval far from the calibration score
    growing = fit_interval_model(
        _pairs([(-0.02, 0.002), (-0.05, 0.005), (-0.1, 0.01), (-0.2, 0.02), (-0.3, 0.03), (0.05, 0.006)]),
        "dice",
        g,
        0.8,
        move="g",  # the scale alone (the pairs' slope would absorb these proportional misses)
    )
    assert growing["slope"] > 0 and growing["s0"] == pytest.approx(0.01 * growing["slope"])  # intercept at the floor
    near = anchored_estimate(g, "dice", 0.79, 0.80, 0.90, 0.9, growing)
    far = anchored_estimate(g, "dice", 0.50, 0.80, 0.90, 0.9, growing)
    assert far["upper"] - far["lower"] > 5 * (near["upper"] - near["lower"])
    # a reverse step blind to some shifts (a 0.1 drop seen as 0.01) but exact on a large move: the misses do
    # not grow with the move, so the width is the same near and far (the proportional rule gives [0, 1] far away)
    blind_pairs = _pairs([(-0.01, -0.09), (0.0, -0.06), (-0.2, 0.01), (-0.02, 0.01), (0.01, 0.005), (-0.05, 0.0)])
    blind = fit_interval_model(blind_pairs, "dice", g, 0.8, move="g", quantile="conformal")
    assert blind["slope"] == 0.0
    near = anchored_estimate(g, "dice", 0.79, 0.80, 0.90, 0.9, blind)
    far = anchored_estimate(g, "dice", 0.55, 0.80, 0.90, 0.9, blind)
    assert far["upper"] - far["lower"] == pytest.approx(near["upper"] - near["lower"]) == pytest.approx(0.18)
    prop = anchored_estimate(
        g, "dice", 0.55, 0.80, 0.90, 0.9, fit_interval_model(blind_pairs, "dice", g, 0.8, rule="proportional", move="g")
    )
    assert prop["upper"] - prop["lower"] > 0.9
    # estimators saved before the fitted rule hold no slope: the proportional scale
    legacy = {"s0": 0.01, "scores": [1.0] * 6}
    assert anchored_estimate(g, "dice", 0.70, 0.80, 0.90, 0.9, legacy)["lower"] == pytest.approx(0.8 - 0.11)


def _records(pc, rc, pt):
    return [
        {"pseudo": {"calibration": {"dice": a}, "t": {"dice": c}}, "real": {"calibration": {"dice": b}}}
        for a, b, c in zip(pc, rc, pt)
    ]


def test_fit_and_estimate_anchors_on_the_calibration_score_of_each_record():
    from spe_lightning.engine.records import fit_and_estimate

    recs = _records([0.3, 0.5, 0.7, 0.8], [0.45, 0.55, 0.8, 0.9], [0.3, 0.5, 0.6, 0.7])
    paper = fit_and_estimate(recs, ["t"], ["dice"], anchored=False)["estimates"]["t"]["dice"]
    out = fit_and_estimate(recs, ["t"], ["dice"])
    est = out["estimates"]["t"]["dice"]
    g_t, g_c = (
        paper["value"],
        fit_and_estimate(recs, ["calibration"], ["dice"], anchored=False)["estimates"]["calibration"]["dice"]["value"],
    )
    assert paper["method"] == "paper" and est["method"] == "anchored"
    assert est["value"] == pytest.approx(0.9 + g_t - g_c) and est["paper"]["value"] == pytest.approx(paper["value"])
    assert out["anchor_intervals"]["dice"] is None  # no pairs: G's residual interval
    series = out["by_checkpoint"]["t"]["dice"]
    assert series[0] == pytest.approx(0.45) and series[1] == pytest.approx(0.55)  # same pseudo: calibration score
    pairs = [
        {"name": f"s{i}", "d_pseudo": {"dice": d}, "d_real": {"dice": 0.9 * d}}
        for i, d in enumerate((-0.2, -0.1, -0.05, 0.0, 0.1))
    ]
    with_pairs = fit_and_estimate(recs, ["t"], ["dice"], pairs=pairs)
    model = with_pairs["anchor_intervals"]["dice"]
    w, k = model["move"]["weight"], model["move"]["pairs_slope"]
    assert model["scores"] and k == pytest.approx(0.9)  # the pairs' real differences are 0.9 x the pseudo ones
    # the value: the calibration score moved by G's move and the pairs' slope, as weighted on held-out families
    assert with_pairs["estimates"]["t"]["dice"]["value"] == pytest.approx(
        0.9 + w * (g_t - g_c) + (1 - w) * k * (0.7 - 0.8)
    )


def test_the_move_follows_the_pairs_when_they_disagree_with_g_on_held_out_families():
    from spe_lightning.engine.mapping import MetricMapping

    g = MetricMapping.fit("linear", [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])  # slope 1 across checkpoints
    # under shifts the real Dice falls twice as fast as the pseudo Dice, in every family
    steep = [
        {"name": f"{fam}_2", "d_pseudo": {"dice": dp}, "d_real": {"dice": 2 * dp}}
        for fam, dp in (("noise", -0.05), ("gamma", -0.02), ("blur", -0.08), ("contrast", -0.03), ("bias_field", -0.1))
    ] + [{"name": "subset9_0", "d_pseudo": {"dice": 0.01}, "d_real": {"dice": 0.02}}]
    model = fit_interval_model(steep, "dice", g, 0.8)
    assert model["move"]["weight"] == 0.0 and model["move"]["pairs_slope"] == pytest.approx(2.0)
    est = anchored_estimate(g, "dice", 0.7, 0.8, 0.9, 0.9, model)
    assert est["value"] == pytest.approx(0.9 - 0.2)  # the pairs' slope, not G's (0.8)
    assert max(model["scores"]) == pytest.approx(0.0, abs=1e-9)  # held-out families predicted exactly
    assert fit_interval_model(steep, "dice", g, 0.8, move="g")["move"]["weight"] == 1.0
    # pairs that agree with G keep G (ties keep G)
    agree = [{**p, "d_real": {"dice": p["d_pseudo"]["dice"]}} for p in steep]
    assert fit_interval_model(agree, "dice", g, 0.8)["move"]["weight"] == 1.0
    # a model saved before the move rule existed: G's move
    legacy = {"s0": 0.01, "slope": 0.0, "scores": [0.01] * 6}
    assert anchored_estimate(g, "dice", 0.7, 0.8, 0.9, 0.9, legacy)["value"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="move must be one of"):
        fit_interval_model(steep, "dice", g, 0.8, move="pairs")
