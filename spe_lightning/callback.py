"""SPECallback: the Lightning adapter of an :class:`~spe_lightning.SPERun` (when to evaluate, logging, state)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset

from spe_lightning.config import SPEConfig
from spe_lightning.engine.cached_set import SizedDataset
from spe_lightning.engine.records import Record
from spe_lightning.engine.run_report import SPEReport
from spe_lightning.lightning import schedule
from spe_lightning.lightning.distributed import shard
from spe_lightning.lightning.publishing import Publisher, report_dir
from spe_lightning.lightning.resume import adopt_other_settings_state, reused_for_another_training
from spe_lightning.lightning.rng import users_rng_kept
from spe_lightning.lightning.settings import resolve_settings
from spe_lightning.monitoring.alerts import AlertEvent
from spe_lightning.run import SPERun

if TYPE_CHECKING:
    from spe_lightning.estimator import SPEEstimator

__all__ = ["SPECallback"]

#: the ``support_size`` default before None (each segmenter's own): checkpoints of that time are keyed by it
LEGACY_SUPPORT_SIZE = 64


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
    records; rank zero logs and writes) and publishes (:mod:`spe_lightning.lightning`).

    Args:
        config: the settings, an :class:`~spe_lightning.SPEConfig` or a dict of its fields (each documented there and in
            docs/settings.md); in a LightningCLI config ``init_args: {config: {every_n_epochs: 2}}``.
        reference: labelled dataset whose images are the reverse queries (the training set without augmentation).
        calibration: labelled dataset on which real metrics are measured to fit G (normally validation).
        target: unlabelled dataset, or a dict name -> dataset. Masks, if any, are only reported as the truth.
            Without the three, they come from the datamodule's ``spe_datasets()``. Datasets yield
            ``(image, mask)`` tuples or dicts (``image_key``/``label_key``).
        logits_fn: ``fn(pl_module, images) -> logits [B,C,H,W]``; default ``pl_module(images)`` (first
            element of a list output, ``"logits"``/``"pred"``/``"out"`` of a dict output).
        on_alert: ``fn(event)`` called on rank zero for every alert event (an
            :class:`~spe_lightning.monitoring.alerts.AlertEvent`: ``event.target``, ``.metric``, ``.value``,
            ``.threshold``, ``.direction``, ``.epoch``, ...); an exception it raises is warned about, never
            stops training.
        log_dir: folder of ``spe_report.*`` and ``spe_estimator.pt`` (default: see :meth:`report_dir`). Where
            this callback writes, not a setting of the run: the report and the estimator do not record it.
        **overrides: settings by name (``SPECallback(every_n_epochs=2, seed=0)``), applied over ``config``
            and validated by SPEConfig; unknown names raise ``TypeError`` naming them. ``segmenter`` may also
            be a ``ReverseSegmenter`` instance (Python only; the config then names ``"auto"``).

    Monitoring: at every validation end (and train epoch end) the running estimate of every target and
    key is in ``trainer.callback_metrics`` as ``spe/estimate/<target>/<key>`` (with
    ``spe/estimate_lower/...`` and ``spe/estimate_upper/...``), the same value on every rank, so
    ``ModelCheckpoint(monitor="spe/estimate/site_b/dice", mode="max")`` and ``EarlyStopping`` can use
    it. Before the first estimate (3 evaluations) the values are NaN: ModelCheckpoint ranks NaN last;
    EarlyStopping needs ``check_finite=False`` (see docs/monitoring.md).
    """

    def __init__(
        self,
        config: SPEConfig | None = None,
        *,
        reference: Dataset | None = None,
        calibration: Dataset | None = None,
        target: Dataset | Mapping[str, Dataset] | None = None,
        logits_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
        on_alert: Callable[[AlertEvent], Any] | None = None,
        log_dir: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        settings, segmenter = resolve_settings(config, overrides)
        self.reference, self.calibration, self.target = reference, calibration, target
        self.log_dir = log_dir
        self.run = SPERun(settings, segmenter=segmenter, logits_fn=logits_fn, warn=rank_zero_warn, say=rank_zero_info)
        self.publisher = Publisher(self.run, on_alert)
        self._segmenter_label = settings.segmenter if segmenter is None else repr(segmenter)
        self._epoch_start = 0.0

    # ----------------------------------------------------------------- views
    @property
    def config(self) -> SPEConfig:
        """The run's settings."""
        return self.run.config

    @property
    def records(self) -> list[Record]:
        """One record per evaluated checkpoint (frozen; see :class:`~spe_lightning.SPERun`)."""
        return self.run.records

    @property
    def report(self) -> SPEReport:
        """The final report after fit (estimates, G, baselines, records); a top-level ``reason`` says why
        there are no estimates (not fitted yet, skipped under ``fast_dev_run``, too few evaluations)."""
        if self.run.report is not None:
            return self.run.report
        return SPEReport({}, tuple(self.records), "SPE has not finished a fit yet")

    @property
    def estimator(self) -> SPEEstimator | None:
        """The fitted estimator after fit (None before, or when the run could not fit G)."""
        return self.run.estimator

    @property
    def on_alert(self) -> Callable[[AlertEvent], Any] | None:
        """The alert callable (called on rank zero for every alert event)."""
        return self.publisher.on_alert

    # ----------------------------------------------------------------- checkpoint state
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
        if not isinstance(states, dict) or self.state_key in states:
            return
        legacy = self._state_key_for(LEGACY_SUPPORT_SIZE)
        if self.config.support_size is None and legacy in states:
            states[self.state_key] = states[legacy]
            return
        self._adopt_other_settings_state(states)

    def _adopt_other_settings_state(self, states: dict[str, Any]) -> None:
        c = self.config

        def key_for(saved: Mapping[str, Any]) -> str:  # this callback's key with the saved seed and schedule
            seed, every = saved.get("seed", c.seed), saved.get("every_n_epochs", c.every_n_epochs)
            return self._generate_state_key(segmenter=self._segmenter_label, metrics=c.metrics,
                                            support_size=c.support_size, seed=seed, every_n_epochs=every)  # fmt: skip

        warning = adopt_other_settings_state(states, f"{type(self).__qualname__}{{", self.state_key, key_for, c)
        if warning:
            rank_zero_warn(warning)

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if schedule.fast_dev_run(trainer):
            rank_zero_warn("SPECallback: skipped under fast_dev_run (SPE needs real epochs); no report is made.")
            return
        with users_rng_kept():
            self._prepare(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publisher.start_fit()
        if self._active(trainer):  # the model is on its device now: can it take every set's items?
            with users_rng_kept():
                self.run.check_model(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Evaluate here when validation runs, so that ModelCheckpoint (which saves in this hook
        # and always runs after other callbacks) stores this epoch's record for resuming.
        if trainer.state.fn == TrainerFn.FITTING:
            with users_rng_kept():
                self._evaluate_if_due(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with users_rng_kept():
            self._evaluate_if_due(trainer, pl_module)  # epochs without validation

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer):
            with users_rng_kept():
                self.run.finish(pl_module, schedule.final_epoch(trainer), trainer.global_step, shard(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if schedule.fast_dev_run(trainer):
            self.run.skip_report("skipped under fast_dev_run (SPE needs real epochs)")
        elif self.run.prepared:
            with users_rng_kept():
                self._publish(trainer, pl_module)

    # ----------------------------------------------------------------- the steps the hooks call
    def _active(self, trainer: pl.Trainer) -> bool:
        """SPE works in this hook: not a sanity check nor fast_dev_run, and setup prepared the run."""
        return not schedule.skipped(trainer) and self.run.prepared

    def _prepare(self, trainer: pl.Trainer) -> None:
        """Before training: warn about a schedule too short for G, prepare the run on its datasets."""
        warning = schedule.schedule_warning(trainer.max_epochs, self.config.every_n_epochs, len(self.records))
        if warning:
            rank_zero_warn(warning)
        # the long steps' progress follows the Trainer's bar (off with enable_progress_bar=False), rank zero only
        self.run.show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        if not self.run.prepared:
            self.run.prepare(*self._resolve_datasets(trainer))
            rank_zero_info(self.run.describe())
        elif warning := reused_for_another_training(trainer, self.records):
            rank_zero_warn(warning)
            self.run.start_over()

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

    def _evaluate_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate a due epoch not recorded yet (a resumed run never repeats one), then publish the monitor."""
        if not self._active(trainer):
            return
        if schedule.is_due(trainer, self.config.every_n_epochs) and not self.run.is_recorded(trainer.current_epoch):
            self._evaluate(trainer, pl_module)
        self.publisher.monitor(trainer)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch_s = time.perf_counter() - self._epoch_start if self._epoch_start else None
        # epoch_s: the epoch's time up to SPE, for the console line's share (part of the record when it is made)
        record = self.run.record(
            pl_module, trainer.current_epoch, trainer.global_step, shard=shard(trainer), epoch_seconds=epoch_s
        )
        if record is not None:
            what = f"logging the evaluation at epoch {record.epoch} failed"
            self.run.guarded(what, lambda: self.publisher.log_record(trainer, record))

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After fit: the report on rank zero (files, console, loggers, final alerts) while the others wait."""
        report = self.run.build_report()
        if report.reason:
            rank_zero_warn(f"SPECallback: no estimates: {report.reason}.")
        out = self.report_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        try:
            if trainer.is_global_zero:
                self.publisher.publish(trainer, pl_module, self.report, out)
        finally:
            # the other ranks wait for rank zero's files: a process leaving while rank zero still
            # publishes can take the process group down under it (seen with ddp_spawn)
            trainer.strategy.barrier("spe_publish")

    def report_dir(self, trainer: pl.Trainer) -> Path:
        """Where ``spe_report.*`` and ``spe_estimator.pt`` are written.

        ``log_dir`` when given; else the first logger's own run folder when it has one (TensorBoard/CSV:
        ``<save_dir>/<name>/version_<n>``, beside its event files); else a ``spe_reports`` folder under the
        logger's ``save_dir`` or, without a logger, under ``trainer.default_root_dir`` (as Lightning puts
        ``checkpoints/`` there), so no file lands loose in the working directory (``WandbLogger``'s ``save_dir``
        is ``"."`` by default). Call it on every rank: ``trainer.log_dir`` broadcasts under DDP.
        """
        return report_dir(trainer, self.log_dir)
