"""SSHShell against a REAL two-factor sshd: publickey, then keyboard-interactive answered through real PAM.

The test cluster's login node runs a second OpenSSH sshd on `cluster.mfa_port` (tests/cluster/up.sh) with
``AuthenticationMethods publickey,keyboard-interactive``, ``UsePAM yes`` and a PAM service of its own whose
pam_exec check accepts only the code in a root-only file (`cluster.one_time_code()`). These tests prove that a
person types the code once per SSHShell (commands, scp and tunnel channels ride that one login), that a wrong code
or no person at the terminal ends in one clear line within a bounded time, and the same through the real
``hpcseg`` command under a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time

import pytest

from hpcseg.errors import AuthenticationFailed
from hpcseg.ssh import CODE_TRIES, SSHShell
from hpcseg.tunnel import Tunnel

pytestmark = pytest.mark.cluster


class Person:
    """A person at the terminal, as SSHShell's keyboard-interactive prompt callback: counts what was asked."""

    def __init__(self, answer: str, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.asked: list[tuple[str, str, list[tuple[str, bool]]]] = []  # rounds that really asked something
        self.rounds = 0  # every info request, with or without prompts (sshd sends an empty one after PAM)
        self.threads: set[str] = set()

    def __call__(self, title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        self.rounds += 1
        self.threads.add(threading.current_thread().name)
        if not prompts:
            return []
        self.asked.append((title, instructions, prompts))
        time.sleep(self.delay)
        return [self.answer for _ in prompts]


def mfa_shell(cluster, person=None, **kw) -> SSHShell:
    args = dict(user=cluster.user, port=cluster.mfa_port, identity_file=cluster.key_path,
                known_hosts=[cluster.known_hosts], interactive=True, connect_timeout=5, prompt=person)
    args.update(kw)
    return SSHShell(cluster.host, **args)


@pytest.fixture(scope="module")
def mfa(cluster):
    assert cluster.mfa_port, "cluster.json has no mfa_port: tests/cluster/up.sh did not start the MFA sshd"
    return cluster


def test_the_server_really_wants_key_and_code(mfa):
    """The real OpenSSH client: the key alone is refused on the MFA port (and accepted on the plain one)."""
    argv = mfa.ssh_argv("true")  # BatchMode=yes: no one to type a code
    assert subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30).returncode == 0
    argv[argv.index("-p") + 1] = str(mfa.mfa_port)
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert res.returncode == 255 and "Permission denied" in res.stderr
    assert "keyboard-interactive" in res.stderr


def test_code_asked_once_for_commands_scp_and_tunnel(mfa, tmp_path):
    person = Person(mfa.one_time_code())
    sh = mfa_shell(mfa, person)
    try:
        assert sh.run(["whoami"]).stdout.strip() == mfa.user
        first = sh.transport
        assert sh.run('printf %s "$SLURM_CONF"').stdout == mfa.slurm_conf
        assert sh.run(["cat"], stdin="piped\n").stdout == "piped\n"
        src = tmp_path / "up.bin"
        src.write_bytes(os.urandom(300_000))
        sh.put(src, "~/hpcseg-mfa-test/up.bin")
        back = tmp_path / "back.bin"
        sh.get("~/hpcseg-mfa-test/up.bin", back)
        assert back.read_bytes() == src.read_bytes()
        sh.write_text("~/hpcseg-mfa-test/note.txt", "x")
        assert sh.read_text("~/hpcseg-mfa-test/note.txt") == "x"
        # a tunnel (local port -> direct-tcpip channel -> login1:22): two connections through it
        with Tunnel(sh, mfa.login_node, 22) as port:
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    assert s.recv(64).startswith(b"SSH-2.0-OpenSSH")
        sh.run(["rm", "-rf", sh.abspath("~/hpcseg-mfa-test")], check=True)
        assert sh.transport is first  # one login carried everything
    finally:
        sh.close()
    assert len(person.asked) == 1, person.asked
    title, instructions, prompts = person.asked[0]
    assert len(prompts) == 1 and prompts[0][1] is False  # one hidden answer
    # the site's own text (PAM info message) reaches the person; sshd puts it in front of the prompt
    assert "one-time code" in (title + instructions + prompts[0][0])


def test_a_slow_person_is_not_timed_out(mfa):
    """Typing a code takes longer than a connect timeout: only the server's own time is bounded."""
    person = Person(mfa.one_time_code(), delay=3.5)
    sh = mfa_shell(mfa, person, connect_timeout=2)
    try:
        assert sh.run(["true"]).ok
    finally:
        sh.close()
    assert len(person.asked) == 1


def test_wrong_code_is_one_clear_line(mfa):
    code = mfa.one_time_code()
    person = Person(str((int(code) + 1) % 1_000_000).zfill(len(code)))
    sh = mfa_shell(mfa, person)
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed) as err:
        sh.run(["true"])
    elapsed = time.monotonic() - t0
    assert elapsed < 20, elapsed
    assert "one-time code" in err.value.message and "\n" not in err.value.message
    assert len(person.asked) == CODE_TRIES  # like OpenSSH's NumberOfPasswordPrompts: a typo can be typed again
    assert f"{CODE_TRIES} tries" in err.value.message


