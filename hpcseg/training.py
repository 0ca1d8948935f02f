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

CLI (the exact command that builds the shipped ``phantom-unet`` weights)::

    python -m hpcseg.training --builtin phantom-unet --out hpcseg/models/phantom-unet
    python -m hpcseg.training --model models/liver/1 --dataset datasets/liver --out models/liver/2 --epochs 50
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
from hpcseg.server.modelbase import ModelManifest, resolve_device
from hpcseg.server.models import read_manifest

log = logging.getLogger("hpcseg.training")

#: Built-in recipes: a manifest (without weights) and, for phantoms, how to make the dataset.
BUILTINS: dict[str, dict[str, Any]] = {
    "phantom-unet": {
        "manifest": {
            "name": "phantom-unet", "version": "1.0.0", "type": "segmentation",
            "labels": {"body": 1, "lungs": 2, "bone": 3, "liver": 4},
            "description": "A small 3D UNet trained on hpcseg's synthetic CT phantoms (body, lungs, bone, liver); "
                           "a demonstration model for phantoms, not for patients.",
            "network": {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 5,
                                                 "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                                                 "num_res_units": 1}},
            "spacing": [1.5, 1.5, 2.0], "roi_size": [64, 64, 48], "overlap": 0.25, "sw_batch_size": 1,
            "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True},
            # fast: no window overlap; a coarser grid would shrink the anatomy the network learned at this scale
            "extra": {"orientation": "LPS", "expect": {"modality": "CT"}, "fast": {"overlap": 0.0}},
        },
        # Training phantoms on the model grid and on two other grids of the same field of view, so the network
        # also sees what resampling does; validation seeds are never used for training.
        "phantoms": {"train_seeds": list(range(0, 48)), "val_seeds": list(range(1000, 1004)),
                     "grids": [((64, 64, 48), (1.5, 1.5, 2.0)), ((80, 80, 40), (1.2, 1.2, 2.4)),
                               ((48, 48, 64), (2.0, 2.0, 1.5))]},
        "epochs": 40, "lr": 3e-3, "batch_size": 2,
    },
}


def make_phantom_dataset(folder: Path, train_seeds: list[int], val_seeds: list[int],
                         grids: list[tuple[tuple[int, int, int], tuple[float, float, float]]]) -> Path:
    """Write an MSD-shaped dataset of phantoms (seed i uses grid i mod len(grids); validation on the first grid)."""
    from hpcseg.phantoms import LABELS, make_phantom

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    for split, seeds in (("training", train_seeds), ("validation", val_seeds)):
        for i, seed in enumerate(seeds):
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
    """(labels name→value, training cases, validation cases) of an MSD dataset; paths made absolute."""
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
            case = {k: str((Path(dataset_dir) / e[k]).resolve()) for k in ("image", "label")}
            if not (Path(case["image"]).exists() and Path(case["label"]).exists()):
                raise DatasetError(f"{path}: case {e} names a file that does not exist")
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


def _prepare(case: dict, manifest: ModelManifest) -> dict[str, Any]:
    """One case on the model's grid: {"image": (1, X, Y, Z) float32, "label": (1, X, Y, Z) int64} tensors."""
    import torch

    from hpcseg.server.inference import image_to_tensor, model_grid_params, to_model_space

    image, label = imaging.read_image(case["image"]), imaging.read_image(case["label"])
    spacing, direction = model_grid_params(manifest, image, {})
    grid = to_model_space(image, spacing, direction)
    label = imaging.resample_to_reference(label, grid)
    lab = torch.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(label).transpose(2, 1, 0)).astype(np.int64))
    return {"image": image_to_tensor(grid, manifest.intensity)[0], "label": lab[None]}


def _dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, v in labels.items():
        p, t = pred == v, truth == v
        denom = int(p.sum() + t.sum())
        out[name] = 1.0 if denom == 0 else 2.0 * float((p & t).sum()) / denom
    return out


