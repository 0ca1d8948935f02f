"""The training core: a tiny fine-tuning run writes a complete, servable model folder, atomically."""

from __future__ import annotations

import json
import re

import pytest
import SimpleITK as sitk
import torch

from hpcseg import imaging
from hpcseg.errors import DatasetError
from hpcseg.server.models import ModelManifest, load_model
from hpcseg.server.network_models import build_network
from hpcseg.training import main, make_phantom_dataset, read_dataset, train

NET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 5, "channels": [4, 8],
                                "strides": [2], "num_res_units": 0}}
GRIDS = [((24, 24, 16), (4.0, 4.0, 6.0)), ((20, 20, 24), (4.8, 4.8, 4.0))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("ds"), [1, 2, 3, 4], [90], GRIDS)


@pytest.fixture()
def start_model(tmp_path):
    folder = tmp_path / "start"
    m = ModelManifest.from_dict({"name": "tiny", "version": "1", "type": "segmentation",
                                 "labels": {"body": 1, "lungs": 2, "bone": 3, "liver": 4}, "network": NET,
                                 "weights": "model.pt", "spacing": [4.0, 4.0, 6.0], "roi_size": [24, 24, 16],
                                 "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}})
    m.save(folder)
    torch.manual_seed(0)
    torch.save(build_network(NET).state_dict(), folder / "model.pt")
    return folder


def test_fine_tuning_writes_a_servable_folder(dataset, start_model, tmp_path):
    out = tmp_path / "models" / "tiny" / "2"
    metrics = train(start_model, dataset, out, epochs=2, device="cpu", version="2")
    assert sorted(p.name for p in out.iterdir()) == ["hpcseg-model.json", "metrics.json", "model.pt", "train.log"]
    assert not out.with_name("2.partial").exists()
    assert metrics["train_cases"] == 4 and metrics["val_cases"] == 1 and len(metrics["history"]) == 2
    assert set(metrics["val_dice"]) == {"body", "lungs", "bone", "liver"}
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    lines = (out / "train.log").read_text().splitlines()
    assert any(re.search(r"epoch 2/2 loss \d+\.\d+ val_dice \d\.\d+ \(body ", ln) for ln in lines)
    manifest = ModelManifest.load(out)
    assert manifest.version == "2" and manifest.extra["trained"]["from"].endswith("model.pt")
    model = load_model(out)
    image = imaging.read_image(dataset / "imagesTr" / "phantom_0090.nii.gz")
    assert imaging.same_geometry(model.infer(image, {}), image)


def test_a_new_run_replaces_the_old_folder_whole(dataset, start_model, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    train(start_model, dataset, out, epochs=1, device="cpu")
    assert not (out / "stale.txt").exists() and (out / "model.pt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_run_leaves_the_old_model_alone(dataset, start_model, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "model.pt").write_text("the served model")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "body"}, "training": []}))
    with pytest.raises(DatasetError, match="no training cases"):
        train(start_model, bad, out, epochs=1, device="cpu")
    assert (out / "model.pt").read_text() == "the served model"
    assert (tmp_path / "keep.partial" / "train.log").exists()  # what went wrong stays readable


def test_read_dataset_label_formats_and_validation_split(dataset, tmp_path):
    labels, train_cases, val_cases = read_dataset(dataset)
    assert labels == {"body": 1, "lungs": 2, "bone": 3, "liver": 4} and len(val_cases) == 1
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "body": 1}
    meta["training"] += meta.pop("validation")
    (tmp_path / "dataset.json").write_text(json.dumps(meta).replace("./", str(dataset) + "/"))
    labels, train_cases, val_cases = read_dataset(tmp_path, val_fraction=0.4)
    assert labels == {"body": 1} and len(train_cases) == 3 and len(val_cases) == 2


def test_cli_fine_tunes_from_a_folder(dataset, start_model, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--model", str(start_model), "--dataset", str(dataset), "--out", str(out), "--epochs", "1",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "tiny"
    assert main(["--model", str(start_model), "--dataset", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert sitk.ReadImage(str(dataset / "labelsTr" / "phantom_0001.nii.gz")).GetSize() == (24, 24, 16)


@pytest.fixture()
def models_dir(start_model, tmp_path):
    """A models dir whose tiny/1 (the start model) is current, as a cluster's would be."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(start_model, root / "tiny" / "1")
    (root / "tiny" / "current").symlink_to("1")
    return root


def test_one_validation_case_warns_and_needs_force(dataset, models_dir, caplog):
    from hpcseg.modelstore import finetune

    with caplog.at_level("INFO", logger="hpcseg.modelstore"):
        rec = finetune(models_dir, "tiny", dataset, epochs=1, device="cpu")
    assert not rec["promoted"] and "only 1 validation case" in rec["warnings"][0]
    assert any("too few validation cases (1 < 3)" in r for r in rec["reasons"])
    assert "warning: only 1 validation case" in caplog.text and "not promoted: current stays 1" in caplog.text
    assert (models_dir / "tiny" / "current").resolve().name == "1"
    forced = finetune(models_dir, "tiny", dataset, epochs=1, device="cpu", force=True)
    assert forced["promoted"] and forced["forced"] and forced["warnings"]
    assert (models_dir / "tiny" / "current").resolve().name == forced["version"] == "3"
    history = [json.loads(line) for line in (models_dir / "tiny" / "history.jsonl").read_text().splitlines()]
    assert [h["promoted"] for h in history] == [False, True]
    # the per-label table is in the new version's own log too
    assert "validation body" in (models_dir / "tiny" / "2" / "train.log").read_text()


def test_a_dataset_label_the_model_lacks_needs_an_explicit_mapping(dataset, start_model, tmp_path):
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"]["4"] = "tumour"
    other = tmp_path / "ds"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps(meta).replace("./", str(dataset) + "/"))
    with pytest.raises(DatasetError, match=r"labels \['tumour'\] are not the model's"):
        train(start_model, other, tmp_path / "out", epochs=1, device="cpu")
    metrics = train(start_model, other, tmp_path / "out", epochs=1, device="cpu", label_map={"tumour": "liver"})
    assert metrics["label_map"] == {"tumour": "liver"}
