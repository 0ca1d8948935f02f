"""The client-server protocol version: a client and a server of different hpcseg versions agree at connect.

The number changes only when a request or answer changes shape, not with every release. The server names it in
``/health/live``, ``/health/ready`` and ``/info/`` (``protocol``); the client sends it on every request in the
``X-HPCSeg-Protocol`` header. An incompatible pair gives one line on each side (which version, what to upgrade),
never a traceback or a wrong mask: the client refuses a server whose health answer names another protocol (or
none: an hpcseg from before protocol versions), the server answers 426 to a request whose header names another.
Requests without the header (MONAI Label's Slicer plugin, curl) are served as before.

``python -m hpcseg.protocol`` prints ``{"hpcseg": VERSION, "protocol": N}``: ``hpcseg doctor`` runs it inside a
site's image or venv to learn what the server there will speak before any job starts.
"""

from __future__ import annotations

import json

from . import __version__

#: bump when a request or an answer between client and server changes incompatibly
PROTOCOL_VERSION = 1
HEADER = "X-HPCSeg-Protocol"
#: in a 409's detail: the request id (X-HPCSeg-Request-Id) ran and was answered, and the answer is no longer kept;
#: hpcseg's client then sends the request once more under a new id (its first answer was lost with the connection)
ALREADY_ANSWERED = "was already answered"


def compatible(other: int | None) -> bool:
    """Whether a peer speaking ``other`` (None: an hpcseg from before protocol versions) can talk to us."""
    return other == PROTOCOL_VERSION


def server_mismatch(server_protocol: int | None, server_version: str) -> str:
    """The client's one line for an incompatible server."""
    theirs = f"protocol {server_protocol}" if server_protocol is not None else "no protocol version (older)"
    return (f"the server runs hpcseg {server_version or '(unknown)'} speaking {theirs}; this client is hpcseg "
            f"{__version__} speaking protocol {PROTOCOL_VERSION}: upgrade the "
            + ("server image or venv" if (server_protocol or 0) < PROTOCOL_VERSION
               else "client (pip install -U hpcseg)")
            + f" so both are on protocol {max(PROTOCOL_VERSION, server_protocol or 0)}")


def client_mismatch(client_protocol: str) -> str:
    """The server's one line (answer and log) for a client speaking another protocol."""
    newer = client_protocol.isdigit() and int(client_protocol) > PROTOCOL_VERSION
    return (f"this server (hpcseg {__version__}) speaks protocol {PROTOCOL_VERSION}, the client speaks "
            f"{client_protocol!r}: upgrade the "
            + ("server image or venv" if newer else "client (pip install -U hpcseg)"))


def main() -> None:
    print(json.dumps({"hpcseg": __version__, "protocol": PROTOCOL_VERSION}))


if __name__ == "__main__":
    main()
