"""Before/after capture for a refactor: every number a user sees, from one small seeded run, as plain JSON.

A restructuring that claims "behaviour unchanged" runs this on the commit before and the commit after and
compares the two files (``--compare``): the records, the final report, the saved-and-reloaded estimator on new
images (per-case rows, prediction-powered estimates with a few labels, chunks) and the ``estimate`` CLI's
files must agree to the printed tolerance.

    python benchmarks/redesign_capture.py --out /tmp/before.json          # on the old commit
    python benchmarks/redesign_capture.py --out /tmp/after.json           # on the new commit
    python benchmarks/redesign_capture.py --compare /tmp/before.json /tmp/after.json

It trains a small phantom model for 4 epochs with SPE's defaults (the learned reverse step) plus the quality
regressor, on one thread so the arithmetic is the same on every run (about a minute on an idle core).
Timings, paths and versions are left out of the capture.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

#: keys whose values are not behaviour (wall-clock, paths, versions, cache flags)
VOLATILE = ("seconds", "time", "path", "dir", "version", "created", "cache", "file", "machine", "load")


def plain(obj: Any, digits: int = 6) -> Any:
    """Nested dicts/lists of rounded floats, whatever the result types are (dataclass, ``to_dict``, tensors)."""
    import numpy as np
    import torch

    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return plain(obj.to_dict(), digits)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj), digits)
    if isinstance(obj, torch.Tensor):  # big tensors (masks, images) by their sum
        small = obj.numel() <= 64
        return plain(obj.detach().cpu().tolist() if small else {"sum": float(obj.float().sum())}, digits)
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist(), digits)
    if isinstance(obj, np.generic):
        return plain(obj.item(), digits)
    if isinstance(obj, dict):
        return {
            str(k): plain(v, digits) for k, v in obj.items() if not any(word in str(k).lower() for word in VOLATILE)
        }
    if isinstance(obj, (list, tuple)):
        return [plain(v, digits) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) else round(obj, digits)
    if isinstance(obj, Path):
        return obj.name
    return repr(type(obj).__name__)


def capture(root: Path) -> dict[str, Any]:
    """Train, finish, reuse: the numbers of every output."""
    import lightning.pytorch as pl
    import torch
    from PIL import Image

    from spe_lightning import SPECallback, SPEEstimator
    from spe_lightning.cli import main as cli_main
    from spe_lightning.data import SyntheticShapesDataModule
    from spe_lightning.models import SegmentationModel

    torch.set_num_threads(1)
    pl.seed_everything(0)
    dm = SyntheticShapesDataModule(n_train=24, n_val=12, n_target=10, size=32, batch_size=4)
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    cb = SPECallback(every_n_epochs=1, seed=0, quality_regressor=True, verbose=False, fit_cache=None)
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=str(root / "fit"),
    )
    trainer.fit(model, datamodule=dm)
    out: dict[str, Any] = {"records": plain(cb.records), "report": plain(cb.report)}
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    (est_path,) = (root / "fit").rglob("spe_estimator.pt")

    est = SPEEstimator.load(est_path)
    target = dm.targets["target"]
    masks = {i: target[i]["label"] for i in range(0, len(target), 3)}
    result = est.estimate(model, target, name="target", labelled_masks=masks)
    out["estimate"] = plain(result)
    chunks = est.estimate_chunks(model, target, chunks=5, name="target", alert_below={"dice": 0.5})
    out["chunks"] = plain(chunks)

    folder = root / "pngs"
    folder.mkdir()
    for i in range(len(target)):
        img = (target[i]["image"][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(img).save(folder / f"case_{i:02d}.png")
    cli_out = root / "cli"
    cli_main(
        [
            "estimate",
            "--ckpt",
            str(ckpt),
            "--estimator",
            str(est_path),
            "--images",
            str(folder),
            "--out",
            str(cli_out),
            "--no-progress",
        ]  # fmt: skip
    )
    out["cli_estimate"] = plain(json.loads((cli_out / "estimate.json").read_text()))
    with (cli_out / "cases.csv").open() as f:
        out["cli_cases"] = [plain({k: _number(v) for k, v in row.items()}) for row in csv.DictReader(f)]
    return out


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def differences(a: Any, b: Any, tol: float, where: str = "") -> list[str]:
    """Every place two captures differ by more than ``tol`` (or in structure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only before" for k in a if k not in b]
        out += [f"{where}/{k}: only after" for k in b if k not in a]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], tol, f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, tol, f"{where}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= tol:
            return []
        return [f"{where}: {a} before, {b} after"]
    return [] if a == b else [f"{where}: {a!r} before, {b!r} after"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the capture here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two captures")
    p.add_argument("--tol", type=float, default=1e-6, help="largest accepted difference of a number")
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        diffs = differences(before, after, args.tol)
        for line in diffs[:50]:
            print(line)
        print(f"{len(diffs)} difference(s) beyond {args.tol}" if diffs else f"identical within {args.tol}")
        return 1 if diffs else 0
    if not args.out:
        p.error("give --out or --compare")
    os.environ.setdefault("SPE_NO_DOWNLOAD", "1")
    with tempfile.TemporaryDirectory() as tmp:
        data = capture(Path(tmp))
    args.out.write_text(json.dumps(data, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
