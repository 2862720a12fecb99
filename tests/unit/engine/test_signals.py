"""The label-free signals of issue 23: Soft Dice Confidence, target-styled pairs, checkpoint agreement."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
import torch
from _shapes import smooth_scene

from spe_lightning.engine.agreement import (
    MaskHistory,
    agreement_estimate,
    fit_agreement_map,
    pairwise_agreement,
)
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.calibration_pairs import pairs_for_target, pairs_from_record
from spe_lightning.engine.records import fit_and_estimate
from spe_lightning.engine.soft_dice import set_soft_dice_confidence, soft_dice_confidence
from spe_lightning.engine.styled_pairs import (
    estimate_blur,
    estimate_noise_sigma,
    fda_swap,
    gaussian_blur,
    histogram_match,
    reblur_ratio,
    styled_set,
)

_scene = partial(smooth_scene, size=96)


# ---------------------------------------------------------------------------------------- soft dice confidence
def test_soft_dice_confidence_is_the_soft_dice_of_the_prediction_and_its_own_mask():
    p = torch.tensor([[0.9, 0.8, 0.3, 0.0]])
    m = p > 0.5
    # 2 * (0.9 + 0.8) / ((0.9 + 0.8 + 0.3) + 2)
    assert soft_dice_confidence(p, m).item() == pytest.approx(2 * 1.7 / 4.0)
    assert soft_dice_confidence(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.bool)).item() == 1.0
    assert soft_dice_confidence(torch.full((1, 4), 0.2), torch.zeros(1, 4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        soft_dice_confidence(torch.zeros(1, 4), torch.zeros(1, 5))
    assert set_soft_dice_confidence([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert set_soft_dice_confidence([]) is None


def test_soft_dice_confidence_approximates_the_expected_dice_under_independence():
    """The paper's claim: with pixels drawn independently from p, SDC is close to E[Dice(y_hat, y)]."""
    g = torch.Generator().manual_seed(0)
    for conc in (0.6, 0.9):  # vaguer and sharper probability maps
        p = torch.where(torch.rand(1, 4096, generator=g) < 0.3, conc, 1 - conc) * torch.rand(1, 4096, generator=g).add(
            1
        ).div(2).clamp(0, 1)
        m = p > 0.5
        y = torch.rand(2000, 4096, generator=g) < p  # truths drawn from p
        inter = (y & m).sum(1).float()
        dice = 2 * inter / (y.sum(1) + m.sum()).float()
        assert soft_dice_confidence(p, m).item() == pytest.approx(dice.mean().item(), abs=0.01)


def test_predict_confidence_is_the_soft_dice_confidence():
    from spe_lightning.engine.predict import predict_labels

    logits = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    data = _cached("x", list(logits), None)  # the images are the logits: an identity model returns them
    masks, c = predict_labels(torch.nn.Identity(), data, "cpu", batch_size=2)
    assert torch.allclose(c, soft_dice_confidence(torch.sigmoid(logits), torch.sigmoid(logits) > 0.5))
    assert all(torch.equal(m, lg > 0) for m, lg in zip(masks, logits))  # sigmoid > 0.5: the masks match too


# ---------------------------------------------------------------------------------------- styled pairs
def test_histogram_matching_moves_the_intensities_to_the_reference_distribution():
    src = _scene(0)
    ref = _scene(1) ** 3 * 0.5 + 0.2  # another distribution
    out = histogram_match(src, ref)
    qs = torch.linspace(0.05, 0.95, 10)
    before = (torch.quantile(src.flatten(), qs) - torch.quantile(ref.flatten(), qs)).abs().max()
    after = (torch.quantile(out.flatten(), qs) - torch.quantile(ref.flatten(), qs)).abs().max()
    assert after < 0.01 < before
    # the order of the pixels is kept: a monotone map
    order = torch.argsort(src.flatten(), stable=True)
    assert bool((out.flatten()[order].diff() >= -1e-6).all())


