"""The promotion gate: per-label Dice of a model version on two validation sets, and the rule that promotes.

Why a module of its own: the same scoring serves training (best epoch), fine-tuning (before/after) and the
listing (``hpcseg models``), and the rule must be one piece of code that can be read and tested alone.

Scoring (:func:`score`): each case is segmented and compared label by label. A label is left out of a case's
score when the case does not annotate it (a partial mask says nothing about it) or when both truth and prediction
are empty (nothing to find, nothing found: no evidence, never counted as 1.0). A label's score on a set is the
mean over the cases that scored it, with that count.

The two sets (:func:`reference_cases`, :func:`write_reference`):

- the **reference set** kept with each model version in ``reference.json``: for a built-in, phantom recipes
  across sizes (regenerated bit for bit from their seeds); for a fine-tuned version, its base's reference set
  plus the validation cases of the dataset it was tuned on, copied into ``reference/``;
- the **validation split** of the new dataset.

The rule (:func:`decide`): promote only if no label's Dice drops by more than ``tolerance`` (absolute Dice,
default :data:`TOLERANCE`) on either set, and the new dataset has at least :data:`MIN_VAL_CASES` validation
cases; ``force`` overrides both and says so. A label scored before but not after (e.g. no longer predicted
anywhere) counts as a drop to 0.

Example::

    before = {"reference": score(base.infer, refs), "validation": score(base.infer, val)}
    after = {"reference": score(new.infer, refs), "validation": score(new.infer, val)}
    decision = decide(before, after, n_val=len(val))
    decision.promoted, decision.reasons
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: The largest drop in a label's Dice (absolute) the gate accepts on either set.
TOLERANCE = 0.02
#: Fewer validation cases than this in the new dataset: a warning, and promotion needs ``force``.
MIN_VAL_CASES = 3
REFERENCE_FILE = "reference.json"


@dataclass
class Case:
    """One validation case: image, truth and the label names its mask annotates (None: all of them)."""

    name: str
    load: Callable[[], tuple[sitk.Image, sitk.Image]]
    annotated: list[str] | None = None


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: dict[str, int],
                   annotated: Iterable[str] | None = None) -> dict[str, float | None]:
    """Dice of each label; None where the case does not annotate it or truth and prediction are both empty."""
    keep = set(labels) if annotated is None else set(annotated)
    out: dict[str, float | None] = {}
    for name, v in labels.items():
        if name not in keep:
            out[name] = None
            continue
        p, t = pred == v, truth == v
        denom = int(p.sum()) + int(t.sum())
        out[name] = None if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / denom
    return out


def score(predict: Callable[[sitk.Image], sitk.Image], cases: Iterable[Case],
          labels: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``{label: {"dice": mean or None, "n": cases scored}}`` of ``predict`` on ``cases``."""
    per: dict[str, list[float]] = {k: [] for k in labels}
    for case in cases:
        image, truth = case.load()
        pred = predict(image)
        d = dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth), labels,
                           case.annotated)
        for k, v in d.items():
            if v is not None:
                per[k].append(v)
    return {k: {"dice": float(np.mean(v)) if v else None, "n": len(v)} for k, v in per.items()}


def mean_dice(scores: dict[str, dict[str, Any]]) -> float | None:
    """The mean over the labels that were scored (for choosing a best epoch; the gate never uses it)."""
    vals = [s["dice"] for s in scores.values() if s["dice"] is not None]
    return float(np.mean(vals)) if vals else None


def _file_case(image: Path, label: Path, annotated: list[str] | None, name: str | None = None) -> Case:
    from hpcseg import imaging

    return Case(name or Path(image).name, lambda: (imaging.read_image(image), imaging.read_image(label)), annotated)


def cases_from_dataset(entries: Iterable[dict[str, Any]]) -> list[Case]:
    """Cases from :func:`hpcseg.training.read_dataset` entries (``image``, ``label``, ``annotated``)."""
    return [_file_case(Path(e["image"]), Path(e["label"]), e.get("annotated")) for e in entries]


def reference_cases(folder: Path) -> list[Case]:
    """The reference set kept with the model version in ``folder`` (empty when it has none)."""
    from hpcseg.phantoms import make_phantom

    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        return []
    spec = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for p in spec.get("phantoms", []):
        kw = dict(p)

        def load(kw: dict = kw) -> tuple[sitk.Image, sitk.Image]:
            image, labels, _ = make_phantom(**kw)
            return image, labels

        out.append(Case(f"phantom seed {kw['seed']} {'x'.join(map(str, kw['shape']))}", load))
    for c in spec.get("cases", []):
        out.append(_file_case(Path(folder) / c["image"], Path(folder) / c["label"], c.get("annotated"),
                              c.get("name")))
    return out


