"""The inference server's HTTP face: ``create_app(settings)`` builds it, nothing happens at import time.

Routes (every one needs the job's token, see :mod:`hpcseg.server.auth`, except ``GET /auth/`` and
``POST /auth/token``):

=================================  ================================================================================
``GET /info/``                     MONAI Label's app info (models, labels) + ``failed``, ``loading``, ``hpcseg``
``GET /auth/``, ``POST /auth/token``, ``GET /auth/token/valid``   MONAI Label's auth handshake
``GET /health/live``               the process answers
``GET /health/ready``              200 once a model is loaded and warm (others may still load: ``loading``), else
                                   503; per-model state (pending, loading, ready, failed)
``PUT /session/``                  upload an image once (multipart ``files``); -> ``session_id``, expiry
``GET|DELETE /session/{id}``       read (counters, geometry) or drop a session; unknown 404, expired 410
``POST /infer/{model}``            MONAI Label's infer: multipart ``params`` (JSON) + ``file`` or ``?session_id=``;
                                   header ``X-HPCSeg-Request-Id`` (the client's id) makes its progress readable
``GET /progress/{request_id}``     a running inference's ``done``/``total`` (windows or steps), ``state``
``POST /reload``, ``/models/reload``  re-read the models directories (new fine-tuned versions) without a restart
``GET /datastore/``                MONAI Label's datastore listing: always empty (no datastore here; ``output=``
                                   ``stats`` (default), ``all`` or ``ids``)
``PUT /datastore/``, ``/datastore/label``  501 with the way to do it: ``hpcseg upload`` (a dataset on the cluster)
``GET|DELETE /train/``, ``POST /train/[{model}]``  404 "no training task here" / 501: ``hpcseg train`` (a batch job)
``POST /activelearning/{strategy}``  404: no strategies (``/info/`` lists none)
=================================  ================================================================================

What MONAI Label's 3D Slicer plugin (0.8.x) sends, in order, and what of the answers it reads, is replayed by
``tests/server/test_slicer_monailabel_flow.py``: per call ``GET /auth/`` then ``POST /auth/token`` (first call) or
``GET /auth/token/valid``; ``GET /info/``; ``GET /train/?check_if_running=true`` after every action (a 404 reads as
"not training"); ``PUT /session/`` (the local volume, once); ``GET /session/{id}`` before each inference;
``POST /infer/{model}?image=<volume name>&session_id=<id>`` with ``params`` (the model's ``config`` from ``/info/``,
``result_extension: ".nrrd"``, ``result_dtype: "uint8"``, ``client_id``; clicks add ``label``, ``foreground``,
``background``). With the path-token address ``GET /auth/`` answers ``enabled: false``, so it never asks to log in.
One thing the plugin does not survive, against MONAI Label's server too: a session that expired, was evicted or
belonged to an earlier server job. Its ``GET /session/{id}`` then raises on the 404/410 instead of uploading again,
until the scene is closed and the volume loaded again (the answer's detail says so).

Inference code knows nothing of HTTP: this module decodes, calls ``Model.infer`` in a worker thread (``workers``
at a time: one GPU), checks the mask is in the input's geometry, and encodes. Wire formats live in
:mod:`hpcseg.server.wire`.

Example::

    app = create_app(ServerSettings(models_dirs=[Path("models")], token=secrets.token_urlsafe(32)))
    uvicorn.run(app)          # hpcseg.server.__main__ does this on a socket it bound itself
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from hpcseg import __version__
from hpcseg.errors import ImageError, ServerError
from hpcseg.protocol import ALREADY_ANSWERED, PROTOCOL_VERSION, client_mismatch
from hpcseg.protocol import HEADER as PROTOCOL_HEADER
from hpcseg.server import guard, wire
from hpcseg.server import progress as request_progress
from hpcseg.server.auth import TokenAuthMiddleware, tokens_equal
from hpcseg.server.registry import ModelRegistry
from hpcseg.server.runtime import RequestLogMiddleware, Runtime, ServerSettings, ShuttingDown
from hpcseg.server.sessions import Session, SessionGone, SessionNotFound, SessionStore

log = logging.getLogger("hpcseg.server")
T = TypeVar("T")

__all__ = ["ServerSettings", "create_app"]


def create_app(settings: ServerSettings) -> FastAPI:
    """A FastAPI app serving the models under ``settings.models_dirs``; starts loading them at startup."""
    registry = ModelRegistry(settings.models_dirs, device=settings.device, loader=settings.loader,
                             warmup=settings.warmup)
    sessions = SessionStore(ttl=settings.session_ttl, max_sessions=settings.max_sessions)
    rt = Runtime(settings=settings, registry=registry, sessions=sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.bind_loop(asyncio.get_running_loop())
        registry.start()
        purger = asyncio.create_task(_purge_sessions(rt))
        try:
            yield
        finally:
            rt.shutting_down.set()
            purger.cancel()
            sessions.clear()

    app = FastAPI(title="hpcseg inference server", version=__version__, lifespan=lifespan,
                  description="MONAI Label-compatible segmentation server run inside an HPC job.")
    app.state.runtime = rt
    _add_routes(app, rt)
    _add_error_handlers(app)
    # The last added is outermost: the log/byte counter sees every request, then the token check, then the body
    # limits, then the protocol check (so only a client holding the token learns the server's version).
    app.add_middleware(_ProtocolCheckMiddleware)
    app.add_middleware(guard.BodyLimitMiddleware, runtime=rt)
    app.add_middleware(TokenAuthMiddleware, token=settings.token, allow_path_token=settings.allow_path_token)
    app.add_middleware(RequestLogMiddleware, runtime=rt)
    return app


async def _purge_sessions(rt: Runtime) -> None:
    while True:
        await asyncio.sleep(min(30.0, rt.settings.session_ttl / 4))
        n = rt.sessions.purge_expired()
        if n:
            log.info("%d session(s) expired", n)


def _add_routes(app: FastAPI, rt: Runtime) -> None:
    settings, registry, sessions = rt.settings, rt.registry, rt.sessions

    # --- MONAI Label's auth handshake ------------------------------------------------------------------------
    @app.get("/auth/", summary="Is auth enabled? (open: MONAI Label's clients ask before they have a token)")
    async def auth_enabled(request: Request) -> dict[str, Any]:
        # An address with the path token already carries the credential: "enabled" would make MONAI Label's Slicer
        # plugin ask for a user name and password before every request.
        return {"enabled": not request.scope.get("hpcseg.path_token", False), "client_id": "hpcseg", "realm": None}

    @app.post("/auth/token", summary="OAuth2 password form: any username, the job's token as password")
    async def auth_token(password: str = Form(""), username: str = Form(""), grant_type: str = Form("password")):
        if not tokens_equal(password, settings.token):
            return JSONResponse({"detail": "invalid token"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="hpcseg", error="invalid_token"'})
        # The caller proved it holds the token, so the bearer token is the token itself: nothing new to leak.
        return {"access_token": settings.token, "token_type": "bearer"}

    @app.get("/auth/token/valid", summary="Is the presented token valid?")
    async def auth_valid() -> dict[str, Any]:
        return {"username": "hpcseg", "email": None, "name": "hpcseg", "roles": ["monailabel-user"]}

    # --- hpcseg's health and info ------------------------------------------------------------------------------
    @app.get("/health/live", summary="The process answers")
    async def live() -> dict[str, Any]:
        return {"status": "alive", "uptime": round(time.time() - rt.started, 1), "version": __version__,
                "protocol": PROTOCOL_VERSION}

    @app.get("/health/ready", summary="200 once a model is loaded and warm (others may still load), else 503")
    async def ready() -> JSONResponse:
        body = {"ready": registry.ready(), "state": registry.state(), "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "loading": registry.loading, "models": {e.name: e.status() for e in registry.entries()}}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/info/", summary="MONAI Label's app info, plus failed/loading models and hpcseg's extras")
    async def info() -> dict[str, Any]:
        return _info(rt)

    @app.get("/progress/{request_id}", summary="A running inference's progress (by the client's X-HPCSeg-Request-Id)")
    async def get_progress(request_id: str) -> dict[str, Any]:
        entry = rt.progress.get(request_id)
        if entry is None:
            raise HTTPException(404, f"no inference with request id {request_id!r} is running or just finished")
        return entry.to_json()

    @app.post("/reload", summary="Re-read the models directories; load new or changed versions")
    @app.post("/models/reload", include_in_schema=False)
    async def reload(wait: bool = True) -> JSONResponse:
        thread = registry.reload(background=True)
        if wait:
            await _run_blocking(rt, thread.join, gpu=False)
        return JSONResponse(_info(rt), status_code=200 if wait else 202)

    # --- MONAI Label's datastore, training and active learning: not here, said clearly ---------------------------
    @app.get("/datastore/", summary="MONAI Label's datastore listing: always empty (this server keeps no datastore)")
    async def datastore(output: str = "stats") -> Any:
        if output == "all":
            return {"name": settings.name, "description": _NO_DATASTORE, "objects": {}}
        if output == "ids":
            return []
        return {"total": 0, "completed": 0, "label_tags": {}, "train": 0}

    @app.put("/datastore/", summary="Not here: images go to a dataset on the cluster with `hpcseg upload`")
    @app.put("/datastore/label", summary="Not here: corrected masks go to a dataset with `hpcseg upload`")
    async def datastore_put() -> None:
        raise HTTPException(501, f"{_NO_DATASTORE}: save the image and the corrected mask (in Slicer: Save) and "
                                 "run `hpcseg upload IMAGE MASK --dataset NAME`")

    @app.get("/datastore/image", summary="Not here: the server keeps no datastore")
    @app.get("/datastore/label", summary="Not here: the server keeps no datastore")
    async def datastore_get() -> None:
        raise HTTPException(404, f"{_NO_DATASTORE}: send the image with each request or in a session")

    @app.get("/train/", summary="No training task runs in this server (MONAI Label: 404 = none running)")
    @app.delete("/train/", summary="No training task runs in this server")
    async def train_status() -> None:
        raise HTTPException(404, "no training task runs in this server: fine-tune with `hpcseg train` (a batch job)")

    @app.post("/train/", summary="Not here: fine-tune with `hpcseg train` (a batch job)")
    @app.post("/train/{model}", summary="Not here: fine-tune with `hpcseg train` (a batch job)")
    async def train_start() -> None:
        raise HTTPException(501, "this server does not train: fine-tune with `hpcseg train --model NAME "
                                 "--dataset NAME` (a batch job); the next server job serves the new version")

    @app.post("/activelearning/{strategy}", summary="No active-learning strategies (the server keeps no datastore)")
    async def next_sample(strategy: str) -> None:
        raise HTTPException(404, f"no active-learning strategy {strategy!r} here ({_NO_DATASTORE}): "
                                 "load your own image")

    # --- sessions -----------------------------------------------------------------------------------------------
    @app.put("/session/", summary="Upload an image once; later prompts name the session instead")
    async def create_session(request: Request, files: list[UploadFile] = File(...), uncompress: bool = False,
                             expiry: int = 0) -> dict[str, Any]:
        datas = [(f.filename or "", f.content_type or "", await f.read()) for f in files]
        image = await _run_blocking(rt, wire.decode_uploads, datas, uncompress, gpu=False)
        upload_bytes = rt.request_bytes(request)
        name = datas[0][0] if len(datas) == 1 else f"{len(datas)} files"
        s = sessions.add(image, upload_bytes=upload_bytes, name=name, ttl=expiry or None)
        log.info("session %s: %s %s voxels, %d bytes received", s.id[:8], name, "x".join(map(str, image.GetSize())),
                 upload_bytes)
        return {"session_id": s.id, "session_info": s.to_json(), "expiry": int(s.ttl), "expires_ts": int(s.expires)}

    @app.get("/session/{session_id}", summary="A session's info and counters (image=true: its image)")
    async def get_session(session_id: str, update_ts: bool = False, image: bool = False) -> Any:
        s = _session(rt, session_id, touch=update_ts)
        if image:
            data, media_type, ext = await _run_blocking(rt, wire.encode_image, s.image, wire.NIFTI_GZ, gpu=False)
            return Response(data, media_type=media_type,
                            headers={"Content-Disposition": f'attachment; filename="{s.id}{ext}"'})
        return s.to_json()

    @app.delete("/session/{session_id}", summary="Drop a session now")
    async def delete_session(session_id: str) -> dict[str, Any]:
        try:
            return sessions.remove(session_id).to_json()
        except (SessionNotFound, SessionGone) as exc:
            raise _session_error(session_id, exc) from None

    # --- inference ------------------------------------------------------------------------------------------------
    @app.post("/infer/{model}", summary="Segment an uploaded image or a session's image (MONAI Label's infer)")
    async def infer(request: Request, model: str, image: str = "", session_id: str = "", output: str | None = None,
                    params: str = Form("{}"), file: UploadFile | None = File(None),
                    label: UploadFile | None = File(None)) -> Response:
        if rt.shutting_down.is_set():
            raise HTTPException(503, "the server is shutting down", headers={"Connection": "close"})
        if output not in (None, "", "image", "json", "all"):
            raise HTTPException(400, f"output={output!r} is not supported here: use image, json or all")
        # A request retried after a lost connection carries the same key: answer it from the first run.
        key = guard.request_id(request.scope)
        key = key if rt.progress.valid_id(key) else ""
        fingerprint = (model, output or "", params, session_id, image, file.size if file is not None else None)
        if key and (replay := rt.replays.get(key)) is not None:
            answer = await _replayed(rt, request, key, replay, fingerprint, model)
            if answer is not None:
                return answer
        if key and rt.replays.answered(key):
            log.warning("infer %s request=%s: a late copy of a request already answered; not run again", model, key[:8])
            raise HTTPException(409, f"request id {key} {ALREADY_ANSWERED} and its result is no longer kept: "
                                     "send the request again with a new X-HPCSeg-Request-Id")
        abandon = guard.Abandon(grace=settings.retry_grace if key else 0.0)
        if key:
            rt.replays.start(key, fingerprint, abandon)
        try:
            answer = await _infer_once(request, model, image, session_id, output, params, file, label, key, abandon)
        except guard.InferenceCancelled as exc:
            if key:
                rt.replays.fail(key, exc)
            request.scope["hpcseg.abandoned"] = True
            log.info("infer %s%s: %s: the client disconnected %.1f s before and nobody waits for the result",
                     model, f" request={key[:8]}" if key else "", exc, time.monotonic() - (abandon.gone_since or 0))
            return Response(status_code=499)
        except BaseException as exc:
            if key:
                rt.replays.fail(key, exc)
            raise
        if key:
            rt.replays.finish(key, answer)
        return answer

    async def _infer_once(request: Request, model: str, image: str, session_id: str, output: str | None,
                          params: str, file: UploadFile | None, label: UploadFile | None, key: str,
                          abandon: guard.Abandon) -> Response:
        p = _params(params)
        served = await _model_when_loaded(rt, model)
        mdl, version = served
        session = None
        if session_id:
            session = _session(rt, session_id)
            img = session.image
        elif file is not None:
            datas = [(file.filename or "", file.content_type or "", await file.read())]
            img = await _run_blocking(rt, wire.decode_uploads, datas, False, gpu=False)
        else:
            where = f" (image={image!r} names a datastore entry)" if image else ""
            raise HTTPException(400, f"send the image as the `file` part or name a `session_id`{where}: "
                                     "this server keeps no datastore")
        if label is not None:
            ldata = [(label.filename or "", label.content_type or "", await label.read())]
            p["label_image"] = await _run_blocking(rt, wire.decode_uploads, ldata, False, gpu=False)
        nbytes = rt.request_bytes(request)
        if session is not None:
            session.count_request(nbytes)
        names = wire.label_names(mdl, p)  # before inferring: an unknown label is a 400 now, not after a minute
        warnings = await _run_blocking(rt, wire.qa_warnings, mdl, img, gpu=False)
        t0 = time.monotonic()
        mask = await _infer_tracked(rt, request, model, mdl, img, p, abandon)
        t1 = time.monotonic()
        mask = wire.conform_mask(mask, img, model)
        if wire.monai_label_indices(p):  # MONAI Label's label values: its Slicer plugin maps them by position
            mask, names = wire.compact_labels(mask, names)
        mask = wire.cast_mask(mask, p.get("result_dtype"))
        result = {
            "label_names": names, "model": model, "model_version": version,
            "latencies": {"infer": round(t1 - t0, 3)}, "request_bytes": nbytes, "warnings": warnings,
        }
        if session is not None:
            result["session_id"] = session.id
        log.info("infer %s v%s%s: %s voxels in %.2f s (%d request bytes)", model, version,
                 f" request={key[:8]}" if key else "", "x".join(map(str, img.GetSize())), t1 - t0, nbytes)
        headers = {"X-HPCSeg-Model-Version": str(version), "X-HPCSeg-Model": wire.header_safe(model)}
        if output == "json":
            return JSONResponse(result, headers=headers)
        media_type = wire.negotiate(request.headers.get("accept", ""), p.get("result_extension"))
        data, media_type, ext = await _run_blocking(rt, wire.encode_image, mask, media_type, gpu=False)
        result["latencies"]["total"] = round(time.monotonic() - t0, 3)
        filename = wire.result_filename(model, ext)
        if output == "image":
            headers["X-HPCSeg-Result"] = json.dumps(result, ensure_ascii=True, separators=(",", ":"))
            headers["Content-Disposition"] = f'attachment; filename="{filename}"'
            return Response(data, media_type=media_type, headers=headers)
        body, content_type = wire.multipart(result, data, filename, media_type)
        return Response(body, media_type=content_type, headers=headers)


async def _infer_tracked(rt: Runtime, request: Request, name: str, mdl: Any, img: Any, p: dict[str, Any],
                         abandon: guard.Abandon | None = None) -> Any:
    """``mdl.infer`` in a worker thread with a progress callback bound (see :mod:`hpcseg.server.progress`).

    The entry is on ``rt.progress`` under the client's ``X-HPCSeg-Request-Id`` (or a fresh id when it sent none or
    a malformed one), so ``GET /progress/{id}`` can follow it; checks added to it may raise to abort the request.
    """
    rid = request.headers.get("x-hpcseg-request-id", "")
    if not rt.progress.valid_id(rid):
        rid = uuid.uuid4().hex
    entry = rt.progress.start(rid, name)
    request.scope["hpcseg.progress"] = entry
    watch = None
    if abandon is not None:  # work nobody waits for stops at the next window/slab boundary (guard.Abandon)
        entry.add_check(lambda: abandon(entry.done, entry.total))
        watch = _disconnect_watch(request, abandon, name)

    def work() -> Any:
        if abandon is not None:
            abandon.started = True
        with request_progress.reporting(entry.update):
            return mdl.infer(img, dict(p))

    ok = False
    try:
        mask = await _run_blocking(rt, work, gpu=True, watch=watch)
        ok = True
        return mask
    finally:
        rt.progress.finish(entry, ok)


def _disconnect_watch(request: Request, abandon: guard.Abandon, name: str) -> Callable[[], Awaitable[None]]:
    """A watch for :func:`_run_blocking`: notes when the client hangs up; gives up while still queued for a slot."""

    async def watch() -> None:
        if abandon.gone_since is None and await request.is_disconnected():
            abandon.gone_since = time.monotonic()
            log.info("infer %s: the client disconnected; the inference stops at the next window boundary%s", name,
                     f" unless its retry comes within {abandon.grace:.0f} s" if abandon.grace else "")
        # Not started yet (queued for the GPU): give up now. Once its thread runs, the window check stops it (a
        # thread cannot be stopped from here; `not abandon.total` was true while it still prepared the image,
        # so the request gave up, said "before it started", and the thread held the slot until its first window)
        if abandon.should_stop() and not abandon.started:
            raise guard.InferenceCancelled("cancelled before it started")

    return watch


async def _replayed(rt: Runtime, request: Request, key: str, replay: guard.Replay, fingerprint: tuple,
                    model: str) -> Response | None:
    """A retry of a keyed inference: wait for the first run and answer with its result (None: run it anew)."""
    if replay.fingerprint != fingerprint:
        raise HTTPException(409, f"request id {key} was used for a different request: send a new X-HPCSeg-Request-Id")
    replay.abandon.waiters += 1
    try:
        while not replay.outcome.done():
            await asyncio.wait({replay.outcome}, timeout=0.2)
            if rt.shutting_down.is_set():
                raise ShuttingDown()
            if not replay.outcome.done() and await request.is_disconnected():
                request.scope["hpcseg.abandoned"] = True
                return Response(status_code=499)
    finally:
        replay.abandon.waiters -= 1
    exc = replay.outcome.exception()
    if isinstance(exc, guard.InferenceCancelled):
        return None
    if exc is not None:
        raise exc
    log.info("infer %s request=%s: a retry, answered from its first run", model, key[:8])
    return replay.outcome.result()


class _ProtocolCheckMiddleware:
    """A client that names another protocol gets one line (426) and the log one line: no half-understood request is
    served. Requests without the header (MONAI Label's plugin) pass.

    Pure ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps ``receive`` so that a route's
    ``request.is_disconnected()`` never sees the client leave (the server would not cancel an abandoned inference).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = PROTOCOL_HEADER.lower().encode()
            theirs = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == header), None)
            if theirs is not None and theirs.strip() != str(PROTOCOL_VERSION):
                line = client_mismatch(theirs.strip()[:20])
                log.warning("refused a request: %s", line)
                answer = JSONResponse({"detail": line, "protocol": PROTOCOL_VERSION}, status_code=426)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """hpcseg's own errors from models and codecs become HTTP answers with a sentence, never a bare 500."""

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> JSONResponse:
        status = exc.status if exc.status and 400 <= exc.status < 600 else 500
        return JSONResponse({"detail": exc.message, "hint": exc.hint}, status_code=status)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "hint": exc.hint}, status_code=400)

    @app.exception_handler(wire.ModelOutputError)
    async def model_output_error(request: Request, exc: wire.ModelOutputError) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=500)


