"""Weight-free reverse segmenters on synthetic shapes: accuracy, sensitivity to support quality, mechanics."""

from __future__ import annotations

import pytest
import torch
from _shapes import degrade, make_shapes

from spe_lightning.reverse import base
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter


def _dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    return float(((2 * (p * t).sum(1) + 1e-6) / (p.sum(1) + t.sum(1) + 1e-6)).mean())


@pytest.fixture(scope="module")
def data():
    s_img, s_msk = make_shapes(40, seed=1)
    q_img, q_msk = make_shapes(24, seed=2)
    return s_img, s_msk, q_img, q_msk


@pytest.mark.real_default
def test_default_is_registered():
    assert base.DEFAULT_WEIGHT_FREE == "learned_propagation" in base.available_segmenters()
    seg = base.make_segmenter(base.DEFAULT_WEIGHT_FREE)
    assert isinstance(seg, base.ReverseSegmenter) and seg.needs_fit


def test_label_fusion_accurate_with_true_masks(data):
    s_img, s_msk, q_img, q_msk = data
    probs = base.make_segmenter("label_fusion")(q_img, s_img, s_msk)
    assert _dice(probs > 0.5, q_msk) >= 0.8


@pytest.mark.parametrize("name", ["label_fusion"])
def test_pseudo_dice_falls_with_support_quality(data, name):
    s_img, s_msk, q_img, q_msk = data
    seg = base.make_segmenter(name)
    levels = (0.0, 0.35, 0.7, 1.0)
    support_dice, pseudo = [], []
    for strength in levels:
        sd, pd = [], []
        for draw in range(2):
            lab = degrade(s_msk, strength, seed=draw)
            sd.append(_dice(lab, s_msk))
            pd.append(_dice(seg(q_img, s_img, lab) > 0.5, q_msk))
        support_dice.append(sum(sd) / len(sd))
        pseudo.append(sum(pd) / len(pd))
    assert all(a > b for a, b in zip(support_dice, support_dice[1:])), support_dice
    assert all(a > b for a, b in zip(pseudo, pseudo[1:])), (support_dice, pseudo)


def test_label_fusion_shape_range_device(data):
    s_img, s_msk, q_img, _ = data
    seg = LabelFusionSegmenter()
    probs = seg(q_img[:5], s_img, s_msk)
    assert probs.shape == q_img[:5].shape and probs.dtype == torch.float32
    assert probs.device == q_img.device
    assert float(probs.min()) >= 0.0 and float(probs.max()) <= 1.0
    # a different input size is handled (fused at the working size, returned at the input size)
    small = torch.nn.functional.interpolate(q_img[:3], size=(40, 40), mode="bilinear")
    s_small = torch.nn.functional.interpolate(s_img, size=(40, 40), mode="bilinear")
    out = seg(small, s_small, torch.nn.functional.interpolate(s_msk, size=(40, 40)))
    assert out.shape == small.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_label_fusion_cuda(data):
    s_img, s_msk, q_img, _ = data
    seg = LabelFusionSegmenter()
    cpu = seg(q_img[:4], s_img, s_msk)
    gpu = seg(q_img[:4].cuda(), s_img.cuda(), s_msk.cuda())
    assert gpu.is_cuda and torch.allclose(cpu, gpu.cpu(), atol=1e-3)


def test_label_fusion_chunking_invariant(data):
    s_img, s_msk, q_img, _ = data
    a = LabelFusionSegmenter(chunk_size=1)(q_img[:7], s_img, s_msk)
    b = LabelFusionSegmenter(chunk_size=32)(q_img[:7], s_img, s_msk)
    assert torch.allclose(a, b, atol=1e-5)


def test_label_fusion_deterministic(data):
    s_img, s_msk, q_img, _ = data
    seg = LabelFusionSegmenter()
    assert torch.equal(seg(q_img, s_img, s_msk), seg(q_img, s_img, s_msk))
    assert torch.equal(seg(q_img, s_img, s_msk), LabelFusionSegmenter()(q_img, s_img, s_msk))


def test_label_fusion_is_vectorised(data, monkeypatch):
    """One predict call makes a handful of tensor ops per chunk, not one per pixel or per support."""
    s_img, s_msk, q_img, _ = data
    seg = LabelFusionSegmenter(chunk_size=64)
    prepared = seg.prepare(s_img, s_msk)
    calls = {"n": 0}
    real_exp = torch.exp

    def counting_exp(*args, **kwargs):
        calls["n"] += 1
        return real_exp(*args, **kwargs)

    monkeypatch.setattr(torch, "exp", counting_exp)
    out = seg.predict(q_img, prepared)
    assert out.shape == q_img.shape
    assert calls["n"] == 1


def test_label_fusion_copies_support_labels(data):
    """Identical query and support: the fused labels reproduce the support's mask."""
    s_img, s_msk, _, _ = data
    probs = LabelFusionSegmenter(k=1)(s_img[:6], s_img[:6], s_msk[:6])
    assert _dice(probs > 0.5, s_msk[:6]) > 0.9


def test_label_fusion_rejects_bad_args():
    with pytest.raises(ValueError):
        LabelFusionSegmenter(patch=4)
    with pytest.raises(ValueError):
        LabelFusionSegmenter(k=0)
