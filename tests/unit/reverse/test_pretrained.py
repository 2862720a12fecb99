"""learned_propagation's shipped pretrained weights: checked loading, adaptation, scratch fit untouched, cache keys."""

from __future__ import annotations

import pickle

import pytest
import torch
from _shapes import degrade

from spe_lightning import __version__
from spe_lightning.data.synthetic import make_phantom
from spe_lightning.reverse import base, pretrained
from spe_lightning.reverse.fit_cache import content_key
from spe_lightning.reverse.learned import LearnedPropagationSegmenter
from spe_lightning.reverse.synthetic_tasks import synthetic_episodes, synthetic_tasks

#: the shipped architecture at a small working size and few supports (fast)
FAST = {"size": 32, "batch": 4, "max_supports": 4}


def _phantoms(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = [make_phantom(g, size) for _ in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([m for _, m in items])


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for _, v in sorted(state.items())])


def test_the_shipped_file_is_small_plain_tensors_and_matches_its_checksum():
    path = pretrained.WEIGHTS_FILE
    assert path.is_file() and path.stat().st_size < 5e6
    assert pretrained.file_sha256(path) == pretrained.WEIGHTS_SHA256
    blob = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and strings only
    assert blob["version"] == pretrained.WEIGHTS_VERSION and f"_v{pretrained.WEIGHTS_VERSION}." in path.name
    state = pretrained.load_pretrained()
    expected = LearnedPropagationSegmenter(**pretrained.ARCHITECTURE).new_encoder().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(torch.isfinite(v).all() for v in state.values())
    # version 2: the full 2,500-step schedule on synthetic tasks only (no dataset: every benchmark is leave-one-out)
    recipe = pretrained.weights_recipe()
    assert recipe["steps_done"] == recipe["steps"] == 2500 and pretrained.datasets_seen() == []


