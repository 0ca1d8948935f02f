"""The site bundle: what a cluster's admins install once so that users need only a host.

An admin installs a folder users can read on the cluster (e.g. ``/opt/hpcseg/site-2026-12``) and points the
login node's well-known location at it: ``/etc/hpcseg/site`` as a symlink (or ``$HPCSEG_SITE`` in the users'
environment). A profile's ``site`` key overrides both; ``site = "none"`` turns the site layer off. The folder::

    site.toml                 [site] name, contact, default_preset, quota_command
                              [defaults] any profile key but the connection ones (scheduler, modules, image, ...)
                              [presets.NAME] what a user picks by name: partition/queue, GPUs, CPUs, memory, walltime
                              [limits] what binds every layer (see :class:`Limits`)
    templates/*.sh.j2         optional overrides, usually one block: {% extends "builtin/server.sh.j2" %}

The client reads the bundle over the profile's one SSH connection: one command lists the files with their
sha256, the listing's hash names a local cache folder (``<state dir>/site/<hash>/``), and only a changed bundle
is read again. Values are layered built-in < site defaults < preset < user profile < command line
(:func:`hpcseg.config.layer_profile`), and :meth:`SiteBundle.check` refuses a request outside a limit before
anything is written or submitted, naming the limit, the value asked, where it came from and the contact line.
Site values are checked exactly as profile values are (the same validation and directive rules).

Example::

    res = resolve(profile)                      # connects, finds and caches the bundle, layers the values
    res.origins["partition"]                    # 'preset gpu-interactive'
    res.bundle.check(res.profile, res.origins)  # raises LimitExceeded past a limit
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Profile, layer_profile, state_dir, user_layer, walltime_seconds
from .errors import ConfigError, HpcsegError, LimitExceeded
from .shell import LocalShell, Shell

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SITE_FILE = "site.toml"
#: where the login node says the bundle is, in order (``$HPCSEG_SITE`` is read in the remote environment)
DEFAULT_LOCATIONS = ("$HPCSEG_SITE", "/etc/hpcseg/site")
#: profile keys a site may not set: how this user reaches the cluster is the user's own business
CONNECTION_KEYS = ("host", "user", "port", "identity_file", "proxy_jump", "known_hosts", "site", "preset")
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SITE_KEYS = {"name", "contact", "default_preset", "quota_command"}


@dataclass
class Limits:
    """What binds every layer. ``None`` (or an empty list) means no limit on that item."""

    partitions: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    max_walltime: str | None = None
    max_gpus: int | None = None
    max_cpus: int | None = None
    max_memory: str | None = None
    #: concurrent server jobs per user
    max_servers: int | None = None
    max_idle_timeout: int | None = None
    #: may users bring their own templates (profile ``template_dir``, the user template folder)?
    user_templates: bool = True
    #: may users point ``models_dir`` elsewhere than the site says?
    user_models_dir: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Limits:
        data = dict(data)
        if "queues" in data:  # PBS sites say queue
            data["partitions"] = data.pop("queues")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            f = known.get(key)
            if f is None:
                raise ConfigError(f"{where} [limits]: unknown key {key!r}", hint="allowed: " + ", ".join(known))
            typ = str(f.type)
            ok = (isinstance(value, list) and all(isinstance(x, str) and x for x in value) if typ.startswith("list")
                  else isinstance(value, bool) if typ == "bool"
                  else isinstance(value, int) and not isinstance(value, bool) and value >= 0 if "int" in typ
                  else isinstance(value, str))
            if not ok:
                raise ConfigError(f"{where} [limits] {key} = {value!r} has the wrong type: expected {typ}")
        lim = cls(**data)
        if lim.max_walltime is not None:
            try:
                walltime_seconds(lim.max_walltime)
            except ValueError:
                raise ConfigError(f"{where} [limits] max_walltime = {lim.max_walltime!r} is not H:MM:SS or "
                                  "D-H:MM:SS") from None
        if lim.max_memory is not None:
            try:
                _memory_mb(lim.max_memory)
            except ValueError:
                raise ConfigError(f"{where} [limits] max_memory = {lim.max_memory!r} is not a size like 64G"
                                  ) from None
        return lim


@dataclass
class SiteBundle:
    """A parsed, validated site bundle (and where its cached copy lies on this machine)."""

    location: str
    digest: str = ""
    name: str = ""
    contact: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    default_preset: str | None = None
    limits: Limits = field(default_factory=Limits)
    quota_command: list[str] | None = None
    local_dir: Path | None = None

    @property
    def templates_dir(self) -> Path | None:
        """The bundle's template overrides (cached copy), or None when it has none."""
        d = self.local_dir / "templates" if self.local_dir else None
        return d if d is not None and d.is_dir() else None

    @property
    def contact_line(self) -> str:
        return self.contact or f"the admins of {self.name or 'this site'}"

    def preset(self, name: str) -> dict[str, Any]:
        try:
            return self.presets[name]
        except KeyError:
            raise ConfigError(f"the site has no preset {name!r}",
                              hint="presets here: " + (", ".join(sorted(self.presets)) or "none")) from None

    def check(self, profile: Profile, origins: dict[str, str] | None = None) -> None:
        """Raise :class:`LimitExceeded` for the first value of ``profile`` outside a limit."""
        check_limits(self, profile, origins)


