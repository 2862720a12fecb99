"""A run's records, and G over them: fitted per metric on the calibration set, then every target's estimate.

A :class:`Record` is one evaluation at one checkpoint (frozen once made); ``to_dict()`` is its JSON form
(``spe_report.json``'s ``records``, the checkpoint state) and ``from_dict()`` reads it back, older
checkpoints' dicts included. The functions here take ``Sequence[Record]``; stored benchmark JSON (plain
dicts) is read through :func:`as_records`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from spe_lightning.engine.calibration_pairs import pairs_for_target
from spe_lightning.engine.estimate import anchored_value, estimate, finite_or_none, fit_interval_model
from spe_lightning.engine.frozen import json_form, read_only
from spe_lightning.engine.mapping import MetricMapping, NotEnoughPointsError
from spe_lightning.engine.metrics import BOUNDED

__all__ = ["CALIBRATION", "Record", "as_records", "fit_and_estimate", "fit_mapping", "series"]

#: the record key of the calibration set
CALIBRATION = "calibration"

#: the per-set measurements a record holds (what :func:`series` reads)
KINDS = ("pseudo", "real", "confidence", "n_support", "reasons", "distance", "agreement")


@dataclasses.dataclass(frozen=True)
class Record:
    """One evaluation of a model's weights: per set (calibration, targets, a record hook's sets) its pseudo
    and real metrics, confidence, support size, why it has no pseudo metric, distance to the calibration set
    and checkpoint agreement. Read-only: its maps are ``MappingProxyType`` (use :meth:`to_dict` for a copy).

    ``distance``, ``agreement``, ``selection`` (the record hooks' set names) and ``epoch_seconds`` (the
    epoch's wall time up to this evaluation, from the callback) are None where the record has none;
    ``extra`` keeps keys of a stored record this version does not know, so nothing read is lost.
    """

    pseudo: Mapping[str, Mapping[str, float | None]]
    real: Mapping[str, Mapping[str, float]]
    confidence: Mapping[str, float | None]
    n_support: Mapping[str, Any]
    reasons: Mapping[str, str]
    seconds: float
    epoch: int
    step: int
    final: bool = False
    distance: Mapping[str, float | None] | None = None
    selection: tuple[str, ...] | None = None
    agreement: Mapping[str, float | None] | None = None
    epoch_seconds: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, read_only(getattr(self, field.name)))

    def __reduce__(self) -> tuple[Any, ...]:
        # MappingProxyType does not pickle: a record pickles (and deep-copies) as its dict form
        return (Record.from_dict, (self.to_dict(),))

    def measured(self, kind: str) -> Mapping[str, Any]:
        """``{set: value}`` of one of :data:`KINDS` (empty where the record has none)."""
        if kind not in KINDS:
            raise KeyError(f"a record has no {kind!r}; it holds {KINDS}.")
        return getattr(self, kind) or MappingProxyType({})

    def as_final(self, final: bool = True) -> Record:
        """This record marked as the one at the final weights (a new record); ``False``: no longer the final one."""
        return dataclasses.replace(self, final=final)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, in the key order records have always had in ``spe_report.json``."""
        out: dict[str, Any] = {
            "pseudo": json_form(self.pseudo),
            "real": json_form(self.real),
            "confidence": json_form(self.confidence),
            "n_support": json_form(self.n_support),
            "reasons": json_form(self.reasons),
            "seconds": self.seconds,
        }
        if self.distance is not None:
            out["distance"] = json_form(self.distance)
        out.update(epoch=self.epoch, step=self.step, final=self.final)
        if self.selection is not None:
            out["selection"] = list(self.selection)
        if self.agreement is not None:
            out["agreement"] = json_form(self.agreement)
        if self.epoch_seconds is not None:
            out["epoch_seconds"] = self.epoch_seconds
        out.update(json_form(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], position: int | None = None) -> Record:
        """A record from :meth:`to_dict`'s form (a checkpoint's or a report's); keys an older version did not
        write are None/empty, keys this version does not know are kept in ``extra``.

        ``position``: the epoch and step of a measurement without them (:meth:`SPEEngine.evaluate
        <spe_lightning.engine.spe_engine.SPEEngine.evaluate>`'s output used without a run); without it they
        are required."""
        needed = ("pseudo",) if position is not None else ("pseudo", "epoch", "step")
        missing = [k for k in needed if k not in data]
        if missing:
            raise ValueError(f"SPE: a stored record without {missing} (keys: {sorted(data)}); it is not an SPE record.")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        selection = data.get("selection")
        return cls(
            pseudo=data["pseudo"],
            real=data.get("real", {}),
            confidence=data.get("confidence", {}),
            n_support=data.get("n_support", {}),
            reasons=data.get("reasons", {}),
            seconds=float(data.get("seconds", 0.0)),
            epoch=int(data.get("epoch", position)),
            step=int(data.get("step", position)),
            final=bool(data.get("final", False)),
            distance=data.get("distance"),
            selection=None if selection is None else tuple(selection),
            agreement=data.get("agreement"),
            epoch_seconds=data.get("epoch_seconds"),
            extra={k: v for k, v in data.items() if k not in known},
        )


def as_records(records: Sequence[Record] | Sequence[Mapping[str, Any]]) -> list[Record]:
    """``records`` as :class:`Record` objects: stored JSON records (a benchmark result's, a report's) and
    :meth:`SPEEngine.evaluate <spe_lightning.engine.spe_engine.SPEEngine.evaluate>`'s measurements (numbered
    by their position when they carry no epoch) are read with :meth:`Record.from_dict`; records pass through."""
    items: Sequence[Record | Mapping[str, Any]] = records
    return [r if isinstance(r, Record) else Record.from_dict(r, position=i) for i, r in enumerate(items)]


def series(
    records: Sequence[Record] | Sequence[Mapping[str, Any]], kind: str, name: str, metric: str | None
) -> np.ndarray:
    """``records[i].<kind>[name][metric]`` (or ``[name]`` when metric is None) as floats, NaN where missing.

    Stored JSON records are read as :func:`as_records` reads them."""
    out = []
    for r in as_records(records):
        v = r.measured(kind).get(name)
        if metric is not None:
            v = None if v is None else v.get(metric)
        out.append(np.nan if v is None else float(v))
    return np.asarray(out, dtype=float)


def fit_mapping(kind: str, x: np.ndarray, y: np.ndarray, metric: str) -> tuple[MetricMapping | None, str | None]:
    """``(G, None)`` fitted within the metric's bounds, or ``(None, reason)`` when too few points."""
    try:
        # per-class keys ("dice/heart") have the bounds of their metric
        bounds = BOUNDED.get(metric, BOUNDED.get(metric.split("/")[0], (None, None)))
        return MetricMapping.fit(kind, x, y, bounds=bounds), None
    except NotEnoughPointsError as err:
        return None, str(err)


def fit_and_estimate(
    records: Sequence[Record] | Sequence[Mapping[str, Any]],
    targets: Sequence[str],
    metrics: Sequence[str],
    mapping: str = "linear",
    level: float = 0.9,
    anchored: bool = True,
    pairs: Sequence[dict[str, Any]] | None = None,
    bounds: dict[str, tuple[float | None, float | None]] | None = None,
    distances: dict[str, float | None] | None = None,
    nearest: dict[str, float | None] | None = None,
    sizes: Mapping[str, int] | None = None,
    probes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit G per metric (calibration pseudo -> real, one point per record) and estimate every target.

    ``anchored`` (default): the estimate is the calibration score at the same record moved by
    ``G(p_target) - G(p_calibration)`` (``method: "anchored"``, see :mod:`spe_lightning.engine.estimate`);
    the paper's ``G(p_target)`` stays under ``paper``. ``pairs`` (labelled calibration pairs from
    :mod:`~spe_lightning.engine.calibration_pairs` at the last record's weights) give the
    anchored intervals; without them G's leave-one-out residuals do. A target's interval model uses the
    generic pairs and the pairs styled like it (``"target": <name>``; kept under
    ``anchor_intervals_by_target`` when there are any). ``bounds`` overrides a key's range (hd95: the
    image diagonal); ``distances`` (default: the last record's ``"distance"``) are the targets'
    label-free distances to the calibration set, which widen intervals beyond the pairs' reach; ``nearest``
    their nearest-set distances (:func:`~spe_lightning.engine.distance.nearest_set_distance`), which flag a
    target that looks like no calibrated set; ``sizes`` the targets' numbers of items (a target smaller than
    every pair's set gets a wider interval and, with ``probes`` (:mod:`~spe_lightning.engine.set_size`), the
    calibration pseudo metric at its size as anchor).

    ``by_checkpoint`` is computed with the final rule (the interval model's move), so its last point is
    the final estimate; a metric found unreliable has none.

    Returns a dict with ``mapping``, ``estimates`` (``{target: {key: Estimate}}`` at the last record: value,
    lower, upper, pseudo, reason, and ``true`` for targets with masks), ``by_checkpoint`` (estimate per
    record), ``true`` (targets with masks, at the last record) and ``baselines``
    (``calibration_score``: the calibration metric at the same record; ``confidence``: the model's
    soft-Dice confidence mapped by a G of the same kind fitted on calibration); everything but the
    estimates is plain JSON (:class:`~spe_lightning.engine.run_report.SPEReport` holds it in the report).
    """
    records = as_records(records)
    last = len(records) - 1
    out: dict[str, Any] = {
        "mapping": {},
        "estimates": {t: {} for t in targets},
        "by_checkpoint": {t: {} for t in targets},
        "true": {},
        "baselines": {"calibration_score": {t: {} for t in targets}, "confidence": {t: {} for t in targets}},
        "level": level,
        "n_records": len(records),
    }
    if anchored:
        out["anchor_intervals"] = {}
    styled = {t for t in targets if any(p.get("target") == t for p in pairs or [])}
    if anchored and styled:
        out["anchor_intervals_by_target"] = {t: {} for t in sorted(styled)}
    if distances is None:
        distances = dict(records[last].distance or {}) if last >= 0 else {}
    bounds = bounds or {}
    conf_cal = series(records, "confidence", CALIBRATION, None)
    for metric in metrics:
        x = series(records, "pseudo", CALIBRATION, metric)
        y = series(records, "real", CALIBRATION, metric)
        g, why = fit_mapping(mapping, x, y, metric)
        out["mapping"][metric] = g.to_dict() if g else {"kind": mapping, "error": why}
        g_conf, _ = fit_mapping(mapping, conf_cal, y, metric)
        interval_model = None
        key_bounds = bounds.get(metric)
        if anchored and g is not None and pairs:
            interval_model = fit_interval_model(  # the generic pairs: no target-styled ones
                pairs_for_target(pairs, None), metric, g, finite_or_none(x[last]), bounds=key_bounds, level=level
            )
        if anchored:
            out["anchor_intervals"][metric] = interval_model
        for t in targets:
            model_t = interval_model
            if t in styled and g is not None:
                model_t = fit_interval_model(
                    pairs or [], metric, g, finite_or_none(x[last]), target=t, bounds=key_bounds, level=level
                )
                out["anchor_intervals_by_target"][t][metric] = model_t
            xt = series(records, "pseudo", t, metric)
            no_g = f"no mapping G: {why}"
            cal_reason = (records[last].reasons if last >= 0 else {}).get(CALIBRATION)
            if cal_reason:  # why the calibration set gave no pseudo metric
                no_g += f" (calibration: {cal_reason})"
            reason = (records[last].reasons if last >= 0 else {}).get(t)
            est = estimate(
                g,
                metric,
                xt[last] if last >= 0 else None,
                level,
                no_g=no_g,
                no_pseudo=f"no pseudo {metric} at the last checkpoint" + (f" ({reason})" if reason else ""),
                anchor=(x[last], y[last], model_t) if anchored and last >= 0 else None,
                distance=finite_or_none(distances.get(t)),
                bounds=key_bounds,
                nearest=finite_or_none((nearest or {}).get(t)),
                n_images=(sizes or {}).get(t),
                probes=probes,
            )
            true = series(records, "real", t, metric)
            if last >= 0 and np.isfinite(true[last]):  # next to the estimate, for targets that came with masks
                est = est.with_true(float(true[last]))
            out["estimates"][t][metric] = est
            if anchored and g is not None:
                series_ = _anchored_series(g, metric, xt, x, y, model_t, key_bounds)
                if est.reliable is False:  # no number for a metric SPE cannot follow, at any checkpoint
                    series_ = [None] * len(series_)
                out["by_checkpoint"][t][metric] = series_
            elif g is not None:
                ok = np.isfinite(xt)
                vals = np.full(len(xt), np.nan)
                if ok.any():
                    vals[ok] = g.predict(xt[ok])
                out["by_checkpoint"][t][metric] = [finite_or_none(v) for v in vals]
            out["baselines"]["calibration_score"][t][metric] = finite_or_none(y[last]) if last >= 0 else None
            ct = series(records, "confidence", t, None)
            conf_val = None
            if g_conf is not None and last >= 0 and np.isfinite(ct[last]):
                conf_val = finite_or_none(g_conf.predict([ct[last]])[0])
            out["baselines"]["confidence"][t][metric] = conf_val
            if est.true is not None:
                out["true"].setdefault(t, {})[metric] = est.true
    return out


def _anchored_series(
    g: Any,
    metric: str,
    xt: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    model: dict[str, Any] | None = None,
    bounds: tuple[float | None, float | None] | None = None,
) -> list[float | None]:
    """Anchored estimate per record with the final rule: the calibration score moved as ``model`` moves
    (G's move, the pairs' slope or a mix), so that the last record's value is the final estimate."""
    return [
        anchored_value(g, metric, finite_or_none(a), finite_or_none(b), finite_or_none(c), model, bounds)
        for a, b, c in zip(xt, x, y)
    ]
