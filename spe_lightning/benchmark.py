"""``spe-lightning benchmark paper``: the SPE paper's evaluation protocol on a folder dataset.

Train the reference model on ``ROOT/train`` with SPE (reference = train without augmentation,
calibration = ``ROOT/test``, target = ``ROOT/extra_test``, whose masks only score the result),
then compare estimated and real extra_test metrics across the recorded checkpoints for SPE
(one row per reverse segmenter) and for the baselines a user would try instead:

- ``calibration_score``: extra_test scores what the calibration split scores at that checkpoint;
- ``confidence``: the model's soft-Dice confidence on the target, mapped by a G of the same kind.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_paper", "score_records", "main"]


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _scores(est: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    ok = np.isfinite(est) & np.isfinite(real)
    return {
        "pearson_r": _pearson(est, real),
        "mae": float(np.mean(np.abs(est[ok] - real[ok]))) if ok.any() else None,
        "final_abs_error": float(abs(est[-1] - real[-1])) if np.isfinite(est[-1]) and np.isfinite(real[-1]) else None,
    }


def score_records(
    records: Sequence[dict], target: str, metrics: Sequence[str], mapping: str = "linear"
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per metric: SPE / calibration_score / confidence vs the target's real metric across records."""
    from spe_lightning.engine.estimation import CALIBRATION, fit_and_estimate, fit_mapping, series

    fitted = fit_and_estimate(records, [target], metrics, mapping)
    conf_cal = series(records, "confidence", CALIBRATION, None)
    conf_t = series(records, "confidence", target, None)
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for m in metrics:
        real = series(records, "real", target, m)
        by_ckpt = fitted["by_checkpoint"][target].get(m) or [None] * len(records)  # absent when G could not fit
        spe = np.asarray([np.nan if v is None else v for v in by_ckpt], dtype=float)
        cal = series(records, "real", CALIBRATION, m)
        g_conf, _ = fit_mapping(mapping, conf_cal, cal, m)
        conf = g_conf.predict(conf_t) if g_conf else np.full(len(records), np.nan)
        out[m] = {"spe": _scores(spe, real), "calibration_score": _scores(cal, real), "confidence": _scores(conf, real)}
    return out


def run_paper(
    data: str,
    class_index: int = 1,
    epochs: int = 30,
    seed: int = 0,
    out: str | None = None,
    segmenters: Sequence[str] = ("auto",),
    image_size: int = 128,
    lr: float = 1e-4,
    batch_size: int = 8,
    support_size: int = 64,
    max_references: int | None = None,
    accelerator: str = "auto",
    log_dir: str = "spe_runs/benchmark",
) -> dict[str, Any]:
    """Run the paper protocol; returns (and writes to ``out``) the JSON result."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from spe_lightning.callback import SPECallback
    from spe_lightning.data import FolderSegmentationDataModule
    from spe_lightning.engine.metrics import PAPER_METRICS
    from spe_lightning.models import SegmentationModel

    pl.seed_everything(seed)
    dm = FolderSegmentationDataModule(
        data, class_index=class_index, image_size=image_size, batch_size=batch_size, target_splits=["extra_test"]
    )
    callbacks = [
        SPECallback(segmenter=s, support_size=support_size, max_references=max_references, seed=seed, verbose=i == 0)
        for i, s in enumerate(segmenters)
    ]
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=TensorBoardLogger(log_dir, name=Path(data).name),
        callbacks=list(callbacks),  # Lightning appends its own callbacks to this list
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(SegmentationModel(lr=lr), datamodule=dm)
    total = time.perf_counter() - start
    spe_s = sum(r["seconds"] for cb in callbacks for r in cb.records)
    result: dict[str, Any] = {
        "dataset": Path(data).name,
        "class_index": class_index,
        "epochs": epochs,
        "seed": seed,
        "metrics": {},
        "segmenters": [cb.segmenter.name for cb in callbacks],
        "timing": {
            "train_s": total - spe_s,
            "spe_s": spe_s,
            "spe_s_per_checkpoint": {
                cb.segmenter.name: float(np.mean([r["seconds"] for r in cb.records])) for cb in callbacks
            },
        },
    }
    real_dice = [r["real"]["extra_test"].get("dice") for r in callbacks[0].records]
    result["real_dice_range"] = [min(real_dice), max(real_dice)]
    for i, cb in enumerate(callbacks):
        scored = score_records(cb.records, "extra_test", PAPER_METRICS)
        for m, rows in scored.items():
            table = result["metrics"].setdefault(m, {})
            table["spe" if i == 0 else f"spe_{cb.segmenter.name}"] = rows["spe"]
            if i == 0:
                table["calibration_score"] = rows["calibration_score"]
                table["confidence"] = rows["confidence"]
    # the same records under the other kinds of G (robust, monotone): rows spe_<mapping>
    for kind in ("huber", "isotonic"):
        for m, rows in score_records(callbacks[0].records, "extra_test", PAPER_METRICS, kind).items():
            result["metrics"][m][f"spe_{kind}"] = rows["spe"]
    result["records"] = {cb.segmenter.name: cb.records for cb in callbacks}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``spe-lightning benchmark paper --data ROOT --class-index K --epochs N --seed S --out FILE.json``."""
    parser = argparse.ArgumentParser(prog="spe-lightning benchmark")
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("paper", help="the SPE paper's protocol with baselines")
    p.add_argument("--data", required=True, help="dataset root: <root>/{train,test,extra_test}/{images,masks}")
    p.add_argument("--class-index", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--segmenters", nargs="+", default=["auto"], help="first one is 'spe'; others are extra rows")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-references", type=int, default=None)
    p.add_argument("--accelerator", default="auto")
    a = parser.parse_args(argv)
    res = run_paper(
        a.data,
        a.class_index,
        a.epochs,
        a.seed,
        a.out,
        a.segmenters,
        a.image_size,
        a.lr,
        a.batch_size,
        max_references=a.max_references,
        accelerator=a.accelerator,
    )
    lo, hi = res["real_dice_range"]
    print(f"\n{res['dataset']}: real extra_test Dice over checkpoints {lo:.3f}-{hi:.3f}")
    print("| metric | method | pearson r | MAE | final abs err |\n|---|---|---|---|---|")
    for m, rows in res["metrics"].items():
        for method, s in rows.items():
            cells = ["n/a" if s[k] is None else f"{s[k]:.3f}" for k in ("pearson_r", "mae", "final_abs_error")]
            print(f"| {m} | {method} | " + " | ".join(cells) + " |")
    t = res["timing"]
    print(f"train {t['train_s']:.0f}s, SPE {t['spe_s']:.0f}s (overhead {t['spe_s'] / max(t['train_s'], 1e-9):.2f})")
