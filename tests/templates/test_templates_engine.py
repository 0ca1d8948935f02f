"""The engine: search path (site > user > built-in, builtin/ prefix), quoting rules, context checks, validate."""

from __future__ import annotations

import subprocess

import pytest

from hpcseg.config import Profile
from hpcseg.errors import ConfigError, TemplateError
from hpcseg.resources import resource_dir
from hpcseg.templates import Raw, TemplateEngine, build_context, check_script, sample_context, shell_quote

TEMPLATES = ("run.sh.j2", "server.sh.j2", "train.sh.j2", "finetune.sh.j2", "batch.sh.j2")


def render_string(engine: TemplateEngine, source: str, **ctx) -> str:
    return engine.env.from_string(source).render(ctx)


# ---- quoting -------------------------------------------------------------------------------------------------

def test_values_are_quoted_by_default(engine):
    out = render_string(engine, "echo {{ a }} {{ b }} {{ n }}", a="$(touch x); y", b="it's", n=3)
    assert out == "echo '$(touch x); y' 'it'\"'\"'s' 3"


def test_raw_words_and_raw_values(engine):
    out = render_string(engine, "{{ a|raw }} {{ argv|words }} {{ r }} {{ a|safe }}", a="$HOME", argv=["a b", "-c"],
                        r=Raw("$PWD"))
    assert out == "$HOME 'a b' -c $PWD $HOME"


@pytest.mark.parametrize("value", [None, True, ["a"], ("a",), {"a": 1}])
def test_none_bools_and_lists_refuse_to_render(engine, value):
    with pytest.raises(TemplateError):
        render_string(engine, "echo {{ v }}", v=value)


def test_none_is_fine_when_guarded(engine):
    assert render_string(engine, "{% if v %}echo {{ v }}{% endif %}", v=None) == ""


def test_undefined_is_an_error(engine):
    with pytest.raises(Exception, match="undefined"):
        render_string(engine, "{{ nope }}")


def test_nul_refused():
    with pytest.raises(TemplateError, match="NUL"):
        shell_quote("a\x00b")


def test_words_refuses_a_string(engine):
    with pytest.raises(TemplateError, match="words"):
        render_string(engine, "{{ s|words }}", s="abc")


def test_template_text_is_not_requoted(engine):
    src = ("{% macro m(x) %}run {{ x }}{% endmacro %}{% set blk %}a {{ v }}{% endset %}"
           "{{ m(v) }}|{{ blk }}|{{ 'lit & <' }}")
    assert render_string(engine, src, v="x y") == "run 'x y'|a 'x y'|'lit & <'"


@pytest.mark.parametrize("expr", [
    "m() ~ v", "v ~ m()", "m() + v", "(m() ~ '%s') % v", "[m(), v]|join(' ')", "m()|replace('A', v)",
    "(m() ~ ' %s')|format(v)",
])
def test_template_text_combined_with_a_value_still_quotes_the_value(engine, expr):
    """Markup's own joining HTML-escapes; ours must shell-quote (or quote the whole)."""
    v = "$(touch CANARY) & <b>"
    out = render_string(engine, "{% macro m() %}A{% endmacro %}echo {{ " + expr + " }}", v=v)
    assert "&amp;" not in out and "&lt;" not in out
    words = subprocess.run(["bash", "-c", out.replace("echo ", "printf '%s\\n' ", 1)], capture_output=True,
                           text=True, check=True).stdout
    assert v in words


@pytest.mark.parametrize("expr", ["v|e", "v|escape", "v|forceescape", "v|q", "v|tojson"])
def test_html_filters_became_shell_quoting(engine, expr):
    out = render_string(engine, "{{ " + expr + " }}", v="a'b <&>")
    assert subprocess.run(["bash", "-c", f"printf %s {out}"], capture_output=True, text=True).stdout in (
        "a'b <&>", '"a\'b <&>"')


def test_html_only_filters_are_gone(engine):
    with pytest.raises(Exception, match="urlize"):
        render_string(engine, "{{ v|urlize }}", v="x")


def test_directive_filter(engine):
    assert render_string(engine, "{{ v|directive }}", v="gpu:a100:2") == "gpu:a100:2"
    for bad in ("a b", "a'b", "a\nb", "-x", "$x", "", None, "a#b", "a\\b"):
        with pytest.raises(TemplateError):
            render_string(engine, "{{ v|directive }}", v=bad)


def test_render_checks_directive_lines(engine, tmp_path):
    (tmp_path / "d.sh.j2").write_text("#!/bin/bash\n#SBATCH --comment={{ v }}\n#SBATCH --x={{ v|raw }}\necho\n")
    eng = TemplateEngine(site_dir=tmp_path, user_dir=tmp_path / "none")
    assert "#SBATCH --comment='a b'" in eng.render("d.sh.j2", {"v": "a b"})
    with pytest.raises(TemplateError, match="inside a quote"):
        eng.render("d.sh.j2", {"v": "it's"})


