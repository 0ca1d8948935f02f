"""Constants and small helpers shared by the imaging modules."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
GEOMETRY_TOLERANCE = 1e-3
MASK_SUFFIXES = IMAGE_SUFFIXES  # a mask is written in every format an image is read from
_READ_WARNINGS_KEY = "hpcseg_read_warnings"  # image metadata: read_image's notes, for check_input


def _same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False



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
