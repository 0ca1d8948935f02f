"""Bytes on the wire for images and masks: decoding uploads, encoding masks, MONAI Label's multipart answer.

No HTTP here (the routes call these in worker threads). The codecs themselves are :mod:`hpcseg.imaging`'s; this
module only names them for HTTP and picks one per request:

- upload (a multipart file part): the part's ``Content-Type`` names hpcseg's codec, else the file name's suffix
  (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``; what MONAI Label's clients send), else the magic bytes. Several
  parts (or ``uncompress=true`` with an archive) are read as one DICOM series.
- answer: ``Accept`` naming hpcseg's codec wins (the hpcseg client), then MONAI Label's ``result_extension``
  param (its Slicer plugin asks for ``.nrrd``), else gzip-1 NIfTI, which every MONAI Label client reads.
- label values: the model's own (``label_names`` says which is which), except for MONAI Label-style requests
  (``restore_label_idx: false``, or ``result_extension`` without ``restore_label_idx: true``): there the k-th label
  by value is k, as MONAI Label answers by default. Its Slicer plugin needs that: it imports the mask with
  ``ImportLabelmapToSegmentationNode(labelmap, segmentation, names)``, which gives value ``i + 1`` to the i-th name
  of ``label_names`` sorted by value, whatever the values are.
- ``result_dtype`` is honoured only when the type holds every label value (uint8 asked with labels past 255 keeps
  uint16 rather than wrapping around).
- model ``config`` in ``/info/``: MONAI Label's clients offer it as options and send it back as infer ``params``
  (the Slicer plugin sends the first item of a list); :func:`infer_config` keeps what they can.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.errors import ImageError

NIFTI_GZ = imaging.CONTENT_TYPE_NIFTI
ZSTD = imaging.CONTENT_TYPE_ZSTD
ZSTD_SUFFIX = ".hsv"
#: format -> (media type, file suffix); the first two are hpcseg's codecs, the rest what Slicer asks for.
FORMATS: dict[str, tuple[str, str]] = {
    ZSTD: (ZSTD, ZSTD_SUFFIX),
    NIFTI_GZ: (NIFTI_GZ, ".nii.gz"),
    ".nii.gz": (NIFTI_GZ, ".nii.gz"),
    ".nii": ("application/octet-stream", ".nii"),
    ".nrrd": ("application/octet-stream", ".nrrd"),
    ".seg.nrrd": ("application/octet-stream", ".nrrd"),
    ".mha": ("application/octet-stream", ".mha"),
}
_READABLE = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ZSTD_SUFFIX)
_DTYPES = {"uint8": sitk.sitkUInt8, "uint16": sitk.sitkUInt16, "int16": sitk.sitkInt16,
           "int32": sitk.sitkInt32, "uint32": sitk.sitkUInt32}
#: the largest value each integer type of :data:`_DTYPES` holds, and the smallest
_RANGES = {sitk.sitkUInt8: (0, 255), sitk.sitkUInt16: (0, 65535), sitk.sitkInt16: (-32768, 32767),
           sitk.sitkInt32: (-(2**31), 2**31 - 1), sitk.sitkUInt32: (0, 2**32 - 1)}


class ModelOutputError(RuntimeError):
    """A model returned something that is not a label map on the input's voxel grid (a server-side bug)."""


def codecs() -> list[str]:
    """Media types this server reads and writes, best first (``/info/`` lists them for clients)."""
    return [ZSTD, NIFTI_GZ]


def decode_uploads(parts: list[tuple[str, str, bytes]], uncompress: bool = False) -> sitk.Image:
    """One image from uploaded parts ``(filename, content_type, data)``; raises :class:`ImageError`."""
    if not parts or not any(data for _, _, data in parts):
        raise ImageError("no image data was uploaded")
    if len(parts) == 1 and not uncompress:
        return decode_one(*parts[0])
    with tempfile.TemporaryDirectory(prefix="hpcseg-upload-") as tmp:
        root = Path(tmp)
        for i, (name, _, data) in enumerate(parts):
            path = root / f"{i:05d}-{_safe_name(name)}"
            path.write_bytes(data)
            if uncompress:
                try:
                    shutil.unpack_archive(str(path), str(root / "x"))
                except (shutil.ReadError, ValueError) as exc:
                    raise ImageError(f"cannot unpack {name!r}: {exc}") from exc
        return _read_series(root / "x" if uncompress else root)


