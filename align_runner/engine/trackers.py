"""Metric sinks: ``metrics.jsonl`` in each stage dir always; one TensorBoard / W&B run per pipeline job
when ``tracking.backends`` names them.

Only the main process writes. Each ``metrics.jsonl`` row carries the stage name and step, so one file
per stage can be plotted or diffed without the tracker that produced it. A stage that is computed
again starts a fresh ``metrics.jsonl``; a resumed one gets back the rows saved with its checkpoint, so
the file ends equal to an uninterrupted run's (but for timing fields).

The tracker run (``RunTracker``) belongs to the job, not to a stage: a stage dir is shared by every
job that needs it, a run dir is not. Every stage logs into it under its name (``sft/loss``); a stage
served from the cache, or resumed from a checkpoint, is logged from its ``metrics.jsonl``, so a job
whose SFT was cached still shows SFT's curves.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from align_runner.fsutil import atomic_write_json
from align_runner.redact import redact

log = logging.getLogger("align_runner")

KNOWN_BACKENDS = ("tensorboard", "wandb")
HISTORY = "metrics.jsonl"
# sample generations eval leaves in its stage dir (a JSON list), logged as a table like the online
# stages' engine.online.ROLLOUTS_FILE (JSON lines)
EVAL_SAMPLES = "samples.json"
# metrics.jsonl bookkeeping, not metrics
_ROW_FIELDS = ("stage", "step", "time")


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


class RunTracker:
    """One job's TensorBoard (``<run dir>/tensorboard``) and / or W&B (``<run dir>/wandb``) run.

    The hyperparameters are the job's resolved config (secrets masked) and every stage's key; W&B gets
    them as its config, TensorBoard as hparams (flattened to dotted names) and as YAML text.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        backends: Iterable[str],
        project: str = "align_runner",
        run_name: str = "run",
        group: str | None = None,
        config: Mapping[str, Any] | None = None,
        stage_keys: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ):
        backends = list(backends)
        unknown = [b for b in backends if b not in KNOWN_BACKENDS]
        if unknown:
            raise ValueError(f"tracking.backends: unknown {unknown}; valid: {list(KNOWN_BACKENDS)}")
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = None
        self._wandb_stages: set[str] = set()
        hparams = {"config": redact(dict(config or {})), "stage_keys": dict(stage_keys or {})}
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            _tb_hparams(self._tb, hparams)
        if "wandb" in backends:
            self._wandb = _init_wandb(self.run_dir, project, run_name, group, hparams, api_key)
        atomic_write_json(
            self.run_dir / "tracking.json",
            {"backends": backends, "project": project, "run_name": run_name, "group": group,
             "wandb_dir": str(Path(self._wandb.dir).parent) if self._wandb is not None else None},
        )

    def log(self, stage: str, metrics: Mapping[str, float], *, step: int) -> None:
        """``metrics`` of ``stage`` at its own ``step`` (each stage counts its steps from 1)."""
        values = {f"{stage}/{k}": float(v) for k, v in metrics.items()}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb_step_axis(stage)
            self._wandb.log({f"{stage}/step": step, **values})

    def _wandb_step_axis(self, stage: str) -> None:
        # one W&B step counter per run must only grow, but every stage counts from 1: each stage
        # plots against its own step metric instead
        if stage not in self._wandb_stages:
            self._wandb.define_metric(f"{stage}/step")
            self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._wandb_stages.add(stage)

    def log_history(self, stage: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rows of a ``metrics.jsonl`` (a cached or resumed stage's), at their steps."""
        for row in rows:
            self.log(stage, {k: float(v) for k, v in row.items() if k not in _ROW_FIELDS}, step=int(row["step"]))

    def log_stage(self, stage: str, stage_dir: Path, metrics: Mapping[str, float], *, cached: bool) -> None:
        """What a finished stage adds: a cached stage's curves from its ``metrics.jsonl``; its final
        metrics at step 0 when it logged no rows (data_prep); its sample generations as a table."""
        rows = read_metrics(Path(stage_dir) / HISTORY)
        if cached:
            self.log_history(stage, rows)
        if not rows and metrics:
            self.log(stage, metrics, step=0)
        from align_runner.engine.online import ROLLOUTS_FILE  # online imports the loop, which imports us

        for name in (EVAL_SAMPLES, ROLLOUTS_FILE):
            samples = read_samples(Path(stage_dir) / name)
            if samples:
                self.log_samples(stage, samples)

    def log_samples(self, stage: str, samples: list[dict[str, Any]]) -> None:
        """``<stage>/samples``: a W&B table, a Markdown table in TensorBoard's text tab."""
        columns = list(dict.fromkeys(k for s in samples for k in s))
        data = [[_cell(s.get(c)) for c in columns] for s in samples]
        if self._tb is not None:
            self._tb.add_text(f"{stage}/samples", markdown_table(columns, data), 0)
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"{stage}/samples": wandb.Table(columns=columns, data=data)})

    def close(self, *, failed: bool = False) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None


