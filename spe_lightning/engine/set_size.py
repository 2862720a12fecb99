"""The calibration set's pseudo metric at a smaller set's size: the anchor of sets smaller than the calibrated ones.

A set's pseudo metric comes from a reverse step whose support is that set: a support of 4 images segments the
references worse than one of 48 whatever the model's quality (fewer atlases to fuse, fewer examples to propagate
from). Targets are never smaller than the random calibration subsets among the pairs, so the pairs hold that
effect for them; a chunk of a few incoming images is smaller, and anchoring it on the whole calibration set's
pseudo metric reads the smaller support as a worse model (5-image chunks estimated 0.60-0.75 against a real
0.80-0.87, every one alerted).

At fit end SPE therefore also measures *size probes*: disjoint random calibration subsets of 1, 2, 4, ... images
and of the pairs' smallest set size, a few of each. A set of ``n`` images smaller than the pairs' sets is anchored on
``calibration pseudo + (probe mean at n - probe mean at the pairs' size)`` (linear in ``log n`` between probe
sizes): the calibration set's pseudo metric as it would read with a support of ``n`` images. At the pairs' size
the shift is zero, so every set the pairs were calibrated for keeps its anchor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.shifts import subset

__all__ = ["PROBE_PREFIX", "calibration_pseudo_at", "probe_means", "probe_sets", "probe_sizes"]

#: the size probes' set names start with this (never a calibration pair)
PROBE_PREFIX = "size_probe"


def probe_sizes(reference_size: int) -> list[int]:
    """1, 2, 4, ... below ``reference_size`` (the pairs' smallest set), then ``reference_size`` itself."""
    if reference_size < 2:
        return []
    return [2**k for k in range(int(math.log2(reference_size - 1)) + 1)] + [int(reference_size)]


def probe_sets(calibration: CachedSet, reference_size: int, draws: int, seed: int = 0) -> dict[str, CachedSet]:
    """The size probes by set name (``size_probe{m}_{k}``): for each of :func:`probe_sizes`, up to ``draws``
    disjoint random calibration subsets of ``m`` images (fewer when the calibration set cannot fill them)."""
    n = len(calibration)
    if draws < 1 or n < 2:
        return {}
    g = torch.Generator().manual_seed(seed * 104729 + 17)
    sets: dict[str, CachedSet] = {}
    for m in probe_sizes(min(reference_size, n)):
        order = torch.randperm(n, generator=g).tolist()
        for k in range(min(draws, n // m)):
            pos = sorted(order[k * m : (k + 1) * m])
            name = f"{PROBE_PREFIX}{m}_{k}"
            sets[name] = subset(calibration, pos, name)
    return sets


def probe_means(
    pseudo: Mapping[str, Mapping[str, float | None]], sets: Mapping[str, CachedSet], keys: Sequence[str]
) -> dict[str, Any]:
    """``{"reference_size": the largest probe size, "values": {key: [[size, mean pseudo], ...]}}`` from the
    probes' pseudo metrics (``pseudo``: set name -> key -> value); a size whose probes gave no value is left out."""
    by_size: dict[int, list[str]] = {}
    for name, data in sets.items():
        by_size.setdefault(len(data), []).append(name)
    values: dict[str, list[list[float]]] = {}
    for key in keys:
        rows = []
        for m in sorted(by_size):
            got = [pseudo.get(s, {}).get(key) for s in by_size[m]]
            got = [float(v) for v in got if v is not None and math.isfinite(v)]
            if got:
                rows.append([m, float(np.mean(got))])
        values[key] = rows
    return {"reference_size": max(by_size) if by_size else None, "values": values}


def calibration_pseudo_at(
    pseudo_calibration: float | None, probes: Mapping[str, Any] | None, key: str, n_images: int | None
) -> float | None:
    """The calibration pseudo metric a set of ``n_images`` is anchored on: ``pseudo_calibration`` itself unless the
    set is smaller than the probes' reference size, then shifted by the probes' change from that size down to
    ``n_images`` (linear in ``log n``; below the smallest probe, the smallest probe's). None probes, an unknown
    size, or no probe value at the reference size: ``pseudo_calibration`` unchanged."""
    ref = (probes or {}).get("reference_size")
    rows = sorted(((int(m), float(v)) for m, v in ((probes or {}).get("values") or {}).get(key, [])))
    if pseudo_calibration is None or not isinstance(n_images, int) or not isinstance(ref, int) or n_images >= ref:
        return pseudo_calibration
    at = dict(rows)
    if ref not in at or len(at) < 2:
        return pseudo_calibration
    sizes = np.log([m for m, _ in rows])
    value = float(np.interp(math.log(max(n_images, 1)), sizes, [v for _, v in rows]))
    return float(pseudo_calibration) + value - at[ref]
