"""What one client can hold on the server, bounded; work nobody waits for, stopped; a retried request, run once.

Anyone who can reach the node's port can open connections (the token is checked only once a request's head has
come), so the server bounds, per the settings (see :class:`~hpcseg.server.runtime.ServerSettings`):

- connections: at most ``max_connections`` at once, and at most ``max_unauthenticated`` that have not yet sent a
  request with the token; one that sends no such request within ``header_timeout`` seconds is closed
  (:func:`protocol_class`, a uvicorn h11 protocol with these checks);
- request bodies (:class:`BodyLimitMiddleware`): at most ``max_body`` bytes (``Content-Length`` over it: 413 before
  anything is read); no pause longer than ``body_grace`` seconds, and after the first ``body_grace`` seconds at
  least ``min_body_rate`` bytes/s on average: a client that sends half a body and stalls gets a 408 and its
  connection is closed at that deadline (a claimed ``Content-Length`` earns no time, only bytes received do).
  Such a request is marked abandoned and does not count as activity, so the idle timeout still ends a server
  nobody uses.

Work nobody waits for: an inference whose client disconnected is cancelled at the next window or slab boundary
(:class:`Abandon`, the progress callback of the sliding-window loop, which may raise), and logged. A request that
carries an idempotency key (``X-HPCSeg-Request-Id``, sent by hpcseg's client) gets ``retry_grace`` seconds for its
retry to come first: :class:`Replays` lets that retry wait for the running inference, or answers it from the
finished result, so a request retried after a lost connection never runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpcseg.server.auth import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from hpcseg.server.runtime import Runtime

log = logging.getLogger("hpcseg.server")

REQUEST_ID_HEADER = b"x-hpcseg-request-id"


# --- request bodies -------------------------------------------------------------------------------------------
class _BodyRefused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class BodyLimitMiddleware:
    """Pure ASGI middleware: a body over ``max_body`` bytes -> 413; a body later than its deadline -> 408.

    The next piece of a body must come within ``body_grace`` seconds of the last one, and by ``body_grace +
    received / min_body_rate`` seconds from the request's start. FastAPI turns any exception raised while
    it reads a form into a 400, so the refusal is remembered here and replaces whatever response the app starts.
    Both answers carry ``Connection: close``: the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = self.rt.settings
        length = _content_length(scope)
        if length is not None and length > s.max_body:
            await _refuse(send, 413, f"the request body ({length} bytes) is larger than this server takes "
                                     f"({s.max_body} bytes, --max-body-mb)")
            return
        t0 = time.monotonic()
        state: dict[str, Any] = {"received": 0, "done": False, "refused": None, "started": False, "last": t0}

        async def limited_receive() -> dict:
            if state["done"] or state["refused"] is not None:
                return await receive()
            now = time.monotonic()
            left = min(state["last"] + s.body_grace, t0 + s.body_grace + state["received"] / s.min_body_rate) - now
            try:
                if left <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                why = (f"the request body came too slowly: {state['received']} of {length or '?'} bytes in "
                       f"{time.monotonic() - t0:.0f} s (at least {s.min_body_rate / 1024:.0f} KiB/s after "
                       f"{s.body_grace:.0f} s are needed)")
                state["refused"] = _BodyRefused(408, why)
                scope["hpcseg.abandoned"] = True
                raise state["refused"] from None
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                state["last"] = time.monotonic()
                if state["received"] > s.max_body:
                    state["refused"] = _BodyRefused(413, f"the request body is larger than this server takes "
                                                         f"({s.max_body} bytes, --max-body-mb)")
                    raise state["refused"]
                state["done"] = not msg.get("more_body", False)
            elif msg["type"] == "http.disconnect":
                state["done"] = True
            return msg

        async def guarded_send(msg: dict) -> None:
            refused = state["refused"]
            if refused is not None:
                if msg["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    log.warning("%s %s: %s; connection closed", scope["method"], scope.get("hpcseg.route_path", "?"),
                                refused.detail)
                    await _refuse(send, refused.status, refused.detail)
                return  # the app's own answer to the broken body is replaced
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused as exc:  # raised where no one turned it into a response
            if not state["started"]:
                state["started"] = True
                log.warning("%s %s: %s; connection closed", scope["method"], scope.get("hpcseg.route_path", "?"),
                            exc.detail)
                await _refuse(send, exc.status, exc.detail)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# --- connections ----------------------------------------------------------------------------------------------
