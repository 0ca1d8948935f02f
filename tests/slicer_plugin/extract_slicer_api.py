"""Every ``slicer.``/``qt.``/``ctk.`` name the HPCSeg module uses, found in Slicer's own source at each supported
release: writes ``slicer_api.json`` next to this file (the static check in test_slicer_api.py reads it).

Slicer cannot run on the machines that test hpcseg, so the names are checked against Slicer's source instead:
for each name, where it is defined (``def``/``class`` in Slicer's Python package, a Q_PROPERTY, method or signal
in a C++ header that PythonQt wraps) or, failing that, where Slicer's own Python code uses the same dotted name
(proof that PythonQt exposes it in that release, which is how ``qt.QTimer`` or ``ctk.ctkCollapsibleButton`` are
found). A name found in none of the releases is reported and the file is not written.

Run it against a bare clone of github.com/Slicer/Slicer (any clone with the release tags)::

    python tests/slicer_plugin/extract_slicer_api.py /path/to/Slicer.git
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer_plugin" / "HPCSeg"
OUT = Path(__file__).with_name("slicer_api.json")
TAGS = ("v5.10.0", "v5.12.0")  # the oldest supported release and the first with slicer.packaging
ROOTS = ("slicer", "qt", "ctk")
#: Python modules of Slicer's own package, where ``slicer.<module>.<name>`` is defined
PY_MODULES = {"util": "Base/Python/slicer/util.py", "packaging": "Base/Python/slicer/packaging.py",
              "ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py"}
#: C++ headers behind ``slicer.app`` (PythonQt wraps their Q_PROPERTYs, slots, signals and decorators)
APP_HEADERS = ("Base/QTCore/qSlicerCoreApplication.h", "Base/QTGUI/qSlicerApplication.h",
               "Base/QTCore/qSlicerBaseQTCorePythonQtDecorators.h")


#: members the module calls on Slicer objects (not reachable as slicer.X.Y), by the class that declares them;
#: found in that class's header (``*/Class.h``), else as ``.member`` in Slicer's own Python (CTK's classes)
MEMBERS: dict[str, tuple[str, ...]] = {
    "qSlicerMarkupsPlaceWidget": ("setPlaceModeEnabled", "setCurrentNode", "placeMultipleMarkups"),
    "qMRMLNodeComboBox": ("nodeTypes", "addEnabled", "removeEnabled", "noneEnabled", "currentNode",
                          "setCurrentNode"),
    "qSlicerWidget": ("setMRMLScene",),
    "qSlicerCoreCommandOptions": ("noMainWindow",),
    "ctkSettingsPanel": ("registerProperty",),
    "ctkSettingsDialog": ("addPanel",),
    "vtkMRMLMarkupsNode": ("GetNumberOfControlPoints", "GetNthControlPointPositionStatus",
                           "GetNthControlPointPositionWorld", "PositionDefined"),
    "vtkMRMLMarkupsDisplayNode": ("SetSelectedColor",),
    "vtkMRMLDisplayableNode": ("CreateDefaultDisplayNodes", "GetDisplayNode"),
    "vtkMRMLSegmentationNode": ("SetReferenceImageGeometryParameterFromVolumeNode", "GetSegmentation"),
    "vtkSegmentation": ("GetSegmentIdBySegmentName", "AddEmptySegment", "GetNthSegmentID", "GetNumberOfSegments",
                        "GetSegment", "GetNthSegment"),
    "vtkSegment": ("GetName",),
    "vtkMRMLVolumeNode": ("GetImageData", "GetIJKToRASMatrix"),
    "vtkMRMLTransformableNode": ("GetParentTransformNode",),
    "vtkMRMLNode": ("GetID", "GetName"),
}


def module_files() -> list[Path]:
    """The files of the module that run inside Slicer (HPCSegLib never imports slicer, qt or ctk)."""
    return [MODULE_DIR / "HPCSeg.py", *sorted((MODULE_DIR / "HPCSegUI").glob("*.py"))]


def used_names(path: Path) -> dict[str, list[int]]:
    """Dotted names rooted at slicer/qt/ctk (attribute chains, and ``from slicer.x import y``) → line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: dict[str, list[int]] = {}

    def add(name: str, line: int) -> None:
        out.setdefault(name, []).append(line)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ROOTS:
            for alias in node.names:
                add(f"{node.module}.{alias.name}", node.lineno)
        elif isinstance(node, ast.Attribute):
            parts = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in ROOTS:
                add(".".join([cur.id, *reversed(parts)]), node.lineno)
    # keep the longest chains only: slicer.util.errorDisplay covers slicer.util
    longest = {n: lines for n, lines in out.items() if not any(o.startswith(n + ".") for o in out)}
    return longest


