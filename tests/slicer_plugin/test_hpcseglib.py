"""HPCSegLib, the Slicer plugin's behaviour, with real hpcseg objects and the real local server (no Slicer here)."""

from __future__ import annotations

import ast
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from HPCSegLib import dependencies

from hpcseg.errors import ConfigError
from hpcseg.imaging import same_geometry
from hpcseg.schedulers import JobState, JobStatus
from hpcseg.worker.geometry import (
    VolumeArray,
    array_from_image,
    geometry_from_matrix,
    ijk_to_ras,
    ijk_to_ras_matrix,
    image_from_array,
    ras_to_ijk,
    voxel_indices,
)

from .conftest import MODULE_DIR

FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "__main__", "PythonQt", "mrml", "vtkmodules"}


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique() -> sitk.Image:
    """A small image with anisotropic spacing, an origin away from 0 and an oblique, left-handed direction."""
    image = sitk.GetImageFromArray(np.arange(5 * 9 * 7, dtype=np.int16).reshape(5, 9, 7))  # (k, j, i)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetDirection(tuple((_rotation(0.3, -0.2, 0.9) @ np.diag([1.0, -1.0, 1.0])).ravel()))
    return image


# --------------------------------------------------------------------------------------------------- the boundary
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__" and node.args:
            arg = node.args[0]
            names.add(str(arg.value).split(".")[0] if isinstance(arg, ast.Constant) else "<dynamic>")
    return names


def test_hpcseglib_never_imports_slicer_qt_ctk_or_vtk():
    files = sorted((MODULE_DIR / "HPCSegLib").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "dependencies.py", "profiles.py", "settingspage.py", "worker.py"}
    for f in files:
        bad = _imports(f) & (FORBIDDEN | {"<dynamic>"})
        assert not bad, f"{f.name} imports {sorted(bad)}"
    # these run before hpcseg is installed: the standard library (and packaging and numpy, which Slicer ships)
    for name in ("dependencies.py", "worker.py", "settingspage.py"):
        assert not _imports(MODULE_DIR / "HPCSegLib" / name) & {"hpcseg", "SimpleITK"}, name


def test_only_the_module_file_sits_at_the_top_of_the_module_folder():
    # Slicer loads every top-level .py of a module folder as a module; helpers must live in subfolders
    assert [p.name for p in MODULE_DIR.glob("*.py")] == ["HPCSeg.py"]
    listed = (MODULE_DIR / "CMakeLists.txt").read_text()
    for py in MODULE_DIR.rglob("*.py"):
        rel = py.relative_to(MODULE_DIR).as_posix().replace("HPCSeg", "${MODULE_NAME}")
        assert rel in listed, f"{rel} is not installed by CMakeLists.txt"


# ------------------------------------------------------------------------------------------------------ geometry
def test_ijk_to_ras_matches_simpleitk_with_the_lps_flip(oblique):
    m = ijk_to_ras_matrix(oblique)
    for idx in [(0, 0, 0), (6, 8, 4), (3, 1, 2), (0, 8, 0)]:
        x, y, z = oblique.TransformIndexToPhysicalPoint(idx)  # LPS
        ras = (-x, -y, z)
        assert ijk_to_ras([idx], m)[0] == pytest.approx(ras, abs=1e-9)
        assert ras_to_ijk([ras], m)[0] == pytest.approx(idx, abs=1e-9)
    cont = (2.3, 4.6, 1.2)
    x, y, z = oblique.TransformContinuousIndexToPhysicalPoint(cont)
    assert ras_to_ijk([(-x, -y, z)], m)[0] == pytest.approx(cont, abs=1e-9)
    # and back to ITK's geometry exactly
    spacing, origin, direction = geometry_from_matrix(m)
    assert spacing == pytest.approx(oblique.GetSpacing())
    assert origin == pytest.approx(oblique.GetOrigin())
    assert direction == pytest.approx(oblique.GetDirection())


def test_slicer_matrix_of_an_axial_scan_is_identity_direction_in_lps():
    # what Slicer shows for a plain axial DICOM series: i runs to the patient's left, j posterior, k superior
    m = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 120.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])
    image = image_from_array(np.zeros((4, 5, 6), np.int16), m)
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    assert image.GetOrigin() == pytest.approx((-100.0, -120.0, -50.0))
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    x, y, z = image.TransformIndexToPhysicalPoint((5, 4, 3))
    assert ijk_to_ras([(5, 4, 3)], m)[0] == pytest.approx((-x, -y, z))


