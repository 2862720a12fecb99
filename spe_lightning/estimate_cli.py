"""``spe-lightning estimate``: apply a saved SPE estimator to a trained model and a folder of new images.

    spe-lightning estimate --ckpt model.ckpt --estimator spe_estimator.pt --images FOLDER --out DIR

Loads the LightningModule from its checkpoint (class from ``--model``, else
:class:`~spe_lightning.models.SegmentationModel`; the class path stored in the checkpoint is used
only with ``--trust-checkpoint-class``, after the checkpoint loaded with ``weights_only=True``),
reads the folder (PNG/JPEG/TIFF/BMP; NIfTI volumes as slices along their last axis, which needs
``nibabel``), estimates every metric with its interval, scores every case, prints a table and writes
``estimate.json``, ``cases.csv`` and a self-contained ``report.html``.

Monitoring: ``--chunk-by N`` (N images per chunk, in file order) or ``--chunk-by meta.csv:COLUMN``
(one chunk per value of a column, e.g. a date or a scanner; ``meta.csv`` as given, or found in the
``--images`` folder, its parent or its grandparent, with an ``id`` column matching the file names
without suffix) adds one estimate with its interval per chunk, alerts against ``--alert-below`` /
``--alert-above`` (default: the thresholds the run was configured with), ``chunks.csv`` and a plot
of the estimate per chunk in ``report.html``.

Images are read by :mod:`spe_lightning.data.images`, the reader the folder datasets use for training:
by default grayscale in [0, 1] (8-bit / 255; 16-bit and float images and NIfTI volumes scaled between their
0.5th and 99.5th percentiles), padded to a square and resized to the model's input size (stored in the
estimator, or ``--image-size``); ``--resize``, ``--intensity`` and ``--channels`` change each choice,
``--transform module.fn`` changes every image after reading, and ``--dataset module.Class`` replaces the
reader by the user's own dataset (built from the ``--images`` folder). Only regular files inside ``--images``
are read (links leading out of it are refused), within ``--max-images`` / ``--max-file-mb`` / ``--max-voxels``.

Before estimating, the images as read are compared with the calibration images the estimator was fitted on
(:mod:`spe_lightning.engine.input_check`): a mismatch (padding, scaling, the model's foreground fraction or
confidence outside the calibration range) is warned with its likely cause and fix, recorded in
``estimate.json`` as ``input_check``, and with ``--strict`` stops the command (exit status 3).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning.class_paths import import_object
from spe_lightning.data.images import (
    CHANNEL_MODES,
    IMAGE_SUFFIXES,
    INTENSITY_MODES,
    RESIZE_MODES,
    ImageLimits,
    ReadOptions,
    fit_to_size,
    image_tensor,
    is_nifti,
    list_image_files,
    read_nifti_slices,
)

__all__ = [
    "main",
    "read_image_folder",
    "load_model",
    "IMAGE_SUFFIXES",
    "csv_cell",
    "write_file",
    "InputMismatchError",
    "STRICT_EXIT",
]

DEFAULT_MODEL = "spe_lightning.models.SegmentationModel"
#: most worst cases shown in report.html
MAX_GALLERY = 200
#: exit status of ``--strict`` when the input check finds a mismatch (input errors exit with 2)
STRICT_EXIT = 3


class InputMismatchError(Exception):
    """``--strict``: the images do not look like the calibration images the estimator was fitted on."""


def read_image_folder(
    folder: str | Path,
    image_size: int | None = None,
    progress: bool = False,
    limits: ImageLimits | None = None,
    options: ReadOptions | None = None,
    transform: Any = None,
) -> tuple[list[str], list[Tensor], list[str]]:
    """``(ids, images [C,S,S] float, source files relative to folder)`` of every image in ``folder``.

    Recursive and sorted; see :func:`spe_lightning.data.images.list_image_files` for what is refused
    (``limits``: default :class:`ImageLimits`). ``options``: how each file is read (default
    :class:`ReadOptions`: gray in [0, 1], padded to a square); ``transform(image [C,S,S]) -> image``
    after reading.
    """
    folder = Path(folder)
    o = options or ReadOptions()
    limits = ImageLimits() if limits is None else limits
    files = list_image_files(folder, limits)
    if not files:
        raise ValueError(
            f"--images {folder}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)}, .nii, .nii.gz, "
            "in sub-folders too); give the folder that holds the image files, or --dataset to read other formats."
        )
    ids: list[str] = []
    images: list[Tensor] = []
    sources: list[str] = []
    bar = _bar(len(files), "reading images", progress)
    for p in files:
        rel = p.relative_to(folder)
        name = rel.as_posix()
        if is_nifti(p):
            stem = name[: -len(".nii.gz") if p.name.lower().endswith(".gz") else -len(".nii")]
            for z, sl in enumerate(read_nifti_slices(p, limits, o.intensity)):
                ids.append(f"{stem}#z{z:03d}")
                x = torch.from_numpy(np.ascontiguousarray(sl))[None]
                x = x.expand(3, *x.shape[1:]).clone() if o.channels == "rgb" else x
                images.append(_transformed(fit_to_size(x, image_size, o.resize), transform, name))
                sources.append(name)
        else:
            try:
                x = image_tensor(p, image_size, limits, o)
            except (OSError, SyntaxError) as err:  # PIL: not an image, truncated file
                raise ValueError(
                    f"cannot read the image {name}: {type(err).__name__}: {err} (remove it from the folder, or "
                    "re-save it as PNG/TIFF)"
                ) from err
            images.append(_transformed(x, transform, name))
            ids.append(rel.with_suffix("").as_posix())
            sources.append(name)
        bar.update(1)
    bar.close()
    return ids, images, sources


def _bar(total: int, desc: str, enabled: bool, unit: str = "img") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _transformed(x: Tensor, transform: Any, name: str) -> Tensor:
    """``transform(x)`` as a float tensor ``[C,H,W]``; an error naming the file and the contract."""
    if transform is None:
        return x
    try:
        y = transform(x)
    except Exception as err:
        raise ValueError(f"--transform failed on {name}: {type(err).__name__}: {err}") from err
    from spe_lightning.data.adapters import as_tensor

    try:
        y = as_tensor(y).float()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"--transform returned a {type(y).__name__} for {name}; return a [C,H,W] tensor.") from err
    if y.ndim == 2:
        y = y[None]
    if y.ndim != 3:
        raise ValueError(f"--transform returned shape {tuple(y.shape)} for {name}; return a [C,H,W] image.")
    return y


def _import_class(path: str) -> type:
    cls: type = import_object(path, "--model", DEFAULT_MODEL)
    return cls


def load_model(
    ckpt: str | Path, model_class: str | None = None, device: str = "cpu", trust_checkpoint_class: bool = False
) -> nn.Module:
    """The LightningModule of a checkpoint, in eval mode on ``device``.

    The class is ``model_class`` if given, else :class:`~spe_lightning.models.SegmentationModel`.
    The class path a checkpoint stores (``hyper_parameters._class_path``, as LightningCLI saves it)
    is imported only with ``trust_checkpoint_class=True``, and only after the whole checkpoint loaded
    with ``torch.load(weights_only=True)`` (tensors, numbers and strings, no code): importing a module
    runs its code, so a checkpoint must not choose one unless you trust where it came from.
    """
    import lightning.pytorch as pl

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"--ckpt {ckpt}: no such file. Give the model's checkpoint from training: ModelCheckpoint's file, "
            "trainer.save_checkpoint(...), or, for a LightningCLI run, its checkpoints/ folder (configs with "
            "enable_checkpointing: false, like the demo's, save none: add --trainer.enable_checkpointing=true)."
        )
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"--ckpt {ckpt}: refused to load; it holds objects other than tensors, numbers and strings "
            f"({str(err).splitlines()[0][:200]})."
        ) from err
    except Exception as err:  # not a torch file, truncated...
        raise ValueError(f"--ckpt {ckpt}: cannot read it as a checkpoint: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and state.get("format") == "spe-estimator":
        raise ValueError(
            f"--ckpt {ckpt} is an SPE estimator file, not the model's checkpoint: did you swap --ckpt and --estimator?"
        )
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(
            f"--ckpt {ckpt}: not a Lightning checkpoint (no 'state_dict'); give the file ModelCheckpoint or "
            "trainer.save_checkpoint wrote (a bare torch.save(model.state_dict()) cannot say which class to build)."
        )
    hp = state.get("hyper_parameters") if isinstance(state, dict) else None
    stored = hp.get("_class_path") if isinstance(hp, dict) else None
    stored = stored if isinstance(stored, str) else None
    if model_class is not None:
        path = model_class
    elif trust_checkpoint_class and stored:
        path = stored
    else:
        path = DEFAULT_MODEL
        if stored and stored != DEFAULT_MODEL:
            raise ValueError(
                f"--ckpt {ckpt} was saved from the class {stored}; pass --model {stored} (its module is imported: "
                "its code runs), or --trust-checkpoint-class if you trust the checkpoint's origin."
            )
    cls = _import_class(path)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"{path} is not a LightningModule class; pass --model CLASS_PATH.")
    try:
        model = cls.load_from_checkpoint(str(ckpt), map_location=device, weights_only=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        first = " ".join(str(err).split())[:400]
        hint = "" if model_class else " (pass --model CLASS_PATH, the class the checkpoint was saved from)"
        raise ValueError(f"cannot build {path} from --ckpt {ckpt}{hint}: {type(err).__name__}: {first}") from err
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
        if e.get("outside_calibrated_range"):  # farther than every calibration pair: the interval was widened
            row += " outside the calibrated range (interval widened)"
        lines.append(row)
    return "\n".join(lines)


def _chunk_table(chunks: Sequence[dict[str, Any]], metric: str = "dice") -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"| chunk | images | {metric} | interval | true | alert |", "|---|---|---|---|---|---|"]
    for c in chunks:
        e = c["estimates"].get(metric, {})
        alert = "ALERT" if any(a["metric"] == metric for a in c["alerts"]) else ""
        true = (c.get("true") or {}).get(metric)
        lines.append(
            f"| {c['chunk']} | {c['n_images']} | {f(e.get('value'))} | {f(e.get('lower'))} – {f(e.get('upper'))} "
            f"| {f(true)} | {alert} |"
        )
    return "\n".join(lines)


def csv_cell(v: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with ``= + - @``, a tab or a carriage
    return get a leading ``'`` (OWASP's CSV-injection rule); numbers are kept as they are."""
    if isinstance(v, str) and v and v[0] in "=+-@\t\r":
        return "'" + v
    return v


