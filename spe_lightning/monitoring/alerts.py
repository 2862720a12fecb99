"""Monitoring: the monitorable scalars of a running estimate, and alerts against thresholds (pure functions).

:func:`monitor_scalars` gives the values SPE puts in ``trainer.callback_metrics`` (so that
``ModelCheckpoint``/``EarlyStopping`` can monitor them): ``spe/estimate/<target>/<key>`` and, when
the estimate has an interval, ``spe/estimate_lower/...`` and ``spe/estimate_upper/...``. Before an
estimate exists (G needs 3 records) every tag is NaN: Lightning's ``ModelCheckpoint`` ranks NaN
below every real score, so a checkpoint kept before the first estimate is replaced by the first
estimated one and can never be the best.

:func:`alerts_for` compares estimates with ``alert_below`` / ``alert_above`` thresholds and returns
one :class:`AlertEvent` per crossing; :func:`alert_scalars` gives the logged 0/1 flags.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from spe_lightning.engine.results import Estimate

__all__ = ["AlertEvent", "alert_message", "alert_scalars", "alerts_for", "monitor_scalars", "MONITOR_TAGS"]

#: where an event happened: the fields :func:`alerts_for` takes as ``context``, in their JSON order
CONTEXT = ("epoch", "step", "stage", "chunk", "source")


@dataclasses.dataclass(frozen=True)
class AlertEvent:
    """One estimate beyond its threshold: ``compared`` (the estimate, or the pessimistic end of its interval
    with ``alert_on="lower"``) is ``direction`` (``"below"``/``"above"``) ``threshold``.

    Where it happened: ``epoch``/``step``/``stage`` (``"running"`` or ``"final"``) during a fit, ``chunk``
    for a chunked estimate; None where not given (and then left out of :meth:`to_dict`).
    """

    target: str
    metric: str
    value: float | None
    lower: float | None
    upper: float | None
    compared: float
    threshold: float
    direction: str
    alert_on: str
    epoch: int | None = None
    step: int | None = None
    stage: str | None = None
    chunk: Any = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as ``spe_report.json``'s ``alerts`` hold it (context fields only where given)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in CONTEXT}
        out.update({k: getattr(self, k) for k in CONTEXT if getattr(self, k) is not None})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertEvent:
        """An event from :meth:`to_dict`'s form (a checkpoint's ``alerts``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SPE: a stored alert event with unknown fields {unknown}; it is not an SPE alert.")
        return cls(**dict(data))


#: estimate field -> tag prefix of the monitorable scalars
MONITOR_TAGS = {"value": "spe/estimate", "lower": "spe/estimate_lower", "upper": "spe/estimate_upper"}


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def monitor_scalars(
    estimates: Mapping[str, Mapping[str, Estimate]] | None, targets: Sequence[str], keys: Sequence[str]
) -> dict[str, float]:
    """``{tag: value}`` for every target and key: the estimate and its bounds, NaN where there is none yet.

    ``estimates`` is ``{target: {key: Estimate}}`` (a running estimate's ``estimates``) or None before the
    first estimate. The set of tags never changes during a run, so
    a monitored tag is always present once the run is prepared.
    """
    out: dict[str, float] = {}
    for t in targets:
        for k in keys:
            e = (estimates or {}).get(t, {}).get(k)
            for field, prefix in MONITOR_TAGS.items():
                v = None if e is None else _finite(getattr(e, field))
                out[f"{prefix}/{t}/{k}"] = float("nan") if v is None else v
    return out


def _compared(e: Estimate, direction: str, alert_on: str) -> float | None:
    """The number a threshold is compared with: the estimate, or the pessimistic end of its interval."""
    if alert_on == "estimate":
        return _finite(e.value)
    v = _finite(e.lower if direction == "below" else e.upper)
    return v if v is not None else _finite(e.value)


def alerts_for(
    estimates: Mapping[str, Mapping[str, Estimate]],
    alert_below: Mapping[str, float] | None = None,
    alert_above: Mapping[str, float] | None = None,
    alert_on: str = "estimate",
    **context: Any,
) -> list[AlertEvent]:
    """One event per (target, key) whose estimate crosses its threshold.

    ``alert_below={"dice": 0.8}`` fires when the Dice estimate is below 0.8; ``alert_above={"hd95": 10}``
    when HD95 is above 10. ``alert_on="lower"`` compares the pessimistic end of the interval instead
    (the lower bound for ``alert_below``, the upper bound for ``alert_above``; the estimate where there
    is no interval), so it alerts earlier. Missing estimates never alert. ``context`` (fields of
    :class:`AlertEvent`: ``epoch``, ``step``, ``stage``, ``chunk``) is copied into every event.
    """
    unknown = sorted(set(context) - set(CONTEXT))
    if unknown:
        raise TypeError(f"alerts_for: unknown context {unknown}; an event can say {CONTEXT}.")
    events: list[AlertEvent] = []
    for direction, thresholds in (("below", alert_below), ("above", alert_above)):
        for key, threshold in (thresholds or {}).items():
            for target, per_key in estimates.items():
                e = per_key.get(key)
                v = None if e is None else _compared(e, direction, alert_on)
                if e is None or v is None or not (v < threshold if direction == "below" else v > threshold):
                    continue
                events.append(
                    AlertEvent(
                        target=target,
                        metric=key,
                        value=_finite(e.value),
                        lower=_finite(e.lower),
                        upper=_finite(e.upper),
                        compared=v,
                        threshold=float(threshold),
                        direction=direction,
                        alert_on=alert_on,
                        **context,
                    )
                )
    return events


def alert_scalars(
    events: Sequence[AlertEvent],
    targets: Sequence[str],
    alert_below: Mapping[str, float] | None = None,
    alert_above: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """``spe/alert/<target>/<key>``: 1.0 when an event fired for it, else 0.0, for every watched key."""
    watched = list(alert_below or {}) + [k for k in alert_above or {} if k not in (alert_below or {})]
    fired = {(e.target, e.metric) for e in events}
    return {f"spe/alert/{t}/{k}": float((t, k) in fired) for t in targets for k in watched}


def alert_message(event: AlertEvent | Mapping[str, Any]) -> str:
    """One line naming target, metric, value and threshold (and where: epoch or chunk).

    ``event`` is an :class:`AlertEvent` or its dict (a chunked result's ``alerts``)."""
    e = event if isinstance(event, AlertEvent) else AlertEvent.from_dict(event)
    where = ""
    if e.chunk is not None:
        where = f" in chunk {e.chunk}"
    elif e.stage == "final":
        where = f" at the final weights (epoch {e.epoch})"
    elif e.epoch is not None:
        where = f" at epoch {e.epoch}"
    what = "estimate" if e.alert_on == "estimate" else "interval bound"
    return (
        f"SPE alert: {e.target} {e.metric} {what} {e.compared:.3f} is {e.direction} "
        f"the threshold {e.threshold:g}{where}."
    )
