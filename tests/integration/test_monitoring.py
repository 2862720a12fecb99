"""Monitoring (issue 15): estimates in callback_metrics for ModelCheckpoint/EarlyStopping, alerts, loggers."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from spe_lightning import SPEConfig
from spe_lightning.engine import Estimate
from spe_lightning.monitoring.alerts import AlertEvent, alert_message, alert_scalars, alerts_for, monitor_scalars
from spe_lightning.testing import Blobs, TinyNet, loader, tiny_spe, tiny_trainer

TAG = "spe/estimate/t/dice"


def _data():
    return Blobs(16, seed=1), Blobs(10, seed=2), {"t": Blobs(10, seed=3, noise=0.15)}


def _est(value, lower=None, upper=None):
    return Estimate(value, lower, upper, pseudo=0.5)


# ---------------------------------------------------------------- pure functions
def test_monitor_scalars_are_nan_until_an_estimate_exists():
    before = monitor_scalars(None, ["a"], ["dice"])
    assert set(before) == {"spe/estimate/a/dice", "spe/estimate_lower/a/dice", "spe/estimate_upper/a/dice"}
    assert all(math.isnan(v) for v in before.values())
    after = monitor_scalars({"a": {"dice": _est(0.8, 0.7, None)}}, ["a"], ["dice"])
    assert after["spe/estimate/a/dice"] == 0.8 and after["spe/estimate_lower/a/dice"] == 0.7
    assert math.isnan(after["spe/estimate_upper/a/dice"]) and set(after) == set(before)


def test_alerts_below_above_and_on_the_interval():
    estimates = {"a": {"dice": _est(0.85, 0.75, 0.9), "hd95": _est(12.0, 9.0, 15.0)}, "b": {"dice": _est(None)}}
    events = alerts_for(estimates, {"dice": 0.8}, {"hd95": 10.0}, "estimate", epoch=3)
    assert [(e.target, e.metric, e.direction) for e in events] == [("a", "hd95", "above")]
    assert events[0].epoch == 3 and events[0].threshold == 10.0 and events[0].value == 12.0
    assert events[0].to_dict() == {
        **{"target": "a", "metric": "hd95", "value": 12.0, "lower": 9.0, "upper": 15.0, "compared": 12.0},
        **{"threshold": 10.0, "direction": "above", "alert_on": "estimate", "epoch": 3},  # no chunk/stage: left out
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].threshold = 20.0  # type: ignore[misc]
    lower = alerts_for(estimates, {"dice": 0.8}, {"hd95": 16.0}, "lower")
    assert [(e.metric, e.compared) for e in lower] == [("dice", 0.75)]  # upper 15 < 16: no HD95 alert
    flags = alert_scalars(lower, ["a", "b"], {"dice": 0.8}, {"hd95": 16.0})
    assert flags == {"spe/alert/a/dice": 1.0, "spe/alert/b/dice": 0.0, "spe/alert/a/hd95": 0.0, "spe/alert/b/hd95": 0.0}
    msg = alert_message({**lower[0].to_dict(), "chunk": "2024-01"})  # a chunked result's event dict
    assert "a dice" in msg and "0.750" in msg and "0.8" in msg and "chunk 2024-01" in msg


def test_alert_settings_are_validated():
    c = SPEConfig(alert_below={"dice": 0.8}, alert_above={"hd95": 10}, alert_on="lower")
    assert SPEConfig.from_dict(c.to_dict()) == c and c.to_dict()["alert_above"] == {"hd95": 10.0}
    for bad in ({"alert_below": {"dcie": 0.8}}, {"alert_on": "upper"}, {"alert_below": {"dice": math.inf}}):
        with pytest.raises(ValueError):
            SPEConfig(**bad)
    with pytest.raises(TypeError):
        tiny_spe(on_alert="not callable")


# ---------------------------------------------------------------- with a Trainer
class _ValNet(TinyNet):
    """TinyNet with a validation loop: SPE then evaluates in on_validation_end."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))


