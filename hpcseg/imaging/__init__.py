"""Images and masks: reading, writing, geometry checks, input QA, resampling, and the wire codecs.

Shared by the client and the server (the only package they share besides the model code). Modules: `reading`
(files and masks in), `dicom` (series), `writing` (masks out, atomically), `segmeta` (Slicer segment metadata), `qa`
(input warnings), `geometry` (grids, resampling), `codecs` (the wire formats); this package re-exports their
public names. Everything is a
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


from hpcseg.imaging._common import GEOMETRY_TOLERANCE, IMAGE_SUFFIXES, MASK_SUFFIXES
from hpcseg.imaging.codecs import CONTENT_TYPE_NIFTI, CONTENT_TYPE_ZSTD, CONTENT_TYPES, decode, encode
from hpcseg.imaging.geometry import orientation_direction, resample, resample_to_reference, same_geometry
from hpcseg.imaging.qa import check_input, declared_modality, intensity_range, looks_like_ct, modality_warning
from hpcseg.imaging.reading import (
    as_volume,
    finite_voxels,
    labels_sidecar,
    nonfinite_warning,
    read_image,
    read_mask,
    read_warnings,
)
from hpcseg.imaging.writing import check_output_path, default_file_mode, write_mask

__all__ = [
    "CONTENT_TYPES", "CONTENT_TYPE_NIFTI", "CONTENT_TYPE_ZSTD", "GEOMETRY_TOLERANCE", "IMAGE_SUFFIXES",
    "MASK_SUFFIXES", "as_volume", "check_input", "check_output_path", "decode", "default_file_mode", "encode",
    "finite_voxels", "labels_sidecar", "nonfinite_warning", "orientation_direction", "read_image", "read_mask",
    "read_warnings", "resample", "resample_to_reference", "same_geometry", "write_mask",
    "declared_modality", "intensity_range", "looks_like_ct", "modality_warning",
]
