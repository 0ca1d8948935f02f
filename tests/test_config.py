"""Profiles: TOML round trip, validation naming the key path, the embedded local default."""

from __future__ import annotations

import pytest

from hpcseg.config import Config, load_config, local_profile, profile_from_dict, set_value, walltime_seconds
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
