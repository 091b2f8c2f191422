"""Config checks that run before any model loads.

Two passes: ``check_override_keys`` reads the command line before Hydra composes (a misspelt key gets
the valid keys and a suggestion, which Hydra's own "not in struct" error lacks); ``validate`` checks
the composed config: value ranges, every ``_target_`` importable with keyword names its callable
accepts, and the pipeline graph. Group options are looked up where Hydra looks (``search_dirs``): the
shipped tree, then the user's ``--config-dir`` and ``hydra.searchpath`` folders.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from align_runner import config as schema

log = logging.getLogger("align_runner")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what is valid."""


# The shipped config tree, a folder inside the package: Hydra reads it as a plain directory (an
# installed wheel unpacks it under site-packages), and so do the checks below, which list its groups.
CONF_DIR = Path(__file__).resolve().parent / "conf"
SEARCHPATH_KEY = "hydra.searchpath"


def searchpath_entries(overrides: Iterable[str]) -> list[str]:
    """The entries of a ``hydra.searchpath=[...]`` override (Hydra reads the first one only)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in overrides:
        if ov.partition("=")[0] == SEARCHPATH_KEY:
            return [str(e) for e in OverridesParser.create().parse_override(ov).value()]
    return []


def _entry_dirs(entry: str) -> list[Path]:
    """The folder(s) behind one search-path entry: ``file://dir`` or a bare dir, ``pkg://package``."""
    scheme, sep, rest = entry.partition("://")
    if not sep or scheme == "file":
        path = Path(rest if sep else entry).resolve()
        if not path.is_dir():
            raise ConfigError(f"{SEARCHPATH_KEY}: {entry}: no such directory")
        return [path]
    if scheme == "pkg":
        try:
            spec = importlib.util.find_spec(rest.replace("/", "."))
        except ModuleNotFoundError:
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{SEARCHPATH_KEY}: {entry}: no such package")
        return [Path(p) for p in spec.submodule_search_locations]
    return []  # structured:// and the like hold no files


def search_dirs(overrides: Iterable[str] = (), config_dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Where group files are looked up, in Hydra's order (the first folder holding an option wins):
    the shipped tree, the user's ``--config-dir`` folders, then the ``hydra.searchpath`` entries."""
    dirs = [CONF_DIR]
    for d in config_dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"config dir {d}: no such directory")
        dirs.append(Path(d).resolve())
    return dirs + [p for e in searchpath_entries(overrides) for p in _entry_dirs(e)]


def _find(dirs: Iterable[Path], group: str, option: str) -> Path | None:
    return next((p for d in dirs if (p := d / group / f"{option}.yaml").is_file()), None)


def _defaults(path: Path | None) -> list[Any]:
    """The defaults list of the YAML file at ``path`` as plain strings and dicts (none if no file)."""
    return OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or [] if path else []


def _root_defaults() -> list[Any]:
    return _defaults(CONF_DIR / "config.yaml")


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


def algorithm_schema(choice: str, dirs: Iterable[Path] = (CONF_DIR,)) -> type:
    """The dataclass typing ``algorithm/<choice>.yaml`` (the first of ``dirs`` holding it): the
    ``*_schema`` its defaults list names."""
    dirs = list(dirs)
    for d in _defaults(_find(dirs, "algorithm", choice)):
        if isinstance(d, str) and d in schema.ALGORITHM_SCHEMAS:
            return schema.ALGORITHM_SCHEMAS[d]
        if isinstance(d, str) and d != "_self_" and d != choice:
            return algorithm_schema(d, dirs)  # a variant built on another algorithm file (dapo on grpo)
    return schema.AlgorithmConfig


