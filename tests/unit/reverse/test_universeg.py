"""UniverSeg: architecture against the official reference case, weight resolution, segmenter interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spe_lightning.reverse import base as reverse_base
from spe_lightning.reverse import universeg as U

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
REFERENCE = SHARED / "universeg_reference"


def _reference(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (needs ../shared)")
    return path


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """A fixed-seed random UniverSeg state dict: the stand-in for the official weights file."""
    torch.manual_seed(1234)
    return {k: v.clone() for k, v in U.UniverSeg().state_dict().items()}


@pytest.fixture
def weights_file(tmp_path, tiny_state) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(tiny_state, path)
    return path


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    """No env var, an empty hub dir, downloads allowed but failing (never touching the network)."""
    monkeypatch.delenv(U.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, *args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


def _assert_loaded(seg: U.UniverSegSegmenter, state: dict[str, torch.Tensor]) -> None:
    got = seg.model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k].cpu(), v), k
    assert not seg.model.training


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.shared
def test_state_dict_matches_official_key_file():
    lines = _reference("state_dict_keys.txt").read_text().splitlines()
    expected = [tuple(line.split("\t")) for line in lines if line.strip()]
    got = [(k, str(tuple(v.shape))) for k, v in U.UniverSeg().state_dict().items()]
    assert got == expected


@pytest.mark.shared
def test_reproduces_official_logits():
    state = torch.load(_reference("random_init_state_dict.pt"), map_location="cpu", weights_only=True)
    case = torch.load(_reference("io_case.pt"), map_location="cpu", weights_only=True)
    model = U.UniverSeg().eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(case["target_image"], case["support_images"], case["support_labels"])
        # a support set shared by the batch, passed as an expand-ed view, takes the convolve-once path
        si, sl = case["support_images"][:1], case["support_labels"][:1]
        shared = model(case["target_image"], si.expand(2, -1, -1, -1, -1), sl.expand(2, -1, -1, -1, -1))
        copied = model(case["target_image"], si.repeat(2, 1, 1, 1, 1), sl.repeat(2, 1, 1, 1, 1))
    assert out.shape == case["logits"].shape
    assert (out - case["logits"]).abs().max().item() <= 1e-4
    torch.testing.assert_close(shared, copied, rtol=0, atol=1e-5)


def test_forward_checks_shapes():
    model = U.UniverSeg()
    with pytest.raises(ValueError, match="support_images"):
        model(torch.zeros(1, 1, 16, 16), torch.zeros(1, 2, 1, 8, 8), torch.zeros(1, 2, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 12, 12), torch.zeros(1, 2, 1, 12, 12), torch.zeros(1, 2, 1, 12, 12))


# ------------------------------------------------------------------------------------------ weights
def test_weights_argument(weights_file, tiny_state, no_sources):
    seg = U.UniverSegSegmenter(weights=weights_file)
    _assert_loaded(seg, tiny_state)
    assert seg.spec() == {"name": "universeg", "weights": str(weights_file), "chunk_size": 16}


def test_wrapped_checkpoint(tmp_path, tiny_state, no_sources):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}, "epoch": 3}, path)
    _assert_loaded(U.UniverSegSegmenter(weights=str(path)), tiny_state)


def test_env_var(weights_file, tiny_state, no_sources, monkeypatch):
    monkeypatch.setenv(U.WEIGHTS_ENV_VAR, str(weights_file))
    seg = U.UniverSegSegmenter()
    _assert_loaded(seg, tiny_state)
    assert seg.weights == str(weights_file)


def test_hub_cache(tmp_path, tiny_state, no_sources):
    cache = Path(torch.hub.get_dir()) / "checkpoints" / U.WEIGHTS_FILENAME
    cache.parent.mkdir(parents=True)
    torch.save(tiny_state, cache)
    seg = U.UniverSegSegmenter(download=False)
    _assert_loaded(seg, tiny_state)
    assert seg.weights == str(cache)


def test_download(tiny_state, no_sources, monkeypatch):
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append((url, kwargs))
        return {k: v.clone() for k, v in tiny_state.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    monkeypatch.setenv("SPE_NO_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError, match="SPE_NO_DOWNLOAD"):
        U.UniverSegSegmenter()  # download=None honours SPE_NO_DOWNLOAD
    with pytest.raises(FileNotFoundError, match="download=False"):
        U.UniverSegSegmenter(download=False)
    assert calls == []
    seg = U.UniverSegSegmenter(download=True)
    _assert_loaded(seg, tiny_state)
    assert [url for url, _ in calls] == [U.WEIGHTS_URL]
    assert U.WEIGHTS_URL == "https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt"
    assert calls[0][1].get("map_location") == "cpu" and calls[0][1].get("weights_only") is True


def test_all_sources_fail(no_sources):
    with pytest.raises(FileNotFoundError) as info:
        U.UniverSegSegmenter(download=True)
    msg = str(info.value)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / U.WEIGHTS_FILENAME
    for needle in ("weights=", "SPE_UNIVERSEG_WEIGHTS", str(cache), U.WEIGHTS_URL, "offline (test)"):
        assert needle in msg, needle


def test_auto_falls_back_without_weights(no_sources, monkeypatch):
    monkeypatch.setenv("SPE_NO_DOWNLOAD", "1")
    if reverse_base.DEFAULT_WEIGHT_FREE not in reverse_base.available_segmenters():
        pytest.skip("the weight-free default segmenter is not registered")
    seg, reason = reverse_base.resolve_auto()
    assert seg.name != "universeg" and "UniverSeg" in reason


def test_missing_explicit_paths_raise(tmp_path, weights_file, no_sources, monkeypatch):
    cache = Path(torch.hub.get_dir()) / "checkpoints" / U.WEIGHTS_FILENAME
    cache.parent.mkdir(parents=True)
    cache.write_bytes(weights_file.read_bytes())  # a fallback exists, but an explicit path must not fall through
    with pytest.raises(FileNotFoundError, match="does not exist"):
        U.UniverSegSegmenter(weights=tmp_path / "nope.pt")
    monkeypatch.setenv(U.WEIGHTS_ENV_VAR, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="SPE_UNIVERSEG_WEIGHTS"):
        U.UniverSegSegmenter()


def test_wrong_files_raise(tmp_path, tiny_state, no_sources):
    wrong = dict(tiny_state)
    wrong.pop("out_conv.conv.weight")
    wrong["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save(wrong, path)
    with pytest.raises(RuntimeError, match="missing keys: out_conv.conv.weight") as info:
        U.UniverSegSegmenter(weights=path)
    assert str(path) in str(info.value) and "unexpected keys: extra.weight" in str(info.value)

    shapes = dict(tiny_state)
    shapes["out_conv.conv.weight"] = torch.zeros(2, 64, 1, 1)
    torch.save(shapes, path)
    with pytest.raises(RuntimeError, match="wrong shapes"):
        U.UniverSegSegmenter(weights=path)

    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt"):
        U.UniverSegSegmenter(weights=junk)


# ------------------------------------------------------------------------------------------ segmenter
def test_segmenter_interface(weights_file, no_sources):
    torch.manual_seed(0)
    q, s, h, w = 3, 2, 96, 80
    queries = torch.rand(q, 1, h, w)
    support = torch.rand(s, 1, h, w)
    labels = (torch.rand(s, 1, h, w) > 0.5).float()
    one_chunk = U.UniverSegSegmenter(weights=weights_file, chunk_size=16)
    probs = one_chunk(queries, support, labels)
    assert probs.shape == (q, 1, h, w) and probs.dtype == torch.float32
    assert probs.device == queries.device
    assert probs.min() >= 0 and probs.max() <= 1 and probs.std() > 0
    chunked = U.UniverSegSegmenter(weights=weights_file, chunk_size=2)(queries, support, labels)
    torch.testing.assert_close(chunked, probs, rtol=0, atol=1e-5)
    # forwards split below chunk_size when the query x support pairs would overflow PyTorch's upsampling
    split = U.UniverSegSegmenter(weights=weights_file, chunk_size=16)
    split.MAX_PAIRS = 2 * s  # two queries per forward
    torch.testing.assert_close(split(queries, support, labels), probs, rtol=0, atol=1e-5)
    # each query depends on itself only, not on the others in its chunk
    torch.testing.assert_close(one_chunk(queries[1:2], support, labels), probs[1:2], rtol=0, atol=1e-5)


def test_registered(weights_file, no_sources):
    assert "universeg" in reverse_base.available_segmenters()
    seg = reverse_base.make_segmenter("universeg", weights=str(weights_file), chunk_size=4)
    assert isinstance(seg, U.UniverSegSegmenter) and seg.chunk_size == 4


def test_auto_never_downloads_without_opt_in(tiny_state, no_sources, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, *a, **k: calls.append(url) or tiny_state)
    monkeypatch.delenv("SPE_NO_DOWNLOAD", raising=False)
    monkeypatch.delenv("SPE_DOWNLOAD", raising=False)
    seg, reason = reverse_base.resolve_auto()
    assert calls == [] and seg.name == reverse_base.DEFAULT_WEIGHT_FREE
    assert len(reason) < 200 and "SPE_UNIVERSEG_WEIGHTS" in reason and "SPE_DOWNLOAD=1" in reason
    with pytest.raises(FileNotFoundError, match="SPE_DOWNLOAD=1"):
        U.UniverSegSegmenter()  # named, but still no implicit download
    assert calls == []
    monkeypatch.setenv("SPE_DOWNLOAD", "1")
    assert reverse_base.resolve_auto()[0].name == "universeg" and calls == [U.WEIGHTS_URL]


def test_auto_with_a_broken_weights_variable_is_an_error(tmp_path, no_sources, monkeypatch):
    missing = tmp_path / "nope.pt"
    monkeypatch.setenv(U.WEIGHTS_ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        reverse_base.resolve_auto()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not torch")
    monkeypatch.setenv(U.WEIGHTS_ENV_VAR, str(corrupt))
    with pytest.raises(RuntimeError, match=str(corrupt)):
        reverse_base.resolve_auto()
