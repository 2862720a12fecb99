"""Intervals that know when they extrapolate, and metrics SPE cannot follow (issue 23 items 5-6)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spe_lightning.engine.cached_set import cache_dataset
from spe_lightning.engine.distance import (
    FEATURES,
    NEAREST_SET_LIMIT,
    diagonal,
    image_features,
    nearest_set_distance,
    set_distance,
)
from spe_lightning.engine.estimate import anchored_estimate, estimate, fit_interval_model
from spe_lightning.engine.interval_model import half_width
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.records import fit_and_estimate
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.shifts import shift_set, subset
from spe_lightning.reporting.report import by_checkpoint_scalars, report_scalars, summary_table
from spe_lightning.testing import Blobs

G = MetricMapping.fit("linear", [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])  # G(p) = p + 0.1


def _tracked_pairs(distances=None, n=8, noise=0.01, seed=0):
    """Pairs whose real difference follows G's move up to ``noise`` (SPE tracks the metric)."""
    rng = np.random.default_rng(seed)
    moves = np.linspace(-0.3, 0.05, n)
    pairs = []
    for i, mv in enumerate(moves):
        p = {"name": f"fam{i}_2", "d_pseudo": {"dice": float(mv)}, "d_real": {"dice": float(mv + rng.normal(0, noise))}}
        if distances is not None:
            p["distance"] = distances[i]
        pairs.append(p)
    return pairs


def _sets():
    cal = cache_dataset("calibration", Blobs(12, seed=2), working_size=32, require_masks=True)
    return cal, cache_dataset("t", Blobs(10, seed=3), working_size=32)


def _features(data):
    masks = [m.bool() for m in data.masks] if data.masks else [torch.zeros(1, 32, 32, dtype=torch.bool)] * len(data)
    return image_features(data, masks, torch.full((len(data),), 0.9))


def test_distance_grows_with_the_shift_and_never_matches_an_item_with_its_own_original():
    cal, same = _sets()
    fc = _features(cal)
    assert fc.shape == (len(cal), len(FEATURES)) and np.isfinite(fc).all()
    ids = list(cal.indices)
    near = set_distance(_features(same), fc)  # new images of the same kind: about the calibration's own spread
    sub = subset(cal, range(6), "subset6_0")
    own = set_distance(_features(sub), fc, list(sub.indices), ids)
    noisy = set_distance(_features(shift_set(cal, "noise", 3)), fc, ids, ids)
    assert 0.3 < near < 3 and 0.3 < own < 3
    assert noisy > 3 * max(near, own)  # a noise shift is far from the calibration images
    # without the exclusion a subset would match itself (distance 0)
    assert set_distance(_features(sub), fc) == pytest.approx(0.0)
    assert set_distance(fc[:0], fc) is None and set_distance(fc, fc[:2]) is None
    assert diagonal(cal) == pytest.approx(32 * 2**0.5)


def test_a_target_beyond_the_pairs_reach_gets_a_wider_interval_and_the_flag():
    model = fit_interval_model(_tracked_pairs(distances=[1.0, 1.2, 2.0, 3.0, 1.1, 0.9, 1.5, 2.5]), "dice", G, 0.8)
    assert model["distance"] == 3.0 and model["reliability"]["reliable"]
    inside = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, distance=2.0)
    outside = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, distance=6.0)
    assert inside["outside_calibrated_range"] is False and outside["outside_calibrated_range"] is True
    assert inside["value"] == outside["value"]
    w_in, w_out = inside["upper"] - inside["lower"], outside["upper"] - outside["lower"]
    assert w_out == pytest.approx(2 * w_in, rel=1e-6)  # twice as far as the farthest pair: twice as wide
    # pairs without distances (older runs): no flag, no widening
    old = fit_interval_model(_tracked_pairs(), "dice", G, 0.8)
    unknown = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, old, distance=6.0)
    assert unknown["outside_calibrated_range"] is None and unknown["upper"] - unknown["lower"] == pytest.approx(w_in)


