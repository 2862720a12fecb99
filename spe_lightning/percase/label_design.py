"""Which target cases to label for a prediction-powered estimate: strata of SPE's per-case uncertainty, Neyman
allocation, the seeded draw (:func:`stratified_design`) and the design it records (:class:`LabelDesign`).

Plain NumPy; :func:`~spe_lightning.percase.ppi.stratified_ppi_mean` is the estimator that matches the design.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["LabelDesign", "default_strata", "stratified_design", "uncertainty_of"]


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values; PPI needs a number per case.")
    return a


@dataclass(frozen=True)
class LabelDesign:
    """A stratified random draw of cases to label (:func:`stratified_design`).

    ``strata[i]`` is case i's stratum; ``allocation[h]`` the labels stratum h gets; ``chosen`` the
    drawn positions (uniformly at random within each stratum, seeded by ``seed``).
    """

    strata: list[int]
    allocation: list[int]
    chosen: list[int]
    seed: int
    rule: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelDesign:
        """The design of a :meth:`to_dict` dict."""
        missing = {"strata", "allocation", "chosen"} - set(d)
        if missing:
            raise ValueError(f"not a label design: missing {sorted(missing)}.")
        return cls(
            strata=[int(s) for s in d["strata"]],
            allocation=[int(a) for a in d["allocation"]],
            chosen=[int(c) for c in d["chosen"]],
            seed=int(d.get("seed", 0)),
            rule=str(d.get("rule", "")),
        )


def uncertainty_of(pred: ArrayLike) -> np.ndarray:
    """The per-case uncertainty the suggestions stratify on: ``sqrt(p (1 - p))`` of the estimated metric
    ``p`` in [0, 1] (the spread of a score bounded by 0 and 1; largest for middling estimates), floored
    at 0.05 so no stratum is left without labels by the allocation."""
    p = np.clip(_vector(pred, "pred"), 0.0, 1.0)
    return np.maximum(np.sqrt(p * (1.0 - p)), 0.05)


def default_strata(k: int) -> int:
    """Strata for ``k`` labels: one per 5 labels, between 1 and 4 (each stratum gets at least 2 labels)."""
    return int(max(1, min(4, k // 5)))


def _neyman(sizes: np.ndarray, spread: np.ndarray, k: int) -> np.ndarray:
    """Labels per stratum proportional to size x spread, at least 2 (or the stratum's size), summing to ``k``."""
    alloc = np.minimum(sizes, 2)
    left = k - int(alloc.sum())
    while left > 0:
        room = alloc < sizes
        # the stratum whose share of the remaining labels is furthest from reached gets the next label
        want = sizes * spread / max(float((sizes * spread)[room].sum()), 1e-12) * k
        gap = np.where(room, want - alloc, -np.inf)
        alloc[int(np.argmax(gap))] += 1
        left -= 1
    return alloc


def stratified_design(
    uncertainty: ArrayLike, k: int, n_strata: int | None = None, seed: int = 0, exclude: Sequence[int] = ()
) -> LabelDesign:
    """Which ``k`` cases to label: strata by uncertainty, Neyman allocation, uniform draws within strata.

    Args:
        uncertainty: one value per target case, computed without labels (e.g. :func:`uncertainty_of` of
            SPE's per-case estimated Dice).
        k: labels to draw (at least 2 per stratum).
        n_strata: strata (equal-size groups of increasing uncertainty); None: :func:`default_strata`.
        seed: seeds the draw; the same inputs and seed give the same cases.
        exclude: positions that cannot be labelled (never drawn; they stay in their strata).
    """
    u = _vector(uncertainty, "uncertainty")
    n = u.size
    h = default_strata(k) if n_strata is None else int(n_strata)
    if h < 1:
        raise ValueError(f"n_strata must be >= 1, got {h}.")
    h = min(h, max(1, k // 2), max(1, n // 2))
    if k < 2 or k > n:
        raise ValueError(f"k must be between 2 and the number of cases ({n}), got {k}.")
    order = np.argsort(u, kind="stable")
    strata = np.empty(n, dtype=int)
    for s, part in enumerate(np.array_split(order, h)):
        strata[part] = s
    blocked = np.zeros(n, dtype=bool)
    blocked[list(exclude)] = True
    sizes = np.array([int(((strata == s) & ~blocked).sum()) for s in range(h)])
    if int(sizes.sum()) < k:
        raise ValueError(f"only {int(sizes.sum())} cases can be labelled; asked for {k}.")
    spread = np.array([float(u[strata == s].mean()) for s in range(h)])
    alloc = _neyman(sizes, spread, k)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for s in range(h):
        pool = np.flatnonzero((strata == s) & ~blocked)
        chosen.extend(int(i) for i in rng.choice(pool, size=int(alloc[s]), replace=False))
    rule = (
        f"{h} strata of equal size by per-case uncertainty; labels per stratum proportional to size x mean "
        "uncertainty (Neyman), at least 2; cases drawn uniformly at random within each stratum"
    )
    return LabelDesign([int(s) for s in strata], [int(a) for a in alloc], sorted(chosen), int(seed), rule)
