"""What new users feed hpcseg: real DICOM (pydicom's bundled files, offline), odd NIfTI, wrong paths.

Each case either works (the mask in the input's exact geometry, label names kept) or fails with one ``error:``
line and a hint, before any server starts or any voxel is sent. `hpcseg segment` runs on the embedded `local`
profile: one local server for the whole module, stopped at its end.
"""

from __future__ import annotations

import json
import locale
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from pydicom.uid import generate_uid

from hpcseg import imaging
from hpcseg.cli import main
from hpcseg.errors import ImageError
from hpcseg.phantoms import make_phantom

TESTDATA = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False)).parent  # in the wheel
DICOMDIRTESTS = TESTDATA / "dicomdirtests"


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def local_profile(tmp_path_factory):
    """No config: `hpcseg segment` runs the local server; one for the module, stopped at the end."""
    root = tmp_path_factory.mktemp("hpcseg-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCSEG_CONFIG", str(root / "cfg" / "config.toml"))
        mp.setenv("HPCSEG_STATE_DIR", str(root / "state"))
        mp.setenv("XDG_DATA_HOME", str(root / "data"))
        mp.delenv("HPCSEG_PROFILE", raising=False)
        yield
        CliRunner().invoke(main, ["stop"])


def cli(*args, code=0) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    if code == 1:
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return res.output


def refused_early(*args) -> str:
    """The one error line of a refusal that happened before any server was asked (no progress line)."""
    out = cli(*args, code=1)
    assert "ready" not in out and "submitted" not in out, out
    return next(ln for ln in out.splitlines() if ln.startswith("error:"))


def warnings_of(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("warning:")]


def assert_exact_geometry(mask: sitk.Image, ref: sitk.Image, tol: float = 0.0) -> None:
    assert mask.GetSize() == ref.GetSize()
    for attr in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(mask, attr)(), getattr(ref, attr)(), rtol=0, atol=tol), attr


def phantom(shape=(40, 36, 24), seed=3) -> sitk.Image:
    return make_phantom(seed, shape=shape)[0]


