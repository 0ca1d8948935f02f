"""Synthetic CT phantoms: deterministic, CT-like, with the documented labels."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.phantoms import HU, LABELS, make_phantom, write_sample_ct


def test_same_seed_same_voxels_other_seed_other_anatomy():
    a, la, _ = make_phantom(4)
    b, lb, _ = make_phantom(4)
    c, lc, _ = make_phantom(5)
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    assert np.array_equal(sitk.GetArrayViewFromImage(la), sitk.GetArrayViewFromImage(lb))
    assert not np.array_equal(sitk.GetArrayViewFromImage(la), sitk.GetArrayViewFromImage(lc))


def test_labels_and_intensities_are_as_documented():
    image, labels, names = make_phantom(6, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    assert names == LABELS == {"body": 1, "lungs": 2, "bone": 3, "liver": 4}
    assert image.GetSize() == labels.GetSize() == (64, 64, 48) and image.GetSpacing() == (1.5, 1.5, 2.0)
    assert image.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
    hu, lab = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels)
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    assert abs(np.median(hu[lab == 2]) - HU["lung"]) < 30
    assert abs(np.median(hu[lab == 3]) - HU["bone"]) < 120
    assert abs(np.median(hu[lab == 4]) - HU["liver"]) < 15
    assert np.median(hu[lab == 0]) < -900
    # patient's right (low x in LPS) holds the liver
    xs = np.argwhere(lab == 4)[:, 2]
    assert xs.mean() < 32


def test_field_of_view_scales_with_shape_and_spacing():
    _, small, _ = make_phantom(7, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    _, other, _ = make_phantom(7, shape=(80, 80, 40), spacing=(1.2, 1.2, 2.4))
    vol = lambda im, v: (sitk.GetArrayViewFromImage(im) == v).sum() * np.prod(im.GetSpacing())  # noqa: E731
    for v in LABELS.values():  # same anatomy in mm, whatever the grid
        assert abs(vol(small, v) - vol(other, v)) / vol(small, v) < 0.1


def test_write_sample_ct(tmp_path):
    path = write_sample_ct(tmp_path / "ct.nii.gz", shape=(96, 96, 40), labels_path=tmp_path / "truth.seg.nrrd")
    image = imaging.read_image(path)
    assert image.GetSize() == (96, 96, 40)
    mask, names = imaging.read_mask(tmp_path / "truth.seg.nrrd")
    assert names == LABELS and imaging.same_geometry(mask, image)
