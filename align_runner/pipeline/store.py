"""The content-addressed stage store.

``<store>/<kind>-<key12>/`` holds ``manifest.json``, ``model/``, ``metrics.jsonl``, ``ckpt/`` (step
checkpoints while the stage runs) and a ``DONE`` marker written last, atomically. A directory without
``DONE`` is an unfinished stage: it is never read as a result, only resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from align_runner.fsutil import atomic_write_json, atomic_write_text

DONE = "DONE"
MANIFEST = "manifest.json"


class StageStore:
    """Directory layout and locking of the store; knows nothing about what stages compute."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def stage_dir(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key[:12]}"

    def is_done(self, kind: str, key: str) -> bool:
        return (self.stage_dir(kind, key) / DONE).exists()

    def lock(self, kind: str, key: str) -> FileLock:
        """Lock held while a stage computes: parallel sweep jobs needing the same key wait and reuse."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{kind}-{key[:12]}.lock"))

    def begin(self, kind: str, key: str, *, force: bool) -> Path:
        """Prepare the stage dir for computing. ``force`` discards a finished result and checkpoints."""
        d = self.stage_dir(kind, key)
        if force and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def finish(self, kind: str, key: str, manifest: dict[str, Any]) -> None:
        """Write the manifest, drop step checkpoints, then the DONE marker — last, atomically."""
        d = self.stage_dir(kind, key)
        atomic_write_json(d / MANIFEST, manifest)
        shutil.rmtree(d / "ckpt", ignore_errors=True)
        atomic_write_text(d / DONE, key + "\n")

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(kind, key) / MANIFEST).read_text())