def test_fda_keeps_the_phase_and_takes_the_target_low_frequency_amplitude():
    src, tgt = _scene(2), _scene(3) * 0.3 + 0.5
    out = fda_swap(src, tgt, beta=0.05)
    fs, fo, ft = (torch.fft.fftshift(torch.fft.fft2(x)) for x in (src, out, tgt))
    strong = fs.abs() > 1e-3 * fs.abs().max()
    dphase = torch.angle(fo[strong] * fs[strong].conj())  # phase difference
    assert dphase.abs().max() < 1e-3
    c, b = 96 // 2, max(1, int(0.05 * 96))
    band = (slice(c - b, c + b + 1), slice(c - b, c + b + 1))
    assert torch.allclose(fo.abs()[band], ft.abs()[band], rtol=1e-3, atol=1e-2)
    # outside the band the source's amplitude stays: the structures (edges) are the source's
    assert torch.allclose(fo.abs()[0:10, 0:10], fs.abs()[0:10, 0:10], rtol=1e-3, atol=1e-2)
    assert out.mean().item() == pytest.approx(tgt.mean().item(), abs=1e-3)  # the mean (DC) is the target's


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_estimated_noise_sigma_is_within_tolerance_of_the_added_sigma(sigma):
    g = torch.Generator().manual_seed(4)
    noisy = _scene(4) + sigma * torch.randn(96, 96, generator=g)
    assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.15)
    assert estimate_noise_sigma(_scene(4)) < 0.01


def test_estimated_blur_recovers_the_blur_of_the_target():
    sources = [_scene(s) for s in range(4)]
    target = float(np.median([reblur_ratio(gaussian_blur(x, 2.0)) for x in [_scene(s) for s in range(10, 14)]]))
    assert estimate_blur(target, sources) == pytest.approx(2.0, abs=0.5)
    sharp = float(np.median([reblur_ratio(x) for x in [_scene(s) for s in range(10, 14)]]))
    assert estimate_blur(sharp, sources) <= 0.5


def _cached(name: str, images: list[torch.Tensor], masks: list[torch.Tensor] | None) -> CachedSet:
    gray = torch.stack([(x - x.min()) / (x.max() - x.min()) for x in images])
    return CachedSet(name, images, masks, gray, list(range(len(images))), [(i, -1) for i in range(len(images))])


def test_styled_set_looks_like_the_target_keeps_the_masks_and_is_deterministic():
    cal_imgs = [_scene(s)[None] for s in range(6)]
    masks = [(x > 0.4) for x in cal_imgs]
    g = torch.Generator().manual_seed(9)
    tgt_imgs = [
        (gaussian_blur(_scene(s), 1.5) * 200 + 20 + 8 * torch.randn(96, 96, generator=g))[None] for s in range(20, 28)
    ]
    cal, tgt = _cached("calibration", cal_imgs, masks), _cached("site", tgt_imgs, None)
    styled, style = styled_set(cal, tgt, seed=3)
    again, _ = styled_set(cal, tgt, seed=3)
    assert styled.name == "styled_site" and styled.masks is cal.masks and len(styled) == len(cal)
    assert all(torch.equal(a, b) for a, b in zip(styled.inputs, again.inputs))
    # the target's noise (8 / ~200 of its range) is estimated and added
    assert style["noise_target"] == pytest.approx(8 / 200, rel=0.35) and style["noise_added"] > 0.02
    assert style["blur_added"] > 0
    # intensities in the target's range, not the calibration's [0, ~1]
    lo, hi = min(float(x.min()) for x in styled.inputs), max(float(x.max()) for x in styled.inputs)
    assert lo > 0 and hi > 100
    assert styled.gray.shape == cal.gray.shape


def test_styled_pairs_join_only_their_own_targets_model():
    record = {
        "pseudo": {"calibration": {"dice": 0.9}, "subset5_0": {"dice": 0.89}, "styled_a": {"dice": 0.6}},
        "real": {"calibration": {"dice": 0.9}, "subset5_0": {"dice": 0.88}, "styled_a": {"dice": 0.5}},
        "confidence": {"subset5_0": 0.8, "styled_a": 0.7},
    }
    pairs = pairs_from_record(record, "calibration", ["subset5_0", "styled_a"], {"styled_a": "a"})
    assert pairs[0]["kind"] == "subset" and "target" not in pairs[0]
    assert pairs[1]["kind"] == "styled" and pairs[1]["target"] == "a" and pairs[1]["confidence"] == 0.7
    assert pairs[1]["d_real"]["dice"] == pytest.approx(-0.4)
    assert [p["name"] for p in pairs_for_target(pairs, "a")] == ["subset5_0", "styled_a"]
    assert [p["name"] for p in pairs_for_target(pairs, "b")] == ["subset5_0"]
    assert [p["name"] for p in pairs_for_target(pairs, None)] == ["subset5_0"]


