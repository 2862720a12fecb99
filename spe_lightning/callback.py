"""SPECallback: the Lightning adapter of an :class:`~spe_lightning.SPERun` (when to evaluate, logging, state)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset

from spe_lightning.config import SPEConfig
from spe_lightning.engine.cached_set import SizedDataset
from spe_lightning.engine.metrics import PAPER_METRICS
from spe_lightning.engine.shifts import SHIFT_FAMILIES
from spe_lightning.engine.spe_engine import Shard
from spe_lightning.monitoring.alerts import alert_message, alert_scalars, monitor_scalars
from spe_lightning.reporting.report import (
    by_checkpoint_scalars,
    combined_line,
    evaluation_line,
    make_figure,
    record_scalars,
    report_scalars,
    summary_table,
)
from spe_lightning.reverse.base import ReverseSegmenter
from spe_lightning.run import SPERun

__all__ = ["SPECallback"]

#: the constructor arguments that are settings (the rest: datasets, callables, where to write)
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(SPEConfig))
#: the ``support_size`` default before None (each segmenter's own): checkpoints of that time are keyed by it
LEGACY_SUPPORT_SIZE = 64


def _shard(trainer: pl.Trainer) -> Shard:
    """This rank's share of SPE's work; results are gathered, so every rank holds the same records."""
    world = trainer.world_size
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return Shard()

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return Shard(trainer.global_rank, world, gather)


def _planned_evaluations(max_epochs: int | None, every_n_epochs: int) -> int | None:
    """Records a fit of ``max_epochs`` will make: one per due epoch, plus the final weights if the last is not due."""
    if max_epochs is None or max_epochs < 0:
        return None  # bounded by max_steps or time: unknown here
    return max_epochs // every_n_epochs + (1 if max_epochs % every_n_epochs else 0)


def _schedule_advice(max_epochs: int, every_n_epochs: int) -> str:
    """How to change the schedule so that G gets its 3 evaluations."""
    fits = [e for e in range(every_n_epochs, 0, -1) if (_planned_evaluations(max_epochs, e) or 0) >= 3]
    if fits:
        return f"set every_n_epochs <= {fits[0]}"
    return f"train for at least {3 * every_n_epochs} epochs (or 3 with every_n_epochs=1)"


def _final_epoch(trainer: pl.Trainer) -> int:
    """The epoch of the final weights (after the last epoch, ``current_epoch`` already points at the next)."""
    epoch = trainer.current_epoch
    if epoch > 0 and trainer.fit_loop.epoch_progress.current.completed >= epoch:
        epoch -= 1
    return epoch


class SPECallback(Callback):
    r"""Estimate a segmentation model's metrics on unlabelled data while it trains (SPE).

    Every ``every_n_epochs`` epochs the current weights predict the ``calibration`` and
    ``target`` sets; each set's images with their *predicted* masks become the support of a
    reverse segmenter that segments the labelled ``reference`` images, giving pseudo metrics.
    After fit, a mapping G fitted on the calibration records (pseudo -> real metric across
    checkpoints) turns each target's pseudo metrics into estimates with intervals, which go to
    every logger, ``spe_report.json``/``.csv`` and ``spe_estimator.pt`` in the log directory and the console.

    The work and its state belong to an :class:`~spe_lightning.SPERun` (``callback.run``); this
    callback decides when to evaluate, shards the work over DDP ranks (every rank holds the same
    records; rank zero logs and writes) and publishes. 3D items ``[C,D,H,W]`` are handled
    slice-wise; ``classes`` makes SPE per class.

    Datasets yield ``(image, mask)`` tuples or dicts (``image_key``/``label_key``). When
    ``reference``/``calibration``/``target`` are not given, they come from the datamodule's
    ``spe_datasets()`` (see :class:`~spe_lightning.data.FolderSegmentationDataModule`).

    Args:
        reference: labelled dataset whose images are the reverse queries (the training set without augmentation).
        calibration: labelled dataset on which real metrics are measured to fit G (normally validation).
        target: unlabelled dataset, or a dict name -> dataset. Masks, if any, are only reported as the truth.
        segmenter: ``"auto"`` (UniverSeg when its official weights are found locally, else
            ``learned_propagation``, fitted on the references at the first evaluation; never downloads
            unless ``SPE_DOWNLOAD=1``),
            a name from :func:`~spe_lightning.reverse.available_segmenters`, or a ``ReverseSegmenter``.
        every_n_epochs: evaluate every n training epochs.
        support_size: maximum support images per reverse step (None: the segmenter's own, the paper's 64
            for UniverSeg and label fusion, 512 for ``learned_propagation``, whose cost barely grows with it).
        max_references: use a fixed seeded subset of at most this many references (None: all); the reverse
            step's cost grows with it (benchmarks/spe_cost.py).
        min_foreground: support masks with fewer predicted foreground pixels (at ``working_size``) are dropped.
        threshold: binarisation threshold of the model's foreground probability and of the reverse output.
        metrics: metric names; default the paper's six.
        mapping: G: ``"linear"`` (paper), ``"huber"`` (robust) or ``"isotonic"`` (monotone).
        level: nominal coverage of the estimate intervals.
        anchored: estimate a target as the calibration score at the same checkpoint moved by
            ``G(pseudo_target) - G(pseudo_calibration)`` (default; the paper's ``G(pseudo_target)``
            stays in the report under ``paper``).
        interval_shifts: shift families (:data:`~spe_lightning.engine.shifts.SHIFT_FAMILIES`) applied
            to the calibration set at fit end, at ``interval_severities``, to size the anchored intervals
            (with ``interval_subsets``); ``[]`` and 0 subsets: intervals from G's residuals only.
        interval_subsets: random calibration subsets per target size for the intervals.
        interval_severities: severities (1-3) of each interval shift.
        seed: seed for the reference subset and support orders.
        working_size: side of the square images the reverse segmenter works on (None: the images'
            own size, at most 128).
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
        log_dir: folder of ``spe_report.*`` and ``spe_estimator.pt``. Default: the TensorBoard/CSV logger's
            run folder; otherwise ``spe_reports/`` under the logger's ``save_dir`` or, without a logger, under
            ``trainer.default_root_dir`` (see :meth:`report_dir`).
        verbose: print a line per evaluation and the summary table.
        strict: raise instead of warning and skipping when an evaluation fails.
        alert_below: ``{key: threshold}``: alert when a target's estimate falls below it (e.g. ``{"dice": 0.8}``).
        alert_above: ``{key: threshold}``: alert when it rises above it (e.g. ``{"hd95": 10.0}``).
        alert_on: ``"estimate"`` compares the estimate; ``"lower"`` the pessimistic end of its interval
            (lower bound for ``alert_below``, upper bound for ``alert_above``).
        on_alert: ``fn(event)`` called on rank zero for every alert event (a dict: target, metric, value,
            threshold, direction, epoch, ...); an exception it raises is warned about, never stops training.
        quality_regressor: at fit end, fit the per-case quality regressor on the references (about 1-2
            minutes on 2 CPU cores for 172 references of 128 px) and save it in ``spe_estimator.pt``: per-case
            estimated Dice then come from it instead of reverse classification accuracy (2D, binary).
        fit_cache: where a learned reverse segmenter's fitted weights are kept between runs, keyed by the
            references' content, its settings and the seed, so a re-run on the same data skips the fit:
            ``"auto"`` is ``$SPE_CACHE_DIR`` (empty: off) or ``~/.cache/spe_lightning``; a folder; None: off.

    Monitoring: at every validation end (and train epoch end) the running estimate of every target and
    key is in ``trainer.callback_metrics`` as ``spe/estimate/<target>/<key>`` (with
    ``spe/estimate_lower/...`` and ``spe/estimate_upper/...``), the same value on every rank, so
    ``ModelCheckpoint(monitor="spe/estimate/site_b/dice", mode="max")`` and ``EarlyStopping`` can use
    it. Before the first estimate (3 evaluations) the values are NaN: ModelCheckpoint ranks NaN last;
    EarlyStopping needs ``check_finite=False`` (see docs/monitoring.md).
    """

    def __init__(
        self,
        reference: Dataset | None = None,
        calibration: Dataset | None = None,
        target: Dataset | Mapping[str, Dataset] | None = None,
        segmenter: str | ReverseSegmenter = "auto",
        every_n_epochs: int = 1,
        support_size: int | None = None,
        max_references: int | None = 64,
        min_foreground: int = 16,
        threshold: float = 0.5,
        metrics: Sequence[str] = PAPER_METRICS,
        mapping: str = "linear",
        level: float = 0.9,
        anchored: bool = True,
        interval_shifts: Sequence[str] = SHIFT_FAMILIES,
        interval_subsets: int = 2,
        interval_severities: Sequence[int] = (2,),
        seed: int = 0,
        working_size: int | None = None,
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
        alert_below: Mapping[str, float] | None = None,
        alert_above: Mapping[str, float] | None = None,
        alert_on: str = "estimate",
        on_alert: Callable[[dict[str, Any]], Any] | None = None,
        quality_regressor: bool = False,
        fit_cache: str | None = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(segmenter, (str, ReverseSegmenter)):
            raise TypeError(
                f"SPECallback: segmenter must be a name or a ReverseSegmenter, got {type(segmenter).__name__}."
            )
        # every argument that is a setting goes to SPEConfig, which validates and normalises them
        settings = {k: v for k, v in locals().items() if k in _CONFIG_FIELDS}
        settings["segmenter"] = segmenter if isinstance(segmenter, str) else "auto"
        for name in ("alert_below", "alert_above"):
            if isinstance(settings[name], Mapping):
                settings[name] = dict(settings[name])
        config = SPEConfig(**settings)
        if on_alert is not None and not callable(on_alert):
            raise TypeError("SPECallback: on_alert must be a callable fn(event).")
        self.on_alert = on_alert
        self._running: tuple[int, dict[str, Any] | None] = (-1, None)
        self.reference, self.calibration, self.target = reference, calibration, target
        self.log_dir = log_dir
        self.run = SPERun(
            config,
            segmenter=segmenter if isinstance(segmenter, ReverseSegmenter) else None,
            logits_fn=logits_fn,
            warn=rank_zero_warn,
            say=rank_zero_info,
        )
        self._segmenter_label = segmenter if isinstance(segmenter, str) else repr(segmenter)
        self._fit_start = self._epoch_start = 0.0
        self._last_logged_step: int | None = None

    # ----------------------------------------------------------------- views
    @property
    def config(self) -> SPEConfig:
        """The run's settings."""
        return self.run.config

    @property
    def records(self) -> list[dict[str, Any]]:
        """One record per evaluated checkpoint (see :class:`~spe_lightning.SPERun`)."""
        return self.run.records

    @property
    def report(self) -> dict[str, Any]:
        """The final report after fit (estimates, G, baselines, records); a top-level ``reason`` says why
        there are no estimates (not fitted yet, skipped under ``fast_dev_run``, too few evaluations)."""
        if self.run.report is not None:
            return self.run.report
        return {"estimates": {}, "records": list(self.records), "reason": "SPE has not finished a fit yet"}

    @property
    def state_key(self) -> str:
        # the segmenter and main settings, so that differently configured SPE callbacks can coexist
        return self._state_key_for(self.config.support_size)

    def _state_key_for(self, support_size: int | None) -> str:
        c = self.config
        return self._generate_state_key(
            segmenter=self._segmenter_label,
            metrics=c.metrics,
            support_size=support_size,
            seed=c.seed,
            every_n_epochs=c.every_n_epochs,
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find the state a checkpoint saved before ``support_size`` defaulted to None (it was 64 then), so
        resuming keeps the earlier records and :meth:`load_state_dict` reports the changed setting."""
        states = checkpoint.get("callbacks")
        if isinstance(states, dict) and self.state_key not in states and self.config.support_size is None:
            legacy = self._state_key_for(LEGACY_SUPPORT_SIZE)
            if legacy in states:
                states[self.state_key] = states[legacy]

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning's debugging connector
            rank_zero_warn("SPECallback: skipped under fast_dev_run (SPE needs real epochs); no report is made.")
            return
        self._check_schedule(trainer)
        # the long steps' progress follows the Trainer's bar (off with enable_progress_bar=False), rank zero only
        self.run.show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        if not self.run.prepared:
            self.run.prepare(*self._resolve_datasets(trainer))
            rank_zero_info(self.run.describe())

    def _check_schedule(self, trainer: pl.Trainer) -> None:
        """Warn before training when the schedule cannot give G the 3 evaluations it needs."""
        every = self.config.every_n_epochs
        planned = _planned_evaluations(trainer.max_epochs, every)
        if planned is None or planned + len(self.records) >= 3:
            return
        assert trainer.max_epochs is not None  # planned is None without a finite max_epochs
        rank_zero_warn(
            f"SPECallback: every_n_epochs={every} with max_epochs={trainer.max_epochs} gives {planned} "
            f"evaluation(s), and G needs 3: every estimate would be null; "
            f"{_schedule_advice(trainer.max_epochs, every)}."
        )

    def _resolve_datasets(
        self, trainer: pl.Trainer
    ) -> tuple[SizedDataset, SizedDataset, SizedDataset | Mapping[str, SizedDataset]]:
        given = {"reference": self.reference, "calibration": self.calibration, "target": self.target}
        if any(v is None for v in given.values()):
            dm = getattr(trainer, "datamodule", None)
            provided = dm.spe_datasets() if dm is not None and hasattr(dm, "spe_datasets") else {}
            given = {k: v if v is not None else provided.get(k) for k, v in given.items()}
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"SPECallback: no {', '.join(missing)} dataset. Pass them as SPECallback(reference=..., "
                "calibration=..., target=...) or use a datamodule with an spe_datasets() method."
            )
        return given["reference"], given["calibration"], given["target"]  # type: ignore[return-value]

    # ----------------------------------------------------------------- hooks
    def _should_skip(self, trainer: pl.Trainer) -> bool:
        # no SPE in sanity checks and fast_dev_run, nor before setup prepared the run
        fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning's debugging connector
        return bool(fast_dev_run) or trainer.sanity_checking or not self.run.prepared

    def _is_due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        if self._should_skip(trainer) or (epoch + 1) % self.config.every_n_epochs != 0:
            return False
        return not self.run.is_recorded(epoch)  # a resumed run never repeats an epoch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Evaluate here when validation runs, so that ModelCheckpoint (which saves in this hook
        # and always runs after other callbacks) stores this epoch's record for resuming.
        if trainer.state.fn == TrainerFn.FITTING and self._is_due(trainer):
            self._evaluate(trainer, pl_module)
        if trainer.state.fn == TrainerFn.FITTING:
            self._publish_monitor(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_due(trainer):  # epochs without validation
            self._evaluate(trainer, pl_module)
        self._publish_monitor(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self.run.finish(pl_module, _final_epoch(trainer), trainer.global_step, _shard(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            self.run.report = {**self.report, "reason": "skipped under fast_dev_run (SPE needs real epochs)"}
            return
        if not self.run.prepared:
            return
        report = self.run.build_report()
        if report["reason"]:
            rank_zero_warn(f"SPECallback: no estimates: {report['reason']}.")
        out = self.report_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        try:
            if trainer.is_global_zero:
                self._publish(trainer, pl_module, out)
        finally:
            # the other ranks wait for rank zero's files: a process leaving while rank zero still
            # publishes can take the process group down under it (seen with ddp_spawn)
            trainer.strategy.barrier("spe_publish")

    # ----------------------------------------------------------------- work and publishing
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch_s = time.perf_counter() - self._epoch_start if self._epoch_start else None
        record = self.run.record(pl_module, trainer.current_epoch, trainer.global_step, shard=_shard(trainer))
        if record is not None:
            if epoch_s is not None:  # SPE's share of this epoch, for the console line
                record["epoch_seconds"] = epoch_s
            what = f"logging the evaluation at epoch {record['epoch']} failed"
            self.run.guarded(what, lambda: self._log_record(trainer, record))

    def _log_record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        running = self.run.running_estimate()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(record_scalars(record, running), step=record["step"])
        self._last_logged_step = record["step"]
        if self.config.verbose:
            self._say(trainer, evaluation_line(record, self.run.targets, running))
        self._alert(trainer, record, running)

    # ----------------------------------------------------------------- monitoring and alerts
    def _running_estimate(self) -> dict[str, Any] | None:
        """The running estimate of the records so far (computed once per number of records)."""
        n = len(self.records)
        if self._running[0] != n:
            self._running = (n, self.run.running_estimate())
        return self._running[1]

    def _publish_monitor(self, trainer: pl.Trainer) -> None:
        """Put the running estimates in ``trainer.callback_metrics`` on every rank (NaN before the first one)."""
        if self._should_skip(trainer):
            return
        running = self._running_estimate()
        scalars = monitor_scalars(running["estimates"] if running else None, self.run.targets, self.run.keys)
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()})

    def _alert(self, trainer: pl.Trainer, record: dict[str, Any], running: dict[str, Any] | None) -> None:
        """Alerts of this evaluation: kept by the run; on rank zero warned, logged as 0/1 and passed to ``on_alert``."""
        self._running = (len(self.records), running)
        c = self.config
        if running is None or not (c.alert_below or c.alert_above):
            return
        events = self.run.check_alerts(running["estimates"], record)
        if not trainer.is_global_zero:
            return
        flags = alert_scalars(events, self.run.targets, c.alert_below, c.alert_above)
        for logger in trainer.loggers:
            logger.log_metrics(flags, step=record["step"])
        for event in events:
            rank_zero_warn(alert_message(event))
            if self.on_alert is not None:
                self._guard_alert(event)

    def _final_alerts(self, trainer: pl.Trainer) -> None:
        """The final estimates' alerts (rank zero, after fit): warned, logged as 0/1 and passed to ``on_alert``."""
        c = self.config
        if not (c.alert_below or c.alert_above) or not self.records:
            return
        events = [a for a in self.run.alerts if a.get("stage") == "final"]
        flags = alert_scalars(events, self.run.targets, c.alert_below, c.alert_above)
        for logger in trainer.loggers:
            logger.log_metrics({k.replace("spe/alert/", "spe/alert_final/"): v for k, v in flags.items()},
                               step=self.records[-1]["step"])  # fmt: skip
        for event in events:
            rank_zero_warn(alert_message(event))
            if self.on_alert is not None:
                self._guard_alert(event)

    def _guard_alert(self, event: dict[str, Any]) -> None:
        """``on_alert(event)``; whatever it raises is warned about and never stops training."""
        try:
            self.on_alert(event)  # type: ignore[misc]
        except Exception as err:
            rank_zero_warn(f"SPECallback: on_alert raised {err!r}; training continues.")

    @staticmethod
    def _say(trainer: pl.Trainer, message: str) -> None:
        """Print on rank zero during training without breaking the progress bar (tqdm.write when there is one)."""
        bar = trainer.progress_bar_callback
        if trainer.is_global_zero and bar is not None and hasattr(bar, "print"):
            bar.print(message)
        else:
            rank_zero_info(message)

    def report_dir(self, trainer: pl.Trainer) -> Path:
        """Where ``spe_report.*`` and ``spe_estimator.pt`` are written.

        ``log_dir`` when given; else the first logger's own run folder when it has one (TensorBoard/CSV:
        ``<save_dir>/<name>/version_<n>``, beside its event files); else a ``spe_reports`` folder under the
        logger's ``save_dir`` or, without a logger, under ``trainer.default_root_dir`` (as Lightning puts
        ``checkpoints/`` there), so no file lands loose in the working directory (``WandbLogger``'s ``save_dir``
        is ``"."`` by default). Call it on every rank: ``trainer.log_dir`` broadcasts under DDP.
        """
        if self.log_dir:
            return Path(self.log_dir)
        base = trainer.log_dir  # collective under DDP: every rank calls it
        if trainer.loggers and isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)) and base:
            return Path(base)
        return Path(base or trainer.default_root_dir) / "spe_reports"

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Path) -> None:
        import matplotlib.pyplot as plt

        report = self.report
        assert report is not None
        fig = make_figure(report)
        try:
            # the report files first: a failing logger must not cost them
            self.run.guarded("writing the report failed", lambda: self.run.write_report(out, pl_module, fig))
            if self.config.verbose:
                # training is over and its progress bar closed: print through the logger
                combined = combined_line(report)
                table = summary_table(report) + (f"\n{combined}" if combined else "")
                rank_zero_info(f"{table}\n{self._cost_line()}\nSPE report: {out / 'spe_report.json'}")
            self.run.guarded("logging the report failed", lambda: self._log_report(trainer, report, fig))
            self.run.guarded("announcing the final alerts failed", lambda: self._final_alerts(trainer))
        finally:
            plt.close(fig)

    def _cost_line(self) -> str:
        """SPE's total time next to the fit's, split into its parts."""
        total = time.perf_counter() - self._fit_start if self._fit_start else 0.0
        run = self.run
        spe = run.seconds
        share = f" of the fit's {total:.0f} s (training {total - spe:.0f} s)" if total > spe > 0 else ""
        parts = [f"{len(self.records)} evaluation(s) {sum(r.get('seconds', 0.0) for r in self.records):.1f} s"]
        seg = run.segmenter
        if seg is not None and run.segmenter_fit_seconds:
            parts.append(f"{seg.name} fit {run.segmenter_fit_seconds:.1f} s")
        elif seg is not None and run.segmenter_from_cache:
            parts.append(f"{seg.name} from the fit cache")
        parts.append(f"calibration pairs {run.pairs_seconds:.1f} s")
        if run.quality_seconds:
            parts.append(f"quality regressor {run.quality_seconds:.1f} s")
        return f"SPE took {spe:.1f} s{share}: {', '.join(parts)}."

    def _log_report(self, trainer: pl.Trainer, report: dict[str, Any], fig: Any) -> None:
        if not self.records:
            return
        last = self.records[-1]
        step = last["step"]
        final = report_scalars(report)
        if step == self._last_logged_step:
            # the last evaluation already logged this step's running estimate: one point per tag and step (the
            # report's value, which the calibration pairs may have moved, is under spe/final_estimate)
            final = {k: v for k, v in final.items() if not k.startswith("spe/estimate/")}
        else:  # the final weights were evaluated at fit end: their pseudo/real values were not logged yet
            final.update(record_scalars(last))
        for logger in trainer.loggers:
            logger.log_metrics(final, step=step)
            for i, r in enumerate(self.records):
                per_ckpt = by_checkpoint_scalars(report, i)
                if per_ckpt:
                    logger.log_metrics(per_ckpt, step=r["step"])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("spe/calibration_fit", fig, global_step=step, close=False)
                logger.experiment.add_text("spe/summary", summary_table(report), global_step=step)
                logger.experiment.flush()
            elif isinstance(logger, MLFlowLogger):  # the figure and summary as run artifacts
                logger.experiment.log_figure(logger.run_id, fig, "spe/calibration_fit.png")
                logger.experiment.log_text(logger.run_id, summary_table(report), "spe/summary.md")
            logger.save()