def test_voxel_indices_round_and_refuse_points_outside(oblique):
    m = ijk_to_ras_matrix(oblique)
    inside = ijk_to_ras([(6.3, 7.6, 3.9)], m)
    assert voxel_indices(inside, m, (5, 9, 7)) == [[6, 8, 4]]
    with pytest.raises(ValueError, match="outside the volume"):
        voxel_indices(ijk_to_ras([(7.2, 0, 0)], m), m, (5, 9, 7))
    assert voxel_indices([], m, (5, 9, 7)) == []


def test_numpy_and_geometry_round_trip_through_simpleitk(oblique):
    array, m = array_from_image(oblique)
    assert array.shape == (5, 9, 7)  # (k, j, i), as Slicer's arrayFromVolume
    again = image_from_array(array, m)
    assert same_geometry(again, oblique)
    assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(oblique))
    vol = VolumeArray.from_image(oblique)
    assert same_geometry(vol.to_image(), oblique) and np.array_equal(vol.array, array)
    assert vol.fingerprint() == VolumeArray(array.copy(), m).fingerprint()  # hashes the voxels without a key
    changed = array.copy()
    changed[0, 0, 0] += 1
    assert VolumeArray(changed, m).fingerprint() != vol.fingerprint()
    assert VolumeArray(array, m, key="vtkMRMLScalarVolumeNode1:42").fingerprint() == "vtkMRMLScalarVolumeNode1:42"


# -------------------------------------------------------------------------------------------------------- status
EXPECTED = {
    JobState.PENDING: "queued: Resources",
    JobState.RUNNING: "running on gpu017",
    JobState.COMPLETING: "completing (ending)",
    JobState.STOPPING: "stopping (cancelled, ending)",
    JobState.COMPLETED: "ended",
    JobState.FAILED: "failed (exit code 3)",
    JobState.CANCELLED: "cancelled",
    JobState.TIMEOUT: "ended at its walltime",
    JobState.NODE_FAIL: "ended: its node failed",
    JobState.OUT_OF_MEMORY: "ended: out of memory",
    JobState.LOST: "lost (no scheduler record and no exit code)",
    JobState.UNKNOWN: "unknown (the scheduler did not answer; asking again)",
}


def test_every_job_state_has_its_words():
    assert set(EXPECTED) == set(JobState)


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
def test_status_text_shows_both_axes_for_each_job_state(state):
    from hpcseg.worker.status import ServerState, StatusSnapshot, next_poll_delay

    server = {JobState.PENDING: ServerState.NOT_STARTED, JobState.RUNNING: ServerState.READY,
              JobState.COMPLETING: ServerState.STARTING, JobState.UNKNOWN: ServerState.UNKNOWN,
              JobState.STOPPING: ServerState.ENDING}.get(
        state, ServerState.GONE)
    job = JobStatus("4711", state, reason="Resources", node="gpu017",
                    exit_code=3 if state is JobState.FAILED else None)
    snap = StatusSnapshot(job, server, "4711")
    left, right = snap.text.split("  ·  ")
    assert left == f"Job 4711: {EXPECTED[state]}"
    assert right.startswith(f"Server: {server.value}")
    assert snap.severity in ("ok", "busy", "idle", "error")
    assert (snap.severity == "ok") == (state is JobState.RUNNING)
    assert 1 <= next_poll_delay(snap) <= 60


def test_status_details():
    from datetime import datetime

    from hpcseg.worker.status import ServerState, StatusSnapshot

    queued = JobStatus("7", JobState.PENDING, reason="Priority", expected_start=datetime(2026, 1, 2, 14, 5))
    assert StatusSnapshot(queued, ServerState.NOT_STARTED).text == \
        "Job 7: queued: Priority, expected 14:05  ·  Server: not started"
    assert StatusSnapshot(None, ServerState.NO_JOB).text == "Job: none  ·  Server: no server job"
    assert StatusSnapshot(None, ServerState.NO_JOB).severity == "idle"
    loading = StatusSnapshot(JobStatus("7", JobState.RUNNING, node="n1"), ServerState.STARTING, detail="loading models")
    assert loading.text.endswith("Server: starting (loading models)") and loading.severity == "busy"
    failed = StatusSnapshot(JobStatus("7", JobState.FAILED, exit_code=1), ServerState.GONE)
    assert failed.severity == "error"