def test_a_feature_constant_on_the_calibration_set_does_not_blow_the_distance_up():
    rng = np.random.default_rng(0)
    cal = rng.normal(0.5, 0.05, (20, len(FEATURES)))
    cal[:, 0] = 0.0  # the 10th percentile of zero-padded images: 0 on every calibration image
    near = cal[:5] + rng.normal(0, 0.01, (5, len(FEATURES)))
    near[:, 0] = 0.02  # a little blur at the padding's edge
    d = set_distance(near, cal)
    assert d is not None and d < 100  # 9595.6 before the floor: the constant feature was divided by 1e-6
    assert set_distance(cal[:5] + 0.3, cal) > d  # a real difference still counts


def test_nearest_set_distance_finds_the_pair_a_target_looks_like_whatever_the_farthest_pair():
    cal, same = _sets()
    fc, ids = _features(cal), list(cal.indices)
    blur = _features(shift_set(cal, "blur", 3))
    noise = _features(shift_set(cal, "noise", 3))
    blurred_target = _features(shift_set(same, "blur", 3))  # new images, shifted as one of the pairs
    gamma_target = _features(shift_set(same, "gamma", 3))  # new images, shifted as no pair is
    # by its distance to the calibration set alone the blurred target is well within the noise pair's reach
    assert set_distance(blurred_target, fc) < set_distance(noise, fc, ids, ids)
    pairs = {"blur_3": blur, "noise_3": noise}
    like_a_pair = nearest_set_distance(blurred_target, fc, pairs)
    assert like_a_pair < set_distance(blurred_target, fc)  # the blur pair is nearer than the calibration set
    assert like_a_pair <= NEAREST_SET_LIMIT
    assert set_distance(gamma_target, fc) < set_distance(noise, fc, ids, ids)  # within the farthest reach
    unlike = nearest_set_distance(gamma_target, fc, pairs)
    assert unlike > NEAREST_SET_LIMIT  # like neither the calibration set nor any pair
    assert nearest_set_distance(_features(same), fc, pairs) <= NEAREST_SET_LIMIT  # new images of the same kind
    assert nearest_set_distance(fc[:0], fc, pairs) is None


def test_a_target_like_no_calibrated_set_is_flagged_without_widening():
    model = fit_interval_model(_tracked_pairs(distances=[1.0, 1.2, 2.0, 3.0, 1.1, 0.9, 1.5, 60.0]), "dice", G, 0.8)
    base = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, distance=2.0)
    like = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, distance=2.0, nearest=1.2)
    unlike = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, distance=2.0, nearest=2.5)
    assert base["outside_calibrated_range"] is False and "nearest_set_distance" not in base
    assert like["outside_calibrated_range"] is False and like["nearest_set_distance"] == 1.2
    assert unlike["outside_calibrated_range"] is True  # within the farthest pair's reach, yet like none of them
    assert (unlike["lower"], unlike["upper"]) == (base["lower"], base["upper"])  # flagged, not widened
    beyond = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, distance=120.0, nearest=0.5)
    assert beyond["outside_calibrated_range"] is True  # beyond every pair: widened and flagged, as before
    assert beyond["upper"] - beyond["lower"] > base["upper"] - base["lower"]
    e = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), distance=2.0, nearest=2.5)
    assert e.outside_calibrated_range and not e.widened_by_distance and e.nearest_set_distance == 2.5
    assert e.range_note == "outside the calibrated range: unlike every calibrated set, interval not widened"
    assert Estimate.from_dict(e.to_dict()) == e
    wide = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), distance=120.0)
    assert wide.widened_by_distance and wide.range_note == "outside the calibrated range: interval widened"
    assert "nearest_set_distance" not in wide.to_dict()  # not measured: not written
    inside = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), distance=2.0, nearest=1.0)
    assert inside.range_note is None
    assert "looks like none of the calibrated sets" in summary_table({"estimates": {"site": {"dice": e.to_dict()}}})


