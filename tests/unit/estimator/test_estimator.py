"""SPEEstimator: saved after fit, reloaded safely, reproduces the callback's estimates; per-case scores."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from spe_lightning import SPEConfig, SPEEstimator
from spe_lightning.engine import Estimate
from spe_lightning.engine.set_size import calibration_pseudo_at, probe_sizes
from spe_lightning.estimator import VERSION, FittedSPE, IncompatibleEstimatorError, with_case_scorer
from spe_lightning.percase.scorer import CaseRow


def test_saved_estimator_reproduces_the_in_training_estimates(fitted, tmp_path):
    cb, model, dm = fitted
    path = cb.estimator_path
    # only tensors, numbers and strings: loads with weights_only=True
    state = torch.load(path, weights_only=True)
    assert state["format"] == "spe-estimator" and state["version"] == VERSION
    assert state["reference"]["images"].shape == (20, 1, 48, 48)
    assert state["reference"]["indices"] == cb.report["reference_indices"]
    est = SPEEstimator.load(path)
    # the file keeps the run's final estimates in their dict form; the artifact reads them back typed
    assert est.fitted.target_estimates == cb.report.estimates
    for name in ("target", "target_noisy"):
        res = est.estimate(model, dm.targets[name], name=name)
        for metric, expected in cb.report.estimates[name].items():
            got = res.estimates[metric]
            assert isinstance(got, Estimate) and isinstance(expected, Estimate) and expected.value is not None
            for key in ("value", "lower", "upper", "pseudo"):
                assert getattr(got, key) == pytest.approx(getattr(expected, key), abs=1e-6), (name, metric, key)
        # the targets have masks: reported as the truth, like the callback does, and beside each estimate
        assert res.true["dice"] == pytest.approx(cb.report.true[name]["dice"], abs=1e-6)
        assert res.estimates["dice"].true == pytest.approx(cb.report.estimates[name]["dice"].true, abs=1e-6)
        assert len(res.cases) == len(dm.targets[name]) and all(isinstance(c, CaseRow) for c in res.cases)
        assert res.to_dict()["estimates"] == {k: e.to_dict() for k, e in res.estimates.items()}
    # a tensor of images works as well as a dataset (same numbers, no masks -> no truth)
    images = torch.stack([dm.targets["target"][i]["image"] for i in range(len(dm.targets["target"]))])
    res = est.estimate(model, images, per_case=False)
    assert res.estimates["dice"].value == pytest.approx(cb.report.estimates["target"]["dice"].value, abs=1e-6)
    assert res.true is None and res.cases == []
    # the same checks of every field of the in-training estimate hold for the nearest-set distance and flag
    again = est.estimate(model, dm.targets["target_noisy"], name="target_noisy", per_case=False).estimates["dice"]
    want = cb.report.estimates["target_noisy"]["dice"]
    assert again.nearest_set_distance == pytest.approx(want.nearest_set_distance, abs=1e-9)
    assert again.outside_calibrated_range == want.outside_calibrated_range
    with pytest.raises(TypeError, match="name must be the set's name, a non-empty str"):
        est.estimate(model, images, name=None, per_case=False)  # a newcomer's "no name": said, not an AttributeError


def test_a_set_smaller_than_the_calibrated_ones_gets_a_wider_flagged_interval(fitted):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    pairs_n = {p["name"]: p["n"] for p in cb.run.pairs}
    target = dm.targets["target"]
    smallest = min(pairs_n.values())
    assert smallest == min(len(d) for d in dm.targets.values())  # the subsets were drawn as large as the targets
    # the subset pairs know the calibration set they were drawn from (they are scaled to stand for new images)
    n_cal = len(cb.run._sets["calibration"])
    assert {p.get("n_calibration") for p in cb.run.pairs if p["kind"] == "subset"} == {n_cal}
    assert all("n_calibration" not in p for p in cb.run.pairs if p["kind"] != "subset")
    whole = est.estimate(model, target, per_case=False).estimates["dice"]
    few = est.estimate(model, torch.utils.data.Subset(target, range(4)), per_case=False).estimates["dice"]
    assert not whole.widened_by_size and whole.n_images == len(target)  # as large as calibrated: as before
    assert few.widened_by_size and (few.n_images, few.pairs_n_images) == (4, smallest)
    assert few.outside_calibrated_range and "4 images, fewer than the calibrated sets'" in few.range_note
    wide, base = few.upper - few.lower, whole.upper - whole.lower
    assert wide > base  # the same pairs' model, the half-width times sqrt(smallest / 4) (before clipping to [0, 1])
    # the anchor of the smaller set: the calibration pseudo metric at 4 images, from the size probes measured at fit
    # end up to the smallest pair's size (the whole target keeps the calibration set's own)
    probes = est.anchor["pseudo_by_size"]
    assert probes["reference_size"] == smallest and {m for m, _ in probes["values"]["dice"]} == set(
        probe_sizes(smallest)
    )
    assert few.anchor_pseudo is not None and whole.anchor_pseudo is None
    assert few.anchor_pseudo == pytest.approx(
        calibration_pseudo_at(est.anchor["calibration_pseudo"]["dice"], probes, "dice", 4)
    )
    assert few.range_note.endswith("anchored on calibration subsets of its size")
    # an estimator without the probes (an older file, size_probes=0) anchors it on the whole calibration set's
    old = est.with_fitted(est.fitted.replace(anchor={k: v for k, v in est.anchor.items() if k != "pseudo_by_size"}))
    unsized = old.estimate(model, torch.utils.data.Subset(target, range(4)), per_case=False).estimates["dice"]
    assert unsized.anchor_pseudo is None and unsized.pseudo == few.pseudo
    # chunks smaller than the calibrated sets: flagged in every output, and the user is told how they were anchored
    from spe_lightning.cli.estimate.outputs import chunk_table
    from spe_lightning.monitoring.chunks import chunk_rows

    said = rf"chunks of 4 images are smaller than the calibrated sets \({smallest} images\): .* anchored on calibration"
    with pytest.warns(UserWarning, match=said):
        res = est.estimate_chunks(model, torch.utils.data.Subset(target, range(8)), 4)
    assert "fewer images than calibrated" in chunk_table(res.chunks)
    assert all("fewer than the calibrated sets'" in r["note"] for r in chunk_rows(res.chunks) if r["metric"] == "dice")
    with pytest.warns(UserWarning, match="cannot correct for"):
        old.estimate_chunks(model, torch.utils.data.Subset(target, range(8)), 4)


def test_the_input_check_tells_the_fitted_model_from_other_weights_and_another_architecture(fitted):
    import copy

    from spe_lightning.models import SegmentationModel

    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    images = dm.targets["target"]
    assert est.check_inputs(model, images)["model"] == {"verdict": "same", "message": None}
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # another checkpoint of the same network
    check = est.check_inputs(other, images)
    assert check["model"]["verdict"] == "other_weights" and any("other weights" in w for w in check["warnings"])
    narrow = SegmentationModel(channels=(4, 8, 16), strides=(2, 2))  # another run's architecture
    assert est.check_inputs(narrow, images)["model"]["verdict"] == "other_architecture"
    older = SPEEstimator(
        dataclasses.replace(est.fitted, info={k: v for k, v in est.info.items() if k != "model_fingerprint"})
    )
    assert older.compare_model(model)["verdict"] == "not_recorded"


def test_per_case_rows_take_the_items_own_ids(fitted):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    target = dm.targets["target"]
    named = [{**target[i], "id": f"B11_{i:03d}"} for i in range(4)]
    assert [c.id for c in est.estimate(model, named).cases] == ["B11_000", "B11_001", "B11_002", "B11_003"]
    assert [c.id for c in est.estimate(model, named, ids=list("abcd")).cases] == list("abcd")  # given ids win
    assert [c.id for c in est.estimate(model, [target[i] for i in range(4)]).cases] == ["0", "1", "2", "3"]


def test_per_case_calibration_is_stored_and_applied(fitted, tmp_path):
    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    cases = est.cases
    assert cases is not None and cases["n_cases"] == len(dm.val_set)
    assert len(cases["calibration_scores"]) == len(dm.val_set)
    assert all(0.0 <= s <= 1.0 for s in cases["calibration_scores"])
    assert cases["threshold"] is not None and cases["mapping"]["kind"] == "isotonic"
    res = est.estimate(model, dm.targets["target_noisy"], name="target_noisy")
    for row in res.cases:
        assert row["flagged"] == (row["quality"] < cases["threshold"])
        assert 0.0 <= row["estimated_dice_lower"] <= row["estimated_dice"] <= row["estimated_dice_upper"] <= 1.0
        assert row["real_dice"] is not None  # phantom targets have masks


def test_incompatible_or_unsafe_files_are_refused(fitted, tmp_path):
    cb, model, _ = fitted
    state = cb.run.estimator.state()
    state["version"] = VERSION + 1
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(IncompatibleEstimatorError, match=f"version {VERSION + 1}.*reads versions 1 and {VERSION}"):
        SPEEstimator.load(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(IncompatibleEstimatorError, match="not an SPE estimator"):
        SPEEstimator.load(tmp_path / "other.pt")

    class Payload:  # what a malicious file would carry: unpickling it would call os.system
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "spe-estimator", "version": VERSION, "x": Payload()}, f, protocol=2)
    with pytest.raises(IncompatibleEstimatorError, match="refused to load"):
        SPEEstimator.load(tmp_path / "evil.pt")


def test_save_caps_the_embedded_references_and_can_leave_them_out(fitted, tmp_path):
    cb, model, dm = fitted
    est = cb.run.estimator
    with pytest.raises(ValueError, match="max_reference_mb"):
        est.save(tmp_path / "big.pt", max_reference_mb=0.1)
    # embedding a view of a larger tensor stores only the view (not its whole storage)
    big = torch.cat([est.reference_images] * 10)
    masks = torch.cat([est.fitted.reference_masks] * 10)[:20]
    est = est.with_fitted(est.fitted.replace(reference_images=big[:20], reference_masks=masks))
    size = est.save(tmp_path / "view.pt").stat().st_size
    assert size < 1.2 * 20 * 48 * 48 * 5 + 50_000
    slim = SPEEstimator.load(est.save(tmp_path / "slim.pt", embed_reference=False))
    assert slim.reference_images is None
    with pytest.raises(ValueError, match="no reference images"):
        slim.estimate(model, dm.targets["target"])
    slim = slim.with_reference_dataset(dm.train_set)  # the stored indices pick the same references again
    res = slim.estimate(model, dm.targets["target"], per_case=False)
    assert res.estimates["dice"].value == pytest.approx(cb.report.estimates["target"]["dice"].value, abs=1e-6)


def test_estimates_from_pseudo_match_fit_and_estimate_paper_and_anchored(tmp_path):
    """The saved G (and the anchored intervals) give the callback's numbers after a save/load."""
    from spe_lightning.engine.records import fit_and_estimate

    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        x = 0.3 + 0.1 * i + 0.01 * rng.normal()
        records.append(
            {
                "pseudo": {"calibration": {"dice": x}, "site": {"dice": x - 0.08}},
                "real": {"calibration": {"dice": 0.2 + 0.12 * i + 0.02 * rng.normal()}},
            }
        )
    pairs = [
        {"name": f"shift{j}", "d_pseudo": {"dice": -0.02 * j}, "d_real": {"dice": -0.03 * j + 0.005 * rng.normal()}}
        for j in range(8)
    ]
    for anchored, anchor_pairs in ((False, None), (True, None), (True, pairs)):
        rep = fit_and_estimate(records, ["site"], ["dice"], "linear", 0.9, anchored=anchored, pairs=anchor_pairs)
        anchor = None
        if anchored:
            anchor = {
                "intervals": rep["anchor_intervals"],
                "calibration_pseudo": records[-1]["pseudo"]["calibration"],
                "calibration_real": records[-1]["real"]["calibration"],
            }
        config = SPEConfig(metrics=("dice",), support_size=8, min_foreground=4, working_size=32, anchored=anchored)
        est = SPEEstimator(FittedSPE(config, {"name": "label_fusion"}, rep["mapping"], anchor=anchor))
        est = SPEEstimator.load(est.save(tmp_path / "e.pt", embed_reference=False))
        got = est.estimate_from_pseudo(records[-1]["pseudo"]["site"])["dice"]
        want = rep["estimates"]["site"]["dice"]
        assert got["method"] == want["method"] == ("anchored" if anchored else "paper")
        assert (rep.get("anchor_intervals", {}).get("dice") is not None) == (anchor_pairs is not None)
        for key in ("value", "lower", "upper"):
            assert got[key] == pytest.approx(want[key], abs=1e-12)