def _records_and_pairs() -> tuple[list[dict], list[dict]]:
    records = []
    for i, (pc, rc) in enumerate([(0.5, 0.55), (0.7, 0.72), (0.8, 0.83), (0.85, 0.88)]):
        records.append(
            {
                "pseudo": {"calibration": {"dice": pc}, "a": {"dice": pc - 0.1}, "b": {"dice": pc - 0.1}},
                "real": {"calibration": {"dice": rc}},
                "confidence": {"calibration": 0.9, "a": 0.8, "b": 0.8},
                "epoch": i,
            }
        )
    pairs = [
        {"kind": "shift", "name": f"{f}_2", "d_pseudo": {"dice": dp}, "d_real": {"dice": dr}}
        for f, dp, dr in [("noise", -0.1, -0.1), ("gamma", -0.02, -0.03), ("blur", -0.05, -0.04)]
    ]
    pairs += [
        {"kind": "subset", "name": f"subset5_{k}", "d_pseudo": {"dice": 0.01}, "d_real": {"dice": 0.0}} for k in (0, 1)
    ]
    styled = {"kind": "styled", "name": "styled_a", "target": "a", "d_pseudo": {"dice": -0.1}, "d_real": {"dice": -0.4}}
    return records, [*pairs, styled]


def test_a_styled_pair_changes_only_its_targets_interval_model():
    records, pairs = _records_and_pairs()
    out = fit_and_estimate(records, ["a", "b"], ["dice"], pairs=pairs)
    generic = fit_and_estimate(records, ["a", "b"], ["dice"], pairs=pairs[:-1])
    assert out["estimates"]["b"]["dice"] == generic["estimates"]["b"]["dice"]
    assert out["estimates"]["a"]["dice"] != generic["estimates"]["a"]["dice"]
    assert set(out["anchor_intervals_by_target"]) == {"a"}


# ---------------------------------------------------------------------------------------- agreement
def test_pairwise_agreement_is_the_mean_pairwise_dice():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 0, 0], bool)
    c = np.array([0, 0, 0, 0], bool)
    v = pairwise_agreement([[a, c], [b, c], [a, c]])
    # case 0: dice(a,b)=2/3, dice(a,a)=1, dice(b,a)=2/3; case 1: all empty -> 1
    assert v[0] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3) and v[1] == 1.0
    assert np.isnan(pairwise_agreement([[a]])).all()
    with pytest.raises(ValueError, match="every case"):
        pairwise_agreement([[a, c], [b]])


def test_mask_history_keeps_the_last_k_bitpacked_and_survives_a_checkpoint():
    h = MaskHistory(k=3)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 1, 32, 32, generator=g) > 0.5
    for epoch in range(5):
        noisy = base ^ (torch.rand(base.shape, generator=g) < 0.05 * epoch)
        h.push("t", list(noisy), epoch)
    assert h.epochs("t") == [2, 3, 4]
    assert h.nbytes == 3 * 5 * 32 * 32 // 8  # one bit per pixel
    per_case = h.per_case("t")
    assert per_case.shape == (5,) and (per_case < 1).all() and (per_case > 0.6).all()
    buf = io.BytesIO()
    torch.save(h.state_dict(), buf)
    buf.seek(0)
    h2 = MaskHistory(k=3)
    h2.load_state_dict(torch.load(buf, weights_only=True))
    assert h2.epochs("t") == [2, 3, 4] and np.allclose(h2.per_case("t"), per_case)
    assert torch.equal(h2.latest("t")[0], h.latest("t")[0]) and h2.latest("t")[0].shape == (1, 32, 32)
    h.push("t", list(base[:2]), 5)  # a set whose size changed starts over
    assert h.epochs("t") == [5] and h.agreement("t") is None
    with pytest.raises(ValueError, match="at least 2"):
        MaskHistory(k=1)


def test_agreement_map_is_anchored_at_the_calibration_score():
    agree = np.array([0.90, 0.95, 0.98, 0.99, 1.0])
    real = np.array([0.70, 0.80, 0.86, 0.88, 0.90])
    fit = fit_agreement_map(agree, real)
    assert fit["slope"] > 0 and fit["real_calibration"] == pytest.approx(real.mean())
    assert agreement_estimate(fit, fit["agreement_calibration"]) == pytest.approx(real.mean())
    assert agreement_estimate(fit, 0.9) < agreement_estimate(fit, 0.99)
    assert agreement_estimate(fit, None) is None
    flat = fit_agreement_map(agree, real[::-1])  # a negative slope is not trusted: the calibration score
    assert flat["slope"] == 0.0 and agreement_estimate(flat, 0.5) == pytest.approx(real.mean())


