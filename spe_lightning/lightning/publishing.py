"""Publishing an SPE run to a Trainer: scalars to the loggers, console lines, monitored values, alerts,
the report files, the figure and the cost line. Rank zero logs and writes; every rank publishes the monitor."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from spe_lightning.engine.records import Record
from spe_lightning.engine.run_report import SPEReport
from spe_lightning.monitoring.alerts import AlertEvent, alert_message, alert_scalars, monitor_scalars
from spe_lightning.reporting.report import (
    by_checkpoint_scalars,
    combined_line,
    evaluation_line,
    make_figure,
    record_scalars,
    report_scalars,
    summary_table,
)
from spe_lightning.run import SPERun

__all__ = ["Publisher", "report_dir", "say"]


def say(trainer: pl.Trainer, message: str) -> None:
    """Print on rank zero during training without breaking the progress bar (tqdm.write when there is one)."""
    bar = trainer.progress_bar_callback
    if trainer.is_global_zero and bar is not None and hasattr(bar, "print"):
        bar.print(message)
    else:
        rank_zero_info(message)


def report_dir(trainer: pl.Trainer, log_dir: str | None = None) -> Path:
    """Where ``spe_report.*`` and ``spe_estimator.pt`` are written (see :meth:`SPECallback.report_dir`).

    Call it on every rank: ``trainer.log_dir`` broadcasts under DDP.
    """
    if log_dir:
        return Path(log_dir)
    base = trainer.log_dir  # collective under DDP: every rank calls it
    if trainer.loggers and isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)) and base:
        return Path(base)
    return Path(base or trainer.default_root_dir) / "spe_reports"


class Publisher:
    """Publishes one :class:`~spe_lightning.SPERun` to the Trainer it runs in (one per callback).

    It owns what publishing needs to remember: the running estimate of the records so far, the last logged
    step (one point per tag and step) and when the fit started (the cost line).
    """

    def __init__(self, run: SPERun, on_alert: Callable[[AlertEvent], Any] | None = None) -> None:
        if on_alert is not None and not callable(on_alert):
            raise TypeError("SPECallback: on_alert must be a callable fn(event).")
        self.run = run
        self.on_alert = on_alert
        self.fit_start = 0.0
        self.last_logged_step: int | None = None
        self._running: tuple[int, dict[str, Any] | None] = (-1, None)

    def start_fit(self) -> None:
        """Note when the fit started (the cost line compares SPE's time with the fit's)."""
        self.fit_start = time.perf_counter()

    # ----------------------------------------------------------------- during training
    def running_estimate(self) -> dict[str, Any] | None:
        """The running estimate of the records so far (computed once per number of records)."""
        n = len(self.run.records)
        if self._running[0] != n:
            self._running = (n, self.run.running_estimate())
        return self._running[1]

    def monitor(self, trainer: pl.Trainer) -> None:
        """Put the running estimates in ``trainer.callback_metrics`` on every rank (NaN before the first one)."""
        running = self.running_estimate()
        scalars = monitor_scalars(running["estimates"] if running else None, self.run.targets, self.run.keys)
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()})

    def log_record(self, trainer: pl.Trainer, record: Record) -> None:
        """One evaluation: its scalars to the loggers, its console line, its alerts."""
        running = self.run.running_estimate()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(record_scalars(record, running), step=record.step)
        self.last_logged_step = record.step
        if self.run.config.verbose:
            say(trainer, evaluation_line(record, self.run.targets, running))
        self._alert(trainer, record, running)

    def _alert(self, trainer: pl.Trainer, record: Record, running: dict[str, Any] | None) -> None:
        """Alerts of this evaluation: kept by the run; on rank zero warned, logged as 0/1 and passed to ``on_alert``."""
        self._running = (len(self.run.records), running)
        c = self.run.config
        if running is None or not (c.alert_below or c.alert_above):
            return
        events = self.run.check_alerts(running["estimates"], record)
        if not trainer.is_global_zero:
            return
        flags = alert_scalars(events, self.run.targets, c.alert_below, c.alert_above)
        for logger in trainer.loggers:
            logger.log_metrics(flags, step=record.step)
        self._announce(events)

    def _announce(self, events: list[AlertEvent]) -> None:
        """Warn each alert and pass it to ``on_alert``; whatever that raises is warned about, never stops training."""
        for event in events:
            rank_zero_warn(alert_message(event))
            if self.on_alert is None:
                continue
            try:
                self.on_alert(event)
            except Exception as err:
                rank_zero_warn(f"SPECallback: on_alert raised {err!r}; training continues.")

    # ----------------------------------------------------------------- after fit (rank zero)
    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: SPEReport, out: Path) -> None:
        """The report files first (a failing logger must not cost them), then the console table, the loggers'
        scalars, figure and summary, and the final alerts; each step's failure is the run's to guard."""
        import matplotlib.pyplot as plt

        fig = make_figure(report)
        try:
            self.run.guarded("writing the report failed", lambda: self.run.write_report(out, pl_module, fig))
            # finishing (inside write_report) adds its sections (quality, combined) to a new report: the run's
            final = self.run.report if self.run.report is not None else report
            if self.run.config.verbose:
                # training is over and its progress bar closed: print through the logger
                combined = combined_line(final)
                table = summary_table(final) + (f"\n{combined}" if combined else "")
                rank_zero_info(f"{table}\n{self.cost_line()}\nSPE report: {out / 'spe_report.json'}")
            self.run.guarded("logging the report failed", lambda: self._log_report(trainer, final, fig))
            self.run.guarded("announcing the final alerts failed", lambda: self._final_alerts(trainer))
        finally:
            plt.close(fig)

    def cost_line(self) -> str:
        """SPE's total time next to the fit's, split into its parts."""
        total = time.perf_counter() - self.fit_start if self.fit_start else 0.0
        run = self.run
        spe = run.seconds
        share = f" of the fit's {total:.0f} s (training {total - spe:.0f} s)" if total > spe > 0 else ""
        parts = [f"{len(run.records)} evaluation(s) {sum(r.seconds for r in run.records):.1f} s"]
        seg = run.segmenter
        if seg is not None and run.segmenter_fit_seconds:
            parts.append(f"{seg.name} fit {run.segmenter_fit_seconds:.1f} s")
        elif seg is not None and run.segmenter_from_cache:
            parts.append(f"{seg.name} from the fit cache")
        parts.append(f"calibration pairs {run.pairs_seconds:.1f} s")
        # the signals beside SPE's own (styled pairs, checkpoint agreement, size probes), each where it took time
        parts += [f"{name.replace('_', ' ')} {secs:.1f} s" for name, secs in run.signal_seconds.items() if secs >= 0.05]
        if run.quality_seconds:
            parts.append(f"quality regressor {run.quality_seconds:.1f} s")
        return f"SPE took {spe:.1f} s{share}: {', '.join(parts)}."

    def _final_alerts(self, trainer: pl.Trainer) -> None:
        """The final estimates' alerts (rank zero, after fit): warned, logged as 0/1 and passed to ``on_alert``."""
        c, records = self.run.config, self.run.records
        if not (c.alert_below or c.alert_above) or not records:
            return
        events = [a for a in self.run.alerts if a.stage == "final"]
        flags = alert_scalars(events, self.run.targets, c.alert_below, c.alert_above)
        for logger in trainer.loggers:
            logger.log_metrics({k.replace("spe/alert/", "spe/alert_final/"): v for k, v in flags.items()},
                               step=records[-1].step)  # fmt: skip
        self._announce(events)

    def _log_report(self, trainer: pl.Trainer, report: SPEReport, fig: Any) -> None:
        records = self.run.records
        if not records:
            return
        last = records[-1]
        step = last.step
        final = report_scalars(report)
        if step == self.last_logged_step:
            # the last evaluation already logged this step's running estimate: one point per tag and step (the
            # report's value, which the calibration pairs may have moved, is under spe/final_estimate)
            final = {k: v for k, v in final.items() if not k.startswith("spe/estimate/")}
        else:  # the final weights were evaluated at fit end: their pseudo/real values were not logged yet
            final.update(record_scalars(last))
        for logger in trainer.loggers:
            logger.log_metrics(final, step=step)
            for i, r in enumerate(records):
                per_ckpt = by_checkpoint_scalars(report, i)
                if per_ckpt:
                    logger.log_metrics(per_ckpt, step=r.step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("spe/calibration_fit", fig, global_step=step, close=False)
                logger.experiment.add_text("spe/summary", summary_table(report), global_step=step)
                logger.experiment.flush()
            elif isinstance(logger, MLFlowLogger):  # the figure and summary as run artifacts
                logger.experiment.log_figure(logger.run_id, fig, "spe/calibration_fit.png")
                logger.experiment.log_text(logger.run_id, summary_table(report), "spe/summary.md")
            logger.save()