def _choices(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _selected_algorithms(overrides: Iterable[str], dirs: Iterable[Path] = (CONF_DIR,)) -> list[str]:
    """The algorithm option(s) a run uses: the command line's (a sweep picks several), else those the
    selected experiments set (``override /algorithm: dpo`` in their defaults), else the root default."""
    dirs = list(dirs)
    choices = [str(d["algorithm"]) for d in _root_defaults() if isinstance(d, dict) and "algorithm" in d]
    picked: dict[str, list[str]] = {}
    for ov in overrides:
        key, _, value = ov.lstrip("+").partition("=")
        picked[key] = _choices(value)
    from_experiments = [a for name in picked.get("experiment", []) for a in experiment_algorithm(name, dirs)]
    return picked.get("algorithm") or from_experiments or choices


def experiment_algorithm(name: str, dirs: Iterable[Path] = (CONF_DIR,), _seen: frozenset[str] = frozenset()) -> list[str]:
    """The algorithm the recipe ``experiment/<name>.yaml`` picks: its own ``override /algorithm``, else
    that of a recipe it builds on (``dpo_tiny`` on ``sft_tiny``). Hydra expands a defaults list from
    the end, so of two recipes built on, the later one's choice wins; the outer file's wins over both."""
    dirs = list(dirs)
    entries = _defaults(_find(dirs, "experiment", name))
    own = [str(d[k]) for d in entries if isinstance(d, dict) for k in d if k in ("override /algorithm", "/algorithm")]
    if own or name in _seen:  # a cycle is Hydra's error to report, when it composes
        return own
    for d in reversed(entries):
        base = d.removeprefix("/experiment/") if isinstance(d, str) and d != "_self_" else None
        if base and (found := experiment_algorithm(base, dirs, _seen | {name})):
            return found
    return []


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


def group_options(dirs: Iterable[Path] = (CONF_DIR,)) -> dict[str, list[str]]:
    """Each config group (a folder of YAML files; nested ones as ``model/lora``) with its options,
    over every search folder. The root config's slots count even without a folder (``experiment``:
    the user's recipes)."""
    found: dict[str, set[str]] = {_slot(d): set() for d in _root_defaults() if isinstance(d, dict)}
    for root in dirs:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [s for s in subdirs if not s.startswith((".", "__")) and s != "hydra"]
            group = Path(folder).relative_to(root).as_posix()
            options = {Path(f).stem for f in files if f.endswith(".yaml")}
            if group != "." and options:
                found.setdefault(group, set()).update(options)
    return {g: sorted(o) for g, o in found.items() if not g.startswith("hydra/")}


def _slot(entry: dict) -> str:
    """The group a root defaults entry fills: ``optional experiment`` -> experiment,
    ``algorithm@upstream.sft`` -> algorithm."""
    return str(next(iter(entry))).split()[-1].split("@")[0]


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


def check_override_keys(overrides: Iterable[str], config_dirs: Iterable[str | Path] = ()) -> None:
    """Check command-line overrides: group choices against the files (the shipped ones, those in
    ``config_dirs`` and in a ``hydra.searchpath`` override), dotted keys against the schema."""
    overrides = list(overrides)
    dirs = search_dirs(overrides, config_dirs)
    groups = group_options(dirs)
    algorithms = [algorithm_schema(c, dirs) for c in _selected_algorithms(overrides, dirs)]
    where = f" (searched {', '.join(map(str, dirs))})" if len(dirs) > 1 else ""
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
                        f"{group}={v}: no such option in {group}/{where}.{' Did you mean ' + repr(m[0]) + '?' if (m := difflib.get_close_matches(v, choices, n=1)) else ''} "
                        f"Valid options: {', '.join(choices) or f'none (add DIR/{group}/{v}.yaml and pass --config-dir DIR)'}"
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
        budget = t.max_tokens_per_batch
        require(budget is None or budget >= 1, f"{where}.max_tokens_per_batch", "null or a token count >= 1", budget)
        require(t.logits_chunk_tokens >= 1, f"{where}.logits_chunk_tokens", "a token count >= 1", t.logits_chunk_tokens)
    hw = cfg.hardware
    require(hw.num_processes >= 1, "hardware.num_processes", "an integer >= 1", hw.num_processes)
    require(hw.num_nodes >= 1, "hardware.num_nodes", "an integer >= 1", hw.num_nodes)
    require(cfg.data.max_length > 0, "data.max_length", "a positive token count", cfg.data.max_length)
    share = cfg.data.max_dropped_share
    require(0 <= share <= 1, "data.max_dropped_share", "a share of rows in [0, 1]", share)
    require(
        cfg.model.quantization in (None, "4bit", "8bit"), "model.quantization", "null, '4bit' or '8bit'", cfg.model.quantization
    )
    _check_hardware(cfg)
    from align_runner.engine.trackers import KNOWN_BACKENDS

    for b in cfg.tracking.backends:
        require(b in KNOWN_BACKENDS, "tracking.backends", f"a list drawn from {sorted(KNOWN_BACKENDS)}", list(cfg.tracking.backends))


def _check_hardware(cfg: DictConfig) -> None:
    """The backend's package is installed, ZeRO has a stage, QLoRA can run here — before models load."""
    import importlib.util

    from align_runner.models.loading import ModelOptionError, check_model_options
    from align_runner.models.quantization import QuantizationUnavailableError, check_quantization

    hw = cfg.hardware
    if hw.get("cpu_threads") is not None:
        require(int(hw.cpu_threads) >= 1, "hardware.cpu_threads", "a positive number of threads, or null", hw.cpu_threads)
    if str(hw.backend) == "deepspeed":
        require(hw.zero_stage in (1, 2, 3), "hardware.zero_stage", "1, 2 or 3 with backend=deepspeed", hw.zero_stage)
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"hardware={hw.name} uses DeepSpeed, which is not installed: pip install 'align-runner[deepspeed]'")
    try:
        check_quantization(cfg.model, hw)
        check_model_options(cfg.model)
    except (QuantizationUnavailableError, ModelOptionError) as e:
        raise ConfigError(str(e)) from None