def write_file(path: Path, data: str | bytes) -> None:
    """Write ``path`` without following a link: the content goes to a new file in the same folder, which
    then replaces ``path`` (a link already at ``path`` is replaced, its target is never written)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cases_csv(cases: Sequence[dict[str, Any]], sources: Sequence[str]) -> str:
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
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(cols)
    for c, src in zip(cases, sources):
        w.writerow(["" if (v := {**c, "file": src}.get(k)) is None else csv_cell(v) for k in cols])
    return buf.getvalue()


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``spe-lightning estimate``."""
    d = ImageLimits()
    p = argparse.ArgumentParser(
        prog="spe-lightning estimate",
        description="Estimate a trained model's performance on a folder of unlabelled images with a saved "
        "SPE estimator; flag cases of doubtful quality.",
    )
    p.add_argument("--ckpt", required=True, help="the model's Lightning checkpoint")
    p.add_argument("--estimator", required=True, help="spe_estimator.pt saved after training")
    p.add_argument(
        "--images",
        required=True,
        help="folder of images (PNG/JPEG/TIFF/BMP, NIfTI slices); only regular files inside it are read",
    )
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
    p.add_argument(
        "--model",
        default=None,
        help=f"the LightningModule class path, e.g. mypackage.MyNet; its module is imported (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--trust-checkpoint-class",
        action="store_true",
        help="without --model, import and build the class path stored in the checkpoint (LightningCLI saves one). "
        "Importing a module runs its code: use this only for checkpoints you trust. The checkpoint is first "
        "loaded with weights_only=True either way",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="let the estimator's reverse segmenter download its weights (UniverSeg) when they are not found locally",
    )
    p.add_argument("--name", default="target", help="the set's name (seeds the support order; default 'target')")
    p.add_argument(
        "--image-size", type=_positive(int), default=None, help="model input side (default: from the estimator)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--gallery", type=int, default=12, help=f"worst cases shown in report.html (0 to {MAX_GALLERY}; default 12)"
    )
    p.add_argument(
        "--max-images", type=_positive(int), default=d.max_files, help=f"most image files read (default {d.max_files})"
    )
    p.add_argument(
        "--max-file-mb",
        type=_positive(float),
        default=d.max_file_mb,
        help=f"largest image file, MB (default {d.max_file_mb:g})",
    )
    p.add_argument(
        "--max-voxels",
        type=_positive(int),
        default=d.max_voxels,
        help=f"most pixels of an image / voxels of a NIfTI volume (default {d.max_voxels})",
    )
    p.add_argument(
        "--max-estimator-mb",
        type=_positive(float),
        default=None,
        help="largest estimator file read, MB (default 80: the 64 MB reference cap of saving plus room)",
    )
    p.add_argument(
        "--masks",
        default=None,
        help="folder of the images' masks (same relative file names; 2D binary estimators): the realised "
        "metrics are reported next to the estimates (and per chunk); never used to estimate",
    )
    p.add_argument(
        "--chunk-by",
        default=None,
        help="monitor chunks of the images: N (images per chunk, in file order) or META.csv:COLUMN "
        "(one chunk per value; META.csv as given or in --images, its parent or grandparent, with an 'id' column)",
    )
    p.add_argument(
        "--alert-below",
        action="append",
        default=None,
        metavar="METRIC=VALUE",
        help="alert when a chunk's estimate is below VALUE (repeatable; default: the run's alert_below)",
    )
    p.add_argument(
        "--alert-above",
        action="append",
        default=None,
        metavar="METRIC=VALUE",
        help="alert when a chunk's estimate is above VALUE, e.g. hd95=10 (repeatable; default: the run's alert_above)",
    )
    p.add_argument(
        "--alert-on",
        choices=("estimate", "lower"),
        default=None,
        help="compare thresholds with the estimate or the pessimistic end of its interval (default: the run's)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_reading_arguments(p)
    _add_label_options(p)  # few labelled cases (issue 28): the block at the end of this file
    return p


def _add_reading_arguments(p: argparse.ArgumentParser) -> None:
    """Reading the images as the model was trained, and the input check (issue 26)."""
    g = p.add_argument_group(
        "reading the images as in training",
        "The defaults are the folder datasets' reading (FolderSegmentationDataModule's defaults). Before estimating, "
        "the images as read are compared with the calibration images the estimator was fitted on; a mismatch is "
        "warned with its likely cause and fix and recorded in estimate.json (input_check).",
    )
    g.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="pad",
        help="pad: zero-pad to a square, then resize (default); plain: stretch to the square without padding "
        "(a model trained on plain resizes); none: keep each image's size",
    )
    g.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default="auto",
        help="auto: 8-bit / 255, 16-bit and float between the 0.5th and 99.5th percentiles (default); divide: by "
        "the type's maximum (255, 65535); percentile: every image between its percentiles; none: stored values",
    )
    g.add_argument("--channels", choices=CHANNEL_MODES, default="gray", help="gray: one channel (default); rgb: three")
    g.add_argument(
        "--transform",
        default=None,
        metavar="MODULE.FN",
        help="a function applied to every image after reading: fn(image [C,H,W] float tensor) -> image "
        "(e.g. the training's normalisation); its module is imported (its code runs)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        metavar="MODULE.CLASS",
        help="read the images with your own dataset instead: CLASS(IMAGES_FOLDER), items an image, (image, mask) "
        "or a dict with 'image' (and 'label', 'id'), as SPECallback takes them; its module is imported",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help=f"stop (exit status {STRICT_EXIT}, estimate.json holds only input_check) when the images do not look "
        "like the calibration images, instead of warning",
    )


