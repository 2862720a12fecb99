"""The arguments of ``spe-lightning estimate`` (:func:`build_parser`) and their parsing helpers."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from spe_lightning.data.images import CHANNEL_MODES, INTENSITY_MODES, RESIZE_MODES, ImageLimits

__all__ = ["build_parser", "parse_thresholds", "DEFAULT_MODEL", "MAX_GALLERY", "STRICT_EXIT"]

DEFAULT_MODEL = "spe_lightning.models.SegmentationModel"
#: most worst cases shown in report.html
MAX_GALLERY = 200
#: exit status of ``--strict`` when the input check finds a mismatch (input errors exit with 2)
STRICT_EXIT = 3


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
        help="folder of images (PNG/JPEG/TIFF/BMP, DICOM, NIfTI slices); only regular files inside it are read",
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
    p.add_argument(
        "--name",
        default="target",
        help="the set's name (default 'target'): it seeds the support order, and a training target's name also "
        "reuses that target's interval model (with its target-styled pair), so --name site_b reproduces the "
        "training report's estimate of site_b",
    )
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
    p.add_argument(
        "--case-intervals",
        choices=("with_set", "cases_only"),
        default=None,
        help="per-case Dice intervals: with_set widens them by SPE's set interval (case_set_uncertainty); "
        "cases_only keeps the per-case map's own (default: the estimator's setting)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_reading_arguments(p)
    _add_label_options(p)  # few labelled cases (issue 28)
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


def parse_thresholds(given: Sequence[str] | None, flag: str) -> dict[str, float] | None:
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
