"""Command line: ``python -m align_runner [overrides]`` (also the ``align-runner`` script).

Checks the overrides, relaunches itself under torchrun when the hardware profile asks for several
processes, then composes with Hydra (so ``-m`` sweeps and sweeper plugins work) and runs the pipeline.
The Hydra task function returns the objective metric for sweepers such as Optuna.

Self-launch: the parent composes the config once, fixes the run dir (Hydra's ``${now:}`` could differ
by a second between ranks), and runs ``torchrun ... -m align_runner <same overrides>
hydra.run.dir=<dir>``. Ranks other than 0 write nothing into the run dir (no ``.hydra/``, log to
stdout). A rank that fails writes its error to a folder the parent reads, so the parent reports that
rank's exception and exits with its exit code; torchrun stops the other ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import align_runner
from align_runner.config import register_configs
from align_runner.redact import hide_secret_overrides
from align_runner.validate import (
    CONF_DIR,
    ConfigError,
    check_override_keys,
    check_values,
    group_options,
    search_dirs,
    validate,
)

log = logging.getLogger("align_runner")

FAILURE_DIR_ENV = "ALIGN_RUNNER_FAILURE_DIR"
# ALIGN_RUNNER_DEBUG=1 (or hydra.verbose=true) adds the traceback to a config or data error's one line
DEBUG_ENV = "ALIGN_RUNNER_DEBUG"
_INFO_FLAGS = ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--resolve", "-p", "--package")


def _overrides(argv: list[str]) -> list[str]:
    """Hydra overrides among the arguments: ``key=value``, ``+key=value``, ``~key``."""
    return [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def config_dirs(argv: list[str]) -> list[str]:
    """The folder of ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``), the user's own groups;
    Hydra takes one, the last given."""
    found = []
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in ("--config-dir", "-cd"):
            found = [value] if eq else argv[i + 1 : i + 2]
    return found


def _compose_for_launch(argv: list[str]) -> tuple[DictConfig, str]:
    """The composed config and the resolved Hydra run dir for these overrides.

    Only the checks that need no torch run here (key names, types, value ranges): a launcher should
    not spend seconds importing what its workers import again. Every process validates fully before
    it loads anything."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf import open_dict

    from align_runner.api import _compose, _explain, _warn_shadowed

    overrides, dirs = _overrides(argv), config_dirs(argv)
    check_override_keys(overrides, dirs)
    try:
        cfg = _compose(overrides, dirs, hydra_config=True)
    except ConfigCompositionException as e:
        raise _explain(e, overrides, dirs) from e
    run_dir = os.path.abspath(str(cfg.hydra.run.dir))
    with open_dict(cfg):
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    check_values(cfg)
    _warn_shadowed(overrides, cfg)
    return cfg, run_dir


