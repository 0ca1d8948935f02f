"""Profiles: where a cluster is and how to ask it for a GPU, in one TOML file shared by the CLI and Slicer.

The file lives in the user's config dir (``platformdirs``; ``HPCSEG_CONFIG`` overrides it)::

    default = "karolina"

    [profiles.karolina]
    host = "karolina"            # may be a ~/.ssh/config alias: its HostName, User, Port, IdentityFile, ProxyJump count
    scheduler = "slurm"
    account = "OPEN-12-34"
    partition = "qgpu"
    gpus = 1
    walltime = "02:00:00"
    container_runtime = "apptainer"
    image = "/scratch/project/hpcseg/hpcseg-server.sif"

With no file (or no profile named), the embedded default ``local`` profile applies: the same server as a process
on this machine, no cluster needed. A wrong value is refused with its key path and what is allowed.

Example::

    cfg = load_config()
    profile = cfg.profile()          # the default one
    profile = cfg.profile("karolina")
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import tomli_w

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEDULERS = ("slurm", "pbs", "local")
RUNTIMES = ("singularity", "apptainer", "charliecloud", "none")
PBS_DIALECTS = ("auto", "pro", "torque")
GPU_DIRECTIVES = ("gres", "gpus", "none")

# Slurm accepts M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (sbatch(1) --time); PBS wants [[H:]M:]S. We store H:M:S or
# D-H:M:S and convert per scheduler in the templates.
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_MEMORY = re.compile(r"^\d+(?:[KMGT]B?)?$", re.IGNORECASE)
_SAFE_WORD = re.compile(r"^[A-Za-z0-9._@%+=:,/~-]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: a value that stands on a ``#SBATCH``/``#PBS`` directive line (account, partition, gpu_type, the job name)
DIRECTIVE_WORD = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_.@%+=:,/-]{0,199}$")
#: string keys that must be one line: a newline would split a job script line or an ssh argument
_SINGLE_LINE = ("account", "partition", "gpu_type", "image", "venv", "python", "proxy_jump", "user", "work_dir",
                "models_dir", "datasets_dir", "identity_file", "known_hosts", "template_dir", "default_model", "site",
                "preset")


def walltime_seconds(value: str) -> int:
    """Seconds in a ``[D-]H:MM:SS`` walltime."""
    m = _WALLTIME.match(value)
    if not m:
        raise ValueError(value)
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


@dataclass
class Profile:
    """One cluster (or the local machine) and how to run hpcseg jobs there."""

    name: str = "local"
    #: login node: a host name or a ~/.ssh/config alias; empty for the local scheduler
    host: str = ""
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    proxy_jump: str | None = None
    #: extra known_hosts file (besides ~/.ssh/known_hosts and hpcseg's own)
    known_hosts: str | None = None
    scheduler: str = "local"
    pbs_dialect: str = "auto"
    account: str | None = None
    #: Slurm partition or PBS queue
    partition: str | None = None
    gpus: int = 1
    gpu_type: str | None = None
    #: how to ask for GPUs on Slurm: --gres=gpu:N (most widely accepted), --gpus=N, or not at all
    gpu_directive: str = "gres"
    cpus: int = 4
    memory: str = "16G"
    walltime: str = "02:00:00"
    work_dir: str = "~/.hpcseg"
    models_dir: str | None = None
    datasets_dir: str | None = None
    container_runtime: str = "none"
    image: str | None = None
    binds: list[str] = field(default_factory=list)
    #: the interpreter that runs hpcseg on the node (inside the container, or in ``venv``)
    python: str = "python3"
    venv: str | None = None
    modules: list[str] = field(default_factory=list)
    extra_directives: list[str] = field(default_factory=list)
    #: site template folder searched before the user's and the built-in ones
    template_dir: str | None = None
    idle_timeout: int = 1800
    #: inference device on the node: auto, cuda, cpu
    device: str = "auto"
    #: the model ``hpcseg segment`` runs without ``-m`` (else ct-body for CT-like input; see hpcseg.modelchoice)
    default_model: str | None = None
    #: the site bundle's folder on the cluster (default: where the login node says; "none": no site layer)
    site: str | None = None
    #: a preset of the site bundle, by name
    preset: str | None = None

    @property
    def is_local(self) -> bool:
        return self.scheduler == "local"

    @property
    def models_path(self) -> str:
        return self.models_dir or f"{self.work_dir.rstrip('/')}/models"

    @property
    def datasets_path(self) -> str:
        return self.datasets_dir or f"{self.work_dir.rstrip('/')}/datasets"

    def to_dict(self) -> dict[str, Any]:
        """The profile as TOML-ready data (None values left out, name left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "name"}

    def validate(self) -> None:
        """Raise ConfigError naming the key path of the first wrong value."""
        p = f"profiles.{self.name}"

        def bad(key: str, allowed: str) -> ConfigError:
            return ConfigError(f"{p}.{key} = {getattr(self, key)!r} is not allowed: {allowed}",
                               hint=f"fix it with: hpcseg config set {key} VALUE --profile {self.name}")

        if not _NAME.match(self.name):
            raise ConfigError(f"profile name {self.name!r} is not allowed: letters, digits, '.', '_', '-'")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", "one of " + ", ".join(SCHEDULERS))
        if self.scheduler != "local" and not self.host:
            raise ConfigError(f"{p}.host is missing: a {self.scheduler} profile needs the login node",
                              hint=f"hpcseg config set host LOGIN_HOST --profile {self.name}")
        if self.host and not _SAFE_WORD.match(self.host):
            raise bad("host", "a host name or ~/.ssh/config alias (no spaces or shell characters)")
        if self.port is not None and not (0 < self.port < 65536):
            raise bad("port", "1-65535")
        if self.pbs_dialect not in PBS_DIALECTS:
            raise bad("pbs_dialect", "one of " + ", ".join(PBS_DIALECTS))
        if self.container_runtime not in RUNTIMES:
            raise bad("container_runtime", "one of " + ", ".join(RUNTIMES))
        if self.container_runtime != "none" and not self.image:
            kind = "a directory image (ch-convert)" if self.container_runtime == "charliecloud" else "a .sif"
            raise ConfigError(f"{p}.image is missing: container_runtime={self.container_runtime} needs {kind}",
                              hint=f"hpcseg config set image /path/to/hpcseg-server --profile {self.name}")
        if self.gpu_directive not in GPU_DIRECTIVES:
            raise bad("gpu_directive", "one of " + ", ".join(GPU_DIRECTIVES))
        for key in ("gpus", "cpus"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "gpus" else 1) or v > 1024:
                raise bad(key, "a whole number" + (" ≥ 0" if key == "gpus" else " ≥ 1"))
        if not isinstance(self.idle_timeout, int) or self.idle_timeout < 0:
            raise bad("idle_timeout", "seconds, a whole number ≥ 0 (0 = never)")
        if not _MEMORY.match(str(self.memory)):
            raise bad("memory", "a size like 16G, 4000M or 64GB")
        if not _WALLTIME.match(self.walltime):
            raise bad("walltime", "H:MM:SS or D-H:MM:SS, e.g. 02:00:00 or 1-00:00:00")
        for key in _SINGLE_LINE:
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or "\n" in v or "\r" in v or "\x00" in v or not v.strip()):
                raise bad(key, "a non-empty single-line string")
        check_directive_values(self)
        if self.device not in ("auto", "cuda", "cpu") and not re.match(r"^cuda:\d+$", self.device):
            raise bad("device", "auto, cuda, cuda:N or cpu")
        for key in ("modules", "binds", "extra_directives"):
            v = getattr(self, key)
            if not isinstance(v, list) or not all(isinstance(x, str) and x and "\n" not in x for x in v):
                raise bad(key, "a list of single-line strings")


