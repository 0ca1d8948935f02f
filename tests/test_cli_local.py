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
                "templates", "upload", "datasets", "train", "models"):
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
