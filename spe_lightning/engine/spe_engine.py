"""One SPE evaluation: support sets from predicted masks, the reverse step, pseudo and real metrics.

Binary (one foreground) or multi-class: with ``class_names`` the masks are uint8 label maps
(``j + 1`` = the j-th class) and every class gets its own support set and reverse step; its
metrics are keyed ``"<metric>/<class name>"`` and their mean over the classes ``"<metric>"``.

Work can be split over processes (:class:`Shard`): each one runs its share of the reference
queries and of the real-metric items, and the per-item results are gathered, so every process
ends with the same record.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from spe_lightning.data.adapters import resize_labels
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.metrics import per_image_metrics, per_item_metrics
from spe_lightning.reverse.base import ReverseSegmenter

__all__ = ["ChunkBudget", "SPEEngine", "Shard", "SupportSet", "metric_keys", "set_seed"]


def set_seed(seed: int, name: str) -> int:
    """A stable per-set seed (independent of Python's hash randomisation)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def metric_keys(metrics: Sequence[str], class_names: Sequence[str] | None) -> list[str]:
    """Record keys: the metrics (binary), or per metric its class mean then ``"<metric>/<class>"``."""
    if not class_names:
        return list(metrics)
    return [k for m in metrics for k in (m, *(f"{m}/{c}" for c in class_names))]


def _single(obj: Any) -> list[Any]:
    return [obj]


@dataclass
class Shard:
    """This process's share of the work: ``rank`` of ``world`` processes, and how to gather objects.

    ``gather(obj)`` returns every process's ``obj`` (rank order); it must be called by all
    processes in the same order (e.g. ``torch.distributed.all_gather_object``).
    """

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list[Any]] = field(default=_single)

    def part(self, n: int) -> list[int]:
        """This process's positions among ``n`` (strided, so shares differ by at most one)."""
        return list(range(self.rank, n, self.world))

    def run(self, fn: Callable[[], Any]) -> list[Any]:
        """Every process's ``fn()``; if one of them fails, all raise (the first failure), none hangs."""
        if self.world == 1:
            return [fn()]
        try:
            out: tuple[Any, BaseException | None] = (fn(), None)
        except Exception as err:  # re-raised below on every process
            out = (None, err)
        results = self.gather(out)
        for r, (_, failure) in enumerate(results):
            if failure is not None:
                if r == self.rank:
                    raise failure
                raise RuntimeError(f"SPE failed on process {r}: {failure!r}") from failure
        return [res for res, _ in results]

    def merge(self, parts: Sequence[Mapping[str, Tensor]], n: int) -> dict[str, Tensor]:
        """Per-item tensors computed on :meth:`part` of ``n`` by each process, back in item order."""
        out: dict[str, Tensor] = {}
        for r, part in enumerate(parts):
            for k, v in part.items():
                if k not in out:
                    out[k] = torch.empty(n, dtype=v.dtype)
                out[k][r :: self.world] = v
        return out


@dataclass
class SupportSet:
    """The support of one reverse step: working-size images, predicted masks and their dataset positions."""

    images: Tensor  # [S,1,w,w]
    labels: Tensor  # [S,1,w,w] float {0,1}
    indices: list[int]
    slices: list[int] = field(default_factory=list)  # slice of each support (3D), else empty


def _mean(values: Tensor) -> float | None:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else None


def _class_mask(labels: Tensor, cls: int) -> Tensor:
    return labels if labels.dtype == torch.bool else labels == cls


