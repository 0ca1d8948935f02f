"""The HTTP client of hpcseg's inference server (through the SSH tunnel, or to a local server).

Every request carries ``Authorization: Bearer <token>`` and a timeout (per phase: connect, read, upload,
inference); proxies from the environment are ignored (an ``http_proxy`` would capture requests meant for the
tunnel's localhost port). What is safe to retry is retried when the connection (not the server) failed: GET and
DELETE a few times; an inference or a click, whose upload is kept here, once, over a fresh connection, with the same
idempotency key (``X-HPCSeg-Request-Id``), so the server answers the retry from the finished result or waits for the
running one instead of running it twice. What still fails names the real cause, checked then (``diagnose``, e.g. the
tunnel's :meth:`~hpcseg.tunnel.Tunnel.cause`): SSH connection to the login node lost, server job ended, or the
server refused. Images go up
compressed with hpcseg's zstd codec when the server offers it (gzip-1 NIfTI otherwise) and masks come back the same
way; upload and download report progress as ``(done, total)``. HTTP and connection errors become
:class:`hpcseg.errors.ServerError` here, once, with a sentence for the user.

Wire (see :mod:`hpcseg.server.app`): ``POST /infer/{model}?output=image[&session_id=...]`` with a multipart body
(``params`` JSON, and the ``file`` part unless a session holds the image); the answer is the encoded mask, its
label names and the model version in the ``X-HPCSeg-Result`` header (JSON).

Example::

    client = ServerClient("http://127.0.0.1:40123", token)
    client.wait_ready(timeout=600)
    mask, names, version = client.segment("ct.nii.gz", model="ct-body", labels=["liver"])
    sid = client.create_session(image)
    mask, names, version = client.click(sid, "deepgrow-regiongrow", foreground=[[30, 40, 12]])
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.errors import ServerError
from hpcseg.protocol import ALREADY_ANSWERED, PROTOCOL_VERSION, compatible, server_mismatch
from hpcseg.protocol import HEADER as PROTOCOL_HEADER

Progress = Callable[[int, int], None]
Diagnose = Callable[[], tuple[str, str]]
_CHUNK = 1 << 20
T = TypeVar("T")
REQUEST_ID_HEADER = "X-HPCSeg-Request-Id"  # the idempotency key of an inference (one per call, kept by its retry)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed per phase: TCP connect, an ordinary answer, sending an image, an inference."""

    connect: float = 10.0
    read: float = 60.0
    upload: float = 600.0
    infer: float = 1800.0


@dataclass
class InferResult:
    """A mask and where it came from. Unpacks as ``mask, label_names, model_version``."""

    mask: sitk.Image
    label_names: dict[str, int]
    model_version: str
    params: dict[str, Any] = field(default_factory=dict)
    request_bytes: int = 0
    response_bytes: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.mask, self.label_names, self.model_version))

    @property
    def warnings(self) -> list[str]:
        """Input QA warnings the server found (odd spacing, values that do not look like CT...)."""
        return list(self.params.get("warnings") or [])


class _Body:
    """A request body made of byte chunks, read in pieces so uploads report progress (and are not copied)."""

    def __init__(self, chunks: Sequence[bytes], progress: Progress | None) -> None:
        self._chunks = [memoryview(c) for c in chunks if len(c)]
        self._total = sum(len(c) for c in self._chunks)
        self._done = 0
        self._reported = 0
        self._progress = progress

    def __len__(self) -> int:
        return self._total

    def read(self, size: int = -1) -> bytes:
        if not self._chunks:
            return b""
        size = self._total if size is None or size < 0 else size
        out = bytearray()
        while self._chunks and len(out) < size:
            head = self._chunks[0]
            take = head[: size - len(out)]
            out += take
            self._chunks[0] = head[len(take):]
            if not len(self._chunks[0]):
                self._chunks.pop(0)
        self._done += len(out)
        if self._progress and (self._done - self._reported >= _CHUNK or self._done == self._total):
            self._reported = self._done
            self._progress(self._done, self._total)
        return bytes(out)


