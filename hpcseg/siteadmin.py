"""What a cluster admin does with a site bundle: write a scaffold, validate it, render what users will get.

``scaffold`` asks the cluster what it has (partitions or queues, GRES, a python) and writes a commented
``site.toml``. ``validate`` renders every job template for every preset, runs ``bash -n`` and the scheduler's own
dry run (``sbatch --test-only``; PBS has none, so the queue is looked up with ``qstat -Q``), checks that the
paths exist, that no site, models or template folder is writable by others, that the image is there and that no
preset breaks a limit. Each problem is one line naming the file and the fix. ``render`` gives the exact scripts.

Example::

    problems = validate(shell, "/opt/hpcseg/site-2026-12")
    for p in problems:
        print(p)          # site.toml [presets.a100]: partition = 'a100' does not exist here ...; fix: ...
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

from .config import Profile
from .errors import ConfigError, HpcsegError
from .shell import Shell
from .site import SITE_FILE, SiteBundle, check_limits, fetch, layer_profile

#: the job templates users submit (base.sh.j2 and the scheduler headers are parts of them)
JOB_TEMPLATES = ("server", "run", "train", "finetune")


@dataclass
class Problem:
    """One thing wrong with a bundle: the file (and table) it is in, what is wrong, and the fix."""

    file: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}; fix: {self.fix}"


def preset_profile(bundle: SiteBundle, preset: str | None, base: Profile) -> tuple[Profile, dict[str, str]]:
    """What a user whose profile holds only a host gets with ``preset``: the connection keys of ``base``
    (the admin's own profile), the site's defaults and the preset."""
    conn = {k: getattr(base, k) for k in ("host", "user", "port", "identity_file", "proxy_jump", "known_hosts")
            if getattr(base, k) is not None and getattr(base, k) != ""}
    layers: list[tuple[str, dict[str, Any]]] = [("site", bundle.defaults)]
    if preset:
        layers.append((f"preset {preset}", bundle.preset(preset)))
    prof, origins = layer_profile(base.name, [*layers, ("profile", conn)])
    prof.preset = preset
    return prof, origins


def render_preset(bundle: SiteBundle, preset: str | None, base: Profile, shell: Shell,
                  templates: tuple[str, ...] = JOB_TEMPLATES) -> dict[str, str]:
    """The exact script of each job template a user gets with ``preset`` (limits checked first)."""
    from .jobs import JobManager
    from .templates import _SAMPLE_PARAMS

    prof, origins = preset_profile(bundle, preset, base)
    jm = JobManager(prof, shell=shell, site=bundle, origins=origins)
    return {t: jm.render(t, dict(_SAMPLE_PARAMS), name=f"{t}-example")[0] for t in templates}


def validate(shell: Shell, folder: str | None, base: Profile) -> tuple[SiteBundle | None, list[Problem]]:
    """Every problem of the bundle at ``folder`` (None: where the login node says) on ``shell``'s machine."""
    where = posixpath.join(folder or "(site)", SITE_FILE)
    try:
        bundle = fetch(shell, folder)
    except ConfigError as exc:
        return None, [Problem(where, exc.message, exc.hint or "fix site.toml")]
    if bundle is None:
        return None, [Problem(where, "no site bundle found", "give the folder: hpcseg site validate DIR")]
    where = posixpath.join(bundle.location, SITE_FILE)
    problems: list[Problem] = []
    if not bundle.contact:
        problems.append(Problem(f"{where} [site]", "no contact line: refusals cannot say whom to ask",
                                'set contact = "who users write to" under [site]'))
    presets = sorted(bundle.presets) or [None]
    checked_sched: set[tuple[str, str | None]] = set()
    # a broken template breaks every preset: one line per template, naming the presets it was seen with
    rendered: dict[tuple[str, str], tuple[Problem, list[str]]] = {}
    paths: dict[tuple[str, str], tuple[str, str, str]] = {}  # each path checked once, named by its table
    for preset in presets:
        label = f"{where} [presets.{preset}]" if preset else f"{where} [defaults]"
        prof, origins = preset_profile(bundle, preset, base)
        try:
            check_limits(bundle, prof, origins)
        except HpcsegError as exc:
            problems.append(Problem(label, f"the preset breaks a limit: {exc.message.split('; nothing')[0]}",
                                    "change the preset or the limit in [limits]"))
        for key, problem in _render_checks(bundle, preset, prof, shell, label).items():
            rendered.setdefault(key, (problem, []))[1].append(preset or "the defaults")
        key = (prof.scheduler, prof.partition)
        if prof.scheduler != "local" and key not in checked_sched:
            checked_sched.add(key)
            problems += _scheduler_checks(bundle, preset, prof, shell, label)
        for key, path, test, fix in _paths(prof):
            table = f"[presets.{preset}]" if origins.get(key, "").startswith("preset") else "[defaults]"
            paths.setdefault((key, path), (test, fix, f"{where} {table}"))
    for problem, seen_with in rendered.values():
        problems.append(Problem(problem.file, f"{problem.message} (with {', '.join(seen_with)})", problem.fix))
    for (key, path), (test, fix, label) in paths.items():
        if not shell.run(["test", test, path], timeout=30).ok:
            problems.append(Problem(label, f"{key} = {path!r} is not there", fix))
    problems += _permission_checks(bundle, shell, where)
    seen, unique = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            unique.append(p)
    return bundle, unique


def _template_file(bundle: SiteBundle, name: str) -> str:
    """The bundle file a template problem most likely lives in (its own override, else its base override)."""
    d = bundle.templates_dir
    for candidate in (f"{name}.sh.j2", "base.sh.j2", "slurm/header.sh.j2", "pbs/header.sh.j2"):
        if d is not None and (d / candidate).is_file():
            return posixpath.join(bundle.location, "templates", candidate)
    return f"built-in {name}.sh.j2"


def _jobs(prof: Profile, shell: Shell, bundle: SiteBundle):
    """A JobManager rendering with the bundle's templates, without the limit check (reported separately)."""
    from .jobs import JobManager
    from .templates import TemplateEngine

    return JobManager(prof, shell=shell, engine=TemplateEngine.for_profile(prof, bundle=bundle), site=None)


def _render_checks(bundle: SiteBundle, preset: str | None, prof: Profile, shell: Shell, label: str
                   ) -> dict[tuple[str, str], Problem]:
    """Render each job template with the preset: the first problem of each, keyed by (file, template)."""
    from .templates import _SAMPLE_PARAMS, check_script

    jm = _jobs(prof, shell, bundle)
    out: dict[tuple[str, str], Problem] = {}
    for t in JOB_TEMPLATES:
        file = _template_file(bundle, t)
        try:
            script = jm.render(t, dict(_SAMPLE_PARAMS), name=f"{t}-validate")[0]
        except HpcsegError as exc:
            out[(file, t)] = Problem(file, f"{t} does not render: {exc.message}",
                                     "fix the template (hpcseg site render PRESET shows the script)")
            continue
        found = check_script(script)
        if found:
            out[(file, t)] = Problem(file, f"{t}: bash -n: {' / '.join(found)}",
                                     "fix the template's shell syntax (hpcseg site render PRESET shows the script)")
    return out


def _scheduler_checks(bundle: SiteBundle, preset: str | None, prof: Profile, shell: Shell, label: str
                      ) -> list[Problem]:
    from .schedulers import SubmitSpec
    from .templates import _SAMPLE_PARAMS

    jm = _jobs(prof, shell, bundle)
    key = "partition" if prof.scheduler == "slurm" else "queue"
    for what, cmd in jm.scheduler.check_commands(prof.partition):
        res = shell.run(list(cmd.argv), timeout=30)
        if not res.ok:
            detail = (res.stderr or res.stdout).strip().splitlines()
            fix = (f"set {key} in {label.split(' ', 1)[1]} to one that exists"
                   if what.startswith(("partition", "queue"))
                   else f"install or load the {prof.scheduler} commands on the login node")
            return [Problem(label, f"{what}: {detail[-1] if detail else 'failed'}", fix)]
    tmp = shell.run(["mktemp", "-d"], timeout=30)
    if not tmp.ok:
        return [Problem(label, f"cannot make a temporary folder for the dry run: {tmp.stderr.strip()}",
                        "check /tmp on the login node")]
    d = tmp.stdout.strip()
    out = []
    try:
        script = jm.render("server", dict(_SAMPLE_PARAMS), name="dry-run", work_dir=d)[0]
        shell.write_text(posixpath.join(d, "job.sh"), script, mode=0o700)
        cmd = jm.scheduler.test_submit_command(SubmitSpec(script_path=posixpath.join(d, "job.sh"), job_dir=d,
                                                          job_name="hpcseg-validate"))
        if cmd is not None:
            res = shell.run(list(cmd.argv), timeout=60)
            if not res.ok:
                msg = " / ".join((res.stderr or res.stdout).strip().splitlines()[-2:])
                out.append(Problem(label, f"the scheduler's dry run ({cmd.argv[0]} --test-only) refuses the "
                                   f"request: {msg}", f"fix {key}, gpus/gpu_type or gpu_directive"))
    except HpcsegError:
        pass  # the render checks report it
    finally:
        shell.run(["rm", "-rf", "--", d], timeout=30)
    return out


def _paths(prof: Profile) -> list[tuple[str, str, str, str]]:
    """(key, path, test flag, fix) for the site paths a preset's jobs need (``~`` paths are each user's own)."""
    checks = []
    if prof.container_runtime != "none" and prof.image:
        checks.append(("image", prof.image, "-r", "copy the image there (singularity/README.md) or fix image"))
    if prof.models_dir:
        checks.append(("models_dir", prof.models_dir, "-d", "create the folder (readable by users) or fix models_dir"))
    if prof.python.startswith("/"):
        checks.append(("python", prof.python, "-x", "install hpcseg there or fix python"))
    if prof.venv:
        checks.append(("venv", prof.venv, "-d", "create the venv or fix venv"))
    return [c for c in checks if not c[1].startswith("~")]


def _permission_checks(bundle: SiteBundle, shell: Shell, where: str) -> list[Problem]:
    """Folders users trust must not be writable by others: the bundle, its templates, the models dir."""
    dirs = [(posixpath.dirname(where), "the site folder")]
    models = bundle.defaults.get("models_dir")
    if isinstance(models, str) and models.startswith("/"):
        dirs.append((models, "the models folder"))
    for preset, values in bundle.presets.items():
        m = values.get("models_dir")
        if isinstance(m, str) and m.startswith("/"):
            dirs.append((m, f"the models folder of preset {preset}"))
    out = []
    for d, what in dict.fromkeys(dirs):
        res = shell.run(["sh", "-c", 'test -d "$1" || exit 0; find "$1" -maxdepth 3 -perm -0002 ! -type l -print '
                         '2>/dev/null | head -n 1', "sh", d], timeout=60)
        bad = res.stdout.strip()
        if bad:
            out.append(Problem(bad, f"{what} is writable by others (anyone could change what every user runs)",
                               f"chmod o-w {shlex.quote(bad)} (and everything under it)"))
    return out


# ---- the scaffold ------------------------------------------------------------------------------------------------

_PROBE = r"""
s=$1
if [ -z "$s" ]; then
  if command -v sbatch >/dev/null 2>&1; then s=slurm; elif command -v qsub >/dev/null 2>&1; then s=pbs; fi
fi
echo "scheduler ${s:-none}"
case $s in
  slurm) sinfo -h -o 'part %R %G %l' 2>/dev/null ;;
  pbs) qstat -Q 2>/dev/null | awk 'NR>2 {print "part", $1, "-", "-"}' ;;
esac
for p in python3 python; do c=$(command -v $p 2>/dev/null) && { echo "python $c"; break; }; done
for r in apptainer singularity; do command -v $r >/dev/null 2>&1 && { echo "runtime $r"; break; }; done
"""


def discover(shell: Shell, scheduler: str | None = None) -> dict[str, Any]:
    """What the cluster offers: scheduler, partitions or queues with GRES and time limit, a python, a runtime."""
    res = shell.run(["sh", "-c", _PROBE, "sh", scheduler or ""], timeout=60)
    found: dict[str, Any] = {"scheduler": scheduler or "slurm", "partitions": [], "python": "python3",
                             "runtime": "none"}
    for line in res.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "scheduler" and rest != "none":
            found["scheduler"] = rest
        elif word == "part":
            name, gres, limit = (rest.split() + ["-", "-"])[:3]
            if name.rstrip("*") not in [p["name"] for p in found["partitions"]]:
                found["partitions"].append({"name": name.rstrip("*"), "gres": gres, "time_limit": limit})
        elif word == "python":
            found["python"] = rest
        elif word == "runtime":
            found["runtime"] = rest
    return found


def scaffold_text(found: dict[str, Any]) -> str:
    """A commented site.toml from what :func:`discover` found."""
    parts = found["partitions"] or [{"name": "gpu", "gres": "gpu:1", "time_limit": "-"}]
    gpu = next((p for p in parts if "gpu" in p["gres"]), parts[0])
    cpu = next((p for p in parts if "gpu" not in p["gres"]), gpu)
    q = "queue" if found["scheduler"] == "pbs" else "partition"
    names = ", ".join(f'"{p["name"]}"' for p in parts)
    found_lines = "\n".join(f"#   {p['name']}: GRES {p['gres']}, time limit {p['time_limit']}" for p in parts)
    return f'''# hpcseg site bundle: written by `hpcseg site init`; edit, then `hpcseg site validate` this folder.
# Found on the cluster:
{found_lines}
# Users need only a host in their profile; these values are layered under theirs, and [limits] bind all.

[site]
name = "EDIT: your site's name"
contact = "EDIT: where users ask for help, e.g. hpc-support@example.org"
default_preset = "gpu-interactive"
# quota_command = ["quota", "-s"]        # doctor shows its output

[defaults]
scheduler = "{found["scheduler"]}"
python = "{found["python"]}"              # the interpreter with hpcseg[server], or use a container:
container_runtime = "none"               # {found["runtime"]} found; with it set image = "/path/hpcseg-server.sif"
# models_dir = "/opt/hpcseg/models"      # a shared read-only models folder (not writable by others)
# datasets_dir = "~/hpcseg-datasets"
# modules = ["cuda/12.1"]
# binds = ["/scratch"]

[presets.gpu-interactive]
description = "one GPU for interactive segmentation"
{q} = "{gpu["name"]}"
gpus = 1
cpus = 4
memory = "16G"
walltime = "02:00:00"

[presets.cpu-debug]
description = "no GPU, short: try things out"
{q} = "{cpu["name"]}"
gpus = 0
cpus = 2
memory = "4G"
walltime = "00:30:00"

[limits]
partitions = [{names}]         # PBS sites may write queues = [...]
# accounts = ["proj-123"]
max_walltime = "08:00:00"
max_gpus = 2
max_cpus = 16
max_memory = "64G"
max_servers = 2                 # concurrent server jobs per user
max_idle_timeout = 3600         # seconds; users cannot ask for "never"
user_templates = false          # users may not bring their own job templates
user_models_dir = true          # users may serve models from their own folders
'''


def scaffold(shell: Shell, folder: str, *, scheduler: str | None = None, force: bool = False) -> str:
    """Write ``folder/site.toml`` (and ``templates/``) on the shell's machine; returns the text written."""
    target = posixpath.join(folder, SITE_FILE)
    if shell.run(["test", "-e", target], timeout=30).ok and not force:
        raise ConfigError(f"{target} exists", hint="give another folder (a new version), or --force to replace it")
    text = scaffold_text(discover(shell, scheduler))
    shell.run(["mkdir", "-p", "-m", "755", folder, posixpath.join(folder, "templates")], timeout=30, check=True)
    shell.run(["chmod", "755", folder, posixpath.join(folder, "templates")], timeout=30, check=True)
    shell.write_text(target, text, mode=0o644)
    return text
