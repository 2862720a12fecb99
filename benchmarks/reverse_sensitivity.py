"""How faithfully does a reverse segmenter's pseudo Dice track the quality of its support masks?

For JSRT (heart, class 2) and BUSI (lesions, benign + malignant, resized to 128 x 128) the
queries are training images with their true masks; the support is up to 64 images of the test
split (fixed seed; JSRT's test split has 49, so all 49 there; extra_test is never read) whose
masks are degraded to graded quality (``_degrade.py``: erosion, dilation, shift,
holes, spurious blobs, wavy boundary, missed parts; one dominant kind per draw plus random
kinds, per-image strengths calibrated to the level). For every segmenter it reports the pseudo
Dice per level, then Pearson r, the slope of pseudo vs support Dice over all draws, the
resolution (residual std / slope: the smallest support-Dice difference it resolves) and the
seconds per call (all queries x the supports, 128 x 128, this machine).

Segmenters that learn (``fit``) are fitted once per dataset on the query (training) images and
their true masks, timed; segmenters with ``score`` give the pseudo Dice per query directly (else
it is the Dice of ``__call__``'s probabilities > 0.5). Variants that differ only in evaluation
settings (the segmenter's ``fit_spec()`` is the same) share one fit. The appearance test shifts only the support images
(noise, gamma, blur, low resolution, contrast) at true masks and reports the change of the pseudo
Dice. Fit and call times are also given as ratios to ``label_fusion``'s call time in the same run.
Each row names the weights its fit started from (``weights``: ``scratch`` or the id of the pretrained
file and the datasets it was pretrained on besides synthetic tasks); weights pretrained on the dataset being
scored are refused (leave one dataset out), so no row's weights saw the dataset it is scored on.

    python benchmarks/reverse_sensitivity.py --datasets jsrt busi --segmenters label_fusion knn_pixel
    python benchmarks/reverse_sensitivity.py --quick                       # 4 levels, 1 draw
    python benchmarks/reverse_sensitivity.py --segmenters "label_fusion:k=4,h_scale=0.5"
    python benchmarks/reverse_sensitivity.py --threads 2 --segmenters label_fusion learned_propagation \
        learned_propagation:direction=forward --out benchmarks/results/reverse_sensitivity_learned
    python benchmarks/reverse_sensitivity.py --segmenters label_fusion learned_propagation \
        learned_propagation:pretrained=true                  # scratch vs the shipped pretrained weights, adapted
    python benchmarks/reverse_sensitivity.py --datasets busi --segmenters learned_propagation \
        learned_propagation:pretrained=true,weights=/tmp/lodo_busi.pt   # weights pretrained without BUSI
    python benchmarks/reverse_sensitivity.py --table benchmarks/results/reverse_sensitivity_learned.json

Data are read from ``../shared/datasets`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _degrade import degrade_set  # the benchmarks folder is on sys.path when this script runs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

LEVELS = (1.0, 0.92, 0.85, 0.77, 0.69, 0.6, 0.5)
QUICK_LEVELS = (1.0, 0.85, 0.7, 0.5)
#: support-image appearance shifts (masks untouched): name -> function of (images [N,1,H,W], generator)
APPEARANCE_SHIFTS = ("noise", "gamma", "blur", "lowres", "contrast")


def shift_appearance(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """Shift the appearance of images ``[N,1,H,W]`` in [0, 1] (fixed strengths)."""
    import torch.nn.functional as F

    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "gamma":
        return x.clamp(0, 1) ** 1.8
    if kind == "blur":
        t = torch.arange(-4, 5, dtype=torch.float32)
        k = torch.exp(-(t**2) / (2 * 1.5**2))
        k = k / k.sum()
        y = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(y, (0, 0, 4, 4), mode="replicate"), k.view(1, 1, -1, 1))
    if kind == "lowres":
        small = F.interpolate(x, scale_factor=0.375, mode="area")
        return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if kind == "contrast":
        m = x.mean((1, 2, 3), keepdim=True)
        return (m + 0.5 * (x - m)).clamp(0, 1)
    raise ValueError(f"Unknown appearance shift {kind!r}; choose from {APPEARANCE_SHIFTS}.")


def import_reverse():
    """``spe_lightning.reverse.base`` with every built-in segmenter registered (the installed package)."""
    importlib.import_module("spe_lightning.reverse")
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
        ids = {s: sorted(p.stem for p in (root / s / "images").glob("*.png")) for s in ("train", "test")}
        q_ids = [("train", i) for i in ids["train"]]
        # supports = the test split only (49 images on JSRT): extra_test is kept for final numbers
        s_ids = [("test", i) for i in ids["test"]]
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


def weights_of(seg) -> str | None:
    """What a learned segmenter's fit started from: ``"scratch"`` or the pretrained weights' id and, in brackets,
    the datasets they were pretrained on besides synthetic tasks (None: no fit). The shipped weights saw
    synthetic tasks only, none of these datasets."""
    if not getattr(seg, "needs_fit", False):
        return None
    wid = seg.fit_spec().get("pretrained_weights")
    if wid is None:
        return "scratch"
    from spe_lightning.reverse.pretrained import datasets_seen

    seen = datasets_seen(getattr(seg, "weights", None))
    return f"{wid} [synthetic{''.join('+' + d for d in seen)}]"


def check_leave_one_out(seg, dataset: str) -> None:
    """Refuse to score ``dataset`` with weights pretrained on it: numbers on a dataset need weights pretrained
    without it (leave one dataset out)."""
    if not getattr(seg, "pretrained", False):
        return
    from spe_lightning.reverse.pretrained import datasets_seen

    if dataset in datasets_seen(getattr(seg, "weights", None)):
        raise SystemExit(
            f"{seg.weights} were pretrained on {dataset}'s train split: score {dataset} with weights made without "
            "it (scripts/pretrain_reverse.py without --dataset " + dataset + "=...)."
        )


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
    ap.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md (the summary)")
    ap.add_argument("--table", type=Path, default=None, help="print the summary of a saved <out>.json and stop")
    args = ap.parse_args(argv)
    if args.table is not None:
        print(summary_table(json.loads(args.table.read_text())))
        return
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
        fitted: dict[str, tuple[dict, float]] = {}  # fit key -> (state, seconds)
        lf_call = None
        for label in segs:
            seg = base.segmenter_from_text(label)
            check_leave_one_out(seg, ds)
            fit_s = 0.0
            if getattr(seg, "needs_fit", False):
                key = json.dumps(seg.fit_spec(), sort_keys=True)  # variants differing in evaluation share a fit
                if key not in fitted:
                    t0 = time.perf_counter()
                    seg.fit(q_img, q_msk.float())
                    fitted[key] = (seg.state_tensors(), time.perf_counter() - t0)
                else:
                    seg.load_state_tensors(fitted[key][0])
                fit_s = fitted[key][1]

            def pseudo_of(images: torch.Tensor, lab: torch.Tensor, seg=seg, q_img=q_img, q_msk=q_msk) -> float:
                if getattr(seg, "supports_scoring", False):
                    return float(seg.score(q_img, q_msk.float(), images, lab).mean())
                return float(dice_per_image(seg(q_img, images, lab) > 0.5, q_msk).mean())

            pseudo, secs = [], []
            for _lev, _sd, lab in draws:
                t0 = time.perf_counter()
                pseudo.append(pseudo_of(s_img, lab))
                secs.append(time.perf_counter() - t0)
            true_lab = draws[0][2]
            shifts = {
                k: pseudo_of(shift_appearance(s_img, k, args.seed), true_lab) - pseudo[0] for k in APPEARANCE_SHIFTS
            }
            x = np.array([d[1] for d in draws])
            y = np.array(pseudo)
            st = fit(x, y)
            print(f"\n### {ds} / {label}\n\n| level | support Dice | pseudo Dice (mean +- sd over draws) |")
            print("|---|---|---|")
            for lev in levels:
                sel = [i for i, d in enumerate(draws) if d[0] == lev]
                print(f"| {lev:.2f} | {x[sel].mean():.3f} | {y[sel].mean():.3f} +- {y[sel].std():.3f} |")
            print(
                "appearance shifts of the support images at true masks (pseudo Dice change): "
                + ", ".join(f"{k} {v:+.3f}" for k, v in shifts.items())
            )
            call = float(np.median(secs))
            if label == "label_fusion":
                lf_call = call
            summary.append(
                {
                    "dataset": ds,
                    "segmenter": label,
                    # what the fitted weights started from: "scratch", the shipped pretrained file, or None
                    "weights": weights_of(seg),
                    **st,
                    "call_s": call,
                    "fit_s": fit_s,
                    "true_mask_dice": float(y[0]),
                    "shifts": shifts,
                    "max_abs_shift": max(abs(v) for v in shifts.values()),
                    "levels": [{"level": d[0], "support_dice": d[1], "pseudo": p} for d, p in zip(draws, pseudo)],
                }
            )
        for row in summary:
            if row["dataset"] == ds:
                row["label_fusion_call_s"] = lf_call
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    meta = {"argv": sys.argv[1:] if argv is None else argv, "threads": torch.get_num_threads(), "load": list(load)}
    text = summary_table({"meta": meta, "rows": summary})
    print("\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": summary}, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")


def summary_table(result: dict) -> str:
    """The markdown summary of a result (``{"meta": ..., "rows": ...}`` as written to ``<out>.json``)."""
    summary, load = result["rows"], result["meta"]["load"]
    lines = [
        "## Summary (pseudo Dice vs support Dice over all draws)",
        "",
        f"torch threads {result['meta']['threads']}, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        "ratios are to label_fusion's call time in this run.",
        "",
        "| dataset | segmenter | weights | r | slope | resolution | true-mask Dice | max appearance shift | s/call | "
        "call / LF call | fit s | fit / LF call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lf = row.get("label_fusion_call_s")

        def ratio(v: float, lf: float | None = lf) -> str:
            return f"{v / lf:.2f}" if lf else "-"

        lines.append(
            f"| {row['dataset']} | {row['segmenter']} | {row.get('weights') or '-'} | {row['r']:.3f} | "
            f"{row['slope']:.3f} | "
            f"{row['resolution']:.4f} | {row['true_mask_dice']:.3f} | {row['max_abs_shift']:.3f} | "
            f"{row['call_s']:.2f} | {ratio(row['call_s'])} | "
            f"{row['fit_s']:.1f} | {ratio(row['fit_s']) if row['fit_s'] else '-'} |"
        )
    lines += [
        "",
        "Appearance shifts (pseudo Dice change at true masks, support images only):",
        "",
        "| dataset | segmenter | " + " | ".join(APPEARANCE_SHIFTS) + " |",
        "|---|---|" + "---|" * len(APPEARANCE_SHIFTS),
    ]
    for row in summary:
        lines.append(
            f"| {row['dataset']} | {row['segmenter']} | "
            + " | ".join(f"{row['shifts'][k]:+.3f}" for k in APPEARANCE_SHIFTS)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
