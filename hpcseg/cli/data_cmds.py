"""``hpcseg upload``, ``datasets``, ``dataset show``, ``train``, ``models``, ``reload``: closing the loop."""

from __future__ import annotations

import json
import posixpath
import shlex
from pathlib import Path

import click

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
@click.option("--labels", help="For a new dataset: NAME=VALUE,... (default: the mask's .labels.json sidecar).")
@click.option("--split", type=click.Choice(["train", "val", "auto"]), default="auto", show_default=True)
@click.option("--model-version", help="Which model version produced the first mask (provenance).")
@json_option
@pass_ctx
def upload(ctx: Ctx, pairs: tuple[Path, ...], dataset: str, labels: str | None, split: str,
           model_version: str | None, as_json: bool) -> None:
    """Upload validated IMAGE MASK pairs (IMAGE1 MASK1 IMAGE2 MASK2 ...) into a dataset on the cluster.

    Each pair is checked before a byte is sent (readable, same geometry, known non-empty integer labels),
    compressed, hashed and moved into place only when complete. Run the same command again to finish an
    interrupted upload; pairs already there are skipped.
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
                       f"{r.bytes_sent / 1e6:.1f} MB sent for {r.raw_bytes / 1e6:.1f} MB raw)")
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
@click.option("--force", is_flag=True, help="Make the new version current even if validation Dice dropped.")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to end, printing its log.")
@click.option("--dry-run", is_flag=True, help="Print the job script, submit nothing.")
@json_option
@pass_ctx
def train(ctx: Ctx, model: str, dataset: str, epochs: int | None, force: bool, wait: bool, dry_run: bool,
          as_json: bool) -> None:
    """Fine-tune a model on a dataset in a batch job; the new version becomes current only if no worse.

    Follow it with `hpcseg logs JOB -f`; list versions with `hpcseg models`.
    """
    jm = ctx.jobs
    params = {"model": model, "dataset": posixpath.join(jm.abs_path(ctx.profile.datasets_path), dataset),
              "force": force}
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


@main.command()
@json_option
@pass_ctx
def models(ctx: Ctx, as_json: bool) -> None:
    """Models on the cluster (and built-in), their versions and validation Dice; * marks the current one."""
    jm = ctx.jobs
    prof = ctx.profile
    activate = f". {shlex.quote(jm.abs_path(prof.venv))}/bin/activate && " if prof.venv else ""
    py = shlex.quote(jm.abs_path(prof.python))
    if prof.container_runtime != "none":
        py = f"{prof.container_runtime} exec {shlex.quote(jm.abs_path(prof.image or ''))} {py}"
    res = jm.shell.run(f"{activate}{py} -m hpcseg.modelstore list --models-dir "
                       f"{shlex.quote(jm.abs_path(prof.models_path))}", timeout=120).check(
        hint="the login node must run hpcseg's python (profile python/venv/container)")
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    if as_json:
        emit_json(rows)
        return
    for m in rows:
        click.echo(f"{m['name']}{' (built-in)' if m['builtin'] else ''}")
        for v in m["versions"]:
            dice = v.get("val_dice") or {}
            mean = f"mean Dice {sum(dice.values()) / len(dice):.3f}" if dice else ""
            mark = "*" if v["version"] == m["current"] else " "
            click.echo(f"  {mark} {v['version']:<10} {v.get('model_version') or '':<10} {mean}")


@main.command()
@json_option
@pass_ctx
def reload(ctx: Ctx, as_json: bool) -> None:
    """Make the profile's running server re-read its models (e.g. after training moved `current`)."""
    from ..serverjobs import ServerConnection

    with ServerConnection(ctx.profile, start=False) as conn:
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
