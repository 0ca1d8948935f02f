"""Run the inference server: ``python -m hpcseg.server --models-dir D --connection-file F [options]``.

What a batch job needs from its server process, in order:

1. A random token made here (``secrets.token_urlsafe(32)``), never taken from argv or the environment, so it is
   not in ``ps``, the job script or its logs. It leaves the process only in the connection file.
2. A socket this process binds itself (port 0 by default: the kernel picks a free port; there is no
   probe-then-release race, schedulers.md "Servers inside jobs"), served by uvicorn on that very socket.
3. As soon as the first model is loaded and warm (models without torch load first; the others go on loading in
   the background and a request for one of them waits for it): the connection file, written atomically with mode
   0600 (``O_EXCL`` temp file, then rename), and written again when every model has loaded::

       {"host": "gpu017", "hostname": "gpu017", "port": 40123, "token": "...", "pid": 4242,
        "started": "2026-01-01T12:00:00+00:00", "ready": "...", "models": ["ct-body"], "loading": ["my-net"],
        "failed": {}, "version": "0.1.0", "url": "http://gpu017:40123", "protocol": 1}

   If no model at all can be loaded, the process logs why and exits 3 (so the job fails visibly).
4. Idle timeout: no request (health checks do not count) for N seconds -> graceful shutdown, exit 0, so the job
   ends and frees the GPU. SIGTERM/SIGINT (scancel, qdel, walltime) -> graceful shutdown: requests in flight get a
   503 with ``Connection: close`` within a fraction of a second, then the process exits 0.
5. The connection file is removed on exit (only if it is still ours). Log lines (stderr and ``--log-file``): model
   load times, one line per request (method, path, status, ms, bytes); never the token, headers or query strings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("hpcseg.server")
EXIT_NO_MODELS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m hpcseg.server", description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", action="append", default=[], type=Path,
                   help="a directory of model folders (repeat for several; the first wins a name)")
    p.add_argument("--no-builtin-models", dest="builtin_models", action="store_false",
                   help="do not serve hpcseg's built-in models (by default they come after --models-dir)")
    p.add_argument("--connection-file", type=Path, help="where to write host, port and token once ready (0600)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 on a compute node)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 (default) lets the kernel pick a free one")
    p.add_argument("--advertise-host", help="host name for the connection file (default: this node's hostname "
                                            "when bound to all addresses, else the bind address)")
    p.add_argument("--idle-timeout", type=float, default=0, metavar="SECONDS",
                   help="exit after this long without a request (0: never)")
    p.add_argument("--device", default="auto", help="torch device for the models: auto, cuda, cuda:1, cpu")
    p.add_argument("--log-file", type=Path, help="also log here")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--session-ttl", type=float, default=3600, metavar="SECONDS", help="idle life of a session")
    p.add_argument("--max-sessions", type=int, default=8, help="open sessions kept (least recently used go first)")
    p.add_argument("--workers", type=int, default=1, help="inferences run at once (one GPU: 1)")
    p.add_argument("--model-wait", type=float, default=300, metavar="SECONDS",
                   help="how long a request for a model that is still loading waits for it")
    p.add_argument("--grace", type=float, default=10, metavar="SECONDS",
                   help="on shutdown, how long to wait for requests to finish before cancelling them")
    g = p.add_argument_group("limits on what a client can hold (see hpcseg.server.guard)")
    g.add_argument("--max-body-mb", type=float, default=2048, help="largest request body (default 2048 MiB)")
    g.add_argument("--body-grace", type=float, default=60, metavar="SECONDS",
                   help="longest pause within a request body, and the time before --min-body-rate applies")
    g.add_argument("--min-body-rate-kb", type=float, default=64, metavar="KIB_PER_S",
                   help="a request body's slowest average rate after --body-grace (default 64 KiB/s)")
    g.add_argument("--max-connections", type=int, default=64, help="connections open at once")
    g.add_argument("--max-unauthenticated", type=int, default=16,
                   help="connections open at once that have not yet sent a request with the token")
    g.add_argument("--header-timeout", type=float, default=30, metavar="SECONDS",
                   help="a new connection's time to send a request with the token")
    g.add_argument("--retry-grace", type=float, default=30, metavar="SECONDS",
                   help="how long an inference whose client left waits for that client's retry before it stops")
    return p.parse_args(argv)


def setup_logging(log_file: Path | None, level: str) -> None:
    """One format for hpcseg's and uvicorn's lines, to stderr and optionally a file."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), ready to hand to uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def write_connection_file(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` atomically, mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_connection_file(path: Path, token: str) -> None:
    """Remove ``path`` if it still holds our token (a requeued job's new server may have replaced it)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass


def _advertised(host: str, advertise: str | None) -> str:
    if advertise:
        return advertise
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


class _Lifecycle:
    """Why and how the process ends (filled by the signal handler, the watcher and main)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.code = 0
        self.written: Path | None = None


