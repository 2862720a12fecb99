import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from spe_lightning.engine.metrics import (
    BOUNDED,
    HIGHER_IS_BETTER,
    PAPER_METRICS,
    _boundary,
    per_image_metrics,
    validate_metrics,
)


def _blobs(n: int, size: tuple[int, ...], seed: int = 0, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ball-shaped truths and perturbed predictions, ``[n, *size]`` bool."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")
    lo = torch.tensor(size, dtype=torch.float32)
    c = 0.25 * lo + 0.5 * lo * torch.rand(n, len(size), generator=g)
    r = min(size) * (0.1 + 0.2 * torch.rand(n, generator=g))
    c2 = c + 0.08 * min(size) * torch.randn(n, len(size), generator=g)
    r2 = r * (1 + 0.2 * torch.randn(n, generator=g))
    shape = (n,) + (1,) * len(size)

    def ball(cc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        d2 = sum((grids[i] - cc[:, i].view(shape)) ** 2 for i in range(len(size)))
        return d2 < rr.view(shape) ** 2

    truth, pred = ball(c, r), ball(c2, r2)
    if noise:
        pred ^= torch.rand(pred.shape, generator=g) < noise
    return pred, truth


def _monai_hd95(pred: torch.Tensor, target: torch.Tensor, spacing=None) -> torch.Tensor:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            pred[:, None].float(), target[:, None].float(), include_background=True, percentile=95, spacing=spacing
        )
    return hd[:, 0].double()


# --- constants and validation ---------------------------------------------------------------


def test_constants():
    assert PAPER_METRICS == ("dice", "iou", "precision", "recall", "hd95", "pearson_r")
    assert set(HIGHER_IS_BETTER) == set(PAPER_METRICS) == set(BOUNDED)
    assert HIGHER_IS_BETTER["hd95"] is False
    assert all(HIGHER_IS_BETTER[m] for m in PAPER_METRICS if m != "hd95")
    assert BOUNDED["dice"] == (0.0, 1.0) and BOUNDED["pearson_r"] == (-1.0, 1.0) and BOUNDED["hd95"] == (0.0, None)


def test_validate_metrics():
    assert validate_metrics(["dice", "hd95"]) == ("dice", "hd95")
    assert validate_metrics("iou") == ("iou",)
    assert validate_metrics(PAPER_METRICS) == PAPER_METRICS
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['dsc', 'foo'\].*valid metrics are"):
        validate_metrics(["dice", "dsc", "foo"])
    with pytest.raises(ValueError, match="at least one"):
        validate_metrics([])
    with pytest.raises(ValueError, match=r"duplicate metric\(s\) \['dice'\]"):
        validate_metrics(["dice", "iou", "dice"])


# --- hand-computed values -------------------------------------------------------------------


def test_overlap_4x4():
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, 0:2] = True  # 8 px
    target[0, 1:3] = True  # 8 px; TP=4 FP=4 FN=4 TN=4
    out = per_image_metrics(pred, target)
    assert out["dice"].item() == pytest.approx(0.5)
    assert out["iou"].item() == pytest.approx(1 / 3)
    assert out["precision"].item() == pytest.approx(0.5)
    assert out["recall"].item() == pytest.approx(0.5)
    assert out["pearson_r"].item() == pytest.approx(0.0, abs=1e-12)  # (4*4 - 4*4) / ...
    assert out["hd95"].item() == pytest.approx(1.0)  # every boundary pixel is 0 or 1 from the other boundary


def test_overlap_5x5():
    pred = torch.zeros(1, 1, 5, 5)
    target = torch.zeros(1, 1, 5, 5)
    pred[..., 0:3, 0:3] = 1  # 9 px
    target[..., 0:2, 0:2] = 1  # 4 px; TP=4 FP=5 FN=0 TN=16
    out = per_image_metrics(pred, target)
    assert out["dice"].item() == pytest.approx(8 / 13)
    assert out["iou"].item() == pytest.approx(4 / 9)
    assert out["precision"].item() == pytest.approx(4 / 9)
    assert out["recall"].item() == pytest.approx(1.0)
    assert out["pearson_r"].item() == pytest.approx((4 * 16 - 5 * 0) / math.sqrt(9 * 4 * 21 * 16))


