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

Images are read by :mod:`spe_lightning.data.images`, the reader training uses: grayscale in
[0, 1] (8-bit / 255; 16-bit and float images and NIfTI volumes scaled between their 0.5th and 99.5th
percentiles), padded to a square and resized to the model's input size (stored in the estimator, or
``--image-size``). Only regular files inside ``--images`` are read (links leading out of it are
refused), within ``--max-images`` / ``--max-file-mb`` / ``--max-voxels``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
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

from spe_lightning.data.images import (
    IMAGE_SUFFIXES,
    ImageLimits,
    image_tensor,
    is_nifti,
    list_image_files,
    read_nifti_slices,
    square_resize,
)

__all__ = ["main", "read_image_folder", "load_model", "IMAGE_SUFFIXES", "csv_cell", "write_file"]

DEFAULT_MODEL = "spe_lightning.models.SegmentationModel"
#: most worst cases shown in report.html
MAX_GALLERY = 200


def read_image_folder(
    folder: str | Path, image_size: int | None = None, progress: bool = False, limits: ImageLimits | None = None
) -> tuple[list[str], list[Tensor], list[str]]:
    """``(ids, images [1,S,S] float in [0,1], source files relative to folder)`` of every image in ``folder``.

    Recursive and sorted; see :func:`spe_lightning.data.images.list_image_files` for what is refused
    (``limits``: default :class:`ImageLimits`).
    """
    folder = Path(folder)
    limits = ImageLimits() if limits is None else limits
    files = list_image_files(folder, limits)
    if not files:
        raise ValueError(f"no images (PNG/JPEG/TIFF/BMP/NIfTI) in {folder}.")
    ids: list[str] = []
    images: list[Tensor] = []
    sources: list[str] = []
    bar = _bar(len(files), "reading images", progress)
    for p in files:
        rel = p.relative_to(folder)
        name = rel.as_posix()
        if is_nifti(p):
            stem = name[: -len(".nii.gz") if p.name.lower().endswith(".gz") else -len(".nii")]
            for z, sl in enumerate(read_nifti_slices(p, limits)):
                ids.append(f"{stem}#z{z:03d}")
                images.append(square_resize(torch.from_numpy(np.ascontiguousarray(sl))[None], image_size))
                sources.append(name)
        else:
            try:
                images.append(image_tensor(p, image_size, limits))
            except (OSError, SyntaxError) as err:  # PIL: not an image, truncated file
                raise ValueError(f"cannot read the image {name}: {type(err).__name__}: {err}") from err
            ids.append(rel.with_suffix("").as_posix())
            sources.append(name)
        bar.update(1)
    bar.close()
    return ids, images, sources


def _bar(total: int, desc: str, enabled: bool, unit: str = "img") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"--model {path!r}: give a full class path, e.g. {DEFAULT_MODEL}.")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the model class {path}: {type(err).__name__}: {err}") from err
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
        raise FileNotFoundError(f"--ckpt {ckpt}: no such file.")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"--ckpt {ckpt}: refused to load; it holds objects other than tensors, numbers and strings "
            f"({str(err).splitlines()[0][:200]})."
        ) from err
    except Exception as err:  # not a torch file, truncated...
        raise ValueError(f"--ckpt {ckpt}: cannot read it as a checkpoint: {type(err).__name__}: {err}") from err
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
    _add_label_options(p)  # few labelled cases (issue 28): the block at the end of this file
    return p


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


def _read_masks(folder: str | Path, sources: Sequence[str], size: int | None, fg: int | None) -> list[Tensor]:
    """The mask of every image (``folder/<same relative name>``), binary ``[1,S,S]`` at the images' size."""
    from spe_lightning.data.images import read_mask

    root = Path(folder)
    missing = [s for s in sources if not (root / s).is_file() or is_nifti(s)]
    if missing:
        raise ValueError(f"--masks {root}: no 2D mask for {len(missing)} image(s), e.g. {missing[:3]}.")
    out = []
    for s in sources:
        m = read_mask(root / s)
        m = (m > 0) if fg is None else (m == fg)
        out.append(square_resize(torch.from_numpy(m.astype(np.uint8))[None], size, mode="nearest"))
    return out