def check_directive_values(profile: Profile) -> None:
    """Refuse values that cannot stand on a ``#SBATCH``/``#PBS`` line, in the words job submission uses.

    Called by :meth:`Profile.validate`, so ``config set``, ``config check`` and submit all refuse ``$(…)`` alike.
    """
    for key in ("account", "partition", "gpu_type"):
        value = getattr(profile, key)
        if value is not None and not DIRECTIVE_WORD.match(value):
            raise ConfigError(f"profiles.{profile.name}.{key} = {value!r} cannot go on a scheduler directive line",
                              hint="use letters, digits and . _ @ % + = : , / - only")


_FIELDS = {f.name: f for f in dataclasses.fields(Profile)}


def _coerce(name: str, key: str, value: Any) -> Any:
    """Turn a TOML or command-line value into the field's type, or raise ConfigError naming the key."""
    f = _FIELDS.get(key)
    if f is None or key == "name":
        allowed = ", ".join(k for k in _FIELDS if k != "name")
        raise ConfigError(f"profiles.{name}.{key}: unknown key", hint=f"allowed keys: {allowed}")
    typ = str(f.type)
    if typ.startswith("list"):
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"profiles.{name}.{key} must be a list of strings, got {value!r}")
        return value
    if typ.startswith("int"):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            if typ == "int | None" and value in ("", None):
                return None
            raise ConfigError(f"profiles.{name}.{key} must be a whole number, got {value!r}")
        return value
    if value == "" and "None" in typ:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"profiles.{name}.{key} must be a string, got {value!r}")
    return value


