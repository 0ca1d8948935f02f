"""Job scripts from Jinja2 templates: a search path (site > user > built-in) and shell quoting by default.

Every ``{{ expr }}`` is written as one shell word (``shlex.quote``, or ``$'...'`` when it holds control
characters), whatever it holds; template text is written as it is. ``|raw`` (or a :class:`Raw` value) writes a
value verbatim, ``|words`` a list as quoted words, ``|directive`` a value for a ``#SBATCH``/``#PBS`` line (a safe
word, unquoted, else refused: schedulers parse those lines by their own rules). None, bools and lists written
with plain ``{{ }}`` are errors. templates/README.md has the rules for template authors and the context keys.

Why: psij's ``escape_functions`` quotes by default; batchspawner's unquoted ``format_template`` let values inject
commands. Jinja's autoescape machinery tells template text (``Markup``: macros, ``super()``, set-blocks) from
values; the finalize hook quotes values, and a code generator makes ``~``, ``+`` and ``%`` quote for the shell
where Markup would HTML-escape.

Example::

    engine = TemplateEngine(site_dir=profile.template_dir)
    ctx = build_context(profile, template="server", job_dir="/home/a/.hpcseg/jobs/j1",
                        work_dir="/home/a/.hpcseg", job_name="hpcseg-server", params={})
    script = engine.render("server", ctx)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partialmethod
from pathlib import Path
from typing import Any

import jinja2
import platformdirs
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from markupsafe import Markup

from . import __version__
from .config import DIRECTIVE_WORD, Profile, walltime_seconds
from .errors import ConfigError, TemplateError
from .resources import resource_dir

__all__ = ["Raw", "TemplateEngine", "TemplateInfo", "build_context", "sample_context", "shell_quote", "check_script"]

#: a value that may stand unquoted on a directive line: no blank, quote, backslash, ``$``, ``#`` or newline
_DIRECTIVE_LINE = re.compile(r"^#(SBATCH|PBS)\b")
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")
_CONTROL_OR_QUOTE = re.compile(r"[\x01-\x1f\x7f'\\]")


class Raw(Markup):
    """Text written to the script verbatim: whoever makes one vouches that it is valid shell there.

    A ``Markup`` subclass, so Jinja treats it as template text; its ``escape`` shell-quotes, so ``Raw + value``,
    ``Raw % value`` and ``Raw.join(values)`` quote the values instead of HTML-escaping them.
    """

    __slots__ = ()

    @classmethod
    def escape(cls, s: Any) -> Raw:  # type: ignore[override]
        return cls(s.__html__()) if hasattr(s, "__html__") else cls(shell_quote(s))


def shell_quote(value: Any) -> str:
    """One shell word for ``value``; refuses what has no single honest rendering (None, bools, lists, NUL)."""
    if value is None:
        raise TemplateError("a value is None: guard optional values with {% if x %}...{% endif %}")
    if isinstance(value, bool):
        raise TemplateError(f"a boolean ({value}) reached the script: test it with {{% if %}} instead")
    if isinstance(value, (list, tuple, set, dict)):
        raise TemplateError(f"a {type(value).__name__} reached the script: write a list with |words")
    text = str(value)  # StrictUndefined raises here
    if "\x00" in text:
        raise TemplateError(f"a value contains a NUL byte, which no shell script can hold: {text!r}")
    if _CONTROL.search(text):
        # bash's $'...' spells control characters as \xHH: the script stays free of raw CR/LF (sbatch refuses a
        # script with a CR LF pair anywhere) and every line of it stays visible.
        return "$'" + _CONTROL_OR_QUOTE.sub(lambda m: _ansi_escape(m.group()), text) + "'"
    return shlex.quote(text)


def _ansi_escape(ch: str) -> str:
    return "\\\\" if ch == "\\" else "\\'" if ch == "'" else f"\\x{ord(ch):02x}"


def _text(value: Any) -> Raw:
    """Template text stays as it is; anything else becomes one quoted word."""
    return Raw(value) if hasattr(value, "__html__") else Raw(shell_quote(value))


def _plain(value: Any) -> str:
    """A value as text, refusing what shell_quote refuses (None, bools, lists)."""
    if not isinstance(value, str):
        shell_quote(value)
    return str(value)


def _as_raw(value: Any) -> Any:
    return Raw(value) if isinstance(value, Markup) and not isinstance(value, Raw) else value


@jinja2.pass_eval_context
def _finalize(eval_ctx: Any, value: Any) -> Raw:
    # pass_eval_context keeps Jinja from finalizing constants at compile time (where it HTML-escapes first).
    return _text(value)


class _ShellCodeGenerator(CodeGenerator):
    """Compiles ``~``, ``+`` and ``%`` so that template text combined with a value quotes the value."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.shell_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _binop(self, op: str, node: nodes.BinExpr, frame: Any) -> None:
        self.write(f"environment.shell_binop({op!r}, ")
        self.visit(node.left, frame)
        self.write(", ")
        self.visit(node.right, frame)
        self.write(")")

    visit_Add = partialmethod(_binop, "+")
    visit_Mod = partialmethod(_binop, "%")


