"""Inference through the app in-process (fastapi's TestClient): formats, geometry, errors."""

from __future__ import annotations

import email
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient

from hpcseg import imaging
from hpcseg.server import ServerSettings, create_app, wire

from .conftest import TOKEN, standard_models, write_model

H = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    models = standard_models(tmp_path_factory.mktemp("infer") / "models")
    write_model(models, "shrinker", "tinymodels:Shrinker")
    app = create_app(ServerSettings(models_dirs=[models], token=TOKEN, device="cpu", max_sessions=2))
    with TestClient(app) as c:
        app.state.runtime.registry.wait(30)
        yield c


def _expected(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    return np.where(arr > 300, 2, np.where(arr > -500, 1, 0)).astype(np.uint8)


def _parse_multipart(resp) -> tuple[dict, bytes, str]:
    msg = email.message_from_bytes(b"Content-Type: " + resp.headers["content-type"].encode() + b"\r\n\r\n" +
                                   resp.content)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
    image = parts["image"]
    return json.loads(parts["params"].get_payload(decode=True)), image.get_payload(decode=True), image.get_filename()


def test_monai_label_default_answer_is_multipart_with_a_nifti_mask(http, phantom):
    data = imaging.encode(phantom, imaging.CONTENT_TYPE_NIFTI)
    r = http.post("/infer/thr?image=ct", headers=H, files={"file": ("ct.nii.gz", data, "application/gzip")},
                  data={"params": json.dumps({"client_id": "user-xyz"})})
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
    assert r.headers["x-hpcseg-model-version"] == "1.0"
    params, mask_bytes, filename = _parse_multipart(r)
    assert filename.startswith("thr-") and filename.endswith(".nii.gz")
    assert params["label_names"] == {"body": 1, "bone": 2} and params["model_version"] == "1.0"
    mask = imaging.decode(mask_bytes, imaging.CONTENT_TYPE_NIFTI)
    assert imaging.same_geometry(mask, phantom)
    assert np.array_equal(sitk.GetArrayFromImage(mask), _expected(phantom))


def test_zstd_both_ways_keeps_exact_geometry(http, phantom):
    data = imaging.encode(phantom, imaging.CONTENT_TYPE_ZSTD)
    r = http.post("/infer/thr?output=image", files={"file": ("x.bin", data, imaging.CONTENT_TYPE_ZSTD)},
                  data={"params": "{}"}, headers={**H, "Accept": imaging.CONTENT_TYPE_ZSTD})
    assert r.status_code == 200 and r.headers["content-type"] == imaging.CONTENT_TYPE_ZSTD
    mask = imaging.decode(r.content, imaging.CONTENT_TYPE_ZSTD)
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, get)() == getattr(phantom, get)(), get  # exact, not within a tolerance
    result = json.loads(r.headers["x-hpcseg-result"])
    assert result["model"] == "thr" and result["request_bytes"] == int(r.headers["x-hpcseg-request-bytes"])


def test_slicer_plugin_gets_the_nrrd_it_asks_for(http, phantom):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "in.nrrd"
        sitk.WriteImage(phantom, str(p))
        r = http.post("/infer/thr", headers=H, files={"file": ("vol.nrrd", p.read_bytes(), "application/octet-stream")},
                      data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})})
        params, mask_bytes, filename = _parse_multipart(r)
        assert filename.endswith(".nrrd")
        out = Path(tmp) / filename
        out.write_bytes(mask_bytes)
        mask = sitk.ReadImage(str(out))
    assert mask.GetPixelID() == sitk.sitkUInt8 and imaging.same_geometry(mask, phantom)


def test_json_output_label_subset_and_bad_requests(http, phantom):
    data = imaging.encode(phantom, imaging.CONTENT_TYPE_ZSTD)
    f = {"file": ("a.hsv", data, imaging.CONTENT_TYPE_ZSTD)}
    r = http.post("/infer/thr?output=json", headers=H, files=f, data={"params": json.dumps({"label_names": ["bone"]})})
    assert r.json()["label_names"] == {"bone": 2}
    r = http.post("/infer/thr", headers=H, files=f, data={"params": json.dumps({"label_names": ["spleen"]})})
    assert r.status_code == 400 and "spleen" in r.json()["detail"]
    assert http.post("/infer/thr", headers=H, files=f, data={"params": "{oops"}).status_code == 400
    r = http.post("/infer/thr?image=ct", headers=H, data={"params": "{}"})
    assert r.status_code == 400 and "no datastore" in r.json()["detail"]
    assert http.post("/infer/thr?output=dicom_seg", headers=H, files=f).status_code == 400
    r = http.post("/infer/nope", headers=H, files=f)
    assert r.status_code == 404 and "available" in r.json()["detail"]
    r = http.post("/infer/broken", headers=H, files=f)
    assert r.status_code == 503 and "corrupt" in r.json()["detail"]
    bad = {"file": ("a.nii.gz", b"\x1f\x8b not really gzip", "application/gzip")}
    r = http.post("/infer/thr", headers=H, files=bad)
    assert r.status_code == 400 and "cannot read" in r.json()["detail"]
    r = http.post("/infer/grow", headers=H, files=f, data={"params": "{}"})
    assert r.status_code == 400 and "foreground" in r.json()["detail"]


def test_a_mask_off_the_input_grid_is_refused(http, phantom):
    f = {"file": ("a.hsv", imaging.encode(phantom, imaging.CONTENT_TYPE_ZSTD), imaging.CONTENT_TYPE_ZSTD)}
    r = http.post("/infer/shrinker", headers=H, files=f)
    assert r.status_code == 500 and "size (4, 4, 4)" in r.json()["detail"]