def _multipart(fields: dict[str, str], files: Sequence[tuple[str, str, str, bytes]]) -> tuple[list[bytes], str]:
    """Chunks of a multipart/form-data body (the image bytes are not copied) and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, ctype, data in files:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())
        chunks += [data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return chunks, f"multipart/form-data; boundary={boundary}"


class ServerClient:
    """Talks to one server (see the module docstring). A context manager; not bound to a thread."""

    def __init__(self, base_url: str, token: str, *, session: requests.Session | None = None,
                 timeouts: Timeouts | None = None, retries: int = 3, compression: str = "auto",
                 diagnose: Diagnose | None = None) -> None:
        if compression not in ("auto", "zstd", "gzip"):
            raise ValueError("compression must be auto, zstd or gzip")
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.retries = retries
        self.compression = compression
        self.session = session or requests.Session()
        self.session.trust_env = False  # no proxies, .netrc or CA bundles from the environment
        self.session.proxies = {}
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        self._info: dict[str, Any] | None = None
        self.diagnose = diagnose  # () -> (why, what to do), asked when the connection failed
        self.retried = 0  # requests sent again after a lost connection (the soak test and bench count them)

    def __repr__(self) -> str:
        return f"ServerClient({self.base_url!r}, token=***)"

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    # --- queries ------------------------------------------------------------------------------------------------
    def info(self, refresh: bool = True) -> dict[str, Any]:
        """The server's ``/info/``: models (name -> type, labels, version...), ``failed``, ``hpcseg`` extras."""
        if refresh or self._info is None:
            self._info = self._json("GET", "/info/")
        return self._info

    def health(self) -> dict[str, Any]:
        """``/health/ready`` as a dict (``ready`` false while models load; never raises for that 503)."""
        resp = self._request("GET", "/health/ready", idempotent=True, ok=(200, 503))
        return resp.json()

    def wait_ready(self, timeout: float = 600.0, progress: Callable[[str], None] | None = None,
                   poll: float = 1.0, all_models: bool = False) -> dict[str, Any]:
        """Wait until the server serves a model (``all_models``: until every model has loaded or failed);
        ``progress`` gets a line per state change (nothing when the server is ready at once).

        A server answers once its first model is warm; a request for a model still loading waits for it there.
        """
        deadline, last, state = time.monotonic() + timeout, None, "no answer yet"
        while True:
            try:
                body = self.health()
                check_protocol(body)
                if body.get("ready") and not (all_models and body.get("loading")):
                    return body
                models = body.get("models", {})
                state = f"{body.get('state')}: " + ", ".join(f"{n} {m.get('state')}" for n, m in models.items())
                if body.get("state") == "failed":
                    raise ServerError(f"the server could load no model ({state})", status=503)
            except ServerError as exc:
                if not exc.retryable:
                    raise
                state = exc.message
            if progress and state != last:
                progress(state)
                last = state
            if time.monotonic() >= deadline:
                raise ServerError(f"the server was not ready after {timeout:.0f} s ({state})", retryable=True)
            time.sleep(poll)

    def default_model(self, image: sitk.Image, configured: str | None = None, kind: str = "segmentation"):
        """The model to run on ``image`` when none is named, with the reason (:func:`hpcseg.modelchoice.choose_model`:
        ``configured``, else ct-body for CT-like input, else one that declares the input's modality)."""
        from .modelchoice import choose_model

        info = self.info(refresh=self._info is None)
        if info.get("loading") and configured not in info.get("models", {}):
            # the server answers once its first model is ready: choose among all of them, not the first ones
            self.wait_ready(timeout=self.timeouts.infer, poll=0.5, all_models=True)
            info = self.info()
        return choose_model(info.get("models", {}), image, configured, kind=kind)

    def reload(self, wait: bool = True) -> dict[str, Any]:
        """Ask the server to re-read its models directories (a new fine-tuned version); returns ``/info/``."""
        self._info = self._json("POST", "/reload", params={"wait": str(wait).lower()},
                                timeout=(self.timeouts.connect, self.timeouts.infer))
        return self._info

    # --- inference ----------------------------------------------------------------------------------------------
    def segment(self, image: sitk.Image | str | Path, model: str, labels: Sequence[str] | None = None,
                fast: bool = False, *, params: dict[str, Any] | None = None,
                progress: Callable[[str, int, int], None] | None = None, upload_progress: Progress | None = None,
                download_progress: Progress | None = None, infer_progress: Progress | None = None) -> InferResult:
        """Segment a whole image; returns ``(mask, label_names, model_version)`` (an :class:`InferResult`).

        ``labels`` restricts the structures; ``fast`` trades accuracy for speed. ``progress(phase, done, total)``
        with phase ``upload``/``download`` (bytes) and ``infer`` (the server's windows or steps, polled from
        ``GET /progress/{id}`` about once a second), or the three per-phase callbacks, follows it. A 2D, 4D, RGB or
        single-slice image raises :class:`~hpcseg.errors.ImageError` before anything is sent; NaN voxels are sent
        as the image's lowest value (and said so in ``.warnings``, with the server's QA warnings).
        """
        img, notes = _prepare(image)
        p: dict[str, Any] = {"fast": bool(fast)}
        if labels:
            p["label_names"] = list(labels)
        p.update(params or {})
        ctype = self._codec()
        data = imaging.encode(img, ctype)
        up, down = _phases(progress, upload_progress, download_progress)
        if progress is not None and infer_progress is None:
            infer_progress = lambda d, t: progress("infer", d, t)  # noqa: E731
        result = self._infer(model, p, file=(data, ctype), reference=img, upload_progress=up,
                             download_progress=down, infer_progress=infer_progress)
        if notes:
            result.params["warnings"] = notes + [w for w in result.warnings if w not in notes]
        return result

    def create_session(self, image: sitk.Image | str | Path, *, progress: Progress | None = None) -> str:
        """Upload an image once; later :meth:`click`/:meth:`extreme_points` send only points. Returns its id."""
        img, _ = _prepare(image, min_slices=1)  # prompts on a single slice are the interactive model's call
        ctype = self._codec()
        chunks, content_type = _multipart({}, [("files", "image" + _suffix(ctype), ctype, imaging.encode(img, ctype))])
        # Sent again once if the connection is lost: at worst the server holds one unused session until it expires.
        resp = self._once_more(lambda: self._request(
            "PUT", "/session/", data=_Body(chunks, progress), headers={"Content-Type": content_type},
            timeout=(self.timeouts.connect, self.timeouts.upload)), "PUT /session/")
        return str(resp.json()["session_id"])

    def get_session(self, session_id: str) -> dict[str, Any]:
        """A session's info: expiry, counters (``bytes_received``, ``last_request_bytes``), geometry."""
        return self._json("GET", f"/session/{session_id}", session_id=session_id)

    def delete_session(self, session_id: str, missing_ok: bool = True) -> None:
        """Drop a session on the server (frees its memory). Already gone is fine unless ``missing_ok=False``."""
        try:
            self._request("DELETE", f"/session/{session_id}", idempotent=True, session_id=session_id)
        except ServerError as exc:
            if not (missing_ok and exc.status in (404, 410)):
                raise

    def click(self, session_id: str, model: str, foreground: Sequence[Sequence[int]],
              background: Sequence[Sequence[int]] = (), *, label: str | None = None,
              params: dict[str, Any] | None = None) -> InferResult:
        """Interactive segmentation from clicks (voxel indices ``[x, y, z]``) on a session's image."""
        p: dict[str, Any] = {"foreground": [list(map(int, q)) for q in foreground],
                             "background": [list(map(int, q)) for q in background]}
        if label:
            p["label"] = label
        p.update(params or {})
        return self._infer(model, p, session_id=session_id)

    def extreme_points(self, session_id: str, model: str, points: Sequence[Sequence[int]], *,
                       label: str | None = None, params: dict[str, Any] | None = None) -> InferResult:
        """Segmentation from extreme points (DEXTR3D-style: the object's outermost voxels) on a session's image."""
        p: dict[str, Any] = {"points": [list(map(int, q)) for q in points]}
        if label:
            p["label"] = label
        p.update(params or {})
        return self._infer(model, p, session_id=session_id)

    def _infer(self, model: str, params: dict[str, Any], *, session_id: str | None = None,
               file: tuple[bytes, str] | None = None, reference: sitk.Image | None = None,
               upload_progress: Progress | None = None, download_progress: Progress | None = None,
               infer_progress: Progress | None = None) -> InferResult:
        files = [("file", "image" + _suffix(file[1]), file[1], file[0])] if file else []
        chunks, content_type = _multipart({"params": json.dumps(params)}, files)
        query = {"output": "image", **({"session_id": session_id} if session_id else {})}
        headers = {"Content-Type": content_type, "Accept": self._accept(), REQUEST_ID_HEADER: uuid.uuid4().hex}
        sent = sum(len(c) for c in chunks)

        def attempt() -> tuple[requests.Response, bytes]:
            resp = self._request("POST", f"/infer/{model}", params=query, data=_Body(chunks, upload_progress),
                                 stream=True, headers=headers,
                                 timeout=(self.timeouts.connect, max(self.timeouts.upload, self.timeouts.infer)),
                                 session_id=session_id, model=model)
            return resp, self._download(resp, download_progress)

        poller = _InferPoller(self, headers[REQUEST_ID_HEADER], infer_progress) if infer_progress else None
        ok = False
        try:
            try:
                resp, data = self._once_more(attempt, f"inference {model}")
            except ServerError as exc:
                # The first try ran, but its answer was lost with the connection and the server no longer keeps it
                # (newer answers pushed it out before the retry came): send it once more as a new request.
                if exc.status != 409 or ALREADY_ANSWERED not in exc.message:
                    raise
                log.warning("inference %s: the server answered the first try but no longer keeps the answer; "
                            "sending it once more as a new request", model)
                headers[REQUEST_ID_HEADER] = uuid.uuid4().hex
                resp, data = attempt()
            ok = True
        finally:
            if poller is not None:
                poller.stop(finished=ok)
        result = json.loads(resp.headers.get("X-HPCSeg-Result", "{}"))
        ctype = resp.headers.get("Content-Type", imaging.CONTENT_TYPE_NIFTI).split(";")[0].strip()
        mask = imaging.decode(data, ctype if ctype in imaging.CONTENT_TYPES else imaging.CONTENT_TYPE_NIFTI)
        if reference is not None and not imaging.same_geometry(mask, reference):
            raise ServerError(f"model {model} answered a mask of size {mask.GetSize()} that is not on the image's "
                              f"grid {reference.GetSize()}: a server bug")
        version = resp.headers.get("X-HPCSeg-Model-Version") or str(result.get("model_version", "unknown"))
        return InferResult(mask, dict(result.get("label_names") or {}), version, result,
                           int(resp.headers.get("X-HPCSeg-Request-Bytes", sent)), len(data))

    # --- plumbing -----------------------------------------------------------------------------------------------
    def _codec(self) -> str:
        if self.compression == "gzip":
            return imaging.CONTENT_TYPE_NIFTI
        if self.compression == "zstd":
            return imaging.CONTENT_TYPE_ZSTD
        offered = self.info(refresh=self._info is None).get("hpcseg", {}).get("codecs", [])
        return imaging.CONTENT_TYPE_ZSTD if imaging.CONTENT_TYPE_ZSTD in offered else imaging.CONTENT_TYPE_NIFTI

    def _accept(self) -> str:
        return f"{self._codec()}, {imaging.CONTENT_TYPE_NIFTI};q=0.5"

    def _download(self, resp: requests.Response, progress: Progress | None) -> bytes:
        total = int(resp.headers.get("Content-Length") or 0)
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if progress:
                    progress(len(buf), total)
        except requests.RequestException as exc:
            raise ConnectionLost(exc) from exc
        finally:
            resp.close()
        return bytes(buf)

    def _once_more(self, send: Callable[[], T], what: str) -> T:
        """``send()``, and once more if the connection (not the server) failed; then the real cause, named.

        The second try goes over a fresh connection: the tunnel opens a new channel, and the SSH connection under
        it logs in again when it was lost. Only for requests that are safe to send twice (see the module docstring).
        """
        try:
            return send()
        except ConnectionLost as exc:
            log.warning("%s: connection lost (%s); sending it once more over a fresh connection", what, exc.cause)
            self.retried += 1
        try:
            return send()
        except ConnectionLost as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: ConnectionLost) -> ServerError:
        """The error for a connection that failed for good: its real cause when the caller can check it."""
        if self.diagnose is not None:
            try:
                why, what = self.diagnose()
            except Exception as diag_exc:  # diagnosing must not hide the first failure
                log.debug("diagnosing the lost connection failed: %s", diag_exc)
            else:
                return ServerError(why, retryable=True, hint=what)
        return _went_away(exc.cause)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._request(method, path, idempotent=method in ("GET", "DELETE"), **kw)
        try:
            return resp.json()
        except ValueError as exc:
            raise ServerError(f"the server answered {path} with something that is not JSON",
                              status=resp.status_code) from exc

    def _request(self, method: str, path: str, *, idempotent: bool = False, ok: Sequence[int] = (200, 202),
                 timeout: tuple[float, float] | None = None, session_id: str | None = None,
                 model: str | None = None, **kw: Any) -> requests.Response:
        """One request, retried (connection errors only) when idempotent; errors become ServerError."""
        url = self.base_url + path
        timeout = timeout or (self.timeouts.connect, self.timeouts.read)
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                resp = self.session.request(method, url, timeout=timeout, **kw)
                break
            except requests.RequestException as exc:
                lost = isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.ConnectTimeout)
                if attempt + 1 >= attempts or not isinstance(exc, (requests.ConnectionError, requests.Timeout)):
                    if lost:
                        if idempotent:  # retried already: name the cause now
                            raise self._lost(ConnectionLost(exc)) from exc
                        raise ConnectionLost(exc) from exc  # the caller may send it once more (_once_more)
                    raise _translate(exc, timeout) from exc
                time.sleep(min(0.25 * 2 ** attempt, 2.0))
        if resp.status_code not in ok:
            try:
                raise _http_error(resp, session_id=session_id, model=model)
            finally:
                resp.close()
        return resp


