"""``hpcseg segment``, ``connect``, ``stop``, ``sample-ct``: the server side of a person's day."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..errors import ImageError
from . import main
from .common import Ctx, emit_json, json_option, pass_ctx


def _progress_line(quiet: bool):
    """Print each new waiting state on one updating line of stderr (a person sees it; --json keeps stdout)."""
    start = time.monotonic()
    tty = sys.stderr.isatty()

    def show(msg: str) -> None:
        if quiet:
            return
        line = f"[{time.monotonic() - start:5.0f} s] {msg}"
        if tty:  # one line that updates in place; the last state stays
            click.echo(f"\r{line}\033[K", err=True, nl=msg.startswith("ready"))
        else:
            click.echo(line, err=True)

    return show


def _bar(label: str, quiet: bool):
    """A tqdm bar driven by (done, total) callbacks from the HTTP client."""
    from tqdm import tqdm

    bar = None

    def cb(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=total or None, desc=label, unit="B", unit_scale=True, leave=False)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return cb


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Mask file: .seg.nrrd (3D Slicer, label names inside), .nii.gz, .nii, .nrrd, .mha or .mhd "
                   "(label names in a .labels.json next to it); in the input's exact geometry.")
@click.option("--model", "-m", default=None,
              help="Model to run (default: the profile's default_model, else ct-body for CT-like input, else a "
                   "model declaring the input's modality; the choice and its reason are printed).")
@click.option("--labels", default=None, metavar="A,B", help="Only these structures, e.g. liver,spleen.")
@click.option("--fast", is_flag=True, help="Coarser spacing: quicker, rougher.")
@click.option("--no-start", is_flag=True, help="Use a running server only; never submit a job.")
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds to wait for a server.")
@click.option("--format", "fmt", type=click.Choice(["mask", "dicom-seg"]), default="mask", show_default=True,
              help="dicom-seg: a DICOM Segmentation object (OUTPUT.dcm) over IMAGE's series (a DICOM input).")
@json_option
@pass_ctx
def segment(ctx: Ctx, image: Path, output: Path, model: str | None, labels: str | None, fast: bool,
            no_start: bool, timeout: float, fmt: str, as_json: bool) -> None:
    """Segment IMAGE (NIfTI, NRRD, MHA or a DICOM folder) on the profile's server; write the mask to OUTPUT.

    Reuses a running server job of the profile or starts one. With no config at all this runs the same server
    on this machine (the embedded `local` profile).

    \b
    Example:
      hpcseg segment ct.nii.gz -o ct-seg.seg.nrrd --model phantom-unet
    """
    from .. import imaging
    from ..serverjobs import ServerConnection

    # Everything that can be refused is refused here, before a server starts or an image is sent.
    if fmt == "dicom-seg":
        from ..dicomseg import series_files

        if output.suffix.lower() != ".dcm":
            raise ImageError(f"{output}: a DICOM SEG is written as a .dcm file", hint="name it e.g. ct-seg.dcm")
        series_files(image)  # a DICOM series, and one we can name
    else:
        imaging.check_output_path(output, source=image)
    img = imaging.as_volume(imaging.read_image(image), image)
    shown: list[str] = []

    def warn(text: str) -> None:
        if text not in shown:
            shown.append(text)
            click.secho(f"warning: {text}", fg="yellow", err=True)

    for warning in imaging.check_input(img, {}):
        warn(warning)
    wanted = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    with ServerConnection(ctx.profile, jobs=ctx.jobs, start=not no_start, timeout=timeout,
                          progress=_progress_line(as_json)) as conn:
        if model is None:
            choice = conn.client.default_model(img, ctx.profile.default_model)
            model, why = choice.name, choice.reason
        else:
            why = "named with -m"
        if not as_json:
            click.echo(f"model: {model} ({why})", err=True)
        declared = (conn.client.info(refresh=False).get("models", {}).get(model) or {}).get("modality")
        mismatch = imaging.modality_warning(img, declared)
        if mismatch:  # before the upload; the server's own check says the same afterwards (shown once)
            warn(mismatch)
        from .progress_display import RequestProgress

        shown_progress = RequestProgress(quiet=as_json)  # bars on a terminal, plain lines in a log
        try:
            res = conn.client.segment(img, model=model, labels=wanted, fast=fast, progress=shown_progress)
        finally:
            shown_progress.close()
    for warning in res.warnings:  # the model's own checks (e.g. "not CT-like") and what the client changed
        warn(warning)
    mask, names, version = res
    if fmt == "dicom-seg":
        from ..dicomseg import write_dicom_seg

        write_dicom_seg(mask, image, output, names, model=model, version=str(version))
    else:
        imaging.write_mask(mask, output, names, reference=img)
    result = {"output": str(output), "model": model, "model_reason": why, "model_version": version, "labels": names,
              "job_id": conn.record.job_id if conn.record else None, "profile": ctx.profile.name,
              "warnings": shown}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"wrote {output} ({model} {version}; labels: {', '.join(names) or 'none'})")


@main.command()
@click.option("--timeout", type=float, default=1800, show_default=True)
@click.option("--no-start", is_flag=True, help="Only attach to a running server.")
@click.option("--show-token", is_flag=True, help="Print the server's token (a password: keep it off shared screens).")
@json_option
@pass_ctx
def connect(ctx: Ctx, timeout: float, no_start: bool, show_token: bool, as_json: bool) -> None:
    """Keep a tunnel to the profile's server open and print the local URL and how to log in (Ctrl-C ends it).

    MONAI Label clients (its Slicer plugin, its Python client) work against that URL: log in with any user name
    and the printed token as password.
    """
    from ..serverjobs import ServerConnection

    with ServerConnection(ctx.profile, jobs=ctx.jobs, start=not no_start, timeout=timeout,
                          progress=_progress_line(as_json)) as conn:
        token = conn.info.token if show_token else "<hidden: add --show-token>"
        info = {"url": conn.url, "token": token, "job_id": conn.record.job_id, "profile": ctx.profile.name}
        if as_json:
            emit_json(info)
        else:
            click.echo(f"server ready: {conn.url}  (job {conn.record.job_id})")
            click.echo(f"  HTTP header:  Authorization: Bearer {token}")
            click.echo("  MONAI Label:  server address above; user: any; password: the token")
            click.echo("Ctrl-C closes the tunnel (the job keeps running until idle; hpcseg stop ends it).")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@main.command()
@json_option
@pass_ctx
def stop(ctx: Ctx, as_json: bool) -> None:
    """Stop the profile's server jobs (they also end by themselves when idle)."""
    from ..serverjobs import stop_servers

    ended: list[str] = []
    ids = stop_servers(ctx.jobs, ended)
    if as_json:
        emit_json({"stopped": ids, "already_ended": ended})
    else:
        if ended:
            click.echo(f"already ended: {' '.join(ended)} (nothing to stop; `hpcseg jobs` shows how)")
        if ids:
            click.echo(f"stopped {' '.join(ids)}")
        elif not ended:
            click.echo("no server job to stop")


@main.command("sample-ct")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default=Path("sample-ct.nii.gz"))
@click.option("--seed", type=int, default=0, show_default=True)
def sample_ct(path: Path, seed: int) -> None:
    """Write a synthetic CT phantom (body, lungs, bone, liver) to try hpcseg without data."""
    from ..phantoms import write_sample_ct

    if path.suffix not in (".gz", ".nii", ".nrrd", ".mha"):
        raise ImageError(f"{path}: use a .nii.gz, .nii, .nrrd or .mha file name")
    write_sample_ct(path, seed=seed)
    click.echo(f"wrote {path}")


