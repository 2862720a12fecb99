"""The calibration set's pseudo metric at a smaller set's size: the anchor of sets smaller than the calibrated ones.

A set's pseudo metric comes from a reverse step whose support is that set: a support of 4 images segments the
references worse than one of 48 whatever the model's quality (fewer atlases to fuse, fewer examples to propagate
from). Targets are never smaller than the random calibration subsets among the pairs, so the pairs hold that
effect for them; a chunk of a few incoming images is smaller, and anchoring it on the whole calibration set's
pseudo metric reads the smaller support as a worse model (label fusion on JSRT lungs' development halves: 2-image
chunks 0.076 Dice low, 4-image chunks 0.034).

At fit end SPE therefore also measures *size probes*: disjoint random calibration subsets of 1, 2, 4, ... images
and of the pairs' smallest set size, a few of each. Their pseudo metrics are fitted on ``1 / size`` (least squares
weighted by size: a deficit that shrinks with every image added, as a fusion of fewer atlases does); a set of ``n``
images smaller than the pairs' sets is anchored on ``calibration pseudo + slope * (1 / n - 1 / pairs' size)``: the
calibration set's pseudo metric as it would read with a support of ``n`` images.
The slope is shrunk toward 0 by its standard error, so a reverse step whose pseudo metric does not depend on the
support's size (or probes too few to tell) leaves the anchor where it was. At the pairs' size the shift is zero:
every set the pairs were calibrated for keeps its anchor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.shifts import subset

__all__ = [
    "PROBE_PREFIX",
    "SHRINK_SE",
    "calibration_pseudo_at",
    "probe_sets",
    "probe_sizes",
    "probe_values",
    "size_slope",
]

#: the size probes' set names start with this (never a calibration pair)
PROBE_PREFIX = "size_probe"
#: a slope within this many standard errors of 0 is shrunk to 0 (the probes show no size effect to correct)
SHRINK_SE = 2.0


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


def probe_values(
    pseudo: Mapping[str, Mapping[str, float | None]], sets: Mapping[str, CachedSet], keys: Sequence[str]
) -> dict[str, Any]:
    """``{"reference_size": the largest probe size, "values": {key: [[size, pseudo], ...]}}``, one row per probe
    (``pseudo``: set name -> key -> value); a probe that gave no value is left out."""
    values: dict[str, list[list[float]]] = {}
    for key in keys:
        rows = [(len(data), pseudo.get(name, {}).get(key)) for name, data in sets.items()]
        values[key] = [[m, float(v)] for m, v in rows if v is not None and math.isfinite(v)]
    return {"reference_size": max((len(d) for d in sets.values()), default=None), "values": values}


def size_slope(rows: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """``(slope, standard error)`` of the probes' pseudo metric on ``1 / size``: least squares weighted by size (the
    noise of a set's pseudo metric falls as ``1 / size``); None with fewer than 3 probes or fewer than 2 sizes."""
    m = np.asarray([r[0] for r in rows], float)
    v = np.asarray([r[1] for r in rows], float)
    if len(m) < 3 or len(np.unique(m)) < 2:
        return None
    x = 1.0 / m
    xc, vc = x - np.average(x, weights=m), v - np.average(v, weights=m)
    sxx = float(np.sum(m * xc**2))
    slope = float(np.sum(m * xc * vc) / sxx)
    sigma2 = float(np.sum(m * (vc - slope * xc) ** 2)) / (len(m) - 2)  # noise variance of a 1-image set
    return slope, math.sqrt(sigma2 / sxx)


def calibration_pseudo_at(
    pseudo_calibration: float | None, probes: Mapping[str, Any] | None, key: str, n_images: int | None
) -> float | None:
    """The calibration pseudo metric a set of ``n_images``, smaller than the probes' reference size, is anchored on:
    ``pseudo_calibration`` moved along the probes' slope on ``1 / size`` from the reference size down to
    ``n_images``. The slope is shrunk toward 0 by its standard error (``b * max(0, 1 - (2 se / b)^2)``): probes whose
    slope is within two standard errors of 0 leave the anchor where it was. None where the probes do not apply (a
    set as large as the reference, no probes, an unknown size, fewer than 3 probes): the whole calibration set's
    pseudo metric is the anchor."""
    ref = (probes or {}).get("reference_size")
    if pseudo_calibration is None or not isinstance(n_images, int) or not isinstance(ref, int) or n_images >= ref:
        return None
    fit = size_slope(((probes or {}).get("values") or {}).get(key, []))
    if fit is None:
        return None
    slope, se = fit
    shrunk = slope * max(0.0, 1.0 - (SHRINK_SE * se / slope) ** 2) if slope != 0 and math.isfinite(se) else 0.0
    return float(pseudo_calibration) + shrunk * (1.0 / max(n_images, 1) - 1.0 / ref)