def test_hd95_single_pixels():
    pred = torch.zeros(2, 7, 7, dtype=torch.bool)
    target = torch.zeros(2, 7, 7, dtype=torch.bool)
    pred[0, 2, 1], target[0, 2, 4] = True, True  # 3 apart
    pred[1, 0, 0], target[1, 3, 4] = True, True  # a 3-4-5 triangle
    out = per_image_metrics(pred, target, ["hd95"])["hd95"]
    assert out.tolist() == pytest.approx([3.0, 5.0])
    # spacing: (row, col) = (1, 2) -> the first pair is 6 apart, the second sqrt(9 + 64)
    out = per_image_metrics(pred, target, ["hd95"], spacing=(1.0, 2.0))["hd95"]
    assert out.tolist() == pytest.approx([6.0, math.sqrt(73)])
    assert per_image_metrics(pred, target, ["hd95"], spacing=0.5)["hd95"].tolist() == pytest.approx([1.5, 2.5])


def test_hd95_shifted_square():
    pred = torch.zeros(1, 32, 32, dtype=torch.bool)
    target = torch.zeros(1, 32, 32, dtype=torch.bool)
    pred[0, 10:20, 10:20] = True
    target[0, 10:20, 12:22] = True  # shifted 2 columns: most boundary distances are 0 or 2, none above 2
    out = per_image_metrics(pred, target)
    assert out["hd95"].item() == pytest.approx(2.0)
    assert out["dice"].item() == pytest.approx(80 / 100)
    assert per_image_metrics(pred, pred, ["hd95"])["hd95"].item() == 0.0


# --- empty masks ----------------------------------------------------------------------------


