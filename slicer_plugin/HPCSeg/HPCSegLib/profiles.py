"""The profile form of the settings panel: hpcseg's own config file, read and written through hpcseg.config.

Slicer and the ``hpcseg`` command share one TOML file (``hpcseg config show`` prints its path), so a profile made
in either is used by both. The panel shows one line per :class:`hpcseg.config.Profile` field as text; an empty
line means the field's default. Saving validates the whole profile first (the error names the key and what is
allowed) and writes the file atomically, keeping the other profiles as they are.

Example::

    form = ProfileForm.load("karolina")       # values as strings, for line edits and combo boxes
    form.values["partition"] = "qgpu"
    form.save(make_default=True)              # ConfigError if a value is wrong
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hpcseg import config as hconfig
from hpcseg.config import Profile

#: the values a field may take, where the config allows only a few
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": hconfig.SCHEDULERS, "container_runtime": hconfig.RUNTIMES, "pbs_dialect": hconfig.PBS_DIALECTS,
    "gpu_directive": hconfig.GPU_DIRECTIVES, "device": ("auto", "cuda", "cpu"),
}
HELP: dict[str, str] = {
    "host": "login node: a host name or a ~/.ssh/config alias (its HostName, User, Port, ProxyJump count)",
    "partition": "Slurm partition or PBS queue",
    "walltime": "H:MM:SS or D-H:MM:SS",
    "memory": "e.g. 16G",
    "image": "the hpcseg server container (.sif) on the cluster",
    "binds": "comma-separated",
    "modules": "environment modules to load, comma-separated",
    "extra_directives": "extra #SBATCH/#PBS lines, comma-separated",
    "python": "the Python that runs hpcseg on the node (for the local profile: on this machine)",
    "idle_timeout": "seconds without a request before the server job ends itself (0 = never)",
}


@dataclass(frozen=True)
class FormField:
    """One line of the form."""

    key: str
    label: str
    choices: tuple[str, ...] = ()
    help: str = ""


def form_fields() -> list[FormField]:
    """Every editable profile key, in the order of :class:`Profile`."""
    return [FormField(f.name, f.name.replace("_", " ").capitalize(), CHOICES.get(f.name, ()), HELP.get(f.name, ""))
            for f in dataclasses.fields(Profile) if f.name != "name"]


def to_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def load_profile(name: str | None = None, path: Path | None = None) -> Profile:
    """The named profile (the config's default when None; the embedded ``local`` one when there is none)."""
    return hconfig.load_config(path).profile(name)


def profile_names(path: Path | None = None) -> tuple[list[str], str]:
    """``(names, default)`` of the config file; the embedded ``local`` profile is always offered."""
    cfg = hconfig.load_config(path)
    names = sorted(set(cfg.profiles) | {"local"})
    return names, cfg.default or "local"


def new_profile_form(name: str) -> ProfileForm:
    """A profile not in the config file yet, with every field at its default."""
    prof = Profile(name=name)
    return ProfileForm(name, {f.key: to_text(getattr(prof, f.key)) for f in form_fields()})


@dataclass
class ProfileForm:
    """A profile as the form shows it: every field as text."""

    name: str
    values: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, name: str, path: Path | None = None) -> ProfileForm:
        """The named profile from the config file (the embedded defaults for ``local`` when it is not there)."""
        cfg = hconfig.load_config(path)
        prof = cfg.profile(name)
        return cls(name, {f.key: to_text(getattr(prof, f.key)) for f in form_fields()}, cfg.path)

    def profile(self) -> Profile:
        """The validated profile (ConfigError naming the key when a value is wrong)."""
        data = {k: v.strip() for k, v in self.values.items() if v is not None and v.strip()}
        return hconfig.profile_from_dict(self.name, data)

    def save(self, make_default: bool = False) -> Path:
        """Write this profile into the config file (other profiles untouched); returns the file's path."""
        prof = self.profile()
        cfg = hconfig.load_config(self.path)
        cfg.set_profile(prof, make_default=make_default)
        return cfg.save()


def site_presets(name: str) -> list[dict]:
    """The cluster's site presets for profile ``name``, each with the refusal ``submit`` would give, or None
    (``hpcseg.site.presets_for``; connects to the login node)."""
    from hpcseg.site import presets_for

    cfg = hconfig.load_config()
    return presets_for(cfg.profile(name), user_keys=cfg.explicit.get(name))


def doctor_items(name: str) -> list[dict]:
    """``hpcseg doctor`` for profile ``name``: one dict per item (item, ok, detail, fix)."""
    from hpcseg.doctor import as_json, diagnose

    cfg = hconfig.load_config()
    return as_json(diagnose(cfg.profile(name), user_keys=cfg.explicit.get(name)))
