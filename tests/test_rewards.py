"""Reward functions with TRL's keyword signature: calling, combining with weights, metrics, by hand."""

from __future__ import annotations

import asyncio
import math
import time
from functools import partial

import numpy as np
import pytest
import torch

from align_runner.algos.rewards import (
    RewardScores,
    call_reward,
    completion_text,
    exact_answer,
    format_match,
    last_number,
    length_within,
    mean_score,
    reward_metrics,
    reward_name,
    score_completions,
)

PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["7", "seven", "7 apples"]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _nan_equal(a: torch.Tensor, b: list[float]) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), equal_nan=True)


# ------------------------------------------------------------------------------- completion_text
def test_completion_text_reads_strings_and_message_lists():
    assert completion_text("42") == "42"
    assert completion_text(_assistant("42")) == "42"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                    {"role": "tool", "content": "t"}, {"role": "assistant", "content": "a2"}]
    assert completion_text(conversation) == "a2"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "image"}, {"type": "text", "text": "2"}]}]
    assert completion_text(parts) == "42"
    with pytest.raises(ValueError, match="no assistant message"):
        completion_text([{"role": "user", "content": "q"}])


# ----------------------------------------------------------------------------------- call_reward
def test_call_reward_passes_keywords_and_columns():
    seen = {}

    def fn(completions, **kwargs):  # TRL's documented form
        seen.update(kwargs, completions=completions)
        return [len(c) for c in completions]

    out = call_reward(fn, prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1], [2], [3]],
                      columns={"answer": ["7", "7", "7"]})
    assert out == [1.0, 5.0, 8.0] and all(isinstance(v, float) for v in out)
    assert seen["prompts"] == PROMPTS and seen["completion_ids"] == [[1], [2], [3]]
    assert seen["answer"] == ["7", "7", "7"] and seen["completions"] == COMPLETIONS


def test_call_reward_awaits_async_functions_and_keeps_none_and_bools():
    async def fn(completions, **_):
        await asyncio.sleep(0)
        return [True, None, np.float64(0.5)]

    assert call_reward(fn, prompts=PROMPTS, completions=COMPLETIONS) == [1.0, None, 0.5]
    assert call_reward(lambda completions, **_: torch.tensor([1.0, 2.0, 3.0]), prompts=PROMPTS,
                       completions=COMPLETIONS) == [1.0, 2.0, 3.0]


def test_call_reward_inside_a_running_event_loop():
    async def fn(completions, **_):
        return [1.0] * len(completions)

    async def main():
        return call_reward(fn, prompts=PROMPTS, completions=COMPLETIONS)

    assert asyncio.run(main()) == [1.0, 1.0, 1.0]


def test_call_reward_names_the_function_and_what_came_back():
    def too_short(completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match=r"'too_short' must return a list of 3 numbers.*list of 1: \[1.0\]"):
        call_reward(too_short, prompts=PROMPTS, completions=COMPLETIONS)
    with pytest.raises(ValueError, match="'bad_type'.*got list of 3: \\['a'"):
        call_reward(_named("bad_type", lambda **_: ["a", "b", "c"]), prompts=PROMPTS, completions=COMPLETIONS)
    with pytest.raises(ValueError, match="got float: 1.0"):
        call_reward(lambda **_: 1.0, prompts=PROMPTS, completions=COMPLETIONS)
    with pytest.raises(ValueError, match="clash"):
        call_reward(lambda **_: [1.0] * 3, prompts=PROMPTS, completions=COMPLETIONS, columns={"completions": [1]})


def _named(name, fn):
    fn.__name__ = name
    return fn


def test_reward_name_sees_through_partial():
    assert reward_name(partial(format_match, pattern="x")) == "format_match"
    assert reward_name(exact_answer) == "exact_answer"


# ------------------------------------------------------------------------------ the eval checker path
def test_eval_checker_path_takes_a_trl_style_function_and_skips_none_in_the_mean():
    # eval.py calls every checker through call_reward and averages with mean_score
    def short_only(completions, **kwargs):
        assert "answer" in kwargs and "prompt_ids" in kwargs and "completion_ids" in kwargs
        return [1.0 if len(c) < 3 else None if c.endswith("s") else 0.0 for c in completions]

    scores = call_reward(short_only, prompts=PROMPTS, completions=["7", "seven", "apples"], completion_ids=[[1]] * 3,
                         columns={"answer": ["7"] * 3, "prompt_ids": [[9]] * 3})
    assert scores == [1.0, 0.0, None]
    assert mean_score(scores) == 0.5
    assert math.isnan(mean_score([None, None]))
    # the built-in checkers, configured with `_partial_: true`, take the same call
    checker = partial(exact_answer)
    assert call_reward(checker, prompts=PROMPTS, completions=COMPLETIONS, completion_ids=None,
                       columns={"answer": ["7"] * 3, "prompt_ids": [[1]] * 3}) == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- built-ins, TRL call
