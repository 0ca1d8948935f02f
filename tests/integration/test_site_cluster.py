"""The site bundle on the real test cluster, for Slurm and again for the PBS commands: installed into a folder of
its own on the cluster's shared file system; for the preset/limits test the login node's admin location
/etc/hpcseg/site points at it for that test only (a symlink, removed in finally), so the user profile holds only
host, user and key; a CT segmented with a preset, every limit refused before submission (checked with
squeue/qstat), `site validate` faults, and `doctor`. Other tests name the folder in the profile's `site` key.

FAKEs used here, named as such: the `singularity` of tests/templates/fake-singularity (no container runtime
exists on these machines), brought onto PATH by a folder with a `bin/activate` the way a venv does.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from hpcseg.cli import main
from hpcseg.config import Profile
from hpcseg.phantoms import make_phantom
from hpcseg.site import DEFAULT_LOCATIONS, resolve
from hpcseg.ssh import SSHShell
from tests.history import export_hpcseg

ADMIN_SITE = DEFAULT_LOCATIONS[-1]  # /etc/hpcseg/site: the login node's admin location

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FAKE_SINGULARITY = REPO / "tests" / "templates" / "fake-singularity"
CONTACT = "hpc-support@test.example (queue HPCSEG)"
PRE_PROTOCOL_COMMIT = "1dd9bb2"  # hpcseg before protocol versions


def site_toml(cluster, sched: str, folder: str, *, limits: str | None = None, extra_defaults: str = "",
              presets: str | None = None, quota: bool = False) -> str:
    q = "queue" if sched == "pbs" else "partition"
    dialect = 'pbs_dialect = "torque"\n' if sched == "pbs" else ""
    return f"""
[site]
name = "hpcseg test site ({sched})"
contact = "{CONTACT}"
default_preset = "gpu-small"
{'quota_command = ["df", "-P", "-h", "."]' if quota else ""}

[defaults]
scheduler = "{sched}"
{dialect}python = "{cluster.python}"
account = "{cluster.account}"
work_dir = "{folder}/work"
idle_timeout = 600
device = "cpu"
{extra_defaults}

{presets if presets is not None else f'''
[presets.gpu-small]
description = "one GPU, half an hour"
{q} = "{cluster.partition}"
gpus = 1
cpus = 1
memory = "500M"
walltime = "00:30:00"

[presets.cpu-debug]
description = "no GPU, ten minutes"
{q} = "{cluster.partition}"
gpus = 0
cpus = 1
memory = "500M"
walltime = "00:10:00"
'''}

[limits]
{limits if limits is not None else f'''partitions = ["{cluster.partition}"]
accounts = ["{cluster.account}"]
max_walltime = "01:00:00"
max_gpus = 2
max_cpus = 4
max_memory = "4G"
max_servers = 1
max_idle_timeout = 900
user_templates = false'''}
"""


@pytest.fixture(scope="module")
def shell(cluster):
    sh = SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                  known_hosts=[cluster.known_hosts], interactive=False)
    yield sh
    sh.close()


@pytest.fixture
def folder(shell, cluster):
    """A fresh folder on the cluster's shared file system for one test (removed afterwards)."""
    d = f"{cluster.home}/site-tests/{uuid.uuid4().hex[:10]}"
    shell.run(["mkdir", "-p", "-m", "755", d], check=True)
    shell.run(["chmod", "755", posixpath.dirname(d), d], check=True)
    yield d
    shell.run(["sh", "-c", 'chmod -R u+rwx "$1" 2>/dev/null; rm -rf -- "$1"', "sh", d], timeout=120)


def install(shell, folder: str, text: str, templates: dict[str, str] | None = None) -> str:
    """What an admin does: the bundle's files, readable by all, writable by the owner only."""
    site = f"{folder}/site"
    shell.run(["mkdir", "-p", "-m", "755", site, f"{site}/templates"], check=True)
    shell.run(["chmod", "755", site, f"{site}/templates"], check=True)
    shell.write_text(f"{site}/site.toml", text, mode=0o644)
    for name, body in (templates or {}).items():
        shell.write_text(f"{site}/templates/{name}", body, mode=0o644)
    return site