def profile_from_dict(name: str, data: dict[str, Any]) -> Profile:
    """A validated Profile from a TOML table."""
    if not isinstance(data, dict):
        raise ConfigError(f"profiles.{name} must be a table")
    if data.get("scheduler", "local") == "local":  # a local profile starts from the embedded one's values
        data = {**local_defaults(), **data}
    kwargs = {k: _coerce(name, k, v) for k, v in data.items()}
    prof = Profile(name=name, **kwargs)
    prof.validate()
    return prof


def local_defaults() -> dict[str, Any]:
    """What a ``local`` profile has unless it says otherwise: this Python, no GPU request, a data-dir work dir.

    The embedded default and a local profile in the file (``config init --scheduler local``, ``config set`` on
    the embedded default) share these, so writing the local profile down changes nothing it does.
    """
    return {"python": sys.executable, "gpus": 0, "work_dir": str(Path(platformdirs.user_data_dir("hpcseg")) / "work")}


def local_profile(name: str = "local") -> Profile:
    """The embedded default: the server as a process on this machine, with this Python."""
    return Profile(name=name, scheduler="local", device="auto", **local_defaults())


def editable_profile(cfg: Config, name: str | None) -> Profile:
    """The profile ``config set`` changes: a named one from the file, or the embedded ``local`` one (which
    ``config set`` then writes to the file with the built-in values, so it is settable like any other)."""
    name = name or cfg.default or "local"
    if name in cfg.profiles:
        return cfg.profiles[name]
    if name == "local":
        return local_profile()
    raise ConfigError(f"no profile {name!r} to change in {cfg.path}",
                      hint=f"create one first: hpcseg -p {name} config init")


def config_path() -> Path:
    """The config file: ``$HPCSEG_CONFIG`` or ``<user config dir>/hpcseg/config.toml``."""
    env = os.environ.get("HPCSEG_CONFIG")
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir("hpcseg")) / "config.toml"


