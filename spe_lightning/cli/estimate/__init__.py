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

Modules: ``arguments`` (the flags), ``inputs`` (images, masks, chunks, the model), ``running`` (the steps of
the command), ``outputs`` (files, CSV cells, tables), ``labels`` (a few labelled cases). The names below are
the public ones, importable from here.
"""

from __future__ import annotations

from spe_lightning.cli.estimate.arguments import STRICT_EXIT, build_parser
from spe_lightning.cli.estimate.inputs import IMAGE_SUFFIXES, load_model, read_image_folder
from spe_lightning.cli.estimate.outputs import cases_csv, chunks_csv, csv_cell, estimate_table, write_file
from spe_lightning.cli.estimate.running import InputMismatchError, main, run

__all__ = [
    "main",
    "run",
    "build_parser",
    "read_image_folder",
    "load_model",
    "IMAGE_SUFFIXES",
    "csv_cell",
    "write_file",
    "cases_csv",
    "chunks_csv",
    "estimate_table",
    "InputMismatchError",
    "STRICT_EXIT",
]
