"""The models shipped in hpcseg/models/ on phantoms they never saw (seeds ≥ 5000; training used < 1100)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.phantoms import LABELS, make_phantom
from hpcseg.server.models import MANIFEST_NAME, ModelManifest, builtin_models_dir, load_model

BUILTIN = builtin_models_dir()
# (seed, shape, spacing): the model's own grid, then grids of the same field of view that must be resampled
CASES = [(5001, (64, 64, 48), (1.5, 1.5, 2.0)), (5002, (80, 80, 40), (1.2, 1.2, 2.4)),
         (5003, (56, 56, 60), (1.7142857, 1.7142857, 1.6))]


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


@pytest.mark.parametrize("seed,shape,spacing", CASES)
def test_phantom_unet_dice_on_held_out_phantoms(phantom_unet, seed, shape, spacing):
    image, truth, names = make_phantom(seed, shape, spacing)
    mask = phantom_unet.infer(image, {})
    assert imaging.same_geometry(mask, image) and mask.GetPixelID() == sitk.sitkUInt8
    pred, ref = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)
    for name, value in names.items():
        assert _dice(pred == value, ref == value) >= 0.9, (name, _dice(pred == value, ref == value))


def test_phantom_unet_label_subset_and_fast_mode(phantom_unet):
    image, truth, _ = make_phantom(5004)
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
