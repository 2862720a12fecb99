"""Callback fits that meet a failure (docs/reliability.md): empty sets, NaN outputs, empty masks, too few records,
a failing logger; and resuming from a checkpoint equals an uninterrupted run."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from _inputs import sets
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from spe_lightning import SPECallback
from spe_lightning.engine.predict import NonFiniteOutputError
from spe_lightning.testing import Blobs, TinyNet, finite_everywhere, loader, max_abs_diff, tiny_spe, tiny_trainer


@pytest.mark.parametrize("which", ["reference", "calibration", "target"])
def test_empty_dataset_fails_in_setup(tmp_path, which):
    ref, cal, tgt = sets()
    data = {"reference": ref, "calibration": cal, "target": tgt}
    data[which] = Blobs(0) if which != "target" else {"t": Blobs(0)}
    t = tiny_trainer(tmp_path, 1, [tiny_spe(**data)])
    with pytest.raises(ValueError, match="empty"):
        t.fit(TinyNet(), loader(ref))
    assert t.global_step == 0


def test_nan_output_at_one_checkpoint_skips_that_evaluation_only(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, log_dir=str(tmp_path))
    t = tiny_trainer(tmp_path, 5, [cb])
    with pytest.warns(UserWarning, match="evaluation at epoch 1 skipped.*NaN or inf"):
        t.fit(TinyNet(nan_epochs=(1,)), loader(ref))
    assert t.current_epoch == 5
    assert [r.epoch for r in cb.records] == [0, 2, 3, 4]
    report = json.loads((tmp_path / "spe_report.json").read_text())  # strict JSON: NaN would be refused
    assert finite_everywhere(report) and report["estimates"]["t"]["dice"]["value"] is not None

    strict = tiny_spe(reference=ref, calibration=cal, target=tgt, strict=True)
    with pytest.raises(NonFiniteOutputError):
        tiny_trainer(tmp_path, 2, [strict]).fit(TinyNet(nan_epochs=(1,)), loader(ref))


def test_every_predicted_mask_empty_gives_null_with_a_reason(tmp_path):
    ref, cal, tgt = sets()
    net = TinyNet(lr=0.0)
    with torch.no_grad():
        net.net[-1].bias.fill_(-50.0)  # predicts background everywhere
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    tiny_trainer(tmp_path, 3, [cb]).fit(net, loader(ref))
    assert len(cb.records) == 3
    rec = cb.records[-1]
    assert rec.pseudo["t"] == {"dice": None, "hd95": None} and "foreground" in rec.reasons["t"]
    est = cb.report.estimates["t"]["dice"]  # the calibration set has no support either: no G
    assert est["value"] is None and "no mapping G" in est["reason"] and "foreground" in est["reason"]
    assert finite_everywhere(cb.report)


def test_fewer_than_three_records_give_null_estimates_with_a_reason(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    tiny_trainer(tmp_path, 2, [cb]).fit(TinyNet(), loader(ref))
    assert len(cb.records) == 2
    for est in cb.report.estimates["t"].values():
        assert est["value"] is None and est["lower"] is None and "no mapping G" in est["reason"]


class BrokenLogger(Logger):
    """A logger whose every write fails."""

    name, version = "broken", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        raise OSError("disk full")


def test_a_failing_logger_warns_and_the_report_is_still_written(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, log_dir=str(tmp_path))
    t = tiny_trainer(tmp_path, 3, [cb], logger=BrokenLogger())
    with pytest.warns(UserWarning, match="logging the evaluation at epoch 0 failed.*disk full"):
        t.fit(TinyNet(), loader(ref))
    assert t.current_epoch == 3 and len(cb.records) == 3  # training and evaluations went on
    assert json.loads((tmp_path / "spe_report.json").read_text())["n_records"] == 3
    strict = tiny_spe(reference=ref, calibration=cal, target=tgt, log_dir=str(tmp_path), strict=True)
    with pytest.raises(OSError, match="disk full"):
        tiny_trainer(tmp_path, 1, [strict], logger=BrokenLogger()).fit(TinyNet(), loader(ref))


def _fit(tmp_path, epochs: int, ckpt_dir=None, resume=None) -> SPECallback:
    pl.seed_everything(0)
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    callbacks = [cb]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0))
    t = tiny_trainer(tmp_path, epochs, callbacks, enable_checkpointing=ckpt_dir is not None)
    t.fit(TinyNet(), loader(ref), ckpt_path=resume)
    return cb


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = _fit(tmp_path / "a", 5)
    first = _fit(tmp_path / "b", 2, ckpt_dir=tmp_path / "ckpt")
    resumed = _fit(tmp_path / "c", 5, ckpt_dir=tmp_path / "ckpt2", resume=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r.epoch for r in first.records] == [0, 1]
    assert [r.epoch for r in resumed.records] == [0, 1, 2, 3, 4]  # kept, and none evaluated twice
    assert [r.pseudo for r in resumed.records[:2]] == [r.pseudo for r in first.records]
    for a, b in zip(full.records, resumed.records):
        a, b = a.to_dict(), b.to_dict()
        assert a["step"] == b["step"]
        assert max_abs_diff(a["pseudo"], b["pseudo"]) < 1e-6 and max_abs_diff(a["real"], b["real"]) < 1e-6
    ea, eb = full.report["estimates"]["t"]["dice"], resumed.report["estimates"]["t"]["dice"]
    assert ea["value"] is not None and ea["value"] == pytest.approx(eb["value"], abs=1e-6)