def _thresholds(given: Sequence[str] | None, flag: str) -> dict[str, float] | None:
    """``["dice=0.8"]`` -> ``{"dice": 0.8}``; None when the flag was not given."""
    if given is None:
        return None
    out = {}
    for item in given:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: give METRIC=VALUE, e.g. dice=0.8.")
    return out


def _read_masks(
    folder: str | Path, sources: Sequence[str], size: int | None, fg: int | None, resize: str = "pad"
) -> list[Tensor]:
    """The mask of every image (``folder/<same relative name>``), binary ``[1,S,S]`` at the images' size."""
    from spe_lightning.data.images import read_mask

    root = Path(folder)
    missing = [s for s in sources if not (root / s).is_file() or is_nifti(s)]
    if missing:
        raise ValueError(
            f"--masks {root}: no 2D mask for {len(missing)} image(s), e.g. {missing[:3]}; each mask must have its "
            "image's relative file name (images/a/b.png -> masks/a/b.png), or leave --masks out."
        )
    out = []
    for s in sources:
        m = read_mask(root / s)
        m = (m > 0) if fg is None else (m == fg)
        out.append(fit_to_size(torch.from_numpy(m.astype(np.uint8))[None], size, resize, mode="nearest"))
    return out


def _chunk_groups(spec: str, ids: Sequence[str], images: str | Path) -> tuple[dict[str, list[int]], str]:
    """The chunks of ``--chunk-by`` (label -> positions) and a description of them."""
    from spe_lightning.monitoring.chunks import chunks_by_column, chunks_of, find_meta, parse_chunk_by, read_meta

    parsed = parse_chunk_by(spec)
    if isinstance(parsed, int):
        return chunks_of(len(ids), parsed), f"{parsed} images per chunk, in file order"
    meta = find_meta(parsed[0], images)
    return chunks_by_column(ids, read_meta(meta), parsed[1]), f"by {parsed[1]!r} of {meta.name}"