def main(argv: list[str] | None = None) -> int:
    """Run the server until idle timeout, a signal, or no loadable model; returns the exit code."""
    args = parse_args(argv)
    setup_logging(args.log_file, args.log_level)
    import uvicorn

    from hpcseg import __version__
    from hpcseg.server.app import create_app
    from hpcseg.server.models import builtin_models_dir
    from hpcseg.server.runtime import ServerSettings

    models_dirs = list(args.models_dir) + ([builtin_models_dir()] if args.builtin_models else [])
    if not models_dirs:
        raise SystemExit("no models: give --models-dir, or drop --no-builtin-models")
    token = secrets.token_urlsafe(32)
    settings = ServerSettings(
        models_dirs=models_dirs, token=token, device=args.device, session_ttl=args.session_ttl,
        max_sessions=args.max_sessions, idle_timeout=args.idle_timeout, workers=args.workers, grace=args.grace,
        max_body=int(args.max_body_mb * (1 << 20)), body_grace=args.body_grace,
        min_body_rate=args.min_body_rate_kb * 1024, max_connections=args.max_connections,
        max_unauthenticated=args.max_unauthenticated, header_timeout=args.header_timeout,
        retry_grace=args.retry_grace,
        model_wait=args.model_wait,
    )
    app = create_app(settings)
    rt = app.state.runtime
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    host = _advertised(args.host, args.advertise_host)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    life = _Lifecycle()
    log.info("hpcseg server %s (pid %d) listening on %s:%d, loading models from %s", __version__, os.getpid(),
             args.host, port, ", ".join(map(str, settings.models_dirs)))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # no logging here: we are in a signal handler
            rt.shutting_down.set()
            life.reason = life.reason or signal.Signals(sig).name
            super().handle_exit(sig, frame)

    from hpcseg.server.guard import protocol_class

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=max(1, int(args.grace)), timeout_keep_alive=30,
                            http=protocol_class(rt))
    server = Server(config)

    ready_at: list[str] = []

    def on_ready() -> dict[str, Any]:
        reg = rt.registry
        ready_at[:] = ready_at or [datetime.now(timezone.utc).isoformat(timespec="seconds")]
        info = {"host": host, "hostname": socket.gethostname(), "port": port, "token": token, "pid": os.getpid(),
                "started": started, "ready": ready_at[0],
                "models": [e.name for e in reg.entries() if e.model is not None],
                "loading": [e.name for e in reg.entries() if e.model is None and e.state in ("pending", "loading")],
                "failed": {e.name: e.error for e in reg.entries() if e.state == "failed"},
                "version": __version__, "url": f"http://{host}:{port}", "protocol": 1}
        if args.connection_file:
            write_connection_file(args.connection_file, info)
            life.written = args.connection_file
        return info

    def loading_done() -> bool:
        return rt.registry.generation > 0 and not rt.registry.loading

    def watch() -> None:
        while not server.should_exit and not (server.started and (rt.registry.ready() or loading_done())):
            time.sleep(0.02)
        if server.should_exit:
            return
        if not rt.registry.ready():
            log.error("no model could be loaded (see above): exiting with code %d", EXIT_NO_MODELS)
            life.code, life.reason = EXIT_NO_MODELS, "no loadable model"
            server.should_exit = True
            return
        try:
            info = on_ready()
        except OSError as exc:
            log.error("cannot write the connection file %s: %s", args.connection_file, exc)
            life.code, life.reason = 1, "connection file not written"
            server.should_exit = True
            return
        log.info("ready: serving %s at http://%s:%d%s%s", ", ".join(info["models"]), host, port,
                 f"; still loading {', '.join(info['loading'])}" if info["loading"] else "",
                 f"; connection file {args.connection_file}" if args.connection_file else "")
        rt.touch()  # the idle clock starts when clients can connect
        announced = not info["loading"]
        while not server.should_exit:
            time.sleep(0.25)
            if not announced and loading_done():
                announced = True
                with contextlib.suppress(OSError):
                    info = on_ready()
                log.info("all models loaded: serving %s%s", ", ".join(info["models"]),
                         f"; failed: {', '.join(info['failed'])}" if info["failed"] else "")
            idle = rt.idle_seconds()
            if args.idle_timeout and idle >= args.idle_timeout:
                log.info("no request for %.0f s (idle timeout): shutting down", idle)
                life.reason = "idle timeout"
                rt.shutting_down.set()
                server.should_exit = True
        if life.reason and life.reason.startswith("SIG"):
            log.info("received %s: shutting down (requests in flight get 503)", life.reason)

    # uvicorn re-raises the signal it caught once it has shut down, under the handlers it found at start:
    # make those harmless so we still remove the connection file and exit with our own code.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    threading.Thread(target=watch, name="hpcseg-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if life.written is not None:
            remove_connection_file(life.written, token)
        sock.close()
        log.info("stopped (%s), exit code %d", life.reason or "server ended", life.code)
    busy = [t for t in threading.enumerate() if t.name == "hpcseg-gpu" and t.is_alive()]
    if busy:  # a model still computing for a request nobody waits for: do not wait for it
        logging.shutdown()
        os._exit(life.code)
    return life.code


if __name__ == "__main__":
    sys.exit(main())