def test_a_set_smaller_than_every_pairs_set_gets_a_wider_interval_and_the_flag():
    sized = [{**p, "n": n} for p, n in zip(_tracked_pairs(), [24, 24, 40, 40, 40, 40, 40, 40])]
    model = fit_interval_model(sized, "dice", G, 0.8)
    assert model["n_images"] == 24  # the fewest images of a pair's set
    same = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, n_images=24)
    small = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, n_images=6)
    assert same["outside_calibrated_range"] is False and small["outside_calibrated_range"] is True
    assert small["value"] == same["value"]
    assert small["upper"] - small["lower"] == pytest.approx(2 * (same["upper"] - same["lower"]), rel=1e-6)  # sqrt(24/6)
    larger = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, n_images=200)  # more images: as calibrated
    assert (larger["lower"], larger["upper"]) == (same["lower"], same["upper"])
    e = estimate(G, "dice", 0.7, anchor=(0.8, 0.9, model), n_images=6)
    assert e.widened_by_size and e.n_images == 6 and e.pairs_n_images == 24
    assert (
        e.range_note == "outside the calibrated range: 6 images, fewer than the calibrated sets' 24; interval widened"
    )
    assert Estimate.from_dict(e.to_dict()) == e
    notes = summary_table({"estimates": {"chunk": {"dice": e.to_dict()}}})
    assert "chunk: outside the calibrated range: 6 images, fewer than the 24 of the smallest calibrated set" in notes
    # pairs without sizes (older runs and files): no rule
    unknown = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, fit_interval_model(_tracked_pairs(), "dice", G, 0.8),
                                n_images=2)  # fmt: skip
    assert unknown["outside_calibrated_range"] is None and "n_images" not in unknown


def test_hd95_estimates_and_interval_ends_stay_within_the_image_diagonal():
    g = MetricMapping.fit("linear", [1.0, 2.0, 3.0, 4.0], [10.0, 60.0, 110.0, 160.0], bounds=(0.0, None))
    pairs = [
        {"name": f"f{i}_2", "d_pseudo": {"hd95": d}, "d_real": {"hd95": 50 * d + (-1) ** i * 20}}
        for i, d in enumerate((0.5, 1.0, 1.5, 2.0, -0.5, 3.0))
    ]
    diag = 64 * 2**0.5
    model = fit_interval_model(pairs, "hd95", g, 2.0, bounds=(0.0, diag))
    e = estimate(g, "hd95", 5.0, 0.9, anchor=(2.0, 60.0, model), bounds=(0.0, diag))
    said = e if e["value"] is not None else e["withheld"]
    assert 0.0 <= said["lower"] <= said["value"] <= said["upper"] <= diag
    assert e["paper"]["upper"] <= diag if "paper" in e else True
    # and through fit_and_estimate with the run's bounds
    records = [
        {"pseudo": {"calibration": {"hd95": p}, "t": {"hd95": p + 3}}, "real": {"calibration": {"hd95": r}}}
        for p, r in zip([1.0, 2.0, 3.0, 4.0], [10.0, 60.0, 110.0, 160.0])
    ]
    out = fit_and_estimate(records, ["t"], ["hd95"], pairs=pairs, bounds={"hd95": (0.0, diag)})
    est = out["estimates"]["t"]["hd95"]
    said = est if est["value"] is not None else est["withheld"]
    assert said["upper"] <= diag and said["value"] <= diag
    assert all(v is None or v <= diag for v in out["by_checkpoint"]["t"]["hd95"])


