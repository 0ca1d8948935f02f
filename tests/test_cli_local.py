"""The hpcseg command on the embedded `local` default: no config, no cluster, the same server as a process here."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.phantoms import make_phantom


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def run(*args, code=0):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def test_help_lists_every_command():
    out = run("--help").output
    for cmd in ("segment", "submit", "status", "jobs", "cancel", "logs", "connect", "stop", "config", "trust",
                "templates", "upload", "datasets", "train", "models", "batch"):
        assert cmd in out


def test_dry_run_on_the_local_default():
    out = run("submit", "--dry-run").output
    assert out.startswith("#!/bin/bash") and "-m hpcseg.server" in out and "#SBATCH" not in out


def test_segment_with_no_config_runs_locally(tmp_path):
    image, truth, names = make_phantom(21, shape=(48, 48, 32))
    image.SetOrigin((12.0, -40.0, 7.5))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(src))
    out = json.loads(run("segment", str(src), "-o", str(tmp_path / "seg.nii.gz"), "--model", "ct-body",
                         "--json").output)
    assert out["profile"] == "local" and set(out["labels"]) == {"body", "lungs", "bone"}
    mask = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, attr)() == pytest.approx(getattr(image, attr)()), attr
    from hpcseg.imaging import read_mask

    _, kept = read_mask(tmp_path / "seg.nii.gz")  # label names travel in the seg.labels.json sidecar
    assert kept == out["labels"] and (tmp_path / "seg.labels.json").exists()
    again = json.loads(run("segment", str(src), "-o", str(tmp_path / "seg2.nii.gz"), "--model", "ct-body",
                           "--json").output)
    assert again["job_id"] == out["job_id"]  # the running local server was reused
    assert json.loads(run("stop", "--json").output)["stopped"] == [out["job_id"]]


def test_expected_failures_are_one_line_and_exit_1(tmp_path):
    res = run("-p", "nosuch", "jobs", code=1)
    assert res.output.startswith("error: no profile named 'nosuch'") and "hint:" in res.output
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    res = run("segment", str(bad), "-o", str(tmp_path / "o.nii.gz"), code=1)
    assert "error:" in res.output and "Traceback" not in res.output


def _listen_addresses(port: int) -> set[str]:
    """The addresses a socket listens on at ``port``, read from the kernel (/proc/net/tcp, tcp6): what `ss` shows."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                    found.add({"0100007F": "127.0.0.1", "00000000": "0.0.0.0"}.get(addr, addr))
    return found


def test_the_local_server_listens_on_loopback_only():
    """Issue 13, point 2: a server meant for this machine must not be reachable from the network."""
    ready = json.loads(run("submit", "--json").output)
    try:
        assert ready["ready"] is True
        assert _listen_addresses(int(ready["port"])) == {"127.0.0.1"}
    finally:
        run("stop", "--json")


def _mri_model(models_dir):
    """A user's brain-MRI model (a real TorchScript network: a 1x1x1 convolution) declaring modality MR."""
    import torch

    folder = models_dir / "brain-mri"
    folder.mkdir(parents=True)
    net = torch.nn.Conv3d(1, 2, 1)
    torch.jit.script(net).save(str(folder / "net.ts"))
    (folder / "hpcseg-model.json").write_text(json.dumps({
        "name": "brain-mri", "version": "1", "type": "segmentation", "labels": {"brain": 1}, "weights": "net.ts",
        "intensity": {"normalize": True}, "roi_size": [16, 16, 16], "extra": {"expect": {"modality": "MR"}}}))
    return folder


def test_default_model_is_ct_body_for_a_ct_beside_a_users_mri_model(tmp_path):
    """Issue 13, point 1 (and its acceptance): with an MRI model in the user's models dir (served first), a plain
    `hpcseg segment CT` runs ct-body and says so; `-m` of the MRI model on that CT warns about the modality."""
    _mri_model(tmp_path / "my-models")
    run("config", "set", "models_dir", str(tmp_path / "my-models"))
    image, _, _ = make_phantom(3, shape=(40, 40, 24))
    src = tmp_path / "head-ct.nii.gz"
    sitk.WriteImage(image, str(src))
    try:
        res = CliRunner().invoke(main, ["segment", str(src), "-o", str(tmp_path / "a.seg.nrrd")],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert "model: ct-body (the built-in default for CT-like input" in res.output
        out = json.loads(run("segment", str(src), "-o", str(tmp_path / "b.seg.nrrd"), "--json").output)
        assert out["model"] == "ct-body" and "CT-like" in out["model_reason"]
        assert set(out["labels"]) == {"body", "lungs", "bone"}
        mri = json.loads(run("segment", str(src), "-o", str(tmp_path / "c.seg.nrrd"), "-m", "brain-mri",
                             "--json").stdout)  # the warnings also go to stderr
        assert mri["model"] == "brain-mri" and any("expects MR" in w for w in mri["warnings"]), mri["warnings"]
        # a profile's default_model wins over the CT default, and the reason says so
        run("config", "set", "default_model", "brain-mri")
        chosen = json.loads(run("segment", str(src), "-o", str(tmp_path / "d.seg.nrrd"), "--json").stdout)
        assert chosen["model"] == "brain-mri" and "default_model" in chosen["model_reason"]
    finally:
        run("stop", "--json")


def test_reload_says_what_it_reloaded(tmp_path):
    """Issue 13, point 7: `hpcseg reload` printed `reloaded: ` with an empty list while the server reloaded."""
    from hpcseg.server.models import builtin_models_dir

    folder = tmp_path / "my-models" / "mybody"
    folder.mkdir(parents=True)
    manifest = json.loads((builtin_models_dir() / "ct-body" / "hpcseg-model.json").read_text())
    (folder / "hpcseg-model.json").write_text(json.dumps({**manifest, "name": "mybody", "version": "1"}))
    run("config", "set", "models_dir", str(tmp_path / "my-models"))
    run("submit", "--json")
    try:
        (folder / "hpcseg-model.json").write_text(json.dumps({**manifest, "name": "mybody", "version": "2"}))
        out = run("reload").output
        assert "mybody: reloaded 2 (was 1)" in out, out
        again = run("reload").output
        assert "nothing changed" in again and "mybody 2" in again, again
    finally:
        run("stop", "--json")