@pytest.fixture
def user_config(tmp_path, cluster, monkeypatch):
    """A config file whose profile holds only host, user and key (and the bundle's folder), and the login
    node's host key in hpcseg's own known_hosts, as `hpcseg trust` leaves it."""
    Path(tmp_path / "known_hosts").write_text(Path(cluster.known_hosts).read_text())

    def write(site: str | None, **more: str) -> Path:
        lines = ['default = "me"', "[profiles.me]", f'host = "{cluster.host}"', f'user = "{cluster.user}"',
                 f'identity_file = "{cluster.key_path}"']
        if site is not None:  # None: the profile names no bundle; the login node's admin location is used
            lines.append(f'site = "{site}"')
        lines += [f"{k} = {json.dumps(v)}" for k, v in more.items()]
        (tmp_path / "config.toml").write_text("\n".join(lines) + "\n")
        return tmp_path / "config.toml"

    return write


@pytest.fixture
def admin_location(cluster):
    """Point the login node's admin location (/etc/hpcseg/site, inside the login node's container) at a bundle for
    one test, as an admin's symlink does (root on the login node); removed afterwards. Refuses to replace a real
    one."""
    made: list[str] = []

    def root(script: str, *args: str):
        return cluster.node_exec(cluster.login_node, ["sh", "-c", script, "sh", *args], timeout=30)

    def point(site: str) -> None:
        if root('test -e "$1" || test -L "$1"', ADMIN_SITE).returncode == 0:
            pytest.fail(f"{ADMIN_SITE} exists on the login node already: not replacing an admin's bundle for a test")
        parent = os.path.dirname(ADMIN_SITE)
        if root('test -d "$1"', parent).returncode != 0:
            res = root('mkdir -p "$1"', parent)
            assert res.returncode == 0, res.stderr
            made.append(parent)
        res = root('ln -s "$1" "$2"', site, ADMIN_SITE)
        assert res.returncode == 0, res.stderr
        made.insert(0, ADMIN_SITE)

    yield point
    for p in made:
        root('if [ -L "$1" ]; then rm -f "$1"; elif [ -d "$1" ]; then rmdir "$1"; fi', p)


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def queued_in(shell, sched: str, work: str) -> list[str]:
    """Jobs of the queue that belong to this test's work dir: squeue's work dir column for Slurm; for the PBS
    commands qstat lists the jobs and, these being Slurm's torque wrappers, squeue names each one's folder."""
    if sched == "slurm":
        res = shell.run(["squeue", "-h", "-u", "hpcuser", "-o", "%i %Z"], timeout=30, check=True)
        return [ln for ln in res.stdout.splitlines() if work in ln]
    res = shell.run(["qstat"], timeout=30)
    assert res.exit_code in (0, 153), res.stderr
    ids = [ln.split()[0] for ln in res.stdout.splitlines()[2:] if ln.strip()]
    mine = []
    for jid in ids:
        wd = shell.run(["squeue", "-h", "-j", jid, "-o", "%Z"], timeout=30).stdout
        if work in wd:
            mine.append(jid)
    return mine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


