"""Config checks that run before any model loads.

Two passes: ``check_override_keys`` reads the command line before Hydra composes (a misspelt key gets
the valid keys and a suggestion, which Hydra's own "not in struct" error lacks); ``validate`` checks
the composed config: value ranges, every ``_target_`` importable with keyword names its callable
accepts, and the pipeline graph.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from align_runner import config as schema

log = logging.getLogger("align_runner")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what is valid."""


CONF_DIR = Path(__file__).resolve().parent / "conf"



def _suggest(word: str, options: Iterable[str]) -> str:
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(options)}"


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    return tp


def algorithm_schema(choice: str) -> type:
    """The dataclass typing ``conf/algorithm/<choice>.yaml``: the ``*_schema`` its defaults list names."""
    path = CONF_DIR / "algorithm" / f"{choice}.yaml"
    defaults = OmegaConf.load(path).get("defaults", []) if path.exists() else []
    for d in defaults:
        if isinstance(d, str) and d in schema.ALGORITHM_SCHEMAS:
            return schema.ALGORITHM_SCHEMAS[d]
        if isinstance(d, str) and d != "_self_" and d != choice:
            return algorithm_schema(d)  # a variant built on another algorithm file (dapo on grpo)
    return schema.AlgorithmConfig


def _selected_algorithms(overrides: Iterable[str]) -> list[str]:
    """The algorithm option(s) the command line picks (a sweep picks several); the root config's
    default otherwise."""
    root = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")).get("defaults", [])
    choices = [str(d["algorithm"]) for d in root if isinstance(d, dict) and "algorithm" in d]
    for ov in overrides:
        key, _, value = ov.lstrip("+").partition("=")
        if key == "algorithm" and value:
            choices = [v.strip() for v in value.split(",") if v.strip()]
    return choices


def check_override_key(key: str, algorithm: type = schema.AlgorithmConfig) -> None:
    """Raise ConfigError when a dotted ``key`` cannot exist in the schema (``algorithm.*`` keys are
    checked against ``algorithm``, the schema of the selected algorithm)."""
    parts = key.split(".")
    cls: Any = schema.RootConfig
    for depth, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return  # Any / dict / _target_ node: checked after composition
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not a key of {where}.{_suggest(part, names)}")
        cls = algorithm if depth == 0 and part == "algorithm" else _field_type(cls, part)


def _groups() -> dict[str, list[str]]:
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in CONF_DIR.iterdir()
        if d.is_dir() and d.name != "hydra"
    }


def _check_for_any(key: str, algorithms: list[type]) -> None:
    """``key`` must exist under at least one selected algorithm's schema (a sweep over dpo,grpo may set
    keys of either); the error is the one with a suggestion, if any schema has one."""
    errors = []
    for algorithm in algorithms or [schema.AlgorithmConfig]:
        try:
            return check_override_key(key, algorithm)
        except ConfigError as e:
            errors.append(e)
    raise next((e for e in errors if "Did you mean" in str(e)), errors[0])


def check_override_keys(overrides: Iterable[str]) -> None:
    """Check command-line overrides: group choices against the files, dotted keys against the schema."""
    groups = _groups()
    overrides = list(overrides)
    algorithms = [algorithm_schema(c) for c in _selected_algorithms(overrides)]
    for ov in overrides:
        if ov.startswith(("-", "+", "~")) or "=" not in ov:
            continue  # flags, additions and deletions are the user's explicit choice
        key, value = ov.split("=", 1)
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        group = key.split("@", 1)[0]
        if group in groups:
            choices = groups[group]
            for v in value.split(","):
                v = v.strip()
                if v and v != "null" and v not in choices and not any(c in v for c in "()[]{}$*"):
                    raise ConfigError(
                        f"{group}={v}: no such option in {group}/.{' Did you mean ' + repr(m[0]) + '?' if (m := difflib.get_close_matches(v, choices, n=1)) else ''} "
                        f"Valid options: {', '.join(choices)}"
                    )
            continue
        _check_for_any(key, algorithms)


# ------------------------------------------------------------------------------------- composed


