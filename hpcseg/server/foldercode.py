"""Python code that ships inside a model folder: a MONAI bundle's ``scripts/``, a manifest's network class
(``"network": {"name": "mynet:Net"}`` with ``mynet.py`` in the folder) or its ``loader`` class.

While such code is imported the folder goes first on ``sys.path``; afterwards the modules it brought leave
``sys.modules`` again (objects built from them keep their classes), so the next folder's same-named ``network.py``
or ``scripts`` is its own, and the server's environment never sees them. A name the folder does not ship is imported
from the environment as before.

Example::

    Net = import_attr("mynet:Net", Path("models/brain"))     # models/brain/mynet.py, else the environment's mynet
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_import_lock = threading.RLock()


def local_modules(folder: Path) -> set[str]:
    """Top-level modules the folder ships (``scripts`` and any other package or .py file in it)."""
    names = {"scripts"}
    for p in Path(folder).iterdir():
        if (p.is_dir() and (p / "__init__.py").is_file()) or p.suffix == ".py":
            names.add(p.stem)
    return names


@contextlib.contextmanager
def folder_imports(folder: Path) -> Iterator[None]:
    """The folder's own code importable, kept apart from other folders' same-named code (see the module docstring).

    MONAI's runner finds a bundle's ``scripts`` because it runs from the bundle root; this does the same for any
    model folder, for the time the network is built.
    """
    names = local_modules(folder)

    def ours(mod: str) -> bool:
        return mod.split(".", 1)[0] in names

    with _import_lock:
        saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if ours(k)]}
        sys.path.insert(0, str(folder))
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(folder))
            for k in [k for k in sys.modules if ours(k)]:
                del sys.modules[k]
            sys.modules.update(saved)


def import_attr(ref: str, folder: Path | None = None) -> Any:
    """``module:Name`` imported from ``folder`` when the folder ships ``module``, else from the environment.

    Raises ImportError / AttributeError as ``importlib`` does (the callers turn them into ModelLoadError).
    """
    module, _, name = ref.partition(":")
    top = module.split(".", 1)[0]
    if folder is not None and Path(folder).is_dir() and top in local_modules(folder):
        with folder_imports(Path(folder)):
            return getattr(importlib.import_module(module), name)
    return getattr(importlib.import_module(module), name)
