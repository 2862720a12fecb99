"""End-to-end behaviour of SPECallback on the synthetic phantom task."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from _inputs import sets
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from spe_lightning import SPECallback, SPEConfig
from spe_lightning.data import SyntheticShapesDataModule
from spe_lightning.engine import SPEReport
from spe_lightning.engine.predict import eval_mode
from spe_lightning.models import SegmentationModel
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter
from spe_lightning.testing import TinyNet, loader, tiny_spe, tiny_trainer


def small_model() -> SegmentationModel:
    return SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)


def small_data() -> SyntheticShapesDataModule:
    return SyntheticShapesDataModule(n_train=48, n_val=24, n_target=16, size=48, batch_size=4)


def tiny_data() -> SyntheticShapesDataModule:
    """Half of small_data, for the tests of the callback's plumbing (schedules, failures, files), not its numbers."""
    return SyntheticShapesDataModule(n_train=24, n_val=12, n_target=8, size=48, batch_size=4)


def spe(**kw) -> SPECallback:
    # a coarse label fusion keeps these tests fast; the estimate-quality test uses the default one
    fast = LabelFusionSegmenter(size=24, k=4, search=1)
    args = dict(segmenter=fast, support_size=12, working_size=48, max_references=24, seed=0, verbose=False)
    args.update(kw)
    return SPECallback(**args)


def trainer(tmp_path, epochs, callbacks, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=kw.pop("logger", None) or TensorBoardLogger(tmp_path, name="tb"),
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_model_summary=False,
        log_every_n_steps=1,
        **{"enable_progress_bar": False, **kw},
    )


