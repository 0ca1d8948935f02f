"""The models a server serves: found on disk, loaded in the background, reloaded without a restart.

Each models directory holds one folder per model name; a folder is served when it is

- a model folder itself: ``<dir>/<name>/hpcseg-model.json``;
- a family of fine-tuned versions: ``<dir>/<name>/current`` is a link to ``<dir>/<name>/<version>/`` (a model
  folder); fine-tuning writes a new version and moves the link, then ``POST /reload`` picks it up;
- a MONAI bundle: ``<dir>/<name>/configs/`` with ``metadata.json`` or ``inference.json|yaml`` (the model code
  decides whether it can serve it, and says why not).

Loading runs in one background thread (models share one GPU; loading them one by one keeps peak memory low), each
model ending with a warm-up. The server answers as soon as the first model is ready (:meth:`ModelRegistry.ready`):
models that need no torch (a ``"loader"`` in the manifest: ct-body, the interactive ones) are loaded first, so a
server answers within a second or two while networks load behind it; a request for a model still loading waits
for it (:meth:`ModelRegistry.wait_for`, bounded). ``/info/`` shows each model's state (pending, loading, ready,
failed). A model that fails to load is reported (state
``failed`` with the reason, in ``/info/`` and the log) while the others serve. On reload a changed model is loaded
beside the old one and swapped in when warm; if that fails, the old version keeps serving and the reason is kept.

Example::

    reg = ModelRegistry([Path("models")], device="auto")
    reg.start()                       # returns at once; loading goes on in a thread
    reg.wait(timeout=600)
    model, version = reg.get("ct-body")
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcseg.errors import HpcsegError

log = logging.getLogger("hpcseg.server")

MANIFEST = "hpcseg-model.json"
Loader = Callable[[Path, str], Any]


@dataclass
class Candidate:
    """A folder found on disk that should hold a model (or the reason it cannot)."""

    name: str
    folder: Path | None
    problem: str | None = None

    def signature(self) -> tuple[str, int] | None:
        """What changes when a new version is published: the resolved folder and its manifest's mtime."""
        if self.folder is None:
            return None
        for marker in (self.folder / MANIFEST, self.folder / "configs" / "metadata.json",
                       self.folder / "configs" / "inference.json", self.folder):
            try:
                return str(self.folder.resolve()), marker.stat().st_mtime_ns
            except OSError:
                continue
        return str(self.folder), 0


@dataclass
class ModelEntry:
    """One model name and what the server knows about it."""

    name: str
    folder: Path | None
    state: str = "pending"  # pending | loading | ready | failed
    model: Any = None
    version: str | None = None
    error: str | None = None
    load_seconds: float | None = None
    signature: tuple[str, int] | None = None

    def status(self) -> dict[str, Any]:
        """JSON for ``/health/ready`` and ``/info/``."""
        out: dict[str, Any] = {"state": self.state, "version": self.version}
        if self.folder is not None:
            out["folder"] = str(self.folder)
        if self.load_seconds is not None:
            out["load_seconds"] = round(self.load_seconds, 2)
        if self.error:
            out["error"] = self.error
        return out


def discover(dirs: Sequence[Path]) -> list[Candidate]:
    """Model folders under ``dirs``, in order; the first directory wins a name both hold."""
    found: dict[str, Candidate] = {}
    for d in dirs:
        d = Path(d).expanduser()
        if not d.is_dir():
            log.warning("models directory %s does not exist", d)
            continue
        for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            cand = _candidate(child)
            if cand is None:
                log.debug("skipping %s: not a model folder", child)
                continue
            if cand.name in found:
                log.warning("model %s in %s is shadowed by %s", cand.name, child, found[cand.name].folder)
                continue
            found[cand.name] = cand
    return list(found.values())