def _hydra_value(value: str) -> str:
    """Quote an override value unless Hydra's grammar takes it bare."""
    if re.fullmatch(r"[\w./:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def torchrun_command(hardware: Any, argv: list[str], run_dir: str) -> list[str]:
    """``torchrun`` command line for ``hardware``: this node alone (--standalone), or a multi-node
    c10d rendezvous at ``hardware.rdzv_endpoint`` (the multinode profile fills it from SLURM/env)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(int(hardware.num_processes))]
    if int(hardware.num_nodes) > 1:
        if not hardware.rdzv_endpoint:
            raise ConfigError(
                f"hardware.num_nodes={hardware.num_nodes} needs hardware.rdzv_endpoint (host:port of the first "
                "node, e.g. from MASTER_ADDR / MASTER_PORT)"
            )
        cmd += ["--nnodes", str(int(hardware.num_nodes)), "--rdzv_backend", "c10d"]
        cmd += ["--rdzv_endpoint", str(hardware.rdzv_endpoint), "--rdzv_id", str(hardware.rdzv_id)]
        if hardware.node_rank is not None:
            cmd += ["--node_rank", str(int(hardware.node_rank))]
    else:
        cmd += ["--nnodes", "1", "--standalone"]
    return [*cmd, "-m", "align_runner", *argv, f"hydra.run.dir={_hydra_value(run_dir)}"]


def _self_launch(argv: list[str], hardware: Any, run_dir: str) -> int:
    """Run the same command under torchrun; returns the exit code of the first rank that failed."""
    from align_runner.engine.backend import cpu_threads

    with tempfile.TemporaryDirectory(prefix="align_runner-ranks-") as failures:
        env = {**os.environ, FAILURE_DIR_ENV: failures}
        # torchrun would give every process one thread; share the cores instead (an OMP_NUM_THREADS the
        # user set stays, and hardware.cpu_threads is applied by each process's backend)
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads(hardware) or 1))
        cmd = torchrun_command(hardware, argv, run_dir)
        print(f"align_runner: relaunching under torchrun: {int(hardware.num_processes)} process(es) per node, "
              f"{int(hardware.num_nodes)} node(s); run dir {run_dir}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, env=env)
        # a scheduler's SIGTERM (or Ctrl-C) goes to the job, which torchrun then stops cleanly
        forward = {s: signal.signal(s, lambda sig, _f: proc.send_signal(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for s, handler in forward.items():
                signal.signal(s, handler)
        return _report_failures(Path(failures), rc)


def _report_failures(folder: Path, rc: int) -> int:
    reports = sorted((json.loads(p.read_text()) for p in folder.glob("rank-*.json")), key=lambda r: r["time"])
    if rc == 0:
        return 0
    if not reports:
        print(f"align_runner: torchrun exited with code {rc}", file=sys.stderr)
        return rc
    first = reports[0]
    if first["exitcode"] != 2:  # exit 2, bad config or data: the rank printed its one-line errors already
        print(first["traceback"], file=sys.stderr, end="")
    print(f"align_runner: rank {first['rank']} failed (exit code {first['exitcode']}): {first['error']}", file=sys.stderr)
    return int(first["exitcode"]) or rc


def _record_failure(exc: BaseException, exitcode: int | None = None) -> None:
    """Inside a self-launched job: leave this rank's error for the parent (first error wins)."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if not folder:
        return
    code = exitcode if exitcode is not None else (exc.code if isinstance(exc, SystemExit) else 1)
    if code in (0, None):
        return
    path = Path(folder) / f"rank-{os.environ.get('RANK', '0')}.json"
    if path.exists():
        return
    report = {
        "rank": int(os.environ.get("RANK", 0)),
        "exitcode": code if isinstance(code, int) else 1,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
        "time": time.time(),
    }
    path.write_text(json.dumps(report))


def _rank_overrides(argv: list[str]) -> list[str]:
    """Ranks other than 0 write nothing into the run dir: no .hydra/ copy, log to stdout only."""
    if int(os.environ.get("RANK", 0)) == 0:
        return []
    extra = ["hydra.output_subdir=null"]
    if not any(a.startswith(("hydra/job_logging=", "+hydra/job_logging=")) for a in argv):
        extra.append("hydra/job_logging=stdout")
    return extra


# `align-runner <command> ...`: commands other than the native Hydra form, each a module with main(argv)
COMMANDS = {
    "sft": "align_runner.trl.cli",
    "dpo": "align_runner.trl.cli",
    "reward": "align_runner.trl.cli",
    "grpo": "align_runner.trl.cli",
    "kto": "align_runner.trl.cli",
    "export": "align_runner.export",
    "recipes": "align_runner.recipes",
}


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in COMMANDS:
        import importlib

        sys.exit(importlib.import_module(COMMANDS[argv[0]]).main(argv))
    if argv[:1] in (["--version"], ["-V"]):
        print(f"align_runner {align_runner.__version__}")
        return
    if {"-sc", "--shell-completion"} & set(argv):
        _shell_completion(argv)
        return
    if {"-h", "--help"} & set(argv):
        try:
            print(_help(argv))
        except ConfigError as e:
            print(f"align_runner: config error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    # a secret typed as an override reaches the job by environment: Hydra's records never hold it
    argv, secrets = hide_secret_overrides(argv)
    os.environ.update(secrets)
    try:
        check_override_keys(_overrides(argv), config_dirs(argv))
        multirun = "-m" in argv or "--multirun" in argv
        info_only = any(a in argv for a in _INFO_FLAGS)
        if not multirun and not info_only and "RANK" not in os.environ:
            cfg, run_dir = _compose_for_launch(argv)
            hw = cfg.hardware
            if int(hw.num_processes) * int(hw.num_nodes) > 1 and not cfg.pipeline.dry_run:
                sys.exit(_self_launch(argv, hw, run_dir))
    except ConfigError as e:
        print(f"align_runner: config error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv, *_rank_overrides(argv)]
    register_configs()
    try:
        _hydra_main()
    except SystemExit as e:
        _record_failure(e)
        raise


def _help(argv: list[str]) -> str:
    """Hydra's app help, from our template (conf/hydra/help), listing only the options a user can pick:
    the YAML files of every search folder, not the structured schemas they build on (``*_schema``)."""
    import string

    from omegaconf import OmegaConf

    from align_runner.api import compose

    overrides, dirs = [a for a in _overrides(argv) if a not in ("-h", "--help")], config_dirs(argv)
    check_override_keys(overrides, dirs)
    cfg = compose(overrides, config_dirs=dirs)
    help_node = OmegaConf.create({"hydra": {"help": OmegaConf.load(CONF_DIR / "hydra" / "help" / "align_runner.yaml")}})
    groups = group_options(search_dirs(overrides, dirs))
    listing = "\n".join(f"{g}: {', '.join(groups[g])}" for g in sorted(groups) if groups[g])
    return string.Template(help_node.hydra.help.template).substitute(APP_CONFIG_GROUPS=listing, CONFIG=OmegaConf.to_yaml(cfg))


def _shell_completion(argv: list[str]) -> None:
    """``-sc install=bash`` prints our script (it completes ``python -m align_runner`` too); a query
    goes to Hydra with the line's own --config-dir, and keeps only options that are files."""
    from align_runner import completion

    if {"install=bash", "uninstall=bash"} & set(argv):
        script = completion.bash_script if "install=bash" in argv else completion.bash_uninstall
        print(script(sys.argv[0]))
        return
    query = any(a.startswith("query=") for a in argv)
    if query:
        line, args = completion.program_args(os.environ.get("COMP_LINE", ""))
        os.environ["COMP_LINE"] = line
        argv = [*argv, *(f"--config-dir={d}" for d in config_dirs(args))]
    sys.argv = [sys.argv[0], *argv]
    register_configs()
    if not query:
        _hydra_main()  # Hydra's install for other shells (zsh, fish)
        return
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _hydra_main()
    try:
        groups = group_options(search_dirs(_overrides(args), config_dirs(args)))
    except ConfigError:
        groups = {}  # a wrong dir on the line: Hydra's answer as it is
    print(" ".join(completion.known_options(out.getvalue().split(), groups)))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return _task(cfg)
    except BaseException as e:
        _record_failure(e)
        raise


def _task(cfg: DictConfig) -> float | None:
    from align_runner.data.errors import DataError
    from align_runner.models.loading import ModelSourceError
    from align_runner.pipeline.datacheck import check_data
    from align_runner.pipeline.runner import run_pipeline
    from align_runner.pipeline.store import StoreError
    from align_runner.pipeline.summary import print_summary

    try:
        validate(cfg)
        _check_world_size(cfg)
        check_data(cfg)  # every row of the data, before any model or tokenizer loads
    except DataError as e:
        _input_error("data", e)
    except (ConfigError, KeyError, ValueError) as e:
        _input_error("config", e)
    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.pipeline.dry_run:
        from align_runner.pipeline.preflight import print_plan

        print_plan(cfg)
        return None
    try:
        result = run_pipeline(cfg, run_dir)
    except StoreError as e:  # disk full, read-only store, lock wait timed out: exit 1, one line
        _record_failure(e, exitcode=1)
        print(f"align_runner: error: {e}", file=sys.stderr)
        sys.exit(1)
    except DataError as e:  # found by data_prep: a split emptied by filtering, a hub dataset read only there
        _input_error("data", e)
    except ModelSourceError as e:  # a model that is not where the config says: offline, misspelt, gated
        _input_error("model", e)
    if int(os.environ.get("RANK", 0)) == 0:
        print_summary(cfg, result)
    return result.objective


def _input_error(what: str, e: Exception) -> NoReturn:
    """Exit 2 with ``align_runner: <what> error: <line>`` per line of ``e`` (the traceback first only
    with ALIGN_RUNNER_DEBUG=1 or hydra.verbose): bad input needs the place to fix, not our stack."""
    _record_failure(e, exitcode=2)
    if os.environ.get(DEBUG_ENV, "") not in ("", "0") or HydraConfig.get().verbose:
        traceback.print_exception(e)
    for line in str(e).splitlines() or [""]:
        print(f"align_runner: {what} error: {line}", file=sys.stderr)
    sys.exit(2)


def _check_world_size(cfg: DictConfig) -> None:
    """A profile's process count is part of every training stage's key: running it in another number
    of processes (e.g. a -m sweep, which is not self-launched) would file results under wrong keys."""
    if cfg.pipeline.dry_run:
        return
    wanted = int(cfg.hardware.num_processes) * int(cfg.hardware.num_nodes)
    running = int(os.environ.get("WORLD_SIZE", 1))
    if wanted != running:
        raise ConfigError(
            f"hardware={cfg.hardware.name} wants {wanted} processes but this job runs in {running}. "
            f"Sweeps (-m) are not self-launched: run `torchrun --nproc_per_node {cfg.hardware.num_processes} "
            "-m align_runner -m ...` yourself"
        )
