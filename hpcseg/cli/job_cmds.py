"""``hpcseg submit``, ``status``, ``jobs``, ``cancel``, ``logs``."""

from __future__ import annotations

import sys

import click

from ..errors import ConfigError, JobError
from ..schedulers import JobStatus
from . import main
from .common import Ctx, emit_json, json_option, pass_ctx


def describe(st: JobStatus) -> str:
    """One line a person can read: "pending: waiting for resources, expected 14:05", "running on gpu017"."""
    text = st.state.value
    if st.reason:
        text += f": {st.reason}"
    if st.expected_start and st.state.value == "pending":
        text += f", expected {st.expected_start:%Y-%m-%d %H:%M}"
    if st.node and st.state.value in ("running", "completing"):
        text += f" on {st.node}"
    if st.exit_code is not None and st.state.terminal:
        text += f" (exit code {st.exit_code})"
    return text


def _params(items: tuple[str, ...]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--template", "-t", default="server", show_default=True, help="Job template to render.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A template parameter (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the exact script that would be submitted, submit nothing.")
@click.option("--wait/--no-wait", default=None,
              help="Wait until the job runs; a server job waits until it is ready (default for `server`).")
@click.option("--timeout", type=float, default=None, help="Seconds to wait with --wait.")
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def submit(ctx: Ctx, template: str, params: tuple[str, ...], dry_run: bool, wait: bool | None,
           timeout: float | None,
           as_json: bool, command: tuple[str, ...]) -> None:
    """Render a job template and submit it (COMMAND after `--` for the `run` template).

    \b
    Examples:
      hpcseg submit --dry-run                      # the server job script, as it would be submitted
      hpcseg submit -t run -- python train.py --epochs 3
    """
    p = _params(params)
    if wait is None:
        wait = template == "server"
    if command:
        p["command"] = list(command)
    jm = ctx.jobs
    if dry_run:
        script, _job_dir, _name = jm.render(template, p)
        click.echo(script, nl=False)
        return
    if template == "server" and wait:
        from ..serverjobs import ServerConnection
        from .server_cmds import _progress_line

        with ServerConnection(ctx.profile, jobs=jm, new=True, timeout=timeout,
                              progress=_progress_line(as_json), params=p) as conn:
            rec = conn.record
        if as_json:
            emit_json({"job_id": rec.job_id, "job_dir": rec.job_dir, "template": template, "profile": rec.profile,
                       "ready": True, "host": conn.info.host, "port": conn.info.port})
        else:
            click.echo(f"server job {rec.job_id} is ready; use it with hpcseg segment / hpcseg connect")
        return
    rec = jm.submit(template, p)
    if not as_json:
        click.echo(f"submitted {template} job {rec.job_id} ({ctx.profile.name}: {rec.job_dir})")
    st = None
    if wait:
        st = jm.wait(rec.job_id, lambda s: s.state.value in ("running", "completing") or s.state.terminal,
                     timeout=timeout, on_update=None if as_json else lambda s: click.echo(f"  {describe(s)}",
                                                                                         err=True))
    if as_json:
        emit_json({"job_id": rec.job_id, "job_dir": rec.job_dir, "template": template, "profile": rec.profile,
                   "status": st.to_dict() if st else None})


@main.command()
@click.argument("job_ids", nargs=-1)
@json_option
@pass_ctx
def status(ctx: Ctx, job_ids: tuple[str, ...], as_json: bool) -> None:
    """Status of jobs (default: this client's jobs of the profile that have not ended)."""
    jm = ctx.jobs
    ids = list(job_ids) or [r.job_id for r in jm.store.list(ctx.profile.name) if r.last_state not in _DONE]
    result = jm.status(ids)
    if as_json:
        emit_json({jid: st.to_dict() for jid, st in result.items()})
        return
    if not ids:
        click.echo("no active jobs (see: hpcseg jobs)")
    for jid in ids:
        click.echo(f"{jid:<12} {describe(result[jid])}")


_DONE = {"completed", "failed", "cancelled", "timeout", "node_fail", "out_of_memory", "lost"}


@main.command()
@click.option("--all", "show_all", is_flag=True, help="Also jobs that have ended.")
@json_option
@pass_ctx
def jobs(ctx: Ctx, show_all: bool, as_json: bool) -> None:
    """The jobs this client submitted with this profile (remembered locally), with fresh states."""
    jm = ctx.jobs
    recs = [r for r in jm.store.list(ctx.profile.name) if show_all or r.last_state not in _DONE]
    states = jm.status([r.job_id for r in recs]) if recs else {}
    rows = [{"job_id": r.job_id, "template": r.template, "created": r.created, "job_dir": r.job_dir,
             "status": states[r.job_id].to_dict()} for r in recs]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no {'' if show_all else 'active '}jobs for profile {ctx.profile.name}")
    for r in recs:
        click.echo(f"{r.job_id:<12} {r.template:<8} {r.created:<26} {describe(states[r.job_id])}")


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@json_option
@pass_ctx
def cancel(ctx: Ctx, job_ids: tuple[str, ...], as_json: bool) -> None:
    """Cancel jobs."""
    ctx.jobs.cancel(list(job_ids))
    if as_json:
        emit_json({"cancelled": list(job_ids)})
    else:
        click.echo(f"cancelled {' '.join(job_ids)}")


@main.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--file", "files", multiple=True, help="Only this log file (job.out, job.err, server.log).")
@json_option
@pass_ctx
def logs(ctx: Ctx, job_id: str, follow: bool, files: tuple[str, ...], as_json: bool) -> None:
    """Print a job's logs (its output, errors and server log; never its secrets)."""
    jm = ctx.jobs
    if follow:
        st = jm.follow(job_id, lambda _f, text: (sys.stdout.write(text), sys.stdout.flush()),
                       filename=files[0] if files else "job.out")
        if st is not None:
            click.echo(f"-- job {job_id} {describe(st)}", err=True)
        return
    found = jm.logs(job_id, files or ("job.out", "job.err", "server.log"))
    if not found:
        raise JobError(f"no logs found for job {job_id} (yet?)", hint=f"hpcseg status {job_id}")
    if as_json:
        emit_json(found)
        return
    for name, text in found.items():
        if len(found) > 1:
            click.echo(f"==> {name} <==")
        click.echo(text, nl=not text.endswith("\n"))
