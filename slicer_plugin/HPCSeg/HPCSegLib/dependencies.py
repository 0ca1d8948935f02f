"""Does this Python have hpcseg (new enough, with the extras it needs)? If not, what should pip install?

The plugin never vendors hpcseg: on first use it hands :func:`requirements` to ``slicer.packaging.pip_ensure``
(``slicer.util.pip_install`` on a Slicer without it) and only when :func:`unmet` says something is missing, so a
ready Slicer starts without touching pip. The source is, in order: what the user typed in Application Settings
(a requirement such as ``hpcseg==0.1.0``, a wheel, a folder), else the checkout this plugin sits in
(``slicer_plugin/`` of the hpcseg repository), else ``hpcseg>=MIN_VERSION`` from the package index pip is
configured with.

Nothing here imports hpcseg (it may not be installed yet) or Slicer.

Example::

    reqs = requirements(source="", module_dir=Path(__file__).parent, server=profile_is_local)
    if unmet(reqs):
        slicer.packaging.pip_ensure(reqs, requester="HPCSeg")
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

DIST = "hpcseg"
MIN_VERSION = "0.1.0"
#: hpcseg's own ``requires-python``: Slicer 5.8 and later ship Python 3.12; Slicer 5.6 and older ship 3.9
MIN_PYTHON = (3, 10)


def python_problem(version_info: Sequence[int] = tuple(sys.version_info)) -> str | None:
    """A sentence when this Python is too old for hpcseg, else None."""
    if tuple(version_info[:2]) >= MIN_PYTHON:
        return None
    have = ".".join(map(str, version_info[:2]))
    need = ".".join(map(str, MIN_PYTHON))
    return (f"hpcseg needs Python {need} or newer; this Slicer runs Python {have}. "
            "Use Slicer 5.8 or newer, or the hpcseg command line with MONAI Label's Slicer plugin.")


def find_checkout(module_dir: Path, levels: int = 4) -> Path | None:
    """The hpcseg repository this plugin sits in (a folder whose pyproject.toml names project hpcseg), if any."""
    for folder in [module_dir, *list(Path(module_dir).resolve().parents)[:levels]]:
        pyproject = Path(folder) / "pyproject.toml"
        try:
            text = pyproject.read_text(encoding="utf-8")
        except OSError:
            continue
        if any(line.replace(" ", "") == f'name="{DIST}"' for line in text.splitlines()):
            return Path(folder).resolve()
    return None


def requirements(source: str = "", *, module_dir: Path | None = None, server: bool = False) -> list[str]:
    """What pip must satisfy: one requirement for hpcseg (``[server]`` extras when the server runs in Slicer's
    own Python, i.e. the ``local`` profile with no other ``python`` set).

    ``source`` is a requirement (``hpcseg==0.1.0``), a URL, or a path to a wheel or a source folder.
    """
    extras = "[server]" if server else ""
    source = source.strip()
    if not source and module_dir is not None:
        checkout = find_checkout(module_dir)
        if checkout is not None:
            source = str(checkout)
    if not source:
        return [f"{DIST}{extras}>={MIN_VERSION}"]
    path = Path(source).expanduser()
    if "://" in source or path.exists():
        uri = source if "://" in source else path.resolve().as_uri()
        return [f"{DIST}{extras} @ {uri}"]
    req = Requirement(source)  # a plain requirement; add the extras it lacks
    if server and "server" not in req.extras:
        req.extras = {*req.extras, "server"}
    return [str(req)]


def server_extras_needed(scheduler: str, python: str) -> bool:
    """Does the server run in *this* Python (the ``local`` profile with Slicer's own interpreter)?

    Then this Python needs ``hpcseg[server]`` (torch, MONAI, FastAPI); a local profile whose ``python`` is another
    environment, or any cluster profile, needs only the client.
    """
    if scheduler != "local":
        return False
    try:
        return Path(python).resolve() == Path(sys.executable).resolve()
    except OSError:
        return False


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet(reqs: Iterable[str]) -> list[str]:
    """The requirements this Python does not satisfy, each with the reason ("hpcseg>=0.2: 0.1.0 installed").

    A URL or path requirement is met by any installed version (pip_ensure judges it the same way); extras are met
    when every distribution they add is installed.
    """
    problems = []
    for text in reqs:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            problems.append(f"{text}: not a requirement ({exc})")
            continue
        have = _installed(req.name)
        if have is None:
            problems.append(f"{text}: not installed")
            continue
        try:
            if req.specifier and Version(have) not in req.specifier:
                problems.append(f"{text}: {have} installed")
                continue
        except InvalidVersion:
            problems.append(f"{text}: installed version {have!r} cannot be compared")
            continue
        missing = [d for d in _extra_dists(req.name, req.extras) if _installed(d) is None]
        if missing:
            problems.append(f"{text}: {', '.join(missing)} missing")
    return problems


def _extra_dists(name: str, extras: Iterable[str]) -> list[str]:
    """Distribution names an installed package's extras pull in."""
    wanted = set(extras)
    out = []
    for dep in metadata.requires(name) or []:
        req = Requirement(dep)
        if req.marker is not None and any(req.marker.evaluate({"extra": e}) for e in wanted):
            out.append(req.name)
    return out
