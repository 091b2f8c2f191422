"""Reward functions with TRL's signature, used by GRPO/PPO as rewards and by the eval stage as checkers.

A reward function is called with keyword arguments only::

    fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

one value per completion; ``None`` means "this function does not apply to that row". ``columns`` are
the prompt rows' other fields (e.g. ``answer``, ``prompt_ids``), passed as lists. Completions are
strings (standard data) or message lists ``[{"role": "assistant", "content": text}]``
(conversational data); :func:`completion_text` reads either. A function may be ``async def``.
Configure one with ``_target_`` (plus ``_partial_: true`` when it is a plain function).

:func:`call_reward` calls one function and checks what it returned; :func:`score_completions` calls
several (async ones concurrently) and combines them with weights, as TRL's ``reward_weights`` do;
:func:`reward_metrics` gives TRL's reward metric names.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import re
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# keyword names a reward function receives besides the dataset columns
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")


# ------------------------------------------------------------------------------- completions
def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; for a message list, the content of its last
    assistant message (a single message dict works too). Content given as a list of parts
    (``[{"type": "text", "text": ...}]``) has its text parts joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role") == "assistant":
                return _content_text(message.get("content", ""))
        raise ValueError(f"completion has no assistant message: {completion!r}"[:300])
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


# ----------------------------------------------------------------------------- calling
def reward_name(fn: Callable) -> str:
    """The name a reward function's metrics go under: ``__name__``, seen through ``functools.partial``."""
    while hasattr(fn, "func") and not hasattr(fn, "__name__"):
        fn = fn.func  # functools.partial (Hydra's `_partial_: true`)
    return getattr(fn, "__name__", type(fn).__name__)


def call_reward(
    fn: Callable,
    *,
    prompts: Sequence,
    completions: Sequence,
    completion_ids: Sequence[Sequence[int]] | None = None,
    columns: Mapping[str, Sequence] | None = None,
) -> list[float | None]:
    """Call ``fn(prompts=, completions=, completion_ids=, **columns)``, awaiting it when it is async,
    and return its scores as floats (None kept). A result that is not one number / bool / None per
    completion is a ValueError naming the function."""
    result = _start(fn, prompts, completions, completion_ids, columns)
    if inspect.isawaitable(result):
        (result,) = _run_concurrently([result])
    return _checked(fn, result, len(completions))


def _start(fn: Callable, prompts, completions, completion_ids, columns) -> Any:
    """The function's result, or its awaitable when it is async (not run yet)."""
    columns = dict(columns or {})
    clash = [k for k in REWARD_ARGUMENTS if k in columns]
    if clash:
        raise ValueError(f"dataset columns {clash} clash with the reward-function arguments {list(REWARD_ARGUMENTS)}")
    return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)


def _run_concurrently(awaitables: list[Awaitable]) -> list[Any]:
    """Await all at once (``asyncio.gather``). Inside a running event loop (a notebook, an async
    server) ``asyncio.run`` is not allowed, so they run on a fresh loop in a helper thread."""

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*awaitables))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _checked(fn: Callable, result: Any, n: int) -> list[float | None]:
    if hasattr(result, "tolist"):  # a tensor or numpy array
        result = result.tolist()
    ok = (
        isinstance(result, Sequence)
        and not isinstance(result, str)
        and len(result) == n
        and all(v is None or isinstance(v, (numbers.Real, np.bool_)) for v in result)
    )
    if not ok:
        raise ValueError(
            f"reward function {reward_name(fn)!r} must return a list of {n} numbers or None "
            f"(one per completion), got {_describe(result)}"
        )
    return [None if v is None else float(v) for v in result]


def _describe(result: Any) -> str:
    if isinstance(result, Sequence) and not isinstance(result, str):
        return f"{type(result).__name__} of {len(result)}: {result!r}"[:200]
    return f"{type(result).__name__}: {result!r}"[:200]


# --------------------------------------------------------------------------- combining
class RewardScores(NamedTuple):
    """``total`` (N,) float32: weighted sum of the functions' scores ignoring None (NaN where every
    function gave None); ``per_function``: name -> (N,) float32 scores, NaN for None."""

    total: Tensor
    per_function: dict[str, Tensor]


def score_completions(
    funcs: Mapping[str, Callable],
    *,
    weights: Mapping[str, float] | Sequence[float] | None,
    prompts: Sequence,
    completions: Sequence,
    completion_ids: Sequence[Sequence[int]] | None = None,
    columns: Mapping[str, Sequence] | None = None,
) -> RewardScores:
    """Score N completions with every function and combine: ``total_i = nansum_f(w_f * r_if)``.

    ``weights``: one per function (in ``funcs`` order), or by name (a name left out weighs 1.0),
    or None for all 1.0. Async functions run concurrently. A row where every function returned None
    gets NaN and a warning (it carries no reward signal).
    """
    if not funcs:
        raise ValueError("score_completions needs at least one reward function")
    w = _weights(funcs, weights)
    started: dict[str, Any] = {}
    try:
        for name, fn in funcs.items():
            started[name] = _start(fn, prompts, completions, completion_ids, columns)
    except BaseException:
        for result in started.values():  # no "coroutine was never awaited" noise on top of the error
            if inspect.iscoroutine(result):
                result.close()
        raise
    pending = [name for name, r in started.items() if inspect.isawaitable(r)]
    if pending:
        started.update(zip(pending, _run_concurrently([started[name] for name in pending])))
    n = len(completions)
    per_function = {
        name: torch.tensor([math.nan if v is None else v for v in _checked(funcs[name], r, n)], dtype=torch.float32)
        for name, r in started.items()
    }
    stacked = torch.stack(list(per_function.values()), dim=1)  # (N, F)
    total = (stacked * w).nansum(dim=1)
    none = stacked.isnan().all(dim=1)
    if none.any():
        warnings.warn(
            f"every reward function returned None for rows {none.nonzero().flatten().tolist()}; their "
            "total reward is NaN (make at least one function apply to every row)",
            stacklevel=2,
        )
        total[none] = math.nan
    return RewardScores(total, per_function)


