"""Validated image-mask pairs, uploaded to a dataset on the cluster without ever leaving a partial file.

A dataset on the cluster (``<datasets_dir>/<name>/``) has the Medical Segmentation Decathlon shape MONAI and
nnU-Net users know, plus hpcseg's provenance per case::

    dataset.json     name, labels, modality, training/validation lists, and "hpcseg": {case: provenance}
    imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz
    .incoming/       files on their way in (temp names while copying)
    .lock            flock(1) lock: every change of dataset.json happens under it

Before a byte is sent, a pair must be readable, share size/spacing/origin/direction (tolerances below), and its
mask must be a non-empty integer label map whose values the dataset knows. Files are written as gzip NIfTI from
the voxels and geometry alone (no header text, no DICOM tags: a case id made from the image's hash replaces the
file name), hashed (sha256), copied by scp to a temp name in ``.incoming/``, checked again on the cluster, and
only then renamed into ``imagesTr/`` and ``labelsTr/`` under the lock. Running the same upload again finishes
an interrupted one; a pair already there (same hashes) is skipped.

Example::

    up = DatasetUploader(shell, "/scratch/proj/datasets")
    result = up.upload("ct.nii.gz", "ct-seg.nii.gz", dataset="liver", labels={"liver": 1})
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import posixpath
import shlex
import shutil
import socket
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import DatasetError, ImageError
from .shell import Shell

#: geometry tolerances: spacing and direction relative/absolute 1e-4, origin 1e-3 mm (DICOM rounding)
SPACING_TOL = 1e-4
ORIGIN_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4

_INT_TYPES = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
              sitk.sitkUInt64, sitk.sitkInt64}


@dataclass
class PreparedPair:
    """A validated pair, written to local temp files ready to send."""

    case_id: str
    image_file: Path
    label_file: Path
    image_sha256: str
    label_sha256: str
    labels_present: list[int]
    raw_bytes: int


@dataclass
class UploadResult:
    case_id: str
    status: str          # "uploaded" | "skipped" (already there)
    split: str
    bytes_sent: int
    raw_bytes: int
    annotated: list[str] | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read(path: str | os.PathLike, what: str) -> sitk.Image:
    from .imaging import read_image

    try:
        return read_image(path)  # refuses a truncated NIfTI (ITK would read the missing voxels as 0)
    except (ImageError, RuntimeError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"refused: the {what} {path} cannot be read ({exc or type(exc).__name__})",
                           hint=f"check that {path} is a complete NIfTI/NRRD/MHA file or DICOM folder") from exc


def check_geometry(image: sitk.Image, mask: sitk.Image, names: tuple[str, str]) -> None:
    """Refuse a pair whose size, spacing, origin or direction differ beyond the tolerances."""
    a, b = names
    if image.GetSize() != mask.GetSize():
        raise DatasetError(f"refused: size differs: {a} {image.GetSize()} vs {b} {mask.GetSize()}",
                           hint="export the mask on the image's grid (in Slicer: reference geometry = the image)")
    if not np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=SPACING_TOL, atol=SPACING_TOL):
        raise DatasetError(f"refused: spacing differs: {a} {image.GetSpacing()} vs {b} {mask.GetSpacing()}",
                           hint="resample the mask to the image (nearest neighbour) before uploading")
    if not np.allclose(image.GetOrigin(), mask.GetOrigin(), rtol=0, atol=ORIGIN_TOL_MM):
        raise DatasetError(f"refused: origin differs: {a} {image.GetOrigin()} vs {b} {mask.GetOrigin()}",
                           hint="the mask was saved for another image or cropped; export it on the image's grid")
    if not np.allclose(image.GetDirection(), mask.GetDirection(), rtol=0, atol=DIRECTION_TOL):
        raise DatasetError(f"refused: direction differs between {a} and {b}",
                           hint="the mask is reoriented; export it on the image's grid")


def _clean_copy(img: sitk.Image) -> sitk.Image:
    """Voxels and geometry only: no metadata (DICOM tags, descriptions) travels."""
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(img))
    out.CopyInformation(img)
    for key in out.GetMetaDataKeys():
        out.EraseMetaData(key)
    return out


def check_labels(present: list[int], labels: dict[str, int], mask_path: str | os.PathLike) -> None:
    """Refuse label values the dataset does not know."""
    unknown = [v for v in present if v not in set(labels.values()) | {0}]
    if unknown:
        names = ", ".join(f"{k}={v}" for k, v in sorted(labels.items(), key=lambda kv: kv[1]))
        raise DatasetError(f"refused: the mask {mask_path} has label values {unknown} the dataset does not know "
                           f"(it knows 0=background, {names})",
                           hint="relabel the mask, or create a new dataset with --labels NAME=VALUE,...")


def annotated_labels(present: list[int], known: dict[str, int], declared: dict[str, int] | None,
                     mask_path: str | os.PathLike) -> list[str]:
    """The label names a mask annotates: what the uploader declares, else the labels present in it.

    A declared label absent from the mask is "annotated as absent" (truly not there); a dataset label neither
    declared nor present is "not annotated" (training learns nothing about it from this case). A value present
    but not declared is refused: the declaration would be wrong.
    """
    check_labels(present, known, mask_path)
    if declared:
        extra = [v for v in present if v and v not in declared.values()]
        if extra:
            raise DatasetError(f"refused: the mask {mask_path} has label values {extra} that --labels does not "
                               f"declare ({', '.join(f'{k}={v}' for k, v in declared.items())})",
                               hint="declare every label the mask annotates, e.g. --labels "
                               + ",".join(f"{k}={v}" for k, v in {**declared, **{n: v for n, v in known.items()
                                                                                  if v in extra}}.items()))
        return sorted(declared, key=lambda k: declared[k])
    by_value = {v: k for k, v in known.items()}
    return [by_value[v] for v in present if v]


def prepare_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike, labels: dict[str, int] | None,
                 workdir: Path) -> PreparedPair:
    """Validate a pair and write its upload files; raises DatasetError naming the problem, sends nothing."""
    image = _read(image_path, "image")
    mask = _read(mask_path, "mask")
    check_geometry(image, mask, (str(image_path), str(mask_path)))
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetPixelID() not in _INT_TYPES:
        arr = sitk.GetArrayViewFromImage(mask)
        if mask.GetNumberOfComponentsPerPixel() != 1 or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DatasetError(f"refused: the mask {mask_path} is not an integer label map "
                               f"({mask.GetPixelIDTypeAsString()})",
                               hint="save the segmentation as a labelmap (integer values), not probabilities")
    arr = sitk.GetArrayViewFromImage(mask)
    present = sorted(int(v) for v in np.unique(arr))
    if not any(v > 0 for v in present):
        raise DatasetError(f"refused: the mask {mask_path} is empty (no labelled voxel)",
                           hint="check you exported the right segmentation")
    if labels is not None:
        check_labels(present, labels, mask_path)
    mask_u = sitk.Cast(_clean_copy(mask), sitk.sitkUInt8 if max(present) < 256 else sitk.sitkUInt16)
    workdir.mkdir(parents=True, exist_ok=True)
    img_file, lbl_file = workdir / "image.nii.gz", workdir / "label.nii.gz"
    sitk.WriteImage(_clean_copy(image), str(img_file), True, 6)
    sitk.WriteImage(mask_u, str(lbl_file), True, 6)
    img_sha, lbl_sha = _sha256(img_file), _sha256(lbl_file)
    raw = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent() \
        + mask.GetNumberOfPixels() * mask.GetSizeOfPixelComponent()
    return PreparedPair(case_id=f"case_{img_sha[:16]}", image_file=img_file, label_file=lbl_file,
                        image_sha256=img_sha, label_sha256=lbl_sha, labels_present=present, raw_bytes=raw)


# Runs on the login node with its own python3, under flock on the dataset's .lock. Standard library only.
_REMOTE = r'''
import hashlib, json, os, sys, time, glob
a = json.loads(sys.argv[1]); d = a["dir"]; op = a["op"]
man = os.path.join(d, "dataset.json")
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for c in iter(lambda: f.read(1 << 20), b""): h.update(c)
    return h.hexdigest()
def load():
    try:
        with open(man) as f: return json.load(f)
    except FileNotFoundError: return None
def save(m):
    tmp = man + ".%d.tmp" % os.getpid()
    with open(tmp, "w") as f: json.dump(m, f, indent=1, sort_keys=True); f.flush(); os.fsync(f.fileno())
    os.replace(tmp, man)
m = load()
if op == "status":
    inc = {}
    for p in glob.glob(os.path.join(d, ".incoming", a["case"] + "_*.nii.gz")):
        try: inc[os.path.basename(p)] = sha(p)
        except FileNotFoundError: pass  # committed by someone uploading the same pair right now
    case = (m or {}).get("hpcseg", {}).get("cases", {}).get(a["case"])
    print(json.dumps({"exists": m is not None, "labels": (m or {}).get("labels"), "case": case, "incoming": inc}))
    sys.exit(0)
if op == "commit":
    for sub in ("imagesTr", "labelsTr", ".incoming"): os.makedirs(os.path.join(d, sub), exist_ok=True)
    if m is None:
        m = {"name": a["name"], "description": "hpcseg dataset", "tensorImageSize": "3D",
             "modality": {"0": a.get("modality", "CT")}, "labels": a["labels"], "numTraining": 0, "numTest": 0,
             "training": [], "validation": [], "test": [], "hpcseg": {"version": 1, "cases": {}}}
    for v, n in a["labels"].items():  # a label declared for the first time joins the dataset's labels
        if m["labels"].get(v, n) != n or (n in m["labels"].values() and m["labels"].get(v) != n):
            print(json.dumps({"status": "labels", "labels": m["labels"]})); sys.exit(0)
    m["labels"].update(a["labels"])
    cases = m.setdefault("hpcseg", {"version": 1, "cases": {}}).setdefault("cases", {})
    c = a["case"]; prov = a["provenance"]
    old = cases.get(c)
    if old and (old["image_sha256"], old["label_sha256"]) == (prov["image_sha256"], prov["label_sha256"]):
        print(json.dumps({"status": "skipped", "split": old["split"]})); sys.exit(0)
    src_i = os.path.join(d, ".incoming", c + "_image.nii.gz")
    src_l = os.path.join(d, ".incoming", c + "_label.nii.gz")
    for p, want in ((src_i, prov["image_sha256"]), (src_l, prov["label_sha256"])):
        if not os.path.exists(p) or sha(p) != want:
            print(json.dumps({"status": "corrupt", "file": os.path.basename(p)})); sys.exit(3)
    os.replace(src_i, os.path.join(d, "imagesTr", c + ".nii.gz"))
    os.replace(src_l, os.path.join(d, "labelsTr", c + ".nii.gz"))
    entry = {"image": "./imagesTr/%s.nii.gz" % c, "label": "./labelsTr/%s.nii.gz" % c,
             "annotated": prov["labels_annotated"]}
    for key in ("training", "validation"):
        m[key] = [e for e in m.get(key, []) if e["image"] != entry["image"]]
    m["validation" if prov["split"] == "val" else "training"].append(entry)
    m["numTraining"] = len(m["training"]) + len(m["validation"])
    cases[c] = prov
    save(m)
    now = time.time()
    for p in glob.glob(os.path.join(d, ".incoming", ".*.part")):  # another uploader may rename its own meanwhile
        try:
            if now - os.path.getmtime(p) > 86400: os.remove(p)
        except OSError: pass
    print(json.dumps({"status": "uploaded", "split": prov["split"]}))
'''


class DatasetUploader:
    """Uploads validated pairs into datasets under ``root`` on the machine behind ``shell``."""

    def __init__(self, shell: Shell, root: str, python: str = "python3") -> None:
        self.shell = shell
        self.root = root
        self.python = python

    def _dir(self, dataset: str) -> str:
        if not dataset or "/" in dataset or dataset.startswith(".") or not dataset.replace("-", "").replace(
                "_", "").replace(".", "").isalnum():
            raise DatasetError(f"dataset name {dataset!r} is not allowed: letters, digits, '-', '_', '.'")
        return posixpath.join(self.root, dataset)

    def _remote(self, dataset: str, op: str, **args: Any) -> dict:
        d = self._dir(dataset)
        payload = json.dumps({"dir": d, "op": op, "name": dataset, **args})
        run = f"{shlex.quote(self.python)} -c {shlex.quote(_REMOTE)} {shlex.quote(payload)}"
        # Reads need no lock (dataset.json is replaced atomically); changes happen under flock on .lock.
        cmd = run if op == "status" else f"mkdir -p {shlex.quote(d)} && flock {shlex.quote(d + '/.lock')} {run}"
        res = self.shell.run(cmd, timeout=300)
        try:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res.check(hint="the login node needs python3 and flock (util-linux)")
            raise DatasetError(f"unexpected answer from the cluster: {res.stdout[-200:]!r}") from None
        if not res.ok and out.get("status") != "corrupt":
            res.check()
        return out

    def dataset_labels(self, dataset: str) -> dict[str, int] | None:
        """The labels of an existing dataset (name → value), or None if it does not exist yet."""
        st = self._remote(dataset, "status", case="-")
        if not st["exists"]:
            return None
        return {name: int(v) for v, name in st["labels"].items() if int(v) != 0}

    def upload(self, image: str | os.PathLike, mask: str | os.PathLike, *, dataset: str,
               labels: dict[str, int] | None = None, split: str = "auto", model_version: str | None = None,
               modality: str = "CT", progress: Callable[[int, int], None] | None = None) -> UploadResult:
        """Validate, send and commit one pair (see the module docstring for the guarantees)."""
        if split not in ("train", "val", "auto"):
            raise DatasetError(f"split {split!r} is not allowed: train, val or auto")
        with tempfile.TemporaryDirectory(prefix="hpcseg-upload-") as tmp:
            # Everything but the labels is checked first, so one call to the cluster tells both the dataset's
            # labels and whether this very pair (or part of it) is already there.
            pair = prepare_pair(image, mask, None, Path(tmp))
            return self._send(pair, mask, dataset=dataset, labels=labels, split=split,
                              model_version=model_version, modality=modality, progress=progress)

    def upload_many(self, items: Iterable[tuple[str | os.PathLike, str | os.PathLike, dict[str, int] | None]], *,
                    dataset: str, split: str = "auto", model_version: str | None = None, modality: str = "CT",
                    progress_for: Callable[[str | os.PathLike], Callable[[int, int], None] | None] | None = None,
                    ) -> Iterator[tuple[Any, Any, UploadResult | DatasetError]]:
        """Upload (image, mask, labels) pairs in order, preparing the next pair while this one is sent.

        Yields (image, mask, result) where result is an UploadResult or the DatasetError that refused that pair;
        each pair has the same guarantees as `upload`. Preparing (read, check, compress, hash) is local CPU work
        and sending is network work, so on a slow link the one hides the other.
        """
        if split not in ("train", "val", "auto"):
            raise DatasetError(f"split {split!r} is not allowed: train, val or auto")
        todo = list(items)
        with tempfile.TemporaryDirectory(prefix="hpcseg-upload-") as tmp, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcseg-prepare") as pool:
            def prep(i: int) -> PreparedPair:
                return prepare_pair(todo[i][0], todo[i][1], None, Path(tmp) / str(i))

            ahead: Future | None = pool.submit(prep, 0) if todo else None
            for i, (image, mask, labels) in enumerate(todo):
                current, ahead = ahead, (pool.submit(prep, i + 1) if i + 1 < len(todo) else None)
                try:
                    result: UploadResult | DatasetError = self._send(
                        current.result(), mask, dataset=dataset, labels=labels, split=split,
                        model_version=model_version, modality=modality,
                        progress=progress_for(image) if progress_for else None)
                except DatasetError as exc:
                    result = exc
                finally:
                    shutil.rmtree(Path(tmp) / str(i), ignore_errors=True)
                yield image, mask, result

    def _send(self, pair: PreparedPair, mask: str | os.PathLike, *, dataset: str, labels: dict[str, int] | None,
              split: str, model_version: str | None, modality: str,
              progress: Callable[[int, int], None] | None) -> UploadResult:
        """Check the prepared pair's labels against the dataset, then send and commit it (one status call)."""
        st = self._remote(dataset, "status", case=pair.case_id)
        if not st["exists"]:
            if not labels:
                raise DatasetError(f"dataset {dataset!r} does not exist yet: say which labels it has",
                                   hint="e.g. --labels body=1,lungs=2,bone=3")
            known: dict[str, int] = {}
        else:
            known = {name: int(v) for v, name in st["labels"].items() if int(v) != 0}
        for k, v in (labels or {}).items():
            other = next((n for n, val in known.items() if val == v and n != k), None)
            if (k in known and known[k] != v) or other is not None:
                raise DatasetError(f"labels {labels} disagree with dataset {dataset!r}'s {known}",
                                   hint="use the dataset's values for its labels (hpcseg dataset show NAME)")
        union = {**known, **(labels or {})}
        annotated = annotated_labels(pair.labels_present, union, labels, mask)
        case = st.get("case")
        if case and case["image_sha256"] == pair.image_sha256 and case["label_sha256"] == pair.label_sha256:
            return UploadResult(pair.case_id, "skipped", case["split"], 0, pair.raw_bytes,
                                case.get("labels_annotated"))
        chosen = split if split != "auto" else ("val" if int(pair.image_sha256[:8], 16) % 5 == 0 else "train")
        d = self._dir(dataset)
        sent = done = 0
        total = pair.image_file.stat().st_size + pair.label_file.stat().st_size
        for kind, f, digest in (("image", pair.image_file, pair.image_sha256),
                                ("label", pair.label_file, pair.label_sha256)):
            name = f"{pair.case_id}_{kind}.nii.gz"
            size = f.stat().st_size
            if st["incoming"].get(name) != digest:  # else an earlier run sent it already: resume
                base = done
                kw = {"progress": (lambda n, _t, b=base: progress(b + n, total))} if progress else {}
                self.shell.put(f, posixpath.join(d, ".incoming", name), **kw)
                sent += size
            done += size
            if progress:
                progress(done, total)
        prov = {"image_sha256": pair.image_sha256, "label_sha256": pair.label_sha256, "split": chosen,
                "uploaded_by": f"{getpass.getuser()}@{socket.gethostname()}",
                "uploaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model_version": model_version, "labels_present": pair.labels_present,
                "labels_annotated": annotated}
        out = self._remote(dataset, "commit", case=pair.case_id, provenance=prov, modality=modality,
                           labels={"0": "background", **{str(v): k for k, v in union.items()}})
        if out["status"] == "labels":
            raise DatasetError(f"labels {labels} disagree with dataset {dataset!r}'s {out['labels']} (changed "
                               "meanwhile)", hint="use the dataset's values for its labels (hpcseg dataset show NAME)")
        if out["status"] == "corrupt":
            raise DatasetError(f"the copy of {out['file']} on the cluster does not match its hash; "
                               "nothing was added", hint="run the same upload again", retryable=True)
        return UploadResult(pair.case_id, out["status"], out["split"], sent, pair.raw_bytes, annotated)

    def manifest(self, dataset: str) -> dict:
        text = self.shell.read_text(posixpath.join(self._dir(dataset), "dataset.json"))
        if text is None:
            raise DatasetError(f"no dataset {dataset!r} under {self.root}", hint="hpcseg datasets lists them")
        return json.loads(text)

    def list(self) -> list[dict]:
        """Datasets under the root with their case counts."""
        res = self.shell.run([self.python, "-c", _LIST, self.root], check=True)
        return json.loads(res.stdout)


_LIST = r'''
import glob, json, os, sys
out = []
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*", "dataset.json"))):
    try:
        m = json.load(open(p))
    except Exception as e:
        out.append({"name": os.path.basename(os.path.dirname(p)), "error": str(e)}); continue
    out.append({"name": m.get("name"), "training": len(m.get("training", [])),
                "validation": len(m.get("validation", [])), "labels": m.get("labels")})
print(json.dumps(out))
'''
