"""The one seam between hpcseg and a machine: run a command, copy a file, open a channel.

Everything that touches a machine goes through a :class:`Shell`. :class:`LocalShell` runs on this machine
(the ``local`` backend); :class:`hpcseg.ssh.SSHShell` runs on a login node over one SSH connection.
Schedulers, templates and jobs never know which one they hold.

Example::

    shell = LocalShell()
    res = shell.run(["echo", "hello world"])
    assert res.ok and res.stdout == "hello world\\n"
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import CommandFailed, TransferFailed

Argv = Sequence[str]


def join(argv: Argv | str) -> str:
    """A command line from argv, every word shell-quoted (a str is taken as already a command line)."""
    return argv if isinstance(argv, str) else shlex.join(list(argv))


@dataclass
class Result:
    """What a finished command left: its exit code and output (decoded as UTF-8, errors replaced)."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self, hint: str | None = None) -> Result:
        """Raise :class:`CommandFailed` (command, code, stderr tail) unless the command succeeded."""
        if self.exit_code != 0:
            raise CommandFailed(self.command, self.exit_code, self.stderr, hint=hint)
        return self


@runtime_checkable
class Shell(Protocol):
    """A machine hpcseg can run commands on and copy files to."""

    #: a short name for messages, e.g. ``local`` or ``hpcuser@login1``
    name: str

    def run(self, argv: Argv | str, *, stdin: str | bytes | None = None, timeout: float | None = 60,
            env: dict[str, str] | None = None, check: bool = False) -> Result:
        """Run a command (argv is quoted word by word; a str is a shell command line) and wait for it."""
        ...

    def put(self, local: str | os.PathLike, remote: str, *, mode: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> None:
        """Copy a local file to ``remote`` (which may start with ``~/``), via a temp name then rename."""
        ...

    def get(self, remote: str, local: str | os.PathLike) -> None:
        """Copy ``remote`` to a local path (written to a temp name, then renamed)."""
        ...

    def read_text(self, remote: str) -> str | None:
        """The text of a remote file, or None if it does not exist."""
        ...

    def write_text(self, remote: str, text: str, *, mode: int = 0o644) -> None:
        """Write a remote file atomically (temp name in the same folder, then rename)."""
        ...

    def home(self) -> str:
        """The absolute home directory on that machine (SFTP and scp do not expand ``~``)."""
        ...

    def close(self) -> None:
        ...


class LocalShell:
    """Runs commands on this machine with subprocess (never ``shell=True`` for argv)."""

    name = "local"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = env

    def run(self, argv: Argv | str, *, stdin: str | bytes | None = None, timeout: float | None = 60,
            env: dict[str, str] | None = None, check: bool = False) -> Result:
        cmd = ["bash", "-c", argv] if isinstance(argv, str) else list(argv)
        full_env = None
        if env or self._env:
            full_env = {**os.environ, **(self._env or {}), **(env or {})}
        data = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout, env=full_env,
                                  stdin=None if data is not None else subprocess.DEVNULL)
        except FileNotFoundError as exc:
            res = Result(join(argv), 127, "", f"{cmd[0]}: command not found ({exc})")
        except subprocess.TimeoutExpired as exc:
            res = Result(join(argv), 124, (exc.stdout or b"").decode(errors="replace"),
                         f"timed out after {timeout} s")
        else:
            res = Result(join(argv), proc.returncode, proc.stdout.decode(errors="replace"),
                         proc.stderr.decode(errors="replace"))
        return res.check() if check else res

    def _path(self, remote: str) -> Path:
        return Path(os.path.expanduser(remote))

    def put(self, local: str | os.PathLike, remote: str, *, mode: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> None:
        _atomic_copy(Path(local), self._path(remote), mode=mode, progress=progress)

    def get(self, remote: str, local: str | os.PathLike) -> None:
        _atomic_copy(self._path(remote), Path(local))

    def read_text(self, remote: str) -> str | None:
        try:
            return self._path(remote).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def write_text(self, remote: str, text: str, *, mode: int = 0o644) -> None:
        dest = self._path(remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def home(self) -> str:
        return os.path.expanduser("~")

    def close(self) -> None:
        pass


def _atomic_copy(src: Path, dest: Path, *, mode: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Copy to a temp name beside ``dest``, then rename: no reader ever sees a partial file."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            if progress:
                size = os.path.getsize(tmp)
                progress(size, size)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise TransferFailed(f"cannot copy {src} to {dest}: {exc}") from exc