def state_dir() -> Path:
    """Client-side state (the jobs this client started), ``$HPCSEG_STATE_DIR`` overrides."""
    env = os.environ.get("HPCSEG_STATE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_state_dir("hpcseg"))


@dataclass
class Config:
    """The whole config file: named profiles and which one is the default."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    default: str | None = None
    path: Path | None = None
    #: the keys each profile really sets in the file (the "profile" layer; the rest come from site or built-in)
    explicit: dict[str, set[str]] = field(default_factory=dict)

    def profile(self, name: str | None = None) -> Profile:
        """The named profile, else ``$HPCSEG_PROFILE``, else the default, else the embedded ``local`` one."""
        name = name or os.environ.get("HPCSEG_PROFILE") or self.default
        if not name or (name == "local" and "local" not in self.profiles):
            return local_profile()
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none yet"
            raise ConfigError(f"no profile named {name!r} in {self.path}",
                              hint=f"known profiles: {known}; create one with: hpcseg config init --profile {name}"
                              ) from None

    def set_profile(self, profile: Profile, make_default: bool = False) -> None:
        profile.validate()
        note_explicit(self, profile)
        self.profiles[profile.name] = profile
        if make_default or not self.default:
            self.default = profile.name

    def to_toml(self) -> str:
        data: dict[str, Any] = {}
        if self.default:
            data["default"] = self.default
        data["profiles"] = {n: explicit_dict(self, p) for n, p in sorted(self.profiles.items())}
        return tomli_w.dumps(data)

    def save(self, path: Path | None = None) -> Path:
        """Write the file atomically (temp file, then rename), mode 0600."""
        path = path or self.path or config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".toml", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_toml())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = path
        return path


def load_config(path: Path | None = None) -> Config:
    """Read and validate the config file; a missing file is an empty config (the ``local`` profile)."""
    path = path or config_path()
    if not path.exists():
        return Config(path=path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", hint="fix the TOML syntax or move the file away") from exc
    unknown = set(data) - {"default", "profiles"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}",
                          hint="allowed: default, profiles")
    profiles = {name: profile_from_dict(name, tbl) for name, tbl in (data.get("profiles") or {}).items()}
    explicit = {name: set(tbl) for name, tbl in (data.get("profiles") or {}).items()}
    default = data.get("default")
    if default is not None and default not in profiles and default != "local":
        raise ConfigError(f"{path}: default = {default!r} names no profile",
                          hint="known profiles: " + (", ".join(sorted(profiles)) or "none"))
    return Config(profiles=profiles, default=default, path=path, explicit=explicit)


def set_value(profile: Profile, key: str, value: str) -> Profile:
    """A copy of the profile with one key set from a command-line string, validated."""
    new = dataclasses.replace(profile, **{key: _coerce(profile.name, key, value)})
    new.validate()
    return new


# ---- layers: built-in < site < preset < user profile < command line (the site bundle: hpcseg/site.py) ----------

def note_explicit(cfg: Config, profile: Profile) -> None:
    """Remember which keys of ``profile`` the user set: those read from the file plus those changed now."""
    before = cfg.profiles.get(profile.name) or Profile(name=profile.name)
    changed = {k for k in _FIELDS if k != "name" and getattr(profile, k) != getattr(before, k)}
    cfg.explicit[profile.name] = cfg.explicit.get(profile.name, set()) | changed


def explicit_dict(cfg: Config, profile: Profile) -> dict[str, Any]:
    """The profile as written to the file: only the keys the user set, so site defaults are not pinned."""
    data = profile.to_dict()
    keys = cfg.explicit.get(profile.name)
    return data if keys is None else {k: v for k, v in data.items() if k in keys}


def user_layer(profile: Profile, keys: set[str] | None = None) -> dict[str, Any]:
    """The values a user's profile sets: ``keys`` when known (the config file), else every non-default value."""
    base = Profile(name=profile.name)
    return {k: getattr(profile, k) for k in _FIELDS if k != "name" and getattr(profile, k) is not None
            and (k in keys if keys is not None else getattr(profile, k) != getattr(base, k))}


def layer_profile(name: str, layers: list[tuple[str, dict[str, Any]]]) -> tuple[Profile, dict[str, str]]:
    """A validated profile from ``(label, values)`` layers, lowest first, and each key's origin (its label;
    ``built-in`` when no layer set it). Values are coerced and checked as a profile table's are."""
    values: dict[str, Any] = {}
    origins = {k: "built-in" for k in _FIELDS if k != "name"}
    for label, data in layers:
        for key, value in data.items():
            values[key] = _coerce(name, key, value)
            origins[key] = label
    prof = Profile(name=name, **values)
    prof.validate()
    return prof, origins
