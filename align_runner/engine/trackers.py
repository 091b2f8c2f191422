"""Metric sinks: ``metrics.jsonl`` always, TensorBoard and W&B when ``tracking.backends`` names them.

Only the main process writes. Each row carries the stage name and step so one file per stage can be
plotted or diffed without the tracker that produced it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("align_runner")

KNOWN_BACKENDS = ("tensorboard", "wandb")


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
    ):
        self.stage = stage
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        unknown = [b for b in backends if b not in KNOWN_BACKENDS]
        if unknown:
            raise ValueError(f"tracking.backends: unknown {unknown}; valid: {list(KNOWN_BACKENDS)}")
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        if "wandb" in backends:
            import wandb

            # W&B reads WANDB_MODE (offline works) and WANDB_API_KEY from the environment; the key
            # never enters our config or manifests.
            self._wandb = wandb.init(
                project=project, name=f"{run_name or 'run'}/{stage}", group=group, config=config, reinit=True
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

    def log_text(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (empty list when the file does not exist)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