_NO_DATASTORE = "this server keeps no datastore"


def _info(rt: Runtime) -> dict[str, Any]:
    """``/info/``: the runtime's, with each model's ``config`` cut to what MONAI Label's clients can send back."""
    body = rt.info()
    for m in body.get("models", {}).values():
        m["config"] = wire.infer_config(m.get("config"), fast=m.get("type") == "segmentation")
    return body


def _params(params: str) -> dict[str, Any]:
    try:
        p = json.loads(params) if params else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"params is not valid JSON: {exc}") from exc
    if not isinstance(p, dict):
        raise HTTPException(400, "params must be a JSON object")
    return p


def _model(rt: Runtime, name: str) -> tuple[Any, str | None]:
    served = rt.registry.get(name)
    if served is not None:
        return served
    entry = rt.registry.entry(name)
    if entry is None:
        available = ", ".join(e.name for e in rt.registry.entries()) or "none"
        raise HTTPException(404, f"model {name!r} is not served here (available: {available})")
    if entry.state == "failed":
        raise HTTPException(503, f"model {name!r} failed to load: {entry.error}")
    raise HTTPException(503, f"model {name!r} is still loading after {rt.settings.model_wait:.0f} s: try again in a "
                             "minute (GET /info/ shows each model's state)", headers={"Retry-After": "30"})