class _ShellEnvironment(jinja2.Environment):
    code_generator_class = _ShellCodeGenerator

    @staticmethod
    def shell_concat(parts: Iterable[Any]) -> Any:
        parts = list(parts)
        if all(hasattr(p, "__html__") for p in parts):
            return Raw("".join(parts))
        # a value is involved: the whole is a value, quoted once when written
        return "".join(_plain(p) for p in parts)

    @staticmethod
    def shell_binop(op: str, left: Any, right: Any) -> Any:
        left, right = _as_raw(left), _as_raw(right)
        return left + right if op == "+" else left % right


# ---- filters ---------------------------------------------------------------------------------------------------

def _quote(value: Any) -> Raw:
    """Explicit quoting: one word even for template text (``bash -c {{ text|q }}``)."""
    return Raw(shell_quote(str(value) if isinstance(value, Markup) else value))


def _raw(value: Any) -> Raw:
    if value is None:
        raise TemplateError("|raw of None: guard optional values with {% if %}")
    return Raw(str(value))


def _words(value: Any) -> Raw:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TemplateError(f"|words needs a list of words, got {type(value).__name__}: {value!r}")
    return Raw(" ".join(shell_quote(w) for w in value))


def _directive(value: Any) -> Raw:
    text = "" if value is None else str(value)
    if isinstance(value, bool) or not DIRECTIVE_WORD.match(text):
        raise TemplateError(f"{value!r} cannot stand on a #SBATCH/#PBS line: use letters, digits and . _ @ % + = : "
                            ", / - (no blanks, quotes, $, # or newlines; not starting with -)")
    return Raw(text)


def _directive_line(value: Any) -> Raw:
    text = str(value)
    if not text.strip() or any(c in text for c in "\r\n\x00"):
        raise TemplateError(f"directive {value!r} must be one non-empty line")
    return Raw(text)


@jinja2.pass_eval_context
def _join(eval_ctx: Any, value: Iterable[Any], d: str = "") -> Any:
    items = list(value)
    if all(hasattr(x, "__html__") for x in items):
        return Raw(str(d).join(items))
    return str(d).join(_plain(x) for x in items)  # a value is involved: quoted as a whole when written


def _replace(s: Any, old: Any, new: Any, count: int | None = None) -> Any:
    if not hasattr(s, "__html__"):
        return str(s).replace(str(old), str(new), -1 if count is None else count)
    return Raw(str(s).replace(str(old), _text(new), -1 if count is None else count))


def _format(s: Any, *args: Any, **kwargs: Any) -> Any:
    if kwargs and args:
        raise TemplateError("|format takes positional or keyword arguments, not both")
    return _as_raw(s) % (kwargs or args) if hasattr(s, "__html__") else str(s) % (kwargs or args)


