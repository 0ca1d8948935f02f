"""Training core: fit (or fine-tune) a segmentation network on an MSD-shaped dataset, write a servable model folder.

``train()`` reads ``dataset.json`` (Medical Segmentation Decathlon shape: ``training`` / ``validation`` lists of
``{"image", "label"}`` paths, ``labels`` as ``{"0": "background", "1": "liver"}`` or ``{"liver": 1}``), brings
every case onto the model's grid with the very code the server uses (:mod:`hpcseg.server.inference`), trains with
MONAI (DiceCELoss, Adam, random crops around labels, light intensity jitter), validates each epoch through the
server's own inference path on the original images (Dice per label), and keeps the best epoch.

The model folder is built in ``<out>.partial/`` and renamed to ``<out>`` only when complete: a server never sees
half a model. Progress goes to the logger ``hpcseg.training`` and to ``<out>.partial/train.log``, one line an epoch
(``epoch 3/10 loss 0.41 val_dice 0.87 (body 0.95 lungs 0.97 ...) 12 s``), so ``tail -f`` follows a run.

Validation cases: the dataset's ``validation`` list when it has one, else a seeded 20 % of ``training``.

Example::

    metrics = train("phantom-unet", "datasets/phantoms", "models/phantom-unet/2", epochs=30)
    metrics = train(Path("models/liver/1"), "datasets/liver", "models/liver/2", epochs=50)   # fine-tune

CLI (the ``phantom-unet`` recipe from scratch; the shipped 2.1.0 weights continued 2.0.0's with ``--from``,
see their train.log)::

    python -m hpcseg.training --builtin phantom-unet --out hpcseg/models/phantom-unet
    python -m hpcseg.training --model models/liver/1 --dataset datasets/liver --out models/liver/2 --epochs 50
    python -m hpcseg.training --builtin phantom-unet --from hpcseg/models/phantom-unet --out runs/pu --epochs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.errors import DatasetError, HpcsegError
from hpcseg.partial import annotated_values, label_value_map, partial_label_loss
from hpcseg.server.modelbase import ModelManifest, resolve_device
from hpcseg.server.models import read_manifest

log = logging.getLogger("hpcseg.training")

#: Built-in recipes: a manifest (without weights) and, for phantoms, how to make the dataset.
BUILTINS: dict[str, dict[str, Any]] = {
    "phantom-unet": {
        "manifest": {
            "name": "phantom-unet", "version": "2.1.0", "type": "segmentation",
            "labels": {"body": 1, "lungs": 2, "bone": 3, "liver": 4},
            "description": "A small 3D UNet trained on hpcseg's synthetic CT phantoms (body, lungs, bone, liver) at "
                           "realistic sizes; a demonstration model for phantoms, not for patients.",
            "network": {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 5,
                                                 "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                                                 "num_res_units": 1, "norm": "batch"}},
            # Batch norm, not MONAI's default instance norm: a window of nothing but air (a wide field of view)
            # has no variance to normalise by, and instance norm turns its noise into body and lungs.
            # A coarse grid: every input is seen at its physical size in voxels (a 300-450 mm torso is 100-150
            # voxels across), so the network need not learn scale, and a whole CT is a few windows.
            "spacing": [3.0, 3.0, 3.0], "roi_size": [48, 48, 48], "overlap": 0.25, "sw_batch_size": 1,
            "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True},
            # extra.augment travels with the model, so its fine-tunes train with the same intensity jitter (below)
            "extra": {"orientation": "LPS", "expect": {"modality": "CT"}, "fast": {"overlap": 0.0},
                      "augment": {"jitter": {"scale": 0.005, "shift": 0.0025}}},
        },
        # Realistic phantoms (torso 300-450 mm wide, field of view, spacing, noise and centre drawn per seed);
        # validation seeds are never used for training.
        # 512 of them: on 96 the liver's validation Dice fell while the loss still did (it learned the cases)
        "phantoms": {"train_seeds": list(range(0, 512)), "val_seeds": list(range(1000, 1004)),
                     "realistic": {"spacing_range": [1.5, 3.5]}},
        "epochs": 60, "lr": 3e-3, "batch_size": 2, "val_every": 5,
        # The liver (60 HU) differs from muscle (40 HU) by 20 HU, 0.01 of the normalised range: intensity jitter
        # of ±0.05 (±100 HU) hid it; CT is calibrated in HU, so ±0.0025 (±5 HU) shift and ±0.5 % scale (the
        # manifest's extra.augment above, kept for fine-tunes: with ±100 HU a fine-tune forgets the liver). And a
        # third of the windows centred on the liver (bg, body, lungs, bone, liver).
        "crop_ratios": [1, 1, 1, 1, 2],
        # The reference validation set kept with the model (reference.json): phantoms across sizes. The gate
        # compares every fine-tuned version with its base on these, label by label.
        "reference": {"phantoms": [
            {"seed": 2000, "shape": [64, 64, 48], "spacing": [2.5, 2.5, 2.5], "body_mm": 320.0},
            {"seed": 2001, "shape": [128, 128, 64], "spacing": [2.5, 2.5, 2.5], "body_mm": 300.0},
            {"seed": 2002, "shape": [160, 160, 64], "spacing": [2.0, 2.0, 3.0], "body_mm": 440.0, "noise": 15.0},
            {"seed": 2003, "shape": [192, 192, 80], "spacing": [1.8, 1.8, 2.5], "body_mm": 380.0, "noise": 5.0}]},
    },
}


def make_phantom_dataset(folder: Path, train_seeds: list[int], val_seeds: list[int],
                         grids: list[tuple[tuple[int, int, int], tuple[float, float, float]]] | None = None,
                         realistic: dict[str, Any] | None = None) -> Path:
    """Write an MSD-shaped dataset of phantoms.

    With ``grids``: seed i uses grid i mod len(grids) (validation on the first grid), the torso filling the view.
    With ``realistic``: :func:`hpcseg.phantoms.realistic_phantom` keyword arguments (torsos at real sizes).
    """
    from hpcseg.phantoms import LABELS, make_phantom, realistic_phantom

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    for split, seeds in (("training", train_seeds), ("validation", val_seeds)):
        for i, seed in enumerate(seeds):
            if realistic is not None:
                kw = {k: tuple(v) if isinstance(v, list) else v for k, v in realistic.items()}
                image, labels, _ = realistic_phantom(seed, **kw)
            else:
                assert grids, "make_phantom_dataset needs grids or realistic"
                shape, spacing = grids[i % len(grids)] if split == "training" else grids[0]
                image, labels, _ = make_phantom(seed, shape, spacing)
            name = f"phantom_{seed:04d}.nii.gz"
            sitk.WriteImage(image, str(folder / "imagesTr" / name), useCompression=True)
            sitk.WriteImage(labels, str(folder / "labelsTr" / name), useCompression=True)
            entries[split].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {"name": "phantoms", "description": "hpcseg synthetic CT phantoms", "tensorImageSize": "3D",
                "modality": {"0": "CT"}, "labels": {"0": "background", **{str(v): k for k, v in LABELS.items()}},
                "numTraining": len(train_seeds) + len(val_seeds), **entries}
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return folder


def read_dataset(dataset_dir: Path, val_fraction: float = 0.2,
                 seed: int = 0) -> tuple[dict[str, int], list[dict], list[dict]]:
    """(labels name→value, training cases, validation cases) of an MSD dataset; paths made absolute.

    A case is ``{"image", "label", "annotated"}``: ``annotated`` lists the label names its mask annotates (an
    entry's own ``"annotated"`` in dataset.json, written by ``hpcseg upload``), None when the entry does not say
    (then every dataset label is annotated).
    """
    path = Path(dataset_dir) / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the dataset manifest ({exc})") from exc
    raw = meta.get("labels") or {}
    if all(str(k).isdigit() for k in raw):
        labels = {str(name): int(v) for v, name in raw.items() if int(v) != 0}
    else:
        labels = {str(k): int(v) for k, v in raw.items() if int(v) != 0}

    def resolve(entries: list) -> list[dict]:
        out = []
        for e in entries or []:
            case: dict[str, Any] = {k: str((Path(dataset_dir) / e[k]).resolve()) for k in ("image", "label")}
            if not (Path(case["image"]).exists() and Path(case["label"]).exists()):
                raise DatasetError(f"{path}: case {e} names a file that does not exist")
            ann = e.get("annotated")
            if ann is not None and not set(ann) <= set(labels):
                raise DatasetError(f"{path}: case {e['image']} annotates {sorted(set(ann) - set(labels))}, "
                                   f"which are not among the dataset's labels {sorted(labels)}")
            case["annotated"] = list(ann) if ann is not None else None
            out.append(case)
        return out

    train_cases, val_cases = resolve(meta.get("training")), resolve(meta.get("validation"))
    if not val_cases and len(train_cases) >= 2:
        order = random.Random(seed).sample(range(len(train_cases)), len(train_cases))
        n_val = max(1, round(val_fraction * len(train_cases)))
        val_cases = [train_cases[i] for i in order[:n_val]]
        train_cases = [train_cases[i] for i in order[n_val:]]
    if not train_cases:
        raise DatasetError(f"{path}: no training cases", hint="upload image-mask pairs first")
    return labels, train_cases, val_cases


def model_cases(cases: list[dict], value_map: dict[int, int], names: dict[str, str],
                model_labels: dict[str, int]) -> list[dict]:
    """Dataset cases in the model's terms: ``annotated`` as model label names, ``value_map`` to remap masks."""
    by_value = {v: k for k, v in model_labels.items()}
    return [{**c, "annotated": [by_value[v] for v in annotated_values(c, names, model_labels)],
             "value_map": value_map} for c in cases]


def _read_label(case: dict) -> sitk.Image:
    """The case's mask with dataset label values remapped to the model's (values not in the map become 0)."""
    label = imaging.read_image(case["label"])
    vm = case.get("value_map")
    if not vm or all(k == v for k, v in vm.items()):
        return label
    arr = sitk.GetArrayFromImage(label)
    lut = np.zeros(max(int(arr.max()), max(vm)) + 1, np.uint8)
    for k, v in vm.items():
        lut[k] = v
    out = sitk.GetImageFromArray(lut[arr])
    out.CopyInformation(label)
    return out


def _prepare(case: dict, manifest: ModelManifest) -> dict[str, Any]:
    """One case on the model's grid: image (1, X, Y, Z) float32, label (1, X, Y, Z) uint8, annotated (C,) bool."""
    import torch

    from hpcseg.server.inference import image_to_tensor, model_grid_params, to_model_space

    image, label = imaging.read_image(case["image"]), _read_label(case)
    spacing, direction = model_grid_params(manifest, image, {})
    grid = to_model_space(image, spacing, direction)
    label = imaging.resample_to_reference(label, grid)
    lab = torch.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(label).transpose(2, 1, 0)).astype(np.uint8))
    annotated = torch.zeros(max(manifest.labels.values()) + 1, dtype=torch.bool)
    annotated[0] = True
    for name in case.get("annotated") or manifest.labels:
        annotated[manifest.labels[name]] = True
    return {"image": image_to_tensor(grid, manifest.intensity)[0], "label": lab[None], "annotated": annotated}


