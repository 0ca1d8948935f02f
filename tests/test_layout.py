"""The package's import arrows point one way (issue 13, point 17): the model interface imports no implementation,
and no implementation imports the loader."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "hpcseg" / "server"
IMPLEMENTATIONS = ("bundle", "network_models", "classical_models", "interactive_models", "inference")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_model_implementations_do_not_import_the_loader():
    for name in IMPLEMENTATIONS:
        imported = _imported_modules(SERVER / f"{name}.py")
        assert "hpcseg.server.models" not in imported, f"{name}.py imports hpcseg.server.models (a cycle)"


def test_modelbase_imports_no_model_implementation():
    imported = _imported_modules(SERVER / "modelbase.py")
    assert not {f"hpcseg.server.{n}" for n in (*IMPLEMENTATIONS, "models")} & imported
    out = subprocess.run([sys.executable, "-c", "import sys, hpcseg.server.modelbase; "
                          "print(' '.join(m for m in sys.modules if m.startswith('hpcseg.server.')))"],
                         capture_output=True, text=True, check=True, cwd=SERVER.parent.parent).stdout.split()
    assert out == ["hpcseg.server.modelbase"]


def test_imaging_is_split_by_responsibility():
    import hpcseg.imaging as imaging

    assert Path(imaging.__file__).name == "__init__.py"
    for name in ("reading", "dicom", "writing", "segmeta", "qa", "geometry", "codecs"):
        assert (Path(imaging.__file__).parent / f"{name}.py").is_file()
    longest = max(len(p.read_text().splitlines()) for p in Path(imaging.__file__).parent.glob("*.py"))
    assert longest < 400, "an imaging module grew past ~400 lines: split it"
