"""The model's mirror consistency (spe_lightning.percase.mirror) and where the per-case maps take it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.percase.mirror import MIRROR, mirror_consistency, mirrored
from spe_lightning.percase.rca import RCAScorer, per_case_dice
from spe_lightning.percase.regressor import RegressorScorer
from spe_lightning.percase.scorer import CaseInputs
from spe_lightning.percase.site_fit import PRODUCT_RULES, _signals, fit_sites, site_rows
from spe_lightning.percase.sites import SHAPES, SIGNALS, rule_name


def _set(n: int = 24, size: int = 16, seed: int = 0) -> CachedSet:
    """Bright discs of random radius and centre on noise; the mask is the disc."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        r = 2 + 3 * torch.rand(1, generator=g).item()
        cy, cx = (4 + (size - 8) * torch.rand(2, generator=g)).tolist()
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        images.append((0.2 + 0.6 * disc.float() + 0.1 * torch.rand(size, size, generator=g))[None])
        masks.append(disc[None])
    return CachedSet("calibration", images, masks, torch.stack(images))


def _threshold(data: CachedSet) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A model that commutes with mirroring: a threshold of each pixel."""
    masks = [x > 0.55 for x in data.inputs]
    return masks, torch.tensor([float(x[m].mean()) if m.any() else 0.0 for x, m in zip(data.inputs, masks)])


def _left_half(data: CachedSet) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A model that segments the bright pixels of the left half only: mirroring moves its mask away."""
    masks = []
    for x in data.inputs:
        m = x > 0.55
        m[..., x.shape[-1] // 2 :] = False
        masks.append(m)
    return masks, torch.ones(len(masks))


def test_mirrored_flips_inputs_gray_and_masks_left_right_and_twice_is_the_original() -> None:
    data = _set(4)
    m = mirrored(data)
    assert torch.equal(m.inputs[0], data.inputs[0].flip(-1)) and torch.equal(m.gray, data.gray.flip(-1))
    assert m.masks is not None and data.masks is not None and torch.equal(m.masks[2], data.masks[2].flip(-1))
    back = mirrored(m)
    assert all(torch.equal(a, b) for a, b in zip(back.inputs, data.inputs)) and back.indices == data.indices


def test_mirror_consistency_is_one_for_a_mirror_equivariant_model_and_falls_when_the_mask_does_not_follow() -> None:
    data = _set()
    masks, _ = _threshold(data)
    assert np.allclose(mirror_consistency(_threshold, data, masks), 1.0)
    # the left-half model's mask of the mirrored image, mirrored back, is the right half's bright pixels
    masks, _ = _left_half(data)
    expected = []
    for x in data.inputs:
        right = x > 0.55
        right[..., : x.shape[-1] // 2] = False
        expected.append(right)
    got = mirror_consistency(_left_half, data, masks)
    assert got == pytest.approx(per_case_dice(masks, expected))
    assert got.min() < 1.0  # at least one disc straddles the middle unevenly or lies on one side


def test_mirror_consistency_of_an_empty_prediction_is_one_and_lengths_must_match() -> None:
    data = _set(3)

    def empty(d: CachedSet) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [torch.zeros_like(x, dtype=torch.bool) for x in d.inputs], torch.zeros(len(d.inputs))

    assert np.array_equal(mirror_consistency(empty, data, empty(data)[0]), np.ones(3))
    with pytest.raises(ValueError, match="2 masks for 3 cases"):
        mirror_consistency(empty, data, empty(data)[0][:2])


def _raw(gray: torch.Tensor, masks: list[torch.Tensor]) -> np.ndarray:
    return np.array([float(m.float().mean()) * 4 for m in masks])


def test_a_runs_rules_may_stack_the_mirror_and_a_map_that_does_needs_it_to_score() -> None:
    assert MIRROR in SIGNALS and any(MIRROR in r for r in PRODUCT_RULES)
    cal = _set(40)
    from spe_lightning.engine.shifts import shift_set

    styled = {"target": shift_set(cal, "noise", 2, seed=3)}
    sites = fit_sites(_raw, _left_half, per_case_dice, cal, styled, 0.9, seed=0)
    assert set(sites["scores"]) == {rule_name(r, sh) for r in PRODUCT_RULES for sh in SHAPES}
    site = dict(sites["targets"]["target"])
    # a map stacking the mirror: it scores cases that carry it, and refuses (naming the fix) cases that do not
    site.update(signals=["regressor", MIRROR], coef=[0.0, 1.0, 0.0], shape="linear", knots_x=[], knots_y=[])
    masks, conf = _left_half(cal)
    mirror = mirror_consistency(_left_half, cal, masks)
    rows = site_rows(site, _raw(cal.gray, masks), CaseInputs(cal.gray, masks, conf, list("x" * 40), mirror=mirror), 0.7)
    assert [r.estimated_dice for r in rows] == pytest.approx(np.clip(mirror, 0, 1))
    assert {r.signals for r in rows} == {"regressor+mirror"}
    with pytest.raises(ValueError, match="mirror consistency.*SPEEstimator.estimate"):
        site_rows(site, _raw(cal.gray, masks), CaseInputs(cal.gray, masks, conf, list("x" * 40), name="t"), 0.7)
    # the signals of a set carry the mirror only when given it
    sig = _signals(_raw, cal, masks, conf, None, mirror=mirror)
    assert np.array_equal(sig.signals[MIRROR], mirror) and MIRROR not in _signals(_raw, cal, masks, conf, None).signals


def test_scorers_say_which_model_signals_a_set_needs() -> None:
    scorer = RegressorScorer()
    scorer.sites = {"targets": {"site_a": {"signals": ["regressor", MIRROR]}, "site_b": {"signals": ["regressor"]}}}
    assert scorer.model_signals("site_a") == (MIRROR,)
    assert scorer.model_signals("site_b") == () and scorer.model_signals("elsewhere") == ()
    assert scorer.model_signals(None) == ()
    assert RCAScorer.model_signals(object.__new__(RCAScorer), "site_a") == ()  # type: ignore[arg-type]
