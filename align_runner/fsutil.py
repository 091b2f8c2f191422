"""Atomic file writes (readers see the old file or the new one, never half of either), the names of
their temporaries, and disk errors told in one line.

Every temporary a writer makes carries its pid and ends in a name :data:`TEMP_NAME` matches
(``.<name>.<pid>.<random>.tmp`` here, ``<dir>.tmp-<pid>`` / ``<dir>.old-<pid>`` for model dirs,
``step-N.tmp`` for step checkpoints), so a writer killed mid-write leaves something that is recognised
as a leftover and removed (:func:`remove_temps`) by the next writer of the same place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

# a temporary of an interrupted write: "x.tmp", "x.tmp-<pid>", "x.old-<pid>"
TEMP_NAME = re.compile(r"(\.tmp|\.(tmp|old)-\d+)$")
# errors that say the disk, not the program, is at fault: no space, quota, read-only, permissions
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_temps(root: Path) -> list[Path]:
    """Delete every temporary (:data:`TEMP_NAME`) under ``root``; returns what was deleted.

    Only for a place the caller writes alone (a stage dir under its lock): any temporary there was
    left by a writer that no longer runs."""
    found = sorted(p for p in Path(root).rglob("*") if TEMP_NAME.search(p.name)) if Path(root).is_dir() else []
    removed = []
    for p in found:
        if not p.exists() and not p.is_symlink():
            continue  # inside a temp dir removed just before
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


# safetensors (which writes model weights) reports an OS error as its own exception, whose message
# ends "... (os error 28)"
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error(error: BaseException) -> OSError | None:
    """``error`` as an OSError: itself, or the OS error a library wrapped in its own type."""
    if isinstance(error, OSError):
        return error
    found = _WRAPPED_OS_ERROR.search(str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def disk_error_message(error: OSError, where: str, fallback: Path) -> str | None:
    """One line naming the path and the cause of a disk error (no space, read-only, permission), or
    None when ``error`` is some other OSError. A failed ``write()`` carries no file name: ``fallback``
    (the dir being written) stands in."""
    if error.errno not in DISK_ERRNOS:
        return None
    path = error.filename or fallback
    cause = error.strerror or os.strerror(error.errno)
    return (
        f"{where}: cannot write {path}: {cause} [{errno.errorcode[error.errno]}]; free space or fix the "
        "permissions (or point paths.outputs / paths.store elsewhere) and rerun: finished stages are reused"
    )
