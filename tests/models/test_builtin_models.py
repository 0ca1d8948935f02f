"""The models shipped in hpcseg/models/ on phantoms they never saw (seeds ≥ 5000; training used < 2100)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.phantoms import LABELS, make_phantom, write_sample_ct
from hpcseg.server.models import MANIFEST_NAME, ModelManifest, builtin_models_dir, load_model

BUILTIN = builtin_models_dir()
# (seed, shape, spacing): torsos that fill small fields of view (ct-body has no scale to learn)
CASES = [(5001, (64, 64, 48), (1.5, 1.5, 2.0)), (5002, (80, 80, 40), (1.2, 1.2, 2.4)),
         (5003, (56, 56, 60), (1.7142857, 1.7142857, 1.6))]
# (seed, shape, spacing, torso width mm): adult torsos as phantom-unet must meet them, 64-320 voxels across at
# 1-2.5 mm; fields of view from 160 mm (the torso cut at the image's edge) to 400 mm (air around it)
REALISTIC = [(5011, (64, 64, 48), (2.5, 2.5, 2.5), 320.0), (5012, (128, 128, 64), (2.5, 2.5, 2.5), 300.0),
             (5013, (200, 200, 80), (2.0, 2.0, 2.5), 400.0), (5014, (320, 320, 96), (1.0, 1.0, 2.5), 300.0),
             (5015, (256, 256, 100), (1.5, 1.5, 2.0), 440.0), (5016, (128, 128, 64), (1.5, 1.5, 2.5), 330.0),
             (5017, (200, 200, 80), (1.0, 1.0, 2.5), 360.0), (5018, (320, 320, 80), (1.5, 1.5, 2.5), 400.0)]


def _dice(a, b):
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def phantom_unet():
    return load_model(BUILTIN / "phantom-unet", device="auto")


def test_every_builtin_folder_has_a_valid_manifest():
    names = sorted(p.parent.name for p in BUILTIN.glob(f"*/{MANIFEST_NAME}"))
    assert names == ["ct-body", "deepgrow-regiongrow", "dextr3d-geodesic", "phantom-unet"]
    for name in names:
        m = ModelManifest.load(BUILTIN / name)
        assert m.name == name and m.description and m.version
    weights = BUILTIN / "phantom-unet" / "model.pt"
    assert weights.stat().st_size < 5 * 2**20


# Issue 15: Dice >= 0.9 for every label, the liver (60 HU in 40 HU muscle) included: 2.0.0 reached only 0.60 on
# the sample CT and 0.72-0.88 on the others; 2.1.0 (trained with batch norm as it is served) reaches it.
FLOOR = {"body": 0.9, "lungs": 0.9, "bone": 0.9, "liver": 0.9}


def _assert_every_label(mask, truth, names, what):
    pred, ref = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)
    dice = {name: _dice(pred == v, ref == v) for name, v in names.items() if (ref == v).any() or (pred == v).any()}
    print(what, {k: round(v, 4) for k, v in dice.items()})
    assert set(dice) == set(names), (what, "every label is in these views")
    assert all(dice[k] >= FLOOR[k] for k in dice), (what, dice)


@pytest.mark.parametrize("seed,shape,spacing,body_mm", REALISTIC)
def test_phantom_unet_dice_on_held_out_adult_size_phantoms(phantom_unet, seed, shape, spacing, body_mm):
    image, truth, names = make_phantom(seed, shape, spacing, body_mm=body_mm)
    mask = phantom_unet.infer(image, {})
    assert imaging.same_geometry(mask, image) and mask.GetPixelID() == sitk.sitkUInt8
    _assert_every_label(mask, truth, names, f"{shape} at {spacing} mm, torso {body_mm:.0f} mm")


def test_phantom_unet_segments_the_sample_ct(phantom_unet, tmp_path):
    """`hpcseg sample-ct`'s image (256×256×120 at 1.5×1.5×2.5 mm, a torso 296 mm wide), read back from disk."""
    path = write_sample_ct(tmp_path / "sample.nii.gz", labels_path=tmp_path / "truth.nii.gz")
    image, truth = imaging.read_image(path), imaging.read_image(tmp_path / "truth.nii.gz")
    _assert_every_label(phantom_unet.infer(image, {}), truth, LABELS, "sample CT")


def test_phantom_unet_label_subset_and_fast_mode(phantom_unet):
    image, truth, _ = make_phantom(5004, (128, 128, 64), (2.5, 2.5, 2.5), body_mm=330.0)
    only = sitk.GetArrayFromImage(phantom_unet.infer(image, {"label_names": ["liver"]}))
    assert set(np.unique(only)) == {0, 4}
    fast = sitk.GetArrayFromImage(phantom_unet.infer(image, {"fast": True}))  # no overlap, same grid
    assert _dice(fast == 2, sitk.GetArrayFromImage(truth) == 2) > 0.9


@pytest.mark.parametrize("seed,shape,spacing", CASES + [(5005, (128, 128, 60), (0.9, 0.9, 2.5))])
def test_ct_body_dice_on_phantoms(seed, shape, spacing):
    model = load_model(BUILTIN / "ct-body")
    image, truth, _ = make_phantom(seed, shape, spacing)
    pred, ref = sitk.GetArrayFromImage(model.infer(image, {})), sitk.GetArrayFromImage(truth)
    # ct-body's body is everything inside the skin that is neither lung nor bone: the phantom's body + liver
    assert _dice(pred == 1, (ref == LABELS["body"]) | (ref == LABELS["liver"])) >= 0.9
    assert _dice(pred == 2, ref == LABELS["lungs"]) >= 0.9
    assert _dice(pred == 3, ref == LABELS["bone"]) >= 0.9


def test_ct_body_follows_the_axial_axis_of_a_reoriented_ct():
    image, truth, _ = make_phantom(5006)
    # the same patient stored sagittally: axes permuted, the direction matrix says so
    perm = imaging.resample(image, None, "nearest", direction=imaging.orientation_direction("SLP"))
    perm_truth = imaging.resample(truth, None, "nearest", direction=imaging.orientation_direction("SLP"))
    pred = sitk.GetArrayFromImage(load_model(BUILTIN / "ct-body").infer(perm, {}))
    ref = sitk.GetArrayFromImage(perm_truth)
    assert _dice(pred == 2, ref == LABELS["lungs"]) >= 0.9


def test_ct_body_warns_about_non_ct_input(caplog):
    mri = sitk.Cast(sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 900, (24, 24, 24))), sitk.sitkInt16)
    model = load_model(BUILTIN / "ct-body")
    with caplog.at_level("WARNING", logger="hpcseg.server.models"):
        model.infer(mri, {})
    assert "not CT-like" in caplog.text
    assert model.check_input(mri) and model.expect == {"modality": "CT"}
