"""The hpcseg worker: a process that does a GUI's long work (3D Slicer's HPCSeg module), spoken to in JSON lines.

A GUI that embeds Python cannot count on threads: Slicer's main thread keeps Python's lock while Qt idles, so
work on Python threads (and paramiko's, which carry every upload) crawls. So the module starts this worker
(``python -m hpcseg.worker --profile NAME --folder DIR``) with Slicer's Python or another one, writes one request
per line on its stdin and reads one message per line from its stdout, never waiting on it. One worker serves one
profile and keeps its SSH connection, tunnel and image session between calls, so a click stays a click.

Requests (client → worker)::

    {"id": 7, "op": "click", "args": {...}}

    op          args                                                    result
    connect     start (bool), timeout (s)                               info, models {type: [names]}, job_id, url
    segment     volume, model, labels?                                  a segmentation (below)
    click       volume, model, foreground [[R,A,S]], background, label  a segmentation
    extreme     volume, model, points [[R,A,S]] x6, label               a segmentation
    upload      volume, labels_path, names {name: value}, dataset, split    case_id, status, split, bytes_sent
    poll        -                                                       text, severity, ready, job_id, delay
    stop        -                                                       job_ids (cancelled)
    presets     -                                                       presets [{name, description, refusal}]
    doctor      -                                                       checks [{item, ok, detail, fix}]
    close       -                                                       - (tunnel and image session dropped)
    quit        -                                                       (no result: the worker says "bye", exits)

Images never go through the pipes: ``volume`` is ``{"key": ..., "path": "DIR/….npy", "ijk_to_ras": 4×4}``, a
numpy file the client wrote in the private (0700) folder ``DIR``; a segmentation comes back as
``{"labels_path": "DIR/….npy", "label_names": {...}, "model", "model_version", "warnings", "request_bytes"}``,
which the client reads and deletes. The worker reads a volume file only when its key is new to it.

Messages (worker → client), one JSON object a line::

    {"event": "hello", "pid": 4242, "version": "0.1.0", "profile": "karolina", "python": "/…/python3"}
    {"id": 7, "event": "progress", "message": "queued: Resources, expected 14:05"}
    {"id": 9, "event": "progress", "done": 1048576, "total": 8388608}            (upload's bytes)
    {"id": 8, "event": "progress", "phase": "upload", "done": 5, "total": 9}     (segment, by phase)
    {"id": 7, "ok": true, "result": {...}}
    {"id": 7, "ok": false, "error": {"type": "JobError", "message": "...", "hint": "...", "details": "",
                                     "cancelled": false}}
    {"event": "bye"}

Calls run on lanes inside the worker (``action``: one at a time, in order; ``poll`` and ``stop`` beside it), so a
status poll or Stop answers while Connect waits in the queue. ``quit`` is handled at once, on the reading thread:
a server job this worker submitted that is not ready yet is cancelled (never left queued with nobody waiting for
it), a ready server keeps running until its idle timeout, and the process exits within 2 s.
"""

from __future__ import annotations

from .geometry import VolumeArray
from .session import Cancelled, Segmentation, SegmentationSession

__all__ = ["Cancelled", "Segmentation", "SegmentationSession", "VolumeArray"]
