"""Running ``spe-lightning estimate``: load, read, check the inputs, estimate, write and print (:func:`main`)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from spe_lightning import __version__
from spe_lightning.class_paths import import_object
from spe_lightning.cli.estimate.arguments import MAX_GALLERY, STRICT_EXIT, build_parser, parse_thresholds
from spe_lightning.cli.estimate.inputs import (
    RecordingDataset,
    chunk_groups,
    load_model,
    progress_bar,
    read_image_folder,
    read_masks,
    user_dataset,
)
from spe_lightning.cli.estimate.labels import label_inputs, label_outputs, print_labels
from spe_lightning.cli.estimate.outputs import (
    cases_csv,
    chunk_table,
    chunks_csv,
    display_image,
    estimate_table,
    flag_line,
    relative_path,
    report_input_check,
    versions,
    write_file,
)
from spe_lightning.data.folder import FolderSegmentationDataset
from spe_lightning.data.images import ImageLimits, ReadOptions
from spe_lightning.estimator import SPEEstimator
from spe_lightning.monitoring.alerts import alert_message
from spe_lightning.monitoring.chunks import chunk_rows
from spe_lightning.reporting.html import GalleryItem, write_html_report

__all__ = ["main", "run", "InputMismatchError"]


class InputMismatchError(Exception):
    """``--strict``: the images do not look like the calibration images the estimator was fitted on."""


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


def require_reader_for(est: Any, dataset: str | None) -> None:
    """Refuse the folder reader for an estimator whose model takes 3D volumes: it gives 2D images and slices."""
    shape = est.info.get("input_shape")
    if dataset is None and shape is not None and len(shape) == 4:
        raise ValueError(
            f"this estimator's model takes 3D volumes (its calibration inputs were {list(shape)} [C,D,H,W]) and the "
            "folder reader gives 2D images and NIfTI slices: pass --dataset MODULE.CLASS, a dataset that returns "
            "your volumes as in training (docs/estimate_cli.md)."
        )


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The work of :func:`main` on parsed arguments."""
    show = not a.no_progress
    limits = ImageLimits(a.max_images, a.max_file_mb, a.max_voxels)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder.")
    opts = ReadOptions(a.resize, a.intensity, a.channels)
    est = load_estimator(a, opts)
    require_reader_for(est, a.dataset)
    model = load_model(a.ckpt, a.model, a.device, a.trust_checkpoint_class, est.info.get("model_class"))
    size = a.image_size or (est.info.get("input_shape") or [None])[-1]
    below, above = parse_thresholds(a.alert_below, "--alert-below"), parse_thresholds(a.alert_above, "--alert-above")
    data, ids, sources = read_inputs(a, est, size, limits, opts)
    groups = chunk_groups(a.chunk_by, ids, a.images) if a.chunk_by else None
    labelled = label_inputs(a, sources, size, est)  # few labelled cases (issue 28): read before the model runs
    check = check_inputs(a, est, model, data, opts)
    if a.strict and check["verdict"] == "mismatch":
        out.mkdir(parents=True, exist_ok=True)
        stopped = {
            "input_check": check,
            "estimates": None,
            "reason": "stopped by --strict: the images do not look like the calibration images",
            **versions(est),
        }
        write_file(out / "estimate.json", json.dumps(stopped, indent=2, allow_nan=False))
        first = check["warnings"][0] if check["warnings"] else "see input_check in estimate.json"
        raise InputMismatchError(f"{first} (nothing estimated; wrote {out / 'estimate.json'} with input_check)")
    bar = progress_bar(len(data), "per-case quality", show)
    res = est.estimate(model, data, name=a.name, ids=ids, device=a.device, progress=bar.update, **labelled)
    bar.close()
    chunked = None
    if groups is not None:
        bar = progress_bar(len(groups[0]), "chunk estimates", show, unit="chunk")
        chunked = est.estimate_chunks(
            model, data, groups[0], a.name, res.masks, device=a.device, alert_below=below, alert_above=above,
            alert_on=a.alert_on, progress=bar.update,
            **({"labelled_masks": labelled["labelled_masks"], "cases": res.cases} if labelled else {}),
        )  # fmt: skip
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    summary = write_outputs(a, est, res, chunked, groups, check, data, sources, out)
    print_results(res, chunked, groups, summary, out)
    return summary


def load_estimator(a: argparse.Namespace, opts: ReadOptions) -> SPEEstimator:
    """``--estimator`` (with ``--reference`` when it was saved without its reference images)."""
    load_kw: dict[str, Any] = {"allow_download": bool(a.allow_download)}
    if a.max_estimator_mb is not None:
        load_kw["max_mb"] = a.max_estimator_mb
    est = SPEEstimator.load(a.estimator, **load_kw)
    print(f"estimator {a.estimator}: written by spe-lightning {est.written_by} (running {__version__})")
    if a.case_intervals is not None:
        widen = a.case_intervals == "with_set"
        est = est.with_fitted(est.fitted.replace(config=est.config.replace(case_set_uncertainty=widen)))
    if a.reference is not None:
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
    return est


