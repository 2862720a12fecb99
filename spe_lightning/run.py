"""SPERun: the one owner of an SPE run's state and work, in plain PyTorch (no Trainer needed).

It reads the datasets and builds the reverse segmenter and engine (:meth:`SPERun.prepare`),
evaluates a model at a checkpoint (:meth:`SPERun.record`, sharded over processes or not),
measures the labelled calibration pairs at the final weights (:meth:`SPERun.finish`), fits G and
builds the report (:meth:`SPERun.build_report`), and hands its outcome over to the fitted estimator
(:meth:`SPERun.finish_fit`; :mod:`spe_lightning.estimator`, which never imports the run).
:class:`~spe_lightning.SPECallback` decides *when* and publishes; a user with their own training loop
can call the same methods::

    run = SPERun(SPEConfig(segmenter="label_fusion"))
    run.prepare(reference=train_set, calibration=val_set, target={"site_b": unlabelled})
    for epoch in range(epochs):
        train_one_epoch(model)
        run.record(model, epoch=epoch, step=epoch)
    run.finish(model)                # the final record and the calibration pairs
    report = run.finish_fit(model)   # the report and the fitted estimator, once (run.estimator)
    run.write_report("out/")         # only serialises: spe_report.json/.csv, the figure, spe_estimator.pt

Failures at a checkpoint are passed to ``warn`` and that evaluation is skipped (``strict``: raised).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning.config import MAX_AUTO_WORKING_SIZE, SPEConfig
from spe_lightning.data.adapters import require_map_dataset, require_targets
from spe_lightning.engine.agreement import AGREEMENT_K, MaskHistory
from spe_lightning.engine.cached_set import CachedSet, SizedDataset, cache_dataset, split_named
from spe_lightning.engine.distance import diagonal
from spe_lightning.engine.predict import LogitsFn, default_logits
from spe_lightning.engine.records import CALIBRATION, Record, fit_and_estimate
from spe_lightning.engine.run_report import SPEReport
from spe_lightning.engine.signals import signal_baselines
from spe_lightning.engine.spe_engine import Shard, SPEEngine
from spe_lightning.estimator import RunOutcome, SPEEstimator, fit_estimator
from spe_lightning.monitoring.alerts import AlertEvent, alerts_for
from spe_lightning.reporting.report import make_figure, write_csv, write_json
from spe_lightning.reverse.base import ReverseSegmenter
from spe_lightning.run_steps import RunSteps

__all__ = ["SPERun", "REPORT_VERSION"]

#: the ``version`` of ``spe_report.json``
REPORT_VERSION = 1


def auto_working_size(dataset: SizedDataset, config: SPEConfig) -> int:
    """``working_size=None``: the side of the dataset's first image (its larger in-plane side), at most
    :data:`~spe_lightning.config.MAX_AUTO_WORKING_SIZE` and at least 16, so SPE never works above the images' size."""
    if len(dataset) == 0:
        return MAX_AUTO_WORKING_SIZE
    image, _ = split_named(dataset[0], config.image_key, config.label_key, "calibration item 0")
    side = max(int(image.shape[-1]), int(image.shape[-2])) if image.ndim >= 2 else MAX_AUTO_WORKING_SIZE
    return max(16, min(MAX_AUTO_WORKING_SIZE, side))


