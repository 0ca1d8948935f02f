"""A batch on a cluster: upload once, one job array per round, collect as results appear (see :mod:`hpcseg.batch`).

The cluster side (``<work_dir>/batches/``)::

    inputs/<key>.hsv     every staged input, shared by all batches (content-addressed: sent once)
    <batch id>/          cases.json, job-r<R>.sh, task-<i>.out/.err, and the worker's claims/ results/ failed/
                         tasks/<R>-<i>/ (see :mod:`hpcseg.batchworker`)

A round is over when the scheduler says every task has ended *and* no task that started is still alive by its own
files (an ``exit_code`` written by the job script's trap, or a heartbeat older than a few beats). The second check
matters where the scheduler cannot list tasks: Slurm's Torque wrapper shows the array as one job.
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .batchworker import HEARTBEAT_SECONDS, MAX_ATTEMPTS
from .errors import BatchError
from .jobs import JobRecord
from .schedulers import JobStatus, SubmitSpec, drive

#: a task whose heartbeat is older than this is dead, whatever the scheduler says
STALE_SECONDS = 4 * HEARTBEAT_SECONDS


class ArrayRunner:
    """Drives one :class:`~hpcseg.batch.Batch` on a scheduler with job arrays."""

    def __init__(self, batch: Any) -> None:
        self.b = batch
        self.jm = batch.jobs
        self.shell = self.jm.shell
        self.sched = self.jm.scheduler
        root = posixpath.join(self.jm.work_dir(), "batches")
        self.inputs_dir = posixpath.join(root, "inputs")
        self.dir = posixpath.join(root, batch.id)

    # -- upload --------------------------------------------------------------------------------------------------
    def upload(self, on_upload: Callable[[int, int], None] | None = None) -> None:
        """Send each staged input not on the cluster yet (atomically: the shell writes a temp name, then renames)."""
        st = self.b.state
        todo = [k for k in self.b.keys() if k not in st["uploaded"]]
        if not todo:
            return
        res = self.shell.run(["sh", "-c", 'mkdir -p -- "$1" "$2" && ls -1 -- "$1"', "sh", self.inputs_dir, self.dir],
                             timeout=120, check=True)
        there = {n[:-4] for n in res.stdout.split() if n.endswith(".hsv")}
        staging = self.b.out_dir / ".hpcseg-batch" / "staging"
        for n, key in enumerate(todo):
            if key not in there:
                local = staging / f"{key}.hsv"
                if not local.exists():
                    raise BatchError(f"input {key} is neither on the cluster nor staged in {staging}",
                                     hint="start the batch again from its inputs")
                self.shell.put(local, posixpath.join(self.inputs_dir, f"{key}.hsv"))
            st["uploaded"].append(key)
            self.b.save()
            (staging / f"{key}.hsv").unlink(missing_ok=True)
            if on_upload:
                on_upload(n + 1, len(todo))

    # -- rounds --------------------------------------------------------------------------------------------------
    def submit_round(self) -> dict[str, Any]:
        """Write cases.json (once) and the round's script, submit one array, remember it (no orphan on failure).

        Limit: a client killed between the submit command and the state write leaves an array the state does not
        name; resumed, the client submits the round again. The two arrays share the round's claims, so no case
        runs twice, and the unnamed one ends when no case is left, but ``batch cancel`` does not reach it.
        """
        import json

        from .templates import build_context

        st = self.b.state
        rno = len(st["rounds"])
        left = self.b.keys("pending")
        size = max(1, min(int(st["tasks"]), len(left)))
        size = max(size, getattr(self.sched, "min_array_size", 1))
        if rno == 0:
            spec = {"model": st["model"], "labels": st["labels"], "fast": st["fast"], "tasks": size,
                    "inputs": [{"key": k, "path": posixpath.join(self.inputs_dir, f"{k}.hsv")}
                               for k in self.b.keys()]}
            self.shell.write_text(posixpath.join(self.dir, "cases.json"), json.dumps(spec, indent=1))
        ctx = build_context(self.b.profile, template="batch", job_dir=self.dir, work_dir=self.jm.work_dir(),
                            job_name="hpcseg-batch", params={"batch_dir": self.dir, "round": rno},
                            home=self.shell.home(), pbs_dialect=self.jm.pbs_dialect())
        script = posixpath.join(self.dir, f"job-r{rno}.sh")
        self.shell.write_text(script, self.jm.engine.render("batch", ctx), mode=0o700)
        cmd = self.sched.array_submit_command(SubmitSpec(script, self.dir, "hpcseg-batch"), size, size)
        res = self.shell.run(list(cmd.argv), stdin=cmd.stdin, timeout=120)
        array_id = self.sched.parse_array_submit(res)
        try:
            rnd = {"round": rno, "array_id": array_id, "size": size, "submitted": time.time(), "over": False}
            st["rounds"].append(rnd)
            st["submitted"] = st["submitted"] or time.time()
            self.b.save()
            prof = self.b.profile
            self.jm.store.add(JobRecord(profile=prof.name, job_id=array_id, template="batch", job_dir=self.dir,
                                        name=f"{self.b.id}-r{rno}", scheduler=prof.scheduler,
                                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        host=prof.host, extra={"array_size": size, "batch": self.b.id}))
        except BaseException:
            cancel = self.sched.array_cancel_command(array_id)
            self.shell.run(list(cancel.argv), timeout=60)
            raise
        return rnd

    def task_statuses(self, rnd: dict[str, Any]) -> dict[int, JobStatus]:
        return drive(self.sched.array_status_query(rnd["array_id"], rnd["size"]), self.shell)

    # -- what is on the cluster ------------------------------------------------------------------------------------
    def listing(self, round_no: int) -> dict[str, Any]:
        """One command: result, failure, claim and task files of the batch, with their ages (``claimed``: the
        cases with a claim in round ``round_no`` and no result)."""
        res = self.shell.run(["sh", "-c", 'cd -- "$1" 2>/dev/null || exit 0; now=$(date +%s); echo "now $now"; '
                              'find results failed claims tasks -type f ! -name ".*" -printf "%p %T@\\n" '
                              "2>/dev/null; exit 0", "sh", self.dir], timeout=120)
        if not res.ok:
            raise BatchError(f"cannot list {self.dir}: {res.stderr.strip()[-200:]}", retryable=True)
        now, files = time.time(), {}
        for line in res.stdout.splitlines():
            name, _, stamp = line.rpartition(" ")
            if name == "now":
                now = float(stamp)
            elif name:
                files[name] = float(stamp)
        done = {p[len("results/"):-5] for p in files if p.startswith("results/") and p.endswith(".json")}
        failed: dict[str, int] = {}
        for p in files:
            if p.startswith("failed/") and p.endswith(".json"):
                key = p[len("failed/"):].split(".")[0]
                failed[key] = failed.get(key, 0) + 1
        claimed = {p[len("claims/"):].split(".")[0] for p in files
                   if p.startswith("claims/") and p.split(".")[1:2] == [str(round_no)]}
        return {"now": now, "files": files, "done": done, "failed": failed,
                "claimed": claimed - done, "tasks": {}}

    def task_over(self, rnd: dict[str, Any], i: int, st: JobStatus, view: dict[str, Any]) -> bool:
        """Has task ``i`` ended? The scheduler must say so, and the task's own files must not say it still lives."""
        if not st.state.terminal:
            return False
        base = f"tasks/{rnd['round']}-{i}/"
        files = view["files"]
        if base + "exit_code" in files or base + "started" not in files:
            return True
        beat = files.get(base + "heartbeat", files[base + "started"])
        return view["now"] - beat > STALE_SECONDS

    # -- collecting --------------------------------------------------------------------------------------------------
    def collect(self, view: dict[str, Any]) -> int:
        """Fetch every result not collected yet and store it; mark cases failed twice. Returns how many were new."""
        import json

        from . import imaging

        new = 0
        pending = set(self.b.keys("pending"))
        for key in sorted(pending & view["done"]):
            meta = json.loads(self.shell.read_text(posixpath.join(self.dir, "results", f"{key}.json")) or "{}")
            with tempfile.TemporaryDirectory(prefix="hpcseg-batch-") as tmp:
                local = Path(tmp) / f"{key}.hsv"
                self.shell.get(posixpath.join(self.dir, "results", f"{key}.hsv"), local)
                mask = imaging.decode(local.read_bytes(), imaging.CONTENT_TYPE_ZSTD)
            self.b.store_result(key, mask, meta)
            new += 1
        for key in sorted(pending - view["done"]):
            if view["failed"].get(key, 0) >= MAX_ATTEMPTS:
                self.b.fail(key, self.failure_reason(key))
                new += 1
        if new:
            self.b.save()
            self.b.write_report()
        return new

    def failure_reason(self, key: str) -> str:
        """The last failed attempt's line, and where its log is."""
        import json

        text = self.shell.read_text(posixpath.join(self.dir, "failed", f"{key}.{MAX_ATTEMPTS}.json")) or "{}"
        rec = json.loads(text)
        return (f"{rec.get('reason', 'failed')} (tried {MAX_ATTEMPTS} times, last on task {rec.get('round')}-"
                f"{rec.get('task')} on {rec.get('host')}; log: {posixpath.join(self.dir, rec.get('log', ''))})")

    def task_log_tail(self) -> str:
        res = self.shell.run(["sh", "-c", 'tail -n 3 -- "$1"/task-0.err "$1"/job.err 2>/dev/null; exit 0', "sh",
                              self.dir], timeout=60)
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip() and not ln.startswith("==>")]
        return "task log: " + " / ".join(lines[-3:]) if lines else f"see the task logs in {self.dir}"

    def fatal_reasons(self, rnd: dict[str, Any]) -> list[str]:
        res = self.shell.run(["sh", "-c", 'cat -- "$1"/tasks/"$2"-*/fatal 2>/dev/null; exit 0', "sh", self.dir,
                              str(rnd["round"])], timeout=60)
        return list(dict.fromkeys(ln.strip() for ln in res.stdout.splitlines() if ln.strip()))

    # -- the loop ------------------------------------------------------------------------------------------------------
    def run(self, *, wait: bool, on_progress: Callable[[dict[str, Any]], None] | None,
            on_upload: Callable[[int, int], None] | None, poll_seconds: float) -> None:
        st = self.b.state
        self.upload(on_upload)
        if not st["rounds"]:
            self.submit_round()
        while True:
            rnd = st["rounds"][-1]
            view = self.listing(rnd["round"])
            statuses = self.task_statuses(rnd)
            view["tasks"] = {f"{rnd['round']}-{i}": s.state.value for i, s in statuses.items()}
            progressed = self.collect(view)
            if on_progress:
                on_progress(self.b.summary(view))
            if not self.b.keys("pending"):
                if not all(s.state.terminal for s in statuses.values()):
                    # tasks still starting (or loading the model) would find nothing to do: free their GPUs now
                    cancel = self.sched.array_cancel_command(rnd["array_id"])
                    self.shell.run(list(cancel.argv), timeout=60)
                rnd["over"] = True
                st["finished"] = True
                self.b.save()
                return
            if all(self.task_over(rnd, i, s, view) for i, s in statuses.items()):
                self.next_round(rnd, statuses, view, progressed)
                if st["finished"]:
                    return
            if not wait:
                return
            time.sleep(poll_seconds)

    def next_round(self, rnd: dict[str, Any], statuses: dict[int, JobStatus], view: dict[str, Any],
                   progressed: int) -> None:
        """Every task of ``rnd`` ended with cases left: a new round, or the end with each case's reason."""
        st = self.b.state
        rnd["over"] = True
        rnd["tasks"] = {i: {"state": s.state.value, "exit_code": s.exit_code, "reason": s.reason}
                        for i, s in statuses.items()}
        fatal = self.fatal_reasons(rnd)
        ran = [k for k in self.b.keys("pending") if k in view["claimed"] or k in view["failed"]]
        ended = "; ".join(sorted({f"{s.state.value}" + (f" ({s.reason})" if s.reason else "")
                                  for s in statuses.values()}))
        if len(st["rounds"]) >= self._max_rounds() or (not ran and not progressed):
            why = fatal[0] if fatal else f"the round's tasks ended ({ended}) before it ran; " + self.task_log_tail()
            for key in self.b.keys("pending"):
                self.b.fail(key, f"not segmented after {len(st['rounds'])} round(s): {why}")
            st["finished"] = True
            self.b.save()
            return
        self.b.save()
        self.submit_round()

    @staticmethod
    def _max_rounds() -> int:
        from .batch import MAX_ROUNDS

        return MAX_ROUNDS