def write_reference(new_folder: Path, base_folder: Path | None, extra_cases: Iterable[Case] = (),
                    phantoms: list[dict] | None = None) -> Path:
    """Write ``new_folder/reference.json``: the base version's reference set (its case files copied along)
    plus ``extra_cases`` written into ``new_folder/reference/`` (labels in the model's values), plus ``phantoms``
    recipes."""
    new_folder = Path(new_folder)
    spec: dict[str, list] = {"phantoms": list(phantoms or []), "cases": []}
    if base_folder is not None and (Path(base_folder) / REFERENCE_FILE).is_file():
        base = json.loads((Path(base_folder) / REFERENCE_FILE).read_text(encoding="utf-8"))
        spec["phantoms"] = base.get("phantoms", []) + spec["phantoms"]
        for c in base.get("cases", []):
            spec["cases"].append(_copy_case(new_folder, Path(base_folder) / c["image"],
                                            Path(base_folder) / c["label"], c.get("annotated"), c.get("name")))
    for case in extra_cases:
        spec["cases"].append(_write_case(new_folder, case))
    tmp = new_folder / (REFERENCE_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    tmp.replace(new_folder / REFERENCE_FILE)
    return new_folder / REFERENCE_FILE


def _copy_case(folder: Path, image: Path, label: Path, annotated: list[str] | None,
               name: str | None = None) -> dict[str, Any]:
    (folder / "reference").mkdir(exist_ok=True)
    stem = name or image.name.removesuffix(".gz").removesuffix(".nii")
    dst_i, dst_l = folder / "reference" / f"{stem}_image.nii.gz", folder / "reference" / f"{stem}_label.nii.gz"
    shutil.copyfile(image, dst_i)
    shutil.copyfile(label, dst_l)
    return {"name": stem, "image": f"reference/{dst_i.name}", "label": f"reference/{dst_l.name}",
            "annotated": annotated}


def _write_case(folder: Path, case: Case) -> dict[str, Any]:
    (folder / "reference").mkdir(exist_ok=True)
    stem = case.name.removesuffix(".gz").removesuffix(".nii")
    image, truth = case.load()
    out = {"name": stem, "image": f"reference/{stem}_image.nii.gz", "label": f"reference/{stem}_label.nii.gz",
           "annotated": case.annotated}
    sitk.WriteImage(image, str(folder / out["image"]), useCompression=True)
    sitk.WriteImage(truth, str(folder / out["label"]), useCompression=True)
    return out


@dataclass
class Decision:
    """What the gate decided and why; ``rows`` has one line per (set, label) with before/after."""

    promoted: bool
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = TOLERANCE
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(before: dict[str, dict[str, dict[str, Any]]], after: dict[str, dict[str, dict[str, Any]]], *,
           n_val: int, tolerance: float = TOLERANCE, force: bool = False,
           min_val: int = MIN_VAL_CASES) -> Decision:
    """The gate's rule on per-label scores of two sets (``{"reference": ..., "validation": ...}``)."""
    rows, drops, warnings = [], [], []
    for set_name in before:
        for label, b in before[set_name].items():
            a = after.get(set_name, {}).get(label, {"dice": None, "n": 0})
            bd, ad = b["dice"], a["dice"]
            delta = None if bd is None or ad is None else ad - bd
            if bd is not None and ad is None:
                delta = -bd  # scored before, never found now
            dropped = delta is not None and delta < -tolerance
            rows.append({"set": set_name, "label": label, "before": bd, "after": ad, "n": max(b["n"], a["n"]),
                         "delta": delta, "dropped": dropped})
            if dropped:
                drops.append(f"{label} on the {set_name} set dropped {bd:.4f} -> {ad or 0.0:.4f} "
                             f"(more than the tolerance {tolerance})")
    if n_val < min_val:
        warnings.append(f"only {n_val} validation case{'s' if n_val != 1 else ''} in the dataset (fewer than "
                        f"{min_val}): its Dice says little")
    reasons = list(drops)
    if n_val < min_val:
        reasons.append(f"too few validation cases ({n_val} < {min_val}); upload more with --split val, or --force")
    if not reasons:
        return Decision(True, [f"no label dropped by more than {tolerance} on either set"], warnings, rows,
                        tolerance)
    if force:
        return Decision(True, ["forced despite: " + "; ".join(reasons)], warnings, rows, tolerance, True)
    return Decision(False, reasons, warnings, rows, tolerance)


def format_rows(rows: list[dict[str, Any]]) -> Iterator[str]:
    """Lines of a per-label before/after table (for the training log and ``hpcseg models``)."""
    def f(v: float | None) -> str:
        return "  -   " if v is None else f"{v:.4f}"

    for r in rows:
        mark = "  DROP" if r["dropped"] else ""
        delta = "" if r["delta"] is None else f" ({r['delta']:+.4f})"
        yield f"{r['set']:<10} {r['label']:<12} {f(r['before'])} -> {f(r['after'])}{delta} n={r['n']}{mark}"
