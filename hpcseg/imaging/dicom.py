"""DICOM series: finding, picking and reading one series (GDCM through SimpleITK), and what to tell a person
about how it was read (uneven or sheared slices, scouts left out). Used by :func:`hpcseg.imaging.read_image`."""

from __future__ import annotations

import json
import locale
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hpcseg.errors import ImageError
from hpcseg.imaging._common import _READ_WARNINGS_KEY, IMAGE_SUFFIXES, _first_line, _same_file


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

