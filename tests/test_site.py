"""The site bundle on this machine (LocalShell): parsing, layering and origins, limits, the cache by content hash,
template overrides by block, and the CLI's `config show --origin` and refusals. The same code against the real
cluster over SSH is tests/integration/test_site_cluster.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.config import Profile, load_config
from hpcseg.errors import ConfigError, LimitExceeded
from hpcseg.jobs import JobManager, JobStore
from hpcseg.shell import LocalShell
from hpcseg.site import check_limits, fetch, parse_bundle, presets_for, resolve

SITE = """
[site]
name = "Test site"
contact = "hpc-help@example.org (ticket queue HPC)"
default_preset = "gpu-interactive"

[defaults]
scheduler = "slurm"
python = "/opt/hpcseg/venv/bin/python"
models_dir = "/opt/hpcseg/models"
account = "proj-1"
idle_timeout = 900

[presets.gpu-interactive]
description = "one GPU"
partition = "gpu"
gpus = 1
cpus = 4
memory = "16G"
walltime = "02:00:00"

[presets.cpu-debug]
description = "no GPU"
queue = "debug"
gpus = 0
cpus = 2
memory = "4G"
walltime = "00:30:00"

[limits]
partitions = ["gpu", "debug"]
accounts = ["proj-1", "proj-2"]
max_walltime = "04:00:00"
max_gpus = 2
max_cpus = 8
max_memory = "32G"
max_servers = 1
max_idle_timeout = 3600
user_templates = false
user_models_dir = false
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSEG_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("HPCSEG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("HPCSEG_SITE", raising=False)


def make_bundle(root: Path, text: str = SITE, templates: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(text)
    for name, body in (templates or {}).items():
        (root / "templates" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "templates" / name).write_text(body)
    return root


def user(**kw) -> Profile:
    return Profile(name="u", host="login.example.org", **kw)


def test_layers_and_origins(tmp_path):
    site = make_bundle(tmp_path / "site")
    res = resolve(user(site=str(site), walltime="01:00:00"), shell=LocalShell(),
                  user_keys={"host", "site", "walltime"}, overrides={"cpus": "6"})
    p, o = res.profile, res.origins
    assert (p.scheduler, o["scheduler"]) == ("slurm", "site")
    assert (p.partition, o["partition"]) == ("gpu", "preset gpu-interactive")
    assert (p.walltime, o["walltime"]) == ("01:00:00", "profile")
    assert (p.cpus, o["cpus"]) == (6, "command line")
    assert (p.device, o["device"]) == ("auto", "built-in")
    assert p.preset == "gpu-interactive" and res.bundle.contact.startswith("hpc-help")
    # a preset picked by name; `queue` is the PBS word for partition
    res = resolve(user(site=str(site)), shell=LocalShell(), user_keys={"host", "site"}, preset="cpu-debug")
    assert (res.profile.partition, res.profile.gpus, res.origins["gpus"]) == ("debug", 0, "preset cpu-debug")


def test_host_only_profile_without_site_or_scheduler_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="names a host but no scheduler"):
        resolve(user(), shell=LocalShell(), user_keys={"host"}, locations=(str(tmp_path / "nothing"),))


def test_admin_location_symlink_and_env(tmp_path, monkeypatch):
    v1 = make_bundle(tmp_path / "site-v1")
    link = tmp_path / "etc-hpcseg-site"
    link.symlink_to(v1)
    res = resolve(user(), shell=LocalShell(), user_keys={"host"}, locations=(str(link),))
    assert res.bundle.location == str(v1.resolve())  # the symlink an admin flips to upgrade or roll back
    v2 = make_bundle(tmp_path / "site-v2", SITE.replace('"Test site"', '"Test site v2"'))
    monkeypatch.setenv("HPCSEG_SITE", str(v2))  # the login node's environment names it: wins over the file
    res = resolve(user(), shell=LocalShell(), user_keys={"host"}, locations=(str(link),))
    assert res.bundle.name == "Test site v2"
    # the profile key `site` overrides both; "none" switches the site layer off
    res = resolve(user(site=str(v1)), shell=LocalShell(), user_keys={"host", "site"})
    assert res.bundle.name == "Test site"
    with pytest.raises(ConfigError, match="no site bundle at"):
        resolve(user(site=str(tmp_path / "missing")), shell=LocalShell(), user_keys={"host", "site"})


def test_cache_by_content_hash_refreshes_on_change(tmp_path):
    site = make_bundle(tmp_path / "site")
    cache = tmp_path / "cache"
    b1 = fetch(LocalShell(), str(site), cache=cache)
    assert (cache / b1.digest / "site.toml").read_text() == SITE
    b1b = fetch(LocalShell(), str(site), cache=cache)
    assert b1b.digest == b1.digest and len(list(cache.iterdir())) == 1  # unchanged: read from the cache
    (site / "site.toml").write_text(SITE.replace("max_gpus = 2", "max_gpus = 3"))
    b2 = fetch(LocalShell(), str(site), cache=cache)
    assert b2.digest != b1.digest and b2.limits.max_gpus == 3
    (site / "templates").mkdir()
    (site / "templates" / "server.sh.j2").write_text('{% extends "builtin/server.sh.j2" %}\n')
    b3 = fetch(LocalShell(), str(site), cache=cache)
    assert b3.digest != b2.digest and (b3.templates_dir / "server.sh.j2").is_file()


@pytest.mark.parametrize("change, limit, asked", [
    ({"walltime": "48:00:00"}, "max_walltime", "walltime = 48:00:00"),
    ({"gpus": "4"}, "max_gpus", "gpus = 4"),
    ({"cpus": "16"}, "max_cpus", "cpus = 16"),
    ({"memory": "64G"}, "max_memory", "memory = 64G"),
    ({"partition": "bigmem"}, "partitions", "partition = bigmem"),
    ({"account": "someone-else"}, "accounts", "account = someone-else"),
    ({"idle_timeout": "0"}, "max_idle_timeout", "idle_timeout = 0"),
    ({"template_dir": "/home/u/tpl"}, "user_templates", "template_dir = /home/u/tpl"),
    ({"models_dir": "/home/u/models"}, "user_models_dir", "models_dir = /home/u/models"),
])
def test_each_limit_refuses_naming_limit_value_and_contact(tmp_path, change, limit, asked):
    site = make_bundle(tmp_path / "site")
    res = resolve(user(site=str(site)), shell=LocalShell(), user_keys={"host", "site"}, overrides=change)
    with pytest.raises(LimitExceeded) as exc:
        check_limits(res.bundle, res.profile, res.origins)
    msg = exc.value.message
    assert f"site limit {limit} =" in msg and asked in msg and "(from the command line)" in msg
    assert "hpc-help@example.org (ticket queue HPC)" in msg and exc.value.limit == limit
    # and JobManager refuses before writing anything: no job folder appears
    jm = JobManager(res.profile, shell=LocalShell(), store=JobStore(tmp_path / "jobs.json"), site=res.bundle,
                    origins=res.origins)
    jm._work_dir = str(tmp_path / "work")
    with pytest.raises(LimitExceeded):
        jm.submit("server")
    assert not (tmp_path / "work").exists() and jm.store.list() == []


def test_limits_allow_what_is_inside_them(tmp_path):
    site = make_bundle(tmp_path / "site")
    res = resolve(user(site=str(site)), shell=LocalShell(), user_keys={"host", "site"},
                  overrides={"walltime": "04:00:00", "gpus": "2", "account": "proj-2"})
    check_limits(res.bundle, res.profile, res.origins)


@pytest.mark.parametrize("bad, match", [
    ('[defaults]\nhost = "evil"\n', "may not set how users connect"),
    ('[defaults]\npartition = "gpu\\n#SBATCH --uid=0"\n', "partition"),
    ('[defaults]\naccount = "a b"\n', "cannot go on a scheduler directive line"),
    ('[presets.x]\ngpus = "many"\n', "must be a whole number"),
    ('[presets.x]\nextra_directives = ["#SBATCH --x"]\n', "extra_directives"),
    ('[limits]\nmax_gpus = "2"\n', "wrong type"),
    ('[limits]\nmax_walltime = "forever"\n', "max_walltime"),
    ('[site]\ndefault_preset = "nope"\n', "names no preset"),
    ('[site]\ncontact = "a\\nb"\n', "single-line"),
    ('[surprise]\n', "unknown table"),
])
def test_bad_bundle_values_are_refused_naming_file_and_key(bad, match):
    with pytest.raises(ConfigError, match=match) as exc:
        parse_bundle(bad, location="/opt/hpcseg/site")
    assert exc.value.message.startswith("/opt/hpcseg/site/site.toml")


def test_template_override_by_block_and_no_user_templates(tmp_path, monkeypatch):
    site = make_bundle(tmp_path / "site", templates={"server.sh.j2": (
        '{% extends "builtin/server.sh.j2" %}\n{% block setup %}{{ super() }}\nexport SITE_MARK={{ partition }}\n'
        '{% endblock %}\n')})
    own = tmp_path / "own"
    (own / "server.sh.j2").parent.mkdir(parents=True)
    (own / "server.sh.j2").write_text("#!/bin/bash\necho users own\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    res = resolve(user(site=str(site)), shell=LocalShell(), user_keys={"host", "site"})
    jm = JobManager(res.profile, shell=LocalShell(), store=JobStore(tmp_path / "j.json"), site=res.bundle,
                    origins=res.origins)
    jm._work_dir = str(tmp_path / "w")
    script = jm.render("server")[0]
    assert "export SITE_MARK=gpu\n" in script and "hpcseg.server" in script
    names = {(i.name, i.origin) for i in jm.engine.list()}
    assert ("server.sh.j2", "bundle") in names and not any(o == "user" for _, o in names)


def test_presets_for_a_settings_panel(tmp_path):
    site = make_bundle(tmp_path / "site", SITE.replace('max_gpus = 2', 'max_gpus = 0'))
    rows = presets_for(user(site=str(site)), shell=LocalShell(), user_keys={"host", "site"})
    by = {r["name"]: r for r in rows}
    assert set(by) == {"gpu-interactive", "cpu-debug"} and by["gpu-interactive"]["default"]
    assert by["cpu-debug"]["refusal"] is None
    assert "max_gpus = 0" in by["gpu-interactive"]["refusal"] and "hpc-help@" in by["gpu-interactive"]["refusal"]


def _cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_config_show_origin_and_a_refusal(tmp_path):
    site = make_bundle(tmp_path / "site", SITE.replace('scheduler = "slurm"', 'scheduler = "local"')
                       .replace('python = "/opt/hpcseg/venv/bin/python"', f'python = "{os.sys.executable}"'))
    (tmp_path / "config.toml").write_text(f'default = "me"\n[profiles.me]\nsite = "{site}"\nwalltime = "03:00:00"\n')
    r = _cli("--set", "gpus=2", "config", "show", "--origin", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["key"]: row for row in json.loads(r.output)["values"]}
    assert rows["scheduler"]["origin"] == "site" and rows["partition"]["origin"] == "preset gpu-interactive"
    assert rows["walltime"]["origin"] == "profile" and rows["gpus"]["origin"] == "command line"
    assert rows["device"]["origin"] == "built-in"
    r = _cli("config", "show", "--origin")
    assert "# preset gpu-interactive" in r.output and "# site" in r.output
    r = _cli("--set", "walltime=10:00:00", "submit", "--dry-run")
    assert r.exit_code == 1
    assert "site limit max_walltime = 04:00:00" in r.output and "hpc-help@example.org" in r.output
    # config set writes only the keys the user set: site values are not pinned into the file
    assert _cli("config", "set", "cpus", "3").exit_code == 0
    assert set(load_config().explicit["me"]) == {"site", "walltime", "cpus"}


def test_a_job_manager_made_without_the_site_finds_it_and_its_limits(tmp_path):
    """Batch jobs, Slicer's worker and library users make JobManager(profile) themselves: the limits bind them too."""
    site = make_bundle(tmp_path / "site")
    res = resolve(user(site=str(site)), shell=LocalShell(), user_keys={"host", "site"},
                  overrides={"walltime": "12:00:00"})
    jm = JobManager(res.profile, shell=LocalShell(), store=JobStore(tmp_path / "jobs.json"))
    jm._work_dir = str(tmp_path / "work")
    with pytest.raises(LimitExceeded, match="max_walltime"):
        jm.render("server")
    assert jm.site.location == str(site.resolve()) and not (tmp_path / "work").exists()
    assert JobManager(res.profile, shell=LocalShell(), site=None).site is None  # explicitly none


def test_config_show_origin_of_the_embedded_local_profile():
    r = _cli("config", "show", "--origin", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["site"] is None and data["profile"] == "local"
    assert {row["origin"] for row in data["values"]} <= {"built-in", "built-in (local)"}