def _chunks_csv(rows: Sequence[dict[str, Any]]) -> str:
    from spe_lightning.monitoring.chunks import CHUNK_COLUMNS

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CHUNK_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(k) is None else csv_cell(r[k]) for k in CHUNK_COLUMNS])
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``spe-lightning estimate``; returns the ``estimate.json`` content (input problems exit with status 2)."""
    p = build_parser()
    a = p.parse_args(argv)
    if not 0 <= a.gallery <= MAX_GALLERY:
        p.error(f"--gallery must be between 0 and {MAX_GALLERY}, got {a.gallery}")
    try:
        return run(a)
    except InputMismatchError as err:
        print(f"spe-lightning estimate: stopped (--strict): {err}", file=sys.stderr)
        raise SystemExit(STRICT_EXIT) from err
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, RuntimeError, NotImplementedError) as err:
        print(f"spe-lightning estimate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


class _RecordingDataset:
    """A user's dataset as :meth:`SPEEstimator.cache` reads it, keeping each dict item's ``id``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.ids: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, dict) and isinstance(item.get("id"), (str, int)):
            self.ids[i] = str(item["id"])
        return item

    def item_ids(self) -> list[str]:
        """Each item's ``id`` (dict items), else the dataset's ``ids`` attribute, else its position."""
        n = len(self)
        own = getattr(self.dataset, "ids", None)
        fallback = [str(v) for v in own] if isinstance(own, (list, tuple)) and len(own) == n else None
        return [self.ids.get(i, fallback[i] if fallback else f"{i:05d}") for i in range(n)]


