"""Profiles: TOML round trip, validation naming the key path, the embedded local default."""

from __future__ import annotations

import json

import pytest

from hpcseg.config import (
    Config,
    Profile,
    load_config,
    local_profile,
    profile_from_dict,
    set_value,
    walltime_seconds,
)
from hpcseg.errors import ConfigError


def test_missing_file_gives_embedded_local_profile(tmp_path):
    cfg = load_config(tmp_path / "none.toml")
    prof = cfg.profile()
    assert prof.name == "local" and prof.scheduler == "local" and prof.is_local
    prof.validate()


def test_round_trip_and_default(tmp_path):
    cfg = Config(path=tmp_path / "c.toml")
    cfg.set_profile(profile_from_dict("karolina", {"host": "karolina", "scheduler": "slurm", "partition": "qgpu",
                                                   "gpus": 2, "modules": ["cuda/12.2", "apptainer"]}))
    cfg.set_profile(profile_from_dict("meta", {"host": "meta.example.org", "scheduler": "pbs",
                                               "pbs_dialect": "pro"}))
    path = cfg.save()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = load_config(path)
    assert again.default == "karolina"
    assert again.profile().partition == "qgpu"
    assert again.profile("meta").pbs_dialect == "pro"
    assert again.profile("karolina").modules == ["cuda/12.2", "apptainer"]


@pytest.mark.parametrize("key,value,fragment", [
    ("scheduler", "sge", "profiles.x.scheduler"),
    ("walltime", "2h", "profiles.x.walltime"),
    ("memory", "lots", "profiles.x.memory"),
    ("gpus", -1, "profiles.x.gpus"),
    ("container_runtime", "docker", "profiles.x.container_runtime"),
    ("host", "login; rm -rf ~", "profiles.x.host"),
    ("colour", "blue", "profiles.x.colour: unknown key"),
    ("port", 70000, "profiles.x.port"),
])
def test_wrong_values_name_the_key(key, value, fragment):
    data = {"host": "login", "scheduler": "slurm", key: value}
    with pytest.raises(ConfigError) as err:
        profile_from_dict("x", data)
    assert fragment in str(err.value)


def test_container_needs_image():
    with pytest.raises(ConfigError, match="image"):
        profile_from_dict("x", {"host": "h", "scheduler": "slurm", "container_runtime": "apptainer"})


def test_unknown_profile_lists_known(tmp_path):
    cfg = Config(path=tmp_path / "c.toml")
    cfg.set_profile(profile_from_dict("a", {"host": "h", "scheduler": "slurm"}))
    with pytest.raises(ConfigError, match="known profiles: a"):
        cfg.profile("b")


def test_set_value_coerces_and_validates():
    prof = profile_from_dict("x", {"host": "h", "scheduler": "slurm"})
    assert set_value(prof, "gpus", "4").gpus == 4
    assert set_value(prof, "modules", "cuda, apptainer").modules == ["cuda", "apptainer"]
    assert set_value(prof, "account", "").account is None
    with pytest.raises(ConfigError, match="gpus"):
        set_value(prof, "gpus", "many")


def test_broken_toml_is_a_clear_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[profiles.a\nhost=")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(p)


def test_walltime_seconds():
    assert walltime_seconds("02:00:00") == 7200
    assert walltime_seconds("1-00:00:30") == 86430


def test_local_profile_uses_this_python():
    import sys

    assert local_profile().python == sys.executable


# --- issue 13, point 3: values that can never work are refused when set, in the words submit uses -------------------
@pytest.mark.parametrize("key, value", [("account", "$(touch /tmp/x)"), ("partition", "gpu;rm"),
                                        ("gpu_type", "a100 b")])
def test_directive_values_refused_at_set_in_submits_words(key, value):
    from hpcseg.templates import build_context

    prof = profile_from_dict("c", {"scheduler": "slurm", "host": "login"})
    with pytest.raises(ConfigError) as at_set:
        set_value(prof, key, value)
    assert "cannot go on a scheduler directive line" in at_set.value.message
    bad = Profile(**{**prof.__dict__, key: value})  # as a hand-edited file would hold it
    with pytest.raises(ConfigError) as at_submit:
        build_context(bad, template="run", job_dir="/h/j", work_dir="/h", job_name="x", params={"command": ["true"]})
    assert at_submit.value.message == at_set.value.message and at_submit.value.hint == at_set.value.hint


@pytest.mark.parametrize("key", ["work_dir", "models_dir", "datasets_dir", "user", "identity_file", "template_dir"])
def test_newlines_refused_at_set(key):
    prof = profile_from_dict("c", {"scheduler": "slurm", "host": "login"})
    with pytest.raises(ConfigError, match=f"profiles.c.{key} = .* single-line"):
        set_value(prof, key, "/home/a\nb")


# --- issue 13, point 6: the local profile is settable like any other, with the built-in defaults -------------------
def test_config_init_local_writes_the_builtin_local_values(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpcseg.cli import main

    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "config.toml"))
    res = CliRunner().invoke(main, ["-p", "mine", "config", "init", "--scheduler", "local"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    written = load_config(tmp_path / "config.toml").profiles["mine"]
    builtin = local_profile()
    for key in ("python", "gpus", "work_dir", "device", "container_runtime"):
        assert getattr(written, key) == getattr(builtin, key), key


def test_config_set_on_the_embedded_default_writes_a_local_profile(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpcseg.cli import main

    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    res = CliRunner().invoke(main, ["config", "set", "models_dir", str(tmp_path / "m")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = load_config(tmp_path / "config.toml")
    prof = cfg.profile()
    assert prof.name == "local" and prof.models_dir == str(tmp_path / "m")
    builtin = local_profile()
    assert (prof.python, prof.gpus, prof.work_dir) == (builtin.python, builtin.gpus, builtin.work_dir)
    shown = CliRunner().invoke(main, ["config", "show", "--json"], catch_exceptions=False)
    assert json.loads(shown.output)["models_dir"] == str(tmp_path / "m")


def test_config_show_says_where_the_local_defaults_models_are(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpcseg.cli import main

    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    out = CliRunner().invoke(main, ["config", "show"], catch_exceptions=False).output
    assert f"models_dir = {local_profile().models_path!r}" in out and "built-in models in" in out


def test_config_check_refuses_a_hand_edited_account_in_submits_words(tmp_path, monkeypatch):
    """Issue 13, point 3: `config check` said ok to an account submit would refuse."""
    from click.testing import CliRunner

    from hpcseg.cli import main

    path = tmp_path / "config.toml"
    path.write_text('default = "x"\n[profiles.x]\nscheduler = "slurm"\nhost = "login"\naccount = "$(id)"\n')
    monkeypatch.setenv("HPCSEG_CONFIG", str(path))
    monkeypatch.delenv("HPCSEG_PROFILE", raising=False)
    res = CliRunner().invoke(main, ["config", "check"])
    assert res.exit_code == 1 and "cannot go on a scheduler directive line" in res.output, res.output