def dicom_series(folder: Path, hu: np.ndarray, *, spacing=(1.5, 1.5, 2.0), origin=(-30.0, -40.0, 100.0),
                 uid: str | None = None, slope: float = 1.0, intercept: float = -1024.0, skip=(),
                 description: str = "abdomen", number: int = 3) -> str:
    """Write ``hu`` (z, y, x) as a CT series of unsigned 16-bit stored values (HU = stored × slope + intercept),
    one file per slice named unrelated to its position, each a copy of pydicom's real CT_small.dcm header."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    template = pydicom.dcmread(TESTDATA / "CT_small.dcm")
    del template.PixelPaddingValue
    stored = np.round((hu - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 65536
    stored = stored.astype(np.uint16)
    for k in range(hu.shape[0]):
        if k in skip:
            continue
        ds = template.copy()
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.SliceLocation = origin[2] + k * spacing[2]
        ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 0, 16, 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = uid, number, description
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"{description[:2].upper()}{(k * 7919) % 1000:04d}", enforce_file_format=True)
    return uid


# --------------------------------------------------------------------------------------------- real DICOM files
@pytest.mark.parametrize("name, lo, hi", [("CT_small.dcm", -896, 1167), ("MR_small.dcm", 127, 2145)])
def test_real_single_slice_dicom_reads_in_real_units_and_is_refused_in_one_line(tmp_path, name, lo, hi):
    shutil.copy(TESTDATA / name, tmp_path / name)
    img = imaging.read_image(tmp_path / name)  # CT: stored + RescaleIntercept -1024 = HU
    arr = sitk.GetArrayViewFromImage(img)
    assert img.GetSize()[2] == 1 and (arr.min(), arr.max()) == (lo, hi)
    line = refused_early("segment", tmp_path / name, "-o", tmp_path / "seg.nii.gz")
    assert "a single slice" in line and name in line


def test_a_single_file_among_unreadable_neighbours_is_read_alone(tmp_path):
    for name in ("CT_small.dcm", "rtdose_1frame.dcm"):  # GDCM cannot list a folder holding the second one
        shutil.copy(TESTDATA / name, tmp_path / name)
    img = imaging.read_image(tmp_path / "CT_small.dcm")
    assert img.GetSize() == (128, 128, 1)
    assert any("read CT_small.dcm alone" in w for w in imaging.check_input(img))


def test_bundled_real_ct_series_reads_sorted_by_position_in_hu():
    folder = DICOMDIRTESTS / "98892001" / "CT5N"
    img = imaging.read_image(folder)
    slices = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    want = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    assert img.GetSize() == (16, 16, 5) and np.allclose(img.GetSpacing()[2], 2.5)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), want)
    assert np.allclose(img.GetOrigin(), [float(v) for v in slices[0].ImagePositionPatient], atol=1e-4)


def test_real_series_with_missing_slices_warns():
    img = imaging.read_image(DICOMDIRTESTS / "77654033" / "CT2")  # 4 slices: one far away from the other three
    warnings = imaging.check_input(img)
    assert any("not evenly spaced" in w and "missing slices" in w for w in warnings), warnings


def test_real_localizer_with_slices_in_several_orientations_is_refused():
    with pytest.raises(ImageError, match="different orientations"):
        imaging.read_image(DICOMDIRTESTS / "98892003" / "MR700")


def test_a_folder_of_series_folders_names_them():
    with pytest.raises(ImageError, match="no DICOM series") as exc:
        imaging.read_image(DICOMDIRTESTS / "98892003")
    assert "MR1" in exc.value.hint and "MR700" in exc.value.hint
    with pytest.raises(ImageError) as exc:  # the DICOMDIR of a CD export: its files are in subfolders
        imaging.read_image(DICOMDIRTESTS / "DICOMDIR")
    assert "subfolders" in exc.value.hint


# ------------------------------------------------------------------------------------- DICOM series written here
@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_uint16_stored_ct_series_reads_as_hu(tmp_path, slope):
    ct = phantom(shape=(40, 36, 12))
    hu = sitk.GetArrayFromImage(ct).astype(float)
    dicom_series(tmp_path, hu, slope=slope)
    img = imaging.read_image(tmp_path)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), hu)
    assert np.allclose(img.GetSpacing(), (1.5, 1.5, 2.0)) and np.allclose(img.GetOrigin(), (-30, -40, 100))


def test_dicom_folder_with_dicomdir_and_text_segments_like_its_nifti(tmp_path):
    ct = phantom()
    ct.SetOrigin((-30.0, -40.0, 100.0))
    series = tmp_path / "series"
    dicom_series(series, sitk.GetArrayFromImage(ct).astype(float))
    shutil.copy(DICOMDIRTESTS / "DICOMDIR", series / "DICOMDIR")
    (series / "notes.txt").write_text("exported from PACS\n")
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    out = cli("segment", series, "-o", tmp_path / "dcm-seg.mha", "--model", "ct-body")
    assert warnings_of(out) == []
    cli("segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "nii-seg.mha", "--model", "ct-body")
    from_dicom, from_nifti = (sitk.ReadImage(str(tmp_path / n)) for n in ("dcm-seg.mha", "nii-seg.mha"))
    assert_exact_geometry(from_dicom, imaging.read_image(series))
    assert np.array_equal(sitk.GetArrayViewFromImage(from_dicom), sitk.GetArrayViewFromImage(from_nifti))
    assert {0, 1, 3} <= set(np.unique(sitk.GetArrayViewFromImage(from_dicom)).tolist())


def test_two_alike_series_are_refused_with_their_ids_and_a_file_picks_one(tmp_path):
    hu = sitk.GetArrayFromImage(phantom(shape=(24, 24, 8))).astype(float)
    soft = dicom_series(tmp_path, hu, description="soft tissue", number=2)
    lung = dicom_series(tmp_path, hu + 10, description="lung kernel", number=3)
    with pytest.raises(ImageError, match="2 DICOM series") as exc:
        imaging.read_image(tmp_path)
    assert soft in exc.value.message and lung in exc.value.message and '"lung kernel"' in exc.value.message
    assert "one file of the series" in exc.value.hint
    one = next(tmp_path.glob("LU*"))  # a file of the lung-kernel series reads that series
    assert np.array_equal(sitk.GetArrayViewFromImage(imaging.read_image(one)), hu + 10)
    line = refused_early("segment", tmp_path, "-o", tmp_path / "seg.nii.gz")
    assert soft in line and lung in line


def test_a_scout_next_to_the_scan_is_left_out_with_a_warning(tmp_path):
    hu = sitk.GetArrayFromImage(phantom(shape=(24, 24, 10))).astype(float)
    dicom_series(tmp_path, hu, description="abdomen")
    scout = dicom_series(tmp_path, hu[:2], description="topogram", number=1)
    img = imaging.read_image(tmp_path)
    assert img.GetSize() == (24, 24, 10)
    (note,) = [w for w in imaging.check_input(img) if "DICOM series" in w]
    assert "read the largest" in note and '"abdomen"' in note and scout in note


def test_a_missing_slice_warns_with_how_far_slices_are_off(tmp_path):
    hu = sitk.GetArrayFromImage(phantom(shape=(24, 24, 10))).astype(float)
    dicom_series(tmp_path, hu, skip=(4,))
    img = imaging.read_image(tmp_path)
    (note,) = [w for w in imaging.check_input(img) if "evenly" in w]
    assert "gaps 2 to 4 mm" in note and "missing slices" in note


def test_dicom_reading_restores_the_locale(tmp_path, monkeypatch):
    dicom_series(tmp_path, np.zeros((4, 8, 8)))
    before = locale.setlocale(locale.LC_ALL)
    execute = sitk.ImageSeriesReader.Execute

    def switching(self, *a):  # what GDCM does on some systems
        locale.setlocale(locale.LC_ALL, "C")
        return execute(self, *a)

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", switching)
    locale.setlocale(locale.LC_ALL, "C.UTF-8")
    imaging.read_image(tmp_path)
    assert locale.setlocale(locale.LC_ALL) in ("C.UTF-8", "C.utf8")
    locale.setlocale(locale.LC_ALL, before)


# ------------------------------------------------------------------------------------------- NIfTI and friends
def _rotated() -> tuple[float, ...]:
    return sitk.VersorTransform((0.3, 0.2, 0.1), 0.4).GetMatrix()


@pytest.mark.parametrize("direction, output", [
    (_rotated(), "seg.seg.nrrd"),                      # oblique
    ((-1, 0, 0, 0, -1, 0, 0, 0, 1), "seg.nii.gz"),      # RAS-stored (x, y flipped against DICOM's LPS)
    ((0, 0, 1, 0, -1, 0, 1, 0, 0), "seg.nrrd"),         # axes permuted and flipped
    (_rotated(), "seg.mha"),
    ((1, 0, 0, 0, 1, 0, 0, 0, -1), "out/new/seg.mhd"),  # feet-first; the output folders do not exist yet
])
def test_masks_keep_the_exact_geometry_and_label_names(tmp_path, direction, output):
    ct = phantom()
    ct.SetDirection(direction)
    ct.SetOrigin((10.25, -20.5, 30.125))
    src = tmp_path / "ct.nrrd"  # NRRD keeps geometry in full precision: exact comparisons hold
    sitk.WriteImage(ct, str(src))
    out = json.loads(cli("segment", src, "-o", tmp_path / output, "--model", "ct-body", "--json"))
    mask, labels = imaging.read_mask(tmp_path / output)
    assert labels == out["labels"] == {"body": 1, "lungs": 2, "bone": 3}
    assert_exact_geometry(mask, imaging.read_image(src), tol=1e-5 if output.endswith(".nii.gz") else 1e-12)
    assert_exact_geometry(mask, ct, tol=1e-5)  # NIfTI stores geometry in float32
    assert {0, 1, 3} <= set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
    assert not [p for p in (tmp_path / output).parent.iterdir() if p.name.startswith(".")]  # no temp files
    if output.endswith(".seg.nrrd"):
        assert mask.GetMetaData("Segmentation_SourceRepresentation") == "Binary labelmap"
        for i, (name, value) in enumerate(labels.items()):
            assert mask.GetMetaData(f"Segment{i}_Name") == name
            assert mask.GetMetaData(f"Segment{i}_LabelValue") == str(value)
            assert mask.GetMetaData(f"Segment{i}_Layer") == "0"


def test_seg_nrrd_segment_extents_are_the_boxes_slicer_expects(tmp_path):
    ref = sitk.Image(20, 16, 12, sitk.sitkInt16)
    arr = np.zeros((12, 16, 20), np.uint8)
    arr[2:5, 3:9, 4:12] = 1  # z 2-4, y 3-8, x 4-11
    path = imaging.write_mask(arr, tmp_path / "m.seg.nrrd", {"liver": 1, "tumour": 2}, reference=ref)
    back, labels = imaging.read_mask(path)
    assert labels == {"liver": 1, "tumour": 2}
    assert back.GetMetaData("Segment0_Extent") == "4 11 3 8 2 4"
    assert back.GetMetaData("Segment1_Extent") == "0 -1 0 -1 0 -1"  # an empty segment


@pytest.mark.parametrize("make, says", [
    (lambda ct: sitk.JoinSeries([ct, ct]), "a 4D image"),
    (lambda ct: sitk.Compose([ct, ct, ct]), "3 values per voxel"),
    (lambda ct: ct[:, :, 10], "a 2D image"),
    (lambda ct: ct[:, :, 10:11], "a single slice"),
    (lambda ct: ct[:, :, 10:12], "only 2 voxels thick"),
])
def test_inputs_that_are_not_one_3d_volume_are_refused_before_any_server(tmp_path, make, says):
    src = tmp_path / "in.nii.gz"
    sitk.WriteImage(make(phantom()), str(src))
    line = refused_early("segment", src, "-o", tmp_path / "seg.nii.gz")
    assert says in line and "in.nii.gz" in line


def test_a_4d_image_of_one_volume_is_that_volume():
    ct = phantom(shape=(12, 10, 8))
    ct.SetDirection(_rotated())
    four = sitk.JoinSeries([ct])
    vol = imaging.as_volume(four)
    assert vol.GetDimension() == 3 and imaging.same_geometry(vol, ct)


def _aniso(ct):
    out = sitk.Image(ct)
    out.SetSpacing((0.7, 0.7, 5.0))
    return out


def _nan(ct):
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[5:8, 5:8, 5:8] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ct)
    return out


@pytest.mark.parametrize("make, suffix, says", [
    (lambda ct: sitk.Cast(ct, sitk.sitkFloat64), ".nii.gz", None),
    (lambda ct: sitk.Cast(sitk.RescaleIntensity(ct, 0, 255), sitk.sitkUInt8), ".nii.gz", "not CT-like"),
    (lambda ct: sitk.Cast(sitk.RescaleIntensity(ct, 0, 4000), sitk.sitkInt16), ".nii.gz", "is this an MRI"),
    (_aniso, ".nii.gz", "strongly anisotropic"),                           # 0.7 × 0.7 × 5 mm
    (_nan, ".nrrd", "not numbers (NaN"),  # ITK's NIfTI reader turns NaN into 0; NRRD keeps it
])
def test_pixel_types_and_qa_warnings(tmp_path, make, suffix, says):
    img = make(phantom())
    src = tmp_path / f"in{suffix}"
    sitk.WriteImage(img, str(src))
    out = cli("segment", src, "-o", tmp_path / "seg.mha", "--model", "ct-body")
    warnings = warnings_of(out)
    if says is None:
        assert warnings == []
    else:
        assert any(says in w for w in warnings), out
    assert_exact_geometry(sitk.ReadImage(str(tmp_path / "seg.mha")), imaging.read_image(src))
    assert len(warnings) == len(set(warnings))  # what the client and the server both noticed is said once


def test_the_client_library_refuses_before_sending_and_replaces_nan():
    from hpcseg.client import ServerClient

    client = ServerClient("http://127.0.0.1:9", "token")  # nothing listens there: a refusal must come first
    ct = phantom(shape=(12, 10, 8))
    for bad, says in ((sitk.JoinSeries([ct, ct]), "4D"), (ct[:, :, 3:4], "single slice")):
        with pytest.raises(ImageError, match=says):
            client.segment(bad, model="ct-body")
    with pytest.raises(ImageError, match="RGB"):
        client.create_session(sitk.Compose([ct, ct, ct]))
    fixed, n = imaging.finite_voxels(_nan(ct))
    arr = sitk.GetArrayViewFromImage(fixed)
    assert n == 27 and np.isfinite(arr).all() and arr.min() == sitk.GetArrayViewFromImage(ct).min()
    assert imaging.same_geometry(fixed, ct)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_a_truncated_nifti_is_refused(tmp_path, name):
    whole = tmp_path / f"whole-{name}"
    sitk.WriteImage(phantom(), str(whole))
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="truncated"):
        imaging.read_image(tmp_path / name)
    assert imaging.read_image(whole).GetSize() == (40, 36, 24)  # a complete file passes the check
    assert "truncated" in refused_early("segment", tmp_path / name, "-o", tmp_path / "seg.nii.gz")


def test_a_sheared_nifti_says_why_it_cannot_be_read(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(tmp_path / "ok.nii"))
    data = bytearray((tmp_path / "ok.nii").read_bytes())
    struct.pack_into("<hh", data, 252, 0, 1)  # qform_code 0, sform_code 1, and a sheared sform:
    for offset, row in ((280, (-1, 0.4, 0, 0)), (296, (0, -1, 0, 0)), (312, (0, 0, 2, 0))):
        struct.pack_into("<4f", data, offset, *row)
    (tmp_path / "sheared.nii").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="orthonormal") as exc:
        imaging.read_image(tmp_path / "sheared.nii")
    assert "sheared" in exc.value.hint


def test_path_errors_are_one_line_before_any_server(tmp_path):
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom(shape=(16, 16, 8)), str(src))
    assert "no such file" in refused_early("segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "s.nii.gz")
    for bad in ("seg.png", "seg.txt", "seg"):
        assert "cannot write a mask in this format" in refused_early("segment", src, "-o", tmp_path / bad)
    assert "is the input image" in refused_early("segment", src, "-o", src)
    assert "is a folder" in refused_early("segment", src, "-o", tmp_path)
    (tmp_path / "file").write_text("")
    assert "is a file" in refused_early("segment", src, "-o", tmp_path / "file" / "seg.nii.gz")
    assert not list(tmp_path.glob("*.labels.json"))