def test_builtins_take_the_trl_keyword_call_and_message_lists():
    msgs = [_assistant(c) for c in ["28", " 28.\n", "The answer is 28", "29"]]
    kw = {"prompts": [[{"role": "user", "content": "q"}]] * 4, "completion_ids": [[1]] * 4}
    assert exact_answer(completions=msgs, answer=["28"] * 4, **kw) == [1.0, 1.0, 0.0, 0.0]
    assert last_number(completions=msgs, answer=["28"] * 4, **kw) == [1.0, 1.0, 1.0, 0.0]
    assert format_match(completions=msgs, **kw) == [1.0, 0.0, 0.0, 1.0]
    assert length_within(completions=msgs, max_chars=3, **kw) == [1.0, 1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------- score_completions
def _constant(values):
    return lambda **_: list(values)


def test_weighted_total_is_a_nansum_and_nan_where_all_none():
    funcs = {"a": _constant([1.0, None, 0.0, None]), "b": _constant([0.5, 2.0, None, None])}
    with pytest.warns(UserWarning, match=r"every reward function returned None for rows \[3\]"):
        scores = score_completions(funcs, weights=[2.0, 0.5], prompts=["p"] * 4, completions=["c"] * 4)
    # row 0: 2*1 + 0.5*0.5 = 2.25; row 1: 0.5*2 = 1; row 2: 2*0 = 0; row 3: no function applies
    assert _nan_equal(scores.total, [2.25, 1.0, 0.0, math.nan])
    assert _nan_equal(scores.per_function["a"], [1.0, math.nan, 0.0, math.nan])
    assert scores.total.dtype == torch.float32 and list(scores.per_function) == ["a", "b"]


def test_weights_by_name_none_and_errors():
    funcs = {"a": _constant([1.0, 2.0]), "b": _constant([10.0, 20.0])}
    call = partial(score_completions, funcs, prompts=["p"] * 2, completions=["c"] * 2)
    assert _nan_equal(call(weights=None).total, [11.0, 22.0])
    assert _nan_equal(call(weights={"b": 0.1}).total, [2.0, 4.0])  # a left out: weight 1
    with pytest.raises(ValueError, match="unknown functions"):
        call(weights={"c": 1.0})
    with pytest.raises(ValueError, match="1 reward weights for 2"):
        call(weights=[1.0])


def test_async_functions_run_concurrently():
    async def slow_a(completions, **_):
        await asyncio.sleep(0.2)
        return [1.0] * len(completions)

    async def slow_b(completions, **_):
        await asyncio.sleep(0.2)
        return [2.0] * len(completions)

    start = time.perf_counter()
    scores = score_completions({"a": slow_a, "b": slow_b, "c": _constant([3.0, 3.0])}, weights=None,
                               prompts=["p"] * 2, completions=["c"] * 2)
    assert time.perf_counter() - start < 0.35
    assert _nan_equal(scores.total, [6.0, 6.0])


def test_a_failing_function_does_not_leave_coroutines_unawaited(recwarn):
    async def fine(completions, **_):
        return [1.0] * len(completions)

    def broken(**_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        score_completions({"a": fine, "b": broken}, weights=None, prompts=["p"], completions=["c"])
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# --------------------------------------------------------------------------------- reward_metrics
def test_reward_metrics_by_hand():
    nan = math.nan
    scores = RewardScores(
        total=torch.tensor([1.0, 3.0, 2.0, 2.0]),
        per_function={"acc": torch.tensor([1.0, nan, 0.0, 1.0]), "fmt": torch.tensor([0.0, 3.0, 2.0, 1.0])},
    )
    m = reward_metrics(scores, group_size=2)
    assert m["reward"] == pytest.approx(2.0)
    # group stds (unbiased): [1, 3] -> sqrt(2); [2, 2] -> 0
    assert m["reward_std"] == pytest.approx(math.sqrt(2) / 2)
    assert m["frac_reward_zero_std"] == pytest.approx(0.5)
    # acc over {1, 0, 1}: mean 2/3, unbiased var ((1/3)^2*2 + (2/3)^2) / 2 = 1/3
    assert m["rewards/acc/mean"] == pytest.approx(2 / 3)
    assert m["rewards/acc/std"] == pytest.approx(math.sqrt(1 / 3))
    # fmt: mean 1.5, unbiased var (2.25 + 2.25 + 0.25 + 0.25) / 3 = 5/3
    assert m["rewards/fmt/mean"] == pytest.approx(1.5)
    assert m["rewards/fmt/std"] == pytest.approx(math.sqrt(5 / 3))
    assert set(m) == {"reward", "reward_std", "frac_reward_zero_std", "rewards/acc/mean", "rewards/acc/std",
                      "rewards/fmt/mean", "rewards/fmt/std"}
    with pytest.raises(ValueError, match="groups of 3"):
        reward_metrics(scores, group_size=3)


def test_reward_metrics_ignore_rows_without_a_reward():
    scores = RewardScores(torch.tensor([1.0, math.nan, 3.0, 5.0]), {"a": torch.tensor([1.0, math.nan, 3.0, 5.0])})
    m = reward_metrics(scores, group_size=2)
    assert m["reward"] == pytest.approx(3.0)
    # group 0 has one value left (std undefined, skipped); group 1: std of [3, 5] = sqrt(2)
    assert m["reward_std"] == pytest.approx(math.sqrt(2))
    assert m["frac_reward_zero_std"] == 0.0