def _candidate(child: Path) -> Candidate | None:
    name = child.name
    if (child / MANIFEST).is_file():
        return Candidate(name, child)
    current = child / "current"
    if current.is_symlink() or current.exists():
        if not current.exists():
            return Candidate(name, None, f"{current} points to {_readlink(current)}, which does not exist")
        target = current.resolve()
        if (target / MANIFEST).is_file() or _is_bundle(target):
            return Candidate(name, target)
        return Candidate(name, None, f"{current} -> {target} holds no {MANIFEST}")
    if _is_bundle(child):
        return Candidate(name, child)
    if any((v / MANIFEST).is_file() for v in child.iterdir() if v.is_dir()):
        return Candidate(name, None, f"{child} holds versions but no `current` link to the one to serve")
    return None


def _is_bundle(folder: Path) -> bool:
    configs = folder / "configs"
    return any((configs / f).is_file() for f in ("metadata.json", "inference.json", "inference.yaml", "inference.yml"))


def _readlink(p: Path) -> str:
    try:
        return str(p.readlink())
    except OSError:
        return "?"


def default_loader(folder: Path, device: str) -> Any:
    """hpcseg's own loader (imported late: it pulls in torch)."""
    from hpcseg.server.models import load_model

    return load_model(folder, device=device)


class ModelRegistry:
    """Thread-safe table of models; loads in a background thread (see the module docstring)."""

    def __init__(self, dirs: Sequence[Path], *, device: str = "auto", loader: Loader | None = None,
                 warmup: bool = True) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.device = device
        self.loader: Loader = loader or default_loader
        self.warmup = warmup
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when an entry's state changes
        self._reload_lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._again = False  # a reload was asked for: the loader thread makes (another) pass
        self.generation = 0
        #: what the last (re)load did, per model name: "loaded 1.0", "reloaded 1.1 (was 1.0)", "failed: why",
        #: "removed"; models it left alone are absent (``hpcseg reload`` prints it)
        self.last_reload: dict[str, str] = {}
        self._changes: dict[str, str] = {}

    # --- queries -------------------------------------------------------------------------------------------
    def get(self, name: str) -> tuple[Any, str | None] | None:
        """(model, version) when ``name`` is ready, else None (see :meth:`entry` for why)."""
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.model is None:
                return None
            return e.model, e.version

    def entry(self, name: str) -> ModelEntry | None:
        """The entry for ``name`` (a snapshot is not taken: read, don't mutate)."""
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[ModelEntry]:
        """Every entry, in discovery order."""
        with self._lock:
            return list(self._entries.values())

    @property
    def loading(self) -> bool:
        """True while a load or reload is running."""
        return not self._idle.is_set()

    def ready(self) -> bool:
        """At least one model is loaded and warm (others may still be loading: see :attr:`loading`)."""
        with self._lock:
            return any(e.model is not None for e in self._entries.values())

    def state(self) -> str:
        """``ready`` (a model serves), ``loading`` (none yet) or ``failed`` (loading ended and nothing serves)."""
        if self.ready():
            return "ready"
        return "loading" if self.loading else "failed"

    def wait_for(self, name: str, timeout: float) -> ModelEntry | None:
        """Block until ``name`` is ready or failed (or ``timeout`` passed); its entry then, None when unknown."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                e = self._entries.get(name)
                if e is None or e.model is not None or e.state == "failed":
                    return e
                if e.state not in ("pending", "loading") and not self.loading:
                    return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return e
                self._changed.wait(min(left, 0.5))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no load is running; True unless the timeout passed."""
        return self._idle.wait(timeout)

    # --- loading -------------------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Discover and load every model in a background thread; returns the thread."""
        return self.reload(background=True)

    def reload(self, *, background: bool = False) -> threading.Thread:
        """Rediscover; load new or changed models, drop vanished ones.

        While a load is running (the server's start loads its networks in the background), the request is queued:
        the running thread makes one more pass when it is done, so files changed meanwhile are seen.
        """
        with self._lock:
            self._again = True
            if self._thread is not None:
                thread = self._thread
            else:
                self._idle.clear()
                thread = threading.Thread(target=self._reload, name="hpcseg-model-loader", daemon=True)
                self._thread = thread
                thread.start()
        if not background:
            thread.join()
        return thread

    def _reload(self) -> None:
        while True:
            with self._lock:
                if not self._again:  # done: a reload() from now on starts a new thread
                    self._thread = None
                    self.generation += 1
                    self._idle.set()
                    self._changed.notify_all()
                    return
                self._again = False
            try:
                with self._reload_lock:
                    self._reload_locked()
            except Exception:  # never leave the registry "loading" forever
                log.exception("model discovery failed")

    def _reload_locked(self) -> None:
        self._changes = {}
        try:
            self._discover_and_load()
        finally:
            self.last_reload = dict(self._changes)

    def _discover_and_load(self) -> None:
        candidates = discover(self.dirs)
        names = {c.name for c in candidates}
        with self._lock:
            for gone in [n for n in self._entries if n not in names]:
                log.info("model %s is no longer on disk: no longer served", gone)
                del self._entries[gone]
                self._changes[gone] = "removed"
            todo: list[Candidate] = []
            for c in candidates:
                e = self._entries.get(c.name)
                if c.problem and e is not None and e.model is not None:
                    e.error = f"{c.problem}; still serving version {e.version}"
                    self._changes[c.name] = f"failed: {e.error}"
                    log.error("model %s: %s", c.name, e.error)
                elif c.problem:
                    self._entries[c.name] = ModelEntry(c.name, c.folder, state="failed", error=c.problem)
                    self._changes[c.name] = f"failed: {c.problem}"
                    log.error("model %s cannot be served: %s", c.name, c.problem)
                elif e is None or e.signature != c.signature() or e.model is None:
                    if e is None:
                        self._entries[c.name] = ModelEntry(c.name, c.folder)
                    todo.append(c)
        if not candidates:
            log.error("no model folder found under %s", ", ".join(str(d) for d in self.dirs))
        for c in sorted(todo, key=_load_cost):  # stable: discovery order within a cost class
            self._load_one(c)

    def _load_one(self, cand: Candidate) -> None:
        with self._lock:
            entry = self._entries[cand.name]
            if entry.model is None:
                entry.state = "loading"
        assert cand.folder is not None
        t0 = time.monotonic()
        try:
            model = self.loader(cand.folder, self.device)
            t1 = time.monotonic()
            if self.warmup:
                model.warmup()
            t2 = time.monotonic()
        except Exception as exc:  # any failure of one model must not stop the others
            if isinstance(exc, HpcsegError):
                reason = exc.message + (f" ({exc.hint})" if exc.hint else "")
            else:
                reason = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if entry.model is None:
                    entry.state, entry.error = "failed", reason
                    log.error("model %s cannot be served: %s", cand.name, reason)
                else:
                    entry.error = f"reload failed, still serving version {entry.version}: {reason}"
                    log.error("model %s: %s", cand.name, entry.error)
                self._changed.notify_all()
                self._changes[cand.name] = f"failed: {entry.error}"
            return
        version = _version_of(model)
        with self._lock:
            old = entry.version if entry.model is not None else None
            entry.model, entry.version, entry.folder = model, version, cand.folder
            entry.state, entry.error = "ready", None
            entry.load_seconds, entry.signature = t2 - t0, cand.signature()
            self._changed.notify_all()
        what = f"reloaded (was {old})" if old else "loaded"
        self._changes[cand.name] = f"reloaded {version} (was {old})" if old else f"loaded {version}"
        log.info("model %s version %s %s from %s in %.2f s (load %.2f s, warm-up %.2f s)",
                 cand.name, version, what, cand.folder, t2 - t0, t1 - t0, t2 - t1)

    def close(self) -> None:
        """Drop every model reference (the GPU memory goes with them)."""
        with self._lock:
            self._entries.clear()


def _load_cost(cand: Candidate) -> int:
    """0 for a model whose manifest names a ``"loader"`` (hpcseg's classical and interactive models: no torch, a
    second to load), 1 for the rest (networks and bundles: torch and weights); cheap ones load first so the server
    answers early."""
    if cand.folder is None:
        return 1
    try:
        data = json.loads((cand.folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 1
    return 0 if isinstance(data, dict) and data.get("loader") else 1


def _version_of(model: Any) -> str:
    manifest = getattr(model, "manifest", None)
    version = getattr(manifest, "version", None)
    return str(version) if version is not None else "unknown"
