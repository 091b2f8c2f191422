"""Content fingerprints of model directories: a local base model enters stage keys by what it holds.

The same checkpoint saved in two places (a user's ``save_pretrained`` dir, the TRL facade's copy of an
in-memory model) gives one key, and a checkpoint overwritten in place gives a new one (DESIGN §3).

Hashing a multi-GB checkpoint takes seconds to minutes, and every run plans its keys, so each file's
digest is kept in ``<paths.cache>/fingerprints.json`` under its absolute path, size and mtime: a file
is read again only when one of those changed (an overwrite changes its mtime).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from align_runner.fsutil import atomic_write_json

LOCAL_SOURCE = "align_runner.models.loading.hub_or_local"
DIGEST_CACHE = "fingerprints.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_fingerprint(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 hex over every non-hidden file under ``path``: its relative name, size and digest.
    With ``cache_dir``, file digests are reused from (and added to) its digest cache."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    cache_file = Path(cache_dir) / DIGEST_CACHE if cache_dir is not None else None
    cache = _read_cache(cache_file)
    known = dict(cache)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        entry = [stat.st_size, stat.st_mtime_ns]
        cached = cache.get(str(file))
        if cached is None or cached[:2] != entry:
            cache[str(file)] = [*entry, file_digest(file)]
        digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0{cache[str(file)][2]}\0".encode())
    if cache_file is not None and cache != known:
        _write_cache(cache_file, cache)
    return digest.hexdigest()


def _read_cache(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}  # none yet, or unreadable: hash again (it is only a cache)


def _write_cache(path: Path, cache: dict[str, list]) -> None:
    # entries of deleted files would only grow the file
    live = {name: entry for name, entry in cache.items() if Path(name).exists()}
    try:
        atomic_write_json(path, live)
    except OSError:
        pass  # a read-only or full cache dir costs a rehash next run, nothing else


def source_fingerprint(source: Mapping[str, Any], cache_dir: str | Path | None = None) -> dict[str, Any]:
    """``source`` (a resolved ``model.source`` node) as a key sees it: an existing local directory given
    to ``hub_or_local`` is replaced by its content fingerprint; any other source (a hub id with its
    ``revision``, a builder) is kept as it is."""
    path = source.get("name_or_path") if source.get("_target_") == LOCAL_SOURCE else None
    if path is None or not Path(str(path)).expanduser().is_dir():
        return dict(source)
    return {**source, "name_or_path": {"content": dir_fingerprint(Path(str(path)).expanduser(), cache_dir)}}