def test_a_metric_the_pairs_show_spe_does_not_track_is_unreliable():
    # the reverse step sees the same drop where the real metric falls, rises or stays: no rule fitted on some
    # families predicts another better than keeping the calibration score
    moves = [(-0.2, -0.2), (-0.2, 0.15), (-0.15, 0.0), (-0.1, 0.0), (0.1, 0.0)]
    untracked = [
        {"name": f"f{i}_{k}", "d_pseudo": {"dice": dp}, "d_real": {"dice": dr}}
        for i, (dp, dr) in enumerate(moves)
        for k in (1, 2)
    ]
    model = fit_interval_model(untracked, "dice", G, 0.8)
    assert model["reliability"]["reliable"] is False
    assert model["reliability"]["held_out_mae"] > model["reliability"]["no_move_mae"]
    e = estimate(G, "dice", 0.6, 0.9, anchor=(0.8, 0.9, model))
    assert e["value"] is None and e["reliable"] is False and e["reason"].startswith("unreliable: ")
    assert "does not track dice" in e["reason"] and e["withheld"]["value"] is not None
    tracked = fit_interval_model(_tracked_pairs(), "dice", G, 0.8)
    assert tracked["reliability"]["reliable"] is True
    assert estimate(G, "dice", 0.6, 0.9, anchor=(0.8, 0.9, tracked))["value"] is not None


def test_an_interval_wider_than_a_quarter_of_the_range_is_unreliable():
    # tracked on average but with misses of +-0.3: the half-width at the median move is far above 0.25
    wild = [
        {"name": f"f{i}_2", "d_pseudo": {"dice": mv}, "d_real": {"dice": mv + (0.3 if i % 2 else -0.3)}}
        for i, mv in enumerate((-0.9, -0.8, -0.7, -0.6, -0.5, -0.4, -0.7, -0.8))
    ]
    model = fit_interval_model(wild, "dice", G, 0.95)
    assert model["reliability"]["reliable"] is False and "interval half-width" in model["reliability"]["reason"]


def test_the_interval_spans_candidate_moves_that_disagree():
    # the pairs say the real metric falls twice as fast as G says: the held-out choice moves with them
    pairs = [
        {"name": f"fam{i}_2", "d_pseudo": {"dice": mv}, "d_real": {"dice": 2 * mv}}
        for i, mv in enumerate((-0.01, -0.02, -0.03, -0.05, -0.08, 0.01, -0.04, -0.06))
    ]
    model = fit_interval_model(pairs, "dice", G, 0.8)
    assert model["move"]["weight"] == 0.0 and model["move"]["pairs_slope"] == pytest.approx(2.0)
    e = anchored_estimate(G, "dice", 0.6, 0.8, 0.9, 0.9, model)
    assert e["value"] == pytest.approx(0.5)  # the pairs' slope: 0.9 + 2 * (-0.2)
    g_move, paper = 0.9 + (-0.2), G.predict([0.6])[0]
    assert e["lower"] <= 0.5 and e["upper"] >= max(g_move, paper)  # G's answer (0.7) inside too
    narrow = anchored_estimate(G, "dice", 0.6, 0.8, 0.9, 0.9, model, span=False)
    assert narrow["upper"] < g_move  # without the span the interval would exclude G's move


def test_the_interval_spans_the_estimate_anchored_on_the_targets_styled_set():
    # generic pairs follow G; the target's styled pair: restyled calibration images scored 0.25 lower in real
    # Dice while the reverse step saw only -0.05: anchored there, the target is 0.9 - 0.25 + (-0.1 + 0.05) = 0.6
    pairs = _tracked_pairs(noise=0.005)
    styled = {"name": "styled_t", "target": "t", "d_pseudo": {"dice": -0.05}, "d_real": {"dice": -0.25}}
    plain = fit_interval_model(pairs, "dice", G, 0.8)
    model = fit_interval_model([*pairs, styled], "dice", G, 0.8)
    assert plain["styled"] == [] and model["styled"] == [{"d_pseudo": -0.05, "d_real": -0.25}]
    move = float(model["move"]["weight"])  # how the run moves (G here: the pairs follow G)
    e = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model)
    assert move == 1.0 and e["value"] == pytest.approx(0.8, abs=1e-6)  # the calibration anchor: 0.9 - 0.1
    assert e["styled_anchor"] == pytest.approx(0.6, abs=1e-6)
    assert e["lower"] <= 0.6 <= e["value"] <= e["upper"]  # spans both anchors
    narrow = anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, model, span=False)
    assert narrow["lower"] > 0.6 and narrow["styled_anchor"] == pytest.approx(0.6, abs=1e-6)  # reported, not spanned
    assert "styled_anchor" not in anchored_estimate(G, "dice", 0.7, 0.8, 0.9, 0.9, plain)
    est = estimate(G, "dice", 0.7, 0.9, anchor=(0.8, 0.9, model))
    assert est.styled_anchor == pytest.approx(0.6, abs=1e-6)
    assert Estimate.from_dict(est.to_dict()) == est  # written to the report and read back
    table = summary_table({"level": 0.9, "estimates": {"t": {"dice": est.to_dict()}}})
    assert "t: anchored on the calibration set restyled like it, the estimate would be dice 0.600" in table
    inside = dataclasses.replace(est, styled_anchor=0.79)  # within the interval it set no end: no note
    assert "restyled" not in summary_table({"level": 0.9, "estimates": {"t": {"dice": inside.to_dict()}}})