# ---------------------------------------------------------------------------------------- in a run
def test_a_run_reports_the_signal_rows_and_keeps_the_masks_across_a_resume(tmp_path):
    from spe_lightning import SPEConfig, SPERun
    from spe_lightning.testing import Blobs, TinyNet, fast_segmenter, finite_everywhere, loader

    def config() -> SPEConfig:
        return SPEConfig(support_size=6, working_size=32, min_foreground=4, metrics=("dice",), verbose=False)

    torch.manual_seed(0)
    ref, cal, tgt = Blobs(16, seed=1), Blobs(10, seed=2), {"t": Blobs(10, seed=3, noise=0.15)}
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=model.lr)
    run = SPERun(config(), segmenter=fast_segmenter(), warn=pytest.fail)
    run.prepare(ref, cal, tgt)
    for epoch in range(4):
        model.train()
        for batch in loader(ref, 6):
            opt.zero_grad()
            model.training_step(batch, 0).backward()
            opt.step()
        run.record(model, epoch=epoch, step=epoch)
        if epoch == 1:  # a resume between checkpoints: the masks come back with the records
            state = run.state_dict()
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            resumed = SPERun(config(), segmenter=run.segmenter, warn=pytest.fail)
            resumed.prepare(ref, cal, tgt)
            resumed.load_state_dict(torch.load(buf, weights_only=True))
            assert resumed.history.epochs("t") == [0, 1]
            assert resumed.history.agreement("t") == pytest.approx(run.history.agreement("t"))
            run = resumed
    assert run.records[0].agreement["t"] is None and run.records[-1].agreement["t"] is not None
    run.finish(model, step=3)
    styled = [p for p in run.pairs if p["kind"] == "styled"]
    assert [(p["name"], p["target"]) for p in styled] == [("styled_t", "t")]
    assert run.styles["t"]["noise_added"] >= 0 and run.signal_seconds["styled_pairs"] > 0
    assert run.styles["t"]["styling"] == "v1" and run.styles["t"]["recipe"]["beta"] == 0.05  # the default recipe
    report = run.build_report()
    base = report["baselines"]
    assert base["soft_dice_confidence"]["t"]["dice"] == pytest.approx(run.records[-1].confidence["t"])
    real_cal = run.records[-1].real["calibration"]["dice"]
    assert base["styled_calibration_score"]["t"]["dice"] == pytest.approx(real_cal + styled[0]["d_real"]["dice"])
    assert base["agreement"]["t"]["dice"] is not None
    agree = report["signals"]["agreement"]
    assert agree["k"] == 3 and agree["map"]["n_cases"] == 10 and len(agree["per_case"]["t"]) == 10
    assert agree["nbytes"] == run.history.nbytes > 0
    assert "t" in report["anchor_intervals_by_target"] and finite_everywhere(report)
    paths = run.write_report(tmp_path, model)
    header = paths["csv"].read_text().splitlines()[0]
    assert "soft_dice_confidence,styled_calibration_score,agreement" in header


# ---------------------------------------------------------------------------------------- one estimate (item 4)
def _pair_errors(spe: list[float], reg: list[float], agree: list[float], real: list[float]) -> dict:
    names = [f"{f}_2" for f in ("noise", "gamma", "contrast", "blur", "bias_field", "low_resolution")]
    out: dict = {"real": dict(zip(names, real))}
    for key, vals in (("spe", spe), ("quality_regressor", reg), ("agreement", agree)):
        out[key] = {"values": dict(zip(names, vals))}
    out["subset5_0"] = {}
    return out


def test_all_signal_combination_is_chosen_on_held_out_families_and_ties_keep_spe_alone():
    from spe_lightning.benchmarking import all_signal_combination, weight_grid

    grid = weight_grid(3)
    assert grid[0] == (1.0, 0.0, 0.0) and len(grid) == 15 and all(sum(w) == pytest.approx(1) for w in grid)
    real = [0.6, 0.9, 0.85, 0.8, 0.7, 0.75]
    # agreement is exact on every family, SPE and the regressor miss: agreement alone wins held out
    res = all_signal_combination(
        {"pair_errors": _pair_errors([r + 0.1 for r in real], [r - 0.1 for r in real], real, real)}
    )
    assert res["weights"] == [0.0, 0.0, 1.0] and res["heldout_mae"] == pytest.approx(0.0)
    assert res["adopted"] and res["spe_heldout_mae"] == pytest.approx(0.1) and res["half_width"] == pytest.approx(0)
    # every signal the same: SPE alone (the simpler rule), not adopted
    same = [r + 0.05 for r in real]
    res = all_signal_combination({"pair_errors": _pair_errors(same, same, same, real)})
    assert res["weights"] == [1.0, 0.0, 0.0] and not res["adopted"]
    # fewer than 3 shifted families: no rule is chosen
    few = _pair_errors(real, real, real, real)
    for key in ("spe", "quality_regressor", "agreement"):
        few[key]["values"] = dict(list(few[key]["values"].items())[:2])
    assert all_signal_combination({"pair_errors": few}) is None
