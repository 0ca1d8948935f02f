"""hpcseg batch without a cluster: cases found and validated, the job-array flow on the `local` scheduler (real
processes running the real worker), resuming after an interrupted upload, requeueing the cases of a task that
died, and the CLI on the embedded `local` profile (cases through the local server)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from hpcseg.batch import STATE, Batch, BatchStore, start_batch
from hpcseg.batchinputs import discover
from hpcseg.cli import main
from hpcseg.config import Profile
from hpcseg.errors import BatchError
from hpcseg.jobs import JobManager, JobStore
from hpcseg.phantoms import make_phantom
from tests.batchkit import check_outputs, make_cohort


@pytest.fixture(autouse=True)
def same_hpcseg_in_jobs(monkeypatch):
    """Jobs started by the local scheduler import the hpcseg under test (this checkout), as a cluster venv would."""
    import hpcseg

    root = str(Path(hpcseg.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", root + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))


def local_array_batch(tmp: Path, inputs, tasks=2, **kw) -> Batch:
    """A batch run as a job array by the `local` scheduler (detached processes: the same script, the same worker
    as on a cluster), here instead of through the local server."""
    prof = Profile(name="lanes", scheduler="local", work_dir=str(tmp / "work"), python=sys.executable, gpus=0,
                   device="cpu")
    b = start_batch(prof, inputs, tmp / "out", model="ct-body", tasks=tasks, store=BatchStore(tmp / "b.json"),
                    **kw)
    b.state["via"] = "array"
    b.save()
    b._jobs = JobManager(prof, store=JobStore(tmp / "jobs.json"))
    return b


# -- finding cases -------------------------------------------------------------------------------------------------
def write_dicom_series(folder: Path, seed: int, number: int, slices: int = 6) -> str:
    """A small CT series written by SimpleITK (GDCM): one file per slice; returns its SeriesInstanceUID."""
    import pydicom.uid

    image, _, _ = make_phantom(seed, (32, 32, slices))
    folder.mkdir(parents=True, exist_ok=True)
    uid = pydicom.uid.generate_uid()
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for z in range(slices):
        sl = image[:, :, z]
        position = "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))
        for tag, value in (("0020|000e", uid), ("0020|0011", str(number)), ("0008|0060", "CT"),
                           ("0020|0013", str(z + 1)), ("0020|0032", position),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|1052", "0"), ("0028|1053", "1")):
            sl.SetMetaData(tag, value)
        w.SetFileName(str(folder / f"s{number}_{z:03d}.dcm"))
        w.Execute(sl)
    return uid


def test_discover_files_folders_dicom_series_and_csv(tmp_path: Path):
    cohort = make_cohort(tmp_path / "in", 2)
    uid_a = write_dicom_series(tmp_path / "in" / "patient1" / "study", 5, 3)
    uid_b = write_dicom_series(tmp_path / "in" / "patient1" / "study", 6, 4)
    (tmp_path / "list.csv").write_text(f"case_id,path\nfirst,{cohort['ct00'][0]}\nsecond,in/ct01.nii.gz\n"
                                       "gone,in/nothing.nii.gz\n")
    cases = discover([tmp_path / "in", tmp_path / "list.csv", tmp_path / "missing.nrrd"])
    ids = [c.case_id for c in cases]
    assert ids[:4] == ["bad", "ct00", "ct01", "dup"]
    dicom = [c for c in cases if c.kind == "dicom"]
    assert {c.series_uid for c in dicom} == {uid_a, uid_b}  # one case per series, two series in one folder
    assert {c.case_id for c in dicom} == {"in_patient1_study_3", "in_patient1_study_4"}
    from_csv = [c for c in cases if c.case_id in ("first", "second", "gone")]
    assert [(c.case_id, Path(c.source).name) for c in from_csv] == [("first", "ct00.nii.gz"), ("second", "ct01.nii.gz"),
                                                                   ("gone", "nothing.nii.gz")]
    assert "no such file" in from_csv[2].error and "row 3" in from_csv[2].error
    assert "no such file" in cases[-1].error and len(set(ids)) == len(ids)


def test_nothing_to_segment_is_one_clear_error(tmp_path: Path):
    (tmp_path / "bad.nii.gz").write_bytes(b"nope")
    with pytest.raises(BatchError, match="none of the 1 inputs"):
        start_batch(Profile(name="local"), [tmp_path / "bad.nii.gz"], tmp_path / "out", store=BatchStore(
            tmp_path / "b.json"))


# -- the job-array flow, on local lanes ----------------------------------------------------------------------------
def test_array_batch_segments_every_good_case_once(tmp_path: Path):
    cohort = make_cohort(tmp_path / "in", 5)
    b = local_array_batch(tmp_path, [tmp_path / "in"], tasks=3)
    seen = []
    summary = b.run(on_progress=seen.append, poll_seconds=0.3)
    assert summary["finished"] and (summary["done"], summary["invalid"], summary["failed"]) == (6, 1, 0)
    check_outputs(tmp_path / "out", cohort)
    inputs = sorted((tmp_path / "work" / "batches" / "inputs").glob("*.hsv"))
    assert len(inputs) == 5  # the duplicate was uploaded (and segmented) once
    assert len(list((tmp_path / "work" / "batches" / b.id / "results").glob("*.json"))) == 5
    assert seen and seen[-1]["done"] == 6
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == ["bad", "ct00", "ct01", "ct02", "ct03", "ct04", "dup"]
    # a rerun collects nothing again and runs nothing again
    again = Batch.open(tmp_path / "out", b.profile, jobs=b.jobs)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.seg.nrrd")}
    again.state["finished"] = False  # even when asked to carry on, what was collected is skipped
    assert again.run(poll_seconds=0.1)["done"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.seg.nrrd")} == before
    assert len(again.state["rounds"]) == 1


def test_interrupted_upload_resumes_without_sending_again(tmp_path: Path):
    make_cohort(tmp_path / "in", 4)
    b = local_array_batch(tmp_path, [tmp_path / "in"])

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt  # the client dies between two uploads

    with pytest.raises(KeyboardInterrupt):
        b.run(on_upload=stop_after_two)
    inputs = tmp_path / "work" / "batches" / "inputs"
    sent = {p.name: p.stat().st_mtime_ns for p in inputs.glob("*.hsv")}
    assert len(sent) == 2 and not b.state["rounds"]
    resumed = Batch.open(tmp_path / "out", b.profile, jobs=b.jobs)
    uploads = []
    summary = resumed.run(on_upload=lambda d, t: uploads.append((d, t)), poll_seconds=0.3)
    assert uploads[-1] == (2, 2) and summary["done"] == 5  # only the two missing ones were sent
    assert {p.name: p.stat().st_mtime_ns for p in inputs.glob("*.hsv") if p.name in sent} == sent


def test_cases_of_a_task_that_died_are_requeued_in_a_new_round(tmp_path: Path):
    make_cohort(tmp_path / "in", 3)
    b = local_array_batch(tmp_path, [tmp_path / "in"], tasks=1)
    key = b.keys()[0]
    claims = tmp_path / "work" / "batches" / b.id / "claims"
    claims.mkdir(parents=True)
    (claims / f"{key}.0.1").write_text("0 7 node9 4242 0\n")  # round 0's task 7 took it, then was killed
    summary = b.run(poll_seconds=0.3)
    assert summary["done"] == 4 and len(summary["rounds"]) == 2
    assert json.loads((tmp_path / "work" / "batches" / b.id / "results" / f"{key}.json").read_text())["round"] == 1


def test_a_model_that_cannot_load_ends_the_batch_with_the_reason(tmp_path: Path):
    make_cohort(tmp_path / "in", 2)
    b = local_array_batch(tmp_path, [tmp_path / "in"])
    b.state["model"] = "no-such-model"
    summary = b.run(poll_seconds=0.3)
    assert summary["finished"] and summary["failed"] == 3 and len(summary["rounds"]) == 1
    reasons = {c["reason"] for c in b.state["cases"] if c["status"] == "failed"}
    assert len(reasons) == 1 and "no model named 'no-such-model'" in reasons.pop()


def test_cancel_marks_what_is_left(tmp_path: Path):
    make_cohort(tmp_path / "in", 2)
    b = local_array_batch(tmp_path, [tmp_path / "in"])
    b.run(wait=False)
    assert b.state["rounds"] and b.cancel() == [b.state["rounds"][0]["array_id"]]
    assert b.run()["finished"] is False and all(c["status"] in ("done", "invalid", "cancelled")
                                                for c in b.state["cases"])


# -- the CLI on the embedded local profile: through the local server -----------------------------------------------
@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def cli(*args, code=0):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def test_cli_batch_on_the_local_default_goes_through_the_local_server(tmp_path: Path, isolated):
    cohort = make_cohort(tmp_path / "in", 3)
    out = json.loads(cli("batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "ct-body",
                         "--json").stdout)
    try:
        assert out["finished"] and (out["done"], out["invalid"]) == (4, 1) and out["profile"] == "local"
        check_outputs(tmp_path / "out", cohort)
        status = json.loads(cli("batch", "status", out["batch_id"], "--json").stdout)
        assert status["done"] == 4 and status["finished"]
        assert json.loads(cli("batch", "list", "--json").stdout)[0]["batch_id"] == out["batch_id"]
        again = json.loads(cli("batch", "collect", "--json").stdout)  # the newest batch; nothing runs again
        assert again["done"] == 4
        res = cli("batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), code=1)
        assert "already holds a batch" in res.output and "batch collect" in res.output
        assert (tmp_path / "out" / STATE / "state.json").exists()
    finally:
        cli("stop")


def test_a_case_that_fails_twice_is_reported_with_the_workers_line(tmp_path: Path):
    """The input of one case arrives broken on the cluster: round 0's only task fails it, round 1's task (another
    task) fails it again; the report says why and where the log is. The other cases are done."""
    make_cohort(tmp_path / "in", 2)
    b = local_array_batch(tmp_path, [tmp_path / "in"], tasks=1)
    key = next(c["key"] for c in b.state["cases"] if c["case_id"] == "ct00")
    inputs = tmp_path / "work" / "batches" / "inputs"
    inputs.mkdir(parents=True)
    (inputs / f"{key}.hsv").write_bytes(b"HSV1" + b"\x00" * 64)  # "already uploaded", but not a volume
    summary = b.run(poll_seconds=0.3)
    assert (summary["done"], summary["failed"], len(summary["rounds"])) == (2, 1, 2), summary
    row = next(c for c in b.state["cases"] if c["case_id"] == "ct00")
    assert row["status"] == "failed" and "tried 2 times, last on task 1-0" in row["reason"], row
    assert "tasks/1-0/worker.log" in row["reason"]
    log = (tmp_path / "work" / "batches" / b.id / "tasks" / "1-0" / "worker.log").read_text()
    assert row["reason"].split(" (tried")[0] in log