class _Threshold(torch.nn.Module):
    """Segments everything brighter than a level: the organ and, wrongly, the distractor blobs and noise."""

    def forward(self, x):
        return 40 * (torch.nn.functional.avg_pool2d(x, 3, 1, 1) - 0.45)


def test_quality_regressor_gives_per_case_estimates_that_follow_the_truth(tmp_path):
    from torch.utils.data import ConcatDataset

    from spe_lightning.data import SyntheticShapesDataset
    from spe_lightning.percase.rca import spearman
    from spe_lightning.percase.regressor import QualitySettings, RegressorScorer
    from spe_lightning.reverse import make_segmenter

    torch.manual_seed(0)
    ref, cal = SyntheticShapesDataset(24, 32, seed=1), SyntheticShapesDataset(16, 32, seed=2)
    # clean and noisy phantoms: the threshold model's per-case Dice spreads from ~0.3 to ~0.9
    target = ConcatDataset([SyntheticShapesDataset(8, 32, seed=3), SyntheticShapesDataset(8, 32, seed=4, noise=0.25)])
    fitted = FittedSPE(SPEConfig(metrics=("dice",), working_size=32), make_segmenter("label_fusion").spec())
    bare = SPEEstimator(fitted).with_reference_dataset(ref)
    est = with_case_scorer(bare, _Threshold(), RegressorScorer(QualitySettings(epochs=4)), cal, ref)
    assert bare.quality is None and bare.fitted.quality is None  # a new estimator; the old one is unchanged
    assert est.quality is not None and est.quality["calibration"]["n_cases"] == len(cal)
    est = SPEEstimator.load(est.save(tmp_path / "q.pt"))  # the regressor travels as plain tensors
    res = est.estimate(_Threshold(), target)
    estimated = [r["estimated_dice"] for r in res.cases]
    real = [r["real_dice"] for r in res.cases]
    assert len({round(v, 3) for v in estimated}) > 1  # per case, not one value for every image
    assert all(r["estimated_dice_lower"] <= r["estimated_dice"] <= r["estimated_dice_upper"] for r in res.cases)
    assert spearman(estimated, real) > 0.5
    assert all(isinstance(r["flagged"], bool) for r in res.cases)


