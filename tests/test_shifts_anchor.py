"""Synthetic shifts, rank normalisation and the anchored estimator (G_delta on calibration pairs)."""

from __future__ import annotations

import pytest
import torch
from _shapes import make_shapes

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.calibration_pairs import calibration_sets, pairs_from_record
from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model
from spe_lightning.engine.shifts import SHIFT_FAMILIES, apply_shift, shift_set, subset
from spe_lightning.reverse import segmenter_from_text
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter, rank_normalise


def _set(n: int = 12, seed: int = 0) -> CachedSet:
    img, msk = make_shapes(n, seed=seed)
    return CachedSet("cal", list(img), list(msk.bool()), img.clone(), list(range(n)))


@pytest.mark.parametrize("family", SHIFT_FAMILIES)
def test_every_shift_changes_the_image_and_keeps_shape_range_dtype(family):
    img = _set(1).inputs[0]
    for severity in (1, 3):
        out = apply_shift(img, family, severity, seed=3)
        assert out.shape == img.shape and out.dtype == img.dtype
        assert float(out.min()) >= float(img.min()) - 1e-6 and float(out.max()) <= float(img.max()) + 1e-6
        assert float((out - img).abs().mean()) > 1e-3


def test_shift_severity_orders_noise_and_seed_is_reproducible():
    img = _set(1).inputs[0]
    errs = [float((apply_shift(img, "noise", s, seed=0) - img).abs().mean()) for s in (1, 2, 3)]
    assert errs[0] < errs[1] < errs[2]
    assert torch.equal(apply_shift(img, "noise", 2, seed=5), apply_shift(img, "noise", 2, seed=5))
    assert not torch.equal(apply_shift(img, "noise", 2, seed=5), apply_shift(img, "noise", 2, seed=6))
    with pytest.raises(ValueError, match="severity"):
        apply_shift(img, "noise", 4)
    with pytest.raises(ValueError, match="Unknown shift family"):
        apply_shift(img, "tint", 1)


def test_shift_set_and_subset_keep_masks_and_positions():
    data = _set(6)
    shifted = shift_set(data, "gamma", 2)
    assert shifted.name == "gamma_2" and shifted.masks is data.masks and shifted.gray.shape == data.gray.shape
    sub = subset(data, [4, 1], "two")
    assert sub.indices == [4, 1] and torch.equal(sub.masks[0], data.masks[4]) and len(sub) == 2


def test_rank_normalise_is_invariant_to_monotone_intensity_changes():
    x = torch.rand(3, 1, 16, 16)
    y = rank_normalise(x)
    assert torch.allclose(y, rank_normalise(x**2.5)) and torch.allclose(y, rank_normalise(0.3 * x + 0.2))
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 0.05
    # ties (zero padding) share one value
    z = torch.zeros(1, 1, 8, 8)
    z[..., 4:, :] = torch.rand(1, 1, 4, 8) + 0.1
    r = rank_normalise(z)
    assert r[..., :4, :].unique().numel() == 1


def test_rank_label_fusion_ignores_a_gamma_shift_of_the_supports():
    img, msk = make_shapes(20, seed=1)
    q, _ = make_shapes(6, seed=2)
    seg = segmenter_from_text("label_fusion:normalise=rank,size=64")
    assert isinstance(seg, LabelFusionSegmenter) and seg.normalise == "rank"
    assert torch.allclose(seg(q, img, msk), seg(q, img**3.0, msk), atol=1e-5)
    zs = LabelFusionSegmenter(size=64)
    assert not torch.allclose(zs(q, img, msk), zs(q, img**3.0, msk), atol=1e-3)
    with pytest.raises(ValueError, match="normalise"):
        LabelFusionSegmenter(normalise="minmax")
    with pytest.raises(ValueError, match="key=value"):
        segmenter_from_text("label_fusion:k")


