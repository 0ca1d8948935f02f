"""Scheduler dialects: Slurm, PBS (Pro and Torque) and ``local`` (a process on this machine)."""

from __future__ import annotations

from .base import Command, JobState, JobStatus, Scheduler, SubmitSpec, drive

__all__ = ["Command", "JobState", "JobStatus", "Scheduler", "SubmitSpec", "drive", "get_scheduler"]


def get_scheduler(name: str, **options) -> Scheduler:
    """The backend for a profile's ``scheduler`` value."""
    if name == "slurm":
        from .slurm import Slurm
        return Slurm(**options)
    if name == "pbs":
        from .pbs import PBS
        return PBS(**options)
    if name == "local":
        from .local import Local
        return Local(**options)
    from ..errors import ConfigError
    raise ConfigError(f"unknown scheduler {name!r}", hint="use one of: slurm, pbs, local")