def _weights(funcs: Mapping[str, Callable], weights: Mapping[str, float] | Sequence[float] | None) -> Tensor:
    names = list(funcs)
    if weights is None:
        values = [1.0] * len(names)
    elif isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"reward weights name unknown functions {unknown}; functions: {names}")
        values = [float(weights.get(name, 1.0)) for name in names]
    else:
        values = [float(x) for x in weights]
        if len(values) != len(names):
            raise ValueError(f"{len(values)} reward weights for {len(names)} reward functions {names}")
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- metrics
def reward_metrics(scores: RewardScores, group_size: int) -> dict[str, float]:
    """TRL's reward metrics for N = groups x ``group_size`` completions (a group = one prompt's).

    ``reward``: mean total; ``reward_std``: mean over groups of the group's std of total;
    ``frac_reward_zero_std``: fraction of groups whose totals are all (close to) equal;
    ``rewards/<name>/mean`` and ``/std`` per function. Stds are unbiased (Bessel) as in TRL, and
    every statistic ignores NaN (rows a function did not apply to).
    """
    n = scores.total.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} completions do not split into groups of {group_size}")
    group_std = _nanstd(scores.total.view(-1, group_size), dim=1)
    metrics = {
        "reward": float(scores.total.nanmean()),
        "reward_std": float(group_std.nanmean()),
        "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()),
    }
    for name, values in scores.per_function.items():
        metrics[f"rewards/{name}/mean"] = float(values.nanmean())
        metrics[f"rewards/{name}/std"] = float(_nanstd(values, dim=0))
    return metrics


def _nanstd(x: Tensor, dim: int) -> Tensor:
    """Unbiased std over ``dim`` ignoring NaN; NaN where fewer than two values remain."""
    count = (~x.isnan()).sum(dim=dim)
    mean = x.nansum(dim=dim, keepdim=True) / count.unsqueeze(dim).clamp(min=1)
    var = ((x - mean) ** 2).nansum(dim=dim) / (count - 1).clamp(min=1)
    return var.sqrt().masked_fill(count < 2, math.nan)


def mean_score(scores: Sequence[float | None]) -> float:
    """Mean of the scores that are not None (nor NaN); NaN when there are none. The eval stage's
    metric for one checker."""
    kept = [s for s in scores if s is not None and not math.isnan(s)]
    return sum(kept) / len(kept) if kept else math.nan


# ------------------------------------------------------------------------------ built-ins
def normalize_answer(text: str) -> str:
    """Lower-case, collapse white space, drop surrounding spaces and trailing sentence punctuation."""
    return " ".join(str(text).lower().split()).rstrip(".!").strip()


def _require(columns: dict, name: str, n: int) -> Sequence:
    if name not in columns:
        raise KeyError(f"checker needs a column {name!r} in the prompt rows; have: {sorted(columns)}")
    values = columns[name]
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


def exact_answer(prompts: Sequence, completions: Sequence, *, answer: Sequence[str], **_) -> list[float]:
    """1.0 when the whole completion is the reference answer (after ``normalize_answer``), else 0.0.

    Strict on purpose: the task asks for the answer alone, so a correct number buried in a paragraph
    does not count. ``last_number`` is the lenient variant.
    """
    answers = _require({"answer": answer}, "answer", len(completions))
    return [float(normalize_answer(completion_text(c)) == normalize_answer(a)) for c, a in zip(completions, answers)]


def last_number(prompts: Sequence, completions: Sequence, *, answer: Sequence[str], **_) -> list[float]:
    """1.0 when the last number in the completion equals the reference answer."""
    answers = _require({"answer": answer}, "answer", len(completions))
    scores = []
    for c, a in zip(completions, answers):
        numbers_found = _NUMBER.findall(completion_text(c))
        scores.append(float(bool(numbers_found) and numbers_found[-1] == str(a).strip()))
    return scores


def format_match(prompts: Sequence, completions: Sequence, *, pattern: str = r"-?\d+", **_) -> list[float]:
    """1.0 when the stripped completion matches ``pattern`` in full (the task's answer format)."""
    rx = re.compile(pattern)
    return [float(rx.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def length_within(prompts: Sequence, completions: Sequence, *, max_chars: int = 32, **_) -> list[float]:
    """1.0 when the completion has at most ``max_chars`` characters (stripped)."""
    return [float(len(completion_text(c).strip()) <= max_chars) for c in completions]