@pytest.mark.parametrize("sched", ["slurm", "pbs"])
def test_host_only_profile_segments_with_a_preset_and_limits_refuse_before_submission(
        sched, cluster, shell, folder, user_config, tmp_path, admin_location):
    site = install(shell, folder, site_toml(cluster, sched, folder))
    admin_location(site)
    profile_file = user_config(None)  # host, user and key: nothing else
    assert "site" not in profile_file.read_text() and "preset" not in profile_file.read_text()
    work = f"{folder}/work"

    # config show --origin names the layer of each value
    r = cli("--preset", "gpu-small", "--set", "walltime=00:20:00", "config", "show", "--origin", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["key"]: row for row in json.loads(r.output)["values"]}
    assert rows["host"]["origin"] == "profile" and rows["scheduler"]["origin"] == "site"
    assert rows["partition"]["origin"] == "preset gpu-small" and rows["gpus"]["origin"] == "preset gpu-small"
    assert rows["walltime"] == {"key": "walltime", "value": "00:20:00", "origin": "command line"}
    assert rows["device"]["origin"] == "site" and rows["gpu_directive"]["origin"] == "built-in"

    # every limit refused before submission, naming the limit, the value and the contact line
    for args, limit in [(["--set", "walltime=02:00:00"], "max_walltime"), (["--set", "gpus=3"], "max_gpus"),
                        (["--set", "partition=debug"], "partitions"),
                        (["--set", "account=someone-else"], "accounts"),
                        (["--set", "template_dir=/tmp"], "user_templates")]:
        r = cli(*args, "submit", "--no-wait")
        assert r.exit_code == 1, (args, r.output)
        assert f"site limit {limit} =" in r.output and CONTACT in r.output and "from the command line" in r.output
        assert args[1].split("=", 1)[1] in r.output
    assert not shell.run(["test", "-e", f"{work}/jobs"]).ok
    assert queued_in(shell, sched, work) == []

    # a CT segmented with a preset (the server job starts through the site's defaults and the preset)
    # an adult-size torso, as phantom-unet 2.0.0 is trained on (test_segment_cluster.py uses the same)
    image, truth, names = make_phantom(4242, shape=(112, 112, 48), spacing=(3.0, 3.0, 3.5), body_mm=320.0)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    try:
        r = cli("--preset", "gpu-small", "segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "mask.nii.gz"),
                "--model", "phantom-unet", "--timeout", "600")
        assert r.exit_code == 0, r.output
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz")))
        want = sitk.GetArrayFromImage(truth)
        assert max(dice(got == v, want == v) for v in names.values()) >= 0.9
        script = shell.read_text(shell.run(["sh", "-c", f"ls -d {shlex.quote(work)}/jobs/*/job.sh | head -1"]
                                           ).stdout.strip())
        directive = "#SBATCH --time=00:30:00" if sched == "slurm" else "#PBS -l walltime=00:30:00"
        assert directive in script  # the preset's walltime reached the job
        # one server is running: a second one passes max_servers = 1 and is refused, nothing queued
        before = queued_in(shell, sched, work)
        assert len(before) == 1
        r = cli("submit", "--no-wait")
        assert r.exit_code == 1 and "site limit max_servers = 1" in r.output and CONTACT in r.output
        assert queued_in(shell, sched, work) == before
    finally:
        cli("stop")
        for jid in queued_in(shell, sched, work):  # never leave a job behind, whatever failed above
            shell.run(["scancel", jid.split()[0]], timeout=30)


def test_admin_location_symlink_found_over_ssh_and_cached(cluster, shell, folder, tmp_path, monkeypatch):
    v1 = install(shell, f"{folder}/v1", site_toml(cluster, "slurm", folder))
    link = f"{folder}/etc-hpcseg-site"
    shell.run(["ln", "-sfn", v1, link], check=True)
    prof = Profile(name="me", host=cluster.host, user=cluster.user, identity_file=cluster.key_path,
                   known_hosts=cluster.known_hosts)
    r1 = resolve(prof, shell=shell, user_keys={"host", "user", "identity_file", "known_hosts"}, locations=(link,))
    assert r1.bundle.location == v1 and r1.profile.scheduler == "slurm" and r1.profile.partition == cluster.partition
    # an upgrade is a new folder and a flipped link; the client notices by the hash and reads it again
    v2 = install(shell, f"{folder}/v2", site_toml(cluster, "slurm", folder).replace("max_gpus = 2", "max_gpus = 1"))
    shell.run(["ln", "-sfn", v2, link], check=True)
    r2 = resolve(prof, shell=shell, user_keys={"host"}, locations=(link,))
    assert r2.bundle.digest != r1.bundle.digest and r2.bundle.limits.max_gpus == 1
    # roll back: flip the link back; the old digest is still in the cache
    shell.run(["ln", "-sfn", v1, link], check=True)
    r3 = resolve(prof, shell=shell, user_keys={"host"}, locations=(link,))
    assert r3.bundle.digest == r1.bundle.digest and r3.bundle.limits.max_gpus == 2


