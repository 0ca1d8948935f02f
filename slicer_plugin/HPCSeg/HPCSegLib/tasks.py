"""Blocking calls on worker threads, their results handed back on the GUI thread: the GUI never waits.

Qt widgets may only be touched from the GUI thread, and a server job can queue for hours, so every call into
hpcseg that may block (connect, segment, click, upload, stop, the status poll) runs on a worker thread. Its result
or exception goes into a queue; the widget's ``QTimer`` calls :meth:`BackgroundRunner.drain` a few times a second,
and the callbacks run there, on the GUI thread. Work is grouped in *lanes* ("action", "poll", "stop"): a lane runs
one call at a time, so a second click on Segment while one runs is refused instead of queued.

Standard library only: this module works before hpcseg is installed.

Example::

    runner = BackgroundRunner()
    runner.submit("action", session.segment, volume, "ct-body", on_done=show, on_error=report)
    timer.connect("timeout()", runner.drain)       # in the widget: callbacks run on the GUI thread
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[Any], None]


class Cancelled(Exception):
    """A call ended because the user stopped what it waited for: nothing to report as an error."""


class BackgroundRunner:
    """Runs calls on worker threads; :meth:`drain` delivers their outcomes on the thread that calls it."""

    def __init__(self, max_workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hpcseg-worker")
        self._outbox: queue.SimpleQueue[tuple[str | None, Callable[..., Any] | None, tuple[Any, ...]]] = \
            queue.SimpleQueue()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def busy(self, lane: str | None = None) -> bool:
        """Is ``lane`` running a call (or any lane, when None)? True until its callback has run in drain()."""
        with self._lock:
            return bool(self._busy) if lane is None else lane in self._busy

    def submit(self, lane: str, fn: Callable[..., Any], *args: Any, on_done: Callback | None = None,
               on_error: Callback | None = None, **kwargs: Any) -> bool:
        """Run ``fn(*args, **kwargs)`` on a worker; False (nothing started) when ``lane`` is busy or closed.

        ``on_done(result)`` or ``on_error(exception)`` runs later in :meth:`drain`. Without ``on_error`` the
        exception is logged.
        """
        with self._lock:
            if self._closed or lane in self._busy:
                return False
            self._busy.add(lane)

        def work() -> None:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # delivered, never lost in a thread
                self._outbox.put((lane, on_error or _log_error, (exc,)))
            else:
                self._outbox.put((lane, on_done, (result,)))

        try:
            self._pool.submit(work)
        except RuntimeError:  # the pool was shut down meanwhile
            with self._lock:
                self._busy.discard(lane)
            return False
        return True

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Ask for ``fn(*args)`` on the draining thread: how a worker reports progress to the GUI."""
        self._outbox.put((None, fn, args))

    def drain(self, limit: int = 100) -> int:
        """Run waiting callbacks on this thread (at most ``limit``); returns how many outcomes were taken."""
        done = 0
        while done < limit:
            try:
                lane, fn, args = self._outbox.get_nowait()
            except queue.Empty:
                break
            done += 1
            if lane is not None:
                with self._lock:
                    self._busy.discard(lane)
            if fn is not None:
                fn(*args)
        return done

    def shutdown(self) -> None:
        """Refuse new calls; running ones finish on their own (their outcomes are dropped)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def error_text(exc: BaseException) -> tuple[str, str]:
    """``(message, details)`` for an error dialog.

    hpcseg's errors carry a sentence for the user and a hint (``.message``, ``.hint``; tested by attribute, so
    this works before hpcseg is importable); ValueError carries the plugin's own sentences (a point outside the
    volume, no dataset name). Anything else is a bug: its traceback goes into the details. A
    :class:`Cancelled` call has nothing to say: ``("", "")``.
    """
    if isinstance(exc, Cancelled):
        return "", ""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and hasattr(exc, "hint"):
        hint = getattr(exc, "hint", None)
        return message + (f"\n\nHint: {hint}" if hint else ""), ""
    if isinstance(exc, ValueError):
        return str(exc), ""
    import traceback

    return (f"Unexpected error: {type(exc).__name__}: {exc}",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _log_error(exc: BaseException) -> None:
    log.error("background call failed: %s", exc, exc_info=exc)
