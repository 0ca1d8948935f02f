"""The cases of a batch: found in files, folders (DICOM series, one case per series) or a CSV, then validated.

- **a file**: NIfTI, NRRD, MHA/MHD, or one file of a DICOM series (that series);
- **a folder**: searched recursively; every image file is a case, and every DICOM series is one (a folder may
  hold several series; each is its own case, named ``<folder>_<series number>``);
- **a CSV** (``.csv``): one case per row, ``case_id,path`` (a header row naming ``path`` and ``case_id``/``id`` is
  optional); relative paths are relative to the CSV's folder.

Each case is validated locally with the same checks as ``hpcseg segment`` (read, one 3D scalar volume, QA warnings);
a bad one gets its reason and the others go on. A good one is *staged*: encoded with hpcseg's zstd volume codec
(exact geometry, lossless) into ``<out>/.hpcseg-batch/staging/<key>.hsv``, where ``key`` is a hash of the voxels and
the geometry. Two files with the same image share a key: the image is uploaded and segmented once.

Example::

    cases = discover(["scans/", "extra.nii.gz"])
    for case in cases:
        prepare(case, staging_dir)     # sets case.key / .geometry / .warnings, or case.error
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import HpcsegError
from .imaging._common import IMAGE_SUFFIXES, _first_line
from .imaging.dicom import _is_dicom_file


@dataclass
class Case:
    """One case of a batch: where it comes from, and what validation found."""

    case_id: str
    source: str
    #: "file" or "dicom" (a DICOM series; ``source`` is one of its files)
    kind: str = "file"
    series_uid: str = ""
    #: why it cannot be segmented (a sentence); empty when it can
    error: str = ""
    key: str = ""
    geometry: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _dicom_series(folder: Path, files: list[Path]) -> list[tuple[str, str, list[str]]]:
    """(series uid, series number, files) of each DICOM series in ``folder`` (GDCM's grouping)."""
    reader = sitk.ImageSeriesReader()
    try:
        ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        ids = ()
    out = []
    for sid in ids:
        names = list(reader.GetGDCMSeriesFileNames(str(folder), sid))
        number = ""
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(names[0])
            r.ReadImageInformation()
            number = r.GetMetaData("0020|0011").strip() if r.HasMetaDataKey("0020|0011") else ""
        except RuntimeError:
            pass
        out.append((sid, number, names))
    if not out and files:  # DICOM files GDCM cannot group: one case that will say why it cannot be read
        out.append(("", "", [str(files[0])]))
    return out


def discover(inputs: list[str | os.PathLike]) -> list[Case]:
    """Every case in ``inputs`` (files, folders, CSVs), in order, with unique case ids."""
    cases: list[Case] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            cases.append(Case(_safe_id(_stem(p)), str(p), error=f"{p}: no such file or folder"))
        elif p.is_dir():
            cases.extend(_from_folder(p))
        elif p.suffix.lower() == ".csv":
            cases.extend(_from_csv(p))
        elif _is_dicom_file(p):
            cases.append(Case(_safe_id(p.parent.name or _stem(p)), str(p), kind="dicom"))
        else:
            cases.append(Case(_safe_id(_stem(p)), str(p)))
    seen: dict[str, int] = {}
    for c in cases:  # case ids name output files: make them unique
        n = seen.get(c.case_id, 0)
        seen[c.case_id] = n + 1
        if n:
            c.case_id = f"{c.case_id}-{n + 1}"
    return cases


def _from_folder(root: Path) -> list[Case]:
    cases = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        here = Path(folder)
        rel = here.relative_to(root)
        prefix = _safe_id(root.name if str(rel) == "." else f"{root.name}_{rel}")
        dicoms = []
        for name in sorted(files):
            f = here / name
            if name.startswith("."):
                continue
            if any(name.lower().endswith(s) for s in IMAGE_SUFFIXES):
                if name.lower().endswith(".raw") or name.endswith(".labels.json"):
                    continue
                cases.append(Case(_safe_id(f"{prefix}_{_stem(f)}" if str(rel) != "." else _stem(f)), str(f)))
            elif _is_dicom_file(f):
                dicoms.append(f)
        if dicoms:
            series = _dicom_series(here, dicoms)
            for sid, number, names in series:
                suffix = f"_{number or sid[-8:]}" if len(series) > 1 else ""
                cases.append(Case(_safe_id(prefix + suffix), names[0], kind="dicom", series_uid=sid))
    return cases


def _from_csv(path: Path) -> list[Case]:
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        return [Case(_safe_id(path.stem), str(path), error=f"{path}: cannot read the CSV ({exc})")]
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    id_col, path_col = 0, 1
    if rows and any(c.strip().lower() == "path" for c in rows[0]):
        head = [c.strip().lower() for c in rows.pop(0)]
        path_col = head.index("path")
        id_col = next((head.index(k) for k in ("case_id", "case", "id") if k in head), -1)
    cases = []
    for n, row in enumerate(rows, 1):
        if len(row) == 1 and id_col == 0 and path_col == 1:
            raw, cid = row[0].strip(), ""
        elif path_col < len(row):
            raw, cid = row[path_col].strip(), row[id_col].strip() if 0 <= id_col < len(row) else ""
        else:
            cases.append(Case(f"{_safe_id(path.stem)}-row{n}", str(path), error=f"{path} row {n}: no path column"))
            continue
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else path.parent / p
        found = discover([p]) if p.exists() else [Case(_safe_id(_stem(p)), str(p), error=f"{p}: no such file "
                                                                                          f"(row {n} of {path})")]
        for c in found:
            if cid:
                c.case_id = _safe_id(cid) if len(found) == 1 else _safe_id(f"{cid}_{c.case_id}")
            cases.append(c)
    return cases


def image_key(image: sitk.Image) -> str:
    """A hash of an image's voxels and geometry: equal images (whatever file they came from) share it."""
    h = hashlib.sha256()
    h.update(json.dumps(geometry_of(image), sort_keys=True).encode())
    h.update(str(image.GetPixelID()).encode())
    h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return h.hexdigest()[:32]


def geometry_of(image: sitk.Image) -> dict[str, Any]:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def reference_image(geometry: dict[str, Any]) -> sitk.Image:
    """An empty uint8 image on a case's grid: what its mask is written against."""
    ref = sitk.Image([int(v) for v in geometry["size"]], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in geometry["spacing"]])
    ref.SetOrigin([float(v) for v in geometry["origin"]])
    ref.SetDirection([float(v) for v in geometry["direction"]])
    return ref


def prepare(case: Case, staging: Path) -> Case:
    """Validate one case as ``hpcseg segment`` does and stage it; a refusal goes to ``case.error`` (not raised)."""
    from . import imaging

    if case.error:
        return case
    try:
        image = imaging.as_volume(imaging.read_image(case.source), case.source)
        case.warnings = list(imaging.check_input(image, {}))
        case.key = image_key(image)
        case.geometry = geometry_of(image)
        staged = staging / f"{case.key}.hsv"
        if not staged.exists():
            from .batchworker import write_atomic

            staging.mkdir(parents=True, exist_ok=True)
            write_atomic(staged, imaging.encode(image, imaging.CONTENT_TYPE_ZSTD))
    except HpcsegError as exc:
        case.error = exc.message
    except (RuntimeError, OSError, ValueError) as exc:  # SimpleITK and the file system, translated here
        case.error = f"{case.source}: cannot read ({_first_line(exc)})"
    return case