_FILTERS = {
    "raw": _raw, "safe": _raw, "words": _words, "directive": _directive, "directive_line": _directive_line,
    "q": _quote, "quote": _quote, "e": _quote, "escape": _quote, "forceescape": _quote,
    "join": _join, "replace": _replace, "format": _format,
    "tojson": lambda v, indent=None: json.dumps(v, indent=indent),  # a plain str: quoted when written
}


# ---- the engine ------------------------------------------------------------------------------------------------

@dataclass
class TemplateInfo:
    """A template as the search path resolves it: where it comes from, and the first line of its comment."""

    name: str
    origin: str  # site | user | bundle | builtin
    path: Path
    description: str


def default_user_dir() -> Path:
    """``<user config dir>/hpcseg/templates``: a user's own templates, searched after the site's."""
    return Path(platformdirs.user_config_dir("hpcseg")) / "templates"


def _builtin_dirs() -> dict[str, Path]:
    return {"": resource_dir("templates"), "slurm": resource_dir("slurm"), "pbs": resource_dir("pbs")}


def _builtin_loader() -> jinja2.BaseLoader:
    dirs = _builtin_dirs()
    return jinja2.ChoiceLoader([
        jinja2.FileSystemLoader(str(dirs[""])),
        jinja2.PrefixLoader({k: jinja2.FileSystemLoader(str(v)) for k, v in dirs.items() if k}),
    ])


