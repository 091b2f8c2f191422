"""The data check before any model loads (DESIGN §5), run by the CLI (dry runs too) and ``api.run``.

It reads what this pipeline's data_prep will read and checks every row (``data.check``), unless that
data_prep is already DONE in the store: its rows were checked when it ran, so a large dataset is not
read again on every run; its row counts are then held against ``data.max_dropped_share``, which can
have changed since. It also checks that each reward function and eval checker finds the columns it
needs in the prompt rows it will score (a checker needing ``answer`` on data without one). Problems
are raised together as one ``DataProblems``, a ``DataError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from align_runner.algos.rewards import REWARD_ARGUMENTS
from align_runner.data.check import Problems, check_sources, readable_here
from align_runner.data.errors import DataError
from align_runner.data.prepare import check_kept
from align_runner.data.sources import first_row, source_label
from align_runner.data.views import SPLITS, shared_formats, view_source
from align_runner.pipeline.graph import build_graph, data_views
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore

# Config nodes of reward functions and the prompt split they score: eval's checkers score held-out
# generations, an online stage's rewards score its rollouts on train prompts.
_SCORERS = (("checkers", "eval"), ("rewards", "train"))
# Columns every prompt row has once prepared, whatever its source holds.
_PREPARED_COLUMNS = ("prompt", "prompt_ids")


def check_data(cfg: DictConfig) -> None:
    """Raise ``DataProblems`` (one line per problem) when the data of ``cfg``'s pipeline cannot run."""
    specs = build_graph(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    formats = shared_formats(data)
    views = data_views(cfg, specs)
    problems = Problems()
    prep = plan(cfg, StageStore(cfg.paths.store))[0]  # the first stage is always data_prep
    if prep.cached:
        metrics = StageStore(cfg.paths.store).manifest(prep.spec.kind, prep.key)["metrics"]
        _check_counts(data, views, formats, metrics, float(cfg.data.max_dropped_share), problems)
    else:
        check_sources(data, views, formats, problems)
    for config in dict.fromkeys(s.config for s in specs):
        _check_scorer_columns(cfg, config, data, formats, problems)
    problems.raise_any()


def _check_counts(data: Mapping, views: list[str], formats: Mapping, metrics: Mapping[str, float], share: float,
                  problems: Problems) -> None:
    for view in views:
        for split in SPLITS:
            source = view_source(data, view, split, formats)
            counts = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith(f"{view}/{split}/")}
            if source is None or not counts:
                continue
            try:
                check_kept(counts, source_label(source), view, split, share)
            except DataError as exc:
                problems.add([exc])


def _check_scorer_columns(cfg: DictConfig, config: str, data: Mapping, formats: Mapping, problems: Problems) -> None:
    """Each function under ``<config>.checkers`` / ``.rewards`` against the first prompt row it scores."""
    section = OmegaConf.select(cfg, config)
    for node_name, split in _SCORERS:
        funcs = section.get(node_name) if isinstance(section, DictConfig) else None
        source = view_source(data, "prompt", split, formats) if funcs else None
        if source is None or not readable_here(source):
            continue
        try:
            row, label = first_row(source)
        except DataError as exc:
            problems.add([exc])
            continue
        for name, node in funcs.items():
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            missing = [c for c in needed_columns(node) if c not in row and c not in _PREPARED_COLUMNS] if target else []
            problems.add(
                DataError(f"{config}.{node_name}.{name}: {target} needs a column {column!r}, which the prompt rows of "
                          f"{label} lack (their columns: {', '.join(sorted(row))}); add it or rename one to it")
                for column in missing
            )


def needed_columns(node: DictConfig) -> list[str]:
    """The dataset columns a reward function / checker node must be called with: its parameters with
    no default, less the reward-function arguments and those the node binds. A ``_partial_`` node is
    its function; any other ``_target_`` a class is called through ``__call__`` (a factory: unknown)."""
    target = get_object(str(node._target_))
    if node.get("_partial_"):
        fn, bound = target, {str(k) for k in node}
    elif inspect.isclass(target):
        fn, bound = target.__call__, {"self"}
    else:
        return []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name for p in params
        if p.kind in named and p.default is p.empty and p.name not in bound and p.name not in REWARD_ARGUMENTS
    ]
