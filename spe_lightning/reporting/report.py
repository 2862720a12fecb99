"""Reports of an SPE run: JSON, CSV, a summary table and a figure."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spe_lightning.engine.distance import NEAREST_SET_LIMIT
from spe_lightning.engine.frozen import json_form
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.records import CALIBRATION, Record
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.run_report import SPEReport, as_report

__all__ = [
    "by_checkpoint_scalars",
    "evaluation_line",
    "make_figure",
    "record_scalars",
    "report_scalars",
    "summary_table",
    "write_csv",
    "write_json",
]


#: the baseline rows of the label-free signals (engine/signals.py), as CSV columns
SIGNAL_COLUMNS = ("soft_dice_confidence", "styled_calibration_score", "agreement")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _finite(flat: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items() if v is not None and np.isfinite(v)}


def record_scalars(record: Record, running: dict[str, Any] | None = None) -> dict[str, float]:
    """Logger scalars of one evaluation: ``spe/pseudo/<set>/<key>``, ``spe/real/calibration/<key>`` and,
    with a ``running`` estimate (:func:`~spe_lightning.engine.records.fit_and_estimate`), ``spe/estimate/<t>/<key>``."""
    flat: dict[str, Any] = {}
    for name, values in record.pseudo.items():
        flat.update({f"spe/pseudo/{name}/{m}": v for m, v in values.items()})
    flat.update({f"spe/real/calibration/{m}": v for m, v in record.real.get(CALIBRATION, {}).items()})
    if running is not None:
        for t, per_metric in running["estimates"].items():
            flat.update({f"spe/estimate/{t}/{m}": e.value for m, e in per_metric.items()})
    return _finite(flat)


def report_scalars(report: SPEReport | Mapping[str, Any]) -> dict[str, float]:
    """Logger scalars of the final estimates: ``spe/estimate[_lower|_upper]/<target>/<key>`` and
    ``spe/final_estimate/<target>/<key>`` (the report's value: at fit end the calibration pairs may move it
    from the last running estimate, which ``spe/estimate`` already holds at that step, *provisional*).

    Flags: ``spe/reliable/<target>/<key>`` (0: the metric is unreliable and has no final scalar),
    ``spe/outside_calibrated_range/<target>`` (1: farther from the calibration set than every calibration
    pair, its intervals widened, or like none of the calibrated sets), ``spe/distance/<target>`` and
    ``spe/nearest_set_distance/<target>`` (engine/distance.py). ``report``: the run's
    or a ``json.load``-ed ``spe_report.json`` (as every function here takes).
    """
    flat: dict[str, Any] = {}
    for t, per_metric in as_report(report).estimates.items():
        for m, e in per_metric.items():
            for value, tag in ((e.value, "estimate"), (e.lower, "estimate_lower"), (e.upper, "estimate_upper")):
                flat[f"spe/{tag}/{t}/{m}"] = value
            flat[f"spe/final_estimate/{t}/{m}"] = e.value
            if e.reliable is not None:
                flat[f"spe/reliable/{t}/{m}"] = float(e.reliable)
        outside, distance, nearest = _range_flag(per_metric)
        if outside is not None:
            flat[f"spe/outside_calibrated_range/{t}"] = float(outside)
        flat[f"spe/distance/{t}"] = distance
        flat[f"spe/nearest_set_distance/{t}"] = nearest
    return _finite(flat)


def _range_flag(per_metric: Mapping[str, Estimate]) -> tuple[bool | None, float | None, float | None]:
    """A target's ``(outside_calibrated_range, distance, nearest_set_distance)``: outside when any key's interval
    model says so; the distances are the target's, the same for every key that measured them."""
    flags = [e.outside_calibrated_range for e in per_metric.values()]
    known = [f for f in flags if f is not None]
    distance = next((e.distance for e in per_metric.values() if e.distance is not None), None)
    nearest = next((e.nearest_set_distance for e in per_metric.values() if e.nearest_set_distance is not None), None)
    return (any(known) if known else None), distance, nearest


def by_checkpoint_scalars(report: SPEReport | Mapping[str, Any], i: int) -> dict[str, float]:
    """Logger scalars of the final G applied to record ``i``: ``spe/estimate_by_checkpoint/<target>/<key>``."""
    return _finite(
        {
            f"spe/estimate_by_checkpoint/{t}/{m}": vals[i]
            for t, per_metric in as_report(report).by_checkpoint.items()
            for m, vals in per_metric.items()
        }
    )


