"""SSHShell when the network really fails: a silent drop (iptables DROP of this connection only), a killed session
(reset), a restarted login sshd. Each fault touches only this test's own connection, or is over in a second."""

from __future__ import annotations

import threading
import time

import pytest

from hpcseg.errors import ConnectionFailed
from hpcseg.ssh import SSHShell

from . import netfaults

pytestmark = [pytest.mark.cluster]


def shell(cluster, **kw) -> SSHShell:
    return SSHShell(cluster.host, user=cluster.user, port=cluster.port, identity_file=cluster.key_path,
                    known_hosts=[cluster.known_hosts], interactive=False, **kw)


@pytest.fixture
def iptables():
    if not netfaults.have_iptables():
        pytest.fail("iptables is missing: tests/cluster/install.sh installs it (apt-get install iptables)",
                    pytrace=False)


def test_silent_drop_is_noticed_and_the_next_command_logs_in_again(cluster, iptables):
    with shell(cluster, keepalive=1.5) as sh:
        assert sh.run("hostname", check=True).stdout.strip()
        assert sh.logins == 1 and sh.alive()
        port = netfaults.local_port(sh)
        with netfaults.blackhole(cluster, port):
            assert not sh.alive(1.0)  # no answer: packets vanish, no reset comes
            t0 = time.monotonic()
            # a new command opens a channel on the dead connection: bounded wait, then a new login (new port)
            assert sh.run("echo again", check=True).stdout.strip() == "again"
            assert time.monotonic() - t0 < 60  # the wait was bounded (the bound itself: connect timeout, 10 s)
            assert sh.logins == 2 and sh.drops == 1
            assert netfaults.local_port(sh) != port


def test_watchdog_closes_a_dead_connection_and_ends_its_channels(cluster, iptables):
    with shell(cluster, keepalive=1.0) as sh:
        sh.run("true", check=True)
        port = netfaults.local_port(sh)
        result: list[object] = []

        def long_command() -> None:
            try:
                result.append(sh.run("sleep 30; echo finished", timeout=120))
            except ConnectionFailed as exc:
                result.append(exc)

        t = threading.Thread(target=long_command)
        t.start()
        time.sleep(1.0)  # the command runs on its channel
        with netfaults.blackhole(cluster, port):
            t.join(20)  # the keepalive window is 2 s; the command would take 30 s
            assert not t.is_alive(), "a command on a silently dead connection waited for the outage"
        assert isinstance(result[0], ConnectionFailed)
        assert "SSH connection to the login node" in str(result[0]) and "lost" in str(result[0])
        assert sh.drops == 1
        assert sh.run("echo back", check=True).stdout.strip() == "back" and sh.logins == 2


def test_killed_session_reconnects_once(cluster):
    with shell(cluster, keepalive=5) as sh:
        sh.run("true", check=True)
        killed = netfaults.kill_session(cluster, netfaults.local_port(sh))
        assert killed, "ss found no sshd process for this connection"
        # at once, while paramiko may not have seen the reset yet: the open fails, the connection is checked
        out = sh.run("echo after-kill", check=True).stdout.strip()
        assert out == "after-kill" and sh.logins == 2


def test_a_request_to_a_server_that_ended_names_that_cause(cluster):
    from hpcseg.client import ServerClient
    from hpcseg.errors import ServerError
    from hpcseg.tunnel import Tunnel

    with shell(cluster) as sh:
        # a stand-in "server" on the login node: accepts, then its process ends (as a server job's does)
        port = int(sh.run("python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); "
                          "print(s.getsockname()[1])'", check=True).stdout)
        sh.run(f"nohup timeout 5 python3 -c 'import socket,time; s=socket.socket(); "
               f"s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((\"127.0.0.1\", {port})); "
               f"s.listen(); time.sleep(5)' >/dev/null 2>&1 & sleep 0.5", check=True)
        tunnel = Tunnel(sh, "127.0.0.1", port)
        local = tunnel.start()
        try:
            sh.run("sleep 5")  # the listener is gone now
            client = ServerClient(f"http://127.0.0.1:{local}", "t" * 20, diagnose=tunnel.cause)
            with pytest.raises(ServerError) as err:
                client.health()
        finally:
            tunnel.close()
        assert err.value.message == f"server job ended: nothing listens on 127.0.0.1:{port} any more"
        assert "hpcseg jobs" in (err.value.hint or "")


def test_a_request_when_the_network_is_gone_names_the_lost_ssh_connection(cluster, iptables, caplog):
    """The connection dies silently and a new login cannot get through either: the request fails within bounded
    time, and the message names the lost SSH connection (not "the server went away"). The client's retries do not
    each wait out another re-login: one re-login fails (two connect timeouts), the rest fail at once."""
    import logging

    caplog.set_level(logging.INFO, logger="hpcseg.ssh")
    from hpcseg.client import ServerClient
    from hpcseg.errors import ServerError
    from hpcseg.tunnel import Tunnel

    with shell(cluster, keepalive=1.0) as sh:
        # a stand-in HTTP server on the login node, up for the whole test
        port = int(sh.run("python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); "
                          "print(s.getsockname()[1])'", check=True).stdout)
        sh.run(f"cd /tmp && nohup timeout 120 python3 -m http.server --bind 127.0.0.1 {port} >/dev/null 2>&1 & "
               "sleep 1", check=True)
        tunnel = Tunnel(sh, "127.0.0.1", port)
        local = tunnel.start()
        client = ServerClient(f"http://127.0.0.1:{local}", "t" * 20, diagnose=tunnel.cause)
        try:
            import requests

            assert requests.get(f"http://127.0.0.1:{local}/", timeout=10, proxies={"http": None}).ok  # through it
            t0 = time.monotonic()
            with netfaults.blackhole_login(cluster), pytest.raises(ServerError) as err:
                client.health()
            took = time.monotonic() - t0
        finally:
            tunnel.close()
        print(f"failed after {took:.1f} s: {err.value.message} ({err.value.hint})")
        assert "SSH connection to the login node" in err.value.message and "lost" in err.value.message, err.value
        assert "network" in (err.value.hint or "")
        relogins = [r for r in caplog.records if "again failed" in r.getMessage()]
        assert len(relogins) == 1, [r.getMessage() for r in relogins]  # 4 before: one per retry, 85 s in all
