"""SSHShell against the real OpenSSH sshd of the test cluster: host keys, auth, commands, scp, config."""

from __future__ import annotations

import subprocess

import paramiko
import pytest

from hpcseg.errors import AuthenticationFailed, ChangedHostKey, CommandFailed, ConnectionFailed, UnknownHostKey
from hpcseg.ssh import SSHShell, fetch_host_key, fingerprint, trust_host_key

pytestmark = pytest.mark.cluster


def shell(cluster, **kw) -> SSHShell:
    args = dict(user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                known_hosts=[cluster.known_hosts], interactive=False, connect_timeout=5)
    args.update(kw)
    return SSHShell(cluster.host, **args)


def test_run_exit_codes_and_output(ssh_shell):
    res = ssh_shell.run(["printf", "%s|", "a b", "$(id)", "it's"])
    assert res.ok and res.stdout == "a b|$(id)|it's|"
    res = ssh_shell.run("echo oops >&2; exit 7")
    assert res.exit_code == 7 and res.stderr.strip() == "oops"
    with pytest.raises(CommandFailed) as err:
        res.check()
    assert "exited with 7" in str(err.value) and "oops" in str(err.value)
    assert ssh_shell.run(["cat"], stdin="piped\n").stdout == "piped\n"


def test_connection_is_tuned(ssh_shell):
    t = ssh_shell.transport
    import socket

    assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert "gcm" in t.local_cipher and "gcm" in t.remote_cipher
    first = t
    ssh_shell.run(["true"])
    assert ssh_shell.transport is first  # one connection carries everything


