"""Real MONAI Model Zoo bundles, in their real layout, served without code changes.

The configs are the zoo's own files, verbatim (``tests/fixtures/zoo_bundles/``, sources and commits in its README);
the weights are random but of exactly the network each ``network_def`` describes, saved where the zoo puts them
(``models/model.pt``, a state_dict; ``models/model.ts`` made by MONAI's own ``ckpt_export``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from fastapi.testclient import TestClient
from monai.networks.nets import SegResNet, SwinUNETR, UNet

from hpcseg import imaging
from hpcseg.errors import ModelLoadError
from hpcseg.phantoms import make_phantom
from hpcseg.server import ServerSettings, create_app, inference
from hpcseg.server.models import ModelManifest, load_model, read_manifest

ZOO = Path(__file__).resolve().parents[1] / "fixtures" / "zoo_bundles"
SPLEEN, WHOLEBODY, SWIN, RENAL = ("spleen_ct_segmentation", "wholeBody_ct_segmentation",
                                  "swin_unetr_btcv_segmentation", "renalStructures_UNEST_segmentation")
TOKEN = "zoo-token-" + "z" * 32
H = {"Authorization": f"Bearer {TOKEN}"}

# hpcseg's stand-in for the renal bundle's scripts/networks/unest.py (the real one is the bundle's code, not copied):
# the same import path and constructor; it favours one output channel, so two copies can be told apart
STAND_IN_UNEST = '''"""Stand-in for the bundle's UNesT (hpcseg test code)."""
import torch

FAVOURED = {favoured}


class UNesT(torch.nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.out = torch.nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x):
        y = self.out(x)
        y[:, FAVOURED] += 100.0
        return y
