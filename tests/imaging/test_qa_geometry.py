"""Input QA warnings, geometry comparison, orientation codes and resampling."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.phantoms import make_phantom


def _img(size=(32, 32, 32), spacing=(1.0, 1.0, 1.0), fill=-1000):
    img = sitk.Image(size, sitk.sitkInt16) + fill
    img.SetSpacing(spacing)
    return img


def test_a_ct_phantom_raises_no_warning():
    image, _, _ = make_phantom(1)
    assert imaging.check_input(image, {"modality": "CT"}) == []


def test_non_ct_intensities_are_flagged():
    mri = sitk.Cast(sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1400, (32, 32, 32))), sitk.sitkInt16)
    warnings = imaging.check_input(mri, {"modality": "CT"})
    assert len(warnings) == 1 and "not CT-like" in warnings[0]
    assert imaging.check_input(mri, {}) == []  # no CT expectation, no intensity check


def test_thick_anisotropic_tiny_and_huge_inputs_are_flagged():
    thick = imaging.check_input(_img(spacing=(0.7, 0.7, 7.5)), {})
    assert any("7.5 mm" in w for w in thick) and any("anisotropic" in w for w in thick)
    assert any("tiny" in w for w in imaging.check_input(_img(size=(64, 64, 1)), {}))
    assert any("huge" in w for w in imaging.check_input(_img(size=(64, 64, 64)), {"max_voxels": 1000}))
    assert imaging.check_input(_img(spacing=(1.0, 1.0, 2.5)), {}) == []


def test_same_geometry_tolerance():
    a = _img(spacing=(0.8, 0.8, 2.0))
    b = sitk.Image(a)
    b.SetOrigin((0.0004, 0.0, 0.0))  # 0.0005 × 0.8 mm: within the stated 1e-3 × spacing
    assert imaging.same_geometry(a, b)
    b.SetOrigin((0.01, 0.0, 0.0))
    assert not imaging.same_geometry(a, b)
    assert imaging.same_geometry(a, b, tol=0.02)
    c = sitk.Image(a)
    c.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert not imaging.same_geometry(a, c)
    assert not imaging.same_geometry(a, _img(size=(32, 32, 31), spacing=(0.8, 0.8, 2.0)))


def test_orientation_codes_match_dicom_orient():
    img = _img(size=(4, 5, 6))
    for code in ("LPS", "RAS", "RAI", "PLS", "SAR"):
        assert np.allclose(imaging.orientation_direction(code), sitk.DICOMOrient(img, code).GetDirection())
    with pytest.raises(ValueError):
        imaging.orientation_direction("LRS")


def test_resample_covers_the_same_field_of_view():
    image, labels, _ = make_phantom(2, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    coarse = imaging.resample(image, (3.0, 3.0, 4.0))
    assert coarse.GetSize() == (32, 32, 24)
    fov = lambda im: np.array(im.GetSize()) * np.array(im.GetSpacing())  # noqa: E731
    assert np.allclose(fov(coarse), fov(image))
    # centres of the fields of view coincide
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()]))  # noqa: E731
    assert np.allclose(centre(coarse), centre(image))
    assert imaging.resample(image, image.GetSpacing()) is image


def test_labels_survive_a_round_trip_through_another_grid_and_orientation():
    _, labels, _ = make_phantom(3, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    ras = imaging.resample(labels, (1.5, 1.5, 2.0), "nearest", direction=imaging.orientation_direction("RAS"))
    assert ras.GetSize() == labels.GetSize()
    back = imaging.resample_to_reference(ras, labels)
    assert imaging.same_geometry(back, labels)
    # a pure axis flip on the same grid is lossless
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))
    finer = imaging.resample_to_reference(imaging.resample(labels, (1.0, 1.0, 1.0), "nearest"), labels)
    same = (sitk.GetArrayViewFromImage(finer) == sitk.GetArrayViewFromImage(labels)).mean()
    assert same > 0.97