# ---- site validate ---------------------------------------------------------------------------------------------

def _validate(user_config, site: str):
    user_config(site)
    r = cli("site", "validate", site)
    bad = [ln for ln in r.output.splitlines() if ln.startswith("BAD ")]
    return r, bad


@pytest.mark.parametrize("sched", ["slurm", "pbs"])
def test_site_validate_healthy_bundle(sched, cluster, shell, folder, user_config):
    site = install(shell, folder, site_toml(cluster, sched, folder))
    r, bad = _validate(user_config, site)
    assert r.exit_code == 0 and bad == [], r.output
    assert "2 preset(s)" in r.output


@pytest.mark.parametrize("fault", ["bash-n", "partition", "image", "models-writable", "preset-past-limit"])
def test_site_validate_catches_each_fault_with_one_line(fault, cluster, shell, folder, user_config):
    text, templates = site_toml(cluster, "slurm", folder), {}
    if fault == "bash-n":
        templates = {"server.sh.j2": '{% extends "builtin/server.sh.j2" %}\n{% block body %}\nif then fi\n'
                                     '{{ super() }}{% endblock %}\n'}
    elif fault == "partition":
        text = text.replace(f'partitions = ["{cluster.partition}"]', f'partitions = ["{cluster.partition}", "ghost"]'
                            ).replace('[presets.cpu-debug]\ndescription = "no GPU, ten minutes"\n'
                                      f'partition = "{cluster.partition}"',
                                      '[presets.cpu-debug]\ndescription = "no GPU, ten minutes"\npartition = "ghost"')
    elif fault == "image":
        text = text.replace('device = "cpu"', f'device = "cpu"\ncontainer_runtime = "singularity"\n'
                                              f'image = "{folder}/images/missing.sif"')
    elif fault == "models-writable":
        shell.run(["mkdir", "-p", f"{folder}/models"], check=True)
        shell.run(["chmod", "777", f"{folder}/models"], check=True)
        text = text.replace('device = "cpu"', f'device = "cpu"\nmodels_dir = "{folder}/models"')
    elif fault == "preset-past-limit":
        text = text.replace("gpus = 1\ncpus = 1", "gpus = 4\ncpus = 1")
    site = install(shell, folder, text, templates)
    r, bad = _validate(user_config, site)
    assert r.exit_code == 1
    assert len(bad) == 1, r.output
    line = bad[0]
    assert "; fix: " in line
    want = {"bash-n": (f"{site}/templates/server.sh.j2", "bash -n"),
            "partition": (f"{site}/site.toml [presets.cpu-debug]", "no partition ghost"),
            "image": (f"{site}/site.toml [defaults]", "missing.sif' is not there"),
            "models-writable": (f"{folder}/models", "writable by others"),
            "preset-past-limit": (f"{site}/site.toml [presets.gpu-small]", "max_gpus = 2")}[fault]
    assert line.startswith("BAD " + want[0]) and want[1] in line, line


def test_site_init_writes_a_scaffold_that_validates(cluster, shell, folder, user_config):
    user_config(f"{folder}/none")
    r = cli("site", "init", f"{folder}/new")
    assert r.exit_code == 0, r.output
    text = shell.read_text(f"{folder}/new/site.toml")
    assert f'partition = "{cluster.partition}"' in text and 'scheduler = "slurm"' in text
    assert cli("site", "init", f"{folder}/new").exit_code == 1  # never overwritten unasked
    # an admin fills in the contact and a python that has hpcseg, then validates
    text = text.replace('contact = "EDIT: where users ask for help, e.g. hpc-support@example.org"',
                        f'contact = "{CONTACT}"')
    text = text.replace('python = "/usr/bin/python3"', f'python = "{cluster.python}"')
    shell.write_text(f"{folder}/new/site.toml", text, mode=0o644)
    r, bad = _validate(user_config, f"{folder}/new")
    assert r.exit_code == 0 and bad == [], r.output
    r = cli("site", "render", "cpu-debug", "--dir", f"{folder}/new", "-t", "server")
    assert r.exit_code == 0 and "#SBATCH --time=00:30:00" in r.output and "hpcseg.server" in r.output


