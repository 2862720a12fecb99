"""spe_estimator.pt files (estimator/persistence.py): size checked on load, no download without the flag
(docs/security.md)."""

from __future__ import annotations

import pytest
import torch
from _inputs import tiny_estimator

from spe_lightning.estimator import IncompatibleEstimatorError, SPEEstimator


def test_estimator_size_is_checked_on_load(tmp_path):
    path = tmp_path / "big.pt"
    path.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(IncompatibleEstimatorError, match="above max_mb=1"):
        SPEEstimator.load(path, max_mb=1)


def test_estimator_files_never_download_without_the_flag(tmp_path, monkeypatch):
    from spe_lightning.reverse import UniverSeg

    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        return UniverSeg().state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("SPE_UNIVERSEG_WEIGHTS", raising=False)
    monkeypatch.delenv("SPE_NO_DOWNLOAD", raising=False)
    monkeypatch.setenv("SPE_DOWNLOAD", "1")
    path = tmp_path / "est.pt"
    spec = {"name": "universeg", "weights": "/elsewhere/universeg.pt", "chunk_size": 4, "download": True}
    torch.save(tiny_estimator(spec).state(embed_reference=False), path)
    with pytest.raises(FileNotFoundError, match="download=False"):
        SPEEstimator.load(path).segmenter  # noqa: B018
    assert calls == []
    assert SPEEstimator.load(path, allow_download=True).segmenter.name == "universeg"
    assert len(calls) == 1
