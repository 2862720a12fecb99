"""Per-case quality (RCA-style) on BUSI extra_test: does a case's score rank its real Dice?

Trains (or loads) the reference model on ``ROOT/train`` (BUSI lesion, class 1), then scores every
extra_test image with :mod:`spe_lightning.percase.rca` (its own prediction as a one-image
support, reverse-segmenting its most similar references). extra_test masks are used only to score
the result: Spearman correlation of the per-case score with the real per-case Dice, and AUROC of
flagging cases with real Dice < 0.7, next to the model's own confidence as a baseline.

    python benchmarks/percase_busi.py --data ../shared/datasets/busi --epochs 30
    python benchmarks/percase_busi.py --segmenter learned_propagation   # the learned reverse step instead

A segmenter that learns is fitted once on the references (BUSI train) before scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from _reference_model import train_reference_model


def train(data: str, epochs: int, seed: int, ckpt: Path, lr: float = 1e-3) -> None:
    """Train the reference SegmentationModel on ``data/train`` (no SPE) and save its checkpoint."""
    seconds = train_reference_model(data, ckpt, epochs, seed, lr=lr)
    print(f"trained {epochs} epochs in {seconds:.0f}s -> {ckpt}")


def build_estimator(data: str, segmenter: str = "label_fusion") -> Any:
    """An estimator over all BUSI train images as references (no G: per-case scores only); a segmenter
    that learns is fitted on them (timed in ``fit_seconds``)."""
    from spe_lightning import SPEConfig, SPEEstimator
    from spe_lightning.data import FolderSegmentationDataset
    from spe_lightning.estimator import FittedSPE
    from spe_lightning.reverse import make_segmenter

    config = SPEConfig(segmenter=segmenter, metrics=("dice",), support_size=64, working_size=128)
    seg = make_segmenter(segmenter)
    est = SPEEstimator(FittedSPE(config, seg.spec())).with_reference_dataset(
        FolderSegmentationDataset(data, "train", 1, 128)
    )
    fitted = est.fitted.replace(info={"fit_seconds": 0.0})
    if seg.needs_fit:
        start = time.perf_counter()
        seg.fit(fitted.reference_images, fitted.reference_masks.float())
        fitted = fitted.replace(info={"fit_seconds": time.perf_counter() - start}, segmenter_state=seg.state_tensors())
        seg.case_segmenter = None  # measure this segmenter's own per-case scores (SPE uses label fusion)
    return SPEEstimator(fitted, segmenter=seg)


def flag_stats(quality: np.ndarray, real: np.ndarray, threshold: float, cut: float = 0.7) -> dict[str, float]:
    """Sensitivity/specificity of flagging ``quality < threshold`` for real Dice < ``cut``."""
    flag, bad = quality < threshold, real < cut
    return {
        "sensitivity": float((flag & bad).sum() / max(bad.sum(), 1)),
        "specificity": float((~flag & ~bad).sum() / max((~bad).sum(), 1)),
        "n_flagged": int(flag.sum()),
    }


def score(data: str, ckpt: Path, ks: tuple[int, ...] = (8, 16, 32), segmenter: str = "label_fusion") -> dict[str, Any]:
    """Calibrate k on ROOT/test, then score ROOT/extra_test; RCA score vs the model's confidence."""
    from spe_lightning.data import FolderSegmentationDataset
    from spe_lightning.estimator import with_case_scorer
    from spe_lightning.models import SegmentationModel
    from spe_lightning.percase.rca import auroc, spearman

    model = SegmentationModel.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    est = build_estimator(data, segmenter)
    cal = FolderSegmentationDataset(data, "test", 1, 128)
    sweep = {}
    for k in ks:
        start = time.perf_counter()
        c = with_case_scorer(est, model, est.rca_scorer(k=k), cal).cases
        sweep[k] = {"auroc": c["auroc"], "spearman": c["spearman"], "seconds": time.perf_counter() - start}
        print(f"calibration (test, {c['n_cases']} cases) k={k}: AUROC {c['auroc']:.3f}, Spearman {c['spearman']:.3f}")
    k_best = max(ks, key=lambda k: sweep[k]["auroc"])
    est = with_case_scorer(est, model, est.rca_scorer(k=k_best), cal)
    cases = est.cases
    target = FolderSegmentationDataset(data, "extra_test", 1, 128)
    start = time.perf_counter()
    res = est.estimate(model, target, name="extra_test", ids=target.ids)
    seconds = time.perf_counter() - start
    quality = np.array([np.nan if r["quality"] is None else r["quality"] for r in res.cases])
    conf = np.array([r["confidence"] for r in res.cases])
    real = np.array([r["real_dice"] for r in res.cases])
    lesion = np.array([bool(target._load(i)[1].any()) for i in range(len(target))])
    bad = real < 0.7
    out: dict[str, Any] = {
        "segmenter": segmenter,
        "segmenter_fit_seconds": est.info["fit_seconds"],
        "k": k_best,
        "top": 1,
        "calibration_sweep": {str(k): v for k, v in sweep.items()},
        "threshold": cases["threshold"],
        "threshold_method": cases["method"],
        "n_cases": len(real),
        "n_below_0.7": int(bad.sum()),
        "mean_real_dice": float(real.mean()),
        "seconds_extra_test": seconds,
        "rca": {
            "spearman": spearman(quality, real),
            "auroc": auroc(-quality, bad),
            "auroc_lesion_images_only": auroc(-quality[lesion], bad[lesion]),
            **flag_stats(quality, real, cases["threshold"]),
        },
        "confidence": {
            "spearman": spearman(conf, real),
            "auroc": auroc(-conf, bad),
            "auroc_lesion_images_only": auroc(-conf[lesion], bad[lesion]),
        },
        "cases": res.cases,
    }
    # both signals together: mean of the two ranks (no fitting; a simple check of complementarity)
    from scipy.stats import rankdata

    both = (rankdata(quality) + rankdata(conf)) / 2
    out["rank_mean_rca_confidence"] = {"spearman": spearman(both, real), "auroc": auroc(-both, bad)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/busi"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="spe_runs/percase_busi")
    p.add_argument("--threads", type=int, default=1 if os.getloadavg()[0] > 1.0 else 2)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--segmenter", default="label_fusion", help="the per-case reverse segmenter")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    ckpt = Path(a.workdir) / f"model_e{a.epochs}_s{a.seed}.ckpt"
    if not ckpt.exists():
        train(a.data, a.epochs, a.seed, ckpt)
    if a.train_only:
        return
    res = score(a.data, ckpt, segmenter=a.segmenter)
    res.update(epochs=a.epochs, seed=a.seed, dataset="busi", class_index=1)
    suffix = "" if a.segmenter == "label_fusion" else f"_{a.segmenter}"
    out = Path(__file__).resolve().parent / "results" / f"percase_busi{suffix}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"\nBUSI extra_test, {res['n_cases']} cases ({res['n_below_0.7']} with real Dice < 0.7), k={res['k']}")
    print("| score | Spearman vs real Dice | AUROC (Dice < 0.7) | AUROC, lesion images only |\n|---|---|---|---|")
    for name in ("rca", "confidence"):
        r = res[name]
        print(f"| {name} | {r['spearman']:.3f} | {r['auroc']:.3f} | {r['auroc_lesion_images_only']:.3f} |")
    r = res["rank_mean_rca_confidence"]
    print(f"| mean rank of both | {r['spearman']:.3f} | {r['auroc']:.3f} | |")
    f = res["rca"]
    print(
        f"flag threshold {res['threshold']:.3f} ({res['threshold_method']}): {f['n_flagged']} flagged, "
        f"sensitivity {f['sensitivity']:.2f}, specificity {f['specificity']:.2f}; {res['seconds_extra_test']:.0f}s"
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
