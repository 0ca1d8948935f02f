"""What one running server holds: its settings, models, sessions, activity clock and request log.

Kept apart from the routes (:mod:`hpcseg.server.app`) so that ``__main__`` (idle timeout, SIGTERM) and the tests
can look at the same state the routes change, without globals: ``app.state.runtime`` is the one instance.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Request

from hpcseg import __version__
from hpcseg.server import wire
from hpcseg.server.auth import ASGIApp, Receive, Scope, Send
from hpcseg.server.guard import Replays
from hpcseg.server.progress import ProgressBoard
from hpcseg.server.registry import Loader, ModelEntry, ModelRegistry
from hpcseg.server.sessions import SessionStore

log = logging.getLogger("hpcseg.server")


@dataclass
class ServerSettings:
    """Everything a server needs to start; ``token`` never appears in ``repr`` (so never in a log line).

    ``loader`` replaces :func:`hpcseg.server.models.load_model` (tests, site plug-ins): ``loader(folder, device)``.
    ``idle_timeout`` (seconds, 0 = never) and ``grace`` are acted on by ``python -m hpcseg.server``. The limits
    on what a client may hold (``max_body``, ``body_grace``, ``min_body_rate``, ``max_connections``,
    ``max_unauthenticated``, ``header_timeout``) and ``retry_grace`` are explained in :mod:`hpcseg.server.guard`.
    ``max_body``'s default, 2 GiB, is above any sane input: a 512x512x2000 float32 volume uncompressed.
    ``model_wait``: how long a request for a model that is still loading waits for it before a 503.
    """

    models_dirs: list[Path]
    token: str = field(repr=False)
    device: str = "auto"
    session_ttl: float = 3600.0
    max_sessions: int = 8
    idle_timeout: float = 0.0
    workers: int = 1
    io_workers: int = 4
    grace: float = 10.0
    model_wait: float = 300.0
    name: str = "hpcseg"
    allow_path_token: bool = True
    warmup: bool = True
    loader: Loader | None = field(default=None, repr=False)
    max_body: int = 2 << 30
    body_grace: float = 60.0
    min_body_rate: float = 64 * 1024.0
    max_connections: int = 64
    max_unauthenticated: int = 16
    header_timeout: float = 30.0
    retry_grace: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.models_dirs, (str, Path)):
            self.models_dirs = [self.models_dirs]
        self.models_dirs = [Path(d).expanduser() for d in self.models_dirs]
        if not isinstance(self.token, str) or len(self.token) < 16:
            raise ValueError("the server token must be a random string of at least 16 characters")
        if self.workers < 1 or self.io_workers < 1:
            raise ValueError("workers and io_workers must be >= 1")
        if self.max_body < 1 or self.min_body_rate <= 0 or self.max_connections < 1 or self.max_unauthenticated < 1:
            raise ValueError("max_body, min_body_rate, max_connections and max_unauthenticated must be positive")


class ShuttingDown(HTTPException):
    """503 for a request the server will not finish: SIGTERM (scancel, qdel, walltime) or idle timeout."""

    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down (job cancelled, walltime reached or idle timeout): "
                              "start a new server and send the request again", headers={"Connection": "close"})


class _Bytes:
    """Request bytes received: the request line and headers (estimated as sent) plus the body."""

    __slots__ = ("head", "body")

    def __init__(self, head: int) -> None:
        self.head, self.body = head, 0

    @property
    def total(self) -> int:
        return self.head + self.body


class Runtime:
    """The one mutable state of a server (see the module docstring)."""

    def __init__(self, *, settings: ServerSettings, registry: ModelRegistry, sessions: SessionStore) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self.started = time.time()
        self.shutting_down = threading.Event()
        self.gpu_slots = asyncio.Semaphore(settings.workers)
        self.cpu_slots = asyncio.Semaphore(settings.io_workers)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inflight = 0
        self.progress = ProgressBoard()  # inference progress by the client's X-HPCSeg-Request-Id
        self._last_activity = time.monotonic()
        self.fresh_connections: dict[Any, Any] = {}  # peer -> connection that sent no request with the token yet
        self.replays = Replays()  # keyed inferences, so that a retry never runs one twice

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fresh semaphores for the loop that serves (a semaphore binds to the first loop that waits on it)."""
        self.loop = loop
        self.gpu_slots = asyncio.Semaphore(self.settings.workers)
        self.cpu_slots = asyncio.Semaphore(self.settings.io_workers)

    def touch(self) -> None:
        """Record use (an authenticated request other than a health check)."""
        self._last_activity = time.monotonic()

    def idle_seconds(self) -> float:
        """Seconds since the last use; 0 while a request is in flight."""
        return 0.0 if self.inflight > 0 else time.monotonic() - self._last_activity

    @staticmethod
    def request_bytes(request: Request) -> int:
        """Bytes received for this request so far (counted by :class:`RequestLogMiddleware`)."""
        counter = request.scope.get("hpcseg.bytes")
        return counter.total if counter is not None else 0

    def model_versions(self) -> str:
        """``name=version,...`` of the models serving now (the ``X-HPCSeg-Model-Versions`` header)."""
        return ",".join(f"{quote(e.name, safe='')}={quote(str(e.version), safe='')}"
                        for e in self.registry.entries() if e.model is not None)

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``/info/`` body (what its client and Slicer plugin read) plus hpcseg's extras."""
        models: dict[str, Any] = {}
        failed: dict[str, str] = {}
        loading: list[str] = []
        for e in self.registry.entries():
            if e.model is not None:
                models[e.name] = _model_info(e)
            elif e.state == "failed":
                failed[e.name] = e.error or "failed"
            else:
                loading.append(e.name)
        labels: list[str] = []
        for m in models.values():
            lab = m.get("labels") or []
            names = [k for k, _ in sorted(lab.items(), key=lambda kv: kv[1])] if isinstance(lab, dict) else list(lab)
            labels += [n for n in names if n not in labels]
        # No top-level "config": MONAI Label's Slicer plugin reads one as "please upgrade the server".
        return {
            "name": self.settings.name,
            "description": "hpcseg: segmentation on a cluster GPU, served from a batch job",
            "version": __version__,
            "labels": labels,
            "models": models,
            "trainers": {}, "strategies": {}, "scoring": {}, "train_stats": {},
            "datastore": {"total": 0, "completed": 0},
            "failed": failed,
            "loading": loading,
            "hpcseg": {
                "version": __version__,
                "state": self.registry.state(),
                "device": self.settings.device,
                "codecs": wire.codecs(),
                "sessions": self.sessions.summary(),
                "models": {e.name: e.status() for e in self.registry.entries()},
                "last_reload": dict(getattr(self.registry, "last_reload", {})),
            },
        }


