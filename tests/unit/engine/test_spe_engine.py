"""SPEEngine (engine/spe_engine.py): support sets, the reverse step's pseudo metrics, shards, the memory budget."""

from __future__ import annotations

import threading

import pytest
import torch
from _inputs import sets, trained_net

from spe_lightning.engine.cached_set import CachedSet, cache_dataset
from spe_lightning.engine.spe_engine import ChunkBudget, Shard, SPEEngine
from spe_lightning.reverse import ReverseSegmenter
from spe_lightning.testing import Blobs, fast_segmenter, tiny_spe


def test_same_seed_same_supports_references_and_estimates(tmp_path):
    ref, cal, tgt = sets()
    a, b = tiny_spe(max_references=10), tiny_spe(max_references=10)
    a.run.prepare(ref, cal, tgt)
    b.run.prepare(ref, cal, tgt)
    assert a.run.engine.ref_indices == b.run.engine.ref_indices
    masks = [m.clone() for m in a.run.sets["t"].masks]
    sa = a.run.engine.support(a.run.sets["t"], masks)
    sb = b.run.engine.support(b.run.sets["t"], masks)
    assert sa.indices == sb.indices and torch.equal(sa.labels, sb.labels)
    c = tiny_spe(max_references=10, seed=1)
    c.run.prepare(ref, cal, tgt)
    assert c.run.engine.support(c.run.sets["t"], masks).indices != sa.indices  # the seed does matter
    net = trained_net()
    assert a.run.evaluate(net) | {"seconds": 0} == b.run.evaluate(net) | {"seconds": 0}


def test_a_failure_on_one_process_is_raised_on_every_process():
    """Shard.run gathers (result, error) from every process: all raise together, none waits forever."""
    boom = ValueError("NaN on rank 0")
    rank1 = Shard(rank=1, world=2, gather=lambda obj: [(None, boom), obj])
    with pytest.raises(RuntimeError, match="process 0.*NaN on rank 0"):
        rank1.run(lambda: 42)
    rank0 = Shard(rank=0, world=2, gather=lambda obj: [obj, (7, None)])
    with pytest.raises(ValueError, match="bad here"):
        rank0.run(lambda: (_ for _ in ()).throw(ValueError("bad here")))
    ok = Shard(rank=0, world=2, gather=lambda obj: [obj, (7, None)])
    assert ok.run(lambda: 6) == [6, 7]
    merged = ok.merge([{"d": torch.tensor([0.0, 2.0, 4.0])}, {"d": torch.tensor([1.0, 3.0])}], 5)
    assert merged["d"].tolist() == [0, 1, 2, 3, 4] and ok.part(5) == [0, 2, 4]


def test_chunk_budget_keeps_modelled_peaks_within_the_budget():
    mib = 2**20
    fixed_cost, per_query = 60 * mib, 11 * mib  # about what label fusion at 256x256 costs on a GPU

    def run(limit_mib: int) -> tuple[list[int], list[float]]:
        budget = ChunkBudget(limit_mib * mib)
        budget.fixed = 20 * mib  # the prepared support
        remaining, sizes, peaks = 1000, [], []
        while remaining:
            n = min(budget.next_chunk(remaining), remaining)
            budget.observe(n, fixed_cost + per_query * n)
            sizes.append(n)
            peaks.append(budget.fixed + fixed_cost + per_query * n)
            remaining -= n
        return sizes, peaks

    for limit_mib in (512, 2048):
        sizes, peaks = run(limit_mib)
        assert sizes[:2] == [1, 2]  # the two points of the cost model
        assert max(sizes) == (limit_mib * mib - 20 * mib - fixed_cost) // per_query  # as large as allowed
        assert max(peaks) <= limit_mib * mib
    sizes, peaks = run(128)  # two queries might not fit: one at a time, still within the budget
    assert set(sizes) == {1} and max(peaks) <= 128 * mib
    with pytest.warns(UserWarning, match="below what one query needs"):
        sizes, _ = run(64)
    assert set(sizes) == {1}


# ------------------------------------------------------------------ SPEEngine on its own (no callback, no run)


class FirstSupportMask(ReverseSegmenter):
    """Predicts the first support mask for every query: the pseudo metrics are then known in closed form."""

    name = "first_support_mask"

    def predict(self, query_images, prepared):
        _, labels = prepared
        self.chunks.append(query_images.shape[0])
        return labels[:1].expand_as(query_images)

    def __init__(self, chunk_size: int = 32) -> None:
        super().__init__(chunk_size)
        self.chunks: list[int] = []