def all_used() -> dict[str, list[str]]:
    """Every name used by the module → ``file:line`` places."""
    names: dict[str, list[str]] = {}
    for f in module_files():
        for name, lines in used_names(f).items():
            names.setdefault(name, []).extend(f"{f.relative_to(MODULE_DIR)}:{n}" for n in lines)
    return dict(sorted(names.items()))


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], capture_output=True, text=True).stdout


def _grep(repo: str, tag: str, pattern: str, paths: tuple[str, ...], fixed: bool = False) -> str | None:
    """``path:line`` of the first match at ``tag``."""
    flag = "-F" if fixed else "-E"
    out = _git(repo, "grep", "-n", flag, "-e", pattern, tag, "--", *paths)
    if not out:
        return None
    path, line = out.splitlines()[0][len(tag) + 1:].split(":", 2)[:2]  # "tag:path:line:text"
    return f"{path}:{line}"


def locate(repo: str, tag: str, name: str) -> str | None:
    """Where Slicer's source at ``tag`` defines (or, for Qt/CTK classes, uses) ``name``."""
    parts = name.split(".")
    if parts[0] == "slicer" and len(parts) >= 2 and parts[1] in PY_MODULES:
        path = PY_MODULES[parts[1]]
        if not _git(repo, "cat-file", "-t", f"{tag}:{path}").strip():
            return None
        if len(parts) == 2:
            return f"{path}:1"
        return _grep(repo, tag, rf"^(def|class) {re.escape(parts[2])}\b", (path,))
    if parts[:2] == ["slicer", "app"] and len(parts) == 3:
        found = (_grep(repo, tag, name, ("*.py",), fixed=True)
                 or _grep(repo, tag, rf"(Q_PROPERTY\(.*\b{re.escape(parts[2])}\b|\b{re.escape(parts[2])}\()",
                          APP_HEADERS))
        if not found and parts[2] in ("connect", "disconnect"):  # PythonQt's on every QObject, by signal name
            found = _grep(repo, tag, f'.{parts[2]}("', ("Base/Python/*.py",), fixed=True)
        if found:
            return found
    if parts[0] == "slicer" and len(parts) == 3 and parts[1][:1] in ("q", "v"):  # a wrapped class's member
        found = _grep(repo, tag, rf"\b{re.escape(parts[2])}\b", (f"*/{parts[1]}.h",))
        if found:
            return found
    # Used under the same dotted name by Slicer's own Python code (PythonQt exposes it in that release)
    found = _grep(repo, tag, name, ("*.py",), fixed=True)
    if found or parts[0] != "qt" or len(parts) != 3:
        return found
    # A Qt enum value no Python file of Slicer's uses: Slicer's C++ uses it (PythonQt wraps Qt's enums)
    return _grep(repo, tag, f"{parts[1]}::{parts[2]}", ("*.cxx", "*.h"), fixed=True)


def locate_member(repo: str, tag: str, cls: str, member: str) -> str | None:
    return (_grep(repo, tag, rf"\b{re.escape(member)}\b", (f"*/{cls}.h",))
            or _grep(repo, tag, f".{member}", ("*.py",), fixed=True))


def main(repo: str) -> int:
    used = all_used()
    tags = {t: _git(repo, "rev-list", "-n1", t).strip() for t in TAGS}
    names: dict[str, dict[str, str]] = {}
    missing = []
    for name in used:
        where = {t: loc for t in TAGS if (loc := locate(repo, t, name))}
        if not where:
            missing.append(name)
        names[name] = where
    members: dict[str, dict[str, str]] = {}
    for cls, ms in MEMBERS.items():
        for m in ms:
            where = {t: loc for t in TAGS if (loc := locate_member(repo, t, cls, m))}
            if len(where) != len(TAGS):
                missing.append(f"{cls}.{m} (at {sorted(set(TAGS) - set(where))})")
            members[f"{cls}.{m}"] = where
    if missing:
        print("not found in Slicer's source at any supported release:", *missing, sep="\n  ")
        return 1
    data = {"about": "Every slicer./qt./ctk. name the HPCSeg module uses, and where Slicer's own source defines or "
                     "uses it at each release (path:line). Written by tests/slicer_plugin/extract_slicer_api.py "
                     "from a clone of https://github.com/Slicer/Slicer; checked by test_slicer_api.py.",
            "source": "https://github.com/Slicer/Slicer", "tags": tags, "names": names, "members": members}
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(names)} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
