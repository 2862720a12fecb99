"""Saving and loading a :class:`~spe_lightning.estimator.fitted.FittedSPE` (``spe_estimator.pt``).

The file holds only tensors, numbers, strings, lists, dicts and None (checked before writing), so it loads
with ``torch.load(weights_only=True)`` and cannot run code. The reference images/masks at the working size
are embedded unless ``embed_reference=False`` (about 86 KB per reference at 128 px; refused above
``max_reference_mb``). Version-1 files (an older layout of the settings) are read and migrated.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spe_lightning import __version__
from spe_lightning.config import SPEConfig
from spe_lightning.estimator.fitted import FittedSPE

__all__ = ["FORMAT", "VERSION", "IncompatibleEstimatorError", "fitted_state", "fitted_from_state", "save", "load"]

#: the ``format`` tag of an estimator file
FORMAT = "spe-estimator"
#: the file layout version this code writes (it reads 1 and 2)
VERSION = 2
#: settings of a version-1 file that SPEConfig names differently or not at all
_V1_ONLY = ("class_names", "class_indices")
_log = logging.getLogger(__name__)


class IncompatibleEstimatorError(ValueError):
    """The file is not an SPE estimator, or one of a layout version this spe-lightning cannot read."""


def is_safe(obj: Any) -> bool:
    """True when ``obj`` is only None, bools, numbers, strings, tensors, lists/tuples and str-keyed dicts."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(is_safe(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_safe(v) for k, v in obj.items())
    return False


def _plain(obj: Any) -> Any:
    return None if obj is None else dict(obj)


def fitted_state(fitted: FittedSPE, embed_reference: bool = True) -> dict[str, Any]:
    """The saved dict of ``fitted``: only tensors, numbers, strings, lists, dicts and None."""
    ref: dict[str, Any] = {"indices": list(fitted.reference_indices), "embedded": bool(embed_reference)}
    if embed_reference:
        if fitted.reference_images is None:
            raise ValueError("SPEEstimator: no references to embed; save with embed_reference=False.")
        ref.update(images=fitted.reference_images, masks=fitted.reference_masks)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "spe_lightning": __version__,
        "segmenter": dict(fitted.segmenter),
        "config": fitted.config.to_dict(),
        "mappings": {k: dict(v) for k, v in fitted.mappings.items()},
        "reference": ref,
        "cases": _plain(fitted.cases),
        "quality": _plain(fitted.quality),
        "segmenter_state": dict(fitted.segmenter_state),
        "anchor": _plain(fitted.anchor),
        "info": dict(fitted.info),
    }
    if not is_safe(state):
        raise TypeError("SPEEstimator state holds a non-plain object; it must be tensors, numbers and strings.")
    return state


def save(fitted: FittedSPE, path: str | Path, embed_reference: bool = True, max_reference_mb: float = 64.0) -> Path:
    """Write ``fitted`` to ``path`` (``torch.save`` of :func:`fitted_state`)."""
    images, masks = fitted.reference_images, fitted.reference_masks
    if embed_reference and images is not None and masks is not None:
        mb = (images.numel() * images.element_size() + masks.numel() * masks.element_size()) / 2**20
        if mb > max_reference_mb:
            raise ValueError(
                f"SPEEstimator.save: the {images.shape[0]} references take {mb:.1f} MB "
                f"(> max_reference_mb={max_reference_mb:g}); use max_references= on SPECallback, raise "
                "max_reference_mb, or save with embed_reference=False and give the references at load time."
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fitted_state(fitted, embed_reference), path)
    return path


def fitted_from_state(state: Any) -> FittedSPE:
    """The :class:`FittedSPE` of a :func:`fitted_state` dict (version-checked; version 1 migrated)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = (
            " It is a Lightning checkpoint: did you swap the checkpoint and the estimator (--ckpt, --estimator)?"
            if isinstance(state, dict) and "state_dict" in state
            else " SPECallback writes spe_estimator.pt next to spe_report.json after fit."
        )
        raise IncompatibleEstimatorError(f"not an SPE estimator file (no 'format': 'spe-estimator' entry).{hint}")
    version = state.get("version")
    if version not in (1, VERSION):
        raise IncompatibleEstimatorError(
            f"SPE estimator file version {version!r} (written by spe-lightning {state.get('spe_lightning', '?')}) "
            f"cannot be read by this spe-lightning, which reads versions 1 and {VERSION}; re-export the "
            "estimator with a matching spe-lightning (the run's estimator: run.estimator.save(...))."
        )
    config = state["config"]
    if version == 1:
        config = config_from_v1(config, state["metrics"], anchored=state.get("anchor") is not None)
    ref = state["reference"]
    return FittedSPE(
        config,
        state["segmenter"],
        state["mappings"],
        ref.get("images"),
        ref.get("masks"),
        ref.get("indices", []),
        segmenter_state=dict(state.get("segmenter_state") or {}),
        anchor=state.get("anchor"),
        cases=state.get("cases"),
        quality=state.get("quality"),
        info=state.get("info") or {},
        written_by=str(state.get("spe_lightning") or "unknown"),
    )


def load(path: str | Path, max_mb: float = 80.0) -> FittedSPE:
    """Read an estimator file with ``torch.load(weights_only=True)``: it cannot run code.

    Files above ``max_mb`` (default: the 64 MB reference cap of :func:`save` plus room for the rest)
    are refused before reading.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no such estimator file. SPECallback writes spe_estimator.pt next to spe_report.json after "
            "fit (the trainer's log folder, or log_dir=); a finished SPERun's run.estimator.save(path) writes one too."
        )
    size_mb = Path(path).stat().st_size / 2**20
    if size_mb > max_mb:
        raise IncompatibleEstimatorError(
            f"{path}: {size_mb:.1f} MB, above max_mb={max_mb:g} (--max-estimator-mb); raise it if you trust the file."
        )
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise IncompatibleEstimatorError(
            f"{path}: refused to load; an SPE estimator file holds only tensors, numbers and strings, "
            f"and this one holds something else ({str(err).splitlines()[0][:200]})."
        ) from err
    try:
        fitted = fitted_from_state(state)
    except IncompatibleEstimatorError as err:
        raise IncompatibleEstimatorError(f"{path}: {err}") from None
    written = state.get("spe_lightning") if isinstance(state, dict) else None
    _log.info("SPE estimator %s: written by spe-lightning %s (this is %s)", path, written or "?", __version__)
    return fitted


def config_from_v1(config: dict[str, Any], metrics: Sequence[str], anchored: bool) -> SPEConfig:
    """The :class:`SPEConfig` of a version-1 estimator file's config dict."""
    names, indices = config.get("class_names"), config.get("class_indices")
    nullable = ("foreground_class", "spatial_dims", "max_references", "memory_budget_mb")
    known = {k: v for k, v in config.items() if k not in _V1_ONLY and (v is not None or k in nullable)}
    classes = dict(zip(names, indices)) if names and indices else None
    return SPEConfig.from_dict({**known, "metrics": tuple(metrics), "classes": classes, "anchored": anchored})
