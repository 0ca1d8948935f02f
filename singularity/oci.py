"""The OCI (Docker) twin of ``hpcseg-server.def``: one recipe, two builders, no drift.

``hpcseg-server.def`` is the source. This script translates it into ``Dockerfile`` (checked in next to it, so a
site with Docker or Podman needs no Python to build) and a test (``tests/test_image_recipe.py``) fails when the
checked-in file differs from a fresh translation. It also prints the ``%test`` command, which the OCI build runs
in the built image (``singularity/build.sh``), since a Dockerfile has no test section.

Translation (the .def may use only what maps one to one; anything else is refused, naming the line):

    Bootstrap: docker / From: X     FROM X            ({{ NAME }} becomes ${NAME})
    %arguments NAME=VALUE           ARG NAME=VALUE    (before FROM: a build argument, e.g. the base image)
    %labels KEY VALUE               LABEL KEY="VALUE"
    %files SRC DST                  COPY SRC DST      (SRC relative to the build context: the repository root)
    %post lines                     RUN line && line
    %environment export K=V         ENV K=V           (after RUN: like Apptainer, only at run time)
    %runscript exec CMD... "$@"     ENTRYPOINT ["CMD", ...]
    %test lines                     LABEL org.hpcseg.test="..." (run by build.sh after the build)

Usage::

    python3 singularity/oci.py            # print the Dockerfile
    python3 singularity/oci.py --write    # rewrite singularity/Dockerfile
    python3 singularity/oci.py --check    # exit 1 if singularity/Dockerfile is stale
    python3 singularity/oci.py --test-command
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEF = HERE / "hpcseg-server.def"
DOCKERFILE = HERE / "Dockerfile"
SECTIONS = ("arguments", "labels", "files", "post", "environment", "runscript", "test")
_ARG_REF = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class RecipeError(ValueError):
    """The .def uses something that has no one-to-one Dockerfile twin."""


def parse_def(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The header (``Bootstrap``, ``From``) and each section's lines (stripped, comments and blanks dropped)."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%"):
            current = line[1:].split()[0]
            if current not in SECTIONS:
                raise RecipeError(f"line {n}: section %{current} has no Dockerfile twin in oci.py")
            sections.setdefault(current, [])
        elif current is None:
            key, sep, value = line.partition(":")
            if not sep:
                raise RecipeError(f"line {n}: header line without 'Key: value': {line!r}")
            header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, sections


def _subst(value: str) -> str:
    return _ARG_REF.sub(lambda m: "${" + m.group(1) + "}", value)


def dockerfile(text: str) -> str:
    """The Dockerfile for a .def's text."""
    header, sec = parse_def(text)
    if header.get("Bootstrap") != "docker" or not header.get("From"):
        raise RecipeError("the .def must start from a container image: 'Bootstrap: docker' and 'From: IMAGE'")
    out = ["# GENERATED from singularity/hpcseg-server.def by singularity/oci.py: edit the .def, then run",
           "#     python3 singularity/oci.py --write",
           "# Build from a context laid out like the repository root (dist/ with hpcseg's wheel, singularity/):",
           "#     bash singularity/build.sh            (stages the context, builds, runs the %test twin)", ""]
    for line in sec.get("arguments", []):
        name, sep, _ = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RecipeError(f"%arguments: expected NAME=VALUE, got {line!r}")
        out.append(f"ARG {line}")
    out.append(f"FROM {_subst(header['From'])}")
    for line in sec.get("labels", []):
        key, _, value = line.partition(" ")
        out.append(f"LABEL {key}={json.dumps(value.strip())}")
    for line in sec.get("files", []):
        parts = line.split()
        if len(parts) != 2:
            raise RecipeError(f"%files: expected 'SRC DST', got {line!r}")
        out.append(f"COPY {parts[0]} {parts[1]}")
    if sec.get("post"):
        out.append("RUN " + " \\\n && ".join(sec["post"]))
    for line in sec.get("environment", []):
        m = re.fullmatch(r"export ([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line)
        if not m:
            raise RecipeError(f"%environment: expected 'export NAME=VALUE', got {line!r}")
        out.append(f"ENV {m.group(1)}={m.group(2)}")
    run = sec.get("runscript", [])
    if run:
        words = shlex.split(run[0]) if len(run) == 1 else []
        if not words or words[0] != "exec" or words[-1] != "$@":
            raise RecipeError(f"%runscript: expected one line 'exec CMD ... \"$@\"', got {run!r}")
        out.append("ENTRYPOINT " + json.dumps(words[1:-1]))
    if sec.get("test"):
        out.append(f"LABEL org.hpcseg.test={json.dumps(test_command(text))}")
    return "\n".join(out) + "\n"


def test_command(text: str) -> str:
    """The .def's %test as one shell command (what ``docker run IMAGE sh -c ...`` runs)."""
    return " && ".join(parse_def(text)[1].get("test", [])) or "true"


def main(argv: list[str]) -> int:
    text = DEF.read_text()
    if argv == ["--write"]:
        DOCKERFILE.write_text(dockerfile(text))
    elif argv == ["--check"]:
        if not DOCKERFILE.is_file() or DOCKERFILE.read_text() != dockerfile(text):
            print(f"{DOCKERFILE} is stale: run python3 singularity/oci.py --write", file=sys.stderr)
            return 1
    elif argv == ["--test-command"]:
        print(test_command(text))
    elif not argv:
        sys.stdout.write(dockerfile(text))
    else:
        print(__doc__.split("Usage::")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
