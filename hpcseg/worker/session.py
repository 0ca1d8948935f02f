"""SegmentationSession: what the Slicer module asks of a server, as blocking calls on plain data (in the worker).

One object per profile holds the :class:`hpcseg.serverjobs.ServerConnection` (a server job found or started, the
tunnel, the HTTP client) and the id of the image session on the server, so interactive clicks send only points:
the image goes up once per volume (and again only if the server forgot it). Images travel as
:class:`~hpcseg.worker.geometry.VolumeArray` (numpy + IJK-to-RAS), points as RAS, results come back as
:class:`Segmentation` (a label array on the volume's grid and the label names). Every method blocks; the worker
process (:mod:`hpcseg.worker.service`) calls them on its lanes. Two lanes may call at once: actions (one at a
time) and :meth:`poll`/:meth:`stop`, which never share the action's HTTP client.

Example::

    s = SegmentationSession(profile, progress=print)
    s.connect()                                         # finds or starts the server job; waits until ready
    seg = s.segment(volume, "ct-body")                  # seg.label_names == {"body": 1, "lungs": 2, "bone": 3}
    seg = s.click(volume, "deepgrow-regiongrow", foreground=[[-10.5, 20.0, 31.0]])   # RAS points
    s.upload_pair(volume, {"liver": liver_mask}, dataset="liver", split="auto")
    s.close()
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .. import imaging
from ..client import InferResult, ServerClient, Timeouts
from ..config import Profile
from ..datasets import DatasetUploader, UploadResult
from ..errors import HpcsegError, ServerError
from ..jobs import JobManager, JobRecord
from ..schedulers import JobState
from ..serverjobs import ServerConnection, read_connection, stop_servers
from .geometry import VolumeArray
from .status import ServerState, StatusSnapshot

#: extreme points DEXTR3D-style: the six outermost points of the object (left, right, front, back, top, bottom)
EXTREME_POINTS = 6
SEGMENTATION_TYPES = ("segmentation",)
CLICK_TYPES = ("deepgrow",)
EXTREME_TYPES = ("dextr3d",)


class Cancelled(Exception):
    """A call ended because the user stopped what it waited for: nothing to report as an error."""


@dataclass
class Segmentation:
    """A label array on the volume's grid (k, j, i), its names, and where it came from."""

    labels: np.ndarray
    label_names: dict[str, int]
    model: str = ""
    model_version: str = ""
    warnings: list[str] = field(default_factory=list)
    #: bytes this request sent: the whole image for :meth:`SegmentationSession.segment`, only points for a click
    request_bytes: int = 0

    def segments(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """``(name, value, binary uint8 array)`` per named label, in label-value order."""
        for name, value in sorted(self.label_names.items(), key=lambda kv: kv[1]):
            yield name, int(value), (self.labels == value).astype(np.uint8)


def models_by_type(info: dict[str, Any]) -> dict[str, list[str]]:
    """Model names per type (``segmentation``, ``deepgrow``, ``dextr3d``...) from the server's ``/info/``."""
    out: dict[str, list[str]] = {}
    for name, m in (info.get("models") or {}).items():
        out.setdefault(str(m.get("type", "segmentation")), []).append(name)
    return {k: sorted(v) for k, v in out.items()}


def label_values(names: Sequence[str], known: dict[str, int]) -> dict[str, int]:
    """Label values for segment names: the known value of a known name, the next free value for a new one."""
    out: dict[str, int] = {}
    used = set(known.values())
    for name in names:
        if name in known:
            out[name] = int(known[name])
            continue
        value = 1
        while value in used:
            value += 1
        used.add(value)
        out[name] = value
    return out


def merge_segments(segments: dict[str, np.ndarray], values: dict[str, int]) -> np.ndarray:
    """One label map from binary segment arrays (a later segment wins where two overlap)."""
    if not segments:
        raise ValueError("the segmentation has no segments to upload")
    shapes = {a.shape for a in segments.values()}
    if len(shapes) != 1:
        raise ValueError(f"segments are on different grids: {sorted(shapes)}")
    dtype = np.uint8 if max(values.values(), default=0) < 256 else np.uint16
    out = np.zeros(shapes.pop(), dtype)
    for name, arr in segments.items():
        out[np.asarray(arr) != 0] = values[name]
    return out


class SegmentationSession:
    """A profile's server as the Slicer module uses it (see the module docstring). Thread-compatible as used:
    one action at a time, plus :meth:`poll` and :meth:`stop` from other threads."""

    def __init__(self, profile: Profile, *, progress: Callable[[str], None] | None = None,
                 jobs: JobManager | None = None, timeout: float | None = 1800) -> None:
        self.profile = profile
        self._layered = jobs is not None  # jobs given: the caller made the profile what it should be
        self.jobs = jobs or JobManager(profile)
        self._progress = progress
        self.timeout = timeout
        self._lock = threading.RLock()  # guards the fields below between the action, poll and stop lanes
        self._conn: ServerConnection | None = None
        self._poll_client: ServerClient | None = None
        self._session_id = ""
        self._session_key = ""
        self._watched: JobRecord | None = None
        self._ended: StatusSnapshot | None = None  # the watched job's last word, once it ended
        self._stop_requested = False
        self.info: dict[str, Any] = {}
        self.last_result: Segmentation | None = None
        #: label names of the whole-volume segmentations so far: the values an upload uses for a new dataset
        self.known_labels: dict[str, int] = {}
        #: the version of the model behind the last whole-volume segmentation (an upload's provenance)
        self.model_version = ""

    # --- connection ---------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.client is not None

    @property
    def client(self) -> ServerClient:
        if not self.connected:
            raise ServerError("not connected to a server", hint="press Connect / start server first")
        return self._conn.client  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        """The server's local URL (through the tunnel), or "" when not connected."""
        return self._conn.url if self.connected else ""  # type: ignore[union-attr]

    @property
    def job_id(self) -> str:
        return self._conn.record.job_id if self.connected and self._conn.record else ""

    def _layer_site(self) -> None:
        """Once, at the first connect: the cluster's site bundle layered in as the ``hpcseg`` command does
        (:func:`hpcseg.site.resolve`), so a profile holding only a host works here too."""
        if self._layered or not self.profile.host or self.profile.site == "none":
            return
        from ..config import load_config
        from ..site import resolve

        res = resolve(self.profile, user_keys=load_config().explicit.get(self.profile.name))
        with self._lock:
            old = self.jobs
            self.profile = res.profile
            self.jobs = JobManager(res.profile, shell=res.shell, store=old.store, site=res.bundle,
                                   origins=res.origins)
            self._layered = True
        if old._shell is not None and old._shell is not res.shell:
            old._shell.close()

    def connect(self, start: bool = True) -> dict[str, Any]:
        """Find the profile's running server or start one, wait until ready, return its ``/info/``."""
        if self.connected:
            return self.refresh_models()
        self._stop_requested = False
        self._layer_site()
        conn = ServerConnection(self.profile, jobs=self.jobs, start=start, timeout=self.timeout,
                                progress=self._progress)
        try:
            conn.open()
        except HpcsegError as exc:
            if self._stop_requested:
                raise Cancelled("stopped while waiting for the server") from exc
            raise
        with self._lock:
            self._conn, self._watched = conn, conn.record
            self._poll_client = ServerClient(conn.url, conn.info.token, retries=0,  # type: ignore[union-attr]
                                             timeouts=Timeouts(connect=5.0, read=10.0))
            self._session_id = self._session_key = ""
        if self._stop_requested:  # Stop came just as the server became ready: it is being cancelled
            self._forget_connection()
            raise Cancelled("stopped while connecting")
        # the server answers once its first model is ready; the module's model lists want every model
        waited: list[str] = []

        def loading(state: str) -> None:
            waited.append(state)
            if self._progress:
                self._progress(f"loading the other models ({state})")

        self.client.wait_ready(timeout=self.timeout or 600, poll=0.5, all_models=True, progress=loading)
        if waited and self._progress:
            self._progress("ready: every model loaded")
        return self.refresh_models()

    def refresh_models(self) -> dict[str, Any]:
        self.info = self.client.info()
        return self.info

    def models(self) -> dict[str, list[str]]:
        """Model names per type, from the last ``/info/``."""
        return models_by_type(self.info)

    # --- inference ----------------------------------------------------------------------------------------------
    def segment(self, volume: VolumeArray, model: str, labels: Sequence[str] | None = None, *,
                progress: Callable[[str, int, int], None] | None = None) -> Segmentation:
        """Segment a whole volume with a segmentation model; ``progress(phase, done, total)`` as
        :meth:`hpcseg.client.ServerClient.segment` reports it (the bytes up, the server's windows, the bytes down)."""
        image = volume.to_image()
        seg = self._result(self.client.segment(image, model, labels=labels, progress=progress), volume, model)
        self.known_labels.update(seg.label_names)
        self.model_version = seg.model_version
        return seg

    def has_image(self, volume: VolumeArray) -> bool:
        """Does the server hold this volume in a session already (clicks send only points)?"""
        return bool(self._session_id) and self._session_key == volume.fingerprint()

    def click(self, volume: VolumeArray, model: str, foreground: Sequence[Sequence[float]],
              background: Sequence[Sequence[float]] = (), label: str | None = None) -> Segmentation:
        """Deepgrow-style: foreground/background RAS points → one object. Sends only points once the image is up."""
        fg, bg = volume.voxel_indices(foreground), volume.voxel_indices(background) if len(background) else []
        if not fg:
            raise ValueError("place at least one foreground point")
        return self._interactive(volume, model, lambda sid: self.client.click(sid, model, fg, bg, label=label))

    def extreme_points(self, volume: VolumeArray, model: str, points: Sequence[Sequence[float]],
                       label: str | None = None) -> Segmentation:
        """DEXTR3D-style: the object's extreme points (RAS) → the object."""
        pts = volume.voxel_indices(points)
        if not pts:
            raise ValueError("place the object's extreme points first")
        return self._interactive(volume, model, lambda sid: self.client.extreme_points(sid, model, pts, label=label))

    def _interactive(self, volume: VolumeArray, model: str, call: Callable[[str], InferResult]) -> Segmentation:
        for attempt in (1, 2):
            sid = self._ensure_session(volume)
            try:
                return self._result(call(sid), volume, model)
            except ServerError as exc:
                if attempt == 2 or exc.status not in (404, 410):
                    raise
                with self._lock:  # the server forgot the image (expired, restarted): upload it again, once
                    self._session_id = self._session_key = ""
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_session(self, volume: VolumeArray) -> str:
        key = volume.fingerprint()
        if self._session_id and self._session_key == key:
            return self._session_id
        old = self._session_id
        sid = self.client.create_session(volume.to_image())
        with self._lock:
            self._session_id, self._session_key = sid, key
        if old:
            self.client.delete_session(old)
        return sid

    def _result(self, res: InferResult, volume: VolumeArray, model: str) -> Segmentation:
        labels = sitk.GetArrayFromImage(res.mask)
        if labels.shape != volume.array.shape:
            raise ServerError(f"model {model} answered a mask of shape {labels.shape} for a volume of shape "
                              f"{volume.array.shape}: a server bug")
        seg = Segmentation(labels, dict(res.label_names), model, res.model_version, res.warnings, res.request_bytes)
        self.last_result = seg
        return seg

    # --- fine-tuning data ---------------------------------------------------------------------------------------
    def upload_pair(self, volume: VolumeArray, segments: dict[str, np.ndarray], *, dataset: str,
                    split: str = "auto", progress: Callable[[int, int], None] | None = None) -> UploadResult:
        """Upload the volume and its corrected segments (name → binary array) to a dataset on the cluster.

        Label values come from the dataset when it exists, else from the whole-volume segmentations of this
        session (``body`` stays 1 as ct-body said), else the next free value (an interactive ``liver`` gets 4).
        """
        uploader = DatasetUploader(self.jobs.shell, self.jobs.abs_path(self.profile.datasets_path))
        known = uploader.dataset_labels(dataset)
        values = label_values(list(segments), self.known_labels if known is None else known)
        mask = merge_segments(segments, values)
        image = volume.to_image()
        version = self.model_version or (self.last_result.model_version if self.last_result else None)
        with tempfile.TemporaryDirectory(prefix="hpcseg-slicer-") as tmp:
            image_path, mask_path = Path(tmp) / "image.nii.gz", Path(tmp) / "mask.nii.gz"
            sitk.WriteImage(image, str(image_path), True)
            imaging.write_mask(mask, mask_path, values, reference=image)
            return uploader.upload(image_path, mask_path, dataset=dataset, labels=values, split=split,
                                   model_version=version, progress=progress)

    # --- status, stop, close ------------------------------------------------------------------------------------
    def _active_record(self) -> JobRecord | None:
        recs = [r for r in self.jobs.store.list(self.profile.name)
                if r.template == "server" and not JobState(r.last_state).terminal]
        return max(recs, key=lambda r: r.created) if recs else None

    def poll(self) -> StatusSnapshot:
        """Both axes now: the job from the scheduler (one batched query), the server from ``/health/ready``.

        Reads this client's job list first, so a profile without a server job costs no scheduler call.
        """
        with self._lock:
            conn_rec = self._conn.record if self._conn else None
            health = self._poll_client
        rec = conn_rec if conn_rec is not None and not JobState(conn_rec.last_state).terminal else None
        rec = rec or self._active_record() or self._watched
        if rec is None:
            return StatusSnapshot(None, ServerState.NO_JOB)
        if self._ended is not None and self._ended.job_id == rec.job_id:
            return self._ended  # an ended job stays ended: no more scheduler queries for it
        self._watched = rec
        st = self.jobs.status([rec.job_id])[rec.job_id]
        if st.state.terminal:
            if conn_rec is not None and conn_rec.job_id == rec.job_id:
                self._forget_connection()
            self._ended = StatusSnapshot(st, ServerState.GONE, rec.job_id)
            return self._ended
        if st.state is JobState.UNKNOWN:
            return StatusSnapshot(st, ServerState.UNKNOWN, rec.job_id)
        if st.state is JobState.PENDING:
            return StatusSnapshot(st, ServerState.NOT_STARTED, rec.job_id)
        if st.state is JobState.STOPPING:
            return StatusSnapshot(st, ServerState.ENDING, rec.job_id)
        if health is not None and conn_rec is not None and conn_rec.job_id == rec.job_id:
            try:
                body = health.health()
            except ServerError as exc:
                return StatusSnapshot(st, ServerState.UNREACHABLE, rec.job_id, exc.message)
            if body.get("ready"):
                return StatusSnapshot(st, ServerState.READY, rec.job_id)
            if body.get("state") == "failed":
                return StatusSnapshot(st, ServerState.FAILED, rec.job_id, "no model could be loaded")
            return StatusSnapshot(st, ServerState.STARTING, rec.job_id, "loading models")
        if read_connection(self.jobs, rec) is None:
            return StatusSnapshot(st, ServerState.STARTING, rec.job_id, "waiting for the server to start")
        return StatusSnapshot(st, ServerState.NOT_CONNECTED, rec.job_id, "press Connect to use it")

    def stop(self) -> list[str]:
        """Cancel the profile's server jobs (also one still queued while :meth:`connect` waits for it)."""
        self._stop_requested = True
        self._forget_connection()
        return stop_servers(self.jobs)

    def abandon(self, since: datetime) -> list[str]:
        """Cancel the server jobs this client submitted at or after ``since`` that are not ready yet.

        What quitting does with a server job nobody will wait for any more: one still queued or starting is
        cancelled (no orphan in the queue); the one this session is connected to (ready) keeps serving until its
        idle timeout, as after ``hpcseg connect``.
        """
        keep = self.job_id
        ids = []
        for rec in self.jobs.store.list(self.profile.name):
            try:
                created = datetime.fromisoformat(rec.created)
            except ValueError:
                continue
            if (rec.template == "server" and rec.job_id != keep and not JobState(rec.last_state).terminal
                    and not rec.extra.get("cancelled") and created >= since):
                ids.append(rec.job_id)
        if ids:
            self.jobs.cancel(ids, quiet=True)
        return ids

    def _forget_connection(self) -> None:
        with self._lock:
            conn, poll = self._conn, self._poll_client
            self._conn = self._poll_client = None
            self._session_id = self._session_key = ""
        for c in (poll, conn.client if conn else None):
            if c is not None:
                c.close()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Drop the image session and the tunnel; the server job keeps running until idle (or :meth:`stop`)."""
        if self.connected and self._session_id:
            try:
                self.client.delete_session(self._session_id)
            except HpcsegError:
                pass  # a server that is gone has forgotten the session anyway
        self._forget_connection()
