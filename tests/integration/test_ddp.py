"""Lightning DDP (ddp_spawn, 2 CPU processes): shared work, identical records, agreement with one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from spe_lightning import SPECallback
from spe_lightning.engine.records import fit_and_estimate
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter
from spe_lightning.testing import Blobs, TinyNet, loader, max_abs_diff, tiny_spe, tiny_trainer


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CountingLogits:
    """``module(x)``, counting the images each process predicts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with open(self.folder / f"predict_{_rank()}.txt", "a") as f:
            f.write(f"{x.shape[0]}\n")
        return module(x)


class CountingSegmenter(LabelFusionSegmenter):
    """The tests' label fusion, counting the reference queries each process segments."""

    def __init__(self, folder: Path) -> None:
        super().__init__(size=16, k=3, search=1, thumb=8)
        self.folder = folder

    def predict(self, query_images: torch.Tensor, prepared: object) -> torch.Tensor:
        with open(self.folder / f"reverse_{_rank()}.txt", "a") as f:
            f.write(f"{query_images.shape[0]}\n")
        return super().predict(query_images, prepared)


class DumpRecords(Callback):
    """Every process writes the SPE records it holds at the end of fit."""

    def __init__(self, spe: SPECallback, folder: Path) -> None:
        self.spe, self.folder = spe, folder
        self.monitored: list[float | None] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # what ModelCheckpoint/EarlyStopping see
        v = float(trainer.callback_metrics["spe/estimate/t/dice"])
        self.monitored.append(None if v != v else v)

    def on_fit_end(self, trainer, pl_module) -> None:
        keys = ("epoch", "step", "pseudo", "real", "n_support")
        records = [{k: r.to_dict()[k] for k in keys} for r in self.spe.records]
        (self.folder / f"records_{trainer.global_rank}.json").write_text(json.dumps(records))
        (self.folder / f"monitored_{trainer.global_rank}.json").write_text(json.dumps(self.monitored))


def _total(path: Path) -> int:
    return sum(int(x) for x in path.read_text().split())


@pytest.mark.ddp
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed (gloo)")
def test_ddp_spawn_shares_the_work_and_agrees_with_one_process(tmp_path):
    torch.manual_seed(0)
    ref, cal, tgt = Blobs(16, seed=1), Blobs(10, seed=2), {"t": Blobs(9, seed=3, noise=0.15)}
    out = tmp_path / "out"
    out.mkdir()
    spe = tiny_spe(
        reference=ref,
        calibration=cal,
        target=tgt,
        segmenter=CountingSegmenter(out),
        logits_fn=CountingLogits(out),
        log_dir=str(tmp_path),
        # no calibration pairs at fit end: the counts below are per evaluation, and the estimates are
        # compared with fit_and_estimate on the records alone (G-residual intervals)
        interval_shifts=[],
        interval_subsets=0,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    t = tiny_trainer(
        tmp_path, 4, [spe, DumpRecords(spe, out), ckpt], strategy="ddp_spawn", devices=2, enable_checkpointing=True
    )
    t.fit(TinyNet(), loader(ref, 2))

    report = json.loads((tmp_path / "spe_report.json").read_text())
    records = report["records"]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    # both processes hold the same records (so checkpoints and resuming are consistent)
    r0, r1 = (json.loads((out / f"records_{k}.json").read_text()) for k in (0, 1))
    assert r0 == r1 and [r["pseudo"] for r in r0] == [r["pseudo"] for r in records]
    # the monitorable estimate is the same on both processes (NaN, here None, before the 3rd record)
    m0, m1 = (json.loads((out / f"monitored_{k}.json").read_text()) for k in (0, 1))
    assert m0 == m1 and m0[:2] == [None, None] and all(v is not None for v in m0[2:])
    # per evaluation each process predicted half of the 10 + 9 items, and ran half of the queries
    n_eval = len(records)
    # (+ 10: rank zero alone calibrates the saved estimator's per-case flags on the calibration set;
    # + 2: at fit start every process runs the model on one item of the calibration set and of the target)
    assert _total(out / "predict_0.txt") == n_eval * (5 + 5) + 10 + 2
    assert _total(out / "predict_1.txt") == n_eval * (5 + 4) + 2
    q0, q1 = _total(out / "reverse_0.txt"), _total(out / "reverse_1.txt")
    per_case = 10 * 16  # rank zero's per-case calibration: 10 cases x their 16 most similar references
    assert q0 > per_case and abs(q0 - per_case - q1) <= 2 * n_eval

    # one process on the same checkpoints
    one = tiny_spe()
    one.run.prepare(ref, cal, tgt)
    again = []
    for r in records:
        net = TinyNet()
        state = torch.load(tmp_path / "ckpt" / f"epoch={r['epoch']}.ckpt", weights_only=False)["state_dict"]
        net.load_state_dict(state)
        again.append(one.run.evaluate(net))
    for a, b in zip(records, again):
        assert max_abs_diff(a["pseudo"], b["pseudo"]) < 1e-6
        assert max_abs_diff(a["real"], b["real"]) < 1e-6
    est = fit_and_estimate(again, ["t"], one.run.keys)["estimates"]["t"]
    for m in one.run.keys:
        nums = ("value", "lower", "upper", "pseudo")
        assert max_abs_diff({k: est[m][k] for k in nums}, {k: report["estimates"]["t"][m][k] for k in nums}) < 1e-6
    assert report["estimates"]["t"]["dice"]["value"] is not None
