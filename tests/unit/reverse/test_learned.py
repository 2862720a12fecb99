"""learned_propagation: learns on the embedded phantoms, follows support-mask quality, determinism, saved state."""

from __future__ import annotations

import io

import pytest
import torch
from _shapes import degrade

from spe_lightning.data.synthetic import make_phantom
from spe_lightning.reverse import base
from spe_lightning.reverse.learned import LearnedPropagationSegmenter

SMALL = {"size": 32, "downsample": 1, "width": 16, "batch": 8, "max_supports": 8}


def _phantoms(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` phantoms, each circularly shifted by a random offset: the organ is not where the others have it."""
    g = torch.Generator().manual_seed(seed)
    items = [make_phantom(g, size) for _ in range(n)]
    shifts = torch.randint(-size // 3, size // 3 + 1, (n, 2), generator=g).tolist()
    img = torch.stack([x.roll((a, b), (-2, -1)) for (x, _), (a, b) in zip(items, shifts)])
    msk = torch.stack([m.roll((a, b), (-2, -1)) for (_, m), (a, b) in zip(items, shifts)])
    return img, msk


def _dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    return float(((2 * (p * t).sum(1) + 1e-6) / (p.sum(1) + t.sum(1) + 1e-6)).mean())


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    ref = _phantoms(48, seed=1)
    sup = _phantoms(16, seed=2)
    qry = _phantoms(12, seed=3)
    return ref, sup, qry


@pytest.fixture(scope="module")
def fitted(data):
    (ri, rm), _, _ = data
    seg = LearnedPropagationSegmenter(steps=100, **SMALL)
    seg.fit(ri, rm)
    return seg


def test_registered_and_spec_round_trip():
    assert "learned_propagation" in base.available_segmenters()
    seg = base.make_segmenter("learned_propagation", **SMALL)
    assert seg.needs_fit and seg.supports_scoring and not seg.is_fitted
    spec = {k: v for k, v in seg.spec().items() if k != "name"}
    assert base.make_segmenter("learned_propagation", **spec).spec() == seg.spec()
    text = base.segmenter_from_text("learned_propagation:size=32,downsample=1,direction=forward")
    assert (text.size, text.downsample, text.direction) == (32, 1, "forward")


def test_base_defaults_are_no_ops():
    lf = base.make_segmenter("label_fusion")
    assert not lf.needs_fit and lf.is_fitted and not lf.supports_scoring
    img, msk = _phantoms(4, seed=9)
    lf.fit(img, msk)  # does nothing
    assert lf.state_tensors() == {}
    lf.load_state_tensors({})


def test_unfitted_raises_clear_error(data):
    _, (si, sm), (qi, qm) = data
    seg = LearnedPropagationSegmenter(**SMALL)
    assert seg.state_tensors() == {}
    with pytest.raises(RuntimeError, match="not fitted"):
        seg(qi, si, sm)
    with pytest.raises(RuntimeError, match="not fitted"):
        seg.score(qi, qm, si, sm)


def test_learns_better_than_label_fusion_where_anatomy_is_not_aligned(data, fitted):
    _, (si, sm), (qi, qm) = data
    learned = float(fitted.score(qi, qm, si, sm).mean())
    lf = _dice(base.make_segmenter("label_fusion")(qi, si, sm) > 0.5, qm)
    assert learned > lf + 0.08, (learned, lf)
    probs = fitted(qi, si, sm)
    assert probs.shape == qi.shape and float(probs.min()) >= 0 and float(probs.max()) <= 1
    assert _dice(probs > 0.5, qm) > lf


def test_pseudo_dice_falls_with_degraded_masks(data, fitted):
    _, (si, sm), (qi, qm) = data
    scores = [float(fitted.score(qi, qm, si, degrade(sm, s, seed=4)).mean()) for s in (0.0, 0.3, 0.6)]
    assert scores[0] > scores[1] + 0.03 and scores[1] > scores[2] + 0.03, scores
    per_query = fitted.score(qi, qm, si, sm)
    assert per_query.shape == (qi.shape[0],)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_pair_metrics_follow_the_kind_of_error(data, fitted, direction):
    """Over-segmented support masks lower the pseudo precision, under-segmented ones the pseudo recall."""
    from _shapes import _dilate

    _, (si, sm), (qi, qm) = data
    seg = LearnedPropagationSegmenter(steps=100, direction=direction, **SMALL)
    seg.load_state_tensors(fitted.state_tensors())
    grown, shrunk = _dilate(sm.float(), 3), 1.0 - _dilate(1.0 - sm.float(), 2)

    def mean(masks):
        return {m: float(v.mean()) for m, v in seg.score_metrics(qi, qm, si, masks).items()}

    true, over, under = mean(sm), mean(grown), mean(shrunk)
    assert true["dice"] == pytest.approx(float(seg.score(qi, qm, si, sm).mean()), abs=1e-6)
    assert over["precision"] < true["precision"] - 0.05 and over["recall"] > under["recall"] + 0.05
    assert under["recall"] < true["recall"] - 0.05 and under["precision"] > over["precision"] + 0.05
    for m in ("dice", "iou"):
        assert true[m] > over[m] and true[m] > under[m]


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_other_directions_fall_too(data, fitted, direction):
    _, (si, sm), (qi, qm) = data
    seg = LearnedPropagationSegmenter(steps=100, direction=direction, **SMALL)
    seg.load_state_tensors(fitted.state_tensors())
    good, bad = (float(seg.score(qi, qm, si, degrade(sm, s, seed=4)).mean()) for s in (0.0, 0.6))
    assert good > bad + 0.05, (good, bad)


def test_same_seed_same_weights_and_outputs(data):
    (ri, rm), (si, sm), (qi, qm) = data
    a, b, c = (LearnedPropagationSegmenter(steps=8, seed=s, **SMALL) for s in (0, 0, 1))
    for seg in (a, b, c):
        seg.fit(ri[:16], rm[:16])
    sa, sb, sc = a.state_tensors(), b.state_tensors(), c.state_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a.score(qi, qm, si, sm), b.score(qi, qm, si, sm))
    assert torch.equal(a(qi, si, sm), b(qi, si, sm))


def test_state_round_trip_weights_only(data, fitted):
    _, (si, sm), (qi, qm) = data
    state = fitted.state_tensors()
    assert state and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    seg = LearnedPropagationSegmenter(**SMALL)
    seg.load_state_tensors(loaded)
    assert seg.is_fitted
    assert torch.equal(seg.score(qi, qm, si, sm), fitted.score(qi, qm, si, sm))
    seg.load_state_tensors({})
    assert not seg.is_fitted


def test_fit_rejects_bad_input():
    seg = LearnedPropagationSegmenter(**SMALL)
    img, msk = _phantoms(1, seed=5)
    with pytest.raises(ValueError, match="at least 2"):
        seg.fit(img, msk)
    with pytest.raises(ValueError):
        LearnedPropagationSegmenter(direction="sideways")


@pytest.mark.parametrize("patch_labels", [True, False])
def test_label_cells_match_unfold_and_invert(patch_labels):
    # cells is a reshape written for speed: it must equal torch's unfold of non-overlapping patches
    seg = LearnedPropagationSegmenter(size=32, downsample=2, patch_labels=patch_labels)
    lab = torch.rand(3, 1, 32 if patch_labels else 8, 32 if patch_labels else 8)
    c = 4 if patch_labels else 1
    reference = torch.nn.functional.unfold(lab, c, stride=c).transpose(1, 2)
    assert torch.equal(seg.cells(lab), reference)
    assert torch.equal(seg.uncells(seg.cells(lab)), lab)


def test_features_are_memoised_by_content_and_forgotten_on_refit():
    images, labels = _phantoms(12, seed=0)
    seg = LearnedPropagationSegmenter(steps=5, **SMALL)
    seg.fit(images, labels)
    first = seg.encode(images[:4])
    assert seg.encode(images[:4].clone()) is first  # same content, another tensor: from the memo
    other = seg.encode(images[4:8])
    assert other is not first and seg.encode(images[:4]) is first  # the memo holds both
    direct = seg.encoder(seg.normalise(images[:4])).flatten(2)
    assert torch.allclose(first, direct)
    seg.fit(images, labels)  # a refit forgets: the same images are encoded anew by the new encoder
    assert seg.encode(images[:4]) is not first
