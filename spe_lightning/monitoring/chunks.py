"""Chunks of incoming data for monitoring after training: which images form each chunk (pure functions).

A chunk is a label and the positions of its images: ``{"0-99": [0, ..., 99], ...}`` for fixed-size
chunks in file order (:func:`chunks_of`), or one chunk per value of a ``meta.csv`` column such as a
date or a scanner (:func:`chunks_by_column`). A *chunker* is anything :func:`split` turns into such
chunks for a set of ``n`` images: a chunk size, ``{label: positions}``, a list of position lists, or a
function ``n -> {label: positions}``. :meth:`~spe_lightning.SPEEstimator.estimate_chunks` takes a chunker
and runs the one estimate flow per chunk; :func:`chunk_rows` flattens the result into the rows of
``chunks.csv``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHUNK_COLUMNS",
    "Chunker",
    "split",
    "chunk_rows",
    "chunks_by_column",
    "chunks_of",
    "find_meta",
    "parse_chunk_by",
    "read_meta",
]

#: columns of ``chunks.csv`` (one row per chunk and metric)
CHUNK_COLUMNS = (
    "chunk",
    "n_images",
    "metric",
    "estimate",
    "lower",
    "upper",
    "pseudo",
    "true",
    "alert",
    "threshold",
    "reason",
    "note",  # outside the calibrated range: fewer images than the calibrated sets, or unlike them
    # with labelled cases (docs/few_labels.md): their number, the prediction-powered estimate and interval,
    # and whether that whole interval crossed a threshold
    "labels",
    "ppi_estimate",
    "ppi_lower",
    "ppi_upper",
    "ppi_alert",
)
#: the largest meta.csv read, MB
MAX_META_MB = 50.0
#: how a set of ``n`` images is cut into chunks (see :func:`split`)
Chunker = int | Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | Callable[[int], Mapping[str, Sequence[int]]]


def chunks_of(n: int, size: int) -> dict[str, list[int]]:
    """Consecutive chunks of ``size`` positions out of ``n`` (the last may be smaller), labelled ``"first-last"``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk size must be an int >= 1, got {size!r}.")
    return {f"{s}-{min(s + size, n) - 1}": list(range(s, min(s + size, n))) for s in range(0, n, size)}


def split(chunker: Chunker, n: int) -> dict[str, list[int]]:
    """The chunks ``{label: positions}`` of ``n`` images: ``chunker`` is a chunk size (:func:`chunks_of`),
    ``{label: positions}``, a list of position lists (labelled by their order) or a function of ``n``
    giving ``{label: positions}``. Raises for empty chunks and positions outside ``0..n-1``."""
    if isinstance(chunker, bool):
        raise TypeError("chunks: give images per chunk (an int), {label: positions} or a list of position lists.")
    if isinstance(chunker, int):
        return chunks_of(n, chunker)
    if callable(chunker) and not isinstance(chunker, Mapping):
        chunker = chunker(n)
    if isinstance(chunker, Mapping):
        groups = {str(k): [int(i) for i in v] for k, v in chunker.items()}
    else:
        groups = {str(i): [int(j) for j in v] for i, v in enumerate(chunker)}
    bad = [k for k, v in groups.items() if not v or min(v) < 0 or max(v) >= n]
    if bad:
        raise ValueError(f"chunks {bad[:3]} are empty or name positions outside 0..{n - 1}.")
    return groups


def _key(image_id: str) -> str:
    """The id an image is matched on in meta.csv: its file name without folders and suffix."""
    return Path(str(image_id)).name.split("#")[0]