def protocol_class(rt: Runtime) -> type:
    """uvicorn's h11 protocol with the connection caps of the module docstring (``Config(http=...)`` takes it)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    s = rt.settings

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer = None
            if len(self.connections) > s.max_connections:
                log.warning("connection from %s closed: %d connections already open (--max-connections)",
                            _peer(self.client), len(self.connections) - 1)
                transport.close()
                return
            rt.fresh_connections[self.client] = self
            if len(rt.fresh_connections) > s.max_unauthenticated:
                log.warning("connection from %s closed: %d connections have sent no request with the token yet "
                            "(--max-unauthenticated)", _peer(self.client), len(rt.fresh_connections) - 1)
                rt.fresh_connections.pop(self.client, None)
                transport.close()
                return
            self._head_timer = self.loop.call_later(s.header_timeout, self._no_request_in_time)

        def _no_request_in_time(self) -> None:
            if rt.fresh_connections.pop(self.client, None) is not None and not self.transport.is_closing():
                log.warning("connection from %s closed: no request with the token within %.0f s",
                            _peer(self.client), s.header_timeout)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
            if rt.fresh_connections.get(self.client) is self:
                del rt.fresh_connections[self.client]
            super().connection_lost(exc)

    return GuardedH11Protocol


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


# --- work nobody waits for ----------------------------------------------------------------------------------
class InferenceCancelled(Exception):
    """Raised by :class:`Abandon` inside the window loop: the inference stops there."""


@dataclass
class Abandon:
    """An inference's progress callback that stops it once nobody waits: its client left ``grace`` seconds ago
    and no retry of the same request waits for it. ``done``/``total`` record how far it got."""

    grace: float = 0.0
    gone_since: float | None = None
    waiters: int = 0
    done: int = 0
    total: int = 0
    #: the inference's thread has begun (preparing the image, then windows): from then on it is stopped by this
    #: callback at its next window, not given up by the waiting request (which would leave the thread running)
    started: bool = False

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.should_stop():
            raise InferenceCancelled(f"cancelled after {done} of {total} windows")

    def should_stop(self) -> bool:
        return (self.gone_since is not None and self.waiters == 0
                and time.monotonic() - self.gone_since >= self.grace)


@dataclass
class Replay:
    """One keyed inference: its fingerprint, its outcome (a future), who waits, and when it finished."""

    fingerprint: tuple
    outcome: asyncio.Future
    abandon: Abandon
    finished: float | None = None
    runs: int = field(default=1)


class Replays:
    """Keyed inferences, running or finished within ``keep`` seconds (at most ``size`` finished ones kept).

    A finished inference's answer (a mask, possibly large) is kept for at most ``size`` requests; its key alone is
    remembered far longer (``remember`` seconds, at most ``remember_size`` keys): a copy of the request that comes
    after its answer was dropped (bytes held back by a blackholed link and delivered when it heals, seconds after the
    client got its answer through the retry) is refused (:meth:`answered`), never run a second time.
    """

    def __init__(self, keep: float = 600.0, size: int = 16, remember: float = 86400.0,
                 remember_size: int = 100_000) -> None:
        self.keep, self.size = keep, size
        self.remember, self.remember_size = remember, remember_size
        self._items: OrderedDict[str, Replay] = OrderedDict()
        self._answered: OrderedDict[str, float] = OrderedDict()  # key -> when it finished (answer dropped)

    def get(self, key: str) -> Replay | None:
        self._purge()
        return self._items.get(key)

    def answered(self, key: str) -> bool:
        """Whether ``key`` finished earlier and its answer is no longer kept."""
        self._purge()
        return key in self._answered

    def start(self, key: str, fingerprint: tuple, abandon: Abandon) -> Replay:
        item = Replay(fingerprint, asyncio.get_running_loop().create_future(), abandon)
        self._items[key] = item
        self._answered.pop(key, None)
        return item

    def finish(self, key: str, result: Any) -> None:
        item = self._items.get(key)
        if item is not None and not item.outcome.done():
            item.outcome.set_result(result)
            item.finished = time.monotonic()
        self._purge()

    def fail(self, key: str, exc: BaseException) -> None:
        """The inference failed or was cancelled: waiters get ``exc``, a later retry runs it anew."""
        item = self._items.pop(key, None)
        if item is not None and not item.outcome.done():
            item.outcome.set_exception(exc)
            item.outcome.exception()  # retrieved: no "never retrieved" warning when no one waits

    def _purge(self) -> None:
        now = time.monotonic()
        done = {k: v.finished for k, v in self._items.items() if v.finished is not None}  # oldest first
        old = set(list(done)[: max(0, len(done) - self.size)]) | {k for k, t in done.items() if now - t > self.keep}
        for k, t in done.items():
            if k in old:
                del self._items[k]
                self._answered[k] = t
        while self._answered and (len(self._answered) > self.remember_size
                                  or now - next(iter(self._answered.values())) > self.remember):
            self._answered.popitem(last=False)


def request_id(scope: Scope) -> str:
    """The request's idempotency key (``X-HPCSeg-Request-Id``), at most 64 characters, or ""."""
    for k, v in scope.get("headers", []):
        if k == REQUEST_ID_HEADER:
            return v.decode("latin-1")[:64]
    return ""