def validate(cfg: DictConfig) -> None:
    """All composed-config checks; raises ConfigError (or the graph's error) before anything loads."""
    from align_runner.pipeline.graph import build_graph

    check_values(cfg)
    check_targets(cfg)
    check_objective(cfg, build_graph(cfg))


def _did_you_mean(word: str, options: Iterable[str], what: str, shown: int = 12) -> str:
    """`` Did you mean 'x'? <what>: a, b, ...`` (at most ``shown`` of the options, closest first)."""
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=shown, cutoff=0.5)
    listed = close + [o for o in options if o not in close]
    more = f", ... ({len(options)} in all)" if len(options) > shown else ""
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} {what}: {', '.join(listed[:shown])}{more}"


def check_objective(cfg: DictConfig, specs: list) -> None:
    """``pipeline.objective`` (``<stage>/<metric>``) names a stage of this pipeline and a metric its
    kind declares (``register_stage(metrics=...)``); a typo in either is a ConfigError with a suggestion.

    One case only warns: an eval stage (``eval_before`` / ``eval_after``, the names pipeline=auto gives
    them) in a pipeline that has none — ``pipeline.eval=false``, a main stage that trains a scorer
    (algorithm=reward), data without held-out prompts. That is the default objective meeting a pipeline
    without evaluation, not a typo: the run returns no objective, and a sweeper optimising None should
    hear why before the run. Its metric is still checked, against the eval stage it would be.
    """
    from align_runner.pipeline.graph import EVAL_STAGES
    from align_runner.registry import get_stage
    from align_runner.stages.context import StageSpec

    objective = str(cfg.pipeline.objective)
    stage, _, metric = objective.partition("/")
    where = f"pipeline.objective={objective}"
    if not stage or not metric:
        raise ConfigError(f"{where}: expected '<stage>/<metric>', e.g. eval_after/accuracy or sft/eval/loss")
    spec = next((s for s in specs if s.name == stage), None)
    if spec is None and stage in EVAL_STAGES:
        log.warning(
            "%s names no stage of this pipeline (%s): it has no eval stages; the run returns no objective",
            where, ", ".join(s.name for s in specs),
        )
        spec = StageSpec(stage, "eval", config="eval")
    if spec is None:
        names = [s.name for s in specs]
        raise ConfigError(f"{where}: {stage!r} is not a stage of this pipeline.{_did_you_mean(stage, names, 'Stages')}")
    produced = get_stage(spec.kind).produces(cfg, spec)
    if produced is not None and metric not in produced:
        raise ConfigError(
            f"{where}: stage {stage!r} ({spec.kind}) reports no metric {metric!r}."
            f"{_did_you_mean(metric, produced, 'It reports')}"
        )
