"""``hpcseg site init|validate|render|presets``, ``hpcseg doctor`` and ``config show --origin``."""

from __future__ import annotations

import click

from ..errors import ConfigError
from . import main
from .common import Ctx, emit_json, json_option, pass_ctx


def show_origins(ctx: Ctx, as_json: bool) -> None:
    """The effective profile, each value with the layer it came from (``config show --origin``)."""
    r = ctx.resolved
    values = r.profile.to_dict()
    embedded = r.profile.name not in ctx.config.profiles  # the embedded `local` profile: all of it is built in

    def origin(key: str) -> str:
        came = r.origins.get(key, "built-in")
        return "built-in (local)" if embedded and came == "profile" else came

    rows = [{"key": k, "value": values.get(k), "origin": origin(k)} for k in sorted(r.origins) if k in values]
    site = None if r.bundle is None else {"location": r.bundle.location, "name": r.bundle.name,
                                          "contact": r.bundle.contact, "digest": r.bundle.digest}
    if as_json:
        emit_json({"profile": r.profile.name, "site": site, "values": rows})
        return
    click.echo(f"# profile {r.profile.name}; site bundle: "
               + (f"{site['location']} ({site['name'] or 'unnamed'})" if site else "none"))
    width = max((len(row["key"]) for row in rows), default=0)
    for row in rows:
        click.echo(f"{row['key']:<{width}} = {row['value']!r:<40} # {row['origin']}")


@main.group()
def site() -> None:
    """For cluster admins: write, check and preview the site bundle users' profiles build on."""


def _shell(ctx: Ctx):
    """The shell of the chosen profile without the site layer (an admin may be installing it right now)."""
    from ..site import site_shell

    return site_shell(ctx.file_profile)


@site.command("init")
@click.argument("folder")
@click.option("--scheduler", type=click.Choice(["slurm", "pbs"]), default=None,
              help="Which commands to ask (default: what the login node has, Slurm first).")
@click.option("--force", is_flag=True, help="Replace an existing site.toml.")
@pass_ctx
def site_init(ctx: Ctx, folder: str, scheduler: str | None, force: bool) -> None:
    """Write a commented scaffold FOLDER/site.toml from what the cluster offers (partitions or queues, GRES,
    a python). FOLDER is on the profile's machine (the login node).

    \b
    Example:
      hpcseg -p mycluster site init /opt/hpcseg/site-2026-12
      hpcseg -p mycluster site validate /opt/hpcseg/site-2026-12
    """
    from ..siteadmin import scaffold

    scaffold(_shell(ctx), folder, scheduler=scheduler, force=force)
    click.echo(f"wrote {folder.rstrip('/')}/site.toml: edit it, then hpcseg site validate {folder}")


@site.command("validate")
@click.argument("folder", required=False)
@json_option
@pass_ctx
def site_validate(ctx: Ctx, folder: str | None, as_json: bool) -> None:
    """Check a bundle (FOLDER, default: the installed one): every template for every preset renders and passes
    `bash -n` and the scheduler's dry run, paths exist, nothing users trust is writable by others, the image is
    there, and no preset breaks a limit. One line per problem, naming the file and the fix; exit 1 on any."""
    from ..siteadmin import validate

    bundle, problems = validate(_shell(ctx), folder, ctx.file_profile)
    if as_json:
        emit_json({"ok": not problems, "location": bundle.location if bundle else folder,
                   "presets": sorted(bundle.presets) if bundle else [],
                   "problems": [{"file": p.file, "message": p.message, "fix": p.fix} for p in problems]})
    else:
        for p in problems:
            click.echo(f"BAD {p}")
        if not problems and bundle is not None:
            click.echo(f"ok  {bundle.location}: {len(bundle.presets)} preset(s) "
                       f"({', '.join(sorted(bundle.presets))}), templates, paths and limits")
    if problems:
        raise SystemExit(1)


@site.command("render")
@click.argument("preset")
@click.option("--template", "-t", "templates", multiple=True,
              help="Only this template (repeatable; default: server, run, train, finetune).")
@click.option("--dir", "folder", default=None, help="A bundle folder not yet installed.")
@pass_ctx
def site_render(ctx: Ctx, preset: str, templates: tuple[str, ...], folder: str | None) -> None:
    """Print the exact job scripts a user whose profile holds only a host gets with PRESET."""
    from ..site import fetch
    from ..siteadmin import JOB_TEMPLATES, render_preset

    shell = _shell(ctx)
    bundle = fetch(shell, folder or ctx.file_profile.site)
    if bundle is None:
        raise ConfigError("no site bundle found", hint="give its folder: hpcseg site render PRESET --dir DIR")
    scripts = render_preset(bundle, preset, ctx.file_profile, shell, tuple(templates) or JOB_TEMPLATES)
    for name, text in scripts.items():
        click.echo(f"# ---- {name}.sh.j2 with preset {preset} ----")
        click.echo(text, nl=False)


@site.command("presets")
@json_option
@pass_ctx
def site_presets(ctx: Ctx, as_json: bool) -> None:
    """The site's presets for your profile, and the refusal where one breaks a limit with your values."""
    from ..site import presets_for

    prof = ctx.file_profile
    rows = presets_for(prof, user_keys=ctx.config.explicit.get(prof.name))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no site bundle (or no presets) for this profile")
    for row in rows:
        mark = "*" if row["default"] else " "
        click.echo(f"{mark} {row['name']:<20} {row['description']}")
        if row["refusal"]:
            click.echo(f"    refused: {row['refusal']}")


@main.command()
@json_option
@pass_ctx
def doctor(ctx: Ctx, as_json: bool) -> None:
    """Check everything between you and a working server job, one line each: ok, or exactly what to do."""
    from ..doctor import as_json as items_json
    from ..doctor import diagnose

    prof = ctx.file_profile
    items = diagnose(prof, user_keys=ctx.config.explicit.get(prof.name), preset=ctx.preset,
                     overrides=ctx.overrides)
    if as_json:
        emit_json({"ok": all(i.ok for i in items), "items": items_json(items)})
    else:
        for i in items:
            click.echo(click.style(i.line()[:3], fg="green" if i.ok else "red") + i.line()[3:])
    if not all(i.ok for i in items):
        raise SystemExit(1)
