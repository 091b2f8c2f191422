"""Python API: compose a config from overrides and run its pipeline, as the CLI does.

    from align_runner import api
    result = api.run(["algorithm=dpo", "model=tiny", "algorithm.loss.beta=0.05"])
    result.objective, result.stage("dpo").cache_hit
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from align_runner.config import register_configs
from align_runner.validate import (
    CONF_DIR,
    SEARCHPATH_KEY,
    ConfigError,
    check_override_keys,
    check_targets,
    searchpath_entries,
    validate,
)

log = logging.getLogger("align_runner")

ConfigDirs = Sequence[str | Path]


def compose(overrides: Sequence[str] = (), *, config_dirs: ConfigDirs = ()) -> DictConfig:
    """The validated config for ``overrides`` (the same strings the CLI takes). ``config_dirs`` are
    folders of the user's own groups (``DIR/data/mydata.yaml`` makes ``data=mydata``), as the CLI's
    ``--config-dir``; they are searched after the shipped tree."""
    check_override_keys(overrides, config_dirs)
    try:
        cfg = _compose(overrides, config_dirs)
    except ConfigCompositionException as e:
        raise _explain(e, overrides, config_dirs) from e
    validate(cfg)
    _warn_shadowed(overrides, cfg)
    return cfg


def _compose(overrides: Sequence[str], config_dirs: ConfigDirs = (), *, hydra_config: bool = False) -> DictConfig:
    """Hydra's compose over the shipped tree and ``config_dirs``, no checks of ours."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name="config", overrides=_with_config_dirs(overrides, config_dirs), return_hydra_config=hydra_config
        )


def _with_config_dirs(overrides: Sequence[str], config_dirs: ConfigDirs) -> list[str]:
    """``overrides`` with ``config_dirs`` put first in their ``hydra.searchpath`` (the compose API has
    no --config-dir; Hydra reads one searchpath override, so the user's own entries join it)."""
    if not config_dirs:
        return list(overrides)
    entries = [f"file://{Path(d).resolve()}" for d in config_dirs] + searchpath_entries(overrides)
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    rest = [o for o in overrides if o.partition("=")[0] != SEARCHPATH_KEY]
    return [*rest, f"{SEARCHPATH_KEY}=[{quoted}]"]


def _explain(e: ConfigCompositionException, overrides: Sequence[str], config_dirs: ConfigDirs = ()) -> ConfigError:
    """A ConfigError naming the override and what is valid there.

    A new key inside a ``_target_`` node (``algorithm.loss.bta=0.1``) fails Hydra's struct check
    with advice to append it with ``+``; the useful answer is the callable's parameter names.
    """
    cause = str(e.__cause__).splitlines()[0] if e.__cause__ else ""
    bad = re.search(r"Could not override '([^']+)'", str(e))
    if bad and "not in struct" in str(e.__cause__):
        key = bad.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") == key]
        node = OmegaConf.select(_compose(rest, config_dirs), parent) if parent else None
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                check_targets(OmegaConf.create({"_": {**OmegaConf.to_container(node), leaf: None}}))
            except ConfigError as err:
                return ConfigError(str(err).replace("_.", f"{parent}.", 1))
        if isinstance(node, DictConfig):
            return ConfigError(f"unknown config key {key!r}: {leaf!r} is not a key of {parent}. Valid keys: {', '.join(map(str, node))}")
    return ConfigError(f"{e}: {cause}" if cause else str(e))


def _warn_shadowed(overrides: Sequence[str], cfg: DictConfig) -> None:
    """`train.lr=...` does not reach a stage whose algorithm sets its own lr: say so."""
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if not key.startswith("train."):
            continue
        name = key.split(".", 1)[1]
        own = cfg.algorithm.get("train") or {}
        if own.get(name) is not None:
            log.warning(
                "%s is overridden for the %s stage by algorithm.train.%s=%s; set algorithm.train.%s to change it there",
                key, cfg.algorithm.kind, name, own[name], name,
            )


def run(overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, config_dirs: ConfigDirs = ()):
    """Compose (``config_dirs`` as in ``compose``), check the data and run; returns
    ``align_runner.pipeline.runner.RunResult``. Bad data raises ``align_runner.data.errors.DataError``
    (one line per problem) before any model loads."""
    from align_runner.pipeline.datacheck import check_data
    from align_runner.pipeline.runner import run_pipeline

    cfg = compose(overrides, config_dirs=config_dirs)
    check_data(cfg)
    if run_dir is None:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S") + f"-{time.time_ns() % 1_000_000:06d}"
        run_dir = Path(cfg.paths.outputs) / stamp
    return run_pipeline(cfg, Path(run_dir))
