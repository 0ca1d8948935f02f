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


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 5.0), (2.0, 2.0, 5.0), (np.float32(0.7), 0.7, np.float32(5.0))])
def test_five_mm_slices_are_thick(spacing):
    """Issue 13, point 8: 5 mm, the commonest thick reconstruction, gets the thick-slice warning itself (not only
    the anisotropy one; at 2 x 2 x 5 mm there is no anisotropy warning at all)."""
    warnings = imaging.check_input(_img(spacing=tuple(float(s) for s in spacing)), {})
    assert any("5 mm along one axis" in w and "thin structures" in w for w in warnings), warnings
    assert not any("mm along one axis" in w for w in imaging.check_input(_img(spacing=(1.0, 1.0, 4.0)), {}))


def test_an_mr_model_given_a_ct_is_warned_about():
    """Issue 13, point 1: the model's declared modality is checked both ways (MR model on a CT too)."""
    ct, _, _ = make_phantom(1)
    warnings = imaging.check_input(ct, {"modality": "MRI"})
    assert len(warnings) == 1 and "CT-like" in warnings[0] and "expects MR" in warnings[0]
    mri = sitk.Cast(sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1400, (32, 32, 32))), sitk.sitkInt16)
    assert imaging.check_input(mri, {"modality": "MR"}) == []


def test_default_model_choice_and_its_reason():
    """Issue 13, point 1: user models come first in /info/, so "the first segmentation model" is no default."""
    from hpcseg.errors import ConfigError
    from hpcseg.modelchoice import choose_model

    ct, _, _ = make_phantom(1)
    mri = sitk.Cast(sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1400, (32, 32, 32))), sitk.sitkInt16)
    served = {"brain-mri": {"type": "segmentation", "modality": "MR"}, "clicks": {"type": "deepgrow"},
              "ct-body": {"type": "segmentation", "modality": "CT"}, "phantom-unet": {"type": "segmentation"}}
    assert choose_model(served, ct).name == "ct-body" and "CT-like" in choose_model(served, ct).reason
    assert choose_model(served, mri).name == "brain-mri" and "modality MR" in choose_model(served, mri).reason
    assert choose_model(served, ct, "phantom-unet").name == "phantom-unet"
    no_mr = {k: v for k, v in served.items() if k != "brain-mri"}
    assert choose_model(no_mr, mri).name == "ct-body" and "none declares modality MR" in choose_model(no_mr, mri).reason
    with pytest.raises(ConfigError, match="does not serve"):
        choose_model(served, ct, "gone")
