"""Content fingerprints of model directories: a local base model enters stage keys by what it holds.

The same checkpoint saved in two places (a user's ``save_pretrained`` dir, the TRL facade's copy of an
in-memory model) gives one key, and a checkpoint overwritten in place gives a new one (DESIGN §3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# digests by (path, every file's name, size and mtime): hashing a large checkpoint once per process
_MEMO: dict[tuple, str] = {}
LOCAL_SOURCE = "align_runner.models.loading.hub_or_local"


def dir_fingerprint(path: str | Path) -> str:
    """sha256 hex of every non-hidden file under ``path``: relative name, size and bytes."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    stats = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo = (str(root.resolve()), stats)
    if memo not in _MEMO:
        digest = hashlib.sha256()
        for file, (name, size, _) in zip(files, stats):
            digest.update(f"{name}\0{size}\0".encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _MEMO[memo] = digest.hexdigest()
    return _MEMO[memo]


def source_fingerprint(source: Mapping[str, Any]) -> dict[str, Any]:
    """``source`` (a resolved ``model.source`` node) as a key sees it: an existing local directory given
    to ``hub_or_local`` is replaced by its content fingerprint; any other source is kept as it is."""
    path = source.get("name_or_path") if source.get("_target_") == LOCAL_SOURCE else None
    if path is None or not Path(str(path)).expanduser().is_dir():
        return dict(source)
    return {**source, "name_or_path": {"content": dir_fingerprint(Path(str(path)).expanduser())}}
