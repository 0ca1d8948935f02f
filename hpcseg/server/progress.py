"""Per-request inference progress: how far a running inference is, for the client's bar and for cancellation.

Why a module of its own: inference code (:mod:`hpcseg.server.inference`, the classical models) knows nothing of
HTTP, and the HTTP layer must not reach into model code. The two meet here:

- the route binds a callback to the worker thread that runs ``Model.infer`` (:func:`reporting`);
- model code calls :func:`report` ``(done, total)`` at each window batch / slab / step boundary (a no-op when
  nothing is bound, e.g. in a script or a test that calls a model directly);
- :class:`ProgressBoard` keeps the latest ``(done, total)`` of every running request under the id the client chose
  (header ``X-HPCSeg-Request-Id``), so ``GET /progress/{id}`` can answer while the ``POST /infer`` is still busy.

**The callback may raise to abort the request**: the exception leaves ``Model.infer`` at the next boundary and
reaches the route like any other inference error (a client that hung up, a server shutting down). Checks added
with :meth:`RequestProgress.add_check` run at every boundary for exactly that.

Example::

    entry = board.start("3f2a...", model="ct-body")
    with reporting(entry.update):
        mask = model.infer(image, params)          # calls report(done, total) now and then
    board.finish(entry)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

ProgressCallback = Callable[[int, int], None]

_bound = threading.local()
MAX_ID_LENGTH = 64
KEEP_FINISHED_S = 60.0


@contextmanager
def reporting(callback: ProgressCallback | None) -> Iterator[None]:
    """Bind ``callback`` to this thread for the duration (nested bindings restore the outer one)."""
    outer = getattr(_bound, "callback", None)
    _bound.callback = callback
    try:
        yield
    finally:
        _bound.callback = outer


def current() -> ProgressCallback | None:
    """The callback bound to this thread, if any."""
    return getattr(_bound, "callback", None)


def report(done: int, total: int) -> None:
    """Tell the bound callback (if any) that ``done`` of ``total`` steps are finished; it may raise to abort."""
    cb = getattr(_bound, "callback", None)
    if cb is not None:
        cb(int(done), int(total))


class RequestProgress:
    """The progress of one inference request (thread-safe: written by the worker, read by the routes)."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model = request_id, model
        self.done, self.total = 0, 0
        self.state = "running"  # running | done | failed
        self.started = time.monotonic()
        self.finished: float | None = None
        self._checks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add_check(self, check: Callable[[], None]) -> None:
        """Run ``check()`` at every progress boundary; it may raise to abort the request."""
        with self._lock:
            self._checks.append(check)

    def update(self, done: int, total: int) -> None:
        """The callback bound with :func:`reporting`: record, then run the checks (which may raise)."""
        with self._lock:
            self.done, self.total = done, total
            checks = list(self._checks)
        for check in checks:
            check()

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            end = self.finished if self.finished is not None else time.monotonic()
            return {"request_id": self.id, "model": self.model, "state": self.state, "done": self.done,
                    "total": self.total, "seconds": round(end - self.started, 2)}


class ProgressBoard:
    """The progress of running (and for a minute, finished) requests, by the client's request id."""

    def __init__(self) -> None:
        self._entries: dict[str, RequestProgress] = {}
        self._lock = threading.Lock()

    @staticmethod
    def valid_id(request_id: str | None) -> bool:
        """A client-chosen id: 1..64 characters of letters, digits, ``-`` and ``_`` (a uuid fits)."""
        return bool(request_id) and len(request_id) <= MAX_ID_LENGTH and all(
            c.isascii() and (c.isalnum() or c in "-_") for c in request_id)

    def start(self, request_id: str, model: str) -> RequestProgress:
        """A fresh entry for ``request_id`` (replacing a finished one of the same id)."""
        entry = RequestProgress(request_id, model)
        with self._lock:
            self._purge()
            self._entries[request_id] = entry
        return entry

    def finish(self, entry: RequestProgress, ok: bool = True) -> None:
        """Mark ``entry`` done (or failed); it stays readable for a minute."""
        with entry._lock:
            entry.state = "done" if ok else "failed"
            entry.finished = time.monotonic()
            if ok and entry.total:
                entry.done = entry.total

    def get(self, request_id: str) -> RequestProgress | None:
        with self._lock:
            return self._entries.get(request_id)

    def _purge(self) -> None:
        now = time.monotonic()
        for k in [k for k, e in self._entries.items() if e.finished is not None and now - e.finished > KEEP_FINISHED_S]:
            del self._entries[k]
