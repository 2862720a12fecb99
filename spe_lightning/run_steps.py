"""The steps of an SPE run that :class:`~spe_lightning.SPERun` builds on: the reverse segmenter (built, and a
learned one fitted once: restored from a checkpoint, loaded from the fit cache, or fitted and cached), one
evaluation of a model's weights over the cached sets, the labelled calibration pairs at the final weights
(random subsets, shifted copies, target-styled copies of the calibration set), and the run's failure policy
(:meth:`RunSteps.guarded`).

:class:`RunSteps` holds no state of its own: :class:`~spe_lightning.SPERun` owns every attribute it names.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spe_lightning import __version__
from spe_lightning.config import SPEConfig
from spe_lightning.engine.agreement import MaskHistory
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.calibration_pairs import calibration_sets, pairs_from_record, subset_sizes_of
from spe_lightning.engine.distance import image_features, nearest_set_distance, set_distance
from spe_lightning.engine.interval_model import MIN_PAIRS
from spe_lightning.engine.predict import LogitsFn, default_logits, eval_mode, model_device, predict_labels
from spe_lightning.engine.records import CALIBRATION, Record
from spe_lightning.engine.set_size import probe_sets, probe_values
from spe_lightning.engine.spe_engine import Shard, SPEEngine
from spe_lightning.engine.styled_pairs import styled_name, styled_set
from spe_lightning.progress import Progress
from spe_lightning.reverse.base import ReverseSegmenter, resolve_auto, segmenter_from_text
from spe_lightning.reverse.fit_cache import cache_file, content_key, load_cached, resolve_cache_dir, save_cached

__all__ = ["RunSteps", "hook_sets"]


class RunSteps:
    """The segmenter, evaluation, calibration-pair and failure-policy steps of :class:`~spe_lightning.SPERun`."""

    # owned and set by SPERun.__init__ / prepare
    config: SPEConfig
    logits_fn: LogitsFn
    warn: Callable[[str], Any]
    say: Callable[[str], Any]
    show_progress: bool
    segmenter: ReverseSegmenter | None
    engine: SPEEngine | None
    segmenter_fit_seconds: float
    segmenter_from_cache: bool
    calibration_features: np.ndarray | None
    set_features: dict[str, np.ndarray]
    _segmenter_arg: ReverseSegmenter | None
    _segmenter_state: dict[str, Any] | None
    _sets: dict[str, CachedSet]
    _targets: list[str]
    _pending_masks: dict[str, list[Tensor]]
    pseudo_by_size: dict[str, Any] | None
    records: list[Record]
    record_hooks: list[Callable[[nn.Module, int], Mapping[str, Mapping[str, Any]]]]
    history: MaskHistory
    pairs: list[dict[str, Any]]
    pairs_seconds: float
    styles: dict[str, Any]
    signal_seconds: dict[str, float]
    alerts: list[Any]
    report: Any
    estimator: Any

    def start_over(self) -> None:
        """Forget the records and everything made from them (a new training reusing this run): the datasets, the
        reverse segmenter and its fit stay."""
        self.records, self.pairs, self.alerts, self.styles = [], [], [], {}
        self.history = MaskHistory(self.history.k)
        self._pending_masks, self.set_features, self.calibration_features = {}, {}, None
        self.report = self.estimator = None

    def progress(self, total: int, desc: str, unit: str = "it") -> Progress:
        """A progress display of one long step (bar on a terminal, a line per ~10% in a log, off when quiet)."""
        return Progress(total, desc, enabled=self.show_progress and self.config.verbose, unit=unit)

    def segmenter_spec(self) -> dict[str, Any]:
        """The reverse segmenter's spec (its name before :meth:`prepare` built it)."""
        if self.segmenter is not None:
            return self.segmenter.spec()
        if self._segmenter_arg is not None:
            return self._segmenter_arg.spec()
        return {"name": self.config.segmenter}

    # ------------------------------------------------------------------ the reverse segmenter
    def _build_segmenter(self) -> ReverseSegmenter:
        if self._segmenter_arg is not None:
            return self._segmenter_arg
        if self.config.segmenter == "auto":
            seg, reason = resolve_auto()
            if seg.name != "universeg":
                self.warn(f"SPE(segmenter='auto'): {reason}")
            return seg
        return segmenter_from_text(self.config.segmenter)  # a name, or name:key=value,... options

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
        steps = int(getattr(seg, "fit_steps", getattr(seg, "steps", 0)) or 0)  # a pretrained start adapts in fewer
        if self.config.verbose:
            # ~0.15 s per step on 2 CPU cores (benchmarks/results/reverse_fit_cost_idle.json: 800 steps in 100 s
            # alone, 127 s inside a run)
            secs = steps * 0.15
            took = f"~{max(10, round(secs, -1)):.0f} s" if secs < 90 else f"~{round(secs / 60)} min"
            took = f"{steps} steps, {took} on 2 CPU cores"
            self.say(
                f"SPE: fitting {seg.name} on {len(engine.ref_indices)} references ({took}; once, then "
                "kept in the fit cache for later runs on the same references)"
            )
        start = time.perf_counter()
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
        """One evaluation of ``model``'s current weights over ``sets`` (default: calibration and targets), as a
        dict of a record's measurements (``pseudo``, ``real``, ``confidence``, ``n_support``, ``reasons``,
        ``seconds``, ``distance``); :meth:`SPERun.record` makes the :class:`~spe_lightning.engine.records.Record`.

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
            try:
                parts = shard.run(run)
            except (ValueError, TypeError):  # SPE's own checks of the output: they say what is wrong
                raise
            except Exception as err:  # the model's own error (a size it cannot take...): name the set
                raise RuntimeError(f"the model failed on the {name!r} set: {type(err).__name__}: {err}") from err
            for r, (m, cf) in enumerate(parts):
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

    def _hook_sets(self, model: nn.Module, epoch: int, measured: dict[str, Any]) -> tuple[str, ...] | None:
        """Add the record hooks' sets to ``measured`` (a record not yet made); their names, or None without any."""
        selection: set[str] | None = None
        for hook in self.record_hooks:
            extra = self.guarded(
                f"record hook at epoch {epoch} skipped", functools.partial(hook_sets, hook, model, epoch)
            )
            for name, values in (extra or {}).items():
                for kind in ("pseudo", "real", "confidence"):
                    measured[kind][name] = values[kind]
            if extra:
                selection = {*(selection or ()), *extra}
        return None if selection is None else tuple(sorted(selection))

    def _keep_masks(self, epoch: int) -> dict[str, float | None]:
        """Keep the evaluated masks (bit-packed, last K); each set's checkpoint agreement for the record."""
        start = time.perf_counter()
        pending, self._pending_masks = self._pending_masks, {}
        for name, masks in pending.items():
            self.history.push(name, masks, epoch)
        agreement = {name: self.history.agreement(name) for name in pending}
        self.signal_seconds["agreement"] += time.perf_counter() - start
        return agreement

    def _distances(self, predictions: Mapping[str, Any], from_calibration: bool) -> dict[str, float | None]:
        """Each set's label-free distance to the calibration set (engine/distance.py) at these weights; the
        calibration pairs' sets (``from_calibration``) are measured against the last calibration features, never
        matching an item with its own original."""
        feats = {name: image_features(data, masks, conf) for name, (data, masks, conf) in predictions.items()}
        if CALIBRATION in feats:
            self.calibration_features = feats[CALIBRATION]
        self.set_features.update((name, f) for name, f in feats.items() if name != CALIBRATION)
        cal = self.calibration_features
        if cal is None:
            return {}
        cal_ids = list(self._sets[CALIBRATION].indices) if from_calibration else None
        return {
            name: set_distance(f, cal, list(predictions[name][0].indices) if from_calibration else None, cal_ids)
            for name, f in feats.items()
            if name != CALIBRATION
        }

    def pair_features(self) -> dict[str, np.ndarray]:
        """The generic calibration pairs' item features at the final weights, by pair name (styled pairs are
        made to look like a target, so they never count as a calibrated set it resembles)."""
        return {
            p["name"]: self.set_features[p["name"]]
            for p in self.pairs
            if p.get("target") is None and p["name"] in self.set_features
        }

    def nearest_set_distances(self) -> dict[str, float | None]:
        """Each target's nearest-set distance (:func:`~spe_lightning.engine.distance.nearest_set_distance`) at
        the last weights; empty without calibration features or generic pairs."""
        cal, pairs = self.calibration_features, self.pair_features()
        if cal is None or not pairs:
            return {}
        feats = self.set_features
        return {t: nearest_set_distance(feats[t], cal, pairs) for t in self._targets if t in feats}

    def check_model(self, model: nn.Module) -> None:
        """Run the model on the first item of the calibration set and of every target; raise a ``ValueError`` naming
        the set and its item shape when the forward fails, so a set the model cannot take shows before training,
        not as every evaluation skipped. What the output holds is checked at each evaluation (a warning)."""
        device = model_device(model)
        for name in (CALIBRATION, *self._targets):
            data = self._sets[name]
            x = data.inputs[0][None].to(device)
            x = x if x.is_floating_point() else x.float()  # as predict_labels casts integer images
            try:
                with torch.no_grad(), eval_mode(model):
                    model(x) if self.logits_fn is default_logits else self.logits_fn(model, x)
            except Exception as err:
                first = " ".join(str(err).split())[:300]
                raise ValueError(
                    f"SPE: the model cannot take the {name!r} set's items (item 0 has shape {list(x.shape[1:])}): "
                    f"{type(err).__name__}: {first} Give that set items the model takes (the size and channels it "
                    "trains on), or leave the set out."
                ) from err

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None after a warning naming ``what`` when it fails (``strict``: raised)."""
        try:
            return fn()
        except Exception as err:
            if self.config.strict:
                raise
            self.warn(f"SPE: {what}: {err!r}")
            return None

    # ------------------------------------------------------------------ calibration pairs
    def warn_if_few_pairs(self) -> None:
        """Warn when the settings give fewer calibration pairs than an interval model is fitted on (the intervals
        then come from G's residuals across checkpoints, which see no shift)."""
        c = self.config
        sizes = subset_sizes_of(len(self._sets[CALIBRATION]), [len(self._sets[t]) for t in self._targets])
        count = len(sizes) * c.interval_subsets + len(c.interval_shifts) * len(c.interval_severities)
        if c.anchored and 0 < count < MIN_PAIRS:  # none at all: the user chose G's residuals
            self.warn(
                f"SPE: interval_subsets={c.interval_subsets} and {len(c.interval_shifts)} shift(s) x "
                f"{len(c.interval_severities)} severity(ies) give {count} calibration pair(s), and an interval is "
                f"fitted on at least {MIN_PAIRS}: the intervals will come from G's residuals across checkpoints, "
                "which see no shift (often too narrow). Keep the defaults or add shifts."
            )

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
            return self._pairs_of(record, sets)

        pairs = self.guarded("the calibration pairs for the intervals failed; G's residuals are used", measure)
        self.pairs = pairs or []
        self.pairs_seconds = time.perf_counter() - start
        if pairs and c.verbose:
            self.say(f"SPE: {len(pairs)} calibration pairs for the intervals ({time.perf_counter() - start:.1f}s)")
        if pairs and c.styled_pairs:
            start = time.perf_counter()
            styled = self.guarded(
                "the target-styled calibration pairs failed; the targets use the generic pairs",
                lambda: self.measure_styled_pairs(model, shard),
            )
            self.pairs += styled or []
            self.signal_seconds["styled_pairs"] = time.perf_counter() - start
        if pairs and c.size_probes:
            start = time.perf_counter()
            self.pseudo_by_size = self.guarded(
                "the size probes failed; sets smaller than the calibrated ones keep the calibration set's anchor",
                lambda: self.measure_size_probes(model, shard),
            )
            self.signal_seconds["size_probes"] = time.perf_counter() - start
        return self.pairs

    def measure_size_probes(self, model: nn.Module, shard: Shard | None = None) -> dict[str, Any] | None:
        """The calibration set's pseudo metrics on disjoint random subsets of 1, 2, 4, ... images and of the
        generic pairs' smallest set size (:mod:`~spe_lightning.engine.set_size`): the anchor of smaller sets."""
        sizes = [p["n"] for p in self.pairs if p.get("target") is None and isinstance(p.get("n"), int)]
        if not sizes or min(sizes) < 2:
            return None
        c = self.config
        sets = probe_sets(self._sets[CALIBRATION], min(sizes), c.size_probes, c.seed)
        record = self.evaluate(model, shard, sets, from_calibration=True)
        return probe_values(record["pseudo"], sets, c.keys)

    def styled_sets(self) -> dict[str, CachedSet]:
        """Each target's styled calibration set (the calibration set restyled as the target from its unlabelled
        images; :func:`~spe_lightning.engine.styled_pairs.styled_set`), by set name; the styles go to ``styles``."""
        out = {}
        for i, t in enumerate(self._targets):
            seed = self.config.seed * 7919 + 31 * i
            data, style = styled_set(self._sets[CALIBRATION], self._sets[t], seed=seed, styling=self.config.styling)
            self.styles[t] = {k: v for k, v in style.items() if k != "target_images"}
            out[data.name] = data
        return out

    def measure_styled_pairs(self, model: nn.Module, shard: Shard | None = None) -> list[dict[str, Any]]:
        """One labelled pair per target from its styled calibration set at ``model``'s weights (one set
        evaluation per target); each carries ``"target"`` and joins only that target's interval model."""
        sets = self.styled_sets()
        record = self.evaluate(model, shard, sets, from_calibration=True)  # restyled calibration items
        return self._pairs_of(record, sets, {styled_name(t): t for t in self._targets})

    def _pairs_of(
        self, record: dict[str, Any], sets: Mapping[str, CachedSet], targets: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The labelled pairs of ``sets`` evaluated in ``record`` against the last record's calibration set
        (``targets``: set name -> the target a styled set was made for), each with its distance to the calibration
        set (the reach of the interval model it joins) and its set's size ``n``."""
        last = self.records[-1]
        for kind in ("pseudo", "real"):
            record[kind][CALIBRATION] = dict(last.measured(kind).get(CALIBRATION, {}))
        pairs = pairs_from_record(record, CALIBRATION, list(sets), targets)
        for p in pairs:
            p.setdefault("distance", record["distance"].get(p["name"]))
            p["n"] = len(sets[p["name"]])
            if p["kind"] == "subset":  # engine.calibration_pairs.independent_set_scale
                p["n_calibration"] = len(self._sets[CALIBRATION])
        return pairs


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
