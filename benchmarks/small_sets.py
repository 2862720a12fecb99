"""Sets of new images, smaller than or as large as the calibrated ones: error and coverage of chunk estimates.

A set's estimate is anchored on the calibration score, and its interval is learnt from labelled calibration pairs
whose random subsets are as large as the run's targets. A smaller set (a chunk of incoming images, a handful of new
cases) has a noisier mean, so SPE multiplies the half-width by ``sqrt(pairs' smallest set / n)`` and flags the set
(engine/estimate.py), and anchors it on the calibration pseudo metric at its size (engine/set_size.py). A subset of
the calibration set shares images with it, so its pair understates how much a set of new images differs; SPE scales
those pairs to stand for new images (engine.calibration_pairs.independent_set_scale). This measures them on
development data only: a small model trained with SPE (label fusion by default, targets of ``--target-size``
images), then random chunks of 2-24 images drawn from fresh phantoms of the calibration's kind and of a noisier
kind, their realised Dice known. Per chunk size, four readings of the same chunks: ``none`` (no size rule, subset
pairs as measured: the product before these rules), ``widened`` (the interval widened for the chunk's size),
``probes`` (also anchored at the chunk's size) and ``product`` (also the subset pairs scaled to new images): the 90%
interval's coverage of the realised mean Dice, its median width, the mean signed error and the mean absolute error.

    python benchmarks/small_sets.py --out benchmarks/results/small_sets.json
    python benchmarks/small_sets.py --segmenter learned_propagation --out benchmarks/results/small_sets_learned.json
    python benchmarks/small_sets.py --table benchmarks/results/small_sets*.json       # the tables of docs/intervals.md

``--data ../shared/datasets/jsrt --class-index 1`` runs the same on JSRT's development splits (the model and the
references from train; the test split cut in two fixed halves, calibration and the chunk pool, clean and with
noise at severity 2); never extra_test.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Subset

from spe_lightning import SPECallback, SPEEstimator
from spe_lightning.data.folder import FolderSegmentationDataset
from spe_lightning.data.synthetic import SyntheticShapesDataset
from spe_lightning.engine.calibration_pairs import pairs_for_target
from spe_lightning.engine.interval_model import fit_interval_model
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.predict import default_logits
from spe_lightning.engine.shifts import shift_set, subset
from spe_lightning.models import SegmentationModel


def datasets(a: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """``(train, calibration, targets, chunk pools)``: phantoms, or with ``--data`` a folder dataset's development
    splits (train: the model and references; test cut in two fixed halves: calibration, and targets and chunks)."""
    if a.data is None:
        train, val = SyntheticShapesDataset(64, 64, seed=1), SyntheticShapesDataset(48, 64, seed=2)
        targets = {"clean": SyntheticShapesDataset(a.target_size, 64, seed=3),
                   "noisy": SyntheticShapesDataset(a.target_size, 64, seed=4, noise=0.15)}  # fmt: skip
        pools = {"clean": SyntheticShapesDataset(200, 64, seed=55, noise=0.05),
                 "noisy": SyntheticShapesDataset(200, 64, seed=65, noise=0.15)}  # fmt: skip
        return train, val, targets, pools
    train = FolderSegmentationDataset(a.data, "train", a.class_index, a.image_size)
    test = FolderSegmentationDataset(a.data, "test", a.class_index, a.image_size)
    order = np.random.default_rng(0).permutation(len(test)).tolist()
    half = len(test) // 2
    val, rest = Subset(test, sorted(order[:half])), Subset(test, sorted(order[half:]))
    return train, val, {"rest": rest}, {"clean": rest, "noisy": ("noise", 2)}


def fit(root: str, a: argparse.Namespace) -> tuple[SPEEstimator, torch.nn.Module, dict[str, Any], list[dict]]:
    pl.seed_everything(0)
    train, val, targets, pools = datasets(a)
    segmenter = a.segmenter
    cb = SPECallback(
        reference=train, calibration=val, target=targets, segmenter=segmenter, size_probes=a.size_probes, verbose=False
    )
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    trainer = pl.Trainer(
        max_epochs=a.epochs, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=8, shuffle=True))
    path = cb.run.estimator.save(os.path.join(root, "spe_estimator.pt"))
    return SPEEstimator.load(path), model.eval(), pools, list(cb.run.pairs)


def without(est: SPEEstimator, pairs: list[dict], probes: bool, independent: bool) -> SPEEstimator:
    """``est`` without its size probes and/or with its interval models refitted on the pairs as measured (subset
    pairs not scaled to independent sets: engine.calibration_pairs.independent_set_scale)."""
    anchor = {k: v for k, v in est.anchor.items() if probes or k != "pseudo_by_size"}
    if not independent:
        plain = [{k: v for k, v in p.items() if k != "n_calibration"} for p in pairs_for_target(pairs, None)]
        anchor["intervals"] = {
            key: fit_interval_model(
                plain, key, MetricMapping.from_dict(dict(est.mappings[key])), anchor["calibration_pseudo"][key],
                level=est.config.level,
            )
            for key in est.keys
            if "params" in est.mappings.get(key, {}) and anchor["calibration_pseudo"].get(key) is not None
        }  # fmt: skip
    return est.with_fitted(est.fitted.replace(anchor=anchor))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-size", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 24])
    ap.add_argument("--chunks", type=int, default=40, help="random chunks per size and pool")
    ap.add_argument("--segmenter", default="label_fusion")
    ap.add_argument("--size-probes", type=int, default=4, help="SPEConfig.size_probes")
    ap.add_argument("--data", default=None, help="a folder dataset (its train and test splits) instead of phantoms")
    ap.add_argument("--class-index", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, help="print the tables of written results; no run")
    a = ap.parse_args()
    if a.table:
        for path in a.table:
            print(f"\n{path.name}:")
            table(json.loads(path.read_text())["rows"])
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        est, model, pools, pairs = fit(root, a)
    # the same chunks read four ways (see the module docstring)
    before = without(est, pairs, probes=False, independent=False)
    readings = (
        ("none", before, None),
        ("widened", before, True),
        ("probes", without(est, pairs, probes=True, independent=False), True),
        ("product", est, True),
    )
    rng = np.random.default_rng(0)
    rows = []
    for pool_name, pool in pools.items():
        if isinstance(pool, tuple):  # a synthetic shift of the clean pool
            data = shift_set(est.cache([pools["clean"][i] for i in range(len(pools["clean"]))], "pool"), *pool)
        else:
            data = est.cache([pool[i] for i in range(len(pool))], "pool")
        masks, conf = est.predict(model, data, torch.device("cpu"), default_logits)
        for size in a.sizes:
            hit: dict[str, list[bool]] = {k: [] for k, _, _ in readings}
            width: dict[str, list[float]] = {k: [] for k, _, _ in readings}
            error: dict[str, list[float]] = {k: [] for k, _, _ in readings}
            for _ in range(a.chunks):
                pos = sorted(rng.choice(len(data), size, replace=False).tolist())
                part = subset(data, pos, "pool")
                pm = [masks[i] for i in pos]
                pseudo = est.engine.pseudo(part, pm, torch.device("cpu"))
                distance, nearest = est.distances(part, pm, conf[pos])
                true = est.engine.real(part, pm)
                if not true or true.get("dice") is None:
                    continue
                for kind, reader, sized in readings:
                    d = reader.estimate_from_pseudo(
                        pseudo["values"], pseudo["reason"], distance, est.bounds(part), None, nearest,
                        len(part) if sized else None,
                    )["dice"]  # fmt: skip
                    if d.value is None:
                        continue
                    hit[kind].append(d.lower <= true["dice"] <= d.upper)
                    width[kind].append(d.upper - d.lower)
                    error[kind].append(d.value - true["dice"])
            rows.append({
                "pool": pool_name, "size": size, "n_chunks": len(hit["product"]),
                **{f"coverage_{k}": float(np.mean(v)) for k, v in hit.items()},
                **{f"median_width_{k}": float(np.median(v)) for k, v in width.items()},
                **{f"bias_{k}": float(np.mean(v)) for k, v in error.items()},
                **{f"mae_{k}": float(np.mean(np.abs(v))) for k, v in error.items()},
            })  # fmt: skip
            print(rows[-1], flush=True)
    out = {"settings": vars(a) | {"out": str(a.out)}, "seconds": time.perf_counter() - start, "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(out, indent=2))
    table(rows)


def table(rows: list[dict]) -> None:
    """The markdown table of ``rows`` (each cell: the readings none / widened / probes / product)."""
    print("| pool | images per chunk | chunks | coverage | median width | bias | MAE |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        columns = (("coverage", ".2f"), ("median_width", ".3f"), ("bias", "+.3f"), ("mae", ".3f"))
        kinds = [k for k in ("none", "widened", "probes", "product") if f"coverage_{k}" in r]
        cells = [" / ".join(f"{r[f'{what}_{k}']:{fmt}}" for k in kinds) for what, fmt in columns]
        print(f"| {r['pool']} | {r['size']} | {r['n_chunks']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