def test_the_t_quantile_uses_every_pair_where_the_conformal_one_is_the_worst_pair():
    pairs = _tracked_pairs(noise=0.01, seed=3)
    worse = [dict(p) for p in pairs]
    worse[0] = {**worse[0], "d_real": {"dice": worse[0]["d_real"]["dice"] - 0.05}}  # one pair missed badly
    widths = {}
    for q in ("normal", "conformal"):
        a = anchored_estimate(G, "dice", 0.75, 0.8, 0.9, 0.9, fit_interval_model(pairs, "dice", G, 0.8, quantile=q))
        b = anchored_estimate(G, "dice", 0.75, 0.8, 0.9, 0.9, fit_interval_model(worse, "dice", G, 0.8, quantile=q))
        widths[q] = (b["upper"] - b["lower"]) / (a["upper"] - a["lower"])
    assert widths["conformal"] > widths["normal"] > 1.0  # one pair moves the conformal width most
    half = {}
    for q in ("normal", "conformal", "max"):
        e = anchored_estimate(G, "dice", 0.75, 0.8, 0.9, 0.9, fit_interval_model(worse, "dice", G, 0.8, quantile=q))
        half[q] = e["upper"] - e["lower"]
    assert half["max"] == pytest.approx(max(half["normal"], half["conformal"]))  # the blind spot is not averaged away
    with pytest.raises(ValueError, match="quantile must be one of"):
        fit_interval_model(pairs, "dice", G, 0.8, quantile="median")


def _records(n=5):
    pc = np.linspace(0.5, 0.9, n)
    return [
        {
            "pseudo": {
                "calibration": {"dice": float(p)},
                "a": {"dice": float(p - 0.1)},
                "b": {"dice": float(p - 0.05)},
            },
            "real": {"calibration": {"dice": float(p + 0.05)}},
            "distance": {"a": 5.0, "b": 1.0},
            "step": i,
        }
        for i, p in enumerate(pc)
    ]


def test_by_checkpoint_last_point_is_the_final_estimate_and_styled_pairs_join_their_target_only():
    pairs = [
        {"name": f"fam{i}_2", "d_pseudo": {"dice": mv}, "d_real": {"dice": 2 * mv}, "distance": 2.0}
        for i, mv in enumerate((-0.01, -0.02, -0.03, -0.05, -0.08, 0.01, -0.04, -0.06))
    ]
    styled = [  # pairs restyled like target "a": far, and missed by more
        {
            "name": f"styled_a{i}",
            "target": "a",
            "d_pseudo": {"dice": -0.1},
            "d_real": {"dice": -0.2 - 0.05 * i},
            "distance": 6.0,
        }
        for i in range(3)
    ]
    out = fit_and_estimate(_records(), ["a", "b"], ["dice"], pairs=pairs + styled)
    for t in ("a", "b"):
        final = out["estimates"][t]["dice"]["value"]
        assert out["by_checkpoint"][t]["dice"][-1] == pytest.approx(final)  # one final number
        assert by_checkpoint_scalars(out, 4)[f"spe/estimate_by_checkpoint/{t}/dice"] == pytest.approx(final)
    assert out["anchor_intervals"]["dice"]["n_pairs"] == 8  # the generic model: no styled pairs
    by_t = out["anchor_intervals_by_target"]
    assert set(by_t) == {"a"} and by_t["a"]["dice"]["n_pairs"] == 11 and by_t["a"]["dice"]["n_target_pairs"] == 3
    # "a" (distance 5) is inside the reach of its own styled pairs (6); "b" (1) inside the generic pairs' (2)
    assert out["estimates"]["a"]["dice"]["outside_calibrated_range"] is False
    assert out["estimates"]["b"]["dice"]["outside_calibrated_range"] is False
    generic_only = fit_and_estimate(_records(), ["a"], ["dice"], pairs=pairs)
    assert generic_only["estimates"]["a"]["dice"]["outside_calibrated_range"] is True  # 5 > 2: flagged


