"""Writing masks atomically in the reference geometry (temp file, then rename), with their label names."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hpcseg.errors import ImageError
from hpcseg.imaging._common import IMAGE_SUFFIXES, MASK_SUFFIXES, _first_line, _same_file
from hpcseg.imaging.geometry import resample_to_reference, same_geometry
from hpcseg.imaging.reading import labels_sidecar
from hpcseg.imaging.segmeta import _slicer_segment_metadata


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


