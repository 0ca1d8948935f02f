"""DICOM SEG out: written with highdicom over a real (pydicom-written) CT series, read back with pydicom and
highdicom: referenced series, geometry, named segments, the voxels; through `batch` and `segment`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.dicomseg import write_dicom_seg
from hpcseg.phantoms import make_phantom
from tests.batchkit import dice, write_ct_series

hd = pytest.importorskip("highdicom")  # the `dicom` extra; the test extra installs it


def check_seg(seg_path: Path, series_dir: Path, series_uid: str, truth: np.ndarray | None, names: dict[str, int],
              min_dice: float = 1.0) -> None:
    """Read a DICOM SEG back: it references the series, sits on its slices and grid, names its segments."""
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    sources = sorted((pydicom.dcmread(f) for f in series_dir.glob("*.dcm")), key=lambda d: d.InstanceNumber)
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert (ds.Rows, ds.Columns) == (sources[0].Rows, sources[0].Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in sources[0].PixelSpacing])
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in sources[0].ImageOrientationPatient])
    positions = {tuple(round(float(v), 4) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for f in ds.PerFrameFunctionalGroupsSequence}
    assert positions == {tuple(round(float(v), 4) for v in s.ImagePositionPatient) for s in sources}
    assert [s.SegmentLabel for s in ds.SegmentSequence] == list(names)
    seg = hd.seg.segread(seg_path)
    uids = [s.SOPInstanceUID for s in sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               segment_numbers=list(range(1, len(names) + 1)))
    if truth is not None:
        for i, (name, value) in enumerate(names.items()):
            d = dice(pixels[..., i] > 0, truth == value)
            assert d >= min_dice, f"{name}: Dice {d:.3f}"


def test_write_dicom_seg_references_the_series_and_keeps_its_geometry(tmp_path: Path):
    image, truth, names = make_phantom(3, (40, 36, 12))
    image.SetOrigin((-20.0, 15.0, 100.0))
    uid = write_ct_series(tmp_path / "series", image)
    read = imaging.read_image(tmp_path / "series")
    assert read.GetSize() == image.GetSize()
    truth.CopyInformation(read)
    wanted = {"body": 1, "lungs": 2, "bone": 3, "liver": 4}
    out = write_dicom_seg(truth, tmp_path / "series" / "IM010000.dcm", tmp_path / "seg.dcm", wanted,
                          model="truth", version="1")
    check_seg(out, tmp_path / "series", uid, sitk.GetArrayFromImage(truth), wanted)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_batch_dicom_seg_for_each_series(tmp_path: Path, monkeypatch):
    import hpcseg

    monkeypatch.setenv("PYTHONPATH", str(Path(hpcseg.__file__).resolve().parent.parent))
    from hpcseg.batch import BatchStore, start_batch
    from hpcseg.config import Profile
    from hpcseg.jobs import JobManager, JobStore

    truths, uids = {}, {}
    for n in (1, 2):
        image, truth, _ = make_phantom(10 + n, (64, 64, 32))
        uids[n] = write_ct_series(tmp_path / "in" / f"patient{n}", image, series_number=n)
        truths[n] = sitk.GetArrayFromImage(truth)
    (tmp_path / "in" / "ct.nii.gz").parent.mkdir(exist_ok=True)
    sitk.WriteImage(make_phantom(5, (32, 32, 8))[0], str(tmp_path / "in" / "ct.nii.gz"))
    prof = Profile(name="lanes", scheduler="local", work_dir=str(tmp_path / "work"), python=sys.executable,
                   gpus=0, device="cpu")
    b = start_batch(prof, [tmp_path / "in"], tmp_path / "out", model="ct-body", fmt="dicom-seg",
                    store=BatchStore(tmp_path / "b.json"))
    b.state["via"] = "array"
    b._jobs = JobManager(prof, store=JobStore(tmp_path / "jobs.json"))
    summary = b.run(poll_seconds=0.3)
    assert (summary["done"], summary["invalid"]) == (2, 1), summary
    rows = {r["case_id"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["cases"]}
    assert "needs a DICOM series" in rows["ct"]["reason"]
    for n in (1, 2):
        seg = tmp_path / "out" / f"in_patient{n}.dcm"
        check_seg(seg, tmp_path / "in" / f"patient{n}", uids[n], truths[n], {"body": 1, "lungs": 2, "bone": 3},
                  min_dice=0.9)
        assert rows[f"in_patient{n}"]["volumes"]["lungs"]["voxels"] == int(
            (hd.seg.segread(seg).get_pixels_by_source_instance(
                source_sop_instance_uids=[d.SOPInstanceUID for d in sorted(
                    (pydicom.dcmread(f) for f in (tmp_path / "in" / f"patient{n}").glob("*.dcm")),
                    key=lambda d: d.InstanceNumber)], segment_numbers=[2]) > 0).sum())
    assert os.environ["PYTHONPATH"]


def test_segment_format_dicom_seg_on_the_local_default(tmp_path: Path, monkeypatch):
    from click.testing import CliRunner

    from hpcseg.cli import main

    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    image, truth, _ = make_phantom(2, (64, 64, 32))
    uid = write_ct_series(tmp_path / "series", image)
    runner = CliRunner()
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(nifti))
    res = runner.invoke(main, ["segment", str(nifti), "-o", str(tmp_path / "x.dcm"), "--format", "dicom-seg"])
    assert res.exit_code == 1 and "needs a DICOM series" in res.output
    try:
        res = runner.invoke(main, ["segment", str(tmp_path / "series"), "-o", str(tmp_path / "seg.dcm"), "--model",
                                   "ct-body", "--format", "dicom-seg", "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        check_seg(tmp_path / "seg.dcm", tmp_path / "series", uid, sitk.GetArrayFromImage(truth),
                  {"body": 1, "lungs": 2, "bone": 3}, min_dice=0.9)
    finally:
        runner.invoke(main, ["stop"])
