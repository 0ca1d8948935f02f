"""Hostile values and helpers for the template tests (imported by conftest.py and the test modules).

``HOSTILE_FRAGMENTS`` are the pieces a careless template would let through: command substitution, separators,
quotes of both kinds, backslashes, newlines, globs, tildes, leading dashes, non-ASCII. Any of the injections, if
it ever ran, would create a file named ``CANARY`` in the job's working directory.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

from hypothesis import strategies as st

from hpcseg.config import Profile
from hpcseg.templates import build_context

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
FAKE_RUNTIME = HERE / "fake-singularity"

HOSTILE_FRAGMENTS = [
    "$(touch CANARY)", "`touch CANARY`", "; touch CANARY", "&& touch CANARY", "|| touch CANARY", "| touch CANARY",
    "\ntouch CANARY\n", "\rtouch CANARY", "'; touch CANARY; '", "\"; touch CANARY; \"", "$(touch${IFS}CANARY)",
    "'", '"', "\\", "\\'", "\\\"", "'\"'\"'", "$'\\n'", "\n", "\r\n", "\t", " ", "  ", "*", "?", "[a-z]", "{a,b}",
    "~", "~root", "~/", "-", "--", "-rf", "--help", "-n", "$HOME", "${HOME}", "$((1+1))", "$0", "$@", "!", "!!",
    "#", "# comment", "<", ">", "2>&1", ">/dev/null", "&", "%s", "%n", "\\0", "é", "ü", "日本語", "🙂", "\u200b",
    "\x1b[31m", "\x7f", "\x01", "=", "A=b", "IFS=x", "()", "{ :; }", "#SBATCH --x", "EOF", "<<EOF", "\\\n",
]

# Hypothesis: text without NUL (no argument or script can hold one) and without surrogates (not encodable).
_chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_FRAGMENTS),
    st.lists(st.one_of(st.sampled_from(HOSTILE_FRAGMENTS), st.text(_chars, max_size=4)), min_size=1,
             max_size=6).map("".join),
    st.text(_chars, max_size=24),
)
hostile_nonempty = hostile_text.filter(bool)


def hostile_words(n: int, seed: int = 20240601) -> list[str]:
    """``n`` deterministic hostile words (fragments, their combinations, random Unicode), some empty."""
    rng = random.Random(seed)
    words = list(HOSTILE_FRAGMENTS)
    while len(words) < n:
        parts = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.6:
                parts.append(rng.choice(HOSTILE_FRAGMENTS))
            else:
                parts.append("".join(chr(rng.choice([rng.randint(1, 127), rng.randint(128, 0xD7FF),
                                                     rng.randint(0xE000, 0x10FFFF)]))
                                     for _ in range(rng.randint(0, 4))))
        words.append("".join(parts))
    return words[:n]


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(stat.S_IRWXU)
    return path


def local_context(template: str, job_dir: Path, work_dir: Path, params: dict | None = None, **fields) -> dict:
    """A context for running a script here (the local scheduler), job and work dirs made."""
    os.makedirs(job_dir, exist_ok=True)
    prof = Profile(name="t", scheduler="local", gpus=0, work_dir=str(work_dir), **fields)
    return build_context(prof, template=template, job_dir=str(job_dir), work_dir=str(work_dir), job_name="t",
                         params=params or {})


def canaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*CANARY*") if p.name.startswith("CANARY")]