# ---- parsing ---------------------------------------------------------------------------------------------------

def parse_bundle(text: str, *, location: str, digest: str = "", local_dir: Path | None = None) -> SiteBundle:
    """A validated bundle from the text of ``site.toml``; errors name the file, the table and the key."""
    where = posixpath.join(location, SITE_FILE)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}", hint="fix the TOML syntax (hpcseg site validate shows the line)"
                          ) from exc
    unknown = set(data) - {"site", "defaults", "presets", "limits"}
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}",
                          hint="allowed: [site], [defaults], [presets.NAME], [limits]")
    meta = data.get("site") or {}
    bad = set(meta) - _SITE_KEYS
    if bad:
        raise ConfigError(f"{where} [site]: unknown key(s) {', '.join(sorted(bad))}",
                          hint="allowed: " + ", ".join(sorted(_SITE_KEYS)))
    for key in ("name", "contact", "default_preset"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, str) or any(c in v for c in "\r\n\x00")):
            raise ConfigError(f"{where} [site] {key} = {v!r}: a single-line string")
    qc = meta.get("quota_command")
    if qc is not None and not (isinstance(qc, list) and qc and all(isinstance(x, str) and x for x in qc)):
        raise ConfigError(f"{where} [site] quota_command = {qc!r}: a list of words, e.g. [\"quota\", \"-s\"]")
    limits = Limits.from_dict(data.get("limits") or {}, where)
    defaults = _table(data.get("defaults") or {}, where, "[defaults]")
    presets, descriptions = {}, {}
    for name, tbl in (data.get("presets") or {}).items():
        if not _PRESET_NAME.match(name):
            raise ConfigError(f"{where} [presets.{name}]: a preset name is letters, digits, '.', '_', '-'")
        if not isinstance(tbl, dict):
            raise ConfigError(f"{where} presets.{name} must be a table")
        tbl = dict(tbl)
        desc = tbl.pop("description", "")
        if not isinstance(desc, str) or "\n" in desc:
            raise ConfigError(f"{where} [presets.{name}] description: a single-line string")
        presets[name], descriptions[name] = _table(tbl, where, f"[presets.{name}]"), desc
    default_preset = meta.get("default_preset")
    if default_preset is not None and default_preset not in presets:
        raise ConfigError(f"{where} [site] default_preset = {default_preset!r} names no preset",
                          hint="presets: " + (", ".join(sorted(presets)) or "none"))
    bundle = SiteBundle(location=location, digest=digest, name=meta.get("name", ""), contact=meta.get("contact", ""),
                        defaults=defaults, presets=presets, descriptions=descriptions, default_preset=default_preset,
                        limits=limits, quota_command=qc, local_dir=local_dir)
    # Every preset (and the defaults alone) must make a valid profile, by the same rules as a user's.
    for label, layers in [("[defaults]", [("site", defaults)])] + [
            (f"[presets.{n}]", [("site", defaults), (f"preset {n}", p)]) for n, p in presets.items()]:
        check_values(layers, where=f"{where} {label}")
    return bundle