def test_report_outputs_say_unreliable_and_outside_the_calibrated_range():
    report = {
        "level": 0.9,
        "estimates": {
            "far": {
                "dice": {
                    "value": 0.6,
                    "lower": 0.4,
                    "upper": 0.8,
                    "pseudo": 0.5,
                    "reason": None,
                    "reliable": True,
                    "outside_calibrated_range": True,
                    "distance": 4.0,
                    "pairs_distance": 2.0,
                },
                "hd95": {
                    "value": None,
                    "lower": None,
                    "upper": None,
                    "pseudo": 9.0,
                    "reason": "unreliable: x",
                    "reliable": False,
                    "unreliable": "on 8 calibration pairs ...: SPE does not track hd95 here",
                    "withheld": {"value": 180.0, "lower": 0.0, "upper": 700.0},
                },
            }
        },
    }
    table = summary_table(report)
    assert "unreliable (not tracked on the calibration pairs)" in table and "180" not in table
    assert "far: outside the calibrated range" in table
    scalars = report_scalars(report)
    assert scalars["spe/outside_calibrated_range/far"] == 1.0 and scalars["spe/reliable/far/hd95"] == 0.0
    assert "spe/final_estimate/far/hd95" not in scalars and scalars["spe/final_estimate/far/dice"] == 0.6


def test_the_console_notes_name_the_targets_of_unreliable_metrics_and_say_why_a_cell_is_na():
    bad = {"value": None, "lower": None, "upper": None, "pseudo": 9.0, "reason": "unreliable: x", "reliable": False}
    na = {"value": None, "lower": None, "upper": None, "pseudo": None,
          "reason": "no mapping G: 2 finite pairs across checkpoints, needs at least 3"}  # fmt: skip
    ok = {"value": 0.8, "lower": 0.7, "upper": 0.9, "pseudo": 0.7, "reason": None}
    report = {
        "level": 0.9,
        "estimates": {
            "site_a": {"dice": ok, "hd95": {**bad, "unreliable": "its interval half-width 0.345 exceeds 0.25"}},
            "site_b": {"dice": na, "hd95": {**bad, "unreliable": "its interval half-width 0.353 exceeds 0.25"}},
        },
    }
    notes = summary_table(report).splitlines()
    assert "hd95 (site_a): unreliable: its interval half-width 0.345 exceeds 0.25." in notes
    assert "hd95 (site_b): unreliable: its interval half-width 0.353 exceeds 0.25." in notes
    assert "n/a (site_b dice): no mapping G: 2 finite pairs across checkpoints, needs at least 3." in notes