def test_session_routes_status_codes(http, phantom):
    f = {"files": ("a.hsv", imaging.encode(phantom, imaging.CONTENT_TYPE_ZSTD), imaging.CONTENT_TYPE_ZSTD)}
    ids = [http.put("/session/", headers=H, files=f).json()["session_id"] for _ in range(3)]
    assert http.get(f"/session/{ids[0]}", headers=H).status_code == 410  # evicted (max_sessions=2)
    assert "evicted" in http.get(f"/session/{ids[0]}", headers=H).json()["detail"]
    r = http.get(f"/session/{ids[2]}?image=true", headers=H)
    assert imaging.same_geometry(imaging.decode(r.content, imaging.CONTENT_TYPE_NIFTI), phantom)
    r = http.post(f"/infer/grow?session_id={ids[2]}&output=json", headers=H,
                  data={"params": json.dumps({"foreground": [[30, 30, 20]], "label": "tumour"})})
    assert r.json()["label_names"] == {"tumour": 1} and r.json()["session_id"] == ids[2]
    assert http.delete(f"/session/{ids[2]}", headers=H).status_code == 200
    assert http.delete(f"/session/{ids[2]}", headers=H).status_code == 404
    assert http.post(f"/infer/grow?session_id={ids[2]}", headers=H, data={"params": "{}"}).status_code == 404
    assert http.get("/session/never", headers=H).status_code == 404


def test_reload_route_and_health(http):
    assert http.get("/health/ready", headers=H).json()["ready"] is True
    r = http.post("/reload", headers=H)
    assert r.status_code == 200 and "thr" in r.json()["models"]
    assert http.post("/models/reload?wait=false", headers=H).status_code == 202


def test_one_inference_at_a_time_and_503_when_shutting_down(http, phantom):
    import tinymodels

    f = {"file": ("a.hsv", imaging.encode(phantom, imaging.CONTENT_TYPE_ZSTD), imaging.CONTENT_TYPE_ZSTD)}
    tinymodels.Threshold.peak = 0
    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: http.post("/infer/thr?output=json", headers=H, files=f,
                                                  data={"params": '{"sleep": 0.3}'}).status_code, range(3)))
    assert codes == [200, 200, 200] and tinymodels.Threshold.peak == 1  # workers=1: one GPU, one at a time
    rt = http.app.state.runtime
    rt.shutting_down.set()
    try:
        r = http.post("/infer/thr", headers=H, files=f)
        assert r.status_code == 503 and "shutting down" in r.json()["detail"]
        assert r.headers["connection"] == "close"
    finally:
        rt.shutting_down.clear()


def test_progress_of_a_running_inference_is_readable_and_a_check_can_abort_it(http, phantom):
    import threading
    import time

    f = {"file": ("a.hsv", imaging.encode(phantom, imaging.CONTENT_TYPE_ZSTD), imaging.CONTENT_TYPE_ZSTD)}
    rid = "req-" + "1" * 20
    answers = []
    t = threading.Thread(target=lambda: answers.append(http.post(
        "/infer/thr?output=json", headers={**H, "X-HPCSeg-Request-Id": rid}, files=f,
        data={"params": '{"sleep": 1.0}'})))
    t.start()
    seen = []
    while t.is_alive():
        r = http.get(f"/progress/{rid}", headers=H)
        if r.status_code == 200:
            seen.append(r.json())
        time.sleep(0.05)
    t.join()
    assert answers[0].status_code == 200
    running = [s for s in seen if s["state"] == "running" and 0 < s["done"] < s["total"]]
    assert running and running[0]["total"] == 20 and running[0]["model"] == "thr"
    last = http.get(f"/progress/{rid}", headers=H).json()
    assert last["state"] == "done" and last["done"] == last["total"] == 20
    assert http.get("/progress/nobody", headers=H).status_code == 404
    assert http.get(f"/progress/{rid}").status_code == 401  # the token guards it like every route

    # a check added to the entry runs at every boundary and may raise: the inference stops there
    rid2 = "req-" + "2" * 20
    rt = http.app.state.runtime
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("client went away (test)")

    def add_check() -> None:
        while rt.progress.get(rid2) is None:
            time.sleep(0.01)
        rt.progress.get(rid2).add_check(check)

    adder = threading.Thread(target=add_check)
    adder.start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="client went away"):
        http.post("/infer/thr?output=json", headers={**H, "X-HPCSeg-Request-Id": rid2}, files=f,
                  data={"params": '{"sleep": 30}'})
    adder.join()
    assert time.monotonic() - t0 < 20 and len(calls) == 2  # aborted long before its 30 s (600 steps)
    assert rt.progress.get(rid2).to_json()["state"] == "failed"


def test_wire_helpers():
    assert wire.negotiate(f"{imaging.CONTENT_TYPE_ZSTD}, */*") == imaging.CONTENT_TYPE_ZSTD
    assert wire.negotiate("", ".nrrd") == ".nrrd"
    assert wire.negotiate("*/*", ".exe") == imaging.CONTENT_TYPE_NIFTI
    img = sitk.Image([5, 6, 7], sitk.sitkFloat32)
    img.SetSpacing((2, 2, 2))
    m = wire.conform_mask(sitk.Image([5, 6, 7], sitk.sitkFloat32), img, "m")
    assert m.GetPixelID() == sitk.sitkUInt8 and m.GetSpacing() == (2, 2, 2)
    with pytest.raises(wire.ModelOutputError):
        wire.conform_mask("nope", img, "m")
    assert wire.result_filename("a b/../c", ".nii.gz").startswith("c-")
    assert wire.header_safe("lèvre") == "l%C3%A8vre"