# ---- doctor ----------------------------------------------------------------------------------------------------

@pytest.fixture
def doctor_site(cluster, shell, folder):
    limits = 'max_walltime = "01:00:00"\nmax_gpus = 2\nmax_servers = 1\nmax_idle_timeout = 900'
    site = install(shell, folder, site_toml(cluster, "slurm", folder, limits=limits, quota=True))
    return site


def _doctor(*args: str):
    r = cli(*args, "doctor", "--json")
    return r, json.loads(r.output)


def test_doctor_all_ok_then_each_fault_gives_exactly_its_own_line(cluster, shell, folder, doctor_site,
                                                                   user_config, tmp_path):
    user_config(doctor_site)
    r, out = _doctor()
    assert r.exit_code == 0 and out["ok"], [i for i in out["items"] if not i["ok"]]
    names = [i["item"] for i in out["items"]]
    for item in ("ssh reachable", "host key known", "login method", "scheduler commands", "site bundle",
                 "partition and GPU request", "container runtime and image", "server protocol",
                 "models dir readable", "datasets dir writable", "disk quota", "work dir private"):
        assert item in names, names
    assert any("key ssh-ed25519" in i["detail"] for i in out["items"] if i["item"] == "login method")

    # a fake venv folder bringing the FAKE singularity onto PATH, and an older hpcseg (before protocols)
    fake = f"{folder}/fakeenv"
    shell.run(["mkdir", "-p", f"{fake}/bin"], check=True)
    shell.write_text(f"{fake}/bin/activate", f'PATH="{fake}/bin:$PATH"; export PATH\n', mode=0o644)
    shell.write_text(f"{fake}/bin/singularity", FAKE_SINGULARITY.read_text(), mode=0o755)
    old_python = _old_hpcseg_python(shell, cluster, folder, tmp_path)
    shell.run(["mkdir", "-p", "-m", "000", f"{folder}/unreadable-models"], check=True)
    shell.run(["mkdir", "-p", "-m", "755", f"{folder}/open-work"], check=True)
    shell.run(["chmod", "755", f"{folder}/open-work"], check=True)

    faults = {
        "host key known": ([], {"known_hosts_empty": True}),
        "partition and GPU request": (["--set", "partition=ghost"], {}),
        "container runtime and image": (["--set", "container_runtime=singularity", "--set",
                                         f"image={folder}/missing.sif", "--set", f"venv={fake}"], {}),
        "models dir readable": (["--set", f"models_dir={folder}/unreadable-models"], {}),
        "server protocol": (["--set", f"python={old_python}"], {}),
        "work dir private": (["--set", f"work_dir={folder}/open-work"], {}),
    }
    for item, (args, how) in faults.items():
        if how.get("known_hosts_empty"):
            (tmp_path / "known_hosts").write_text("")
        r, out = _doctor(*args)
        if how.get("known_hosts_empty"):
            (tmp_path / "known_hosts").write_text(Path(cluster.known_hosts).read_text())
        bad = [i for i in out["items"] if not i["ok"]]
        assert r.exit_code == 1 and [i["item"] for i in bad] == [item], (item, out)
        assert bad[0]["fix"], bad[0]
        assert {"container runtime and image": "missing.sif", "partition and GPU request": "ghost",
                "models dir readable": "not readable", "work dir private": "others can read it",
                "host key known": "is not known", "server protocol": "older"}[item] in bad[0]["detail"], bad
    # the protocol fault says which versions and what to upgrade
    r, out = _doctor("--set", f"python={old_python}")
    line = next(i for i in out["items"] if i["item"] == "server protocol")
    assert "no protocol version (older)" in line["detail"] and "upgrade the server image or venv" in line["detail"]
    # the same check with the FAKE runtime and an image that exists: all ok again (the image's hpcseg answers)
    shell.write_text(f"{folder}/hpcseg.sif", "FAKE image", mode=0o644)
    r, out = _doctor("--set", "container_runtime=singularity", "--set", f"image={folder}/hpcseg.sif",
                     "--set", f"venv={fake}")
    assert r.exit_code == 0 and out["ok"], [i for i in out["items"] if not i["ok"]]
    r = cli("doctor")
    assert r.output.count("\n") >= 12 and "FIX" not in r.output