def test_the_estimate_cli_table_says_unreliable_and_outside_the_calibrated_range():
    from spe_lightning.cli.estimate import estimate_table

    estimates = {
        "dice": {"value": 0.7, "lower": 0.5, "upper": 0.9, "pseudo": 0.6, "reason": None,
                 "outside_calibrated_range": True},
        "hd95": {"value": None, "lower": None, "upper": None, "pseudo": 9.0, "reliable": False,
                 "reason": "unreliable: its interval half-width 300 ... exceeds 0.25 of the metric's range (90.5)"},
    }  # fmt: skip
    table = estimate_table({k: Estimate.from_dict(e) for k, e in estimates.items()}, 0.9, None)
    dice, hd95 = (line for line in table.splitlines() if line.startswith(("| dice", "| hd95")))
    assert "outside the calibrated range" in dice and "0.700" in dice
    assert "unreliable: its interval half-width" in hd95 and "n/a" in hd95
    widened = Estimate(0.9, 0.62, 0.95, pseudo=0.8, styled_anchor=0.62)
    inside = Estimate(0.9, 0.62, 0.95, pseudo=0.8, styled_anchor=0.8)
    assert "interval reaches the styled anchor 0.620" in estimate_table({"dice": widened}, 0.9, None)
    assert "styled anchor" not in estimate_table({"dice": inside}, 0.9, None)


def test_reports_and_interval_models_from_before_issue_23_still_load():
    old_report = {
        "level": 0.9,
        "estimates": {"t": {"dice": {"value": 0.8, "lower": 0.7, "upper": 0.9, "pseudo": 0.7, "reason": None}}},
        "by_checkpoint": {"t": {"dice": [0.75, 0.8]}},
    }
    assert "0.800 [0.700, 0.900]" in summary_table(old_report) and "outside" not in summary_table(old_report)
    scalars = report_scalars(old_report)
    assert scalars["spe/final_estimate/t/dice"] == 0.8 and not any("reliable" in k or "outside" in k for k in scalars)
    # an interval model saved before: no quantile (conformal), no distance, no reliability
    legacy = {"s0": 0.01, "slope": 1.0, "scores": [0.5] * 8, "move": {"weight": 1.0, "pairs_slope": None}}
    e = estimate(G, "dice", 0.7, 0.9, anchor=(0.8, 0.9, legacy), distance=9.0)
    assert e["value"] == pytest.approx(0.8) and e["outside_calibrated_range"] is None and "reliable" not in e
    assert e["upper"] - e["lower"] == pytest.approx(2 * 0.5 * (0.01 + 0.1))  # the conformal order statistic


def test_the_untracked_reason_says_when_the_targets_styled_pair_is_counted():
    moves = [(-0.2, -0.2), (-0.2, 0.15), (-0.15, 0.0), (-0.1, 0.0), (0.1, 0.0)]  # as in the test above: untracked
    flat = [
        {"name": f"f{i}_{k}", "d_pseudo": {"dice": dp}, "d_real": {"dice": dr}}
        for i, (dp, dr) in enumerate(moves)
        for k in (1, 2)
    ]
    styled = {"name": "styled_t", "target": "t", "d_pseudo": {"dice": -0.15}, "d_real": {"dice": 0.1}}
    generic = fit_interval_model(flat, "dice", G, 0.8)
    with_styled = fit_interval_model([*flat, styled], "dice", G, 0.8, target="t")
    assert generic["reliability"]["reliable"] is False and with_styled["reliability"]["reliable"] is False
    assert generic["reliability"]["reason"].startswith("on 10 calibration pairs SPE's held-out error")
    assert with_styled["reliability"]["reason"].startswith("on 11 calibration pairs (the target's styled one included)")


def test_subset_pairs_scaled_to_new_images_widen_the_interval_they_set():
    rng = np.random.default_rng(3)
    subsets = [
        {"name": f"subset23_{k}", "kind": "subset", "n": 23, "d_pseudo": {"dice": float(d)},
         "d_real": {"dice": float(d + rng.normal(0, 0.004))}}
        for k, d in enumerate(rng.normal(0, 0.005, 6))
    ]  # fmt: skip
    plain = fit_interval_model(subsets, "dice", G, 0.8)
    scaled = fit_interval_model([{**p, "n_calibration": 24} for p in subsets], "dice", G, 0.8)
    # the subsets' misses are scaled as the half-size subset's (1.7 times): so is the half-width at no move
    assert half_width(scaled, 0.0, 0.9) > 1.5 * half_width(plain, 0.0, 0.9)