def decode_one(filename: str, content_type: str, data: bytes) -> sitk.Image:
    """Decode one uploaded image by its content type, suffix or magic bytes."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == ZSTD or data[:4] == b"HSV1" or _suffix(filename) == ZSTD_SUFFIX:
        return imaging.decode(data, ZSTD)
    suffix = _suffix(filename) or _suffix_from_magic(data)
    try:
        if suffix == ".nii.gz" and data[:2] == b"\x1f\x8b":
            return imaging.decode(data, NIFTI_GZ)
        with tempfile.TemporaryDirectory(prefix="hpcseg-upload-") as tmp:
            path = Path(tmp) / f"image{suffix}"
            path.write_bytes(data)
            return imaging.read_image(path)
    except ImageError as exc:
        raise ImageError(f"cannot read the uploaded image {filename!r} as {suffix}: {exc.message}",
                         hint=exc.hint) from exc


def _read_series(folder: Path) -> sitk.Image:
    files = [p for p in folder.rglob("*") if p.is_file()]
    if len(files) == 1:
        return decode_one(files[0].name, "", files[0].read_bytes())
    if not files:
        raise ImageError("the upload held no files")
    parents = [p.parent for p in files]
    return imaging.read_image(max(set(parents), key=parents.count))  # the largest DICOM series


def encode_image(image: sitk.Image, fmt: str) -> tuple[bytes, str, str]:
    """``(data, media_type, suffix)`` of ``image`` in format ``fmt`` (a key of :data:`FORMATS`)."""
    media_type, suffix = FORMATS.get(fmt, FORMATS[NIFTI_GZ])
    if media_type == ZSTD:
        return imaging.encode(image, ZSTD), media_type, suffix
    if suffix == ".nii.gz":
        return imaging.encode(image, NIFTI_GZ), media_type, suffix
    with tempfile.TemporaryDirectory(prefix="hpcseg-result-") as tmp:
        path = Path(tmp) / f"mask{suffix}"
        sitk.WriteImage(image, str(path), useCompression=suffix != ".nii")
        return path.read_bytes(), media_type, suffix


def negotiate(accept: str, result_extension: Any = None) -> str:
    """The answer's format: hpcseg's codec if ``Accept`` names it, else MONAI Label's ``result_extension``."""
    accepted = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    for fmt in (ZSTD, NIFTI_GZ):
        if fmt in accepted:
            return fmt
    if isinstance(result_extension, str) and result_extension.lower() in FORMATS:
        return result_extension.lower()
    return NIFTI_GZ


def conform_mask(mask: Any, image: sitk.Image, model: str) -> sitk.Image:
    """The mask on exactly the input's grid (size checked, geometry copied) as an integer label map.

    MONAI Label's ``result_dtype`` is applied afterwards by :func:`cast_mask` (after any renumbering).
    """
    if isinstance(mask, np.ndarray):
        arr = mask
        mask = sitk.GetImageFromArray(arr)
    if not isinstance(mask, sitk.Image):
        raise ModelOutputError(f"model {model} returned {type(mask).__name__}, not an image")
    if mask.GetSize() != image.GetSize():
        raise ModelOutputError(f"model {model} returned a mask of size {mask.GetSize()} for an image of size "
                               f"{image.GetSize()}")
    mask.CopyInformation(image)
    if mask.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        top = float(sitk.GetArrayViewFromImage(mask).max()) if mask.GetNumberOfPixels() else 0.0
        mask = sitk.Cast(mask, sitk.sitkUInt8 if top < 256 else sitk.sitkUInt16)
    return mask


def cast_mask(mask: sitk.Image, dtype: Any = None) -> sitk.Image:
    """``mask`` as the integer type ``dtype`` names (MONAI Label's ``result_dtype``) when that type holds its values.

    An unknown name, or a type too small for the mask's values, leaves the mask as it is: a wrapped-around label
    would be a wrong answer, a wider type is one every reader takes.
    """
    want = _DTYPES.get(str(dtype).lower()) if dtype else None
    if want is None or mask.GetPixelID() == want:
        return mask
    if mask.GetNumberOfPixels():
        mm = sitk.MinimumMaximumImageFilter()
        mm.Execute(mask)
        lo, hi = _RANGES[want]
        if mm.GetMinimum() < lo or mm.GetMaximum() > hi:
            return mask
    return sitk.Cast(mask, want)


def monai_label_indices(params: dict[str, Any]) -> bool:
    """Does this request want MONAI Label's label values (the k-th label by value is k)? See the module docstring."""
    restore = params.get("restore_label_idx")
    if restore is not None:
        return not (restore is True or str(restore).strip().lower() in ("true", "1", "yes"))
    return "result_extension" in params


