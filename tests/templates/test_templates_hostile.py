"""Hostile values never break a script or run as commands.

1. Property (hypothesis): hostile text in every string-valued key that reaches the body, for every template,
   scheduler and container runtime: ``bash -n`` passes (check_script) every time.
2. Property: hostile text in directive fields is either refused (ConfigError/TemplateError) or lands, whole, on
   one directive line.
3. Execution: the rendered scripts really run (bash, LocalShell): ``printf '%s\\0' WORDS...`` prints the words
   byte for byte, the server/train command lines reach the program word for word, through the FAKE container
   runtime too, and no injected ``touch CANARY`` ever runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tpl_support import canaries, hostile_nonempty, hostile_text, hostile_words, local_context, write_exe

from hpcseg.config import Profile
from hpcseg.errors import ConfigError, TemplateError
from hpcseg.shell import LocalShell
from hpcseg.templates import DIRECTIVE_WORD, TemplateEngine, build_context, check_script, sample_context

TEMPLATES = ("run.sh.j2", "server.sh.j2", "train.sh.j2", "finetune.sh.j2", "batch.sh.j2")
ENGINE = TemplateEngine(user_dir="/nonexistent/hpcseg-test-user-templates")
VARIANTS = {"slurm": ("slurm", {}), "slurm-gpus": ("slurm", {"gpu_directive": "gpus", "gpu_type": "a100"}),
            "pbs-pro": ("pbs", {}), "pbs-torque": ("pbs", {"pbs_dialect": "torque"}), "local": ("local", {})}
SAFE_WORD = st.from_regex(DIRECTIVE_WORD, fullmatch=True)
_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def hostile_contexts(draw):
    sched, fields = VARIANTS[draw(st.sampled_from(sorted(VARIANTS)))]
    runtime = draw(st.sampled_from(["none", "singularity", "apptainer"]))
    ctx = sample_context(sched, container_runtime=runtime, image="/x.sif", **fields)
    lists = st.lists(hostile_text, max_size=3)
    ctx.update({
        "job_dir": draw(hostile_text), "work_dir": draw(hostile_text), "models_dir": draw(hostile_text),
        "datasets_dir": draw(hostile_text), "image": draw(hostile_text), "venv": draw(hostile_text),
        "python": draw(hostile_text), "device": draw(hostile_text), "binds": draw(lists),
        "container_binds": draw(lists), "modules": draw(lists), "idle_timeout": draw(st.integers(0, 10**9)),
        "gpus": draw(st.integers(0, 8)),
        "params": {"command": draw(st.lists(hostile_text, min_size=1, max_size=5)), "model": draw(hostile_text),
                   "dataset": draw(hostile_text), "out_dir": draw(hostile_text),
                   "epochs": draw(st.integers(1, 10**6)), "lr": draw(st.floats(1e-9, 10)),
                   "builtin": draw(st.one_of(st.none(), hostile_nonempty)), "version": draw(hostile_text),
                   "extra_args": draw(lists), "batch_dir": draw(hostile_text),
                   "round": draw(st.integers(0, 10**6))},
    })
    return ctx


@settings(_settings, max_examples=int(os.environ.get("HPCSEG_HOSTILE_EXAMPLES", "250")))
@given(hostile_contexts())
def test_hostile_values_in_the_body_keep_every_template_valid_bash(ctx):
    # ~19 hostile values per example, each rendered into 5 templates: 250 examples give > 4,000 values
    for name in TEMPLATES:
        assert check_script(ENGINE.render(name, ctx)) == [], ENGINE.render(name, ctx)


@settings(_settings, max_examples=150)
@given(key=st.sampled_from(["account", "partition", "gpu_type", "job_name", "extra_directives"]),
       value=st.one_of(SAFE_WORD, hostile_nonempty, SAFE_WORD.map(lambda w: "--" + w)),
       sched=st.sampled_from(sorted(VARIANTS)))
def test_hostile_directive_values_are_refused_or_land_whole(key, value, sched):
    scheduler, fields = VARIANTS[sched]
    prof_fields = dict(fields, **({key: [value]} if key == "extra_directives" else {} if key == "job_name"
                                  else {key: value}))
    prof = Profile(name="p", scheduler=scheduler, host="login", gpus=1, **prof_fields)
    job_name = value if key == "job_name" else "j"
    if key == "extra_directives":
        allowed = value.startswith("-") and not any(c in value for c in "\r\n\x00")
    else:
        allowed = bool(DIRECTIVE_WORD.match(value))
    try:
        ctx = build_context(prof, template="run", job_dir="/w/j", work_dir="/w", job_name=job_name,
                            params={"command": ["true"]})
        out = ENGINE.render("run.sh.j2", ctx)
    except (ConfigError, TemplateError):
        # refused: rightly so, or (extra directives) because the line would end inside a quote
        assert not allowed or (key == "extra_directives" and ("'" in value or '"' in value or "\\" in value))
        return
    assert allowed, f"{value!r} reached a directive line"
    if scheduler == "local" or (key == "gpu_type" and scheduler == "pbs"):  # no header / PBS takes no type
        return
    assert check_script(out) == []
    assert any(line.startswith(("#SBATCH", "#PBS")) and value in line for line in out.splitlines())


# ---- really running the scripts ------------------------------------------------------------------------------

def _run(script_path, *, env=None, timeout=60):
    return LocalShell(env=env).run(["bash", str(script_path)], timeout=timeout)


def _job(tmp_path, name="job $(touch CANARY) `touch CANARY`; 'q' \"d\" é ~ * -x"):
    """A job dir whose very name is hostile (no ':' or ',', which no container runtime can bind)."""
    work = tmp_path / "work dir & $HOME"
    return work / "jobs" / name, work


@pytest.mark.parametrize("runtime", ["none", "singularity", "apptainer"])
def test_run_prints_1200_hostile_words_byte_for_byte(tmp_path, fake_runtime_bin, runtime):
    words = hostile_words(1200)
    job_dir, work = _job(tmp_path)
    extra = {}
    if runtime != "none":
        image = tmp_path / "images $(touch CANARY)" / "hpcseg.sif"
        image.parent.mkdir()
        image.write_text("fake image")
        (tmp_path / "data dir").mkdir()
        extra = {"container_runtime": runtime, "image": str(image), "binds": [f"{tmp_path}/data dir:/data"]}
    ctx = local_context("run", job_dir, work, {"command": ["printf", "%s\\0", *words]}, **extra)
    script = job_dir / "job.sh"
    script.write_text(ENGINE.render("run.sh.j2", ctx))
    log = tmp_path / "runtime.log"
    env = {"PATH": f"{fake_runtime_bin}:{os.environ['PATH']}", "HPCSEG_FAKE_RUNTIME_LOG": str(log)}
    res = _run(script, env=env)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.encode() == b"".join(w.encode() + b"\0" for w in words)
    assert (job_dir / "exit_code").read_text() == "0\n"
    assert canaries(tmp_path) == []
    if runtime != "none":
        argv = log.read_bytes().split(b"\0")[:-1]
        assert [a.decode() for a in argv] == [runtime, "exec", "--bind", str(work), "--bind",
                                              f"{tmp_path}/data dir:/data", str(image), "printf", "%s\\0", *words]


def _fake_python(tmp_path):
    """A FAKE interpreter in a hostile folder: prints its argv NUL-separated, and for the server writes
    connection.json and waits (as the real server would, until stopped)."""
    return write_exe(tmp_path / "bin $(touch CANARY)" / "python 3", """#!/bin/bash
