"""Progress a person sees: plain lines (never bars) when stderr is not a terminal, for a real long request on the
embedded `local` server; and a reused server does not say "loading models"."""

from __future__ import annotations

import io

import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.cli.progress_display import RequestProgress
from hpcseg.phantoms import make_phantom

BAR_CHARACTERS = ("\r", "█", "▏", "▎", "▍", "▌", "▋", "▊", "▉", "%|", "it/s", "\x1b[")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def test_plain_lines_now_and_then_and_at_the_end_of_each_phase():
    out = io.StringIO()  # not a terminal
    show = RequestProgress(stream=out, interval=0.0)
    show("upload", 0, 2_000_000)
    show("upload", 1_000_000, 2_000_000)
    show("upload", 2_000_000, 2_000_000)
    show("upload", 2_000_000, 2_000_000)  # a repeat after the end prints nothing
    for k in range(1, 4):
        show("infer", k, 3)
    show("download", 50_000, 50_000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "upload: 1.0 MB of 2.0 MB (50 %)"
    assert lines[1].startswith("upload: 2.0 MB in ") and "(0 %)" not in out.getvalue()
    assert [ln for ln in lines if ln.startswith("inference")][-1].startswith("inference: 3 windows in ")
    assert lines[-1].startswith("download: 0.1 MB in ") and len(lines) == 6
    assert not any(c in out.getvalue() for c in BAR_CHARACTERS)
    quiet = io.StringIO()
    RequestProgress(quiet=True, stream=quiet, interval=0.0)("upload", 1, 2)
    assert quiet.getvalue() == ""


def test_a_long_request_shows_progress_lines_in_a_log_and_a_reused_server_no_loading_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSEG_PROGRESS_INTERVAL", "0.5")
    monkeypatch.setenv("HPCSEG_CPU_RUNTIME", "torch")  # long enough to report progress
    # phantom-unet (roi 64x64x48 at 1.5x1.5x2 mm) over 288x288x160 mm: about a hundred windows, seconds of CPU
    image, _, _ = make_phantom(4, shape=(288, 288, 160), spacing=(1.5, 1.5, 2.0))
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(src))
    runner = CliRunner()
    try:
        first = runner.invoke(main, ["segment", str(src), "-o", str(tmp_path / "a.nii.gz"), "-m", "phantom-unet"],
                              catch_exceptions=False)
        assert first.exit_code == 0, first.output
        err = first.stderr
        infer_lines = [ln for ln in err.splitlines() if ln.startswith("inference:")]
        assert len(infer_lines) >= 2, err  # now and then during the request, and at its end
        assert "windows (" in infer_lines[0] and " in " in infer_lines[-1]
        assert any(ln.startswith("upload: ") for ln in err.splitlines())
        assert not any(c in err for c in BAR_CHARACTERS), repr(err)
        again = runner.invoke(main, ["segment", str(src), "-o", str(tmp_path / "b.nii.gz"), "-m", "ct-body"],
                              catch_exceptions=False)
        assert again.exit_code == 0, again.output
        assert "loading models" not in again.stderr and "ready: job" in again.stderr, again.stderr
    finally:
        runner.invoke(main, ["stop", "--json"])
