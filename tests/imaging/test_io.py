"""Reading images (files and DICOM series) and writing masks in the reference's exact geometry."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.errors import ImageError


def _oblique(size=(17, 13, 11), spacing=(0.7, 1.3, 2.9), origin=(-12.5, 40.25, 101.0), dtype=np.int16):
    """An image with a rotated, non-identity direction, odd spacing and origin, and distinct voxel values."""
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 1500, size[::-1]).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1, -1, -1])  # rotated and flipped
    img.SetDirection(tuple(rot.ravel()))
    return img


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_file_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    img = _oblique()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(path))
    back = imaging.read_image(path)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    assert imaging.same_geometry(back, img)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        imaging.read_image(tmp_path / "missing.nii.gz")
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="garbage.nii.gz"):
        imaging.read_image(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no DICOM series") as exc:
        imaging.read_image(tmp_path / "empty")
    assert exc.value.hint


def _write_series(folder, image, uid, names):
    """Write ``image`` as a DICOM series (one file per slice, written in the order of ``names``)."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k, name in names:
        sl = image[:, :, k]
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0020|000e": uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0008|0060": "CT",
                           "0020|0032": "\\".join(f"{p:.6f}" for p in pos), "0020|0013": str(k + 1),
                           "0020|0037": "\\".join(f"{d:.6f}" for d in (*direction[0:7:3], *direction[1:8:3])),
                           "0018|0050": str(image.GetSpacing()[2]), "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                           "0008|0018": f"{uid}.{k + 1}"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(sl)


def test_dicom_folder_reads_the_largest_series_sorted_by_position(tmp_path):
    arr = (np.arange(12)[:, None, None] * 10 + np.zeros((12, 16, 20))).astype(np.int16)  # slice k has value 10k
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin((-8.0, -6.0, 30.0))
    names = [f"{random.Random(k).getrandbits(32):08x}.dcm" for k in range(12)]
    shuffled = list(enumerate(names))
    random.Random(0).shuffle(shuffled)  # file names and write order say nothing about position
    _write_series(tmp_path, img, "1.2.826.0.1.3680043.2.1125.7", shuffled)
    scout = sitk.GetImageFromArray(np.zeros((3, 16, 20), np.int16))  # a smaller series in the same folder
    _write_series(tmp_path, scout, "1.2.826.0.1.3680043.2.1125.8", [(k, f"scout{k}.dcm") for k in range(3)])
    back = imaging.read_image(tmp_path)
    assert back.GetSize() == (20, 16, 12)
    assert np.array_equal(sitk.GetArrayViewFromImage(back)[:, 0, 0], np.arange(12) * 10)
    assert np.allclose(back.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    assert np.allclose(back.GetOrigin(), (-8.0, -6.0, 30.0), atol=1e-4)
    # a file of the series names its series
    assert imaging.read_image(tmp_path / names[5]).GetSize() == (20, 16, 12)


@pytest.mark.parametrize("name", ["mask.seg.nrrd", "mask.nii.gz", "mask.nrrd", "mask.mha"])
def test_write_mask_keeps_reference_geometry_and_label_names(tmp_path, name):
    ref = _oblique()
    arr = np.zeros(ref.GetSize()[::-1], np.uint8)
    arr[2:5, 3:9, 4:12] = 1
    arr[6:9, 1:4, 2:5] = 7
    labels = {"liver": 1, "lesion 2": 7}
    path = imaging.write_mask(arr, tmp_path / "out" / name, labels, reference=ref)
    back, names = imaging.read_mask(path)
    assert names == labels
    assert back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayViewFromImage(back), arr)
    assert imaging.same_geometry(back, ref)
    leftovers = [p for p in os.listdir(path.parent) if p.startswith(".")]
    assert leftovers == []  # the temp file was renamed, nothing else is left
    if name.endswith(".seg.nrrd"):
        assert back.GetMetaData("Segment1_Name") == "lesion 2"
        assert back.GetMetaData("Segment1_LabelValue") == "7"
        assert not imaging.labels_sidecar(path).exists()
    else:
        sidecar = imaging.labels_sidecar(path)
        assert sidecar.name == "mask.labels.json"
        assert json.loads(sidecar.read_text())["labels"] == labels


def test_write_mask_resamples_an_image_on_another_grid(tmp_path):
    ref = sitk.Image(40, 40, 20, sitk.sitkInt16)
    ref.SetSpacing((1.0, 1.0, 2.0))
    coarse = sitk.Image(20, 20, 10, sitk.sitkUInt8)
    coarse.SetSpacing((2.0, 2.0, 4.0))
    coarse.SetOrigin((0.5, 0.5, 1.0))  # same field of view, coarser voxels
    coarse[5:15, 5:15, 2:8] = 1
    path = imaging.write_mask(coarse, tmp_path / "m.nii.gz", {"a": 1}, reference=ref)
    back = imaging.read_image(path)
    assert imaging.same_geometry(back, ref)
    assert sitk.GetArrayViewFromImage(back).sum() == 20 * 20 * 12


def test_write_mask_refuses_a_wrong_array_shape(tmp_path):
    with pytest.raises(ImageError, match="shape"):
        imaging.write_mask(np.zeros((3, 3, 3), np.uint8), tmp_path / "m.nii.gz", {"a": 1}, _oblique())


def test_many_labels_are_written_as_uint16(tmp_path):
    ref = sitk.Image(8, 8, 8, sitk.sitkInt16)
    arr = np.zeros((8, 8, 8), np.uint16)
    arr[0, 0, 0] = 300
    path = imaging.write_mask(arr, tmp_path / "m.seg.nrrd", {"many": 300}, reference=ref)
    back, names = imaging.read_mask(path)
    assert back.GetPixelID() == sitk.sitkUInt16 and names == {"many": 300} and back[0, 0, 0] == 300
