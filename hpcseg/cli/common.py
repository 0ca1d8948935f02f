"""What every command shares: the chosen profile, the job manager, JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from ..config import Config, Profile, load_config


@dataclass
class Ctx:
    profile_name: str | None = None
    _config: Config | None = None
    _jobs: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the command line layer: --preset and --set KEY=VALUE
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _resolved: Any = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config()
        return self._config

    @property
    def file_profile(self) -> Profile:
        """The profile as the config file holds it (no site layer, no command line)."""
        return self.config.profile(self.profile_name)

    @property
    def resolved(self):
        """The effective profile: built-in < site bundle < preset < the file's profile < command line."""
        if self._resolved is None:
            from ..site import resolve

            prof = self.file_profile
            self._resolved = resolve(prof, user_keys=self.config.explicit.get(prof.name),
                                     preset=self.preset, overrides=self.overrides)
        return self._resolved

    @property
    def profile(self) -> Profile:
        return self.resolved.profile

    @property
    def jobs(self):
        if self._jobs is None:
            from ..jobs import JobManager

            r = self.resolved
            # the connection the site was looked up on is the profile's one connection (None: not opened yet)
            shell = r.shell if r.shell is not None and (r.bundle is not None or not r.profile.is_local) else None
            self._jobs = JobManager(r.profile, shell=shell, site=r.bundle, origins=r.origins)
        return self._jobs


pass_ctx = click.make_pass_decorator(Ctx)

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
