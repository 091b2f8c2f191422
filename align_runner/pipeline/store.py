"""The content-addressed stage store.

``<store>/<kind>-<key12>/`` holds ``manifest.json``, ``model/``, ``metrics.jsonl``, ``ckpt/`` (step
checkpoints while the stage runs) and a ``DONE`` marker written last, atomically. A directory without
``DONE`` is an unfinished stage: it is never read as a result, only resumed.

One job computes a stage at a time: it holds ``.locks/<kind>-<key12>.lock`` (an OS file lock, released
by the kernel when its holder dies, so a killed job never blocks the next one; the empty lock file stays
and is reused) and says who it is in ``.locks/<kind>-<key12>.holder`` (pid, host, stage, since), which
a job waiting for the lock logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from align_runner.fsutil import atomic_write_json, atomic_write_text, remove_temps

DONE = "DONE"
MANIFEST = "manifest.json"
CHECKPOINTS = "ckpt"
LOCKS = ".locks"

log = logging.getLogger("align_runner")


class StoreError(RuntimeError):
    """The store cannot be used now (disk full, read-only, a lock wait timed out): one line naming the
    path and the cause. Nothing it leaves behind blocks a rerun."""


class StageStore:
    """Directory layout and locking of the store; knows nothing about what stages compute."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def stage_dir(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key[:12]}"

    def is_done(self, kind: str, key: str) -> bool:
        return (self.stage_dir(kind, key) / DONE).exists()

    def _lock_path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / LOCKS / f"{kind}-{key[:12]}{suffix}"

    def lock(self, kind: str, key: str) -> FileLock:
        """Lock held while a stage computes: parallel sweep jobs needing the same key wait and reuse."""
        path = self._lock_path(kind, key, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def holder(self, kind: str, key: str) -> dict[str, Any] | None:
        """Who holds the stage's lock, as its holder wrote it (None: not written yet, or unreadable)."""
        try:
            return json.loads(self._lock_path(kind, key, ".holder").read_text())
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def computing(self, kind: str, key: str, *, stage: str, timeout: float | None) -> Iterator[None]:
        """Hold the stage's lock while computing it. When another job holds it, log which stage and
        which process (pid, host) that is, then wait: forever (``timeout`` None) or ``timeout``
        seconds, after which a :class:`StoreError` says who still holds it."""
        lock = self.lock(kind, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = _describe(self.holder(kind, key))
            limit = "no limit" if timeout is None else f"at most {timeout:g}s"
            log.info("stage %s (%s) is being computed by %s; waiting for it (%s, pipeline.lock_timeout)",
                     stage, self.stage_dir(kind, key).name, who, limit)
            try:
                lock.acquire(timeout=-1 if timeout is None else timeout)
            except Timeout:
                raise StoreError(
                    f"stage {stage!r}: gave up after {timeout:g}s (pipeline.lock_timeout) waiting for "
                    f"{_describe(self.holder(kind, key))} to finish {self.stage_dir(kind, key)} "
                    f"(lock {lock.lock_file}); rerun when it is done, or stop it"
                ) from None
        holder = self._lock_path(kind, key, ".holder")
        try:
            # written plainly (no temp file): a reader tolerates a half-written one, and a killed
            # holder leaves only this file, which the next holder overwrites
            holder.write_text(json.dumps({"pid": os.getpid(), "host": platform.node(), "stage": stage,
                                          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def begin(self, kind: str, key: str, *, force: bool) -> Path:
        """Prepare the stage dir for computing (under its lock). ``force`` discards a finished result
        and checkpoints; otherwise an earlier attempt's checkpoints and state stay for resuming, and its
        temporaries (a save or write it was killed in) are removed: under the lock no one else writes."""
        d = self.stage_dir(kind, key)
        if force and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        for temp in remove_temps(d):
            log.info("removed %s, left by an interrupted attempt", temp)
        return d

    def finish(self, kind: str, key: str, manifest: dict[str, Any]) -> None:
        """Write the manifest, then the DONE marker (atomically), and only then drop step checkpoints:
        a job killed before DONE resumes from its last checkpoint instead of starting over."""
        d = self.stage_dir(kind, key)
        atomic_write_json(d / MANIFEST, manifest)
        atomic_write_text(d / DONE, key + "\n")
        shutil.rmtree(d / CHECKPOINTS, ignore_errors=True)

    def tidy(self, kind: str, key: str) -> None:
        """Drop what a job killed right after DONE left in a finished stage (its step checkpoints)."""
        d = self.stage_dir(kind, key)
        if (d / CHECKPOINTS).exists():
            with self.lock(kind, key):
                shutil.rmtree(d / CHECKPOINTS, ignore_errors=True)

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(kind, key) / MANIFEST).read_text())


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another process (it has not recorded its pid yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (stage {holder.get('stage')}, since {holder.get('since')})"
