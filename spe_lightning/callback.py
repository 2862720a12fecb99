"""SPECallback: the Lightning glue around the SPE engine (hooks, logging, state). Kept thin."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset

from spe_lightning.engine.anchor import anchor_sets, pairs_from_record
from spe_lightning.engine.estimation import CALIBRATION, fit_and_estimate
from spe_lightning.engine.mapping import MAPPINGS
from spe_lightning.engine.metrics import PAPER_METRICS, validate_metrics
from spe_lightning.engine.predict import CachedSet, cache_dataset, default_logits, predict_labels
from spe_lightning.engine.report import make_figure, summary_table, write_csv, write_json
from spe_lightning.engine.shifts import SHIFT_FAMILIES
from spe_lightning.engine.spe import Shard, SPEEngine, metric_keys
from spe_lightning.reverse.base import ReverseSegmenter, available_segmenters, make_segmenter, resolve_auto

__all__ = ["SPECallback"]

_ACTIVATIONS = ("auto", "sigmoid", "softmax", "none")


def _parse_classes(classes: Sequence[int] | Mapping[str, int] | None) -> tuple[list[str], list[int]]:
    """``(names, indices)`` of the ``classes`` argument (names ``class_<i>`` for a plain list)."""
    if classes is None:
        return [], []
    if isinstance(classes, Mapping):
        names, indices = [str(k) for k in classes], list(classes.values())
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        indices = list(classes)
        names = [f"class_{c}" for c in indices]
    else:
        raise TypeError(
            f"SPECallback: classes must be a list of class indices or a {{name: index}} dict, got {classes!r}."
        )
    if not indices:
        raise ValueError("SPECallback: classes is empty; give at least one class index (or None for binary).")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in indices):
        raise ValueError(f"SPECallback: class indices must be ints >= 0, got {indices!r}.")
    if len(set(indices)) != len(indices) or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"SPECallback: classes must have distinct indices and non-empty names, got {classes!r}.")
    return names, indices


class SPECallback(Callback):
    r"""Estimate a segmentation model's metrics on unlabelled data while it trains (SPE).

    Every ``every_n_epochs`` epochs the current weights predict the ``calibration`` and
    ``target`` sets; each set's images with their *predicted* masks become the support of a
    reverse segmenter that segments the labelled ``reference`` images, giving pseudo metrics.
    After fit, a mapping G fitted on the calibration records (pseudo -> real metric across
    checkpoints) turns each target's pseudo metrics into estimates with intervals, which go to
    every logger, ``spe_report.json``/``.csv`` in the log directory and the console.

    Under DDP every rank predicts its share of each set and segments its share of the references;
    the results are gathered, so all ranks hold the same records, and only rank zero logs and
    writes. 3D items ``[C,D,H,W]`` are handled slice-wise; ``classes`` makes SPE per class.

    Datasets yield ``(image, mask)`` tuples or dicts (``image_key``/``label_key``). When
    ``reference``/``calibration``/``target`` are not given, they come from the datamodule's
    ``spe_datasets()`` (see :class:`~spe_lightning.data.FolderSegmentationDataModule`).

    Args:
        reference: labelled dataset whose images are the reverse queries (the training set without augmentation).
        calibration: labelled dataset on which real metrics are measured to fit G (normally validation).
        target: unlabelled dataset, or a dict name -> dataset. Masks, if any, are only reported as the truth.
        segmenter: ``"auto"`` (UniverSeg when its official weights load, else the weight-free default),
            a name from :func:`~spe_lightning.reverse.available_segmenters`, or a ``ReverseSegmenter``.
        every_n_epochs: evaluate every n training epochs.
        support_size: maximum support images per reverse step (paper: 64).
        max_references: use a fixed seeded subset of at most this many references (None: all).
        min_foreground: support masks with fewer predicted foreground pixels (at ``working_size``) are dropped.
        threshold: binarisation threshold of the model's foreground probability and of the reverse output.
        metrics: metric names; default the paper's six.
        mapping: G: ``"linear"`` (paper), ``"huber"`` (robust) or ``"isotonic"`` (monotone).
        level: nominal coverage of the estimate intervals.
        anchored: estimate a target as the calibration score at the same checkpoint moved by
            ``G(pseudo_target) - G(pseudo_calibration)`` (default; better than the paper's
            ``G(pseudo_target)`` in benchmarks/, which stays in the report under ``paper``).
        interval_shifts: shift families (:data:`~spe_lightning.engine.shifts.SHIFT_FAMILIES`) applied
            to the calibration set at fit end, at severities 1 and 3, to size the anchored intervals
            (with ``interval_subsets``); ``[]`` and 0 subsets: intervals from G's residuals only.
        interval_subsets: random calibration subsets per target size for the intervals.
        seed: seed for the reference subset and support orders.
        working_size: side of the square images the reverse segmenter works on.
        foreground_class: class index of the masks that is foreground (None: any non-zero); binary SPE.
        classes: multi-class SPE: class indices (``[1, 2]``) or ``{name: index}``; each class gets its own
            support set and reverse step, metrics ``"<metric>/<name>"`` and their mean ``"<metric>"``.
            The model's channel ``c`` must be class ``c`` (argmax decides).
        spatial_dims: 2 or 3; None: 4-D items ``[C,D,H,W]`` are volumes, handled slice-wise.
        max_slices: per volume, at most this many evenly spaced slices are support candidates
            (all slices) or references (slices with foreground).
        memory_budget_mb: on CUDA, memory (MiB) the reverse step may add; its chunk of queries is sized to it.
        image_key, label_key: keys of dict items.
        logits_fn: ``fn(pl_module, images) -> logits [B,C,H,W]``; default ``pl_module(images)`` (first
            element of a list output, ``"logits"``/``"pred"``/``"out"`` of a dict output).
        activation: ``"auto"`` (sigmoid for 1 channel, softmax for several), or force one; ``"none"``
            when the model already outputs probabilities.
        batch_size: batch size of SPE's own inference.
        log_dir: where reports go (default: the trainer's log directory).
        verbose: print a line per evaluation and the summary table.
        strict: raise instead of warning and skipping when an evaluation fails.
    """

    def __init__(
        self,
        reference: Dataset | None = None,
        calibration: Dataset | None = None,
        target: Dataset | Mapping[str, Dataset] | None = None,
        segmenter: str | ReverseSegmenter = "auto",
        every_n_epochs: int = 1,
        support_size: int = 64,
        max_references: int | None = None,
        min_foreground: int = 16,
        threshold: float = 0.5,
        metrics: Sequence[str] = PAPER_METRICS,
        mapping: str = "linear",
        level: float = 0.9,
        anchored: bool = True,
        interval_shifts: Sequence[str] = SHIFT_FAMILIES,
        interval_subsets: int = 4,
        seed: int = 0,
        working_size: int = 128,
        foreground_class: int | None = None,
        classes: Sequence[int] | Mapping[str, int] | None = None,
        spatial_dims: int | None = None,
        max_slices: int = 16,
        memory_budget_mb: float | None = None,
        image_key: str = "image",
        label_key: str = "label",
        logits_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
        activation: str = "auto",
        batch_size: int = 16,
        log_dir: str | None = None,
        verbose: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("every_n_epochs", every_n_epochs, 1),
            ("support_size", support_size, 1),
            ("min_foreground", min_foreground, 0),
            ("working_size", working_size, 16),
            ("batch_size", batch_size, 1),
            ("max_slices", max_slices, 1),
            ("interval_subsets", interval_subsets, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SPECallback: {name} must be an int >= {low}, got {value!r}.")
        if max_references is not None and (not isinstance(max_references, int) or max_references < 1):
            raise ValueError(f"SPECallback: max_references must be None or an int >= 1, got {max_references!r}.")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"SPECallback: threshold must be in (0, 1), got {threshold!r}.")
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"SPECallback: level must be in (0, 1), got {level!r}.")
        unknown = [f for f in interval_shifts if f not in SHIFT_FAMILIES]
        if isinstance(interval_shifts, str) or unknown:
            raise ValueError(
                f"SPECallback: interval_shifts must be a list of {SHIFT_FAMILIES}, got {interval_shifts!r}."
            )
        if mapping not in MAPPINGS:
            raise ValueError(f"SPECallback: mapping must be one of {MAPPINGS}, got {mapping!r}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"SPECallback: activation must be one of {_ACTIVATIONS}, got {activation!r}.")
        if isinstance(segmenter, str):
            if segmenter != "auto" and segmenter not in available_segmenters():
                raise ValueError(
                    f"SPECallback: unknown segmenter {segmenter!r}; use 'auto', one of {available_segmenters()} "
                    "or a ReverseSegmenter instance."
                )
        elif not isinstance(segmenter, ReverseSegmenter):
            raise TypeError(
                f"SPECallback: segmenter must be a name or a ReverseSegmenter, got {type(segmenter).__name__}."
            )
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"SPECallback: spatial_dims must be None, 2 or 3, got {spatial_dims!r}.")
        if memory_budget_mb is not None and not float(memory_budget_mb) > 0:
            raise ValueError(f"SPECallback: memory_budget_mb must be None or > 0, got {memory_budget_mb!r}.")
        self.class_names, self.class_indices = _parse_classes(classes)
        if self.class_indices and foreground_class is not None:
            raise ValueError("SPECallback: give foreground_class (binary) or classes (multi-class), not both.")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("SPECallback: logits_fn must be callable (pl_module, images) -> logits.")
        self.reference, self.calibration = reference, calibration
        self.target = target
        self.segmenter_arg = segmenter
        self.every_n_epochs, self.support_size = every_n_epochs, support_size
        self.max_references, self.min_foreground = max_references, min_foreground
        self.threshold, self.metrics = float(threshold), validate_metrics(metrics)
        self.mapping, self.level, self.seed = mapping, float(level), seed
        self.anchored, self.interval_shifts = bool(anchored), list(interval_shifts)
        self.interval_subsets = interval_subsets
        self.pairs: list[dict[str, Any]] = []
        self.working_size, self.foreground_class = working_size, foreground_class
        self.spatial_dims, self.max_slices = spatial_dims, max_slices
        self.memory_budget_mb = None if memory_budget_mb is None else float(memory_budget_mb)
        self.image_key, self.label_key = image_key, label_key
        self.logits_fn = logits_fn or default_logits
        self.activation, self.batch_size = activation, batch_size
        self.log_dir, self.verbose, self.strict = log_dir, verbose, strict

        self.records: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None
        self.segmenter: ReverseSegmenter | None = None
        self.engine: SPEEngine | None = None
        self._sets: dict[str, CachedSet] = {}
        self._targets: list[str] = []

    @property
    def keys(self) -> list[str]:
        """The record/estimate keys: the metrics, or for multi-class each mean then ``"<metric>/<class>"``."""
        return metric_keys(self.metrics, self.class_names or None)

    # ----------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        # the full spec, so that two SPE callbacks with differently configured segmenters can coexist
        seg = self.segmenter_arg if isinstance(self.segmenter_arg, str) else repr(self.segmenter_arg)
        return self._generate_state_key(
            segmenter=seg,
            metrics=self.metrics,
            support_size=self.support_size,
            seed=self.seed,
            every_n_epochs=self.every_n_epochs,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records, "config": self._config()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        mine = self._config()
        diff = sorted(k for k in mine if k in saved and saved[k] != mine[k] and k != "segmenter")
        if diff:
            message = f"SPECallback: resuming with different settings ({', '.join(diff)})"
            if self.strict:
                raise ValueError(message + "; the checkpoint's records were made with the others.")
            rank_zero_warn(message + "; earlier records kept.")
        self.records = list(state_dict.get("records", []))

    def _config(self) -> dict[str, Any]:
        return {
            "metrics": list(self.metrics),
            "support_size": self.support_size,
            "max_references": self.max_references,
            "min_foreground": self.min_foreground,
            "threshold": self.threshold,
            "mapping": self.mapping,
            "level": self.level,
            "anchored": self.anchored,
            "interval_shifts": list(self.interval_shifts),
            "interval_subsets": self.interval_subsets,
            "seed": self.seed,
            "working_size": self.working_size,
            "every_n_epochs": self.every_n_epochs,
            "foreground_class": self.foreground_class,
            "classes": dict(zip(self.class_names, self.class_indices)) if self.class_names else None,
            "max_slices": self.max_slices,
            "segmenter": self.segmenter.spec() if self.segmenter else str(self.segmenter_arg),
        }

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.engine is not None:
            return
        self.prepare(*self._resolve_datasets(trainer))

    def prepare(self, reference: Dataset, calibration: Dataset, target: Mapping[str, Dataset]) -> None:
        """Read the datasets and build the engine (``setup`` does this; every input problem is raised here)."""
        common = {
            "working_size": self.working_size,
            "image_key": self.image_key,
            "label_key": self.label_key,
            "foreground": self.foreground_class,
            "classes": self.class_indices or None,
            "spatial_dims": self.spatial_dims,
            "max_slices": self.max_slices,
        }
        ref_idx = None
        if self.max_references is not None and len(reference) > self.max_references:
            g = torch.Generator().manual_seed(self.seed)
            ref_idx = sorted(torch.randperm(len(reference), generator=g)[: self.max_references].tolist())
        ref = cache_dataset(
            "reference",
            reference,
            indices=ref_idx,
            require_masks=True,
            slices="foreground",
            keep_inputs=False,
            **common,
        )
        self._sets = {CALIBRATION: cache_dataset(CALIBRATION, calibration, require_masks=True, **common)}
        for name, ds in target.items():
            if name == CALIBRATION:
                raise ValueError(f"SPECallback: a target may not be called {CALIBRATION!r}; rename it.")
            self._sets[name] = cache_dataset(name, ds, **common)
        dims = {("3D" if d.volumetric or (d.inputs and d.inputs[0].ndim == 4) else "2D") for d in self._sets.values()}
        if len(dims) > 1:
            raise ValueError("SPECallback: calibration and targets mix 2D images and 3D volumes.")
        self._targets = list(target)
        segmenter = self._build_segmenter()
        engine = SPEEngine(
            segmenter,
            ref,
            self.metrics,
            self.support_size,
            self.min_foreground,
            self.threshold,
            self.seed,
            class_names=self.class_names or None,
            memory_budget_mb=self.memory_budget_mb,
        )
        empty = [engine._name(c) for c, q in engine.queries.items() if not q]
        if empty:
            what = f"class(es) {empty}" if self.class_names else "foreground"
            raise ValueError(
                f"SPECallback: no reference mask has {what}; the reverse step needs labelled structures "
                "(check foreground_class/classes)."
            )
        self.segmenter, self.engine = segmenter, engine
        rank_zero_info(
            f"SPE: {len(engine.ref_indices)} reference {'slices' if ref.volumetric else 'images'}, calibration "
            f"{len(self._sets[CALIBRATION])} items, targets "
            + ", ".join(f"{t} ({len(self._sets[t])})" for t in self._targets)
            + f"; reverse segmenter {segmenter.name}."
        )

    def _resolve_datasets(self, trainer: pl.Trainer) -> tuple[Dataset, Dataset, dict[str, Dataset]]:
        reference, calibration, target = self.reference, self.calibration, self.target
        if reference is None or calibration is None or target is None:
            dm = getattr(trainer, "datamodule", None)
            provided = dm.spe_datasets() if dm is not None and hasattr(dm, "spe_datasets") else {}
            reference = reference if reference is not None else provided.get("reference")
            calibration = calibration if calibration is not None else provided.get("calibration")
            target = target if target is not None else provided.get("target")
        missing = [
            n for n, v in (("reference", reference), ("calibration", calibration), ("target", target)) if v is None
        ]
        if missing:
            raise ValueError(
                f"SPECallback: no {', '.join(missing)} dataset. Pass them as SPECallback(reference=..., "
                "calibration=..., target=...) or use a datamodule with an spe_datasets() method."
            )
        if not isinstance(target, Mapping):
            target = {"target": target}
        if not target:
            raise ValueError("SPECallback: target is an empty dict; give at least one unlabelled dataset.")
        return reference, calibration, dict(target)

    def _build_segmenter(self) -> ReverseSegmenter:
        if isinstance(self.segmenter_arg, ReverseSegmenter):
            return self.segmenter_arg
        if self.segmenter_arg == "auto":
            seg, reason = resolve_auto()
            if seg.name != "universeg":
                rank_zero_warn(f"SPECallback(segmenter='auto'): {reason}")
            return seg
        return make_segmenter(self.segmenter_arg)

    # ----------------------------------------------------------------- hooks
    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or self.engine is None

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        if self._skip(trainer) or (epoch + 1) % self.every_n_epochs != 0:
            return False
        return not any(r["epoch"] == epoch for r in self.records)  # a resumed run never repeats an epoch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Evaluate here when validation runs, so that ModelCheckpoint (which saves in this hook
        # and always runs after other callbacks) stores this epoch's record for resuming.
        if trainer.state.fn == TrainerFn.FITTING and self._due(trainer):
            self._record(trainer, pl_module, final=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):  # epochs without validation
            self._record(trainer, pl_module, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        self.pairs = []  # measured anew at this fit's final weights (a reused callback must not keep old ones)
        if self.records and self.records[-1]["step"] == trainer.global_step:
            self.records[-1]["final"] = True
        else:
            # after the last epoch, current_epoch already points at the next one
            epoch = trainer.current_epoch
            if epoch > 0 and trainer.fit_loop.epoch_progress.current.completed >= epoch:
                epoch -= 1
            self._record(trainer, pl_module, final=True, epoch=epoch)
        if self.anchored and self.records and self.records[-1]["final"]:
            self._interval_pairs(trainer, pl_module)

    def _interval_pairs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Labelled calibration pairs (subsets, shifted copies) at the final weights: the anchored intervals."""
        shifts = [(f, v) for f in self.interval_shifts for v in (1, 3)]
        if not shifts and not self.interval_subsets:
            return
        start = time.perf_counter()
        try:
            sizes = sorted({len(self._sets[t]) for t in self._targets})
            sets = anchor_sets(self._sets[CALIBRATION], sizes, self.interval_subsets, shifts, self.seed)
            record = self.evaluate(pl_module, self._shard(trainer), sets)
            last = self.records[-1]
            for kind in ("pseudo", "real"):
                record[kind][CALIBRATION] = last[kind].get(CALIBRATION, {})
            self.pairs = pairs_from_record(record, CALIBRATION, list(sets))
        except Exception as err:
            if self.strict:
                raise
            rank_zero_warn(f"SPECallback: the calibration pairs for the intervals failed ({err!r}); G's are used.")
            return
        if self.verbose:
            self._say(
                trainer,
                f"SPE: {len(self.pairs)} calibration pairs for the intervals ({time.perf_counter() - start:.1f}s)",
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer) or not self.records:
            return
        self.report = self._build_report()
        if trainer.is_global_zero:
            try:
                self._publish(trainer)
            except Exception as err:  # never crash a finished training run over reporting
                if self.strict:
                    raise
                rank_zero_warn(f"SPECallback: writing the report failed: {err!r}")

    # ----------------------------------------------------------------- work
    def _record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool, epoch: int | None = None
    ) -> None:
        epoch = trainer.current_epoch if epoch is None else epoch
        start = time.perf_counter()
        try:
            record = self.evaluate(pl_module, self._shard(trainer))
        except Exception as err:
            if self.strict:
                raise
            rank_zero_warn(f"SPECallback: evaluation at epoch {epoch} skipped: {err!r}")
            return
        record.update(epoch=epoch, step=trainer.global_step, final=final)
        record["seconds"] = time.perf_counter() - start
        self.records.append(record)
        try:
            self._log_record(trainer, record)
        except Exception as err:  # logging must not stop training either
            if self.strict:
                raise
            rank_zero_warn(f"SPECallback: logging the evaluation at epoch {epoch} failed: {err!r}")

    def _shard(self, trainer: pl.Trainer | None) -> Shard:
        """This rank's share of the work; the records are gathered so every rank holds the same ones."""
        world = trainer.world_size if trainer is not None else 1
        if world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return Shard()

        def gather(obj: Any) -> list[Any]:
            out: list[Any] = [None] * world
            dist.all_gather_object(out, obj)
            return out

        return Shard(trainer.global_rank, world, gather)  # type: ignore[union-attr]

    @torch.no_grad()
    def evaluate(
        self, pl_module: nn.Module, shard: Shard | None = None, sets: Mapping[str, CachedSet] | None = None
    ) -> dict[str, Any]:
        """One record of ``pl_module``'s current weights (after :meth:`prepare`/``setup``).

        With a ``shard`` of several processes, each predicts its share of every set and segments its
        share of the references; all processes must call this together and get the same record.
        """
        if self.engine is None:
            raise RuntimeError("SPECallback.evaluate: call prepare() (or fit with the callback) first.")
        shard = shard or Shard()
        device = getattr(pl_module, "device", None) or next(pl_module.parameters()).device
        predictions = {}
        for name, data in (self._sets if sets is None else sets).items():
            n = len(data)
            run = functools.partial(
                predict_labels,
                pl_module,  # the module itself, never a DDP wrapper: no gradient sync hooks in SPE's forward
                data,
                device,
                self.batch_size,
                self.logits_fn,
                self.activation,
                self.threshold,
                self.foreground_class,
                self.class_indices or None,
                shard.part(n),
            )
            masks: list[Tensor] = [torch.zeros(0)] * n
            conf = torch.zeros(n)
            for r, (m, c) in enumerate(shard.run(run)):
                for k, pos in enumerate(range(r, n, shard.world)):
                    masks[pos] = m[k]
                conf[r :: shard.world] = c
            predictions[name] = (data, masks, conf)
        return self.engine.evaluate(predictions, device, shard)

    def _log_record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        flat: dict[str, float] = {}
        for name, values in record["pseudo"].items():
            flat.update({f"spe/pseudo/{name}/{m}": v for m, v in values.items() if v is not None})
        for m, v in record["real"].get(CALIBRATION, {}).items():
            if v is not None:
                flat[f"spe/real/calibration/{m}"] = v
        running = None
        if len(self.records) >= 3:
            running = fit_and_estimate(
                self.records, self._targets, self.keys, self.mapping, self.level, anchored=self.anchored
            )
            for t, per_metric in running["estimates"].items():
                flat.update(
                    {f"spe/estimate/{t}/{m}": e["value"] for m, e in per_metric.items() if e["value"] is not None}
                )
        flat = {k: float(v) for k, v in flat.items() if math.isfinite(v)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=record["step"])
        if self.verbose:
            parts = [f"SPE epoch {record['epoch']} ({record['seconds']:.1f}s):"]
            d = record["real"].get(CALIBRATION, {}).get("dice")
            if d is not None:
                parts.append(f"calibration dice {d:.3f}")
            for t in self._targets:
                p = record["pseudo"].get(t, {}).get("dice")
                est = running["estimates"][t]["dice"]["value"] if running and "dice" in self.metrics else None
                parts.append(f"{t} pseudo dice {p:.3f}" if p is not None else f"{t} pseudo dice n/a")
                if est is not None:
                    parts[-1] += f" -> est {est:.3f}"
            self._say(trainer, " ".join(parts))

    @staticmethod
    def _say(trainer: pl.Trainer, message: str) -> None:
        """Print on rank zero during training without breaking the progress bar (tqdm.write when there is one)."""
        bar = trainer.progress_bar_callback
        if trainer.is_global_zero and bar is not None and hasattr(bar, "print"):
            bar.print(message)
        else:
            rank_zero_info(message)

    def _build_report(self) -> dict[str, Any]:
        result = fit_and_estimate(
            self.records, self._targets, self.keys, self.mapping, self.level, self.anchored, self.pairs
        )
        return {
            "version": 1,
            "metrics": list(self.metrics),
            "keys": self.keys,
            "classes": self._config()["classes"],
            "segmenter": self.segmenter.spec() if self.segmenter else {"name": str(self.segmenter_arg)},
            "config": self._config(),
            "reference_indices": list(self.engine.ref_indices) if self.engine else [],
            **(
                {"reference_slices": self.engine.ref_slices} if self.engine and max(self.engine.ref_slices) >= 0 else {}
            ),
            **result,
            "records": self.records,
            "pairs": self.pairs,
        }

    def _volumetric(self) -> bool:
        return any(d.volumetric for d in self._sets.values())

    def report_dir(self, trainer: pl.Trainer) -> Path:
        """Where ``spe_report.*`` are written: ``log_dir`` or the trainer's log directory."""
        return Path(self.log_dir or trainer.log_dir or trainer.default_root_dir)

    def _publish(self, trainer: pl.Trainer) -> None:
        report = self.report
        assert report is not None
        step = self.records[-1]["step"]
        # the report files first: a failing logger must not cost them
        out = self.report_dir(trainer)
        write_json(report, out / "spe_report.json")
        write_csv(report, out / "spe_report.csv")
        try:  # the reusable estimator; its failure must not cost the report
            from spe_lightning.estimator import SPEEstimator

            module = trainer.lightning_module if self.spatial_dims != 3 and not self._volumetric() else None
            SPEEstimator.from_callback(self, module).save(out / "spe_estimator.pt")
        except Exception as err:
            if self.strict:
                raise
            rank_zero_warn(f"SPECallback: saving spe_estimator.pt failed: {err!r}")
        table = summary_table(report)
        fig = make_figure(report)
        import matplotlib.pyplot as plt

        try:
            fig.savefig(out / "spe_calibration.png", dpi=110)
            if self.verbose:
                # training is over and its progress bar closed: print through the logger
                rank_zero_info(f"{table}\nSPE report: {out / 'spe_report.json'}")
            self._log_report(trainer, report, table, fig, step)
        finally:
            plt.close(fig)

    def _log_report(self, trainer: pl.Trainer, report: dict[str, Any], table: str, fig: Any, step: int) -> None:
        flat = {}
        for t, per_metric in report["estimates"].items():
            for m, e in per_metric.items():
                for key, tag in (("value", "estimate"), ("lower", "estimate_lower"), ("upper", "estimate_upper")):
                    if e[key] is not None:
                        flat[f"spe/{tag}/{t}/{m}"] = float(e[key])
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=step)
            for i, r in enumerate(self.records):
                per_ckpt = {
                    f"spe/estimate_by_checkpoint/{t}/{m}": vals[i]
                    for t, per_metric in report["by_checkpoint"].items()
                    for m, vals in per_metric.items()
                    if vals[i] is not None
                }
                if per_ckpt:
                    logger.log_metrics(per_ckpt, step=r["step"])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("spe/calibration_fit", fig, global_step=step)
                logger.experiment.add_text("spe/summary", table, global_step=step)
                logger.experiment.flush()
            logger.save()
