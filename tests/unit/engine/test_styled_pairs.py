"""The restyling recipes of engine/styled_pairs.py (Styling, pooled histogram matching, steps turned off)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _shapes import smooth_scene

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.styled_pairs import (
    STYLINGS,
    Styling,
    gaussian_blur,
    histogram_match,
    pooled_histogram,
    resolve_styling,
    style_image,
    styled_set,
    target_style,
)

_scene = partial(smooth_scene, size=64)


def _cached(name: str, images: list[torch.Tensor], masks: list[torch.Tensor] | None) -> CachedSet:
    gray = torch.stack([(x - x.min()) / (x.max() - x.min()) for x in images])
    return CachedSet(name, images, masks, gray, list(range(len(images))), [(i, -1) for i in range(len(images))])


def _sets() -> tuple[CachedSet, CachedSet]:
    cal_imgs = [_scene(s)[None] for s in range(5)]
    g = torch.Generator().manual_seed(9)
    # the target: another intensity distribution (a power curve), blur and noise, another range
    tgt_imgs = [
        (gaussian_blur(_scene(s) ** 3, 1.5) * 200 + 20 + 4 * torch.randn(64, 64, generator=g))[None]
        for s in range(20, 28)
    ]
    return _cached("calibration", cal_imgs, [x > 0.4 for x in cal_imgs]), _cached("site", tgt_imgs, None)


def _quantile_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    qs = torch.linspace(0.05, 0.95, 19)
    return float((torch.quantile(a.flatten().float(), qs) - torch.quantile(b.flatten().float(), qs)).abs().max())


def test_pooled_histogram_matching_maps_a_set_onto_the_targets_pooled_distribution():
    cal, tgt = _sets()
    pooled = pooled_histogram([x[0] for x in tgt.inputs], n_quantiles=512)
    assert pooled.shape == (512,) and bool((pooled.diff() >= 0).all()) and 0 <= pooled[0] and pooled[-1] <= 1
    target_unit = torch.cat([((x - x.min()) / (x.max() - x.min())).flatten() for x in tgt.inputs])
    source = torch.cat([x.flatten() for x in cal.inputs])
    matched = torch.cat([histogram_match(x, pooled).flatten() for x in cal.inputs])
    # each calibration image (and so the set) now has the target's pooled distribution
    assert _quantile_gap(matched, target_unit) < 0.02 < _quantile_gap(source, target_unit)


def test_steps_turned_off_are_the_identity_up_to_the_targets_range():
    cal, tgt = _sets()
    x, ref = cal.inputs[0], tgt.inputs[0]
    g = torch.Generator().manual_seed(0)
    out = style_image(x, ref, noise=0.0, blur=0.0, generator=g, beta=0.0, histogram="off")
    unit = (x - x.min()) / (x.max() - x.min())
    # FDA, histogram, blur and noise off: only the map into the reference's intensity range is left
    assert torch.allclose(out, unit * (ref.max() - ref.min()) + ref.min(), atol=1e-4)
    # FDA and noise/blur off, histogram on: the calibration image's pixel order with the reference's values
    hist = style_image(x, ref, noise=0.0, blur=0.0, generator=g, beta=0.0, histogram="image")
    assert _quantile_gap(hist, ref) < 0.02 * float(ref.max() - ref.min())
    order = torch.argsort(unit.flatten(), stable=True)
    assert bool((hist.flatten()[order].diff() >= -1e-4).all())


def test_styled_set_under_a_recipe_records_it_and_off_steps_add_nothing():
    cal, tgt = _sets()
    plain, record = styled_set(cal, tgt, seed=1, styling=Styling(beta=0.0, histogram="off", noise_blur=False))
    assert record["styling"] == "custom" and record["recipe"]["histogram"] == "off"
    assert record["noise_added"] > 0  # estimated and recorded, but not added
    for out, x, j in zip(plain.inputs, cal.inputs, record["target_images"]):
        ref = tgt.inputs[j]
        unit = (x - x.min()) / (x.max() - x.min())
        assert torch.allclose(out, unit * (ref.max() - ref.min()) + ref.min(), atol=1e-4)
    v1, rec1 = styled_set(cal, tgt, seed=1)
    assert rec1["styling"] == "v1" and rec1["recipe"] == STYLINGS["v1"].to_dict() and rec1["beta"] == 0.05
    # a given style (the target's levels, estimated once) gives the same set as estimating them again
    again, _ = styled_set(cal, tgt, seed=1, style=target_style(cal, tgt, 1))
    assert all(torch.equal(a, b) for a, b in zip(v1.inputs, again.inputs))


def test_several_references_give_that_many_copies_each_from_its_own_target_image():
    cal, tgt = _sets()
    styled, record = styled_set(cal, tgt, seed=2, styling=Styling(references=3))
    n = len(cal)
    assert len(styled) == 3 * n and len(styled.inputs) == 3 * n and len(record["target_images"]) == 3 * n
    assert styled.masks is not None and cal.masks is not None
    assert all(torch.equal(styled.masks[c * n + i], cal.masks[i]) for c in range(3) for i in range(n))
    assert styled.units == [(p, -1) for p in range(3 * n)] and styled.gray.shape[0] == 3 * n
    # copy p is styled from its own target image: it lies in that image's intensity range
    refs = record["target_images"]
    assert len(set(refs)) > 1
    for out, j in zip(styled.inputs, refs):
        ref = tgt.inputs[j]
        assert float(ref.min()) - 1e-3 <= float(out.min()) and float(out.max()) <= float(ref.max()) + 1e-3
    assert not torch.equal(styled.inputs[0], styled.inputs[n])  # one calibration image, two styled copies


def test_recipes_are_validated_and_named():
    assert resolve_styling("v1") == ("v1", STYLINGS["v1"])
    assert resolve_styling(Styling()) == ("v1", Styling())
    with pytest.raises(ValueError, match="Unknown styling 'v9'"):
        resolve_styling("v9")
    with pytest.raises(ValueError, match="histogram must be one of"):
        Styling(histogram="mean")
    with pytest.raises(ValueError, match="beta must be in"):
        Styling(beta=0.6)
    with pytest.raises(ValueError, match="references must be a positive int"):
        Styling(references=0)
