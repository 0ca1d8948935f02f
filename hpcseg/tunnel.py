"""Forward a local port to a server on a compute node, through the login node's SSH connection.

The tunnel rides the profile's one SSH connection (a ``direct-tcpip`` channel per TCP connection, as fabric's
``forward_local`` and paramiko's ``demos/forward.py`` do, but with 256 KiB reads instead of 1 KiB: images are
large). It needs no SSH login on the compute node, which ``pam_slurm_adopt`` often forbids. If the SSH
connection dropped, the next accepted connection reconnects it with the same credentials (a key or agent: no
prompt; a one-time code would have to be typed again). The local end listens on 127.0.0.1 only, on a port the
OS chooses. Nothing raised in its threads escapes as a traceback: paramiko's ``EOFError``/``SSHException`` from a
connection that went away end that one forwarded connection (its HTTP client sees it closed), and
:meth:`Tunnel.cause` says afterwards why (SSH connection lost, or the server job no longer listening).

Example::

    with Tunnel(ssh_shell, "gpu017", 41234) as local_port:
        requests.get(f"http://127.0.0.1:{local_port}/health/ready", headers=..., proxies={"http": None})
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


def _pump(sock: socket.socket, chan: Any, stop: threading.Event) -> None:
    """Copy bytes both ways until either side closes."""
    try:
        while not stop.is_set():
            ready, _, _ = select.select([sock, chan], [], [], 0.5)
            if sock in ready:
                data = sock.recv(CHUNK)
                if not data:
                    break
                chan.sendall(data)
            if chan in ready:
                data = chan.recv(CHUNK)
                if not data:
                    break
                sock.sendall(data)
    except Exception as exc:  # OSError, and paramiko's EOFError/SSHException when the SSH connection went away
        log.debug("tunnel connection ended: %s: %s", type(exc).__name__, exc)
    finally:
        for closer in (chan.close, sock.close):
            try:
                closer()
            except Exception:  # closing a channel of a dead transport may raise too; nothing is left to do
                pass


class Tunnel:
    """A local listening port whose connections are forwarded to ``host:port`` as seen from the login node.

    ``shell`` must offer ``open_channel(host, port)`` (:class:`hpcseg.ssh.SSHShell`). Use as a context manager:
    the listener, every forwarded connection and the accept thread are closed on exit.
    """

    def __init__(self, shell: Any, host: str, port: int, *, local_port: int = 0) -> None:
        self.shell = shell
        self.host = host
        self.port = port
        self._want_port = local_port
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.local_port = 0
        self.errors: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def start(self) -> int:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self._want_port))
        lst.listen(64)
        lst.settimeout(0.5)
        self._listener = lst
        self.local_port = lst.getsockname()[1]
        # Open one channel now so that a wrong host/port fails here, with a clear error, not on first use.
        self.shell.open_channel(self.host, self.port).close()
        t = threading.Thread(target=self._accept_loop, name=f"tunnel-{self.local_port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self.local_port

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                chan = self.shell.open_channel(self.host, self.port)
            except Exception as exc:  # the error reaches the HTTP client as a closed connection
                self.errors = [*self.errors[-9:], str(exc)]
                log.warning("tunnel: %s", exc)
                sock.close()
                continue
            t = threading.Thread(target=_pump, args=(sock, chan, self._stop), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def cause(self) -> tuple[str, str]:
        """Why a request through this tunnel failed, checked now: ``(sentence, what to do)``.

        The SSH connection not answering (or found dead since) is "SSH connection to the login node lost"; a
        login node that refuses a channel to the server's port means the server job ended; otherwise the server
        itself closed the connection.
        """
        alive = getattr(self.shell, "alive", None)
        if alive is not None and not alive(5.0):
            return (f"SSH connection to the login node {getattr(self.shell, 'name', '')} lost".replace("  ", " "),
                    "check your network (VPN, Wi-Fi) and send the request again: hpcseg logs in again by itself")
        try:
            self.shell.open_channel(self.host, self.port).close()
        except Exception as exc:
            text = str(exc)
            if "SSH connection" in text:
                return (text, "check your network (VPN, Wi-Fi) and send the request again")
            return (f"server job ended: nothing listens on {self.host}:{self.port} any more",
                    "`hpcseg jobs` shows how it ended; `hpcseg connect` starts or finds a server")
        return ("the server closed the connection before it answered",
                "the server log (`hpcseg logs`) says why; send the request again")

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for t in self._threads:
            t.join(timeout=2)
        self._threads.clear()

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
