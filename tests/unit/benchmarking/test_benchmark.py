"""Scoring of the paper protocol: SPE vs the baselines across checkpoints."""

import json

import numpy as np
import pytest
import torch

from spe_lightning.benchmarking import score_records


def _records(n=8, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        q = 0.3 + 0.6 * i / (n - 1)  # quality rises over checkpoints
        recs.append(
            {
                "epoch": i,
                "pseudo": {"calibration": {"dice": 0.5 * q + 0.2}, "extra_test": {"dice": 0.5 * (q - 0.1) + 0.2}},
                "real": {"calibration": {"dice": q}, "extra_test": {"dice": q - 0.1 + rng.normal(0, 0.005)}},
                "confidence": {"calibration": 0.9, "extra_test": 0.9},
            }
        )
    return recs


def test_spe_beats_calibration_score_when_target_is_worse():
    res = score_records(_records(), "extra_test", ["dice"])["dice"]
    assert res["spe"]["pearson_r"] > 0.99
    assert res["spe"]["mae"] < 0.02
    assert res["calibration_score"]["mae"] == pytest.approx(0.1, abs=0.01)
    assert res["spe"]["final_abs_error"] < res["calibration_score"]["final_abs_error"]
    # a constant confidence carries no information: no correlation can be computed
    assert res["confidence"]["pearson_r"] is None


def test_isotonic_mapping_follows_a_curved_relation():
    recs = _records()
    for r in recs:  # make pseudo -> real clearly non-linear
        for name in ("calibration", "extra_test"):
            r["pseudo"][name]["dice"] = r["pseudo"][name]["dice"] ** 4
    lin = score_records(recs, "extra_test", ["dice"], "linear")["dice"]["spe"]
    iso = score_records(recs, "extra_test", ["dice"], "isotonic")["dice"]["spe"]
    assert iso["pearson_r"] > 0.95
    assert iso["mae"] < lin["mae"]


def test_every_method_is_scored_on_the_same_checkpoints():
    from spe_lightning.benchmarking import score_on_common_checkpoints

    real = np.array([0.2, 0.4, 0.6, 0.8])
    rows = {"spe": np.array([np.nan, 0.4, 0.6, 0.8]), "calibration_score": np.array([0.9, 0.4, 0.6, 0.8])}
    out = score_on_common_checkpoints(rows, real)
    # the first checkpoint (no SPE value) is left out for the baseline too, and the count says so
    assert out["calibration_score"]["mae"] == pytest.approx(0.0) and out["calibration_score"]["n_scored"] == 3
    assert out["spe"]["n_checkpoints"] == 4
    # a method never measured on this target has no row and does not empty the others' scoring
    rows["spe_other"] = np.full(4, np.nan)
    out = score_on_common_checkpoints(rows, real)
    assert "spe_other" not in out and out["spe"]["n_scored"] == 3


def test_another_site_is_reported_on_its_own(tmp_path):
    from PIL import Image

    from spe_lightning.benchmarking import shift_scores
    from spe_lightning.data.folder import site_dataset

    for split, n in (("a", 2), ("b", 3)):
        for kind in ("images", "masks"):
            (tmp_path / split / kind).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 1 if kind == "masks" else 128, np.uint8)).save(
                    tmp_path / split / kind / f"{split}{i}.png"
                )
    assert len(site_dataset(tmp_path, 1, 16)) == 5  # every split under the root

    records = _linear_records()
    result = {
        "records": {"auto": records},
        "site_targets": ["site_b"],
        "shift_raw": {
            "auto": {
                "calibration": measured(0.7),
                "targets": {"clean": measured(0.7), "noise_3": measured(0.5), "site_b": measured(0.2)},
                "pairs": [],
                "quality_regressor": {"means": {"clean": 0.68, "noise_3": 0.45, "site_b": 0.3}, "fit_s": 1.0},
            }
        },
    }
    res = shift_scores(result)
    # the regressor's mean per-case estimate is a method row of its own (Dice only)
    assert res["summary"]["dice"]["quality_regressor"]["mae"] == pytest.approx(0.035)
    assert res["sites"]["site_b"]["dice"]["quality_regressor"]["mae"] == pytest.approx(0.1)
    assert res["summary"]["dice"]["spe"]["n"] == 2  # clean and noise_3; the site is not averaged in
    assert set(res["sites"]) == {"site_b"} and res["sites"]["site_b"]["dice"]["spe"]["n"] == 1
    assert [r["site"] for r in res["targets"]] == [False, False, True]


