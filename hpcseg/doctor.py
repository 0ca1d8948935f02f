"""``hpcseg doctor`` (and Slicer's "Test connection"): one line per item, ok or exactly what to do.

Items, in the order a connection needs them: SSH reachable; host key known; login method; scheduler commands;
site bundle found and valid; the chosen preset's partition and GPU request accepted by the scheduler without
running a job (``sbatch --test-only``; PBS: the queue exists); container runtime and image; the hpcseg inside
the image (or venv) speaks this client's protocol version; models dir readable; datasets dir writable; disk
quota where the site reports one; work dir not readable by others (connection files live there). An item that
cannot be checked because an earlier one failed is left out rather than reported as a second fault.

Example::

    for item in diagnose(profile):
        print(item.line())          # "ok   ssh reachable: 10.210.0.2:22" / "FIX  host key known: ... -> run ..."
"""

from __future__ import annotations

import json
import posixpath
import shlex
import socket
from dataclasses import asdict, dataclass
from typing import Any

from .config import Profile
from .containers import RUNTIME_PROGRAM, exec_prefix
from .errors import ChangedHostKey, ConfigError, HpcsegError, UnknownHostKey
from .protocol import PROTOCOL_VERSION, compatible, server_mismatch
from .shell import LocalShell, Shell


@dataclass
class Item:
    """One checked item: its name, ok or not, what was found, and the fix (empty when ok)."""

    item: str
    ok: bool
    detail: str = ""
    fix: str = ""

    def line(self) -> str:
        text = f"{'ok ' if self.ok else 'FIX'}  {self.item}: {self.detail}"
        return text + (f" -> {self.fix}" if not self.ok and self.fix else "")


def diagnose(profile: Profile, *, shell: Shell | None = None, user_keys: set[str] | None = None,
             preset: str | None = None, overrides: dict[str, Any] | None = None,
             locations: tuple[str, ...] | None = None) -> list[Item]:
    """Check everything between this client and a working server job for ``profile``; never raises for a fault."""
    items: list[Item] = []
    add = lambda *a, **k: items.append(Item(*a, **k))  # noqa: E731
    if profile.host:
        if not _reachable(profile, add):
            return items
        shell = shell or _ssh(profile)
        try:
            shell.home()
        except UnknownHostKey as exc:
            add("host key known", False, exc.message, exc.hint or f"check the fingerprint {exc.fingerprint} with "
                f"your site, then hpcseg trust {profile.host}")
            return items
        except ChangedHostKey as exc:
            add("host key known", False, exc.message, exc.hint or "ask your admins whether the host key changed")
            return items
        except HpcsegError as exc:
            add("login", False, exc.message, exc.hint or "check you can log in with plain ssh")
            return items
        add("host key known", True, "verified against known_hosts")
        add("login method", True, getattr(shell, "login_method", "") or "accepted")
    else:
        shell = shell or LocalShell()
    from .site import resolve

    try:
        res = resolve(profile, shell=shell, user_keys=user_keys, preset=preset, overrides=overrides,
                      locations=locations)
    except HpcsegError as exc:
        add("site bundle", False, exc.message, exc.hint or "ask your admins (hpcseg site validate)")
        return items
    prof, bundle = res.profile, res.bundle
    if bundle is not None:
        add("site bundle", True, f"{bundle.name or 'site'} at {bundle.location}"
            + (f", preset {prof.preset}" if prof.preset else "") + f" ({len(bundle.presets)} preset(s))")
        try:
            bundle.check(prof, res.origins)
            add("site limits", True, "the request is within the site's limits")
        except HpcsegError as exc:
            add("site limits", False, exc.message, exc.hint or "")
    elif profile.host:
        add("site bundle", True, "none installed (every value comes from your profile)")
    _scheduler_items(prof, shell, add, bundle)
    _runtime_items(prof, shell, add)
    _folder_items(prof, shell, add, bundle)
    return items