def test_wrong_key_never_asks_for_the_code(mfa):
    person = Person(mfa.one_time_code())
    sh = mfa_shell(mfa, person, identity_file=mfa.wrong_key_path)
    with pytest.raises(AuthenticationFailed) as err:
        sh.run(["true"])
    assert "accepted none of our keys" in err.value.message
    assert person.asked == []


def test_no_person_at_the_terminal_is_told_what_to_do(mfa):
    sh = mfa_shell(mfa, None, interactive=False)
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed) as err:
        sh.run(["true"])
    assert time.monotonic() - t0 < 10
    msg = err.value.message
    assert "one-time code" in msg and "\n" not in msg and "accepted none of our keys" not in msg
    assert err.value.hint and "terminal" in err.value.hint


# ---- the real `hpcseg` command ------------------------------------------------------------------------------
@pytest.fixture
def mfa_profile(mfa, tmp_path):
    """A config file with profile `mfa` on the MFA port; returns the environment that uses it."""
    env = {**os.environ, "HPCSEG_PROFILE": "mfa", "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    init = ["config", "init", "--host", mfa.host, "--scheduler", "slurm", "--set", f"port={mfa.mfa_port}",
            "--set", f"user={mfa.user}", "--set", f"identity_file={mfa.key_path}",
            "--set", f"known_hosts={mfa.known_hosts}", "--set", f"partition={mfa.partition}",
            "--set", f"python={mfa.python}", "--set", "device=cpu"]
    res = subprocess.run([sys.executable, "-m", "hpcseg", *init], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return env


def run_in_pty(argv: list[str], env: dict, answer: str | None, timeout: float = 90,
               interrupt: bool = False) -> tuple[int, str, list[int]]:
    """Run argv with a pseudo-terminal as its controlling terminal, answering each code prompt with `answer`
    (or Ctrl-C when `interrupt`). Returns (exit status, everything written to the terminal, the terminal's lflag
    after each answer and at the end)."""
    pid, fd = pty.fork()
    if pid == 0:  # child: a session leader with the pty as its controlling terminal
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    out = b""
    seen = 0
    lflags: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if out.count(b"Password:") > seen:
                    seen = out.count(b"Password:")
                    time.sleep(0.3)  # let getpass switch echo off first, as a person would be slower anyway
                    lflags.append(termios.tcgetattr(fd)[3])
                    os.write(fd, b"\x03" if interrupt else answer.encode() + b"\n")
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"{argv} still running after {timeout} s; terminal so far:\n{out.decode()}")
        _, status = os.waitpid(pid, 0)
        lflags.append(termios.tcgetattr(fd)[3])
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace"), lflags


def test_cli_at_a_terminal_asks_once(mfa, mfa_profile):
    """`hpcseg config check` (several commands on the login node) under a pty: one prompt, code not echoed."""
    code = mfa.one_time_code()
    rc, out, lflags = run_in_pty([sys.executable, "-m", "hpcseg", "config", "check"], mfa_profile, code)
    assert out.count("Password:") == 1, out
    assert "one-time code" in out
    assert code not in out  # typed without echo
    assert not lflags[0] & termios.ECHO and lflags[-1] & termios.ECHO
    assert rc == 0, out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert re.search(r"^ok +connect: ", plain, re.M) and "FIX" not in plain, plain


def test_cli_interrupted_at_the_prompt_restores_the_terminal(mfa, mfa_profile):
    rc, out, lflags = run_in_pty([sys.executable, "-m", "hpcseg", "config", "check"], mfa_profile, None,
                                 interrupt=True, timeout=30)
    assert rc == 130 and "interrupted" in out, out
    assert lflags[-1] & termios.ECHO, f"echo left off after Ctrl-C at the prompt:\n{out}"


def test_cli_without_a_terminal_says_a_code_is_needed(mfa, mfa_profile):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "hpcseg", "config", "check"], env=mfa_profile,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert res.returncode == 1
    assert "one-time code" in res.stdout + res.stderr, res.stdout + res.stderr