def _user_dataset(path: str, folder: str) -> _RecordingDataset:
    """``--dataset``: the user's class built from the images folder."""
    cls = import_object(path, "--dataset", "mypackage.data.MyDataset")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder (--dataset {path} is built from it).")
    try:
        ds = cls(folder)
    except Exception as err:
        raise ValueError(
            f"--dataset {path}: {path.rpartition('.')[2]}({folder!r}) failed: {type(err).__name__}: {err} "
            "(the class is built with the --images folder as its only argument; wrap it in a class that is)."
        ) from err
    try:
        n = len(ds)
    except TypeError as err:
        raise ValueError(f"--dataset {path}: needs __len__ and __getitem__ (a map-style dataset).") from err
    if n == 0:
        raise ValueError(f"--dataset {path}: built from {folder}, it has no items; check the folder it reads.")
    return _RecordingDataset(ds)


def _display(x: Tensor) -> np.ndarray:
    """A model input ``[C,H,W]`` as a gray image in [0, 1] for the gallery."""
    g = x.float().mean(0) if x.ndim == 3 else x.float()
    lo, hi = float(g.min()), float(g.max())
    return ((g - lo) / max(hi - lo, 1e-8)).numpy()


def _reading(a: argparse.Namespace, opts: ReadOptions) -> dict[str, Any]:
    """How the images were read (recorded with the input check)."""
    if a.dataset is not None:
        return {"dataset": a.dataset}
    return {"resize": opts.resize, "intensity": opts.intensity, "channels": opts.channels, "transform": a.transform}


def _versions(est: Any) -> dict[str, Any]:
    """The versions, as the full ``estimate.json`` records them."""
    from spe_lightning import __version__

    return {"spe_lightning": {"running": __version__, "estimator_written_by": getattr(est, "written_by", None)}}


def _report_check(check: dict[str, Any]) -> None:
    """The input check on stderr: every warning; what could not be compared, in one line."""
    for w in check["warnings"]:
        print(f"spe-lightning estimate: warning: {w}", file=sys.stderr)
    if check["verdict"] == "mismatch" and not check["warnings"]:
        odd = [c["statistic"] for c in check["checks"] if c["verdict"] != "ok"]
        print(
            f"spe-lightning estimate: warning: the images differ from the calibration images in {odd}.", file=sys.stderr
        )
    if check["not_compared"]:
        what = sorted({n.split(":")[0] for n in check["not_compared"]})
        why = check["not_compared"][0].split(": ", 1)[1]
        print(f"spe-lightning estimate: input check: not compared: {', '.join(what)} ({why})", file=sys.stderr)