def test_slicers_worker_session_with_a_host_only_profile_uses_the_site(cluster, shell, folder, user_config):
    """The Slicer module's worker (hpcseg.worker) layers the site in at Connect, as the command does."""
    from hpcseg.config import load_config
    from hpcseg.worker.session import SegmentationSession

    site = install(shell, folder, site_toml(cluster, "slurm", folder))
    user_config(site)
    session = SegmentationSession(load_config().profile("me"), timeout=600)
    try:
        info = session.connect()
        assert "phantom-unet" in info["models"]
        assert session.profile.scheduler == "slurm" and session.profile.preset == "gpu-small"
        assert session.jobs.site is not None and session.jobs.site.location == site
        assert len(queued_in(shell, "slurm", f"{folder}/work")) == 1
    finally:
        session.stop()
        for jid in queued_in(shell, "slurm", f"{folder}/work"):
            shell.run(["scancel", jid.split()[0]], timeout=30)


def _old_hpcseg_python(shell, cluster, folder: str, tmp_path: Path) -> str:
    """A python on the cluster that imports hpcseg as it was before protocol versions (a real older release of
    this repository, exported with git archive): what an outdated site image or venv holds."""
    old = f"{folder}/old-hpcseg"
    archive = export_hpcseg(PRE_PROTOCOL_COMMIT)
    (tmp_path / "old.tar").write_bytes(archive)
    shell.run(["mkdir", "-p", old], check=True)
    shell.put(tmp_path / "old.tar", f"{folder}/old.tar")
    shell.run(["tar", "-x", "-C", old, "-f", f"{folder}/old.tar"], check=True, timeout=60)
    shell.write_text(f"{folder}/old-python", f'#!/bin/sh\nPYTHONPATH={old} exec {cluster.python} "$@"\n', mode=0o755)
    return f"{folder}/old-python"


def test_a_server_job_of_an_older_hpcseg_is_refused_in_one_line_and_cancelled(cluster, shell, folder, user_config,
                                                                                tmp_path):
    site = install(shell, folder, site_toml(cluster, "slurm", folder))
    user_config(site)
    old_python = _old_hpcseg_python(shell, cluster, folder, tmp_path)
    image, _, _ = make_phantom(5, shape=(32, 32, 24))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    try:
        r = cli("--set", f"python={old_python}", "segment", str(tmp_path / "ct.nii.gz"), "-o",
                str(tmp_path / "mask.nii.gz"), "--model", "phantom-unet", "--timeout", "600")
        assert r.exit_code == 1
        lines = r.output.strip().splitlines()
        errors = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
        assert len(errors) == 1, r.output
        first = lines[errors[0]]
        assert "no protocol version (older)" in first and "upgrade the server image or venv" in first, r.output
        assert "the job was cancelled" in first and "Traceback" not in r.output
        assert all(ln.startswith("  hint:") for ln in lines[errors[0] + 1:]), r.output  # no log tail after it
        assert not (tmp_path / "mask.nii.gz").exists()  # never a mask from a server it cannot trust
        deadline = time.monotonic() + 30  # cancelled: gone from squeue once Slurm has ended it (~0.3 s)
        while queued_in(shell, "slurm", f"{folder}/work") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queued_in(shell, "slurm", f"{folder}/work") == []
    finally:
        for jid in queued_in(shell, "slurm", f"{folder}/work"):
            shell.run(["scancel", jid.split()[0]], timeout=30)