class TemplateEngine:
    """Renders job scripts; looks in the site dir, then the user dir, then the built-in templates.

    ``builtin/NAME`` always reaches the built-in template, so a site's ``server.sh.j2`` can
    ``{% extends "builtin/server.sh.j2" %}`` and override one block. Names inside built-in templates
    (``base.sh.j2``, ``slurm/header.sh.j2``) go through the search path, so a site may replace those too.

    Example::

        engine = TemplateEngine(site_dir="/etc/hpcseg/templates")
        print(engine.render("run.sh.j2", sample_context("slurm")))
    """

    def __init__(self, site_dir: str | os.PathLike | None = None, user_dir: str | os.PathLike | None = None,
                 *, bundle_dir: str | os.PathLike | None = None, own_templates: bool = True) -> None:
        self.site_dir = Path(site_dir).expanduser() if site_dir and own_templates else None
        if self.site_dir is not None and not self.site_dir.is_dir():
            raise TemplateError(f"the site template folder {self.site_dir} does not exist",
                                hint="fix the profile's template_dir or create the folder")
        self.user_dir = (Path(user_dir).expanduser() if user_dir else default_user_dir()) if own_templates else None
        # the cluster's site bundle (hpcseg/site.py): below the user's own folders, above the built-in ones
        self.bundle_dir = Path(bundle_dir) if bundle_dir else None
        self._dirs = [(o, d) for o, d in (("site", self.site_dir), ("user", self.user_dir),
                                          ("bundle", self.bundle_dir)) if d is not None]
        builtin = _builtin_loader()
        self.env = _ShellEnvironment(
            loader=jinja2.ChoiceLoader([jinja2.PrefixLoader({"builtin": builtin}),
                                        *(jinja2.FileSystemLoader(str(d)) for _, d in self._dirs), builtin]),
            undefined=jinja2.StrictUndefined, autoescape=True, finalize=_finalize,
            keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
        for name in ("urlize", "xmlattr"):  # HTML helpers that return trusted markup: no place in a shell script
            self.env.filters.pop(name, None)
        self.env.filters.update(_FILTERS)

    @classmethod
    def for_profile(cls, profile: Profile, user_dir: str | os.PathLike | None = None, *, bundle: Any = None
                    ) -> TemplateEngine:
        """The engine for a profile, with a site bundle's template overrides (and its ``user_templates`` limit)."""
        if bundle is None:
            return cls(site_dir=profile.template_dir, user_dir=user_dir)
        return cls(site_dir=profile.template_dir, user_dir=user_dir, bundle_dir=bundle.templates_dir,
                   own_templates=bundle.limits.user_templates)

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        """The script ``name`` (``server`` means ``server.sh.j2``) renders to; errors name the template and line."""
        name = template_name(name)
        try:
            text = self.env.get_template(name).render(dict(context))
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"no template named {exc.name!r} (looked in {self._where_looked()})",
                                hint="hpcseg templates list shows what there is") from exc
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{exc.filename or exc.name}:{exc.lineno}: {exc.message}") from exc
        except (jinja2.TemplateError, TemplateError, TypeError, ValueError) as exc:
            msg = exc.message if isinstance(exc, TemplateError) else str(exc)
            raise TemplateError(f"cannot render {name} ({_template_line(exc) or 'unknown line'}): {msg}") from exc
        _check_directive_quotes(text, name)
        return text

    def source(self, name: str) -> str:
        """The template text as the search path finds it."""
        name = template_name(name)
        try:
            return self.env.loader.get_source(self.env, name)[0]  # type: ignore[union-attr]
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"no template named {name!r} (looked in {self._where_looked()})") from exc

    def list(self) -> list[TemplateInfo]:
        """Every template the search path offers, each under the origin that wins (site, user, builtin)."""
        found: dict[str, TemplateInfo] = {}
        for origin, root in self._dirs:
            if root.is_dir():
                for path in sorted(root.rglob("*.j2")):
                    name = path.relative_to(root).as_posix()
                    if not any(part.startswith(".") for part in Path(name).parts):
                        found.setdefault(name, TemplateInfo(name, origin, path, _description(path)))
        for prefix, root in _builtin_dirs().items():
            for path in sorted(root.glob("*.j2")):  # not site-example/
                name = f"{prefix}/{path.name}" if prefix else path.name
                found.setdefault(name, TemplateInfo(name, "builtin", path, _description(path)))
        return sorted(found.values(), key=lambda t: t.name)

    def validate(self, name: str, context: Mapping[str, Any] | None = None) -> list[str]:
        """Problems with a template: rendered with ``context`` (or samples for every scheduler), then ``bash -n``."""
        name = template_name(name)
        cases = {"given context": context} if context is not None else _sample_variants()
        partial = name.split("/")[0] if name.startswith(("slurm/", "pbs/")) else None
        if partial:  # a header is checked inside the job scripts that include it
            cases = {k: v for k, v in cases.items() if v["scheduler"] == partial}
            name = "run.sh.j2"
        problems = []
        for label, ctx in cases.items():
            try:
                text = self.render(name, ctx)
            except TemplateError as exc:
                problems.append(f"{label}: {exc.message}")
                continue
            problems += [f"{label}: {p}" for p in check_script(text)]
        return problems

    def _where_looked(self) -> str:
        return ", ".join([str(d) for _, d in self._dirs] + ["built-in"])


def template_name(name: str) -> str:
    """``server`` → ``server.sh.j2``: the job layer names templates by kind."""
    return name if name.endswith(".j2") else f"{name}.sh.j2"


def _template_line(exc: BaseException) -> str:
    """``file.j2:LINE`` of the innermost template frame in a traceback (Jinja rewrites frames to template lines)."""
    where, tb = "", exc.__traceback__
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if fname.endswith(".j2"):
            where = f"{Path(fname).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def _description(path: Path) -> str:
    """The first line of the template's first ``{# ... #}`` comment, without a leading ``name:``."""
    m = re.search(r"\{#-?\s*(.*?)\s*-?#\}", path.read_text(errors="replace"), re.S)
    first = m.group(1).splitlines()[0].strip() if m else ""
    return first.removeprefix(f"{path.name}:").strip()


