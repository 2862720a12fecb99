"""A small phantom segmentation task generated in memory: the embedded default dataset.

Each image shows one bright, smoothly textured ellipse (the "organ", the foreground) among
smaller distractor blobs, on a smooth background with noise. Items are generated from
``(seed, index)`` so the data are identical on every machine and need no download.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["SyntheticShapesDataset", "SyntheticShapesDataModule", "make_phantom"]


def _gauss_blur(x: Tensor, sigma: float) -> Tensor:
    r = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(-1, -2))


def make_phantom(
    g: torch.Generator, size: int = 64, noise: float = 0.08, contrast: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One ``(image [1,S,S] in [0,1], mask [1,S,S] in {0,1})`` phantom drawn with generator ``g``."""

    def u(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=g))

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    # smooth background: a tilted gradient plus low-frequency texture
    bg = 0.25 + 0.1 * (u(-1, 1) * xx + u(-1, 1) * yy)
    bg = bg + 0.08 * _gauss_blur(torch.randn(1, 1, size, size, generator=g), size / 10)[0, 0] * 4
    img = bg.clone()
    # distractors: 2-3 small round blobs, a bit less bright than the organ
    for _ in range(int(u(2, 4))):
        cy, cx, r = u(-0.8, 0.8), u(-0.8, 0.8), u(0.06, 0.14)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img = torch.where(blob, img + 0.3 * contrast, img)
    # the organ: an ellipse of random pose, bright with soft texture
    cy, cx = u(-0.35, 0.35), u(-0.35, 0.35)
    a, b, th = u(0.25, 0.45), u(0.15, 0.3), u(0, math.pi)
    yr = (yy - cy) * math.cos(th) - (xx - cx) * math.sin(th)
    xr = (yy - cy) * math.sin(th) + (xx - cx) * math.cos(th)
    mask = ((yr / a) ** 2 + (xr / b) ** 2) <= 1.0
    tex = 0.05 * _gauss_blur(torch.randn(1, 1, size, size, generator=g), 1.5)[0, 0] * 3
    img = torch.where(mask, img + contrast * (0.35 + tex), img)
    img = _gauss_blur(img[None, None], 0.7)[0, 0]
    img = img + noise * torch.randn(size, size, generator=g)
    return img.clamp(0, 1)[None], mask.float()[None]


class SyntheticShapesDataset(Dataset):
    """``n`` phantom images; items ``{"image": [1,S,S], "label": [1,S,S]}`` (MONAI-style keys).

    Args:
        n: number of items.
        size: image side in pixels.
        seed: base seed; item ``i`` is drawn from ``seed * 100003 + i``.
        noise: standard deviation of additive Gaussian noise (raise it to make a shifted target).
        contrast: organ and distractor contrast (lower it to make a harder target).
    """

    def __init__(self, n: int = 64, size: int = 64, seed: int = 0, noise: float = 0.08, contrast: float = 1.0):
        if n < 1 or size < 16:
            raise ValueError(f"n must be >= 1 and size >= 16, got n={n}, size={size}.")
        self.n, self.size, self.seed, self.noise, self.contrast = n, size, seed, noise, contrast
        self._items = [self._make(i) for i in range(n)]

    def _make(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        img, mask = make_phantom(g, self.size, self.noise, self.contrast)
        return {"image": img, "label": mask}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self._items[i]


class SyntheticShapesDataModule(pl.LightningDataModule):
    """The embedded demo task: train/validation phantoms plus two unlabelled targets.

    Targets: ``"target"`` (same distribution as training) and ``"target_noisy"`` (stronger
    noise and lower contrast: a distribution shift on which the model does worse). Their masks
    are only used to show the true score beside SPE's estimate.
    """

    def __init__(
        self,
        n_train: int = 96,
        n_val: int = 32,
        n_target: int = 32,
        size: int = 64,
        batch_size: int = 16,
        seed: int = 0,
        shifted_noise: float = 0.2,
        shifted_contrast: float = 0.6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp: Any = self.hparams  # an AttributeDict (Lightning types it as a mapping)
        self.train_set = SyntheticShapesDataset(hp.n_train, hp.size, seed=hp.seed * 10 + 1)
        self.val_set = SyntheticShapesDataset(hp.n_val, hp.size, seed=hp.seed * 10 + 2)
        self.targets = {
            "target": SyntheticShapesDataset(hp.n_target, hp.size, seed=hp.seed * 10 + 3),
            "target_noisy": SyntheticShapesDataset(
                hp.n_target, hp.size, seed=hp.seed * 10 + 4, noise=hp.shifted_noise, contrast=hp.shifted_contrast
            ),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams["batch_size"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams["batch_size"])

    def spe_datasets(self) -> dict[str, object]:
        """``{"reference", "calibration", "target"}`` for SPECallback."""
        self.setup()
        return {"reference": self.train_set, "calibration": self.val_set, "target": self.targets}
