"""Checkers: score completions as text. Used by the eval stage and, as reward functions, by GRPO/PPO.

Every checker has one signature: ``fn(prompts, completions, **columns) -> list[float]``, one score per
completion; ``columns`` are the prompt rows' other fields (e.g. ``answer``), passed as lists.
Configure one with ``_target_`` (plus ``_partial_: true`` when it takes parameters).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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


def exact_answer(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_) -> list[float]:
    """1.0 when the whole completion is the reference answer (after ``normalize_answer``), else 0.0.

    Strict on purpose: the task asks for the answer alone, so a correct number buried in a paragraph
    does not count. ``last_number`` is the lenient variant.
    """
    answers = _require({"answer": answer}, "answer", len(completions))
    return [float(normalize_answer(c) == normalize_answer(a)) for c, a in zip(completions, answers)]


def last_number(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_) -> list[float]:
    """1.0 when the last number in the completion equals the reference answer."""
    answers = _require({"answer": answer}, "answer", len(completions))
    scores = []
    for c, a in zip(completions, answers):
        numbers = _NUMBER.findall(c)
        scores.append(float(bool(numbers) and numbers[-1] == str(a).strip()))
    return scores


def format_match(prompts: Sequence[str], completions: Sequence[str], *, pattern: str = r"-?\d+", **_) -> list[float]:
    """1.0 when the stripped completion matches ``pattern`` in full (the task's answer format)."""
    rx = re.compile(pattern)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length_within(prompts: Sequence[str], completions: Sequence[str], *, max_chars: int = 32, **_) -> list[float]:
    """1.0 when the completion has at most ``max_chars`` characters (stripped)."""
    return [float(len(c.strip()) <= max_chars) for c in completions]
