"""A disk cache of fitted reverse-segmenter weights, shared between runs on the same references.

A learned reverse segmenter is fitted once per run on the references (about a minute on 2 CPU
cores). Users re-run fits on the same data many times, so the fitted weights are kept on disk,
keyed by a hash of the reference images and labels, the segmenter's settings, the seed and this
package's version: a later run with the same key loads them instead of fitting again. Files hold
plain tensors and strings and are read with ``torch.load(weights_only=True)``: a cache file never
runs code. Writes are atomic (a temporary file renamed into place), so concurrent processes (DDP
ranks, parallel jobs) never read a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENV_VAR",
    "cache_file",
    "content_key",
    "default_cache_dir",
    "load_cached",
    "resolve_cache_dir",
    "save_cached",
]

#: environment variable that overrides the default cache folder ("" disables the cache)
ENV_VAR = "SPE_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/spe_lightning`` or ``~/.cache/spe_lightning``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spe_lightning"


def resolve_cache_dir(setting: str | None) -> Path | None:
    """The folder for a ``fit_cache`` setting: ``"auto"`` is ``$SPE_CACHE_DIR`` when set (empty: no
    cache), else :func:`default_cache_dir`; ``None`` or ``""`` is no cache; any other string a folder."""
    if setting == "auto":
        env = os.environ.get(ENV_VAR)
        if env is not None:
            return Path(env).expanduser() if env.strip() else None
        return default_cache_dir()
    return Path(setting).expanduser() if setting else None


def content_key(images: Tensor, labels: Tensor, settings: dict[str, Any], seed: int, version: str) -> str:
    """Hex digest of what fitted weights depend on: the references' values, the settings, seed and version."""
    h = hashlib.sha256()
    for t in (images, labels):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    h.update(repr((sorted(settings.items()), int(seed), version)).encode())
    return h.hexdigest()


def cache_file(folder: Path, name: str, key: str) -> Path:
    """The cache file of segmenter ``name`` for ``key``."""
    return Path(folder) / f"{name}-{key[:32]}.pt"


def load_cached(path: Path, key: str) -> dict[str, Tensor] | None:
    """The tensors cached at ``path`` for ``key``; None when absent. Raises ``ValueError`` when the file
    exists but is not a cache file for this key (corrupt, foreign, or a hash-prefix collision)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise ValueError(f"unreadable cache file {path}: {err!r}") from err
    tensors = blob.get("tensors") if isinstance(blob, dict) else None
    if not isinstance(blob, dict) or blob.get("key") != key or not isinstance(tensors, dict):
        raise ValueError(f"{path} is not a cache file for these references and settings")
    if not tensors or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise ValueError(f"{path} holds no weights")
    return tensors


def save_cached(path: Path, key: str, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` for ``key`` to ``path`` atomically (creates the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": key, "tensors": {k: v.detach().cpu() for k, v in tensors.items()}}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
