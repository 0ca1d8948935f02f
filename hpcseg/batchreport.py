"""A batch's per-case report: ``report.csv`` and ``report.json`` in the output folder, rewritten atomically.

One row per case, in input order: case id, input, status (``done``, ``failed``, ``invalid``, ``pending``,
``running``, ``cancelled``), the reason when not done, model and version, seconds of inference, the output file,
and per label its volume in mL and voxel count (counted in the written mask, so they match it), then the QA
warnings. It is what a study's statistician opens first, so the columns do not depend on which cases finished:
every label of the model has its two columns in every row.

Example::

    volumes = label_volumes(mask, {"liver": 1})     # {"liver": {"voxels": 51234, "ml": 1312.4}}
    write_report(out_dir, rows, labels=["liver"])
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

COLUMNS = ("case_id", "input", "status", "reason", "model", "model_version", "seconds", "output")


def label_volumes(mask: sitk.Image, labels: dict[str, int]) -> dict[str, dict[str, float | int]]:
    """Voxel count and volume (mL = voxels × voxel volume in mm³ / 1000) of each label in ``mask``."""
    arr = sitk.GetArrayViewFromImage(mask)
    counts = np.bincount(arr.ravel().astype(np.int64, copy=False), minlength=max(labels.values(), default=0) + 1)
    voxel_mm3 = math.prod(mask.GetSpacing())
    out: dict[str, dict[str, float | int]] = {}
    for name, value in labels.items():
        n = int(counts[value]) if value < len(counts) else 0
        out[name] = {"voxels": n, "ml": round(n * voxel_mm3 / 1000.0, 4)}
    return out


def report_rows(cases: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The report's rows from a batch state's cases (see :mod:`hpcseg.batch`)."""
    rows = []
    for c in cases:
        rows.append({"case_id": c["case_id"], "input": c["source"], "status": c.get("status", "pending"),
                     "reason": c.get("reason", ""), "model": model, "model_version": c.get("model_version", ""),
                     "seconds": c.get("seconds"), "output": c.get("output", ""),
                     "volumes": c.get("volumes") or {}, "warnings": list(c.get("warnings") or [])})
    return rows


def write_report(out_dir: Path, rows: list[dict[str, Any]], labels: list[str]) -> tuple[Path, Path]:
    """Write ``report.csv`` and ``report.json`` atomically; returns their paths."""
    from .batchworker import write_atomic

    names = list(dict.fromkeys([*labels, *(n for r in rows for n in r["volumes"])]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*COLUMNS, *(f"{n}_{k}" for n in names for k in ("ml", "voxels")), "warnings"])
    for r in rows:
        vols = [v for n in names for v in ((r["volumes"].get(n) or {}).get("ml", ""),
                                           (r["volumes"].get(n) or {}).get("voxels", ""))]
        seconds = "" if r["seconds"] is None else r["seconds"]
        w.writerow([*(r[k] if k != "seconds" else seconds for k in COLUMNS), *vols, " | ".join(r["warnings"])])
    csv_path, json_path = out_dir / "report.csv", out_dir / "report.json"
    write_atomic(csv_path, buf.getvalue().encode())
    write_atomic(json_path, json.dumps({"labels": names, "cases": rows}, indent=1).encode())
    return csv_path, json_path