def test_false_alarm_is_an_estimated_drop_on_an_unshifted_target_whose_real_dice_held():
    from spe_lightning.benchmarking import shift_scores

    def set_(pseudo, real):
        return {"pseudo": {m: pseudo for m in METRICS}, "real": {m: real for m in METRICS}, "confidence": 0.9}

    targets = {
        "clean": set_(0.6, 0.7),  # estimate 0.6, 0.1 below the calibration score, real held: an alarm
        "group_a": set_(0.72, 0.8),  # under-estimated by 0.08 but no drop: not an alarm
        "group_b": set_(0.55, 0.6),  # the real Dice dropped too: not an alarm
        "noise_3": set_(0.6, 0.7),  # a synthetic shift is not an unshifted target
    }
    result = {
        "records": {"auto": _linear_records()},
        "shift_raw": {"auto": {"calibration": set_(0.7, 0.7), "targets": targets, "pairs": []}},
    }
    res = shift_scores(result)
    values = {r["name"]: r["spe"]["dice"]["value"] for r in res["targets"]}
    assert values["clean"] == pytest.approx(0.6) and values["group_a"] == pytest.approx(0.72)
    assert res["summary"]["dice"]["spe"]["false_alarms"] == 1
    assert res["summary"]["dice"]["calibration_score"]["false_alarms"] == 0


METRICS = ("dice", "iou", "precision", "recall", "hd95", "pearson_r")


def measured(d):
    """One set's raw measurement in a shift result: every metric pseudo = real = ``d``."""
    return {"pseudo": {m: d for m in METRICS}, "real": {m: d for m in METRICS}, "confidence": 0.9}


def _linear_records():
    """Five checkpoints whose calibration pseudo metric equals the real one (G is the identity)."""
    return [
        {
            "pseudo": {"calibration": {m: 0.3 + 0.1 * i for m in METRICS}},
            "real": {"calibration": {m: 0.3 + 0.1 * i for m in METRICS}},
            "confidence": {"calibration": 0.5 + 0.05 * i},
        }
        for i in range(5)
    ]


def test_quality_regressor_row_follows_the_checkpoints(tmp_path):
    """The paper protocol's regressor row: the model's weights at every recorded epoch, one mean estimate each."""
    import lightning.pytorch as pl

    from spe_lightning import SPECallback
    from spe_lightning.benchmarking import WeightSnapshots, fit_regressor, paper_metrics, regressor_by_checkpoint
    from spe_lightning.data import SyntheticShapesDataModule
    from spe_lightning.models import SegmentationModel
    from spe_lightning.percase.regressor import QualitySettings
    from spe_lightning.reverse import make_segmenter

    pl.seed_everything(0)
    dm = SyntheticShapesDataModule(n_train=24, n_val=12, n_target=8, size=32, batch_size=4)
    model = SegmentationModel(channels=(8, 16), strides=(2,), lr=3e-3)
    # label fusion at the images' own 32 px (its default 48 upsamples them): the row's plumbing is what is checked
    fast = make_segmenter("label_fusion", size=32)
    cb = SPECallback(segmenter=fast, support_size=8, max_references=16, seed=0, verbose=False)
    snaps = WeightSnapshots(cb)
    trainer = pl.Trainer(
        max_epochs=3,  # three checkpoints: the fewest G is fitted on
        accelerator="cpu",
        logger=False,
        callbacks=[cb, snaps],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(snaps.weights) == [r.epoch for r in cb.records] == [0, 1, 2]
    final = {k: v.clone() for k, v in model.state_dict().items()}
    est, _ = fit_regressor(cb.run, model, dm, QualitySettings(epochs=3))
    by_ckpt = regressor_by_checkpoint(est, model, cb.run, snaps.weights)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())  # back at the final weights
    means = by_ckpt["means"]["target_noisy"]
    assert len(means) == 3 and all(0.0 <= v <= 1.0 for v in means)
    rows = est.case_estimates(model, cb.run.sets["target_noisy"])
    assert means[-1] == pytest.approx(np.mean([r["estimated_dice"] for r in rows]))
    assert len(set(np.round(means, 6))) > 1  # the weights really changed between checkpoints
    result = paper_metrics({"records": {"label_fusion": cb.records}, "quality_regressor_by_checkpoint": by_ckpt})
    row = result["metrics_by_target"]["target_noisy"]["dice"]["quality_regressor"]
    assert row["n_scored"] == result["metrics_by_target"]["target_noisy"]["dice"]["spe"]["n_scored"]


