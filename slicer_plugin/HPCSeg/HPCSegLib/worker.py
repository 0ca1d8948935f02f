"""The module's side of the hpcseg worker: start it, send requests, read its answers without ever waiting.

Slicer's main thread keeps Python's lock while Qt idles, so the module runs no Python threads: long work happens
in a worker *process* (``python -m hpcseg.worker``, protocol in ``hpcseg/worker/__init__.py``), and the module's
``QTimer`` calls :meth:`WorkerClient.pump` a few times a second (every 10 ms while a call is out). ``pump`` reads
whatever the worker has written (the pipe is non-blocking) and runs the callbacks of finished calls, on the
thread that calls it (Slicer's GUI thread). Images go as ``.npy`` files in a private folder (mode 0700, made by
``tempfile.mkdtemp``), never through the pipes.

One client (and one worker) per profile: the worker keeps the SSH connection, the tunnel and the server's image
session between calls. A worker that dies (killed, crashed) is reported in one line and started again by the next
call. :meth:`quit` (Slicer quits, the scene closes) ends it within two seconds: a server job it submitted that is
not ready yet is cancelled; a ready one keeps serving until its idle timeout.

Standard library and numpy only (Slicer ships numpy): this works before hpcseg can be imported here.

Example (what the module's buttons do, and what the tests do without a Slicer)::

    client = WorkerClient("karolina")
    client.call("connect", {}, on_done=show_models, on_error=report, on_progress=status_line)
    ...                                   # every tick: client.pump()
    client.call("click", {"volume": client.write_volume(array, ijk_to_ras, key), "model": "deepgrow-regiongrow",
                          "foreground": [[-10.5, 20.0, 31.0]]}, on_done=lambda r: show(client.read_labels(r)))
    client.quit()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QUIT_TIMEOUT = 2.0
#: ops that run beside the action lane (see hpcseg.worker): a poll or Stop answers while Connect waits
SIDE_LANES = {"poll": "poll", "stop": "stop"}
Callback = Callable[[Any], None]


class WorkerError(Exception):
    """An error the worker reported (hpcseg's sentence and hint), or the worker itself failing."""

    def __init__(self, message: str, *, hint: str = "", details: str = "", type: str = "",
                 cancelled: bool = False) -> None:
        super().__init__(message)
        self.message, self.hint, self.details, self.type, self.cancelled = message, hint, details, type, cancelled

    def __str__(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


class WorkerCrashed(WorkerError):
    """The worker process ended while calls were out (killed, crashed, or it could not start)."""


def error_text(exc: BaseException) -> tuple[str, str]:
    """``(message, details)`` for an error dialog; ``("", "")`` for a call the user cancelled.

    Errors with a sentence and a hint (the worker's, hpcseg's own) show both; ValueError carries the plugin's own
    sentences; anything else is a bug: its traceback goes into the details (empty details: no "Show Details").
    """
    if getattr(exc, "cancelled", False):
        return "", ""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and hasattr(exc, "hint"):
        hint = getattr(exc, "hint", None)
        return message + (f"\n\nHint: {hint}" if hint else ""), getattr(exc, "details", "") or ""
    if isinstance(exc, ValueError):
        return str(exc), ""
    import traceback

    return (f"Unexpected error: {type(exc).__name__}: {exc}",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


@dataclass
class _Call:
    op: str
    lane: str
    on_done: Callback | None
    on_error: Callback | None
    on_progress: Callback | None
    started: float = field(default_factory=time.monotonic)


def exit_words(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed (signal {-code})"
    return f"exited with code {code}"


class WorkerClient:
    """One profile's worker process, driven by :meth:`call` and :meth:`pump` (never blocks, never threads)."""

    def __init__(self, profile: str, *, python: str | None = None, env: dict[str, str] | None = None,
                 on_crash: Callable[[str], None] | None = None) -> None:
        self.profile = profile
        self.python = python or default_python()
        self.env = env
        self.on_crash = on_crash
        self.folder: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.hello: dict[str, Any] = {}
        self.last_crash = ""
        self.last_noise = ""
        #: seconds the last finished call took inside the worker (what the wait cost beyond it is the transport)
        self.last_worker_s = 0.0
        #: the last worker's exit code (0: it ended by itself, also after quit; negative: killed by that signal)
        self.exit_code: int | None = None
        self._calls: dict[int, _Call] = {}
        self._next_id = 1
        self._buffer = b""
        self._volume_key = ""
        self._quitting = False

    # --- the process --------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the worker (a new private folder each time); a no-op while it runs."""
        if self.running:
            return
        self.folder = Path(tempfile.mkdtemp(prefix="hpcseg-slicer-"))  # 0700: patients' images pass here
        self._buffer, self._volume_key, self.hello, self._quitting = b"", "", {}, False
        argv = [self.python, "-u", "-m", "hpcseg.worker", "--profile", self.profile, "--folder", str(self.folder)]
        with open(self.folder / "worker.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         env=self.env, cwd=str(self.folder))
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]

    def busy(self, lane: str | None = None) -> bool:
        """Is a call out on ``lane`` (any lane when None)?"""
        return any(lane is None or c.lane == lane for c in self._calls.values())

    def call(self, op: str, args: dict[str, Any] | None = None, *, on_done: Callback | None = None,
             on_error: Callback | None = None, on_progress: Callback | None = None) -> int | None:
        """Send a request; None (nothing sent) when its lane is busy. Starts the worker if it is not running
        (after a crash, the next call restarts it). Callbacks run later, in :meth:`pump`."""
        lane = SIDE_LANES.get(op, "action")
        self.pump()  # notice a worker that died since the last tick before writing to it
        if self.busy(lane):
            return None
        self.start()
        call_id = self._next_id
        self._next_id += 1
        self._calls[call_id] = _Call(op, lane, on_done, on_error, on_progress)
        try:
            self.proc.stdin.write(json.dumps({"id": call_id, "op": op, "args": args or {}}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died just now: pump() reports it and fails this call
            self.pump()
        return call_id

    def pump(self) -> int:
        """Read what the worker wrote and run the callbacks of what finished; returns how many messages."""
        if self.proc is None:
            return 0
        eof = False
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line) if line.strip() else None
            except ValueError:  # not the protocol (a library printing to stdout): keep the line for a crash report
                self.last_noise = line[:300].decode(errors="replace")
                continue
            if isinstance(msg, dict):
                self._dispatch(msg)
        if eof or self.proc.poll() is not None:
            self._ended()
        return len(lines)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "hello":
            self.hello = msg
            return
        if event in ("bye", "protocol-error") or "id" not in msg:
            if event == "fatal":
                self.last_crash = msg["error"]["message"]
            return
        call = self._calls.get(msg["id"])
        if call is None:
            return
        if event == "progress":
            if call.on_progress is not None:
                call.on_progress(msg)
            return
        del self._calls[msg["id"]]
        self.last_worker_s = float(msg.get("worker_s") or 0.0)
        if msg.get("ok"):
            if call.on_done is not None:
                call.on_done(msg.get("result"))
        else:
            err = msg.get("error") or {}
            exc = WorkerError(err.get("message", "the worker failed"), hint=err.get("hint", ""),
                              details=err.get("details", ""), type=err.get("type", ""),
                              cancelled=bool(err.get("cancelled")))
            _deliver_error(call, exc)

    def _ended(self) -> None:
        """The process is gone: fail what was out, in one line, and forget the process (the next call restarts)."""
        proc, self.proc = self.proc, None
        if proc is None and not self._calls:
            return
        code = proc.wait() if proc is not None else None
        self.exit_code = code
        calls, self._calls = self._calls, {}
        if self._quitting:
            for call in calls.values():
                _deliver_error(call, WorkerError("the worker was closed", cancelled=True))
            return
        doing = ", ".join(sorted({c.op for c in calls.values()}))
        last = self.last_crash or self._log_tail()
        line = (f"the hpcseg worker for {self.profile} {exit_words(code)}" + (f" during {doing}" if doing else "")
                + (f" ({last})" if last else "") + "; it starts again with the next action")
        self.last_crash = line
        for call in calls.values():
            _deliver_error(call, WorkerCrashed(line))
        if self.on_crash is not None:
            self.on_crash(line)

    def _log_tail(self) -> str:
        try:
            lines = (self.folder / "worker.log").read_text(errors="replace").strip().splitlines()  # type: ignore
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def wait(self, call_id: int | None, timeout: float = 600.0, tick: float = 0.01) -> None:
        """Pump until call ``call_id`` has had its callback (tests, the benchmark, Slicer's ctest): what the
        module's timer does, with ``tick`` as its interval."""
        deadline = time.monotonic() + timeout
        while call_id in self._calls:
            if time.monotonic() > deadline:
                raise TimeoutError(f"call {call_id} ({self._calls[call_id].op}) did not end in {timeout:.0f} s")
            time.sleep(tick)
            self.pump()

    def request(self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 600.0,
                on_progress: Callback | None = None, tick: float = 0.01) -> Any:
        """:meth:`call` then :meth:`wait`: the result, or the error raised."""
        out: dict[str, Any] = {}
        call_id = self.call(op, args, on_done=lambda r: out.setdefault("result", r),
                            on_error=lambda e: out.setdefault("error", e), on_progress=on_progress)
        if call_id is None:
            raise WorkerError(f"another {SIDE_LANES.get(op, 'action')} is running")
        self.wait(call_id, timeout, tick)
        if "error" in out:
            raise out["error"]
        return out.get("result")

    def quit(self, timeout: float = QUIT_TIMEOUT) -> None:
        """End the worker now: ask it to quit, kill it if it has not exited within ``timeout`` s; remove the
        folder. Calls still out end as cancelled (no dialog)."""
        proc = self.proc
        if proc is not None:
            self._quitting = True
            try:
                proc.stdin.write(b'{"id": 0, "op": "quit"}\n')  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.pump()
            self._ended()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def kill(self) -> None:
        """Kill the worker as a crash would (tests); the next :meth:`pump` reports it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    # --- files --------------------------------------------------------------------------------------------------
    def write_volume(self, array: np.ndarray, ijk_to_ras: Any, key: str) -> dict[str, Any]:
        """The ``volume`` argument of a call: the voxels as a file in the private folder, written once per key
        (a click on the same volume writes nothing)."""
        self.start()
        name = f"volume-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}.npy"
        path = self.folder / name  # type: ignore[operator]
        if self._volume_key != key or not path.exists():
            for old in self.folder.glob("volume-*.npy"):  # type: ignore[union-attr]
                old.unlink(missing_ok=True)
            _save(path, np.ascontiguousarray(array))
            self._volume_key = key
        return {"key": key, "path": str(path), "ijk_to_ras": np.asarray(ijk_to_ras, dtype=float).tolist()}

    def write_labels(self, labels: np.ndarray) -> str:
        """A label map for an upload, as a file in the private folder."""
        self.start()
        path = self.folder / f"labels-{self._next_id}.npy"  # type: ignore[operator]
        _save(path, labels)
        return str(path)

    def read_labels(self, result: dict[str, Any]) -> np.ndarray:
        """The label array of a segmentation result (the worker's file is removed once read)."""
        path = Path(result["labels_path"])
        try:
            return np.load(path)
        finally:
            path.unlink(missing_ok=True)


def _deliver_error(call: _Call, exc: WorkerError) -> None:
    if call.on_error is not None:
        call.on_error(exc)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def stack_segments(segments: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Binary segments (name → array) as one label map with values 1..n in order (a later segment wins where
    two overlap) and the names; the worker maps the names to the dataset's values."""
    if not segments:
        raise ValueError("the segmentation has no segments to upload")
    names = {name: i + 1 for i, name in enumerate(segments)}
    shapes = {np.shape(a) for a in segments.values()}
    if len(shapes) != 1:
        raise ValueError(f"segments are on different grids: {sorted(shapes)}")
    out = np.zeros(shapes.pop(), np.uint8 if len(names) < 256 else np.uint16)
    for name, arr in segments.items():
        out[np.asarray(arr) != 0] = names[name]
    return out, names


def default_python() -> str:
    """The Python the worker runs in: Slicer's ``PythonSlicer`` (what ``slicer.util.pip_install`` runs too,
    so the worker sees what pip installed), else this interpreter."""
    found = shutil.which("PythonSlicer")
    return found or sys.executable
