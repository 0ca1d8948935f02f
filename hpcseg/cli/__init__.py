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
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="hpcseg")
@click.pass_context
def main(ctx: click.Context, profile: str | None, verbose: int) -> None:
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
    ctx.obj = Ctx(profile_name=profile)


from . import batch_cmds, config_cmds, data_cmds, job_cmds, server_cmds  # noqa: E402  (register the commands)

__all__ = ["main", "pass_ctx", "batch_cmds", "config_cmds", "data_cmds", "job_cmds", "server_cmds"]