def _no_nan(obj):
    if isinstance(obj, float):
        assert math.isfinite(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _no_nan(v)
    elif isinstance(obj, list):
        for v in obj:
            _no_nan(v)


def test_fit_logs_estimates_to_tensorboard_and_report(tmp_path):
    pl.seed_everything(0)
    cb = spe()
    t = trainer(tmp_path, 4, [cb])
    t.fit(small_model(), datamodule=tiny_data())

    assert [r.epoch for r in cb.records] == [0, 1, 2, 3]
    assert cb.records[-1].final is True
    assert all(r.epoch_seconds is not None and r.epoch_seconds > 0 for r in cb.records)  # set when made

    report_path = tmp_path / "tb" / "version_0" / "spe_report.json"
    report = json.loads(report_path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report"))
    _no_nan(report)
    # the file is the typed report's dict form, finishing's sections included
    assert isinstance(cb.report, SPEReport) and json.dumps(cb.report.to_dict(), indent=2) == report_path.read_text()
    assert cb.report.estimates["target"]["dice"].to_dict() == report["estimates"]["target"]["dice"]
    assert set(report["estimates"]) == {"target", "target_noisy"}
    assert set(report["true"]) == {"target", "target_noisy"}  # synthetic targets have masks: shown as truth
    dice = report["estimates"]["target"]["dice"]
    assert dice["value"] is not None and dice["lower"] <= dice["value"] <= dice["upper"]
    assert 0.0 <= dice["value"] <= 1.0
    assert len(report["records"]) == 4 and report["mapping"]["dice"]["kind"] == "linear"
    # anchored by default: calibration score + G(target) - G(calibration), intervals from calibration pairs
    assert dice["method"] == "anchored" and dice["paper"]["value"] is not None
    kinds = {p["kind"] for p in report["pairs"]}
    # one target size, 6 families x 1, and one target-styled pair per target (joining only that target's model)
    assert kinds == {"subset", "shift", "styled"} and len(report["pairs"]) == 2 + 6 + 2
    assert {p["target"] for p in report["pairs"] if p["kind"] == "styled"} == {"target", "target_noisy"}
    assert report["anchor_intervals"]["dice"]["scores"]
    assert (report_path.parent / "spe_estimator.pt").is_file()
    assert (report_path.parent / "spe_report.csv").read_text().startswith("target,metric,estimate")

    ea = EventAccumulator(str(report_path.parent), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert len(ea.Scalars("spe/pseudo/calibration/dice")) == 4
    assert len(ea.Scalars("spe/real/calibration/hd95")) == 4
    assert len(ea.Scalars("spe/pseudo/target_noisy/dice")) == 4
    est = ea.Scalars("spe/estimate/target/dice")
    # running estimates from the 3rd record on, then the final one
    assert len(est) >= 2
    final = ea.Scalars("spe/final_estimate/target/dice")
    assert len(final) == 1 and final[0].value == pytest.approx(dice["value"], abs=1e-6)
    assert final[0].step == est[-1].step  # at the last step, beside the last running estimate
    assert "spe/estimate_lower/target/dice" in tags and "spe/estimate_upper/target/dice" in tags
    assert "spe/calibration_fit" in ea.Tags()["images"]
    assert "spe/summary/text_summary" in ea.Tags()["tensors"]


def test_estimates_follow_the_truth_on_a_shifted_target(tmp_path, caplog):
    """The noisy target scores worse than the clean one, and SPE's estimate says so (also on the console)."""
    pl.seed_everything(1)
    # 4 epochs and one shift family (the pairs give the intervals, not the values compared here): 40% less time
    # than 6 epochs and six families; the estimates' gap (0.43 vs 0.52, truth 0.35 vs 0.57) stays wide
    cb = spe(metrics=("dice", "iou"), verbose=True, segmenter="label_fusion", interval_shifts=["noise"])
    with caplog.at_level("INFO"):
        # with a progress bar: the summary must still print after the bar has closed
        trainer(tmp_path, 4, [cb], enable_progress_bar=True).fit(small_model(), datamodule=small_data())
    assert "| target_noisy" in caplog.text and "SPE report:" in caplog.text
    r = cb.report
    assert r["true"]["target_noisy"]["dice"] < r["true"]["target"]["dice"]
    assert r["estimates"]["target_noisy"]["dice"]["value"] < r["estimates"]["target"]["dice"]["value"]


def test_no_work_during_fast_dev_run_and_it_says_so(tmp_path):
    cb = spe()
    with pytest.warns(UserWarning, match="skipped under fast_dev_run"):
        trainer(tmp_path, 3, [cb], fast_dev_run=True).fit(small_model(), datamodule=tiny_data())
    assert cb.records == [] and "fast_dev_run" in cb.report.reason
    assert not list(tmp_path.rglob("spe_report.json"))


class _RecordingLogger(pl.loggers.logger.Logger):
    """Keeps every (tag, step) it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[str, int]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.points.extend((k, step) for k in metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_one_point_per_tag_and_step_and_the_truth_beside_the_estimate(tmp_path):
    logger = _RecordingLogger()
    cb = spe(metrics=("dice",), interval_subsets=1, interval_shifts=["noise"], log_dir=str(tmp_path))
    trainer(tmp_path, 3, [cb], logger=logger).fit(small_model(), datamodule=tiny_data())
    spe_points = [p for p in logger.points if p[0].startswith("spe/")]
    assert len(spe_points) == len(set(spe_points))  # the final estimate is not logged a second time
    assert ("spe/estimate_lower/target/dice", cb.records[-1].step) in spe_points
    est = cb.report.estimates["target"]["dice"]
    assert est["true"] == cb.report.true["target"]["dice"]


def test_a_schedule_with_too_few_evaluations_warns_before_training(tmp_path):
    cb = spe(every_n_epochs=5, metrics=("dice",))
    with pytest.warns(UserWarning, match=r"every_n_epochs=5 with max_epochs=3 gives 1 evaluation") as caught:
        trainer(tmp_path, 3, [cb]).fit(small_model(), datamodule=tiny_data())
    messages = [str(w.message) for w in caught]
    first = next(i for i, m in enumerate(messages) if "every_n_epochs=5" in m)
    closing = next(i for i, m in enumerate(messages) if "no estimates" in m)
    assert first < closing and "G needs 3" in cb.report.reason
    assert cb.report.estimates["target"]["dice"].value is None
    assert not list(tmp_path.rglob("spe_estimator.pt"))  # no G: nothing to reuse


def test_report_has_a_reason_when_every_evaluation_failed(tmp_path):
    class DictOut(SegmentationModel):
        """Returns its logits under a key SPE does not know; trains and validates on self.net directly."""

        def forward(self, x):
            return {"unknown": self.net(x)}

        def _step(self, batch):
            image, label = batch["image"].float(), batch["label"].float()
            logits = self.net(image)
            return logits, label, self.loss(logits, label)

    cb = spe(metrics=("dice",))
    with pytest.warns(UserWarning, match="no estimates: no evaluation succeeded"):
        trainer(tmp_path, 2, [cb]).fit(DictOut(channels=(8, 16), strides=(2,)), datamodule=tiny_data())
    assert cb.records == [] and "no evaluation succeeded" in cb.report.reason
    assert json.loads(next(tmp_path.rglob("spe_report.json")).read_text())["reason"] == cb.report.reason


def test_every_n_epochs_and_final_record(tmp_path):
    cb = spe(every_n_epochs=2, metrics=("dice",))
    trainer(tmp_path, 3, [cb]).fit(small_model(), datamodule=tiny_data())
    # epoch 1 by schedule, then the final weights after epoch 2
    assert [(r.epoch, r.final) for r in cb.records] == [(1, False), (2, True)]
    # two records: too few for G -> null estimates with a reason, never NaN
    e = cb.report.estimates["target"]["dice"]
    assert e["value"] is None and "need" in e["reason"].lower()
    assert cb.report["pairs"]  # the pairs were measured; without G they cannot give an estimate


def test_state_dict_round_trip():
    a = spe()
    a.load_state_dict({"records": [{"epoch": 0, "step": 3, "pseudo": {}, "real": {}}]})
    b = spe()
    b.load_state_dict(a.state_dict())
    assert b.records == a.records
    assert a.state_key == b.state_key and "SPECallback" in a.state_key


def test_eval_mode_restores_each_submodule():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a frozen BatchNorm, as users do
    before = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"support_size": -1}, "support_size"),
        ({"threshold": 1.5}, "threshold"),
        ({"mapping": "cubic"}, "mapping"),
        ({"metrics": ("dice", "volume")}, "volume"),
        ({"segmenter": "magic"}, "magic"),
        ({"level": 1.0}, "level"),
        ({"interval_shifts": ["tint"]}, "interval_shifts"),
        ({"interval_shifts": "noise"}, "interval_shifts"),
        ({"interval_subsets": -1}, "interval_subsets"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPECallback(**kwargs)


def test_missing_datasets_fail_before_training(tmp_path):
    model = small_model()
    dm = tiny_data()
    dm.setup()
    loader = dm.train_dataloader()
    t = trainer(tmp_path, 1, [spe()])
    with pytest.raises(ValueError, match="reference, calibration, target"):
        t.fit(model, train_dataloaders=loader)
    assert t.global_step == 0


def test_explicit_datasets_and_tuple_items(tmp_path):
    dm = tiny_data()
    dm.setup()

    class Tuples(torch.utils.data.Dataset):
        def __init__(self, ds, with_mask=True):
            self.ds, self.with_mask = ds, with_mask

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            it = self.ds[i]
            return (it["image"], it["label"]) if self.with_mask else (it["image"],)

    cb = spe(
        reference=Tuples(dm.train_set),
        calibration=Tuples(dm.val_set),
        target={"unlabelled": Tuples(dm.targets["target"], with_mask=False)},
        metrics=("dice",),
    )
    trainer(tmp_path, 3, [cb]).fit(small_model(), datamodule=dm)
    assert cb.report.estimates["unlabelled"]["dice"].value is not None
    assert "unlabelled" not in cb.report.true


def test_a_failing_evaluation_never_stops_training(tmp_path):
    """A model output SPE cannot use: the evaluation is skipped with a warning, training goes on; strict raises."""

    class DictModel(SegmentationModel):
        def forward(self, x):
            return {"weird_key": self.net(x)}

        def _step(self, batch):
            image, label = batch["image"], batch["label"]
            logits = self.net(image)
            return logits, label, self.loss(logits, label)

    cb = spe(metrics=("dice",))
    t = trainer(tmp_path, 2, [cb])
    with pytest.warns(UserWarning, match="pass logits_fn"):
        t.fit(DictModel(channels=(8, 16, 32), strides=(2, 2)), datamodule=tiny_data())
    assert t.current_epoch == 2 and cb.records == []

    ok = spe(metrics=("dice",), logits_fn=lambda module, x: module(x)["weird_key"])
    trainer(tmp_path, 1, [ok]).fit(DictModel(channels=(8, 16, 32), strides=(2, 2)), datamodule=tiny_data())
    assert len(ok.records) == 1

    strict = spe(metrics=("dice",), strict=True)
    with pytest.raises(TypeError, match="pass logits_fn"):
        trainer(tmp_path, 1, [strict]).fit(DictModel(channels=(8, 16, 32), strides=(2, 2)), datamodule=tiny_data())


def test_settings_come_from_a_config_with_overrides_by_name():
    base = SPEConfig(every_n_epochs=2, seed=3, metrics=["dice"])
    cb = SPECallback(base, seed=5, alert_below={"dice": 0.8})
    assert cb.config == base.replace(seed=5, alert_below={"dice": 0.8}) and base.seed == 3
    assert SPECallback({"every_n_epochs": 2}).config == SPEConfig(every_n_epochs=2)  # a plain dict, as to_dict() writes
    assert SPECallback().config == SPEConfig()
    fast = LabelFusionSegmenter(size=24, k=4, search=1)
    with_instance = SPECallback(segmenter=fast)
    # the instance goes to the run (its repr keys the checkpoint state); the config names "auto", as the report says
    assert with_instance.config.segmenter == "auto" and repr(fast) in with_instance.state_key


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((), {"suport_size": 8}, TypeError, r"unknown setting\(s\) 'suport_size' \(did you mean 'support_size'\?\)"),
        ((), {"targets": {}}, TypeError, r"'targets' \(did you mean the argument target=\.\.\.\?\)"),
        ((), {"segmenter": 3}, TypeError, "segmenter must be a name or a ReverseSegmenter"),
        (("every_n_epochs=2",), {}, TypeError, "config must be an SPEConfig"),
        (({"every_n_epoch": 2},), {}, ValueError, "every_n_epoch"),
        ((SPEConfig(),), {"every_n_epochs": 0}, ValueError, "every_n_epochs must be an int >= 1"),
    ],
)
def test_bad_config_or_override_is_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        SPECallback(*args, **kwargs)


def test_estimator_is_the_runs_fitted_estimator_after_fit(tmp_path):
    cb = spe(metrics=("dice",), interval_subsets=0, interval_shifts=[], log_dir=str(tmp_path))
    assert cb.estimator is None  # not fitted yet
    trainer(tmp_path, 3, [cb]).fit(small_model(), datamodule=tiny_data())
    assert cb.estimator is not None and cb.estimator is cb.run.estimator


def test_training_with_spe_gives_the_model_training_without_it_gives(tmp_path):
    """SPE at its defaults ("auto" included) leaves the user's random stream alone: the same weights as without it."""

    def train(callbacks: list) -> torch.Tensor:
        pl.seed_everything(0)
        dm = SyntheticShapesDataModule(n_train=16, n_val=12, n_target=8, size=32, batch_size=4)
        model = SegmentationModel(channels=(8, 16), strides=(2,), lr=3e-3)
        trainer = pl.Trainer(
            max_epochs=3,
            accelerator="cpu",
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    alone = train([])
    spe = SPECallback(verbose=False, log_dir=str(tmp_path / "spe"), support_size=8)
    assert torch.equal(train([spe]), alone)
    assert spe.report is not None and spe.report.estimates  # SPE did its work meanwhile


def test_a_callback_reused_for_another_training_starts_over_and_the_same_trainer_going_on_continues(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    net = TinyNet()
    tiny_trainer(tmp_path, 3, [cb]).fit(net, loader(ref, 4))
    assert [r.epoch for r in cb.records] == [0, 1, 2]
    with pytest.warns(UserWarning, match="records of an earlier training .* SPE starts over"):
        tiny_trainer(tmp_path, 3, [cb]).fit(TinyNet(), loader(ref, 4))
    assert [r.epoch for r in cb.records] == [0, 1, 2] and sum(r.final for r in cb.records) == 1
    trainer = tiny_trainer(tmp_path, 2, [cb])
    with pytest.warns(UserWarning, match="records of an earlier training"):
        trainer.fit(net, loader(ref, 4))
    trainer.fit_loop.max_epochs = 4  # the same Trainer going on: its records continue
    trainer.fit(net, loader(ref, 4))
    assert [r.epoch for r in cb.records] == [0, 1, 2, 3] and [r.final for r in cb.records] == [False] * 3 + [True]
