"""DICOM SEG out: a mask as a DICOM Segmentation object over its source series (``--format dicom-seg``).

Written with highdicom (the ``dicom`` extra; it brings pydicom): one binary segment per label, named after the
label, with a SNOMED CT code where hpcseg knows one and a generic "tissue" code otherwise; the algorithm (model and
version) is recorded as automatic. The object references every source instance (Referenced Series Sequence and
each frame's Derivation Image Sequence) and takes the series' frame of reference, so PACS and viewers (3D Slicer,
OHIF) load it over the series. The file is written to a temp name and renamed.

The mask must be in the geometry of the series as hpcseg reads it (:func:`hpcseg.imaging.read_image`): slices in
the order GDCM sorts the series' files, which is the order given to highdicom here.

Example::

    write_dicom_seg(mask, "study/series/IM0001.dcm", Path("out/case.dcm"), {"liver": 1}, model="ct-body",
                    version="1.0.0")
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

#: SNOMED CT codes for the structures hpcseg's models name (value, meaning); others get "Tissue"
_SCT = {"body": ("38266002", "Entire body"), "lungs": ("39607008", "Lung"), "lung": ("39607008", "Lung"),
        "bone": ("272673000", "Bone"), "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"),
        "kidney": ("64033007", "Kidney"), "kidneys": ("64033007", "Kidney"), "heart": ("80891009", "Heart"),
        "pancreas": ("15776009", "Pancreas"), "stomach": ("69695003", "Stomach"), "aorta": ("15825003", "Aorta")}


def series_files(source: str | Path) -> list[str]:
    """The files of the DICOM series that ``source`` (a file of it, or a folder with one series) belongs to,
    in GDCM's slice order: the order of the volume's z axis."""
    from .imaging.dicom import _is_dicom_file

    src = Path(source)
    if src.is_file() and not _is_dicom_file(src):
        raise ImageError(f"{source}: not a DICOM file; a DICOM SEG needs a DICOM series as input",
                         hint="give the series' folder or one of its files, or write another mask format")
    folder = src if src.is_dir() else src.parent
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if src.is_file():
        for sid in ids:
            files = list(reader.GetGDCMSeriesFileNames(str(folder), sid))
            if any(Path(f).samefile(src) for f in files):
                return files
    if len(ids) == 1:
        return list(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    raise ImageError(f"{source}: cannot tell which DICOM series the mask belongs to",
                     hint="give one file of the series")


def write_dicom_seg(mask: sitk.Image, source: str | Path, out: str | Path, labels: dict[str, int], *, model: str,
                    version: str) -> Path:
    """Write ``mask`` (label values as in ``labels``) as a DICOM SEG over the series of ``source``."""
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise ImageError("DICOM SEG output needs highdicom", hint='pip install "hpcseg[dicom]"') from exc
    from . import __version__

    files = series_files(source)
    sources = [pydicom.dcmread(f) for f in files]
    arr = sitk.GetArrayFromImage(mask)
    if arr.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ImageError(f"{source}: the mask ({arr.shape}) is not on the series' grid ({len(sources)} slices of "
                         f"{sources[0].Rows}x{sources[0].Columns})")
    present = [(name, value) for name, value in labels.items() if value > 0]
    if not present:
        raise ImageError(f"{source}: no label to write in a DICOM SEG")
    segs = np.zeros(arr.shape, dtype=np.uint8)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(name=model, version=version or "unknown",
                                                   family=codes.cid7162.ArtificialIntelligence)
    for number, (name, value) in enumerate(present, 1):
        segs[arr == value] = number
        code, meaning = _SCT.get(name.lower(), ("85756007", "Tissue"))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=segs, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=999,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="hpcseg", manufacturer_model_name=model,
        software_versions=__version__, device_serial_number="0", series_description=f"hpcseg {model} {version}",
        omit_empty_frames=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".dcm", dir=out.parent)
    os.close(fd)
    try:
        seg.save_as(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
