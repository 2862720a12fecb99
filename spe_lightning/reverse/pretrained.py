"""The shipped pretrained weights of the learned label propagation's encoder.

The file ``weights/learned_propagation_v<VERSION>.pt`` inside the package holds plain tensors and
strings (read with ``torch.load(weights_only=True)``: it never runs code). It is checked before use:
its SHA-256 must equal :data:`WEIGHTS_SHA256` and its header must name this format, version and
architecture; anything else raises an error that says what is wrong and how to fix it. The weights
were pretrained on procedurally generated tasks only (no dataset of ../shared, no patient image), by
``scripts/pretrain_reverse.py``; ``docs/pretrained_reverse.md`` gives the recipe and how to
reproduce them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURE",
    "WEIGHTS_FILE",
    "WEIGHTS_SHA256",
    "WEIGHTS_VERSION",
    "check_architecture",
    "check_pretrained_settings",
    "datasets_seen",
    "file_sha256",
    "load_pretrained",
    "pretrained_id",
    "save_pretrained",
    "weights_recipe",
]

#: version of the shipped weights: a new recipe or a retrained file gets a new version (and file name)
WEIGHTS_VERSION = "2"
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / f"learned_propagation_v{WEIGHTS_VERSION}.pt"
#: SHA-256 of :data:`WEIGHTS_FILE` as shipped (printed by ``scripts/pretrain_reverse.py``)
WEIGHTS_SHA256 = "d2bd60e17a5e5b7585025df02bbbb4c14df575a23c374bafd3033eae5d90054e"
#: the encoder settings the weights were trained with (``LearnedPropagationSegmenter`` arguments)
ARCHITECTURE: dict[str, Any] = {"width": 32, "dim": 16, "downsample": 2, "coords": True}
FORMAT = "spe_lightning/learned_propagation/pretrained"


def pretrained_id(path: Path | str | None = None) -> str:
    """A short name of the weights for fit-cache keys and reports: ``v<version>-<checksum>`` for the shipped
    file, ``file-<checksum>`` for another file (``path``; e.g. weights retrained with the script)."""
    if path is None:
        return f"v{WEIGHTS_VERSION}-{WEIGHTS_SHA256[:16]}"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The pretrained weights {path} are missing (weights= names a file that is not there).")
    return f"file-{file_sha256(path)[:16]}"


def check_architecture(**settings: Any) -> None:
    """Raise ``ValueError`` unless ``settings`` match the architecture of the shipped weights."""
    wrong = {k: v for k, v in settings.items() if k in ARCHITECTURE and ARCHITECTURE[k] != v}
    if wrong:
        raise ValueError(
            f"pretrained=True needs the architecture of the shipped weights {ARCHITECTURE}; got {wrong}. "
            "Use those settings or pretrained=False (fit from scratch)."
        )


def check_pretrained_settings(
    pretrained: object, adapt_steps: int, adapt_lr: float, weights: object, **architecture: Any
) -> None:
    """Raise a clear error for bad pretraining settings of ``learned_propagation`` (``architecture``: its encoder's)."""
    if not isinstance(pretrained, (bool, int)):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}.")
    if adapt_steps < 0 or adapt_lr <= 0:
        raise ValueError(f"adapt_steps must be >= 0 and adapt_lr > 0; got {adapt_steps}, {adapt_lr}.")
    if weights is not None and not pretrained:
        raise ValueError(f"weights={weights!r} is where an adaptation starts: it needs pretrained=True.")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise TypeError(f"weights must be the path of a weights file, got {weights!r}.")
    if pretrained:
        check_architecture(**architecture)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pretrained(path: Path | str | None = None, sha256: str | None = None) -> dict[str, Tensor]:
    """The encoder's pretrained ``state_dict`` as plain CPU tensors.

    Without arguments: the shipped file, checked against :data:`WEIGHTS_SHA256`. With ``path`` (e.g. weights
    you retrained), the checksum is checked only when ``sha256`` is given; the header is always checked.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a corrupt or foreign one.
    """
    shipped = path is None
    path = WEIGHTS_FILE if path is None else Path(path)
    expected = WEIGHTS_SHA256 if shipped else sha256
    if not path.is_file():
        raise FileNotFoundError(
            f"The pretrained weights {path} are missing. Reinstall spe-lightning (the file ships inside the "
            "package) or use learned_propagation with pretrained=False (fit from scratch)."
        )
    if expected is not None:
        found = file_sha256(path)
        if found != expected:
            raise ValueError(
                f"The pretrained weights {path} have SHA-256 {found}, expected {expected}: the file is corrupt or "
                f"not version {WEIGHTS_VERSION} of the shipped weights. Reinstall spe-lightning, or use "
                "pretrained=False."
            )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise ValueError(f"The pretrained weights {path} cannot be read as plain tensors: {err!r}") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a learned_propagation weights file (no '{FORMAT}' header).")
    if blob.get("architecture") != json.dumps(ARCHITECTURE, sort_keys=True):
        raise ValueError(f"{path} holds weights of architecture {blob.get('architecture')}, not {ARCHITECTURE}.")
    tensors = blob.get("tensors")
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise ValueError(f"{path} holds no weights.")
    return {str(k): v.clone() for k, v in tensors.items()}


