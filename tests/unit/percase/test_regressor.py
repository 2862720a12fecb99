"""Quality regressor (image + candidate mask -> Dice), its synthetic candidates and its calibration."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from spe_lightning.data.synthetic import make_phantom
from spe_lightning.engine.metrics import per_image_metrics
from spe_lightning.percase.combination import choose_combination
from spe_lightning.percase.mask_errors import ERROR_KINDS, degrade, dice_np, make_candidates
from spe_lightning.percase.rca import spearman
from spe_lightning.percase.regressor import (
    QualityRegressor,
    QualitySettings,
    calibrate_quality,
    quality_estimates,
    synthetic_pairs,
)

TINY = {"size": 32, "widths": (8, 8, 16, 16), "per_case": 8, "epochs": 5, "batch_size": 32}


def _phantoms(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = [make_phantom(g, size) for _ in range(n)]
    return torch.stack([i for i, _ in items]), torch.stack([m for _, m in items]) > 0.5


@pytest.fixture(scope="module")
def fitted() -> QualityRegressor:
    torch.set_num_threads(1)
    images, masks = _phantoms(32, seed=1)
    return QualityRegressor(QualitySettings(**TINY)).fit(images, masks, seed=0)


def test_candidates_have_exact_dice_and_are_deterministic() -> None:
    _, masks = _phantoms(6, seed=3)
    cand, src, d = make_candidates(masks, per_case=5, seed=7)
    assert cand.shape == (30, 1, 32, 32) and cand.dtype == torch.bool
    assert torch.equal(src, torch.arange(6).repeat_interleave(5))
    real = per_image_metrics(cand, masks[src], ("dice",))["dice"].float()
    assert torch.allclose(d, real, atol=1e-6)
    assert d.min() < 0.5 < d.max()  # the candidates spread over good and bad masks
    cand2, _, d2 = make_candidates(masks, per_case=5, seed=7)
    assert torch.equal(cand, cand2) and torch.equal(d, d2)


@pytest.mark.parametrize("kind", [k for k in ERROR_KINDS if k not in ("swap", "empty")])
def test_each_error_kind_damages_more_when_stronger(kind: str) -> None:
    _, masks = _phantoms(1, seed=4, size=48)
    m = masks[0, 0].numpy()
    weak = dice_np(degrade(m, kind, 0.2, np.random.default_rng(0)), m)
    strong = dice_np(degrade(m, kind, 0.9, np.random.default_rng(0)), m)
    assert strong < weak <= 1.0
    assert strong < 0.95


def test_predictions_rank_held_out_candidates(fitted: QualityRegressor) -> None:
    images, masks = _phantoms(12, seed=2)
    cand, src, d = make_candidates(masks, per_case=6, seed=11)
    pred = fitted.predict(images[src], cand)
    assert pred.shape == (72,) and bool(((pred >= 0) & (pred <= 1)).all())
    assert spearman(pred.numpy(), d.numpy()) > 0.6
    good, bad = d > 0.85, d < 0.4
    assert pred[good].mean() > pred[bad].mean() + 0.2


def test_fit_is_deterministic_for_a_seed(fitted: QualityRegressor) -> None:
    images, masks = _phantoms(32, seed=1)
    again = QualityRegressor(QualitySettings(**TINY)).fit(images, masks, seed=0)
    test_images, test_masks = _phantoms(4, seed=5)
    assert torch.equal(fitted.predict(test_images, test_masks), again.predict(test_images, test_masks))
    other = QualityRegressor(QualitySettings(**{**TINY, "epochs": 1})).fit(images, masks, seed=1)
    assert not torch.equal(fitted.predict(test_images, test_masks), other.predict(test_images, test_masks))


def test_state_round_trip_with_weights_only(fitted: QualityRegressor) -> None:
    buf = io.BytesIO()
    torch.save({"quality": fitted.state_tensors()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["quality"]
    loaded = QualityRegressor.from_state(state)
    images, masks = _phantoms(4, seed=6)
    assert torch.equal(loaded.predict(images, masks), fitted.predict(images, masks))
    assert loaded.settings == fitted.settings
    assert loaded.history["n_candidates"] == 32 * TINY["per_case"]
    pair = QualityRegressor(QualitySettings(**{**TINY, "epochs": 1, "n_models": 2})).fit(images, masks, seed=3)
    buf = io.BytesIO()
    torch.save(pair.state_tensors(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert len(state["weights"]) == 2
    assert torch.equal(QualityRegressor.from_state(state).predict(images, masks), pair.predict(images, masks))
    with pytest.raises(ValueError, match="saved networks"):
        QualityRegressor.from_state({**state, "weights": state["weights"][:1]})


def test_extra_candidates_join_the_pool_and_shapes_are_checked() -> None:
    images, masks = _phantoms(8, seed=8)
    extra = torch.zeros_like(masks)
    reg = QualityRegressor(QualitySettings(**{**TINY, "epochs": 1})).fit(images, masks, extra_candidates=[extra])
    assert reg.history["n_candidates"] == 8 * TINY["per_case"] + 8
    with pytest.raises(ValueError, match="extra candidates"):
        reg.fit(images, masks, extra_candidates=[extra[:3]])
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        reg.fit(images[:, 0], masks[:, 0])


def test_calibration_intervals_cover_at_about_the_level() -> None:
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        real = rng.beta(4, 2, n)
        raw = np.clip(0.5 * real + 0.2 + rng.normal(0, 0.06, n), 0, 1)  # monotone but biased, noisy
        return raw, real

    raw, real = draw(200)
    cal = calibrate_quality(raw, real, level=0.9, dice_cut=0.7)
    assert cal["threshold_method"] == "youden" and 0.0 < cal["half_width"] < 0.5
    raw_t, real_t = draw(4000)
    q = quality_estimates(cal, raw_t)
    covered = np.mean((real_t >= q["lower"]) & (real_t <= q["upper"]))
    assert 0.85 <= covered <= 0.95
    assert np.mean(np.abs(q["estimate"] - real_t)) < np.mean(np.abs(raw_t - real_t))  # the map removes the bias
    bad = real_t < 0.7
    assert q["flagged"][bad].mean() > 0.7 and (~q["flagged"][~bad]).mean() > 0.7
    lin = calibrate_quality(raw, real, kind="linear")
    assert lin["mapping"]["kind"] == "linear"


def test_synthetic_pairs_extend_the_map_to_bad_cases(fitted: QualityRegressor) -> None:
    images, masks = _phantoms(6, seed=9)
    raw_s, dice_s = synthetic_pairs(fitted, images, masks, per_case=4, seed=3)
    assert raw_s.shape == dice_s.shape == (24,)
    rng = np.random.default_rng(1)
    real = rng.uniform(0.85, 1.0, 60)  # a calibration set without a single bad case
    raw = np.clip(real + rng.normal(0, 0.03, 60), 0, 1)
    bad_real = rng.uniform(0.0, 0.6, 400)
    bad_raw = np.clip(bad_real + rng.normal(0, 0.05, 400), 0, 1)
    alone = quality_estimates(calibrate_quality(raw, real), bad_raw)
    assert alone["estimate"].min() >= 0.8  # the map cannot go below what it saw
    pairs = (np.clip(bad_real[:200] + rng.normal(0, 0.05, 200), 0, 1), bad_real[:200])
    cal = calibrate_quality(raw, real, extra_pairs=pairs)
    assert cal["n_extra_pairs"] == 200 and cal["n_cases"] == 60
    q = quality_estimates(cal, bad_raw[200:])
    assert np.mean(np.abs(q["estimate"] - bad_real[200:])) < 0.1
    assert np.mean((bad_real[200:] >= q["lower"]) & (bad_real[200:] <= q["upper"])) > 0.8
    good = quality_estimates(cal, raw)
    assert np.mean(good["upper"] - good["lower"]) < np.mean(q["upper"] - q["lower"])  # per-bin widths


def test_calibration_can_combine_the_model_confidence() -> None:
    rng = np.random.default_rng(2)
    real = rng.uniform(0, 1, 300)
    raw, conf = real + rng.normal(0, 0.25, 300), real + rng.normal(0, 0.25, 300)
    cal = calibrate_quality(raw[:150], real[:150], confidence=conf[:150])
    assert cal["weights"][0] > 0 and cal["weights"][1] > 0
    both = quality_estimates(cal, raw[150:], conf[150:])
    assert spearman(both["score"], real[150:]) > spearman(raw[150:], real[150:])
    with pytest.raises(ValueError, match="confidence"):
        quality_estimates(cal, raw[150:])


def test_combination_with_spe_is_kept_only_when_it_helps_on_development_sets() -> None:
    rng = np.random.default_rng(3)
    real = rng.uniform(0.5, 0.9, 12)
    spe, reg = real + rng.normal(0, 0.05, 12), real + rng.normal(0, 0.05, 12)  # independent errors: average
    both = choose_combination(spe, reg, real)
    assert 0.0 < both["weight"] < 1.0 and both["n_sets"] == 12
    bad = choose_combination(spe, real + 0.3, real)  # a biased regressor is never mixed in
    assert bad["weight"] == 0.0
    with pytest.raises(ValueError, match="lengths differ"):
        choose_combination(spe, reg[:3], real)
