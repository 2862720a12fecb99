"""Small inputs shared by the tests of bad input (docs/reliability.md) and of input files (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spe_lightning import SPECallback
from spe_lightning.config import SPEConfig
from spe_lightning.estimator import FittedSPE, SPEEstimator
from spe_lightning.testing import Blobs, TinyNet, tiny_spe


def sets(fmt: str = "dict", n_classes: int = 1, **kw):
    """(reference, calibration, {"t": target}) of blob images in the item format ``fmt``."""
    return (
        Blobs(16, seed=1, n_classes=n_classes, fmt=fmt, **kw),
        Blobs(10, seed=2, n_classes=n_classes, fmt=fmt, **kw),
        {"t": Blobs(10, seed=3, n_classes=n_classes, noise=0.15, fmt=fmt, **kw)},
    )


def prepared(fmt: str = "dict", **kw) -> SPECallback:
    """A tiny callback whose run has read :func:`sets` (no trainer)."""
    cb = tiny_spe(**kw)
    cb.run.prepare(*sets(fmt))
    return cb


def trained_net(**kw) -> TinyNet:
    """A TinyNet after a few quick steps (so that it predicts foreground), eval-ready."""
    torch.manual_seed(0)
    net = TinyNet(**kw)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    ref = Blobs(16, seed=1)
    batch = {"image": torch.stack([it["image"] for it in ref]), "label": torch.stack([it["label"] for it in ref])}
    for _ in range(30):
        opt.zero_grad()
        net.training_step(batch, 0).backward()
        opt.step()
    return net


def scaled_net(net: TinyNet) -> TinyNet:
    """``net`` for inputs in 0..255 (the user's own scaling, as a logits_fn would do)."""
    out = TinyNet(scale=1 / 255)
    out.load_state_dict(net.state_dict())
    return out


def png(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    """An 8-bit gray PNG filled with ``value`` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def tiny_estimator(spec: dict) -> SPEEstimator:
    """An estimator holding only settings and a segmenter spec: enough to save, load and build its segmenter."""
    cfg = SPEConfig(metrics=("dice",), support_size=4, min_foreground=1, working_size=32)
    return SPEEstimator(FittedSPE(cfg, spec))
