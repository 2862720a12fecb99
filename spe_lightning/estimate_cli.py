"""``spe-lightning estimate``: apply a saved SPE estimator to a trained model and a folder of new images.

    spe-lightning estimate --ckpt model.ckpt --estimator spe_estimator.pt --images FOLDER --out DIR

Loads the LightningModule from its checkpoint (class from ``--model``, else the checkpoint's
``_class_path`` hyperparameter as LightningCLI saves it, else :class:`~spe_lightning.models.SegmentationModel`),
reads the folder (PNG/JPEG/TIFF/BMP; NIfTI volumes as slices along their last axis, via MONAI's
readers, which need ``nibabel``), estimates every metric with its interval, scores every case, prints
a table and writes ``estimate.json``, ``cases.csv`` and a self-contained ``report.html``.

Images are read the way :class:`~spe_lightning.data.FolderSegmentationDataset` reads them for
training: grayscale in [0, 1] (8-bit / 255; 16-bit and float images and NIfTI volumes scaled
between their 0.5th and 99.5th percentiles), padded to a square and resized to the model's input
size (stored in the estimator, or ``--image-size``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["main", "read_image_folder", "load_model", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _scale(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5]) if x.size else (0.0, 1.0)
    return np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def _square(img: Tensor, size: int | None) -> Tensor:
    """``[1,H,W]`` -> zero-padded to a square, bilinearly resized to ``size`` (antialiased when shrinking)."""
    from spe_lightning.data.adapters import resize_images

    h, w = img.shape[-2:]
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        img = F.pad(img, (left, side - w - left, top, side - h - top))
    return img if size is None else resize_images(img[None], (size, size))[0]


def _read_2d(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return _scale(np.asarray(im, dtype=np.float32))
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _read_nifti(path: Path) -> list[np.ndarray]:
    try:
        from monai.transforms import LoadImage

        vol = np.asarray(LoadImage(image_only=True)(str(path)), dtype=np.float32)
    except Exception as err:  # MONAI raises OptionalImportError when nibabel is missing
        raise RuntimeError(
            f"cannot read {path.name} with MONAI ({err}); NIfTI needs nibabel: pip install 'spe-lightning[nifti]'."
        ) from err
    vol = _scale(vol)
    if vol.ndim == 2:
        return [vol]
    if vol.ndim == 4:  # channel-last volumes: first channel
        vol = vol[..., 0]
    return [vol[..., z] for z in range(vol.shape[-1])]


def read_image_folder(
    folder: str | Path, image_size: int | None = None, progress: bool = False
) -> tuple[list[str], list[Tensor], list[str]]:
    """``(ids, images [1,S,S] float in [0,1], source files)`` of every image in ``folder`` (recursive, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or _is_nifti(p)))
    if not files:
        raise ValueError(f"no images (PNG/JPEG/TIFF/BMP/NIfTI) in {folder}.")
    ids: list[str] = []
    images: list[Tensor] = []
    sources: list[str] = []
    bar = _bar(len(files), "reading images", progress)
    for p in files:
        rel = p.relative_to(folder)
        stem = str(rel.with_suffix("")).replace("\\", "/")
        if _is_nifti(p):
            stem = str(rel).replace("\\", "/")[: -len(".nii.gz") if p.name.lower().endswith(".gz") else -len(".nii")]
            slices = _read_nifti(p)
            for z, sl in enumerate(slices):
                ids.append(f"{stem}#z{z:03d}")
                images.append(_square(torch.from_numpy(np.ascontiguousarray(sl))[None], image_size))
                sources.append(str(rel))
        else:
            ids.append(stem)
            images.append(_square(torch.from_numpy(_read_2d(p))[None], image_size))
            sources.append(str(rel))
        bar.update(1)
    bar.close()
    return ids, images, sources


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"--model {path!r}: give a full class path, e.g. spe_lightning.models.SegmentationModel.")
    return getattr(importlib.import_module(module), name)


