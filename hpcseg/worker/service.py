"""The worker's loop: JSON requests on stdin, one :class:`SegmentationSession` per process, JSON lines on stdout.

The protocol is described in :mod:`hpcseg.worker`. This module only reads requests, runs each on its lane (a
one-thread executor: ``action``, ``poll``, ``stop``), turns results and errors into JSON, and handles ``quit`` at
once on the reading thread. Everything it does with a server or the cluster is a call into
:class:`~hpcseg.worker.session.SegmentationSession`, which is hpcseg's library (serverjobs, client, datasets).

Example (what the Slicer module does, by hand)::

    $ python -m hpcseg.worker --profile local --folder /tmp/hpcseg-x   # the folder must be 0700 and ours
    {"event": "hello", "pid": 4242, ...}
    {"id": 1, "op": "connect", "args": {}}
    {"id": 1, "event": "progress", "message": "submitted server job 17"}
    ...
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import __version__
from ..config import load_config
from ..errors import ConfigError, HpcsegError
from .geometry import VolumeArray
from .session import Cancelled, Segmentation, SegmentationSession, models_by_type
from .status import next_poll_delay

#: how long ``quit`` may take before the process exits regardless (the module kills it after 2 s)
QUIT_BUDGET = 1.5
LANES = {"poll": "poll", "stop": "stop"}  # every other op runs on the "action" lane


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An exception as the client shows it: hpcseg's sentence and hint; a traceback only for a bug."""
    if isinstance(exc, Cancelled):
        return {"type": "Cancelled", "message": str(exc), "hint": "", "details": "", "cancelled": True}
    if isinstance(exc, HpcsegError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint or "", "details": "",
                "cancelled": False}
    if isinstance(exc, ValueError):  # the plugin's own sentences: a point outside the volume, no dataset name
        return {"type": "ValueError", "message": str(exc), "hint": "", "details": "", "cancelled": False}
    return {"type": type(exc).__name__, "message": f"unexpected error: {type(exc).__name__}: {exc}", "hint": "",
            "details": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "cancelled": False}


def check_folder(folder: Path) -> Path:
    """The exchange folder must be a directory only its owner (us) can enter: images of patients pass here."""
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{folder} is not a folder")
    if os.name == "posix" and (st.st_uid != os.getuid() or st.st_mode & 0o077):
        raise ConfigError(f"{folder} must belong to this user with mode 0700 (it is {st.st_mode & 0o777:o})",
                          hint="the module makes it with tempfile.mkdtemp()")
    return folder.resolve()


