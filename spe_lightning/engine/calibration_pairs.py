"""Labelled calibration pairs for the anchored intervals: calibration subsets and shifted copies.

At the final weights SPE evaluates, next to the calibration set itself, sets whose real difference
from it is known: random subsets as large as each target (sampling noise only) and the calibration
set under synthetic appearance shifts (:mod:`spe_lightning.engine.shifts`), harmful ones (noise,
bias field) and nearly harmless ones (gamma, contrast, blur). Each gives one pair
``(pseudo difference, real difference)``; :func:`~spe_lightning.engine.estimate.fit_interval_model`
turns them into an interval model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set, subset

__all__ = [
    "INTERVAL_SEVERITIES",
    "calibration_sets",
    "independent_set_scale",
    "pairs_for_target",
    "pairs_from_record",
    "subset_sizes_of",
]

#: severities of each shift family measured for the intervals
INTERVAL_SEVERITIES = (2,)


def subset_sizes_of(n_calibration: int, target_sizes: Sequence[int]) -> list[int]:
    """The sizes of the random calibration subsets for targets of ``target_sizes`` images: each at least 2 and at
    most ``n_calibration - 1`` (none when the calibration set has 2 images or fewer), each size once."""
    if n_calibration <= 2:
        return []
    return sorted({min(max(int(s), 2), n_calibration - 1) for s in target_sizes})


def calibration_sets(
    calibration: CachedSet,
    subset_sizes: Sequence[int],
    n_subsets: int = 2,
    shifts: Sequence[tuple[str, int]] | None = None,
    seed: int = 0,
) -> dict[str, CachedSet]:
    """The labelled sets the interval model learns from, by name: random calibration subsets and shifted copies.

    Args:
        calibration: the labelled calibration set.
        subset_sizes: sizes of the random calibration subsets (normally the targets' sizes; capped below n).
        n_subsets: subsets per size.
        shifts: synthetic shifts ``(family, severity)`` applied to the whole calibration set
            (None: every family of :data:`~spe_lightning.engine.shifts.SHIFT_FAMILIES` at
            :data:`INTERVAL_SEVERITIES`, the product's default).
        seed: seed of the subsets and shift noise.
    """
    if shifts is None:
        shifts = [(f, s) for f in SHIFT_FAMILIES for s in INTERVAL_SEVERITIES]
    g = torch.Generator().manual_seed(seed)
    n = len(calibration)
    sets: dict[str, CachedSet] = {}
    for size in subset_sizes_of(n, subset_sizes):
        for k in range(n_subsets):
            pos = sorted(torch.randperm(n, generator=g)[:size].tolist())
            sets[f"subset{size}_{k}"] = subset(calibration, pos, f"subset{size}_{k}")
    for i, (family, severity) in enumerate(shifts):
        t = shift_set(calibration, family, severity, seed=seed * 7919 + 1000 * i)
        sets[t.name] = t
    return sets


def pairs_from_record(
    record: dict[str, Any], base: str, names: Sequence[str], targets: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """``(pseudo difference, real difference)`` of each set in ``names`` against set ``base`` of one record,
    with the set's mean per-case confidence (Soft Dice Confidence). ``targets`` maps a target-styled set's name
    to its target: that pair is of kind ``"styled"`` and carries ``"target"`` (it joins only that target's
    move/interval model, :func:`pairs_for_target`); the other pairs carry no ``"target"``."""
    targets = targets or {}
    pairs = []
    for name in names:
        kind = "styled" if name in targets else ("subset" if name.startswith("subset") else "shift")
        pair = {
            "kind": kind,
            "name": name,
            "d_pseudo": _diff(record["pseudo"].get(name, {}), record["pseudo"].get(base, {})),
            "d_real": _diff(record["real"].get(name, {}), record["real"].get(base, {})),
            "confidence": record.get("confidence", {}).get(name),
        }
        if name in targets:
            pair["target"] = targets[name]
        pairs.append(pair)
    return pairs


def pairs_for_target(pairs: Sequence[dict[str, Any]], target: str | None) -> list[dict[str, Any]]:
    """The pairs of ``target``'s move/interval model: every generic pair (no ``"target"`` key) and the pairs
    made for that target (``target=None``: the generic ones only)."""
    return [p for p in pairs if p.get("target") is None or (target is not None and p.get("target") == target)]


def independent_set_scale(pair: dict[str, Any]) -> float:
    """How much larger a random subset pair's differences would be for an independent set of its size.

    A subset of ``n`` of the ``N`` calibration images shares images with the set it is compared with: its mean
    differs from the calibration's with variance ``sigma^2 (N - n) / (n (N - 1))``, while a target of ``n`` new
    images differs with variance ``sigma^2 (1 / n + 1 / N)`` (12 of 24 images: 2.9 times more). A subset pair's
    ``(d_pseudo, d_real)`` is multiplied by the square root of that ratio so that it stands for the sampling
    noise of a new set. The ratio is taken at most at ``n = N / 2``: a larger subset differs from the calibration
    set by the few images it leaves out and by the reverse step's own noise, which do not scale like a mean (23 of
    24 images would be scaled 6.7 times, 155 of 156 17.6 times). Shifted and styled pairs (the calibration images
    themselves), and pairs without ``n`` and ``n_calibration`` (older runs): 1.
    """
    n, big_n = pair.get("n"), pair.get("n_calibration")
    if pair.get("kind") != "subset" or not isinstance(n, int) or not isinstance(big_n, int) or not 0 < n < big_n:
        return 1.0
    m = min(n, big_n / 2)
    return math.sqrt((big_n + m) * (big_n - 1) / (big_n * (big_n - m)))


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {m: (a[m] - b[m]) if a.get(m) is not None and b.get(m) is not None else None for m in a}