def _relative(path: str | Path, out: Path) -> str:
    """``path`` relative to the output folder, for the outputs: no absolute paths of this machine in them."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).as_posix()


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The work of :func:`main` on parsed arguments."""
    from spe_lightning import __version__
    from spe_lightning.estimator import SPEEstimator
    from spe_lightning.reporting.html import GalleryItem, write_html_report

    show = not a.no_progress
    limits = ImageLimits(a.max_images, a.max_file_mb, a.max_voxels)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder.")
    load_kw: dict[str, Any] = {"allow_download": bool(a.allow_download)}
    if a.max_estimator_mb is not None:
        load_kw["max_mb"] = a.max_estimator_mb
    opts = ReadOptions(a.resize, a.intensity, a.channels)
    est = SPEEstimator.load(a.estimator, **load_kw)
    print(f"estimator {a.estimator}: written by spe-lightning {est.written_by} (running {__version__})")
    if a.reference is not None:
        from spe_lightning.data.folder import FolderSegmentationDataset

        root = Path(a.reference)
        size = a.image_size or (est.info.get("input_shape") or [None])[-1] or 128
        read: dict[str, Any] = {
            "keep_aspect": opts.resize != "plain",
            "intensity": opts.intensity,
            "image_channels": opts.channels,
        }
        est = est.with_reference_dataset(
            FolderSegmentationDataset(root.parent, root.name, a.class_index, int(size), **read)
        )
    model = load_model(a.ckpt, a.model, a.device, a.trust_checkpoint_class)
    size = a.image_size or (est.info.get("input_shape") or [None])[-1]
    below, above = _thresholds(a.alert_below, "--alert-below"), _thresholds(a.alert_above, "--alert-above")
    recorder: _RecordingDataset | None = None
    ids: list[str] = []
    sources: list[str] = []
    if a.dataset is not None:
        if a.transform is not None or a.masks is not None:
            raise ValueError(
                "--dataset reads the images itself: apply --transform inside its __getitem__, and give the masks "
                "as its items' labels instead of --masks."
            )
        recorder = _user_dataset(a.dataset, a.images)
        items: Any = recorder
    else:
        transform = None
        if a.transform is not None:
            transform = import_object(a.transform, "--transform", "mypackage.transforms.normalise")
            if not callable(transform):
                raise ValueError(f"--transform {a.transform}: not a function; give MODULE.FN with fn(image) -> image.")
        ids, images, sources = read_image_folder(a.images, size, show, limits, opts, transform)
        items = images
        if a.masks is not None:
            if est.config.classes:
                raise ValueError("--masks: only for binary estimators.")
            masks = _read_masks(a.masks, sources, size, est.config.foreground_class, opts.resize)
            items = [{"image": i, "label": m} for i, m in zip(images, masks)]
    data = est.cache(items, a.name)
    if recorder is not None:
        ids = sources = recorder.item_ids()
    groups = _chunk_groups(a.chunk_by, ids, a.images) if a.chunk_by else None
    saved_with = est.info.get("model_class")
    loaded = f"{type(model).__module__}.{type(model).__qualname__}"
    if saved_with and saved_with != loaded:
        print(
            f"spe-lightning estimate: warning: the estimator was saved with a {saved_with} and --ckpt built a "
            f"{loaded}: use the checkpoint of the run that wrote the estimator (--model {saved_with}).",
            file=sys.stderr,
        )
    try:
        check = est.check_inputs(model, data, device=a.device)
    except (ValueError, RuntimeError, TypeError) as err:
        if "calibrated on" in str(err):  # the channel check: already names the fix
            raise
        shape = est.info.get("input_shape")
        raise ValueError(
            f"running the model of --ckpt {a.ckpt} on the images failed: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:400].rstrip('.')}. "
            "Are the model and the estimator from the same training run? "
            f"The estimator was saved with {saved_with or 'an unrecorded model class'}"
            + (f" on inputs of shape {shape}" if shape else "")
            + (f" for the classes {est.config.classes}" if est.config.classes else "")
            + "."
        ) from err
    check["reading"] = _reading(a, opts)
    _report_check(check)
    if a.strict and check["verdict"] == "mismatch":
        out.mkdir(parents=True, exist_ok=True)
        stopped = {
            "input_check": check,
            "estimates": None,
            "reason": "stopped by --strict: the images do not look like the calibration images",
            **_versions(est),
        }
        write_file(out / "estimate.json", json.dumps(stopped, indent=2, allow_nan=False))
        first = check["warnings"][0] if check["warnings"] else "see input_check in estimate.json"
        raise InputMismatchError(f"{first} (nothing estimated; wrote {out / 'estimate.json'} with input_check)")
    bar = _bar(len(data), "per-case quality", show)
    labelled = _label_inputs(a, sources, size, est)  # few labelled cases (issue 28)
    res = est.estimate(model, data, name=a.name, ids=ids, device=a.device, progress=bar.update, **labelled)
    bar.close()
    chunked = None
    if groups is not None:
        bar = _bar(len(groups[0]), "chunk estimates", show, unit="chunk")
        chunked = est.estimate_chunks(
            model, data, groups[0], a.name, res.masks, device=a.device, alert_below=below, alert_above=above,
            alert_on=a.alert_on, progress=bar.update,
            **({"labelled_masks": labelled["labelled_masks"], "cases": res.cases} if labelled else {}),
        )  # fmt: skip
        bar.close()

    out.mkdir(parents=True, exist_ok=True)
    seg = dict(est.segmenter_spec)
    if isinstance(seg.get("weights"), str):  # where the weights lay on the machine that trained: the name only
        seg["weights"] = Path(seg["weights"]).name
    summary = {
        **res.to_dict(),
        "images": _relative(a.images, out),
        "checkpoint": _relative(a.ckpt, out),
        "estimator": _relative(a.estimator, out),
        "segmenter": seg,
        **_versions(est),
        "input_check": check,
        "per_case": None
        if est.cases is None
        else {k: est.cases.get(k) for k in ("k", "top", "threshold", "method", "dice_cut", "auroc", "empty_score")},
    }
    _label_outputs(a, est, res, sources, out, summary)  # few labelled cases (issue 28)
    if chunked is not None and groups is not None:
        from spe_lightning.monitoring.chunks import chunk_rows

        summary["chunks"] = {"by": groups[1], **chunked.to_dict()}
        write_file(out / "chunks.csv", _chunks_csv(chunk_rows(chunked.chunks)))
    write_file(out / "estimate.json", json.dumps(summary, indent=2, allow_nan=False))
    write_file(out / "cases.csv", _cases_csv(res.cases, sources))
    order = sorted(
        range(len(res.cases)), key=lambda i: (res.cases[i]["quality"] is not None, res.cases[i]["quality"] or 0)
    )
    gallery = []
    for i in order[: a.gallery]:
        c = res.cases[i]
        img = _display(data.inputs[i])
        mask = res.masks[i][0].numpy()
        q = "n/a" if c["quality"] is None else f"{c['quality']:.2f}"
        flag = " FLAGGED" if c.get("flagged") else ""
        label = str(c["id"])[:28].replace("$", r"\$")  # matplotlib would read $...$ as maths
        gallery.append(GalleryItem(img, mask, f"{label}\nquality {q}{flag}", bool(c.get("flagged"))))
    meta = {
        "images": f"{summary['images']} ({len(data)} cases)",
        "model": summary["checkpoint"],
        "estimator": f"{summary['estimator']} (reverse segmenter {est.segmenter_spec.get('name')}, "
        f"{0 if est.reference_images is None else est.reference_images.shape[0]} references; "
        f"written by spe-lightning {est.written_by})",
        "input check": check["verdict"] + (f": {check['warnings'][0]}" if check["warnings"] else ""),
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".report.") as tmp:
        page = Path(tmp) / "report.html"
        write_html_report(page, summary, res.cases, gallery, est.cases, meta=meta, chunks=summary.get("chunks"))
        write_file(out / "report.html", page.read_bytes())
    print(_table(res.estimates, res.level, res.true))
    _print_labels(res, summary)  # few labelled cases (issue 28)
    if res.combined is not None:
        c = res.combined
        print(
            f"Dice with the per-case quality regressor: {c['value']:.3f} "
            f"(w {c['weight']:.2f} · regressor mean {c['regressor']:.3f} + {1 - c['weight']:.2f} · SPE {c['spe']:.3f})"
        )
    if chunked is not None and groups is not None:
        from spe_lightning.monitoring.alerts import alert_message

        print(_chunk_table(chunked.chunks))
        for event in chunked.alerts:
            print(alert_message(event))
        t = chunked.seconds
        print(
            f"{len(chunked.chunks)} chunks ({groups[1]}): model inference {t['predict']:.1f}s, "
            f"chunk estimates {t['estimate']:.1f}s; wrote {out / 'chunks.csv'}"
        )
    if res.cases and res.case_threshold is not None:
        n_flag = sum(1 for c in res.cases if c["flagged"])
        print(f"{n_flag} of {len(res.cases)} cases flagged (quality < {res.case_threshold:.3f})")
    print(f"wrote {out / 'estimate.json'}, {out / 'cases.csv'}, {out / 'report.html'}")
    return summary


