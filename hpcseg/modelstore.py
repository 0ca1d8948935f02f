"""Model versions on the cluster: fine-tune into a new version folder, move ``current`` only if it is no worse.

Layout under a models dir (the server serves ``<name>/current``)::

    <name>/<version>/      weights, hpcseg-model.json, metrics.json, train.log, gate.json (the promotion decision),
                           reference.json + reference/ (its reference validation set): written once
    <name>/current         symlink to the version served; replaced atomically (symlink to a temp name + rename)
    <name>/history.jsonl   one line per fine-tuning run: base, new version, Dice before/after, decision
    <name>/.lock           flock for choosing version numbers

The first fine-tune of a built-in model (e.g. ``phantom-unet``) starts from the copy shipped in the package.
Versions are whole numbers counted up from the base's major version. The new version becomes ``current`` only if
the promotion gate (:mod:`hpcseg.gate`) says so: no label's Dice drops by more than the tolerance (0.02) on the
base version's reference set or on the dataset's validation split, compared label by label (never the mean), and
the dataset has at least 3 validation cases; ``--force`` overrides and is recorded. The per-label table and the
reason go to the job's log, the version's ``train.log``, ``gate.json`` and ``history.jsonl`` (``hpcseg models``
shows them). A run that fails leaves ``current`` untouched and says why in the job's log.

``HPCSEG_TEST_UNMASKED_LOSS=1`` in the job's environment disables the partial-label loss masking: a test-only
switch for the ablation the gate must refuse (see :mod:`hpcseg.partial`); never set it for real work.

This module runs inside the training job (``python -m hpcseg.modelstore finetune ...``, see
``templates/train.sh.j2``) and, for listings, on the login node.

Example::

    result = finetune(Path("~/.hpcseg/models").expanduser(), "phantom-unet", Path("datasets/phantoms"), epochs=3)
    result["promoted"], result["version"]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("hpcseg.modelstore")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def current_folder(models_dir: Path, name: str) -> Path | None:
    """The folder ``<name>/current`` points to, else the built-in model of that name, else None."""
    cur = models_dir / name / "current"
    if cur.exists():
        return cur.resolve()
    from .server.models import builtin_models_dir

    builtin = builtin_models_dir() / name
    return builtin if (builtin / "hpcseg-model.json").exists() else None


def _major(version: str) -> int:
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else 0


def reserve_version(root: Path, base_version: str) -> str:
    """The next whole-number version under ``root``, reserved by a marker so two runs never pick the same."""
    with _locked(root):
        taken = [_major(p.name.lstrip(".").split(".")[0].removeprefix("reserved-")) for p in root.iterdir()]
        version = str(max([_major(base_version), *taken]) + 1)
        (root / f".reserved-{version}").touch()
    return version


def set_current(root: Path, version: str) -> None:
    """Point ``current`` at a version atomically: readers see the old or the new link, never none."""
    tmp = root / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)
    os.replace(tmp, root / "current")


def _eager(cases: list[Any]) -> list[Any]:
    """Cases loaded once (phantoms are generated, files read): the same voxels score the base and the new."""
    from .gate import Case

    out = []
    for c in cases:
        data = c.load()
        out.append(Case(c.name, lambda data=data: data, c.annotated))
    return out


def evaluate(folder: Path, sets: dict[str, list[Any]], *, device: str = "auto") -> dict[str, dict[str, Any]]:
    """Per-label Dice (:func:`hpcseg.gate.score`) of the servable model in ``folder`` on each named set."""
    from .gate import score
    from .server.models import load_model

    model = load_model(folder, device)
    return {name: score(lambda im: model.infer(im, {}), cases, model.manifest.labels) for name, cases in sets.items()}


def finetune(models_dir: Path, name: str, dataset: Path, *, epochs: int | None = None, force: bool = False,
             device: str = "auto", seed: int = 0, tolerance: float | None = None,
             label_map: dict[str, str] | None = None, masked: bool = True, lr: float | None = None) -> dict[str, Any]:
    """Fine-tune the current version of ``name`` on ``dataset`` into a new version; promote it only if the gate
    (:func:`hpcseg.gate.decide`) finds no label worse by more than ``tolerance`` on the base version's reference
    set or the dataset's validation split. ``masked=False`` is the test-only ablation of :mod:`hpcseg.partial`."""
    from .errors import HpcsegError
    from .gate import TOLERANCE, decide, format_rows, reference_cases, write_reference
    from .partial import label_value_map
    from .server.models import read_manifest
    from .training import _cases_for_gate, model_cases, read_dataset, train

    tolerance = TOLERANCE if tolerance is None else float(tolerance)
    base = current_folder(models_dir, name)
    if base is None:
        raise HpcsegError(f"no model {name!r} in {models_dir} and no built-in of that name")
    base_manifest = read_manifest(base)
    root = models_dir / name
    version = reserve_version(root, base_manifest.version)
    log.info("fine-tuning %s %s (%s) on %s into version %s", name, base_manifest.version, base, dataset, version)
    try:
        labels, _train, val = read_dataset(dataset, 0.2, seed)
        value_map, names = label_value_map(labels, base_manifest.labels, label_map)
        val = model_cases(val, value_map, names, base_manifest.labels)
        sets = {"reference": _eager(reference_cases(base)), "validation": _eager(_cases_for_gate(val))}
        log.info("gate sets: reference %d case(s) kept with %s %s, validation %d case(s) of the dataset",
                 len(sets["reference"]), name, base_manifest.version, len(sets["validation"]))
        before = evaluate(base, sets, device=device)
        metrics = train(base, dataset, root / version, epochs=epochs, device=device, seed=seed, version=version,
                        label_map=label_map, masked=masked, lr=lr)
        after = evaluate(root / version, sets, device=device)
        write_reference(root / version, base, sets["validation"])
    finally:
        (root / f".reserved-{version}").unlink(missing_ok=True)
    decision = decide(before, after, n_val=len(sets["validation"]), tolerance=tolerance, force=force)
    for w in decision.warnings:
        log.warning("warning: %s", w)
    table = [f"per-label Dice, {name} {base_manifest.version} -> {version} (tolerance {tolerance}):",
             *("  " + line for line in format_rows(decision.rows))]
    verdict = (f"promoted: {name} current -> {version}" if decision.promoted else
               f"not promoted: current stays {base_manifest.version}") + ": " + "; ".join(decision.reasons)
    for line in [*table, verdict]:
        log.info("%s", line)
    record = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": name,
              "base_version": base_manifest.version, "version": version, "dataset": str(dataset),
              "before": before, "after": after, "loss_masked": masked, "label_map": label_map or {},
              "best_epoch": metrics["best_epoch"], **decision.to_dict()}
    folder = root / version
    tmp = folder / "gate.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(folder / "gate.json")
    with open(folder / "train.log", "a", encoding="utf-8") as fh:  # the version's own log says it too
        fh.write("".join(f"{line}\n" for line in [*decision.warnings, *table, verdict]))
    if decision.promoted:
        set_current(root, version)
    with _locked(root), open(root / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def list_models(models_dir: Path) -> list[dict[str, Any]]:
    """Every model family under ``models_dir`` (and the built-ins): versions, metrics, which is current."""
    from .server.models import builtin_models_dir

    out = []
    seen = set()
    for base in (models_dir, builtin_models_dir()):
        if not base.is_dir():
            continue
        for child in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child.name in seen:
                continue
            seen.add(child.name)
            versions = []
            if (child / "hpcseg-model.json").exists():
                versions.append(_version_info(child, child.name))
                current = child.name
            else:
                cur = child / "current"
                current = os.readlink(cur) if cur.is_symlink() else None
                for v in sorted((p for p in child.iterdir() if p.is_dir() and (p / "hpcseg-model.json").exists()
                                 and p.name != "current"), key=lambda p: _major(p.name)):
                    versions.append(_version_info(v, v.name))
            out.append({"name": child.name, "current": current, "builtin": base != models_dir,
                        "versions": versions})
    return out


def _version_info(folder: Path, label: str) -> dict[str, Any]:
    info: dict[str, Any] = {"version": label}
    try:
        man = json.loads((folder / "hpcseg-model.json").read_text(encoding="utf-8"))
        info.update(model_version=man.get("version"), type=man.get("type"), labels=man.get("labels"))
    except (OSError, ValueError) as exc:
        info["error"] = str(exc)
    try:
        m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        info["val_dice"] = m.get("val_dice")
    except (OSError, ValueError):
        pass
    try:
        g = json.loads((folder / "gate.json").read_text(encoding="utf-8"))
        info["gate"] = {k: g.get(k) for k in ("base_version", "promoted", "forced", "reasons", "warnings", "rows",
                                               "tolerance", "dataset")}
    except (OSError, ValueError):
        pass
    return info


def parse_label_map(text: str | None) -> dict[str, str] | None:
    """``"tumour=liver,vessels=body"`` as a dict (None for None or empty)."""
    from .errors import ConfigError

    if not text:
        return None
    out = {}
    for item in text.split(","):
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ConfigError(f"--label-map {text!r}: expected DATASET_LABEL=MODEL_LABEL,... e.g. tumour=liver")
        out[src.strip()] = dst.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcseg.modelstore", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="fine-tune the current version into a new one; promote if no worse")
    f.add_argument("--models-dir", type=Path, required=True)
    f.add_argument("--model", required=True)
    f.add_argument("--dataset", type=Path, required=True)
    f.add_argument("--epochs", type=int)
    f.add_argument("--force", action="store_true",
                   help="make the new version current even if a label's Dice dropped or validation cases are few")
    f.add_argument("--tolerance", type=float, help="largest accepted drop of a label's Dice (default 0.02)")
    f.add_argument("--label-map", help="DATASET_LABEL=MODEL_LABEL,... for dataset labels the model lacks")
    f.add_argument("--device", default="auto")
    f.add_argument("--seed", type=int, default=0)
    ls = sub.add_parser("list", help="models, versions and metrics as JSON")
    ls.add_argument("--models-dir", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.cmd == "list":
        print(json.dumps(list_models(args.models_dir.expanduser())))
        return 0
    from .errors import HpcsegError

    try:
        result = finetune(args.models_dir.expanduser(), args.model, args.dataset.expanduser(), epochs=args.epochs,
                          force=args.force, device=args.device, seed=args.seed, tolerance=args.tolerance,
                          label_map=parse_label_map(args.label_map),
                          masked=os.environ.get("HPCSEG_TEST_UNMASKED_LOSS") != "1")
    except (HpcsegError, OSError, ValueError) as exc:
        log.error("training failed, current version untouched: %s", exc)
        return 2
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