printf '%s\\0' "$@"
if [ "$2" = hpcseg.server ]; then echo '{}' > "$HPCSEG_JOB_DIR/connection.json"; exec sleep "${FAKE_SLEEP:-0}"; fi
""")


def test_server_command_line_reaches_the_program_word_for_word(tmp_path):
    job_dir, work = _job(tmp_path)
    models = tmp_path / "models; touch CANARY"
    ctx = local_context("server", job_dir, work, python=str(_fake_python(tmp_path)), models_dir=str(models),
                        idle_timeout=600, device="cuda:1")
    (job_dir / "job.sh").write_text(ENGINE.render("server.sh.j2", ctx))
    res = _run(job_dir / "job.sh")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split("\0")[:-1] == [
        "-m", "hpcseg.server", "--models-dir", str(models), "--connection-file", f"{job_dir}/connection.json",
        "--host", "127.0.0.1", "--port", "0", "--idle-timeout", "600", "--device", "cuda:1",  # local: loopback only
        "--log-file", f"{job_dir}/server.log"]
    assert models.is_dir() and not (job_dir / "connection.json").exists()  # removed on exit
    assert canaries(tmp_path) == []


def test_train_command_line_reaches_the_program_word_for_word(tmp_path):
    job_dir, work = _job(tmp_path)
    params = {"model": "$(touch CANARY)/m", "dataset": "d s\n`touch CANARY`", "epochs": "7", "out_dir": "-o ut",
              "lr": 1e-4, "seed": 0, "version": "v2; touch CANARY", "extra_args": ["--x", "1; touch CANARY"]}
    ctx = local_context("train", job_dir, work, params, python=str(_fake_python(tmp_path)))
    (job_dir / "job.sh").write_text(ENGINE.render("train.sh.j2", ctx))
    res = _run(job_dir / "job.sh")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split("\0")[:-1] == [
        "-m", "hpcseg.training", "--model", params["model"], "--dataset", params["dataset"], "--epochs", "7",
        "--lr", "0.0001", "--seed", "0", "--version", "v2; touch CANARY", "--x", "1; touch CANARY",
        "--out", "-o ut", "--device", "auto"]
    assert canaries(tmp_path) == []


def test_train_a_builtin_recipe(tmp_path):
    job_dir, work = _job(tmp_path)
    ctx = local_context("train", job_dir, work, {"builtin": "spleen", "out_dir": "/o"},
                        python=str(_fake_python(tmp_path)))
    (job_dir / "job.sh").write_text(ENGINE.render("train", ctx))
    res = _run(job_dir / "job.sh")
    assert res.stdout.split("\0")[:-1] == ["-m", "hpcseg.training", "--builtin", "spleen", "--out", "/o",
                                            "--device", "auto"]


# ---- the exit-code trap --------------------------------------------------------------------------------------

def test_exit_code_of_the_command_is_recorded(tmp_path):
    job_dir, work = _job(tmp_path)
    ctx = local_context("run", job_dir, work, {"command": ["bash", "-c", "exit 3"]})
    (job_dir / "job.sh").write_text(ENGINE.render("run.sh.j2", ctx))
    assert _run(job_dir / "job.sh").exit_code == 3
    assert (job_dir / "exit_code").read_text() == "3\n"
    assert [p.name for p in job_dir.iterdir() if p.name.startswith(".exit_code")] == []


def _start(script, env=None):
    import subprocess

    return subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def _wait_for(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigterm_stops_the_command_and_records_143(tmp_path):
    """What scancel and the walltime do (SIGTERM, then SIGKILL after KillWait): the job records 143 at once."""
    job_dir, work = _job(tmp_path)
    ctx = local_context("run", job_dir, work, {"command": ["bash", "-c", "touch running; exec sleep 60"]})
    (job_dir / "job.sh").write_text(ENGINE.render("run.sh.j2", ctx))
    proc = _start(job_dir / "job.sh")
    _wait_for(job_dir / "running")  # the command's own mark (the job writes `started`)
    t0 = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=10) == 143 and time.monotonic() - t0 < 5
    assert (job_dir / "exit_code").read_text() == "143\n"


def test_usr2_notes_the_walltime_and_the_job_goes_on(tmp_path):
    job_dir, work = _job(tmp_path)
    ctx = local_context("run", job_dir, work, {"command": ["bash", "-c", "touch running; sleep 1; exit 0"]})
    (job_dir / "job.sh").write_text(ENGINE.render("run.sh.j2", ctx))
    proc = _start(job_dir / "job.sh")
    _wait_for(job_dir / "running")  # the command's own mark (the job writes `started`)
    proc.send_signal(12)  # SIGUSR2, as #SBATCH --signal=B:USR2@90 sends it
    assert proc.wait(timeout=10) == 0
    assert (job_dir / "ending").read_text() == "walltime\n" and (job_dir / "exit_code").read_text() == "0\n"


def test_cancelled_server_removes_its_connection_file(tmp_path):
    job_dir, work = _job(tmp_path)
    ctx = local_context("server", job_dir, work, python=str(_fake_python(tmp_path)))
    (job_dir / "job.sh").write_text(ENGINE.render("server.sh.j2", ctx))
    proc = _start(job_dir / "job.sh", env={"FAKE_SLEEP": "60"})
    _wait_for(job_dir / "connection.json")
    proc.terminate()
    assert proc.wait(timeout=10) == 143
    assert not (job_dir / "connection.json").exists()
    assert (job_dir / "exit_code").read_text() == "143\n"


def test_a_requeued_job_forgets_the_last_ending(tmp_path):
    job_dir, work = _job(tmp_path)
    job_dir.mkdir(parents=True)
    (job_dir / "exit_code").write_text("143\n")
    (job_dir / "ending").write_text("walltime\n")
    ctx = local_context("run", job_dir, work, {"command": ["bash", "-c", "cat exit_code ending 2>/dev/null; :"]})
    (job_dir / "job.sh").write_text(ENGINE.render("run.sh.j2", ctx))
    res = _run(job_dir / "job.sh")
    assert res.stdout == "" and (job_dir / "exit_code").read_text() == "0\n" and not (job_dir / "ending").exists()


# ---- the site layer: values an admin writes in site.toml or a preset fills ------------------------------------

def _site_profile(tables: dict, key_where: str = "presets") -> tuple[Profile, object] | None:
    """Resolve a host-only profile over a site bundle holding ``tables`` (written as real TOML on disk);
    None when the bundle is refused."""
    import tempfile

    import tomli_w

    from hpcseg.site import resolve

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "site.toml").write_text(tomli_w.dumps(tables))
        try:
            res = resolve(Profile(name="p", host="login", site=d), shell=LocalShell(), user_keys={"host", "site"})
        except (ConfigError, TemplateError):
            return None
        return res.profile, res.bundle


def _render_or_refuse(prof: Profile, template: str = "run.sh.j2") -> str | None:
    try:
        ctx = build_context(prof, template=template, job_dir="/w/j", work_dir="/w", job_name="j",
                            params={"command": ["true"]}, home="/home/u")
        return ENGINE.render(template, ctx)
    except (ConfigError, TemplateError):
        return None


@settings(_settings, max_examples=100)
@given(key=st.sampled_from(["account", "partition", "gpu_type", "extra_directives"]),
       value=st.one_of(SAFE_WORD, hostile_nonempty, SAFE_WORD.map(lambda w: "--" + w)),
       sched=st.sampled_from(["slurm", "slurm-gpus", "pbs-pro", "pbs-torque"]),
       where=st.sampled_from(["defaults", "preset"]))
def test_hostile_directive_values_from_the_site_are_treated_exactly_as_profile_values(key, value, sched, where):
    scheduler, fields = VARIANTS[sched]
    val = [value] if key == "extra_directives" else value
    common = dict(fields, scheduler=scheduler, gpus=1)
    # the same value in a user's profile: refused, or this exact script
    expected = _render_or_refuse(Profile(name="p", host="login", **{**common, key: val}))
    tables: dict = {"defaults": dict(common)}
    if where == "preset":
        tables["presets"] = {"x": {key: val}}
        tables["site"] = {"default_preset": "x"}
    else:
        tables["defaults"][key] = val
    got = _site_profile(tables)
    if got is None:  # the bundle itself was refused: then the profile value is refused too
        assert expected is None, f"{value!r} refused in site.toml but accepted in a profile"
        return
    prof, _bundle = got
    prof.site = prof.preset = None  # the site's own keys are not on any script line
    assert _render_or_refuse(prof) == expected


@settings(_settings, max_examples=80)
@given(values=st.fixed_dictionaries({
    "python": hostile_nonempty, "models_dir": hostile_nonempty, "datasets_dir": hostile_nonempty,
    "venv": hostile_nonempty, "image": hostile_nonempty,
    "modules": st.lists(hostile_nonempty, max_size=3), "binds": st.lists(hostile_nonempty, max_size=3)}),
    runtime=st.sampled_from(["none", "singularity"]), sched=st.sampled_from(sorted(VARIANTS)))
@example(values={"python": "0", "models_dir": "{a,b}", "datasets_dir": "0", "venv": "0", "image": "0", "modules": [],
                 "binds": []}, runtime="singularity", sched="slurm")  # refused by the bundle, by server.sh.j2 only
def test_hostile_body_values_from_the_site_keep_every_template_valid_bash(values, runtime, sched):
    scheduler, fields = VARIANTS[sched]
    defaults = dict(fields, scheduler=scheduler, container_runtime=runtime, **values)
    got = _site_profile({"defaults": defaults, "presets": {"p": {"gpus": 0 if scheduler == "local" else 1}}})
    if got is None:
        # the bundle checks its values against every template: the same values in a profile must be refused by
        # at least one template too (e.g. a models_dir a runtime cannot bind is refused by server.sh.j2 only)
        prof = Profile(name="p", host="login", **defaults)
        assert any(_script_or_refuse(prof, name) is None for name in TEMPLATES), defaults
        return
    prof, _ = got
    prof.site = prof.preset = None
    for name in TEMPLATES:
        script = _script_or_refuse(prof, name)
        if script is not None:  # refused (e.g. a bind path a runtime cannot take), as it is for a profile
            assert check_script(script) == []


def _script_or_refuse(prof: Profile, name: str) -> str | None:
    try:
        ctx = build_context(prof, template=name, job_dir="/w/j", work_dir="/w", job_name="j",
                            params={"command": ["true"], "model": "m", "dataset": "d", "out_dir": "/o"},
                            home="/home/u")
    except (ConfigError, TemplateError):
        return None
    return ENGINE.render(name, ctx)


def test_server_command_line_from_hostile_site_values_reaches_the_program_word_for_word(tmp_path):
    """python and models_dir come from site.toml (a preset fills idle_timeout and device): the job runs them as
    one word each, and no injected command runs."""
    import tomli_w

    from hpcseg.site import resolve

    job_dir, work = _job(tmp_path)
    models = tmp_path / "models; touch CANARY $(touch CANARY)"
    site = tmp_path / "site `touch CANARY`"
    site.mkdir()
    (site / "site.toml").write_text(tomli_w.dumps({
        "defaults": {"scheduler": "local", "gpus": 0, "python": str(_fake_python(tmp_path)),
                     "models_dir": str(models), "work_dir": str(work)},
        "presets": {"x": {"idle_timeout": 600, "device": "cuda:1"}}, "site": {"default_preset": "x"}}))
    res = resolve(Profile(name="p", site=str(site)), shell=LocalShell(), user_keys={"site"})
    job_dir.mkdir(parents=True)
    ctx = build_context(res.profile, template="server", job_dir=str(job_dir), work_dir=str(work), job_name="t",
                        params={})
    (job_dir / "job.sh").write_text(ENGINE.render("server.sh.j2", ctx))
    out = _run(job_dir / "job.sh")
    assert out.exit_code == 0, out.stderr
    assert out.stdout.split("\0")[:-1] == [
        "-m", "hpcseg.server", "--models-dir", str(models), "--connection-file", f"{job_dir}/connection.json",
        "--host", "127.0.0.1", "--port", "0", "--idle-timeout", "600", "--device", "cuda:1",
        "--log-file", f"{job_dir}/server.log"]
    assert canaries(tmp_path) == []