def _chunk_groups(spec: str, ids: Sequence[str], images: str | Path) -> tuple[dict[str, list[int]], str]:
    """The chunks of ``--chunk-by`` (label -> positions) and a description of them."""
    from spe_lightning.engine.chunks import chunks_by_column, chunks_of, find_meta, parse_chunk_by, read_meta

    parsed = parse_chunk_by(spec)
    if isinstance(parsed, int):
        return chunks_of(len(ids), parsed), f"{parsed} images per chunk, in file order"
    meta = find_meta(parsed[0], images)
    return chunks_by_column(ids, read_meta(meta), parsed[1]), f"by {parsed[1]!r} of {meta.name}"


def _chunks_csv(rows: Sequence[dict[str, Any]]) -> str:
    from spe_lightning.engine.chunks import CHUNK_COLUMNS

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
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, RuntimeError, NotImplementedError) as err:
        print(f"spe-lightning estimate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def _relative(path: str | Path, out: Path) -> str:
    """``path`` relative to the output folder, for the outputs: no absolute paths of this machine in them."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).as_posix()


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The work of :func:`main` on parsed arguments."""
    from spe_lightning.engine.html_report import GalleryItem, write_html_report
    from spe_lightning.estimator import SPEEstimator

    show = not a.no_progress
    limits = ImageLimits(a.max_images, a.max_file_mb, a.max_voxels)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder.")
    load_kw: dict[str, Any] = {"allow_download": bool(a.allow_download)}
    if a.max_estimator_mb is not None:
        load_kw["max_mb"] = a.max_estimator_mb
    est = SPEEstimator.load(a.estimator, **load_kw)
    if a.reference is not None:
        from spe_lightning.data.folder import FolderSegmentationDataset

        root = Path(a.reference)
        size = a.image_size or (est.info.get("input_shape") or [None])[-1] or 128
        est.set_reference_dataset(FolderSegmentationDataset(root.parent, root.name, a.class_index, int(size)))
    model = load_model(a.ckpt, a.model, a.device, a.trust_checkpoint_class)
    size = a.image_size or (est.info.get("input_shape") or [None])[-1]
    ids, images, sources = read_image_folder(a.images, size, progress=show, limits=limits)
    below, above = _thresholds(a.alert_below, "--alert-below"), _thresholds(a.alert_above, "--alert-above")
    groups = _chunk_groups(a.chunk_by, ids, a.images) if a.chunk_by else None
    items: Any = images
    if a.masks is not None:
        if est.config.classes:
            raise ValueError("--masks: only for binary estimators.")
        masks = _read_masks(a.masks, sources, size, est.config.foreground_class)
        items = [{"image": i, "label": m} for i, m in zip(images, masks)]
    data = est.cache(items, a.name)
    bar = _bar(len(images), "per-case quality", show)
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
        "per_case": None
        if est.cases is None
        else {k: est.cases.get(k) for k in ("k", "top", "threshold", "method", "dice_cut", "auroc", "empty_score")},
    }
    _label_outputs(a, est, res, sources, out, summary)  # few labelled cases (issue 28)
    if chunked is not None:
        from spe_lightning.engine.chunks import chunk_rows

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
        img = images[i][0].numpy()
        mask = res.masks[i][0].numpy()
        q = "n/a" if c["quality"] is None else f"{c['quality']:.2f}"
        flag = " FLAGGED" if c.get("flagged") else ""
        label = str(c["id"])[:28].replace("$", r"\$")  # matplotlib would read $...$ as maths
        gallery.append(GalleryItem(img, mask, f"{label}\nquality {q}{flag}", bool(c.get("flagged"))))
    meta = {
        "images": f"{summary['images']} ({len(images)} cases)",
        "model": summary["checkpoint"],
        "estimator": f"{summary['estimator']} (reverse segmenter {est.segmenter_spec.get('name')}, "
        f"{0 if est.reference_images is None else est.reference_images.shape[0]} references)",
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
    if chunked is not None:
        from spe_lightning.engine.alerts import alert_message

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
        masks[pos] = square_resize(torch.from_numpy(m.astype(np.uint8))[None], size, mode="nearest")
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
