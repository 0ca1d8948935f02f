"""Interactive classical models: point guarantees on random clicks, and sensible objects on phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from hpcseg import imaging
from hpcseg.errors import ServerError
from hpcseg.phantoms import LABELS, make_phantom
from hpcseg.server.models import builtin_models_dir, load_model

SIZE = (40, 40, 30)
IMAGE, TRUTH, _ = make_phantom(21, shape=SIZE, spacing=(2.4, 2.4, 3.2))
TRUTH_ARR = sitk.GetArrayFromImage(TRUTH)


@pytest.fixture(scope="module")
def deepgrow():
    return load_model(builtin_models_dir() / "deepgrow-regiongrow")


@pytest.fixture(scope="module")
def dextr():
    return load_model(builtin_models_dir() / "dextr3d-geodesic")


point = st.tuples(*(st.integers(0, n - 1) for n in SIZE)).map(list)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fg=st.lists(point, min_size=1, max_size=4, unique_by=tuple), bg=st.lists(point, max_size=4, unique_by=tuple))
def test_deepgrow_keeps_every_foreground_and_no_background_click(deepgrow, fg, bg):
    bg = [p for p in bg if p not in fg]
    mask = deepgrow.infer(IMAGE, {"foreground": fg, "background": bg})
    arr = sitk.GetArrayFromImage(mask)
    assert imaging.same_geometry(mask, IMAGE) and mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(arr)) <= {0, 1}
    assert all(arr[z, y, x] == 1 for x, y, z in fg)
    assert all(arr[z, y, x] == 0 for x, y, z in bg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points=st.lists(point, min_size=1, max_size=6, unique_by=tuple))
def test_dextr_mask_holds_every_extreme_point(dextr, points):
    arr = sitk.GetArrayFromImage(dextr.infer(IMAGE, {"points": points}))
    assert all(arr[z, y, x] == 1 for x, y, z in points)
    # and the points are joined to one object: every point's component holds the mask's largest part
    lab, n = ndimage.label(arr)
    assert len({lab[z, y, x] for x, y, z in points}) == 1


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _extremes(comp):
    zyx = np.argwhere(comp)
    return [zyx[f(zyx[:, ax])][::-1].tolist() for ax in range(3) for f in (np.argmin, np.argmax)]


@pytest.mark.parametrize("seed", [30, 31, 32])
def test_interactive_models_find_a_lung(deepgrow, dextr, seed):
    image, truth, _ = make_phantom(seed)
    lab, _ = ndimage.label(sitk.GetArrayFromImage(truth) == LABELS["lungs"])
    lung = lab == 1
    inner = np.argwhere(ndimage.binary_erosion(lung, iterations=3))
    clicks = inner[np.random.default_rng(seed).choice(len(inner), 2)][:, ::-1].tolist()
    grown = sitk.GetArrayFromImage(deepgrow.infer(image, {"foreground": clicks})) == 1
    assert _dice(grown, lung) > 0.9
    boxed = sitk.GetArrayFromImage(dextr.infer(image, {"points": _extremes(lung)})) == 1
    assert _dice(boxed, lung) > 0.9


def test_dextr_finds_the_liver_from_its_extreme_points(dextr):
    image, truth, _ = make_phantom(33)
    liver = sitk.GetArrayFromImage(truth) == LABELS["liver"]
    boxed = sitk.GetArrayFromImage(dextr.infer(image, {"points": _extremes(liver)})) == 1
    assert _dice(boxed, liver) > 0.8


@pytest.mark.parametrize("params,match", [
    ({}, "at least one point"), ({"foreground": [[1, 2]]}, "list of \\[x, y, z\\]"),
    ({"foreground": [[1, 2, 99]]}, "outside the image"),
    ({"foreground": [[1, 2, 3]], "background": [[1, 2, 3]]}, "both foreground and background"),
])
def test_bad_points_are_refused_with_400(deepgrow, params, match):
    with pytest.raises(ServerError, match=match) as exc:
        deepgrow.infer(IMAGE, params)
    assert exc.value.status == 400


def test_warmup_and_info(deepgrow, dextr):
    deepgrow.warmup()
    dextr.warmup()
    assert deepgrow.info()["type"] == "deepgrow" and dextr.info()["type"] == "dextr3d"
    assert dextr.info()["labels"] == {"object": 1}
