"""Images and masks: reading, writing, geometry checks, input QA, resampling, and the wire codecs.

Shared by the client and the server (the only module they share besides the model code). Everything is a
``SimpleITK.Image``; numpy arrays from ``sitk.GetArrayFromImage`` are in (z, y, x) order while sizes, spacings and
voxel indices are in ITK (x, y, z) order.

Formats read: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd), MetaImage (.mha, .mhd) and DICOM series (a folder,
or any file of the series, with or without a suffix). Masks are written atomically in the reference image's exact
geometry, with their label names: Slicer's segment metadata in ``.seg.nrrd`` files, otherwise a
``<stem>.labels.json`` sidecar next to the mask.

What real scans bring, and what happens: a truncated NIfTI, a folder of two alike DICOM series, slices in several
orientations or repeating positions are refused (``ImageError``: one sentence and a hint); a scout next to the
scan, unevenly spaced (missing) or sheared slices, NaN voxels, non-CT intensities for a CT model become
:func:`check_input` warnings; :func:`as_volume` refuses 2D, single-slice, 4D and RGB inputs before anything is
sent; :func:`check_output_path` refuses an unwritable mask path before any work.

Wire codecs (HTTP ``Content-Type`` values, used by client and server alike):

``application/x-nifti+gzip`` (``CONTENT_TYPE_NIFTI``)
    A plain ``.nii.gz`` file (gzip level 1): any tool reads it; slow to compress, ratio about 1.7 on CT.
``application/x-hpcseg-volume+zstd`` (``CONTENT_TYPE_ZSTD``)
    ``b"HSV1"``, a 4-byte little-endian header length, a UTF-8 JSON header (size, spacing, origin, direction,
    numpy dtype, components), then one zstd frame (level 1) of the voxel bytes byte-shuffled (all first bytes of
    every voxel, then all second bytes, ...), which makes CT compress much better and faster (see bench/).

Example::

    image = read_image("ct.nii.gz")
    for warning in check_input(image, {"modality": "CT"}):
        print("warning:", warning)
    write_mask(labels, "ct.seg.nrrd", {"liver": 1}, reference=image)
    payload = encode(image, CONTENT_TYPE_ZSTD); same = decode(payload, CONTENT_TYPE_ZSTD)
"""

from __future__ import annotations

import gzip
import json
import locale
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hpcseg.errors import ImageError

CONTENT_TYPE_NIFTI = "application/x-nifti+gzip"
CONTENT_TYPE_ZSTD = "application/x-hpcseg-volume+zstd"
CONTENT_TYPES = (CONTENT_TYPE_ZSTD, CONTENT_TYPE_NIFTI)

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
GEOMETRY_TOLERANCE = 1e-3
MASK_SUFFIXES = IMAGE_SUFFIXES  # a mask is written in every format an image is read from
_ZSTD_MAGIC = b"HSV1"
_READ_WARNINGS_KEY = "hpcseg_read_warnings"  # image metadata: read_image's notes, for check_input
_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


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