def _targets(node: Any, path: str = "") -> Iterable[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig) and not node._is_none():
        if "_target_" in node:
            yield path, node
        for k in node:
            yield from _targets(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig) and not node._is_none():
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _import(target: str, path: str) -> Any:
    module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{path}._target_={target!r} cannot be imported: {e}") from None


def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` imports and every key beside it is a parameter of the callable."""
    for path, node in _targets(cfg):
        fn = _import(str(node._target_), path)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        params = sig.parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for key in node:
            if str(key).startswith("_") and str(key).endswith("_"):
                continue
            if key not in params:
                raise ConfigError(
                    f"{path}.{key}: {node._target_} has no parameter {key!r}.{_suggest(str(key), [n for n in params if n not in ('self', 'cache_dir')])}"
                )


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ConfigError naming ``key``, its ``value`` and what was ``expected`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_values(cfg: DictConfig) -> None:
    trains = [("train", cfg.train)]
    for node in ("algorithm", "upstream.sft", "upstream.reward"):
        section = OmegaConf.select(cfg, node)
        if section is not None and section.get("train"):
            trains.append((f"{node}.train", schema.stage_train(cfg, section)))
    for where, t in trains:
        require(t.lr > 0, f"{where}.lr", "a positive learning rate", t.lr)
        require(t.micro_batch_size >= 1, f"{where}.micro_batch_size", "an integer >= 1", t.micro_batch_size)
        require(t.grad_accum >= 1, f"{where}.grad_accum", "an integer >= 1", t.grad_accum)
        require(t.max_steps > 0 or t.epochs > 0, f"{where}.epochs", "> 0 (or train.max_steps > 0)", t.epochs)
        require(0 <= t.warmup_ratio <= 1, f"{where}.warmup_ratio", "a fraction in [0, 1]", t.warmup_ratio)
        require(t.log_every >= 1, f"{where}.log_every", "an integer >= 1", t.log_every)
    hw = cfg.hardware
    require(hw.num_processes >= 1, "hardware.num_processes", "an integer >= 1", hw.num_processes)
    require(hw.num_nodes >= 1, "hardware.num_nodes", "an integer >= 1", hw.num_nodes)
    require(cfg.data.max_length > 0, "data.max_length", "a positive token count", cfg.data.max_length)
    require(
        cfg.model.quantization in (None, "4bit", "8bit"), "model.quantization", "null, '4bit' or '8bit'", cfg.model.quantization
    )
    _check_hardware(cfg)
    known = {"tensorboard", "wandb"}
    for b in cfg.tracking.backends:
        require(b in known, "tracking.backends", f"a list drawn from {sorted(known)}", list(cfg.tracking.backends))


def _check_hardware(cfg: DictConfig) -> None:
    """The backend's package is installed, ZeRO has a stage, QLoRA can run here — before models load."""
    import importlib.util

    from align_runner.models.peft import QuantizationUnavailableError, check_quantization

    hw = cfg.hardware
    if str(hw.backend) == "deepspeed":
        require(hw.zero_stage in (1, 2, 3), "hardware.zero_stage", "1, 2 or 3 with backend=deepspeed", hw.zero_stage)
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"hardware={hw.name} uses DeepSpeed, which is not installed: pip install 'align-runner[deepspeed]'")
    try:
        check_quantization(cfg.model, hw)
    except QuantizationUnavailableError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: DictConfig) -> None:
    """All composed-config checks; raises ConfigError (or the graph's error) before anything loads."""
    from align_runner.pipeline.graph import build_graph

    check_values(cfg)
    check_targets(cfg)
    specs = build_graph(cfg)
    stage = str(cfg.pipeline.objective).partition("/")[0]
    if stage not in {s.name for s in specs}:
        # not an error: pipelines without eval stages (pipeline.eval=false, algorithm=reward) are fine,
        # but a sweeper optimising None should hear why before the run, not after it
        log.warning(
            "pipeline.objective=%s names no stage of this pipeline (%s); the run returns no objective",
            cfg.pipeline.objective, ", ".join(s.name for s in specs),
        )