def test_error_text_for_dialogs():
    from HPCSegLib.worker import WorkerError, error_text

    from hpcseg.worker.service import error_payload
    from hpcseg.worker.session import Cancelled

    message, details = error_text(ConfigError("profiles.x.walltime = '2h' is not allowed", hint="use H:MM:SS"))
    assert "walltime" in message and "Hint: use H:MM:SS" in message and details == ""
    try:
        {}["boom"]
    except KeyError as exc:  # a bug: the dialog shows its traceback as details
        message, details = error_text(exc)
    assert message.startswith("Unexpected error: KeyError") and "Traceback" in details
    assert error_text(ValueError("place at least one foreground point")) == ("place at least one foreground point", "")
    assert error_text(WorkerError(**error_payload(Cancelled("stopped")))) == ("", "")  # the user stopped it
    # through the worker: hpcseg's sentence and hint; details (a "Show Details" button) only for a bug
    err = WorkerError(**error_payload(ConfigError("profiles.x.walltime = '2h' is not allowed", hint="use H:MM:SS")))
    assert error_text(err) == ("profiles.x.walltime = '2h' is not allowed\n\nHint: use H:MM:SS", "")
    try:
        {}["boom"]
    except KeyError as exc:
        message, details = error_text(WorkerError(**error_payload(exc)))
    assert message.startswith("unexpected error: KeyError") and "Traceback" in details


# -------------------------------------------------------------------------------------------------- dependencies
def test_requirements_come_from_the_checkout_a_setting_or_the_index(tmp_path):
    repo = MODULE_DIR.parents[1]
    assert dependencies.find_checkout(MODULE_DIR) == repo
    assert dependencies.requirements(module_dir=MODULE_DIR) == [f"hpcseg @ {repo.as_uri()}"]
    assert dependencies.requirements(module_dir=MODULE_DIR, server=True) == [f"hpcseg[server] @ {repo.as_uri()}"]
    assert dependencies.requirements(module_dir=tmp_path) == [f"hpcseg>={dependencies.MIN_VERSION}"]
    assert dependencies.requirements("hpcseg==0.1.0", module_dir=MODULE_DIR, server=True) == ["hpcseg[server]==0.1.0"]
    wheel = tmp_path / "hpcseg-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert dependencies.requirements(str(wheel)) == [f"hpcseg @ {wheel.as_uri()}"]
    assert dependencies.requirements("https://example.org/hpcseg.whl") == ["hpcseg @ https://example.org/hpcseg.whl"]


def test_unmet_decides_whether_pip_must_run():
    import importlib.metadata

    have = importlib.metadata.version("hpcseg")
    assert dependencies.unmet([f"hpcseg>={dependencies.MIN_VERSION}"]) == []
    assert dependencies.unmet([f"hpcseg @ {MODULE_DIR.parents[1].as_uri()}"]) == []
    assert dependencies.unmet(["hpcseg>=99"]) == [f"hpcseg>=99: {have} installed"]
    assert dependencies.unmet(["hpcseg-surely-not-a-package"]) == ["hpcseg-surely-not-a-package: not installed"]
    assert "not a requirement" in dependencies.unmet(["hpcseg >>> 1"])[0]
    assert {"fastapi", "torch", "uvicorn"} <= set(dependencies._extra_dists("hpcseg", {"server"}))
    assert dependencies.unmet(["hpcseg[server]"]) == []  # the test environment has the server extras


def test_python_and_server_extras_checks():
    assert dependencies.python_problem((3, 12, 1)) is None
    problem = dependencies.python_problem((3, 9, 10))
    assert "Python 3.9" in problem and "Slicer 5.10 or newer" in problem
    assert dependencies.server_extras_needed("local", sys.executable)
    assert not dependencies.server_extras_needed("slurm", sys.executable)
    assert not dependencies.server_extras_needed("local", "/opt/other-env/bin/python3")
    # the embedded local profile read in the worker names the worker's Python (Slicer's PythonSlicer)
    assert dependencies.server_extras_needed("local", "/usr/bin/python3", worker_python="/usr/bin/python3")