class SPERun(RunSteps):
    """State and work of one SPE run: cached sets, segmenter, engine, records, calibration pairs, report.

    Args:
        config: the settings (default: :class:`SPEConfig` defaults).
        segmenter: a reverse segmenter instance; overrides ``config.segmenter``.
        logits_fn: ``fn(model, images) -> logits``; default ``model(images)`` (dict/list outputs handled).
        warn: called with a message when an evaluation is skipped or a step fails (default ``warnings.warn``).
        say: called with progress lines when ``config.verbose`` (default ``print``).
    """

    def __init__(
        self,
        config: SPEConfig | None = None,
        segmenter: ReverseSegmenter | None = None,
        logits_fn: LogitsFn | None = None,
        warn: Callable[[str], Any] | None = None,
        say: Callable[[str], Any] | None = None,
    ) -> None:
        if segmenter is not None and not isinstance(segmenter, ReverseSegmenter):
            raise TypeError(f"SPE: segmenter must be a ReverseSegmenter, got {type(segmenter).__name__}.")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("SPE: logits_fn must be callable (module, images) -> logits.")
        self.config = config or SPEConfig()
        self.logits_fn: LogitsFn = logits_fn or default_logits
        self.warn: Callable[[str], Any] = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.say: Callable[[str], Any] = say or print
        self._segmenter_arg = segmenter
        self.segmenter: ReverseSegmenter | None = None
        self.engine: SPEEngine | None = None
        self._sets: dict[str, CachedSet] = {}
        self._targets: list[str] = []
        #: the evaluations so far, oldest first (frozen :class:`~spe_lightning.engine.records.Record`)
        self.records: list[Record] = []
        self.pairs: list[dict[str, Any]] = []
        self.pseudo_by_size: dict[str, Any] | None = None  #: the size probes at the final weights (set_size.py)
        self.pairs_seconds = 0.0
        self.quality_seconds = 0.0
        self.segmenter_fit_seconds = 0.0
        self.segmenter_from_cache = False  # True when the learned segmenter's weights came from the fit cache
        self._segmenter_state: dict[str, Any] | None = None  # fitted weights from a checkpoint, until used
        self._reference_dataset: SizedDataset | None = None
        #: the run's report (:meth:`build_report`, frozen :class:`~spe_lightning.engine.run_report.SPEReport`)
        self.report: SPEReport | None = None
        #: the fitted estimator of the finished run (:meth:`finish_fit`); None before
        self.estimator: SPEEstimator | None = None
        #: alert events (:func:`~spe_lightning.monitoring.alerts.alerts_for`) of the running and final estimates
        self.alerts: list[AlertEvent] = []
        #: progress bars of the long steps (learned fit, calibration pairs, quality regressor) when
        #: ``config.verbose``; SPECallback sets it to the Trainer's ``enable_progress_bar`` (rank zero only)
        self.show_progress = True
        #: the calibration set's label-free features at the last evaluated weights (engine/distance.py)
        self.calibration_features: np.ndarray | None = None
        #: every other set's label-free features at its last evaluation (targets, calibration pairs), by set name
        self.set_features: dict[str, np.ndarray] = {}
        #: the last checkpoints' masks per set, for the checkpoint agreement (kept in the checkpoint state)
        self.history = MaskHistory(AGREEMENT_K)
        self._pending_masks: dict[str, list[Tensor]] = {}
        #: the style applied to each target's styled calibration set (engine/styled_pairs.py)
        self.styles: dict[str, Any] = {}
        self.signal_seconds: dict[str, float] = {"styled_pairs": 0.0, "agreement": 0.0}  #: the signals' own seconds
        #: ``fn(model, epoch) -> {set name: {"pseudo": ..., "real": ..., "confidence": ...}}``, called by
        #: :meth:`record` at the same weights; their sets join the record (named in its ``"selection"``) before it
        #: is made, so nothing edits a kept record. A failing hook warns and is skipped (``strict``: raised).
        self.record_hooks: list[Callable[[nn.Module, int], Mapping[str, Mapping[str, Any]]]] = []

    # ------------------------------------------------------------------ views
    @property
    def prepared(self) -> bool:
        """True once :meth:`prepare` has read the datasets."""
        return self.engine is not None

    @property
    def targets(self) -> list[str]:
        """The target names, in order."""
        return list(self._targets)

    @property
    def sets(self) -> Mapping[str, CachedSet]:
        """The cached calibration and target sets by name (read-only)."""
        return MappingProxyType(self._sets)

    @property
    def keys(self) -> list[str]:
        """Record/estimate keys (the metrics, or per class ``"<metric>/<class>"`` too)."""
        return self.config.keys

    @property
    def volumetric(self) -> bool:
        """True when the sets hold 3D volumes (handled slice-wise)."""
        return self.config.spatial_dims == 3 or any(d.volumetric for d in self._sets.values())

    # ------------------------------------------------------------------ preparation
    def prepare(
        self, reference: SizedDataset, calibration: SizedDataset, target: SizedDataset | Mapping[str, SizedDataset]
    ) -> None:
        """Read the datasets and build the segmenter and engine; every input problem is raised here."""
        for name, data in (("reference", reference), (CALIBRATION, calibration)):
            require_map_dataset(name, data)
        require_targets(target)
        if self.config.working_size is None:
            self.config = self.config.replace(working_size=auto_working_size(calibration, self.config))
        c = self.config
        target = dict(target) if isinstance(target, Mapping) else {"target": target}
        if not target:
            raise ValueError("SPE: target is an empty dict; give at least one unlabelled dataset.")
        if CALIBRATION in target:
            raise ValueError(f"SPE: a target may not be called {CALIBRATION!r}; rename it.")
        common = self.config.cache_kwargs()
        ref_idx = None
        if c.max_references is not None and len(reference) > c.max_references:
            g = torch.Generator().manual_seed(c.seed)
            ref_idx = sorted(torch.randperm(len(reference), generator=g)[: c.max_references].tolist())
        ref = cache_dataset(
            "reference",
            reference,
            indices=ref_idx,
            require_masks=True,
            slices="foreground",
            keep_inputs=False,
            **common,
        )
        sets = {CALIBRATION: cache_dataset(CALIBRATION, calibration, require_masks=True, **common)}
        for name, ds in target.items():
            sets[name] = cache_dataset(name, ds, **common)
        dims = {("3D" if d.volumetric or (d.inputs and d.inputs[0].ndim == 4) else "2D") for d in sets.values()}
        if len(dims) > 1:
            raise ValueError("SPE: calibration and targets mix 2D images and 3D volumes.")
        segmenter = self._build_segmenter()
        engine = SPEEngine(segmenter, ref, **c.engine_kwargs())
        empty = engine.classes_without_queries()
        if empty:
            what = f"class(es) {empty}" if c.class_names else "foreground"
            raise ValueError(
                f"SPE: no reference mask has {what}; the reverse step needs labelled structures "
                "(check foreground_class/classes)."
            )
        self._sets, self._targets = sets, list(target)
        self._reference_dataset = reference  # for the per-case quality regressor at fit end (no copy)
        self.segmenter, self.engine = segmenter, engine
        self.warn_if_few_pairs()

    def describe(self) -> str:
        """One line: how many references, calibration and target items, and which segmenter."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("SPE: call prepare() (or fit with the callback) first.")
        unit = "slices" if self.volumetric else "images"
        return (
            f"SPE: {len(engine.ref_indices)} reference {unit}, calibration {len(self._sets[CALIBRATION])} items, "
            f"targets {', '.join(f'{t} ({len(self._sets[t])})' for t in self._targets)}; "
            f"reverse segmenter {engine.segmenter.name}."
        )

    # ------------------------------------------------------------------ evaluation
    def is_recorded(self, epoch: int) -> bool:
        """True when a record of ``epoch`` exists (a resumed run never evaluates an epoch twice)."""
        return any(r.epoch == epoch for r in self.records)

    def record(
        self,
        model: nn.Module,
        epoch: int,
        step: int,
        final: bool = False,
        shard: Shard | None = None,
        epoch_seconds: float | None = None,
    ) -> Record | None:
        """Evaluate ``model`` and keep the record; None when the evaluation failed and was skipped.

        ``epoch_seconds``: the epoch's wall time up to this evaluation (the callback's, for the console line)."""
        start, fit_before = time.perf_counter(), self.segmenter_fit_seconds
        measured = self.guarded(f"evaluation at epoch {epoch} skipped", lambda: self.evaluate(model, shard))
        if measured is None:
            return None
        # a learned segmenter's one-off fit (at the first evaluation) is counted in segmenter_fit_seconds only
        seconds = time.perf_counter() - start - (self.segmenter_fit_seconds - fit_before)
        selection = self._hook_sets(model, epoch, measured)  # after `seconds`: a hook's work is not SPE's cost
        record = Record(
            pseudo=measured["pseudo"],
            real=measured["real"],
            confidence=measured["confidence"],
            n_support=measured["n_support"],
            reasons=measured["reasons"],
            seconds=seconds,
            distance=measured["distance"],
            epoch=epoch,
            step=step,
            final=final,
            selection=selection,
            agreement=self._keep_masks(epoch),
            epoch_seconds=epoch_seconds,
        )
        self.records.append(record)
        return record

    def finish(
        self, model: nn.Module, epoch: int | None = None, step: int | None = None, shard: Shard | None = None
    ) -> None:
        """At the final weights: mark (or make) the final record, then measure the calibration pairs.

        The last record is the final one when its ``step`` equals ``step`` (None: the last record is
        taken as final); otherwise ``model`` is evaluated once more as ``epoch``/``step``.
        """
        self.pairs = []  # measured anew at this fit's final weights (a reused run must not keep old ones)
        self.pseudo_by_size = None
        self.records = [r.as_final(False) if r.final else r for r in self.records]  # one final record per run
        if self.records and (step is None or self.records[-1].step == step):
            self.records[-1] = self.records[-1].as_final()  # the run owns its list: a new record, none edited
        else:
            last_epoch, last_step = (self.records[-1].epoch, self.records[-1].step) if self.records else (-1, -1)
            self.record(
                model,
                last_epoch + 1 if epoch is None else epoch,
                last_step + 1 if step is None else step,
                final=True,
                shard=shard,
            )
        if self.config.anchored and self.records and self.records[-1].final:
            self.measure_pairs(model, shard)

    # ------------------------------------------------------------------ estimates and report
    def running_estimate(self) -> dict[str, Any] | None:
        """G fitted on the records so far and every target's estimate; None before 3 records."""
        if len(self.records) < 3:
            return None
        c = self.config
        return fit_and_estimate(self.records, self._targets, self.keys, c.mapping, c.level, anchored=c.anchored)

    def check_alerts(
        self, estimates: Mapping[str, Any] | None, record: Record, stage: str = "running"
    ) -> list[AlertEvent]:
        """The alert events of ``estimates`` (``{target: {key: estimate}}``) at ``record``; kept in ``alerts``."""
        c = self.config
        if not estimates or not (c.alert_below or c.alert_above):
            return []
        events = alerts_for(
            estimates, c.alert_below, c.alert_above, c.alert_on, epoch=record.epoch, step=record.step, stage=stage
        )
        self.alerts = [a for a in self.alerts if (a.epoch, a.stage) != (record.epoch, stage)] + events
        return events

    def skip_report(self, reason: str) -> SPEReport:
        """Keep a report without estimates that says why (e.g. under ``fast_dev_run``); kept in ``report``."""
        self.report = SPEReport({}, tuple(self.records), reason)
        self.estimator = None
        return self.report

    def build_report(self) -> SPEReport:
        """Fit G on every record and estimate each target (intervals from the calibration pairs); kept in ``report``."""
        c = self.config
        result = fit_and_estimate(
            self.records,
            self._targets,
            self.keys,
            c.mapping,
            c.level,
            c.anchored,
            self.pairs,
            self.metric_bounds(),
            nearest=self.nearest_set_distances(),
            sizes={t: len(self._sets[t]) for t in self._targets},
            probes=self.pseudo_by_size,
        )
        engine = self.engine
        sections: dict[str, Any] = {
            "version": REPORT_VERSION,
            "metrics": list(c.metrics),
            "keys": self.keys,
            "classes": c.to_dict()["classes"],
            "segmenter": self.segmenter_spec(),
            "config": c.to_dict(),
            "support_size": engine.support_size if engine else c.support_size,  # config None: the segmenter's
            "reference_indices": list(engine.ref_indices) if engine else [],
        }
        if engine is not None and engine.ref_slices and max(engine.ref_slices) >= 0:
            sections["reference_slices"] = engine.ref_slices
        estimates = result.pop("estimates")
        sections.update(result, pairs=self.pairs)
        rows, details = signal_baselines(
            self.records, self._targets, self.keys, self.pairs, self.history, self._sets.get(CALIBRATION)
        )
        sections["baselines"].update(rows)
        sections["signals"] = {**details, "styles": self.styles, "seconds": dict(self.signal_seconds)}
        if self.records:
            self.check_alerts(estimates, self.records[-1], stage="final")
        sections["alerts"] = [a.to_dict() for a in self.alerts]  # the events in their JSON form
        report = SPEReport(estimates, tuple(self.records), self.no_estimate_reason(), sections)
        self.report = report
        self.estimator = None  # the estimator of an earlier report is stale
        return report

    def metric_bounds(self) -> dict[str, tuple[float | None, float | None]]:
        """The range of the keys whose range depends on the images: hd95 from 0 to the largest image diagonal
        (the value an empty prediction gets), so that no estimate or interval end goes beyond it."""
        diags = [d for d in (diagonal(s) for s in self._sets.values()) if d is not None]
        if not diags:
            return {}
        return {k: (0.0, max(diags)) for k in self.keys if k.split("/")[0] == "hd95"}

    def no_estimate_reason(self) -> str | None:
        """Why the run cannot estimate anything (too few records), or None."""
        n = len(self.records)
        if n == 0:
            return "no evaluation succeeded (each was skipped; see the warnings), so there is nothing to estimate"
        if n < 3:
            return (
                f"only {n} evaluation(s) were recorded and G needs 3: evaluate more often (every_n_epochs) "
                "or train for more epochs"
            )
        return None

    @property
    def seconds(self) -> float:
        """SPE's own time so far: every evaluation and the calibration pairs."""
        extra = self.pairs_seconds + self.quality_seconds + self.segmenter_fit_seconds
        extra += sum(self.signal_seconds.values())
        return sum(r.seconds for r in self.records) + extra

    def outcome(self) -> RunOutcome:
        """What the finished run hands over to its estimator (after :meth:`build_report`)."""
        report, engine = self.report, self.engine
        if engine is None or report is None or not self.records:
            raise ValueError("SPE: the run has no report yet; build it after fit.")
        last = self.records[-1]
        c = self.config
        with_pairs = c.quality_regressor and bool(self.pairs)  # the combination's development sets
        return RunOutcome(
            config=c,
            report=report,
            calibration_pseudo=dict(last.pseudo.get(CALIBRATION, {})),
            calibration_real=dict(last.real.get(CALIBRATION, {})),
            pseudo_by_size=self.pseudo_by_size,
            calibration_features=self.calibration_features,
            pair_features=self.pair_features(),
            reference_images=engine.ref_images,
            reference_masks=engine.ref_labels,
            reference_indices=list(engine.ref_indices),
            segmenter=engine.segmenter,
            calibration=self._sets[CALIBRATION],
            reference_dataset=self._reference_dataset,
            targets={t: self._sets[t] for t in self._targets},
            records=list(self.records),
            pairs=list(self.pairs),
            pair_sets=self.pair_sets() if with_pairs else {},
            # the regressor's per-target map (issue 27): the styled sets again (deterministic), by target name
            styled_sets=dict(zip(self._targets, self.styled_sets().values()))
            if with_pairs and any(p.get("target") for p in self.pairs)
            else {},
            logits_fn=self.logits_fn,
            volumetric=self.volumetric,
            progress=self.show_progress and c.verbose,
        )

    def finish_fit(self, model: nn.Module | None = None) -> SPEReport:
        """Build the report (unless built) and, when it has estimates, the estimator once: ``report`` and
        ``estimator``. ``model`` (the trained model) calibrates the per-case scores (2D only) and, with
        ``quality_regressor``, fits the quality regressor and its combination with SPE (added to the report).
        A failing estimator is warned and left out (``strict``: raised); the report stands."""
        report = self.report if self.report is not None else self.build_report()
        if self.estimator is not None or report.reason is not None:
            return report
        est = self.guarded(
            "building the estimator failed", lambda: fit_estimator(self.outcome(), model, warn=self.warn)
        )
        if est is not None:
            notes = est.fitted.notes
            report = report.with_sections(**{k: notes[k] for k in ("quality", "combined") if k in notes})
            self.report = report
            self.quality_seconds = float(notes.get("quality_seconds", 0.0))
            self.estimator = est
        return report

    def write_report(self, out_dir: str | Path, model: nn.Module | None = None, figure: Any = None) -> dict[str, Path]:
        """Write ``spe_report.json``, ``spe_report.csv``, ``spe_calibration.png`` and ``spe_estimator.pt``.

        Only serialises what :meth:`finish_fit` built (called here first, with ``model``, when it was not);
        ``figure`` (from :func:`~spe_lightning.reporting.report.make_figure`) is saved instead of drawing it
        again. A failure of the estimator file or the figure costs only that file (warned).
        """
        report = self.finish_fit(model)
        out = Path(out_dir)
        paths = {"json": write_json(report, out / "spe_report.json"), "csv": write_csv(report, out / "spe_report.csv")}
        est = self.estimator
        if est is not None:
            path = self.guarded("saving spe_estimator.pt failed", lambda: est.save(out / "spe_estimator.pt"))
            if path is not None:
                paths["estimator"] = path

        def draw() -> Path:
            import matplotlib.pyplot as plt

            fig = figure if figure is not None else make_figure(report)
            try:
                fig.savefig(out / "spe_calibration.png", dpi=110)
            finally:
                if figure is None:
                    plt.close(fig)
            return out / "spe_calibration.png"

        path = self.guarded("drawing spe_calibration.png failed", draw)
        if path is not None:
            paths["figure"] = path
        return paths

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Records, settings and a learned segmenter's fitted weights (plain objects and tensors), for a checkpoint."""
        state: dict[str, Any] = {
            "records": [r.to_dict() for r in self.records],  # plain objects: weights_only loading reads them
            "config": self.config.to_dict(),
            "alerts": [a.to_dict() for a in self.alerts],
        }
        state["mask_history"] = self.history.state_dict()  # the checkpoint agreement continues after a resume
        seg = self.engine.segmenter if self.engine is not None else None
        if seg is not None and seg.needs_fit and seg.is_fitted:
            state["segmenter_state"] = {"key": self.segmenter_key(), "tensors": seg.state_tensors()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the records of a checkpoint; other estimation settings warn (``strict``: raise)."""
        diff = self.config.changed_from(state.get("config", {}))
        if diff:
            message = f"SPE: resuming with different settings ({', '.join(diff)})"
            if self.config.strict:
                raise ValueError(message + "; the checkpoint's records were made with the others.")
            self.warn(message + "; earlier records kept.")
        self.records = [Record.from_dict(r) for r in state.get("records", [])]
        self.alerts = [AlertEvent.from_dict(a) for a in state.get("alerts", [])]
        self.history = MaskHistory(AGREEMENT_K)
        if "mask_history" in state:  # older checkpoints: the agreement starts over (it needs 2 new records)
            self.history.load_state_dict(state["mask_history"])
        self._segmenter_state = state.get("segmenter_state")  # used instead of refitting when the key matches
