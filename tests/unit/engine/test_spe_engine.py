"""SPEEngine (engine/spe_engine.py): support sets, the reverse step's pseudo metrics, shards, the memory budget."""

from __future__ import annotations

import pytest
import torch
from _inputs import sets, trained_net

from spe_lightning.testing import tiny_spe


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
    from spe_lightning.engine.spe_engine import Shard

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
    from spe_lightning.engine.spe_engine import ChunkBudget

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
