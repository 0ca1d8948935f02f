"""MONAI Label's own Python client, unchanged, against the real hpcseg server.

``pip install --no-deps monailabel`` gives its client without its server's dependencies. Its Slicer plugin carries
a copy of the same client code that sends no auth header; the path-token address covers it (last test).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg import imaging

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # it imports cgi (Python <= 3.12)
    monailabel_client = pytest.importorskip("monailabel.client")

MONAILabelClient = monailabel_client.MONAILabelClient


@pytest.fixture
def ct_file(tmp_path, phantom):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom, str(path))
    return path


def _login(url: str, token: str, tmp_path) -> MONAILabelClient:
    c = MONAILabelClient(url, tmpdir=str(tmp_path), client_id="user-xyz")
    assert c.auth_enabled() is True
    c.update_auth(c.auth_token("any-user", token))
    assert c.auth_valid_token() is True
    return c


def test_monai_label_client_logs_in_lists_models_and_infers(server, tmp_path, ct_file, phantom):
    c = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    with pytest.raises(monailabel_client.client.MONAILabelClientException) as refused:
        c.info()  # no token yet
    assert refused.value.status_code == 401 or "401" in refused.value.msg
    with pytest.raises(monailabel_client.client.MONAILabelClientException):
        c.auth_token("any-user", "wrong-token")

    c = _login(server.url, server.token, tmp_path)
    info = c.info()
    assert {"thr", "grow", "fam"} <= set(info["models"])
    assert info["models"]["thr"]["type"] == "segmentation" and info["models"]["grow"]["type"] == "deepgrow"
    assert info["labels"][:2] == ["body", "bone"] and "config" not in info

    result_file, params = c.infer("thr", "ct", {}, file=str(ct_file))
    assert params["label_names"] == {"body": 1, "bone": 2} and params["model_version"] == "1.0"
    mask = sitk.ReadImage(result_file)
    assert imaging.same_geometry(mask, phantom)
    arr = sitk.GetArrayFromImage(phantom)
    assert np.array_equal(sitk.GetArrayFromImage(mask), np.where(arr > 300, 2, np.where(arr > -500, 1, 0)))


def test_monai_label_sessions_and_deepgrow(server, tmp_path, ct_file, phantom):
    c = _login(server.url, server.token, tmp_path)
    created = c.create_session(str(ct_file))
    sid = created["session_id"]
    assert created["session_info"]["expiry"] > 0
    assert c.get_session(sid)["name"] == sid
    result_file, params = c.infer("grow", "ct", {"foreground": [[30, 30, 20]], "background": [], "label": "lesion"},
                                  session_id=sid)
    assert params["label_names"] == {"lesion": 1} and params["session_id"] == sid
    assert sitk.ReadImage(result_file).GetSize() == phantom.GetSize()
    assert c.remove_session(sid)["name"] == sid
    with pytest.raises(monailabel_client.client.MONAILabelClientException):
        c.get_session(sid)


def test_slicer_plugin_style_client_without_headers_uses_the_path_token(server, tmp_path, ct_file):
    """The plugin's client never sends Authorization; ``http://host:port/token/<token>`` as the address works."""
    c = MONAILabelClient(f"{server.url}/token/{server.token}", tmpdir=str(tmp_path))
    assert "thr" in c.info()["models"]
    sid = c.create_session(str(ct_file))["session_id"]
    result_file, params = c.infer("thr", "ct", {"result_extension": ".nrrd", "result_dtype": "uint8"},
                                  session_id=sid)
    assert result_file.endswith(".nrrd") and sitk.ReadImage(result_file).GetPixelID() == sitk.sitkUInt8
    bad = MONAILabelClient(f"{server.url}/token/wrong-{server.token}", tmpdir=str(tmp_path))
    with pytest.raises(monailabel_client.client.MONAILabelClientException):
        bad.info()