def load_model(ckpt: str | Path, model_class: str | None = None, device: str = "cpu") -> nn.Module:
    """The LightningModule of a checkpoint, in eval mode on ``device``.

    The class is ``model_class`` if given, else the checkpoint's ``_class_path`` hyperparameter
    (LightningCLI stores it), else :class:`~spe_lightning.models.SegmentationModel`.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such file.")
    path = model_class
    if path is None:
        hp = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        path = hp.get("_class_path") or "spe_lightning.models.SegmentationModel"
    cls = _import_class(path)
    if not hasattr(cls, "load_from_checkpoint"):
        raise TypeError(f"{path} is not a LightningModule (no load_from_checkpoint); pass --model.")
    model = cls.load_from_checkpoint(str(ckpt), map_location=device, weights_only=True)
    return model.to(device).eval()


def _table(estimates: dict[str, dict[str, Any]], level: float, true: dict[str, Any] | None) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    head = f"| metric | estimate | {level:.0%} interval | pseudo |" + (" true |" if true else "")
    lines = [head, "|---|---|---|---|" + ("---|" if true else "")]
    for m, e in estimates.items():
        row = f"| {m} | {f(e['value'])} | {f(e['lower'])} – {f(e['upper'])} | {f(e['pseudo'])} |"
        if true:
            row += f" {f(true.get(m))} |"
        if e.get("reason"):
            row += f" {e['reason']}"
        lines.append(row)
    return "\n".join(lines)


def _write_cases(path: Path, cases: Sequence[dict[str, Any]], sources: Sequence[str]) -> None:
    cols = [
        "id",
        "file",
        "quality",
        "flagged",
        "estimated_dice",
        "estimated_dice_lower",
        "estimated_dice_upper",
        "empty_prediction",
        "foreground_pixels",
        "confidence",
        "best_reference",
    ]
    if cases and "real_dice" in cases[0]:
        cols.append("real_dice")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for c, src in zip(cases, sources):
            w.writerow(["" if (v := {**c, "file": src}.get(k)) is None else v for k in cols])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``spe-lightning estimate``."""
    p = argparse.ArgumentParser(
        prog="spe-lightning estimate",
        description="Estimate a trained model's performance on a folder of unlabelled images with a saved "
        "SPE estimator; flag cases of doubtful quality.",
    )
    p.add_argument("--ckpt", required=True, help="the model's Lightning checkpoint")
    p.add_argument("--estimator", required=True, help="spe_estimator.pt saved after training")
    p.add_argument("--images", required=True, help="folder of images (PNG/JPEG/TIFF/BMP, NIfTI slices)")
    p.add_argument("--out", required=True, help="output folder for estimate.json, cases.csv, report.html")
    p.add_argument(
        "--reference",
        default=None,
        help="folder with images/ and masks/ of the reference split, "
        "when the estimator was saved without embedded references",
    )
    p.add_argument(
        "--class-index", type=int, default=None, help="foreground class of --reference masks (default: any non-zero)"
    )
    p.add_argument("--model", default=None, help="LightningModule class path (default: from the checkpoint)")
    p.add_argument("--name", default="target", help="the set's name (seeds the support order; default 'target')")
    p.add_argument("--image-size", type=int, default=None, help="model input side (default: from the estimator)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gallery", type=int, default=12, help="worst cases shown in report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``spe-lightning estimate``; returns the ``estimate.json`` content (input problems exit with status 2)."""
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, NotImplementedError) as err:
        print(f"spe-lightning estimate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The work of :func:`main` on parsed arguments."""
    from spe_lightning.engine.html_report import GalleryItem, write_html_report
    from spe_lightning.estimator import SPEEstimator

    show = not a.no_progress
    est = SPEEstimator.load(a.estimator)
    if a.reference is not None:
        from spe_lightning.data.folder import FolderSegmentationDataset

        root = Path(a.reference)
        size = a.image_size or (est.info.get("input_shape") or [None])[-1] or 128
        est.set_reference_dataset(FolderSegmentationDataset(root.parent, root.name, a.class_index, int(size)))
    model = load_model(a.ckpt, a.model, a.device)
    size = a.image_size or (est.info.get("input_shape") or [None])[-1]
    ids, images, sources = read_image_folder(a.images, size, progress=show)
    bar = _bar(len(images), "per-case quality", show)
    res = est.estimate(model, images, name=a.name, ids=ids, device=a.device, progress=bar.update)
    bar.close()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        **res.to_dict(),
        "images": str(Path(a.images).resolve()),
        "checkpoint": str(Path(a.ckpt).resolve()),
        "estimator": str(Path(a.estimator).resolve()),
        "segmenter": est.segmenter_spec,
        "per_case": None
        if est.cases is None
        else {k: est.cases.get(k) for k in ("k", "top", "threshold", "method", "dice_cut", "auroc", "empty_score")},
    }
    (out / "estimate.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    _write_cases(out / "cases.csv", res.cases, sources)
    order = sorted(
        range(len(res.cases)), key=lambda i: (res.cases[i]["quality"] is not None, res.cases[i]["quality"] or 0)
    )
    gallery = []
    for i in order[: max(a.gallery, 0)]:
        c = res.cases[i]
        img = images[i][0].numpy()
        mask = res.masks[i][0].numpy()
        q = "n/a" if c["quality"] is None else f"{c['quality']:.2f}"
        flag = " FLAGGED" if c.get("flagged") else ""
        gallery.append(GalleryItem(img, mask, f"{c['id'][:28]}\nquality {q}{flag}", bool(c.get("flagged"))))
    meta = {
        "images": f"{a.images} ({len(images)} cases)",
        "model": str(a.ckpt),
        "estimator": f"{a.estimator} (reverse segmenter {est.segmenter_spec.get('name')}, "
        f"{0 if est.reference_images is None else est.reference_images.shape[0]} references)",
    }
    write_html_report(out / "report.html", summary, res.cases, gallery, est.cases, meta=meta)
    print(_table(res.estimates, res.level, res.true))
    if res.cases and res.case_threshold is not None:
        n_flag = sum(1 for c in res.cases if c["flagged"])
        print(f"{n_flag} of {len(res.cases)} cases flagged (quality < {res.case_threshold:.3f})")
    print(f"wrote {out / 'estimate.json'}, {out / 'cases.csv'}, {out / 'report.html'}")
    return summary


if __name__ == "__main__":
    main()
