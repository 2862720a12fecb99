"""One typed estimate: :class:`Estimate` (a set's metric, with its interval and how it was made).

Frozen; ``to_dict()`` writes exactly the estimate's JSON in ``spe_report.json`` (same keys, same order) and
``from_dict()`` reads it back, reports and estimator files written by earlier versions included.
:func:`~spe_lightning.engine.estimate.estimate` makes them; :class:`~spe_lightning.engine.run_report.SPEReport`
holds a run's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from spe_lightning.engine.frozen import DictReads, check_stored, json_form, read_only

__all__ = ["Estimate", "Interval", "estimates_from_dict", "estimates_to_dict"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A value with its interval (the paper's ``G(pseudo)`` beside an anchored estimate, or the numbers an
    unreliable metric withheld)."""

    value: float | None
    lower: float | None
    upper: float | None

    def to_dict(self) -> dict[str, float | None]:
        """``{"value", "lower", "upper"}``."""
        return {"value": self.value, "lower": self.lower, "upper": self.upper}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interval:
        """The interval of :meth:`to_dict`'s form."""
        return cls(data.get("value"), data.get("lower"), data.get("upper"))


#: the keys an estimate's dict form may hold, in the order it writes them (anything else goes to ``extra``)
ESTIMATE_KEYS = (
    "value",
    "lower",
    "upper",
    "pseudo",
    "reason",
    "method",
    "paper",
    "distance",
    "pairs_distance",
    "outside_calibrated_range",
    "nearest_set_distance",
    "n_images",
    "pairs_n_images",
    "styled_anchor",
    "anchor_pseudo",
    "reliable",
    "unreliable",
    "withheld",
    "true",
)


