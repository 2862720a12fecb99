"""SPERun without a Trainer: a plain training loop runs SPE end to end with the callback's numbers."""

from __future__ import annotations

import json

import pytest
import torch

from spe_lightning import SPEConfig, SPEEstimator, SPERun
from spe_lightning.engine.records import Record
from spe_lightning.testing import (
    Blobs,
    TinyNet,
    fast_segmenter,
    finite_everywhere,
    loader,
    max_abs_diff,
    tiny_spe,
    tiny_trainer,
)


def _config(**kw) -> SPEConfig:
    args = dict(support_size=6, working_size=32, min_foreground=4, metrics=("dice", "hd95"), verbose=False)
    args.update(kw)
    return SPEConfig(**args)


def _data():
    return Blobs(16, seed=1), Blobs(10, seed=2), {"t": Blobs(10, seed=3, noise=0.15)}


def _train_epoch(model: TinyNet, data, opt) -> None:
    model.train()
    for batch in loader(data, 6):
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()


def test_plain_loop_runs_spe_end_to_end(tmp_path):
    torch.manual_seed(0)
    ref, cal, tgt = _data()
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=model.lr)
    warnings: list[str] = []
    run = SPERun(_config(), segmenter=fast_segmenter(), warn=warnings.append)
    run.prepare(ref, cal, tgt)
    assert run.prepared and run.targets == ["t"] and set(run.sets) == {"calibration", "t"}
    for epoch in range(4):
        _train_epoch(model, ref, opt)
        run.record(model, epoch=epoch, step=epoch)
    run.finish(model, step=3)  # the last record holds the final weights: no extra evaluation
    assert [r.epoch for r in run.records] == [0, 1, 2, 3] and run.records[-1].final
    assert len(run.pairs) > 0 and warnings == []
    report = run.build_report()
    est = report["estimates"]["t"]["dice"]
    # this 4-epoch toy may not track Dice on its pairs: then it is reported unreliable, its numbers withheld
    said = est if est.get("reliable", True) else est["withheld"]
    assert said["value"] is not None and said["lower"] <= said["value"] <= said["upper"]
    assert est["distance"] is not None and all(p["distance"] is not None for p in run.pairs)
    assert finite_everywhere(report)
    report = run.finish_fit(model)  # the report and the estimator, built once
    est_before = run.estimator
    assert report is run.report and est_before is not None and est_before.cases is not None  # per-case calibrated
    paths = run.write_report(tmp_path, model)
    assert run.estimator is est_before  # writing only serialises: nothing is fitted again
    assert run.write_report(tmp_path / "again", model) and run.estimator is est_before
    written = json.loads(paths["json"].read_text())["estimates"]["t"]["dice"]
    assert written.get("withheld", written)["value"] == pytest.approx(said["value"])
    reloaded = SPEEstimator.load(paths["estimator"])
    again = reloaded.estimate(model, tgt["t"], name="t", per_case=False).estimates["dice"]
    assert again.get("withheld", again)["value"] == pytest.approx(said["value"], abs=1e-6)
    # the estimator measures the same distance to the calibration set and says the same about reliability
    assert again["distance"] == pytest.approx(est["distance"]) and again.get("reliable") == est.get("reliable")
    # and the same nearest-set distance, from the generic pairs' features the file keeps (no styled set among them)
    assert est["nearest_set_distance"] is not None
    assert again["nearest_set_distance"] == pytest.approx(est["nearest_set_distance"])
    kept = reloaded.fitted.anchor["pair_features"]
    assert set(kept) == {p["name"] for p in run.pairs if p.get("target") is None}
    assert est["nearest_set_distance"] <= est["distance"] + 1e-9  # the calibration set is one of the candidates


def test_plain_loop_equals_the_callback(tmp_path):
    """The same weights evaluated by the run alone and by the callback give the same records and estimates."""
    ref, cal, tgt = _data()
    torch.manual_seed(0)
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, interval_subsets=1, interval_shifts=["noise"])
    model = TinyNet()
    tiny_trainer(tmp_path, 3, [cb]).fit(model, loader(ref))
    run = SPERun(cb.config, segmenter=fast_segmenter())
    run.prepare(ref, cal, tgt)
    record = run.evaluate(model)
    assert max_abs_diff(record["pseudo"], cb.records[-1].to_dict()["pseudo"]) < 1e-9
    assert max_abs_diff(record["real"], cb.records[-1].to_dict()["real"]) < 1e-9


def test_failures_are_warned_and_skipped_or_raised_when_strict():
    ref, cal, tgt = _data()

    class Broken(torch.nn.Module):
        def forward(self, x):
            return {"unknown": x}

    messages: list[str] = []
    run = SPERun(_config(), segmenter=fast_segmenter(), warn=messages.append)
    run.prepare(ref, cal, tgt)
    assert run.record(Broken(), epoch=0, step=0) is None and run.records == []
    assert len(messages) == 1 and "evaluation at epoch 0 skipped" in messages[0] and "logits_fn" in messages[0]
    strict = SPERun(_config(strict=True), segmenter=fast_segmenter())
    strict.prepare(ref, cal, tgt)
    with pytest.raises(TypeError, match="logits_fn"):
        strict.record(Broken(), epoch=0, step=0)


def test_evaluate_before_prepare_names_the_fix():
    with pytest.raises(RuntimeError, match="prepare"):
        SPERun(_config()).evaluate(TinyNet())


