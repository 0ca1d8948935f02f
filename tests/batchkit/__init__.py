"""What the batch tests share: a small phantom cohort (one corrupt file, one duplicate) and the checks on a
finished batch's masks and report."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hpcseg.imaging import read_mask
from hpcseg.phantoms import make_phantom

#: ct-body's structures, named as the phantom names them
STRUCTURES = ("body", "lungs", "bone")


def make_cohort(folder: Path, n: int, shape=(64, 64, 40), first_seed: int = 0) -> dict[str, tuple[Path, int]]:
    """``n`` phantom CTs (varied origin/direction) + ``bad.nii.gz`` (corrupt) + a copy of case 1
    (``dup.nii.gz``) in ``folder``; returns case id -> (path, seed) of the good ones."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    for i in range(n):
        image, _, _ = make_phantom(first_seed + i, shape)
        image.SetOrigin((10.0 * i, -5.0, 3.0 * i))
        if i % 2:
            image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
        path = folder / f"ct{i:02d}.nii.gz"
        sitk.WriteImage(image, str(path))
        cases[f"ct{i:02d}"] = (path, first_seed + i)
    shutil.copy(folder / "ct01.nii.gz", folder / "dup.nii.gz")
    cases["dup"] = (folder / "dup.nii.gz", first_seed + 1)
    (folder / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"this is not an image" * 50)
    return cases


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.logical_and(a, b).sum()) / s


def check_outputs(out: Path, cases: dict[str, tuple[Path, int]], shape=(64, 64, 40), suffix=".seg.nrrd") -> None:
    """Every good case: a mask in its input's geometry with Dice >= 0.9 per structure; the report holds every
    case (the corrupt one with its reason) and volumes that match the masks."""
    rows = {r["case_id"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert rows["bad"]["status"] == "invalid" and "bad.nii.gz" in rows["bad"]["reason"], rows["bad"]
    for case_id, (path, seed) in cases.items():
        row = rows[case_id]
        assert row["status"] == "done", row
        image = sitk.ReadImage(str(path))
        mask, names = read_mask(out / f"{case_id}{suffix}")
        for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(mask, attr)() == getattr(image, attr)(), (case_id, attr)
        _, truth, truth_names = make_phantom(seed, shape)
        got, want = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        for name in STRUCTURES:
            d = dice(got == names[name], want == truth_names[name])
            assert d >= 0.9, f"{case_id} {name}: Dice {d:.3f}"
            count = int((got == names[name]).sum())
            assert int(row[f"{name}_voxels"]) == count, (case_id, name)
            assert float(row[f"{name}_ml"]) == round(count * voxel_ml, 4)
    assert "the same image as case ct01" in rows["dup"]["warnings"]
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def write_ct_series(folder: Path, image: sitk.Image, series_number: int = 1, study_uid: str | None = None) -> str:
    """Write ``image`` (int16 HU, axial) as a CT Image Storage series, one pydicom file per slice, with the
    attributes a DICOM SEG needs from its source; returns the SeriesInstanceUID."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, frame_uid = generate_uid(), generate_uid()
    study_uid = study_uid or generate_uid()
    arr = sitk.GetArrayFromImage(image).astype(np.int16)
    spacing, direction = image.GetSpacing(), image.GetDirection()
    for z in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
            "20261202", "120000", "", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, z + 1
        ds.Manufacturer, ds.PositionReferenceIndicator = "hpcseg-test", ""
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))]
        ds.ImageOrientationPatient = [float(v) for v in (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = arr[z].tobytes()
        ds.save_as(folder / f"IM{series_number:02d}{z:04d}.dcm", enforce_file_format=True)
    return series_uid
