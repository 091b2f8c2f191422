"""The Hydra callback that writes a sweep's summary (``align_runner.pipeline.sweep_summary``).

Registered in ``conf/config.yaml`` (``hydra.callbacks.sweep_summary``), so every multirun gets it,
whatever its launcher or sweeper. It writes after each job as well as when the sweep ends: Hydra's
basic sweeper stops at the first job that raises, before ``on_multirun_end``, and the summary must
still show that job as failed. A single run (no ``-m``) writes nothing.

Imported by Hydra at startup for every run: keep imports here light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("align_runner")


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            _write(config, final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = _write(config, final=True)
        if paths:
            print(f"align_runner: sweep summary: {paths[0]}")


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