class Worker:
    """One profile's session, served over a pair of streams."""

    def __init__(self, profile_name: str, folder: Path, out: IO[str]) -> None:
        self.profile_name = profile_name
        self.folder = check_folder(folder)
        self._out = out
        self._write_lock = threading.Lock()
        self._lanes = {name: ThreadPoolExecutor(1, thread_name_prefix=f"hpcseg-{name}")
                       for name in ("action", "poll", "stop")}
        self._started = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
        self._closing = threading.Event()
        self._volume: VolumeArray | None = None
        self.session = self._new_session()

    # --- output ---------------------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with self._write_lock:
            self._out.write(line + "\n")
            self._out.flush()

    # --- the session ----------------------------------------------------------------------------------------
    def _new_session(self) -> SegmentationSession:
        profile = load_config().profile(self.profile_name)
        return SegmentationSession(profile, progress=self._progress_text)

    def _progress_text(self, message: str) -> None:
        if self._closing.is_set():  # quitting: a start waiting for its job gives up (and cancels it)
            raise Cancelled("the worker is quitting")
        current = getattr(self._current, "call_id", None)
        if current is not None:
            self.send({"id": current, "event": "progress", "message": message})

    _current = threading.local()

    def _load_volume(self, spec: dict[str, Any]) -> VolumeArray:
        key = str(spec.get("key") or "")
        if self._volume is not None and key and self._volume.key == key:
            return self._volume
        path = Path(spec["path"]).resolve()
        if path.parent != self.folder:
            raise ValueError(f"volume file {path} is not in the worker's folder {self.folder}")
        self._volume = VolumeArray(np.load(path), np.asarray(spec["ijk_to_ras"], dtype=float), key)
        return self._volume

    def _segmentation(self, call_id: int, seg: Segmentation) -> dict[str, Any]:
        path = self.folder / f"result-{os.getpid()}-{call_id}.npy"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, seg.labels, allow_pickle=False)
        os.replace(tmp, path)  # the client never sees half a file
        return {"labels_path": str(path), "label_names": seg.label_names, "model": seg.model,
                "model_version": seg.model_version, "warnings": list(seg.warnings),
                "request_bytes": seg.request_bytes}

    def _connected(self) -> SegmentationSession:
        """The session, connected: after a restart, a call reattaches to the profile's running server (it never
        submits a job: only Connect does)."""
        if not self.session.connected:
            self.session.connect(start=False)
        return self.session

    # --- ops ------------------------------------------------------------------------------------------------
    def op_connect(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        if not self.session.connected:  # the profile as saved now: it may have been edited in the settings
            self.session.close()
            self.session = self._new_session()
        if "timeout" in args:
            self.session.timeout = args["timeout"]
        info = self.session.connect(start=bool(args.get("start", True)))
        return {"info": info, "models": models_by_type(info), "job_id": self.session.job_id,
                "url": self.session.url}

    def op_segment(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        volume = self._load_volume(args["volume"])
        last = [0.0]

        def progress(phase: str, done: int, total: int) -> None:  # at most ~10 lines a second, and the last one
            now = time.monotonic()
            if now - last[0] >= 0.1 or done >= total:
                last[0] = now
                self.send({"id": call_id, "event": "progress", "phase": phase, "done": done, "total": total})

        seg = self._connected().segment(volume, args["model"], args.get("labels"), progress=progress)
        return self._segmentation(call_id, seg)

    def op_click(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        volume = self._load_volume(args["volume"])
        seg = self._connected().click(volume, args["model"], args["foreground"], args.get("background") or [],
                                      label=args.get("label"))
        return self._segmentation(call_id, seg)

    def op_extreme(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        volume = self._load_volume(args["volume"])
        seg = self._connected().extreme_points(volume, args["model"], args["points"], label=args.get("label"))
        return self._segmentation(call_id, seg)

    def op_upload(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        volume = self._load_volume(args["volume"])
        path = Path(args["labels_path"]).resolve()
        if path.parent != self.folder:
            raise ValueError(f"label file {path} is not in the worker's folder {self.folder}")
        labels = np.load(path)
        segments = {name: labels == int(value) for name, value in args["names"].items()}

        def progress(done: int, total: int) -> None:
            self.send({"id": call_id, "event": "progress", "done": done, "total": total})

        up = self.session.upload_pair(volume, segments, dataset=args["dataset"], split=args.get("split", "auto"),
                                      progress=progress)
        return {"case_id": up.case_id, "status": up.status, "split": up.split, "bytes_sent": up.bytes_sent,
                "raw_bytes": up.raw_bytes}

    def op_poll(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        snap = self.session.poll()
        return {"text": snap.text, "severity": snap.severity, "ready": snap.ready, "job_id": snap.job_id,
                "server": snap.server.name, "delay": next_poll_delay(snap)}

    def op_stop(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        return {"job_ids": self.session.stop()}

    def op_presets(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        """The site bundle's presets for the profile as saved now, each with the refusal ``submit`` would give."""
        from ..site import presets_for

        cfg = load_config()
        prof = cfg.profile(self.profile_name)
        return {"presets": presets_for(prof, shell=self.session.jobs.shell, user_keys=cfg.explicit.get(prof.name))}

    def op_doctor(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        """``hpcseg doctor`` for the profile as saved now: one item per check (item, ok, detail, fix)."""
        from ..doctor import as_json, diagnose

        cfg = load_config()
        prof = cfg.profile(self.profile_name)
        return {"checks": as_json(diagnose(prof, shell=self.session.jobs.shell,
                                           user_keys=cfg.explicit.get(prof.name)))}

    def op_close(self, call_id: int, args: dict[str, Any]) -> dict[str, Any]:
        self.session.close()
        return {}

    # --- the loop -------------------------------------------------------------------------------------------
    def _run(self, call_id: int, op: str, args: dict[str, Any]) -> None:
        self._current.call_id = call_id
        t0 = time.perf_counter()
        try:
            result = getattr(self, f"op_{op}")(call_id, args)
        except BaseException as exc:  # every call is answered, whatever happens
            self.send({"id": call_id, "ok": False, "error": error_payload(exc)})
        else:  # the time the call took inside the worker: the rest of a caller's wait is the worker's overhead
            self.send({"id": call_id, "ok": True, "result": result, "worker_s": time.perf_counter() - t0})
        finally:
            self._current.call_id = None

    def handle(self, line: str) -> bool:
        """One request line; False after ``quit``."""
        try:
            req = json.loads(line)
            call_id, op, args = int(req["id"]), str(req["op"]), dict(req.get("args") or {})
        except (ValueError, KeyError, TypeError) as exc:
            self.send({"event": "protocol-error", "message": f"unreadable request {line[:200]!r}: {exc}"})
            return True
        if op == "quit":
            self.quit()
            return False
        if not hasattr(self, f"op_{op}"):
            self.send({"id": call_id, "ok": False, "error": error_payload(ValueError(f"unknown operation {op!r}"))})
            return True
        self._lanes[LANES.get(op, "action")].submit(self._run, call_id, op, args)
        return True

    def quit(self) -> None:
        """Cancel what this worker started and nobody will wait for, within :data:`QUIT_BUDGET`; then exit."""
        self._closing.set()
        deadline = time.monotonic() + QUIT_BUDGET
        done = threading.Event()

        def abandon() -> None:
            try:
                # Twice apart: a submission that was in flight when quit came is recorded by the second look.
                self.session.abandon(self._started)
                time.sleep(0.2)
                self.session.abandon(self._started)
                self.session.close()
            except BaseException:  # noqa: S110 - quitting: nobody is left to tell
                pass
            done.set()

        threading.Thread(target=abandon, daemon=True, name="hpcseg-quit").start()
        done.wait(max(0.0, deadline - time.monotonic()))
        self.send({"event": "bye"})

    def serve(self, stream: IO[str]) -> None:
        self.send({"event": "hello", "pid": os.getpid(), "version": __version__, "profile": self.profile_name,
                   "python": sys.executable})
        for line in stream:
            if line.strip() and not self.handle(line):
                return
        self.quit()  # stdin closed: the GUI went away without saying goodbye


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcseg.worker",
                                     description="Serve one hpcseg profile to a GUI over JSON lines (stdin/stdout).")
    parser.add_argument("--profile", default=None, help="the profile (default: the config file's default)")
    parser.add_argument("--folder", required=True, type=Path, help="a private (0700) folder for image files")
    args = parser.parse_args(argv)
    out = sys.stdout
    sys.stdout = sys.stderr  # a stray print() anywhere must not corrupt the protocol
    try:
        worker = Worker(args.profile or load_config().default or "local", args.folder, out)
    except HpcsegError as exc:
        out.write(json.dumps({"event": "fatal", "error": error_payload(exc)}) + "\n")
        out.flush()
        return 2
    worker.serve(sys.stdin)
    out.flush()
    os._exit(0)  # daemon lanes may still wait on a queue or a socket: the process ends now, as promised