'''


# --------------------------------------------------------------------------------------------------- helpers
def spleen_net() -> torch.nn.Module:
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                num_res_units=2, norm="batch")


def wholebody_net() -> torch.nn.Module:
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=105, init_filters=32, blocks_down=(1, 2, 2, 4),
                     blocks_up=(1, 1, 1), dropout_prob=0.2)


def swin_state() -> dict:
    """A SwinUNETR(feature_size=48) state_dict whose float tensors are one random number each, expanded: the file
    is 50 kB instead of 250 MB (index buffers kept as they are)."""
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_checkpoint=False, spatial_dims=3)
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(1, generator=g) * 0.05).expand(v.shape) if v.is_floating_point() else v
            for k, v in net.state_dict().items()}


def copy_bundle(name: str, dest: Path) -> Path:
    """The bundle's configs, verbatim, in a bundle folder as a site drops it into its models directory."""
    shutil.copytree(ZOO / name / "configs", dest / "configs")
    (dest / "models").mkdir()
    return dest


def spleen_bundle(dest: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder = copy_bundle(SPLEEN, dest)
    torch.save(spleen_net().state_dict(), folder / "models" / "model.pt")
    return folder


def ts_export(folder: Path) -> Path:
    """``models/model.ts`` made as the zoo makes it: ``python -m monai.bundle ckpt_export network_def ...``."""
    from monai.bundle import ckpt_export

    ts = folder / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(folder / "models" / "model.pt"),
                meta_file=str(folder / "configs" / "metadata.json"),
                config_file=str(folder / "configs" / "inference.json"), bundle_root=str(folder))
    return ts


def renal_bundle(dest: Path, favoured: int | None) -> Path:
    """The renal bundle with a stand-in ``scripts/`` favouring one channel (None: no scripts/ at all)."""
    folder = copy_bundle(RENAL, dest)
    if favoured is not None:
        (folder / "scripts" / "networks").mkdir(parents=True)
        (folder / "scripts" / "__init__.py").write_text("")
        (folder / "scripts" / "networks" / "__init__.py").write_text("")
        (folder / "scripts" / "networks" / "unest.py").write_text(STAND_IN_UNEST.format(favoured=favoured))
    torch.save({"out.weight": torch.zeros(4, 1, 1, 1, 1), "out.bias": torch.zeros(4)}, folder / "models" / "model.pt")
    return folder


def synthetic_ct(direction: str = "oblique", shape: tuple[int, int, int] = (64, 64, 32)) -> sitk.Image:
    """A CT phantom in HU (air, fat, soft tissue, bone; 64×64×32) with a 1200 HU block in the low-x, low-y corner.

    ``oblique``: anisotropic spacing, an origin and a 0.1 rad rotation about z (nothing lines up by chance);
    ``lps``: identity direction (DICOM's LPS axes); ``ras``: x and y flipped (already in the bundles' RAS).
    """
    image, _, _ = make_phantom(3, shape=shape, spacing=(0.9, 0.8, 2.5))
    arr = sitk.GetArrayFromImage(image)
    arr[4:12, 5:20, 4:16] = 1200  # (z, y, x)
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin((-12.5, 20.25, 7.0))
    if direction == "oblique":
        c, s = 0.9950041652780258, 0.09983341664682815
        out.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    elif direction == "ras":
        out.SetDirection(imaging.orientation_direction("RAS"))
    return out


def monai_tensor(image: sitk.Image):
    """``image`` as MONAI's ITKReader + EnsureChannelFirstd give it: (1, x, y, z), affine in RAS."""
    from monai.data import MetaTensor

    flip = np.diag([-1.0, -1.0, 1.0])  # LPS -> RAS
    affine = np.eye(4)
    affine[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = flip @ np.array(image.GetOrigin())
    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr))[None], affine=torch.from_numpy(affine))


def bundle_transforms(name: str, wanted: set[str]):
    """The bundle's own preprocessing transforms named in ``wanted``, instantiated by MONAI from its config."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ZOO / name / "configs" / "inference.json"))
    return [parser.get_parsed_content(f"preprocessing#transforms#{i}")
            for i, t in enumerate(parser["preprocessing"]["transforms"]) if t["_target_"] in wanted]


def labels_of(image: sitk.Image) -> set[int]:
    return set(np.unique(sitk.GetArrayViewFromImage(image)).tolist())


# ------------------------------------------------------------------------------------------------------ tests
def test_fixtures_are_the_cited_zoo_files():
    readme = (ZOO / "README.md").read_text()
    for name in (SPLEEN, WHOLEBODY, SWIN, RENAL):
        for f in ("inference.json", "metadata.json"):
            assert f"models/{name}/configs/{f}" in readme
            json.loads((ZOO / name / "configs" / f).read_text())  # the files themselves, not a re-dump


@pytest.mark.parametrize("name", [SPLEEN, WHOLEBODY, SWIN, RENAL])
def test_manifest_follows_the_real_configs(tmp_path, name):
    folder = copy_bundle(name, tmp_path / name)
    (folder / "models" / "model.pt").write_bytes(b"")  # only its presence matters here
    m = read_manifest(folder)
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert m.labels == {v: int(k) for k, v in channel_def.items() if k != "0"}
    assert (m.name, m.version, m.weights) == (meta["name"], meta["version"], "models/model.pt")
    assert m.extra["orientation"] == "RAS" and m.roi_size == [96, 96, 96]
    assert "ignored_transforms" not in m.extra  # every preprocessing transform of these bundles is honoured
    expected = {  # spacing, intensity, overlap, sw_batch_size: read through @references and $expressions
        SPLEEN: ([1.5, 1.5, 2.0], {"a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1, "clip": True}, 0.5, 4),
        WHOLEBODY: ([1.5, 1.5, 1.5], [{"normalize": True, "nonzero": True}, {"minv": -1.0, "maxv": 1.0}], 0.25, 1),
        SWIN: ([1.5, 1.5, 2.0], {"a_min": -175, "a_max": 250, "b_min": 0.0, "b_max": 1.0, "clip": True}, 0.5, 4),
        RENAL: ([1.0, 1.0, 1.0], {"a_min": -175, "a_max": 250, "b_min": 0.0, "b_max": 1.0, "clip": True}, 0.5, 4),
    }[name]
    assert (m.spacing, m.intensity, m.overlap, m.sw_batch_size) == expected
    if name == WHOLEBODY:
        assert len(m.labels) == 104 and m.labels["urinary_bladder"] == 104
        assert m.extra["sliding_window"] == {"mode": "gaussian", "padding_mode": "replicate"}


@pytest.mark.parametrize("name", [SPLEEN, WHOLEBODY])
def test_preprocessing_is_what_the_bundles_own_transforms_do(tmp_path, name):
    """hpcseg's model grid and intensities against MONAI's Spacingd / ScaleIntensityRanged / NormalizeIntensityd /
    ScaleIntensityd instantiated from the verbatim config (Orientationd needs nibabel, not installed here: the
    input is already RAS, where it does nothing; the RAS convention itself is checked below)."""
    folder = copy_bundle(name, tmp_path / name)
    (folder / "models" / "model.pt").write_bytes(b"")
    manifest = read_manifest(folder)
    image = synthetic_ct("ras")
    spacing, direction = inference.model_grid_params(manifest, image, {})
    grid = inference.to_model_space(image, spacing, direction)
    ours = inference.image_to_tensor(grid, manifest.intensity)[0, 0].numpy()

    (spacing_t,) = bundle_transforms(name, {"Spacingd"})
    theirs = spacing_t({"image": monai_tensor(image)})["image"]
    assert np.allclose(np.linalg.norm(theirs.affine[:3, :3].numpy(), axis=0), grid.GetSpacing())
    assert np.allclose(theirs.affine[:3, :3].numpy() / grid.GetSpacing(), np.diag([1.0, 1.0, 1.0]))  # RAS
    assert all(abs(a - b) <= 1 for a, b in zip(theirs.shape[1:], ours.shape, strict=True))  # same field of view

    x = monai_tensor(grid)  # the same grid through the bundle's own intensity transforms
    for t in bundle_transforms(name, {"ScaleIntensityRanged", "NormalizeIntensityd", "ScaleIntensityd"}):
        x = t({"image": x})["image"]
    assert np.allclose(ours, x[0].numpy(), atol=1e-5)
    assert ours.min() == pytest.approx(-1.0 if name == WHOLEBODY else 0.0)


def test_orientation_is_monais_ras():
    """An LPS image's left side (high x) must come first on the network's axis 0 ('RAS': axis 0 runs to the right)."""
    image = sitk.Image([40, 30, 20], sitk.sitkInt16)
    image.SetSpacing((1.5, 1.5, 2.0))
    arr = sitk.GetArrayFromImage(image)
    arr[:] = -1000
    arr[:, 20:, 30:] = 500  # (z, y, x): high x = patient's left, high y = posterior
    ct = sitk.GetImageFromArray(arr)
    ct.CopyInformation(image)
    m = ModelManifest.from_dict({"name": "m", "version": "1", "type": "segmentation", "labels": {"a": 1},
                                 "spacing": [1.5, 1.5, 2.0], "extra": {"orientation": "RAS"}})
    spacing, direction = inference.model_grid_params(m, ct, {})
    x = inference.image_to_tensor(inference.to_model_space(ct, spacing, direction), None)[0, 0].numpy()
    hot = np.argwhere(x > 0)
    assert hot[:, 0].max() < 10 and hot[:, 1].max() < 10  # left -> low R index, posterior -> low A index


def test_spleen_bundle_and_its_torchscript_export_infer_in_the_input_geometry(tmp_path):
    pt = spleen_bundle(tmp_path / "spleen_ct_segmentation")
    ts_dir = copy_bundle(SPLEEN, tmp_path / "spleen_ts")
    shutil.move(ts_export(pt), ts_dir / "models" / "model.ts")  # a TorchScript-only bundle: no model.pt
    image = synthetic_ct("oblique")
    model = load_model(pt, device="cpu")
    out = model.infer(image, {})
    assert imaging.same_geometry(out, image) and out.GetPixelID() == sitk.sitkUInt8
    assert out.GetSize() == image.GetSize() and out.GetOrigin() == image.GetOrigin()
    assert out.GetSpacing() == image.GetSpacing() and out.GetDirection() == image.GetDirection()
    assert labels_of(out) <= {0, 1}
    ts = load_model(ts_dir, device="cpu")
    assert ts.manifest.weights == "models/model.ts" and ts.manifest.labels == {"spleen": 1}
    small = {"roi_size": [48, 48, 48]}  # one 48³ window instead of 96³: the same weights give the same labels
    assert np.array_equal(sitk.GetArrayFromImage(ts.infer(image, small)),
                          sitk.GetArrayFromImage(model.infer(image, small)))


def test_wholebody_bundle_runs_with_its_inferer_settings(tmp_path, monkeypatch):
    """105 output channels, a @pixdim expression, NormalizeIntensityd + ScaleIntensityd, gaussian windows with
    replicate padding; small windows (a request's roi_size) keep SegResNet quick on a CPU."""
    torch.manual_seed(1)
    folder = copy_bundle(WHOLEBODY, tmp_path / WHOLEBODY)
    torch.save(wholebody_net().state_dict(), folder / "models" / "model.pt")
    seen = {}
    real = inference.sliding_window_labels

    def spy(*args, **kwargs):
        seen.update(kwargs, roi=args[2], sw_batch_size=args[3], overlap=args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_labels", spy)
    model = load_model(folder, device="cpu")
    image = synthetic_ct("oblique", shape=(40, 40, 24))  # two 32³ windows on the 1.5 mm grid
    out = model.infer(image, {"roi_size": [32, 32, 32]})
    assert imaging.same_geometry(out, image) and out.GetPixelID() == sitk.sitkUInt8
    assert labels_of(out) <= set(range(105))
    assert seen["mode"] == "gaussian" and seen["padding_mode"] == "replicate" and seen["roi"] == [32, 32, 32]
    assert seen["overlap"] == 0.25 and seen["sw_batch_size"] == 1  # @displayable_configs#sw_overlap, ...

    app = create_app(ServerSettings(models_dirs=[tmp_path], token=TOKEN, device="cpu", warmup=False))
    with TestClient(app) as c:
        app.state.runtime.registry.wait(60)
        info = c.get("/info/", headers=H).json()
    entry = info["models"][WHOLEBODY]
    assert entry["labels"]["spleen"] == 1 and entry["labels"]["urinary_bladder"] == 104 and len(entry["labels"]) == 104
    assert entry["version"] == "0.2.5" and info["failed"] == {}


@pytest.fixture(scope="module")
def zoo_server(tmp_path_factory):
    """A models directory a site filled with zoo bundles, served by the real app (warm-up included)."""
    root = tmp_path_factory.mktemp("zoo") / "models"
    root.mkdir()
    pt = spleen_bundle(root / SPLEEN)
    ts_dir = copy_bundle(SPLEEN, root / "spleen_ct_segmentation_ts")
    shutil.move(ts_export(pt), ts_dir / "models" / "model.ts")
    swin = copy_bundle(SWIN, root / SWIN)
    torch.save(swin_state(), swin / "models" / "model.pt")
    renal_bundle(root / "renal_a", favoured=1)
    renal_bundle(root / "renal_b", favoured=3)
    app = create_app(ServerSettings(models_dirs=[root], token=TOKEN, device="cpu"))
    with TestClient(app) as c:
        assert app.state.runtime.registry.wait(120)
        yield c


def test_app_lists_the_zoo_bundles_and_the_one_that_cannot_run(zoo_server):
    info = zoo_server.get("/info/", headers=H).json()
    assert info["models"][SPLEEN]["labels"] == {"spleen": 1} and info["models"][SPLEEN]["version"] == "0.5.9"
    assert info["models"]["spleen_ct_segmentation_ts"]["labels"] == {"spleen": 1}
    renal = {"kidney cortex": 1, "medulla": 2, "pelvicalyceal system": 3}
    assert info["models"]["renal_a"]["labels"] == renal and info["models"]["renal_b"]["labels"] == renal
    # einops is in the server extra (SwinUNETR needs it when it runs); without it the warm-up would name it
    assert info["models"][SWIN]["labels"]["Left adrenal gland"] == 13 and SWIN not in info.get("failed", {})
    assert "spleen" in info["labels"] and "kidney cortex" in info["labels"]


def test_app_infers_with_a_zoo_bundle_in_the_input_geometry(zoo_server):
    image = synthetic_ct("oblique")
    data = imaging.encode(image, imaging.CONTENT_TYPE_NIFTI)
    r = zoo_server.post(f"/infer/{SPLEEN}?output=image", headers=H,
                        files={"file": ("ct.nii.gz", data, "application/gzip")}, data={"params": json.dumps({})})
    assert r.status_code == 200, r.text
    mask = imaging.decode(r.content, r.headers["content-type"].split(";")[0])
    assert imaging.same_geometry(mask, image) and labels_of(mask) <= {0, 1}


def test_each_bundle_imports_its_own_scripts(zoo_server):
    """Two bundles ship a different ``scripts.networks.unest``: each model runs its own."""
    image = synthetic_ct("oblique")
    data = imaging.encode(image, imaging.CONTENT_TYPE_NIFTI)
    for name, label in (("renal_a", 1), ("renal_b", 3)):
        r = zoo_server.post(f"/infer/{name}?output=image", headers=H,
                            files={"file": ("ct.nii.gz", data, "application/gzip")}, data={"params": "{}"})
        assert r.status_code == 200, r.text
        mask = imaging.decode(r.content, r.headers["content-type"].split(";")[0])
        assert imaging.same_geometry(mask, image) and labels_of(mask) == {label}


def test_bundle_code_missing_is_named_and_model_ts_serves_instead(tmp_path):
    folder = renal_bundle(tmp_path / "renal", favoured=None)  # the configs name scripts.networks.unest.UNesT
    with pytest.raises(ModelLoadError, match="scripts.networks.unest.*not in the bundle folder"):
        load_model(folder, device="cpu")
    stand_in = renal_bundle(tmp_path / "with_code", favoured=2)
    net = load_model(stand_in, device="cpu").net
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8, 8)).save(str(folder / "models" / "model.ts"))  # both shipped
    model = load_model(folder, device="cpu")
    assert labels_of(model.infer(synthetic_ct("lps"), {})) == {2}


def test_bundles_hpcseg_cannot_serve_are_refused_with_the_reason(tmp_path):
    folder = spleen_bundle(tmp_path / "multi_input")
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["inputs"]["image"].update(
        num_channels=4, channel_def={"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"})  # as brats_mri_segmentation
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="4 input channels.*T1, T1c, T2, FLAIR"):
        load_model(folder, device="cpu")

    folder = spleen_bundle(tmp_path / "sigmoid")
    cfg_path = folder / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["postprocessing"]["transforms"][0] = {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="sigmoid"):
        load_model(folder, device="cpu")