def test_resume_warns_about_changed_settings_and_keeps_records():
    run = SPERun(_config())
    run.records.append(Record.from_dict({"epoch": 0, "step": 5, "pseudo": {}}))
    state = run.state_dict()
    assert state["records"] == [run.records[0].to_dict()]  # plain dicts in the checkpoint
    messages: list[str] = []
    other = SPERun(_config(support_size=7), warn=messages.append)
    other.load_state_dict(state)
    assert other.records == run.records and "support_size" in messages[0]
    with pytest.raises(ValueError, match="support_size"):
        SPERun(_config(support_size=7, strict=True)).load_state_dict(state)


def test_working_size_defaults_to_the_images_size_at_most_128():
    from spe_lightning.run import auto_working_size

    small, large = Blobs(2, shape=(24, 40)), Blobs(2, shape=(200, 150))
    assert auto_working_size(small, SPEConfig()) == 40 and auto_working_size(large, SPEConfig()) == 128
    run = SPERun(SPEConfig(support_size=4, min_foreground=1, verbose=False), segmenter=fast_segmenter())
    run.prepare(Blobs(6, seed=1), Blobs(4, seed=2), Blobs(4, seed=3))
    assert run.config.working_size == 32 and run.sets["calibration"].gray.shape[-1] == 32


def test_a_learned_segmenter_is_fitted_once_kept_in_the_checkpoint_and_the_estimator(tmp_path):
    from spe_lightning.reverse.learned import LearnedPropagationSegmenter

    def segmenter() -> LearnedPropagationSegmenter:
        return LearnedPropagationSegmenter(size=32, downsample=1, width=16, batch=8, max_supports=8, steps=20)

    torch.manual_seed(0)
    ref, cal, tgt = _data()
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=model.lr)
    run = SPERun(
        _config(metrics=("dice", "iou"), interval_subsets=1, interval_shifts=("noise",)), segmenter=segmenter()
    )
    run.prepare(ref, cal, tgt)
    assert not run.segmenter.is_fitted  # fitted lazily, at the first evaluation
    for epoch in range(3):
        _train_epoch(model, ref, opt)
        run.record(model, epoch=epoch, step=epoch)
    assert run.segmenter.is_fitted and run.segmenter_fit_seconds > 0 and len(run.records) == 3
    state = run.state_dict()
    assert state["segmenter_state"]["tensors"]

    resumed = SPERun(run.config, segmenter=segmenter())
    resumed.prepare(ref, cal, tgt)
    resumed.load_state_dict(state)
    again = resumed.evaluate(model)
    assert resumed.segmenter_fit_seconds == 0.0  # restored, not refitted
    assert max_abs_diff(again["pseudo"], run.evaluate(model)["pseudo"]) < 1e-6

    run.finish(model, step=2)
    run.build_report()
    path = run.write_report(tmp_path, model)["estimator"]
    est = SPEEstimator.load(path)
    res = est.estimate(model, tgt["t"], name="t", per_case=False)
    assert res.estimates["dice"].value == pytest.approx(run.report["estimates"]["t"]["dice"]["value"], abs=1e-6)
    # per-case scores (one-image supports) come from label fusion, which ranked cases better than the learned step
    from spe_lightning.percase.rca import RCAScorer, case_scores
    from spe_lightning.percase.scorer import CaseInputs
    from spe_lightning.reverse.label_fusion import LabelFusionSegmenter

    assert isinstance(est.case_segmenter, LabelFusionSegmenter) and est.segmenter is not est.case_segmenter
    cal = run.sets["calibration"]
    c = est.config
    rca = RCAScorer(
        est.case_segmenter, est.engine.ref_images, est.engine.ref_masks, k=4, min_foreground=c.min_foreground
    )
    got = rca.scores(CaseInputs(cal.gray, cal.masks, torch.ones(len(cal)), []), torch.device("cpu"))
    args = (cal.gray, torch.stack([m > 0 for m in cal.masks]), est.engine.ref_images, est.engine.ref_masks)
    want = case_scores(LabelFusionSegmenter(), *args, k=4, min_foreground=est.config.min_foreground)
    assert torch.equal(got.score.nan_to_num(-1), want.score.nan_to_num(-1))


@pytest.mark.parametrize("styled", [True, False])
def test_styled_pairs_setting_turns_the_target_styled_pairs_on_and_off(styled):
    torch.manual_seed(0)
    ref, cal, tgt = _data()
    model = TinyNet()
    run = SPERun(
        _config(styled_pairs=styled, interval_subsets=1, interval_shifts=["noise"]), segmenter=fast_segmenter()
    )
    run.prepare(ref, cal, tgt)
    run.record(model, epoch=0, step=0)
    run.finish(model, step=0)
    targeted = [p for p in run.pairs if p.get("target") is not None]
    generic = [p for p in run.pairs if p.get("target") is None]
    assert len(generic) >= 2  # the subsets and the shifted copy are measured either way
    assert [p["target"] for p in targeted] == (["t"] if styled else [])
    assert (run.signal_seconds["styled_pairs"] > 0) is styled


def test_the_styling_setting_picks_the_recipe_of_the_styled_sets():
    from spe_lightning.engine.styled_pairs import styled_set

    ref, cal, tgt = _data()
    sets = {}
    for name in ("v1", "histogram_noise_blur"):
        run = SPERun(_config(styling=name), segmenter=fast_segmenter(), warn=pytest.fail)
        run.prepare(ref, cal, tgt)
        sets[name] = run.styled_sets()
        target = run.targets[0]
        assert run.styles[target]["styling"] == name  # the style record names the recipe that ran
        expected, _ = styled_set(run.sets["calibration"], run.sets[target], seed=0, styling=name)
        got = sets[name][f"styled_{target}"]
        assert all(torch.equal(a, b) for a, b in zip(got.inputs, expected.inputs))
    first = next(iter(sets["v1"]))
    assert not torch.equal(sets["v1"][first].inputs[0], sets["histogram_noise_blur"][first].inputs[0])
