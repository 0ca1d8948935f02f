"""What Application Settings → HPCSeg shows and does, without its widgets (the panel in HPCSegUI only draws this).

The page follows reality: each :meth:`SettingsPageLogic.refresh` (the panel calls it whenever it is shown, and
the module calls it after installing hpcseg) looks again whether hpcseg can be imported *now*, so the form
enables itself after an install without a restart. Every action returns a :class:`PageState` and never raises:
an error becomes the page's message (hpcseg's sentence and hint), never a traceback in the Python console.

The site's presets and Test connection (``hpcseg doctor``) read the cluster over SSH: the panel never calls
:meth:`site_presets`/:meth:`test_connection` (they block) but :meth:`request_presets`/:meth:`request_test`, which
ask a short-lived hpcseg worker; :meth:`pump` (the panel's timer) returns the new state when the answer came.

Standard library only at import time: hpcseg is imported lazily, once :func:`dependencies.importable` says so.

Example (what the panel does)::

    logic = SettingsPageLogic()
    state = logic.refresh()            # state.enabled, state.message, state.profiles, state.values
    state = logic.save("karolina", {"host": "karolina", "scheduler": "slurm", ...}, make_default=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from . import dependencies
from .worker import WorkerClient, error_text

NOT_INSTALLED = ("hpcseg is not installed in this Slicer yet: open the HPCSeg module and press Connect to install "
                 "it. This page enables itself once it is there.")


@dataclass
class Field:
    """One line of the form (a combo box when ``choices``, else a line edit)."""

    key: str
    label: str
    choices: tuple[str, ...] = ()
    help: str = ""


@dataclass
class PageState:
    """Everything the panel shows."""

    enabled: bool
    message: str = ""
    error: bool = False
    profiles: list[str] = field(default_factory=list)
    current: str = ""
    fields: list[Field] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    #: the cluster's site presets for the current profile (name, description, values, default, refusal)
    presets: list[dict[str, Any]] = field(default_factory=list)
    #: the last "Test connection": hpcseg doctor's items (item, ok, detail, fix)
    checks: list[dict[str, Any]] = field(default_factory=list)


class SettingsPageLogic:
    """The page's behaviour; the widgets call these methods and draw the :class:`PageState` they return."""

    def __init__(self, worker_python: str | None = None) -> None:
        self.state = PageState(enabled=False, message=NOT_INSTALLED)
        self.worker_python = worker_python
        self._asking: WorkerClient | None = None

    def _guard(self, action: Any, *args: Any) -> PageState:
        """Run an action; an error (a broken config file, a wrong value) becomes the page's red line."""
        if not dependencies.importable():
            self.state = PageState(enabled=False, message=NOT_INSTALLED)
            return self.state
        try:
            self.state = action(*args)
        except Exception as exc:  # noqa: BLE001 - shown to the user, with hpcseg's hint
            message, _details = error_text(exc)
            self.state = PageState(enabled=self.state.enabled, message=message, error=True,
                                   profiles=self.state.profiles, current=self.state.current,
                                   fields=self.state.fields, values=self.state.values)
        return self.state

    def refresh(self) -> PageState:
        """Look again: is hpcseg there, which profiles exist; show the default one."""
        return self._guard(self._refresh)

    def load(self, name: str) -> PageState:
        """Show the named profile (a new name starts from the defaults)."""
        return self._guard(self._load, name.strip() or "local", "")

    def save(self, name: str, values: dict[str, str], make_default: bool = False) -> PageState:
        """Validate and write the profile to hpcseg's config file (the one the ``hpcseg`` command reads)."""
        return self._guard(self._save, name.strip(), values, make_default)

    def site_presets(self, name: str) -> PageState:
        """The cluster's site presets for the profile, each with the refusal ``submit`` would give (connects)."""
        return self._guard(self._site_presets, name.strip())

    def test_connection(self, name: str) -> PageState:
        """``hpcseg doctor`` for the profile: one item per line, ok or exactly what to do (connects)."""
        return self._guard(self._test_connection, name.strip())

    # --- the site (presets, doctor) through a worker: the page never blocks --------------------------------
    @property
    def busy(self) -> bool:
        return self._asking is not None

    def request_presets(self, name: str) -> PageState:
        """Ask the site bundle (over the profile's SSH connection, in a worker) which presets it offers; the
        answer is :meth:`site_presets`'s, delivered by :meth:`pump`."""
        return self._request("presets", name, "asking the site of {} for its presets…")

    def request_test(self, name: str) -> PageState:
        """Test connection (``hpcseg doctor``) in a worker; :meth:`test_connection`'s answer, by :meth:`pump`."""
        return self._request("doctor", name, "testing profile {} (hpcseg doctor)…")

    def _request(self, op: str, name: str, saying: str) -> PageState:
        if not dependencies.importable() or not self.state.enabled:
            return self._guard(self._refresh)
        if self._asking is None:
            self._asking = WorkerClient(name.strip() or self.state.current, python=self.worker_python)
            done = self._presets if op == "presets" else self._checks
            self._asking.call(op, on_done=done, on_error=self._asking_failed)
        self.state = replace(self.state, message=saying.format(self._asking.profile), error=False)
        return self.state

    def pump(self) -> PageState | None:
        """The new state once the presets arrived (or failed); None while still asking."""
        if self._asking is None:
            return None
        asking = self._asking
        asking.pump()
        if asking.busy():
            return None
        self._asking = None
        asking.quit()
        return self.state

    def cancel(self) -> None:
        """The page closes: stop asking."""
        if self._asking is not None:
            self._asking.quit()
            self._asking = None

    def _presets(self, result: dict[str, Any]) -> None:
        rows = list(result.get("presets") or [])
        self.state = replace(self.state, presets=rows, message=presets_message(rows), error=False)

    def _checks(self, result: dict[str, Any]) -> None:
        items = list(result.get("checks") or [])
        message, bad = checks_message(items)
        self.state = replace(self.state, checks=items, message=message, error=bad)

    def _asking_failed(self, exc: BaseException) -> None:
        message, _details = error_text(exc)
        self.state = replace(self.state, message=message or "stopped", error=bool(message))

    def pick_preset(self, name: str) -> PageState:
        """Put a preset's name into the form's preset field (saved with the profile)."""
        self.state = replace(self.state, values={**self.state.values, "preset": name},
                              message=f"preset {name}: press Save profile to keep it" if name else "no preset")
        return self.state

    # --- the actions, with hpcseg importable ----------------------------------------------------------------
    def _site_presets(self, name: str) -> PageState:
        from .profiles import site_presets

        rows = site_presets(name)
        return replace(self.state, presets=rows, message=presets_message(rows), error=False)

    def _test_connection(self, name: str) -> PageState:
        from .profiles import doctor_items

        items = doctor_items(name)
        message, bad = checks_message(items)
        return replace(self.state, checks=items, message=message, error=bad)

    @staticmethod
    def _fields() -> list[Field]:
        from .profiles import form_fields

        return [Field(f.key, f.label, f.choices, f.help) for f in form_fields()]

    def _refresh(self) -> PageState:
        from .profiles import profile_names

        names, default = profile_names()
        current = self.state.current if self.state.enabled and self.state.current in names else default
        return self._load(current, "", names)

    def _load(self, name: str, message: str, names: list[str] | None = None) -> PageState:
        from .profiles import ProfileForm, new_profile_form, profile_names

        if names is None:
            names = profile_names()[0]
        form = ProfileForm.load(name) if name in names else new_profile_form(name)
        where = f"{form.name} from {form.path}" if name in names else f"new profile {name}: fill it in and save it"
        return PageState(enabled=True, message=message or where, profiles=names,
                         current=form.name, fields=self._fields(), values=form.values)

    def _save(self, name: str, values: dict[str, str], make_default: bool) -> PageState:
        from .profiles import ProfileForm

        if not name:
            raise ValueError("name the profile first (type a new name in the Profile box)")
        form = ProfileForm(name, dict(values))
        path = form.save(make_default=make_default)
        return self._load(name, f"saved profile {name} to {path}")


def presets_message(rows: list[dict[str, Any]]) -> str:
    """The page's line for the site's presets."""
    refused = sum(1 for r in rows if r.get("refusal"))
    return (f"{len(rows)} site preset(s)" + (f", {refused} refused with this profile" if refused else "")
            if rows else "no site bundle (or no presets) for this profile")


def checks_message(items: list[dict[str, Any]]) -> tuple[str, bool]:
    """The page's line for ``hpcseg doctor``'s items: "all ok", or the first thing to fix; and whether to fix."""
    bad = [i for i in items if not i["ok"]]
    if not bad:
        return "all ok", False
    return f"FIX  {bad[0]['item']}: {bad[0]['detail']}" + (f" -> {bad[0]['fix']}" if bad[0]["fix"] else ""), True
