"""A batch on the embedded ``local`` profile: the cases go one by one through the local server (see
:mod:`hpcseg.batch`), so a small study works without a cluster. Same staging, outputs, report and resume: a case
already collected is skipped; a case that fails is tried once more, then reported with the server's reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .batchworker import MAX_ATTEMPTS
from .errors import HpcsegError


def run_through_server(batch: Any, *, on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Segment every pending case of ``batch`` on the profile's (local) server; returns when none is left."""
    from . import imaging
    from .serverjobs import ServerConnection

    st = batch.state
    staging = batch.out_dir / ".hpcseg-batch" / "staging"
    st["submitted"] = st.get("submitted") or time.time()
    batch.save()
    with ServerConnection(batch.profile, jobs=batch.jobs) as conn:
        for key in batch.keys("pending"):
            staged = staging / f"{key}.hsv"
            reason = ""
            for _attempt in range(MAX_ATTEMPTS):
                t0 = time.monotonic()
                try:
                    image = imaging.decode(staged.read_bytes(), imaging.CONTENT_TYPE_ZSTD)
                    res = conn.client.segment(image, model=st["model"], labels=st["labels"] or None,
                                              fast=st["fast"])
                except (HpcsegError, OSError, ValueError) as exc:
                    reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                    continue
                mask, names, version = res
                batch.store_result(key, mask, {"labels": names, "model_version": version,
                                               "seconds": round(time.monotonic() - t0, 3),
                                               "warnings": list(res.warnings)})
                staged.unlink(missing_ok=True)
                break
            else:
                batch.fail(key, f"{reason} (tried {MAX_ATTEMPTS} times)")
                batch.save()
                batch.write_report()
            if on_progress:
                on_progress(batch.summary())
    st["finished"] = True
    batch.save()
