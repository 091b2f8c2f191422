"""Where data_prep's output lives in its stage dir, and reading it back: ``data/<view>-<split>.jsonl``.

The layout sits in the data layer so the stage that writes it (``stages/data_prep``) and the context
every other stage reads it through (``stages/context``) both depend on it, not on each other.
"""

from __future__ import annotations

import json
from pathlib import Path


def prepared_path(stage_dir: Path, view: str, split: str) -> Path:
    return Path(stage_dir) / "data" / f"{view}-{split}.jsonl"


def load_prepared(stage_dir: Path, view: str, split: str) -> list[dict]:
    path = prepared_path(stage_dir, view, split)
    if not path.exists():
        have = sorted(p.stem for p in (Path(stage_dir) / "data").glob("*.jsonl"))
        raise FileNotFoundError(
            f"data_prep produced no {view!r} rows for split {split!r} (have: {have}); "
            f"configure data.{view}.{split} in the data config"
        )
    with path.open() as f:
        return [json.loads(line) for line in f]

