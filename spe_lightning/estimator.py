"""SPEEstimator: the fitted SPE estimator, saved after training and reused on new unlabelled data.

The file (``spe_estimator.pt``) holds only tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)`` and cannot run code: G is stored as its parameters
(:meth:`Mapping.to_dict`), the reverse segmenter as its spec (name + settings), and the reference
images/masks at the working size as tensors (float32 images, bool masks: about 86 KB per
reference at 128 px, e.g. 15 MB for 172 references; :meth:`SPEEstimator.save` refuses more than
``max_reference_mb``, default 64 MB, unless the references are left out with ``embed_reference=False``
and given again at load time).

    est = SPEEstimator.from_callback(spe_callback, trainer.lightning_module)
    est.save("spe_estimator.pt")
    result = SPEEstimator.load("spe_estimator.pt").estimate(model, new_images)
    result.estimates["dice"]  # {"value", "lower", "upper", "pseudo", "reason"}
    result.cases[0]           # per-case quality score, estimated Dice and flag

Given the same weights, data and target name, :meth:`estimate` reproduces the estimate the
callback reported after fit (same support order, reverse step and G).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning.data.adapters import resize_labels, resize_masks
from spe_lightning.engine.estimation import finite_or_none
from spe_lightning.engine.mapping import Mapping
from spe_lightning.engine.metrics import per_image_metrics
from spe_lightning.engine.percase import CaseScores, calibrate_flags, case_scores
from spe_lightning.engine.predict import CachedSet, cache_dataset, default_logits, predict_labels
from spe_lightning.engine.spe import SPEEngine, metric_keys
from spe_lightning.reverse.base import ReverseSegmenter, make_segmenter

__all__ = ["SPEEstimator", "EstimateResult", "FORMAT", "VERSION", "IncompatibleEstimatorError"]

#: the ``format`` tag of an estimator file
FORMAT = "spe-estimator"
#: the file layout version this code reads and writes
VERSION = 1

LogitsFn = Callable[[nn.Module, Tensor], Tensor]


class IncompatibleEstimatorError(ValueError):
    """The file is not an SPE estimator, or one of a layout version this spe-lightning cannot read."""


@dataclass
class EstimateResult:
    """What :meth:`SPEEstimator.estimate` found for one set of images."""

    name: str
    estimates: dict[str, dict[str, Any]]  # metric -> value, lower, upper, pseudo, reason
    n_images: int
    n_support: int | dict[str, int]  # per class with classes
    level: float
    cases: list[dict[str, Any]]  # per case: id, quality, estimated_dice, flagged, ... (empty if per_case=False)
    masks: list[Tensor] = field(repr=False)  # predicted masks, bool [1,H,W], native size
    gray: Tensor = field(repr=False)  # working-size gray images [N,1,w,w]
    true: dict[str, float | None] | None = None  # real metrics when the images came with masks
    case_threshold: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no tensors, no per-case rows)."""
        flagged = sum(1 for c in self.cases if c.get("flagged"))
        return {
            "name": self.name,
            "n_images": self.n_images,
            "n_support": self.n_support,
            "level": self.level,
            "estimates": self.estimates,
            "true": self.true,
            "reason": self.reason,
            "cases": {"n": len(self.cases), "n_flagged": flagged, "threshold": self.case_threshold},
        }


def _per_case_dice(masks: Sequence[Tensor], truth: Sequence[Tensor]) -> np.ndarray:
    """Real Dice of each predicted mask (any foreground class) against its truth."""
    out = np.full(len(masks), np.nan)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(masks):
        groups.setdefault(tuple(m.shape), []).append(i)
    for idx in groups.values():
        pred = torch.stack([masks[i] > 0 for i in idx])
        d = per_image_metrics(pred, torch.stack([truth[i] > 0 for i in idx]), ("dice",))
        out[idx] = d["dice"].numpy()
    return out


def _is_safe(obj: Any) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_safe(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_safe(v) for k, v in obj.items())
    return False


