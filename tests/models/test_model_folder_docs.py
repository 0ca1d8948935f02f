"""docs/model-folders.md (issue 13, point 4) stays in step with the code: every manifest key documented, every
worked example a valid manifest."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from hpcseg.server.crop import check_crop
from hpcseg.server.modelbase import ModelManifest

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "model-folders.md"


def test_every_manifest_key_is_documented():
    text = DOC.read_text()
    for f in fields(ModelManifest):
        assert f"| `{f.name}` |" in text, f"manifest key {f.name} is not in {DOC.name}"
    for key in ("orientation", "crop", "expect", "threshold", "fast", "sliding_window"):
        assert f"| `{key}` |" in text, f"extra.{key} is not in {DOC.name}"
    for key in ("threshold", "margin_mm", "resize"):
        assert key in text
    assert "(1, 1, X, Y, Z)" in text  # the axis order a network receives
    assert "docs/model-folders.md" in (DOC.parent.parent / "README.md").read_text()


def test_worked_examples_are_valid_manifests():
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)]
    assert len(blocks) == 2  # TorchScript, state dict (the bundle example needs no manifest)
    kinds = set()
    for data in blocks:
        m = ModelManifest.from_dict(data, source="docs example")
        check_crop(m.extra.get("crop"))
        kinds.add("torchscript" if m.network is None else "state dict")
    assert kinds == {"torchscript", "state dict"}
    assert "Worked example 3: a MONAI bundle" in DOC.read_text()