def _cases_for_gate(cases: list[dict]) -> list[Any]:
    from hpcseg.gate import Case

    return [Case(Path(c["image"]).name, lambda c=c: (imaging.read_image(c["image"]), _read_label(c)),
                 c.get("annotated")) for c in cases]


def train(model: str | Path, dataset_dir: str | Path, out_dir: str | Path, epochs: int | None = None,
          device: str = "auto", lr: float | None = None, batch_size: int | None = None, seed: int = 0,
          val_fraction: float = 0.2, version: str | None = None, dataset_name: str | None = None,
          label_map: dict[str, str] | None = None, masked: bool = True,
          start_from: str | Path | None = None) -> dict[str, Any]:
    """Train ``model`` (a built-in name or a model folder to fine-tune) on ``dataset_dir``; write ``out_dir``.

    Returns the metrics written to ``out_dir/metrics.json`` (best epoch, per-label validation Dice, history).
    ``dataset_name`` is what the manifest records as the dataset (default: its path). ``label_map`` maps
    dataset label names the model does not have onto its labels. ``masked=False`` is a test-only switch: it
    trains every case as if fully annotated (see :mod:`hpcseg.partial`). ``start_from`` (with a built-in name) is a
    model folder with the recipe's network whose weights training continues from (the recipe's manifest is kept).

    Example::

        train("phantom-unet", "datasets/phantoms", "models/phantom-unet", epochs=5, device="auto")
    """
    import torch
    from monai.transforms import (
        Compose,
        RandCropByLabelClassesd,
        RandCropByPosNegLabeld,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    from hpcseg.gate import mean_dice, score
    from hpcseg.server.inference import segment
    from hpcseg.server.network_models import build_network, load_state_dict

    recipe = BUILTINS.get(str(model), {})
    if recipe:
        manifest = ModelManifest.from_dict(dict(recipe["manifest"]), source=f"built-in {model}")
        start_weights = None
        if start_from is not None:
            base = read_manifest(Path(start_from))
            if base.network != manifest.network or not base.weights:
                raise HpcsegError(f"{start_from}: its network is not the {model} recipe's; cannot continue from it")
            start_weights = Path(start_from) / base.weights
    else:
        if start_from is not None:
            raise HpcsegError("start_from continues a built-in recipe; to fine-tune a model folder, pass it as model")
        src = Path(model)
        manifest = read_manifest(src)
        if not manifest.network or not manifest.weights:
            raise HpcsegError(f"{src}: only models with \"network\" + \"weights\" (a state_dict) can be trained")
        start_weights = src / manifest.weights
    epochs = int(epochs or recipe.get("epochs", 10))
    # fine-tuning starts from a trained network: a gentler default step than training from scratch
    lr = float(lr or (recipe.get("lr", 1e-3) if start_weights is None else 3e-4))
    batch_size = int(batch_size or recipe.get("batch_size", 2))
    val_every = int(recipe.get("val_every", 1))
    dev = resolve_device(device)
    out = Path(out_dir)
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    handler = logging.FileHandler(part / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:  # progress lines are the point of train.log
        log.setLevel(logging.INFO)
    try:
        labels, train_cases, val_cases = read_dataset(Path(dataset_dir), val_fraction, seed)
        value_map, names = label_value_map(labels, manifest.labels, label_map)
        train_cases = model_cases(train_cases, value_map, names, manifest.labels)
        val_cases = model_cases(val_cases, value_map, names, manifest.labels)
        set_determinism(seed=seed)
        t0 = time.monotonic()
        partial = sum(1 for c in train_cases if set(c["annotated"]) != set(manifest.labels))
        log.info("training %s on %d cases (%d validation) for %d epochs on %s; %d case%s annotate only some "
                 "labels (%s)", manifest.name, len(train_cases), len(val_cases), epochs, dev, partial,
                 "" if partial == 1 else "s", "their loss is masked" if masked else "MASKING DISABLED")
        data = [_prepare(c, manifest) for c in train_cases]
        log.info("%d training cases on the model's grid (%.0f s)", len(data), time.monotonic() - t0)
        roi = manifest.roi_size or [96, 96, 96]
        # windows: 3 of 4 centred on a labelled voxel, or (a recipe's "crop_ratios") on each label value in
        # proportion; intensity jitter as a fraction of the normalised range (the manifest's extra.augment.jitter
        # may narrow it: a model that tells tissues apart by a few HU must not be trained to ignore shifts of 100)
        ratios = recipe.get("crop_ratios")
        crop = (RandCropByLabelClassesd(["image", "label"], "label", roi, ratios=ratios, num_classes=len(ratios),
                                        num_samples=1, warn=False) if ratios else
                RandCropByPosNegLabeld(["image", "label"], "label", roi, pos=3, neg=1, num_samples=1))
        jitter = {"scale": 0.1, "shift": 0.05, **((manifest.extra.get("augment") or {}).get("jitter") or {})}
        augment = Compose([SpatialPadd(["image", "label"], roi), crop,
                           RandScaleIntensityd("image", jitter["scale"], prob=0.5),
                           RandShiftIntensityd("image", jitter["shift"], prob=0.5)])
        augment.set_random_state(seed)
        net = build_network(manifest.network or {}).to(dev)
        if start_weights is not None:
            net.load_state_dict(load_state_dict(start_weights, "cpu"))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        rng = random.Random(seed)
        gate_val = _cases_for_gate(val_cases)

        def validate() -> dict[str, dict[str, Any]]:
            net.eval()
            with torch.inference_mode():
                return score(lambda im: segment(im, net, manifest, {}, device=dev), gate_val, manifest.labels)

        history, best, best_state = [], -float("inf"), None
        # Continuing from trained weights (a fine-tune, or a built-in with --from), batch norm keeps the running
        # statistics it is served with: with batches of two windows the network otherwise learns to tell the liver
        # from muscle by the batch's own statistics, which a served window does not have.
        frozen_norm = start_weights is not None
        for epoch in range(1, epochs + 1):
            te = time.monotonic()
            net.train()
            if frozen_norm:  # batch norm as served: its running statistics, not the batch's
                for mod in net.modules():
                    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                        mod.eval()
            order = rng.sample(range(len(data)), len(data))
            losses = []
            for b in range(0, len(order), batch_size):
                items = [augment({k: v for k, v in data[i].items() if k != "annotated"})[0]
                         for i in order[b : b + batch_size]]
                # plain tensors: MetaTensor's per-op bookkeeping costs more than the small network itself
                x = torch.stack([torch.as_tensor(it["image"]).as_subclass(torch.Tensor) for it in items]).to(dev)
                y = torch.stack([torch.as_tensor(it["label"]).as_subclass(torch.Tensor).long()
                                 for it in items]).to(dev)
                ann = torch.stack([data[i]["annotated"] for i in order[b : b + batch_size]]).to(dev)
                opt.zero_grad()
                loss = partial_label_loss(net(x), y, ann, masked=masked)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            checked = bool(val_cases) and (epoch % val_every == 0 or epoch == epochs)
            scores = validate() if checked else {}
            dice = {k: v["dice"] for k, v in scores.items()}
            mean = mean_dice(scores) if scores else None
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": dice,
                            "seconds": round(time.monotonic() - te, 1)})
            per = " ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in dice.items())
            log.info("epoch %d/%d loss %.4f val_dice %s%s %.0f s", epoch, epochs, np.mean(losses),
                     f"{mean:.3f}" if mean is not None else "n/a", f" ({per})" if per else "",
                     time.monotonic() - te)
            # best: the highest mean Dice over scored labels among validated epochs; without validation, the last
            key = mean if mean is not None else (None if val_cases else -float(np.mean(losses)))
            if key is not None and key > best:
                best, best_state = key, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                best_epoch = history[-1]
        assert best_state is not None
        torch.save(best_state, part / "model.pt")
        manifest.weights = "model.pt"
        manifest.version = version or manifest.version
        manifest.extra = {**manifest.extra, "trained": {
            "dataset": dataset_name or str(dataset_dir), "epochs": epochs, "best_epoch": best_epoch["epoch"],
            "val_dice": best_epoch["val_dice"], "from": str(start_weights) if start_weights else None,
            "loss_masked": masked}}
        manifest.save(part)
        if recipe.get("reference"):
            from hpcseg.gate import write_reference

            write_reference(part, None, phantoms=recipe["reference"]["phantoms"])
        metrics = {"model": manifest.name, "version": manifest.version, "best_epoch": best_epoch["epoch"],
                   "val_dice": best_epoch["val_dice"], "train_cases": len(train_cases),
                   "val_cases": len(val_cases), "device": dev, "seconds": round(time.monotonic() - t0, 1),
                   "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "loss_masked": masked,
                   "label_map": label_map or {}, "history": history}
        (part / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("best epoch %d: val_dice %s; model written to %s", best_epoch["epoch"],
                 json.dumps({k: None if v is None else round(v, 4) for k, v in best_epoch["val_dice"].items()}), out)
    finally:
        log.removeHandler(handler)
        handler.close()
    _replace_dir(part, out)
    return metrics


def _replace_dir(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` by renames: the old folder (if any) stays whole until the new one is in place."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcseg.training``: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m hpcseg.training", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", choices=sorted(BUILTINS), help="train a built-in recipe (makes its dataset)")
    src.add_argument("--model", type=Path, help="a model folder to fine-tune")
    p.add_argument("--dataset", type=Path, help="MSD dataset folder (with --model; optional with --builtin)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (replaced atomically)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version")
    p.add_argument("--from", dest="start_from", type=Path,
                   help="with --builtin: continue from this model folder's weights (same network)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        if a.builtin and a.dataset is None:
            with tempfile.TemporaryDirectory(prefix="hpcseg-phantoms-") as tmp:
                make_phantom_dataset(Path(tmp), **BUILTINS[a.builtin]["phantoms"])
                recipe = BUILTINS[a.builtin]["phantoms"]
                name = (f"hpcseg.phantoms seeds {recipe['train_seeds'][0]}-{recipe['train_seeds'][-1]} (validation "
                        f"{recipe['val_seeds'][0]}-{recipe['val_seeds'][-1]}), made by --builtin {a.builtin}")
                metrics = train(a.builtin, tmp, a.out, a.epochs, a.device, a.lr, a.batch_size, a.seed,
                                version=a.version, dataset_name=name, start_from=a.start_from)
        else:
            if a.dataset is None:
                p.error("--model needs --dataset")
            if a.start_from is not None and not a.builtin:
                p.error("--from goes with --builtin (--model already starts from its folder's weights)")
            metrics = train(a.builtin or a.model, a.dataset, a.out, a.epochs, a.device, a.lr, a.batch_size, a.seed,
                            version=a.version, start_from=a.start_from)
    except HpcsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: metrics[k] for k in ("model", "version", "best_epoch", "val_dice", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
