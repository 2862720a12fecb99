"""SPERun: the one owner of an SPE run's state and work, in plain PyTorch (no Trainer needed).

It reads the datasets and builds the reverse segmenter and engine (:meth:`SPERun.prepare`),
evaluates a model at a checkpoint (:meth:`SPERun.record`, sharded over processes or not),
measures the labelled calibration pairs at the final weights (:meth:`SPERun.finish`), and fits
G and builds the report (:meth:`SPERun.build_report`). :class:`~spe_lightning.SPECallback` decides
*when* and publishes; a user with their own training loop can call the same methods::

    run = SPERun(SPEConfig(segmenter="label_fusion"))
    run.prepare(reference=train_set, calibration=val_set, target={"site_b": unlabelled})
    for epoch in range(epochs):
        train_one_epoch(model)
        run.record(model, epoch=epoch, step=epoch)
    run.finish(model)
    report = run.build_report()
    run.write_report("out/")

Failures at a checkpoint are passed to ``warn`` and that evaluation is skipped (``strict``: raised).
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning import __version__
from spe_lightning.config import MAX_AUTO_WORKING_SIZE, SPEConfig
from spe_lightning.data.adapters import split_item
from spe_lightning.engine.agreement import AGREEMENT_K, MaskHistory
from spe_lightning.engine.cached_set import CachedSet, SizedDataset, cache_dataset
from spe_lightning.engine.calibration_pairs import calibration_sets, pairs_from_record
from spe_lightning.engine.distance import diagonal, image_features, set_distance
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.predict import LogitsFn, default_logits, model_device, predict_labels
from spe_lightning.engine.records import CALIBRATION, fit_and_estimate, series
from spe_lightning.engine.signals import signal_baselines
from spe_lightning.engine.spe_engine import Shard, SPEEngine
from spe_lightning.engine.styled_pairs import styled_name, styled_set
from spe_lightning.estimator import SPEEstimator
from spe_lightning.monitoring.alerts import alerts_for
from spe_lightning.percase.regressor import combination_from_pairs, combined_value
from spe_lightning.progress import Progress
from spe_lightning.reporting.report import make_figure, write_csv, write_json
from spe_lightning.reverse.base import ReverseSegmenter, make_segmenter, resolve_auto
from spe_lightning.reverse.fit_cache import cache_file, content_key, load_cached, resolve_cache_dir, save_cached

__all__ = ["SPERun", "REPORT_VERSION"]

#: the ``version`` of ``spe_report.json``
REPORT_VERSION = 1


def auto_working_size(dataset: SizedDataset, config: SPEConfig) -> int:
    """``working_size=None``: the side of the dataset's first image (its larger in-plane side), at most
    :data:`~spe_lightning.config.MAX_AUTO_WORKING_SIZE` and at least 16, so SPE never works above the images' size."""
    if len(dataset) == 0:
        return MAX_AUTO_WORKING_SIZE
    image, _ = split_item(dataset[0], config.image_key, config.label_key)
    side = max(int(image.shape[-1]), int(image.shape[-2])) if image.ndim >= 2 else MAX_AUTO_WORKING_SIZE
    return max(16, min(MAX_AUTO_WORKING_SIZE, side))