def _model_info(e: ModelEntry) -> dict[str, Any]:
    try:
        out = dict(e.model.info())
    except Exception as exc:  # a model's info() bug must not break /info/ for all
        log.warning("model %s: info() failed: %s", e.name, exc)
        out = {}
    manifest = getattr(e.model, "manifest", None)
    out.setdefault("type", getattr(manifest, "type", "segmentation"))
    out.setdefault("labels", dict(getattr(manifest, "labels", {}) or {}))
    out.setdefault("dimension", 3)
    out.setdefault("description", getattr(manifest, "description", "") or e.name)
    out.setdefault("config", {})
    out["version"] = e.version
    return out


class RequestLogMiddleware:
    """Outermost ASGI middleware: counts request bytes, tracks activity, adds hpcseg headers, logs one line.

    The line has method, path (never the query: MONAI Label's ``image=`` may name a patient; never the token
    prefix), status, milliseconds and bytes in/out. Headers are never logged.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
        head += sum(len(k) + len(v) + 4 for k, v in scope.get("headers", [])) + 2
        counter = _Bytes(head)
        scope["hpcseg.bytes"] = counter
        status, sent = 500, 0
        t0 = time.perf_counter()

        async def counting_receive():
            if scope.get("hpcseg.authenticated"):
                self.rt.fresh_connections.pop(scope.get("client"), None)
            msg = await receive()
            if msg["type"] == "http.request":
                counter.body += len(msg.get("body", b""))
            return msg

        async def decorating_send(msg):
            nonlocal status, sent
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if scope.get("hpcseg.authenticated"):
                    self.rt.fresh_connections.pop(scope.get("client"), None)
                extra = [(b"x-hpcseg-request-bytes", str(counter.total).encode())]
                if scope.get("hpcseg.authenticated"):  # strangers learn no versions
                    extra += [(b"x-hpcseg-server-version", __version__.encode()),
                              (b"x-hpcseg-model-versions", self.rt.model_versions().encode())]
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            elif msg["type"] == "http.response.body":
                sent += len(msg.get("body", b""))
            await send(msg)

        self.rt.inflight += 1
        try:
            await self.app(scope, counting_receive, decorating_send)
        finally:
            self.rt.inflight -= 1
            path = scope.get("hpcseg.route_path", "?")
            # A request that stalled past its body deadline, or whose client left, is no use of the server.
            if scope.get("hpcseg.authenticated") and not path.startswith("/health/") \
                    and not scope.get("hpcseg.abandoned"):
                self.rt.touch()
            log.info("%s %s %d %.0f ms in=%d out=%d", scope["method"], path, status,
                     (time.perf_counter() - t0) * 1000, counter.total, sent)