def test_spe_regressor_combination_is_chosen_on_the_calibration_pairs_only():
    from spe_lightning.benchmarking import shift_scores

    records = _linear_records()
    # on the pairs' sets SPE is blind (pseudo unchanged) while the regressor follows the real drops
    drops = {"noise_2": -0.1, "blur_2": -0.2, "gamma_2": -0.05}
    pairs = [{"name": n, "d_pseudo": {"dice": 0.0}, "d_real": {"dice": d}} for n, d in drops.items()]

    def result(dev_offset):
        return {
            "records": {"auto": records},
            "shift_raw": {
                "auto": {
                    "calibration": measured(0.7),
                    "targets": {"clean": measured(0.7), "noise_3": measured(0.5)},
                    "pairs": pairs,
                    "quality_regressor": {
                        "means": {"clean": 0.68, "noise_3": 0.45},
                        "dev_means": {n: 0.7 + d + dev_offset for n, d in drops.items()},
                    },
                }
            },
        }

    good = shift_scores(result(0.0))
    assert good["combination"]["weight"] == 1.0 and good["combination"]["sets"] == list(drops)
    by_name = {r["name"]: r for r in good["targets"]}
    assert by_name["noise_3"]["spe_combined"]["dice"] == pytest.approx(0.45)  # the regressor's value
    biased = shift_scores(result(0.3))  # a regressor worse than SPE on the pairs is never mixed in
    assert biased["combination"]["weight"] == 0.0
    assert {r["name"]: r for r in biased["targets"]}["noise_3"]["spe_combined"]["dice"] == pytest.approx(0.5)


def _phantom_folder(root, splits):
    from PIL import Image

    from spe_lightning.data import SyntheticShapesDataset

    for split, n in splits.items():
        data = SyntheticShapesDataset(n, size=32, seed=len(split))
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        for i in range(n):
            item = data[i]
            image, mask = (item["image"], item["label"]) if isinstance(item, dict) else item
            Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(mask.reshape(32, 32).numpy().astype(np.uint8)).save(
                root / split / "masks" / f"{split}{i}.png"
            )
    return root