class SPEEstimator:
    """A fitted SPE estimator: reverse segmenter spec, references, G per metric, per-case calibration.

    Build it with :meth:`from_callback` after fit (or :meth:`load` a saved one); :meth:`estimate`
    applies it to a model and new unlabelled images.

    Args:
        segmenter: the reverse segmenter's spec (``ReverseSegmenter.spec()``).
        reference_images: working-size gray references ``[R,1,w,w]`` in [0, 1] (None: give them later).
        reference_masks: their masks ``[R,1,w,w]`` bool.
        reference_indices: positions of the references in the source reference dataset.
        metrics: metric names.
        mappings: metric -> :meth:`Mapping.to_dict` (or ``{"kind", "error"}`` when G could not be fitted).
        config: ``support_size``, ``min_foreground``, ``threshold``, ``seed``, ``working_size``,
            ``level``, ``foreground_class``, ``activation``, ``batch_size``, ``mapping``.
        cases: per-case calibration (:func:`~spe_lightning.engine.percase.calibrate_flags` plus
            ``k``, ``top`` and the calibration scores); None when not calibrated.
        info: free-form extras (targets' in-training estimates, model class, input size).
        anchor: for anchored estimates (:mod:`spe_lightning.engine.anchor`): ``{"intervals": {key:
            interval model (plain numbers) or None}, "calibration_pseudo": {key: float},
            "calibration_real": {key: float}}`` at the last record; None for the paper's G alone.
    """

    def __init__(
        self,
        segmenter: dict[str, Any],
        reference_images: Tensor | None,
        reference_masks: Tensor | None,
        reference_indices: Sequence[int],
        metrics: Sequence[str],
        mappings: dict[str, dict[str, Any]],
        config: dict[str, Any],
        cases: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        anchor: dict[str, Any] | None = None,
    ) -> None:
        need = {"support_size", "min_foreground", "threshold", "seed", "working_size", "level"}
        if need - set(config):
            raise ValueError(f"SPEEstimator config misses {sorted(need - set(config))}.")
        if "name" not in segmenter:
            raise ValueError("SPEEstimator: the segmenter spec needs a 'name'.")
        self.segmenter_spec = dict(segmenter)
        self.reference_indices = [int(i) for i in reference_indices]
        self.metrics = list(metrics)
        self.config = {
            "foreground_class": None,
            "activation": "auto",
            "batch_size": 16,
            "class_names": None,
            "class_indices": None,
            "spatial_dims": None,
            "max_slices": None,
            **config,
        }
        #: record keys: the metrics, or per metric its class mean and ``"<metric>/<class>"``
        self.keys = metric_keys(self.metrics, self.config["class_names"])
        self.mappings = {k: dict(mappings.get(k, {"error": "no mapping stored"})) for k in self.keys}
        self.cases = cases
        self.anchor = anchor
        self.info = dict(info or {})
        self.reference_images: Tensor | None = None
        self.reference_masks: Tensor | None = None
        self._segmenter: ReverseSegmenter | None = None
        self._engine: SPEEngine | None = None
        if reference_images is not None:
            self.set_reference(reference_images, reference_masks)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_callback(
        cls,
        callback: Any,
        module: nn.Module | None = None,
        k: int = 16,
        top: int = 1,
        dice_cut: float = 0.7,
    ) -> SPEEstimator:
        """The estimator of a fitted :class:`~spe_lightning.SPECallback` (after ``trainer.fit``).

        With ``module`` (the trained model, e.g. ``trainer.lightning_module``) the per-case
        quality flags are calibrated on the callback's calibration set (``k``/``top`` of
        :func:`~spe_lightning.engine.percase.case_scores`, flag cases whose real Dice is below
        ``dice_cut``); without it, per-case scores are computed later but not flagged.
        """
        engine, report = getattr(callback, "engine", None), getattr(callback, "report", None)
        if engine is None or report is None:
            raise ValueError("SPEEstimator.from_callback: the callback has no report yet; call it after trainer.fit.")
        config = {
            "support_size": engine.support_size,
            "min_foreground": engine.min_foreground,
            "threshold": float(engine.threshold),
            "seed": int(engine.seed),
            "working_size": int(callback.working_size),
            "level": float(report.get("level", callback.level)),
            "mapping": str(callback.mapping),
            "foreground_class": callback.foreground_class,
            "activation": str(callback.activation),
            "batch_size": int(callback.batch_size),
            "class_names": list(getattr(callback, "class_names", None) or []) or None,
            "class_indices": list(getattr(callback, "class_indices", None) or []) or None,
            "spatial_dims": getattr(callback, "spatial_dims", None),
            "max_slices": getattr(callback, "max_slices", None),
        }
        info: dict[str, Any] = {
            "targets": {t: dict(e) for t, e in report.get("estimates", {}).items()},
            "n_records": int(report.get("n_records", len(report.get("records", [])))),
            "custom_logits_fn": getattr(callback, "logits_fn", default_logits) is not default_logits,
        }
        cal = getattr(callback, "_sets", {}).get("calibration")
        if cal is not None and len(cal):
            info["input_shape"] = [int(s) for s in cal.inputs[0].shape]
        if module is not None:
            info["model_class"] = f"{type(module).__module__}.{type(module).__qualname__}"
        anchor = None
        if report.get("anchor_intervals") is not None:
            last = callback.records[-1]
            anchor = {
                "intervals": dict(report["anchor_intervals"]),
                "calibration_pseudo": dict(last["pseudo"].get("calibration", {})),
                "calibration_real": dict(last["real"].get("calibration", {})),
            }
        est = cls(
            segmenter=engine.segmenter.spec(),
            reference_images=engine.ref_images,
            reference_masks=getattr(engine, "ref_labels", engine.ref_masks),
            reference_indices=engine.ref_indices,
            metrics=list(report["metrics"]),
            mappings=report["mapping"],
            config=config,
            info=info,
            anchor=anchor,
        )
        est._segmenter = engine.segmenter  # the very instance that ran during training
        if module is not None:
            if cal is None:
                raise ValueError("SPEEstimator.from_callback: the callback holds no calibration set to calibrate on.")
            logits_fn = getattr(callback, "logits_fn", default_logits)
            est.calibrate_cases(module, cal, k=k, top=top, dice_cut=dice_cut, logits_fn=logits_fn)
        return est

    def set_reference(self, images: Tensor, masks: Tensor | None) -> None:
        """Use these working-size references: ``[R,1,w,w]`` gray in [0, 1], masks bool (or uint8 label maps)."""
        w = int(self.config["working_size"])
        if masks is None or images.ndim != 4 or tuple(images.shape[1:]) != (1, w, w) or masks.shape != images.shape:
            shape = None if masks is None else tuple(masks.shape)
            raise ValueError(f"references must be [R,1,{w},{w}] images and masks; got {tuple(images.shape)}, {shape}.")
        if len(self.reference_indices) not in (0, images.shape[0]):
            raise ValueError(f"{images.shape[0]} references given; the estimator used {len(self.reference_indices)}.")
        # clones: a view would make torch.save write its whole underlying storage
        self.reference_images = images.detach().float().cpu().clone()
        labels = self.config["class_names"] is not None
        self.reference_masks = masks.detach().cpu().to(torch.uint8 if labels else torch.bool).clone()
        self._engine = None

    def _cache_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {
            "working_size": int(c["working_size"]),
            "foreground": c["foreground_class"],
            "classes": c["class_indices"],
            "spatial_dims": c["spatial_dims"],
            "max_slices": c["max_slices"],
        }

    def set_reference_dataset(self, dataset: Sequence, image_key: str = "image", label_key: str = "label") -> None:
        """Re-read the references from the dataset they came from (the stored indices pick them)."""
        ref = cache_dataset(
            "reference",
            dataset,
            image_key=image_key,
            label_key=label_key,
            indices=sorted(set(self.reference_indices)) or None,
            require_masks=True,
            slices="foreground",
            keep_inputs=False,
            **self._cache_kwargs(),
        )
        size = tuple(ref.gray.shape[-2:])
        self.set_reference(
            ref.gray, torch.cat([resize_labels(ref.unit_mask(r)[None], size) for r in range(len(ref.units))])
        )

    @property
    def segmenter(self) -> ReverseSegmenter:
        """The reverse segmenter, rebuilt from its spec on first use."""
        if self._segmenter is None:
            spec = dict(self.segmenter_spec)
            name = spec.pop("name")
            if name in ("universeg", "auto"):  # a file never starts a download on its own
                spec["download"] = bool(getattr(self, "_allow_download", False))
                w = spec.get("weights")
                if isinstance(w, str) and not Path(w).expanduser().is_file():
                    spec.pop("weights")  # saved on another machine: look in SPE_UNIVERSEG_WEIGHTS / the hub cache
            try:
                self._segmenter = make_segmenter(name, **spec)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"SPEEstimator: cannot rebuild the reverse segmenter {self.segmenter_spec}: {err} "
                    "(register a custom segmenter with register_segmenter before estimating)."
                ) from err
        return self._segmenter

    @property
    def engine(self) -> SPEEngine:
        """The SPE engine over the stored references."""
        if self.reference_images is None or self.reference_masks is None:
            raise ValueError(
                "SPEEstimator: this file holds no reference images; give them with set_reference_dataset(dataset) "
                "(or --reference ROOT on the command line)."
            )
        if self._engine is None:
            n = self.reference_images.shape[0]
            ref = CachedSet(
                "reference",
                [],
                list(self.reference_masks),
                self.reference_images,
                list(self.reference_indices) or list(range(n)),
                [(i, -1) for i in range(n)],
            )
            c = self.config
            self._engine = SPEEngine(
                self.segmenter,
                ref,
                self.metrics,
                int(c["support_size"]),
                int(c["min_foreground"]),
                float(c["threshold"]),
                int(c["seed"]),
                class_names=c["class_names"],
            )
        return self._engine

    # ------------------------------------------------------------------ save / load
    def state(self, embed_reference: bool = True) -> dict[str, Any]:
        """The saved dict: only tensors, numbers, strings, lists, dicts and None."""
        from spe_lightning import __version__

        ref: dict[str, Any] = {"indices": list(self.reference_indices), "embedded": bool(embed_reference)}
        if embed_reference:
            if self.reference_images is None:
                raise ValueError("SPEEstimator: no references to embed; save with embed_reference=False.")
            ref.update(images=self.reference_images, masks=self.reference_masks)
        state = {
            "format": FORMAT,
            "version": VERSION,
            "spe_lightning": __version__,
            "metrics": list(self.metrics),
            "segmenter": dict(self.segmenter_spec),
            "config": dict(self.config),
            "mappings": self.mappings,
            "reference": ref,
            "cases": self.cases,
            "anchor": self.anchor,
            "info": self.info,
        }
        if not _is_safe(state):
            raise TypeError("SPEEstimator state holds a non-plain object; it must be tensors, numbers and strings.")
        return state

    def save(self, path: str | Path, embed_reference: bool = True, max_reference_mb: float = 64.0) -> Path:
        """Write the estimator to ``path`` (``torch.save`` of :meth:`state`)."""
        if embed_reference and self.reference_images is not None and self.reference_masks is not None:
            mb = (
                self.reference_images.numel() * self.reference_images.element_size()
                + self.reference_masks.numel() * self.reference_masks.element_size()
            ) / 2**20
            if mb > max_reference_mb:
                raise ValueError(
                    f"SPEEstimator.save: the {self.reference_images.shape[0]} references take {mb:.1f} MB "
                    f"(> max_reference_mb={max_reference_mb:g}); use max_references= on SPECallback, raise "
                    "max_reference_mb, or save with embed_reference=False and give the references at load time."
                )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state(embed_reference), path)
        return path

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SPEEstimator:
        """The estimator of a :meth:`state` dict (version-checked)."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise IncompatibleEstimatorError("not an SPE estimator file (no 'format': 'spe-estimator' entry).")
        version = state.get("version")
        if version != VERSION:
            raise IncompatibleEstimatorError(
                f"SPE estimator file version {version!r} (written by spe-lightning {state.get('spe_lightning', '?')}) "
                f"cannot be read by this spe-lightning, which reads version {VERSION}; re-export the estimator "
                "with a matching spe-lightning (SPEEstimator.from_callback(...).save(...))."
            )
        ref = state["reference"]
        return cls(
            segmenter=state["segmenter"],
            reference_images=ref.get("images"),
            reference_masks=ref.get("masks"),
            reference_indices=ref.get("indices", []),
            metrics=state["metrics"],
            mappings=state["mappings"],
            config=state["config"],
            cases=state.get("cases"),
            anchor=state.get("anchor"),
            info=state.get("info"),
        )

    @classmethod
    def load(cls, path: str | Path, max_mb: float = 80.0, allow_download: bool = False) -> SPEEstimator:
        """Read an estimator file with ``torch.load(weights_only=True)``: it cannot run code.

        Files above ``max_mb`` (default: the 64 MB reference cap of :meth:`save` plus room for the
        rest) are refused before reading. The reverse segmenter the file names is rebuilt without
        downloading anything unless ``allow_download=True``.
        """
        size_mb = Path(path).stat().st_size / 2**20 if Path(path).is_file() else 0.0
        if size_mb > max_mb:
            raise IncompatibleEstimatorError(
                f"{path}: {size_mb:.1f} MB, above max_mb={max_mb:g} (--max-estimator-mb); "
                "raise it if you trust the file."
            )
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise IncompatibleEstimatorError(
                f"{path}: refused to load; an SPE estimator file holds only tensors, numbers and strings, "
                f"and this one holds something else ({str(err).splitlines()[0][:200]})."
            ) from err
        try:
            est = cls.from_state(state)
        except IncompatibleEstimatorError as err:
            raise IncompatibleEstimatorError(f"{path}: {err}") from None
        est._allow_download = bool(allow_download)
        return est

    # ------------------------------------------------------------------ estimating
    def _cache(self, name: str, images: Any, image_key: str, label_key: str) -> CachedSet:
        if isinstance(images, CachedSet):
            return images
        if isinstance(images, Tensor) and images.ndim == 3:
            images = images[:, None]
        return cache_dataset(name, images, image_key=image_key, label_key=label_key, **self._cache_kwargs())

    def _predict(
        self, model: nn.Module, data: CachedSet, device: torch.device, logits_fn: LogitsFn
    ) -> tuple[list[Tensor], Tensor]:
        """Predicted masks (bool, or uint8 label maps with classes) and confidence, as the callback predicts them."""
        c = self.config
        return predict_labels(
            model,
            data,
            device,
            int(c["batch_size"]),
            logits_fn,
            c["activation"],
            float(c["threshold"]),
            c["foreground_class"],
            c["class_indices"],
        )

    def _check_2d(self, data: CachedSet) -> None:
        if data.volumetric or len(data.units) != len(data):
            raise NotImplementedError("SPEEstimator: per-case scores are for 2D images; pass per_case=False for 3D.")

    @torch.no_grad()
    def calibrate_cases(
        self,
        model: nn.Module,
        calibration: Any,
        k: int = 16,
        top: int = 1,
        dice_cut: float = 0.7,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """Calibrate the per-case flags on a labelled set (the model's predictions vs its masks)."""
        data = self._cache("calibration", calibration, "image", "label")
        if data.masks is None:
            raise ValueError("SPEEstimator.calibrate_cases: the calibration set needs masks.")
        self._check_2d(data)
        device = self._device(model, device)
        masks, _ = self._predict(model, data, device, logits_fn)
        real = _per_case_dice(masks, data.masks)
        res = self._scores(data, masks, k, top, None, device)
        flags = calibrate_flags(res.score.numpy(), real, res.empty.numpy(), dice_cut=dice_cut)
        scores = res.score.numpy().copy()
        if flags["empty_score"] is not None:
            scores[res.empty.numpy()] = flags["empty_score"]
        self.cases = {
            "k": int(k),
            "top": int(top),
            **flags,
            "calibration_scores": [finite_or_none(v) for v in scores],
            "calibration_dice": [finite_or_none(v) for v in real],
        }
        return self.cases

    def _scores(
        self,
        data: CachedSet,
        masks: Sequence[Tensor],
        k: int,
        top: int,
        empty_score: float | None,
        device: torch.device,
        progress: Callable[[int], Any] | None = None,
    ) -> CaseScores:
        size = tuple(data.gray.shape[-2:])
        wmasks = torch.cat([resize_masks((m > 0)[None], size) for m in masks])  # any foreground class
        engine = self.engine
        return case_scores(
            self.segmenter,
            data.gray,
            wmasks,
            engine.ref_images,
            engine.ref_masks,
            k=k,
            top=top,
            threshold=float(self.config["threshold"]),
            min_foreground=int(self.config["min_foreground"]),
            empty_score=empty_score,
            device=device,
            progress=progress,
        )

    @staticmethod
    def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        p = next(iter(model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def estimate(
        self,
        model: nn.Module,
        images: Any,
        name: str = "target",
        per_case: bool = True,
        ids: Sequence[str] | None = None,
        logits_fn: LogitsFn = default_logits,
        device: torch.device | str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        progress: Callable[[int], Any] | None = None,
    ) -> EstimateResult:
        """Estimate every metric (with its interval) of ``model`` on ``images``, and score each case.

        Args:
            model: the trained segmentation model (``model(x)`` gives logits; else pass ``logits_fn``).
            images: a dataset (items ``image``, ``(image, mask)`` or dicts), a tensor ``[N,C,H,W]`` or a
                list of ``[C,H,W]`` tensors. Masks, if present, are only used to report the truth.
            name: the set's name; it seeds the support order, so use the callback's target name
                (``"target"`` for a single dataset) to reproduce the in-training estimate exactly.
            per_case: also compute per-case quality scores and flags.
            ids: one id per image for the per-case rows (default: positions).
            logits_fn: ``fn(model, images) -> logits`` as given to the callback.
            device: where to run (default: the model's device).
            image_key, label_key: keys of dict items.
            progress: called with the number of finished cases (e.g. ``tqdm.update``).
        """
        data = self._cache(name, images, image_key, label_key)
        if ids is not None and len(ids) != len(data):
            raise ValueError(f"{len(ids)} ids for {len(data)} images.")
        if per_case:
            self._check_2d(data)
        device = self._device(model, device)
        c = self.config
        masks, conf = self._predict(model, data, device, logits_fn)
        if progress is not None:
            progress(0)
        engine = self.engine
        level = float(c["level"])
        pseudo = engine.pseudo(data, masks, device)
        estimates = self.estimate_from_pseudo(pseudo["values"], pseudo["reason"])
        true = engine.real(data, masks)
        cases: list[dict[str, Any]] = []
        threshold = None
        if per_case:
            cases, threshold = self._case_rows(data, masks, conf, ids, device, progress)
        return EstimateResult(
            name=name,
            estimates=estimates,
            n_images=len(data),
            n_support=pseudo["n_support"],
            level=level,
            cases=cases,
            masks=list(masks),
            gray=data.gray,
            true=true,
            case_threshold=threshold,
            reason=pseudo["reason"],
        )

    def estimate_from_pseudo(
        self, pseudo: dict[str, float | None], reason: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Estimates (value, interval, pseudo, reason, method) from a set's pseudo metrics, as the callback makes them.

        The paper's G maps the pseudo value; with ``anchor`` the estimate is anchored instead (the last
        calibration score moved by G(pseudo) - G(calibration pseudo)), the paper's one kept under ``paper``.
        """
        from spe_lightning.engine.estimation import estimate

        level = float(self.config["level"])
        anchor = self.anchor
        out: dict[str, dict[str, Any]] = {}
        for key in self.keys:
            md = self.mappings.get(key, {})
            out[key] = estimate(
                Mapping.from_dict(md) if "params" in md else None,
                key,
                pseudo.get(key),
                level,
                no_g=f"no mapping G: {md.get('error', 'not stored')}",
                no_pseudo=f"no pseudo {key}" + (f" ({reason})" if reason else ""),
                anchor=(
                    anchor["calibration_pseudo"].get(key),
                    anchor["calibration_real"].get(key),
                    (anchor.get("intervals") or {}).get(key),
                )
                if anchor
                else None,
            )
        return out

    def _case_rows(
        self,
        data: CachedSet,
        masks: Sequence[Tensor],
        conf: Tensor,
        ids: Sequence[str] | None,
        device: torch.device,
        progress: Callable[[int], Any] | None,
    ) -> tuple[list[dict[str, Any]], float | None]:
        cal = self.cases or {}
        k, top = int(cal.get("k", 16)), int(cal.get("top", 1))
        res = self._scores(data, masks, k, top, cal.get("empty_score"), device, progress)
        g = Mapping.from_dict(cal["mapping"]) if cal.get("mapping") else None
        threshold = cal.get("threshold")
        real = _per_case_dice(masks, data.masks) if data.masks is not None else None
        level = float(self.config["level"])
        rows = []
        for i in range(len(data)):
            s = finite_or_none(res.score[i])
            row: dict[str, Any] = {
                "id": str(ids[i]) if ids is not None else str(data.indices[i]),
                "quality": s,
                "estimated_dice": None,
                "estimated_dice_lower": None,
                "estimated_dice_upper": None,
                "flagged": None if threshold is None or s is None else bool(s < threshold),
                "empty_prediction": bool(res.empty[i]),
                "foreground_pixels": int(masks[i].sum()),
                "confidence": finite_or_none(conf[i]),
                "best_reference": int(res.best_reference[i]),
            }
            if g is not None and s is not None:
                lo, hi = g.interval([s], level)
                row.update(
                    estimated_dice=finite_or_none(g.predict([s])[0]),
                    estimated_dice_lower=finite_or_none(lo[0]),
                    estimated_dice_upper=finite_or_none(hi[0]),
                )
            if real is not None:
                row["real_dice"] = finite_or_none(real[i])
            rows.append(row)
        return rows, threshold

    def __repr__(self) -> str:
        n = 0 if self.reference_images is None else self.reference_images.shape[0]
        return (
            f"SPEEstimator(segmenter={self.segmenter_spec.get('name')!r}, metrics={self.metrics}, references={n}, "
            f"per_case={'calibrated' if self.cases else 'uncalibrated'})"
        )
