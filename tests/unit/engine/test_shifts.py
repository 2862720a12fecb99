"""Synthetic shifts and shifted/subset sets; rank normalisation against appearance shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _shapes import make_shapes, shapes_set

from spe_lightning.engine.shifts import SHIFT_FAMILIES, apply_shift, shift_set, subset
from spe_lightning.reverse import segmenter_from_text
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter, rank_normalise


@pytest.mark.parametrize("family", SHIFT_FAMILIES)
def test_every_shift_changes_the_image_and_keeps_shape_range_dtype(family):
    img = shapes_set(1).inputs[0]
    for severity in (1, 3):
        out = apply_shift(img, family, severity, seed=3)
        assert out.shape == img.shape and out.dtype == img.dtype
        assert type(out) is torch.Tensor  # not MONAI's MetaTensor (slow in every later torch call)
        assert float(out.min()) >= float(img.min()) - 1e-6 and float(out.max()) <= float(img.max()) + 1e-6
        assert float((out - img).abs().mean()) > 1e-3


def test_shift_severity_orders_noise_and_seed_is_reproducible():
    img = shapes_set(1).inputs[0]
    errs = [float((apply_shift(img, "noise", s, seed=0) - img).abs().mean()) for s in (1, 2, 3)]
    assert errs[0] < errs[1] < errs[2]
    assert torch.equal(apply_shift(img, "noise", 2, seed=5), apply_shift(img, "noise", 2, seed=5))
    assert not torch.equal(apply_shift(img, "noise", 2, seed=5), apply_shift(img, "noise", 2, seed=6))
    with pytest.raises(ValueError, match="severity"):
        apply_shift(img, "noise", 4)
    with pytest.raises(ValueError, match="Unknown shift family"):
        apply_shift(img, "tint", 1)


def test_shift_set_and_subset_keep_masks_and_positions():
    data = shapes_set(6)
    shifted = shift_set(data, "gamma", 2)
    assert shifted.name == "gamma_2" and shifted.masks is data.masks and shifted.gray.shape == data.gray.shape
    sub = subset(data, [4, 1], "two")
    assert sub.indices == [4, 1] and torch.equal(sub.masks[0], data.masks[4]) and len(sub) == 2


def test_rank_normalise_equals_scipys_average_ranks():
    from scipy.stats import rankdata

    g = torch.Generator().manual_seed(0)
    smooth = torch.rand(3, 1, 16, 16, generator=g)
    tied = (torch.rand(3, 1, 16, 16, generator=g) * 4).round() / 4  # 5 levels: many ties
    padded = torch.zeros(2, 1, 8, 8)
    padded[:, :, 2:6, 2:6] = torch.rand(2, 1, 4, 4, generator=g)  # zero padding: one big tie group
    for x in (smooth, tied, padded, torch.zeros(1, 1, 4, 4)):
        flat = x.flatten(1).double().numpy()
        n = flat.shape[1]
        ranks = torch.tensor(np.stack([rankdata(row, method="average") for row in flat]))
        expected = ((ranks - 0.5) / n - 0.5) * 12**0.5
        assert torch.allclose(rank_normalise(x).flatten(1).double(), expected, atol=1e-6)


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
