"""Model folders: manifest validation, the loaders (state_dict, TorchScript, MONAI bundle), broken folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hpcseg import imaging
from hpcseg.errors import ModelLoadError, ServerError
from hpcseg.phantoms import make_phantom
from hpcseg.server.models import MANIFEST_NAME, ModelManifest, builtin_models_dir, load_model, read_manifest

BASE = {"name": "m", "version": "1", "type": "segmentation", "labels": {"hot": 1}}
INTENSITY = {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True}


class Above(torch.nn.Module):
    """A 1×1×1 convolution whose argmax is 1 where the scaled intensity is above ``level`` (0..1)."""

    def __init__(self, level: float = 0.65) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([level, -level])

    def forward(self, x):
        return self.conv(x)


def _case():
    """A phantom with an asymmetric bright block: a flipped or shifted result cannot pass."""
    image, _, _ = make_phantom(11, shape=(48, 40, 30), spacing=(1.7, 1.3, 2.6))
    arr = sitk.GetArrayFromImage(image)
    arr[:] = np.minimum(arr, 250)  # no bone: only the block is above 300 HU
    arr[5:20, 4:15, 3:18] = 900  # (z, y, x): low x, low y corner
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out, arr > 300


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _write(folder: Path, manifest: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("change,key", [
    ({"type": "classification"}, "type"), ({"labels": {"a": 0}}, "labels"), ({"labels": {"a": 1, "b": 1}}, "labels"),
    ({"spacing": [1, 1]}, "spacing"), ({"roi_size": [64, 64, 0.5]}, "roi_size"), ({"overlap": 1.0}, "overlap"),
    ({"loader": "no_colon"}, "loader"), ({"spacings": [1, 1, 1]}, "spacings"), ({"version": 2}, "version"),
    ({"network": {"args": {}}}, "network"), ({"sw_batch_size": 0}, "sw_batch_size"),
])
def test_manifest_errors_name_the_key(tmp_path, change, key):
    with pytest.raises(ModelLoadError, match=f"'{key}'"):
        ModelManifest.load(_write(tmp_path, {**BASE, **change}))


def test_manifest_round_trip_and_missing_keys(tmp_path):
    m = ModelManifest.from_dict({**BASE, "spacing": [1.5, 1.5, 2.0], "extra": {"orientation": "RAS"}})
    m.save(tmp_path)
    assert ModelManifest.load(tmp_path) == m
    assert "overlap" not in json.loads((tmp_path / MANIFEST_NAME).read_text())  # defaults left out
    for key in ("name", "labels"):
        with pytest.raises(ModelLoadError, match=f"missing key '{key}'"):
            ModelManifest.from_dict({k: v for k, v in BASE.items() if k != key})


def test_broken_folders_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no hpcseg-model.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(tmp_path / "badjson")
    with pytest.raises(ModelLoadError, match="cannot tell how to load"):
        load_model(_write(tmp_path / "how", BASE))
    with pytest.raises(ModelLoadError, match="cannot be imported"):
        load_model(_write(tmp_path / "imp", {**BASE, "loader": "no.such.module:Model"}))
    with pytest.raises(ModelLoadError, match="not a subclass"):
        load_model(_write(tmp_path / "cls", {**BASE, "loader": "pathlib:Path"}))
    net = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                    "strides": [2]}}
    with pytest.raises(ModelLoadError, match="weights file 'w.pt' is missing"):
        load_model(_write(tmp_path / "noweights", {**BASE, "network": net, "weights": "w.pt"}))
    folder = _write(tmp_path / "mismatch", {**BASE, "network": net, "weights": "w.pt"})
    torch.save(Above().state_dict(), folder / "w.pt")
    with pytest.raises(ModelLoadError, match="weights do not fit"):
        load_model(folder)
    folder = _write(tmp_path / "nonet", {**BASE, "network": {"name": "NoSuchNet"}, "weights": "w.pt"})
    torch.save({}, folder / "w.pt")
    with pytest.raises(ModelLoadError, match="NoSuchNet"):
        load_model(folder)
    folder = _write(tmp_path / "badts", {**BASE, "weights": "net.ts"})
    (folder / "net.ts").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(folder)


def test_state_dict_network_model(tmp_path):
    folder = _write(tmp_path / "sd", {**BASE, "network": {"name": f"{__name__}:Above"}, "weights": "w.pt",
                                      "intensity": INTENSITY, "spacing": [2.0, 2.0, 2.0], "roi_size": [16, 16, 16]})
    torch.save(Above().state_dict(), folder / "w.pt")
    image, truth = _case()
    model = load_model(folder, device="auto")
    out = model.infer(image, {})
    assert imaging.same_geometry(out, image) and out.GetPixelID() == sitk.sitkUInt8
    assert _dice(sitk.GetArrayViewFromImage(out) == 1, truth) > 0.85  # resampled to 2 mm and back
    assert model.info()["labels"] == {"hot": 1} and model.info()["type"] == "segmentation"


def test_torchscript_model_needs_no_python_class(tmp_path):
    folder = _write(tmp_path / "ts", {**BASE, "weights": "net.ts", "intensity": INTENSITY, "roi_size": [24, 24, 16],
                                      "overlap": 0.5, "labels": {"hot": 1}})
    torch.jit.script(Above()).save(str(folder / "net.ts"))
    image, truth = _case()
    model = load_model(folder)
    model.warmup()
    out = model.infer(image, {"sw_batch_size": 2})
    assert imaging.same_geometry(out, image)
    assert np.array_equal(sitk.GetArrayViewFromImage(out) == 1, truth)  # same grid: exact


def _bundle(folder: Path, fmt: str = "json") -> Path:
    """A tiny MONAI bundle as a user would drop it in: configs/ + models/model.pt, no hpcseg manifest."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": f"{__name__}.Above", "level": 0.1},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 1000, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 2,
                    "overlap": 0.5},
    }
    if fmt == "json":
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
    else:
        import yaml

        (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    meta = {"version": "0.2.1", "name": "Tiny bundle", "description": "a test bundle",
            "network_data_format": {"inputs": {"image": {"num_channels": 1}},
                                    "outputs": {"pred": {"num_channels": 2,
                                                         "channel_def": {"0": "background", "1": "hot"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    net = Above(0.1)
    with torch.no_grad():  # the weights come from the file: change them so that a skipped load would show
        net.conv.bias[:] = torch.tensor([0.65, -0.65])
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_monai_bundle_is_served_without_a_manifest(tmp_path, fmt):
    folder = _bundle(tmp_path / "tiny_bundle", fmt)
    manifest = read_manifest(folder)
    assert manifest.name == "Tiny bundle" and manifest.version == "0.2.1" and manifest.labels == {"hot": 1}
    assert manifest.spacing == [2.0, 2.0, 2.0] and manifest.extra["orientation"] == "RAS"
    assert manifest.roi_size == [16, 16, 16] and manifest.overlap == 0.5 and manifest.sw_batch_size == 2
    assert manifest.intensity["a_min"] == -1000 and manifest.extra["ignored_transforms"] == ["CropForegroundd"]
    model = load_model(folder)
    image, truth = _case()
    out = model.infer(image, {})
    assert imaging.same_geometry(out, image)
    assert _dice(sitk.GetArrayViewFromImage(out) == 1, truth) > 0.85  # RAS + 2 mm and back, weights from the file


def test_bundle_without_weights_or_labels_is_refused(tmp_path):
    folder = _bundle(tmp_path / "b")
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(ModelLoadError, match="models/model.pt"):
        load_model(folder)
    folder = _bundle(tmp_path / "c")
    (folder / "configs" / "metadata.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no output labels"):
        load_model(folder)


def test_label_subsets_and_bad_params(tmp_path):
    model = load_model(builtin_models_dir() / "ct-body")
    image, _, _ = make_phantom(12)
    only = sitk.GetArrayFromImage(model.infer(image, {"label_names": ["lungs"]}))
    assert set(np.unique(only)) == {0, 2}
    with pytest.raises(ServerError, match="no label 'liver'") as exc:
        model.infer(image, {"label_names": ["liver"]})
    assert exc.value.status == 400
    folder = _write(tmp_path / "ts", {**BASE, "weights": "net.ts"})
    torch.jit.script(Above()).save(str(folder / "net.ts"))
    ts = load_model(folder)
    assert imaging.same_geometry(ts.infer(image, {"device": "cpu"}), image)
    for bad in ({"roi_size": [0, 1, 2]}, {"overlap": 1.5}, {"sw_batch_size": 0}, {"device": "nosuchdevice"}):
        with pytest.raises(ServerError) as exc:
            ts.infer(image, bad)
        assert exc.value.status == 400
