"""The command line with a fault injected where a test wants one: ``python -m fault_cli <fault> <overrides>``.

Faults (each hits the ``sft`` stage only, so data_prep finishes first):
- ``kill-model-save``: SIGKILL once the model is written to its temp dir, before the rename into place;
- ``kill-manifest`` / ``kill-done``: SIGKILL once manifest.json / DONE is written to its temp file,
  before the rename;
- ``no-space``: the model save fails with ENOSPC after writing part of a file;
- ``read-only``: creating any directory under the store fails with EROFS.
A SIGKILL runs no cleanup (no ``finally``), as a real kill or power loss does.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path


def _in_sft(path) -> bool:
    return any(part.startswith("sft-") for part in Path(path).parts)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str, patch=setattr) -> None:
    """Inject ``fault`` by ``patch(owner, name, value)``: ``setattr`` in the CLI process, a test's
    ``monkeypatch.setattr`` in process (undone after the test)."""
    import align_runner.models.loading as loading

    if fault == "kill-model-save":
        replace_dir = loading._replace_dir

        def killing_replace_dir(src, dst):
            if _in_sft(dst) and Path(dst).name == "model":
                _kill()
            return replace_dir(src, dst)

        patch(loading, "_replace_dir", killing_replace_dir)
    elif fault in ("kill-manifest", "kill-done"):
        target, replace = ("manifest.json" if fault == "kill-manifest" else "DONE"), os.replace

        def killing_replace(src, dst, **kw):
            if _in_sft(dst) and Path(dst).name == target:
                _kill()
            return replace(src, dst, **kw)

        patch(os, "replace", killing_replace)
    elif fault == "no-space":
        from transformers import PreTrainedModel

        def full_disk(self, save_directory, **_):
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 1024)  # part of a file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        patch(PreTrainedModel, "save_pretrained", full_disk)
    elif fault == "read-only":
        mkdir = Path.mkdir

        def read_only_mkdir(self, *a, **kw):
            if "store" in self.parts:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return mkdir(self, *a, **kw)

        patch(Path, "mkdir", read_only_mkdir)
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from align_runner.cli import main

    sys.argv = ["align_runner", *sys.argv[2:]]
    main()
