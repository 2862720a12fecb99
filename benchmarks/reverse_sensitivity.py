"""How faithfully does a reverse segmenter's pseudo Dice track the quality of its support masks?

For JSRT (heart, class 2) and BUSI (lesions, benign + malignant, resized to 128 x 128) the
queries are training images with their true masks; the support is 64 held-out images (fixed
seed) whose masks are degraded to graded quality (``_degrade.py``: erosion, dilation, shift,
holes, spurious blobs, wavy boundary, missed parts; one dominant kind per draw plus random
kinds, per-image strengths calibrated to the level). For every segmenter it reports the pseudo
Dice per level, then Pearson r, the slope of pseudo vs support Dice over all draws, the
resolution (residual std / slope: the smallest support-Dice difference it resolves) and the
seconds per call (all queries x 64 supports, 128 x 128, this machine).

    python benchmarks/reverse_sensitivity.py --datasets jsrt busi --segmenters label_fusion knn_pixel
    python benchmarks/reverse_sensitivity.py --quick                       # 4 levels, 1 draw
    python benchmarks/reverse_sensitivity.py --segmenters "label_fusion:k=4,h_scale=0.5"

Data are read from ``../shared/datasets`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _degrade import degrade_set  # noqa: E402

LEVELS = (1.0, 0.92, 0.85, 0.77, 0.69, 0.6, 0.5)
QUICK_LEVELS = (1.0, 0.85, 0.7, 0.5)
WEIGHT_FREE_MODULES = ("label_fusion", "pixel_knn", "ensemble")


def import_reverse():
    """``spe_lightning.reverse.base`` with the weight-free segmenters registered.

    Falls back to loading the reverse modules alone when the package's ``__init__`` cannot be
    imported (e.g. an unrelated module is missing in a work-in-progress checkout).
    """
    try:
        importlib.import_module("spe_lightning.reverse")
    except ImportError as err:
        print(f"[note] spe_lightning.reverse not importable ({err}); loading the weight-free modules alone.")
        for name in list(sys.modules):
            if name == "spe_lightning" or name.startswith("spe_lightning."):
                del sys.modules[name]
        for name, path in (
            ("spe_lightning", ROOT / "spe_lightning"),
            ("spe_lightning.reverse", ROOT / "spe_lightning/reverse"),
        ):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
    for m in WEIGHT_FREE_MODULES:
        try:
            importlib.import_module(f"spe_lightning.reverse.{m}")
        except ModuleNotFoundError:
            pass
    return importlib.import_module("spe_lightning.reverse.base")


def _load(path: Path, size: int, mask: bool) -> np.ndarray:
    im = Image.open(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.NEAREST if mask else Image.BILINEAR)
    return np.asarray(im)


def load_dataset(name: str, shared: Path, n_query: int, n_support: int, seed: int, size: int = 128):
    """``(query_images, query_masks, support_images, support_masks)`` as float/bool arrays ``[N,H,W]``."""
    root = shared / "datasets" / name
    if name == "jsrt":
        cls = 2
        ids = {s: sorted(p.stem for p in (root / s / "images").glob("*.png")) for s in ("train", "test", "extra_test")}
        q_ids = [("train", i) for i in ids["train"]]
        # JSRT's test split has 49 images: the support pool is test + extra_test
        s_ids = [("test", i) for i in ids["test"]] + [("extra_test", i) for i in ids["extra_test"]]
    elif name == "busi":
        cls = 1
        with open(root / "meta.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["group"] in ("benign", "malignant")]
        q_ids = sorted((r["split"], r["id"]) for r in rows if r["split"] == "train")
        s_ids = sorted((r["split"], r["id"]) for r in rows if r["split"] == "test")
    else:
        raise ValueError(f"Unknown dataset {name!r}.")
    rng = np.random.default_rng(seed)
    if len(q_ids) > n_query:
        q_ids = [q_ids[i] for i in sorted(rng.choice(len(q_ids), n_query, replace=False))]
    s_ids = [s_ids[i] for i in sorted(rng.choice(len(s_ids), min(n_support, len(s_ids)), replace=False))]

    def read(pairs):
        img = np.stack([_load(root / s / "images" / f"{i}.png", size, False) for s, i in pairs]).astype(np.float32)
        if img.ndim == 4:
            img = img[..., :3].mean(-1)
        msk = np.stack([_load(root / s / "masks" / f"{i}.png", size, True) for s, i in pairs]) == cls
        return img / 255.0, msk

    return (*read(q_ids), *read(s_ids))


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    inter, den = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(den > 0, 2 * inter / den.clamp_min(1e-8), torch.ones_like(den))


def fit(x: np.ndarray, y: np.ndarray) -> dict:
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    r = float(np.corrcoef(x, y)[0, 1])
    res_std = float(resid.std(ddof=2)) if len(x) > 2 else float("nan")
    return {"r": r, "slope": float(slope), "resolution": res_std / abs(slope) if slope else float("inf")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["jsrt", "busi"], choices=["jsrt", "busi"])
    ap.add_argument("--segmenters", nargs="+", default=None, help="names, optionally name:key=val,... (default: all)")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--n-query", type=int, default=172)
    ap.add_argument("--n-support", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="random degradation draws per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="4 levels, 1 draw")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = import_reverse()
    names = args.segmenters or [n for n in base.available_segmenters() if n != "universeg"]
    segs = list(names)
    levels, repeats = (QUICK_LEVELS, 1) if args.quick else (LEVELS, args.repeats)
    summary = []
    for ds in args.datasets:
        qi, qm, si, sm = load_dataset(ds, args.shared, args.n_query, args.n_support, args.seed)
        print(f"\n## {ds}: {len(qi)} queries x {len(si)} supports, {qi.shape[-1]}x{qi.shape[-2]}")
        q_img = torch.from_numpy(qi)[:, None]
        q_msk = torch.from_numpy(qm)[:, None]
        s_img = torch.from_numpy(si)[:, None]
        rng = np.random.default_rng(args.seed + 1)
        draws = []  # (level, support Dice, degraded labels)
        for lev in levels:
            for _ in range(1 if lev >= 0.999 else repeats):
                deg, d = degrade_set(sm, lev, rng)
                draws.append((lev, float(d.mean()), torch.from_numpy(deg)[:, None].float()))
        for label in segs:
            seg = base.segmenter_from_text(label)
            pseudo, secs = [], []
            for _lev, _sd, lab in draws:
                t0 = time.perf_counter()
                probs = seg(q_img, s_img, lab)
                secs.append(time.perf_counter() - t0)
                pseudo.append(float(dice_per_image(probs > 0.5, q_msk).mean()))
            x = np.array([d[1] for d in draws])
            y = np.array(pseudo)
            st = fit(x, y)
            print(f"\n### {ds} / {label}\n\n| level | support Dice | pseudo Dice (mean +- sd over draws) |")
            print("|---|---|---|")
            for lev in levels:
                sel = [i for i, d in enumerate(draws) if d[0] == lev]
                print(f"| {lev:.2f} | {x[sel].mean():.3f} | {y[sel].mean():.3f} +- {y[sel].std():.3f} |")
            summary.append((ds, label, st, float(np.median(secs)), y[0]))
    print("\n## Summary (pseudo Dice vs support Dice over all draws)\n")
    print("| dataset | segmenter | r | slope | resolution | s/call | true-mask Dice |")
    print("|---|---|---|---|---|---|---|")
    for ds, label, st, sec, d0 in summary:
        print(f"| {ds} | {label} | {st['r']:.3f} | {st['slope']:.3f} | {st['resolution']:.4f} | {sec:.2f} | {d0:.3f} |")


if __name__ == "__main__":
    main()
