"""The input check of ``spe-lightning estimate`` on a real reading mismatch (issue 26): the estimate and the check
when target images are read as in training, padded instead, or left unscaled.

Phantom images are stored as landscape 72x96 PNGs (with masks); a ``SegmentationModel`` is trained on 64 of them
read as plain resizes to 48 px (``FolderSegmentationDataModule(keep_aspect=False)``) with SPE (label fusion);
then ``spe-lightning estimate`` reads 16 target images (same population) and 16 of a noisier, lower-contrast
site in several ways. Writes ``benchmarks/results/input_check_mismatch.json`` and prints the markdown table.

    python benchmarks/input_check_mismatch.py               # ~3 min on a 2-core machine (training 15 epochs)
    python benchmarks/input_check_mismatch.py --table-only  # the table of the stored JSON
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "input_check_mismatch.json"
H, W = 72, 96
READINGS = [
    ("target", "--resize plain (as in training)", ["--resize", "plain"]),
    ("target", "default (padded to a square)", []),
    ("target", "--resize plain --intensity none (0-255)", ["--resize", "plain", "--intensity", "none"]),
    ("noisy", "noisier site, --resize plain", ["--resize", "plain"]),
    ("noisy", "noisier site, padded", []),
]


def _write(root: Path, split: str, n: int, seed: int, noise: float = 0.08, contrast: float = 1.0) -> None:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from spe_lightning.data.synthetic import make_phantom

    g = torch.Generator().manual_seed(seed)
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, m = make_phantom(g, 64, noise, contrast)
        img = F.interpolate(img[None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        m = F.interpolate(m[None], size=(H, W), mode="nearest")[0, 0]
        png = (img.clamp(0, 1).numpy() * 255).round().astype("uint8")
        Image.fromarray(png).save(root / split / "images" / f"c{i:03d}.png")
        Image.fromarray(m.numpy().astype("uint8")).save(root / split / "masks" / f"c{i:03d}.png")


def run(root: Path, epochs: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    from spe_lightning import SPECallback
    from spe_lightning.cli import main as cli_main
    from spe_lightning.data.folder import FolderSegmentationDataModule
    from spe_lightning.models import SegmentationModel

    _write(root, "train", 64, 1)
    _write(root, "val", 16, 2)
    _write(root, "target", 16, 3)
    _write(root, "noisy", 16, 4, noise=0.2, contrast=0.6)
    pl.seed_everything(0)
    dm = FolderSegmentationDataModule(
        str(root), 1, 48, batch_size=4, val_split="val", target_splits=["target"], augment=False, keep_aspect=False
    )
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    cb = SPECallback(
        segmenter="label_fusion", support_size=12, working_size=48, max_references=20, seed=0, verbose=False,
        every_n_epochs=3, log_dir=str(root / "run"),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[cb], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(root / "run"),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(root / "model.ckpt")
    rows = []
    for k, (split, label, extra) in enumerate(READINGS):
        out = root / f"out{k}"
        cli_main(
            ["estimate", "--ckpt", str(root / "model.ckpt"), "--estimator", str(root / "run" / "spe_estimator.pt"),
             "--images", str(root / split / "images"), "--masks", str(root / split / "masks"), "--out", str(out),
             "--no-progress", "--gallery", "0", *extra]
        )  # fmt: skip
        s = json.loads((out / "estimate.json").read_text())
        check = s["input_check"]
        rows.append(
            {
                "images": split,
                "reading": label,
                "arguments": extra,
                "verdict": check["verdict"],
                "differs": [c["statistic"] for c in check["checks"] if c["verdict"] != "ok"],
                "warnings": check["warnings"],
                "dice_estimate": s["estimates"]["dice"]["value"],
                "dice_interval": [s["estimates"]["dice"]["lower"], s["estimates"]["dice"]["upper"]],
                "dice_true": (s.get("true") or {}).get("dice"),
            }
        )
    return {"epochs": epochs, "seconds": round(time.perf_counter() - start, 1), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| reading of the images | input check | Dice estimate [interval] | true Dice |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        check = "ok" if r["verdict"] == "ok" else f"{r['verdict']}: {', '.join(r['differs'])}"
        lo, hi = r["dice_interval"]
        lines.append(
            f"| {r['reading']} | {check} | {r['dice_estimate']:.3f} [{lo:.3f}, {hi:.3f}] | {r['dice_true']:.3f} |"
        )
    lines.append("")
    lines.append("Made by `python benchmarks/input_check_mismatch.py` (`--table-only` prints it from the JSON).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    if not a.table_only:
        with tempfile.TemporaryDirectory(prefix="spe_input_check.") as tmp:
            result = run(Path(tmp), a.epochs)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(json.loads(Path(a.out).read_text())))


if __name__ == "__main__":
    main()