def test_the_quality_regressor_reads_the_runs_own_item_keys():
    # a user's dataset with dict items under other keys (image_key="img", label_key="seg" in the run's settings)
    from spe_lightning.data import SyntheticShapesDataset
    from spe_lightning.percase.regressor import QualitySettings, RegressorScorer
    from spe_lightning.reverse import make_segmenter

    class Keyed(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            item = self.base[i]
            return {"img": item["image"], "seg": item["label"]}

    torch.manual_seed(0)
    ref, cal = Keyed(SyntheticShapesDataset(12, 32, seed=1)), Keyed(SyntheticShapesDataset(10, 32, seed=2))
    config = SPEConfig(metrics=("dice",), working_size=32, image_key="img", label_key="seg")
    bare = SPEEstimator(FittedSPE(config, make_segmenter("label_fusion").spec())).with_reference_dataset(ref)
    assert bare.fitted.reference_masks.shape[0] == len(ref)  # the run's keys by default: the masks were found
    est = with_case_scorer(bare, _Threshold(), RegressorScorer(QualitySettings(epochs=1)), cal, ref)
    assert est.quality is not None and est.quality["calibration"]["n_cases"] == len(cal)
    # so does the estimate: the truth is read from "seg" without saying so again
    res = est.estimate(_Threshold(), cal, per_case=False)
    assert res.true is not None and 0.0 <= res.true["dice"] <= 1.0
    assert est.estimate(_Threshold(), cal, per_case=False, label_key="nothing").true is None  # a per-call override


def test_callback_fits_the_quality_regressor_into_the_estimator(quality_fitted):
    cb, trainer, dm, log_dir = quality_fitted  # the shared 3-epoch run with quality_regressor=True (conftest)
    est = SPEEstimator.load(log_dir / "spe_estimator.pt")
    assert est.quality is not None and cb.report["quality"]["n_cases"] == 12
    saved = json.loads((log_dir / "spe_report.json").read_text())
    assert saved["quality"]["n_cases"] == 12
    # SPE combined with the regressor's mean, the weight chosen on the calibration pairs' sets
    combined = saved["combined"]
    w = combined["weight"]
    # held out: the shifted pairs only (the subsets are the calibration cases the regressor's map was fitted on;
    # the target-styled pairs belong to one target each)
    shifted = [p for p in cb.run.pairs if p["kind"] == "shift"]
    assert w in (0.0, 0.25, 0.5, 0.75, 1.0) and combined["n_sets"] == len(shifted) > 0
    assert est.quality["combination"]["weight"] == w
    for t, e in combined["estimates"].items():
        assert e["spe"] == saved["estimates"][t]["dice"]["value"] and 0.0 <= e["regressor"] <= 1.0
        assert e["value"] == pytest.approx(w * e["regressor"] + (1 - w) * e["spe"])
    # the estimator applies the same weight to new data
    res = est.estimate(trainer.lightning_module, dm.spe_datasets()["target"]["target"], name="target")
    mean = sum(c["estimated_dice"] for c in res.cases) / len(res.cases)
    assert res.combined["weight"] == w and res.combined["value"] == pytest.approx(
        w * mean + (1 - w) * res.estimates["dice"].value
    )
    assert res.to_dict()["combined"] == res.combined


def test_the_fitted_estimator_is_frozen_and_estimating_changes_nothing(fitted):
    import dataclasses

    from spe_lightning.percase.rca import RCAScorer
    from spe_lightning.percase.scorer import CaseScorer

    cb, model, dm = fitted
    est = SPEEstimator.load(cb.estimator_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.fitted.cases = None  # type: ignore[misc]
    for gone in ("set_reference", "set_reference_dataset", "calibrate_cases", "fit_quality", "from_run"):
        assert not hasattr(est, gone)  # nothing sets fitted state after construction
    before = est.state()
    est.estimate(model, dm.targets["target"], name="target")
    est.estimate_chunks(model, dm.targets["target"], 6, name="target")
    after = est.state()
    assert before.keys() == after.keys() and before["cases"] == after["cases"] and before["info"] == after["info"]
    assert torch.equal(before["reference"]["images"], after["reference"]["images"])
    # the per-case scores come from one fitted scorer behind the CaseScorer protocol
    scorer = est.scorer()
    assert isinstance(scorer, RCAScorer) and isinstance(scorer, CaseScorer) and scorer.state() == est.cases


def test_the_estimator_package_never_imports_the_run():
    """run.py imports the estimator, never the reverse (not even for type hints)."""
    import ast
    from pathlib import Path

    import spe_lightning.estimator as package

    found = []
    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n in ("spe_lightning.run", "spe_lightning.callback")]
            found += [f"{path.name}: {n}" for n in names if n.startswith(("spe_lightning.run.", "spe_lightning.run_"))]
    assert found == []


def test_the_cost_line_names_the_signals_beside_spes_own_work(fitted):
    cb, _, _ = fitted
    line = cb.publisher.cost_line()
    seconds = cb.run.signal_seconds
    assert seconds["size_probes"] > 0 and f"size probes {seconds['size_probes']:.1f} s" in line
    assert f"styled pairs {seconds['styled_pairs']:.1f} s" in line and "calibration pairs" in line