# ------------------------------------------------------------------------- few labelled cases (issue 28)
#: what --labelled-masks looks for, beside the image's own relative name
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def _add_label_options(p: argparse.ArgumentParser) -> None:
    """``--labelled-masks``, ``--label-design``, ``--suggest-labels``, ``--suggest-seed``."""
    p.add_argument(
        "--labelled-masks",
        default=None,
        help="folder with the masks of SOME of the images (same relative file name, or the same name with a "
        ".png/.tif/.bmp suffix): adds the prediction-powered estimate of Dice, IoU, precision and recall with its "
        "interval, beside the labelled-only interval (docs/few_labels.md). The labelled cases must be a uniform "
        "random sample of the images, or exactly the cases of --label-design",
    )
    p.add_argument(
        "--label-design",
        default=None,
        help="label_design.json written by --suggest-labels, when the labelled cases are exactly its suggestions",
    )
    p.add_argument(
        "--suggest-labels",
        type=_positive(int),
        default=None,
        metavar="K",
        help="list K cases to label (a random draw stratified by per-case uncertainty: the design the interval "
        "assumes); writes suggested_labels.csv and label_design.json and adds them to estimate.json",
    )
    p.add_argument("--suggest-seed", type=int, default=0, help="seed of the --suggest-labels draw (default 0)")


