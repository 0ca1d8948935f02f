"""How a container runtime runs one command in hpcseg's image, for commands run outside job scripts.

Job scripts build their own command line (``templates/base.sh.j2``, block ``container``); the CLI needs the same
for quick commands on the login node (``hpcseg models`` lists the models with the image's Python) and for
``hpcseg doctor``'s check that the runtime's program is there. Runtimes (``Profile.container_runtime``):

    singularity / apptainer    IMAGE is a .sif:              apptainer exec IMAGE CMD...
    charliecloud               IMAGE is a directory image:   ch-run --home --set-env IMAGE -- CMD...

Example::

    argv = exec_prefix("charliecloud", "/sw/images/hpcseg") + ["python3", "-m", "hpcseg.modelstore", "list"]
"""

from __future__ import annotations

#: the program each runtime is started with (what must be on PATH, e.g. after ``module load``)
RUNTIME_PROGRAM = {"singularity": "singularity", "apptainer": "apptainer", "charliecloud": "ch-run"}


def exec_prefix(runtime: str, image: str) -> list[str]:
    """The argv that runs a command (appended to it) in ``image``; ``[]`` for runtime ``none``.

    Charliecloud binds ``$HOME`` at ``/home/$USER`` (``--home``) and applies the image's environment
    (``--set-env``: ``/ch/environment``), as Apptainer binds ``$HOME`` and applies ``%environment`` by itself.
    """
    if runtime == "none":
        return []
    if runtime == "charliecloud":
        return ["ch-run", "--home", "--set-env", image, "--"]
    return [RUNTIME_PROGRAM[runtime], "exec", image]
