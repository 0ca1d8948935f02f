"""The worker inside each task of a batch job array: load the model once, segment cases until none is left.

Runs on the compute node (``templates/batch.sh.j2``: ``python -m hpcseg.batchworker``), or in a local lane. Tasks
share nothing but the batch folder, which :mod:`hpcseg.batch` wrote before submitting::

    <batch>/cases.json           {"model", "labels", "fast", "inputs": [{"key", "path"}]}; key = the input's hash
    <batch>/claims/KEY.R.N       made with O_EXCL by the task that runs attempt N of KEY in round R
    <batch>/results/KEY.hsv      the mask (hpcseg's zstd volume codec), then KEY.json: written last, it means done
    <batch>/failed/KEY.N.json    attempt N failed: the reason (the exception's line), task, round, host
    <batch>/tasks/R-T/           this task's started/exit_code (the job script) and heartbeat, worker.log

Work is shared by claiming, not by a fixed split, so a fast task takes more cases. A claim's name holds the round
and the attempt, so the cases of a task that died (walltime, node failure) are claimed again in the next round
(submitted by the client, :mod:`hpcseg.batch`), and a case that failed is tried once more by *another* task: a task
never retries a case it failed itself. Every file is written to a temp name and renamed, so a kill at any moment
leaves either nothing or a whole result. Two failed attempts end a case; the client reports the reason.

Example (what the job script runs)::

    python -m hpcseg.batchworker --batch-dir ~/.hpcseg/batches/B --round 0 --task 3 --models-dir ~/.hpcseg/models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("hpcseg.batchworker")

#: a case is given up after this many failed attempts (the first, and one retry on another task)
MAX_ATTEMPTS = 2
HEARTBEAT_SECONDS = 15.0


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp name in the same folder and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def attempts(batch: Path, key: str) -> list[dict[str, Any]]:
    """The failed attempts of a case, oldest first."""
    out = []
    for p in sorted((batch / "failed").glob(f"{key}.*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            out.append({"reason": f"unreadable failure record {p.name}"})
    return out


def find_model_folder(name: str, models_dirs: list[Path]) -> Path:
    """The folder that serves model ``name`` (same rules as the server's registry)."""
    from hpcseg.errors import ModelLoadError
    from hpcseg.server.registry import discover

    for cand in discover(models_dirs):
        if cand.name == name:
            if cand.folder is None:
                raise ModelLoadError(f"model {name}: {cand.problem}")
            return cand.folder
    names = ", ".join(c.name for c in discover(models_dirs)) or "none"
    raise ModelLoadError(f"no model named {name!r} in {', '.join(map(str, models_dirs))} (there are: {names})")


class Worker:
    """One array task: :meth:`run` segments cases until no case is left that this task may take."""

    def __init__(self, batch_dir: Path, round_no: int, task: int, model: Any, version: str) -> None:
        self.batch = Path(batch_dir)
        self.round = round_no
        self.task = task
        self.model = model
        self.version = version
        self.spec = json.loads((self.batch / "cases.json").read_text())
        self.host = socket.gethostname()
        for sub in ("claims", "results", "failed"):
            (self.batch / sub).mkdir(exist_ok=True)

    def _claim(self, key: str) -> bool:
        """Take attempt N of ``key`` in this round, unless it is done, given up, or failed by this very task."""
        if (self.batch / "results" / f"{key}.json").exists():
            return False
        tried = attempts(self.batch, key)
        if len(tried) >= MAX_ATTEMPTS:
            return False
        if any(a.get("round") == self.round and a.get("task") == self.task for a in tried):
            return False  # retried once on another task, never here
        claim = self.batch / "claims" / f"{key}.{self.round}.{len(tried) + 1}"
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{self.round} {self.task} {self.host} {os.getpid()} {time.time():.0f}\n")
        return True

    def run(self) -> dict[str, int]:
        """Work until a whole pass over the cases claims nothing; returns counts of done and failed cases."""
        inputs = self.spec["inputs"]
        counts = {"done": 0, "failed": 0}
        if not inputs:
            return counts
        start = self.task * len(inputs) // max(1, int(self.spec.get("tasks", 1)))  # spread the first claims
        while True:
            took = False
            for i in range(len(inputs)):
                item = inputs[(start + i) % len(inputs)]
                if not self._claim(item["key"]):
                    continue
                took = True
                counts["done" if self.segment(item) else "failed"] += 1
            if not took:
                return counts

    def segment(self, item: dict[str, Any]) -> bool:
        """Segment one case and write its result; on failure write the reason. True when it worked."""
        from hpcseg import imaging

        key = item["key"]
        t0 = time.monotonic()
        try:
            data = Path(item["path"]).read_bytes()
            image = imaging.decode(data, imaging.CONTENT_TYPE_ZSTD)
            warnings = [str(w) for w in self.model.check_input(image)] if hasattr(self.model, "check_input") \
                else []
            params: dict[str, Any] = {"fast": bool(self.spec.get("fast"))}
            if self.spec.get("labels"):
                params["label_names"] = list(self.spec["labels"])
            names = dict(self.model.wanted_labels(params)) if hasattr(self.model, "wanted_labels") \
                else dict(self.model.manifest.labels)
            mask = self.model.infer(image, params)
            if mask.GetSize() != image.GetSize():
                raise RuntimeError(f"the model returned a mask of size {mask.GetSize()} for an image of "
                                   f"{image.GetSize()}")
            mask.CopyInformation(image)
            seconds = time.monotonic() - t0
            write_atomic(self.batch / "results" / f"{key}.hsv", imaging.encode(mask, imaging.CONTENT_TYPE_ZSTD))
            meta = {"key": key, "status": "done", "model": self.spec["model"], "model_version": self.version,
                    "labels": names, "warnings": warnings, "seconds": round(seconds, 3), "round": self.round,
                    "task": self.task, "host": self.host, "finished": time.time()}
            write_atomic(self.batch / "results" / f"{key}.json", json.dumps(meta).encode())
            log.info("case %s done in %.1f s", key, seconds)
            return True
        except Exception as exc:  # any failure of one case: record why, go on with the next
            line = (str(exc).strip().splitlines() or [""])[0]
            reason = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
            log.error("case %s failed: %s\n%s", key, reason, traceback.format_exc())
            n = len(attempts(self.batch, key)) + 1
            record = {"key": key, "attempt": n, "reason": reason, "round": self.round, "task": self.task,
                      "host": self.host, "log": f"tasks/{self.round}-{self.task}/worker.log", "time": time.time()}
            write_atomic(self.batch / "failed" / f"{key}.{n}.json", json.dumps(record).encode())
            return False


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch ``path`` every few seconds: the client tells a live task from one killed without a trace."""
    while not stop.is_set():
        try:
            path.touch()
        except OSError:
            pass
        stop.wait(HEARTBEAT_SECONDS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcseg.batchworker", description=__doc__.split("\n")[0])
    p.add_argument("--batch-dir", type=Path, required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--task", type=int, required=True)
    p.add_argument("--models-dir", type=Path, action="append", default=[])
    p.add_argument("--no-builtin-models", dest="builtin_models", action="store_false")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-file", type=Path, default=None)
    args = p.parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)
    task_dir = args.batch_dir / "tasks" / f"{args.round}-{args.task}"
    task_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(task_dir / "heartbeat", stop), daemon=True).start()
    try:
        spec = json.loads((args.batch_dir / "cases.json").read_text())
        from hpcseg.server.models import builtin_models_dir, load_model

        dirs = list(args.models_dir) + ([builtin_models_dir()] if args.builtin_models else [])
        t0 = time.monotonic()
        model = load_model(find_model_folder(spec["model"], dirs), args.device)
        version = str(getattr(model.manifest, "version", "unknown"))
        log.info("task %d of round %d: model %s %s loaded in %.1f s on %s", args.task, args.round, spec["model"],
                 version, time.monotonic() - t0, socket.gethostname())
        counts = Worker(args.batch_dir, args.round, args.task, model, version).run()
        log.info("task %d of round %d: nothing left for this task (%d done, %d failed)", args.task, args.round,
                 counts["done"], counts["failed"])
        return 0
    except Exception as exc:  # the model does not load, the batch folder is gone: say why, in one line
        line = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {line}"
        log.error("task %d of round %d cannot work: %s\n%s", args.task, args.round, reason, traceback.format_exc())
        write_atomic(task_dir / "fatal", (reason + "\n").encode())
        return 1
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
