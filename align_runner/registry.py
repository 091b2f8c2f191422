"""The stage registry: a stage's ``kind:`` is a key here.

Built-in stages register with ``@register_stage``; third-party packages add kinds through the
``align_runner.stages`` entry-point group (the entry point's value is the module that registers them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

# What a kind produces: the metric names, or a function of (composed config, StageSpec) giving them
# when they depend on the config (an eval stage's checkers, an online stage's reward functions).
Metrics = tuple[str, ...] | Callable[[Any, Any], Iterable[str]]

# Modules holding the built-in stages; imported lazily so `--help` and config checks stay fast.
_BUILTIN_MODULES = (
    "align_runner.stages.data_prep",
    "align_runner.stages.sft",
    "align_runner.stages.eval",
    "align_runner.stages.reward",
    "align_runner.stages.ref_logps",
    "align_runner.stages.dpo",
    "align_runner.stages.kto",
    "align_runner.stages.grpo",
    "align_runner.stages.ppo",
)


@dataclass(frozen=True)
class Input:
    """An input a stage kind reads besides its data and its starting model, declared by role.

    kind: the kind of stage that provides it (e.g. ``reward`` for a GRPO stage's ``reward_model``).
    required: a pipeline without such a provider is a config error; an optional input is bound when
    the pipeline has a provider and simply absent otherwise.
    derived: for an input computed from this stage's own starting model (DPO's reference log-probs):
    the config node, under the stage's section, of the provider that ``pipeline=auto`` inserts right
    before the stage; its ``stage`` key names it (in explicit pipelines too, unless ``inputs`` binds it).
    what: how messages name it ("reference log-probs").
    """

    kind: str
    required: bool = True
    derived: str | None = None
    what: str = ""


@dataclass(frozen=True)
class HeldModels:
    """Models a stage holds beside the one it trains, each counted at its input model's size by the
    dry run's memory estimate: ``frozen`` whole copies for forward passes only (a reference, a reward
    model), ``trained`` ones sharded like the policy, with their own gradients and optimizer (a critic)."""

    frozen: int = 0
    trained: int = 0


@dataclass(frozen=True)
class StageKind:
    """A registered stage kind.

    fn: ``fn(ctx: StageContext) -> dict[str, float]`` (final metrics).
    trains: whether it produces a model (so a later stage may start from it).
    views: the data views it reads (``sft``, ``preference``, ``prompt``); the first is required, so a
    pipeline over data that lacks it fails at config time.
    policy: its model is a causal-LM policy: later stages of pipeline=auto continue from it and eval
    generates with it. False for a scorer (a reward model), which later stages read as an input.
    inputs: role -> ``Input``: what else it reads. Its key covers each input's key, and the stage's
    context hands it exactly these (plus ``data`` and ``model``), nothing else.
    key_metrics: metrics worth a column in the end-of-run table, in order.
    metrics: every metric it can report (``Metrics``), so a ``pipeline.objective`` naming one it never
    reports fails at compose time. None: undeclared (a third-party kind), and an objective on it is
    not checked.
    check: ``check(cfg, spec)``, run when the graph is built (before any model loads): raises a
    ConfigError for settings of this kind that cannot work together.
    held: ``held(cfg, spec) -> HeldModels``, the other models it loads (None: none).
    """

    name: str
    fn: Callable[[Any], dict]
    trains: bool
    views: tuple[str, ...]
    policy: bool = True
    inputs: Mapping[str, Input] = field(default_factory=dict)
    key_metrics: tuple[str, ...] = ()
    check: Callable[[Any, Any], None] | None = None
    metrics: Metrics | None = None
    held: Callable[[Any, Any], HeldModels] | None = None

    def produces(self, cfg: Any, spec: Any) -> set[str] | None:
        """The metric names this kind reports as stage ``spec`` of ``cfg``; None when undeclared."""
        if self.metrics is None:
            return None
        return set(self.metrics(cfg, spec) if callable(self.metrics) else self.metrics)


_STAGES: dict[str, StageKind] = {}
_loaded = False


def register_stage(
    name: str,
    *,
    trains: bool,
    views: tuple[str, ...] = (),
    policy: bool = True,
    inputs: Mapping[str, Input] | None = None,
    key_metrics: tuple[str, ...] = (),
    check: Callable[[Any, Any], None] | None = None,
    metrics: Metrics | None = None,
    held: Callable[[Any, Any], HeldModels] | None = None,
):
    """Decorator registering a stage function under ``name`` (fields as in ``StageKind``)."""

    def deco(fn):
        if name in _STAGES and _STAGES[name].fn is not fn:
            raise ValueError(f"stage kind {name!r} is registered twice ({_STAGES[name].fn} and {fn})")
        _STAGES[name] = StageKind(
            name, fn, trains, tuple(views), policy, dict(inputs or {}), tuple(key_metrics), check, metrics, held
        )
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
