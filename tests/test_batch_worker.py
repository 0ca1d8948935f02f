"""The batch worker (what each array task runs): claims, atomic results, one retry on another task, the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from hpcseg import imaging
from hpcseg.batchworker import Worker, attempts, find_model_folder, main
from hpcseg.errors import ModelLoadError
from hpcseg.phantoms import make_phantom
from hpcseg.server.models import builtin_models_dir, load_model


@pytest.fixture(scope="module")
def ct_body():
    model = load_model(find_model_folder("ct-body", [builtin_models_dir()]), "cpu")
    return model


def make_batch(tmp: Path, good: int, corrupt: bool) -> tuple[Path, list[str]]:
    inputs = tmp / "inputs"
    inputs.mkdir(parents=True)
    items = []
    for i in range(good):
        image, _, _ = make_phantom(i, (48, 48, 24))
        (inputs / f"k{i}.hsv").write_bytes(imaging.encode(image, imaging.CONTENT_TYPE_ZSTD))
        items.append({"key": f"k{i}", "path": str(inputs / f"k{i}.hsv")})
    if corrupt:  # arrived whole but holds no volume: fails on every task
        (inputs / "broken.hsv").write_bytes(b"HSV1" + b"\xff" * 40)
        items.append({"key": "broken", "path": str(inputs / "broken.hsv")})
    batch = tmp / "batch"
    batch.mkdir()
    (batch / "cases.json").write_text(json.dumps({"model": "ct-body", "labels": ["lungs"], "fast": False,
                                                  "tasks": 2, "inputs": items}))
    return batch, [it["key"] for it in items]


def test_a_failed_case_is_retried_once_on_another_task_then_left_with_its_reason(tmp_path, ct_body):
    batch, keys = make_batch(tmp_path, 2, corrupt=True)
    first = Worker(batch, 0, 0, ct_body, "1.0.0").run()
    assert first == {"done": 2, "failed": 1}
    assert Worker(batch, 0, 0, ct_body, "1.0.0").run() == {"done": 0, "failed": 0}  # never retries its own failure
    assert Worker(batch, 0, 1, ct_body, "1.0.0").run() == {"done": 0, "failed": 1}  # another task does, once
    assert Worker(batch, 1, 0, ct_body, "1.0.0").run() == {"done": 0, "failed": 0}  # two attempts: given up
    tried = attempts(batch, "broken")
    assert [(a["round"], a["task"]) for a in tried] == [(0, 0), (0, 1)]
    assert tried[-1]["reason"].startswith(("ImageError", "ValueError", "RuntimeError", "Zstd")), tried[-1]
    assert tried[-1]["log"] == "tasks/0-1/worker.log"
    meta = json.loads((batch / "results" / "k0.json").read_text())
    assert meta["labels"] == {"lungs": 2} and meta["model_version"] == "1.0.0" and meta["seconds"] > 0
    mask = imaging.decode((batch / "results" / "k0.hsv").read_bytes(), imaging.CONTENT_TYPE_ZSTD)
    assert mask.GetSize() == (48, 48, 24)

    assert set(sitk.GetArrayViewFromImage(mask).ravel().tolist()) <= {0, 2}  # --labels lungs: only lungs kept
    assert not [p for p in batch.rglob("*") if p.name.endswith(".tmp")]


def test_claims_are_taken_once_and_name_round_and_attempt(tmp_path, ct_body):
    batch, keys = make_batch(tmp_path, 3, corrupt=False)
    (batch / "claims").mkdir()
    (batch / "claims" / "k1.0.1").write_text("0 5 elsewhere 1 0\n")  # task 5 holds it in round 0
    assert Worker(batch, 0, 0, ct_body, "1").run() == {"done": 2, "failed": 0}
    assert not (batch / "results" / "k1.json").exists()
    assert Worker(batch, 1, 0, ct_body, "1").run() == {"done": 1, "failed": 0}  # round 1: claimed again


def test_main_writes_the_reason_when_the_model_does_not_load(tmp_path):
    batch, _ = make_batch(tmp_path, 1, corrupt=False)
    spec = json.loads((batch / "cases.json").read_text())
    spec["model"] = "nope"
    (batch / "cases.json").write_text(json.dumps(spec))
    assert main(["--batch-dir", str(batch), "--round", "0", "--task", "3", "--device", "cpu"]) == 1
    fatal = (batch / "tasks" / "0-3" / "fatal").read_text()
    assert fatal.startswith("ModelLoadError: no model named 'nope'")
    with pytest.raises(ModelLoadError):
        find_model_folder("nope", [builtin_models_dir()])
