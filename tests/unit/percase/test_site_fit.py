"""The per-target map inside a run (spe_lightning.percase.site_fit): the held-out per-pair-set means the
combination weight is chosen with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.shifts import shift_set, subset
from spe_lightning.engine.styled_pairs import styled_set
from spe_lightning.percase.rca import per_case_dice
from spe_lightning.percase.site_fit import _signals, heldout_site_means
from spe_lightning.percase.sites import fit_site_calibration


def _set(n: int = 24, size: int = 16, seed: int = 0) -> CachedSet:
    """Bright discs of random radius on noise; the mask is the disc."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        r = 2 + 5 * torch.rand(1, generator=g).item()
        disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < r**2
        images.append((0.2 + 0.6 * disc.float() + 0.1 * torch.rand(size, size, generator=g))[None])
        masks.append(disc[None])
    return CachedSet("calibration", images, masks, torch.stack(images))


def _predict(data: CachedSet) -> tuple[list[torch.Tensor], torch.Tensor]:
    masks = [x > 0.55 for x in data.inputs]
    return masks, torch.tensor([float(x[m].mean()) if m.any() else 0.0 for x, m in zip(data.inputs, masks)])


def _raw(gray: torch.Tensor, masks: list[torch.Tensor]) -> np.ndarray:
    return np.array([float(m.float().mean()) * 4 for m in masks])


def test_pair_set_means_come_from_maps_that_never_saw_the_case() -> None:
    cal = _set()
    noisy = shift_set(cal, "noise", 2, seed=1)
    sets = {"noise_2": noisy, "subset_0": subset(cal, range(12), "subset_0"), "gamma_1": subset(cal, range(20), "x")}
    means = heldout_site_means(_raw, _predict, per_case_dice, cal, sets, ["regressor"], 0.9, seed=0)
    assert means["subset_0"] is None and means["gamma_1"] is None  # not a full shifted copy
    # the same value by hand: each half estimated by the map fitted on the other half and its styled copies
    masks, conf = _predict(cal)
    sig = _signals(_raw, cal, masks, conf, per_case_dice(masks, cal.masks))
    p_masks, p_conf = _predict(noisy)
    target = _signals(_raw, noisy, p_masks, p_conf, None)
    perm = np.random.default_rng(0).permutation(len(cal))
    a, b = np.sort(perm[:12]), np.sort(perm[12:])
    est = np.zeros(len(cal))
    for fit, score in ((a, b), (b, a)):
        sty, _ = styled_set(subset(cal, fit.tolist(), "h"), subset(noisy, score.tolist(), "noise_2"), 0)
        s_masks, s_conf = _predict(sty)
        styled = _signals(_raw, sty, s_masks, s_conf, per_case_dice(s_masks, sty.masks), groups=fit)
        site = fit_site_calibration(sig.subset(fit), styled, ["regressor"], level=0.9, seed=0)
        est[score] = site.point(target.subset(score).signals)
    assert means["noise_2"] == pytest.approx(float(est.mean()))
    assert 0.0 <= means["noise_2"] <= 1.0


def test_pair_set_means_need_a_labelled_calibration_set() -> None:
    cal = _set()
    bare = CachedSet("calibration", cal.inputs, None, cal.gray)
    with pytest.raises(ValueError, match="needs masks"):
        heldout_site_means(_raw, _predict, per_case_dice, bare, {}, ["regressor"], 0.9, seed=0)