def _reachable(profile: Profile, add) -> bool:
    from .ssh import resolve_target

    t = resolve_target(profile.host, user=profile.user, port=profile.port, identity_file=profile.identity_file,
                       proxy_jump=profile.proxy_jump)
    if t.proxy_jump:
        add("ssh reachable", True, f"{t.hostname}:{t.port} through {t.proxy_jump} (checked at login)")
        return True
    try:
        with socket.create_connection((t.hostname, t.port), timeout=10):
            pass
    except OSError as exc:
        add("ssh reachable", False, f"{t.hostname}:{t.port}: {exc.strerror or exc}",
            "check the host name and port (ssh -v), your network or VPN")
        return False
    add("ssh reachable", True, f"{t.hostname}:{t.port}")
    return True


def _ssh(profile: Profile) -> Shell:
    from .ssh import SSHShell

    return SSHShell.from_profile(profile)


def _scheduler_items(prof: Profile, shell: Shell, add, bundle) -> None:
    from .jobs import JobManager
    from .schedulers import SubmitSpec

    if prof.is_local:
        return
    jm = JobManager(prof, shell=shell, site=bundle)
    cmds = jm.scheduler.check_commands(None)
    missing = [w for w, c in cmds if not shell.run(list(c.argv), timeout=30).ok]
    if missing:
        add("scheduler commands", False, f"not found: {', '.join(missing)}",
            f"load the {prof.scheduler} module in your login environment, or set scheduler to the right one")
        return
    add("scheduler commands", True, ", ".join(w for w, _ in cmds))
    what = "partition" if prof.scheduler == "slurm" else "queue"
    for _name, cmd in jm.scheduler.check_commands(prof.partition)[len(cmds):]:
        res = shell.run(list(cmd.argv), timeout=30)
        if not res.ok:
            add(f"{what} and GPU request", False, (res.stderr or res.stdout).strip().splitlines()[-1],
                f"set {what} to one that exists (hpcseg config set partition NAME, or a --preset)")
            return
    tmp = shell.run(["mktemp", "-d"], timeout=30)
    d = tmp.stdout.strip()
    try:
        script = jm.render("server", {}, name="doctor", work_dir=d)[0]
        shell.write_text(posixpath.join(d, "job.sh"), script, mode=0o700)
        cmd = jm.scheduler.test_submit_command(SubmitSpec(posixpath.join(d, "job.sh"), d, "hpcseg-doctor"))
        request = f"{what} {prof.partition or '(default)'}, {prof.gpus} GPU(s)"
        if cmd is None:
            add(f"{what} and GPU request", True, f"{request}: the {what} exists ({prof.scheduler} has no dry run)")
            return
        res = shell.run(list(cmd.argv), timeout=60)
        msg = " / ".join((res.stderr or res.stdout).strip().splitlines()[-1:])
        if res.ok:
            add(f"{what} and GPU request", True, f"{request}: accepted by {cmd.argv[0]} --test-only")
        else:
            add(f"{what} and GPU request", False, f"{request}: {msg}",
                f"pick another {what} or GPU request (a --preset of the site, or config set)")
    except HpcsegError as exc:
        add(f"{what} and GPU request", False, exc.message, exc.hint or "")
    finally:
        if d:
            shell.run(["rm", "-rf", "--", d], timeout=30)