def _prepare(image: sitk.Image | str | Path, min_slices: int = 3) -> tuple[sitk.Image, list[str]]:
    """The image to send: read if a path, checked to be a 3D single-channel volume (ImageError before any upload
    otherwise), NaN/inf voxels replaced by its lowest value; and warnings about what was changed."""
    name = "the image" if isinstance(image, sitk.Image) else image
    img = image if isinstance(image, sitk.Image) else imaging.read_image(image)
    img = imaging.as_volume(img, name, min_slices=min_slices)
    img, bad = imaging.finite_voxels(img)
    notes = [imaging.nonfinite_warning(bad)] if bad else []
    return img, notes


class _InferPoller:
    """Follows a running inference's progress (``GET /progress/{request id}``) in a thread, while the POST waits.

    Its own HTTP session (requests' sessions are not shared across threads), short timeouts, no retries: a missed
    poll only delays the next number. ``progress(done, total)`` is called when the numbers change.
    """

    def __init__(self, client: ServerClient, request_id: str, progress: Progress, interval: float = 1.0) -> None:
        self._url = f"{client.base_url}/progress/{request_id}"
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.headers.update({k: v for k, v in client.session.headers.items()
                                      if k in ("Authorization", PROTOCOL_HEADER)})
        self._progress, self._interval = progress, interval
        self._stop = threading.Event()
        self._last: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="hpcseg-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                resp = self._session.get(self._url, timeout=(3.0, 5.0))
            except requests.RequestException:
                continue
            if resp.status_code != 200:
                continue
            body = resp.json()
            now = (int(body.get("done", 0)), int(body.get("total", 0)))
            if now != self._last and now[1] > 0 and not self._stop.is_set():
                self._last = now
                self._progress(*now)
            if body.get("state") != "running":
                break

    def stop(self, finished: bool = False) -> None:
        """Stop polling; ``finished``: the answer came, so the last numbers seen are completed (done = total)."""
        self._stop.set()
        self._thread.join(timeout=6.0)
        self._session.close()
        if finished and self._last is not None and self._last[0] < self._last[1]:
            self._progress(self._last[1], self._last[1])