def compact_labels(mask: sitk.Image, names: dict[str, int]) -> tuple[sitk.Image, dict[str, int]]:
    """``(mask, names)`` renumbered so that the k-th label of ``names`` by value is k (MONAI Label's default).

    Values the answer does not name become 0. Unchanged (the same objects) when the values already are 1..N.
    """
    order = sorted(((n, v) for n, v in names.items() if v > 0), key=lambda nv: nv[1])
    new = {n: k for k, (n, _) in enumerate(order, 1)}
    if all(names[n] == k for n, k in new.items()) and len(new) == len(names):
        return mask, names
    arr = sitk.GetArrayViewFromImage(mask)
    top = max([int(arr.max()) if arr.size else 0, *(v for _, v in order)])
    lut = np.zeros(top + 1, np.uint8 if len(new) < 256 else np.uint16)
    for n, v in order:
        lut[v] = new[n]
    out = sitk.GetImageFromArray(lut[np.clip(arr, 0, top)])
    out.CopyInformation(mask)
    return out, new


def infer_config(config: Any, *, fast: bool = False) -> dict[str, Any]:
    """A model's ``config`` for MONAI Label's ``/info/``: only options its clients can show and send back.

    MONAI Label's Slicer plugin lists each entry in its options table and sends it back as an infer param; for a
    list it shows a drop-down of strings and sends the first item, and it fails on a list of anything else (its
    ``invalidateConfigTable`` removes the shown *text* from the list). So: strings, booleans and numbers stay, lists
    stay when they are non-empty lists of strings, everything else (``None``, number lists such as ``spacing`` or
    ``roi_size``, which would come back as one number, dicts) is left out. ``fast=True`` offers hpcseg's ``fast``
    mode as a check box.
    """
    out: dict[str, Any] = {}
    for key, value in (config.items() if isinstance(config, dict) else ()):
        if isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[str(key)] = list(value)
    if fast:
        out.setdefault("fast", False)
    return out


def label_names(model: Any, params: dict[str, Any]) -> dict[str, int]:
    """The label names of this answer: the requested subset of the model's labels, or the prompted label.

    Raises the model's ``ServerError(400)`` for a label it does not have (before any inference runs).
    """
    manifest = getattr(model, "manifest", None)
    labels: dict[str, int] = dict(getattr(manifest, "labels", {}) or {})
    if getattr(manifest, "type", "segmentation") in ("deepgrow", "dextr3d"):
        # MONAI Label's Slicer plugin names the segment being drawn in "label"; the mask holds one object.
        if isinstance(params.get("label"), str) and params["label"] and len(labels) <= 1:
            return {params["label"]: next(iter(labels.values()), 1)}
    if hasattr(model, "wanted_labels"):
        return dict(model.wanted_labels(params))
    wanted = params.get("label_names") or params.get("labels")
    if isinstance(wanted, list) and wanted:
        return {k: v for k, v in labels.items() if k in set(map(str, wanted))}
    return labels


def qa_warnings(model: Any, image: sitk.Image) -> list[str]:
    """Input QA warnings (odd spacing, not CT-like values...) against what ``model`` expects."""
    if hasattr(model, "check_input"):
        return [str(w) for w in model.check_input(image)]
    return [str(w) for w in imaging.check_input(image, {})]


def multipart(result: dict[str, Any], data: bytes, filename: str, media_type: str) -> tuple[bytes, str]:
    """MONAI Label's ``output=all`` answer: form field ``params`` (JSON) then the file part ``image``."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
        f"Content-Type: application/json\r\n\r\n{json.dumps(result)}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {media_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def result_filename(model: str, suffix: str) -> str:
    """A unique, safe file name for the mask (MONAI Label's client saves it under this name)."""
    return f"{_safe_name(model)}-{uuid.uuid4().hex[:12]}{suffix}"


def header_safe(text: str) -> str:
    """``text`` percent-encoded where it is not plain ASCII (HTTP headers are latin-1)."""
    return quote(text, safe=" !#$&'()*+,-./:;=?@[]^_`{|}~")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name)[:100] or "file"


def _suffix(filename: str) -> str | None:
    low = filename.lower()
    for s in (".seg.nrrd", *_READABLE):
        if low.endswith(s):
            return ".nrrd" if s == ".seg.nrrd" else s
    return None


def _suffix_from_magic(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if data[:4] == b"NRRD":
        return ".nrrd"
    if len(data) > 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".nii"
    if len(data) > 132 and data[128:132] == b"DICM":
        return ".dcm"
    return ".nii.gz"