def test_shift_benchmark_end_to_end_on_a_tiny_folder(tmp_path):
    """run_shift from training to scores: regressor rows (per checkpoint and per target), the combination
    chosen on the calibration pairs, a --target site on its own and checkpoint selection."""
    from spe_lightning.benchmarking import BenchmarkConfig, run_shift

    data = _phantom_folder(tmp_path / "data", {"train": 16, "test": 10, "extra_test": 8})
    site = _phantom_folder(tmp_path / "site", {"extra_test": 6})
    cfg = BenchmarkConfig(
        data=str(data),
        epochs=3,
        # selection targets are measured for the first only; size=32 fuses at the images' own size (the default
        # 48 upsamples these 32-px phantoms: 2.25x the reverse step's work for nothing this test checks)
        segmenters=("label_fusion:size=32", "label_fusion:size=32,k=4"),
        image_size=32,
        batch_size=4,
        support_size=8,
        max_references=12,
        accelerator="cpu",
        log_dir=str(tmp_path / "logs"),
        targets=(("site", str(site)),),
        select_every=3,
    )
    res = run_shift(cfg, out=str(tmp_path / "out.json"))
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    by_ckpt = res["quality_regressor_by_checkpoint"]
    assert by_ckpt["epochs"] == [r["epoch"] for r in res["records"]["label_fusion:size=32"]]
    assert "quality_regressor" in res["metrics"]["dice"] and "quality_regressor" in res["summary"]["dice"]
    raw = res["shift_raw"]["label_fusion:size=32"]
    generic = [p for p in raw["pairs"] if "target" not in p]
    assert {p["target"] for p in raw["pairs"] if "target" in p} == {"extra_test", "site"}  # the product's own
    assert set(raw["quality_regressor"]["dev_means"]) == {p["name"] for p in generic}
    # the combination is chosen on held-out families only: the regressor's map refitted without each shift
    # family; the subsets (calibration cases its map was fitted on) are skipped
    shifted = {p["name"] for p in generic if p["kind"] == "shift"}
    assert set(res["combination"]["sets"]) <= shifted and res["combination"]["held_out"]
    assert "spe_combined" in res["summary"]["dice"]
    # the new signals (issue 23): a styled pair per benchmark target, agreement, their rows and pair errors
    names = [t["name"] for t in res["targets"]]
    assert set(raw["styled_pairs"]) == set(names) and all(p["kind"] == "styled" for p in raw["styled_pairs"].values())
    assert raw["agreement"]["calibration"] == pytest.approx(raw["agreement"]["calibration_run"])
    assert set(raw["agreement"]["pairs"]) == {p["name"] for p in generic}
    for row in ("soft_dice_confidence", "styled_calibration_score", "agreement", "spe_without_styled"):
        assert res["summary"]["dice"][row]["n"] > 0, row
    assert {"spe", "calibration_score", "soft_dice_confidence", "agreement"} <= set(res["pair_errors"])
    assert set(res["timing"]["signals_s"]) == {"styled_pairs", "agreement"}
    # the product's own: also the size probes it measures at fit end (engine/set_size.py)
    assert set(res["timing"]["product_signals_s"]) == {"styled_pairs", "agreement", "size_probes"}
    combo = res["all_signals"]  # item 4: weights chosen on held-out families, a row beside SPE's
    assert combo is None or (sum(combo["weights"]) == pytest.approx(1.0) and "all_signals" in res["summary"]["dice"])
    assert set(res["sites"]) == {"site"} and "site" in res["selection"]["targets"]
    assert res["selection"]["summary"]["shifted"]
    noise = res["metrics_by_target"]["noise_2"]["dice"]  # a selection target: no row for the second segmenter
    assert "spe" in noise and "spe_label_fusion:size=32,k=4" not in noise
    assert "spe_label_fusion:size=32,k=4" in res["metrics"]["dice"]
    # the nearest-set flag is scored from stored features, each synthetic target without its own family's pairs
    feats = raw["features"]
    assert set(feats["pairs"]) == {p["name"] for p in generic} and set(feats["targets"]) == set(names)
    rows = {t["name"]: t["spe"]["dice"] for t in res["targets"]}
    assert all(rows[n].get("nearest_set_distance") is not None for n in names if rows[n].get("value") is not None)
    assert res["settings"]["styling"] == "v1"  # the recipe is part of the recorded settings
    flags = res["summary"]["dice"]["spe"]
    assert flags["missed_and_flagged"] <= min(flags["missed"], flags["flagged"])


def test_a_synthetic_targets_nearest_set_leaves_its_own_shift_family_out():
    from spe_lightning.benchmarking.scoring import nearest_without_family

    rng = np.random.default_rng(0)
    cal = rng.normal(0, 1, (20, 3))
    noise_pair = cal + [6.0, 0.0, 0.0]
    target = rng.normal(0, 1, (15, 3)) + [6.0, 0.0, 0.0]  # looks like the noise pair only
    feats = {"calibration": cal.tolist(), "pairs": {"noise_2": noise_pair.tolist()}, "targets": {"noise_3": target}}
    like_its_pair = nearest_without_family(
        {**feats, "pairs": {**feats["pairs"], "gamma_2": cal.tolist()}}, "noise_3", None
    )
    assert like_its_pair is not None and like_its_pair < 2.0
    # its own family left out, only the calibration set is left and it is far from it
    assert (
        nearest_without_family({**feats, "pairs": {**feats["pairs"], "gamma_2": cal.tolist()}}, "noise_3", "noise_") > 2
    )
    assert nearest_without_family(feats, "noise_3", "noise_") is None  # no pair left: not measured
    assert nearest_without_family(None, "noise_3", None) is None  # a run recorded before the features
