"""Sessions (TTL, LRU, 404 vs 410) and the model registry (discovery, failures, reload) without HTTP."""

from __future__ import annotations

import json
import time

import pytest
import SimpleITK as sitk

from hpcseg.server.registry import ModelRegistry, discover
from hpcseg.server.sessions import SessionGone, SessionNotFound, SessionStore, image_nbytes

from .conftest import write_model


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _img() -> sitk.Image:
    return sitk.Image([8, 8, 4], sitk.sitkInt16)


def test_session_ttl_is_sliding_and_expired_ids_say_gone():
    clock = Clock()
    store = SessionStore(ttl=60, max_sessions=4, clock=clock)
    s = store.add(_img(), upload_bytes=100, name="ct.nii.gz")
    assert s.image_bytes == image_nbytes(_img()) == 8 * 8 * 4 * 2
    clock.now += 50
    store.get(s.id)  # use extends the life
    clock.now += 50
    assert store.get(s.id).id == s.id
    clock.now += 61
    with pytest.raises(SessionGone) as gone:
        store.get(s.id)
    assert "expired" in gone.value.reason
    with pytest.raises(SessionNotFound):
        store.get("never-existed")


def test_least_recently_used_session_is_evicted():
    store = SessionStore(ttl=60, max_sessions=2, clock=Clock())
    a = store.add(_img(), upload_bytes=1)
    b = store.add(_img(), upload_bytes=1)
    store.get(a.id)  # b is now the least recently used
    c = store.add(_img(), upload_bytes=1)
    assert len(store) == 2
    with pytest.raises(SessionGone) as gone:
        store.get(b.id)
    assert "evicted" in gone.value.reason
    assert store.get(a.id) and store.get(c.id)


def test_deleted_session_is_not_found_and_counters_add_up():
    store = SessionStore(ttl=60, max_sessions=2, clock=Clock())
    s = store.add(_img(), upload_bytes=1000)
    s.count_request(40)
    j = store.get(s.id).to_json()
    assert (j["bytes_received"], j["requests"], j["last_request_bytes"], j["upload_bytes"]) == (1040, 2, 40, 1000)
    assert j["size"] == [8, 8, 4] and j["expiry"] == 60
    store.remove(s.id)
    with pytest.raises(SessionNotFound):
        store.get(s.id)
    with pytest.raises(SessionNotFound):
        store.remove(s.id)


def test_discover_plain_versioned_bundle_and_broken_folders(tmp_path):
    a, b = tmp_path / "site", tmp_path / "user"
    write_model(a, "plain")
    write_model(a / "family", "v1")
    write_model(a / "family", "v2", version="2.0")
    (a / "family" / "current").symlink_to("v2")
    write_model(a / "noline", "v1")  # versions but no current link
    (a / "dangling").mkdir()
    (a / "dangling" / "current").symlink_to("gone")
    (a / "bundle" / "configs").mkdir(parents=True)
    (a / "bundle" / "configs" / "metadata.json").write_text("{}")
    (a / "notes").mkdir()  # not a model: ignored
    (a / ".hidden").mkdir()
    write_model(b, "plain", version="9.9")  # shadowed by the first directory
    write_model(b, "extra")
    found = {c.name: c for c in discover([a, b, tmp_path / "missing"])}
    assert set(found) == {"plain", "family", "noline", "dangling", "bundle", "extra"}
    assert found["plain"].folder == a / "plain"
    assert found["family"].folder == (a / "family" / "v2").resolve()
    assert "no `current` link" in found["noline"].problem
    assert "does not exist" in found["dangling"].problem
    assert found["bundle"].problem is None


def test_registry_serves_the_good_reports_the_bad_and_reloads(tmp_path):
    root = tmp_path / "models"
    write_model(root / "fam", "v1")
    (root / "fam" / "current").symlink_to("v1")
    write_model(root, "bad", extra={"fail_load": True})
    reg = ModelRegistry([root], device="cpu")
    reg.start()
    assert reg.wait(30)
    assert reg.ready() and reg.state() == "ready"
    assert reg.get("fam")[1] == "1.0"
    assert reg.entry("bad").state == "failed" and "corrupt" in reg.entry("bad").error
    assert reg.get("bad") is None

    # a fine-tuned version appears: move the link, reload
    write_model(root / "fam", "v2", version="2.0")
    (root / "fam" / "current").unlink()
    (root / "fam" / "current").symlink_to("v2")
    reg.reload()
    assert reg.get("fam")[1] == "2.0"

    # a broken new version: the old one keeps serving, the reason is kept
    write_model(root / "fam", "v3", version="3.0", extra={"fail_load": True})
    (root / "fam" / "current").unlink()
    (root / "fam" / "current").symlink_to("v3")
    reg.reload()
    assert reg.get("fam")[1] == "2.0"
    assert "still serving version 2.0" in reg.entry("fam").error

    # a model folder removed from disk is no longer served
    (root / "fam" / "current").unlink()
    for v in ("v1", "v2", "v3"):
        (root / "fam" / v / "hpcseg-model.json").unlink()
        (root / "fam" / v).rmdir()
    (root / "fam").rmdir()
    reg.reload()
    assert reg.entry("fam") is None


def test_registry_with_nothing_loadable_is_failed_not_ready(tmp_path):
    write_model(tmp_path, "bad", extra={"fail_load": True})
    reg = ModelRegistry([tmp_path], device="cpu")
    assert reg.state() != "ready"
    reg.start()
    reg.wait(30)
    assert not reg.ready() and reg.state() == "failed"


def test_registry_loads_in_the_background(tmp_path):
    """start() returns at once; a slow loader does not block the caller."""
    write_model(tmp_path, "m")
    calls = []

    def slow_loader(folder, device):
        calls.append(folder)
        time.sleep(0.5)
        from hpcseg.server.models import load_model

        return load_model(folder, device)

    reg = ModelRegistry([tmp_path], device="cpu", loader=slow_loader)
    t0 = time.monotonic()
    reg.start()
    assert time.monotonic() - t0 < 0.3 and reg.loading
    assert reg.wait(10) and reg.ready() and calls
    assert json.loads((tmp_path / "m" / "hpcseg-model.json").read_text())["name"] == "m"
