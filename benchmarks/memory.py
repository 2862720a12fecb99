"""Peak memory of one SPE evaluation: many references, S = 64 supports, 256x256 images (CPU; optional CUDA).

Each configuration runs in a fresh process (peak RSS is per process, from ``resource.getrusage``):
read the references the way SPECallback does (working-size gray images and masks only, the model
inputs are not kept), then one evaluation of a 64-image calibration set whose predicted masks are
its true masks (no model: the reverse step and the metrics are what is measured). The references
are generated item by item, so the dataset itself holds nothing. "whole set" repeats the
evaluation as the engine did before chunking (model inputs of the references kept, one
segmenter call over all references, all probabilities held at once), for comparison.

    python benchmarks/memory.py [--references 250 1000] [--size 256] [--support 64] [--chunks 32 8]
    python benchmarks/memory.py --cuda --budget-mb 256     # CUDA: peak allocated vs the budget
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from spe_lightning.data.synthetic import make_phantom
from spe_lightning.engine.cached_set import cache_dataset
from spe_lightning.engine.metrics import PAPER_METRICS
from spe_lightning.engine.spe_engine import SPEEngine
from spe_lightning.reverse.label_fusion import LabelFusionSegmenter

MIB = 2**20


class LazyPhantoms:
    """``n`` phantoms ``size`` x ``size``, generated when read (nothing held in memory)."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # drawn at 64x64 and upsampled: drawing at 256x256 costs ~0.25 s an image on this CPU
        image, mask = make_phantom(torch.Generator().manual_seed(self.seed * 100_003 + i), 64)
        size = (self.size, self.size)
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return image, torch.nn.functional.interpolate(mask[None], size=size, mode="nearest")[0]


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MIB


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(n: int, size: int, support: int, chunk: int, mode: str, device: str, budget: float | None) -> dict:
    torch.set_num_threads(2)
    start = rss_mib()
    ref = cache_dataset(
        "reference",
        LazyPhantoms(n, size, 1),
        size,
        require_masks=True,
        slices="foreground",
        keep_inputs=mode == "whole",
    )
    cal = cache_dataset("calibration", LazyPhantoms(64, size, 2), size, require_masks=True)
    cached = rss_mib()
    seg = LabelFusionSegmenter(chunk_size=chunk)
    engine = SPEEngine(seg, ref, PAPER_METRICS, support_size=support, memory_budget_mb=budget)
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if mode == "whole":  # the engine before chunking: one call over all references, all probabilities at once
        sup = engine.support(cal, cal.masks)
        probs = seg(engine.ref_images.to(device), sup.images.to(device), sup.labels.to(device))
        from spe_lightning.engine.metrics import per_image_metrics

        per_image_metrics((probs > 0.5).cpu(), engine.ref_masks, PAPER_METRICS, chunk_size=max(1, n))
        n_support = len(sup.indices)
    else:
        rec = engine.evaluate({"calibration": (cal, cal.masks, torch.ones(len(cal)))}, device)
        n_support = rec["n_support"]["calibration"]
    out = {
        "references": n,
        "size": size,
        "support": n_support,
        "chunk": chunk,
        "mode": mode,
        "device": device,
        "rss_start_mib": round(start, 1),
        "rss_cached_mib": round(cached, 1),
        "peak_rss_mib": round(peak_mib(), 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if device == "cuda":
        out["cuda_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / MIB, 1)
        out["budget_mib"] = budget
    return out


def bound_mib(start: float, n: int, size: int, chunk: int, per_query_mib: float) -> float:
    """The documented bound: RSS after import + 9 bytes per reference pixel + 250 MiB + the chunk's queries.

    9 bytes a pixel: the float gray image and the working-size label map kept per reference, plus what
    the allocator keeps of the masks read once at setup; 250 MiB: the calibration set, the prepared
    support and the metrics; ``per_query_mib``: one query of the reverse segmenter (label fusion: ~10 MiB).
    """
    return start + 9 * n * size * size / MIB + 250 + per_query_mib * chunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--references", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--support", type=int, default=64)
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--whole", action="store_true", help="also measure the unchunked evaluation")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--budget-mb", type=float, default=None)
    ap.add_argument("--per-query-mib", type=float, default=10.0, help="one query's memory in the bound")
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return
    device = "cuda" if args.cuda else "cpu"
    jobs = [(n, c, "chunked") for n in args.references for c in args.chunks]
    if args.whole:
        jobs += [(n, 32, "whole") for n in args.references]
    print("| references | image | S | chunk | mode | RSS after import | after caching | peak RSS | bound | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, chunk, mode in jobs:
        spec = dict(n=n, size=args.size, support=args.support, chunk=chunk, mode=mode, device=device)
        spec["budget"] = args.budget_mb
        res = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        bound = bound_mib(r["rss_start_mib"], n, args.size, chunk, args.per_query_mib)
        ok = "" if mode == "whole" else (" ✓" if r["peak_rss_mib"] <= bound else " ✗")
        print(
            f"| {n} | {args.size}² | {r['support']} | {chunk} | {mode} | {r['rss_start_mib']:.0f} MiB "
            f"| {r['rss_cached_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | {bound:.0f} MiB{ok} | {r['seconds']} |"
        )
        if device == "cuda":
            extra = r["cuda_peak_extra_mib"]
            print(f"|   CUDA: peak allocated by the reverse step {extra} MiB, budget {r['budget_mib']} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
