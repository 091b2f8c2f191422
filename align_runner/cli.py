"""Command line: ``python -m align_runner [overrides]`` (also the ``align-runner`` script).

Checks the overrides, relaunches itself under torchrun when the hardware profile asks for several
processes, then composes with Hydra (so ``-m`` sweeps and sweeper plugins work) and runs the pipeline.
The Hydra task function returns the objective metric for sweepers such as Optuna.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from align_runner.config import register_configs
from align_runner.validate import CONF_DIR, ConfigError, check_override_keys, validate

log = logging.getLogger("align_runner")


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-") and "=" in a]


def _num_processes(argv: list[str]) -> int:
    from align_runner.api import compose

    cfg = compose(_overrides(argv))
    return int(cfg.hardware.num_processes)


def _self_launch(argv: list[str], nproc: int) -> int:
    """Run the same command under torchrun with ``nproc`` processes on this node; returns its exit code.

    All ranks get the same run dir (Hydra's ``${now:}`` could differ by a second between them).
    """
    run_dir = os.path.join(
        os.environ.get("ALIGN_RUNNER_OUTPUTS", "outputs"), time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S")
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--nnodes", "1", "--standalone",
        "-m", "align_runner", *argv, f"hydra.run.dir={run_dir}",
    ]
    log.info("relaunching under torchrun with %d processes", nproc)
    return subprocess.call(cmd)


def main() -> None:
    argv = sys.argv[1:]
    try:
        check_override_keys(_overrides(argv))
        multirun = "-m" in argv or "--multirun" in argv
        info_only = any(a in argv for a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help"))
        if not multirun and not info_only and "RANK" not in os.environ:
            nproc = _num_processes(argv)
            if nproc > 1:
                sys.exit(_self_launch(argv, nproc))
    except ConfigError as e:
        print(f"align_runner: config error: {e}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    _hydra_main()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from align_runner.pipeline.runner import run_pipeline
    from align_runner.pipeline.summary import print_summary

    try:
        validate(cfg)
    except (ConfigError, KeyError, ValueError) as e:
        print(f"align_runner: config error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.pipeline.dry_run:
        from align_runner.pipeline.preflight import print_plan

        print_plan(cfg)
        return None
    result = run_pipeline(cfg, run_dir)
    if int(os.environ.get("RANK", 0)) == 0:
        print_summary(cfg, result)
    return result.objective
