"""Mirror consistency: how well the model's mask of a case agrees with its mask of the mirrored case.

The model segments each image twice, as it is and mirrored left-right; the second mask is mirrored back and the
two are compared by Dice (1 where both are empty). Where the model is sure of what it sees, mirroring moves the
mask with the image; where it is not (a spurious blob on a lesion-free image, a boundary it guesses), the two
masks part. Test-time mirroring is the usual augmentation of medical segmentation (nnU-Net mirrors by default),
so this costs one more forward per case and needs nothing but the model, at fit time and at use time alike.

It is one of the per-case signals a run target's map may stack (:mod:`spe_lightning.percase.sites`); whether it
enters is chosen on development folds like every other signal (a model that never saw mirrored anatomy reads
low everywhere, which the choice then finds no use for).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from torch import Tensor

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.percase.rca import per_case_dice
from spe_lightning.percase.scorer import PredictFn

__all__ = ["MIRROR", "mirror_consistency", "mirrored"]

#: the signal's name in the per-case stacks
MIRROR = "mirror"


def mirrored(data: CachedSet) -> CachedSet:
    """``data`` with every model input, gray image and mask mirrored left-right (the last axis)."""
    return replace(
        data,
        name=f"{data.name}_mirrored",
        inputs=[x.flip(-1) for x in data.inputs],
        gray=data.gray.flip(-1),
        masks=None if data.masks is None else [m.flip(-1) for m in data.masks],
    )


def mirror_consistency(predict: PredictFn, data: CachedSet, masks: Sequence[Tensor]) -> np.ndarray:
    """Per case, the Dice between ``masks`` (the model's masks of ``data``) and its masks of the mirrored cases
    mirrored back (foreground of any class; 1 where both are empty). ``predict`` is the estimator's prediction."""
    if len(masks) != len(data.inputs):
        raise ValueError(f"mirror_consistency: {len(masks)} masks for {len(data.inputs)} cases.")
    back = [m.flip(-1) for m in predict(mirrored(data))[0]]
    return per_case_dice(masks, back)
