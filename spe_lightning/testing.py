"""Tiny, fast models and datasets for tests and smoke checks (2D/3D, binary/multi-class, odd input formats).

Shipped in the package so that the test suite and ``benchmarks/cuda_smoke.py`` share one copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spe_lightning import SPECallback
from spe_lightning.data.adapters import split_item
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter


def blobs(g: torch.Generator, shape: tuple[int, ...], n_classes: int = 1, noise: float = 0.08) -> tuple[Tensor, Tensor]:
    """One image ``[1,*shape]`` with an ellipse (class 1) and, for 2 classes, a dimmer disc (class 2); labels long."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")

    def u(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=g))

    labels = torch.zeros(shape, dtype=torch.long)
    img = torch.full(shape, 0.2)
    for cls, (lo, hi), level in ((1, (0.3, 0.45), 0.9), (2, (0.2, 0.3), 0.55))[:n_classes]:
        c = [u(-0.5, 0.5) for _ in shape]
        r = [u(lo, hi) for _ in shape]
        inside = sum(((x - ci) / ri) ** 2 for x, ci, ri in zip(grids, c, r)) <= 1.0
        labels[inside & (labels == 0)] = cls
        img = torch.where(labels == cls, torch.full(shape, level), img)
    img = img + noise * torch.randn(shape, generator=g)
    return img.clamp(0, 1)[None], labels[None]


class Blobs(Dataset):
    """``n`` items of :func:`blobs`; ``fmt`` changes how they come out (the bad-input cases)."""

    def __init__(
        self,
        n: int = 12,
        shape: tuple[int, ...] = (32, 32),
        seed: int = 0,
        n_classes: int = 1,
        noise: float = 0.08,
        fmt: str = "dict",
        with_mask: bool = True,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [blobs(g, shape, n_classes, noise) for _ in range(n)]
        self.fmt, self.with_mask = fmt, with_mask

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        img, lab = self.items[i]
        mask: Tensor = lab.float() if self.fmt != "onehot" else F.one_hot(lab[0], 3).movedim(-1, 0).float()
        if self.fmt == "uint8":
            img = (img * 255).round().to(torch.uint8)
        elif self.fmt == "mask255":
            mask = (lab > 0).to(torch.uint8) * 255
        elif self.fmt == "rgb":
            img = img.expand(3, *img.shape[1:]).clone()
        elif self.fmt == "sizes" and i % 2:  # every other item is larger
            img = F.interpolate(img[None], scale_factor=1.5, mode="bilinear")[0]
            mask = F.interpolate(mask[None], scale_factor=1.5, mode="nearest")[0]
        if not self.with_mask:
            return (img,) if self.fmt == "tuple" else {"image": img}
        return (img, mask) if self.fmt == "tuple" else {"image": img, "label": mask}


class TinyNet(pl.LightningModule):
    """A few convolutions (2D or 3D) on any number of input channels; ``output``: "tensor", "dict" or "list".

    ``nan_epochs``: epochs whose weights make the forward return NaN (outside training steps).
    """

    def __init__(
        self,
        out_channels: int = 1,
        dims: int = 2,
        output: str = "tensor",
        nan_epochs: tuple[int, ...] = (),
        lr: float = 0.02,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.net = nn.Sequential(
            conv(3, 8, 3, padding=1),
            nn.ReLU(),
            conv(8, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
            conv(8, out_channels, 1),
        )
        self.linear = conv(3, out_channels, 1)
        self.output, self.nan_epochs, self.lr, self.scale = output, tuple(nan_epochs), lr, scale

    def logits(self, x: Tensor) -> Tensor:
        # fixed intensity-band features of the channel mean, so that a few steps learn the task
        x = x.float().mean(1, keepdim=True) * self.scale
        bands = [torch.sigmoid((x - t) * 20) for t in (0.375, 0.725)]
        f = torch.cat([x - 0.5, *bands], 1)
        return self.net(f) + self.linear(f)  # the linear path never dies

    def forward(self, x: Tensor) -> Any:
        y = self.logits(x)
        if not self.training and self._trainer is not None and self.current_epoch in self.nan_epochs:
            y = y * float("nan")
        if self.output == "dict":
            return {"logits": y, "aux": y.detach()}
        if self.output == "list":
            return [y, F.avg_pool2d(y, 2) if y.ndim == 4 else y]
        return y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        image, label = split_item(batch, require_label=True)
        y = self.logits(image)
        # class-balanced, so that the small structures are learnt within a few steps
        if y.shape[1] == 1:
            t = (label > 0.5).float()
            pos_weight = ((1 - t).sum() / t.sum().clamp_min(1)).clamp(1, 50)
            return F.binary_cross_entropy_with_logits(y, t, pos_weight=pos_weight)
        if label.shape[1] > 1:  # one-hot
            label = label.argmax(1, keepdim=True)
        t = label[:, 0].round().long()
        counts = torch.bincount(t.flatten(), minlength=y.shape[1]).float()
        weight = (counts.sum() / counts.clamp_min(1)).clamp(max=50)
        return F.cross_entropy(y, t, weight=weight / weight.min())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(ds: Dataset, batch_size: int = 6) -> DataLoader:
    """Unshuffled, so a run is reproducible (and a resumed one equals an uninterrupted one)."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def fast_segmenter() -> LabelFusionSegmenter:
    return LabelFusionSegmenter(size=16, k=3, search=1, thumb=8)


def tiny_spe(**kw: Any) -> SPECallback:
    args: dict[str, Any] = dict(
        segmenter=fast_segmenter(),
        support_size=6,
        working_size=32,
        min_foreground=4,
        metrics=("dice", "hd95"),
        seed=0,
        verbose=False,
    )
    args.update(kw)
    return SPECallback(**args)


def tiny_trainer(root: Any, epochs: int, callbacks: list, **kw: Any) -> pl.Trainer:
    opts: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def finite_everywhere(obj: Any) -> bool:
    """No NaN/inf float anywhere in a nested report (typed results are checked in their ``to_dict()`` form)."""
    if hasattr(obj, "to_dict"):
        return finite_everywhere(obj.to_dict())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, Mapping):
        return all(finite_everywhere(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_everywhere(v) for v in obj)
    return True


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest difference between two nested dicts of floats/None (inf when their structure differs; typed
    results are compared in their ``to_dict()`` form)."""
    a, b = (x.to_dict() if hasattr(x, "to_dict") else x for x in (a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return math.inf
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(float(a) - float(b))