def read_inputs(
    a: argparse.Namespace, est: SPEEstimator, size: int | None, limits: ImageLimits, opts: ReadOptions
) -> tuple[Any, list[str], list[str]]:
    """``(cached images, ids, source files)`` from ``--images`` (with ``--masks``) or from ``--dataset``."""
    recorder: RecordingDataset | None = None
    ids: list[str] = []
    sources: list[str] = []
    keys: tuple[str | None, str | None] = (None, None)  # --dataset's items: the run's own keys
    if a.dataset is not None:
        if a.transform is not None or a.masks is not None:
            raise ValueError(
                "--dataset reads the images itself: apply --transform inside its __getitem__, and give the masks "
                "as its items' labels instead of --masks."
            )
        recorder = user_dataset(a.dataset, a.images)
        items: Any = recorder
    else:
        transform = None
        if a.transform is not None:
            transform = import_object(a.transform, "--transform", "mypackage.transforms.normalise")
            if not callable(transform):
                raise ValueError(f"--transform {a.transform}: not a function; give MODULE.FN with fn(image) -> image.")
        ids, images, sources = read_image_folder(a.images, size, not a.no_progress, limits, opts, transform)
        items = images
        if a.masks is not None:
            if est.config.classes:
                raise ValueError("--masks: only for binary estimators.")
            masks = read_masks(a.masks, sources, size, est.config.foreground_class, opts.resize, a.images)
            items = [{"image": i, "label": m} for i, m in zip(images, masks)]
            keys = ("image", "label")  # the items made here, whatever keys the run's own dataset used
    data = est.cache(items, a.name, *keys)
    if recorder is not None:
        ids = sources = recorder.item_ids()
    return data, ids, sources


def check_inputs(
    a: argparse.Namespace, est: SPEEstimator, model: nn.Module, data: Any, opts: ReadOptions
) -> dict[str, Any]:
    """The input check (warned on stderr), with how the images were read; a model that cannot run on them is an
    error naming the likely cause."""
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
    if check["model"]["verdict"] == "other_architecture":
        raise ValueError(f"--ckpt {a.ckpt}: {check['model']['message']}.")
    check["reading"] = reading(a, opts)
    report_input_check(check)
    return check


def reading(a: argparse.Namespace, opts: ReadOptions) -> dict[str, Any]:
    """How the images were read (recorded with the input check)."""
    if a.dataset is not None:
        return {"dataset": a.dataset}
    return {"resize": opts.resize, "intensity": opts.intensity, "channels": opts.channels, "transform": a.transform}


def write_outputs(
    a: argparse.Namespace,
    est: SPEEstimator,
    res: Any,
    chunked: Any,
    groups: tuple[dict[str, list[int]], str] | None,
    check: dict[str, Any],
    data: Any,
    sources: Sequence[str],
    out: Path,
) -> dict[str, Any]:
    """``estimate.json``, ``cases.csv``, ``chunks.csv`` (with ``--chunk-by``) and ``report.html``; returns the
    content of ``estimate.json``."""
    seg = dict(est.segmenter_spec)
    if isinstance(seg.get("weights"), str):  # where the weights lay on the machine that trained: the name only
        seg["weights"] = Path(seg["weights"]).name
    summary = {
        **res.to_dict(),
        "images": relative_path(a.images, out),
        "checkpoint": relative_path(a.ckpt, out),
        "estimator": relative_path(a.estimator, out),
        "segmenter": seg,
        **versions(est),
        "input_check": check,
        "per_case": None
        if est.cases is None
        else {k: est.cases.get(k) for k in ("k", "top", "threshold", "method", "dice_cut", "auroc", "empty_score")},
    }
    label_outputs(a, est, res, sources, out, summary)  # few labelled cases (issue 28)
    if chunked is not None and groups is not None:
        summary["chunks"] = {"by": groups[1], **chunked.to_dict()}
        write_file(out / "chunks.csv", chunks_csv(chunk_rows(chunked.chunks)))
    write_file(out / "estimate.json", json.dumps(summary, indent=2, allow_nan=False))
    write_file(out / "cases.csv", cases_csv(res.cases, sources))
    cases = [c.to_dict() for c in res.cases]  # report.html shows the rows of cases.csv
    order = sorted(range(len(cases)), key=lambda i: (cases[i]["quality"] is not None, cases[i]["quality"] or 0))
    gallery = []
    for i in order[: a.gallery]:
        c = cases[i]
        img = display_image(data.inputs[i])
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
        write_html_report(page, summary, cases, gallery, est.cases, meta=meta, chunks=summary.get("chunks"))
        write_file(out / "report.html", page.read_bytes())
    return summary


def print_results(
    res: Any, chunked: Any, groups: tuple[dict[str, list[int]], str] | None, summary: dict[str, Any], out: Path
) -> None:
    """The tables and summary lines on stdout."""
    print(estimate_table(res.estimates, res.level, res.true))
    print_labels(res, summary)  # few labelled cases (issue 28)
    if res.combined is not None:
        c = res.combined
        print(
            f"Dice with the per-case quality regressor: {c['value']:.3f} "
            f"(w {c['weight']:.2f} · regressor mean {c['regressor']:.3f} + {1 - c['weight']:.2f} · SPE {c['spe']:.3f})"
        )
    if chunked is not None and groups is not None:
        print(chunk_table(chunked.chunks))
        for event in chunked.alerts:
            print(alert_message(event))
        t = chunked.seconds
        print(
            f"{len(chunked.chunks)} chunks ({groups[1]}): model inference {t['predict']:.1f}s, "
            f"chunk estimates {t['estimate']:.1f}s; wrote {out / 'chunks.csv'}"
        )
    cases = res.cases
    if cases and res.case_threshold is not None:
        n_flag = sum(1 for c in cases if c.flagged)
        print(flag_line(n_flag, len(cases), res.case_threshold, summary.get("per_case")))
    print(f"wrote {out / 'estimate.json'}, {out / 'cases.csv'}, {out / 'report.html'}")
