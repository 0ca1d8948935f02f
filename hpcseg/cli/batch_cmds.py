"""``hpcseg batch``: segment a cohort as one job array; ``batch status|collect|cancel|list`` to follow it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from . import main
from .common import Ctx, emit_json, json_option, pass_ctx


class _BatchGroup(click.Group):
    """``hpcseg batch INPUT... -o OUT`` starts a batch: anything that is not a subcommand goes to ``start``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class _ProgressBar:
    """A tqdm bar over the batch's cases (done + failed of those that can run), ETA and counts in its postfix."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def __call__(self, s: dict[str, Any]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        total = s["cases"] - s["invalid"]
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"batch {s['batch_id']}", unit="case", file=sys.stderr)
        self.bar.set_postfix_str(f"failed {s['failed']}, running {s['running']}, queued {s['queued']}, "
                                 f"ETA {_duration(s['eta_seconds'])}", refresh=False)
        self.bar.update(s["done"] + s["failed"] + s["cancelled"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(s: dict[str, Any]) -> None:
    click.echo(f"batch {s['batch_id']} ({s['profile']}, {s['model']}): {s['done']} done, {s['failed']} failed, "
               f"{s['invalid']} invalid, {s['running']} running, {s['queued']} queued of {s['cases']}"
               + (f"; ETA {_duration(s['eta_seconds'])}" if s["eta_seconds"] and not s["finished"] else ""))
    for r in s["rounds"]:
        click.echo(f"  round {r['round']}: array {r['array_id']} ({r['size']} tasks)")
    if s["tasks"]:
        click.echo("  tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(s["tasks"].items())))
    click.echo(f"  report: {Path(s['out_dir']) / 'report.csv'}")


def _follow(batch, wait: bool, as_json: bool) -> None:
    bar = _ProgressBar(as_json)
    upload = None
    if not as_json:
        def upload(done: int, total: int) -> None:
            click.echo(f"\ruploaded {done}/{total} inputs", err=True, nl=done == total)
    try:
        summary = batch.run(wait=wait, on_progress=bar, on_upload=upload)
    finally:
        bar.close()
    if as_json:
        emit_json(summary)
    else:
        _print_summary(summary)
        for c in batch.state["cases"]:
            if c["status"] in ("failed", "invalid"):
                click.secho(f"  {c['case_id']}: {c['status']}: {c['reason']}", fg="yellow", err=True)


@main.group(cls=_BatchGroup)
def batch() -> None:
    """Segment many cases as one job array (resumable), with a per-case report.

    \b
    Examples:
      hpcseg -p cluster batch scans/ more.nii.gz -o out/ --model ct-body --tasks 8
      hpcseg -p cluster batch cases.csv -o out/ --format dicom-seg
      hpcseg -p cluster batch status            # the newest batch; or give its id or output folder
      hpcseg -p cluster batch collect BATCH     # carry on after a kill or a sleeping laptop
    """


@batch.command("start")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the masks (one per case, in its input's geometry), report.csv and report.json.")
@click.option("--model", "-m", default=None, help="Model to run (default: the profile's default_model, else "
                                                   "ct-body).")
@click.option("--labels", default=None, metavar="A,B", help="Only these structures, e.g. liver,spleen.")
@click.option("--tasks", "-k", type=int, default=4, show_default=True,
              help="Array tasks (K): at most K run at once, each loads the model once and takes cases in turn.")
@click.option("--format", "fmt", type=click.Choice(["seg.nrrd", "nii.gz", "nii", "nrrd", "mha", "dicom-seg"]),
              default="seg.nrrd", show_default=True, help="Mask format; dicom-seg needs DICOM series as inputs.")
@click.option("--fast", is_flag=True, help="Coarser spacing: quicker, rougher.")
@click.option("--no-wait", is_flag=True, help="Upload and submit, then return (follow with `batch collect`).")
@json_option
@pass_ctx
def start(ctx: Ctx, inputs: tuple[Path, ...], out_dir: Path, model: str | None, labels: str | None, tasks: int,
          fmt: str, fast: bool, no_wait: bool, as_json: bool) -> None:
    """Segment INPUTS (files, folders of scans or DICOM series, or a CSV of `case_id,path`) into OUT.

    Every input is checked here first (as `segment` does); a bad one is reported and the others go on.
    """
    from ..batch import start_batch

    def seen(case) -> None:
        if case.error and not as_json:
            click.secho(f"warning: {case.case_id}: {case.error} (left out)", fg="yellow", err=True)

    wanted = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    b = start_batch(ctx.profile, list(inputs), out_dir, model=model, labels=wanted, tasks=tasks, fmt=fmt,
                    fast=fast, on_case=seen)
    b._jobs = ctx.jobs
    if not as_json:
        click.echo(f"batch {b.id}: {len(b.keys())} image(s) to segment; `hpcseg batch collect {b.id}` resumes it",
                   err=True)
    _follow(b, not no_wait, as_json)


def _open(ctx: Ctx, batch_ref: str | None):
    from ..batch import Batch, BatchStore

    out = BatchStore().find(batch_ref, None if batch_ref else ctx.profile.name)
    b = Batch(out, ctx.profile)
    if b.state["profile"] != ctx.profile.name:  # the batch names its profile: use it
        from ..config import load_config

        b = Batch(out, load_config().profile(b.state["profile"]), state=b.state)
    else:
        b._jobs = ctx.jobs
    return b


@batch.command()
@click.argument("batch_ref", metavar="[BATCH]", required=False)
@json_option
@pass_ctx
def status(ctx: Ctx, batch_ref: str | None, as_json: bool) -> None:
    """Cases done, failed, running and queued, the array's tasks, and an ETA (nothing is downloaded)."""
    b = _open(ctx, batch_ref)
    s = b.status()
    if as_json:
        emit_json(s)
    else:
        _print_summary(s)


@batch.command()
@click.argument("batch_ref", metavar="[BATCH]", required=False)
@click.option("--no-wait", is_flag=True, help="Collect what is there now, then return.")
@json_option
@pass_ctx
def collect(ctx: Ctx, batch_ref: str | None, no_wait: bool, as_json: bool) -> None:
    """Carry a batch on: upload what is missing, submit if needed, fetch results until every case has ended."""
    _follow(_open(ctx, batch_ref), not no_wait, as_json)


@batch.command()
@click.argument("batch_ref", metavar="[BATCH]", required=False)
@json_option
@pass_ctx
def cancel(ctx: Ctx, batch_ref: str | None, as_json: bool) -> None:
    """Cancel the batch's array job; cases not done read `cancelled` in the report."""
    b = _open(ctx, batch_ref)
    ids = b.cancel()
    if as_json:
        emit_json({"batch_id": b.id, "cancelled": ids})
    else:
        click.echo(f"cancelled {' '.join(ids)}" if ids else f"batch {b.id}: no array job to cancel")


@batch.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """The batches started from this machine for the profile."""
    from ..batch import BatchStore

    records = BatchStore().list(ctx.profile.name)
    if as_json:
        emit_json(records)
        return
    for r in records:
        click.echo(f"{r['batch_id']}  {r['created']}  {r['out_dir']}")