def _is_dicom_file(p: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` at byte 128), whatever its name (scanners write files without suffix)."""
    if not p.is_file():
        return False
    if p.name.upper() == "DICOMDIR":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _current_locale() -> str | None:
    try:
        return locale.setlocale(locale.LC_ALL)
    except locale.Error:
        return None


def _restore_locale(saved: str | None) -> None:
    """GDCM may switch the process to the C locale; put back what was there (text encodings depend on it)."""
    if saved is None:
        return
    try:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)
    except locale.Error:
        pass


class _QuietITK:
    """ITK's own warnings (printed to stderr, e.g. "Non uniform sampling") off; hpcseg says it in its words."""

    def __enter__(self) -> None:
        self._was = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)

    def __exit__(self, *exc: object) -> None:
        sitk.ProcessObject.SetGlobalWarningDisplay(self._was)


def _read_dicom(p: Path) -> sitk.Image:
    folder = p if p.is_dir() else p.parent
    reader = sitk.ImageSeriesReader()
    notes: list[str] = []
    with _QuietITK():
        try:
            ids = reader.GetGDCMSeriesIDs(str(folder))
            series = {sid: list(reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in ids}
        except RuntimeError as exc:
            if p.is_file() and p.name.upper() != "DICOMDIR":  # one unreadable neighbour: read this file alone
                notes.append(f"could not list the other files of {folder} ({_first_line(exc)}): read {p.name} "
                             "alone")
                series = {"": [str(p)]}
            else:
                raise ImageError(f"{folder}: cannot list DICOM series ({_first_line(exc)})",
                                 hint="does the folder hold a damaged or unusual DICOM file? move the scan's "
                                      "files into a folder of their own") from exc
    if p.is_file() and p.name.upper() != "DICOMDIR" and "" not in series:
        series = {sid: files for sid, files in series.items() if any(_same_file(f, p) for f in files)}
        if not series:
            raise ImageError(f"{p}: GDCM finds no image series for this file (a report, a plan or a DICOMDIR?)",
                             hint="give the folder that holds the slices of the scan")
    if not series:
        raise ImageError(f"{folder}: no DICOM series found", hint=_where_are_the_images(folder))
    sid, files = _pick_series(folder, series, notes)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position and orientation, checked below
    with _QuietITK():
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise ImageError(f"{folder}: cannot read the DICOM series of {len(files)} files ({_first_line(exc)})",
                             hint="is the series complete and uncompressed or in a transfer syntax GDCM "
                                  "reads?") from exc
    notes += _slice_notes(reader, files, image, folder)
    if notes:
        image.SetMetaData(_READ_WARNINGS_KEY, json.dumps(notes))
    return image


def _same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def _series_label(sid: str, files: list[str]) -> str:
    """``#3 "Abdomen 1.0 B30f" (CT, 312 files, 1.2.840...)``, from the series' first file."""
    number = text = modality = ""
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(files[0])
        r.ReadImageInformation()
        number, text, modality = (r.GetMetaData(k).strip() if r.HasMetaDataKey(k) else ""
                                  for k in ("0020|0011", "0008|103e", "0008|0060"))
    except RuntimeError:
        pass
    name = " ".join(x for x in (f"#{number}" if number else "", f'"{text}"' if text else "") if x)
    details = ", ".join(x for x in (modality, f"{len(files)} files", sid) if x)
    return f"{name} ({details})" if name else f"({details})"


def _pick_series(folder: Path, series: dict[str, list[str]], notes: list[str]) -> tuple[str, list[str]]:
    """The series to read: the only one, or the largest when every other has at most half its files (scouts,
    localizers, dose reports). Two alike: ImageError listing them all."""
    ranked = sorted(series.items(), key=lambda kv: -len(kv[1]))
    if len(ranked) == 1:
        return ranked[0]
    (sid, files), runner_up = ranked[0], ranked[1]
    if 2 * len(runner_up[1]) > len(files):
        listing = "; ".join(_series_label(s, f) for s, f in ranked[:8])
        more = f" and {len(ranked) - 8} more" if len(ranked) > 8 else ""
        raise ImageError(f"{folder}: {len(ranked)} DICOM series of similar size, which one? {listing}{more}",
                         hint="give one file of the series you want (its series is read), or move each series "
                              "into a folder of its own")
    others = ", ".join(_series_label(s, f) for s, f in ranked[1:5]) + (" ..." if len(ranked) > 5 else "")
    notes.append(f"{folder} holds {len(ranked)} DICOM series: read the largest, {_series_label(sid, files)}; "
                 f"left out {others} (give a file of another series to read that one)")
    return sid, files


def _slice_notes(reader: sitk.ImageSeriesReader, files: list[str], image: sitk.Image, folder: Path) -> list[str]:
    """Check the slices ITK stacked at one spacing: same orientation, distinct, evenly spaced, not sheared."""
    n = len(files)
    if n < 2 or image.GetDimension() != 3 or image.GetSize()[2] != n:
        return []
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
        iop = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):
        return [f"the slices of {folder} carry no usable position (ImagePositionPatient): their order and "
                "spacing are guesses"]
    if pos.shape != (n, 3) or iop.shape != (n, 6):
        return []
    if np.abs(iop - iop[0]).max() > 1e-3:
        raise ImageError(f"{folder}: the {n} slices of this series lie in different orientations (a localizer or "
                         "a reformatted mix), not one stack",
                         hint="use the series of the actual scan (put its files in a folder of their own)")
    normal = np.cross(iop[0][:3], iop[0][3:])
    depth = pos @ normal
    gaps = np.abs(np.diff(depth))
    notes = []
    if gaps.min() < 1e-3:
        raise ImageError(f"{folder}: {n - len(np.unique(np.round(depth, 3)))} slices of this series repeat a "
                         "position of another (several echoes, phases or time points in one series)",
                         hint="split the series (e.g. by echo or time, in 3D Slicer's DICOM module or dcm2niix) "
                              "and give one part")
    step = float(np.median(gaps))
    if gaps.max() - gaps.min() > max(0.05 * step, 0.01):
        used = image.GetSpacing()[2]
        off = float(np.max(np.abs(np.abs(depth - depth[0]) - np.arange(n) * used)))
        notes.append(f"the {n} slices are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm; missing "
                     f"slices?): read at one spacing of {used:.3g} mm, so slices sit up to {off:.3g} mm off their "
                     "true position; export the complete series or resample it to even spacing")
    steps = np.diff(pos, axis=0)
    along = steps @ normal
    across = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    tilt = float(np.degrees(np.arctan2(across.max(), np.abs(along).min() or 1e-9)))
    if tilt > 0.5:
        notes.append(f"the slices are sheared (gantry tilt of about {tilt:.1f} degrees): read as an unsheared "
                     "volume, so the anatomy is slightly skewed; a tilt-corrected reconstruction avoids that")
    return notes


def _where_are_the_images(folder: Path, limit: int = 5000) -> str:
    """A hint naming subfolders that hold DICOM files, or image files in the folder itself."""
    images = sorted(q.name for q in folder.iterdir() if q.is_file()
                    and any(q.name.lower().endswith(s) for s in IMAGE_SUFFIXES)) if folder.is_dir() else []
    if images:
        return f"it holds image files: give one of them ({', '.join(images[:3])})"
    found: list[str] = []
    seen = 0
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        depth = len(Path(root).relative_to(folder).parts)
        if depth >= 4:
            dirs.clear()
        if Path(root) != folder and any(_is_dicom_file(Path(root) / nm) for nm in sorted(names)[:3]):
            found.append(str(Path(root).relative_to(folder)))
        seen += len(names) + len(dirs)
        if len(found) >= 5 or seen > limit:
            break
    if found:
        return f"the DICOM files are in subfolders; give one of them: {', '.join(found)}"
    return "point to the folder that holds the .dcm files of one scan (not a parent folder)"


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


# ---------------------------------------------------------------------------------------------------- writing
def check_output_path(path: str | Path, source: str | Path | None = None) -> Path:
    """Refuse, before any work, a mask path hpcseg cannot write: an unsupported format, a folder, the input
    itself, or a place that is not writable. Missing folders are fine (:func:`write_mask` makes them).

    Example::

        check_output_path("out/ct-seg.seg.nrrd", source="ct.nii.gz")
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ImageError(f"{p}: is a folder", hint="give a file name, e.g. ct-seg.seg.nrrd")
    if not any(p.name.lower().endswith(s) and len(p.name) > len(s) for s in MASK_SUFFIXES):
        raise ImageError(f"{p}: cannot write a mask in this format ({''.join(p.suffixes) or 'no extension'})",
                         hint="name it .seg.nrrd (3D Slicer, keeps label names), .nii.gz, .nii, .nrrd, .mha or .mhd")
    if source is not None and p.exists() and _same_file(str(p), Path(source).expanduser()):
        raise ImageError(f"{p}: is the input image; writing the mask there would destroy it",
                         hint="choose another file name for the mask")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ImageError(f"{p}: cannot make its folder ({parent} is a file)", hint="choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImageError(f"{p}: {parent} is not writable for you", hint="choose an output folder you can write to")
    return p


def write_mask(mask: sitk.Image | np.ndarray, path: str | Path, labels: dict[str, int],
               reference: sitk.Image) -> Path:
    """Write ``mask`` atomically in ``reference``'s exact geometry, keeping the label names.

    A numpy mask must be in (z, y, x) order with the reference's size; an image mask on another grid is resampled
    (nearest neighbour). ``.seg.nrrd`` gets Slicer's segment metadata; other formats a ``.labels.json`` sidecar.

    Example::

        write_mask(labels, "out/ct.seg.nrrd", {"body": 1, "lungs": 2}, reference=ct)
    """
    path = Path(path)
    if not any(path.name.lower().endswith(s) for s in MASK_SUFFIXES):
        raise ImageError(f"{path}: cannot write a mask in this format",
                         hint="name it .seg.nrrd (3D Slicer, keeps label names), .nii.gz, .nii, .nrrd, .mha or .mhd")
    if isinstance(mask, np.ndarray):
        if mask.shape != tuple(reversed(reference.GetSize())):
            raise ImageError(f"{path}: mask array shape {mask.shape} is not the reference's (z, y, x) "
                             f"{tuple(reversed(reference.GetSize()))}")
        mask = sitk.GetImageFromArray(mask)
    elif not same_geometry(mask, reference):
        mask = resample_to_reference(mask, reference)
    values = [int(v) for v in labels.values()]
    ptype = sitk.sitkUInt8 if max(values, default=0) <= 255 else sitk.sitkUInt16
    out = sitk.Cast(mask, ptype) if mask.GetPixelID() != ptype else sitk.Image(mask)
    out.CopyInformation(reference)
    for key in out.GetMetaDataKeys():
        out.EraseMetaData(key)
    is_seg = path.name.lower().endswith(".seg.nrrd")
    if is_seg:
        for key, value in _slicer_segment_metadata(labels, out).items():
            out.SetMetaData(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_image(out, path, compress=True)
    if not is_seg:
        sidecar = labels_sidecar(path)
        _atomic_write_bytes(sidecar, json.dumps({"mask": path.name, "labels": labels}, indent=2).encode())
    return path


def _slicer_segment_metadata(labels: dict[str, int], mask: sitk.Image) -> dict[str, str]:
    """Slicer's .seg.nrrd keys for a single-layer labelmap (see Slicer's "Segmentation labelmap file format"):
    segment names, label values, colours and each segment's extent (the voxel box it occupies)."""
    meta = {"Segmentation_MasterRepresentation": "Binary labelmap",  # Slicer < 5.4 reads this name
            "Segmentation_SourceRepresentation": "Binary labelmap",
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
            "Segmentation_ReferenceImageExtentOffset": "0 0 0"}
    extents = _label_extents(sitk.GetArrayViewFromImage(mask), [int(v) for v in labels.values()])
    for i, (name, value) in enumerate(sorted(labels.items(), key=lambda kv: kv[1])):
        rgb = _colour(int(value))
        meta.update({f"Segment{i}_ID": f"Segment_{value}", f"Segment{i}_Name": name,
                     f"Segment{i}_LabelValue": str(value), f"Segment{i}_Layer": "0",
                     f"Segment{i}_Color": " ".join(f"{c:.3f}" for c in rgb),
                     f"Segment{i}_Extent": extents[int(value)],
                     f"Segment{i}_NameAutoGenerated": "0", f"Segment{i}_ColorAutoGenerated": "1",
                     f"Segment{i}_Tags": "|"})
    return meta


def _label_extents(arr: np.ndarray, values: Sequence[int]) -> dict[int, str]:
    """Per label value, ``"minI maxI minJ maxJ minK maxK"`` (ITK x, y, z voxel indices); empty: ``0 -1 0 -1 0 -1``.

    One bincount per slice finds each label's slices; only that slab is searched for the in-plane box.
    """
    top = max((int(v) for v in values), default=0) + 1
    in_slice = np.stack([np.bincount(arr[k].ravel(), minlength=top)[:top] > 0 for k in range(arr.shape[0])])
    out = {}
    for v in (int(v) for v in values):
        zs = np.flatnonzero(in_slice[:, v]) if v >= 0 else np.array([], int)
        if not zs.size:
            out[v] = "0 -1 0 -1 0 -1"
            continue
        slab = arr[zs[0] : zs[-1] + 1] == v
        ys, xs = np.flatnonzero(slab.any(axis=(0, 2))), np.flatnonzero(slab.any(axis=(0, 1)))
        out[v] = f"{xs[0]} {xs[-1]} {ys[0]} {ys[-1]} {zs[0]} {zs[-1]}"
    return out


def _colour(value: int) -> tuple[float, float, float]:
    golden = (value * 0.61803398875) % 1.0  # well-spread hues for consecutive label values
    return tuple(float(c) for c in _hsv_to_rgb(golden, 0.6, 0.9))


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives: mkstemp's 0600 is too private for a group's shared folders.

    Read from /proc (setting the umask to read it back would race with other threads of a server).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def _atomic_write_image(image: sitk.Image, path: Path, compress: bool, level: int = -1) -> None:
    if path.name.lower().endswith(".mhd"):
        return _atomic_write_mhd(image, path, compress, level)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=compress, compressionLevel=level)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise ImageError(f"{path}: cannot write it ({_first_line(exc)})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_mhd(image: sitk.Image, path: Path, compress: bool, level: int) -> None:
    """A .mhd header names its data file: write both under their final names in a temporary folder, then move
    the data file first and the header last."""
    tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            sitk.WriteImage(image, os.path.join(tmpdir, path.name), useCompression=compress, compressionLevel=level)
        except RuntimeError as exc:
            raise ImageError(f"{path}: cannot write it ({_first_line(exc)})") from exc
        names = sorted(os.listdir(tmpdir), key=lambda n: n == path.name)  # the header last
        for name in names:
            os.chmod(os.path.join(tmpdir, name), default_file_mode())
            os.replace(os.path.join(tmpdir, name), path.parent / name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------- QA and geometry
def check_input(image: sitk.Image, expect: dict | None = None) -> list[str]:
    """Warnings (sentences for a person) about an input that a model may segment badly; [] when it looks fine.

    ``expect`` keys (all optional): ``modality`` ("CT" checks for Hounsfield units), ``max_slice_mm`` (5),
    ``max_anisotropy`` (3), ``min_size`` (voxels per axis, 16), ``max_voxels`` (1.5e9).

    Example::

        check_input(mri, {"modality": "CT"})
        # ['intensities span 0 to 1450: not CT-like (CT air is about -1000 HU, bone above 300 HU) ...']
    """
    expect = expect or {}
    warnings: list[str] = read_warnings(image)
    spacing, size = image.GetSpacing(), image.GetSize()
    view = sitk.GetArrayViewFromImage(image)
    if view.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(view)))
        if bad:
            warnings.append(nonfinite_warning(bad))
    if str(expect.get("modality", "")).upper() == "CT" and image.GetNumberOfComponentsPerPixel() == 1:
        sample = view[:: max(1, view.shape[0] // 32)]  # a few dozen slices are enough for a range
        finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo > -500 or hi < 300:
            warnings.append(f"intensities span {lo:g} to {hi:g}: not CT-like (CT air is about -1000 HU, bone above "
                            "300 HU) but this model expects CT; is this an MRI, or a CT rescaled or windowed on "
                            "export? the result may be meaningless")
    thick = float(expect.get("max_slice_mm", 5.0))
    if max(spacing) > thick:
        warnings.append(f"voxels are {max(spacing):.3g} mm along one axis (over {thick:g} mm): thin structures "
                        "will be missed; use a thinner reconstruction if there is one")
    ratio = max(spacing) / max(min(spacing), 1e-9)
    if ratio > float(expect.get("max_anisotropy", 3.0)):
        warnings.append(f"spacing {_fmt(spacing)} mm is strongly anisotropic ({ratio:.1f}:1): results along the "
                        "coarse axis will be blocky")
    if min(size) < int(expect.get("min_size", 16)):
        warnings.append(f"the image is tiny ({_fmt(size)} voxels): is it a single slice or a thumbnail?")
    voxels = float(np.prod(size))
    if voxels > float(expect.get("max_voxels", 1.5e9)):
        warnings.append(f"the image is huge ({voxels / 1e6:.0f} M voxels): segmentation will be slow and may "
                        "run out of memory; crop it or use fast mode")
    return warnings


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> bool:
    """True when a and b share a voxel grid: equal size, and spacing, origin and direction equal within ``tol``.

    Tolerance (default 1e-3) is relative: spacing within ``tol × spacing``, origin within ``tol × smallest
    spacing`` (mm), direction cosines within ``tol``. Looser than ITK's 1e-6 because NIfTI stores geometry in
    float32, so a NIfTI round trip moves the origin by ~1e-5 mm.
    """
    if a.GetSize() != b.GetSize() or a.GetDimension() != b.GetDimension():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(sa - sb) > tol * np.maximum(sa, sb)):
        return False
    if np.any(np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin())) > tol * float(min(sa.min(), sb.min()))):
        return False
    return bool(np.all(np.abs(np.array(a.GetDirection()) - np.array(b.GetDirection())) <= tol))


def orientation_direction(code: str) -> tuple[float, ...]:
    """The direction matrix (row-major, as SimpleITK wants) whose axes point to ``code``'s letters.

    Codes name where each axis points, as MONAI's ``Orientation(axcodes=...)`` and ``sitk.DICOMOrient`` do:
    "LPS" is the identity (DICOM), "RAS" flips x and y (NIfTI/MONAI's usual).
    """
    axes = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    code = code.upper()
    if len(code) != 3 or any(c not in axes for c in code) or len({"LRPAIS".index(c) // 2 for c in code}) != 3:
        raise ValueError(f"orientation {code!r} is not three of L/R, P/A, S/I, one per axis (e.g. 'RAS')")
    cols = np.array([axes[c] for c in code], float).T
    return tuple(float(v) for v in cols.ravel())


def resample(image: sitk.Image, spacing: Sequence[float] | None = None, interpolator: str = "linear",
             direction: Sequence[float] | None = None, default_value: float | None = None) -> sitk.Image:
    """Resample onto a grid with ``spacing`` (and ``direction``) covering the same physical field of view.

    The new grid's outer voxel edges sit on the old ones (so down- then up-sampling lines up). ``spacing`` None keeps
    the spacing (each new axis that of the old axis it runs along); ``direction`` None keeps the direction.
    ``interpolator``: "linear", "nearest" (labels) or "bspline". Pixels outside the input get ``default_value``
    (default: the image minimum, e.g. air for CT; 0 for nearest).

    Example::

        iso = resample(ct, (1.5, 1.5, 1.5))
    """
    old_spacing, old_size = np.array(image.GetSpacing()), np.array(image.GetSize())
    old_dir = np.array(image.GetDirection()).reshape(3, 3)
    new_dir = old_dir if direction is None else np.array(direction, float).reshape(3, 3)
    if spacing is None:  # each new axis keeps the spacing of the old axis it runs along (a reorientation)
        new_spacing = old_spacing[np.argmax(np.abs(new_dir.T @ old_dir), axis=1)]
    else:
        new_spacing = np.array([float(s) for s in spacing])
    # The field of view: the 8 outer corners of the input's voxels, in physical space, then in the new axes.
    corners = np.array([[i, j, k] for i in (-0.5, old_size[0] - 0.5) for j in (-0.5, old_size[1] - 0.5)
                        for k in (-0.5, old_size[2] - 0.5)])
    phys = np.array(image.GetOrigin()) + (old_dir @ (corners * old_spacing).T).T
    local = phys @ new_dir  # coordinates along the new axes (new_dir is orthonormal)
    lo, hi = local.min(0), local.max(0)
    new_size = np.maximum(1, np.round((hi - lo) / new_spacing - 1e-6)).astype(int)
    centre = (lo + hi) / 2
    origin_local = centre - (new_size - 1) / 2 * new_spacing
    new_origin = new_dir @ origin_local
    if np.allclose(new_spacing, old_spacing) and np.allclose(new_dir, old_dir) and np.array_equal(new_size, old_size):
        return image
    if default_value is None:
        default_value = 0.0 if interpolator == "nearest" else float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, [int(n) for n in new_size], sitk.Transform(), _interpolator(interpolator),
                         [float(v) for v in new_origin], [float(s) for s in new_spacing],
                         [float(v) for v in new_dir.ravel()], float(default_value), image.GetPixelID())


def resample_to_reference(mask: sitk.Image, reference: sitk.Image, interpolator: str = "nearest") -> sitk.Image:
    """Resample ``mask`` (labels: nearest neighbour) onto ``reference``'s grid; the result has its exact geometry."""
    out = sitk.Resample(mask, reference, sitk.Transform(), _interpolator(interpolator), 0.0, mask.GetPixelID())
    out.CopyInformation(reference)
    return out


def _interpolator(name: str) -> int:
    try:
        return _INTERPOLATORS[name]
    except KeyError:
        raise ValueError(f"interpolator {name!r} is not one of {sorted(_INTERPOLATORS)}") from None


# ---------------------------------------------------------------------------------------------------- the wire
def encode(image: sitk.Image, content_type: str = CONTENT_TYPE_ZSTD, level: int = 1) -> bytes:
    """Serialise an image for HTTP in one of ``CONTENT_TYPES`` (voxels exact, geometry in full precision for zstd).

    Example::

        body = encode(ct)                      # application/x-hpcseg-volume+zstd
        body = encode(ct, CONTENT_TYPE_NIFTI)  # a .nii.gz file's bytes
    """
    if content_type == CONTENT_TYPE_NIFTI:
        with tempfile.TemporaryDirectory(prefix="hpcseg-") as tmp:
            path = os.path.join(tmp, "image.nii.gz")
            sitk.WriteImage(image, path, useCompression=True, compressionLevel=level)
            return Path(path).read_bytes()
    if content_type != CONTENT_TYPE_ZSTD:
        raise ImageError(f"unknown image content type {content_type!r}", hint=f"use one of {CONTENT_TYPES}")
    import zstandard

    arr = sitk.GetArrayViewFromImage(image)
    arr = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<"))
    header = json.dumps({"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                         "origin": list(image.GetOrigin()), "direction": list(image.GetDirection()),
                         "dtype": arr.dtype.str, "components": image.GetNumberOfComponentsPerPixel()}).encode()
    data = _shuffle(arr)
    body = zstandard.ZstdCompressor(level=level, threads=-1).compress(memoryview(data).cast("B"))
    return _ZSTD_MAGIC + struct.pack("<I", len(header)) + header + body


def decode(payload: bytes, content_type: str = CONTENT_TYPE_ZSTD) -> sitk.Image:
    """The inverse of :func:`encode`. Raises ImageError on a malformed payload."""
    if content_type == CONTENT_TYPE_NIFTI:
        with tempfile.TemporaryDirectory(prefix="hpcseg-") as tmp:
            path = os.path.join(tmp, "image.nii.gz")
            Path(path).write_bytes(payload)
            return read_image(path)
    if content_type != CONTENT_TYPE_ZSTD:
        raise ImageError(f"unknown image content type {content_type!r}", hint=f"use one of {CONTENT_TYPES}")
    import zstandard

    try:
        if payload[:4] != _ZSTD_MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack("<I", payload[4:8])
        h = json.loads(payload[8 : 8 + n])
        dtype, size, comps = np.dtype(h["dtype"]), [int(s) for s in h["size"]], int(h["components"])
        shape = tuple(reversed(size)) + ((comps,) if comps > 1 else ())
        raw = zstandard.ZstdDecompressor().decompress(payload[8 + n :], max_output_size=int(np.prod(shape)) *
                                                      dtype.itemsize)
        arr = _unshuffle(raw, dtype).reshape(shape)
    except (ValueError, KeyError, struct.error, zstandard.ZstdError) as exc:
        raise ImageError(f"malformed {CONTENT_TYPE_ZSTD} payload ({exc})") from exc
    image = sitk.GetImageFromArray(arr, isVector=comps > 1)
    image.SetSpacing(h["spacing"])
    image.SetOrigin(h["origin"])
    image.SetDirection(h["direction"])
    return image


def _shuffle(arr: np.ndarray) -> np.ndarray:
    """Byte-shuffle: byte 0 of every voxel, then byte 1, ... (what blosc/HDF5's shuffle filter does)."""
    n = arr.dtype.itemsize
    flat = arr.reshape(-1).view(np.uint8).reshape(-1, n)
    out = np.empty((n, flat.shape[0]), np.uint8)
    for k in range(n):  # one strided copy per byte plane: ~4x faster than a transpose copy
        out[k] = flat[:, k]
    return out


def _unshuffle(raw: bytes, dtype: np.dtype) -> np.ndarray:
    n = dtype.itemsize
    planes = np.frombuffer(raw, np.uint8).reshape(n, -1)
    out = np.empty(planes.size, np.uint8)
    for k in range(n):
        out[k::n] = planes[k]
    return out.view(dtype)


def _fmt(values: Sequence[float]) -> str:
    return "×".join(f"{v:.3g}" for v in values)


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file:line banner; the description line is the useful one (NRRD: teem's last).
    teem = [ln.removeprefix("[nrrd]").strip() for ln in lines if ln.startswith("[nrrd]")]
    if teem:
        return teem[-1][:300]
    useful = [ln for ln in lines if ln.lower().startswith(("description", "itk::error", "itk error", "sitk::error"))]
    line = useful[-1] if useful else lines[-1] if lines else type(exc).__name__
    line = re.sub(r"^(itk::error|itk error|sitk::error|description)\s*:?\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line,
                  flags=re.IGNORECASE)
    return (line or type(exc).__name__)[:300]