def _table(tbl: dict[str, Any], where: str, label: str) -> dict[str, Any]:
    """A [defaults] or [presets.X] table: profile keys only (``queue`` is ``partition``), no connection keys."""
    out = {}
    for key, value in tbl.items():
        key = "partition" if key == "queue" else key
        if key in CONNECTION_KEYS or key == "name":
            raise ConfigError(f"{where} {label} {key}: a site may not set how users connect",
                              hint="remove it; each user's profile holds host, user and key")
        out[key] = value
    return out


def check_values(layers: list[tuple[str, dict[str, Any]]], *, where: str) -> Profile:
    """A profile from ``layers`` checked by exactly the rules a user's profile meets (values, then the
    directive-line and path rules a job script needs); errors are re-worded to name ``where``."""
    from .templates import build_context

    try:
        # a site that names no scheduler is checked by Slurm's rules (the strictest directive lines)
        prof, _ = layer_profile("site-check", [("check", {"host": "login.invalid", "scheduler": "slurm"}), *layers])
        home = "/home/site-check"
        build_context(prof, template="server", job_dir=f"{home}/.hpcseg/jobs/j", work_dir=f"{home}/.hpcseg",
                      job_name="hpcseg-server", params={}, home=home)
    except HpcsegError as exc:
        msg = exc.message.replace("profiles.site-check.", "").replace("profiles.site-check", "")
        raise ConfigError(f"{where}: {msg}", hint=f"fix {where.split(' ')[0]} (hpcseg site validate checks it)"
                          ) from exc
    return prof


# ---- limits ----------------------------------------------------------------------------------------------------

def _memory_mb(value: str) -> int:
    from .templates import _memory_mb as mb

    return mb(str(value))


def check_limits(bundle: SiteBundle, profile: Profile, origins: dict[str, str] | None = None) -> None:
    """The first limit ``profile`` breaks, as :class:`LimitExceeded`; nothing is submitted past one."""
    lim, origins = bundle.limits, origins or {}

    def refuse(limit: str, allowed: Any, key: str, asked: Any, fix: str) -> LimitExceeded:
        came = origins.get(key)
        return LimitExceeded(
            f"refused by the site limit {limit} = {allowed}: you asked {key} = {asked}"
            + (f" (from the {came})" if came else "") + f"; nothing was submitted. Contact: {bundle.contact_line}",
            hint=fix, limit=limit, asked=asked, contact=bundle.contact_line)

    if lim.partitions and profile.partition not in lim.partitions:
        raise refuse("partitions", lim.partitions, "partition", profile.partition,
                     "pick one of " + ", ".join(lim.partitions) + " (or a preset: hpcseg site presets)")
    if lim.accounts and profile.account not in lim.accounts:
        raise refuse("accounts", lim.accounts, "account", profile.account,
                     "set account to one of " + ", ".join(lim.accounts))
    if lim.max_walltime and walltime_seconds(profile.walltime) > walltime_seconds(lim.max_walltime):
        raise refuse("max_walltime", lim.max_walltime, "walltime", profile.walltime,
                     f"ask for at most {lim.max_walltime} (--set walltime=...)")
    if lim.max_gpus is not None and profile.gpus > lim.max_gpus:
        raise refuse("max_gpus", lim.max_gpus, "gpus", profile.gpus, f"ask for at most {lim.max_gpus} GPU(s)")
    if lim.max_cpus is not None and profile.cpus > lim.max_cpus:
        raise refuse("max_cpus", lim.max_cpus, "cpus", profile.cpus, f"ask for at most {lim.max_cpus} CPUs")
    if lim.max_memory and _memory_mb(profile.memory) > _memory_mb(lim.max_memory):
        raise refuse("max_memory", lim.max_memory, "memory", profile.memory, f"ask for at most {lim.max_memory}")
    if lim.max_idle_timeout is not None and (profile.idle_timeout == 0 or profile.idle_timeout > lim.max_idle_timeout):
        raise refuse("max_idle_timeout", lim.max_idle_timeout, "idle_timeout", profile.idle_timeout,
                     f"set idle_timeout to at most {lim.max_idle_timeout} seconds (0 = never is not allowed here)")
    if not lim.user_templates and _from_user("template_dir", profile, bundle, origins):
        raise refuse("user_templates", "false", "template_dir", profile.template_dir,
                     "remove template_dir from your profile: this site's jobs use its own templates")
    if not lim.user_models_dir and _from_user("models_dir", profile, bundle, origins):
        raise refuse("user_models_dir", "false", "models_dir", profile.models_dir,
                     "remove models_dir from your profile: this site serves its shared models folder")


