"""Validated uploads into a dataset through a real shell (this machine: LocalShell; the cluster: tests/integration)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hpcseg.datasets import DatasetUploader
from hpcseg.errors import DatasetError
from hpcseg.shell import LocalShell

LABELS = {"body": 1, "lungs": 2, "bone": 3, "liver": 4}


def make_pair(tmp: Path, seed: int, *, shape=(24, 20, 16)) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 50, size=shape[::-1]).astype(np.int16)
    lbl = np.zeros(shape[::-1], np.uint8)
    lbl[4:10, 5:12, 6:14] = 1 + seed % 4
    image = sitk.GetImageFromArray(img)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-10.0, 5.0, 30.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    mask = sitk.GetImageFromArray(lbl)
    mask.CopyInformation(image)
    ip, mp = tmp / f"img{seed}.nii.gz", tmp / f"mask{seed}.nii.gz"
    sitk.WriteImage(image, str(ip))
    sitk.WriteImage(mask, str(mp))
    return ip, mp


@pytest.fixture
def up(tmp_path):
    return DatasetUploader(LocalShell(), str(tmp_path / "datasets"), python=sys.executable)


def test_upload_then_skip_duplicate(up, tmp_path):
    ip, mp = make_pair(tmp_path, 1)
    r1 = up.upload(ip, mp, dataset="phantoms", labels=LABELS, model_version="phantom-unet@1")
    assert r1.status == "uploaded" and r1.bytes_sent > 0
    r2 = up.upload(ip, mp, dataset="phantoms")
    assert r2.status == "skipped" and r2.case_id == r1.case_id and r2.bytes_sent == 0
    man = up.manifest("phantoms")
    entries = man["training"] + man["validation"]
    assert len(entries) == 1 and man["numTraining"] == 1
    assert man["labels"] == {"0": "background", "1": "body", "2": "lungs", "3": "bone", "4": "liver"}
    prov = man["hpcseg"]["cases"][r1.case_id]
    assert prov["model_version"] == "phantom-unet@1" and len(prov["image_sha256"]) == 64
    root = Path(up.root) / "phantoms"
    img = sitk.ReadImage(str(root / entries[0]["image"]))
    assert img.GetSpacing() == pytest.approx((0.8, 0.8, 2.5)) and img.GetDirection() == (0, 1, 0, 1, 0, 0, 0, 0, -1)
    assert str(ip.name) not in json.dumps(man)  # the case id replaces the file name


@pytest.mark.parametrize("problem", ["geometry", "unknown-label", "empty", "corrupt", "float-mask"])
def test_bad_pairs_refused_before_sending(up, tmp_path, problem):
    ip, mp = make_pair(tmp_path, 2)
    if problem == "geometry":
        m = sitk.ReadImage(str(mp))
        m.SetOrigin((0.0, 0.0, 0.0))
        sitk.WriteImage(m, str(mp))
        match = "origin differs"
    elif problem == "unknown-label":
        m = sitk.ReadImage(str(mp))
        m[1, 1, 1] = 9
        sitk.WriteImage(m, str(mp))
        match = r"label values \[9\]"
    elif problem == "empty":
        m = sitk.ReadImage(str(mp)) * 0
        sitk.WriteImage(m, str(mp))
        match = "empty"
    elif problem == "corrupt":
        data = ip.read_bytes()
        ip.write_bytes(data[: len(data) // 2])
        match = "cannot be read"
    else:
        m = sitk.Cast(sitk.ReadImage(str(mp)), sitk.sitkFloat32) * 0.5
        sitk.WriteImage(m, str(mp))
        match = "integer label map"
    with pytest.raises(DatasetError, match=match):
        up.upload(ip, mp, dataset="phantoms", labels=LABELS)
    assert not (Path(up.root) / "phantoms").exists()  # nothing was sent, not even a folder made


def test_upload_many_refuses_only_the_bad_pair(up, tmp_path):
    """upload_many prepares the next pair while one is sent; a refused pair in the middle sends nothing."""
    good1, bad, good2 = make_pair(tmp_path, 5), make_pair(tmp_path, 6), make_pair(tmp_path, 7)
    m = sitk.ReadImage(str(bad[1]))
    m.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(m, str(bad[1]))
    seen = []
    out = list(up.upload_many([(*good1, LABELS), (*bad, None), (*good2, None)], dataset="phantoms",
                              progress_for=lambda image: (lambda d, t, i=image: seen.append((i, d, t)))))
    assert [(i, mk) for i, mk, _ in out] == [good1, bad, good2]  # in order
    assert out[0][2].status == "uploaded" and out[2][2].status == "uploaded"
    assert isinstance(out[1][2], DatasetError) and "spacing differs" in out[1][2].message
    man = up.manifest("phantoms")
    assert sorted(e["image"] for e in man["training"] + man["validation"]) == sorted(
        f"./imagesTr/{r.case_id}.nii.gz" for r in (out[0][2], out[2][2]))
    assert not list((Path(up.root) / "phantoms" / ".incoming").iterdir())
    assert {i for i, d, t in seen if d == t} == {good1[0], good2[0]}  # progress reached the end for each sent pair


def test_parallel_uploaders_lose_nothing(up, tmp_path):
    pairs = [make_pair(tmp_path, s) for s in range(20)]
    up.upload(*pairs[0], dataset="par", labels=LABELS)
    errors = []

    def worker(chunk):
        try:
            w = DatasetUploader(LocalShell(), up.root, python=sys.executable)
            for ip, mp in chunk:
                w.upload(ip, mp, dataset="par")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(pairs[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    man = up.manifest("par")
    entries = man["training"] + man["validation"]
    assert len(entries) == 20 and len({e["image"] for e in entries}) == 20
    root = Path(up.root) / "par"
    for case, prov in man["hpcseg"]["cases"].items():
        got = subprocess.run(["sha256sum", root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert got[0] == prov["image_sha256"] and got[2] == prov["label_sha256"]


def test_each_case_records_the_labels_its_mask_annotates(up, tmp_path):
    """Declared labels are annotated (absent = annotated as absent); without a declaration, the labels present."""
    ip, mp = make_pair(tmp_path, 1)  # the mask holds value 2 (lungs) only
    full = up.upload(ip, mp, dataset="partial", labels=LABELS)
    assert full.annotated == ["body", "lungs", "bone", "liver"]
    ip2, mp2 = make_pair(tmp_path, 2)  # value 3 (bone) only, nothing declared
    assert up.upload(ip2, mp2, dataset="partial").annotated == ["bone"]
    ip3, mp3 = make_pair(tmp_path, 5)  # value 2 (lungs) only, declared lungs + liver: liver annotated as absent
    assert up.upload(ip3, mp3, dataset="partial", labels={"lungs": 2, "liver": 4}).annotated == ["lungs", "liver"]
    man = up.manifest("partial")
    by_image = {e["image"]: e["annotated"] for e in man["training"] + man["validation"]}
    assert sorted(map(tuple, by_image.values())) == [("body", "lungs", "bone", "liver"), ("bone",),
                                                     ("lungs", "liver")]
    assert man["hpcseg"]["cases"][full.case_id]["labels_annotated"] == ["body", "lungs", "bone", "liver"]
    from hpcseg.training import read_dataset

    labels, tr, val = read_dataset(Path(up.root) / "partial")
    assert labels == LABELS and sorted(map(tuple, (c["annotated"] for c in tr + val))) == sorted(
        map(tuple, by_image.values()))


def test_declared_labels_must_cover_the_mask_and_agree_with_the_dataset(up, tmp_path):
    ip, mp = make_pair(tmp_path, 1)  # value 2
    up.upload(ip, mp, dataset="decl", labels={"lungs": 2})
    ip4, mp4 = make_pair(tmp_path, 4)  # value 1
    with pytest.raises(DatasetError, match=r"label values \[1\] the dataset does not know"):
        up.upload(ip4, mp4, dataset="decl")
    up.upload(*make_pair(tmp_path, 8), dataset="decl", labels={"body": 1})  # value 1: body joins the dataset
    with pytest.raises(DatasetError, match=r"label values \[1\] that --labels does not declare") as err:
        up.upload(ip4, mp4, dataset="decl", labels={"lungs": 2})
    assert "body=1" in err.value.hint
    with pytest.raises(DatasetError, match="disagree"):
        up.upload(*make_pair(tmp_path, 2), dataset="decl", labels={"lungs": 3})
    with pytest.raises(DatasetError, match="disagree"):
        up.upload(*make_pair(tmp_path, 2), dataset="decl", labels={"spleen": 2})
    up.upload(*make_pair(tmp_path, 2), dataset="decl", labels={"bone": 3})  # value 3: bone joins too
    assert up.manifest("decl")["labels"] == {"0": "background", "1": "body", "2": "lungs", "3": "bone"}
