"""Time a chunked estimate (monitoring after training) over many incoming images.

python benchmarks/chunked_estimate.py --n-images 1000 --chunk-sizes 100 50 --references 172

Trains a small model on 128x128 phantoms for a few epochs with SPE (the weight-free default reverse
segmenter, support 64, ``--references`` references), saves and reloads the estimator, then runs
``SPEEstimator.estimate_chunks`` over ``--n-images`` incoming phantoms whose noise rises and contrast
falls chunk after chunk (a drifting site; masks kept to show the realised Dice). Prints a markdown
table: per chunk size the number of chunks, model inference seconds, estimate seconds (the reverse
steps and G: what the 2-minute target is about), alerts and the mean |estimate - realised| Dice.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import lightning.pytorch as pl
import numpy as np
import torch
from tqdm.auto import tqdm

from spe_lightning import SPECallback, SPEEstimator
from spe_lightning.data.synthetic import SyntheticShapesDataset
from spe_lightning.models import SegmentationModel


def _fit(references: int, epochs: int, root: str) -> tuple[SPEEstimator, torch.nn.Module]:
    pl.seed_everything(0)
    train = SyntheticShapesDataset(max(references, 64), 128, seed=1)
    val = SyntheticShapesDataset(48, 128, seed=2)
    tgt = SyntheticShapesDataset(48, 128, seed=3, noise=0.15)
    cb = SPECallback(
        reference=train,
        calibration=val,
        target=tgt,
        segmenter="label_fusion",
        max_references=references,
        interval_subsets=2,
        interval_shifts=["noise", "gamma"],
        alert_below={"dice": 0.8},
        verbose=False,
    )
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, loader)
    path = cb.run.estimator.save(os.path.join(root, "spe_estimator.pt"))  # the run's estimator, built at fit end
    return SPEEstimator.load(path), model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[100, 50])
    ap.add_argument("--references", type=int, default=172)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        est, model = _fit(a.references, a.epochs, root)
        print(f"setup (training with SPE, {a.epochs} epochs): {time.perf_counter() - start:.0f}s; {est!r}")
    steps = 10
    per = -(-a.n_images // steps)
    items = []
    for k in range(steps):  # a drifting site: noise up, contrast down
        part = SyntheticShapesDataset(per, 128, seed=100 + k, noise=0.08 + 0.03 * k, contrast=1.0 - 0.05 * k)
        items.extend(part[i] for i in range(len(part)))
    items = items[: a.n_images]
    start = time.perf_counter()
    data = est.cache(items, "incoming")
    cache_s = time.perf_counter() - start
    rows = []
    for size in a.chunk_sizes:
        bar = tqdm(total=-(-len(items) // size), desc=f"chunks of {size}", unit="chunk")
        res = est.estimate_chunks(model, data, size, name="incoming", progress=bar.update)
        bar.close()
        inference = res.seconds["predict"]
        err = [
            abs(c["estimates"]["dice"]["value"] - c["true"]["dice"])
            for c in res.chunks
            if c["estimates"]["dice"]["value"] is not None and c["true"]
        ]
        rows.append((size, len(res.chunks), inference, res.seconds["estimate"], len(res.alerts), float(np.mean(err))))
    print(f"\n{len(items)} images at 128x128, {torch.get_num_threads()} threads; reading into memory {cache_s:.1f}s")
    print("| images per chunk | chunks | model inference (s) | chunk estimates (s) | alerts (Dice < 0.8) |"
          " mean abs error vs realised Dice |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for size, n, inf, sec, alerts, err in rows:
        print(f"| {size} | {n} | {inf:.1f} | {sec:.1f} | {alerts} | {err:.3f} |")


if __name__ == "__main__":
    main()
