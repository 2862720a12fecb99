"""A reference segmentation LightningModule (MONAI UNet) used by the demo, CLI and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import Tensor

from spe_lightning.data.adapters import split_item

__all__ = ["SegmentationModel"]


class SegmentationModel(pl.LightningModule):
    """Binary (``out_channels=1``, sigmoid) or multi-class (softmax) 2D segmentation with a MONAI UNet.

    Args:
        in_channels: image channels.
        out_channels: 1 for binary foreground logits, C for C classes (background included).
        channels: UNet feature widths per level.
        strides: UNet down-sampling strides (one fewer than ``channels``).
        num_res_units: residual units per UNet block.
        lr: Adam learning rate.
        image_key / label_key: keys of dict batches.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        lr: float = 1e-3,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
        )
        binary = out_channels == 1
        self.loss = DiceCELoss(sigmoid=binary, softmax=not binary, to_onehot_y=not binary)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        image, label = split_item(batch, self.hparams["image_key"], self.hparams["label_key"], require_label=True)
        image, label = image.float(), label.float()
        logits = self(image)
        return logits, label, self.loss(logits, label)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        _, _, loss = self._step(batch)
        self.log(
            "train_loss",
            loss,
            prog_bar=True,
            batch_size=len(batch[self.hparams["image_key"]]) if isinstance(batch, dict) else None,
        )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, label, loss = self._step(batch)
        if logits.shape[1] == 1:
            pred = logits > 0
            fg = label > 0.5
        else:
            pred = logits.argmax(1, keepdim=True) > 0
            fg = label > 0
        inter = (pred & fg).flatten(1).sum(1).float()
        denom = (pred.flatten(1).sum(1) + fg.flatten(1).sum(1)).float()
        dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
        self.log("val_loss", loss, prog_bar=False, batch_size=len(dice))
        self.log("val_dice", dice.mean(), prog_bar=True, batch_size=len(dice))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