def _phases(progress: Callable[[str, int, int], None] | None, up: Progress | None,
            down: Progress | None) -> tuple[Progress | None, Progress | None]:
    if progress is not None:
        up = up or (lambda d, t: progress("upload", d, t))
        down = down or (lambda d, t: progress("download", d, t))
    return up, down


def _suffix(content_type: str) -> str:
    return ".hsv" if content_type == imaging.CONTENT_TYPE_ZSTD else ".nii.gz"


class ConnectionLost(ServerError):
    """The connection to the server broke (reset, closed, tunnel gone) before the whole answer came."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"the connection to the server was lost: {cause}", retryable=True)
        self.cause = cause


def _went_away(exc: Exception) -> ServerError:
    return ServerError("the server went away (job cancelled or ended?)", retryable=True,
                       hint="`hpcseg jobs` shows what happened; `hpcseg connect` starts or finds a server")


def _translate(exc: requests.RequestException, timeout: tuple[float, float]) -> ServerError:
    if isinstance(exc, requests.ConnectTimeout):
        return ServerError(f"cannot reach the server within {timeout[0]:.0f} s (tunnel down?)", retryable=True,
                           hint="`hpcseg connect` re-opens the tunnel")
    if isinstance(exc, requests.Timeout):
        return ServerError(f"the server did not answer within {timeout[1]:.0f} s", retryable=True,
                           hint="a busy or stuck server: `hpcseg jobs` and the server log tell more")
    if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return _went_away(exc)
    return ServerError(f"HTTP request failed: {exc}")


def check_protocol(body: dict[str, Any]) -> None:
    """Refuse (one line, not retryable) a server whose health answer names another protocol, or none."""
    theirs = body.get("protocol")
    theirs = theirs if isinstance(theirs, int) and not isinstance(theirs, bool) else None
    if not compatible(theirs):
        raise ServerError(server_mismatch(theirs, str(body.get("version", ""))), status=426, retryable=False)


def _http_error(resp: requests.Response, *, session_id: str | None, model: str | None) -> ServerError:
    status = resp.status_code
    try:
        detail = str(resp.json().get("detail", ""))
    except ValueError:
        detail = resp.text[:300].strip()
    if status == 426:
        return ServerError(detail or "the server speaks another protocol version", status=426, retryable=False)
    if status == 401:
        return ServerError("token refused: the server job was restarted? run hpcseg connect again", status=401)
    if status == 410:
        return ServerError(detail or f"session {session_id} expired", status=410,
                           hint="upload the image again (a new session)")
    if status == 404 and session_id and "session" in detail:
        return ServerError(detail or f"session {session_id} not found", status=404,
                           hint="the session was deleted or the server restarted: upload the image again")
    if status == 503:
        return ServerError(detail or "the server is not ready", status=503, retryable=True)
    where = f" (model {model})" if model else ""
    return ServerError(f"the server refused the request{where}: {status} {detail}".rstrip(), status=status)
