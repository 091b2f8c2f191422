"""The Hydra callback that writes a sweep's summary (``align_runner.pipeline.sweep_summary``).

Registered in ``conf/config.yaml`` (``hydra.callbacks.sweep_summary``), so every multirun gets it,
whatever its launcher or sweeper. Before the sweeper starts it checks that a sweeper with a direction
of its own (Optuna) optimises the objective the way ``pipeline.direction`` says. It writes after each
job as well as when the sweep ends: Hydra's basic sweeper stops at the first job that raises, before
``on_multirun_end``, and the summary must still show that job as failed. A single run (no ``-m``)
writes nothing.

Imported by Hydra at startup for every run: keep imports here light.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("align_runner")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra calls this before it builds the sweeper: a wrong direction stops the sweep before any job
        error = direction_mismatch(config)
        if error:
            print(f"align_runner: config error: {error}", file=sys.stderr)
            sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            _write(config, final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = _write(config, final=True)
        if paths:
            print(f"align_runner: sweep summary: {paths[0]}")


def direction_mismatch(config: DictConfig) -> str | None:
    """Why a sweeper that optimises a direction (Optuna's ``hydra.sweeper.direction``) would optimise
    the objective another way than ``pipeline.direction`` says, or None. Only ``search=optuna`` derives
    one from the other; a bare ``hydra/sweeper=optuna`` keeps Optuna's default, minimize."""
    sweeper = config.hydra.sweeper
    if "direction" not in sweeper:  # the basic sweeper: it only launches, the summary marks the best
        return None
    given = list(sweeper.direction) if OmegaConf.is_list(sweeper.direction) else [sweeper.direction]
    # Optuna's own Direction enum (its default) by name; our Direction and typed values by value
    given = [str(d) if isinstance(d, str) else getattr(d, "name", str(d)) for d in given]
    wanted = str(config.pipeline.direction)
    if given == [wanted]:
        return None
    return (
        f"hydra.sweeper.direction={','.join(given)} but pipeline.direction={wanted}: the sweeper must optimise "
        f"the one objective ({config.pipeline.objective}) the way pipeline.direction says. Use search=optuna "
        "(it takes pipeline.direction), or hydra.sweeper.direction='${pipeline.direction}'"
    )


def _write(config: DictConfig, *, final: bool) -> list[Path]:
    from align_runner.pipeline.sweep_summary import write_summary

    sweep_dir = Path(str(config.hydra.sweep.dir))
    if not sweep_dir.is_dir():  # a sweep with no jobs
        return []
    try:
        return write_summary(sweep_dir, OmegaConf.to_container(config.hydra), final=final)
    except Exception:  # a summary bug must never fail a sweep whose jobs ran
        log.warning("could not write the sweep summary in %s", sweep_dir, exc_info=True)
        return []
