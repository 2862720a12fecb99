"""The typed report of a finished run: :class:`SPEReport` (``spe_report.json``).

Frozen; ``to_dict()`` writes exactly the JSON ``spe_report.json`` has always held (same sections, same order)
and ``from_dict()`` reads it back, reports written by earlier versions included. :meth:`SPERun.build_report
<spe_lightning.SPERun.build_report>` makes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from spe_lightning.engine.frozen import DictReads, check_stored, json_form, read_only
from spe_lightning.engine.records import Record
from spe_lightning.engine.results import Estimate, estimates_from_dict, estimates_to_dict

__all__ = ["REPORT_ORDER", "SPEReport", "as_report"]


#: the order of a report's sections in ``spe_report.json`` (sections it does not know follow, as read)
REPORT_ORDER = (
    "version",
    "metrics",
    "keys",
    "classes",
    "segmenter",
    "config",
    "support_size",
    "reference_indices",
    "reference_slices",
    "mapping",
    "estimates",
    "by_checkpoint",
    "true",
    "baselines",
    "level",
    "n_records",
    "anchor_intervals",
    "anchor_intervals_by_target",
    "records",
    "pairs",
    "reason",
    "signals",
    "alerts",
    "quality",
    "combined",
)


@dataclasses.dataclass(frozen=True)
class SPEReport(DictReads):
    """The report of a finished run (``spe_report.json``): per target and key an :class:`Estimate`, the run's
    records, and why there are no estimates (``reason``; None when there are).

    The report's other sections stay in their JSON form under ``sections`` (read-only), each readable as an
    attribute: ``mapping`` (G per key), ``by_checkpoint``, ``true``, ``baselines``, ``anchor_intervals``,
    ``pairs``, ``signals``, ``alerts`` (``AlertEvent.to_dict()`` rows), ``quality``, ``combined``, ``config``
    ... (None where the report has none: a report kept without estimates holds only ``estimates``, ``records``
    and ``reason``). Build a changed report with :meth:`with_sections`.

    ``report["estimates"]``, ``report.get("combined")`` read a section's JSON form (``spe_report.json``'s), as
    when the report was a dict.
    """

    estimates: Mapping[str, Mapping[str, Estimate]]
    records: tuple[Record, ...] = ()
    reason: str | None = None
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        clash = {"estimates", "records", "reason"} & set(self.sections)
        if clash:
            raise ValueError(f"SPEReport: {sorted(clash)} are fields of the report, not sections.")
        set_ = object.__setattr__  # frozen: the normalised values are written once, here
        set_(self, "estimates", estimates_from_dict(self.estimates))
        set_(self, "records", tuple(r if isinstance(r, Record) else Record.from_dict(r) for r in self.records))
        set_(self, "sections", read_only(self.sections))

    def __reduce__(self) -> tuple[Any, ...]:
        return (SPEReport.from_dict, (self.to_dict(),))

    def __getitem__(self, name: str) -> Any:
        # one section's JSON form, without writing the whole report
        if name == "estimates":
            return estimates_to_dict(self.estimates)
        if name == "records":
            return [r.to_dict() for r in self.records]
        if name == "reason":
            return self.reason
        return json_form(self.sections[name])

    def get(self, name: str, default: Any = None) -> Any:
        """The JSON form of section ``name`` (``estimates``, ``records`` and ``reason`` included), or ``default``."""
        return self[name] if name in self else default

    def __contains__(self, name: object) -> bool:
        return name in ("estimates", "records", "reason") or name in self.sections

    def keys(self) -> Any:
        """The report's sections, in ``spe_report.json``'s order."""
        return self.to_dict().keys()

    # ------------------------------------------------------------------ the sections, by name
    def section(self, name: str, default: Any = None) -> Any:
        """The section ``name`` (read-only), or ``default`` when the report has none."""
        return self.sections.get(name, default)

    @property
    def version(self) -> int | None:
        """The report format's version (None: a report kept without estimates)."""
        return self.section("version")

    @property
    def estimated_keys(self) -> list[str]:
        """The estimated keys (metrics, or per metric its class mean and ``"<metric>/<class>"``; the ``keys``
        section)."""
        return list(self.section("keys", ()))

    @property
    def metrics(self) -> list[str]:
        """The metrics the run estimated."""
        return list(self.section("metrics", ()))

    @property
    def targets(self) -> list[str]:
        """The targets, in the report's order."""
        return list(self.estimates)

    @property
    def level(self) -> float | None:
        """The intervals' level."""
        return self.section("level")

    @property
    def n_records(self) -> int:
        """The number of records G was fitted on."""
        return int(self.section("n_records", len(self.records)))

    @property
    def mapping(self) -> Mapping[str, Any]:
        """G per key (:meth:`MetricMapping.to_dict <spe_lightning.engine.mapping.MetricMapping.to_dict>`, or
        ``{"kind", "error"}``)."""
        return self.section("mapping", MappingProxyType({}))

    @property
    def true(self) -> Mapping[str, Mapping[str, float]]:
        """The real metrics of the targets that came with masks, at the last record."""
        return self.section("true", MappingProxyType({}))

    @property
    def baselines(self) -> Mapping[str, Any]:
        """The baselines beside SPE (``{baseline: {target: {key: value}}}``)."""
        return self.section("baselines", MappingProxyType({}))

    @property
    def by_checkpoint(self) -> Mapping[str, Any]:
        """Each target's estimate per record (``{target: {key: [value per record]}}``)."""
        return self.section("by_checkpoint", MappingProxyType({}))

    @property
    def anchor_intervals(self) -> Mapping[str, Any] | None:
        """The anchored estimates' interval model per key (None: not anchored)."""
        return self.section("anchor_intervals")

    @property
    def anchor_intervals_by_target(self) -> Mapping[str, Any]:
        """A target's own interval models (its target-styled pairs joined them)."""
        return self.section("anchor_intervals_by_target", MappingProxyType({}))

    @property
    def alerts(self) -> tuple[Mapping[str, Any], ...]:
        """The run's alert events in their JSON form (``AlertEvent.to_dict()``)."""
        return tuple(self.section("alerts", ()))

    @property
    def combined(self) -> Mapping[str, Any] | None:
        """The quality regressor's combination with SPE's Dice (None: no regressor, or no combination)."""
        return self.section("combined")

    def with_sections(self, **sections: Any) -> SPEReport:
        """A new report with ``sections`` added or replaced."""
        return dataclasses.replace(self, sections={**self.sections, **sections})

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Exactly ``spe_report.json``: plain dicts and lists, its sections in their usual order."""
        parts: dict[str, Any] = {
            "estimates": estimates_to_dict(self.estimates),
            "records": [r.to_dict() for r in self.records],
            "reason": self.reason,
        }
        names = [n for n in REPORT_ORDER if n in parts or n in self.sections]
        names += [n for n in self.sections if n not in REPORT_ORDER]
        return {n: parts[n] if n in parts else json_form(self.sections[n]) for n in names}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SPEReport:
        """A report from :meth:`to_dict`'s form (``json.load`` of ``spe_report.json``, older ones included)."""
        check_stored(data, "estimates", "a report", "it is not an SPE report")
        return cls(
            estimates=data["estimates"],
            records=tuple(data.get("records", ())),
            reason=data.get("reason"),
            sections={k: v for k, v in data.items() if k not in ("estimates", "records", "reason")},
        )


def as_report(report: SPEReport | Mapping[str, Any]) -> SPEReport:
    """``report`` as an :class:`SPEReport` (a ``json.load``-ed ``spe_report.json`` is read with
    :meth:`SPEReport.from_dict`)."""
    return report if isinstance(report, SPEReport) else SPEReport.from_dict(report)