def test_files_round_trip_atomically(ssh_shell, tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(bytes(range(256)) * 4000)
    ssh_shell.put(src, "~/hpcseg-test/sub dir/data.bin")
    listing = ssh_shell.run(["ls", "-a", ssh_shell.abspath("~/hpcseg-test/sub dir")]).stdout.split()
    assert "data.bin" in listing and not any(n.endswith(".part") for n in listing)
    back = tmp_path / "back.bin"
    ssh_shell.get("~/hpcseg-test/sub dir/data.bin", back)
    assert back.read_bytes() == src.read_bytes()
    ssh_shell.write_text("~/hpcseg-test/secret.json", '{"x": 1}', mode=0o600)
    assert ssh_shell.read_text("~/hpcseg-test/secret.json") == '{"x": 1}'
    assert ssh_shell.run(["stat", "-c", "%a", ssh_shell.abspath("~/hpcseg-test/secret.json")]).stdout.strip() == "600"
    assert ssh_shell.read_text("~/hpcseg-test/absent") is None
    ssh_shell.run(["rm", "-rf", ssh_shell.abspath("~/hpcseg-test")], check=True)


def test_unknown_host_key_is_refused_with_fingerprint(cluster, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    sh = shell(cluster, known_hosts=[empty])
    with pytest.raises(UnknownHostKey) as err:
        sh.run(["true"])
    assert err.value.fingerprint == cluster.host_key_fingerprint
    assert cluster.host_key_fingerprint in str(err.value) and "hpcseg trust" in str(err.value)


def test_changed_host_key_is_refused_loudly(cluster, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(cluster.wrong_key_path)  # any other ed25519 key
    kh = tmp_path / "known_hosts"
    hk = paramiko.HostKeys()
    hk.add(cluster.host if cluster.port == 22 else f"[{cluster.host}]:{cluster.port}", "ssh-ed25519", other)
    hk.save(str(kh))
    sh = shell(cluster, known_hosts=[kh])
    with pytest.raises(ChangedHostKey) as err:
        sh.run(["true"])
    assert "HAS CHANGED" in str(err.value) and cluster.host_key_fingerprint in str(err.value)
    assert fingerprint(other) in str(err.value)


def test_trust_then_connect(cluster, tmp_path):
    target, key = fetch_host_key(cluster.host, cluster.port)
    assert fingerprint(key) == cluster.host_key_fingerprint
    kh = trust_host_key(target, key, tmp_path / "trusted")
    assert shell(cluster, known_hosts=[kh]).run(["true"]).ok


def test_wrong_key_is_one_clear_line(cluster):
    sh = shell(cluster, identity_file=cluster.wrong_key_path)
    with pytest.raises(AuthenticationFailed) as err:
        sh.run(["true"])
    assert "accepted none of our keys" in err.value.message and "\n" not in err.value.message


def test_unreachable_host_is_one_clear_line(cluster):
    # 10.211.0.0/24 is the cluster's internal network: routed `unreachable` on this machine (the client), so nothing
    # leaves it; 10.211.0.2 is the login node's own address there, which a client cannot reach either.
    sh = SSHShell("10.211.0.2", user=cluster.user, identity_file=cluster.key_path, interactive=False,
                  connect_timeout=3)
    with pytest.raises(ConnectionFailed) as err:
        sh.run(["true"])
    assert "cannot connect to 10.211.0.2:22" in err.value.message
    closed = shell(cluster, port=1)
    with pytest.raises(ConnectionFailed, match="refused"):
        closed.run(["true"])


def test_ssh_config_alias_and_proxyjump(cluster, tmp_path, monkeypatch):
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host hpc-login\n  HostName {cluster.host}\n  User {cluster.user}\n  Port {cluster.port}\n"
        f"  IdentityFile {cluster.key_path}\n"
        f"Host hpc-via-jump\n  HostName {cluster.host}\n  User {cluster.user}\n  IdentityFile {cluster.key_path}\n"
        f"  ProxyJump hpc-login\n")
    monkeypatch.setenv("HPCSEG_SSH_CONFIG", str(cfg))
    sh = SSHShell("hpc-login", known_hosts=[cluster.known_hosts], interactive=False)
    assert sh.target.hostname == cluster.host and sh.target.user == cluster.user
    assert sh.run(["whoami"]).stdout.strip() == cluster.user
    jumped = SSHShell("hpc-via-jump", known_hosts=[cluster.known_hosts], interactive=False)
    assert jumped.run(["whoami"]).stdout.strip() == cluster.user
    assert jumped._jump is not None  # really went through the jump host
    jumped.close()
    sh.close()


def test_cli_trust_with_fingerprint(cluster, tmp_path):
    from click.testing import CliRunner

    from hpcseg.cli import main

    r = CliRunner().invoke(main, ["trust", cluster.host, "--fingerprint", "SHA256:not-it"])
    assert r.exit_code == 1 and "not the expected" in r.output
    r = CliRunner().invoke(main, ["trust", cluster.host, "--fingerprint", cluster.host_key_fingerprint],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "trusted" in r.output


def test_openssh_agrees_on_fingerprint(cluster):
    out = subprocess.run(["ssh-keygen", "-lf", cluster.known_hosts], capture_output=True, text=True).stdout
    assert cluster.host_key_fingerprint in out


def test_trust_hint_and_trust_use_the_profiles_port(cluster, tmp_path):
    """Issue 13, point 9: on a non-22 port (the second login sshd), the hint's command works as printed and
    `hpcseg trust HOST` trusts the profile's port, not 22."""
    import shlex

    from click.testing import CliRunner

    from hpcseg.cli import main

    assert cluster.mfa_port and cluster.mfa_port != 22
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKey) as err:
        SSHShell(cluster.host, user=cluster.user, port=cluster.mfa_port, identity_file=cluster.key_path,
                 known_hosts=[empty], interactive=False, connect_timeout=5).run(["true"])
    hint = err.value.hint or ""
    assert f"--port {cluster.mfa_port}" in hint, hint
    printed = shlex.split(hint.split("run: ", 1)[1])  # run the hint as printed
    assert printed[:2] == ["hpcseg", "trust"]
    r = CliRunner().invoke(main, printed[1:], catch_exceptions=False)
    assert r.exit_code == 0 and f":{cluster.mfa_port} offers" in r.output, r.output
    kh = tmp_path / "known_hosts"  # HPCSEG_KNOWN_HOSTS (isolated_user_files)
    assert f"[{cluster.host}]:{cluster.mfa_port} " in kh.read_text()
    kh.unlink()
    # `hpcseg trust` with the profile's host and no --port: the profile's port
    r = CliRunner().invoke(main, ["-p", "mfa", "config", "init", "--host", cluster.host, "--set",
                                  f"port={cluster.mfa_port}"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for argv in (["-p", "mfa", "trust", cluster.host], ["-p", "mfa", "trust"]):
        r = CliRunner().invoke(main, [*argv, "--fingerprint", cluster.host_key_fingerprint], catch_exceptions=False)
        assert r.exit_code == 0 and f":{cluster.mfa_port} offers" in r.output, r.output
        assert f"[{cluster.host}]:{cluster.mfa_port} " in kh.read_text()
        kh.unlink()