def _check_directive_quotes(text: str, name: str) -> None:
    """Refuse a directive line that ends inside a quote: a value with a newline has split it."""
    for no, line in enumerate(text.splitlines(), 1):
        if not _DIRECTIVE_LINE.match(line):
            continue
        quote, escaped = "", False
        for ch in line:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif quote and ch == quote:
                quote = ""
            elif not quote and ch in "'\"":
                quote = ch
        if quote:
            raise TemplateError(f"{name}: line {no} of the script, a scheduler directive, ends inside a quote: "
                                f"{line!r}", hint="write directive values with |directive, never plain {{ }}")


def check_script(text: str) -> list[str]:
    """Problems a scheduler or bash would have with a rendered script (``bash -n``, shebang, directive order)."""
    problems = ["the script has DOS line breaks (CR LF): sbatch refuses it"] if "\r\n" in text else []
    lines = text.split("\n")
    if not lines or not lines[0].startswith("#!"):
        problems.append("the first line must be a #! line (sbatch and qsub refuse scripts without one)")
    seen_command = False
    for no, line in enumerate(lines[1:], 2):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            seen_command = True
        elif seen_command and _DIRECTIVE_LINE.match(line):
            problems.append(f"line {no}: {line.split()[0]} after the first command is ignored by the scheduler")
    try:
        res = subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return problems + [f"bash -n could not run: {exc}"]
    if res.returncode != 0:
        problems += [ln for ln in res.stderr.decode(errors="replace").splitlines() if ln.strip()] or [
            f"bash -n exited {res.returncode}"]
    return problems


# ---- the context -----------------------------------------------------------------------------------------------

def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _expand(value: str | None, home: str | None, key: str) -> str | None:
    """Resolve a leading ``~`` with the remote ``home`` (a quoted ``~`` would not expand in the script)."""
    if value is None or not (value == "~" or value.startswith("~/")):
        return value
    if not home:
        raise TemplateError(f"{key} = {value!r} starts with ~: pass home= (the cluster's home directory) "
                            "to build_context")
    return home.rstrip("/") + value[1:]