def test_a_corrupt_missing_or_foreign_file_gives_a_clear_error(tmp_path, monkeypatch):
    good = pretrained.WEIGHTS_FILE.read_bytes()
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(good[:-10] + bytes(b ^ 0xFF for b in good[-10:]))
    monkeypatch.setattr(pretrained, "WEIGHTS_FILE", bad)
    with pytest.raises(ValueError, match="SHA-256 .* corrupt"):
        pretrained.load_pretrained()
    monkeypatch.setattr(pretrained, "WEIGHTS_FILE", tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="missing. Reinstall"):
        pretrained.load_pretrained()
    # a file of other weights, given explicitly (no checksum): the header is checked
    foreign = tmp_path / "foreign.pt"
    torch.save({"tensors": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(ValueError, match="not a learned_propagation weights file"):
        pretrained.load_pretrained(foreign)
    with pytest.raises(ValueError, match="SHA-256"):
        pretrained.load_pretrained(foreign, sha256="0" * 64)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_a_weights_file_never_runs_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": pretrained.FORMAT, "tensors": {"w": _Boom()}}, f, protocol=2)
    with pytest.raises(ValueError, match="cannot be read as plain tensors"):
        pretrained.load_pretrained(path)


def test_save_and_load_round_trip_with_the_architecture_checked(tmp_path):
    enc = LearnedPropagationSegmenter(**pretrained.ARCHITECTURE).new_encoder()
    path = tmp_path / "w.pt"
    sha = pretrained.save_pretrained(path, enc.state_dict(), {"steps": 1})
    state = pretrained.load_pretrained(path, sha256=sha)
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(ValueError, match="architecture of the shipped weights"):
        LearnedPropagationSegmenter(width=16, pretrained=True)
    with pytest.raises(TypeError, match="True or False"):
        LearnedPropagationSegmenter(pretrained="yes")  # type: ignore[arg-type]


def test_pretrained_adaptation_starts_from_the_shipped_weights_and_moves_them_a_little():
    torch.set_num_threads(1)
    img, msk = _phantoms(12, seed=1)
    start = _flat(pretrained.load_pretrained())
    as_is = LearnedPropagationSegmenter(pretrained=True, adapt_steps=0, **FAST)
    as_is.fit(img, msk)
    assert torch.equal(_flat(as_is.state_tensors()), start)  # 0 steps: the shipped weights as they are
    seg = LearnedPropagationSegmenter(pretrained=True, adapt_steps=5, **FAST)
    assert seg.fit_steps == 5
    seen: list[int] = []
    seg.fit(img, msk, progress=seen.append)
    assert len(seen) == 5
    adapted, init = _flat(seg.state_tensors()), _flat(seg.new_encoder().state_dict())
    moved = float((adapted - start).norm() / start.norm())
    assert 0 < moved < 0.25, moved  # a few steps keep most of the pretrained weights
    assert (adapted - start).norm() < (adapted - init).norm() / 2  # far nearer the start than a fresh init
    # the adapted segmenter still ranks a good support set above a poor one
    qi, qm = _phantoms(6, seed=3)
    si, sm = _phantoms(8, seed=2)
    good = float(seg.score(qi, qm, si, sm).mean())
    poor = float(seg.score(qi, qm, si, degrade(sm, 0.5, seed=0)).mean())
    assert good > poor


def test_the_scratch_fit_never_reads_the_weights_and_ignores_the_adaptation_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "WEIGHTS_FILE", tmp_path / "absent.pt")
    img, msk = _phantoms(8, seed=4)
    a = LearnedPropagationSegmenter(steps=4, **FAST)
    b = LearnedPropagationSegmenter(steps=4, adapt_steps=50, adapt_lr=0.1, **FAST)
    a.fit(img, msk)
    b.fit(img, msk)
    assert a.fit_steps == 4 and torch.equal(_flat(a.state_tensors()), _flat(b.state_tensors()))
    with pytest.raises(FileNotFoundError, match="pretrained=False"):
        LearnedPropagationSegmenter(pretrained=True, **FAST).fit(img, msk)


def test_fit_cache_key_tells_scratch_from_adapted_and_follows_the_weights(monkeypatch):
    img, msk = _phantoms(4, seed=5)

    def key(seg: LearnedPropagationSegmenter) -> str:
        return content_key(img, msk, seg.fit_spec(), 0, __version__)

    scratch, adapted = LearnedPropagationSegmenter(), LearnedPropagationSegmenter(pretrained=True)
    assert adapted.fit_spec()["pretrained_weights"] == pretrained.pretrained_id()
    assert "pretrained_weights" not in scratch.fit_spec() and key(scratch) != key(adapted)
    before = key(adapted)
    monkeypatch.setattr(pretrained, "WEIGHTS_SHA256", "f" * 64)  # another file: another key
    assert key(LearnedPropagationSegmenter(pretrained=True)) != before


def test_adapting_only_the_last_layers_keeps_the_earlier_ones_pretrained():
    torch.set_num_threads(1)
    img, msk = _phantoms(8, seed=6)
    start = pretrained.load_pretrained()
    seg = LearnedPropagationSegmenter(pretrained=True, adapt_steps=3, adapt_layers=2, **FAST)
    seg.fit(img, msk)
    state = seg.state_tensors()
    convs = sorted({k.rsplit(".", 1)[0] for k in start}, key=lambda k: int(k.split(".")[1]))
    assert len(convs) == 7
    for name in convs[:-2]:  # frozen: bit for bit the pretrained weights
        assert all(torch.equal(state[f"{name}.{p}"], start[f"{name}.{p}"]) for p in ("weight", "bias")), name
    for name in convs[-2:]:  # adapted
        assert not torch.equal(state[f"{name}.weight"], start[f"{name}.weight"]), name
    assert all(p.requires_grad for p in seg.encoder.parameters())  # the freeze ends with the fit
    every = LearnedPropagationSegmenter(pretrained=True, adapt_steps=3, **FAST)
    every.fit(img, msk)
    first = convs[0]
    assert not torch.equal(every.state_tensors()[f"{first}.weight"], start[f"{first}.weight"])


def test_adapt_layers_is_checked_and_keys_the_fit_only_when_set():
    assert "adapt_layers" not in LearnedPropagationSegmenter(pretrained=True).spec()  # earlier keys unchanged
    two = LearnedPropagationSegmenter(pretrained=True, adapt_layers=2)
    assert two.fit_spec()["adapt_layers"] == 2
    assert two.fit_spec() != LearnedPropagationSegmenter(pretrained=True).fit_spec()
    assert base.segmenter_from_text("learned_propagation:pretrained=true,adapt_layers=3").adapt_layers == 3
    with pytest.raises(ValueError, match="needs pretrained=True"):
        LearnedPropagationSegmenter(adapt_layers=2)
    with pytest.raises(ValueError, match="from 0 .all. to 7 convolutions"):
        LearnedPropagationSegmenter(pretrained=True, adapt_layers=8)


def test_the_spec_string_parses_booleans():
    seg = base.segmenter_from_text("learned_propagation:pretrained=false,adapt_steps=20")
    assert seg.pretrained is False and seg.adapt_steps == 20
    assert base.segmenter_from_text("learned_propagation:pretrained=true").pretrained is True


def test_synthetic_tasks_are_seeded_and_pair_two_images_of_one_task():
    x1, y1, v1 = synthetic_tasks(3, 4, 32, torch.Generator().manual_seed(7))
    x2, y2, _ = synthetic_tasks(3, 4, 32, torch.Generator().manual_seed(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (3, 4, 1, 32, 32) and 0 <= float(x1.min()) and float(x1.max()) <= 1
    assert set(y1.unique().tolist()) <= {0.0, 1.0} and v1.dtype == torch.bool
    xq, xs, lq, ls = next(synthetic_episodes(5, 32, torch.Generator().manual_seed(0)))
    assert xq.shape == xs.shape == lq.shape == ls.shape == (5, 1, 32, 32)
    assert not torch.equal(xq, xs)  # two different images of a task
    with pytest.raises(ValueError, match="images_per_task"):
        next(synthetic_episodes(2, 32, torch.Generator(), images_per_task=1))


def test_weights_from_another_file_start_the_adaptation_and_key_the_fit(tmp_path):
    img, msk = _phantoms(6, seed=6)
    enc = LearnedPropagationSegmenter(**pretrained.ARCHITECTURE, seed=3).new_encoder()
    path = tmp_path / "retrained.pt"
    sha = pretrained.save_pretrained(path, enc.state_dict(), {"datasets": ["jsrt:1 (172 train images)"]})
    seg = LearnedPropagationSegmenter(pretrained=True, adapt_steps=0, weights=str(path), **FAST)
    seg.fit(img, msk)
    assert torch.equal(_flat(seg.state_tensors()), _flat(enc.state_dict()))  # that file's weights, not the shipped
    assert not torch.equal(_flat(seg.state_tensors()), _flat(pretrained.load_pretrained()))
    assert seg.fit_spec()["pretrained_weights"] == f"file-{sha[:16]}" == pretrained.pretrained_id(path)
    assert seg.spec()["weights"] == str(path) and "weights" not in LearnedPropagationSegmenter(pretrained=True).spec()
    assert pretrained.datasets_seen(path) == ["jsrt"] and pretrained.datasets_seen() == []
    with pytest.raises(ValueError, match="needs pretrained=True"):
        LearnedPropagationSegmenter(weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing"):
        LearnedPropagationSegmenter(pretrained=True, weights=str(tmp_path / "absent.pt")).fit_spec()


def _pretrain_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "scripts" / "pretrain_reverse.py"
    spec = importlib.util.spec_from_file_location("pretrain_reverse", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataset_tasks_read_the_train_split_only_one_task_per_class(tmp_path):
    import numpy as np
    from PIL import Image

    script = _pretrain_script()
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((20, 20), np.uint8)
        mask[2:8, 2:8] = 1  # class 1 in every image
        if i < 2:
            mask[10:16, 10:16] = 2  # class 2 in two images only
        if i == 3:
            mask[:] = 0  # an image showing no class is left out of every task
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(tmp_path / "train" / "images" / f"c{i}.png")
        Image.fromarray(mask).save(tmp_path / "train" / "masks" / f"c{i}.png")
    (tmp_path / "test" / "images" / "t.png").write_bytes(b"not a png: reading it would fail")
    tasks = script.dataset_tasks(f"toy={tmp_path}", 16)
    assert [(name, x.shape[0]) for name, x, _ in tasks] == [("toy:1", 3), ("toy:2", 2)]
    name, x, y = tasks[1]
    assert x.shape == y.shape == (2, 1, 16, 16) and set(y.unique().tolist()) == {0.0, 1.0}
    xq, xs, lq, ls = next(script.dataset_episodes(tasks, 6, torch.Generator().manual_seed(0)))
    assert xq.shape == lq.shape == (6, 1, 16, 16)
    assert all(not torch.equal(a, b) for a, b in zip(xq, xs))  # two different images of one task
    with pytest.raises(SystemExit, match="NAME=DIR"):
        script.dataset_tasks(str(tmp_path), 16)
    with pytest.raises(SystemExit, match="no train images"):
        script.dataset_tasks(f"empty={tmp_path / 'test'}", 16)
