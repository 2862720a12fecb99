"""The disk cache of a learned reverse segmenter's fitted weights: re-runs on the same data skip the fit."""

from __future__ import annotations

import pickle

import pytest
import torch

from spe_lightning import SPEConfig, SPERun, __version__
from spe_lightning.reverse.fit_cache import content_key, load_cached, resolve_cache_dir, save_cached
from spe_lightning.reverse.learned import LearnedPropagationSegmenter
from spe_lightning.testing import Blobs, TinyNet


def _segmenter(**kw) -> LearnedPropagationSegmenter:
    args = dict(size=32, downsample=1, width=8, batch=4, max_supports=4, steps=10)
    return LearnedPropagationSegmenter(**{**args, **kw})


def _run(cache, messages=None, refs_seed=1, **seg) -> SPERun:
    say = messages.append if messages is not None else lambda m: None
    config = SPEConfig(support_size=6, working_size=32, min_foreground=4, metrics=("dice",), fit_cache=cache)
    run = SPERun(config, segmenter=_segmenter(**seg), warn=say, say=say)
    run.prepare(Blobs(10, seed=refs_seed), Blobs(8, seed=2), {"t": Blobs(8, seed=3)})
    return run


def test_a_second_run_on_the_same_references_loads_the_fit_and_gets_the_same_numbers(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    first = _run(str(tmp_path))
    rec = first.evaluate(model)
    files = list(tmp_path.glob("learned_propagation-*.pt"))
    assert first.segmenter_fit_seconds > 0 and len(files) == 1

    messages: list[str] = []
    second = _run(str(tmp_path), messages)
    again = second.evaluate(model)
    assert second.segmenter_fit_seconds == 0.0 and any("fit cache" in m for m in messages)
    for k, v in first.segmenter.state_tensors().items():
        assert torch.equal(v, second.segmenter.state_tensors()[k])
    assert again["pseudo"] == rec["pseudo"]

    # settings that only change how the weights are used share the fit
    evaluation_only = _run(str(tmp_path), max_supports=2, direction="forward")
    evaluation_only.evaluate(model)
    assert evaluation_only.segmenter_fit_seconds == 0.0 and evaluation_only.segmenter_from_cache
    # other references, or other settings: another key, so a fit (and a second file)
    _run(str(tmp_path), refs_seed=5).evaluate(model)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    other = _run(str(tmp_path), seed=3)
    other.evaluate(model)
    assert other.segmenter_fit_seconds > 0 and len(list(tmp_path.glob("*.pt"))) == 3
    # off: no file written, always fitted
    off = _run(None)
    off.evaluate(model)
    assert off.segmenter_fit_seconds > 0


def test_a_bad_cache_file_is_never_trusted_the_run_fits_again_and_says_so(tmp_path):
    model = TinyNet()
    first = _run(str(tmp_path))
    first.evaluate(model)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a torch file")
    messages: list[str] = []
    run = _run(str(tmp_path), messages)
    run.evaluate(model)
    assert run.segmenter_fit_seconds > 0 and any("ignoring the fit cache" in m for m in messages)
    key = content_key(run.engine.ref_images, run.engine.ref_masks, run.segmenter.fit_spec(), 0, __version__)
    assert load_cached(path, key) is not None  # the bad file was replaced by this run's fit


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_cache_files_are_plain_tensors_code_never_runs(tmp_path):
    path = tmp_path / "x.pt"
    save_cached(path, "k", {"w": torch.ones(2)})
    assert torch.equal(load_cached(path, "k")["w"], torch.ones(2))
    assert load_cached(tmp_path / "absent.pt", "k") is None
    with pytest.raises(ValueError, match="not a cache file"):
        load_cached(path, "another key")
    with open(path, "wb") as f:
        pickle.dump({"key": "k", "tensors": {"w": _Boom()}}, f)
    with pytest.raises(ValueError, match="unreadable"):
        load_cached(path, "k")
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file


def test_cache_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("SPE_CACHE_DIR", str(tmp_path))
    assert resolve_cache_dir("auto") == tmp_path
    monkeypatch.setenv("SPE_CACHE_DIR", "")
    assert resolve_cache_dir("auto") is None and resolve_cache_dir(None) is None
    monkeypatch.delenv("SPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_cache_dir("auto") == tmp_path / "spe_lightning"
    assert resolve_cache_dir(str(tmp_path / "c")) == tmp_path / "c"
    with pytest.raises(ValueError, match="fit_cache"):
        SPEConfig(fit_cache=3)