def _memory_mb(value: str) -> int:
    """MiB in a config memory value (``16G``, ``64GB``, ``4000M``; a bare number is MiB, as for Slurm)."""
    m = re.match(r"^(\d+)([KMGT]?)B?$", value.strip().upper())
    if not m:
        raise ValueError(value)
    n, unit = int(m.group(1)), m.group(2)
    return max(1, -(-n // 1024)) if unit == "K" else n * {"": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[unit]


def _check_params(kind: str, params: dict[str, Any]) -> None:
    """Check (and coerce command-line strings in) the params of the built-in ``run`` and ``train`` templates."""
    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise TemplateError(f"the {kind} template needs params.{key}: {what} (got {params.get(key)!r})")

    def is_words(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and all(isinstance(w, str) for w in v)

    if kind == "run":
        need("command", is_words(params.get("command")) and len(params["command"]) > 0, "a non-empty argv list")
    elif kind == "train":
        need("model", bool(params.get("model")) != bool(params.get("builtin")), "a model folder, or params.builtin")
        for key in ("model", "builtin", "dataset", "out_dir", "version"):
            need(key, params.get(key) is None or isinstance(params[key], str), "a string")
        need("out_dir", bool(params.get("out_dir")), "the model folder to write")
        for key, typ in (("epochs", int), ("batch_size", int), ("seed", int), ("lr", float)):
            value = params.get(key)
            if isinstance(value, str):  # from `hpcseg submit --param epochs=3`
                try:
                    params[key] = value = typ(value)
                except ValueError:
                    need(key, False, f"a {typ.__name__}")
            need(key, value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and (key == "seed" or value > 0)), f"a {typ.__name__} > 0")
        need("extra_args", is_words(params.get("extra_args", [])), "a list of words")
    elif kind == "batch":
        need("batch_dir", isinstance(params.get("batch_dir"), str) and params["batch_dir"].startswith("/"),
             "the batch's absolute folder on the cluster")
        if isinstance(params.get("round"), str) and params["round"].isdigit():
            params["round"] = int(params["round"])
        need("round", isinstance(params.get("round"), int) and not isinstance(params["round"], bool)
             and params["round"] >= 0, "an int >= 0")
    elif kind == "finetune":
        for key in ("model", "dataset"):
            need(key, isinstance(params.get(key), str) and bool(params[key]), "a non-empty string")
        if isinstance(params.get("epochs"), str):
            try:
                params["epochs"] = int(params["epochs"])
            except ValueError:
                need("epochs", False, "an int")
        need("epochs", params.get("epochs") is None or (isinstance(params["epochs"], int)
                                                        and not isinstance(params["epochs"], bool)
                                                        and params["epochs"] > 0), "an int > 0")
        if isinstance(params.get("force"), str):
            params["force"] = params["force"].lower() in ("1", "true", "yes")


def build_context(profile: Profile, *, template: str, job_dir: str, work_dir: str, job_name: str,
                  params: Mapping[str, Any] | None = None, home: str | None = None,
                  pbs_dialect: str | None = None) -> dict[str, Any]:
    """Everything a template may use (templates/README.md lists the keys), checked before rendering.

    ``job_dir`` and ``work_dir`` must be absolute (the caller resolves ``~``); a profile path that starts with
    ``~`` is resolved with ``home``. ``pbs_dialect`` overrides a profile's ``auto`` (which renders as ``pro``).
    Directive values that could not stand safely on a ``#SBATCH``/``#PBS`` line are refused here, naming the key.
    """
    profile.validate()  # refuses account/partition/gpu_type values no directive line can hold (as `config set` does)
    p = f"profiles.{profile.name}"
    for i, d in enumerate(profile.extra_directives):
        if not d.startswith("-") or any(c in d for c in "\r\n\x00"):
            raise ConfigError(f"{p}.extra_directives[{i}] = {d!r} is not allowed: one option per entry, starting "
                              "with - and without the #SBATCH/#PBS prefix, e.g. --constraint=a100")
    if not DIRECTIVE_WORD.match(job_name):
        raise TemplateError(f"job name {job_name!r} cannot go on a scheduler directive line")
    for key, value in (("job_dir", job_dir), ("work_dir", work_dir)):
        if not str(value).startswith("/"):
            raise TemplateError(f"{key} must be an absolute path (resolve ~ first), got {value!r}")
    template = template_name(template)
    kind = template.removesuffix(".sh.j2")
    params = dict(params or {})
    _check_params(kind, params)
    work_dir = str(work_dir)
    models_dir = _expand(profile.models_dir, home, f"{p}.models_dir") or f"{work_dir.rstrip('/')}/models"
    datasets_dir = _expand(profile.datasets_dir, home, f"{p}.datasets_dir") or f"{work_dir.rstrip('/')}/datasets"
    binds = [_expand(b.split(":", 1)[0], home, f"{p}.binds") + b[len(b.split(":", 1)[0]):] for b in profile.binds]
    auto = [work_dir] + [d for d, used in ((models_dir, kind in ("server", "train", "finetune", "batch")),
                                           (datasets_dir, kind in ("train", "finetune")))
                         if used and not _under(d, work_dir)]
    if profile.container_runtime != "none":
        for d in auto:
            if ":" in d or "," in d:
                raise TemplateError(f"{profile.container_runtime} cannot bind {d!r}: a path with ':' or ','",
                                    hint="move the work, models or datasets folder to a path without them")
    if profile.container_runtime == "charliecloud":
        for b in binds:
            if b.count(":") > 1:
                raise ConfigError(f"{p}.binds: {b!r}: ch-run binds SRC[:DST] only (no options such as :ro)",
                                  hint=f"hpcseg config set binds SRC:DST --profile {profile.name}")
    dialect = pbs_dialect or profile.pbs_dialect
    if dialect not in ("pro", "torque", "auto"):
        raise TemplateError(f"pbs_dialect must be pro or torque, got {dialect!r}")
    mem_mb = _memory_mb(profile.memory)
    return {
        "template": template,
        "scheduler": profile.scheduler, "pbs_dialect": "pro" if dialect == "auto" else dialect,
        "job_name": job_name, "job_dir": str(job_dir), "work_dir": work_dir,
        "account": profile.account, "partition": profile.partition,
        "gpus": profile.gpus, "gpu_type": profile.gpu_type, "gpu_directive": profile.gpu_directive,
        "cpus": profile.cpus, "memory": profile.memory, "memory_mb": mem_mb,
        "memory_slurm": f"{mem_mb}M" if mem_mb % 1024 else f"{mem_mb // 1024}G",
        "memory_pbs": f"{mem_mb}mb" if mem_mb % 1024 else f"{mem_mb // 1024}gb",
        "walltime": profile.walltime, "walltime_seconds": walltime_seconds(profile.walltime),
        "walltime_hms": _hms(walltime_seconds(profile.walltime)),
        "modules": list(profile.modules), "venv": _expand(profile.venv, home, f"{p}.venv"),
        "python": _expand(profile.python, home, f"{p}.python"),
        "container_runtime": profile.container_runtime, "image": _expand(profile.image, home, f"{p}.image"),
        "binds": binds, "container_binds": list(dict.fromkeys(auto + binds)),
        "extra_directives": list(profile.extra_directives), "device": profile.device,
        "idle_timeout": profile.idle_timeout, "models_dir": models_dir, "datasets_dir": datasets_dir,
        # a server for this machine listens on loopback only; on a compute node the login node must reach it
        "server_host": "127.0.0.1" if profile.scheduler == "local" else "0.0.0.0",
        "hpcseg_version": __version__, "params": params,
    }


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_SAMPLE_PARAMS = {"command": ["echo", "hello"], "model": "/home/user/.hpcseg/models/spleen/current",
                  "dataset": "/home/user/.hpcseg/datasets/spleen", "epochs": 2,
                  "out_dir": "/home/user/.hpcseg/models/spleen/v2", "batch_dir": "/home/user/.hpcseg/batches/b1",
                  "round": 0}


def sample_context(scheduler: str = "slurm", **profile_fields: Any) -> dict[str, Any]:
    """A context with realistic sample values (for ``validate``, ``--dry-run`` previews and tests)."""
    base: dict[str, Any] = {"slurm": {"host": "login.example.org", "account": "proj-123", "partition": "gpu"},
                            "pbs": {"host": "login.example.org", "account": "proj-123", "partition": "gpuq",
                                    "pbs_dialect": "pro"},
                            "local": {"gpus": 0}}[scheduler]
    prof = Profile(name="sample", scheduler=scheduler, work_dir="/home/user/.hpcseg", **{**base, **profile_fields})
    return build_context(prof, template="sample", job_dir="/home/user/.hpcseg/jobs/sample",
                         work_dir="/home/user/.hpcseg", job_name="hpcseg-sample", params=dict(_SAMPLE_PARAMS))


def _sample_variants() -> dict[str, dict[str, Any]]:
    sif = {"image": "/opt/images/hpcseg-server.sif", "binds": ["/scratch"]}
    return {
        "slurm (gres)": sample_context("slurm"),
        "slurm (gpus, apptainer)": sample_context("slurm", gpu_directive="gpus", gpu_type="a100",
                                                  container_runtime="apptainer", **sif),
        "pbs pro": sample_context("pbs"),
        "pbs torque": sample_context("pbs", pbs_dialect="torque", modules=["cuda/12.1"], venv="/opt/venv"),
        "local": sample_context("local"),
        "local (singularity)": sample_context("local", container_runtime="singularity", **sif),
    }