def _runtime_items(prof: Profile, shell: Shell, add) -> None:
    image = _abs(shell, prof.image) if prof.image else None
    venv = _abs(shell, prof.venv) if prof.venv else None
    py = _abs(shell, prof.python)
    # the environment a job has: its modules loaded and its venv active (sites put runtimes on PATH that way)
    setup = "".join(f"module load {shlex.quote(m)} >/dev/null 2>&1; " for m in prof.modules)
    setup += f". {shlex.quote(venv)}/bin/activate && " if venv else ""
    if prof.container_runtime != "none":
        program = RUNTIME_PROGRAM[prof.container_runtime]
        res = shell.run(["sh", "-c", setup + 'command -v "$1"', "sh", program], timeout=30)
        if not res.ok:
            add("container runtime and image", False, f"{program} not found on {shell.name}",
                "load it in your login environment (modules = [...]) or ask your admins")
            return
        if not image or not shell.run(["test", "-r", image], timeout=30).ok:
            add("container runtime and image", False, f"image {image} is missing or unreadable",
                "copy the image there (singularity/README.md) or fix image in the site bundle or profile")
            return
        add("container runtime and image", True, f"{prof.container_runtime}, {image}")
        probe = ["sh", "-c", setup + 'exec "$@"', "sh", *exec_prefix(prof.container_runtime, image), py, "-m",
                 "hpcseg.protocol"]
    else:
        add("container runtime and image", True, "no container (python " + py + (f", venv {venv}" if venv else "")
            + ")")
        probe = ["sh", "-c", setup + 'exec "$@"', "sh", py, "-m", "hpcseg.protocol"]
    res = shell.run(probe, timeout=120)
    if not res.ok:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit {res.exit_code}"]
        if "No module named hpcseg.protocol" in res.stderr or "hpcseg.protocol" in tail[0]:
            add("server protocol", False, server_mismatch(None, _version(shell, probe)),
                "install the client's hpcseg version in the image or venv")
        else:
            add("server protocol", False, f"cannot run hpcseg there: {tail[0]}",
                "set python/venv to an environment with hpcseg[server], or use the site's image")
        return
    try:
        found = json.loads(res.stdout.strip().splitlines()[-1])
        proto, version = found.get("protocol"), found.get("hpcseg", "")
    except (ValueError, IndexError, AttributeError):
        add("server protocol", False, f"unreadable answer: {res.stdout.strip()[:100]}",
            "install hpcseg[server] in the image or venv")
        return
    if compatible(proto):
        add("server protocol", True, f"hpcseg {version} there speaks protocol {proto}, as this client does")
    else:
        add("server protocol", False, server_mismatch(proto, version),
            f"install an hpcseg speaking protocol {PROTOCOL_VERSION} in the image or venv, or match the client")


def _version(shell: Shell, probe: list[str]) -> str:
    """The hpcseg version an older environment (without hpcseg.protocol) reports."""
    p = list(probe)
    p[-2:] = ["-c", "import hpcseg; print(hpcseg.__version__)"]
    res = shell.run(p, timeout=60)
    return res.stdout.strip() if res.ok else ""


def _abs(shell: Shell, path: str) -> str:
    return shell.home().rstrip("/") + path[1:] if path == "~" or path.startswith("~/") else path


def _folder_items(prof: Profile, shell: Shell, add, bundle) -> None:
    models = _abs(shell, prof.models_path)
    res = shell.run(["sh", "-c", 'test -d "$1" || exit 2; test -r "$1" && test -x "$1" && ls "$1" >/dev/null',
                     "sh", models], timeout=30)
    if res.exit_code == 2 and prof.models_dir is None:
        add("models dir readable", True, f"{models} (created by the first server job)")
    elif res.ok:
        add("models dir readable", True, models)
    else:
        add("models dir readable", False, f"{models} is {'missing' if res.exit_code == 2 else 'not readable'}",
            "ask your admins to make the site's models folder readable (chmod -R o+rX), or fix models_dir")
    data = _abs(shell, prof.datasets_path)
    res = shell.run(["sh", "-c", 'umask 077; mkdir -p -- "$1" 2>/dev/null; test -d "$1" && test -w "$1"', "sh", data],
                    timeout=30)
    add("datasets dir writable", res.ok, data,
        "" if res.ok else "set datasets_dir to a folder you can write (hpcseg config set datasets_dir PATH)")
    qc = bundle.quota_command if bundle is not None else None
    if qc:
        res = shell.run(list(qc), timeout=60)
        text = " | ".join(ln.strip() for ln in (res.stdout or res.stderr).strip().splitlines()[-3:])
        add("disk quota", res.ok, text or "(no output)", "" if res.ok else f"`{' '.join(qc)}` failed: ask your admins")
    wd = _abs(shell, prof.work_dir).rstrip("/")
    res = shell.run(["sh", "-c", 'umask 077; mkdir -p -- "$1" && stat -c %a -- "$1"', "sh", wd], timeout=30)
    mode = res.stdout.strip()
    if not res.ok or not mode.isdigit():
        add("work dir private", False, f"{wd}: {res.stderr.strip() or 'cannot create it'}",
            "set work_dir to a folder you own (hpcseg config set work_dir PATH)")
    elif int(mode, 8) & 0o044:
        add("work dir private", False, f"{wd} is mode {mode}: others can read it (connection files live there)",
            f"chmod 700 {shlex.quote(wd)}")
    else:
        add("work dir private", True, f"{wd} (mode {mode})")


def as_json(items: list[Item]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]


__all__ = ["Item", "diagnose", "as_json", "ConfigError"]
