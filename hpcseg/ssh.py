"""SSHShell: one verified, authenticated SSH connection per profile that carries everything.

Commands, file transfer (scp) and tunnels (direct-tcpip channels, see :mod:`hpcseg.tunnel`) all ride one paramiko
``Transport``, opened lazily on first use, so a person types a one-time code at most once per session.

What it does on purpose:

- honours ``~/.ssh/config`` (HostName, User, Port, IdentityFile, ProxyJump) through :class:`paramiko.SSHConfig`;
- verifies the host key against ``~/.ssh/known_hosts``, hpcseg's own file (hosts trusted with ``hpcseg trust``) and
  the profile's ``known_hosts``: an unknown key is refused with its SHA256 fingerprint and the command that trusts
  it, a changed key is refused loudly (never paramiko's AutoAddPolicy);
- sets TCP_NODELAY (paramiko never does: without it every request/response waits ~40 ms for Nagle) and prefers
  AES-GCM (about twice paramiko's default aes128-ctr throughput; see shared notes on transport figures);
- auth: agent keys, identity files (passphrase asked at a terminal), then keyboard-interactive for one-time codes
  when a person is at the terminal (also after a key was accepted with "partial success", as MFA sites do). The
  prompts are answered in the calling thread (paramiko asks from its own thread: there Ctrl-C would leave the
  terminal without echo), a mistyped code may be typed again (3 tries, like OpenSSH), and the time a person takes
  to type is not limited (sshd's LoginGraceTime is); with no one at the terminal the server's wish for a code is
  one clear error, never a wait;
- knows when the connection is dead: every ``keepalive`` seconds a global request that wants a reply
  (``keepalive@openssh.com``, which sshd answers) goes out; no answer within ``keepalive`` seconds more means the
  connection is dead even though no reset came (a laptop changing Wi-Fi, a NAT that forgot the mapping, a silent
  firewall): the connection is closed, which ends every channel on it at once (a request in flight through the
  tunnel fails fast instead of waiting out its read timeout), and the next use logs in again with the same
  credentials (a one-time code is asked again only when a person is at the terminal). Opening a channel is bounded
  too; one that times out checks the connection the same way and, if it is dead, is tried once more on a new one;
- every connect, auth and command has a bounded time (the server's part of it).

Example::

    with SSHShell(profile) as sh:
        print(sh.run(["hostname"]).check().stdout)
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import posixpath
import queue
import select
import shlex
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
import platformdirs

from .errors import AuthenticationFailed, ChangedHostKey, ConnectionFailed, HostKeyError, TransferFailed, UnknownHostKey
from .shell import Argv, Result, join

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
KEEPALIVE = 15.0  # seconds between liveness probes, and the most a probe waits for its answer
RECONNECT_FOR = 15.0  # seconds a re-login after a drop keeps trying a refused or timed-out connect
RELOGIN_BACKOFF = 10.0  # seconds after a re-login failed for good during which a new one fails at once, same error
KEEPALIVE_REQUEST = "keepalive@openssh.com"  # OpenSSH's own; any server answers an unknown one with a failure
CODE_TRIES = 3  # keyboard-interactive rounds a person gets for a one-time code (OpenSSH's NumberOfPasswordPrompts)
_GCM_FIRST = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr", "aes192-ctr")


def hpcseg_known_hosts() -> Path:
    """hpcseg's own known_hosts file (hosts trusted through ``hpcseg trust``)."""
    env = os.environ.get("HPCSEG_KNOWN_HOSTS")
    return Path(env) if env else Path(platformdirs.user_config_dir("hpcseg")) / "known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:…`` fingerprint of a public key (as ``ssh-keygen -lf`` prints it)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


