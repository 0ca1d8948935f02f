"""Does this Python have hpcseg (new enough, with the extras it needs)? If not, what should pip install?

The plugin never vendors hpcseg: when hpcseg is first needed (Connect, the settings page's Install) it hands
:func:`requirements` to ``slicer.packaging.pip_ensure`` on Slicer 5.12 and later, or to ``slicer.util.pip_install``
after a confirmation on Slicer 5.10 (which has no ``slicer.packaging``: see :func:`install_method`), and only when
:func:`missing` says something is missing, so a ready Slicer starts without touching pip. Slicer older than 5.10
ships Python 3.9 (5.8 has 3.9.10): :func:`slicer_problem` refuses it in one line.

The source is, in order: what the user typed in Application Settings (a requirement such as
``hpcseg==0.1.0``, a wheel, a folder), else the checkout this plugin sits in (``slicer_plugin/`` of the hpcseg
repository), else ``hpcseg>=MIN_VERSION`` from the package index pip is configured with.

Nothing here imports hpcseg (it may not be installed yet) or Slicer.

Example::

    reqs = requirements(source="", module_dir=Path(__file__).parent, server=profile_is_local)
    if missing(reqs):
        slicer.packaging.pip_ensure(reqs, requester="HPCSeg")
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

DIST = "hpcseg"
MIN_VERSION = "0.1.0"
#: hpcseg's own ``requires-python``
MIN_PYTHON = (3, 10)
#: the oldest Slicer the module supports: 5.10.0 is the first with Python 3.12 (5.8 ships 3.9.10)
MIN_SLICER = (5, 10)
#: ``slicer.packaging.pip_ensure`` arrived in Slicer 5.12.0; 5.10 has ``slicer.util.pip_install`` only
PIP_ENSURE_SINCE = (5, 12)
NEED = f"HPCSeg needs 3D Slicer {MIN_SLICER[0]}.{MIN_SLICER[1]} or newer (Python 3.12)"


def slicer_problem(major: int, minor: int) -> str | None:
    """One line refusing a Slicer older than :data:`MIN_SLICER` (with the version it needs), else None."""
    if (major, minor) >= MIN_SLICER:
        return None
    return f"{NEED}; this is Slicer {major}.{minor}. Install a newer Slicer from download.slicer.org."


def install_method(major: int, minor: int) -> str:
    """``"pip_ensure"`` (Slicer ≥ 5.12: asks, installs, offers a restart) or ``"pip_install"`` (5.10: the module
    asks first with ``confirmOkCancelDisplay``)."""
    return "pip_ensure" if (major, minor) >= PIP_ENSURE_SINCE else "pip_install"


def python_problem(version_info: Sequence[int] = tuple(sys.version_info)) -> str | None:
    """A sentence when this Python is too old for hpcseg, else None."""
    if tuple(version_info[:2]) >= MIN_PYTHON:
        return None
    have = ".".join(map(str, version_info[:2]))
    return f"{NEED}; this Slicer runs Python {have}."


def importable(name: str = DIST) -> bool:
    """Can ``name`` be imported *now* as a regular package (after a pip install in this very process too)?

    Finder caches are invalidated first, so files pip wrote a moment ago are seen without a restart; a folder
    without ``__init__.py`` (a namespace package: not an installed hpcseg) does not count.
    """
    importlib.invalidate_caches()
    if name in sys.modules:
        return getattr(sys.modules[name], "__file__", None) is not None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def missing(reqs: Iterable[str]) -> list[str]:
    """What keeps hpcseg from being used in this Python: :func:`unmet` plus "not importable"."""
    if not importable():
        return [f"{DIST}: not installed (no importable package)"]
    return unmet(reqs)


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


def server_extras_needed(scheduler: str, python: str, worker_python: str = sys.executable) -> bool:
    """Does the server run in Slicer's own Python (the ``local`` profile with no other ``python`` set)?

    Then Slicer's Python needs ``hpcseg[server]`` (torch, MONAI, FastAPI); a local profile whose ``python`` is
    another environment, or any cluster profile, needs only the client. ``worker_python`` is the worker's
    interpreter (Slicer's PythonSlicer), which the embedded local profile names when read in the worker.
    """
    if scheduler != "local":
        return False
    try:
        mine = {Path(sys.executable).resolve(), Path(worker_python).resolve()}
        return Path(python).resolve() in mine
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