class SPERun:
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
        self.records: list[dict[str, Any]] = []
        self.pairs: list[dict[str, Any]] = []
        self.pairs_seconds = 0.0
        self.quality_seconds = 0.0
        self.segmenter_fit_seconds = 0.0
        self.segmenter_from_cache = False  # True when the learned segmenter's weights came from the fit cache
        self._segmenter_state: dict[str, Any] | None = None  # fitted weights from a checkpoint, until used
        self._reference_dataset: SizedDataset | None = None
        self.report: dict[str, Any] | None = None
        #: alert events (:func:`~spe_lightning.monitoring.alerts.alerts_for`) of the running and final estimates
        self.alerts: list[dict[str, Any]] = []
        #: progress bars of the long steps (learned fit, calibration pairs, quality regressor) when
        #: ``config.verbose``; SPECallback sets it to the Trainer's ``enable_progress_bar`` (rank zero only)
        self.show_progress = True
        #: the calibration set's label-free features at the last evaluated weights (engine/distance.py)
        self.calibration_features: np.ndarray | None = None
        #: the last checkpoints' masks per set, for the checkpoint agreement (kept in the checkpoint state)
        self.history = MaskHistory(AGREEMENT_K)
        self._pending_masks: dict[str, list[Tensor]] = {}
        #: the style applied to each target's styled calibration set (engine/styled_pairs.py)
        self.styles: dict[str, Any] = {}
        #: seconds of the new signals (styled pairs, agreement) apart from SPE's own
        self.signal_seconds: dict[str, float] = {"styled_pairs": 0.0, "agreement": 0.0}
        #: ``fn(model, epoch) -> {set name: {"pseudo": ..., "real": ..., "confidence": ...}}``, called by
        #: :meth:`record` at the same weights; their sets join the record (named in its ``"selection"``) before it
        #: is kept, so nothing edits a kept record. A failing hook warns and is skipped (``strict``: raised).
        self.record_hooks: list[Callable[[nn.Module, int], Mapping[str, Mapping[str, Any]]]] = []

    def progress(self, total: int, desc: str, unit: str = "it") -> Progress:
        """A progress display of one long step (bar on a terminal, a line per ~10% in a log, off when quiet)."""
        return Progress(total, desc, enabled=self.show_progress and self.config.verbose, unit=unit)

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

    def segmenter_spec(self) -> dict[str, Any]:
        """The reverse segmenter's spec (its name before :meth:`prepare` built it)."""
        if self.segmenter is not None:
            return self.segmenter.spec()
        if self._segmenter_arg is not None:
            return self._segmenter_arg.spec()
        return {"name": self.config.segmenter}

    # ------------------------------------------------------------------ preparation
    def prepare(
        self, reference: SizedDataset, calibration: SizedDataset, target: SizedDataset | Mapping[str, SizedDataset]
    ) -> None:
        """Read the datasets and build the segmenter and engine; every input problem is raised here."""
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

    def _build_segmenter(self) -> ReverseSegmenter:
        if self._segmenter_arg is not None:
            return self._segmenter_arg
        if self.config.segmenter == "auto":
            seg, reason = resolve_auto()
            if seg.name != "universeg":
                self.warn(f"SPE(segmenter='auto'): {reason}")
            return seg
        return make_segmenter(self.config.segmenter)

    def _engine(self) -> SPEEngine:
        if self.engine is None:
            raise RuntimeError("SPE: call prepare() (or fit with the callback) first.")
        self._ensure_fitted(self.engine)
        return self.engine

    def segmenter_key(self) -> str:
        """What a learned segmenter's weights depend on: its fit settings, the references and the seed."""
        engine = self.engine
        refs = list(engine.ref_indices) if engine else []
        spec = engine.segmenter.fit_spec() if engine else self.segmenter_spec()
        return repr((sorted(spec.items()), refs, engine.ref_slices if engine else [], self.config.seed))

    def _ensure_fitted(self, engine: SPEEngine) -> None:
        """Fit a learned reverse segmenter on the references once: restored from a checkpoint, or loaded from
        the disk cache of an earlier run on the same references and settings, or fitted (and cached)."""
        seg = engine.segmenter
        if not seg.needs_fit or seg.is_fitted:
            return
        saved = self._segmenter_state
        if saved is not None and saved.get("key") == self.segmenter_key():
            seg.load_state_tensors(saved["tensors"])
            return
        path, key = self._fit_cache_file(engine)
        if path is not None and self._load_fit_cache(seg, path, key):
            return
        if self.config.verbose:
            self.say(
                f"SPE: fitting {seg.name} on {len(engine.ref_indices)} references (~1 min on a CPU; once, then "
                "kept in the fit cache for later runs on the same references)"
            )
        start = time.perf_counter()
        steps = int(getattr(seg, "steps", 0) or 0)
        with self.progress(steps, f"SPE: fitting {seg.name}", "step") as bar:
            if steps and "progress" in inspect.signature(seg.fit).parameters:
                seg.fit(engine.ref_images, engine.ref_masks.float(), progress=bar.update)  # type: ignore[call-arg]
            else:
                seg.fit(engine.ref_images, engine.ref_masks.float())
        self.segmenter_fit_seconds = time.perf_counter() - start
        if self.config.verbose:
            self.say(
                f"SPE: {seg.name} fitted on {len(engine.ref_indices)} references ({self.segmenter_fit_seconds:.1f}s)"
            )
        if path is not None:
            try:
                save_cached(path, key, seg.state_tensors())
            except OSError as err:  # a read-only or full disk costs the next run a fit, nothing more
                self.warn(f"SPE: could not cache the fitted {seg.name} weights in {path}: {err!r}")

    def _fit_cache_file(self, engine: SPEEngine) -> tuple[Path | None, str]:
        """The cache file and key of the learned segmenter's weights (``(None, "")`` without a cache)."""
        folder = resolve_cache_dir(self.config.fit_cache)
        if folder is None:
            return None, ""
        seg = engine.segmenter
        key = content_key(engine.ref_images, engine.ref_masks, seg.fit_spec(), self.config.seed, __version__)
        return cache_file(folder, seg.name, key), key

    def _load_fit_cache(self, seg: ReverseSegmenter, path: Path, key: str) -> bool:
        """Load cached weights into ``seg``; False (with a warning for a bad file) when there are none."""
        try:
            tensors = load_cached(path, key)
            if tensors is None:
                return False
            seg.load_state_tensors(tensors)
            self.segmenter_from_cache = True
        except (ValueError, RuntimeError, KeyError) as err:  # a bad file is refitted over, never trusted
            seg.load_state_tensors({})
            self.warn(f"SPE: ignoring the fit cache {path} and fitting again: {err}")
            return False
        if self.config.verbose:
            self.say(
                f"SPE: {seg.name} weights from the fit cache (same references and settings): {path} "
                "(fit_cache=None or SPE_CACHE_DIR='' turns the cache off)"
            )
        return True

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        shard: Shard | None = None,
        sets: Mapping[str, CachedSet] | None = None,
        progress: Callable[[int], Any] | None = None,
        from_calibration: bool = False,
    ) -> dict[str, Any]:
        """One record of ``model``'s current weights over ``sets`` (default: calibration and targets).

        With a ``shard`` of several processes, each predicts its share of every set and segments its
        share of the references; all processes must call this together and get the same record.
        Raises on failure (see :meth:`record` for the skipping policy). ``progress(1)`` after each set.
        ``from_calibration``: ``sets`` were made from the calibration set's items (the calibration pairs),
        which their distances must not match.
        """
        engine = self._engine()
        shard = shard or Shard()
        c = self.config
        device = model_device(model)
        predictions = {}
        for name, data in (self._sets if sets is None else sets).items():
            n = len(data)
            run = functools.partial(
                predict_labels,
                model,  # the module itself, never a DDP wrapper: no gradient sync hooks in SPE's forward
                data,
                device,
                c.batch_size,
                self.logits_fn,
                c.activation,
                c.threshold,
                c.foreground_class,
                c.class_indices or None,
                shard.part(n),
            )
            masks: list[Tensor] = [torch.zeros(0)] * n
            conf = torch.zeros(n)
            for r, (m, cf) in enumerate(shard.run(run)):
                for k, pos in enumerate(range(r, n, shard.world)):
                    masks[pos] = m[k]
                conf[r :: shard.world] = cf
            predictions[name] = (data, masks, conf)
        if sets is None:  # a checkpoint's record: its masks feed the checkpoint agreement once it is kept
            self._pending_masks = {name: p[1] for name, p in predictions.items()}
        record = engine.evaluate(predictions, device, shard, progress=progress)
        distances = self.guarded(
            "the label-free distances to the calibration set failed (no extrapolation flag)",
            lambda: self._distances(predictions, from_calibration),
        )
        record["distance"] = distances or {}
        return record

    def _distances(self, predictions: Mapping[str, Any], from_calibration: bool) -> dict[str, float | None]:
        """Each set's label-free distance to the calibration set (engine/distance.py) at these weights; the
        calibration pairs' sets (``from_calibration``) are measured against the last calibration features, never
        matching an item with its own original."""
        feats = {name: image_features(data, masks, conf) for name, (data, masks, conf) in predictions.items()}
        if CALIBRATION in feats:
            self.calibration_features = feats[CALIBRATION]
        cal = self.calibration_features
        if cal is None:
            return {}
        cal_ids = list(self._sets[CALIBRATION].indices) if from_calibration else None
        return {
            name: set_distance(f, cal, list(predictions[name][0].indices) if from_calibration else None, cal_ids)
            for name, f in feats.items()
            if name != CALIBRATION
        }

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None after a warning naming ``what`` when it fails (``strict``: raised)."""
        try:
            return fn()
        except Exception as err:
            if self.config.strict:
                raise
            self.warn(f"SPE: {what}: {err!r}")
            return None

    def is_recorded(self, epoch: int) -> bool:
        """True when a record of ``epoch`` exists (a resumed run never evaluates an epoch twice)."""
        return any(r["epoch"] == epoch for r in self.records)

    def record(
        self, model: nn.Module, epoch: int, step: int, final: bool = False, shard: Shard | None = None
    ) -> dict[str, Any] | None:
        """Evaluate ``model`` and keep the record; None when the evaluation failed and was skipped."""
        start, fit_before = time.perf_counter(), self.segmenter_fit_seconds
        record = self.guarded(f"evaluation at epoch {epoch} skipped", lambda: self.evaluate(model, shard))
        if record is None:
            return None
        # a learned segmenter's one-off fit (at the first evaluation) is counted in segmenter_fit_seconds only
        seconds = time.perf_counter() - start - (self.segmenter_fit_seconds - fit_before)
        record.update(epoch=epoch, step=step, final=final, seconds=seconds)
        for hook in self.record_hooks:  # after `seconds`: a hook's own work is not SPE's cost
            extra = self.guarded(
                f"record hook at epoch {epoch} skipped", functools.partial(hook_sets, hook, model, epoch)
            )
            for name, measured in (extra or {}).items():
                for kind in ("pseudo", "real", "confidence"):
                    record[kind][name] = measured[kind]
            if extra:
                record["selection"] = sorted({*record.get("selection", []), *extra})
        self.records.append(record)
        self._keep_masks(record, epoch)
        return record

    def _keep_masks(self, record: dict[str, Any], epoch: int) -> None:
        """Keep this record's masks (bit-packed, last K) and add each set's checkpoint agreement to it."""
        start = time.perf_counter()
        pending, self._pending_masks = self._pending_masks, {}
        for name, masks in pending.items():
            self.history.push(name, masks, epoch)
        record["agreement"] = {name: self.history.agreement(name) for name in pending}
        self.signal_seconds["agreement"] += time.perf_counter() - start

    def finish(
        self, model: nn.Module, epoch: int | None = None, step: int | None = None, shard: Shard | None = None
    ) -> None:
        """At the final weights: mark (or make) the final record, then measure the calibration pairs.

        The last record is the final one when its ``step`` equals ``step`` (None: the last record is
        taken as final); otherwise ``model`` is evaluated once more as ``epoch``/``step``.
        """
        self.pairs = []  # measured anew at this fit's final weights (a reused run must not keep old ones)
        if self.records and (step is None or self.records[-1]["step"] == step):
            self.records[-1]["final"] = True
        else:
            last = self.records[-1] if self.records else {"epoch": -1, "step": -1}
            self.record(
                model,
                last["epoch"] + 1 if epoch is None else epoch,
                last["step"] + 1 if step is None else step,
                final=True,
                shard=shard,
            )
        if self.config.anchored and self.records and self.records[-1]["final"]:
            self.measure_pairs(model, shard)

    def pair_sets(self) -> dict[str, CachedSet]:
        """The labelled sets behind the calibration pairs, by pair name (calibration subsets as large as the
        targets, shifted copies of the calibration set): development data with known truth."""
        c = self.config
        shifts = [(f, v) for f in c.interval_shifts for v in c.interval_severities]
        sizes = sorted({len(self._sets[t]) for t in self._targets})
        return calibration_sets(self._sets[CALIBRATION], sizes, c.interval_subsets, shifts, c.seed)

    def measure_pairs(self, model: nn.Module, shard: Shard | None = None) -> list[dict[str, Any]]:
        """The labelled calibration pairs at ``model``'s weights (subsets, shifted copies): the intervals."""
        c = self.config
        shifts = [(f, v) for f in c.interval_shifts for v in c.interval_severities]
        if not shifts and not c.interval_subsets:
            return []
        start = time.perf_counter()

        def measure() -> list[dict[str, Any]]:
            sets = self.pair_sets()
            with self.progress(len(sets), "SPE: calibration pairs", "set") as bar:
                record = self.evaluate(model, shard, sets, progress=bar.update, from_calibration=True)
            return self._pairs_of(record, list(sets))

        pairs = self.guarded("the calibration pairs for the intervals failed; G's residuals are used", measure)
        self.pairs = pairs or []
        self.pairs_seconds = time.perf_counter() - start
        if pairs and c.verbose:
            self.say(f"SPE: {len(pairs)} calibration pairs for the intervals ({time.perf_counter() - start:.1f}s)")
        if pairs:
            start = time.perf_counter()
            styled = self.guarded(
                "the target-styled calibration pairs failed; the targets use the generic pairs",
                lambda: self.measure_styled_pairs(model, shard),
            )
            self.pairs += styled or []
            self.signal_seconds["styled_pairs"] = time.perf_counter() - start
        return self.pairs

    def styled_sets(self) -> dict[str, CachedSet]:
        """Each target's styled calibration set (the calibration set restyled as the target from its unlabelled
        images; :func:`~spe_lightning.engine.styled_pairs.styled_set`), by set name; the styles go to ``styles``."""
        out = {}
        for i, t in enumerate(self._targets):
            data, style = styled_set(self._sets[CALIBRATION], self._sets[t], seed=self.config.seed * 7919 + 31 * i)
            self.styles[t] = {k: v for k, v in style.items() if k != "target_images"}
            out[data.name] = data
        return out

    def measure_styled_pairs(self, model: nn.Module, shard: Shard | None = None) -> list[dict[str, Any]]:
        """One labelled pair per target from its styled calibration set at ``model``'s weights (one set
        evaluation per target); each carries ``"target"`` and joins only that target's interval model."""
        sets = self.styled_sets()
        record = self.evaluate(model, shard, sets, from_calibration=True)  # restyled calibration items
        return self._pairs_of(record, list(sets), {styled_name(t): t for t in self._targets})

    def _pairs_of(
        self, record: dict[str, Any], names: list[str], targets: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The labelled pairs of the sets ``names`` evaluated in ``record`` against the last record's calibration
        set (``targets``: set name -> the target a styled set was made for), each with its distance to the
        calibration set: the reach of the interval model it joins."""
        last = self.records[-1]
        for kind in ("pseudo", "real"):
            record[kind][CALIBRATION] = last[kind].get(CALIBRATION, {})
        pairs = pairs_from_record(record, CALIBRATION, names, targets)
        for p in pairs:
            p.setdefault("distance", record["distance"].get(p["name"]))
        return pairs

    # ------------------------------------------------------------------ estimates and report
    def running_estimate(self) -> dict[str, Any] | None:
        """G fitted on the records so far and every target's estimate; None before 3 records."""
        if len(self.records) < 3:
            return None
        c = self.config
        return fit_and_estimate(self.records, self._targets, self.keys, c.mapping, c.level, anchored=c.anchored)

    def check_alerts(
        self, estimates: Mapping[str, Any] | None, record: Mapping[str, Any], stage: str = "running"
    ) -> list[dict[str, Any]]:
        """The alert events of ``estimates`` (``{target: {key: estimate}}``) at ``record``; kept in ``alerts``."""
        c = self.config
        if not estimates or not (c.alert_below or c.alert_above):
            return []
        events = alerts_for(
            estimates, c.alert_below, c.alert_above, c.alert_on, epoch=record["epoch"], step=record["step"], stage=stage
        )
        self.alerts = [a for a in self.alerts if (a["epoch"], a.get("stage")) != (record["epoch"], stage)] + events
        return events

    def build_report(self) -> dict[str, Any]:
        """Fit G on every record and estimate each target (intervals from the calibration pairs); kept in ``report``."""
        c = self.config
        result = fit_and_estimate(
            self.records, self._targets, self.keys, c.mapping, c.level, c.anchored, self.pairs, self.metric_bounds()
        )
        engine = self.engine
        report: dict[str, Any] = {
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
            report["reference_slices"] = engine.ref_slices
        report.update(result, records=self.records, pairs=self.pairs, reason=self.no_estimate_reason())
        rows, details = signal_baselines(
            self.records, self._targets, self.keys, self.pairs, self.history, self._sets.get(CALIBRATION)
        )
        report["baselines"].update(rows)
        report["signals"] = {**details, "styles": self.styles, "seconds": dict(self.signal_seconds)}
        if self.records:
            self.check_alerts(result["estimates"], self.records[-1], stage="final")
        report["alerts"] = list(self.alerts)
        self.report = report
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
        return sum(float(r.get("seconds", 0.0)) for r in self.records) + extra

    def write_report(self, out_dir: str | Path, model: nn.Module | None = None, figure: Any = None) -> dict[str, Path]:
        """Write ``spe_report.json``, ``spe_report.csv``, ``spe_calibration.png`` and ``spe_estimator.pt``.

        ``model`` (the trained model) calibrates the estimator's per-case flags (2D only); ``figure``
        (from :func:`~spe_lightning.reporting.report.make_figure`) is saved instead of drawing it again.
        The report files come first: a failure of the estimator or the figure costs only that file (warned).
        """
        report = self.report if self.report is not None else self.build_report()
        out = Path(out_dir)
        paths = {"json": write_json(report, out / "spe_report.json"), "csv": write_csv(report, out / "spe_report.csv")}

        def estimator() -> Path:
            module = None if self.volumetric else model
            est = SPEEstimator.from_run(self, module)
            if self.config.quality_regressor and module is not None and not self.config.classes:
                start = time.perf_counter()
                est.fit_quality(
                    module,
                    self._reference_dataset,
                    self._sets[CALIBRATION],
                    logits_fn=self.logits_fn,
                    progress=self.show_progress and self.config.verbose,
                )
                assert est.quality is not None  # fit_quality sets it
                report["quality"] = {k: v for k, v in est.quality["calibration"].items() if k != "mapping"}
                combined = self.guarded(
                    "combining SPE with the quality regressor failed", lambda: self._combine(est, module, report)
                )
                if combined is not None:
                    report["combined"] = combined
                    est.quality["combination"] = {"weight": combined["weight"], "n_sets": combined["n_sets"]}
                self.quality_seconds = time.perf_counter() - start
                write_json(report, out / "spe_report.json")
            return est.save(out / "spe_estimator.pt")

        path = self.guarded("saving spe_estimator.pt failed", estimator) if report.get("reason") is None else None
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

    def _combine(self, est: SPEEstimator, model: nn.Module, report: dict[str, Any]) -> dict[str, Any] | None:
        """Dice of every target as ``w * regressor mean + (1 - w) * SPE``, ``w`` chosen on the calibration pairs'
        sets (development data: their real Dice is known) with the fitted quality regressor; None without pairs."""
        mapping = report.get("mapping", {}).get("dice")
        if not self.pairs or not mapping or "error" in mapping:
            return None
        pseudo = series(self.records, "pseudo", CALIBRATION, "dice")
        real = series(self.records, "real", CALIBRATION, "dice")
        ok = np.isfinite(pseudo) & np.isfinite(real)
        if not ok.any():
            return None
        last = int(np.flatnonzero(ok)[-1])

        def mean(data: CachedSet) -> float | None:
            rows = est.case_estimates(model, data, logits_fn=self.logits_fn)
            values = [r["estimated_dice"] for r in rows if r.get("estimated_dice") is not None]
            return float(np.mean(values)) if values else None

        # held out: the regressor's map refitted without each pair's shift family (subsets: none left, skipped)
        dev = regressor_heldout_means(est, model, self, self.pair_sets())
        g = MetricMapping.from_dict(mapping)
        choice = combination_from_pairs(self.pairs, dev, g, float(pseudo[last]), float(real[last]))
        if choice is None:
            return None
        w = float(choice["weight"])
        estimates = {}
        for t in self._targets:
            spe, reg = report["estimates"][t]["dice"]["value"], mean(self._sets[t])
            value = combined_value(w, reg, spe)
            estimates[t] = {"value": value, "spe": spe, "regressor": reg}
        return {
            "metric": "dice",
            "weight": w,
            "mae_by_weight": choice["mae"],
            "n_sets": choice["n_sets"],
            "estimates": estimates,
        }

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Records, settings and a learned segmenter's fitted weights (plain objects and tensors), for a checkpoint."""
        state: dict[str, Any] = {"records": self.records, "config": self.config.to_dict(), "alerts": self.alerts}
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
        self.records = list(state.get("records", []))
        self.alerts = list(state.get("alerts", []))
        self.history = MaskHistory(AGREEMENT_K)
        if "mask_history" in state:  # older checkpoints: the agreement starts over (it needs 2 new records)
            self.history.load_state_dict(state["mask_history"])
        self._segmenter_state = state.get("segmenter_state")  # used instead of refitting when the key matches


def hook_sets(hook: Callable[[nn.Module, int], Any], model: nn.Module, epoch: int) -> dict[str, Any]:
    """A record hook's sets (see ``SPERun.record_hooks``), checked before any joins the record."""
    out = dict(hook(model, epoch) or {})
    for name, measured in out.items():
        missing = [
            k for k in ("pseudo", "real", "confidence") if not isinstance(measured, Mapping) or k not in measured
        ]
        if missing:
            raise ValueError(f"record hook {hook!r} returned the set {name!r} without {missing}.")
    return out


def regressor_heldout_means(est: Any, model: Any, run: Any, pair_sets: dict[str, Any]) -> dict[str, float | None]:
    """The regressor's mean estimate on each shifted pair set, its calibration map refitted with the shifted
    copies of every *other* family (as ``SPEEstimator.fit_quality`` builds them); subsets: None (they are the
    calibration cases the map is fitted on). Only when the fit used shifted copies (few bad calibration
    cases); otherwise the map never saw the shifted sets and the plain means are returned."""
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set
    from spe_lightning.estimator import _working_masks
    from spe_lightning.percase.rca import per_case_dice
    from spe_lightning.percase.regressor import calibrate_quality, quality_estimates

    qcal = est.quality["calibration"]
    device = model_device(model)
    reg = est._quality_regressor(device)
    cal = run.sets[CALIBRATION]
    size = tuple(cal.gray.shape[-2:])

    def raw_of(data: Any) -> tuple[np.ndarray, np.ndarray]:
        masks, _ = est._predict(model, data, device, run.logits_fn)
        return reg.predict(data.gray, _working_masks(masks, size)).numpy(), per_case_dice(masks, data.masks)

    out: dict[str, float | None] = {n: None for n in pair_sets}
    if not qcal.get("n_extra_pairs"):
        for n, data in pair_sets.items():
            if not n.startswith("subset"):
                rows = est.case_estimates(model, data, logits_fn=run.logits_fn)
                values = [r["estimated_dice"] for r in rows if r.get("estimated_dice") is not None]
                out[n] = float(np.mean(values)) if values else None
        return out
    x0, y0 = raw_of(cal)
    fam = {f: raw_of(shift_set(cal, f, 2, seed=est.config.seed * 7919 + 97 * i)) for i, f in enumerate(SHIFT_FAMILIES)}
    for n, data in pair_sets.items():
        f = n.rsplit("_", 1)[0]
        if n.startswith("subset") or f not in fam:
            continue
        others = [fam[o] for o in fam if o != f]
        q = calibrate_quality(
            x0,
            y0,
            kind="isotonic",
            level=qcal["level"],
            extra_pairs=(np.concatenate([a for a, _ in others]), np.concatenate([b for _, b in others])),
        )
        out[n] = float(np.mean(quality_estimates(q, raw_of(data)[0])["estimate"]))
    return out