def _engine(segmenter=None, **kw) -> tuple[SPEEngine, CachedSet]:
    reference = cache_dataset("reference", Blobs(12, seed=1), 32, require_masks=True)
    target = cache_dataset("target", Blobs(10, seed=3), 32)
    args = dict(metrics=("dice",), support_size=4, min_foreground=4, seed=0) | kw
    return SPEEngine(segmenter or fast_segmenter(), reference, **args), target


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_support_takes_the_seeded_order_and_skips_masks_with_too_little_foreground():
    engine, target = _engine(support_size=4, min_foreground=4)
    masks = [m.clone() for m in target.masks]
    full = engine.support(target, masks)
    assert len(full.indices) == 4 and full.images.shape == (4, 1, 32, 32) and full.labels.shape == (4, 1, 32, 32)
    for i, pos in enumerate(full.indices):  # the support is the set's own images and the masks it was given
        assert torch.equal(full.images[i], target.gray[pos]) and torch.equal(full.labels[i].bool(), masks[pos])
    # empty the masks of the first two chosen items: the support moves on along the same order
    for pos in full.indices[:2]:
        masks[pos] = torch.zeros_like(masks[pos])
    masks[full.indices[2]][:] = False
    masks[full.indices[2]][0, 0, :3] = True  # 3 pixels < min_foreground
    fewer = engine.support(target, masks)
    assert full.indices[3] == fewer.indices[0] and not set(fewer.indices) & set(full.indices[:3])
    assert all(int(lab.sum()) >= 4 for lab in fewer.labels)
    # the order is a function of (seed, set name): another seed gives another order, the same seed the same
    again, _ = _engine(support_size=4, min_foreground=4)
    other, _ = _engine(support_size=4, min_foreground=4, seed=5)
    assert again.support(target, target.masks).indices == full.indices
    assert other.support(target, target.masks).indices != full.indices
    # no usable mask: an empty support, and pseudo() says why instead of inventing a value
    nothing = [torch.zeros_like(m) for m in target.masks]
    assert engine.support(target, nothing).indices == []
    out = engine.pseudo(target, nothing)
    assert out["values"] == {"dice": None} and out["n_support"] == 0 and ">= 4 foreground pixels" in out["reason"]


def test_pseudo_dice_is_the_mean_dice_of_the_reverse_masks_against_the_references():
    seg = FirstSupportMask(chunk_size=5)
    engine, target = _engine(seg, query_chunk=5)
    support = engine.support(target, target.masks)
    first = support.labels[0].bool()
    expected = [_dice(first, engine.ref_labels[q]) for q in engine.queries[1]]
    per_query = engine.reverse_metrics(support)["dice"]
    assert per_query.tolist() == pytest.approx(expected, abs=1e-6)
    assert seg.chunks == [5, 5, 2]  # 12 references in chunks of query_chunk
    out = engine.pseudo(target, target.masks)
    assert out["values"]["dice"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert out["n_support"] == 4 and out["reason"] is None


def test_pseudo_dice_follows_the_quality_of_the_predicted_masks():
    """The SPE premise on a tiny set: worse predicted masks in the support give a lower pseudo Dice."""
    engine, target = _engine(support_size=8)
    good = engine.pseudo(target, target.masks)["values"]["dice"]
    # the same masks shifted by a quarter of the image: each still a blob, in the wrong place
    shifted = [torch.roll(m, shifts=(8, 8), dims=(-2, -1)) for m in target.masks]
    bad = engine.pseudo(target, shifted)["values"]["dice"]
    assert good is not None and bad is not None and good > 0.6 and bad < good - 0.2
    real = engine.real(target, shifted)
    assert engine.real(target, target.masks) == {"dice": 1.0} and real["dice"] < 0.6


def test_two_shards_give_the_one_process_numbers():
    """pseudo() and real() split over two processes (threads exchanging objects here) equal one process."""
    engine, target = _engine(support_size=6, metrics=("dice", "hd95"))
    masks = [torch.roll(m, shifts=(2, 0), dims=(-2, -1)) for m in target.masks]  # imperfect: real Dice < 1
    alone = engine.pseudo(target, masks), engine.real(target, masks)
    barrier, box = threading.Barrier(2), [None, None]

    def gather(rank):
        def fn(obj):
            box[rank] = obj
            barrier.wait()
            out = list(box)
            barrier.wait()  # both have read before the next exchange overwrites the box
            return out

        return fn

    results = [None, None]

    def worker(rank):
        shard = Shard(rank=rank, world=2, gather=gather(rank))
        results[rank] = (engine.pseudo(target, masks, shard=shard), engine.real(target, masks, shard=shard))

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] is not None and results[1] is not None
    for pseudo, real in results:
        assert pseudo["n_support"] == alone[0]["n_support"]
        for k, v in alone[0]["values"].items():
            assert pseudo["values"][k] == pytest.approx(v, abs=1e-9)
        assert real == pytest.approx(alone[1], abs=1e-9) and alone[1]["dice"] < 1
