"""`hpcseg models` on the embedded local profile: versions, and for each fine-tuned one the gate's per-label table."""

from __future__ import annotations

import json
from pathlib import Path

import platformdirs
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.gate import decide

MANIFEST = {"name": "tiny", "type": "segmentation", "labels": {"body": 1, "liver": 4}}


def test_models_shows_per_label_before_after_and_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    root = Path(platformdirs.user_data_dir("hpcseg")) / "work" / "models" / "tiny"
    before = {"reference": {"body": {"dice": 0.98, "n": 4}, "liver": {"dice": 0.95, "n": 4}},
              "validation": {"body": {"dice": 0.90, "n": 1}, "liver": {"dice": None, "n": 0}}}
    after = {"reference": {"body": {"dice": 0.99, "n": 4}, "liver": {"dice": 0.41, "n": 4}},
             "validation": {"body": {"dice": 0.97, "n": 1}, "liver": {"dice": None, "n": 0}}}
    for version in ("1", "2"):
        (root / version).mkdir(parents=True)
        (root / version / "hpcseg-model.json").write_text(json.dumps({**MANIFEST, "version": version}))
    gate = {"base_version": "1", "dataset": "no-liver", **decide(before, after, n_val=1).to_dict()}
    (root / "2" / "gate.json").write_text(json.dumps(gate))
    (root / "current").symlink_to("1")
    res = CliRunner().invoke(main, ["models"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "  * 1 " in out and "    2 " in out
    assert "from 1: not promoted: liver on the reference set dropped 0.9500 -> 0.4100" in out
    assert "too few validation cases (1 < 3)" in out and "warning: only 1 validation case" in out
    assert "reference  liver        0.9500 -> 0.4100 (-0.5400) n=4  DROP" in out
    assert "validation liver          -    ->   -    n=0" in out  # not annotated there: not scored, not 1.0
    rows = json.loads(CliRunner().invoke(main, ["models", "--json"], catch_exceptions=False).output)
    tiny = next(m for m in rows if m["name"] == "tiny")
    assert tiny["current"] == "1" and tiny["versions"][1]["gate"]["promoted"] is False
