"""A static check of the module against Slicer's own source: every slicer./qt./ctk. name HPCSeg.py and HPCSegUI use
(and the members they call on Slicer's objects) was found in Slicer 5.10.0 and 5.12.0 (slicer_api.json, written by
extract_slicer_api.py from a clone of github.com/Slicer/Slicer). A name only newer releases have may be used only
where the module checked the version first."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from . import extract_slicer_api as extract

DATA = json.loads(extract.OUT.read_text(encoding="utf-8"))
#: names newer than the oldest supported Slicer, and the only function allowed to use each
GUARDED = {"slicer.packaging": "_pipEnsure"}


def _function_of(path: Path, line: int) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = ""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.lineno <= line <= (node.end_lineno or node.lineno):
            inner = node.name  # ast.walk goes outside-in: the last match is the innermost function
    return inner


def test_the_data_says_where_it_came_from():
    assert DATA["source"] == "https://github.com/Slicer/Slicer"
    assert set(DATA["tags"]) == set(extract.TAGS) and all(re.fullmatch(r"[0-9a-f]{40}", c) for c in
                                                           DATA["tags"].values())


def test_every_slicer_qt_ctk_name_the_module_uses_exists_in_the_supported_releases():
    used = extract.all_used()
    assert {"slicer.util.errorDisplay", "slicer.app.majorVersion", "qt.QTimer", "ctk.ctkSettingsPanel.__init__"} \
        <= set(used)  # the extraction sees the module's names
    unknown = sorted(set(used) - set(DATA["names"]))
    assert not unknown, f"not in slicer_api.json (rerun extract_slicer_api.py against Slicer's source): {unknown}"
    for name, places in used.items():
        where = DATA["names"][name]
        if set(where) == set(extract.TAGS):
            continue
        assert extract.TAGS[0] not in where, name
        for place in places:  # a newer name: only in the function that runs after the version check
            file, line = place.rsplit(":", 1)
            assert _function_of(extract.MODULE_DIR / file, int(line)) == GUARDED.get(name), \
                f"{name} is missing in Slicer {extract.TAGS[0]} but used at {place} without a version check"


def test_pip_ensure_is_only_reached_on_slicer_5_12_and_later():
    assert DATA["names"]["slicer.packaging"].keys() == {"v5.12.0"}  # not in 5.10.0: the point 3
    source = (extract.MODULE_DIR / "HPCSeg.py").read_text()
    call = source.index("self._pipEnsure(reqs)")
    assert 'install_method(slicer.app.majorVersion, slicer.app.minorVersion) == "pip_ensure"' in \
        source[source.rindex("\n        if ", 0, call):call]


def test_every_member_the_module_calls_on_slicer_objects_exists_in_the_supported_releases():
    text = "\n".join(f.read_text(encoding="utf-8") for f in extract.module_files())
    assert set(DATA["members"]) == {f"{c}.{m}" for c, ms in extract.MEMBERS.items() for m in ms}
    for member, where in DATA["members"].items():
        assert set(where) == set(extract.TAGS), member
        assert f".{member.split('.')[1]}" in text, f"{member} is listed but the module does not use it"