async def _model_when_loaded(rt: Runtime, name: str) -> tuple[Any, str | None]:
    """:func:`_model`, but a model still loading is waited for (up to ``settings.model_wait`` seconds) first.

    The server answers as soon as its first model is ready; a request for one of the others then succeeds once
    that one is loaded instead of failing with "still loading".
    """
    entry = rt.registry.entry(name)
    if entry is not None and entry.model is None and entry.state in ("pending", "loading"):
        deadline = time.monotonic() + rt.settings.model_wait
        log.info("model %s is still loading: the request waits for it (up to %.0f s)", name, rt.settings.model_wait)
        while time.monotonic() < deadline and not rt.shutting_down.is_set():
            entry = rt.registry.entry(name)
            if entry is None or entry.model is not None or entry.state == "failed":
                break
            await asyncio.sleep(0.1)
        if rt.shutting_down.is_set():
            raise ShuttingDown()
    return _model(rt, name)


def _session(rt: Runtime, session_id: str, *, touch: bool = True) -> Session:
    try:
        return rt.sessions.get(session_id, touch=touch)
    except (SessionNotFound, SessionGone) as exc:
        raise _session_error(session_id, exc) from None


def _session_error(session_id: str, exc: KeyError) -> HTTPException:
    # MONAI Label's Slicer plugin shows this text and cannot upload again by itself: say how.
    again = "upload the image again (MONAI Label's Slicer plugin: close the scene and load the volume again)"
    if isinstance(exc, SessionGone):
        return HTTPException(410, f"session {session_id} is gone ({exc.reason}): {again}")
    return HTTPException(404, f"session {session_id} not found (deleted, or never created on this server): {again}")