def train(model: str | Path, dataset_dir: str | Path, out_dir: str | Path, epochs: int | None = None,
          device: str = "auto", lr: float | None = None, batch_size: int | None = None, seed: int = 0,
          val_fraction: float = 0.2, version: str | None = None, dataset_name: str | None = None) -> dict[str, Any]:
    """Train ``model`` (a built-in name or a model folder to fine-tune) on ``dataset_dir``; write ``out_dir``.

    Returns the metrics written to ``out_dir/metrics.json`` (best epoch, per-label validation Dice, history).
    ``dataset_name`` is what the manifest records as the dataset (default: its path).

    Example::

        train("phantom-unet", "datasets/phantoms", "models/phantom-unet", epochs=5, device="auto")
    """
    import torch
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandScaleIntensityd, RandShiftIntensityd, SpatialPadd
    from monai.utils import set_determinism

    from hpcseg.server.inference import segment
    from hpcseg.server.network_models import build_network, load_state_dict

    recipe = BUILTINS.get(str(model), {})
    if recipe:
        manifest = ModelManifest.from_dict(dict(recipe["manifest"]), source=f"built-in {model}")
        start_weights = None
    else:
        src = Path(model)
        manifest = read_manifest(src)
        if not manifest.network or not manifest.weights:
            raise HpcsegError(f"{src}: only models with \"network\" + \"weights\" (a state_dict) can be trained")
        start_weights = src / manifest.weights
    epochs = int(epochs or recipe.get("epochs", 10))
    lr = float(lr or recipe.get("lr", 1e-3))
    batch_size = int(batch_size or recipe.get("batch_size", 2))
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
        clash = {k: v for k, v in labels.items() if manifest.labels.get(k, v) != v}
        if clash:
            raise DatasetError(f"dataset labels {clash} disagree with the model's {manifest.labels}")
        set_determinism(seed=seed)
        t0 = time.monotonic()
        log.info("training %s on %d cases (%d validation) for %d epochs on %s", manifest.name, len(train_cases),
                 len(val_cases), epochs, dev)
        data = [_prepare(c, manifest) for c in train_cases]
        roi = manifest.roi_size or [96, 96, 96]
        augment = Compose([SpatialPadd(["image", "label"], roi),
                           RandCropByPosNegLabeld(["image", "label"], "label", roi, pos=2, neg=1, num_samples=1),
                           RandScaleIntensityd("image", 0.1, prob=0.5), RandShiftIntensityd("image", 0.05, prob=0.5)])
        augment.set_random_state(seed)
        net = build_network(manifest.network or {}).to(dev)
        if start_weights is not None:
            net.load_state_dict(load_state_dict(start_weights, "cpu"))
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, **recipe.get("loss", {}))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        rng = random.Random(seed)
        history, best, best_state = [], -1.0, None
        for epoch in range(1, epochs + 1):
            te = time.monotonic()
            net.train()
            order = rng.sample(range(len(data)), len(data))
            losses = []
            for b in range(0, len(order), batch_size):
                items = [augment(data[i])[0] for i in order[b : b + batch_size]]
                x = torch.stack([it["image"] for it in items]).to(dev)
                y = torch.stack([it["label"] for it in items]).to(dev)
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            dice = _validate(net, manifest, val_cases, dev, segment) if val_cases else {}
            mean = float(np.mean(list(dice.values()))) if dice else -float(np.mean(losses))
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": dice,
                            "seconds": round(time.monotonic() - te, 1)})
            per = " ".join(f"{k} {v:.3f}" for k, v in dice.items())
            log.info("epoch %d/%d loss %.4f val_dice %s%s %.0f s", epoch, epochs, np.mean(losses),
                     f"{mean:.3f}" if dice else "n/a", f" ({per})" if per else "", time.monotonic() - te)
            if mean > best:
                best, best_state = mean, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        assert best_state is not None
        torch.save(best_state, part / "model.pt")
        best_epoch = max(history, key=lambda h: float(np.mean(list(h["val_dice"].values()))) if h["val_dice"]
                         else -h["loss"])
        manifest.weights = "model.pt"
        manifest.version = version or manifest.version
        manifest.extra = {**manifest.extra, "trained": {
            "dataset": dataset_name or str(dataset_dir), "epochs": epochs, "best_epoch": best_epoch["epoch"],
            "val_dice": best_epoch["val_dice"], "from": str(start_weights) if start_weights else None}}
        manifest.save(part)
        metrics = {"model": manifest.name, "version": manifest.version, "best_epoch": best_epoch["epoch"],
                   "val_dice": best_epoch["val_dice"], "train_cases": len(train_cases),
                   "val_cases": len(val_cases), "device": dev, "seconds": round(time.monotonic() - t0, 1),
                   "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "history": history}
        (part / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("best epoch %d: val_dice %s; model written to %s", best_epoch["epoch"],
                 json.dumps({k: round(v, 4) for k, v in best_epoch["val_dice"].items()}), out)
    finally:
        log.removeHandler(handler)
        handler.close()
    _replace_dir(part, out)
    return metrics


def _validate(net: Any, manifest: ModelManifest, cases: list[dict], dev: str, segment: Any) -> dict[str, float]:
    """Mean Dice per label over ``cases``, through the server's inference path on the original geometry."""
    import torch

    net.eval()
    scores: dict[str, list[float]] = {k: [] for k in manifest.labels}
    with torch.inference_mode():
        for case in cases:
            image, truth = imaging.read_image(case["image"]), imaging.read_image(case["label"])
            pred = segment(image, net, manifest, {}, device=dev)
            d = _dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth), manifest.labels)
            for k, v in d.items():
                scores[k].append(v)
    return {k: float(np.mean(v)) for k, v in scores.items()}


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
                                version=a.version, dataset_name=name)
        else:
            if a.dataset is None:
                p.error("--model needs --dataset")
            metrics = train(a.builtin or a.model, a.dataset, a.out, a.epochs, a.device, a.lr, a.batch_size, a.seed,
                            version=a.version)
    except HpcsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: metrics[k] for k in ("model", "version", "best_epoch", "val_dice", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
