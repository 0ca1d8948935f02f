"""Reading images and masks: NIfTI, NRRD, MetaImage and DICOM (see :mod:`hpcseg.imaging.dicom`); refusing
what is not one 3D grey-level volume, or a truncated file."""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hpcseg.errors import ImageError
from hpcseg.imaging._common import _READ_WARNINGS_KEY, IMAGE_SUFFIXES, _first_line, _fmt
from hpcseg.imaging.dicom import _current_locale, _is_dicom_file, _read_dicom, _restore_locale


# ---------------------------------------------------------------------------------------------------- reading
def read_image(path: str | Path) -> sitk.Image:
    """Read a NIfTI / NRRD / MetaImage file, or a DICOM series: a folder, or one file of the series.

    DICOM slices are ordered by ImagePositionPatient (GDCM's sorter) and rescaled to real units (HU for CT). A
    folder with several series reads the largest only when the others are much smaller (scouts, dose reports),
    and refuses, listing them, when two are alike. What a person should know about the reading (which series,
    unevenly spaced or sheared slices) comes back from :func:`check_input` (see :func:`read_warnings`). A
    truncated NIfTI is refused (ITK would read the missing voxels as 0). Raises ImageError naming the file.
    The process locale is restored afterwards (GDCM may switch it to C).

    Example::

        ct = read_image("patient01/")        # a folder of .dcm files
        ct = read_image("ct.nii.gz")
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ImageError(f"{p}: no such file or folder", hint="check the path (DICOM: give the series folder)")
    saved_locale = _current_locale()
    try:
        if p.is_dir() or p.suffix.lower() in (".dcm", ".ima") or _is_dicom_file(p):
            return _read_dicom(p)
        _check_nifti_complete(p)
        try:
            return sitk.ReadImage(str(p))
        except RuntimeError as exc:
            known = any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES)
            if "orthonormal" in str(exc):
                hint = ("its orientation (sform/qform) is sheared, which ITK cannot represent: resample it onto an "
                        "orthogonal grid or export it again from the DICOM")
            elif known:
                hint = "is the file complete (not a copy that stopped early)? try opening it in 3D Slicer"
            else:
                hint = "use NIfTI (.nii/.nii.gz), NRRD, MetaImage (.mha/.mhd) or a DICOM series folder"
            raise ImageError(f"{p}: cannot read it as an image ({_first_line(exc)})", hint=hint) from exc
    finally:
        _restore_locale(saved_locale)


def read_warnings(image: sitk.Image) -> list[str]:
    """What :func:`read_image` noted about how it read ``image`` (which DICOM series, uneven slices...); [] if
    nothing. :func:`check_input` includes these."""
    if _READ_WARNINGS_KEY not in image.GetMetaDataKeys():
        return []
    try:
        return [str(w) for w in json.loads(image.GetMetaData(_READ_WARNINGS_KEY))]
    except ValueError:
        return []


def as_volume(image: sitk.Image, name: str | Path = "the image", min_slices: int = 3) -> sitk.Image:
    """``image`` as the 3D single-channel volume a model segments, or ImageError saying what it is instead.

    A 4D image with one time point becomes that 3D volume (same geometry). Refused: 2D images, volumes thinner
    than ``min_slices`` voxels along an axis (a single slice), 4D series, RGB/vector images.

    Example::

        ct = as_volume(read_image("ct.nii.gz"), "ct.nii.gz")
    """
    dim, size = image.GetDimension(), image.GetSize()
    comps = image.GetNumberOfComponentsPerPixel()
    if dim == 4 and size[3] == 1:
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
        dim, size = 3, image.GetSize()
    if dim == 4:
        raise ImageError(f"{name}: a 4D image ({_fmt(size)}: {size[3]} volumes, a time series or several "
                         "channels); hpcseg segments one 3D volume",
                         hint="extract the volume you want first, e.g. in Python: "
                              "sitk.WriteImage(sitk.ReadImage(IN)[:, :, :, 0], OUT)")
    if dim == 2:
        raise ImageError(f"{name}: a 2D image ({_fmt(size)}); hpcseg segments 3D volumes",
                         hint="give the whole scan (for DICOM: the folder that holds all slices of the series)")
    if dim != 3:
        raise ImageError(f"{name}: a {dim}D image; hpcseg segments 3D volumes")
    if comps > 1:
        raise ImageError(f"{name}: {comps} values per voxel (an RGB or vector image, e.g. a screenshot or a "
                         "colour rendering); hpcseg segments grey-level scans",
                         hint="give the original CT/MRI (for DICOM: the series folder), not an exported picture")
    if min(size) < min_slices:
        what = "a single slice" if min(size) == 1 else f"only {min(size)} voxels thick"
        raise ImageError(f"{name}: {what} ({_fmt(size)} voxels); hpcseg segments 3D volumes",
                         hint="give the whole scan (for DICOM: the folder that holds all slices of the series)")
    return image


def finite_voxels(image: sitk.Image) -> tuple[sitk.Image, int]:
    """``(image, n)``: NaN and ±inf voxels (n of them) replaced by the lowest finite value (air for CT, background
    for MRI); the same image when there are none or the pixel type is an integer one."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32,
                                  sitk.sitkVectorFloat64):
        return image, 0
    arr = sitk.GetArrayViewFromImage(image)
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if not n:
        return image, 0
    fill = float(arr[~bad].min()) if n < arr.size else 0.0
    fixed = np.where(bad, fill, arr).astype(arr.dtype)
    out = sitk.GetImageFromArray(fixed, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out, n


def nonfinite_warning(n: int) -> str:
    """The QA sentence for ``n`` NaN/inf voxels (the same from :func:`check_input` and the client)."""
    return (f"{n} voxels are not numbers (NaN or infinite; a broken conversion?): the hpcseg client sends them as "
            "the image's lowest value")



def _check_nifti_complete(p: Path) -> None:
    """Refuse a truncated NIfTI: ITK reads one as complete, the missing voxels as 0 (a silently wrong scan)."""
    name = p.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")) or not p.is_file():
        return
    try:
        with open(p, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as fh:
            head = fh.read(544)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageError(f"{p}: damaged or truncated gzip data ({exc or type(exc).__name__})",
                         hint="copy or export the file again") from exc
    expected = _nifti_data_end(head)
    if expected is None:
        return  # not a NIfTI header we understand: let ITK say what it is
    if not gz:
        have = p.stat().st_size
    else:
        try:
            with open(p, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", fh.read(4))  # the uncompressed size mod 2**32 (gzip trailer)
        except (OSError, struct.error):
            isize = -1
        if isize == expected % 2**32:
            return
        have = 0  # a multi-member file, or truncated: read it through to be sure
        try:
            with gzip.open(p, "rb") as fh:
                while chunk := fh.read1(1 << 20):
                    have += len(chunk)
        except (OSError, EOFError, zlib.error):
            pass
    if have < expected:
        raise ImageError(f"{p}: truncated: about {have} of the {expected} bytes its NIfTI header announces "
                         "(a copy or download that stopped early?)", hint="copy or export the file again")


def _nifti_data_end(head: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 needs (header, extensions and voxels), from its header; None if unsure."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 352)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:7] == b"n+2":
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            offset = max(struct.unpack(endian + "q", head[168:176])[0], 544)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : dims[0] + 1]):
        return None
    return offset + int(np.prod([int(d) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8


def read_mask(path: str | Path) -> tuple[sitk.Image, dict[str, int]]:
    """Read a mask and its label names (from .seg.nrrd metadata or the ``.labels.json`` sidecar; {} if none).

    Example::

        mask, labels = read_mask("ct.seg.nrrd")     # labels == {"liver": 1}
    """
    image = read_image(path)
    keys = set(image.GetMetaDataKeys())
    labels: dict[str, int] = {}
    i = 0
    while f"Segment{i}_Name" in keys:
        value = image.GetMetaData(f"Segment{i}_LabelValue") if f"Segment{i}_LabelValue" in keys else str(i + 1)
        labels[image.GetMetaData(f"Segment{i}_Name")] = int(value)
        i += 1
    sidecar = labels_sidecar(path)
    if not labels and sidecar.is_file():
        labels = {str(k): int(v) for k, v in json.loads(sidecar.read_text())["labels"].items()}
    return image, labels


def labels_sidecar(mask_path: str | Path) -> Path:
    """Where a mask's label names live when its format cannot hold them: ``seg.nii.gz`` → ``seg.labels.json``."""
    p = Path(mask_path)
    name = p.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".labels.json")

