"""The built-in models of hpcseg/models/ served by the real server, on a phantom CT whose truth is known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.phantoms import LABELS, make_phantom
from hpcseg.server.models import MANIFEST_NAME, builtin_models_dir

from .conftest import start_server

BUILTIN = builtin_models_dir()
#: the models hpcseg ships (hpcseg/models/README.md). A fixed list, not a glob: a packaging regression that drops
#: a folder must fail these tests, not skip them (issue 13, point 16).
NAMES = ["ct-body", "deepgrow-regiongrow", "dextr3d-geodesic", "phantom-unet"]


def test_every_builtin_model_ships():
    found = sorted(p.parent.name for p in BUILTIN.glob(f"*/{MANIFEST_NAME}")) if BUILTIN.is_dir() else []
    assert found == NAMES, f"built-in model folders in {BUILTIN}: {found}, expected {NAMES}"
    assert (BUILTIN / "phantom-unet" / "model.pt").stat().st_size > 1000  # the weights, not an LFS pointer


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("builtin"), BUILTIN, timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def case():
    image, labels, names = make_phantom(5, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))
    return image, sitk.GetArrayFromImage(labels), names


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def _liver_points(truth: np.ndarray) -> tuple[list[int], list[list[int]]]:
    zyx = np.argwhere(truth == LABELS["liver"])
    centre = np.round(zyx.mean(0)).astype(int)[::-1].tolist()
    extremes = [zyx[f(zyx[:, ax])][::-1].tolist() for ax in range(3) for f in (np.argmin, np.argmax)]
    return centre, extremes


def test_every_builtin_model_loads(builtin_server):
    with builtin_server.client() as c:
        info = c.info()
    assert info["failed"] == {}
    assert sorted(info["models"]) == NAMES
    for name in NAMES:
        assert info["models"][name]["version"] and info["models"][name]["description"]


def test_ct_body_segments_the_phantom_in_its_geometry(builtin_server, case):
    image, truth, names = case
    with builtin_server.client() as c:
        mask, label_names, version = c.segment(image, "ct-body")
    assert imaging.same_geometry(mask, image) and version
    arr = sitk.GetArrayFromImage(mask)
    for name in ("lungs", "bone"):
        assert _dice(arr == label_names[name], truth == names[name]) > 0.8, name


def test_deepgrow_click_on_a_session(builtin_server, case):
    image, truth, _ = case
    centre, _ = _liver_points(truth)
    with builtin_server.client() as c:
        sid = c.create_session(image)
        upload = c.get_session(sid)["upload_bytes"]
        res = c.click(sid, "deepgrow-regiongrow", foreground=[centre])
        c.delete_session(sid)
    arr = sitk.GetArrayFromImage(res.mask)
    x, y, z = centre
    assert arr[z, y, x] == 1 and imaging.same_geometry(res.mask, image)
    assert res.request_bytes < 0.01 * upload


def test_dextr3d_from_extreme_points(builtin_server, case):
    image, truth, _ = case
    _, extremes = _liver_points(truth)
    with builtin_server.client() as c:
        sid = c.create_session(image)
        res = c.extreme_points(sid, "dextr3d-geodesic", extremes)
    assert _dice(sitk.GetArrayFromImage(res.mask) == 1, truth == LABELS["liver"]) > 0.6


def test_phantom_unet_finds_the_liver(builtin_server):
    image, labels, names = make_phantom(5, shape=(112, 112, 48), spacing=(3.0, 3.0, 3.5), body_mm=340.0)
    truth = sitk.GetArrayFromImage(labels)  # an adult-size torso: phantom-unet works at physical scale
    with builtin_server.client() as c:
        mask, label_names, _ = c.segment(image, "phantom-unet")
    assert "liver" in label_names and imaging.same_geometry(mask, image)
    assert _dice(sitk.GetArrayFromImage(mask) == label_names["liver"], truth == names["liver"]) > 0.5


def test_monai_label_client_drives_a_builtin_deepgrow(builtin_server, case, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mlc = pytest.importorskip("monailabel.client")
    image, truth, _ = case
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    c = mlc.MONAILabelClient(builtin_server.url, tmpdir=str(tmp_path))
    c.update_auth(c.auth_token("radiologist", builtin_server.token))
    assert c.info()["models"]["deepgrow-regiongrow"]["type"] == "deepgrow"
    sid = c.create_session(str(path))["session_id"]
    centre, _ = _liver_points(truth)
    result, params = c.infer("deepgrow-regiongrow", "ct", {"foreground": [centre], "background": [],
                                                            "label": "liver"}, session_id=sid)
    assert params["label_names"] == {"liver": 1}
    x, y, z = centre
    assert sitk.GetArrayFromImage(sitk.ReadImage(result))[z, y, x] == 1
