"""Metric sinks: ``metrics.jsonl`` always, TensorBoard and W&B when ``tracking.backends`` names them.

Only the main process writes. Each row carries the stage name and step so one file per stage can be
plotted or diffed without the tracker that produced it. A stage that is computed again starts a fresh
``metrics.jsonl``; a resumed one gets back the rows saved with its checkpoint, so the file ends equal
to an uninterrupted run's (but for timing fields).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from align_runner.fsutil import atomic_write_json
from align_runner.redact import redact

log = logging.getLogger("align_runner")

KNOWN_BACKENDS = ("tensorboard", "wandb")
HISTORY = "metrics.jsonl"


def job_identity(run_name: str) -> tuple[str, str | None]:
    """Default tracker (run name, group) from the Hydra job; ``(run_name, None)`` outside Hydra.

    A single run is named after its run dir (``<date>_<time>``) and grouped by the Hydra job name; a
    sweep job is named ``<sweep>-<job num>`` and grouped by its sweep, so W&B shows a sweep together.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if str(hc.mode) == "RunMode.MULTIRUN":
                sweep = Path(hc.sweep.dir)
                return f"{sweep.parent.name}_{sweep.name}-{hc.job.num}", f"{sweep.parent.name}_{sweep.name}"
            out = Path(hc.runtime.output_dir)
            return f"{out.parent.name}_{out.name}", str(hc.job.name)
    except (ImportError, ValueError, AttributeError):
        pass
    return run_name, None


class Tracker:
    def __init__(
        self,
        out_dir: Path,
        *,
        stage: str,
        enabled: bool,
        backends: list[str] | tuple[str, ...] = (),
        project: str = "align_runner",
        run_name: str | None = None,
        group: str | None = None,
        config: dict[str, Any] | None = None,
        api_key: str | None = None,
    ):
        self.stage = stage
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / HISTORY
        self._tb = self._wandb = None
        unknown = [b for b in backends if b not in KNOWN_BACKENDS]
        if unknown:
            raise ValueError(f"tracking.backends: unknown {unknown}; valid: {list(KNOWN_BACKENDS)}")
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # rows of an earlier, interrupted attempt: a resume restores the ones its checkpoint covers
        self.path.unlink(missing_ok=True)
        name = f"{run_name or 'run'}/{stage}"
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if "wandb" in backends:
            self._wandb = _init_wandb(self.out_dir, project, name, group, config, api_key)
        if backends:
            self._write_identity(list(backends), project, name, group)

    def _write_identity(self, backends: list[str], project: str, name: str, group: str | None) -> None:
        """Where this stage's runs went (run name, group, W&B folder), for people and tests."""
        atomic_write_json(
            self.out_dir / "tracking.json",
            {"backends": backends, "project": project, "run_name": name, "group": group,
             "wandb_dir": str(Path(self._wandb.dir).parent) if self._wandb is not None else None},
        )

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": time.time()}
        row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{self.stage}/{k}", float(v), step)
        if self._wandb is not None:
            self._wandb.log({f"{self.stage}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def restore_history(self, checkpoint_dir: Path) -> None:
        """Make ``metrics.jsonl`` the rows saved with a checkpoint (those up to its step)."""
        if not self.enabled:
            return
        saved = Path(checkpoint_dir) / HISTORY
        if saved.exists():
            shutil.copyfile(saved, self.path)
        else:
            self.path.unlink(missing_ok=True)

    def log_text(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(out_dir: Path, project: str, name: str, group: str | None, config: Any, api_key: str | None):
    import wandb

    # W&B reads WANDB_MODE (offline works) and WANDB_API_KEY itself; a key given in the config goes
    # in through settings only, never into the logged config (which is redacted as well).
    settings = wandb.Settings(api_key=api_key) if api_key else None
    return wandb.init(
        project=project,
        name=name,
        group=group,
        dir=str(out_dir),
        config=redact(config) if config is not None else None,
        settings=settings,
        reinit="create_new",
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (empty list when the file does not exist)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