def evaluation_line(
    record: Record, targets: Sequence[str], running: dict[str, Any] | None = None, metric: str = "dice"
) -> str:
    """One console line per evaluation: its time, the calibration score, each target's pseudo value and estimate."""
    spent = record.seconds
    epoch_s = record.epoch_seconds
    share = f", {100 * spent / (epoch_s + spent):.0f}% of the epoch" if epoch_s else ""
    parts = [f"SPE epoch {record.epoch} ({spent:.1f}s{share}):"]
    d = record.real.get(CALIBRATION, {}).get(metric)
    if d is not None:
        parts.append(f"calibration {metric} {d:.3f}")
    for t in targets:
        p = record.pseudo.get(t, {}).get(metric)
        part = f"{t} pseudo {metric} {_fmt(p)}"
        e = running["estimates"][t].get(metric) if running else None
        est = None if e is None else e.value
        if est is not None:  # the running G without the calibration pairs: the report's estimate is final
            part += f" -> provisional est {est:.3f}"
        parts.append(part)
    return " ".join(parts)


def write_json(report: SPEReport | Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report.to_dict()`` as strict JSON (NaN/inf are refused: they must be None upstream)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_report(report).to_dict(), indent=2, allow_nan=False))
    return path


def write_csv(report: SPEReport | Mapping[str, Any], path: str | Path) -> Path:
    """One row per (target, metric): estimate, interval, pseudo value, truth (if known), baselines."""
    report = as_report(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [
        "target",
        "metric",
        "estimate",
        "lower",
        "upper",
        "pseudo",
        "true",
        "calibration_score",
        "confidence",
        "soft_dice_confidence",
        "styled_calibration_score",
        "agreement",
        "reason",
        "reliable",
        "outside_calibrated_range",
        "distance",
        "nearest_set_distance",
    ]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        base = report.baselines
        for t, per_metric in report.estimates.items():
            for m, e in per_metric.items():
                w.writerow(
                    [
                        t,
                        m,
                        e.value,
                        e.lower,
                        e.upper,
                        e.pseudo,
                        report.true.get(t, {}).get(m),
                        base.get("calibration_score", {}).get(t, {}).get(m),
                        base.get("confidence", {}).get(t, {}).get(m),
                        *(base.get(row, {}).get(t, {}).get(m) for row in SIGNAL_COLUMNS),
                        e.reason or "",
                        e.reliable,  # None (not judged): an empty cell, as are the two below
                        e.outside_calibrated_range,
                        e.distance,
                        e.nearest_set_distance,
                    ]
                )
    return path


def summary_table(report: SPEReport | Mapping[str, Any], markdown: bool = True) -> str:
    """A table of estimate [interval] (and the truth where known) per target and metric (``report``: the run's,
    or a ``json.load``-ed ``spe_report.json``)."""
    report = as_report(report)
    estimates = report.estimates
    metrics: list[str] = list(next(iter(estimates.values()), {}).keys())
    level = int(round(100 * (report.level if report.level is not None else 0.9)))
    header = ["target", *metrics]
    rows = []
    for t, per_metric in estimates.items():
        cells = []
        for m in metrics:
            e = per_metric[m]
            if e.reliable is False:
                cell = f"unreliable ({_short_why(e.unreliable or '')})"
            elif e.value is None:
                cell = "n/a"
            else:
                cell = f"{e.value:.3f} [{_fmt(e.lower)}, {_fmt(e.upper)}]"
            true = report.true.get(t, {}).get(m)
            if true is not None:
                cell += f" (true {true:.3f})"
            cells.append(cell)
        rows.append([t, *cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows),
    ]
    note = f"SPE estimate [{level}% interval] at the final weights"
    return (note + "\n" if markdown else "") + "\n".join(lines + _notes(estimates))


def _short_why(reason: str) -> str:
    return "not tracked on the calibration pairs" if "does not track" in reason else "interval too wide"


def _notes(estimates: Mapping[str, Mapping[str, Estimate]]) -> list[str]:
    """Lines under the table: targets outside the calibrated range, intervals that reach the styled anchor, and why
    a metric is unreliable."""
    lines = []
    for t, per_metric in estimates.items():
        outside, distance, near = _range_flag(per_metric)
        small = next((e for e in per_metric.values() if e.widened_by_size), None)
        if outside and small is not None:
            lines.append(
                f"{t}: outside the calibrated range: {small.n_images} images, fewer than the {small.pairs_n_images} of "
                "the smallest calibrated set; the mean of fewer images varies more, so its intervals were widened by "
                f"sqrt({small.pairs_n_images}/{small.n_images})."
            )
        if outside and any(e.widened_by_distance for e in per_metric.values()):
            reach = next((e.pairs_distance for e in per_metric.values() if e.pairs_distance), None)
            lines.append(
                f"{t}: outside the calibrated range (distance {_fmt(distance, 2)} to the calibration set, the "
                f"farthest calibration pair {_fmt(reach, 2)}): its intervals were widened by the ratio."
            )
        elif outside and (near or 0) > NEAREST_SET_LIMIT:
            lines.append(
                f"{t}: outside the calibrated range: it looks like none of the calibrated sets (distance "
                f"{_fmt(near, 2)} to the nearest of the calibration set and its pairs, where about 1 is as alike as "
                f"their own images and {NEAREST_SET_LIMIT:g} is the limit); its intervals extrapolate from pairs "
                "unlike it and were not widened."
            )
        spanned = [m for m, e in per_metric.items() if e.widened_to_styled_anchor]
        if spanned:
            parts = ", ".join(f"{m} {_fmt(per_metric[m].styled_anchor, 3)}" for m in spanned)
            lines.append(
                f"{t}: anchored on the calibration set restyled like it, the estimate would be {parts}; which anchor "
                "is right is unknown, so the interval reaches it."
            )
    unreliable: dict[tuple[str, str], list[str]] = {}  # (metric, why) -> the targets
    missing: dict[str, list[str]] = {}  # why a cell is n/a -> "target metric"
    for t, per_metric in estimates.items():
        for key, e in per_metric.items():
            if e.reliable is False and e.unreliable:
                unreliable.setdefault((key, e.unreliable), []).append(t)
            elif e.reliable is not False and e.value is None:
                missing.setdefault(e.reason or "no reason recorded", []).append(f"{t} {key}")
    lines += [f"{key} ({', '.join(ts)}): unreliable: {why}." for (key, why), ts in sorted(unreliable.items())]
    for why, cells in missing.items():
        shown = ", ".join(cells[:4]) + (f" and {len(cells) - 4} more" if len(cells) > 4 else "")
        lines.append(f"n/a ({shown}): {why.rstrip('.')}.")
    return lines


def combined_line(report: SPEReport | Mapping[str, Any]) -> str | None:
    """One line with the Dice of SPE combined with the quality regressor's mean (when the run fitted it)."""
    report = as_report(report)
    combined = report.combined
    if not combined:
        return None
    if combined["weight"] == 0.0:
        return (
            f"Per-case quality regressor: not mixed into the Dice estimates (on {combined['n_sets']} calibration "
            "pair sets it did not lower SPE's error)."
        )
    parts = []
    for t, e in combined["estimates"].items():
        if e["value"] is None:
            continue
        true = report.true.get(t, {}).get("dice")
        parts.append(f"{t} {e['value']:.3f}" + (f" (true {true:.3f})" if true is not None else ""))
    w = combined["weight"]
    return (
        f"Dice with the per-case quality regressor (w {w:.2f} · regressor mean + {1 - w:.2f} · SPE, w chosen on "
        f"{combined['n_sets']} calibration pair sets): " + (", ".join(parts) or "n/a")
    )


def make_figure(report: SPEReport | Mapping[str, Any], metrics: Sequence[str] | None = None):
    """Calibration pseudo vs real per checkpoint, the fitted G, and where each target falls (``report``: the
    run's, or a ``json.load``-ed ``spe_report.json``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    report = as_report(report)
    records = report.records
    metrics = list(metrics or report.metrics)
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    targets = report.targets
    for ax, metric in zip(axes.flat, metrics):
        xs = [r.pseudo.get(CALIBRATION, {}).get(metric) for r in records]
        ys = [r.real.get(CALIBRATION, {}).get(metric) for r in records]
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        if pts:
            px, py = zip(*pts)
            ax.scatter(px, py, s=18, c="0.35", label="calibration checkpoints", zorder=3)
        g = json_form(report.mapping.get(metric, {}))
        allx = [x for x, _ in pts]
        for ti, t in enumerate(targets):
            e = report.estimates[t][metric]
            if e.value is None or e.lower is None or e.upper is None or e.pseudo is None:
                continue
            c = colors[(ti + 1) % len(colors)]
            ax.errorbar(
                e.pseudo,
                e.value,
                yerr=[[e.value - e.lower], [e.upper - e.value]],
                fmt="D",
                color=c,
                ms=7,
                capsize=3,
                label=f"{t}: estimate",
                zorder=4,
            )
            true = report.true.get(t, {}).get(metric)
            if true is not None:
                ax.scatter([e.pseudo], [true], marker="x", s=60, color=c, label=f"{t}: true", zorder=5)
            allx.append(e.pseudo)
        if "error" not in g and allx:
            grid = np.linspace(min(allx), max(allx), 100)
            ax.plot(grid, MetricMapping.from_dict(g).predict(grid), color=colors[0], lw=1.5, label=f"G ({g['kind']})")
        ax.set_title(metric)
        ax.set_xlabel("pseudo (reverse segmentation)")
        ax.set_ylabel("real")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(
        f"SPE: calibration pseudo vs real metric and G ({report.section('segmenter', {}).get('name', '?')} reverse "
        "segmenter)"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return fig