@dataclasses.dataclass(frozen=True)
class Estimate(DictReads):
    """One metric's estimate for one set: the value and its interval (None with a ``reason`` when SPE cannot
    stand behind a number), and how it was made.

    Attributes:
        value, lower, upper: the estimate and its interval at the run's ``level``; None when there is none.
        pseudo: the set's pseudo metric (None: the reverse step gave none).
        reason: why there is no value (no G, no pseudo metric, ``"unreliable: ..."``); None otherwise.
        method: ``"paper"`` (``G(pseudo)``) or ``"anchored"``; None when nothing was estimated.
        paper: the paper's ``G(pseudo)`` with its interval beside an anchored estimate.
        from_pairs: the interval came from the labelled calibration pairs' model; only then are ``distance``,
            ``pairs_distance`` and ``outside_calibrated_range`` part of the estimate (each may still be None).
        distance: the set's label-free distance to the calibration set; ``pairs_distance``: the farthest
            calibration pair's; ``outside_calibrated_range``: the set lies beyond every pair (interval widened,
            :attr:`widened_by_distance`) or looks like no calibrated set (``nearest_set_distance``, its distance
            to the calibration set or pair set it is most like, above
            :data:`~spe_lightning.engine.distance.NEAREST_SET_LIMIT`; None when not measured), or holds fewer
            images (``n_images``) than every pair's set (``pairs_n_images``; interval widened,
            :attr:`widened_by_size`; both None when the pairs' sizes are not known).
        styled_anchor: the estimate anchored on the target-styled calibration set (its real score plus the same
            move from its pseudo metric); the interval spans it. None without a styled pair for the set.
        anchor_pseudo: the calibration pseudo metric the estimate was anchored on when the set is smaller than
            the calibrated ones: the calibration set's at the set's size, from fit-end size probes
            (:mod:`~spe_lightning.engine.set_size`; equal to the whole set's when they show no size effect); None
            when the probes do not apply (anchored on the whole calibration set's).
        reliable: False when the pairs show SPE does not track the metric (``unreliable`` says why and the
            numbers it would have said are under ``withheld``); None when the interval model says nothing.
        true: the set's real metric, for sets that came with masks.
        extra: keys of a stored estimate this version does not know, kept so that nothing read is lost.

    ``estimate["value"]`` and ``estimate.get("reason")`` read the dict form, as when estimates were dicts.
    """

    value: float | None
    lower: float | None
    upper: float | None
    pseudo: float | None = None
    reason: str | None = None
    method: str | None = None
    paper: Interval | None = None
    from_pairs: bool = False
    distance: float | None = None
    pairs_distance: float | None = None
    outside_calibrated_range: bool | None = None
    nearest_set_distance: float | None = None
    n_images: int | None = None
    pairs_n_images: int | None = None
    styled_anchor: float | None = None
    anchor_pseudo: float | None = None
    reliable: bool | None = None
    unreliable: str | None = None
    withheld: Interval | None = None
    true: float | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", read_only(self.extra))

    def __reduce__(self) -> tuple[Any, ...]:
        # MappingProxyType does not pickle: an estimate pickles (and deep-copies) as its dict form
        return (Estimate.from_dict, (self.to_dict(),))

    @property
    def interval(self) -> tuple[float | None, float | None]:
        """``(lower, upper)``."""
        return self.lower, self.upper

    @property
    def widened_to_styled_anchor(self) -> bool:
        """Whether one end of the interval is the styled anchor: it lay beyond the interval SPE gives otherwise and
        the interval was widened to reach it (or it sits on an end clipped to the metric's range)."""
        a = self.styled_anchor
        if a is None or self.value is None or self.lower is None or self.upper is None:
            return False
        return bool(math.isclose(a, self.lower, abs_tol=1e-9) or math.isclose(a, self.upper, abs_tol=1e-9))

    @property
    def widened_by_distance(self) -> bool:
        """Whether the interval was widened because the set lies farther from the calibration set than every
        calibration pair (``distance > pairs_distance``)."""
        d, reach = self.distance, self.pairs_distance
        return d is not None and reach is not None and d > reach

    @property
    def widened_by_size(self) -> bool:
        """Whether the interval was widened because the set holds fewer images than every calibration pair's set
        (its mean varies more than the pairs showed)."""
        n, m = self.n_images, self.pairs_n_images
        return n is not None and m is not None and n < m

    @property
    def range_note(self) -> str | None:
        """A short note when the set is outside the calibrated range (None otherwise): widened, or only unlike
        every calibrated set (the interval then extrapolates at its usual width)."""
        if not self.outside_calibrated_range:
            return None
        if self.widened_by_size:
            n, m = self.n_images, self.pairs_n_images
            anchored = ", anchored on calibration subsets of its size" if self.anchor_pseudo is not None else ""
            return (
                f"outside the calibrated range: {n} images, fewer than the calibrated sets' {m}; interval widened"
                + anchored
            )
        if self.widened_by_distance:
            return "outside the calibrated range: interval widened"
        return "outside the calibrated range: unlike every calibrated set, interval not widened"

    def with_true(self, true: float | None) -> Estimate:
        """This estimate with the set's real metric beside it (a new estimate)."""
        return dataclasses.replace(self, true=true)

    def to_dict(self) -> dict[str, Any]:
        """The estimate's JSON form, in the key order of ``spe_report.json``."""
        out: dict[str, Any] = {
            "value": self.value,
            "lower": self.lower,
            "upper": self.upper,
            "pseudo": self.pseudo,
            "reason": self.reason,
        }
        if self.method is not None:
            out["method"] = self.method
        if self.paper is not None:
            out["paper"] = self.paper.to_dict()
        if self.from_pairs:
            out.update(
                distance=self.distance,
                pairs_distance=self.pairs_distance,
                outside_calibrated_range=self.outside_calibrated_range,
            )
        if self.nearest_set_distance is not None:
            out["nearest_set_distance"] = self.nearest_set_distance
        if self.n_images is not None:
            out["n_images"], out["pairs_n_images"] = self.n_images, self.pairs_n_images
        if self.styled_anchor is not None:
            out["styled_anchor"] = self.styled_anchor
        if self.anchor_pseudo is not None:
            out["anchor_pseudo"] = self.anchor_pseudo
        if self.reliable is not None:
            out["reliable"] = self.reliable
        if self.reliable is False:
            out["unreliable"] = self.unreliable
        if self.withheld is not None:
            out["withheld"] = self.withheld.to_dict()
        if self.true is not None:
            out["true"] = self.true
        out.update(json_form(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Estimate:
        """An estimate from :meth:`to_dict`'s form (a report's, an estimator file's, an older version's)."""
        check_stored(data, "value", "a stored estimate", "it is not an SPE estimate")
        paper, withheld = data.get("paper"), data.get("withheld")
        return cls(
            value=data["value"],
            lower=data.get("lower"),
            upper=data.get("upper"),
            pseudo=data.get("pseudo"),
            reason=data.get("reason"),
            method=data.get("method"),
            paper=None if paper is None else Interval.from_dict(paper),
            from_pairs="outside_calibrated_range" in data and "pairs_distance" in data,
            distance=data.get("distance"),
            pairs_distance=data.get("pairs_distance"),
            outside_calibrated_range=data.get("outside_calibrated_range"),
            nearest_set_distance=data.get("nearest_set_distance"),
            n_images=data.get("n_images"),
            pairs_n_images=data.get("pairs_n_images"),
            styled_anchor=data.get("styled_anchor"),
            anchor_pseudo=data.get("anchor_pseudo"),
            reliable=data.get("reliable"),
            unreliable=data.get("unreliable"),
            withheld=None if withheld is None else Interval.from_dict(withheld),
            true=data.get("true"),
            extra={k: v for k, v in data.items() if k not in ESTIMATE_KEYS or _not_written(k, data)},
        )


def _not_written(key: str, data: Mapping[str, Any]) -> bool:
    """Whether ``to_dict`` would not write ``key`` from the fields ``from_dict`` reads (kept in ``extra``)."""
    if key in ("distance", "pairs_distance", "outside_calibrated_range"):
        return not ("outside_calibrated_range" in data and "pairs_distance" in data)
    if key == "unreliable":
        return data.get("reliable") is not False
    if key in ("n_images", "pairs_n_images"):
        return data.get("n_images") is None
    keys = ("method", "paper", "nearest_set_distance", "styled_anchor", "anchor_pseudo", "reliable", "withheld", "true")
    return key in keys and data[key] is None


def estimates_to_dict(estimates: Mapping[str, Mapping[str, Estimate]]) -> dict[str, dict[str, Any]]:
    """``{target: {key: Estimate}}`` as plain dicts."""
    return {t: {k: e.to_dict() for k, e in per_key.items()} for t, per_key in estimates.items()}


def estimates_from_dict(data: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Estimate]]:
    """``{target: {key: estimate dict or Estimate}}`` as read-only maps of :class:`Estimate`."""
    return MappingProxyType(
        {
            t: MappingProxyType({k: e if isinstance(e, Estimate) else Estimate.from_dict(e) for k, e in per.items()})
            for t, per in data.items()
        }
    )
