"""SPECallback: the Lightning glue around the SPE engine (hooks, logging, state). Kept thin."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset

from spe_lightning.engine.estimation import CALIBRATION, fit_and_estimate
from spe_lightning.engine.mapping import MAPPINGS
from spe_lightning.engine.metrics import PAPER_METRICS, validate_metrics
from spe_lightning.engine.predict import CachedSet, cache_dataset, default_logits, predict_set
from spe_lightning.engine.report import make_figure, summary_table, write_csv, write_json
from spe_lightning.engine.spe import SPEEngine
from spe_lightning.reverse.base import ReverseSegmenter, available_segmenters, make_segmenter, resolve_auto

__all__ = ["SPECallback"]

_ACTIVATIONS = ("auto", "sigmoid", "softmax", "none")


class SPECallback(Callback):
    r"""Estimate a segmentation model's metrics on unlabelled data while it trains (SPE).

    Every ``every_n_epochs`` epochs the current weights predict the ``calibration`` and
    ``target`` sets; each set's images with their *predicted* masks become the support of a
    reverse segmenter that segments the labelled ``reference`` images, giving pseudo metrics.
    After fit, a mapping G fitted on the calibration records (pseudo -> real metric across
    checkpoints) turns each target's pseudo metrics into estimates with intervals, which go to
    every logger, ``spe_report.json``/``.csv`` in the log directory and the console.

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
        seed: seed for the reference subset and support orders.
        working_size: side of the square images the reverse segmenter works on.
        foreground_class: class index of the masks that is foreground (None: any non-zero).
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
        seed: int = 0,
        working_size: int = 128,
        foreground_class: int | None = None,
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
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SPECallback: {name} must be an int >= {low}, got {value!r}.")
        if max_references is not None and (not isinstance(max_references, int) or max_references < 1):
            raise ValueError(f"SPECallback: max_references must be None or an int >= 1, got {max_references!r}.")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"SPECallback: threshold must be in (0, 1), got {threshold!r}.")
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"SPECallback: level must be in (0, 1), got {level!r}.")
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
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("SPECallback: logits_fn must be callable (pl_module, images) -> logits.")
        self.reference, self.calibration = reference, calibration
        self.target = target
        self.segmenter_arg = segmenter
        self.every_n_epochs, self.support_size = every_n_epochs, support_size
        self.max_references, self.min_foreground = max_references, min_foreground
        self.threshold, self.metrics = float(threshold), validate_metrics(metrics)
        self.mapping, self.level, self.seed = mapping, float(level), seed
        self.working_size, self.foreground_class = working_size, foreground_class
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
            rank_zero_warn(f"SPECallback: resuming with different settings ({', '.join(diff)}); earlier records kept.")
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
            "seed": self.seed,
            "working_size": self.working_size,
            "every_n_epochs": self.every_n_epochs,
            "segmenter": self.segmenter.spec() if self.segmenter else str(self.segmenter_arg),
        }

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.engine is not None:
            return
        reference, calibration, target = self._resolve_datasets(trainer)
        if self.max_references is not None and len(reference) > self.max_references:
            g = torch.Generator().manual_seed(self.seed)
            ref_idx = sorted(torch.randperm(len(reference), generator=g)[: self.max_references].tolist())
        else:
            ref_idx = None
        common = {
            "working_size": self.working_size,
            "image_key": self.image_key,
            "label_key": self.label_key,
            "foreground": self.foreground_class,
        }
        ref = cache_dataset("reference", reference, indices=ref_idx, require_masks=True, **common)
        keep = [i for i, m in enumerate(ref.masks) if bool(m.any())]
        if not keep:
            raise ValueError(
                "SPECallback: no reference mask has foreground; the reverse step needs labelled structures."
            )
        if len(keep) < len(ref):
            ref = CachedSet(
                "reference",
                [ref.inputs[i] for i in keep],
                [ref.masks[i] for i in keep],
                ref.gray[keep],
                [ref.indices[i] for i in keep],
            )
        self._sets = {CALIBRATION: cache_dataset(CALIBRATION, calibration, require_masks=True, **common)}
        for name, ds in target.items():
            if name == CALIBRATION:
                raise ValueError(f"SPECallback: a target may not be called {CALIBRATION!r}; rename it.")
            self._sets[name] = cache_dataset(name, ds, **common)
        self._targets = list(target)
        self.segmenter = self._build_segmenter()
        self.engine = SPEEngine(
            self.segmenter, ref, self.metrics, self.support_size, self.min_foreground, self.threshold, self.seed
        )
        rank_zero_info(
            f"SPE: {len(ref)} references, calibration {len(self._sets[CALIBRATION])} images, targets "
            + ", ".join(f"{t} ({len(self._sets[t])})" for t in self._targets)
            + f"; reverse segmenter {self.segmenter.name}."
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
        if self.records and self.records[-1]["step"] == trainer.global_step:
            self.records[-1]["final"] = True
            return
        # after the last epoch, current_epoch already points at the next one
        epoch = trainer.current_epoch
        if epoch > 0 and trainer.fit_loop.epoch_progress.current.completed >= epoch:
            epoch -= 1
        self._record(trainer, pl_module, final=True, epoch=epoch)

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
            record = self._evaluate(pl_module)
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

    @torch.no_grad()
    def _evaluate(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        assert self.engine is not None
        device = pl_module.device
        predictions = {}
        for name, data in self._sets.items():
            _, masks, conf = predict_set(
                pl_module, data, device, self.batch_size, self.logits_fn, self.activation, self.threshold
            )
            predictions[name] = (data, masks, conf)
        return self.engine.evaluate(predictions, device)

    def _log_record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        flat: dict[str, float] = {}
        for name, values in record["pseudo"].items():
            flat.update({f"spe/pseudo/{name}/{m}": v for m, v in values.items() if v is not None})
        for m, v in record["real"].get(CALIBRATION, {}).items():
            if v is not None:
                flat[f"spe/real/calibration/{m}"] = v
        running = None
        if len(self.records) >= 3:
            running = fit_and_estimate(self.records, self._targets, self.metrics, self.mapping, self.level)
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
        result = fit_and_estimate(self.records, self._targets, self.metrics, self.mapping, self.level)
        return {
            "version": 1,
            "metrics": list(self.metrics),
            "segmenter": self.segmenter.spec() if self.segmenter else {"name": str(self.segmenter_arg)},
            "config": self._config(),
            "reference_indices": list(self.engine.ref_indices) if self.engine else [],
            **result,
            "records": self.records,
        }

    def report_dir(self, trainer: pl.Trainer) -> Path:
        """Where ``spe_report.*`` are written: ``log_dir`` or the trainer's log directory."""
        return Path(self.log_dir or trainer.log_dir or trainer.default_root_dir)

    def _publish(self, trainer: pl.Trainer) -> None:
        report = self.report
        assert report is not None
        step = self.records[-1]["step"]
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
        table = summary_table(report)
        fig = make_figure(report)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("spe/calibration_fit", fig, global_step=step)
                logger.experiment.add_text("spe/summary", table, global_step=step)
                logger.experiment.flush()
            logger.save()
        out = self.report_dir(trainer)
        write_json(report, out / "spe_report.json")
        write_csv(report, out / "spe_report.csv")
        fig.savefig(out / "spe_calibration.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        if self.verbose:
            # training is over and its progress bar closed: print through the logger
            rank_zero_info(f"{table}\nSPE report: {out / 'spe_report.json'}")