class _Probe(Callback):
    """What ModelCheckpoint sees: callback_metrics[TAG] at each train epoch end."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen.append(float(trainer.callback_metrics[TAG]))


def test_checkpoint_and_early_stopping_monitor_the_estimate(tmp_path):
    """From epoch 0 the tag exists (NaN until the 3rd record); the kept checkpoint is the best estimated one."""
    ref, cal, tgt = _data()
    torch.manual_seed(0)
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, interval_subsets=0, interval_shifts=[])
    probe = _Probe()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=TAG, mode="max", save_top_k=1)
    stop = EarlyStopping(monitor=TAG, mode="max", patience=5, check_finite=False)
    t = tiny_trainer(tmp_path, 5, [cb, probe, stop, ckpt], enable_checkpointing=True)
    t.fit(_ValNet(), loader(ref), loader(cal))
    assert math.isnan(probe.seen[0]) and math.isnan(probe.seen[1])  # no estimate before the 3rd record
    assert all(math.isfinite(v) for v in probe.seen[2:]) and len(probe.seen) == 5
    best = float(ckpt.best_model_score)
    assert best == pytest.approx(max(probe.seen[2:]))
    assert int(torch.load(ckpt.best_model_path, weights_only=False)["epoch"]) >= 2
    assert not t.should_stop or stop.stopped_epoch >= 2
    # the same value the loggers got: the running estimate at the last record
    assert probe.seen[-1] == pytest.approx(cb.run.running_estimate()["estimates"]["t"]["dice"]["value"], abs=1e-6)


def test_resumed_run_publishes_before_its_next_evaluation(tmp_path):
    """After resuming, the tag is present at the first validation even when SPE is not due then."""
    ref, cal, tgt = _data()
    torch.manual_seed(0)
    kw = dict(reference=ref, calibration=cal, target=tgt, interval_subsets=0, interval_shifts=[], every_n_epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = tiny_spe(**kw)
    tiny_trainer(tmp_path, 6, [first, ckpt], enable_checkpointing=True).fit(_ValNet(), loader(ref), loader(cal))
    assert [r.epoch for r in first.records] == [1, 3, 5]
    probe = _Probe()
    cb = tiny_spe(**kw)
    resumed = ModelCheckpoint(dirpath=tmp_path / "ckpt2", monitor=TAG, mode="max", save_top_k=1)
    t = tiny_trainer(tmp_path, 7, [cb, probe, resumed], enable_checkpointing=True)
    t.fit(_ValNet(), loader(ref), loader(cal), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(probe.seen) == 1 and math.isfinite(probe.seen[0])  # epoch 6 is not due; 3 records exist
    assert resumed.best_model_score is not None and math.isfinite(float(resumed.best_model_score))


def test_alerts_warn_log_report_and_survive_a_failing_notifier(tmp_path):
    ref, cal, tgt = _data()
    torch.manual_seed(0)
    got = []

    def notify(event):
        got.append(event)
        raise RuntimeError("pager down")

    cb = tiny_spe(
        reference=ref,
        calibration=cal,
        target=tgt,
        interval_subsets=0,
        interval_shifts=[],
        alert_below={"dice": 1.01},  # always crossed
        alert_above={"hd95": 1e6},  # never crossed
        on_alert=notify,
    )
    logger = CSVLogger(tmp_path, name="csv")
    t = tiny_trainer(tmp_path, 4, [cb], logger=logger, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyNet(), loader(ref), loader(cal))
    text = [str(w.message) for w in caught]
    assert any("SPE alert: t dice estimate" in m and "below the threshold 1.01 at epoch 2" in m for m in text)
    assert any("on_alert raised" in m for m in text)
    # from the 3rd record on, once per evaluation, then once for the final estimate
    assert all(isinstance(e, AlertEvent) for e in got)  # on_alert gets the typed event
    assert [(e.epoch, e.stage) for e in got] == [(2, "running"), (3, "running"), (3, "final")]
    assert any("at the final weights (epoch 3)" in m for m in text)
    report = cb.report
    assert [(a["epoch"], a.get("stage")) for a in report["alerts"]] == [(2, "running"), (3, "running"), (3, "final")]
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    flags = [float(r["spe/alert/t/dice"]) for r in rows if r.get("spe/alert/t/dice")]
    assert flags == [1.0, 1.0]
    assert [float(r["spe/alert/t/hd95"]) for r in rows if r.get("spe/alert/t/hd95")] == [0.0, 0.0]
    assert any(r.get("spe/estimate/t/dice") for r in rows) and any(r.get("spe/pseudo/t/dice") for r in rows)
    assert [float(r["spe/alert_final/t/dice"]) for r in rows if r.get("spe/alert_final/t/dice")] == [1.0]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_logger_gets_scalars_figure_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3 asks for it to use a local file store
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    ref, cal, tgt = _data()
    torch.manual_seed(0)
    uri = (tmp_path / "mlruns").as_uri()  # a local file store: no network
    logger = MLFlowLogger(experiment_name="spe", tracking_uri=uri)
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, interval_subsets=0, interval_shifts=[])
    tiny_trainer(tmp_path, 3, [cb], logger=logger).fit(TinyNet(), loader(ref), loader(cal))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert "spe/estimate/t/dice" in run.data.metrics and "spe/pseudo/calibration/dice" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "spe")}
    assert {"spe/calibration_fit.png", "spe/summary.md"} <= artifacts
