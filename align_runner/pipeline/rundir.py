"""A run dir's view of the stage store: ``<run_dir>/stages/<name>`` links to each stage's store dir.

The links are relative (``stages/sft -> ../../../store/sft-<key12>``), so moving ``outputs/`` as a
whole keeps them working. ``run.json`` also records each stage's absolute store dir, so a run dir
copied elsewhere with ``cp -r`` (links copied as they are, now pointing nowhere) still finds its stages
while the store stays where it was. ``cp -rL`` copies the stages themselves: that copy needs no store.
Relative links rather than copies or hard links: a cache hit costs nothing, and a stage shared by many
runs of a sweep is stored once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STAGES_DIR = "stages"
RUN_MANIFEST = "run.json"


def link_stage(run_dir: Path, name: str, target: Path) -> Path:
    """Point ``<run_dir>/stages/<name>`` at ``target`` by a relative symlink (replacing an old one)."""
    link = Path(run_dir) / STAGES_DIR / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    # both sides resolved, so a run dir reached through a symlinked path still gets a working link
    link.symlink_to(os.path.relpath(Path(target).resolve(), link.parent.resolve()), target_is_directory=True)
    return link


def stage_dir(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """The dir of one stage of a run (``record``: its entry in run.json): the run's own link when it
    resolves (a moved ``outputs/``, a ``cp -rL`` copy), else the recorded store dir (a ``cp -r`` copy
    elsewhere). When neither exists, the link's path, which the caller finds missing."""
    link = Path(run_dir) / STAGES_DIR / str(record["name"])
    if link.exists():
        return link
    recorded = Path(str(record.get("dir", "")))
    return recorded if record.get("dir") and recorded.exists() else link
