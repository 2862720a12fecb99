"""DDP helpers: this rank's share of SPE's work."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist

from spe_lightning.engine.spe_engine import Shard

__all__ = ["shard"]


def shard(trainer: pl.Trainer) -> Shard:
    """This rank's share of SPE's work; results are gathered, so every rank holds the same records."""
    world = trainer.world_size
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return Shard()

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return Shard(trainer.global_rank, world, gather)