async def _run_blocking(rt: Runtime, fn: Callable[..., T], *args: Any, gpu: bool,
                        watch: Callable[[], Awaitable[None]] | None = None) -> T:
    """Run ``fn`` in a daemon thread, ``workers`` at a time; answer 503 if the server starts shutting down meanwhile.

    A daemon thread, not the default pool: a model busy for minutes must not hold the process after SIGTERM, and
    the client gets a clear 503 within a fraction of a second instead of a hang. The slot is given back when the
    thread ends, not when the request gives up, so a second inference never overlaps a running one on the GPU.
    ``watch()`` is awaited at every poll (5 a second), while waiting for the slot too; it may raise to give up.
    """
    slots = rt.gpu_slots if gpu else rt.cpu_slots
    await _acquire(rt, slots, watch)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            res: Any = fn(*args)
            ok = True
        except BaseException as exc:  # handed to the awaiting request
            res, ok = exc, False
        try:
            loop.call_soon_threadsafe(_settle, fut, res, ok, slots)
        except RuntimeError:  # the loop is gone: the server stopped while we worked
            pass

    try:
        threading.Thread(target=work, name="hpcseg-gpu" if gpu else "hpcseg-io", daemon=True).start()
    except BaseException:
        slots.release()
        raise
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.2)
        if done:
            return fut.result()
        if rt.shutting_down.is_set():
            raise ShuttingDown()
        if watch is not None:
            await watch()


async def _acquire(rt: Runtime, slots: asyncio.Semaphore,
                   watch: Callable[[], Awaitable[None]] | None = None) -> None:
    """Wait for a slot in arrival order, giving up if the server starts shutting down."""
    acq = asyncio.ensure_future(slots.acquire())
    try:
        while True:
            done, _ = await asyncio.wait({acq}, timeout=0.2)
            if done:
                return
            if rt.shutting_down.is_set():
                raise ShuttingDown()
            if watch is not None:
                await watch()
    except BaseException:
        if not acq.cancel() and not acq.cancelled() and acq.exception() is None:
            slots.release()  # it was granted just as we gave up
        raise


def _settle(fut: asyncio.Future, res: Any, ok: bool, slots: asyncio.Semaphore) -> None:
    slots.release()
    if fut.done():
        return
    if ok:
        fut.set_result(res)
    else:
        fut.set_exception(res)