class Tracker:
    """One stage's sink: its ``metrics.jsonl``, and the job's ``RunTracker`` (``run``) when there is one."""

    def __init__(self, out_dir: Path, *, stage: str, enabled: bool, run: RunTracker | None = None):
        self.stage = stage
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / HISTORY
        self.run = run if enabled else None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # rows of an earlier, interrupted attempt: a resume restores the ones its checkpoint covers
        self.path.unlink(missing_ok=True)

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": time.time()}
        row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(self.stage, metrics, step=step)

    def restore_history(self, checkpoint_dir: Path) -> None:
        """Make ``metrics.jsonl`` the rows saved with a checkpoint (those up to its step); the job's
        tracker run gets them too, so a resumed stage shows its whole curve."""
        if not self.enabled:
            return
        saved = Path(checkpoint_dir) / HISTORY
        if saved.exists():
            shutil.copyfile(saved, self.path)
        else:
            self.path.unlink(missing_ok=True)
        if self.run is not None:
            self.run.log_history(self.stage, read_metrics(self.path))

    def log_text(self, message: str) -> None:
        if self.enabled:
            log.info(message)


def _init_wandb(run_dir: Path, project: str, name: str, group: str | None, config: Any, api_key: str | None):
    import wandb

    # W&B reads WANDB_MODE (offline works) and WANDB_API_KEY itself; a key given in the config goes
    # in through settings only, never into the logged config (which is redacted as well).
    settings = wandb.Settings(api_key=api_key) if api_key else None
    return wandb.init(
        project=project,
        name=name,
        group=group,
        dir=str(run_dir),
        config=redact(config),
        settings=settings,
        reinit="create_new",
    )


def _tb_hparams(writer: Any, hparams: Mapping[str, Any]) -> None:
    """The hyperparameters in TensorBoard's HPARAMS tab (dotted names) and as YAML in its text tab."""
    import yaml
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    flat = dict(_flatten(hparams))
    for summary in hparams_summary(flat, {}):
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```yaml\n" + yaml.safe_dump(dict(hparams), sort_keys=False) + "```", 0)


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` leaves; a value TensorBoard cannot hold (list, None) as JSON text."""
    if isinstance(node, Mapping) and node:
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (bool, int, float, str)):
        yield prefix, node
    else:
        yield prefix, json.dumps(node, default=str)


def _cell(value: Any) -> Any:
    """A table cell: numbers and text as they are, anything else as JSON text."""
    return value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value, default=str)


def markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def esc(v: Any) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(map(esc, columns)) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, row)) + " |" for row in data])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (empty list when the file does not exist)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The rows of a samples file: a JSON list (``samples.json``) or JSON lines; none when absent."""
    path = Path(path)
    if not path.exists():
        return []
    if path.suffix == ".json":
        return list(json.loads(path.read_text()))
    return read_metrics(path)