@dataclass
class Target:
    """Where to connect, after ~/.ssh/config and the profile are merged (profile wins)."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[str]
    proxy_jump: str | None


def resolve_target(host: str, *, user: str | None = None, port: int | None = None,
                   identity_file: str | None = None, proxy_jump: str | None = None,
                   ssh_config: Path | None = None) -> Target:
    """Merge a host (maybe an alias) with ~/.ssh/config; explicit profile values win."""
    cfg = paramiko.SSHConfig()
    path = ssh_config or Path(os.environ.get("HPCSEG_SSH_CONFIG", "~/.ssh/config")).expanduser()
    if path.exists():
        cfg = paramiko.SSHConfig.from_path(str(path))
    entry = cfg.lookup(host)
    ids = [identity_file] if identity_file else list(entry.get("identityfile", []))
    jump = proxy_jump or entry.get("proxyjump")
    if jump and jump.lower() == "none":
        jump = None
    return Target(alias=host, hostname=entry.get("hostname", host), port=int(port or entry.get("port", 22)),
                  user=user or entry.get("user") or getpass.getuser(),
                  identity_files=[os.path.expanduser(p) for p in ids], proxy_jump=jump)


def _tty_prompt(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
    """keyboard-interactive handler for a person at a terminal (one-time codes)."""
    if title:
        print(title, file=sys.stderr)
    if instructions:
        print(instructions, file=sys.stderr)
    return [getpass.getpass(p) if not echo else input(p) for p, echo in prompts]


class SSHShell:
    """A :class:`~hpcseg.shell.Shell` on a remote login node, over one lazily opened connection.

    ``prompt(title, instructions, [(prompt, echo), ...]) -> [answer, ...]`` answers keyboard-interactive questions
    (one-time codes); default: ask at the terminal. ``interactive`` (default: a ``prompt`` was given, or stdin is
    a terminal) says whether anyone may be asked at all; if not, a server that wants a code is a clear error.
    """

    def __init__(self, host: str, *, user: str | None = None, port: int | None = None,
                 identity_file: str | None = None, proxy_jump: str | None = None,
                 known_hosts: list[str | os.PathLike] | None = None, interactive: bool | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, keepalive: float | None = None,
                 prompt: Callable[[str, str, list[tuple[str, bool]]], list[str]] | None = None) -> None:
        self.target = resolve_target(host, user=user, port=port, identity_file=identity_file,
                                     proxy_jump=proxy_jump)
        self.name = f"{self.target.user}@{self.target.alias}"
        self._known_hosts = [Path("~/.ssh/known_hosts").expanduser(), hpcseg_known_hosts(),
                             *(Path(p).expanduser() for p in known_hosts or [])]
        if interactive is None:  # a prompt callback given is someone to ask; else a person at this terminal
            interactive = prompt is not None or sys.stdin.isatty()
        self._interactive = interactive
        self._timeout = connect_timeout
        if keepalive is None:
            keepalive = float(os.environ.get("HPCSEG_SSH_KEEPALIVE") or KEEPALIVE)
        self._keepalive = keepalive
        self.logins = 0  # connections opened (a re-login after a drop counts again): for tests and the soak bench
        self.drops = 0  # connections found dead (no keepalive answer, a reset, a channel open that timed out)
        self._relogin_failed: tuple[float, ConnectionFailed] | None = None  # when and why the last re-login failed
        self._prompt = prompt or _tty_prompt
        self._transport: paramiko.Transport | None = None
        self._jump: SSHShell | None = None
        self._lock = threading.RLock()
        self._home: str | None = None
        self._passphrases: dict[str, str] = {}
        #: how the login succeeded (key, agent, one-time code): for hpcseg doctor
        self.login_method = ""

    @classmethod
    def from_profile(cls, profile, **kw) -> SSHShell:
        return cls(profile.host, user=profile.user, port=profile.port, identity_file=profile.identity_file,
                   proxy_jump=profile.proxy_jump, known_hosts=[profile.known_hosts] if profile.known_hosts else None,
                   **kw)

    # -- connection ---------------------------------------------------------------------------------------------
    @property
    def transport(self) -> paramiko.Transport:
        """The live transport, connecting (or reconnecting after a drop, with the same credentials) if needed."""
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                if self._transport is not None:
                    self.drops += 1
                    log.warning("SSH connection to %s lost; logging in again", self.name)
                    self._transport.close()
                    self._transport = None
                self._transport = self._reconnect() if self.logins else self._connect()
                self.logins += 1
                watchdog = threading.Thread(target=self._watch, args=(self._transport,), daemon=True,
                                            name=f"ssh-keepalive-{self.name}")
                watchdog.start()
            return self._transport

    def _reconnect(self) -> paramiko.Transport:
        """Log in again after a drop: a refused or timed-out connect (sshd restarting, the network coming back)
        is tried again for up to ``RECONNECT_FOR`` seconds; a refused key or host key is not."""
        # The network is gone (each try waits out a connect timeout): every request and channel would wait as long
        # again; for RELOGIN_BACKOFF seconds after a re-login failed for good, fail at once with the same error.
        if self._relogin_failed is not None and time.monotonic() - self._relogin_failed[0] < RELOGIN_BACKOFF:
            raise self._relogin_failed[1]
        self._relogin_failed = None
        deadline = time.monotonic() + RECONNECT_FOR
        delay = 0.25
        while True:
            try:
                return self._connect()
            except (HostKeyError, AuthenticationFailed):
                raise
            except ConnectionFailed as exc:
                if not exc.retryable or time.monotonic() + delay > deadline:
                    self._relogin_failed = (time.monotonic(), exc)
                    raise
                log.info("logging in to %s again failed (%s); trying again in %.2f s", self.name, exc.message, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def alive(self, timeout: float | None = None) -> bool:
        """Whether the connection answers a global request within ``timeout`` (default: the keepalive interval)."""
        with self._lock:
            transport = self._transport
        return transport is not None and _answers(transport, self._keepalive if timeout is None else timeout)

    def drop(self, transport: paramiko.Transport | None = None, why: str = "") -> None:
        """Close the connection (``transport`` if given and still the current one): every channel on it ends now,
        the next use logs in again."""
        with self._lock:
            if self._transport is None or (transport is not None and transport is not self._transport):
                return
            dead, self._transport = self._transport, None
            self.drops += 1
        log.warning("SSH connection to %s lost%s; closing it (the next request logs in again)", self.name,
                    f" ({why})" if why else "")
        dead.close()

    def _watch(self, transport: paramiko.Transport) -> None:
        """Keepalive that expects an answer: the connection's watchdog thread, until it is closed or dead."""
        interval = self._keepalive
        if interval <= 0:
            return
        while transport.is_active():
            time.sleep(interval)
            if not transport.is_active():
                return
            if not _answers(transport, interval):
                self.drop(transport, f"no answer to a keepalive within {interval:g} s")
                return

    def _open_socket(self) -> socket.socket | paramiko.Channel:
        t = self.target
        if t.proxy_jump:
            first = t.proxy_jump.split(",")[0]
            jhost, _, jport = first.rpartition(":") if first.count(":") == 1 else (first, "", "")
            juser, _, jhost = jhost.rpartition("@")
            self._jump = SSHShell(jhost, user=juser or None, port=int(jport) if jport else None,
                                  proxy_jump=",".join(t.proxy_jump.split(",")[1:]) or "none",
                                  known_hosts=self._known_hosts[2:], interactive=self._interactive,
                                  connect_timeout=self._timeout, prompt=self._prompt)
            try:
                return self._jump.transport.open_channel("direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0),
                                                         timeout=self._timeout)
            except paramiko.SSHException as exc:
                raise ConnectionFailed(f"cannot reach {t.hostname}:{t.port} through jump host {jhost}: {exc}") from exc
        try:
            sock = socket.create_connection((t.hostname, t.port), timeout=self._timeout)
        except socket.gaierror as exc:
            raise ConnectionFailed(f"cannot resolve {t.hostname!r} (profile host {t.alias!r}): {exc.strerror}",
                                   hint="check the host name, or the HostName of that alias in ~/.ssh/config",
                                   retryable=False) from exc
        except OSError as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise ConnectionFailed(f"cannot connect to {t.hostname}:{t.port}: {why}",
                                   hint="is the login node up, and are you on the right network or VPN?") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect(self) -> paramiko.Transport:
        t = self.target
        sock = self._open_socket()
        transport = paramiko.Transport(sock)
        opts = transport.get_security_options()
        opts.ciphers = tuple(c for c in _GCM_FIRST if c in opts.ciphers) + tuple(
            c for c in opts.ciphers if c not in _GCM_FIRST)
        transport.banner_timeout = self._timeout
        transport.auth_timeout = self._timeout
        try:
            transport.start_client(timeout=self._timeout)
            self._verify_host_key(transport)
            self._authenticate(transport)
        except paramiko.SSHException as exc:
            transport.close()
            raise ConnectionFailed(f"SSH handshake with {t.hostname}:{t.port} failed: {exc}") from exc
        except BaseException:
            transport.close()
            raise
        return transport

    def _verify_host_key(self, transport: paramiko.Transport) -> None:
        t = self.target
        key = transport.get_remote_server_key()
        names = {known_hosts_name(t.hostname, t.port), known_hosts_name(t.alias, t.port)}
        fp = fingerprint(key)
        seen_other: tuple[Path, str] | None = None
        for path in self._known_hosts:
            if not path.exists():
                continue
            try:
                hk = paramiko.HostKeys(str(path))
            except (OSError, paramiko.SSHException) as exc:
                log.warning("cannot read known_hosts %s: %s", path, exc)
                continue
            for name in names:
                entry = hk.lookup(name)
                if not entry:
                    continue
                if key.get_name() in entry:
                    if entry[key.get_name()] == key:
                        return
                    seen_other = (path, fingerprint(entry[key.get_name()]))
        if seen_other:
            raise ChangedHostKey(
                f"WARNING: THE HOST KEY OF {t.hostname}:{t.port} HAS CHANGED. Someone could be intercepting the "
                f"connection, or the host was reinstalled. It now offers {key.get_name()} {fp}, but "
                f"{seen_other[0]} records {seen_other[1]}. Refusing to connect.",
                host=t.hostname, fingerprint=fp,
                hint=f"ask your cluster's admins for the real fingerprint; if it matches, remove the old entry "
                     f"(ssh-keygen -R {known_hosts_name(t.hostname, t.port)} -f {seen_other[0]}) and run "
                     f"hpcseg trust {t.alias}{_port_option(t)}")
        raise UnknownHostKey(
            f"the host key of {t.hostname}:{t.port} is not known: {key.get_name()} {fp}",
            host=t.hostname, fingerprint=fp,
            hint=f"check this fingerprint with your cluster's documentation, then run: hpcseg trust {t.alias}"
                 f"{_port_option(t)} --fingerprint {fp}")

    def _keys(self) -> list[paramiko.PKey]:
        keys: list[paramiko.PKey] = []
        try:
            keys.extend(paramiko.Agent().get_keys())
        except paramiko.SSHException:
            pass
        files = self.target.identity_files or [
            os.path.expanduser(f"~/.ssh/{n}") for n in ("id_ed25519", "id_ecdsa", "id_rsa")]
        for path in files:
            if not os.path.exists(path):
                continue
            try:
                keys.append(paramiko.PKey.from_path(path, self._passphrases.get(path)))
            except paramiko.PasswordRequiredException:
                if not self._interactive:
                    log.warning("key %s needs a passphrase and no one is at the terminal; skipped", path)
                    continue
                self._passphrases[path] = getpass.getpass(f"Passphrase for {path}: ")
                keys.append(paramiko.PKey.from_path(path, self._passphrases[path]))
            except (OSError, paramiko.SSHException, ValueError) as exc:
                log.warning("cannot load key %s: %s", path, exc)
        return keys

    def _authenticate(self, transport: paramiko.Transport) -> None:
        t = self.target
        user = t.user
        remaining: list[str] = []
        tried = []
        partial = False
        for key in self._keys():
            tried.append(key.get_name())
            try:
                remaining = transport.auth_publickey(user, key)
            except paramiko.AuthenticationException:
                continue
            except paramiko.SSHException as exc:
                raise ConnectionFailed(f"SSH authentication with {t.hostname} broke off: {exc}") from exc
            if transport.is_authenticated():
                self.login_method = f"key {key.get_name()}" + (" (agent)" if isinstance(key, paramiko.AgentKey) else "")
                return
            partial = True  # partial success: the server wants a second factor
            break
        wants_code = "keyboard-interactive" in remaining if partial else not tried
        if partial and not wants_code:
            raise AuthenticationFailed(
                f"{user}@{t.hostname}:{t.port} accepted our key but also wants {', '.join(remaining) or 'more'}, "
                f"which hpcseg cannot answer",
                hint="log in with plain ssh -v to see what the site asks for, and ask its admins for a key-based "
                     "or keyboard-interactive (one-time code) login")
        if partial and not self._interactive:
            raise AuthenticationFailed(
                f"{user}@{t.hostname}:{t.port} accepted our key but also wants a one-time code "
                f"(keyboard-interactive), and no one is at a terminal to type it",
                hint="run the command in a terminal (stdin must be one): hpcseg asks for the code once and keeps "
                     "that one login for the whole command; scripts, cron jobs and pipes cannot answer it, so ask "
                     "your site for a key-only login (many have a data-transfer or automation node)")
        if self._interactive and wants_code:
            for attempt in range(1, CODE_TRIES + 1):
                try:
                    self._auth_interactive(transport, user)
                except paramiko.BadAuthenticationType as exc:
                    raise AuthenticationFailed(
                        f"{user}@{t.hostname}:{t.port} does not offer keyboard-interactive login "
                        f"(it offers: {', '.join(exc.allowed_types) or 'nothing'})") from exc
                except paramiko.AuthenticationException as exc:
                    if attempt == CODE_TRIES or not transport.is_active():
                        raise AuthenticationFailed(
                            f"{user}@{t.hostname}:{t.port} refused the one-time code "
                            f"({attempt} {'try' if attempt == 1 else 'tries'}: {exc})",
                            hint="check the code (a fresh one from your authenticator; is its clock right?) and "
                                 "run the command again") from exc
                    log.warning("%s@%s did not accept that code; try again (%d of %d)", user, t.hostname,
                                attempt + 1, CODE_TRIES)
                    continue
                if transport.is_authenticated():
                    self.login_method = "key + one-time code" if partial else "one-time code"
                    return
        raise AuthenticationFailed(
            f"{user}@{t.hostname}:{t.port} accepted none of our keys "
            f"({len(tried)} tried{': ' + ', '.join(tried) if tried else ''})",
            hint="add your key to the agent (ssh-add), set identity_file in the profile or IdentityFile in "
                 "~/.ssh/config, and check you can log in with plain ssh")

    def _auth_interactive(self, transport: paramiko.Transport, user: str) -> None:
        """One keyboard-interactive round trip, the prompts answered in this thread.

        paramiko calls its handler from the transport's thread; a getpass there cannot see Ctrl-C (which reaches
        the main thread) and would leave the terminal without echo. So the handler hands each question over to
        this thread and waits for the answer. paramiko's own auth timeout is off meanwhile: how long a person takes
        to type is not bounded here (sshd's LoginGraceTime bounds it), the server's silence between answers is
        (connect_timeout).
        """
        asks: queue.Queue = queue.Queue()

        def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
            if not prompts and not title.strip() and not instructions.strip():
                return []  # sshd's empty round after PAM said yes: nothing to show or answer
            reply: queue.Queue = queue.Queue(maxsize=1)
            asks.put((title, instructions, prompts, reply))
            answers = reply.get()
            if answers is None:
                raise paramiko.SSHException("the prompt was cancelled")
            return answers

        outcome: list[BaseException | None] = []

        def authenticate() -> None:
            try:
                transport.auth_interactive(user, handler)
                outcome.append(None)
            except BaseException as exc:  # handed to the caller's thread below
                outcome.append(exc)
            finally:
                asks.put(None)

        saved_timeout = transport.auth_timeout
        transport.auth_timeout = None
        worker = threading.Thread(target=authenticate, name=f"ssh-auth-{self.name}", daemon=True)
        try:
            worker.start()
            deadline = time.monotonic() + self._timeout
            while True:
                try:
                    item = asks.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    transport.close()
                    raise ConnectionFailed(f"{self.target.hostname}:{self.target.port} stopped answering during "
                                           f"the one-time code login (no reply within {self._timeout:.0f} s)") from None
                if item is None:
                    break
                title, instructions, prompts, reply = item
                try:
                    answers = list(self._prompt(title, instructions, prompts))
                except EOFError:
                    reply.put(None)
                    raise AuthenticationFailed(
                        f"{self.target.hostname}:{self.target.port} asked for a one-time code and the terminal "
                        f"closed (end of input) before one was typed") from None
                except BaseException:
                    reply.put(None)
                    raise
                reply.put(answers)
                deadline = time.monotonic() + self._timeout
        finally:
            transport.auth_timeout = saved_timeout
        worker.join(self._timeout)
        if outcome and outcome[0] is not None:
            raise outcome[0]

    # -- Shell ----------------------------------------------------------------------------------------------------
    def run(self, argv: Argv | str, *, stdin: str | bytes | None = None, timeout: float | None = 60,
            env: dict[str, str] | None = None, check: bool = False) -> Result:
        command = join(argv)
        if env:
            command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command
        chan = self._open(lambda t: t.open_session(timeout=self._timeout), "a session")
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
            chan.shutdown_write()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    res = Result(command, 124, out.decode(errors="replace"), f"timed out after {timeout} s")
                    return res.check() if check else res
                select.select([chan], [], [], min(left, 1.0) if left is not None else 1.0)
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if chan.closed and not chan.recv_ready():
                    break
            transport = chan.get_transport()
            if chan.recv_exit_status() == -1 and (transport is None or not transport.is_active()):
                raise ConnectionFailed(f"SSH connection to the login node {self.name} lost during `{command}`",
                                       hint="run the command again (hpcseg logs in again)")
            code = chan.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionFailed(f"SSH connection to the login node {self.name} lost during `{command}`: "
                                   f"{str(exc) or type(exc).__name__}",
                                   hint="run the command again (hpcseg logs in again)") from exc
        finally:
            chan.close()
        res = Result(command, code, out.decode(errors="replace"), err.decode(errors="replace"))
        return res.check() if check else res

    def home(self) -> str:
        if self._home is None:
            self._home = self.run("printf %s \"$HOME\"", check=True).stdout.strip()
        return self._home

    def abspath(self, remote: str) -> str:
        """Expand a leading ``~`` (scp and SFTP do not)."""
        if remote == "~" or remote.startswith("~/"):
            return self.home() + remote[1:]
        return remote

    def put(self, local: str | os.PathLike, remote: str, *, mode: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> None:
        """Copy a file with scp to a temp name beside ``remote``, then rename: no partial file is ever visible."""
        from scp import SCPClient, SCPException

        dest = self.abspath(remote)
        tmp = posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.{os.getpid()}.part")
        cb = (lambda _f, size, sent: progress(sent, size)) if progress else None
        try:
            self.run(["mkdir", "-p", posixpath.dirname(dest)], check=True)
            with SCPClient(self.transport, progress=cb, socket_timeout=60) as scp:
                scp.put(os.fspath(local), tmp)
            finish = shlex.join(["mv", "-f", tmp, dest])
            if mode is not None:
                finish = shlex.join(["chmod", f"{mode:o}", tmp]) + " && " + finish
            self.run(finish, check=True)
        except (SCPException, paramiko.SSHException, OSError) as exc:
            self.run(["rm", "-f", tmp])
            raise TransferFailed(f"copying {local} to {self.name}:{dest} failed: {exc}") from exc

    def get(self, remote: str, local: str | os.PathLike,
            progress: Callable[[int, int], None] | None = None) -> None:
        from scp import SCPClient, SCPException

        dest = Path(local)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        cb = (lambda _f, size, sent: progress(sent, size)) if progress else None
        try:
            with SCPClient(self.transport, progress=cb, socket_timeout=60) as scp:
                scp.get(self.abspath(remote), os.fspath(tmp))
            os.replace(tmp, dest)
        except (SCPException, paramiko.SSHException, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise TransferFailed(f"copying {self.name}:{remote} to {local} failed: {exc}") from exc

    def read_text(self, remote: str) -> str | None:
        path = shlex.quote(self.abspath(remote))
        res = self.run(f"if [ -e {path} ]; then cat -- {path}; else exit 44; fi")
        if res.exit_code == 44:
            return None
        return res.check().stdout

    def write_text(self, remote: str, text: str, *, mode: int = 0o644) -> None:
        dest = self.abspath(remote)
        tmp = posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.{os.getpid()}.part")
        q = shlex.quote
        script = (f"umask 077 && mkdir -p {q(posixpath.dirname(dest))} && cat > {q(tmp)} && chmod {mode:o} {q(tmp)}"
                  f" && mv -f {q(tmp)} {q(dest)} || {{ rc=$?; rm -f {q(tmp)}; exit $rc; }}")
        self.run(script, stdin=text, check=True)

    def open_channel(self, host: str, port: int, timeout: float | None = None) -> paramiko.Channel:
        """A direct-tcpip channel from the login node to ``host:port`` (no login on that host needed)."""
        try:
            return self._open(lambda t: t.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                       timeout=timeout or self._timeout), f"a channel to {host}:{port}")
        except ServerRefused as exc:
            raise ConnectionFailed(f"the login node {self.name} cannot open a connection to {host}:{port}: "
                                   f"{exc.args[0]}",
                                   hint="is the server job still running? (hpcseg status)") from exc

    def _open(self, opener: Callable[[paramiko.Transport], paramiko.Channel], what: str) -> paramiko.Channel:
        """Open a channel with a bounded wait; a dead connection is closed and the open tried once on a new one.

        An explicit refusal from the server (``ChannelException``: nothing listens there, forwarding forbidden)
        raises :class:`ServerRefused`; a connection lost or dead raises ConnectionFailed after the second try.
        """
        for attempt in (1, 2):
            transport = self.transport
            try:
                return opener(transport)
            except paramiko.ChannelException as exc:
                raise ServerRefused(exc.text or f"refused (code {exc.code})") from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                why = str(exc) or type(exc).__name__
                if transport.is_active() and _answers(transport, min(self._keepalive or self._timeout, 5.0)):
                    raise ConnectionFailed(f"cannot open {what} on {self.name}: {why}") from exc
                self.drop(transport, f"opening {what}: {why}")
                if attempt == 2:
                    raise ConnectionFailed(f"SSH connection to the login node {self.name} lost: {why}",
                                           hint="check your network (VPN, Wi-Fi) and run the command again") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            if self._jump is not None:
                self._jump.close()
                self._jump = None

    def __enter__(self) -> SSHShell:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ServerRefused(Exception):
    """The SSH server refused a channel (nothing listens at the target, or forwarding is not allowed)."""


def _answers(transport: paramiko.Transport, timeout: float) -> bool:
    """Whether ``transport`` answers a global request with want_reply within ``timeout`` seconds.

    paramiko's ``global_request(wait=True)`` waits without a limit (until an answer or the transport's end), so it
    runs in a helper thread and the wait here is bounded; a probe left waiting ends when the transport is closed.
    Any answer counts (sshd answers an unknown request with a failure): it proves the other end reads and writes.
    Probes of one transport take turns (paramiko keeps one pending global request per transport): a caller that
    finds one under way waits for it within the same ``timeout``.
    """
    with _PROBE_LOCKS_GUARD:
        turn = _PROBE_LOCKS.setdefault(transport, threading.Lock())
    deadline = time.monotonic() + timeout
    if not turn.acquire(timeout=max(0.0, timeout)):
        return False
    answered = threading.Event()

    def ask() -> None:
        try:
            transport.global_request(KEEPALIVE_REQUEST, wait=True)
            if transport.is_active():
                answered.set()
        except Exception as exc:  # a transport that breaks meanwhile is simply not answering
            log.debug("keepalive probe failed: %s", exc)
        finally:
            turn.release()

    try:
        threading.Thread(target=ask, name="ssh-probe", daemon=True).start()
    except BaseException:
        turn.release()
        raise
    answered.wait(max(0.0, deadline - time.monotonic()))
    return answered.is_set()


_PROBE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE_LOCKS_GUARD = threading.Lock()


def _port_option(target: Target) -> str:
    """`` --port N`` for a hint's ``hpcseg trust`` when the port is not 22 (the hint must work as printed)."""
    return f" --port {target.port}" if target.port != 22 else ""


def fetch_host_key(host: str, port: int | None = None,
                   timeout: float = CONNECT_TIMEOUT) -> tuple[Target, paramiko.PKey]:
    """Connect without authenticating and return the host's key (for ``hpcseg trust``)."""
    target = resolve_target(host, port=port)
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
    except OSError as exc:
        raise ConnectionFailed(f"cannot connect to {target.hostname}:{target.port}: {exc}") from exc
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return target, transport.get_remote_server_key()
    except paramiko.SSHException as exc:
        raise ConnectionFailed(f"SSH handshake with {target.hostname}:{target.port} failed: {exc}") from exc
    finally:
        transport.close()


def trust_host_key(target: Target, key: paramiko.PKey, path: Path | None = None) -> Path:
    """Record a host key in hpcseg's known_hosts (atomically)."""
    path = path or hpcseg_known_hosts()
    path.parent.mkdir(parents=True, exist_ok=True)
    hk = paramiko.HostKeys()
    if path.exists():
        hk.load(str(path))
    hk.add(known_hosts_name(target.hostname, target.port), key.get_name(), key)
    tmp = path.with_name(path.name + ".part")
    hk.save(str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
