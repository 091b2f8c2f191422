"""Eval checkers (also GRPO/PPO reward functions): one score per completion, by hand."""

from __future__ import annotations

import pytest

from align_runner.algos.rewards import (
    exact_answer,
    format_match,
    last_number,
    length_within,
    normalize_answer,
)
from align_runner.data.demo import generate, question

PROMPTS = ["p1", "p2", "p3", "p4"]


def test_exact_answer_wants_the_answer_alone():
    completions = ["28", " 28.\n", "The answer is 28", "29"]
    assert exact_answer(PROMPTS, completions, answer=["28"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_last_number_credits_an_answer_inside_prose():
    completions = ["11 + 17 = 28", "28, not 27", "no number here", "-3"]
    assert last_number(PROMPTS, completions, answer=["28", "28", "28", "-3"]) == [1.0, 0.0, 0.0, 1.0]


def test_format_and_length():
    completions = ["42", "42 apples", "-7", "  8  "]
    assert format_match(PROMPTS, completions) == [1.0, 0.0, 1.0, 1.0]
    assert format_match(PROMPTS, completions, pattern=r"\d+ apples") == [0.0, 1.0, 0.0, 0.0]
    assert length_within(PROMPTS, ["abc", "abcd", "  ab  ", ""], max_chars=3) == [1.0, 0.0, 1.0, 1.0]


def test_extra_columns_are_ignored_and_a_missing_answer_is_named():
    assert exact_answer(["p"], ["5"], answer=["5"], prompt_ids=[[1, 2]]) == [1.0]
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        exact_answer(["p", "q"], ["5", "6"], answer=["5"])


def test_normalize_answer():
    assert normalize_answer("  Forty   Two. ") == "forty two"


def test_demo_answers_are_right_and_splits_are_disjoint():
    files = generate()
    for row in files["prompt-eval"] + files["prompt-train"]:
        q = row["prompt"][0]["content"]
        a, b = (int(x) for x in q.removeprefix("What is ").split("?")[0].split(" + "))
        assert q == question(a, b) and row["answer"] == str(a + b)
    train = {r["prompt"][0]["content"] for r in files["prompt-train"]}
    held_out = {r["prompt"][0]["content"] for r in files["prompt-eval"]}
    assert len(held_out) == 64 and not train & held_out


def test_shipped_demo_files_equal_a_fresh_generation():
    from align_runner.data.demo import DEMO_DIR, render

    for name, text in render(generate()).items():
        assert (DEMO_DIR / f"{name}.jsonl").read_text() == text, name


def test_demo_mixed_sft_is_the_demo_sft_with_two_answers_in_three_chatty():
    files = generate()
    for split in ("train", "eval"):
        plain, mixed = files[f"sft-{split}"], files[f"sft-mixed-{split}"]
        assert [r["prompt"] for r in mixed] == [r["prompt"] for r in plain]
        texts = [r["completion"][0]["content"] for r in mixed]
        answers = [r["completion"][0]["content"] for r in plain]
        chatty = [i % 3 != 0 for i in range(len(texts))]
        assert [t for t, c in zip(texts, chatty) if not c] == [a for a, c in zip(answers, chatty) if not c]
        assert [t for t, c in zip(texts, chatty) if c] == [f"{a}. We add the two numbers together." for a, c in zip(answers, chatty) if c]
        # the chatty rows carry the right answer: the lenient checker passes them, the strict one does not
        assert last_number([None] * len(texts), texts, answer=answers) == [1.0] * len(texts)
        assert exact_answer([None] * len(texts), texts, answer=answers) == [float(not c) for c in chatty]
