"""``hpcseg upload``, ``datasets``, ``dataset show``, ``train``, ``models``, ``reload``: closing the loop."""

from __future__ import annotations

import json
import posixpath
import shlex
from pathlib import Path

import click

from ..containers import exec_prefix
from ..errors import ConfigError, DatasetError
from . import main
from .common import Ctx, emit_json, json_option, pass_ctx
from .job_cmds import describe
from .server_cmds import _bar


def _uploader(ctx: Ctx):
    from ..datasets import DatasetUploader

    jm = ctx.jobs
    return DatasetUploader(jm.shell, jm.abs_path(ctx.profile.datasets_path))


def _labels(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ConfigError(f"--labels {text!r}: expected NAME=VALUE,... e.g. liver=1,spleen=2")
        out[name.strip()] = int(value)
    return out


@main.command()
@click.argument("pairs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", "-d", required=True, help="Dataset name on the cluster (created on first upload).")
@click.option("--labels", help="The labels these masks annotate, NAME=VALUE,... (default: the mask's .labels.json "
              "sidecar, else the labels present). A declared label absent from a mask is annotated as absent; a "
              "label not declared is not annotated, and training learns nothing about it from these cases.")
@click.option("--split", type=click.Choice(["train", "val", "auto"]), default="auto", show_default=True)
@click.option("--model-version", help="Which model version produced the first mask (provenance).")
@json_option
@pass_ctx
def upload(ctx: Ctx, pairs: tuple[Path, ...], dataset: str, labels: str | None, split: str,
           model_version: str | None, as_json: bool) -> None:
    """Upload validated IMAGE MASK pairs (IMAGE1 MASK1 IMAGE2 MASK2 ...) into a dataset on the cluster.

    Each pair is checked before a byte is sent (readable, same geometry, known non-empty integer labels),
    compressed, hashed and moved into place only when complete. Run the same command again to finish an
    interrupted upload; pairs already there are skipped. Each case records which labels its mask annotates
    (partial masks are fine: fine-tuning masks the loss of the labels a case leaves out).
    """
    if len(pairs) % 2:
        raise DatasetError("give pairs: IMAGE MASK [IMAGE MASK ...]")
    up = _uploader(ctx)
    lbl = _labels(labels)
    results, failed = [], 0
    items = []
    for image, mask in zip(pairs[::2], pairs[1::2], strict=True):
        pair_labels = lbl
        sidecar = Path(str(mask).removesuffix(".gz").removesuffix(".nii").removesuffix(".nrrd") + ".labels.json")
        if pair_labels is None and sidecar.exists():
            pair_labels = {k: int(v) for k, v in json.loads(sidecar.read_text(encoding="utf-8")).items()}
        items.append((image, mask, pair_labels))
    # The next pair is read, checked and compressed while this one is on the wire.
    for image, mask, r in up.upload_many(items, dataset=dataset, split=split, model_version=model_version,
                                         progress_for=lambda image: _bar(f"{image.name}", as_json)):
        if isinstance(r, DatasetError):
            exc = r
            failed += 1
            results.append({"image": str(image), "mask": str(mask), "status": "refused", "error": exc.message,
                            "hint": exc.hint})
            if not as_json:
                click.secho(f"refused {image} + {mask}: {exc.message}", fg="red", err=True)
                if exc.hint:
                    click.echo(f"  hint: {exc.hint}", err=True)
            continue
        results.append({"image": str(image), "mask": str(mask), **r.__dict__})
        if not as_json:
            click.echo(f"{r.status:<8} {image.name} -> {dataset}/{r.case_id} ({r.split}; "
                       f"{r.bytes_sent / 1e6:.1f} MB sent for {r.raw_bytes / 1e6:.1f} MB raw"
                       + (f"; annotates {', '.join(r.annotated)}" if r.annotated else "") + ")")
    if as_json:
        emit_json(results)
    if failed:
        raise SystemExit(1)


@main.command()
@json_option
@pass_ctx
def datasets(ctx: Ctx, as_json: bool) -> None:
    """Datasets on the cluster with their case counts."""
    rows = _uploader(ctx).list()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no datasets under {ctx.profile.datasets_path}")
    for r in rows:
        if "error" in r:
            click.echo(f"{r['name']:<20} unreadable: {r['error']}")
        else:
            click.echo(f"{r['name']:<20} {r['training']:>4} training {r['validation']:>4} validation  "
                       f"labels: {', '.join(v for k, v in sorted((r['labels'] or {}).items()) if k != '0')}")


@main.group()
def dataset() -> None:
    """One dataset on the cluster."""


@dataset.command("show")
@click.argument("name")
@json_option
@pass_ctx
def dataset_show(ctx: Ctx, name: str, as_json: bool) -> None:
    """The dataset's manifest: labels, cases, provenance."""
    man = _uploader(ctx).manifest(name)
    if as_json:
        emit_json(man)
        return
    click.echo(f"{man.get('name')}: {len(man.get('training', []))} training, "
               f"{len(man.get('validation', []))} validation; labels {man.get('labels')}")
    for case, prov in sorted(man.get("hpcseg", {}).get("cases", {}).items()):
        click.echo(f"  {case}  {prov.get('split'):<5} {prov.get('uploaded_at')}  {prov.get('uploaded_by')}  "
                   f"model {prov.get('model_version') or '-'}")


@main.command()
@click.option("--model", "-m", required=True, help="Model to fine-tune (its current version).")
@click.option("--dataset", "-d", required=True, help="Dataset on the cluster.")
@click.option("--epochs", type=int, help="Training epochs (default: the model's recipe).")
@click.option("--force", is_flag=True, help="Make the new version current even if a label's Dice dropped beyond "
              "the tolerance or the dataset has fewer than 3 validation cases.")
@click.option("--tolerance", type=float, help="Largest drop of any label's Dice the gate accepts (default 0.02).")
@click.option("--label-map", help="DATASET_LABEL=MODEL_LABEL,... for dataset labels the model does not have.")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to end, printing its log.")
@click.option("--dry-run", is_flag=True, help="Print the job script, submit nothing.")
@json_option
@pass_ctx
def train(ctx: Ctx, model: str, dataset: str, epochs: int | None, force: bool, tolerance: float | None,
          label_map: str | None, wait: bool, dry_run: bool, as_json: bool) -> None:
    """Fine-tune a model on a dataset in a batch job; the new version becomes current only if no worse.

    The gate compares the base and new versions label by label on the base's reference set and on the dataset's
    validation split: any label whose Dice drops by more than the tolerance keeps the base current. Follow the
    job with `hpcseg logs JOB -f`; `hpcseg models` shows the per-label figures and the decision.
    """
    from ..modelstore import parse_label_map

    jm = ctx.jobs
    parse_label_map(label_map)  # a malformed map fails here, not in the job
    params = {"model": model, "dataset": posixpath.join(jm.abs_path(ctx.profile.datasets_path), dataset),
              "force": force}
    if tolerance is not None:
        params["tolerance"] = tolerance
    if label_map:
        params["label_map"] = label_map
    if epochs:
        params["epochs"] = epochs
    if dry_run:
        click.echo(jm.render("finetune", params)[0], nl=False)
        return
    rec = jm.submit("finetune", params)
    if not as_json:
        click.echo(f"submitted training job {rec.job_id}: follow it with hpcseg logs {rec.job_id} -f")
    st = None
    if wait:
        st = jm.follow(rec.job_id, (lambda _f, t: None) if as_json else (lambda _f, t: click.echo(t, nl=False)))
        if not as_json and st is not None:
            click.echo(f"-- job {rec.job_id} {describe(st)}", err=True)
    if as_json:
        emit_json({"job_id": rec.job_id, "job_dir": rec.job_dir, "status": st.to_dict() if st else None})


@main.group(invoke_without_command=True)
@json_option
@pass_ctx
@click.pass_context
def models(click_ctx: click.Context, ctx: Ctx, as_json: bool) -> None:
    """Models on the cluster (and built-in), their versions, and for each fine-tuned version the gate's per-label
    Dice before/after (reference set and validation split) and why it was or was not promoted; * marks current.

    `hpcseg models check DIR` validates a model folder here before it goes to the cluster."""
    if click_ctx.invoked_subcommand is not None:
        return
    jm = ctx.jobs
    prof = ctx.profile
    activate = f". {shlex.quote(jm.abs_path(prof.venv))}/bin/activate && " if prof.venv else ""
    py = shlex.quote(jm.abs_path(prof.python))
    if prof.container_runtime != "none":
        prefix = exec_prefix(prof.container_runtime, jm.abs_path(prof.image or ""))
        py = f"{shlex.join(prefix)} {py}"
    res = jm.shell.run(f"{activate}{py} -m hpcseg.modelstore list --models-dir "
                       f"{shlex.quote(jm.abs_path(prof.models_path))}", timeout=120).check(
        hint="the login node must run hpcseg's python (profile python/venv/container)")
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    if as_json:
        emit_json(rows)
        return
    from ..gate import format_rows

    for m in rows:
        click.echo(f"{m['name']}{' (built-in)' if m['builtin'] else ''}")
        for v in m["versions"]:
            dice = {k: d for k, d in (v.get("val_dice") or {}).items() if d is not None}
            per = "val Dice " + " ".join(f"{k} {d:.3f}" for k, d in dice.items()) if dice else ""
            mark = "*" if v["version"] == m["current"] else " "
            click.echo(f"  {mark} {v['version']:<10} {v.get('model_version') or '':<10} {per}")
            gate = v.get("gate")
            if gate:
                verdict = "promoted" if gate.get("promoted") else "not promoted"
                click.echo(f"      from {gate.get('base_version')}: {verdict}: {'; '.join(gate.get('reasons') or [])}")
                for w in gate.get("warnings") or []:
                    click.echo(f"      warning: {w}")
                for line in format_rows(gate.get("rows") or []):
                    click.echo(f"        {line}")


@main.command()
@json_option
@pass_ctx
def reload(ctx: Ctx, as_json: bool) -> None:
    """Make the profile's running server re-read its models (e.g. after training moved `current`)."""
    from ..serverjobs import ServerConnection

    with ServerConnection(ctx.profile, jobs=ctx.jobs, start=False) as conn:
        info = conn.client.reload()
    if as_json:
        emit_json(info)
    else:
        click.echo(describe_reload(info))


def describe_reload(info: dict) -> str:
    """What a reload did, from ``/info/`` after it: each model it loaded, reloaded, dropped or failed on, or that
    nothing changed (with what serves)."""
    changes = (info.get("hpcseg") or {}).get("last_reload") or {}
    if changes:
        return "\n".join(f"{name}: {what}" for name, what in changes.items())
    serving = ", ".join(f"{n} {m.get('version')}" for n, m in (info.get("models") or {}).items()) or "none"
    return f"nothing changed on disk; serving: {serving}"


@models.command("check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image", type=click.Path(exists=True, path_type=Path), default=None,
              help="An input to plan for and run on (default: a synthetic CT phantom).")
@click.option("--no-run", is_flag=True, help="Validate and plan only; do not load and run the model.")
@click.option("--device", default="cpu", show_default=True, help="Where to run it once: cpu, cuda, auto.")
@json_option
def models_check(folder: Path, image: Path | None, no_run: bool, device: str, as_json: bool) -> None:
    """Validate a model FOLDER locally, print what the server will do to an input (orientation, resampling,
    cropping, intensity, window, the axis order the network gets) and run it once.

    \b
    Example:
      hpcseg models check ./my-brain-model --image t1.nii.gz
    """
    from .. import imaging
    from ..server.modelcheck import check_model

    img = imaging.as_volume(imaging.read_image(image), image) if image else None
    report = check_model(folder, img, device=device, run=not no_run)
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(f"{report.name} {report.version} ({report.type}; labels "
               f"{', '.join(f'{k} {v}' for k, v in report.labels.items())}) served by {report.served_by}: ok")
    for step, what in report.plan:
        click.echo(f"  {step + ':':<15} {what}")
    for w in report.warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    if report.run:
        r = report.run
        found = ", ".join(f"{k} {v} voxels" for k, v in r["voxels"].items()) or "nothing (all background)"
        click.echo(f"ran once on {r['device']} (load {r['load_seconds']} s, inference {r['infer_seconds']} s): "
                   f"{found}; mask in the input's geometry: {'yes' if r['same_geometry'] else 'NO'}")
