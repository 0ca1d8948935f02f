"""What a person sees while one request runs: upload, inference and download, each as it happens.

On a terminal, a bar per phase (tqdm, on stderr, gone when done). When stderr is not a terminal (a batch job's log,
a pipe, the Slicer worker's stream), plain lines instead: one now and then (every ``HPCSEG_PROGRESS_INTERVAL``
seconds, default 10) and one when the phase ends, never ``\\r``, bar characters or a line at 0 %, so a log stays
readable. ``--json`` (quiet) shows nothing.

Example::

    show = RequestProgress(quiet=False)
    client.segment(img, "ct-body", progress=show)   # show(phase, done, total)
    show.close()
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

_UNITS = {"upload": "B", "download": "B", "infer": "step"}
_NAMES = {"upload": "upload", "infer": "inference", "download": "download"}


class RequestProgress:
    """A ``progress(phase, done, total)`` callback for :meth:`hpcseg.client.ServerClient.segment`."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, interval: float | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        env = os.environ.get("HPCSEG_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env) if env else 10.0
        self._bars: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self._last_line: dict[str, float] = {}
        self._finished: set[str] = set()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet or phase in self._finished:
            return
        now = time.monotonic()
        self._started.setdefault(phase, now)
        if self.tty:
            self._bar(phase, done, total)
        elif total and done >= total:
            self._line(phase, done, total, now, final=True)
        elif done and now - self._last_line.get(phase, self._started[phase]) >= self.interval:
            self._line(phase, done, total, now)
        if total and done >= total:
            self._finished.add(phase)

    def _bar(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(phase)
        if bar is None:
            unit = _UNITS.get(phase, "")
            bar = self._bars[phase] = tqdm(total=total or None, desc=_NAMES.get(phase, phase), unit=unit,
                                           unit_scale=unit == "B", leave=False, file=self.stream)
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    def _line(self, phase: str, done: int, total: int, now: float, final: bool = False) -> None:
        self._last_line[phase] = now
        name = _NAMES.get(phase, phase)
        if phase in ("upload", "download"):
            what = f"{done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total and not final else "")
        else:
            what = f"{done} of {total} windows" if total and not final else f"{done} windows"
        pct = f" ({100 * done // total} %)" if total and not final else ""
        tail = f" in {now - self._started[phase]:.1f} s" if final else ""
        self.stream.write(f"{name}: {what}{pct}{tail}\n")
        self.stream.flush()

    def close(self) -> None:
        """Close any bar still open (a request that failed half-way)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