def weights_recipe(path: Path | str | None = None) -> dict[str, Any]:
    """The recipe stored in a weights file's header (the shipped file without ``path``): how it was trained and
    on what (``"datasets"``: the dataset tasks it saw besides the synthetic ones; absent or empty: none)."""
    blob = torch.load(WEIGHTS_FILE if path is None else Path(path), map_location="cpu", weights_only=True)
    recipe = json.loads(blob.get("recipe", "{}")) if isinstance(blob, dict) else {}
    return recipe if isinstance(recipe, dict) else {}


def datasets_seen(path: Path | str | None = None) -> list[str]:
    """Names of the datasets whose train splits a weights file was pretrained on (``[]``: synthetic tasks only)."""
    entries = weights_recipe(path).get("datasets") or []
    return sorted({str(e).split(":")[0] for e in entries})


def save_pretrained(path: Path, tensors: dict[str, Tensor], recipe: dict[str, Any]) -> str:
    """Write an encoder ``state_dict`` and its ``recipe`` (JSON-safe) atomically; returns the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "version": WEIGHTS_VERSION,
        "architecture": json.dumps(ARCHITECTURE, sort_keys=True),
        "recipe": json.dumps(recipe, sort_keys=True),
        "tensors": {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def check_adapt_layers(adapt_layers: object, pretrained: bool, downsample: int) -> int:
    """``adapt_layers`` of ``learned_propagation`` checked: an int from 0 (all layers adapt) to the encoder's number
    of convolutions, and only with a pretrained start."""
    convs = downsample + 5  # PropagationEncoder: the first, the stride-2 ones, three dilated, the 1x1 projection
    if isinstance(adapt_layers, bool) or not isinstance(adapt_layers, int) or not 0 <= adapt_layers <= convs:
        raise ValueError(f"adapt_layers must be an int from 0 (all) to {convs} convolutions, got {adapt_layers!r}.")
    if adapt_layers and not pretrained:
        raise ValueError(
            f"adapt_layers={adapt_layers} freezes the other layers at their pretrained weights: it needs "
            "pretrained=True (a fit from scratch trains every layer)."
        )
    return adapt_layers


@contextmanager
def adapting_only_the_last(encoder: nn.Module, layers: int) -> Iterator[None]:
    """Inside, every convolution of ``encoder`` but the last ``layers`` keeps its weights (no gradient, so the
    backward pass ends at the first adapted layer); ``layers=0`` changes nothing."""
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    frozen = [p for m in convs[: len(convs) - layers] for p in m.parameters()] if layers else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