class ChunkBudget:
    """Sizes chunks of queries so that the reverse step's peak CUDA memory stays within ``limit`` bytes.

    Peak memory of a chunk of n queries is modelled as ``f + p * n`` (a fixed part, e.g. workspaces,
    and a part per query), fitted on the chunks seen so far: the first chunk holds 1 query, the
    second 2, then as many as the budget allows. ``fixed``: bytes already taken (the prepared support).
    """

    def __init__(self, limit: float) -> None:
        self.limit, self.fixed = limit, 0.0
        self.seen: dict[int, float] = {}  # chunk size -> largest peak seen
        self.warned = False

    def observe(self, n: int, peak: float) -> None:
        self.seen[n] = max(peak, self.seen.get(n, 0.0))

    def _too_small(self, needed: float) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"SPE: memory_budget_mb={self.limit / 2**20:.0f} is below what one query needs "
                f"(~{needed / 2**20:.0f} MiB); segmenting one query at a time.",
                stacklevel=4,
            )

    def next_chunk(self, remaining: int) -> int:
        """Queries in the next chunk (at least 1)."""
        if not self.seen:
            return 1
        if len(self.seen) == 1:  # two queries only where even 2x the one-query peak fits
            ((_, peak),) = self.seen.items()
            if self.fixed + peak > self.limit:
                self._too_small(self.fixed + peak)
            return 2 if self.fixed + 2 * peak <= self.limit and remaining > 1 else 1
        sizes = sorted(self.seen)
        lo, hi = sizes[0], sizes[-1]
        per_query = max((self.seen[hi] - self.seen[lo]) / (hi - lo), 1.0)
        base = max(peak - per_query * n for n, peak in self.seen.items())
        room = self.limit - self.fixed - base
        if room < per_query:
            self._too_small(self.fixed + base + per_query)
        return int(max(1, min(4096, max(remaining, 1), room // per_query)))


class SPEEngine:
    """Computes the pseudo metrics of a set of predictions by reverse segmentation.

    The queries are a fixed reference subset (labelled; for 3D, slices); for every set the support
    candidates (images, or slices of volumes) are visited in one fixed seeded order, so successive
    checkpoints reuse the same support images whenever their predicted masks are usable. Supports
    whose predicted mask has fewer than ``min_foreground`` pixels (at the working size) are dropped,
    as in the SPE paper. The reverse step and the metrics run on chunks of ``query_chunk`` queries
    (default: the segmenter's ``chunk_size``), so memory stays bounded whatever the number of references.

    Args:
        segmenter: the reverse (in-context) segmenter.
        reference: labelled reference set (queries of the reverse step).
        metrics: metric names (see :mod:`spe_lightning.engine.metrics`).
        support_size: maximum support images per reverse step (None: the segmenter's
            ``default_support_size``: the paper's 64, or 512 for the learned propagation).
        min_foreground: minimum predicted foreground pixels for a support mask.
        threshold: binarisation threshold of the reverse probabilities.
        seed: seed of the support orders.
        class_names: names of the classes of uint8 label masks (None: binary masks).
        query_chunk: queries per reverse step call (None: the segmenter's ``chunk_size``).
        memory_budget_mb: on CUDA, the memory the reverse step may allocate on top of what is already
            allocated; the chunk is sized from the measured cost of one query and halved on out-of-memory.
    """

    def __init__(
        self,
        segmenter: ReverseSegmenter,
        reference: CachedSet,
        metrics: Sequence[str],
        support_size: int | None = None,
        min_foreground: int = 16,
        threshold: float = 0.5,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        query_chunk: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> None:
        if reference.masks is None:
            raise ValueError("The SPE reference set needs ground-truth masks.")
        self.segmenter = segmenter
        self.metrics = tuple(metrics)
        if support_size is None:
            support_size = int(getattr(segmenter, "default_support_size", ReverseSegmenter.default_support_size))
        self.support_size, self.min_foreground = support_size, min_foreground
        self.threshold, self.seed = threshold, seed
        self.class_names = list(class_names) if class_names else None
        self.keys = metric_keys(self.metrics, self.class_names)
        self.query_chunk: int = query_chunk or int(getattr(segmenter, "chunk_size", 32))
        self.memory_budget_mb = memory_budget_mb
        size = tuple(reference.gray.shape[-2:])
        self.ref_images = reference.gray
        labels = [resize_labels(reference.unit_mask(r)[None], size) for r in range(len(reference.units))]
        self.ref_labels = torch.cat(labels) if labels else torch.zeros(0, 1, *size, dtype=torch.bool)
        self.ref_indices = [reference.indices[i] for i, _ in reference.units]
        self.ref_slices = [z for _, z in reference.units]
        self.queries = {
            c: torch.nonzero(_class_mask(self.ref_labels, c).flatten(1).any(1)).flatten().tolist()
            for c in range(1, self.n_classes + 1)
        }

    @property
    def n_classes(self) -> int:
        """1 for binary masks, else the number of named classes."""
        return len(self.class_names) if self.class_names else 1

    @property
    def ref_masks(self) -> Tensor:
        """Bool ``[U,1,w,w]`` foreground (any class) of the references."""
        return self.ref_labels if self.ref_labels.dtype == torch.bool else self.ref_labels > 0

    def _name(self, cls: int) -> str:
        return self.class_names[cls - 1] if self.class_names else "foreground"

    def classes_without_queries(self) -> list[str]:
        """Names of the classes (``"foreground"`` when binary) that no reference mask holds."""
        return [self._name(c) for c, q in self.queries.items() if not q]

    # ----------------------------------------------------------------- support
    def support(self, data: CachedSet, masks: Sequence[Tensor], cls: int = 1) -> SupportSet:
        """The support set of ``data`` for class ``cls`` with predicted ``masks`` (native size, per item)."""
        size = tuple(data.gray.shape[-2:])
        g = torch.Generator().manual_seed(set_seed(self.seed, data.name))
        order = torch.randperm(len(data.units), generator=g).tolist()
        chosen: list[int] = []
        labels: list[Tensor] = []
        for r in order:
            item, z = data.units[r]
            m = masks[item] if z < 0 else masks[item][:, z]
            m = _class_mask(resize_labels(m[None], size), cls)
            if int(m.sum()) >= self.min_foreground:
                chosen.append(r)
                labels.append(m)
                if len(chosen) == self.support_size:
                    break
        if not chosen:
            return SupportSet(data.gray[:0], data.gray[:0], [])
        return SupportSet(
            data.gray[chosen],
            torch.cat(labels).float(),
            [data.indices[data.units[r][0]] for r in chosen],
            [data.units[r][1] for r in chosen] if data.volumetric else [],
        )

    # ----------------------------------------------------------------- reverse step
    def _predict_chunk(self, idx: Sequence[int], prepared: Any, device: torch.device) -> Tensor:
        q = self.ref_images[list(idx)].to(device, torch.float32)
        probs = self.segmenter.predict(q, prepared)
        if probs.shape != q.shape:
            raise RuntimeError(
                f"{type(self.segmenter).__name__} returned shape {tuple(probs.shape)} for queries {tuple(q.shape)}."
            )
        return (probs.float() > self.threshold).cpu()

    @torch.no_grad()
    def reverse_metrics(
        self,
        support: SupportSet,
        device: torch.device | str = "cpu",
        cls: int = 1,
        queries: Sequence[int] | None = None,
    ) -> dict[str, Tensor]:
        """Per-query metrics ``{metric: [n]}`` of the reverse segmentation of class ``cls`` from ``support``.

        ``queries``: reference rows to segment (default: every reference holding class ``cls``).
        """
        device = torch.device(device)
        idx = self.queries[cls] if queries is None else list(queries)
        if not idx:
            return {m: torch.zeros(0, dtype=torch.float64) for m in self.metrics}
        # a segmenter that scores each support pair gives those pseudo metrics itself; the fused map the rest
        scored = self._scored_metrics()
        fused = [m for m in self.metrics if m not in scored]
        out: dict[str, list[Tensor]] = {m: [] for m in fused}
        if not fused:
            return self._scored(idx, cls, support, device, scored)
        budgeted = device.type == "cuda" and self.memory_budget_mb is not None
        if scored and hasattr(self.segmenter, "score_and_fuse") and not budgeted:
            return self._scored_and_fused(idx, cls, support, device, scored, fused)
        budget = None
        if budgeted:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            assert self.memory_budget_mb is not None  # budgeted
            budget = ChunkBudget(self.memory_budget_mb * 2**20)
        sup_img = support.images.to(device, torch.float32)
        sup_lab = (support.labels.to(device) > 0.5).float()
        prepared = self.segmenter.prepare(sup_img, sup_lab)
        if budget is not None:  # the prepared support counts against the budget too
            budget.fixed = torch.cuda.memory_allocated(device) - before
        chunk = budget.next_chunk(len(idx)) if budget is not None else self.query_chunk
        start = 0
        while start < len(idx):
            part = idx[start : start + chunk]
            if budget is not None:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            try:
                pred = self._predict_chunk(part, prepared, device)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                torch.cuda.empty_cache()
                continue
            if budget is not None:
                budget.observe(len(part), torch.cuda.max_memory_allocated(device) - base)
                chunk = budget.next_chunk(len(idx) - start - len(part))
            for m, v in per_image_metrics(pred, _class_mask(self.ref_labels[list(part)], cls), fused).items():
                out[m].append(v)
            start += len(part)
        result = {m: torch.cat(v) for m, v in out.items()}
        if scored:
            result.update(self._scored(idx, cls, support, device, scored))
        return {m: result[m] for m in self.metrics}

    def _scored_metrics(self) -> tuple[str, ...]:
        """The metrics the segmenter scores per support pair (``supports_scoring``), in SPE's order."""
        if not getattr(self.segmenter, "supports_scoring", False):
            return ()
        can = getattr(self.segmenter, "scored_metrics", ("dice",))
        if not hasattr(self.segmenter, "score_metrics"):
            can = ("dice",)  # only ``score`` (pseudo Dice) is implemented
        return tuple(m for m in self.metrics if m in can)

    def _scored_args(
        self, idx: Sequence[int], cls: int, support: SupportSet, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            self.ref_images[list(idx)].float().to(device),
            _class_mask(self.ref_labels[list(idx)], cls).float().to(device),
            support.images.float().to(device),
            (support.labels > 0.5).float().to(device),
        )

    def _scored_and_fused(
        self,
        idx: Sequence[int],
        cls: int,
        support: SupportSet,
        device: torch.device,
        scored: tuple[str, ...],
        fused: list[str],
    ) -> dict[str, Tensor]:
        """Pair-scored metrics and the fused map's metrics from one pass of a segmenter with ``score_and_fuse``
        (the same numbers as scoring and predicting separately, the attention computed once)."""
        args = self._scored_args(idx, cls, support, device)
        seg: Any = self.segmenter  # score_and_fuse: an optional method (checked by the caller)
        values, probs = seg.score_and_fuse(*args, scored)
        if probs is None or probs.shape != args[0].shape:
            got = None if probs is None else tuple(probs.shape)
            raise RuntimeError(
                f"{type(self.segmenter).__name__}.score_and_fuse returned {got} for {tuple(args[0].shape)}."
            )
        result = per_image_metrics((probs.float() > self.threshold).cpu(), args[1].cpu() > 0.5, fused)
        result.update({m: values[m].detach().double().cpu() for m in scored})
        return {m: result[m] for m in self.metrics}

    def _scored(
        self, idx: Sequence[int], cls: int, support: SupportSet, device: torch.device, metrics: tuple[str, ...]
    ) -> dict[str, Tensor]:
        """Pseudo ``metrics`` per query from a segmenter that scores each support pair (no fused map)."""
        args = self._scored_args(idx, cls, support, device)
        if hasattr(self.segmenter, "score_metrics"):
            values = self.segmenter.score_metrics(*args, metrics)
        else:  # only ``score`` (pseudo Dice): _scored_metrics asked for nothing else
            values = {"dice": self.segmenter.score(*args)}  # type: ignore[attr-defined]  # see _scored_metrics
        return {m: values[m].detach().double().cpu() for m in metrics}

    def _pseudo_class(self, data: CachedSet, masks: Sequence[Tensor], device: Any, cls: int, shard: Shard) -> Any:
        support = self.support(data, masks, cls)
        if not support.indices:
            where = f" for class '{self._name(cls)}'" if self.class_names else ""
            reason = f"no predicted mask in '{data.name}' has >= {self.min_foreground} foreground pixels{where}"
            return None, 0, reason
        queries = self.queries[cls]
        mine = [queries[i] for i in shard.part(len(queries))]
        parts = shard.run(lambda: self.reverse_metrics(support, device, cls, mine))
        per_ref = shard.merge(parts, len(queries))
        return {m: _mean(v) for m, v in per_ref.items()}, len(support.indices), None

    def pseudo(
        self, data: CachedSet, masks: Sequence[Tensor], device: torch.device | str = "cpu", shard: Shard | None = None
    ) -> dict[str, Any]:
        """``{"values": {key: float|None}, "n_support": int (per class: dict), "reason": str|None}`` for one set."""
        shard = shard or Shard()
        if not self.class_names:
            values, n, reason = self._pseudo_class(data, masks, device, 1, shard)
            return {"values": values or dict.fromkeys(self.metrics), "n_support": n, "reason": reason}
        out: dict[str, float | None] = {}
        n_support: dict[str, int] = {}
        reasons = []
        per_class = []
        for cls, name in enumerate(self.class_names, start=1):
            values, n, reason = self._pseudo_class(data, masks, device, cls, shard)
            n_support[name] = n
            if reason:
                reasons.append(reason)
            per_class.append(values or dict.fromkeys(self.metrics))
        for m in self.metrics:
            vals = [v[m] for v in per_class]
            out[m] = None if any(v is None for v in vals) else float(sum(vals) / len(vals))  # type: ignore[arg-type]
            out.update({f"{m}/{name}": v[m] for name, v in zip(self.class_names, per_class)})
        return {"values": {k: out[k] for k in self.keys}, "n_support": n_support, "reason": "; ".join(reasons) or None}

    # ----------------------------------------------------------------- real metrics
    def _real_items(self, data: CachedSet, masks: Sequence[Tensor], positions: Sequence[int]) -> dict[str, Tensor]:
        """Per-item metrics ``{"<metric>@<cls>": [n]}`` of the items at ``positions``."""
        assert data.masks is not None
        pred = [masks[p] for p in positions]
        true = [data.masks[p] for p in positions]
        out: dict[str, Tensor] = {}
        for c in self._cls():
            res = per_item_metrics(pred, true, self.metrics, partial(_class_mask, cls=c), self.query_chunk)
            out.update({f"{m}@{c}": v for m, v in res.items()})
        return out

    def _cls(self) -> range:
        return range(1, self.n_classes + 1)

    def real(
        self, data: CachedSet, masks: Sequence[Tensor], shard: Shard | None = None
    ) -> dict[str, float | None] | None:
        """Mean real metrics of predicted ``masks`` against ``data``'s masks (None when unlabelled).

        Per item at its own size (3D: per volume); multi-class: per class, and their mean.
        """
        if data.masks is None:
            return None
        shard = shard or Shard()
        n = len(masks)
        mine = shard.part(n)
        per_item = shard.merge(shard.run(lambda: self._real_items(data, masks, mine)), n)
        if not self.class_names:
            return {m: _mean(per_item[f"{m}@1"]) for m in self.metrics}
        out: dict[str, float | None] = {}
        for m in self.metrics:
            per_class = {name: _mean(per_item[f"{m}@{c}"]) for c, name in zip(self._cls(), self.class_names)}
            vals = list(per_class.values())
            out[m] = None if any(v is None for v in vals) else float(sum(vals) / len(vals))  # type: ignore[arg-type]
            out.update({f"{m}/{name}": v for name, v in per_class.items()})
        return {k: out[k] for k in self.keys}

    def evaluate(
        self,
        predictions: Mapping[str, tuple[CachedSet, Sequence[Tensor], Tensor]],
        device: torch.device | str = "cpu",
        shard: Shard | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> dict[str, Any]:
        """One record: ``predictions`` maps set name -> (data, predicted masks, per-image confidence);
        ``progress(1)`` after each set."""
        start = time.perf_counter()
        record: dict[str, Any] = {"pseudo": {}, "real": {}, "confidence": {}, "n_support": {}, "reasons": {}}
        for name, (data, masks, conf) in predictions.items():
            res = self.pseudo(data, masks, device, shard)
            record["pseudo"][name] = res["values"]
            record["n_support"][name] = res["n_support"]
            if res["reason"]:
                record["reasons"][name] = res["reason"]
            real = self.real(data, masks, shard)
            if real is not None:
                record["real"][name] = real
            record["confidence"][name] = _mean(conf)
            if progress is not None:
                progress(1)
        record["seconds"] = time.perf_counter() - start
        return record