def test_empty_mask_conventions():
    pred = torch.zeros(4, 4, 6, dtype=torch.bool)
    target = torch.zeros(4, 4, 6, dtype=torch.bool)
    # 0: both empty; 1: prediction empty; 2: truth empty; 3: both full
    target[1, 1:3, 1:3] = True
    pred[2, 0, 0] = True
    pred[3], target[3] = True, True
    out = per_image_metrics(pred, target)
    diag = math.sqrt(4**2 + 6**2)
    assert out["dice"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["iou"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["precision"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["recall"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["hd95"].tolist() == pytest.approx([0.0, diag, diag, 0.0])
    assert out["pearson_r"].tolist() == [1.0, 0.0, 0.0, 1.0]
    hd = per_image_metrics(pred, target, ["hd95"], spacing=(2.0, 0.5))["hd95"]
    assert hd.tolist() == pytest.approx([0.0, math.sqrt(8**2 + 3**2), math.sqrt(8**2 + 3**2), 0.0])


def test_pearson_constant_masks():
    full = torch.ones(3, 5, 5, dtype=torch.bool)
    other = torch.zeros(3, 5, 5, dtype=torch.bool)
    other[1, 2, 2] = True
    other[2] = True
    # full vs empty, full vs partial (pred constant), full vs full
    assert per_image_metrics(full, other, ["pearson_r"])["pearson_r"].tolist() == [0.0, 0.0, 1.0]
    assert per_image_metrics(other, full, ["pearson_r"])["pearson_r"].tolist() == [0.0, 0.0, 1.0]
    # a perfectly anti-correlated pair
    assert per_image_metrics(other[1:2], ~other[1:2], ["pearson_r"])["pearson_r"].item() == pytest.approx(-1.0)


def test_never_nan_or_out_of_range():
    pred, target = _blobs(40, (24, 24), seed=3, noise=0.01)
    pred[:5], target[3:8] = False, False
    pred[10], target[11] = True, True
    out = per_image_metrics(pred, target)
    for m, v in out.items():
        assert torch.isfinite(v).all(), m
        lo, hi = BOUNDED[m]
        assert (lo is None or (v >= lo).all()) and (hi is None or (v <= hi + 1e-12).all()), m


# --- agreement with torchmetrics and MONAI --------------------------------------------------


def test_counts_match_torchmetrics():
    from torchmetrics.functional import pearson_corrcoef
    from torchmetrics.functional.classification import binary_stat_scores

    pred, target = _blobs(30, (20, 20), seed=1, noise=0.05)
    out = per_image_metrics(pred, target)
    tp, fp, tn, fn, _ = binary_stat_scores(pred.long(), target.long(), multidim_average="samplewise").double().T
    assert torch.allclose(out["dice"], 2 * tp / (2 * tp + fp + fn))
    assert torch.allclose(out["iou"], tp / (tp + fp + fn))
    assert torch.allclose(out["precision"], tp / (tp + fp))
    assert torch.allclose(out["recall"], tp / (tp + fn))
    r = pearson_corrcoef(pred.flatten(1).T.double(), target.flatten(1).T.double())
    assert torch.allclose(out["pearson_r"], r, atol=1e-10)


def test_boundary_matches_scipy_erosion():
    pred, _ = _blobs(6, (15, 17), seed=2, noise=0.2)
    ours = _boundary(pred)
    for i in range(len(pred)):
        m = pred[i].numpy()
        assert np.array_equal(ours[i].numpy(), m ^ ndimage.binary_erosion(m))
    pred3, _ = _blobs(3, (6, 7, 8), seed=2, noise=0.2)
    ours3 = _boundary(pred3)
    for i in range(len(pred3)):
        m = pred3[i].numpy()
        assert np.array_equal(ours3[i].numpy(), m ^ ndimage.binary_erosion(m))


@pytest.mark.parametrize("spacing", [None, 0.7, (1.0, 2.5)])
def test_hd95_matches_monai_2d(spacing):
    pred, target = _blobs(24, (40, 36), seed=4, noise=0.003)
    ours = per_image_metrics(pred, target, ["hd95"], spacing=spacing)["hd95"]
    ref = _monai_hd95(pred, target, spacing)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_hd95_matches_monai_3d():
    pred, target = _blobs(6, (12, 14, 10), seed=5, noise=0.002)
    ours = per_image_metrics(pred[:, None], target[:, None], ["hd95"], spacing=(2.0, 1.0, 0.5))["hd95"]
    ref = _monai_hd95(pred, target, (2.0, 1.0, 0.5))
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-4)


# --- shapes, dtypes, chunking -----------------------------------------------------------------


def test_3d_input_and_channel_dim():
    pred, target = _blobs(5, (8, 9, 10), seed=6)
    a = per_image_metrics(pred, target)
    b = per_image_metrics(pred[:, None], target[:, None])
    for m in PAPER_METRICS:
        assert torch.equal(a[m], b[m])
    assert a["dice"].shape == (5,)
    empty = torch.zeros_like(pred)
    assert per_image_metrics(empty, target, ["hd95"])["hd95"][0].item() == pytest.approx(math.sqrt(64 + 81 + 100))


def test_channel_dim_dtypes_and_output_format():
    pred, target = _blobs(7, (16, 16), seed=7)
    base = per_image_metrics(pred, target)
    assert list(base) == list(PAPER_METRICS)
    for v in base.values():
        assert v.dtype == torch.float64 and v.device.type == "cpu" and v.shape == (7,)
    variants = [
        (pred[:, None], target[:, None]),
        (pred.float(), target.double()),
        (pred.to(torch.uint8)[:, None], target.long()[:, None]),
    ]
    for p, t in variants:
        out = per_image_metrics(p, t)
        for m in PAPER_METRICS:
            assert torch.equal(out[m], base[m]), m
    sub = per_image_metrics(pred, target, ["hd95", "dice"])
    assert list(sub) == ["hd95", "dice"] and torch.equal(sub["dice"], base["dice"])


def test_chunking_invariance():
    pred, target = _blobs(13, (20, 20), seed=8, noise=0.01)
    pred[2], target[5] = False, False
    ref = per_image_metrics(pred, target, chunk_size=64)
    for cs in (1, 3, 13):
        out = per_image_metrics(pred, target, chunk_size=cs)
        for m in PAPER_METRICS:
            assert torch.equal(out[m], ref[m]), (cs, m)


def test_no_images():
    out = per_image_metrics(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    assert all(v.shape == (0,) and v.dtype == torch.float64 for v in out.values())


# --- errors ---------------------------------------------------------------------------------


def test_errors():
    a = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"pred \(2, 1, 8, 8\) and target \(2, 8, 8\)"):
        per_image_metrics(a, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="pred must be a binary mask.*threshold it first"):
        per_image_metrics(torch.full((2, 8, 8), 0.7), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="target must be a binary mask.*threshold"):
        per_image_metrics(torch.zeros(2, 8, 8), torch.full((2, 8, 8), 2))
    with pytest.raises(ValueError, match="binary mask"):
        per_image_metrics(torch.full((1, 4, 4), float("nan")), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="2 or 3 spatial dimensions"):
        per_image_metrics(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="2 or 3 spatial dimensions"):
        per_image_metrics(torch.zeros(2, 3, 4, 4, 4), torch.zeros(2, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown metric"):
        per_image_metrics(a, a, ["dice", "hd100"])
    with pytest.raises(ValueError, match="spacing"):
        per_image_metrics(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        per_image_metrics(a, a, spacing=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        per_image_metrics(a, a, chunk_size=0)
