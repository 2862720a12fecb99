"""Progress of SPE's longer steps (the learned reverse step's fit, the calibration pairs, the quality regressor's fit).

One helper for all of them: a tqdm bar with an ETA on a terminal; in a non-interactive log (stderr is not a
TTY: a batch job, CI, ``nohup``) one line per ~10% with the elapsed time and the ETA instead of a bar's
carriage returns; nothing at all when disabled (``Trainer(enable_progress_bar=False)``, ``verbose=False``,
``--no-progress``).

    with progress_bar(800, "SPE: fitting learned_propagation", enabled=True, unit="step") as bar:
        for _ in range(800):
            ...
            bar.update(1)
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

__all__ = ["Progress", "progress_bar", "format_seconds"]


def format_seconds(s: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (tqdm's style)."""
    s = max(0, int(round(s)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Counts finished work of a known total and shows it (see the module docstring for the three modes).

    Args:
        total: units of work.
        desc: what is being done (the start of every line).
        enabled: False shows nothing.
        unit: the unit's name in the lines.
        stream: where to write (default ``sys.stderr``); a bar only when it is a TTY.
        every: the fraction of the total between two lines in the non-interactive mode.
        bar: force the bar (True) or the lines (False) instead of asking the stream whether it is a TTY.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        unit: str = "it",
        stream: IO[str] | None = None,
        every: float = 0.1,
        bar: bool | None = None,
    ) -> None:
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.enabled = bool(enabled) and self.total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.every = float(every)
        self.n = 0
        self._start = time.perf_counter()
        self._next_line = 1  # the next tenth (with every=0.1) that prints a line
        self._tqdm: Any = None
        if not self.enabled:
            return
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if bar if bar is not None else is_tty:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False)
        else:
            self._write(f"{desc}: 0/{self.total} {unit}")

    @property
    def mode(self) -> str:
        """``"off"``, ``"bar"`` or ``"lines"``."""
        return "off" if not self.enabled else "bar" if self._tqdm is not None else "lines"

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units finished."""
        if not self.enabled:
            return
        self.n = min(self.total, self.n + int(n))
        if self._tqdm is not None:
            self._tqdm.update(int(n))
            return
        steps = max(1, round(1 / self.every))
        reached = int(self.n * steps // self.total)
        if reached >= self._next_line:
            self._next_line = reached + 1
            elapsed = time.perf_counter() - self._start
            eta = elapsed * (self.total - self.n) / self.n if self.n else 0.0
            self._write(
                f"{self.desc}: {100 * self.n // self.total}% ({self.n}/{self.total} {self.unit}), "
                f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}"
            )

    def close(self) -> None:
        """End the display (the bar disappears; the lines already said 100%)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def progress_bar(
    total: int, desc: str, enabled: bool = True, unit: str = "it", stream: IO[str] | None = None
) -> Progress:
    """A :class:`Progress` of ``total`` units (``enabled=False``: silent)."""
    return Progress(total, desc, enabled=enabled, unit=unit, stream=stream)
