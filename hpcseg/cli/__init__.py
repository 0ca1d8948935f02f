"""The ``hpcseg`` command: one thin function per command over the library.

Expected failures (an :class:`~hpcseg.errors.HpcsegError`) print as one line plus a hint and exit 1; ``--json``
prints machine-readable output on stdout; ``--profile`` (or ``HPCSEG_PROFILE``) picks the profile everywhere.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import HpcsegError
from .common import Ctx, pass_ctx


class HpcsegGroup(click.Group):
    """Turns HpcsegError into one clear line and exit code 1 (not a traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HpcsegError as exc:
            click.secho(f"error: {exc.message}", fg="red", err=True)
            if exc.hint:
                click.echo(f"  hint: {exc.hint}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=HpcsegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", "-p", envvar="HPCSEG_PROFILE", metavar="NAME",
              help="Profile from the config file (default: the file's default, else the embedded `local`).")
@click.option("--preset", envvar="HPCSEG_PRESET", metavar="NAME", help="A preset of the cluster's site bundle.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a profile key for this command (repeatable); site limits still apply.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="hpcseg")
@click.pass_context
def main(ctx: click.Context, profile: str | None, preset: str | None, sets: tuple[str, ...], verbose: int) -> None:
    """Segment CT and MRI on your cluster's GPUs as if they were local.

    \b
    First steps:
      hpcseg segment scan.nii.gz -o mask.nii.gz      # no config: runs on this machine
      hpcseg config init --profile mycluster         # then: hpcseg -p mycluster config check
      hpcseg -p mycluster submit                     # start a server job on a GPU node
    """
    import logging

    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = Ctx(profile_name=profile, preset=preset, overrides=_overrides(sets))


def _overrides(sets: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        out[key.strip()] = value
    return out


from . import batch_cmds, config_cmds, data_cmds, job_cmds, server_cmds, site_cmds  # noqa: E402  (register)

__all__ = ["main", "pass_ctx", "batch_cmds", "config_cmds", "data_cmds", "job_cmds", "server_cmds", "site_cmds"]
