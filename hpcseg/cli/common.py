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

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config()
        return self._config

    @property
    def profile(self) -> Profile:
        return self.config.profile(self.profile_name)

    @property
    def jobs(self):
        if self._jobs is None:
            from ..jobs import JobManager

            self._jobs = JobManager(self.profile)
        return self._jobs


pass_ctx = click.make_pass_decorator(Ctx)

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