def test_control_characters_never_reach_the_script_raw(engine):
    """A value with a newline or CR cannot split a line (directive or comment), nor make sbatch see DOS breaks."""
    out = render_string(engine, "#SBATCH --comment={{ v }}\n", v="a\r\n#SBATCH --x\n$(touch CANARY)")
    assert out == "#SBATCH --comment=$'a\\x0d\\x0a#SBATCH --x\\x0a$(touch CANARY)'\n"
    assert check_script("#!/bin/bash\r\necho\n") == ["the script has DOS line breaks (CR LF): sbatch refuses it"]


# ---- search path ---------------------------------------------------------------------------------------------

def test_site_overrides_one_block_of_a_builtin(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "server.sh.j2").write_text('{% extends "builtin/server.sh.j2" %}\n'
                                       "{% block setup %}\nmodule purge\n{{ super() }}{% endblock %}\n")
    eng = TemplateEngine(site_dir=site, user_dir=tmp_path / "none")
    out = eng.render("server.sh.j2", sample_context("slurm", modules=["cuda/12.1"]))
    assert "\nmodule purge\n" in out and "module load cuda/12.1 || exit 1" in out and "-m hpcseg.server" in out
    assert check_script(out) == []
    info = {t.name: t for t in eng.list()}
    assert info["server.sh.j2"].origin == "site" and info["run.sh.j2"].origin == "builtin"
    assert "builtin/server.sh.j2" in eng.source("server.sh.j2")
    assert "-m hpcseg.server" in eng.source("builtin/server.sh.j2")


def test_site_beats_user_beats_builtin(tmp_path):
    for d, word in (("site", "SITE"), ("user", "USER")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "run.sh.j2").write_text(f"#!/bin/bash\necho {word}\n")
    (tmp_path / "user" / "mine.sh.j2").write_text("{# mine: a user's own #}\n#!/bin/bash\n")
    both = TemplateEngine(site_dir=tmp_path / "site", user_dir=tmp_path / "user")
    assert both.render("run.sh.j2", {}) == "#!/bin/bash\necho SITE\n"
    assert TemplateEngine(user_dir=tmp_path / "user").render("run.sh.j2", {}) == "#!/bin/bash\necho USER\n"
    info = {t.name: t for t in both.list()}
    assert (info["run.sh.j2"].origin, info["mine.sh.j2"].origin) == ("site", "user")
    assert info["mine.sh.j2"].description == "mine: a user's own"
    assert info["server.sh.j2"].description.startswith("the hpcseg inference server")


def test_site_header_override_reaches_builtin_templates(tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "header.sh.j2").write_text(
        '{% extends "builtin/slurm/header.sh.j2" %}{% block signal %}#SBATCH --signal=B:USR2@300\n{% endblock %}')
    out = TemplateEngine(site_dir=tmp_path, user_dir=tmp_path / "none").render("run.sh.j2", sample_context("slurm"))
    assert "#SBATCH --signal=B:USR2@300\n" in out and "--signal=B:USR2@90" not in out


@pytest.mark.parametrize("sched", ["slurm", "pbs"])
def test_site_examples_render(sched, tmp_path):
    eng = TemplateEngine(site_dir=resource_dir(sched) / "site-example", user_dir=tmp_path)
    for name in TEMPLATES:
        out = eng.render(name, sample_context(sched, container_runtime="apptainer", image="/sw/hpcseg.sif"))
        assert "module purge" in out and "module load apptainer" in out and check_script(out) == []
    assert ("--constraint=" if sched == "slurm" else "-l place=") in out


def test_missing_template_and_site_dir(engine, tmp_path):
    with pytest.raises(TemplateError, match="no template named"):
        engine.render("nope.sh.j2", {})
    with pytest.raises(TemplateError, match="no template named"):
        engine.source("nope.sh.j2")
    with pytest.raises(TemplateError, match="does not exist"):
        TemplateEngine(site_dir=tmp_path / "missing")


def test_render_error_names_template_and_line(tmp_path):
    (tmp_path / "bad.sh.j2").write_text("#!/bin/bash\n\necho {{ missing_key }}\n")
    (tmp_path / "syntax.sh.j2").write_text("#!/bin/bash\n{% if %}\n")
    eng = TemplateEngine(site_dir=tmp_path, user_dir=tmp_path / "none")
    with pytest.raises(TemplateError, match=r"bad\.sh\.j2:3"):
        eng.render("bad.sh.j2", {})
    with pytest.raises(TemplateError, match=r"syntax\.sh\.j2:2"):
        eng.render("syntax.sh.j2", {})


# ---- validate ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TEMPLATES)
def test_builtins_validate_clean(engine, name):
    assert engine.validate(name) == []


def test_validate_reports_bash_errors_and_late_directives(tmp_path):
    (tmp_path / "broken.sh.j2").write_text("#!/bin/bash\nif true; then\n")
    (tmp_path / "late.sh.j2").write_text("#!/bin/bash\nset -u\n#SBATCH --time=1\n")
    (tmp_path / "noshebang.sh.j2").write_text("echo hi\n")
    eng = TemplateEngine(site_dir=tmp_path, user_dir=tmp_path / "none")
    assert any("syntax error" in p for p in eng.validate("broken.sh.j2"))
    assert any("ignored by the scheduler" in p for p in eng.validate("late.sh.j2", {}))
    assert any("#!" in p for p in eng.validate("noshebang.sh.j2", {}))


