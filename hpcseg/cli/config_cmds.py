"""``hpcseg config …``, ``hpcseg trust`` and ``hpcseg templates …``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..config import Profile, config_path, editable_profile, profile_from_dict, set_value
from ..containers import RUNTIME_PROGRAM
from ..errors import ConfigError, HpcsegError, UnknownHostKey
from . import main
from .common import Ctx, emit_json, json_option, pass_ctx

if TYPE_CHECKING:
    from ..shell import Shell


@main.group()
def config() -> None:
    """Create, show, change and check profiles (one TOML file shared with the Slicer plugin)."""


@config.command("init")
@click.option("--host", help="Login node: a host name or a ~/.ssh/config alias.")
@click.option("--scheduler", type=click.Choice(["slurm", "pbs", "local"]), default="slurm", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other profile key (repeatable).")
@click.option("--default/--no-default", "make_default", default=True, show_default=True,
              help="Make this the default profile.")
@click.option("--force", is_flag=True, help="Replace an existing profile of that name.")
@pass_ctx
def config_init(ctx: Ctx, host: str | None, scheduler: str, sets: tuple[str, ...], make_default: bool,
                force: bool) -> None:
    """Create a profile (named by --profile, default `default`) in the config file.

    \b
    Example:
      hpcseg -p karolina config init --host karolina --scheduler slurm \\
          --set account=OPEN-12-34 --set partition=qgpu --set container_runtime=apptainer \\
          --set image=/scratch/project/hpcseg/hpcseg-server.sif
    """
    cfg = ctx.config
    name = ctx.profile_name or "default"
    if name in cfg.profiles and not force:
        raise ConfigError(f"profile {name!r} exists in {cfg.path}", hint="use --force to replace it, or config set")
    if scheduler != "local" and not host:
        host = click.prompt("Login node (host name or ~/.ssh/config alias)")
    data: dict = {"scheduler": scheduler}
    if host:
        data["host"] = host
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        data[key.strip()] = value
    prof = profile_from_dict(name, {k: v for k, v in data.items()})
    for key in ("gpus", "cpus", "port", "idle_timeout"):  # command-line strings for int keys
        if key in data and isinstance(data[key], str):
            prof = set_value(prof, key, data[key])
    cfg.set_profile(prof, make_default=make_default)
    path = cfg.save()
    click.echo(f"profile {name!r} written to {path}" + (" (default)" if cfg.default == name else ""))
    if scheduler != "local":
        click.echo(f"next: hpcseg -p {name} config check")


@config.command("show")
@click.option("--origin", is_flag=True,
              help="The effective values (site bundle, preset and command line layered in) and where each came from.")
@json_option
@pass_ctx
def config_show(ctx: Ctx, origin: bool, as_json: bool) -> None:
    """Show the profile in use (and where the config file is)."""
    if origin:
        from .site_cmds import show_origins

        show_origins(ctx, as_json)
        return
    prof = ctx.file_profile
    data = {"config_file": str(ctx.config.path or config_path()), "default": ctx.config.default,
            "profiles": sorted(ctx.config.profiles), "profile": prof.name, **prof.to_dict(),
            **_where_models_are(prof)}  # the file's (no connection: `config show --origin` has the site's)
    if as_json:
        emit_json(data)
        return
    click.echo(f"# {data['config_file']}  (profiles: {', '.join(data['profiles']) or 'none'}; "
               f"default: {data['default'] or 'local'})")
    click.echo(f"[profiles.{prof.name}]")
    for k, v in prof.to_dict().items():
        click.echo(f"{k} = {v!r}")
    if prof.models_dir is None:  # not in the file: say where the server looks all the same
        click.echo(f"# models_dir = {data['models_dir']!r}  (not set: work_dir/models, unless the site sets it: "
                   "config show --origin; hpcseg config set models_dir DIR changes it)")
    click.echo(f"# served: models_dir, then the built-in models in {data['builtin_models_dir']}")


def _where_models_are(prof: Profile) -> dict[str, str]:
    """The models dir the profile's server reads (set or derived from work_dir) and the built-in models' dir."""
    builtin = Path(__file__).resolve().parent.parent / "models"  # = server.modelbase.builtin_models_dir(), no numpy
    return {"models_dir": prof.models_path, "builtin_models_dir": str(builtin)}


@config.command("set")
@click.argument("key")
@click.argument("value")
@pass_ctx
def config_set(ctx: Ctx, key: str, value: str) -> None:
    """Set one KEY of the profile to VALUE (lists: comma-separated; empty string unsets)."""
    cfg = ctx.config
    prof = set_value(editable_profile(cfg, ctx.profile_name), key, value)
    name = prof.name
    cfg.set_profile(prof)
    cfg.save()
    click.echo(f"profiles.{name}.{key} = {getattr(cfg.profiles[name], key)!r}")


def run_checks(prof: Profile, shell: Shell | None = None) -> list[dict]:
    """Connect and check the scheduler commands, the partition, the work dir, the image: ok or a fix each.

    ``shell``: a connection already open for this profile (the one the site bundle was read over), so the
    command logs in once; None opens one.
    """
    from ..jobs import JobManager

    checks: list[dict] = []

    def add(what: str, ok: bool, detail: str = "", fix: str = "") -> None:
        checks.append({"check": what, "ok": ok, "detail": detail, "fix": fix})

    try:
        prof.validate()
        add("profile values", True, f"{prof.scheduler}, {prof.gpus} GPU(s), {prof.cpus} CPUs, {prof.memory}, "
                                    f"walltime {prof.walltime}, runtime {prof.container_runtime}")
    except ConfigError as exc:
        add("profile values", False, exc.message, exc.hint or "")
        return checks
    jm = JobManager(prof, shell=shell)
    try:
        home = jm.shell.home()
        add("connect", True, f"{jm.shell.name} (home {home})")
    except HpcsegError as exc:
        add("connect", False, exc.message, exc.hint or "")
        return checks
    for what, cmd in jm.scheduler.check_commands(prof.partition):
        res = jm.shell.run(list(cmd.argv), timeout=30)
        add(what, res.ok, " | ".join((res.stdout if res.ok else res.stderr or res.stdout).strip().splitlines())[:300],
            "" if res.ok else "check scheduler and partition in the profile (hpcseg config set partition NAME), "
                              "or ask your admins")
    wd = jm.work_dir()
    res = jm.shell.run(f"mkdir -p {shlex.quote(wd)} && test -w {shlex.quote(wd)}")
    add("work dir", res.ok, wd, "" if res.ok else f"set work_dir to a writable folder (now {prof.work_dir})")
    if prof.container_runtime != "none":
        program = RUNTIME_PROGRAM[prof.container_runtime]
        res = jm.shell.run(["sh", "-c", 'command -v "$1" && test -r "$2"', "sh", program,
                            jm.abs_path(prof.image or "")])
        add("container", res.ok, f"{prof.container_runtime} {prof.image}",
            "" if res.ok else f"install/load {program} (modules = [...]) and check image path")
    else:
        py = prof.python
        activate = f". {shlex.quote(jm.abs_path(prof.venv))}/bin/activate && " if prof.venv else ""
        probe = "import hpcseg, sys; print(hpcseg.__version__, sys.version.split()[0])"
        res = jm.shell.run(f"{activate}{shlex.quote(py)} -c {shlex.quote(probe)}")
        add("python + hpcseg on the cluster", res.ok, (res.stdout or res.stderr).strip()[-200:],
            "" if res.ok else "set python/venv to an environment with hpcseg[server] installed, or use a container")
    return checks


@config.command("check")
@json_option
@pass_ctx
def config_check(ctx: Ctx, as_json: bool) -> None:
    """Connect, find the scheduler commands, the partition, the work dir and the image; say what to fix."""
    r = ctx.resolved  # read the site bundle over the connection the checks then use: one login
    checks = run_checks(r.profile, shell=r.shell)
    if as_json:
        emit_json(checks)
    else:
        for c in checks:
            mark = click.style("ok  ", fg="green") if c["ok"] else click.style("FIX ", fg="red")
            click.echo(f"{mark} {c['check']}: {c['detail']}")
            if not c["ok"] and c["fix"]:
                click.echo(f"     -> {c['fix']}")
    if not all(c["ok"] for c in checks):
        raise SystemExit(1)


@main.command()
@click.argument("host", required=False)
@click.option("--port", type=int, help="SSH port (default: the profile's port for its host, else from "
                                       "~/.ssh/config, else 22).")
@click.option("--fingerprint", metavar="SHA256:…", help="Trust only if the key has this fingerprint (no prompt).")
@click.option("--yes", is_flag=True, help="Trust without asking (only if you checked the fingerprint elsewhere).")
@pass_ctx
def trust(ctx: Ctx, host: str | None, port: int | None, fingerprint: str | None, yes: bool) -> None:
    """Record HOST's SSH host key (default: the profile's host) in hpcseg's known_hosts after you check its
    fingerprint."""
    from ..ssh import fetch_host_key, trust_host_key
    from ..ssh import fingerprint as fp_of

    host, port = _trust_target(ctx, host, port)
    target, key = fetch_host_key(host, port)
    fp = fp_of(key)
    click.echo(f"{target.hostname}:{target.port} offers {key.get_name()} {fp}")
    if fingerprint:
        if fingerprint.strip() != fp:
            raise UnknownHostKey(f"the key's fingerprint {fp} is not the expected {fingerprint}: not trusted",
                                 host=target.hostname, fingerprint=fp)
    elif not yes and not click.confirm("Does this match the fingerprint your cluster publishes?"):
        raise SystemExit(1)
    path = trust_host_key(target, key)
    click.echo(f"trusted: added to {path}")


def _trust_target(ctx: Ctx, host: str | None, port: int | None) -> tuple[str, int | None]:
    """HOST (else the profile's host) and the port: ``--port``, else the profile's when HOST is its host."""
    try:  # the file's profile: resolving the site layer would connect, and the host is not trusted yet
        prof: Profile | None = ctx.file_profile
    except HpcsegError:
        prof = None  # a broken or missing profile must not stop trusting an explicitly named host
    if not host:
        if prof is None or not prof.host:
            raise ConfigError("no HOST given and the profile has no host", hint="hpcseg trust HOST [--port N]")
        host = prof.host
    if port is None and prof is not None and host == prof.host:
        port = prof.port
    return host, port


@main.group()
def templates() -> None:
    """List, show and validate job templates (site > user > built-in)."""


def _engine(ctx: Ctx):
    from ..templates import TemplateEngine

    return TemplateEngine(site_dir=ctx.profile.template_dir)


@templates.command("list")
@json_option
@pass_ctx
def templates_list(ctx: Ctx, as_json: bool) -> None:
    """The templates hpcseg can submit, and where each comes from."""
    infos = _engine(ctx).list()
    if as_json:
        emit_json([{"name": i.name, "origin": i.origin, "path": str(i.path), "description": i.description}
                   for i in infos])
        return
    for i in infos:
        click.echo(f"{i.name:<16} {i.origin:<8} {i.description}")


@templates.command("show")
@click.argument("name")
@pass_ctx
def templates_show(ctx: Ctx, name: str) -> None:
    """Print a template's source."""
    click.echo(_engine(ctx).source(name), nl=False)


@templates.command("validate")
@click.argument("names", nargs=-1)
@pass_ctx
def templates_validate(ctx: Ctx, names: tuple[str, ...]) -> None:
    """Render with sample values for each scheduler and run `bash -n` on the result."""
    eng = _engine(ctx)
    bad = 0
    for name in names or [i.name for i in eng.list()]:
        problems = eng.validate(name)
        click.echo(f"{'ok ' if not problems else 'BAD'} {name}")
        for p in problems:
            click.echo(f"    {p}")
        bad += bool(problems)
    if bad:
        raise SystemExit(1)
