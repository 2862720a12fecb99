"""Writing the outputs of ``spe-lightning estimate``: files written without following links, CSV cells safe in a
spreadsheet, ``cases.csv``/``chunks.csv``, the printed tables and the gallery of ``report.html``."""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from spe_lightning import __version__
from spe_lightning.engine.results import Estimate
from spe_lightning.monitoring.chunks import CHUNK_COLUMNS
from spe_lightning.percase.scorer import CaseRow, case_rows

__all__ = [
    "csv_cell",
    "write_file",
    "cases_csv",
    "chunks_csv",
    "estimate_table",
    "flag_line",
    "chunk_table",
    "display_image",
    "versions",
    "relative_path",
    "report_input_check",
]


def estimate_table(estimates: Mapping[str, Estimate], level: float, true: dict[str, Any] | None) -> str:
    """The printed table of the estimates with their intervals (and the true values with ``--masks``); a row
    says why it has no value, when the target lies outside the calibrated range and when its interval reaches the
    styled anchor."""

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    head = f"| metric | estimate | {level:.0%} interval | pseudo |" + (" true |" if true else "") + " note |"
    lines = [head, "|---|---|---|---|" + ("---|" if true else "") + "---|"]
    for m, e in estimates.items():
        row = f"| {m} | {f(e.value)} | {f(e.lower)} – {f(e.upper)} | {f(e.pseudo)} |"
        if true:
            row += f" {f(true.get(m))} |"
        notes = [e.reason or ""]
        notes.append(e.range_note or "")  # farther than every pair, fewer images, or like none of the calibrated sets
        if e.widened_to_styled_anchor:  # the estimate anchored on the restyled calibration set lies there
            notes.append(f"interval reaches the styled anchor {f(e.styled_anchor)}")
        row += f" {'; '.join(n for n in notes if n)} |"
        lines.append(row)
    return "\n".join(lines)


def flag_line(n_flagged: int, n_cases: int, threshold: float, calibration: Mapping[str, Any] | None) -> str:
    """The printed count of flagged cases, and what the threshold means when no Dice cut could be fitted."""
    line = f"{n_flagged} of {n_cases} cases flagged (quality < {threshold:.3f})"
    method = (calibration or {}).get("method")
    if method is not None and method != "youden":
        cut = (calibration or {}).get("dice_cut", 0.7)
        line += (
            f": the calibration set had too few cases on one side of real Dice {cut:g} to fit a threshold, so it is "
            "a low quantile of the calibration cases' scores; a flag means unlike them, not a Dice below "
            f"{cut:g}"
        )
    return line


def chunk_table(chunks: Sequence[Mapping[str, Any]], metric: str = "dice") -> str:
    """The printed table of ``metric`` per chunk (``ChunkedResult.chunks``), with its interval, the true value
    and the alerts."""

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"| chunk | images | {metric} | interval | true | alert | note |", "|---|---|---|---|---|---|---|"]
    for c in chunks:
        e = c["estimates"].get(metric) or Estimate(None, None, None)
        alert = "ALERT" if any(a["metric"] == metric for a in c["alerts"]) else ""
        true = (c.get("true") or {}).get(metric)
        note = "fewer images than calibrated" if e.widened_by_size else ""
        note = note or ("outside the calibrated range" if e.range_note else "")
        lines.append(
            f"| {c['chunk']} | {c['n_images']} | {f(e.value)} | {f(e.lower)} – {f(e.upper)} | {f(true)} | {alert} "
            f"| {note} |"
        )
    return "\n".join(lines)


def csv_cell(v: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with ``= + - @``, a tab or a carriage
    return get a leading ``'`` (OWASP's CSV-injection rule); numbers are kept as they are."""
    if isinstance(v, str) and v and v[0] in "=+-@\t\r":
        return "'" + v
    return v


def write_file(path: Path, data: str | bytes) -> None:
    """Write ``path`` without following a link: the content goes to a new file in the same folder, which
    then replaces ``path`` (a link already at ``path`` is replaced, its target is never written)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cases_csv(rows: Sequence[CaseRow | Mapping[str, Any]], sources: Sequence[str]) -> str:
    """``cases.csv``: one row per case (``sources``: each case's file), every text cell made safe by
    :func:`csv_cell`."""
    cases = [r.to_dict() for r in case_rows(rows)]
    cols = [
        "id",
        "file",
        "quality",
        "flagged",
        "estimated_dice",
        "estimated_dice_lower",
        "estimated_dice_upper",
        "empty_prediction",
        "foreground_pixels",
        "confidence",
        "best_reference",
    ]
    # a run target's site-calibrated rows (percase.sites): distance to the calibrated cases, the flag, the signals
    cols += [k for k in ("distance", "beyond_calibrated", "signals") if cases and k in cases[0]]
    if cases and "real_dice" in cases[0]:
        cols.append("real_dice")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(cols)
    for c, src in zip(cases, sources):
        w.writerow(["" if (v := {**c, "file": src}.get(k)) is None else csv_cell(v) for k in cols])
    return buf.getvalue()


def chunks_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``chunks.csv``: one row per chunk (:data:`~spe_lightning.monitoring.chunks.CHUNK_COLUMNS`)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CHUNK_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(k) is None else csv_cell(r[k]) for k in CHUNK_COLUMNS])
    return buf.getvalue()


def display_image(x: Tensor) -> np.ndarray:
    """A model input ``[C,H,W]`` as a gray image in [0, 1] for the gallery."""
    g = x.float().mean(0) if x.ndim == 3 else x.float()
    lo, hi = float(g.min()), float(g.max())
    return ((g - lo) / max(hi - lo, 1e-8)).numpy()


def versions(est: Any) -> dict[str, Any]:
    """The versions, as the full ``estimate.json`` records them."""
    return {"spe_lightning": {"running": __version__, "estimator_written_by": getattr(est, "written_by", None)}}


def report_input_check(check: dict[str, Any]) -> None:
    """The input check on stderr: every warning; what could not be compared, in one line."""
    for w in check["warnings"]:
        print(f"spe-lightning estimate: warning: {w}", file=sys.stderr)
    if check["verdict"] == "mismatch" and not check["warnings"]:
        odd = [c["statistic"] for c in check["checks"] if c["verdict"] != "ok"]
        print(
            f"spe-lightning estimate: warning: the images differ from the calibration images in {odd}.", file=sys.stderr
        )
    if check["not_compared"]:
        what = sorted({n.split(":")[0] for n in check["not_compared"]})
        why = check["not_compared"][0].split(": ", 1)[-1]  # "<what>: <why>"
        print(f"spe-lightning estimate: input check: not compared: {', '.join(what)} ({why})", file=sys.stderr)


def relative_path(path: str | Path, out: Path) -> str:
    """``path`` relative to the output folder, for the outputs: no absolute paths of this machine in them."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).as_posix()
