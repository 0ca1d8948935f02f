"""hpcseg's inference server: runs on a GPU node inside a batch job (or locally), speaks MONAI Label's API.

Start it with ``python -m hpcseg.server --models-dir DIR --connection-file F`` (see :mod:`hpcseg.server.__main__`),
or build the app yourself::

    from hpcseg.server import ServerSettings, create_app
    app = create_app(ServerSettings(models_dirs=["models"], token=secrets.token_urlsafe(32)))

Modules: ``app`` (routes), ``auth`` (the token), ``registry`` (models on disk), ``sessions`` (uploaded images),
``wire`` (image bytes), ``runtime`` (settings and state), ``models`` (model code). Importing this package imports
nothing heavy: the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcseg.server.app import create_app
    from hpcseg.server.runtime import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from hpcseg.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from hpcseg.server.runtime import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'hpcseg.server' has no attribute {name!r}")
