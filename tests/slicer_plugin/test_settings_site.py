"""The settings page shows the site's presets with the same refusals as `submit`, and runs `hpcseg doctor` as its
"Test connection" (a site bundle in a local folder; the same code reads it over SSH on a cluster)."""

from __future__ import annotations

import sys


def _site(tmp_path, max_gpus: int) -> str:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(f"""
[site]
contact = "help@example.org"
default_preset = "cpu"
[defaults]
scheduler = "local"
python = "{sys.executable}"
work_dir = "{tmp_path}/work"
[presets.cpu]
description = "no GPU"
gpus = 0
[presets.gpu]
description = "two GPUs"
gpus = 2
[limits]
max_gpus = {max_gpus}
""")
    return str(site)


def test_presets_with_refusals_and_test_connection(isolated, tmp_path):
    from HPCSegLib.settingspage import SettingsPageLogic

    cfg = isolated / "cfg" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f'default = "me"\n[profiles.me]\nsite = "{_site(tmp_path, max_gpus=1)}"\n')
    logic = SettingsPageLogic()
    logic.refresh()
    state = logic.site_presets("me")
    assert not state.error and state.message == "2 site preset(s), 1 refused with this profile"
    by = {p["name"]: p for p in state.presets}
    assert by["cpu"]["refusal"] is None and by["cpu"]["default"]
    assert "site limit max_gpus = 1" in by["gpu"]["refusal"] and "help@example.org" in by["gpu"]["refusal"]
    state = logic.test_connection("me")
    assert state.message == "all ok" and not state.error, state.checks
    assert {"site bundle", "server protocol", "work dir private"} <= {c["item"] for c in state.checks}
    (tmp_path / "site" / "site.toml").unlink()
    state = logic.test_connection("me")
    assert state.error and state.message.startswith("FIX  site bundle: no site bundle at")
