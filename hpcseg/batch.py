"""Whole cohorts: segment many cases as one job array on the cluster (or through the local server), resumably.

``hpcseg batch INPUT... -o OUT`` runs :func:`start_batch` then :meth:`Batch.run`:

1. **cases** (:mod:`hpcseg.batchinputs`): found in files, folders and CSVs, validated locally like ``segment``
   (a bad one is reported with its reason, the rest go on) and staged by content hash, so a duplicate is sent and
   segmented once.
2. **upload** (cluster): each staged input once to ``<work_dir>/batches/inputs/<key>.hsv`` (atomic: temp name, then
   rename); what is there already is not sent again, also after a kill.
3. **one job array** per round (``templates/batch.sh.j2``, :mod:`hpcseg.batchworker`): each task loads the model
   once and claims cases until none is left; results are written atomically on the cluster.
4. **collect** as results appear: each mask is fetched and written atomically into ``OUT`` in its input's
   geometry, with the label volumes in ``OUT/report.csv`` and ``report.json``. A failed case is tried once more by
   another task, then reported with the worker's line that says why. When every task of a round has ended, cases
   that a dead task held (walltime, node failure) go into a new round; at most :data:`MAX_ROUNDS` rounds.

Everything the client knows lives in ``OUT/.hpcseg-batch/state.json`` (rewritten atomically after each step), and
the batch id is remembered in the client's state dir, so ``hpcseg batch collect [BATCH]`` carries on after a
killed client or a sleeping laptop: nothing uploaded is sent again, nothing finished runs again, nothing collected
is fetched again. On the embedded ``local`` profile the cases go through the local server one by one instead.

Example::

    b = start_batch(profile, ["scans/"], Path("out"), model="ct-body", tasks=4)
    b.run(on_progress=print)          # returns when every case is done, failed or invalid
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .batchinputs import Case, discover, prepare, reference_image
from .batchreport import label_volumes, report_rows, write_report
from .batchworker import write_atomic
from .config import Profile, state_dir
from .errors import BatchError, HpcsegError
from .jobs import JobManager

STATE = ".hpcseg-batch"
#: rounds of the job array at most: the first, and new ones for cases whose task died (walltime, node failure)
MAX_ROUNDS = 4
FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha",
           "dicom-seg": ".dcm"}

Progress = Callable[[dict[str, Any]], None]


# -- which batches this client started -----------------------------------------------------------------------------
class BatchStore:
    """Batch ids → output folders, one JSON file in the client's state dir (locked, written atomically)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "batches.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[dict[str, Any]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                records = json.loads(self.path.read_text())
            except FileNotFoundError:
                records = []
            except (OSError, ValueError) as exc:
                raise BatchError(f"cannot read the batch list {self.path}: {exc}",
                                 hint="move the file away; hpcseg starts a new one") from exc
            before = json.dumps(records)
            yield records
            if json.dumps(records) != before:
                write_atomic(self.path, json.dumps(records, indent=1).encode())

    def add(self, batch_id: str, profile: str, out_dir: Path) -> None:
        with self._locked() as records:
            records.append({"batch_id": batch_id, "profile": profile, "out_dir": str(out_dir.resolve()),
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def list(self, profile: str | None = None) -> list[dict[str, Any]]:
        with self._locked() as records:
            return [r for r in records if profile is None or r["profile"] == profile]

    def find(self, batch: str | None, profile: str | None = None) -> Path:
        """The output folder of a batch id (or an output folder itself); None: the newest batch of the profile."""
        if batch and (Path(batch) / STATE / "state.json").is_file():
            return Path(batch)
        records = self.list(profile)
        if batch:
            records = [r for r in records if r["batch_id"] == batch]
        if not records:
            raise BatchError(f"no batch {batch!r} known here" if batch else "no batch started from here yet",
                             hint="give the batch id `hpcseg batch` printed, or its output folder (-o)")
        return Path(records[-1]["out_dir"])


# -- starting a batch ----------------------------------------------------------------------------------------------
def start_batch(profile: Profile, inputs: list[str | os.PathLike], out_dir: Path, *, model: str | None = None,
                labels: list[str] | None = None, tasks: int = 4, fmt: str = "seg.nrrd", fast: bool = False,
                store: BatchStore | None = None, on_case: Callable[[Case], None] | None = None) -> Batch:
    """Find and validate the cases, stage them, write the state and remember the batch. Nothing is sent yet."""
    if fmt not in FORMATS:
        raise BatchError(f"unknown output format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if tasks < 1:
        raise BatchError(f"--tasks must be at least 1, got {tasks}")
    out_dir = Path(out_dir).expanduser()
    if (out_dir / STATE / "state.json").exists():
        raise BatchError(f"{out_dir} already holds a batch", hint=f"carry on with: hpcseg batch collect {out_dir}")
    cases = discover(inputs)
    if not cases:
        raise BatchError("no image found in the inputs", hint="give files, folders of scans, or a CSV of paths")
    staging = out_dir / STATE / "staging"
    for case in cases:
        prepare(case, staging)
        if fmt == "dicom-seg" and not case.error and case.kind != "dicom":
            case.error = "a DICOM SEG needs a DICOM series as input; this is a " + Path(case.source).suffix + " file"
        if on_case:
            on_case(case)
    if not any(not c.error for c in cases):
        raise BatchError(f"none of the {len(cases)} inputs can be segmented (first: {cases[0].error})")
    batch_id = datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    first: dict[str, str] = {}
    rows = []
    for c in cases:
        row = {"case_id": c.case_id, "source": c.source, "kind": c.kind, "series_uid": c.series_uid,
               "key": c.key, "geometry": c.geometry, "warnings": c.warnings,
               "status": "invalid" if c.error else "pending", "reason": c.error}
        if c.key and c.key in first:
            row["warnings"] = [*c.warnings, f"the same image as case {first[c.key]}: segmented once"]
        elif c.key:
            first[c.key] = c.case_id
        rows.append(row)
    state = {"batch_id": batch_id, "profile": profile.name, "model": model or profile.default_model or "ct-body",
             "labels": list(labels or []), "fast": fast, "format": fmt, "tasks": tasks,
             "via": "server" if profile.is_local else "array", "created": time.time(), "cases": rows,
             "uploaded": [], "submitted": None, "rounds": [], "finished": False, "cancelled": False}
    (out_dir / STATE).mkdir(parents=True, exist_ok=True)
    b = Batch(out_dir, profile, state=state)
    b.save()
    (store or BatchStore()).add(batch_id, profile.name, out_dir)
    return b


# -- a batch -------------------------------------------------------------------------------------------------------
class Batch:
    """One batch, from its output folder's state: upload, submit, follow, collect, cancel, report."""

    def __init__(self, out_dir: Path, profile: Profile, *, state: dict[str, Any] | None = None,
                 jobs: JobManager | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.profile = profile
        self.state = state if state is not None else self._load()
        self._jobs = jobs

    @classmethod
    def open(cls, out_dir: Path, profile: Profile, jobs: JobManager | None = None) -> Batch:
        b = cls(out_dir, profile, jobs=jobs)
        if b.state["profile"] != profile.name:
            raise BatchError(f"batch {b.id} runs on profile {b.state['profile']}, not {profile.name}",
                             hint=f"add -p {b.state['profile']}")
        return b

    def _load(self) -> dict[str, Any]:
        path = self.out_dir / STATE / "state.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise BatchError(f"{self.out_dir} holds no batch", hint="give the output folder of `hpcseg batch`") \
                from exc
        except (OSError, ValueError) as exc:
            raise BatchError(f"cannot read {path}: {exc}") from exc

    @property
    def id(self) -> str:
        return self.state["batch_id"]

    @property
    def jobs(self) -> JobManager:
        if self._jobs is None:
            self._jobs = JobManager(self.profile)
        return self._jobs

    def save(self) -> None:
        write_atomic(self.out_dir / STATE / "state.json", json.dumps(self.state, indent=1).encode())

    def write_report(self) -> tuple[Path, Path]:
        return write_report(self.out_dir, report_rows(self.state["cases"], self.state["model"]),
                            self.state.get("label_names", []))

    # -- what is left ----------------------------------------------------------------------------------------------
    def keys(self, status: str | None = None) -> list[str]:
        """Unique input keys of the valid cases (optionally only those whose cases have ``status``)."""
        return list(dict.fromkeys(c["key"] for c in self.state["cases"]
                                  if c["key"] and c["status"] != "invalid" and (status is None or
                                                                                c["status"] == status)))

    def summary(self, remote: dict[str, Any] | None = None) -> dict[str, Any]:
        """Counts by status, ETA and rounds: what ``batch status`` prints (``remote``: the last poll's view)."""
        counts: dict[str, int] = {}
        for c in self.state["cases"]:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        pending = [c for c in self.state["cases"] if c["status"] == "pending"]
        running = sum(1 for c in pending if remote and c["key"] in remote.get("claimed", ()))
        done_keys = len(self.keys("done"))
        left = len(self.keys("pending"))
        eta = None
        start = self.state.get("submitted")
        if start and done_keys and left:
            eta = round((time.time() - start) / done_keys * left)
        return {"batch_id": self.id, "profile": self.state["profile"], "out_dir": str(self.out_dir),
                "model": self.state["model"], "cases": len(self.state["cases"]), "done": counts.get("done", 0),
                "failed": counts.get("failed", 0), "invalid": counts.get("invalid", 0), "running": running,
                "queued": len(pending) - running, "cancelled": counts.get("cancelled", 0), "eta_seconds": eta,
                "finished": self.state["finished"], "rounds": [
                    {k: r[k] for k in ("round", "array_id", "size")} for r in self.state["rounds"]],
                "tasks": (remote or {}).get("tasks", {})}

    # -- storing one result ----------------------------------------------------------------------------------------
    def store_result(self, key: str, mask: Any, meta: dict[str, Any]) -> None:
        """Write the mask of ``key`` for every case that has this image, atomically, and update state + report."""
        from . import imaging

        names = {str(k): int(v) for k, v in (meta.get("labels") or {}).items()}
        self.state["label_names"] = list(dict.fromkeys([*self.state.get("label_names", []), *names]))
        for c in self.state["cases"]:
            if c["key"] != key or c["status"] in ("done", "invalid"):
                continue
            ref = reference_image(c["geometry"])
            out = self.out_dir / f"{c['case_id']}{FORMATS[self.state['format']]}"
            if self.state["format"] == "dicom-seg":
                from .dicomseg import write_dicom_seg

                write_dicom_seg(mask, c["source"], out, names, model=self.state["model"],
                                version=str(meta.get("model_version", "")))
            else:
                imaging.write_mask(mask, out, names, reference=ref)
            m = mask if imaging.same_geometry(mask, ref) else imaging.resample_to_reference(mask, ref)
            c.update(status="done", reason="", output=str(out), model_version=str(meta.get("model_version", "")),
                     seconds=meta.get("seconds"), volumes=label_volumes(m, names),
                     warnings=list(dict.fromkeys([*c["warnings"], *meta.get("warnings", [])])))
        self.save()
        self.write_report()

    def fail(self, key: str, reason: str, status: str = "failed") -> None:
        for c in self.state["cases"]:
            if c["key"] == key and c["status"] == "pending":
                c.update(status=status, reason=reason)

    # -- running -----------------------------------------------------------------------------------------------------
    def run(self, *, wait: bool = True, on_progress: Progress | None = None,
            on_upload: Callable[[int, int], None] | None = None, poll_seconds: float = 2.0) -> dict[str, Any]:
        """Carry the batch on from wherever it stands until every case has an end (``wait=False``: one step)."""
        if self.state["finished"] or self.state["cancelled"]:
            return self.summary()
        self._remove_leftovers()
        if self.state["via"] == "server":
            from .batchlocal import run_through_server

            run_through_server(self, on_progress=on_progress)
        else:
            from .batcharray import ArrayRunner

            ArrayRunner(self).run(wait=wait, on_progress=on_progress, on_upload=on_upload,
                                  poll_seconds=poll_seconds)
        self.write_report()
        return self.summary()

    def _remove_leftovers(self) -> None:
        """Temp files a killed client left (hidden, never under a mask's or a report's name): of mask writes
        (``.<case><ext>.*``) and of the report and state (``.report.csv.<pid>.tmp``)."""
        ext = FORMATS[self.state["format"]]
        patterns = [f".{c['case_id']}{ext}.*" for c in self.state["cases"]] + [".report.*.tmp"]
        for folder, pats in ((self.out_dir, patterns), (self.out_dir / STATE, [".state.json.*.tmp"])):
            for pattern in pats:
                for tmp in folder.glob(pattern):
                    with contextlib.suppress(OSError):
                        tmp.unlink() if tmp.is_file() else None

    def status(self) -> dict[str, Any]:
        """The summary with a fresh look at the cluster (task states, running cases); nothing is downloaded."""
        if self.state["via"] == "server" or not self.state["rounds"] or self.state["finished"]:
            return self.summary()
        from .batcharray import ArrayRunner

        runner = ArrayRunner(self)
        rnd = self.state["rounds"][-1]
        view = runner.listing(rnd["round"])
        view["tasks"] = {f"{rnd['round']}-{i}": s.state.value for i, s in runner.task_statuses(rnd).items()}
        return self.summary(view)

    def cancel(self) -> list[str]:
        """Cancel the batch's array jobs that have not ended; cases not done read ``cancelled``."""
        ids = []
        for r in self.state["rounds"]:
            if not r.get("over"):
                cmd = self.jobs.scheduler.array_cancel_command(r["array_id"])
                res = self.jobs.shell.run(list(cmd.argv), timeout=60)
                with contextlib.suppress(HpcsegError):
                    self.jobs.scheduler.parse_cancel(res, [r["array_id"]])
                r["over"] = True
                ids.append(r["array_id"])
        for key in self.keys("pending"):
            self.fail(key, "the batch was cancelled", status="cancelled")
        self.state["cancelled"] = True
        self.save()
        self.write_report()
        return ids

