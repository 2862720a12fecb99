"""DDP helpers: this rank's share of SPE's work, and a gloo process group destroyed before its process exits."""

from __future__ import annotations

import atexit
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist

from spe_lightning.engine.spe_engine import Shard

__all__ = ["destroy_gloo_group_at_exit", "shard"]

_registered = False


def shard(trainer: pl.Trainer) -> Shard:
    """This rank's share of SPE's work; results are gathered, so every rank holds the same records."""
    world = trainer.world_size
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return Shard()
    destroy_gloo_group_at_exit()

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return Shard(trainer.global_rank, world, gather)


def destroy_gloo_group_at_exit() -> None:
    """Destroy a gloo default process group when this process exits (registered once; a no-op for other backends).

    A process that exits with its gloo group alive can abort at interpreter shutdown ("terminate called without an
    active exception", pytorch/pytorch#190489): a ``ddp_spawn`` worker then fails the fit after training finished.
    Lightning registers the same clean-up for NCCL only; SPE's gathers run over the user's gloo group, so SPE
    registers it there.
    """
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    atexit.register(_destroy_if_alive)
    _registered = True


def _destroy_if_alive() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
