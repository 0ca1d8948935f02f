"""Wire codecs: exact voxels both ways, geometry kept, malformed payloads refused."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.errors import ImageError

PIXELS = [np.int16, np.uint8, np.uint16, np.int32, np.float32, np.float64]


def _image(dtype, size=(23, 17, 9)):
    rng = np.random.default_rng(3)
    arr = (rng.normal(0, 500, size[::-1])).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.6640625, 0.6640625, 3.0000001))
    img.SetOrigin((-170.16796875, -330.5, 1234.56789))
    img.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    return img, arr


@pytest.mark.parametrize("dtype", PIXELS)
def test_zstd_round_trip_is_exact(dtype):
    img, arr = _image(dtype)
    back = imaging.decode(imaging.encode(img, imaging.CONTENT_TYPE_ZSTD), imaging.CONTENT_TYPE_ZSTD)
    assert back.GetPixelID() == img.GetPixelID()
    assert np.array_equal(sitk.GetArrayViewFromImage(back), arr)
    # full precision geometry (JSON floats), not NIfTI's float32
    assert back.GetSpacing() == img.GetSpacing() and back.GetOrigin() == img.GetOrigin()
    assert back.GetDirection() == img.GetDirection()


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_nifti_round_trip_keeps_voxels(dtype):
    img, arr = _image(dtype)
    payload = imaging.encode(img, imaging.CONTENT_TYPE_NIFTI)
    assert payload[:2] == b"\x1f\x8b"  # a plain .nii.gz any tool reads
    back = imaging.decode(payload, imaging.CONTENT_TYPE_NIFTI)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), arr)
    assert imaging.same_geometry(back, img)


def test_vector_images_round_trip():
    arr = np.arange(4 * 5 * 6 * 3, dtype=np.int16).reshape(4, 5, 6, 3)
    img = sitk.GetImageFromArray(arr, isVector=True)
    back = imaging.decode(imaging.encode(img))
    assert back.GetNumberOfComponentsPerPixel() == 3
    assert np.array_equal(sitk.GetArrayViewFromImage(back), arr)


def test_shuffled_zstd_compresses_ct_better_than_nifti():
    from hpcseg.phantoms import make_phantom

    image, _, _ = make_phantom(0, shape=(64, 64, 48))
    raw = 64 * 64 * 48 * 2
    z, n = imaging.encode(image), imaging.encode(image, imaging.CONTENT_TYPE_NIFTI)
    assert raw / len(z) > 1.5 and len(z) < len(n)


def test_malformed_payloads_are_image_errors():
    img, _ = _image(np.int16)
    good = imaging.encode(img)
    for bad in (b"", b"XXXX" + good[4:], good[:20], good[:-10]):
        with pytest.raises(ImageError):
            imaging.decode(bad)
    with pytest.raises(ImageError, match="content type"):
        imaging.encode(img, "image/png")