def _from_user(key: str, profile: Profile, bundle: SiteBundle, origins: dict[str, str]) -> bool:
    """Whether ``key`` holds a value the user (profile or command line) chose, not the site."""
    value = getattr(profile, key)
    if value is None:
        return False
    came = origins.get(key)
    if came is not None:
        return came in ("profile", "command line")
    return value != bundle.defaults.get(key)


def check_servers(bundle: SiteBundle, active: int) -> None:
    """Refuse one more server job when ``active`` already reach ``max_servers``."""
    lim = bundle.limits.max_servers
    if lim is not None and active >= lim:
        raise LimitExceeded(
            f"refused by the site limit max_servers = {lim}: you asked for server job number {active + 1}; "
            f"nothing was submitted. Contact: {bundle.contact_line}",
            hint="use your running server (hpcseg connect) or stop one first (hpcseg stop)",
            limit="max_servers", asked=active + 1, contact=bundle.contact_line)


# ---- finding and caching the bundle ----------------------------------------------------------------------------

_PROBE = r"""
d=
if [ -n "$1" ]; then d=$1; else
  for c in "${HPCSEG_SITE:-}" $2; do [ -n "$c" ] && [ -e "$c/site.toml" ] && { d=$c; break; }; done
fi
if [ -z "$d" ]; then echo "none"; exit 0; fi
if [ ! -r "$d/site.toml" ]; then echo "missing $d"; exit 0; fi
cd -- "$d" || exit 1
echo "dir $(pwd -P)"
{ printf 'site.toml\0'; find templates -type f -name '*.j2' -print0 2>/dev/null; } | LC_ALL=C sort -z |
  xargs -0 sha256sum --
"""


def cache_root() -> Path:
    return state_dir() / "site"


def locate(shell: Shell, explicit: str | None = None, locations: tuple[str, ...] | None = None
           ) -> tuple[str, str, list[tuple[str, str]]] | None:
    """``(folder, digest, [(sha256, relative path)])`` of the bundle on the shell's machine, or None.

    ``explicit`` (a profile's ``site``) is the only place looked at when given; else ``$HPCSEG_SITE`` in the
    remote environment, then ``locations`` (default ``/etc/hpcseg/site``).
    """
    locs = [loc for loc in (locations or DEFAULT_LOCATIONS) if not loc.startswith("$")]
    if any(" " in loc for loc in locs):
        raise ConfigError("site locations may not contain spaces")
    res = shell.run(["sh", "-c", _PROBE, "sh", explicit or "", " ".join(locs)], timeout=30)
    out = res.stdout.strip().splitlines()
    if not res.ok or not out:
        raise ConfigError(f"cannot look for the site bundle on {shell.name}: {res.stderr.strip() or res.stdout}")
    if out[0] == "none":
        return None
    if out[0].startswith("missing "):
        raise ConfigError(f"no site bundle at {out[0][8:]} on {shell.name} (no readable {SITE_FILE})",
                          hint="fix the profile's site key (hpcseg config set site PATH), or unset it to use the "
                               "site's own location")
    folder = out[0][4:]
    files = []
    for line in out[1:]:
        digest, _, rel = line.partition("  ")
        if rel and "\n" not in rel:
            files.append((digest, rel))
    listing = "\n".join(f"{d}  {r}" for d, r in files)
    return folder, hashlib.sha256(listing.encode()).hexdigest(), files


