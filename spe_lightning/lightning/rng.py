"""SPE's work inside a training run leaves the user's random streams where it found them.

A monitoring callback must not change the model it monitors: whatever SPE draws in its hooks (a network built
with random initial weights before its file is read, a shuffled support order), the global torch (CPU, and the
current CUDA device once CUDA is initialised), NumPy and Python generators are restored afterwards, so a run with
:class:`~spe_lightning.SPECallback` trains the same weights as the same run without it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["users_rng_kept"]


@contextmanager
def users_rng_kept() -> Iterator[None]:
    """Run the block, then restore the global torch, NumPy and Python random states as they were before it."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
