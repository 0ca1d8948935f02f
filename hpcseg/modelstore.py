"""Model versions on the cluster: fine-tune into a new version folder, move ``current`` only if it is no worse.

Layout under a models dir (the server serves ``<name>/current``)::

    <name>/<version>/      weights, hpcseg-model.json, metrics.json, train.log: written once, never overwritten
    <name>/current         symlink to the version served; replaced atomically (symlink to a temp name + rename)
    <name>/history.jsonl   one line per fine-tuning run: base, new version, Dice before/after, decision
    <name>/.lock           flock for choosing version numbers

The first fine-tune of a built-in model (e.g. ``phantom-unet``) starts from the copy shipped in the package.
Versions are whole numbers counted up from the base's major version. The new version becomes ``current`` only if
its mean validation Dice is not below the base model's on the same validation cases (or with ``--force``); a run
that fails leaves ``current`` untouched and says why in the job's log.

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


def evaluate(folder: Path, dataset: Path, *, device: str = "auto", seed: int = 0) -> dict[str, float]:
    """Mean Dice per label of a servable model on the dataset's validation cases (the split training uses)."""
    import numpy as np
    import SimpleITK as sitk

    from . import imaging
    from .server.models import load_model
    from .training import _dice_per_label, read_dataset

    labels, _train, val = read_dataset(dataset, 0.2, seed)
    model = load_model(folder, device)
    scores: dict[str, list[float]] = {k: [] for k in model.manifest.labels}
    for case in val:
        image, truth = imaging.read_image(case["image"]), imaging.read_image(case["label"])
        pred = model.infer(image, {})
        d = _dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth),
                            model.manifest.labels)
        for k, v in d.items():
            scores[k].append(v)
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d) if d else float("-inf")


def finetune(models_dir: Path, name: str, dataset: Path, *, epochs: int | None = None, force: bool = False,
             device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Fine-tune the current version of ``name`` on ``dataset`` into a new version; promote it if no worse."""
    from .errors import HpcsegError
    from .server.models import read_manifest
    from .training import train

    base = current_folder(models_dir, name)
    if base is None:
        raise HpcsegError(f"no model {name!r} in {models_dir} and no built-in of that name")
    base_manifest = read_manifest(base)
    root = models_dir / name
    version = reserve_version(root, base_manifest.version)
    log.info("fine-tuning %s %s (%s) on %s into version %s", name, base_manifest.version, base, dataset, version)
    try:
        before = evaluate(base, dataset, device=device, seed=seed)
        log.info("current version %s: validation Dice %.4f %s", base_manifest.version, _mean(before),
                 json.dumps({k: round(v, 4) for k, v in before.items()}))
        metrics = train(base, dataset, root / version, epochs=epochs, device=device, seed=seed, version=version)
    finally:
        (root / f".reserved-{version}").unlink(missing_ok=True)
    after = metrics["val_dice"]
    promoted = force or _mean(after) >= _mean(before)
    decision = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": name,
                "base_version": base_manifest.version, "version": version, "dataset": str(dataset),
                "val_dice_before": before, "val_dice_after": after, "mean_before": _mean(before),
                "mean_after": _mean(after), "forced": force, "promoted": promoted}
    if promoted:
        set_current(root, version)
        log.info("promoted: %s current -> %s (mean Dice %.4f -> %.4f%s)", name, version, _mean(before),
                 _mean(after), ", forced" if force and _mean(after) < _mean(before) else "")
    else:
        log.info("not promoted: mean Dice dropped %.4f -> %.4f; current stays %s (use --force to override)",
                 _mean(before), _mean(after), base_manifest.version)
    with _locked(root), open(root / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(decision) + "\n")
    return decision


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
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcseg.modelstore", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="fine-tune the current version into a new one; promote if no worse")
    f.add_argument("--models-dir", type=Path, required=True)
    f.add_argument("--model", required=True)
    f.add_argument("--dataset", type=Path, required=True)
    f.add_argument("--epochs", type=int)
    f.add_argument("--force", action="store_true", help="make the new version current even if Dice dropped")
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
                          force=args.force, device=args.device, seed=args.seed)
    except (HpcsegError, OSError, ValueError) as exc:
        log.error("training failed, current version untouched: %s", exc)
        return 2
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
