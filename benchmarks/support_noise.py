"""How noisy is a set's pseudo Dice, and how many of its images should the reverse step use as supports?

SPE segments the references with the model's masks on (at most) ``support_size`` images of a set.
Where one support's propagated label says little on its own (BUSI lesions can be anywhere), which
images happen to be drawn moves the pseudo Dice: the calibration subsets of the shift benchmark
(155 of 156 images) differed from the whole set by up to 0.047 pseudo Dice with 0.002 real. This
measures that noise and the signal on development data only (BUSI's train split as references,
its test split as the labelled set; nothing from extra_test): a model is trained, then at its final
weights the test split's random subsets and shifted copies (severity 2) are evaluated with each
``support_size``. Printed per support size: the spread (std) of the subsets' pseudo and real Dice,
and each shifted copy's pseudo and real difference from the whole set.

    python benchmarks/support_noise.py --data ../shared/datasets/busi --class-index 1 --epochs 15 \
        --out benchmarks/results/support_noise_busi.json
    python benchmarks/support_noise.py --print benchmarks/results/support_noise_busi.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning.pytorch as pl
import numpy as np
import torch

from spe_lightning import SPECallback
from spe_lightning.data import FolderSegmentationDataModule
from spe_lightning.engine.calibration_pairs import calibration_sets
from spe_lightning.engine.records import CALIBRATION
from spe_lightning.engine.shifts import SHIFT_FAMILIES
from spe_lightning.models import SegmentationModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--class-index", type=int, default=1)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subsets", type=int, default=8, help="random subsets of the labelled set")
    p.add_argument("--fraction", type=float, default=0.8, help="size of each subset, as a share of the set")
    p.add_argument("--support-sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--out", default=None)
    p.add_argument("--print", dest="show", default=None, metavar="FILE", help="print the tables of a saved run")
    a = p.parse_args()
    if a.show:
        tables(json.loads(open(a.show).read()))
        return
    if not a.data:
        p.error("--data ROOT is needed to measure (or --print FILE to show a saved run)")
    os.environ.setdefault("SPE_NO_DOWNLOAD", "1")
    torch.set_num_threads(2)
    pl.seed_everything(a.seed)
    # the test split is the labelled set and, to keep extra_test untouched, also the (unused) target
    dm = FolderSegmentationDataModule(
        a.data, class_index=a.class_index, image_size=128, batch_size=8, target_splits=["test"]
    )
    spe = SPECallback(segmenter="learned_propagation", every_n_epochs=a.epochs, seed=a.seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=a.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spe],
    )
    model = SegmentationModel(lr=1e-3)
    trainer.fit(model, datamodule=dm)
    run = spe.run
    cal = run.sets[CALIBRATION]
    n = len(cal)
    shifts = [(f, 2) for f in SHIFT_FAMILIES]
    sets = calibration_sets(cal, [int(a.fraction * n)], a.subsets, shifts, seed=a.seed + 1)
    sets[CALIBRATION] = cal
    rows = []
    for size in a.support_sizes:
        run.engine.support_size = size
        start = time.perf_counter()
        rec = run.evaluate(model, None, sets)
        seconds = time.perf_counter() - start
        ps, rs = rec["pseudo"], rec["real"]
        subs = [k for k in sets if k.startswith("subset")]
        row = {
            "support_size": size,
            "seconds": seconds,
            "subset_pseudo_std": float(np.std([ps[k]["dice"] for k in subs], ddof=1)),
            "subset_real_std": float(np.std([rs[k]["dice"] for k in subs], ddof=1)),
            "subset_max_abs_dp": float(max(abs(ps[k]["dice"] - ps[CALIBRATION]["dice"]) for k in subs)),
            "calibration": {"pseudo": ps[CALIBRATION]["dice"], "real": rs[CALIBRATION]["dice"]},
            "shifts": {
                k: {"dp": ps[k]["dice"] - ps[CALIBRATION]["dice"], "dr": rs[k]["dice"] - rs[CALIBRATION]["dice"]}
                for k in sets
                if not k.startswith("subset") and k != CALIBRATION
            },
        }
        dp = np.array([v["dp"] for v in row["shifts"].values()])
        dr = np.array([v["dr"] for v in row["shifts"].values()])
        row["shift_slope"] = float((dp * dr).sum() / max((dp * dp).sum(), 1e-12))
        row["shift_r"] = float(np.corrcoef(dp, dr)[0, 1])
        rows.append(row)
    result = {"args": {k: v for k, v in vars(a).items() if k not in ("out", "show")}, "n": n, "rows": rows}
    tables(result)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


def tables(result: dict) -> None:
    """Print the noise table and the shifts table of a saved result."""
    rows, a = result["rows"], result["args"]
    n = result["n"]
    print(f"{n} labelled images, {a['subsets']} subsets of {int(a['fraction'] * n)}; reverse step learned_propagation")
    print("| support_size | subset pseudo std | subset real std | max subset pseudo diff | shifts: dr/dp | r | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['support_size']} | {r['subset_pseudo_std']:.4f} | {r['subset_real_std']:.4f} | "
            f"{r['subset_max_abs_dp']:.4f} | {r['shift_slope']:.2f} | {r['shift_r']:.2f} | {r['seconds']:.0f} |"
        )
    print("\n| shift | " + " | ".join(f"dp ({r['support_size']})" for r in rows) + " | dr |")
    print("|---|" + "---|" * (len(rows) + 1))
    for k in rows[0]["shifts"]:
        dps = " | ".join(f"{r['shifts'][k]['dp']:+.3f}" for r in rows)
        print(f"| {k} | {dps} | {rows[0]['shifts'][k]['dr']:+.3f} |")


if __name__ == "__main__":
    main()
