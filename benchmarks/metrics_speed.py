"""Our metrics against torchmetrics (confusion counts) and MONAI (HD95): same values, time per call.

    python benchmarks/metrics_speed.py [--n 64] [--size 128] [--repeats 5]

Masks: seeded random discs with boundary noise (like a model's predictions against truths).
Prints the median wall time of each over ``--repeats`` calls and the largest difference.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def masks(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, 2, generator=g) * size * 0.5 + size * 0.25
    r = torch.rand(n, 2, generator=g) * size * 0.2 + size * 0.1
    d = [((yy - c[:, k, 0, None, None]) ** 2 + (xx - c[:, k, 1, None, None]) ** 2).sqrt() for k in range(2)]
    truth = d[0] < r[:, 0, None, None]
    pred = (d[1] < r[:, 1, None, None]) ^ (torch.rand(n, size, size, generator=g) < 0.01)
    return pred, truth


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    from monai.metrics import compute_hausdorff_distance
    from torchmetrics.functional.classification import binary_stat_scores

    from spe_lightning.engine.metrics import per_image_metrics

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    pred, truth = masks(a.n, a.size, 0)

    def ours_counts():
        return per_image_metrics(pred, truth, ["dice", "iou", "precision", "recall"])

    def tm_counts():
        tp, fp, tn, fn, _ = binary_stat_scores(pred.long(), truth.long(), multidim_average="samplewise").double().T
        return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn), "precision": tp / (tp + fp),
                "recall": tp / (tp + fn)}  # fmt: skip

    def ours_hd():
        return per_image_metrics(pred, truth, ["hd95"])["hd95"]

    def monai_hd():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compute_hausdorff_distance(
                pred[:, None].float(), truth[:, None].float(), include_background=True, percentile=95
            )[:, 0].double()

    diff_c = max(float((ours_counts()[k] - v).abs().max()) for k, v in tm_counts().items())
    diff_h = float((ours_hd() - monai_hd()).abs().max())
    rows = [
        ("dice/iou/precision/recall", "ours", median_time(ours_counts, a.repeats), diff_c),
        ("dice/iou/precision/recall", "torchmetrics", median_time(tm_counts, a.repeats), diff_c),
        ("hd95", "ours", median_time(ours_hd, a.repeats), diff_h),
        ("hd95", "MONAI", median_time(monai_hd, a.repeats), diff_h),
    ]
    print(f"{a.n} masks of {a.size}x{a.size}, 1 thread, median of {a.repeats}")
    print("| metrics | implementation | s per call | max abs difference |\n|---|---|---|---|")
    for m, impl, t, d in rows:
        print(f"| {m} | {impl} | {t:.4f} | {d:.1e} |")


if __name__ == "__main__":
    main()
