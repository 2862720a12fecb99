"""CUDA checks of SPECallback (needs a GPU): fits on the GPU (binary, multi-class, 3D) and the memory budget.

1. Tiny models (spe_lightning/testing.py) trained on CUDA with SPECallback: every record finite, estimates made.
2. The reverse step's CUDA memory: 1000 references of 256x256, S = 64, label fusion, without a budget
   (chunks of 32 queries) and with ``memory_budget_mb`` budgets; the peak memory allocated on top of
   what was allocated before, against the budget.

    python benchmarks/cuda_smoke.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.metrics import PAPER_METRICS
from spe_lightning.engine.spe_engine import SPEEngine
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter
from spe_lightning.testing import Blobs, TinyNet, finite_everywhere, loader, tiny_spe, tiny_trainer

MIB = 2**20


def fits(root: Path) -> None:
    cases = {
        "binary 2D": (dict(), dict(), (32, 32)),
        "multi-class 2D": (dict(classes={"bright": 1, "dim": 2}), dict(out_channels=3), (32, 32)),
        "binary 3D": (dict(working_size=24, max_slices=4), dict(dims=3), (8, 24, 24)),
    }
    for name, (spe_kw, net_kw, shape) in cases.items():
        torch.manual_seed(0)
        n_classes = 2 if "classes" in spe_kw else 1
        ref, cal = Blobs(16, shape, 1, n_classes), Blobs(10, shape, 2, n_classes)
        tgt = {"t": Blobs(10, shape, 3, n_classes, noise=0.15)}
        cb = tiny_spe(reference=ref, calibration=cal, target=tgt, memory_budget_mb=64, **spe_kw)
        t0 = time.perf_counter()
        tiny_trainer(root / name.replace(" ", "_"), 5, [cb], accelerator="gpu", devices=1).fit(
            TinyNet(**net_kw), loader(ref, 2)
        )
        est = cb.report.estimates["t"]["dice"]
        print(
            f"{name}: {len(cb.records)} records in {time.perf_counter() - t0:.1f}s, "
            f"finite={finite_everywhere(cb.report)}, "
            f"dice estimate {est.value} (true {cb.report.true['t']['dice']:.3f}), reason {est.reason}"
        )


def budget(n: int = 1000, size: int = 256, support: int = 64) -> None:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def blob() -> torch.Tensor:
        cy, cx, r = (
            torch.rand(3, generator=g) * torch.tensor([0.5, 0.5, 0.2]) + torch.tensor([0.25, 0.25, 0.1])
        ) * size
        return (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)[None]

    masks = [blob() for _ in range(n + support)]
    gray = torch.stack([m.float() * 0.6 + 0.2 for m in masks]) + 0.05 * torch.rand(
        n + support, 1, size, size, generator=g
    )
    ref = CachedSet("reference", [], masks[:n], gray[:n], list(range(n)))
    cal = CachedSet("calibration", [], masks[n:], gray[n:], list(range(support)))
    rows = []
    for b in (None, 512.0, 128.0, 32.0):
        engine = SPEEngine(
            LabelFusionSegmenter(chunk_size=32), ref, PAPER_METRICS, support_size=support, memory_budget_mb=b
        )
        sup = engine.support(cal, cal.masks)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        res = engine.reverse_metrics(sup, "cuda")
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MIB
        rows.append(
            {
                "budget_mib": b,
                "peak_extra_mib": round(peak, 1),
                "seconds": round(time.perf_counter() - t0, 2),
                "mean_dice": round(float(res["dice"].mean()), 4),
            }
        )
        print(json.dumps(rows[-1]))
    print("| budget (MiB) | peak CUDA memory added by the reverse step (MiB) | s | mean pseudo dice |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget_mib'] or 'none (chunk 32)'} | {r['peak_extra_mib']} | {r['seconds']} | {r['mean_dice']} |")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0))
    fits(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/spe_cuda"))
    budget()
