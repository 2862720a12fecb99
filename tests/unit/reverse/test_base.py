"""The segmenter interface, the registry and 'auto'."""

import pytest
import torch

from spe_lightning.reverse import (
    CallableSegmenter,
    LabelFusionSegmenter,
    UniverSeg,
    UniverSegSegmenter,
    available_segmenters,
    make_segmenter,
    resolve_auto,
)


def test_registry_names():
    names = available_segmenters()
    assert {"universeg", "label_fusion"} <= set(names)
    assert isinstance(make_segmenter("label_fusion"), LabelFusionSegmenter)
    with pytest.raises(ValueError, match="Unknown segmenter 'nope'"):
        make_segmenter("nope")


@pytest.mark.real_default
def test_auto_falls_back_to_the_learned_propagation_offline():
    from spe_lightning.reverse.learned import LearnedPropagationSegmenter

    seg, reason = resolve_auto()
    assert isinstance(seg, LearnedPropagationSegmenter) and not seg.is_fitted
    assert "UniverSeg" in reason and "learned_propagation" in reason


def test_auto_leaves_the_global_random_stream_alone():
    # resolving "auto" builds UniverSeg's network (random initial weights) before looking for its file
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    resolve_auto()
    assert torch.equal(torch.rand(3), expected)


def test_auto_uses_universeg_when_weights_are_found(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(UniverSeg().state_dict(), path)
    monkeypatch.setenv("SPE_UNIVERSEG_WEIGHTS", str(path))
    assert isinstance(make_segmenter("auto"), UniverSegSegmenter)


@pytest.mark.real_default
def test_run_warns_once_about_auto_choice():
    from spe_lightning import SPERun
    from spe_lightning.data import SyntheticShapesDataset

    run = SPERun()
    data = SyntheticShapesDataset(6, size=32)
    with pytest.warns(UserWarning, match="'learned_propagation' reverse segmenter") as caught:
        run.prepare(data, data, data)  # the learned segmenter is fitted at the first evaluation, not here
    assert run.segmenter.name == "learned_propagation" and len(caught) == 1


def test_callable_segmenter_chunks_and_validates():
    calls = []

    def copy_mean(q, si, sl):
        calls.append(q.shape[0])
        return sl.mean(0, keepdim=True).expand(q.shape[0], -1, -1, -1)

    seg = CallableSegmenter(copy_mean, name="mean_mask", chunk_size=3)
    q, s = torch.rand(7, 1, 16, 16), torch.rand(4, 1, 16, 16)
    lab = (torch.rand(4, 1, 16, 16) > 0.5).float()
    out = seg(q, s, lab)
    assert out.shape == (7, 1, 16, 16) and calls == [3, 3, 1]
    assert torch.allclose(out[0], lab.mean(0))
    with pytest.raises(ValueError, match="support set is empty"):
        seg(q, s[:0], lab[:0])
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        seg(q[:, 0], s, lab)
    with pytest.raises(ValueError, match="resize both"):
        seg(torch.rand(2, 1, 8, 8), s, lab)


def test_segmenter_setting_takes_options_and_builds_them():
    """``SPEConfig(segmenter="name:key=value")`` reaches the segmenter (e.g. the pretrained start from YAML)."""
    from spe_lightning import SPEConfig, SPERun
    from spe_lightning.data import SyntheticShapesDataset

    run = SPERun(SPEConfig(segmenter="learned_propagation:pretrained=true,adapt_steps=7"))
    data = SyntheticShapesDataset(6, size=32)
    run.prepare(data, data, data)
    assert run.segmenter.name == "learned_propagation" and run.segmenter.pretrained is True
    assert run.segmenter.fit_steps == 7
    with pytest.raises(ValueError, match="unknown segmenter 'bogus'"):
        SPEConfig(segmenter="bogus:k=1")
    with pytest.raises(ValueError, match="unknown segmenter 'auto'"):
        SPEConfig(segmenter="auto:k=1")