def fetch(shell: Shell, explicit: str | None = None, *, locations: tuple[str, ...] | None = None,
          cache: Path | None = None) -> SiteBundle | None:
    """The site bundle, from the local cache when its hash is unchanged, else read over ``shell`` and cached."""
    found = locate(shell, explicit, locations)
    if found is None:
        return None
    folder, digest, files = found
    root = (cache or cache_root()) / digest
    if not (root / SITE_FILE).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root.parent))
        try:
            for _sha, rel in files:
                text = shell.read_text(posixpath.join(folder, rel))
                if text is None:
                    raise ConfigError(f"the site bundle changed while it was read ({rel} vanished)",
                                      hint="run the command again", retryable=True)
                dest = tmp / rel
                if ".." in Path(rel).parts:
                    raise ConfigError(f"site bundle file name {rel!r} is not allowed")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text, encoding="utf-8")
            try:
                os.replace(tmp, root)
            except OSError:  # another process cached the same digest meanwhile
                if not (root / SITE_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return parse_bundle((root / SITE_FILE).read_text(encoding="utf-8"), location=folder, digest=digest,
                        local_dir=root)


# ---- the effective profile -------------------------------------------------------------------------------------

@dataclass
class Resolved:
    """A profile with the site layered in, where each value came from, the bundle, and the open shell."""

    profile: Profile
    origins: dict[str, str]
    bundle: SiteBundle | None
    shell: Shell | None


def site_shell(profile: Profile) -> Shell:
    """The shell the site bundle is read over: this machine for a host-less profile, else the login node."""
    if not profile.host:
        return LocalShell()
    from .ssh import SSHShell

    return SSHShell.from_profile(profile)


def resolve(profile: Profile, *, shell: Shell | None = None, user_keys: set[str] | None = None,
            preset: str | None = None, overrides: dict[str, Any] | None = None,
            locations: tuple[str, ...] | None = None, cache: Path | None = None) -> Resolved:
    """Layer built-in < site defaults < preset < user profile < command line (``overrides``).

    ``user_keys`` are the keys the user's profile really sets (from the config file); without them, every value
    that differs from the built-in default counts as the user's. A host-less profile without a ``site`` key has
    no site layer (the local machine). A profile with a host but no scheduler takes it from the site.
    """
    user = user_layer(profile, user_keys)
    overrides = dict(overrides or {})
    use_site = profile.site != "none" and (bool(profile.host) or bool(profile.site))
    bundle = None
    if use_site:
        shell = shell or site_shell(profile)
        bundle = fetch(shell, profile.site, locations=locations, cache=cache)
    layers: list[tuple[str, dict[str, Any]]] = []
    chosen = preset or overrides.pop("preset", None) or profile.preset
    if bundle is not None:
        layers.append(("site", bundle.defaults))
        chosen = chosen or bundle.default_preset
        if chosen:
            layers.append((f"preset {chosen}", bundle.preset(chosen)))
    elif chosen:
        raise ConfigError(f"preset {chosen!r} asked, but no site bundle was found for profile {profile.name}",
                          hint="ask your admins where the site bundle is (profile key site), or drop the preset")
    if profile.host and "scheduler" not in user and "scheduler" not in overrides and not any(
            "scheduler" in d for _, d in layers):
        raise ConfigError(f"profile {profile.name} names a host but no scheduler, and no site bundle says one",
                          hint=f"hpcseg -p {profile.name} config set scheduler slurm (or pbs), or ask your admins "
                               "to install the hpcseg site bundle (site key)")
    layers += [("profile", user), ("command line", overrides)]
    prof, origins = layer_profile(profile.name, layers)
    if chosen:
        prof.preset = chosen
    return Resolved(prof, origins, bundle, shell)


def presets_for(profile: Profile, *, shell: Shell | None = None, **kw: Any) -> list[dict[str, Any]]:
    """The site's presets for a profile, for a settings panel: name, description, values, and the refusal
    (the same sentence ``submit`` would give) when the preset with this profile breaks a limit, else None.

    One connection, one read of the bundle (cached by hash). Example::

        for p in presets_for(profile):
            print(p["name"], p["description"], p["refusal"] or "ok")
    """
    kw.pop("preset", None)
    res = resolve(profile, shell=shell, **kw)
    if res.bundle is None:
        return []
    out = []
    for name in sorted(res.bundle.presets):
        refusal = None
        try:
            r = resolve(profile, shell=res.shell, preset=name, **kw)
            res.bundle.check(r.profile, r.origins)
        except HpcsegError as exc:
            refusal = exc.message
        out.append({"name": name, "description": res.bundle.descriptions.get(name, ""),
                    "values": dict(res.bundle.presets[name]), "default": name == res.bundle.default_preset,
                    "refusal": refusal})
    return out
