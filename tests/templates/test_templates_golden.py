"""Golden files: every built-in template × representative profiles, exactly as it would be submitted.

A change to a template shows up as a diff of the golden files in review (submitit's _sbatch_test_record.txt,
dask-jobqueue's job_script()). Regenerate after an intended change with::

    HPCSEG_UPDATE_GOLDEN=1 pytest tests/templates
"""

from __future__ import annotations

import os

import pytest
from tpl_support import GOLDEN

from hpcseg.config import Profile
from hpcseg.templates import TemplateEngine, build_context, check_script

HOME = "/home/alice"
SLURM = {"scheduler": "slurm", "host": "login.example.org"}
PBS = {"scheduler": "pbs", "host": "login.example.org"}
CASES: dict[str, dict] = {
    "slurm-gres": {**SLURM, "partition": "gpu"},
    "slurm-gpus-account": {**SLURM, "account": "OPEN-12-34", "partition": "qgpu", "gpu_directive": "gpus",
                           "gpu_type": "a100", "gpus": 2, "cpus": 16, "memory": "64GB", "walltime": "1-00:00:00",
                           "extra_directives": ["--constraint=a100", "--qos=normal"]},
    "pbs-pro": {**PBS, "pbs_dialect": "pro", "account": "proj01", "partition": "gpu_q", "memory": "32G",
                "walltime": "1-12:00:00"},
    "pbs-torque": {**PBS, "pbs_dialect": "torque", "partition": "batch", "modules": ["cuda/12.1", "python/3.11"],
                   "venv": "~/venvs/hpcseg"},
    "local": {"scheduler": "local", "gpus": 0, "python": "/usr/bin/python3", "idle_timeout": 0, "device": "cpu"},
    "container": {**SLURM, "partition": "gpu", "container_runtime": "apptainer", "image": "/sw/images/hpcseg.sif",
                  "binds": ["/scratch", "/data/ct:/data:ro"], "models_dir": "/project/hpcseg/models",
                  "datasets_dir": "/project/hpcseg/datasets", "modules": ["apptainer"]},
    "charliecloud": {**PBS, "pbs_dialect": "torque", "partition": "batch", "container_runtime": "charliecloud",
                     "image": "/sw/images/hpcseg-server", "binds": ["/scratch", "/data/ct:/data"],
                     "models_dir": "/project/hpcseg/models"},
    "space": {**SLURM, "partition": "gpu", "container_runtime": "singularity",
              "image": "/home/alice/My Images/hpcseg server.sif", "work_dir": "~/My Work/.hpcseg",
              "binds": ["/home/alice/Data Sets"], "venv": None},
}
PARAMS = {
    "run": {"command": ["python3", "-c", "print('hello, world')", "--out", "/tmp/a b"]},
    "server": {},
    "train": {"model": "/project/hpcseg/models/spleen/current", "dataset": "/project/hpcseg/datasets/spleen",
              "epochs": 50, "out_dir": "/project/hpcseg/models/spleen/v3", "lr": 1e-4,
              "extra_args": ["--batch-size", "2"]},
    "batch": {"batch_dir": "/home/alice/.hpcseg/batches/20240601-120000-ab12cd", "round": 1},
    "finetune": {"model": "spleen", "dataset": "/project/hpcseg/datasets/spleen", "epochs": 20, "force": False},
}


def golden_context(template: str, case: str) -> dict:
    fields = dict(CASES[case])
    work_dir = fields.pop("work_dir", "~/.hpcseg").replace("~", HOME, 1)
    prof = Profile(name=case, work_dir=work_dir, **fields)
    ctx = build_context(prof, template=template, job_dir=f"{work_dir}/jobs/20240601-120000-{template}",
                        work_dir=work_dir, job_name=f"hpcseg-{template}", params=PARAMS[template], home=HOME)
    ctx["hpcseg_version"] = "0.0.0+golden"  # golden files do not change with each release
    return ctx


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("template", sorted(PARAMS))
def test_golden(template, case, engine: TemplateEngine):
    text = engine.render(f"{template}.sh.j2", golden_context(template, case))
    path = GOLDEN / f"{template}-{case}.sh"
    if os.environ.get("HPCSEG_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run HPCSEG_UPDATE_GOLDEN=1 pytest tests/templates"
    assert text == path.read_text(), f"{path.name} differs: review, then HPCSEG_UPDATE_GOLDEN=1 pytest tests/templates"
    assert check_script(text) == []


def test_no_stray_golden_files():
    expected = {f"{t}-{c}.sh" for t in PARAMS for c in CASES}
    assert {p.name for p in GOLDEN.glob("*.sh")} <= expected