def _label_inputs(a: argparse.Namespace, sources: Sequence[str], size: int | None, est: Any) -> dict[str, Any]:
    """``estimate``'s ``labelled_masks`` (by case position) and ``label_design`` from the options ({} without)."""
    from spe_lightning.data.images import read_mask

    if a.label_design is not None and a.labelled_masks is None:
        raise ValueError("--label-design needs --labelled-masks (the masks of the suggested cases).")
    if a.labelled_masks is None:
        return {}
    if a.dataset is not None:
        raise ValueError(
            "--labelled-masks reads masks named like image files: with --dataset, pass the labelled cases' masks "
            "through the Python API (SPEEstimator.estimate(labelled_masks=...))."
        )
    root = Path(a.labelled_masks)
    if not root.is_dir():
        raise NotADirectoryError(f"--labelled-masks {root}: no such folder.")
    if est.config.classes:
        raise ValueError("--labelled-masks: prediction-powered estimates are for binary estimators.")
    fg = est.config.foreground_class
    masks: dict[int | str, Tensor] = {}
    for pos, src in enumerate(sources):
        if is_nifti(src):
            raise ValueError("--labelled-masks: only for 2D images (the images include NIfTI volumes).")
        found = [root / src, *(root / Path(src).with_suffix(x) for x in MASK_SUFFIXES)]
        path = next((f for f in found if f.is_file() and not f.is_symlink()), None)
        if path is None:
            continue
        m = read_mask(path)
        m = (m > 0) if fg is None else (m == fg)
        masks[pos] = fit_to_size(torch.from_numpy(m.astype(np.uint8))[None], size, a.resize, mode="nearest")
    if not masks:
        raise ValueError(f"--labelled-masks {root}: no mask named like any of the {len(sources)} images.")
    design = None
    if a.label_design is not None:
        try:
            design = json.loads(Path(a.label_design).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--label-design {a.label_design}: cannot read it as JSON: {err}") from err
        if not isinstance(design, dict) or design.get("design") != "stratified":
            raise ValueError(f"--label-design {a.label_design}: not a label_design.json of --suggest-labels.")
    return {"labelled_masks": masks, "label_design": design}


def _label_outputs(
    a: argparse.Namespace, est: Any, res: Any, sources: Sequence[str], out: Path, summary: dict[str, Any]
) -> None:
    """With ``--suggest-labels``: suggested_labels.csv, label_design.json and ``summary["suggested_labels"]``."""
    if a.suggest_labels is None:
        return
    if a.suggest_labels > len(res.cases):
        raise ValueError(f"--suggest-labels {a.suggest_labels}: only {len(res.cases)} images.")
    design = est.suggest_labels(res, a.suggest_labels, seed=a.suggest_seed)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "file", "stratum", "estimated_dice"])
    for i in design["chosen"]:
        c = res.cases[i]
        w.writerow([csv_cell(c["id"]), csv_cell(sources[i]), design["strata"][i], c.get("estimated_dice") or ""])
    write_file(out / "suggested_labels.csv", buf.getvalue())
    write_file(out / "label_design.json", json.dumps(design, indent=2))
    summary["suggested_labels"] = {
        "k": design["k"],
        "ids": design["chosen_ids"],
        "files": [sources[i] for i in design["chosen"]],
        "design": design["design"],
        "rule": design["rule"],
        "uncertainty": design["uncertainty"],
        "seed": design["seed"],
        "guarantee": design["guarantee"],
        "csv": "suggested_labels.csv",
        "design_file": "label_design.json",
    }


def _print_labels(res: Any, summary: dict[str, Any]) -> None:
    """The prediction-powered estimates (with labels) and the suggested cases (with --suggest-labels)."""
    lab = res.labelled
    if lab is not None:

        def f(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        print(
            f"\nWith {lab['n_labels']} labelled of {lab['n_cases']} cases ({lab['design']} design; "
            f"predictions: {lab['predictions']}):"
        )
        if lab["reason"]:
            print(f"no prediction-powered interval: {lab['reason']}")
        print(
            f"| metric | prediction-powered | {res.level:.0%} interval | labelled only | interval | lambda |\n"
            "|---|---|---|---|---|---|"
        )
        for m, r in lab["metrics"].items():
            if "estimate" not in r:
                print(f"| {m} | n/a | | {f(r.get('labelled_mean'))} | | |")
                continue
            print(
                f"| {m} | {f(r['estimate'])} | {f(r['lower'])} – {f(r['upper'])} | {f(r['classical'])} "
                f"| {f(r['classical_lower'])} – {f(r['classical_upper'])} | {r['lambda']:.2f} |"
            )
    sug = summary.get("suggested_labels")
    if sug is not None:
        print(f"\nLabel these {sug['k']} cases ({sug['rule']}; seed {sug['seed']}):")
        print("  " + ", ".join(sug["files"]))
        print(
            "then run again with --labelled-masks DIR --label-design label_design.json; "
            "cases picked by hand instead void the interval."
        )


if __name__ == "__main__":
    main()