# ---- the context ---------------------------------------------------------------------------------------------

def _ctx(**fields):
    prof = Profile(name="p", scheduler="slurm", host="login", **fields)
    return build_context(prof, template="run", job_dir="/w/jobs/1", work_dir="/w", job_name="j",
                         params={"command": ["true"]})


@pytest.mark.parametrize("key", ["account", "partition", "gpu_type"])
def test_directive_fields_refused_with_key_path(key):
    with pytest.raises(ConfigError, match=rf"profiles\.p\.{key}"):
        _ctx(**{key: "a b"})


def test_extra_directive_checks():
    assert _ctx(extra_directives=["--constraint=a100"])["extra_directives"] == ["--constraint=a100"]
    with pytest.raises(ConfigError, match=r"extra_directives\[0\]"):
        _ctx(extra_directives=["#SBATCH --x"])
    with pytest.raises(ConfigError, match=r"extra_directives\[0\]"):
        _ctx(extra_directives=["--x\r--y"])


def test_context_conversions():
    c = _ctx(memory="64GB", walltime="1-02:03:04")
    assert (c["memory_slurm"], c["memory_pbs"], c["memory_mb"]) == ("64G", "64gb", 65536)
    assert (c["walltime"], c["walltime_hms"], c["walltime_seconds"]) == ("1-02:03:04", "26:03:04", 93784)
    c = _ctx(memory="1500")
    assert (c["memory_slurm"], c["memory_pbs"]) == ("1500M", "1500mb")


def test_context_paths():
    with pytest.raises(TemplateError, match="absolute"):
        build_context(Profile(), template="run", job_dir="~/j", work_dir="/w", job_name="j",
                      params={"command": ["x"]})
    with pytest.raises(TemplateError, match="home="):
        _ctx(models_dir="~/models")
    prof = Profile(name="p", scheduler="slurm", host="h", models_dir="~/m", container_runtime="singularity",
                   image="~/i.sif", binds=["~/data:/data"])
    c = build_context(prof, template="server", job_dir="/home/u/w/jobs/1", work_dir="/home/u/w", job_name="j",
                      home="/home/u")
    assert (c["models_dir"], c["image"], c["binds"]) == ("/home/u/m", "/home/u/i.sif", ["/home/u/data:/data"])
    assert c["container_binds"] == ["/home/u/w", "/home/u/m", "/home/u/data:/data"]
    with pytest.raises(TemplateError, match="cannot bind"):
        build_context(prof, template="server", job_dir="/a:b/jobs/1", work_dir="/a:b", job_name="j",
                      home="/home/u")


@pytest.mark.parametrize(("template", "params"), [
    ("run", {}), ("run", {"command": []}), ("run", {"command": "ls -l"}),
    ("train", {"model": "m", "dataset": "d", "out_dir": "o", "epochs": 0}),
    ("train", {"model": "m", "dataset": "d", "epochs": 1}),
    ("train", {"model": "m", "builtin": "b", "out_dir": "o"}), ("train", {"out_dir": "o"}),
    ("train", {"model": "m", "out_dir": "o", "epochs": "three"}), ("train", {"model": "m", "out_dir": "o", "lr": -1}),
])
def test_params_checked(template, params):
    with pytest.raises(TemplateError, match="params"):
        build_context(Profile(), template=template, job_dir="/w/j", work_dir="/w", job_name="j", params=params)


def test_params_from_the_command_line_are_coerced():
    c = build_context(Profile(), template="train", job_dir="/w/j", work_dir="/w", job_name="j",
                      params={"builtin": "spleen", "out_dir": "/o", "epochs": "3", "lr": "1e-4"})
    assert (c["params"]["epochs"], c["params"]["lr"], c["template"]) == (3, 1e-4, "train.sh.j2")


def test_names_without_suffix(engine):
    assert engine.render("run", sample_context("local")) == engine.render("run.sh.j2", sample_context("local"))
    assert engine.source("server") == engine.source("server.sh.j2")
    assert engine.validate("slurm/header.sh.j2") == [] and engine.validate("pbs/header.sh.j2") == []


def test_bad_job_name():
    with pytest.raises(TemplateError, match="job name"):
        build_context(Profile(), template="server", job_dir="/w/j", work_dir="/w", job_name="a b")


def test_pbs_dialect_auto_is_pro_unless_resolved():
    prof = Profile(name="p", scheduler="pbs", host="h", pbs_dialect="auto")
    kw = dict(template="server", job_dir="/w/j", work_dir="/w", job_name="j")
    assert build_context(prof, **kw)["pbs_dialect"] == "pro"
    assert build_context(prof, pbs_dialect="torque", **kw)["pbs_dialect"] == "torque"