def test_interval_model_scales_with_the_move_and_leaves_a_family_out():
    from spe_lightning.engine.mapping import MetricMapping

    g = MetricMapping.fit("linear", [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])  # G(p) = p + 0.1, slope 1
    pairs = [
        {"name": f"subset{i}", "d_pseudo": {"dice": d}, "d_real": {"dice": d}}
        for i, d in enumerate((-0.02, -0.01, 0.0, 0.01, 0.02, 0.03))
    ]
    pairs.append({"name": "noise_3", "d_pseudo": {"dice": -0.2}, "d_real": {"dice": -0.4}})  # G misses it by 0.2
    with_noise = fit_interval_model(pairs, "dice", g, 0.8)
    without = fit_interval_model(pairs, "dice", g, 0.8, exclude="noise_")
    assert without["scores"] == pytest.approx([0.0] * 6) and max(with_noise["scores"]) == pytest.approx(0.2 / 0.21)
    assert fit_interval_model(pairs[:3], "dice", g, 0.8) is None  # too few pairs
    # value: calibration score moved by G(p_t) - G(p_c); the half-width grows with that move
    near = anchored_estimate(g, "dice", 0.79, 0.80, 0.90, 0.9, with_noise)
    far = anchored_estimate(g, "dice", 0.60, 0.80, 0.90, 0.9, with_noise)
    assert near["value"] == pytest.approx(0.89) and far["value"] == pytest.approx(0.70)
    assert far["upper"] - far["lower"] > 5 * (near["upper"] - near["lower"]) > 0
    clipped = anchored_estimate(g, "dice", 1.0, 0.5, 0.95)
    assert clipped["value"] == 1.0 and clipped["upper"] == 1.0  # Dice stays in [0, 1]
    assert anchored_estimate(g, "dice", None, 0.5, 0.9) == {"value": None, "lower": None, "upper": None}


def test_calibration_pairs_measure_subsets_and_shifts_against_the_base():
    data = _set(10)

    def measure(d: CachedSet) -> dict:
        v = float(d.gray.mean())  # a stand-in for the pseudo and real metric of a set
        return {"dice": v}

    def pairs_of(seed: int) -> tuple[dict, list]:
        sets = calibration_sets(data, subset_sizes=[4, 4, 30], n_subsets=3, shifts=[("gamma", 3)], seed=seed)
        record = {"pseudo": {"base": measure(data)}, "real": {"base": {"dice": 2 * measure(data)["dice"]}}}
        for name, d in sets.items():
            record["pseudo"][name], record["real"][name] = measure(d), {"dice": 2 * measure(d)["dice"]}
        return sets, pairs_from_record(record, "base", list(sets))

    sets, pairs = pairs_of(1)
    kinds = [p["kind"] for p in pairs]
    assert kinds.count("subset") == 6 and kinds.count("shift") == 1  # sizes 4 and 9 (capped below n)
    assert sorted({len(sets[p["name"]]) for p in pairs if p["kind"] == "subset"}) == [4, 9]
    for p in pairs:
        assert p["d_real"]["dice"] == pytest.approx(2 * p["d_pseudo"]["dice"])
    assert pairs[-1]["name"] == "gamma_3" and pairs[-1]["d_pseudo"]["dice"] != 0
    assert [p["d_pseudo"] for p in pairs_of(1)[1]] == [p["d_pseudo"] for p in pairs]


def test_calibration_sets_default_to_the_products_shifts():
    from spe_lightning.engine.calibration_pairs import INTERVAL_SEVERITIES

    sets = calibration_sets(_set(6), subset_sizes=[3], n_subsets=1)
    shifted = [n for n in sets if not n.startswith("subset")]
    assert sorted(shifted) == sorted(f"{f}_{s}" for f in SHIFT_FAMILIES for s in INTERVAL_SEVERITIES)


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
    assert (
        with_pairs["anchor_intervals"]["dice"]["scores"]
        and with_pairs["estimates"]["t"]["dice"]["value"] == est["value"]
    )


@pytest.mark.parametrize("shape,slices", [((32, 32), "all"), ((6, 24, 24), "foreground")])
def test_shifted_and_subset_sets_match_a_fresh_cache(shape, slices):
    """shift_set/subset rebuild the reverse step's gray rows exactly as cache_dataset does (2D and 3D)."""
    from spe_lightning.engine.cached_set import cache_dataset
    from spe_lightning.testing import Blobs

    ds = Blobs(n=5, shape=shape, seed=2)
    data = cache_dataset("cal", ds, working_size=16, slices=slices)
    assert torch.allclose(
        shift_set(data, "gamma", 1).gray,
        cache_dataset(
            "x",
            [{"image": apply_shift(ds[i]["image"], "gamma", 1, i), "label": ds[i]["label"]} for i in range(5)],
            working_size=16,
            slices=slices,
        ).gray,
        atol=1e-6,
    )
    sub = subset(data, [3, 1], "sub")
    ref = cache_dataset("y", [ds[3], ds[1]], working_size=16, slices=slices)
    assert torch.allclose(sub.gray, ref.gray) and sub.units == ref.units