# ------------------------------------------------------------------------------------------------------ profiles
def test_profile_form_writes_the_config_file_the_cli_reads(isolated):
    from HPCSegLib.profiles import ProfileForm, form_fields, load_profile, profile_names

    from hpcseg.config import config_path, load_config

    keys = [f.key for f in form_fields()]
    assert "name" not in keys and {"host", "scheduler", "partition", "walltime", "image"} <= set(keys)
    assert next(f for f in form_fields() if f.key == "scheduler").choices == ("slurm", "pbs", "local")
    local = ProfileForm.load("local")
    assert local.values["scheduler"] == "local" and local.values["python"] == sys.executable
    assert profile_names() == (["local"], "local")

    form = ProfileForm("karolina", {**ProfileForm.load("local").values, "python": "python3", "host": "karolina",
                                    "scheduler": "slurm", "partition": "qgpu", "gpus": "2",
                                    "modules": "CUDA/12.4, Python/3.11", "account": ""})
    path = form.save(make_default=True)
    assert path == config_path() and path.is_relative_to(isolated)
    cfg = load_config()
    prof = cfg.profile()
    assert cfg.default == "karolina" and prof.name == "karolina" and prof.gpus == 2
    assert prof.modules == ["CUDA/12.4", "Python/3.11"] and prof.account is None
    assert load_profile("karolina") == prof and profile_names() == (["karolina", "local"], "karolina")
    assert ProfileForm.load("karolina").values["modules"] == "CUDA/12.4, Python/3.11"

    form.values["walltime"] = "2h"
    with pytest.raises(ConfigError, match="walltime"):
        form.save()
    assert load_config().profile("karolina").walltime == "02:00:00"  # a refused form changes nothing


