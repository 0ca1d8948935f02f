"""Where the built-in templates, scheduler headers and container recipes are.

In an installed wheel they sit in ``hpcseg/_data/<name>``; in a source checkout at the repository's top level.

Example::

    resource_dir("templates") / "server.sh.j2"
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder of built-in ``templates``, ``slurm``, ``pbs`` or ``singularity`` files."""
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"hpcseg's built-in {name!r} folder is missing (looked in {_PKG / '_data'} and "
                            f"{_PKG.parent}); reinstall hpcseg")
