"""The stage registry: a stage's ``kind:`` is a key here.

Built-in stages register with ``@register_stage``; third-party packages add kinds through the
``align_runner.stages`` entry-point group (the entry point's value is the module that registers them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

# Modules holding the built-in stages; imported lazily so `--help` and config checks stay fast.
_BUILTIN_MODULES = (
    "align_runner.stages.data_prep",
    "align_runner.stages.sft",
    "align_runner.stages.eval",
    "align_runner.stages.reward",
    "align_runner.stages.ref_logps",
    "align_runner.stages.dpo",
)


@dataclass(frozen=True)
class StageKind:
    """A registered stage kind.

    fn: ``fn(ctx: StageContext) -> dict[str, float]`` (final metrics).
    trains: whether it produces a model (so a later stage may start from it).
    views: the data views it reads (``sft``, ``preference``, ``prompt``); the first is required, so a
    pipeline over data that lacks it fails at config time.
    policy: its model is a causal-LM policy: later stages of pipeline=auto continue from it and eval
    generates with it. False for a scorer (a reward model), which later stages read as an input.
    """

    name: str
    fn: Callable[[Any], dict]
    trains: bool
    views: tuple[str, ...]
    policy: bool = True


_STAGES: dict[str, StageKind] = {}
_loaded = False


def register_stage(name: str, *, trains: bool, views: tuple[str, ...] = (), policy: bool = True):
    """Decorator registering a stage function under ``name`` (fields as in ``StageKind``)."""

    def deco(fn):
        if name in _STAGES and _STAGES[name].fn is not fn:
            raise ValueError(f"stage kind {name!r} is registered twice ({_STAGES[name].fn} and {fn})")
        _STAGES[name] = StageKind(name, fn, trains, tuple(views), policy)
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group="align_runner.stages"):
        ep.load()


def get_stage(name: str) -> StageKind:
    _load_all()
    try:
        return _STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known kinds: {', '.join(sorted(_STAGES))}") from None


def known_stages() -> list[str]:
    _load_all()
    return sorted(_STAGES)