# ------------------------------------------------------------------------------------------- the real local server
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_segmentation_session_end_to_end_on_the_local_server(isolated):
    from hpcseg.config import local_profile
    from hpcseg.jobs import JobManager
    from hpcseg.phantoms import make_phantom
    from hpcseg.serverjobs import stop_servers
    from hpcseg.worker.session import EXTREME_POINTS, SegmentationSession
    from hpcseg.worker.status import ServerState

    profile = local_profile()
    image, truth_img, names = make_phantom(5, shape=(48, 48, 32))
    image.SetOrigin((12.0, -40.0, 7.5))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # not LPS-identity: the RAS points must still land right
    truth = sitk.GetArrayFromImage(truth_img)
    volume = VolumeArray.from_image(image, key="phantom-5")
    progress: list[str] = []
    session = SegmentationSession(profile, progress=progress.append, timeout=120)
    try:
        assert session.poll().server is ServerState.NO_JOB
        info = session.connect()
        assert "ct-body" in info["models"] and progress[-1].startswith("ready")
        models = session.models()
        assert "ct-body" in models["segmentation"] and "deepgrow-regiongrow" in models["deepgrow"]
        snap = session.poll()
        assert snap.ready and snap.job_id == session.job_id, snap.text
        assert snap.text == f"Job {session.job_id}: running on localhost  ·  Server: ready"

        seg = session.segment(volume, "ct-body")
        assert seg.label_names == {"body": 1, "lungs": 2, "bone": 3} and seg.model_version == "1.0.0"
        assert seg.labels.shape == volume.array.shape
        assert _dice(seg.labels > 0, truth > 0) > 0.95  # the patient, on the volume's own grid
        assert {n for n, _, _ in seg.segments()} == {"body", "lungs", "bone"}

        # deepgrow: a click in the liver (as Slicer gives it: RAS) → one object containing the clicked voxel
        liver = np.argwhere(truth == names["liver"])
        k, j, i = liver[len(liver) // 2]
        click_ras = ijk_to_ras([(i, j, k)], volume.ijk_to_ras)
        assert volume.voxel_indices(click_ras) == [[i, j, k]]
        first = session.click(volume, "deepgrow-regiongrow", foreground=click_ras, label="liver")
        assert first.label_names == {"liver": 1} and first.labels[k, j, i] == 1
        assert session.has_image(volume)
        air = ijk_to_ras([(1, 1, k)], volume.ijk_to_ras)
        second = session.click(volume, "deepgrow-regiongrow", foreground=click_ras, background=air, label="liver")
        assert second.labels[k, j, i] == 1 and second.labels[k, 1, 1] == 0
        assert second.request_bytes < 4000 < volume.array.nbytes  # the image went up once: a click sends points

        # dextr3d: the liver's six extreme points → the object around their centroid
        extremes = [liver[np.argmin(liver[:, a])] if s else liver[np.argmax(liver[:, a])]
                    for a in range(3) for s in (0, 1)]
        assert len(extremes) == EXTREME_POINTS
        pts_ras = ijk_to_ras([(p[2], p[1], p[0]) for p in extremes], volume.ijk_to_ras)
        obj = session.extreme_points(volume, "dextr3d-geodesic", pts_ras, label="liver")
        assert _dice(obj.labels == 1, truth == names["liver"]) > 0.5

        # the corrected pair goes to a dataset on the "cluster" (this machine for the local profile)
        # (label values: ct-body's for its names, the next free one for the interactive "liver")
        segments = {"body": seg.labels == 1, "bone": seg.labels == 3, "liver": obj.labels == 1}
        up = session.upload_pair(volume, segments, dataset="phantoms", split="val")
        assert up.status == "uploaded" and up.split == "val"
        manifest = json.loads((Path(profile.datasets_path) / "phantoms" / "dataset.json").read_text())
        assert manifest["labels"] == {"0": "background", "1": "body", "3": "bone", "4": "liver"}
        assert manifest["hpcseg"]["cases"][up.case_id]["model_version"] == "1.0.0"
        assert manifest["hpcseg"]["cases"][up.case_id]["labels_present"] == [0, 1, 3, 4]
        again = session.upload_pair(volume, segments, dataset="phantoms")
        assert again.status == "skipped" and again.case_id == up.case_id  # the same pair is not sent twice

        job_id = session.job_id
        assert session.stop() == [job_id] and not session.connected
        deadline = time.monotonic() + 10
        while (snap := session.poll()).server is not ServerState.GONE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert snap.server is ServerState.GONE and snap.text.startswith(f"Job {job_id}: cancelled"), snap.text
    finally:
        session.close()
        stop_servers(JobManager(profile))


def test_label_values_and_merge():
    from hpcseg.worker.session import label_values, merge_segments, models_by_type

    assert label_values(["lungs", "tumour", "body"], {"body": 1, "lungs": 2}) == {"lungs": 2, "tumour": 1 + 2,
                                                                                  "body": 1}
    a, b = np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool)
    a[0], b[0, 0] = True, True
    merged = merge_segments({"a": a, "b": b}, {"a": 1, "b": 5})
    assert merged.dtype == np.uint8 and merged[0, 0, 0] == 5 and merged[0, 1, 1] == 1 and merged[1].max() == 0
    with pytest.raises(ValueError, match="no segments"):
        merge_segments({}, {})
    info = {"models": {"x": {"type": "deepgrow"}, "b": {}, "a": {"type": "segmentation"}}}
    assert models_by_type(info) == {"deepgrow": ["x"], "segmentation": ["a", "b"]}


def test_stop_while_connecting_cancels_quietly(isolated):
    """Stop pressed while Connect waits for the job: the job is cancelled and the wait ends as Cancelled."""
    from hpcseg.config import local_profile
    from hpcseg.jobs import JobManager
    from hpcseg.serverjobs import stop_servers
    from hpcseg.worker.session import Cancelled, SegmentationSession
    from hpcseg.worker.status import ServerState

    profile = local_profile()
    session = SegmentationSession(profile, timeout=120)
    outcome: list[object] = []

    def connect() -> None:
        try:
            outcome.append(session.connect())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)  # in the worker, Connect runs on its action lane
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while session.poll().server is ServerState.NO_JOB and time.monotonic() < deadline:
            time.sleep(0.05)  # until the job is submitted
        stopped = session.stop()
        assert len(stopped) == 1
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
        assert not session.connected
    finally:
        stop_servers(JobManager(profile))