def chunks_by_column(
    ids: Sequence[str], rows: Sequence[Mapping[str, str]], column: str, id_column: str = "id", meta: str = "meta.csv"
) -> dict[str, list[int]]:
    """One chunk per value of ``column``, in sorted value order (ISO dates sort in time order).

    Images are matched to rows by ``id_column`` against their file name without suffix (the id
    ``"sub/A001"`` matches the row ``id == "A001"``; NIfTI slices ``"vol#z003"`` match ``"vol"``).
    An image without a row raises ``ValueError`` naming a few; an empty value is the chunk ``"(empty)"``.
    ``meta``: the file the rows came from, as the errors name it (the user's ``--chunk-by FILE:COLUMN``).
    """
    if not rows:
        raise ValueError(f"{meta} has no rows.")
    for col in (column, id_column):
        if col not in rows[0]:
            raise ValueError(f"{meta} has no column {col!r}; its columns: {list(rows[0])}.")
    value = {str(r[id_column]): (r.get(column) or "").strip() or "(empty)" for r in rows}
    missing = [i for i in ids if _key(i) not in value]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) have no row in {meta} (matched on {id_column!r}), e.g. {missing[:3]}."
        )
    groups: dict[str, list[int]] = {}
    for pos, i in enumerate(ids):
        groups.setdefault(value[_key(i)], []).append(pos)
    return {k: groups[k] for k in sorted(groups)}


def parse_chunk_by(text: str) -> int | tuple[str, str]:
    """``"100"`` -> 100 images per chunk; ``"meta.csv:date"`` -> ``("meta.csv", "date")``."""
    text = str(text).strip()
    if text.isdigit():
        if int(text) < 1:
            raise ValueError("--chunk-by N needs N >= 1.")
        return int(text)
    path, sep, column = text.rpartition(":")
    if not sep or not path or not column:
        raise ValueError(f"--chunk-by {text!r}: give a number of images per chunk, or META.csv:COLUMN.")
    return path, column


def find_meta(name: str, images: str | Path) -> Path:
    """The meta file ``name``: as given when it exists, else in the images folder, its parent or grandparent."""
    given = Path(name)
    if given.is_file():
        return given
    folder = Path(images)
    for where in (folder, folder.parent, folder.parent.parent):
        if (where / given.name).is_file():
            return where / given.name
    raise FileNotFoundError(f"--chunk-by: no {given.name} as given, nor in {folder}, its parent or grandparent folder.")


def read_meta(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header (at most :data:`MAX_META_MB`)."""
    path = Path(path)
    if path.stat().st_size > MAX_META_MB * 2**20:
        raise ValueError(f"{path}: larger than {MAX_META_MB:g} MB; not read.")
    with path.open(newline="", encoding="utf-8-sig") as f:
        return [dict(r) for r in csv.DictReader(f)]


def chunk_rows(chunks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``chunks.csv``: per chunk (``ChunkedResult.chunks``: its ``estimates`` are
    :class:`~spe_lightning.engine.results.Estimate` objects) and metric the estimate, interval, pseudo value,
    truth and alert."""
    rows = []
    for c in chunks:
        fired = {a["metric"]: a for a in c.get("alerts", []) if a.get("alert_on") != "ppi_interval"}
        ppi_fired = {a["metric"] for a in c.get("alerts", []) if a.get("alert_on") == "ppi_interval"}
        lab = c.get("labelled") or {}
        for metric, e in c["estimates"].items():
            a = fired.get(metric)
            p = (lab.get("metrics") or {}).get(metric) or {}
            rows.append(
                {
                    "chunk": c["chunk"],
                    "n_images": c["n_images"],
                    "metric": metric,
                    "estimate": e.value,
                    "lower": e.lower,
                    "upper": e.upper,
                    "pseudo": e.pseudo,
                    "true": (c.get("true") or {}).get(metric),
                    "alert": int(a is not None),
                    "threshold": None if a is None else a["threshold"],
                    "reason": e.reason or "",
                    "note": e.range_note or "",
                    "labels": lab.get("n_labels"),
                    "ppi_estimate": p.get("estimate"),
                    "ppi_lower": p.get("lower"),
                    "ppi_upper": p.get("upper"),
                    "ppi_alert": int(metric in ppi_fired) if lab else None,
                }
            )
    return rows
